//! Test harness: the real service on port 0, real WebSocket backends, and a client that plays
//! Twilio's part of a media stream.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use call_proxy::config::{BackendSpec, Settings, WireFormat};
use call_proxy::twilio::messages::outbound;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

/// Settings for tests: no default backend, quick timeouts, the given backends in the table.
pub fn settings(backends: &[(&str, &str, WireFormat)]) -> Settings {
    let mut s = Settings::defaults();
    s.backends.default.clear();
    s.backends.table.clear();
    s.gate.pins.clear();
    // In memory unless a test asks for the journal or Redis.
    s.store.path.clear();
    for (id, url, format) in backends {
        s.backends.table.insert(
            id.to_string(),
            BackendSpec {
                url: url.to_string(),
                format: *format,
                queue_frames: None,
                enabled: true,
            },
        );
    }
    s.backends.connect_timeout_ms = 1000;
    s.backends.reconnect_window_ms = 5000;
    s.server.shutdown_timeout_ms = 3000;
    s.security.api_key = "test-key".into();
    s.validate().expect("test settings are valid");
    s
}

/// Adds a PIN to the directory, as `call-proxy hash-pin` would.
pub fn add_pin(s: &mut Settings, pin: &str, backends: &[&str]) {
    let hash = call_proxy::gate::pins::hash_pin(s.gate.pin_key.expose(), pin);
    s.gate
        .pins
        .insert(hash, backends.iter().map(|b| b.to_string()).collect());
    s.validate().expect("valid PIN entry");
}

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

/// Reads one metric sample (`name{labels} value`) from the exposition text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// What a test backend saw: connections in order, each with its messages.
#[derive(Debug, Clone)]
pub enum Seen {
    Connected(usize),
    Text(usize, String),
    Binary(usize, Vec<u8>),
    Closed(usize),
}

#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Reads and records everything.
    Normal,
    /// Completes the handshake, then never reads again.
    Stall,
    /// Stalls on its first connection (reads nothing); reads normally on later ones.
    StallFirst,
    /// On its first connection, drops the TCP connection after this many media messages.
    DropAfter(usize),
    /// On its first connection, answers `start` with two text messages and a close frame,
    /// written together so they arrive in one segment; reads normally after that.
    TalkThenClose,
}

pub struct Backend {
    pub addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    pub log: Vec<Seen>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(behaviour: Behaviour) -> Backend {
        let socket = TcpSocket::new_v4().unwrap();
        if matches!(behaviour, Behaviour::Stall | Behaviour::StallFirst) {
            // A tiny receive window so the proxy's writes back up quickly.
            socket.set_recv_buffer_size(4096).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut n = 0usize;
            let held = Arc::new(Mutex::new(Vec::new()));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                n += 1;
                let conn = n;
                let tx = tx.clone();
                let held = held.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let _ = tx.send(Seen::Connected(conn));
                    match behaviour {
                        Behaviour::Stall => {
                            held.lock().await.push(ws);
                        }
                        Behaviour::StallFirst if conn == 1 => {
                            held.lock().await.push(ws);
                        }
                        Behaviour::Normal
                        | Behaviour::StallFirst
                        | Behaviour::DropAfter(_)
                        | Behaviour::TalkThenClose => {
                            let mut media = 0;
                            while let Some(Ok(m)) = ws.next().await {
                                match m {
                                    Message::Text(t) => {
                                        if t.as_str().contains(r#""event":"media""#) {
                                            media += 1;
                                        }
                                        let start = t.as_str().contains(r#""event":"start""#);
                                        let _ = tx.send(Seen::Text(conn, t.to_string()));
                                        if start
                                            && conn == 1
                                            && matches!(behaviour, Behaviour::TalkThenClose)
                                        {
                                            talk_then_close(&mut ws).await;
                                        }
                                    }
                                    Message::Binary(b) => {
                                        let _ = tx.send(Seen::Binary(conn, b.to_vec()));
                                    }
                                    Message::Close(_) => break,
                                    _ => {}
                                }
                                if let Behaviour::DropAfter(k) = behaviour {
                                    if conn == 1 && media >= k {
                                        // Abrupt: no close frame, the socket just goes.
                                        drop(ws);
                                        let _ = tx.send(Seen::Closed(conn));
                                        return;
                                    }
                                }
                            }
                            let _ = tx.send(Seen::Closed(conn));
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            seen: rx,
            log: Vec::new(),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/media", self.addr)
    }

    /// Pulls what has arrived so far into `log`.
    pub fn drain(&mut self) {
        while let Ok(s) = self.seen.try_recv() {
            self.log.push(s);
        }
    }

    /// Waits until `pred` holds over the log, or fails the test.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.drain();
            if pred(&self.log) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.seen.recv()).await {
                Ok(Some(s)) => self.log.push(s),
                Ok(None) => panic!("backend stopped while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; saw {:?}", summary(&self.log)),
            }
        }
    }

    pub async fn wait_for_stop(&mut self) {
        self.wait_for("stop", |log| texts(log).iter().any(|t| event(t) == "stop"))
            .await;
    }

    /// Text messages of every connection, in arrival order.
    pub fn texts(&self) -> Vec<String> {
        texts(&self.log)
    }

    pub fn texts_of(&self, conn: usize) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|s| match s {
                Seen::Text(c, t) if *c == conn => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.log
            .iter()
            .filter(|s| matches!(s, Seen::Connected(_)))
            .count()
    }
}

/// Two messages a backend should not send and a close, in one write.
async fn talk_then_close<S>(ws: &mut S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "back in a moment".into(),
    };
    let _ = ws.feed(Message::Text("hello".into())).await;
    let _ = ws.feed(Message::Text("still here".into())).await;
    let _ = ws.feed(Message::Close(Some(close))).await;
    let _ = ws.flush().await;
}

pub fn texts(log: &[Seen]) -> Vec<String> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Text(_, t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn summary(log: &[Seen]) -> String {
    let t = texts(log);
    format!(
        "{} messages, {} connections, last: {:?}",
        t.len(),
        log.iter()
            .filter(|s| matches!(s, Seen::Connected(_)))
            .count(),
        t.last().map(|s| s.chars().take(120).collect::<String>())
    )
}

pub fn event(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The media payloads (Twilio or compact form) in a backend's messages.
pub fn payloads(texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .filter_map(|t| {
            let v: serde_json::Value = serde_json::from_str(t).ok()?;
            if v["event"] != "media" {
                return None;
            }
            v["media"]["payload"]
                .as_str()
                .or_else(|| v["media"].as_str())
                .map(str::to_string)
        })
        .collect()
}

/// A distinct, valid payload for frame `i`: 160 mu-law bytes, the index in the first four.
pub fn payload(i: usize) -> String {
    sized_payload(i, 160)
}

pub fn sized_payload(i: usize, bytes: usize) -> String {
    let mut audio = vec![0xffu8; bytes];
    audio[..8].copy_from_slice(&(i as u64).to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(audio)
}

/// A free port with nothing listening on it.
pub async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("ws://{addr}/media")
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Plays Twilio's side of one media stream.
pub struct TwilioCall {
    pub ws: Socket,
    pub stream_sid: String,
    pub call_sid: String,
    seq: u64,
    chunk: u64,
    /// The exact `start` text sent, for byte-for-byte comparison.
    pub start_text: String,
    pub sent_media: Vec<String>,
}

impl TwilioCall {
    pub async fn connect(proxy: &Proxy, name: &str) -> TwilioCall {
        Self::connect_url(&proxy.ws_url(), name).await
    }

    pub async fn connect_url(ws_url: &str, name: &str) -> TwilioCall {
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("upgrade accepted");
        ws.send(Message::Text(outbound::connected().into()))
            .await
            .unwrap();
        TwilioCall {
            ws,
            stream_sid: format!("MZ{name}"),
            call_sid: format!("CA{name}"),
            seq: 1,
            chunk: 0,
            start_text: String::new(),
            sent_media: Vec::new(),
        }
    }

    pub async fn start(&mut self, params: &[(&str, &str)]) {
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = outbound::start(
            self.seq,
            &outbound::StartInfo {
                account_sid: "ACtest",
                call_sid: &self.call_sid,
                stream_sid: &self.stream_sid,
                tracks: &["inbound"],
                custom_parameters: &params,
            },
        );
        self.seq += 1;
        self.start_text = text.clone();
        self.send_text(text).await;
    }

    pub async fn media(&mut self, payload_b64: &str) {
        self.chunk += 1;
        let text = outbound::media(
            self.seq,
            &self.stream_sid,
            "inbound",
            self.chunk,
            self.chunk * 20,
            payload_b64,
        );
        self.seq += 1;
        self.sent_media.push(text.clone());
        self.send_text(text).await;
    }

    pub async fn stop(&mut self) {
        let text = outbound::stop(self.seq, "ACtest", &self.call_sid, &self.stream_sid);
        self.seq += 1;
        self.send_text(text).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Waits for the proxy to close the stream; answers the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("the proxy did not close the stream"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// True when the proxy has not closed the stream within `d`.
    pub async fn still_open_after(&mut self, d: Duration) -> bool {
        matches!(
            tokio::time::timeout(d, self.ws.next()).await,
            Err(_) | Ok(Some(Ok(Message::Ping(_) | Message::Pong(_))))
        )
    }
}

/// A real `redis-server` on a free loopback port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// Starts (or restarts) a server on `port`.
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// A server that takes `DEBUG SLEEP`, to make it stall on purpose.
    pub fn start_stallable() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_with(port, &["--enable-debug-command", "yes"])
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: scripts/test installs it (apt-get install redis-server)",
            );
        let server = RedisServer {
            port,
            child: Some(child),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as an outage would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings that keep state in the given Redis, under a prefix of their own.
pub fn use_redis(s: &mut Settings, redis: &RedisServer, prefix: &str) {
    s.store.kind = call_proxy::config::StoreKind::Redis;
    s.store.redis_url = redis.url();
    s.store.key_prefix = prefix.to_string();
    s.store.timeout_ms = 500;
    s.validate().expect("valid redis settings");
}

/// The `call-proxy` binary as its own process, on a free port, JSON logs read line by line.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far, so a later wait can find an earlier line.
    history: std::sync::Mutex<Vec<String>>,
}

impl ServiceProcess {
    pub fn spawn(env: &[(&str, &str)]) -> ServiceProcess {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_call-proxy"));
        cmd.env_remove("RUST_LOG")
            .env_remove("RUN_MODE")
            .env("CALL_PROXY__SERVER__HOST", "127.0.0.1")
            .env("CALL_PROXY__SERVER__PORT", "0")
            .env("CALL_PROXY__LOG__FORMAT", "json")
            .env("CALL_PROXY__STORE__PATH", "")
            .env("SERVER_API_KEY", "test-key")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("call-proxy starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = ServiceProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            history: Default::default(),
        };
        let line = p.wait_for_log("call-proxy listening");
        p.addr = line["addr"].as_str().unwrap().parse().unwrap();
        p
    }

    /// The first JSON log line whose message is `message`.
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        let matches = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .filter(|v| v["message"] == message)
        };
        let mut history = self.history.lock().unwrap();
        if let Some(v) = history.iter().find_map(|l| matches(l)) {
            return v;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    history.push(line);
                    if let Some(v) = found {
                        return v;
                    }
                }
                Err(_) => panic!("no log line {message:?}; saw:\n{}", history.join("\n")),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/media", self.addr)
    }

    /// SIGKILL: no shutdown, nothing flushed, as a crash.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}
