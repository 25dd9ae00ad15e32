//! The service in-process, on a listener of the test's, stopped through its shutdown future.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use call_proxy::config::Settings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
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
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(call_proxy::run(listener, settings, async move {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            shutdown: Some(tx),
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

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// Sends the shutdown signal and answers how long `run` took to return.
    pub async fn shutdown(mut self) -> Duration {
        let began = Instant::now();
        let _ = self.shutdown.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("run() returns after shutdown")
            .unwrap()
            .unwrap();
        began.elapsed()
    }
}
