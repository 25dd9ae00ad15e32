//! A backend WebSocket server that records what the proxy sends it, and can misbehave on
//! purpose (stall, drop the connection, talk back and close).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::WAIT;

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
    /// Reads nothing for this long after its first connection opens, then reads normally.
    PauseFirst(Duration),
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
        if matches!(
            behaviour,
            Behaviour::Stall | Behaviour::StallFirst | Behaviour::PauseFirst(_)
        ) {
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
                        | Behaviour::TalkThenClose
                        | Behaviour::PauseFirst(_) => {
                            if let Behaviour::PauseFirst(pause) = behaviour {
                                if conn == 1 {
                                    tokio::time::sleep(pause).await;
                                }
                            }
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

/// A free port with nothing listening on it.
pub async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("ws://{addr}/media")
}
