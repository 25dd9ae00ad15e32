//! The operator API key: `apiKey: <key>` (the original's header) or `Authorization: Bearer`.
//! Compared in constant time. No key configured: the guarded routes answer 403.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

pub async fn require(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let client = request
        .extensions()
        .get::<super::rate_limit::ClientIp>()
        .map(|c| c.0);
    let refused = match check(state.settings.security.api_key.expose(), request.headers()) {
        Ok(()) => return Ok(next.run(request).await),
        Err(e) => e,
    };
    if refused.status == StatusCode::FORBIDDEN && client.is_none_or(|ip| state.limits.may_log(ip)) {
        let shown = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        tracing::warn!(client = %shown, "operator route refused: {}", refused.message);
    }
    // Only a key presented and wrong is a guess; no key at all is not.
    let guessed = request_has_key(request.headers());
    if let (Some(ip), true) = (client, guessed) {
        if let Some(retry) = wrong_key(&state, ip).await {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong API keys from this address; slow down",
            )
            .retry_after(retry.as_secs()));
        }
    }
    Err(refused)
}

/// Wrong API keys one address may present in an hour, through the header and the page's
/// login form together.
const WRONG_KEYS_PER_HOUR: u64 = 20;
/// How long each wrong key past that limit waits for its answer.
const WRONG_KEY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts a wrong API key from `client` (counted first, then decided, in one step on every
/// engine). Past the limit — or when the store cannot count: it fails closed — the wrong key's
/// answer waits and is a 429 with the window's rest. The right key is never counted or
/// slowed: an operator locked out by someone else's guessing still gets in.
pub(super) async fn wrong_key(
    state: &AppState,
    client: std::net::IpAddr,
) -> Option<std::time::Duration> {
    let counted = state
        .store
        .count_in_window(
            &format!("operator-failures:{client}"),
            std::time::Duration::from_secs(3600),
        )
        .await;
    let retry = match counted {
        Ok((n, _)) if n <= WRONG_KEYS_PER_HOUR => return None,
        Ok((_, left)) => left,
        Err(_) => std::time::Duration::from_secs(60),
    };
    state.metrics.limited("operator_keys");
    tokio::time::sleep(WRONG_KEY_DELAY).await;
    Some(retry)
}

/// Whether the request presents an API key at all (right or wrong).
fn request_has_key(headers: &HeaderMap) -> bool {
    headers.contains_key("apikey")
        || headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer "))
}

fn check(configured: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if configured.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "no API key is configured on this service; operator routes are disabled",
        ));
    }
    let presented = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    // 403 as the original answers a missing key, and as a wrong one.
    let Some(presented) = presented else {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "API key required"));
    };
    if bool::from(presented.trim().as_bytes().ct_eq(configured.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "wrong API key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn either_header_works_and_everything_else_is_refused() {
        assert!(check("k3y", &headers(&[("apiKey", "k3y")])).is_ok());
        assert!(check("k3y", &headers(&[("Authorization", "Bearer k3y")])).is_ok());
        let status = |c: &str, h: &[(&str, &str)]| check(c, &headers(h)).unwrap_err().status;
        assert_eq!(status("k3y", &[]), StatusCode::FORBIDDEN);
        assert_eq!(status("k3y", &[("apiKey", "k3z")]), StatusCode::FORBIDDEN);
        assert_eq!(status("k3y", &[("apiKey", "k3")]), StatusCode::FORBIDDEN);
        assert_eq!(
            status("k3y", &[("Authorization", "Basic k3y")]),
            StatusCode::FORBIDDEN
        );
        assert_eq!(status("", &[("apiKey", "")]), StatusCode::FORBIDDEN);
    }
}
