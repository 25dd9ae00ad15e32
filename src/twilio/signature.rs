//! `X-Twilio-Signature`: how Twilio signs the requests it makes, and how to check one.
//!
//! The signed data is the full URL Twilio requested, followed, for form posts, by each
//! parameter name and its value (names sorted byte-wise; a repeated name's values
//! de-duplicated and sorted). JSON posts are signed over the URL alone, which carries the
//! body's SHA-256 in its `bodySHA256` query parameter. The signature is the base64 HMAC-SHA1
//! of that data under the account's auth token, or HMAC-SHA256 under a signing key when the
//! `X-Twilio-Webhooks-Signature-Settings` header says so.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

pub const SIGNATURE_HEADER: &str = "x-twilio-signature";
pub const SETTINGS_HEADER: &str = "x-twilio-webhooks-signature-settings";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha1,
    HmacSha256,
}

/// What `X-Twilio-Webhooks-Signature-Settings` asks for: `key=<id>,algorithm=HMAC_SHA256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub key_id: String,
    pub algorithm: Algorithm,
}

pub fn parse_settings(header: &str) -> Option<Settings> {
    let mut key_id = None;
    let mut algorithm = None;
    for part in header.split(',') {
        let (k, v) = part.split_once('=')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "key" => key_id = Some(v.trim().to_string()),
            "algorithm" => {
                algorithm = match v.trim().to_ascii_uppercase().as_str() {
                    "HMAC_SHA256" => Some(Algorithm::HmacSha256),
                    "HMAC_SHA1" => Some(Algorithm::HmacSha1),
                    _ => return None,
                }
            }
            _ => {}
        }
    }
    Some(Settings {
        key_id: key_id.filter(|k| !k.is_empty())?,
        algorithm: algorithm?,
    })
}

/// The string Twilio signs: the URL, then the sorted form parameters.
pub fn signed_data(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable_by(|a, b| {
        a.0.as_bytes()
            .cmp(b.0.as_bytes())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    sorted.dedup();
    let mut data = String::with_capacity(url.len() + params.len() * 16);
    data.push_str(url);
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    data
}

fn keyed<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &str) -> M {
    let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac
}

/// base64 of the HMAC of `data` under `key`.
pub fn sign(algorithm: Algorithm, key: &[u8], data: &str) -> String {
    let tag = match algorithm {
        Algorithm::HmacSha1 => keyed::<Hmac<Sha1>>(key, data)
            .finalize()
            .into_bytes()
            .to_vec(),
        Algorithm::HmacSha256 => keyed::<Hmac<Sha256>>(key, data)
            .finalize()
            .into_bytes()
            .to_vec(),
    };
    base64::engine::general_purpose::STANDARD.encode(tag)
}

/// Whether `signature` (base64, as sent) is the HMAC of `data` under `key`; constant time.
pub fn verify(algorithm: Algorithm, key: &[u8], data: &str, signature: &str) -> bool {
    let Ok(presented) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    match algorithm {
        Algorithm::HmacSha1 => keyed::<Hmac<Sha1>>(key, data).verify_slice(&presented),
        Algorithm::HmacSha256 => keyed::<Hmac<Sha256>>(key, data).verify_slice(&presented),
    }
    .is_ok()
}

/// Lowercase hex SHA-256 of a body, as Twilio puts in `bodySHA256`.
pub fn body_sha256(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The `bodySHA256` query parameter of a URL, if any.
pub fn body_sha256_param(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v.into_owned())
}

/// The spellings of one URL that Twilio may have signed: with and without the scheme's
/// default port (Twilio's own libraries try both), and, for WebSocket URLs, with and without
/// a trailing slash on the path.
pub fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return out;
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (host, port) = split_port(authority);
    let default_port = match scheme {
        "https" | "wss" => Some("443"),
        "http" | "ws" => Some("80"),
        _ => None,
    };
    if let Some(default) = default_port {
        match port {
            Some(p) if p == default => out.push(format!("{scheme}://{host}{tail}")),
            None => out.push(format!("{scheme}://{host}:{default}{tail}")),
            Some(_) => {}
        }
    }
    if matches!(scheme, "ws" | "wss") {
        let toggled: Vec<String> = out.iter().map(|u| toggle_trailing_slash(u)).collect();
        out.extend(toggled);
    }
    out.dedup();
    out
}

/// `host[:port]`, keeping an IPv6 literal's brackets on the host.
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(end) = authority.rfind(']') {
        let (host, rest) = authority.split_at(end + 1);
        return (host, rest.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

fn toggle_trailing_slash(url: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let scheme_end = path.find("://").map(|i| i + 3).unwrap_or(0);
    let has_path = path[scheme_end..].contains('/');
    let toggled = match path.strip_suffix('/') {
        Some(trimmed) if trimmed[scheme_end..].contains('/') => trimmed.to_string(),
        Some(_) => path.to_string(),
        None if has_path => format!("{path}/"),
        None => format!("{path}/"),
    };
    match query {
        Some(q) => format!("{toggled}?{q}"),
        None => toggled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The worked example from Twilio's security documentation (value checked with Python).
    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn example_params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn matches_twilios_documented_example() {
        let data = signed_data(URL, &example_params());
        assert_eq!(
            data,
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+12349013030Digits1234From+12349013030To+18005551212"
        );
        let sig = sign(Algorithm::HmacSha1, TOKEN.as_bytes(), &data);
        assert_eq!(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(verify(Algorithm::HmacSha1, TOKEN.as_bytes(), &data, &sig));
        assert!(!verify(Algorithm::HmacSha1, b"12346", &data, &sig));
        assert!(!verify(
            Algorithm::HmacSha1,
            TOKEN.as_bytes(),
            &data,
            "not base64!"
        ));
    }

    #[test]
    fn repeated_parameters_are_deduplicated_and_sorted() {
        let params: Vec<(String, String)> = [("b", "2"), ("a", "z"), ("a", "y"), ("a", "z")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(signed_data("u", &params), "uayazb2");
    }

    #[test]
    fn settings_header() {
        assert_eq!(
            parse_settings("key=k1,algorithm=HMAC_SHA256"),
            Some(Settings {
                key_id: "k1".into(),
                algorithm: Algorithm::HmacSha256
            })
        );
        assert_eq!(parse_settings("algorithm=HMAC_SHA256"), None);
        assert_eq!(parse_settings("key=k1,algorithm=MD5"), None);
    }

    #[test]
    fn body_hash_and_its_parameter() {
        // Computed independently (Python's hashlib).
        assert_eq!(
            body_sha256(b"{\"pin\":\"1234\"}"),
            "c302a557cdb40121c01df0461cae14877ebd5eb4ae4d3388e8cf7d72cc8bf422"
        );
        assert_eq!(
            body_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            body_sha256_param("https://x/validate-pin?a=1&bodySHA256=abc"),
            Some("abc".into())
        );
        assert_eq!(body_sha256_param("https://x/validate-pin"), None);
    }

    #[test]
    fn url_spellings() {
        let v = url_variants("https://example.com/validate-pin?x=1");
        assert!(v.contains(&"https://example.com:443/validate-pin?x=1".to_string()));
        let v = url_variants("https://example.com:443/validate-pin");
        assert!(v.contains(&"https://example.com/validate-pin".to_string()));
        let v = url_variants("http://127.0.0.1:8999/validate-pin");
        assert_eq!(v, vec!["http://127.0.0.1:8999/validate-pin".to_string()]);
        let v = url_variants("wss://example.com/media");
        for want in [
            "wss://example.com/media",
            "wss://example.com:443/media",
            "wss://example.com/media/",
            "wss://example.com:443/media/",
        ] {
            assert!(v.contains(&want.to_string()), "{want} missing from {v:?}");
        }
        let v = url_variants("wss://example.com/media/");
        assert!(v.contains(&"wss://example.com/media".to_string()));
    }
}
