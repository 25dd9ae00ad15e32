//! The Twilio signature guard: only requests Twilio signed reach the gate and media routes.
//! The body is read once, under `twilio.max_body_bytes`, checked, and handed on.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;
use tracing::warn;

use super::{ApiError, AppState};
use crate::config::TwilioSettings;
use crate::twilio::signature::{self, Algorithm};

pub async fn require(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let settings = &state.settings.twilio;
    if !settings.validate_signatures {
        return Ok(next.run(request).await);
    }
    let (parts, body) = request.into_parts();
    let client = parts
        .extensions
        .get::<super::rate_limit::ClientIp>()
        .map(|c| c.0);
    let refuse = |scope: &'static str, status: StatusCode, message: &str| {
        state.metrics.signature_failed(scope);
        if client.is_none_or(|ip| state.limits.may_log(ip)) {
            warn!(
                path = %parts.uri.path(),
                why = scope,
                "request refused: {message}"
            );
        }
        ApiError::new(status, message)
    };
    let Some(presented) = parts
        .headers
        .get(signature::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return Err(refuse(
            "missing",
            StatusCode::BAD_REQUEST,
            "missing X-Twilio-Signature header",
        ));
    };
    let bytes = match axum::body::to_bytes(body, settings.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {} bytes", settings.max_body_bytes),
            ))
        }
    };

    let keys = match signing_keys(settings, &parts) {
        Ok(keys) => keys,
        Err(message) => return Err(refuse("unknown_key", StatusCode::FORBIDDEN, message)),
    };
    let form = super::is_form(&parts.headers);
    let params: Vec<(String, String)> = if form {
        form_urlencoded::parse(&bytes).into_owned().collect()
    } else {
        Vec::new()
    };
    let urls = candidate_urls(settings, &parts);
    let matched = urls.iter().any(|url| {
        let data = signature::signed_data(url, &params);
        keys.iter()
            .any(|(algorithm, key)| signature::verify(*algorithm, key, &data, &presented))
    });
    if !matched {
        return Err(refuse(
            "mismatch",
            StatusCode::FORBIDDEN,
            "X-Twilio-Signature does not match this request",
        ));
    }
    // A body that is not a form is signed only through its hash in the URL: check it, or
    // anyone holding one signed URL could send any body with it.
    if !form && !bytes.is_empty() {
        let url = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        let claimed = signature::body_sha256_param(url).map(|v| v.to_ascii_lowercase());
        let actual = signature::body_sha256(&bytes);
        match claimed {
            None => {
                return Err(refuse(
                    "body_unsigned",
                    StatusCode::FORBIDDEN,
                    "request body is not covered by the signature (no bodySHA256)",
                ))
            }
            Some(claimed) if !bool::from(claimed.as_bytes().ct_eq(actual.as_bytes())) => {
                return Err(refuse(
                    "body_hash",
                    StatusCode::FORBIDDEN,
                    "request body does not match its bodySHA256",
                ))
            }
            Some(_) => {}
        }
    }
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}

/// The keys to try: the signing key the settings header names (HMAC-SHA256), or the primary
/// and secondary auth tokens (HMAC-SHA1).
fn signing_keys<'a>(
    settings: &'a TwilioSettings,
    parts: &Parts,
) -> Result<Vec<(Algorithm, &'a [u8])>, &'static str> {
    if let Some(header) = parts
        .headers
        .get(signature::SETTINGS_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        let wanted = signature::parse_settings(header)
            .ok_or("X-Twilio-Webhooks-Signature-Settings is not key=<id>,algorithm=<name>")?;
        let key = settings
            .signing_keys
            .get(&wanted.key_id)
            .ok_or("the signing key named in X-Twilio-Webhooks-Signature-Settings is unknown")?;
        return Ok(vec![(wanted.algorithm, key.expose().as_bytes())]);
    }
    Ok([&settings.auth_token, &settings.secondary_auth_token]
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| (Algorithm::HmacSha1, t.expose().as_bytes()))
        .collect())
}

fn is_websocket(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

fn first_value<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Every URL Twilio may have signed for this request: the public URL when configured, else
/// the forwarded or `Host` header under either scheme, each in its port and slash spellings.
fn candidate_urls(settings: &TwilioSettings, parts: &Parts) -> Vec<String> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let ws = is_websocket(parts);
    let web_scheme = |s: &str| -> String {
        match (ws, s) {
            (true, "https") => "wss".into(),
            (true, "http") => "ws".into(),
            (_, other) => other.to_string(),
        }
    };
    let mut bases: Vec<String> = Vec::new();
    if !settings.public_url.is_empty() {
        let base = settings.public_url.trim_end_matches('/');
        if let Some((scheme, rest)) = base.split_once("://") {
            bases.push(format!("{}://{rest}", web_scheme(scheme)));
        }
    } else {
        let forwarded = settings.trust_forwarded_headers;
        let host = forwarded
            .then(|| first_value(parts, "x-forwarded-host"))
            .flatten()
            .or_else(|| first_value(parts, "host"))
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        let proto = forwarded
            .then(|| first_value(parts, "x-forwarded-proto"))
            .flatten();
        if let Some(host) = host {
            let schemes: Vec<&str> = match proto {
                Some(p) => vec![p],
                // Behind TLS termination the service cannot tell; Twilio uses https, local
                // tools may use http.
                None => vec!["https", "http"],
            };
            for scheme in schemes {
                bases.push(format!(
                    "{}://{host}",
                    web_scheme(&scheme.to_ascii_lowercase())
                ));
            }
        }
    }
    let mut urls = Vec::new();
    for base in bases {
        for url in signature::url_variants(&format!("{base}{path}")) {
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
    }
    urls
}
