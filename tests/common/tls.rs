//! Certificates made in the test (a private CA, and server certificates good or bad in one
//! way each), and a `wss://` backend that serves one of them and records what it receives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// A certificate authority of the test's own.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate as a PEM file, for `ca_file`.
    pub pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a server presents.
#[derive(Clone)]
pub struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

/// How a server certificate is made.
pub enum Made {
    /// For `localhost`, valid now.
    Good,
    /// For a name other than the one the proxy connects to.
    OtherName,
    /// For `localhost`, but its validity ended years ago.
    Expired,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        TestCa {
            cert,
            key,
            pem_path,
            _dir: dir,
        }
    }

    pub fn pem_path(&self) -> String {
        self.pem_path.to_string_lossy().into_owned()
    }

    pub fn server_cert(&self, made: Made) -> ServerCert {
        let name = match made {
            Made::OtherName => "other.example",
            Made::Good | Made::Expired => "localhost",
        };
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if let Made::Expired = made {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        ServerCert {
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
        }
    }
}

/// What one upgrade to the TLS backend carried, and the text messages after it.
#[derive(Debug, Clone, Default)]
pub struct TlsConnection {
    pub path_and_query: String,
    pub authorization: Option<String>,
    pub texts: Vec<String>,
}

/// A `wss://` backend on a loopback port, serving one certificate.
pub struct TlsBackend {
    pub addr: SocketAddr,
    cert: ServerCert,
    pub connections: Arc<Mutex<Vec<TlsConnection>>>,
    /// TLS handshakes the server saw fail (the client refused the certificate).
    pub refused: Arc<Mutex<u32>>,
    /// Talks back: every binary frame it gets (pcm16 audio) is sent back as it came.
    echo: bool,
    /// Binary bytes received, over every connection.
    pub binary_bytes: Arc<Mutex<usize>>,
    changed: mpsc::UnboundedReceiver<()>,
    notify: mpsc::UnboundedSender<()>,
    task: Option<JoinHandle<()>>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TlsBackend {
    pub async fn start(cert: ServerCert) -> TlsBackend {
        Self::start_with(cert, false).await
    }

    /// A backend that echoes the binary audio it gets, as a pcm16 speaker would talk.
    pub async fn start_echoing(cert: ServerCert) -> TlsBackend {
        Self::start_with(cert, true).await
    }

    async fn start_with(cert: ServerCert, echo: bool) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (notify, changed) = mpsc::unbounded_channel();
        let mut b = TlsBackend {
            addr: listener.local_addr().unwrap(),
            cert,
            connections: Default::default(),
            refused: Default::default(),
            echo,
            binary_bytes: Default::default(),
            changed,
            notify,
            task: None,
        };
        b.serve(listener);
        b
    }

    /// The URL the proxy is configured with: `wss://localhost:<port>` and `path`.
    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }

    /// Stops serving: every connection drops, nothing listens on the port.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Serves again on the same port, as a restarted backend would.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    // The handshake callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    fn serve(&mut self, listener: TcpListener) {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            self.cert.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.cert.key.clone())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let connections = self.connections.clone();
        let refused = self.refused.clone();
        let notify = self.notify.clone();
        let echo = self.echo;
        let binary_bytes = self.binary_bytes.clone();
        self.task = Some(tokio::spawn(async move {
            let mut handlers = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let connections = connections.clone();
                let refused = refused.clone();
                let notify = notify.clone();
                let binary_bytes = binary_bytes.clone();
                handlers.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        *refused.lock().unwrap() += 1;
                        let _ = notify.send(());
                        return;
                    };
                    let seen = Arc::new(Mutex::new(TlsConnection::default()));
                    let upgrade = seen.clone();
                    let callback = move |req: &Request, resp: Response| {
                        let mut s = upgrade.lock().unwrap();
                        s.path_and_query = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        s.authorization = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await
                    else {
                        return;
                    };
                    let index = {
                        let mut all = connections.lock().unwrap();
                        all.push(seen.lock().unwrap().clone());
                        all.len() - 1
                    };
                    let _ = notify.send(());
                    while let Some(Ok(m)) = ws.next().await {
                        match m {
                            Message::Text(t) => {
                                connections.lock().unwrap()[index].texts.push(t.to_string());
                            }
                            Message::Binary(b) => {
                                *binary_bytes.lock().unwrap() += b.len();
                                if echo && ws.send(Message::Binary(b)).await.is_err() {
                                    return;
                                }
                            }
                            _ => {}
                        }
                        let _ = notify.send(());
                    }
                });
            }
        }));
    }

    /// Waits until `pred` holds over the connections seen so far, or fails the test.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&[TlsConnection]) -> bool) {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            if pred(&self.connections.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, self.changed.recv())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for {what}; {} connections, {} refused handshakes",
                    self.connections.lock().unwrap().len(),
                    self.refused.lock().unwrap()
                );
            }
        }
    }
}
