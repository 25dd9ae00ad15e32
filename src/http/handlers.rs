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
use crate::media::{session, Readiness, Refusal};
use crate::metrics::Outcome;

/// What a refused upgrade suggests: another instance (or this one, once a call ends) will
/// take it then. Twilio itself does not retry a stream; load balancers and tools do.
const RETRY_AFTER_SECS: u64 = 5;

/// The original's health check.
pub async fn root() -> &'static str {
    "OK"
}

/// Liveness: 200 while the process serves. The store's state and the drain are reported
/// here for operators, never as a failure: a store outage is not a reason to restart.
pub async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let store_up = state.store_answers().await;
    Json(json!({
        "status": "ok",
        "store": if store_up { "up" } else { "down" },
        "draining": state.hub.is_draining(),
        "live_calls": state.hub.live_calls(),
    }))
}

/// Readiness means "send me new calls": 503 while draining and while at `media.max_calls`.
/// The store is deliberately not asked: an outage would make every instance unready at once,
/// and a load balancer would then drop them all though their calls can still stream.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.hub.readiness() {
        Readiness::Ready => Ok(Json(json!({ "status": "ready" }))),
        Readiness::Draining => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining")),
        Readiness::Full => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "at capacity (media.max_calls)",
        )),
    }
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
    let admission = match state.hub.admit() {
        Ok(admission) => admission,
        Err(refusal) => {
            let (outcome, message) = match refusal {
                Refusal::Full => (Outcome::refused_capacity, "no capacity for another call"),
                Refusal::Closed => (
                    Outcome::refused_draining,
                    "this instance is draining and takes no new calls",
                ),
                Refusal::Descriptors => (
                    Outcome::refused_capacity,
                    "out of file descriptors for another call",
                ),
            };
            state.metrics.call_ended(outcome);
            tracing::warn!(
                live = state.hub.live_calls(),
                max = state.settings.media.max_calls,
                reason = ?refusal,
                "stream refused: {message}"
            );
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
                .retry_after(RETRY_AFTER_SECS));
        }
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
        outcome = tracing::field::Empty,
        "otel.status_code" = tracing::field::Empty,
    );
    // What the kernel does not take is bounded: a peer that does not read is closed, never
    // buffered for without end.
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::media::READ_CHUNK)
        .max_write_buffer_size(session::max_unsent(limit))
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

/// 200 while a stream of the Studio execution is live here or (by the store) on any other
/// instance, 410 otherwise.
pub async fn execution_connected(
    State(state): State<AppState>,
    Path(execution_id): Path<String>,
) -> Result<Response, ApiError> {
    // This instance answers for its own calls whatever the store says: the flow hangs up on
    // anything but 200.
    let live = state
        .hub
        .executions
        .is_live(state.store.as_ref(), &execution_id)
        .await?;
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::GONE
    };
    Ok((status, Json(json!({ "connected": live }))).into_response())
}

/// The live calls, with per-backend state and counters.
pub async fn calls(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "data": state.hub.snapshot(),
        // Twilio's own view of the newest streams, those that never reached any instance too.
        "twilio": state.hub.twilio_reports(TWILIO_REPORTS_SHOWN).await,
    }))
}

/// How many streams' Twilio reports `/calls` and the page show.
pub(super) const TWILIO_REPORTS_SHOWN: usize = 50;

/// Twilio's stream status callback (`statusCallback` on `<Stream>` or the Stream resource):
/// recorded beside the proxy's own view of the stream, counted, logged. Signed like every
/// Twilio request (the guard in front checks it).
pub async fn stream_status(
    State(state): State<AppState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    use crate::logging::escape;
    use crate::twilio::stream_status::{error_code, parse, StreamEvent};
    let body = match body {
        Ok(b) => b,
        Err(r) => return ApiError::new(r.status(), r.body_text()).into_response(),
    };
    let status = match parse(&body) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "stream status callback refused");
            return ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    let code = status.error.as_deref().and_then(error_code);
    state
        .metrics
        .twilio_stream_event(status.event.as_str(), status.error.as_deref(), code);
    state.hub.reports.record(&status);
    let (stream, call) = (escape(&status.stream_sid), escape(&status.call_sid));
    match status.event {
        StreamEvent::Error => tracing::warn!(
            fault = "twilio",
            stream_sid = %stream,
            call_sid = %call,
            code,
            error = %escape(status.error.as_deref().unwrap_or("")),
            "Twilio reports a stream error"
        ),
        event => {
            tracing::info!(stream_sid = %stream, call_sid = %call, event = event.as_str(), "Twilio reports on a stream")
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The calls that ended last, newest first, with each backend's final counts (what the
/// page's recent calls show).
pub async fn recent_calls(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "data": state.hub.recent() }))
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
