//! Route tokens: proof, carried in the stream's parameters, that the caller passed the PIN.
//! Issued by `/validate-pin`, checked at the stream's `start`. A token names the caller, the
//! backends the PIN opened and an expiry, signed with HMAC-SHA256 under a secret every
//! instance shares: `v1.<base64url claims>.<base64url mac>`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const VERSION: &str = "v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "c")]
    pub caller: String,
    #[serde(rename = "b")]
    pub backend_ids: Vec<String>,
    #[serde(rename = "h", default, skip_serializing_if = "Vec::is_empty")]
    pub backend_hosts: Vec<String>,
    /// Unix seconds.
    #[serde(rename = "x")]
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("route token is malformed")]
    Malformed,
    #[error("route token signature is not valid")]
    BadSignature,
    #[error("route token expired")]
    Expired,
}

fn mac(secret: &str, signed: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signed.as_bytes());
    mac
}

pub fn issue(secret: &str, claims: &Claims) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signed = format!("{VERSION}.{body}");
    let tag = URL_SAFE_NO_PAD.encode(mac(secret, &signed).finalize().into_bytes());
    format!("{signed}.{tag}")
}

/// Checks the signature (in constant time) before reading anything in the claims.
pub fn verify(secret: &str, token: &str, now: u64) -> Result<Claims, TokenError> {
    let (signed, tag) = token.trim().rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (version, body) = signed.split_once('.').ok_or(TokenError::Malformed)?;
    if version != VERSION {
        return Err(TokenError::Malformed);
    }
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    mac(secret, signed)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if claims.expires_at <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-route-token-secret";

    fn claims() -> Claims {
        Claims {
            caller: "+15551234567".into(),
            backend_ids: vec!["rec".into(), "asr".into()],
            backend_hosts: vec![],
            expires_at: 1_000,
        }
    }

    #[test]
    fn valid_tokens_verify() {
        let t = issue(SECRET, &claims());
        assert_eq!(verify(SECRET, &t, 999), Ok(claims()));
    }

    #[test]
    fn forged_altered_truncated_and_expired_tokens_fail() {
        let t = issue(SECRET, &claims());
        assert_eq!(verify(SECRET, &t, 1_000), Err(TokenError::Expired));
        assert_eq!(
            verify("another-secret-entirely", &t, 1),
            Err(TokenError::BadSignature)
        );
        // Claims swapped for others under the same tag.
        let mut other = claims();
        other.backend_ids.push("admin".into());
        let forged_body = issue(SECRET, &other);
        let (_, tag) = t.rsplit_once('.').unwrap();
        let (signed, _) = forged_body.rsplit_once('.').unwrap();
        assert_eq!(
            verify(SECRET, &format!("{signed}.{tag}"), 1),
            Err(TokenError::BadSignature)
        );
        // One character changed anywhere, or the token cut short.
        for i in 0..t.len() {
            let mut bytes = t.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            if altered != t {
                assert!(verify(SECRET, &altered, 1).is_err(), "altered at {i}");
            }
        }
        assert!(verify(SECRET, &t[..t.len() - 2], 1).is_err());
        assert_eq!(verify(SECRET, "", 1), Err(TokenError::Malformed));
        assert_eq!(verify(SECRET, "v2.e30.AAAA", 1), Err(TokenError::Malformed));
    }
}
