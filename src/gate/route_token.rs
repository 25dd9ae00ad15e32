//! Route tokens: proof, carried in the stream's parameters, that the caller passed the PIN.
//! Issued by `/validate-pin`, checked at the stream's `start`. A token names the caller, the
//! backends the PIN opened and an expiry, signed with HMAC-SHA256 under a secret every
//! instance shares: `v1.<base64url claims>.<base64url mac>`.
//!
//! A token opens one stream: [`redeem`] checks it, checks it is bound to this call (when the
//! flow sent the call sid to `/validate-pin`) and that its caller is not blocked by now, and
//! takes it in the store so no second stream, on any instance, can use it again.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::store::StateStore;
use std::time::Duration;

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
    /// The call the token was issued for, when `/validate-pin` was told it.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub call_sid: Option<String>,
    /// Makes two tokens issued in the same second for the same caller different tokens.
    #[serde(rename = "n", default)]
    pub nonce: u64,
    /// A hand-off token: the stream it opens takes over the call from this stream (its sid).
    /// Issued by a draining instance, never by `/validate-pin`; it names the backends the
    /// call already had, which the new stream may not narrow.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub handoff_of: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("route token is malformed")]
    Malformed,
    #[error("route token signature is not valid")]
    BadSignature,
    #[error("route token expired")]
    Expired,
    #[error("route token was issued for another call")]
    OtherCall,
    #[error("route token was already used by another stream")]
    AlreadyUsed,
    #[error("route token's caller is blocked")]
    CallerBlocked,
    #[error("route token cannot be checked now: {0}")]
    Unavailable(String),
}

/// A nonce for [`Claims::nonce`]: `RandomState` draws its keys from the operating system.
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::unix_now());
    h.finish()
}

/// Verifies a token for the stream of `call_sid` without using it up: the signature, the
/// expiry, the call it is bound to, and (the store answers) that its caller is not blocked
/// now. A store that cannot answer refuses the stream (a token is never let through
/// unchecked). The stream uses the token up with [`claim`] once nothing else refuses it, so
/// a stream refused for any other reason burns nobody's token.
pub async fn check(
    store: &dyn StateStore,
    secret: &str,
    token: &str,
    call_sid: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    let claims = verify(secret, token, now)?;
    if claims
        .call_sid
        .as_deref()
        .is_some_and(|bound| bound != call_sid)
    {
        return Err(TokenError::OtherCall);
    }
    let unavailable = |e: crate::store::StoreError| TokenError::Unavailable(e.to_string());
    // A call that streamed without naming its caller (no route token was required) moves
    // without one: there is no one to look up.
    if claims.handoff_of.is_some() && claims.caller.is_empty() {
        return Ok(claims);
    }
    if super::withheld::is_withheld(&claims.caller)
        || store
            .blocked(&claims.caller)
            .await
            .map_err(unavailable)?
            .is_some()
    {
        return Err(TokenError::CallerBlocked);
    }
    Ok(claims)
}

/// Uses a checked token up: the first stream to claim it has it; any other, on any instance,
/// is refused until it expires.
pub async fn claim(
    store: &dyn StateStore,
    token: &str,
    claims: &Claims,
    now: u64,
) -> Result<(), TokenError> {
    let unavailable = |e: crate::store::StoreError| TokenError::Unavailable(e.to_string());
    // The tag is unique to the claims; kept until the token could no longer verify anyway.
    let tag = token.trim().rsplit_once('.').map_or("", |(_, t)| t);
    let ttl = Duration::from_secs(claims.expires_at.saturating_sub(now).max(1));
    if !store
        .claim_once(&format!("token:{tag}"), ttl)
        .await
        .map_err(unavailable)?
    {
        return Err(TokenError::AlreadyUsed);
    }
    Ok(())
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
            call_sid: None,
            nonce: 7,
            handoff_of: None,
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
