//! Request handlers: health, the media upgrade, execution liveness, live calls, metrics.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::Instrument;

use super::upgrade::MediaUpgrade;
use super::{ApiError, AppState};
use crate::media::session;
use crate::metrics::Outcome;

/// The original's health check.
pub async fn root() -> &'static str {
    "OK"
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the state store answers and the service is not shutting down.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.hub.shutdown_token().is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        ));
    }
    state.store.ping().await?;
    Ok(Json(json!({ "status": "ready" })))
}

/// The media stream endpoint: one Twilio stream per WebSocket.
pub async fn media(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<MediaUpgrade, ApiError>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade?;
    let from_here = headers
        .get_all(crate::media::HOP_HEADER)
        .iter()
        .any(|v| v.as_bytes() == state.hub.instance_id().as_bytes());
    if from_here {
        state.metrics.call_ended(Outcome::refused_loop);
        tracing::warn!(
            fault = "twilio",
            "stream refused: it comes from one of this proxy's own backend links (a backend names the proxy itself)"
        );
        return Err(ApiError::new(
            StatusCode::LOOP_DETECTED,
            "this proxy is not its own backend",
        ));
    }
    let Some(admission) = state.hub.admit() else {
        state.metrics.call_ended(Outcome::refused_capacity);
        tracing::warn!(
            live = state.hub.live_calls(),
            max = state.settings.media.max_calls,
            "stream refused: at capacity or shutting down"
        );
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no capacity for another call",
        ));
    };
    let limit = state.settings.media.max_message_bytes;
    let hub = state.hub.clone();
    // Upgraded sockets leave hyper's connection tracking, so the hub tracks them: shutdown
    // waits for every session to send its backends `stop`.
    let token = hub.tracker().token();
    let span = tracing::info_span!(
        "call",
        call_sid = tracing::field::Empty,
        stream_sid = tracing::field::Empty,
        caller = tracing::field::Empty,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::media::READ_CHUNK)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    Ok(upgrade.accept(config, move |socket| {
        async move {
            session::run(hub, admission, socket).await;
            drop(token);
        }
        .instrument(span)
    }))
}

/// 200 while a stream of the Studio execution is live on any instance, 410 otherwise.
pub async fn execution_connected(
    State(state): State<AppState>,
    Path(execution_id): Path<String>,
) -> Result<Response, ApiError> {
    let live = state.store.execution_is_live(&execution_id).await?;
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::GONE
    };
    Ok((status, Json(json!({ "connected": live }))).into_response())
}

/// The live calls, with per-backend state and counters.
pub async fn calls(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "data": state.hub.snapshot() }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    state.hub.refresh_queue_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}
