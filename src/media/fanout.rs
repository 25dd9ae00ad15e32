//! One backend link of a call: its bounded queue, and the writer task that connects, forwards,
//! and reconnects. Links never wait on each other or on the caller: the session only pushes
//! into queues, and a full queue sheds its oldest media frame instead of blocking.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{info, warn, Instrument};

use super::route::Target;
use crate::config::WireFormat;
use crate::metrics::{LatencyBatch, LinkMetrics};

/// What kind of message a queued frame is: only media may be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Media,
    Control,
    /// The last message of the call; the writer closes the link after it.
    Stop,
}

#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub message: Message,
    /// When the message arrived from Twilio, for the forward-latency histogram.
    pub received: Instant,
}

/// A bounded queue that drops its oldest media frame when full, never a control message.
///
/// A std `Mutex` because it is never held across an `.await`: push and take are a few
/// pointer moves, and the writer takes everything queued in one lock.
pub struct Queue {
    state: Mutex<QueueState>,
    /// The writer's waker. Lock-free on both sides, unlike a `Notify`, whose waiter list
    /// takes a lock on every wait and every wake.
    waker: AtomicWaker,
    capacity: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Frame>,
    media: usize,
    closed: bool,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued, and the oldest media frame was dropped to make room.
    DroppedOldest,
    /// The queue already holds the call's `stop`; nothing after it is sent.
    Closed,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState::default()),
            waker: AtomicWaker::new(),
            capacity,
        }
    }

    pub fn push(&self, frame: Frame) -> Pushed {
        let mut result = Pushed::Queued;
        {
            let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed {
                return Pushed::Closed;
            }
            match frame.kind {
                Kind::Media => {
                    if q.media >= self.capacity {
                        // Media is almost always at the front; control messages are rare.
                        if let Some(pos) = q.items.iter().position(|f| f.kind == Kind::Media) {
                            q.items.remove(pos);
                            q.media -= 1;
                            result = Pushed::DroppedOldest;
                        }
                    }
                    q.media += 1;
                }
                Kind::Control => {}
                Kind::Stop => q.closed = true,
            }
            q.items.push_back(frame);
        }
        self.waker.wake();
        result
    }

    /// Moves everything queued into `into`, oldest first.
    fn take_all(&self, into: &mut VecDeque<Frame>) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.media = 0;
        if into.is_empty() {
            std::mem::swap(into, &mut q.items);
        } else {
            into.append(&mut q.items);
        }
    }

    /// Ready once something is queued (immediately if something already is).
    fn ready(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.waker.register(cx.waker());
            let queued = !self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .items
                .is_empty();
            if queued {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a link is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    Connecting = 0,
    Connected = 1,
    Reconnecting = 2,
    /// Gave up after `reconnect_max_tries` or the window: nothing more is sent.
    Gone = 3,
    /// Delivered the call's `stop` and closed.
    Finished = 4,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Reconnecting => "reconnecting",
            LinkState::Gone => "gone",
            LinkState::Finished => "finished",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => LinkState::Connecting,
            1 => LinkState::Connected,
            2 => LinkState::Reconnecting,
            3 => LinkState::Gone,
            _ => LinkState::Finished,
        }
    }
}

const BACKEND_READ_CHUNK: usize = 512;

/// How hard a link tries (from `backends.*`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub connect_timeout: Duration,
    pub reconnect_max_tries: u32,
    pub reconnect_window: Duration,
    pub max_message_bytes: usize,
}

/// The part of a link the session, `/calls` and the writer all see.
pub struct LinkShared {
    pub name: String,
    pub metrics_label: String,
    pub format: WireFormat,
    pub queue: Queue,
    state: AtomicU8,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU32,
}

impl LinkShared {
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub fn is_gone(&self) -> bool {
        self.state() == LinkState::Gone
    }
}

/// The session's handle on one link.
pub struct Link {
    pub shared: Arc<LinkShared>,
    pub metrics: LinkMetrics,
    pub task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Queues a frame, counting a drop; frames for a link that is gone are discarded.
    pub fn push(&self, frame: Frame) {
        if self.shared.is_gone() {
            return;
        }
        if self.shared.queue.push(frame) == Pushed::DroppedOldest {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.frames_dropped.inc();
        }
    }
}

/// Opens a link: spawns its writer, which connects, sends `start`, then everything queued.
/// `changed` is notified whenever the link connects, reconnects, gives up or finishes.
pub fn spawn(
    target: &Target,
    start: Message,
    policy: Policy,
    metrics: LinkMetrics,
    changed: Arc<Notify>,
    tracker: &tokio_util::task::TaskTracker,
) -> Link {
    let shared = Arc::new(LinkShared {
        name: target.name.clone(),
        metrics_label: target.metrics_label.clone(),
        format: target.format,
        queue: Queue::new(target.queue_frames),
        state: AtomicU8::new(LinkState::Connecting as u8),
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        reconnects: AtomicU32::new(0),
    });
    let writer = Writer {
        shared: shared.clone(),
        url: target.url.clone(),
        start,
        policy,
        metrics: metrics.clone(),
        changed,
    };
    let span = tracing::info_span!("backend", backend = %target.name);
    let task = tracker.spawn(writer.run().instrument(span));
    Link {
        shared,
        metrics,
        task,
    }
}

/// Why a backend connection ended early. Always the backend's side (upstream), never the
/// caller's: logged as such.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connect failed: {0}")]
    Connect(tungstenite::Error),
    #[error("backend closed the connection{}", .0.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Closed(Option<String>),
    #[error("connection failed: {0}")]
    Io(#[from] tungstenite::Error),
}

type BackendSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Writer {
    shared: Arc<LinkShared>,
    url: String,
    start: Message,
    policy: Policy,
    metrics: LinkMetrics,
    changed: Arc<Notify>,
}

impl Writer {
    async fn run(self) {
        // Frames taken from the queue but not yet written survive a reconnect.
        let mut pending = VecDeque::new();
        // An outage begins at a failure and ends only once a connection has held for the
        // whole reconnect window, so a backend that accepts and drops at once still runs
        // out of tries.
        let mut outage: Option<(Instant, u32)> = None;
        let mut connected_before = false;
        loop {
            let error = match self.connect().await {
                Ok(socket) => {
                    self.metrics.connects.inc();
                    if connected_before {
                        self.metrics.reconnects.inc();
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        info!(fault = "backend", "backend reconnected");
                    }
                    connected_before = true;
                    let since = Instant::now();
                    self.set_state(LinkState::Connected);
                    match self.pump(socket, &mut pending).await {
                        Ok(()) => {
                            self.set_state(LinkState::Finished);
                            return;
                        }
                        Err(e) => {
                            if since.elapsed() >= self.policy.reconnect_window {
                                outage = None;
                            }
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            self.metrics.failures.inc();
            let (began, failures) = outage.get_or_insert((Instant::now(), 0));
            *failures += 1;
            let elapsed = began.elapsed();
            if *failures > self.policy.reconnect_max_tries
                || elapsed >= self.policy.reconnect_window
            {
                warn!(
                    fault = "backend",
                    error = %error,
                    failures = *failures,
                    "backend gone for good; its frames are no longer queued"
                );
                self.set_state(LinkState::Gone);
                return;
            }
            warn!(fault = "backend", error = %error, url = %self.url, "backend link failed; reconnecting");
            self.set_state(LinkState::Reconnecting);
            let backoff = Duration::from_millis(100u64 << (*failures - 1).min(5))
                .min(self.policy.reconnect_window - elapsed);
            tokio::time::sleep(backoff).await;
        }
    }

    fn set_state(&self, s: LinkState) {
        self.shared.set_state(s);
        self.changed.notify_one();
    }

    async fn connect(&self) -> Result<BackendSocket, LinkError> {
        // Backends seldom say anything, and every idle wait makes a read attempt, which zeroes
        // this much buffer first: keep it small.
        let config = WebSocketConfig::default()
            .read_buffer_size(BACKEND_READ_CHUNK)
            .max_message_size(Some(self.policy.max_message_bytes))
            .max_frame_size(Some(self.policy.max_message_bytes));
        let connecting =
            tokio_tungstenite::connect_async_with_config(self.url.as_str(), Some(config), true);
        match tokio::time::timeout(self.policy.connect_timeout, connecting).await {
            Err(_) => Err(LinkError::ConnectTimeout(self.policy.connect_timeout)),
            Ok(Err(e)) => Err(LinkError::Connect(e)),
            Ok(Ok((socket, _response))) => Ok(socket),
        }
    }

    /// Sends `start`, then queued frames as they come, until the call's `stop` has been
    /// written (Ok) or the connection fails (Err).
    async fn pump(
        &self,
        mut socket: BackendSocket,
        pending: &mut VecDeque<Frame>,
    ) -> Result<(), LinkError> {
        // One socket, not split: reading (while idle) and writing (after) never overlap, so
        // no lock is needed between two halves.
        socket.send(self.start.clone()).await?;
        let mut meter = Meter::default();
        meter.written(1, &self.shared);
        let result = self.forward(&mut socket, pending, &mut meter).await;
        meter.flush(&self.metrics);
        result
    }

    async fn forward(
        &self,
        socket: &mut BackendSocket,
        pending: &mut VecDeque<Frame>,
        meter: &mut Meter,
    ) -> Result<(), LinkError> {
        loop {
            while pending.is_empty() {
                self.shared.queue.take_all(pending);
                if !pending.is_empty() {
                    break;
                }
                meter.flush_if_due(&self.metrics);
                tokio::select! {
                    // Frames first; the backend seldom says anything.
                    biased;
                    _ = self.shared.queue.ready() => {}
                    _ = readable(socket) => self.read_backend(socket)?,
                }
            }
            let oldest = pending.front().map(|f| f.received);
            let mut written = 0u64;
            let mut stop = false;
            while let Some(frame) = pending.pop_front() {
                stop = frame.kind == Kind::Stop;
                socket.feed(frame.message).await?;
                written += 1;
                if stop {
                    break;
                }
            }
            socket.flush().await?;
            if let Some(t) = oldest {
                meter.latency.record(t.elapsed());
            }
            meter.written(written, &self.shared);
            if stop {
                meter.flush(&self.metrics);
                // A polite close; a backend that does not answer it is not waited on long.
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                return Ok(());
            }
        }
    }

    /// Reads whatever the backend has sent, without waiting: a close or an error ends the
    /// link; anything else is counted and dropped.
    fn read_backend(&self, socket: &mut BackendSocket) -> Result<(), LinkError> {
        while let Some(incoming) = socket.next().now_or_never() {
            match incoming {
                None => return Err(LinkError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(LinkError::Closed(
                        frame.map(|f| format!("{} {}", f.code, f.reason)),
                    ))
                }
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    self.metrics.ignored.inc();
                }
                Some(Ok(_)) => {}
            }
        }
        Ok(())
    }
}

/// Ready once the backend's socket has something to read (or has closed).
///
/// A writer waits on this rather than on the WebSocket stream itself: a read attempt through
/// the WebSocket layer on every wait (once per frame sent) costs buffer set-up and waker
/// bookkeeping, while a readiness check is one atomic load.
async fn readable(socket: &BackendSocket) {
    match socket.get_ref() {
        MaybeTlsStream::Plain(tcp) => {
            let _ = tcp.readable().await;
        }
        // Only plain `ws://` backends pass config validation today. Should another transport
        // appear, look for its news now and then instead.
        _ => tokio::time::sleep(Duration::from_millis(100)).await,
    }
}

/// A writer's counts, added to the shared metrics a few times a second rather than per
/// frame: the metrics are shared by every call's writers, and updating them per frame made
/// the cores fight over the same cache lines.
#[derive(Default)]
struct Meter {
    frames: u64,
    latency: LatencyBatch,
    last_flush: Option<Instant>,
}

impl Meter {
    /// `sent` (what `/calls` shows) is the link's own counter, so it stays exact.
    fn written(&mut self, n: u64, shared: &LinkShared) {
        self.frames += n;
        shared.sent.fetch_add(n, Ordering::Relaxed);
    }

    fn flush_if_due(&mut self, metrics: &LinkMetrics) {
        let due = self
            .last_flush
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
        if due {
            self.flush(metrics);
        }
    }

    fn flush(&mut self, metrics: &LinkMetrics) {
        self.last_flush = Some(Instant::now());
        if self.frames > 0 {
            metrics.frames_out.inc_by(self.frames);
            self.frames = 0;
        }
        metrics.forward_latency.absorb(&mut self.latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, text: &str) -> Frame {
        Frame {
            kind,
            message: Message::Text(text.to_string().into()),
            received: Instant::now(),
        }
    }

    fn texts(q: &Queue) -> Vec<String> {
        let mut out = VecDeque::new();
        q.take_all(&mut out);
        out.into_iter()
            .map(|f| f.message.into_text().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_media_and_keeps_control_messages() {
        let q = Queue::new(3);
        assert_eq!(q.push(frame(Kind::Control, "mark")), Pushed::Queued);
        for m in ["m1", "m2", "m3"] {
            assert_eq!(q.push(frame(Kind::Media, m)), Pushed::Queued);
        }
        assert_eq!(q.push(frame(Kind::Media, "m4")), Pushed::DroppedOldest);
        assert_eq!(q.push(frame(Kind::Control, "dtmf")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "m5")), Pushed::DroppedOldest);
        assert_eq!(q.push(frame(Kind::Stop, "stop")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "late")), Pushed::Closed);
        assert_eq!(texts(&q), ["mark", "m3", "m4", "dtmf", "m5", "stop"]);
    }

    #[test]
    fn taking_resets_the_media_count() {
        let q = Queue::new(2);
        q.push(frame(Kind::Media, "a"));
        q.push(frame(Kind::Media, "b"));
        assert_eq!(texts(&q), ["a", "b"]);
        assert_eq!(q.push(frame(Kind::Media, "c")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "d")), Pushed::Queued);
        assert_eq!(q.len(), 2);
    }
}
