//! One backend link of a call: its bounded queue, and the writer task that connects, forwards,
//! and reconnects. Links never wait on each other or on the caller: a frame for a backend
//! whose socket has room is written at once by the session, without waiting; anything else
//! goes through the queue to the writer, and a full queue sheds its oldest media frame instead
//! of blocking.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::MaybeTlsStream;
use tracing::{info, warn, Instrument};

use super::link::{BackendSocket, ConnectError, Endpoint};
use super::route::Target;
use super::talkback::{FloodMeter, Reader, TowardTwilio};
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

/// A bounded queue that drops its oldest media frame when full, never a control message; and,
/// while the writer has nothing to do, the place where it leaves the backend's socket.
///
/// Bounded in frames (media) and in bytes (everything). What the writer has taken but not yet
/// written still counts until the writer says it is written, so the bound holds for all that
/// the link holds, not just the part waiting in the queue.
///
/// **Writing at once.** A writer with nothing queued and everything flushed parks its socket
/// here. A frame pushed then is written straight to the socket by the pusher, under the lock,
/// without waiting: a write the kernel takes whole costs no task wake-up, no hop to another
/// task and no second look at the frame. A write the socket cannot take whole (the backend is
/// slow) leaves the rest in the WebSocket's buffer and hands the socket back to the writer,
/// which flushes it under its write deadline; until the writer parks the socket again, frames
/// queue as they always did. Frames stay in order: the pusher writes only while nothing is
/// queued and nothing is unflushed, and the writer parks only when both are so.
///
/// A std `Mutex` because it is never held across an `.await`: push and take are a few
/// pointer moves or one non-blocking write, and the writer takes everything queued in one
/// lock.
///
/// `repr(C)`: the lock and what it guards first, then the waker and the bounds, so a push and
/// a take each touch the same two cache lines (see [`LinkShared`]).
#[repr(C)]
pub struct Queue {
    state: Mutex<QueueState>,
    /// The writer's waker. Lock-free on both sides, unlike a `Notify`, whose waiter list
    /// takes a lock on every wait and every wake.
    waker: AtomicWaker,
    max_frames: usize,
    max_bytes: usize,
}

/// What a write at once reads comes first, so that it and the lock share a cache line.
#[derive(Default)]
#[repr(C)]
struct QueueState {
    /// The backend's socket while the writer waits with nothing to write: frames pushed now
    /// are written to it at once.
    idle: Option<Box<BackendSocket>>,
    closed: bool,
    /// A write at once left bytes in the socket's buffer, or failed: the writer must take the
    /// socket back and flush (or find the failure) before anything is written at once again.
    unflushed: bool,
    items: VecDeque<Frame>,
    /// What the link holds, queued and taken-but-unwritten together.
    held: Held,
}

impl QueueState {
    /// Moves everything queued into `into`, after what is there already.
    fn take_into(&mut self, into: &mut VecDeque<Frame>) {
        if into.is_empty() {
            std::mem::swap(into, &mut self.items);
        } else {
            into.append(&mut self.items);
        }
    }
}

/// Frames held by a link, or written by its writer since it last took from the queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub frames: usize,
    pub media: usize,
    pub bytes: usize,
}

impl Held {
    fn add(&mut self, frame: &Frame) {
        self.frames += 1;
        self.media += usize::from(frame.kind == Kind::Media);
        self.bytes += frame.size();
    }

    fn remove(&mut self, other: &Held) {
        self.frames -= other.frames;
        self.media -= other.media;
        self.bytes -= other.bytes;
    }
}

impl Frame {
    /// What the frame costs the queue's byte bound.
    fn size(&self) -> usize {
        self.message.len()
    }
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Written to the backend's socket at once (see [`Queue`]).
    Written,
    Queued,
    /// This many media frames were dropped: the oldest queued ones, to make room, and the
    /// pushed one itself when even that left no room (the link is full of frames it cannot
    /// drop: control messages, or frames the writer is writing now).
    Dropped(usize),
    /// The queue already holds the call's `stop`; nothing after it is sent.
    Closed,
}

impl Queue {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState::default()),
            waker: AtomicWaker::new(),
            max_frames,
            max_bytes,
        }
    }

    /// Writes the frame at once if the writer has parked the socket and nothing is ahead of
    /// it; queues it otherwise.
    pub fn push(&self, frame: Frame) -> Pushed {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            return Pushed::Closed;
        }
        // The call's last message goes through the writer, which closes the link after it.
        let at_once = frame.kind != Kind::Stop && q.items.is_empty() && !q.unflushed;
        let socket = match q.idle.as_deref_mut() {
            Some(socket) if at_once => socket,
            _ => return self.enqueue(q, frame),
        };
        let pushed = match write_at_once(socket, frame) {
            AtOnce::Flushed => return Pushed::Written,
            AtOnce::Buffered => Pushed::Written,
            // Lost with the connection, as a frame the writer was writing would be.
            AtOnce::Failed => Pushed::Dropped(1),
            AtOnce::NotTaken(frame) => {
                q.unflushed = true;
                return self.enqueue(q, frame);
            }
        };
        // The writer takes the socket back: it flushes the rest under its write deadline, or
        // meets the failure and reconnects.
        q.unflushed = true;
        drop(q);
        self.waker.wake();
        pushed
    }

    /// Queues a frame for the writer, within the bounds, and wakes it.
    fn enqueue(&self, mut q: MutexGuard<'_, QueueState>, frame: Frame) -> Pushed {
        let size = frame.size();
        let is_media = frame.kind == Kind::Media;
        let mut dropped = 0;
        while (is_media && q.held.media >= self.max_frames) || q.held.bytes + size > self.max_bytes
        {
            // Media is almost always at the front; control messages are rare.
            let Some(pos) = q.items.iter().position(|f| f.kind == Kind::Media) else {
                break;
            };
            if let Some(old) = q.items.remove(pos) {
                let mut gone = Held::default();
                gone.add(&old);
                q.held.remove(&gone);
                dropped += 1;
            }
        }
        let over =
            (is_media && q.held.media >= self.max_frames) || q.held.bytes + size > self.max_bytes;
        if over && is_media {
            return Pushed::Dropped(dropped + 1);
        }
        if frame.kind == Kind::Stop {
            q.closed = true;
        }
        q.held.add(&frame);
        q.items.push_back(frame);
        drop(q);
        self.waker.wake();
        if dropped > 0 {
            Pushed::Dropped(dropped)
        } else {
            Pushed::Queued
        }
    }

    /// Moves everything queued into `into`, oldest first, after taking `written` (what the
    /// writer has written since it last took) off what the link holds.
    #[cfg(test)]
    fn take_all(&self, into: &mut VecDeque<Frame>, written: &mut Held) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.held.remove(written);
        *written = Held::default();
        q.take_into(into);
    }

    /// Gives frames the writer took but could not write back to the front of the queue,
    /// where the bound can drop their oldest media while the link reconnects.
    fn put_back(&self, taken: &mut VecDeque<Frame>, written: &mut Held) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.held.remove(written);
        *written = Held::default();
        taken.append(&mut q.items);
        std::mem::swap(&mut q.items, taken);
    }

    /// Empties the queue of a link that has given up: nothing more will be written.
    fn discard(&self) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.items.clear();
        q.held = Held::default();
        q.closed = true;
    }

    /// What the link holds now: queued, and taken by the writer but not yet written.
    pub fn held(&self) -> Held {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).held
    }

    /// Frames the link holds (see [`Queue::held`]).
    pub fn len(&self) -> usize {
        self.held().frames
    }
}

/// What became of a frame written at once.
enum AtOnce {
    /// On its way: the kernel took all of it.
    Flushed,
    /// Taken by the WebSocket, but the kernel took only part: the rest waits in its buffer.
    Buffered,
    /// The connection failed; the frame is lost with it.
    Failed,
    /// The socket would not take a message now; the frame is handed back to be queued.
    NotTaken(Frame),
}

/// Writes a frame to an idle backend socket without waiting. The context wakes no one: no
/// task waits on this socket's writes while it is parked, and the writer that takes it back
/// registers its own waker with its first flush.
fn write_at_once(socket: &mut BackendSocket, frame: Frame) -> AtOnce {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    let mut socket = std::pin::Pin::new(socket);
    if !matches!(socket.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(()))) {
        return AtOnce::NotTaken(frame);
    }
    if socket.as_mut().start_send(frame.message).is_err() {
        return AtOnce::Failed;
    }
    match socket.poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => AtOnce::Flushed,
        Poll::Ready(Err(_)) => AtOnce::Failed,
        Poll::Pending => AtOnce::Buffered,
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
    /// A backend that takes nothing for this long is a failed link.
    pub write_timeout: Duration,
    /// This instance's id, sent as [`super::HOP_HEADER`] on every upgrade.
    pub hop: String,
    pub queue_bytes: usize,
    pub reconnect_max_tries: u32,
    pub reconnect_window: Duration,
    pub max_message_bytes: usize,
    /// A backend that does not speak may send this many messages, and bytes, a second.
    pub max_unsolicited: (u32, usize),
}

/// The largest message read from a speaking backend: more than any payload it may send, so
/// an oversized one is read whole and refused (the call goes on) rather than failing the link.
const SPEAKER_MAX_MESSAGE: usize = 2 << 20;

/// What a writer does with what its backend says.
enum Hearing {
    /// Checked, and queued toward the caller.
    Speaker {
        reader: Box<Reader>,
        toward: Arc<TowardTwilio>,
        /// Reasons already logged on this link (each once; every one is counted).
        logged: u32,
    },
    /// Read and discarded; a flood ends the link.
    Quiet(FloodMeter),
}

/// The part of a link the session, `/calls` and the writer all see.
///
/// Laid out for the frame path (`repr(C)`, from a cache line's start): the counter added to
/// after each write and the queue, whose lock and what a write at once reads come first, so
/// that a frame written at once touches one line here; then what only `/calls` and the
/// link's changes read. A call's links are memory gone cold since its last frame, 20 ms ago,
/// and every line a frame touches costs a miss.
#[repr(C, align(64))]
pub struct LinkShared {
    pub sent: AtomicU64,
    pub queue: Queue,
    pub dropped: AtomicU64,
    state: AtomicU8,
    pub speaks: bool,
    pub format: WireFormat,
    pub reconnects: AtomicU32,
    pub name: String,
    pub metrics_label: String,
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
///
/// Small, with what every frame reads held here rather than behind the `Arc`: a call's links
/// are memory gone cold since its last frame, and each line touched is a miss.
pub struct Link {
    pub format: WireFormat,
    /// This link's backend talks back to the caller.
    pub speaks: bool,
    pub shared: Arc<LinkShared>,
    /// For a `pcm16` link: the caller's audio on its way to the backend's rate.
    pub pcm: Option<Box<super::wire::PcmDown>>,
    /// Frames the session wrote at once (see [`Queue`]), counted as the writer counts its own.
    at_once: Meter,
    metrics: Box<LinkMetrics>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Writes a frame at once or queues it, counting it as sent or dropped. A link that is
    /// gone has closed its queue, which discards the frame.
    pub fn push(&mut self, frame: Frame) {
        let received = frame.received;
        match self.shared.queue.push(frame) {
            Pushed::Written => {
                self.at_once
                    .written(1, Some(received), &self.shared, &self.metrics);
            }
            Pushed::Dropped(dropped) => {
                let dropped = dropped as u64;
                self.shared.dropped.fetch_add(dropped, Ordering::Relaxed);
                self.metrics.frames_dropped.inc_by(dropped);
            }
            Pushed::Queued | Pushed::Closed => {}
        }
    }

    /// Adds what was written at once, and not yet counted, to the shared metrics.
    pub fn flush_metrics(&mut self) {
        self.at_once.flush(&self.metrics);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.flush_metrics();
    }
}

/// Opens a link: spawns its writer, which connects, sends `start`, then everything queued.
/// `changed` is notified whenever the link connects, reconnects, gives up or finishes.
/// How a link reaches its backend and what it says first.
pub struct Opening {
    pub endpoint: Arc<Endpoint>,
    /// The call's `start` in the backend's format, sent on every (re)connect.
    pub start: Message,
    /// For the call's speaker: where its words go.
    pub toward: Option<Arc<TowardTwilio>>,
}

pub fn spawn(
    target: &Target,
    opening: Opening,
    policy: Policy,
    metrics: LinkMetrics,
    changed: Arc<Notify>,
    tracker: &tokio_util::task::TaskTracker,
) -> Link {
    let shared = Arc::new(LinkShared {
        name: target.name.clone(),
        speaks: target.speaks,
        metrics_label: target.metrics_label.clone(),
        format: target.format,
        queue: Queue::new(target.queue_frames, policy.queue_bytes),
        state: AtomicU8::new(LinkState::Connecting as u8),
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        reconnects: AtomicU32::new(0),
    });
    let Opening {
        endpoint,
        start,
        toward,
    } = opening;
    let speaker = toward.and_then(|toward| {
        Reader::new(target.format, target.sample_rate, policy.max_message_bytes)
            .inspect_err(|e| warn!(backend = %target.name, error = %e, "this backend cannot speak"))
            .ok()
            .map(|reader| (reader, toward))
    });
    let writer = Writer {
        speaker: speaker.is_some(),
        shared: shared.clone(),
        endpoint,
        start,
        policy,
        metrics: metrics.clone(),
        changed,
    };
    let span = tracing::info_span!("backend", backend = %target.name);
    let pcm = (target.format == WireFormat::Pcm16)
        .then(|| super::wire::PcmDown::new(target.sample_rate))
        .and_then(|made| {
            made.inspect_err(
                |e| warn!(backend = %target.name, error = %e, "no audio for this backend"),
            )
            .ok()
        });
    let task = tracker.spawn(writer.run(speaker).instrument(span));
    Link {
        format: target.format,
        speaks: target.speaks,
        shared,
        pcm: pcm.map(Box::new),
        at_once: Meter::default(),
        metrics: Box::new(metrics),
        task,
    }
}

/// Why a backend connection ended early. Always the backend's side (upstream), never the
/// caller's: logged as such.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("backend closed the connection{}", .0.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Closed(Option<String>),
    #[error("connection failed: {0}")]
    Io(#[from] tungstenite::Error),
    #[error("backend took nothing for {0:?}; dropping the link")]
    WriteStalled(Duration),
    #[error("backend that does not speak sent more than {0} messages or {1} bytes in a second; dropping the link as misbehaving")]
    Misbehaving(u32, usize),
}

struct Writer {
    /// The backend talks back to the caller.
    speaker: bool,
    shared: Arc<LinkShared>,
    endpoint: Arc<Endpoint>,
    start: Message,
    policy: Policy,
    metrics: LinkMetrics,
    changed: Arc<Notify>,
}

impl Writer {
    async fn run(self, speaker: Option<(Reader, Arc<TowardTwilio>)>) {
        // Frames taken from the queue; those not yet written go back to it on a failure, so
        // they survive a reconnect within the queue's bound.
        let mut pending = VecDeque::new();
        let mut written = Held::default();
        // A speaker goes on talking after a reconnect: the reader's state and the queue
        // toward Twilio outlive any one connection.
        let (max_messages, max_bytes) = self.policy.max_unsolicited;
        let mut hearing = match speaker {
            Some((reader, toward)) => Hearing::Speaker {
                reader: Box::new(reader),
                toward,
                logged: 0,
            },
            None => Hearing::Quiet(FloodMeter::new(max_messages, max_bytes)),
        };
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
                    let pumped = self
                        .pump(socket, &mut pending, &mut written, &mut hearing)
                        .await;
                    self.shared.queue.put_back(&mut pending, &mut written);
                    match pumped {
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
                self.shared.queue.discard();
                return;
            }
            warn!(fault = "backend", error = %error, url = %self.endpoint.shown(), "backend link failed; reconnecting");
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
        // this much buffer first: keep it small. A speaker talks 50 times a second: more.
        let (read_chunk, max_message) = if self.speaker {
            (4096, SPEAKER_MAX_MESSAGE.max(self.policy.max_message_bytes))
        } else {
            (BACKEND_READ_CHUNK, self.policy.max_message_bytes)
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(read_chunk)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        self.endpoint
            .connect(&self.policy.hop, config, self.policy.connect_timeout)
            .await
            .map_err(LinkError::Connect)
    }

    /// Sends `start`, then queued frames as they come, until the call's `stop` has been
    /// written (Ok) or the connection fails (Err). Between batches the socket is parked in
    /// the queue, where the session writes frames to it at once (see [`Queue`]).
    ///
    /// One flat loop, with what each batch needs in its own locals: a writer wakes with its
    /// memory gone cold since it last ran, and each nested future and each struct it reaches
    /// through on the way is another cache line to miss.
    async fn pump(
        &self,
        socket: BackendSocket,
        pending: &mut VecDeque<Frame>,
        written: &mut Held,
        hearing: &mut Hearing,
    ) -> Result<(), LinkError> {
        let shared = &*self.shared;
        let metrics = &self.metrics;
        let deadline = self.policy.write_timeout;
        // Boxed: parking moves it into the queue and back, a pointer rather than the socket.
        let mut socket = Box::new(socket);
        // One socket, not split: reading (while idle) and writing (after) never overlap, so
        // no lock is needed between two halves.
        match tokio::time::timeout(deadline, socket.send(self.start.clone())).await {
            Err(_) => return Err(LinkError::WriteStalled(deadline)),
            Ok(sent) => sent?,
        }
        let mut meter = Meter::default();
        meter.written(1, None, shared, metrics);
        let ended = 'pump: loop {
            let work;
            (work, socket) = next_work(&shared.queue, pending, written, socket).await;
            if work == Work::Read {
                if let Err(e) = self.read_backend(&mut socket, hearing) {
                    break 'pump Err(e);
                }
                continue;
            }
            let oldest = pending.front().map(|f| f.received);
            let before = written.frames;
            let mut stop = false;
            // One deadline for the batch: a backend that stops reading fills its socket and
            // then takes nothing; it is a failed link, not one that looks connected forever.
            // An empty batch flushes what a write at once left in the socket's buffer.
            let batch = async {
                while let Some(frame) = pending.pop_front() {
                    stop = frame.kind == Kind::Stop;
                    written.add(&frame);
                    socket.feed(frame.message).await?;
                    if stop {
                        break;
                    }
                }
                socket.flush().await
            };
            match within(deadline, batch).await {
                None => break Err(LinkError::WriteStalled(deadline)),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(())) => {}
            }
            let n = (written.frames - before) as u64;
            if n > 0 {
                meter.written(n, oldest, shared, metrics);
            }
            if stop {
                meter.flush(metrics);
                // A polite close; a backend that does not answer it is not waited on long.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    BackendSocket::close(&mut socket, None),
                )
                .await;
                break Ok(());
            }
        };
        meter.flush(metrics);
        ended
    }

    /// Reads whatever the backend has sent, without waiting: a close or an error ends the
    /// link; anything else is counted and dropped.
    fn read_backend(
        &self,
        socket: &mut BackendSocket,
        hearing: &mut Hearing,
    ) -> Result<(), LinkError> {
        while let Some(incoming) = socket.next().now_or_never() {
            match incoming {
                None => return Err(LinkError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(LinkError::Closed(
                        frame.map(|f| format!("{} {}", f.code, f.reason)),
                    ))
                }
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    self.heard(message, hearing)?;
                }
                Some(Ok(_)) => {}
            }
        }
        Ok(())
    }

    /// One message from the backend: a speaker's is checked and sent on toward the caller;
    /// anyone else's is counted and dropped, and too many of them end the link.
    fn heard(&self, message: Message, hearing: &mut Hearing) -> Result<(), LinkError> {
        match hearing {
            Hearing::Speaker {
                reader,
                toward,
                logged,
            } => match reader.read(&message) {
                Ok(Some(said)) => {
                    let queued = toward.push(said);
                    if queued.dropped > 0 {
                        self.metrics.talkback_dropped.inc_by(queued.dropped as u64);
                    }
                    if queued.cleared > 0 {
                        self.metrics.talkback_cleared.inc_by(queued.cleared as u64);
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    self.metrics.rejected.inc();
                    let bit = 1u32 << (why as u8);
                    if *logged & bit == 0 {
                        *logged |= bit;
                        warn!(fault = "backend", reason = %why, "speaker's message dropped (further ones of this kind are counted, not logged)");
                    }
                }
            },
            Hearing::Quiet(meter) => {
                self.metrics.ignored.inc();
                if meter.over(message.len()) {
                    self.metrics.misbehaving.inc();
                    let (messages, bytes) = self.policy.max_unsolicited;
                    return Err(LinkError::Misbehaving(messages, bytes));
                }
            }
        }
        Ok(())
    }
}

/// Runs `work` with a deadline that starts only if it has to wait: a write to a socket with
/// room finishes at once, and then costs neither a clock read nor a timer. `None` when the
/// deadline passed first.
async fn within<T>(deadline: Duration, work: impl std::future::Future<Output = T>) -> Option<T> {
    let mut work = std::pin::pin!(work);
    if let Some(done) = work.as_mut().now_or_never() {
        return Some(done);
    }
    tokio::time::timeout(deadline, work).await.ok()
}

/// What woke a waiting writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Frames were queued, and are in the writer's hands now; or a write at once left part
    /// of a frame for the writer to flush.
    Frames,
    /// The backend's socket has something to read, or has closed.
    Read,
}

/// Waits, with the socket parked in the queue, until frames are queued (and takes them all
/// into `into`, one lock a wait), a write at once has left something to flush, or the
/// backend's socket has something to read. Hands the socket back with the work. Frames
/// first: the backend seldom says anything.
///
/// Readiness, not a read: a read attempt through the WebSocket layer on every wait costs
/// buffer set-up and waker bookkeeping, while the socket's one read-interest slot (this task
/// is its only reader) costs a load and a waker check; `readable()` would join and leave a
/// locked waiter list every time.
async fn next_work(
    queue: &Queue,
    into: &mut VecDeque<Frame>,
    written: &mut Held,
    socket: Box<BackendSocket>,
) -> (Work, Box<BackendSocket>) {
    use std::task::Poll;
    let mut parking = Some(socket);
    std::future::poll_fn(move |cx| {
        // Registered before the look, so a push after the look wakes the writer.
        queue.waker.register(cx.waker());
        let mut q = queue.state.lock().unwrap_or_else(|e| e.into_inner());
        q.held.remove(written);
        *written = Held::default();
        if let Some(socket) = parking.take() {
            q.idle = Some(socket);
        }
        let work = if !q.items.is_empty() || q.unflushed {
            q.unflushed = false;
            q.take_into(into);
            Work::Frames
        } else {
            let Some(socket) = q.idle.as_deref() else {
                return Poll::Pending;
            };
            // Under TLS too the TCP socket tells: the writer drains every complete record
            // each time it reads, so nothing waits decrypted in rustls's buffer meanwhile.
            let tcp = match socket.get_ref() {
                MaybeTlsStream::Plain(tcp) => tcp,
                MaybeTlsStream::Rustls(tls) => tls.get_ref().0,
                // Only the two above are ever connected (see `link::Endpoint::connect`).
                _ => return Poll::Pending,
            };
            match tcp.poll_read_ready(cx) {
                Poll::Ready(_) => Work::Read,
                Poll::Pending => return Poll::Pending,
            }
        };
        let socket = q
            .idle
            .take()
            .expect("parked by this future on its first poll, and taken back only here");
        Poll::Ready((work, socket))
    })
    .await
}

/// A writer's counts, added to the shared metrics a few times a second rather than per
/// frame: the metrics are shared by every call's writers, and updating them per frame made
/// the cores fight over the same cache lines. They are added after a write that finds them
/// due, and when the link ends: a link that goes quiet holds at most one period's worth.
#[derive(Default)]
struct Meter {
    frames: u64,
    latency: LatencyBatch,
    last_flush: Option<Instant>,
}

/// How often a writer adds its counts to the shared metrics.
const METER_PERIOD: Duration = Duration::from_millis(250);

impl Meter {
    /// Counts `n` frames written, the oldest of them received at `oldest`; one clock read
    /// serves the latency and the flush. `sent` (what `/calls` shows) is the link's own
    /// counter, so it stays exact.
    fn written(
        &mut self,
        n: u64,
        oldest: Option<Instant>,
        shared: &LinkShared,
        metrics: &LinkMetrics,
    ) {
        self.frames += n;
        shared.sent.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        if let Some(t) = oldest {
            self.latency.record(now.saturating_duration_since(t));
        }
        if self.last_flush.is_none_or(|t| now - t >= METER_PERIOD) {
            self.flush_at(now, metrics);
        }
    }

    fn flush(&mut self, metrics: &LinkMetrics) {
        self.flush_at(Instant::now(), metrics);
    }

    fn flush_at(&mut self, now: Instant, metrics: &LinkMetrics) {
        self.last_flush = Some(now);
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
        q.take_all(&mut out, &mut Held::default());
        out.into_iter()
            .map(|f| f.message.into_text().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_media_and_keeps_control_messages() {
        let q = Queue::new(3, 1 << 20);
        assert_eq!(q.push(frame(Kind::Control, "mark")), Pushed::Queued);
        for m in ["m1", "m2", "m3"] {
            assert_eq!(q.push(frame(Kind::Media, m)), Pushed::Queued);
        }
        assert_eq!(q.push(frame(Kind::Media, "m4")), Pushed::Dropped(1));
        assert_eq!(q.push(frame(Kind::Control, "dtmf")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "m5")), Pushed::Dropped(1));
        assert_eq!(q.push(frame(Kind::Stop, "stop")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "late")), Pushed::Closed);
        assert_eq!(texts(&q), ["mark", "m3", "m4", "dtmf", "m5", "stop"]);
    }

    #[test]
    fn what_the_writer_holds_counts_until_it_is_written() {
        let q = Queue::new(2, 1 << 20);
        q.push(frame(Kind::Media, "a"));
        q.push(frame(Kind::Media, "b"));
        let mut taken = VecDeque::new();
        let mut written = Held::default();
        q.take_all(&mut taken, &mut written);
        assert_eq!(q.len(), 2, "taken, not yet written");
        assert_eq!(
            q.push(frame(Kind::Media, "c")),
            Pushed::Dropped(1),
            "nothing droppable left in the queue: the new frame goes"
        );
        // The writer writes "a", then the link fails: "b" goes back to the front.
        written.add(&taken.pop_front().unwrap());
        q.put_back(&mut taken, &mut written);
        assert_eq!(q.len(), 1);
        assert_eq!(q.push(frame(Kind::Media, "d")), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, "e")), Pushed::Dropped(1));
        assert_eq!(texts(&q), ["d", "e"]);
    }

    #[test]
    fn the_byte_bound_holds_control_frames_included() {
        let big = "x".repeat(400);
        let q = Queue::new(1000, 1000);
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Dropped(1));
        assert_eq!(q.held().bytes, 800);
        // A control frame is never dropped, and pushes media out to fit.
        assert_eq!(q.push(frame(Kind::Control, &big)), Pushed::Dropped(1));
        assert_eq!(q.held().bytes, 800);
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Dropped(1));
        assert_eq!(q.push(frame(Kind::Control, &big)), Pushed::Dropped(1));
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Dropped(1));
        assert!(
            q.held().bytes <= 1000 + 400,
            "only never-dropped control frames exceed it"
        );
        assert_eq!(q.held().media, 0);

        // One media frame queued, a big batch in the writer's hands: the queued frame and the
        // new one both go, and both are counted.
        let q = Queue::new(1000, 1000);
        q.push(frame(Kind::Media, &big));
        q.push(frame(Kind::Media, &big));
        let mut taken = VecDeque::new();
        q.take_all(&mut taken, &mut Held::default());
        assert_eq!(q.push(frame(Kind::Media, &"y".repeat(100))), Pushed::Queued);
        assert_eq!(q.push(frame(Kind::Media, &big)), Pushed::Dropped(2));
        assert_eq!(q.held().bytes, 800, "what the writer holds");
    }
}
