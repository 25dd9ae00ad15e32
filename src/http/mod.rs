//! The HTTP face of the service: the accept loop, the router, its guards (body deadline,
//! Twilio signature, API key, rate limits) and the handlers. The HTTP side of each concept
//! is named for its side: `twilio_guard` applies the signature algorithm that
//! `crate::twilio::signature` defines; `gate_routes` answers for the caller gate in
//! `crate::gate`.

mod admin;
mod api_key;
mod body;
mod error;
mod gate_routes;
mod handlers;
mod observe;
pub mod rate_limit;
pub mod server;
mod twilio_guard;
mod upgrade;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;

use crate::config::Settings;
use crate::gate::Gate;
use crate::media::MediaHub;
use crate::metrics::Metrics;
use crate::store::StateStore;

pub use error::ApiError;

/// Whether a request's body is a form (`application/x-www-form-urlencoded`), as Twilio posts
/// webhooks and as the signature covers parameter by parameter.
pub(crate) fn is_form(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub(crate) settings: Arc<Settings>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) hub: Arc<MediaHub>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) limits: Arc<rate_limit::Limiters>,
}

impl AppState {
    /// Whether the state store answers a ping within a second: for operators (`/healthz`,
    /// the page), never a gate on readiness.
    pub(crate) async fn store_answers(&self) -> bool {
        tokio::time::timeout(std::time::Duration::from_secs(1), self.store.ping())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The whole HTTP and WebSocket interface (SPEC section 2).
pub fn router(state: AppState) -> Router {
    let twilio = from_fn_with_state(state.clone(), twilio_guard::require);
    let key = from_fn_with_state(state.clone(), api_key::require);
    let metrics = if state.settings.security.metrics_require_api_key {
        get(handlers::metrics.layer(key.clone()))
    } else {
        get(handlers::metrics)
    };
    Router::new()
        .route("/", get(handlers::root))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/media", get(handlers::media.layer(twilio.clone())))
        .route(
            "/executions/{execution_id}/connected",
            get(handlers::execution_connected),
        )
        .route(
            "/twilio/stream-status",
            post(handlers::stream_status.layer(twilio.clone())),
        )
        .route(
            "/validate-pin",
            post(gate_routes::validate_pin.layer(twilio.clone())),
        )
        .route(
            "/blocked-callers",
            get(gate_routes::list_blocked.layer(key.clone())),
        )
        .route(
            "/blocked-callers/",
            get(gate_routes::empty_caller_status.layer(twilio.clone())),
        )
        .route(
            "/blocked-callers/{caller_id}",
            get(gate_routes::caller_status.layer(twilio.clone()))
                .post(gate_routes::block_caller.layer(key.clone()))
                .delete(gate_routes::unblock_caller.layer(key.clone())),
        )
        .route(
            "/auth-attempts/{caller_id}",
            get(gate_routes::attempts.layer(key.clone()))
                .post(gate_routes::count_attempt.layer(key.clone())),
        )
        .route("/calls", get(handlers::calls.layer(key.clone())))
        .route("/calls/recent", get(handlers::recent_calls.layer(key)))
        .route("/metrics", metrics)
        .merge(admin::routes())
        .route_layer(axum::middleware::from_fn(observe::tag_route))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.twilio.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), body::read_whole))
        .layer(from_fn_with_state(state.clone(), rate_limit::per_ip))
        .layer(axum::middleware::map_response(error::every_response))
        .layer(from_fn_with_state(state.clone(), observe::measure))
        .with_state(state)
}
