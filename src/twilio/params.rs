//! How Studio passes lists: a stream parameter or a widget's answer holds a JSON array as a
//! string (`["a","b"]`), while people typing parameters by hand write comma lists. One parser
//! for every place that reads such a list.

use serde_json::Value;

/// A list as Studio or a person writes it: a JSON array string, or a comma list. Entries are
/// trimmed; empty ones dropped; numbers kept as their digits.
pub fn parse_list(raw: &str) -> Vec<String> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        if let Ok(items) = serde_json::from_str::<Vec<Value>>(raw) {
            return from_items(items);
        }
    }
    raw.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A list in a JSON answer: an array, or a string holding one (as `/validate-pin` answers).
pub fn list_value(value: Option<Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => from_items(items),
        Some(Value::String(s)) => parse_list(&s),
        _ => Vec::new(),
    }
}

fn from_items(items: Vec<Value>) -> Vec<String> {
    items
        .into_iter()
        .filter_map(|v| match v {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_comma_lists_and_arrays_read_alike() {
        for raw in [
            r#"["rec","asr"]"#,
            "rec, asr",
            r#" [ "rec" , "asr", "" ] "#,
            "\"rec\",asr,",
        ] {
            assert_eq!(parse_list(raw), ["rec", "asr"], "{raw}");
        }
        assert_eq!(parse_list("[1, 2]"), ["1", "2"]);
        assert!(parse_list("").is_empty());
        assert_eq!(
            list_value(Some(serde_json::json!(["rec", 7, null]))),
            ["rec", "7"]
        );
        assert_eq!(list_value(Some(serde_json::json!("[\"rec\"]"))), ["rec"]);
        assert!(list_value(Some(serde_json::json!({"rec": 1}))).is_empty());
        assert!(list_value(None).is_empty());
    }
}
