//! The HTTP face of the service: the router, the API-key guard, and the handlers.

mod api_key;
mod error;
mod handlers;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::config::Settings;
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
}

/// The whole HTTP and WebSocket interface (SPEC section 2).
pub fn router(state: AppState) -> Router {
    let operator = Router::new()
        .route("/calls", get(handlers::calls))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api_key::require,
        ));
    let metrics = Router::new().route("/metrics", get(handlers::metrics));
    let metrics = if state.settings.security.metrics_require_api_key {
        metrics.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api_key::require,
        ))
    } else {
        metrics
    };
    Router::new()
        .route("/", get(handlers::root))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/media", get(handlers::media))
        .route(
            "/executions/{execution_id}/connected",
            get(handlers::execution_connected),
        )
        .merge(operator)
        .merge(metrics)
        .fallback(handlers::not_found)
        .with_state(state)
}
