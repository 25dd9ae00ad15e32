//! A backend that talks: the test tells it what to send, and it records what it hears, one
//! connection after another (the proxy reconnects to it like to any backend).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::WAIT;

pub struct TalkingBackend {
    pub addr: SocketAddr,
    /// The live connection's outbox.
    current: Arc<Mutex<Option<mpsc::UnboundedSender<Option<Message>>>>>,
    heard: mpsc::UnboundedReceiver<(usize, Message)>,
    /// Everything heard so far: connection number (from 1) and message.
    pub log: Vec<(usize, Message)>,
    task: JoinHandle<()>,
}

impl Drop for TalkingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TalkingBackend {
    pub async fn start() -> TalkingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let current: Arc<Mutex<Option<mpsc::UnboundedSender<Option<Message>>>>> =
            Default::default();
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let slot = current.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                let conn = n;
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    continue;
                };
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Option<Message>>();
                *slot.lock().unwrap() = Some(out_tx);
                let heard_tx = heard_tx.clone();
                tokio::spawn(async move {
                    let (mut sink, mut stream) = ws.split();
                    loop {
                        tokio::select! {
                            said = out_rx.recv() => match said {
                                Some(Some(m)) => { if sink.send(m).await.is_err() { return; } }
                                // `None`: drop the connection abruptly.
                                Some(None) | None => return,
                            },
                            got = stream.next() => match got {
                                Some(Ok(m)) => { let _ = heard_tx.send((conn, m)); }
                                _ => return,
                            },
                        }
                    }
                });
            }
        });
        TalkingBackend {
            addr,
            current,
            heard,
            log: Vec::new(),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/media", self.addr)
    }

    /// Sends on the live connection.
    pub fn say(&self, message: Message) {
        let slot = self.current.lock().unwrap();
        slot.as_ref()
            .expect("a live connection")
            .send(Some(message))
            .unwrap();
    }

    pub fn say_text(&self, text: impl Into<String>) {
        self.say(Message::Text(text.into().into()));
    }

    /// Drops the live connection without a close frame.
    pub fn hang_up(&self) {
        if let Some(tx) = self.current.lock().unwrap().take() {
            let _ = tx.send(None);
        }
    }

    /// Waits until `pred` holds over what was heard, or fails the test.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&[(usize, Message)]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while let Ok(m) = self.heard.try_recv() {
                self.log.push(m);
            }
            if pred(&self.log) {
                return;
            }
            match tokio::time::timeout_at(deadline, self.heard.recv()).await {
                Ok(Some(m)) => self.log.push(m),
                _ => panic!(
                    "timed out waiting for {what}; heard {} messages",
                    self.log.len()
                ),
            }
        }
    }

    /// Waits for the call's start on connection `conn` (so there is a connection to talk on).
    pub async fn wait_for_start(&mut self, conn: usize) {
        self.wait_for("start", |log| {
            log.iter().any(|(c, m)| {
                *c == conn && m.to_text().is_ok_and(|t| t.contains(r#""event":"start""#))
            })
        })
        .await;
        // The live connection is the newest one; make sure the slot holds it.
        while self.current.lock().unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The text messages heard, in order.
    pub fn texts(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|(_, m)| m.to_text().ok().map(str::to_string))
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The binary frames heard, one by one.
    pub fn binary_frames(&self) -> Vec<Vec<u8>> {
        self.log
            .iter()
            .filter_map(|(_, m)| match m {
                Message::Binary(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect()
    }

    /// The binary frames heard, concatenated.
    pub fn binary(&self) -> Vec<u8> {
        self.binary_frames().concat()
    }
}
