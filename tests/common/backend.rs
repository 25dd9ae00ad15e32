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
    /// On its first connection, reads `start` and then nothing more, with the kernel's usual
    /// buffers (so writes keep succeeding for a long time); reads normally on later ones.
    QuietStallFirst,
    /// Its first three connections each misbehave in a way drawn from the seed: answered
    /// late, dropped right after the upgrade or after a few messages, stalled then dropped;
    /// later connections read normally.
    Chaos(u64),
}

/// What a chaos backend does on one connection.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Completes the handshake this late, then drops the connection at once.
    LateThenDrop(Duration),
    /// Reads this many messages, then drops the connection.
    DropAfter(usize),
    /// Reads nothing for this long, then drops the connection.
    StallThenDrop(Duration),
    /// Completes the handshake this late, then reads normally.
    Late(Duration),
    None,
}

impl Fault {
    fn draw(seed: u64, conn: usize) -> Fault {
        if conn > 3 {
            return Fault::None;
        }
        // xorshift64*, seeded per connection: the same seed replays the same faults.
        let mut x = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(conn as u64)
            | 1;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11
        };
        let ms = |n: u64| Duration::from_millis(n);
        match next() % 5 {
            0 => Fault::LateThenDrop(ms(next() % 1500)),
            1 => Fault::DropAfter((next() % 30) as usize),
            2 => Fault::StallThenDrop(ms(next() % 1500)),
            3 => Fault::Late(ms(next() % 1000)),
            _ => Fault::None,
        }
    }

    /// A seed whose first connection is answered at least `min` late and dropped right after
    /// the upgrade, and whose second reads normally.
    pub fn late_then_drop_seed(min: Duration) -> u64 {
        (0..100_000)
            .find(|&seed| {
                matches!(Fault::draw(seed, 1), Fault::LateThenDrop(d) if d >= min)
                    && matches!(Fault::draw(seed, 2), Fault::None)
            })
            .expect("such a seed")
    }

    /// Whether the chaos backend itself cuts connection `conn` of `seed` short.
    pub fn drops(seed: u64, conn: usize) -> bool {
        matches!(
            Fault::draw(seed, conn),
            Fault::LateThenDrop(_) | Fault::DropAfter(_) | Fault::StallThenDrop(_)
        )
    }

    fn late(self) -> Duration {
        match self {
            Fault::LateThenDrop(d) | Fault::Late(d) => d,
            _ => Duration::ZERO,
        }
    }
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
                    let fault = match behaviour {
                        Behaviour::Chaos(seed) => Fault::draw(seed, conn),
                        _ => Fault::None,
                    };
                    tokio::time::sleep(fault.late()).await;
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let _ = tx.send(Seen::Connected(conn));
                    match (fault, behaviour) {
                        (Fault::LateThenDrop(_), _) => {
                            let _ = tx.send(Seen::Closed(conn));
                            return;
                        }
                        (Fault::StallThenDrop(d), _) => {
                            tokio::time::sleep(d).await;
                            let _ = tx.send(Seen::Closed(conn));
                            return;
                        }
                        _ => {}
                    }
                    let drop_after = match (fault, behaviour) {
                        (Fault::DropAfter(k), _) => Some(k),
                        (_, Behaviour::DropAfter(k)) if conn == 1 => Some(k),
                        _ => None,
                    };
                    match behaviour {
                        Behaviour::Stall => {
                            held.lock().await.push(ws);
                        }
                        Behaviour::StallFirst if conn == 1 => {
                            held.lock().await.push(ws);
                        }
                        Behaviour::QuietStallFirst if conn == 1 => {
                            if let Some(Ok(Message::Text(t))) = ws.next().await {
                                let _ = tx.send(Seen::Text(conn, t.to_string()));
                            }
                            held.lock().await.push(ws);
                        }
                        Behaviour::Normal
                        | Behaviour::StallFirst
                        | Behaviour::QuietStallFirst
                        | Behaviour::Chaos(_)
                        | Behaviour::DropAfter(_)
                        | Behaviour::TalkThenClose
                        | Behaviour::PauseFirst(_) => {
                            if let Behaviour::PauseFirst(pause) = behaviour {
                                if conn == 1 {
                                    tokio::time::sleep(pause).await;
                                }
                            }
                            let mut media = 0;
                            let mut messages = 0;
                            while let Some(Ok(m)) = ws.next().await {
                                messages += 1;
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
                                // Abrupt: no close frame, the socket just goes. The original
                                // behaviour counts media; a chaos fault counts messages.
                                let count = match fault {
                                    Fault::DropAfter(_) => messages,
                                    _ => media,
                                };
                                if drop_after.is_some_and(|k| count >= k) {
                                    drop(ws);
                                    let _ = tx.send(Seen::Closed(conn));
                                    return;
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

    /// Waits until `pred` holds over what the backend has seen. The wait scales with what it
    /// waits for: it gives up after [`WAIT`] without a new message (a long backlog read on a
    /// loaded machine keeps it going), and after six times that in all.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        let cap = Instant::now() + WAIT * 6;
        let mut deadline = Instant::now() + WAIT;
        loop {
            self.drain();
            if pred(&self.log) {
                return;
            }
            let left = deadline.min(cap).saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.seen.recv()).await {
                Ok(Some(s)) => {
                    self.log.push(s);
                    deadline = Instant::now() + WAIT;
                }
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
