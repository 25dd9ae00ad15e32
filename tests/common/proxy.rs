//! The service in-process, on a listener of the test's, signalled through a channel as the
//! binary is by SIGTERM: once to drain, twice to end the live calls at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use call_proxy::config::Settings;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    signals: mpsc::UnboundedSender<()>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start(settings: Settings) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, settings)
    }

    /// Serves on a listener the test bound itself (to know the address before the settings).
    pub fn start_on(listener: TcpListener, settings: Settings) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let signals =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
            );
        let handle = tokio::spawn(call_proxy::run(listener, settings, signals));
        Proxy {
            addr,
            signals: tx,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/media", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(self.url(path)).await.unwrap()
    }

    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.url(path))
            .header("apiKey", key)
            .send()
            .await
            .unwrap()
    }

    /// Polls `path` until it answers `status`, or fails the test after `within`.
    pub async fn wait_status(&self, path: &str, status: u16, within: Duration) {
        let began = Instant::now();
        loop {
            let now = self.get(path).await.status().as_u16();
            if now == status {
                return;
            }
            assert!(
                began.elapsed() < within,
                "{path} still answers {now}, not {status}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// The first signal: the proxy drains (readiness 503, live calls run to their end).
    pub fn drain(&self) {
        let _ = self.signals.send(());
    }

    /// Waits for `run` to return after a drain; answers how long that took.
    pub async fn drained(self) -> Duration {
        self.returned(Instant::now()).await
    }

    /// Two signals, as a second SIGTERM: the live calls end at once. Answers how long `run`
    /// took to return.
    pub async fn shutdown(self) -> Duration {
        let began = Instant::now();
        let _ = self.signals.send(());
        let _ = self.signals.send(());
        self.returned(began).await
    }

    async fn returned(mut self, began: Instant) -> Duration {
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("run() returns after shutdown")
            .unwrap()
            .unwrap();
        began.elapsed()
    }
}
