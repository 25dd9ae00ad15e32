//! The media endpoint's WebSocket upgrade (RFC 6455 section 4.2), done here rather than by
//! axum's `WebSocketUpgrade` so that a session reads its TCP socket directly.
//!
//! axum's socket sits on hyper's upgraded connection (a boxed, rewindable stream over the
//! accept loop's own adapter) and hands out messages of its own type, whose text the session
//! had to check for UTF-8 a second time before forwarding it. Here the upgraded connection is
//! taken back as the `TcpStream` the accept loop served (see `server::serve_connection`), any
//! bytes hyper read past the request go first, and tungstenite reads the socket itself:
//! every frame of every call takes that path, 50 times a second.

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::ApiError;

/// A media stream's socket once upgraded.
pub type MediaSocket = WebSocketStream<TcpStream>;

/// A request to upgrade to a WebSocket, checked; see [`MediaUpgrade::accept`].
pub struct MediaUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for MediaUpgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let refuse = |status, why: &str| Err(ApiError::new(status, why));
        if parts.method != Method::GET {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET request",
            );
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "not a WebSocket upgrade: the Connection header does not name `upgrade`",
            );
        }
        if !has_token(&parts.headers, header::UPGRADE, "websocket") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "not a WebSocket upgrade: the Upgrade header does not name `websocket`",
            );
        }
        let version = parts.headers.get(header::SEC_WEBSOCKET_VERSION);
        if version.is_none_or(|v| v.as_bytes() != b"13") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "WebSocket upgrade without Sec-WebSocket-Version 13",
            );
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "WebSocket upgrade without a Sec-WebSocket-Key",
            );
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded to a WebSocket",
            );
        };
        Ok(MediaUpgrade { key, on_upgrade })
    }
}

impl MediaUpgrade {
    /// Answers `101 Switching Protocols` and, once hyper hands the connection over, runs
    /// `session` on it in a task of its own. A connection that never completes the upgrade
    /// is logged and dropped.
    pub fn accept<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(MediaSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::warn!(error = %e, "media upgrade failed");
                    return;
                }
            };
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                // Only the accept loop's connections reach this router.
                tracing::error!("media upgrade on a connection that is not a TCP socket; closed");
                return;
            };
            let tcp = parts.io.into_inner();
            // What hyper read past the request is a view of its whole read buffer: used here
            // and dropped before the call begins, not held for the call's length.
            let read_buf = parts.read_buf;
            let socket = if read_buf.is_empty() {
                WebSocketStream::from_raw_socket(tcp, Role::Server, Some(config)).await
            } else {
                // What the client sent with its request goes first. The read buffer starts
                // out with the capacity of the bytes handed over and keeps that capacity as
                // the size it regrows to: a buffer sized to those few bytes would be
                // reallocated for every frame, each read in two system calls.
                let mut part = Vec::with_capacity(config.read_buffer_size.max(read_buf.len()));
                part.extend_from_slice(&read_buf);
                WebSocketStream::from_partially_read(tcp, part, Role::Server, Some(config)).await
            };
            drop(read_buf);
            session(socket).await;
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// Whether a comma-separated header names `token`, in any case (`Connection: keep-alive,
/// Upgrade` names `upgrade`).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tokens_are_matched_whole_and_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static(" Upgrade ,x"));
        assert!(has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!has_token(&headers, header::CONNECTION, "upgra"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocketx"));
        assert!(!has_token(&headers, header::UPGRADE, "websocket"));
    }
}
