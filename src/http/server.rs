//! The listening socket: accepts connections up to `server.max_connections`, serves each with
//! hyper's HTTP/1 under a header deadline (which also closes idle keep-alive connections), and
//! when told to stop (the last step before the process exits; a drain keeps this loop
//! answering) closes the listener at once and lets in-flight requests finish. Upgraded
//! WebSockets leave this loop's care the moment they upgrade; the media hub drains those.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// How the accept loop guards itself against slow and idle clients.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Request headers (and, between requests, the next request's first bytes) must arrive
    /// within this, or the connection is closed.
    pub header_timeout: Duration,
    /// Open connections at most; the excess is closed at accept, before it costs anything.
    pub max_connections: usize,
    /// Open connections from one address at most (0: no such cap), so one client cannot
    /// take every place. Off behind a trusted proxy, where every peer is the proxy.
    pub max_per_address: usize,
}

/// Request headers buffered per connection at most (hyper's default is ~400 KiB, which made
/// unfinished headers cost that much each).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serves `router` on `listener` until `shutdown` is cancelled, then closes the listener (a
/// new connection is refused at once, never left in the backlog) and waits for the open
/// connections' in-flight requests. Answers an error only when accepting fails for good.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_address: Arc<DashMap<IpAddr, usize>> = Arc::default();
    let connections = TaskTracker::new();
    let mut refused_logged = false;
    let mut refused_address_logged = false;
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_out_of_resources(&e) => {
                    // Out of file descriptors and the like: the next accept may succeed once
                    // connections close. Back off instead of spinning.
                    warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                // A client that reset before it was accepted costs nothing: take the next.
                Err(e) if is_one_connection(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.limited("connections");
            if !refused_logged {
                refused_logged = true;
                warn!(
                    max = limits.max_connections,
                    "connection refused: server.max_connections are open (further refusals are counted, not logged)"
                );
            }
            drop(stream);
            continue;
        };
        refused_logged = false;
        let Some(place) = AddressPlace::take(&per_address, remote.ip(), limits.max_per_address)
        else {
            metrics.limited("connections_per_address");
            if !refused_address_logged {
                refused_address_logged = true;
                warn!(
                    %remote,
                    max = limits.max_per_address,
                    "connection refused: server.max_connections_per_address are open from this address (further refusals are counted, not logged)"
                );
            }
            drop(stream);
            continue;
        };
        refused_address_logged = false;
        let _ = stream.set_nodelay(true);
        let service =
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(remote));
                    request.map(axum::body::Body::new)
                });
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            serve_connection(stream, remote, service, limits, shutdown).await;
            drop(place);
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection<S>(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    service: S,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) where
    S: tower::Service<
            axum::http::Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(%remote, error = %e, "connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// One open connection counted against its address; given back when dropped. `open` is
/// `None` when there is no cap: nothing is counted.
struct AddressPlace {
    open: Option<Arc<DashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressPlace {
    /// Counts one more connection from `ip`, or `None` when it has `max` open (0: no cap).
    fn take(open: &Arc<DashMap<IpAddr, usize>>, ip: IpAddr, max: usize) -> Option<AddressPlace> {
        if max == 0 {
            return Some(AddressPlace { open: None, ip });
        }
        let mut n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressPlace {
            open: Some(open.clone()),
            ip,
        })
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let Some(open) = &self.open else { return };
        open.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// The process or the system is short of something; accepting again at once would spin.
fn is_out_of_resources(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::OutOfMemory
        || e.raw_os_error().is_some_and(|code| {
            // EMFILE, ENFILE, ENOBUFS, ENOMEM
            matches!(code, 24 | 23 | 105 | 12)
        })
}

/// The failure belongs to one connection (or to no connection at all); the listener is fine.
fn is_one_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}
