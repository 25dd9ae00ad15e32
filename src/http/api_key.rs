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
    check(state.settings.security.api_key.expose(), request.headers()).inspect_err(|e| {
        if e.status == StatusCode::FORBIDDEN && client.is_none_or(|ip| state.limits.may_log(ip)) {
            let client = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
            tracing::warn!(%client, "operator route refused: {}", e.message);
        }
    })?;
    Ok(next.run(request).await)
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
