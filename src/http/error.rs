//! Errors as the client sees them: a status and `{"error": "..."}`. The cause is logged here,
//! server-side; the client gets a short message that never carries secrets or internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "state store unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state store unavailable; try again shortly",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Largest error body from a framework rejection that is re-wrapped as JSON.
const REWRAP_LIMIT: usize = 4096;

/// Applied to every response: the headers operator routes must carry, and errors that came
/// from a framework rejection (a path that does not decode, a bad upgrade) re-wrapped as
/// `{"error": ...}` so that every error a client sees is JSON.
pub async fn every_response(response: Response) -> Response {
    let mut response = if is_unwrapped_error(&response) {
        let status = response.status();
        let text = match axum::body::to_bytes(response.into_body(), REWRAP_LIMIT).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
            Err(_) => String::new(),
        };
        let message = if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        };
        ApiError::new(status, message).into_response()
    } else {
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn is_unwrapped_error(response: &Response) -> bool {
    let status = response.status();
    // Framework rejections are plain text (or have no type); JSON errors and the operator
    // page's HTML are answers already.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    (status.is_client_error() || status.is_server_error()) && plain
}
