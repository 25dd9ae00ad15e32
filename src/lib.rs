//! twilio-call-proxy: receives Twilio Media Streams and fans each call's audio out to the
//! backends it is entitled to, each isolated from the others.
//!
//! [`run`] serves on a listener until a shutdown signal; [`app`] is the router alone, for
//! tests that need no sockets.

#![forbid(unsafe_code)]

pub mod audio;
pub mod clock;
pub mod config;
mod descriptors;
pub mod gate;
pub(crate) mod http;
pub mod logging;
pub(crate) mod media;
pub(crate) mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
pub mod store;
pub mod twilio;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};

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

/// Serves until the first item of `signals` (SIGTERM or SIGINT in the binary), then drains:
///
/// 1. At once `/readyz` answers 503; the listener stays open and answers everything.
/// 2. New streams are admitted for `server.drain_accept_ms` (the load balancer's
///    deregistration delay), then refused with 503 and `Retry-After`.
/// 3. Live calls run to their own end; `run` returns as soon as the last has ended.
/// 4. At `server.drain_timeout_ms`, or at a second signal, what is left is ended at once: each
///    backend gets `stop`, each Twilio socket a 1001 close, within `server.shutdown_timeout_ms`.
///
/// The listener is dropped only as `run` returns, so no connection ever waits unanswered in
/// its backlog while the process is still there.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    signals: impl Stream<Item = ()> + Send + 'static,
) -> std::io::Result<()> {
    descriptors::raise_and_check(&settings);
    let state = state(settings)?;
    let local_addr = listener.local_addr()?;
    state.hub.set_local_addr(local_addr);
    announce(&state, local_addr);
    let background = spawn_background(&state);
    // Fused: a stream of signals that ends (a test's channel dropped) is never polled again.
    let mut signals = std::pin::pin!(signals.fuse());

    let limits = http::server::ConnectionLimits {
        header_timeout: state.settings.header_timeout(),
        max_connections: state.settings.server.max_connections,
        // Behind a trusted proxy every peer is the proxy: a cap per peer would cap them all.
        max_per_address: if state.settings.twilio.trust_forwarded_headers {
            0
        } else {
            state.settings.server.max_connections_per_address
        },
    };
    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(http::server::serve(
        listener,
        app(state.clone()),
        limits,
        state.metrics.clone(),
        stop_serving.clone(),
    ));
    // Only an accept loop that failed by itself is an error; it ends every live call.
    let failed = tokio::select! {
        Some(()) = signals.next() => drain(&state, &mut signals, &mut server).await.err(),
        ended = &mut server => Some(listener_failed(ended)),
    };

    let began = Instant::now();
    let deadline = state.settings.shutdown_timeout();
    if state.hub.live_calls() > 0 {
        info!(
            live_calls = state.hub.live_calls(),
            deadline_ms = deadline.as_millis() as u64,
            "ending the live calls now"
        );
    }
    if !state.hub.shut_down(deadline).await {
        warn!("shutdown deadline reached with calls still ending; exiting anyway");
    }
    // The ended calls' executions reach the store before the process goes.
    let left = deadline.saturating_sub(began.elapsed());
    if tokio::time::timeout(left, state.hub.executions.flush())
        .await
        .is_err()
    {
        warn!("the store did not take the ended executions in time; they expire by themselves");
    }
    stop_serving.cancel();
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

type Server = tokio::task::JoinHandle<std::io::Result<()>>;

/// The accept loop never ends by itself while the service runs: whatever it answered is a
/// failure that ends the live calls.
fn listener_failed(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Error {
    let e = match ended {
        Ok(Ok(())) => std::io::Error::other("the accept loop ended by itself"),
        Ok(Err(e)) => e,
        Err(e) => std::io::Error::other(e),
    };
    error!(error = %e, "the listener failed; ending live calls");
    e
}

/// How often a drain logs the calls it still waits for.
const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The drain: answers once the last call has ended (the door then shut behind it), at the
/// deadline, at a second signal, or with the error of a listener that failed.
async fn drain<S: Stream<Item = ()>>(
    state: &AppState,
    signals: &mut std::pin::Pin<&mut S>,
    server: &mut Server,
) -> std::io::Result<()> {
    let hub = &state.hub;
    let began = Instant::now();
    hub.begin_drain();
    // With server.handoff on, the calls that can move ask Twilio for a new stream each.
    hub.hand_off_calls();
    let accept = state.settings.drain_accept();
    let limit = state.settings.drain_timeout();
    info!(
        live_calls = hub.live_calls(),
        accept_ms = accept.as_millis() as u64,
        deadline_ms = limit.as_millis() as u64,
        "draining: /readyz answers 503; live calls run to their end"
    );
    let door_closes = tokio::time::sleep(accept);
    let deadline = tokio::time::sleep(limit);
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + DRAIN_PROGRESS_EVERY,
        DRAIN_PROGRESS_EVERY,
    );
    tokio::pin!(door_closes, deadline);
    loop {
        tokio::select! {
            biased;
            Some(()) = signals.next() => {
                warn!(live_calls = hub.live_calls(), "second signal: ending the drain now");
                return Ok(());
            }
            () = hub.closed_and_idle() => {
                info!(
                    took_ms = began.elapsed().as_millis() as u64,
                    "drained: no call is left"
                );
                return Ok(());
            }
            () = &mut deadline => {
                warn!(
                    live_calls = hub.live_calls(),
                    deadline_ms = limit.as_millis() as u64,
                    "drain deadline (server.drain_timeout_ms) reached; ending the calls that are left"
                );
                return Ok(());
            }
            () = &mut door_closes, if !hub.door_closed() => {
                hub.close_door();
                info!(
                    live_calls = hub.live_calls(),
                    "draining: new streams are refused from now on"
                );
            }
            _ = progress.tick() => {
                info!(live_calls = hub.live_calls(), "draining: calls left");
            }
            ended = &mut *server => return Err(listener_failed(ended)),
        }
    }
}

/// The service's periodic chores: forgetting idle rate-limit keys, purging what has expired.
/// (Live executions are kept written by their own task: `media::executions`.)
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
    let mut tasks = vec![janitor];
    let capture = &state.settings.media.capture;
    if capture.enabled {
        // Captures hold callers' voices: none is kept past its retention.
        let dir = std::path::PathBuf::from(&capture.dir);
        let retention = std::time::Duration::from_secs(capture.retention_secs);
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                every.tick().await;
                let dir = dir.clone();
                let purged =
                    tokio::task::spawn_blocking(move || media::capture::purge(&dir, retention))
                        .await
                        .unwrap_or(0);
                if purged > 0 {
                    tracing::info!(files = purged, "captures past their retention deleted");
                }
            }
        }));
    }
    tasks
}

fn announce(state: &AppState, addr: SocketAddr) {
    let s = &state.settings;
    let reach = if addr.ip().is_loopback() {
        "this machine only (loopback); RUN_MODE=production listens on every interface"
    } else {
        "the network"
    };
    info!(
        %addr,
        reach,
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
