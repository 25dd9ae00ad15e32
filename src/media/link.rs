//! How a backend is reached: its URL (`ws://` or `wss://`, path and query kept), the headers
//! its upgrade carries, and for `wss://` the TLS trust it is checked against — Mozilla's roots
//! bundled with the binary, plus the backend's own `ca_file`. Built once at start-up and
//! shared by every call's link to that backend. There is no way to switch verification off:
//! a certificate that does not verify is a failed connect like any other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::{load_ca_file, BackendSettings, BackendSpec};

pub type BackendSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a backend could not be set up at start-up (config validation catches these first).
#[derive(Debug, thiserror::Error)]
#[error("backends.table.{id}: {message}")]
pub struct SetupError {
    id: String,
    message: String,
}

/// Why a connect failed. Always the backend's side.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Failed(tokio_tungstenite::tungstenite::Error),
}

/// One backend as every link to it connects.
pub struct Endpoint {
    url: String,
    /// The URL without its query string: what logs show (a query may carry a key).
    shown: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `Some` for `wss://`.
    tls: Option<Arc<ClientConfig>>,
    /// Connection attempts in flight to this backend at most (`backends.max_connecting`):
    /// when a backend restarts, its calls reconnect a few at a time, not all in one instant.
    connecting: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are secrets: names only.
        f.debug_struct("Endpoint")
            .field("url", &self.shown)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Endpoint {
    /// A `ws://` backend named by a stream (`backendHosts`): no headers, no TLS.
    pub fn plain(url: String, max_connecting: usize) -> Endpoint {
        Endpoint {
            shown: url.clone(),
            url,
            headers: Vec::new(),
            tls: None,
            connecting: tokio::sync::Semaphore::new(max_connecting),
        }
    }

    fn from_spec(
        id: &str,
        spec: &BackendSpec,
        public_roots: &Arc<ClientConfig>,
        max_connecting: usize,
    ) -> Result<Endpoint, SetupError> {
        let fail = |message: String| SetupError {
            id: id.to_string(),
            message,
        };
        let mut headers = Vec::with_capacity(spec.headers.len());
        for (name, value) in &spec.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fail(format!("header `{name}` is not a valid name")))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| fail(format!("header `{name}` has an invalid value")))?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        let tls = if !spec.url.starts_with("wss://") {
            None
        } else if spec.ca_file.is_empty() {
            Some(public_roots.clone())
        } else {
            let extra = load_ca_file(&spec.ca_file).map_err(fail)?;
            Some(Arc::new(client_config(&extra).map_err(fail)?))
        };
        Ok(Endpoint {
            shown: spec.url.split('?').next().unwrap_or_default().to_string(),
            url: spec.url.clone(),
            headers,
            tls,
            connecting: tokio::sync::Semaphore::new(max_connecting),
        })
    }

    /// The URL as logs show it: without its query string.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Connects and completes the WebSocket handshake within `timeout`, once one of the
    /// backend's connection slots is free (the wait is not part of the timeout: it is bounded
    /// by the other attempts' own). `hop` marks the upgrade as this instance's (see
    /// [`super::HOP_HEADER`]).
    pub async fn connect(
        &self,
        hop: &str,
        config: WebSocketConfig,
        timeout: Duration,
    ) -> Result<BackendSocket, ConnectError> {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(ConnectError::Failed)?;
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Ok(hop) = HeaderValue::from_str(hop) {
            headers.insert(super::HOP_HEADER, hop);
        }
        let connector = match &self.tls {
            Some(config) => Connector::Rustls(config.clone()),
            None => Connector::Plain,
        };
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        // Never closed, so acquiring cannot fail.
        let _slot = self.connecting.acquire().await;
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(ConnectError::Timeout(timeout)),
            Ok(Err(e)) => Err(ConnectError::Failed(e)),
            Ok(Ok((socket, _response))) => Ok(socket),
        }
    }
}

/// A TLS client trusting Mozilla's roots and `extra`, on the ring provider (the one crypto
/// backend in this build; naming it keeps rustls from having to guess).
fn client_config(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("a certificate in ca_file is not usable: {e}"))?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Every enabled backend of the table, ready to connect.
pub fn endpoints(backends: &BackendSettings) -> Result<HashMap<String, Arc<Endpoint>>, SetupError> {
    let public_roots = Arc::new(client_config(&[]).map_err(|message| SetupError {
        id: "*".into(),
        message,
    })?);
    backends
        .table
        .iter()
        .filter(|(_, spec)| spec.enabled)
        .map(|(id, spec)| {
            Ok((
                id.clone(),
                Arc::new(Endpoint::from_spec(
                    id,
                    spec,
                    &public_roots,
                    backends.max_connecting,
                )?),
            ))
        })
        .collect()
}
