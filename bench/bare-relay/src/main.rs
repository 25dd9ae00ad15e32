//! bare-relay: the benchmark's baseline. It reads a Twilio media stream, parses only the
//! `start` message (for `customParameters.backendHosts`), and writes every later frame, as
//! received, to each of those hosts — no validation, no metrics, no reconnects. What the
//! proxy costs beyond this is the price of everything it does.
//!
//! Usage: bare-relay [LISTEN_ADDR]   (default 127.0.0.1:9000)

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// The same read size as the proxy (see its `media::READ_CHUNK`): tungstenite zeroes a
/// whole read buffer per read, and a fair baseline should not pay for the default 128 KiB.
fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "bare-relay listening on ws://{}/media",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(relay(stream));
    }
}

async fn relay(stream: TcpStream) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await else {
        return;
    };
    let (_tx, mut rx) = ws.split();
    let mut sinks: Vec<mpsc::Sender<Message>> = Vec::new();
    while let Some(Ok(message)) = rx.next().await {
        let Message::Text(text) = &message else {
            if matches!(message, Message::Close(_)) {
                return;
            }
            continue;
        };
        if text.as_str().contains(r#""event":"start""#) {
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            let hosts: Vec<String> = v["start"]["customParameters"]["backendHosts"]
                .as_str()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            for host in hosts {
                if let Ok((ws, _)) = tokio_tungstenite::connect_async_with_config(
                    format!("ws://{host}/media"),
                    Some(config()),
                    true,
                )
                .await
                {
                    let (tx, rx) = mpsc::channel(250);
                    tokio::spawn(write(ws, rx));
                    sinks.push(tx);
                }
            }
        }
        for sink in &sinks {
            let _ = sink.try_send(message.clone());
        }
    }
}

async fn write<S>(mut ws: S, mut rx: mpsc::Receiver<Message>)
where
    S: futures_util::Sink<Message> + Unpin,
{
    while let Some(first) = rx.recv().await {
        if ws.feed(first).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if ws.feed(more).await.is_err() {
                return;
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
    let _ = ws.close().await;
}
