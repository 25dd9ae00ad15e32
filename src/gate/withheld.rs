//! Caller ids that identify nobody. Carriers pass withheld numbers through as these digit
//! spellings (RESTRICTED, BLOCKED, UNKNOWN, ANONYMOUS, UNAVAILABLE typed on a keypad, and
//! 464) or as the words; such callers and empty ids are always treated as blocked.

const WITHHELD: &[&str] = &[
    "7378742833",  // RESTRICTED
    "2562533",     // BLOCKED
    "8656696",     // UNKNOWN
    "266696687",   // ANONYMOUS
    "86282452253", // UNAVAILABLE
    "464",
    "restricted",
    "blocked",
    "unknown",
    "anonymous",
    "unavailable",
    "private",
];

pub fn is_withheld(caller: &str) -> bool {
    let id = caller.trim();
    if id.is_empty() {
        return true;
    }
    let digits = id.trim_start_matches('+');
    WITHHELD.iter().any(|w| w.eq_ignore_ascii_case(digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withheld_spellings() {
        for id in [
            "",
            " ",
            "7378742833",
            "+7378742833",
            "2562533",
            "8656696",
            "266696687",
            "86282452253",
            "464",
            "+464",
            "Anonymous",
            "RESTRICTED",
            "unavailable",
            "Blocked",
        ] {
            assert!(is_withheld(id), "{id:?}");
        }
        for id in ["+15551234567", "+4646", "client:alice", "4640"] {
            assert!(!is_withheld(id), "{id:?}");
        }
    }
}
