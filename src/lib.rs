//! twilio-call-proxy: receives Twilio Media Streams and fans each call's audio out to the
//! backends it is entitled to, each isolated from the others.
//!
//! [`run`] serves on a listener until a shutdown signal; [`app`] is the router alone, for
//! tests that need no sockets.

#![forbid(unsafe_code)]

pub mod audio;
pub mod config;
pub mod gate;
pub mod http;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod store;
pub mod twilio;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::config::Settings;
pub use crate::http::AppState;

/// Builds the shared state the settings describe.
pub fn state(settings: Settings) -> std::io::Result<AppState> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(metrics::Metrics::new());
    let store = store::from_settings(&settings.store).map_err(std::io::Error::other)?;
    let hub = media::MediaHub::new(settings.clone(), metrics.clone(), store.clone());
    let gate = gate::Gate::new(settings.clone(), store.clone(), metrics.clone())
        .map_err(std::io::Error::other)?;
    let limits = Arc::new(http::rate_limit::Limiters::new(&settings.rate_limits));
    Ok(AppState {
        settings,
        metrics,
        store,
        hub,
        gate: Arc::new(gate),
        limits,
    })
}

/// The router over a state.
pub fn app(state: AppState) -> Router {
    http::router(state)
}

/// Serves until `shutdown` completes, then ends every live call cleanly (each backend gets
/// `stop`, each Twilio socket a close frame) within `server.shutdown_timeout_ms`.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = state(settings)?;
    announce(&state, listener.local_addr()?);
    let limits = state.limits.clone();
    let janitor = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            every.tick().await;
            limits.forget_idle();
        }
    });

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    let server = axum::serve(
        listener,
        app(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut server = tokio::spawn(async move { server.await });

    tokio::select! {
        result = &mut server => {
            // The server only ends by itself on an accept-loop failure.
            return result.map_err(std::io::Error::other)?;
        }
        _ = stop.cancelled() => {}
    }

    let began = Instant::now();
    let deadline = state.settings.shutdown_timeout();
    info!(
        live_calls = state.hub.live_calls(),
        deadline_ms = deadline.as_millis() as u64,
        "shutting down: ending live calls"
    );
    if !state.hub.shut_down(deadline).await {
        warn!("shutdown deadline reached with calls still ending; exiting anyway");
    }
    let left = deadline.saturating_sub(began.elapsed());
    if tokio::time::timeout(left, server).await.is_err() {
        warn!("HTTP connections still open at the shutdown deadline; exiting anyway");
    }
    janitor.abort();
    info!(
        took_ms = began.elapsed().as_millis() as u64,
        "shutdown complete"
    );
    Ok(())
}

fn announce(state: &AppState, addr: SocketAddr) {
    let s = &state.settings;
    info!(
        %addr,
        backends = s.backends.table.values().filter(|b| b.enabled).count(),
        default_backends = ?s.backends.default,
        store = ?s.store.kind,
        "call-proxy listening"
    );
    if !s.twilio.validate_signatures {
        warn!("Twilio signature validation is OFF (twilio.validate_signatures / VALIDATE_EXTERNAL_CALLS): anyone who can reach this service can use it; fine only for local use");
    }
    if !s.security.require_route_token {
        warn!("streams without a route token are accepted (security.require_route_token is off)");
    }
    if s.security.api_key.is_empty() {
        warn!("no API key configured (security.api_key / SERVER_API_KEY): /calls and the other operator routes answer 403");
    }
}
