//! The HTTP face of the service: the router, its guards (Twilio signature, API key, rate
//! limits) and the handlers.

mod api_key;
mod body;
mod error;
mod gate;
mod handlers;
pub mod rate_limit;
pub mod server;
mod signature;

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

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn StateStore>,
    pub hub: Arc<MediaHub>,
    pub gate: Arc<Gate>,
    pub limits: Arc<rate_limit::Limiters>,
}

/// The whole HTTP and WebSocket interface (SPEC section 2).
pub fn router(state: AppState) -> Router {
    let twilio = from_fn_with_state(state.clone(), signature::require);
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
            "/validate-pin",
            post(gate::validate_pin.layer(twilio.clone())),
        )
        .route(
            "/blocked-callers",
            get(gate::list_blocked.layer(key.clone())),
        )
        .route(
            "/blocked-callers/",
            get(gate::empty_caller_status.layer(twilio.clone())),
        )
        .route(
            "/blocked-callers/{caller_id}",
            get(gate::caller_status.layer(twilio.clone()))
                .post(gate::block_caller.layer(key.clone()))
                .delete(gate::unblock_caller.layer(key.clone())),
        )
        .route(
            "/auth-attempts/{caller_id}",
            get(gate::attempts.layer(key.clone())),
        )
        .route("/calls", get(handlers::calls.layer(key)))
        .route("/metrics", metrics)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.twilio.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), body::read_whole))
        .layer(from_fn_with_state(state.clone(), rate_limit::per_ip))
        .layer(axum::middleware::map_response(error::every_response))
        .with_state(state)
}
