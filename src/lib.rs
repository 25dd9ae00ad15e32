//! twilio-call-proxy: receives Twilio Media Streams and fans each call's audio out to the
//! backends it is entitled to, each isolated from the others.
//!
//! [`run`] serves on a listener until a shutdown signal; [`app`] is the router alone, for
//! tests that need no sockets.

#![forbid(unsafe_code)]

pub mod audio;
pub mod clock;
pub mod config;
pub mod gate;
pub(crate) mod http;
pub mod logging;
pub(crate) mod media;
pub(crate) mod metrics;
pub mod store;
pub mod twilio;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use crate::config::Settings;
pub use crate::http::AppState;

/// Builds the shared state the settings describe.
pub fn state(settings: Settings) -> std::io::Result<AppState> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(metrics::Metrics::new());
    let store = store::from_settings(&settings.store).map_err(std::io::Error::other)?;
    let hub = media::MediaHub::new(settings.clone(), metrics.clone(), store.clone())
        .map_err(std::io::Error::other)?;
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
///
/// Returns only once the calls are drained (or the deadline passed): a binary that exits when
/// `run` returns never cuts a call off without its `stop`.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = state(settings)?;
    let local_addr = listener.local_addr()?;
    state.hub.set_local_addr(local_addr);
    announce(&state, local_addr);
    let background = spawn_background(&state);

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    let limits = http::server::ConnectionLimits {
        header_timeout: state.settings.header_timeout(),
        max_connections: state.settings.server.max_connections,
    };
    let mut server = tokio::spawn(http::server::serve(
        listener,
        app(state.clone()),
        limits,
        state.metrics.clone(),
        stop.clone(),
    ));

    // The server stops accepting once `stop` is cancelled and may finish before this task
    // looks again (it does not wait for upgraded sockets): whichever is seen first, the
    // calls are drained below. Only an accept loop that failed by itself is an error.
    let failed = tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        result = &mut server => match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(std::io::Error::other(e)),
        },
    };
    if let Some(e) = &failed {
        error!(error = %e, "the listener failed; ending live calls");
    }
    stop.cancel();

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
    if !server.is_finished() && tokio::time::timeout(left, &mut server).await.is_err() {
        warn!("HTTP connections still open at the shutdown deadline; exiting anyway");
    }
    background.iter().for_each(|t| t.abort());
    info!(
        took_ms = began.elapsed().as_millis() as u64,
        "shutdown complete"
    );
    failed.map_or(Ok(()), Err)
}

/// The service's periodic chores: forgetting idle rate-limit keys, refreshing live
/// executions in the store, purging what has expired.
fn spawn_background(state: &AppState) -> Vec<tokio::task::JoinHandle<()>> {
    let limits = state.limits.clone();
    let store = state.store.clone();
    let janitor = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            every.tick().await;
            limits.forget_idle();
            if let Err(e) = store.purge_expired().await {
                warn!(error = %e, "could not purge expired state");
            }
        }
    });
    vec![janitor, state.hub.spawn_execution_refresh()]
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
