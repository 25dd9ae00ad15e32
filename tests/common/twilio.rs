//! Twilio's side of a media stream: `connected`, `start`, 160-byte `media` frames, `stop`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use call_proxy::twilio::messages::outbound;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Proxy, WAIT};

/// A distinct, valid payload for frame `i`: 160 mu-law bytes, the index in the first four.
pub fn payload(i: usize) -> String {
    sized_payload(i, 160)
}

pub fn sized_payload(i: usize, bytes: usize) -> String {
    let mut audio = vec![0xffu8; bytes];
    audio[..8].copy_from_slice(&(i as u64).to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(audio)
}

/// The frame number [`sized_payload`] wrote into a payload.
pub fn frame_number(payload: &str) -> u64 {
    let audio = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .unwrap();
    u64::from_be_bytes(audio[..8].try_into().unwrap())
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket to `ws_url` at `addr` over a socket with a receive window of `window` bytes:
/// a caller that reads slowly (or not at all), so what the proxy sends backs up into it.
pub async fn slow_reading_socket(addr: std::net::SocketAddr, ws_url: &str, window: u32) -> Socket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(window).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(ws_url, MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    ws
}

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

    /// A call on a socket the test opened itself (to shape its TCP connection).
    pub async fn from_socket(mut ws: Socket, name: &str) -> TwilioCall {
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

    pub async fn connect_url(ws_url: &str, name: &str) -> TwilioCall {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("upgrade accepted");
        Self::from_socket(ws, name).await
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
        let text = self.media_text(payload_b64);
        self.send_text(text).await;
    }

    /// The next `media` message, counted as sent (for a test that sends it itself).
    pub fn media_text(&mut self, payload_b64: &str) -> String {
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
        text
    }

    /// Frames Twilio never sends: the counters move on as if they had been.
    pub fn skip(&mut self, frames: u64) {
        self.chunk += frames;
        self.seq += frames;
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
