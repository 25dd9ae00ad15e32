//! One backend link of a call: its bounded queue, and the writer task that connects, forwards,
//! and reconnects. Links never wait on each other or on the caller: a frame for a backend
//! whose socket has room is written at once by the session, without waiting; anything else
//! goes through the queue to the writer, and a full queue sheds its oldest media frame instead
//! of blocking.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
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
    /// The call has ended and its time for the backend is up: no new connection, and no
    /// more media — only what is left of control messages and `stop` on a live connection.
    giving_up: bool,
    /// A write at once left bytes in the socket's buffer, or failed: the writer must take the
    /// socket back and flush (or find the failure) before anything is written at once again.
    unflushed: bool,
    items: VecDeque<Frame>,
    /// Frames a write at once left in the socket's buffer, not yet flushed: the writer takes
    /// them over with the socket, and they are sent when its next flush succeeds.
    in_socket: Held,
    /// Every frame pushed, and where it is now.
    accounts: Accounts,
}

impl Queue {
    /// When the oldest frame still queued arrived (for how far behind the link runs).
    pub fn oldest_waiting(&self) -> Option<Instant> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.items.front().map(|f| f.received)
    }
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

/// A link's accounting, in one place under the queue's lock, so that for every link at every
/// moment **pushed = sent + dropped + held**. Each transition below is the only way its
/// numbers move:
///
/// - a frame is *sent* only once a flush of it succeeded (the kernel took it), never when a
///   library merely buffered it;
/// - what a failed connection did not take goes back to the queue (still *held*), or, when
///   nothing can carry it any more, is counted *dropped*;
/// - *held* is everything in between: queued, taken by the writer, fed to the socket and not
///   yet flushed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accounts {
    pub pushed: u64,
    pub sent: u64,
    pub dropped: u64,
    pub held: Held,
}

impl Accounts {
    /// The invariant.
    pub fn balanced(&self) -> bool {
        self.pushed == self.sent + self.dropped + self.held.frames as u64
    }

    /// Pushed, and now held (queued, or in the socket's buffer).
    fn hold(&mut self, frame: &Frame) {
        self.pushed += 1;
        self.held.add(frame);
    }

    /// Pushed and flushed at once.
    fn sent_at_once(&mut self) {
        self.pushed += 1;
        self.sent += 1;
    }

    /// Pushed and never held: no room for it, the link is closed, or its connection failed
    /// as it was written.
    fn refuse(&mut self) {
        self.pushed += 1;
        self.dropped += 1;
    }

    /// Held frames whose flush succeeded.
    fn deliver(&mut self, frames: &Held) {
        self.held.remove(frames);
        self.sent += frames.frames as u64;
    }

    /// Held frames that will never be written: shed for room, or lost with a link that gave
    /// up or a connection that failed with them in its buffer.
    fn drop_held(&mut self, frames: &Held) {
        self.held.remove(frames);
        self.dropped += frames.frames as u64;
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

    fn plus(&mut self, other: &Held) {
        self.frames += other.frames;
        self.media += other.media;
        self.bytes += other.bytes;
    }

    /// Adds `other` and empties it.
    fn absorb(&mut self, other: &mut Held) {
        self.plus(other);
        *other = Held::default();
    }

    fn of(frame: &Frame) -> Held {
        let mut one = Held::default();
        one.add(frame);
        one
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
    /// Written to the backend's socket at once and flushed (see [`Queue`]).
    Written,
    /// Queued for the writer, or left in the socket's buffer by a write at once: the writer
    /// sends it.
    Queued,
    /// This many media frames were dropped: the oldest queued ones, to make room, and the
    /// pushed one itself when even that left no room (the link is full of frames it cannot
    /// drop: control messages, or frames the writer is writing now).
    Dropped(usize),
    /// The queue already holds the call's `stop`, or the link gave up; nothing more is sent,
    /// and the frame counts as dropped.
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
            q.accounts.refuse();
            return Pushed::Closed;
        }
        // The call's last message goes through the writer, which closes the link after it.
        let at_once = frame.kind != Kind::Stop && q.items.is_empty() && !q.unflushed;
        let socket = match q.idle.as_deref_mut() {
            Some(socket) if at_once => socket,
            _ => return self.enqueue(q, frame),
        };
        let one = Held::of(&frame);
        let pushed = match write_at_once(socket, frame) {
            AtOnce::Flushed => {
                q.accounts.sent_at_once();
                return Pushed::Written;
            }
            // Held in the socket's buffer until the writer's flush succeeds.
            AtOnce::Buffered => {
                q.accounts.pushed += 1;
                q.accounts.held.plus(&one);
                q.in_socket.plus(&one);
                Pushed::Queued
            }
            // Lost with the connection, as a frame the writer was writing would be.
            AtOnce::Failed => {
                q.accounts.refuse();
                Pushed::Dropped(1)
            }
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
        while (is_media && q.accounts.held.media >= self.max_frames)
            || q.accounts.held.bytes + size > self.max_bytes
        {
            // Media is almost always at the front; control messages are rare.
            let Some(pos) = q.items.iter().position(|f| f.kind == Kind::Media) else {
                break;
            };
            if let Some(old) = q.items.remove(pos) {
                q.accounts.drop_held(&Held::of(&old));
                dropped += 1;
            }
        }
        let held = q.accounts.held;
        let over =
            (is_media && held.media >= self.max_frames) || held.bytes + size > self.max_bytes;
        if over && is_media {
            q.accounts.refuse();
            return Pushed::Dropped(dropped + 1);
        }
        // Control messages are never dropped for room — up to twice the byte bound. Past it
        // the backend has taken nothing while the caller kept pressing keys: the link is given
        // up (no reconnect, what it holds counted dropped) rather than grown without end.
        if held.bytes + size > self.max_bytes.saturating_mul(2) {
            q.accounts.refuse();
            if !q.giving_up {
                warn!(
                    fault = "backend",
                    held_bytes = held.bytes,
                    "a backend's queue is full of control messages it does not take; giving the link up"
                );
            }
            q.giving_up = true;
            q.closed = true;
            let shed = shed_media(&mut q.items);
            q.accounts.drop_held(&shed);
            drop(q);
            self.waker.wake();
            return Pushed::Dropped(dropped + 1);
        }
        if frame.kind == Kind::Stop {
            q.closed = true;
        }
        q.accounts.hold(&frame);
        q.items.push_back(frame);
        drop(q);
        self.waker.wake();
        if dropped > 0 {
            Pushed::Dropped(dropped)
        } else {
            Pushed::Queued
        }
    }

    /// Moves everything queued into `into`, oldest first, after counting `written` (what the
    /// writer has flushed since it last took) as sent.
    #[cfg(test)]
    fn take_all(&self, into: &mut VecDeque<Frame>, written: &mut Held) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.accounts.deliver(written);
        *written = Held::default();
        q.take_into(into);
    }

    /// Settles a connection's end with the queue: what the writer flushed is sent; frames it
    /// took but did not get flushed go back to the front of the queue, where the bound can
    /// drop their oldest media while the link reconnects; frames a write at once left in the
    /// failed socket's buffer are lost with it. Answers how many were lost.
    fn settle(&self, taken: &mut VecDeque<Frame>, written: &mut Held, lost: &mut Held) -> u64 {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.accounts.deliver(written);
        *written = Held::default();
        // Whatever a write at once buffered since the writer last took the socket back.
        lost.absorb(&mut q.in_socket);
        let gone = lost.frames as u64;
        q.accounts.drop_held(lost);
        *lost = Held::default();
        taken.append(&mut q.items);
        std::mem::swap(&mut q.items, taken);
        debug_assert!(q.accounts.balanced(), "{:?}", q.accounts);
        gone
    }

    /// Empties the queue of a link that has given up: nothing more will be written, and
    /// everything it held counts as dropped. Answers how many.
    fn discard(&self) -> u64 {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.items.clear();
        let held = q.accounts.held;
        q.accounts.drop_held(&held);
        q.closed = true;
        debug_assert!(q.accounts.balanced(), "{:?}", q.accounts);
        held.frames as u64
    }

    /// The call has ended and the backend had its time: queued media is dropped (counted),
    /// a writer that is not connected stops trying, and a connected one writes only the
    /// control messages and `stop` left. A backend never gets a new connection's `start`
    /// that no `stop` follows.
    pub fn give_up(&self) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.giving_up = true;
        let media = shed_media(&mut q.items);
        q.accounts.drop_held(&media);
        drop(q);
        self.waker.wake();
    }

    fn giving_up(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .giving_up
    }

    /// Resolves once [`give_up`](Self::give_up) has been called (for the writer's waits
    /// outside [`next_work`], which share the queue's waker).
    async fn given_up(&self) {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.giving_up() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// What the link holds now: queued, and taken by the writer but not yet flushed.
    pub fn held(&self) -> Held {
        self.accounts().held
    }

    /// The link's accounting now (see [`Accounts`]).
    pub fn accounts(&self) -> Accounts {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accounts
    }

    /// Frames the link holds (see [`Queue::held`]).
    pub fn len(&self) -> usize {
        self.held().frames
    }
}

/// Removes every media frame from `frames`; answers what they held.
fn shed_media(frames: &mut VecDeque<Frame>) -> Held {
    let mut shed = Held::default();
    frames.retain(|f| {
        let media = f.kind == Kind::Media;
        if media {
            shed.add(f);
        }
        !media
    });
    shed
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
    /// The backend is pinged this often, and is a failed link when it has not answered a
    /// ping within `pong_timeout` (it stopped reading while the kernel still takes bytes).
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// This instance's id, sent as [`super::HOP_HEADER`] on every upgrade.
    pub hop: String,
    pub queue_bytes: usize,
    pub reconnect_max_tries: u32,
    pub reconnect_window: Duration,
    pub max_message_bytes: usize,
    /// A backend that does not speak may send this many messages, and bytes, a second.
    pub max_unsolicited: (u32, usize),
    /// A speaker may send this many messages, and bytes, a second.
    pub max_spoken: (u32, usize),
}

/// What a writer does with what its backend says.
enum Hearing {
    /// Checked, and queued toward the caller.
    Speaker {
        reader: Box<Reader>,
        toward: Arc<TowardTwilio>,
        /// A speaker's own limits per second, higher than a listener's.
        meter: FloodMeter,
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
    /// The queue, and the link's accounting under its lock.
    pub queue: Queue,
    state: AtomicU8,
    pub speaks: bool,
    pub format: WireFormat,
    pub reconnects: AtomicU32,
    pub name: String,
    pub metrics_label: String,
    /// How the link's delivery runs against real time.
    pub quality: LinkQuality,
}

/// A link's delivery against real time, as `/calls` shows it. The meters publish it at their
/// period, not per frame, so a frame's path writes nothing here.
#[derive(Debug)]
pub struct LinkQuality {
    opened: Instant,
    /// Microseconds from a frame's arrival to its write, at the latest write the meters
    /// published, and the most.
    lag_us: AtomicU32,
    lag_worst_us: AtomicU32,
    /// Microseconds from the call's start to this backend's first frame; 0 until then.
    first_frame_us: AtomicU32,
    /// Milliseconds the link was down during the call: in all, and the longest stretch.
    down_ms: AtomicU32,
    down_worst_ms: AtomicU32,
}

/// A `LinkQuality`'s figures at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, PartialEq)]
pub struct LinkQualityView {
    /// How far behind real time delivery runs now: the older of the last write's frame and
    /// the oldest frame still waiting.
    pub lag_ms: f64,
    pub lag_worst_ms: f64,
    /// From the call's start to the first frame the backend got; none yet: `null`.
    pub first_frame_ms: Option<f64>,
    pub down_ms: u32,
    pub down_worst_ms: u32,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl LinkQuality {
    fn new() -> Self {
        LinkQuality {
            opened: Instant::now(),
            lag_us: AtomicU32::new(0),
            lag_worst_us: AtomicU32::new(0),
            first_frame_us: AtomicU32::new(0),
            down_ms: AtomicU32::new(0),
            down_worst_ms: AtomicU32::new(0),
        }
    }

    fn publish(&self, lag: Duration, worst: Duration) {
        self.lag_us.store(micros(lag), Ordering::Relaxed);
        self.lag_worst_us
            .fetch_max(micros(worst), Ordering::Relaxed);
    }

    /// The first frame reached the backend at `at`; answers the time since the call's start
    /// the first time only.
    fn first_frame(&self, at: Instant) -> Option<Duration> {
        let took = at.saturating_duration_since(self.opened);
        self.first_frame_us
            .compare_exchange(0, micros(took).max(1), Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| took)
    }

    fn down(&self, gap: Duration) {
        let ms = gap.as_millis().min(u32::MAX as u128) as u32;
        self.down_ms.fetch_add(ms, Ordering::Relaxed);
        self.down_worst_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The figures now; `waiting_since` is when the oldest frame still queued arrived.
    pub fn view(&self, waiting_since: Option<Instant>) -> LinkQualityView {
        let ms = |us: u32| f64::from(us) / 1000.0;
        let waiting = waiting_since.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0);
        let lag = ms(self.lag_us.load(Ordering::Relaxed)).max(waiting);
        LinkQualityView {
            lag_ms: lag,
            lag_worst_ms: ms(self.lag_worst_us.load(Ordering::Relaxed)).max(lag),
            first_frame_ms: match self.first_frame_us.load(Ordering::Relaxed) {
                0 => None,
                us => Some(ms(us)),
            },
            down_ms: self.down_ms.load(Ordering::Relaxed),
            down_worst_ms: self.down_worst_ms.load(Ordering::Relaxed),
        }
    }

    pub fn worst_lag(&self) -> Duration {
        Duration::from_micros(u64::from(self.lag_worst_us.load(Ordering::Relaxed)))
    }
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
    /// For a `pcm16` link: the caller's audio on its way to the backend's rate (the first
    /// link of a call at each rate holds it; the others share its frames).
    pub pcm: Option<Box<super::wire::PcmDown>>,
    /// For a `pcm16` link: its rate.
    pub pcm_rate: u32,
    /// Frames the session wrote at once (see [`Queue`]), counted as the writer counts its own.
    at_once: Meter,
    metrics: Box<LinkMetrics>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Writes a frame at once or queues it (the queue keeps the link's accounts). A link
    /// that is gone has closed its queue, which counts the frame dropped.
    pub fn push(&mut self, frame: Frame) {
        let received = frame.received;
        match self.shared.queue.push(frame) {
            Pushed::Written => {
                self.at_once
                    .written(1, Some(received), &self.metrics, &self.shared.quality)
            }
            Pushed::Dropped(dropped) => {
                self.metrics.frames_dropped.inc_by(dropped as u64);
            }
            Pushed::Closed => {
                self.metrics.frames_dropped.inc();
            }
            Pushed::Queued => {}
        }
    }

    /// Adds what was written at once, and not yet counted, to the shared metrics.
    pub fn flush_metrics(&mut self) {
        self.at_once.flush(&self.metrics, &self.shared.quality);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.flush_metrics();
        self.metrics
            .quality
            .backend_lag
            .observe(self.shared.quality.worst_lag().as_secs_f64());
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
    /// The descriptor promised to this link at the upgrade, given back once its first
    /// connection attempt is over (the socket then holds its own, or failed to get one).
    pub descriptor: Option<crate::descriptors::Promise>,
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
        reconnects: AtomicU32::new(0),
        quality: LinkQuality::new(),
    });
    let Opening {
        endpoint,
        start,
        toward,
        descriptor,
    } = opening;
    let speaker = toward.and_then(|toward| {
        Reader::new(target.format, target.sample_rate, policy.max_message_bytes)
            .inspect_err(|e| warn!(backend = %target.name, error = %e, "this backend cannot speak"))
            .ok()
            .map(|reader| (reader, toward))
    });
    let writer = Writer {
        descriptor,
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
        pcm_rate: target.sample_rate,
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
    #[error("backend did not answer a ping within {0:?}; dropping the link")]
    NoPong(Duration),
    #[error("backend sent more than {0} pings in a second; dropping the link as misbehaving")]
    PingFlood(u32),
    #[error("backend sent more than {0} messages or {1} bytes in a second; dropping the link as misbehaving")]
    Misbehaving(u32, usize),
}

struct Writer {
    /// See [`Opening::descriptor`].
    descriptor: Option<crate::descriptors::Promise>,
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
    async fn run(mut self, speaker: Option<(Reader, Arc<TowardTwilio>)>) {
        // Frames taken from the queue; those not yet flushed go back to it on a failure, so
        // they survive a reconnect within the queue's bound.
        let mut pending = VecDeque::new();
        // Flushed since the writer last took from the queue: sent, once the queue hears.
        let mut written = Held::default();
        // What writes at once left in the socket's buffer: sent when a flush succeeds, lost
        // with a connection that fails first.
        let mut buffered = Held::default();
        // A speaker goes on talking after a reconnect: the reader's state and the queue
        // toward Twilio outlive any one connection.
        let (max_messages, max_bytes) = self.policy.max_unsolicited;
        let mut hearing = match speaker {
            Some((reader, toward)) => Hearing::Speaker {
                reader: Box::new(reader),
                toward,
                meter: FloodMeter::new(self.policy.max_spoken.0, self.policy.max_spoken.1),
                logged: 0,
            },
            None => Hearing::Quiet(FloodMeter::new(max_messages, max_bytes)),
        };
        // An outage begins at a failure and ends only once a connection has held for the
        // whole reconnect window, so a backend that accepts and drops at once still runs
        // out of tries.
        let mut outage: Option<(Instant, u32)> = None;
        let mut connected_before = false;
        // Since when the link has been down, for the gap its reconnect closes.
        let mut down_since: Option<Instant> = None;
        loop {
            // Boxed: connecting (TCP, TLS, the upgrade) is a 10 KiB future, and unboxed it
            // would sit in every link's task for the whole call, connected or not.
            let connected = tokio::select! {
                biased;
                () = self.shared.queue.given_up() => None,
                connected = Box::pin(self.connect()) => Some(connected),
            };
            // The first attempt is over: the socket holds its descriptor, or there is none.
            drop(self.descriptor.take());
            let Some(connected) = connected else {
                // The call has ended and its time for this backend is up: a new connection
                // now would be a `start` without the rest of the call.
                warn!(
                    fault = "backend",
                    "the call ended while the backend was unreachable; its last frames are dropped"
                );
                self.set_state(LinkState::Gone);
                let dropped = self.shared.queue.discard();
                self.metrics.frames_dropped.inc_by(dropped);
                return;
            };
            let error = match connected {
                Ok(socket) => {
                    self.metrics.connects.inc();
                    if connected_before {
                        self.metrics.reconnects.inc();
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        let gap = down_since.take().map(|t| t.elapsed()).unwrap_or_default();
                        self.shared.quality.down(gap);
                        self.metrics
                            .quality
                            .reconnect_gap
                            .observe(gap.as_secs_f64());
                        info!(
                            fault = "backend",
                            down_ms = gap.as_millis() as u64,
                            "backend reconnected"
                        );
                    }
                    connected_before = true;
                    let since = Instant::now();
                    self.set_state(LinkState::Connected);
                    let pumped = self
                        .pump(
                            socket,
                            &mut pending,
                            &mut written,
                            &mut buffered,
                            &mut hearing,
                        )
                        .await;
                    let lost = self
                        .shared
                        .queue
                        .settle(&mut pending, &mut written, &mut buffered);
                    if lost > 0 {
                        self.metrics.frames_dropped.inc_by(lost);
                    }
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
            down_since.get_or_insert_with(Instant::now);
            let (began, failures) = outage.get_or_insert((Instant::now(), 0));
            *failures += 1;
            let elapsed = began.elapsed();
            // Jittered waits can spend the tries early: a link gives up only once the window
            // is over, or its tries are spent and half the window has passed, so a backend's
            // restart of a second or two never loses it.
            let window = self.policy.reconnect_window;
            if elapsed >= window
                || (*failures > self.policy.reconnect_max_tries && elapsed >= window / 2)
            {
                warn!(
                    fault = "backend",
                    error = %error,
                    failures = *failures,
                    "backend gone for good; its frames are no longer queued"
                );
                self.set_state(LinkState::Gone);
                let dropped = self.shared.queue.discard();
                self.metrics.frames_dropped.inc_by(dropped);
                return;
            }
            warn!(fault = "backend", error = %error, url = %self.endpoint.shown(), "backend link failed; reconnecting");
            self.set_state(LinkState::Reconnecting);
            tokio::select! {
                () = tokio::time::sleep(backoff(*failures, self.policy.reconnect_window - elapsed)) => {}
                () = self.shared.queue.given_up() => {}
            }
        }
    }

    fn set_state(&self, s: LinkState) {
        self.shared.set_state(s);
        self.changed.notify_one();
    }

    /// A connection to the backend, boxed: it moves into the queue and back with every
    /// park, and no future of the writer's holds a socket's worth of bytes in place.
    async fn connect(&self) -> Result<Box<BackendSocket>, LinkError> {
        // Backends seldom say anything, and every idle wait makes a read attempt, which zeroes
        // this much buffer first: keep it small. A speaker talks 50 times a second: more.
        // A speaker's message is read whole up to its byte budget for a second, so an oversized
        // one is refused and counted while the call goes on; one larger than a second's budget
        // is a flood by itself and fails the link as a flood does.
        let (read_chunk, max_message) = if self.speaker {
            (
                4096,
                self.policy.max_spoken.1.max(self.policy.max_message_bytes),
            )
        } else {
            (BACKEND_READ_CHUNK, self.policy.max_message_bytes)
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(read_chunk)
            .max_write_buffer_size(super::session::max_unsent(self.policy.max_message_bytes))
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        self.endpoint
            .connect(&self.policy.hop, config, self.policy.connect_timeout)
            .await
            .map(Box::new)
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
        mut socket: Box<BackendSocket>,
        pending: &mut VecDeque<Frame>,
        written: &mut Held,
        buffered: &mut Held,
        hearing: &mut Hearing,
    ) -> Result<(), LinkError> {
        let shared = &*self.shared;
        let metrics = &self.metrics;
        let deadline = self.policy.write_timeout;
        // One socket, not split: reading (while idle) and writing (after) never overlap, so
        // no lock is needed between two halves.
        match tokio::time::timeout(deadline, socket.send(self.start.clone())).await {
            Err(_) => return Err(LinkError::WriteStalled(deadline)),
            Ok(sent) => sent?,
        }
        let mut meter = Meter::default();
        meter.written(1, None, metrics, &shared.quality);
        let mut liveness = Liveness::new(&self.policy);
        let ended = 'pump: loop {
            let work;
            (work, socket) = next_work(
                &shared.queue,
                pending,
                written,
                buffered,
                &mut liveness.timer,
                socket,
            )
            .await;
            if work == Work::Read {
                if let Err(e) = self.read_backend(&mut socket, hearing, &mut liveness) {
                    break 'pump Err(e);
                }
                continue;
            }
            if work == Work::Timer {
                match liveness.due(&self.policy) {
                    Err(e) => break 'pump Err(e),
                    Ok(false) => {}
                    Ok(true) => {
                        let ping = async {
                            socket.feed(Message::Ping(Default::default())).await?;
                            socket.flush().await
                        };
                        match within(deadline, ping).await {
                            None => break 'pump Err(LinkError::WriteStalled(deadline)),
                            Some(Err(e)) => break 'pump Err(e.into()),
                            // The flush also sent what writes at once left buffered.
                            Some(Ok(())) => written.absorb(buffered),
                        }
                    }
                }
                continue;
            }
            let oldest = pending.front().map(|f| f.received);
            // Up to the call's `stop`: nothing is queued after it.
            let take = pending
                .iter()
                .position(|f| f.kind == Kind::Stop)
                .map_or(pending.len(), |i| i + 1);
            // One deadline for the batch: a backend that stops reading fills its socket and
            // then takes nothing; it is a failed link, not one that looks connected forever.
            // An empty batch flushes what a write at once left in the socket's buffer. The
            // frames stay in `pending` until the flush succeeds: a batch that fails goes back
            // to the queue whole, `stop` with it, for the next connection.
            let batch = async {
                for frame in pending.iter().take(take) {
                    socket.feed(frame.message.clone()).await?;
                }
                socket.flush().await
            };
            match within(deadline, batch).await {
                None => break Err(LinkError::WriteStalled(deadline)),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(())) => {}
            }
            let mut stop = false;
            let n = (take + buffered.frames) as u64;
            for frame in pending.drain(..take) {
                stop |= frame.kind == Kind::Stop;
                written.add(&frame);
            }
            written.absorb(buffered);
            if n > 0 {
                meter.written(n, oldest, metrics, &shared.quality);
            }
            if stop {
                meter.flush(metrics, &shared.quality);
                // A polite close; a backend that does not answer it is not waited on long.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    BackendSocket::close(&mut socket, None),
                )
                .await;
                break Ok(());
            }
        };
        meter.flush(metrics, &shared.quality);
        ended
    }

    /// Reads whatever the backend has sent, without waiting: a close or an error ends the
    /// link; anything else is counted and dropped.
    fn read_backend(
        &self,
        socket: &mut BackendSocket,
        hearing: &mut Hearing,
        liveness: &mut Liveness,
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
                    liveness.answered();
                    self.heard(message, hearing)?;
                }
                Some(Ok(Message::Pong(_))) => liveness.answered(),
                // Each ping queues a pong: a backend that floods them is misbehaving.
                Some(Ok(Message::Ping(_))) => {
                    if liveness.pinged() {
                        self.metrics.misbehaving.inc();
                        return Err(LinkError::PingFlood(super::session::PINGS_PER_SECOND));
                    }
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
                meter,
                logged,
            } => {
                if meter.over(message.len()) {
                    self.metrics.misbehaving.inc();
                    let (messages, bytes) = self.policy.max_spoken;
                    return Err(LinkError::Misbehaving(messages, bytes));
                }
                match reader.read(&message) {
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
                }
            }
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

/// How long to wait before the next try after `failures` failures: full jitter — anywhere from
/// nothing to an exponential cap (100 ms, doubling, at most 3.2 s), never past what is left of
/// the window — so the calls of a backend that restarts do not all come back in the same
/// instant.
fn backoff(failures: u32, left: Duration) -> Duration {
    let cap = Duration::from_millis(100u64 << failures.saturating_sub(1).min(5)).min(left);
    Duration::from_micros(fastrand::u64(0..=cap.as_micros() as u64))
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

/// Whether the backend still reads: a ping every `ping_interval`, and a failed link when one
/// goes unanswered for `pong_timeout`. The write deadline cannot see a backend that stopped
/// reading while the kernel's buffers still take its bytes; this does, whatever it is sent.
struct Liveness {
    /// When the next ping is due, or when the unanswered one runs out.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The ping not yet answered, and when it went.
    waiting_since: Option<tokio::time::Instant>,
    /// The backend's own pings, per second.
    pings: FloodMeter,
}

impl Liveness {
    fn new(policy: &Policy) -> Self {
        Liveness {
            timer: Box::pin(tokio::time::sleep(policy.ping_interval)),
            waiting_since: None,
            pings: FloodMeter::new(super::session::PINGS_PER_SECOND, usize::MAX),
        }
    }

    /// The backend pinged: answers whether that is one too many this second.
    fn pinged(&mut self) -> bool {
        self.answered();
        self.pings.over(0)
    }

    /// The backend said something: it reads (a pong, or anything it sends after reading).
    fn answered(&mut self) {
        self.waiting_since = None;
    }

    /// The timer rang: a failed link when a ping went unanswered too long; otherwise whether
    /// to send a ping now. Sets the timer for what comes next.
    fn due(&mut self, policy: &Policy) -> Result<bool, LinkError> {
        let now = tokio::time::Instant::now();
        match self.waiting_since {
            Some(since) if now >= since + policy.pong_timeout => {
                Err(LinkError::NoPong(policy.pong_timeout))
            }
            Some(since) => {
                // Pinged already: another ping would not tell more; wait for the answer.
                self.timer.as_mut().reset(since + policy.pong_timeout);
                Ok(false)
            }
            None => {
                self.waiting_since = Some(now);
                self.timer
                    .as_mut()
                    .reset(now + policy.ping_interval.min(policy.pong_timeout));
                Ok(true)
            }
        }
    }
}

/// What woke a waiting writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Frames were queued, and are in the writer's hands now; or a write at once left part
    /// of a frame for the writer to flush.
    Frames,
    /// The backend's socket has something to read, or has closed.
    Read,
    /// Time to ping the backend, or to see whether it answered.
    Timer,
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
    buffered: &mut Held,
    timer: &mut std::pin::Pin<Box<tokio::time::Sleep>>,
    socket: Box<BackendSocket>,
) -> (Work, Box<BackendSocket>) {
    use std::task::Poll;
    let mut parking = Some(socket);
    std::future::poll_fn(move |cx| {
        // Registered before the look, so a push after the look wakes the writer.
        queue.waker.register(cx.waker());
        let mut q = queue.state.lock().unwrap_or_else(|e| e.into_inner());
        q.accounts.deliver(written);
        *written = Held::default();
        if let Some(socket) = parking.take() {
            q.idle = Some(socket);
        }
        let work = if !q.items.is_empty() || q.unflushed {
            q.unflushed = false;
            q.take_into(into);
            if q.giving_up {
                let media = shed_media(into);
                q.accounts.drop_held(&media);
            }
            // What writes at once left in the socket's buffer is the writer's to flush now.
            buffered.absorb(&mut q.in_socket);
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
                Poll::Pending => match std::future::Future::poll(timer.as_mut(), cx) {
                    Poll::Ready(()) => Work::Timer,
                    Poll::Pending => return Poll::Pending,
                },
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
    /// The latest write's lag, and the most, published at the flush.
    lag: Duration,
    lag_worst: Duration,
    /// This meter has seen a media frame written (the link's first is noted once).
    first_seen: bool,
}

/// How often a writer adds its counts to the shared metrics.
const METER_PERIOD: Duration = Duration::from_millis(250);

impl Meter {
    /// Counts `n` frames written, the oldest of them received at `oldest`; one clock read
    /// serves the latency, the link's lag and the flush. (What `/calls` shows is the link's
    /// [`Accounts`], kept exact under the queue's lock.)
    fn written(
        &mut self,
        n: u64,
        oldest: Option<Instant>,
        metrics: &LinkMetrics,
        quality: &LinkQuality,
    ) {
        self.frames += n;
        let now = Instant::now();
        if let Some(t) = oldest {
            let lag = now.saturating_duration_since(t);
            self.latency.record(lag);
            self.lag = lag;
            self.lag_worst = self.lag_worst.max(lag);
            if !self.first_seen {
                self.first_seen = true;
                if let Some(took) = quality.first_frame(now) {
                    metrics.quality.first_frame.observe(took.as_secs_f64());
                }
            }
        }
        if self.last_flush.is_none_or(|t| now - t >= METER_PERIOD) {
            self.flush_at(now, metrics, quality);
        }
    }

    fn flush(&mut self, metrics: &LinkMetrics, quality: &LinkQuality) {
        self.flush_at(Instant::now(), metrics, quality);
    }

    fn flush_at(&mut self, now: Instant, metrics: &LinkMetrics, quality: &LinkQuality) {
        self.last_flush = Some(now);
        if self.frames > 0 {
            metrics.frames_out.inc_by(self.frames);
            self.frames = 0;
        }
        metrics.forward_latency.absorb(&mut self.latency);
        quality.publish(self.lag, self.lag_worst);
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
        q.settle(&mut taken, &mut written, &mut Held::default());
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

    #[test]
    fn control_messages_past_twice_the_byte_bound_give_the_link_up() {
        let q = Queue::new(10, 4096);
        let dtmf = "d".repeat(100);
        let mut refused = 0;
        for _ in 0..1000 {
            if q.push(frame(Kind::Control, &dtmf)) != Pushed::Queued {
                refused += 1;
            }
        }
        let a = q.accounts();
        assert!(a.held.bytes <= 2 * 4096, "{a:?}");
        assert!(a.balanced(), "{a:?}");
        assert!(refused > 900);
        assert!(q.giving_up(), "the link is given up");
        assert_eq!(q.push(frame(Kind::Media, "m")), Pushed::Closed);
    }

    /// What the writer does with the queue, one step at a time (writes at once need a real
    /// socket: the media tests drive those through reconnects).
    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, usize),
        /// The writer takes everything queued.
        Take,
        /// The writer's flush of its first `n` taken frames succeeds.
        Flush(usize),
        /// The connection ends: flushed frames are settled, the rest goes back, and this many
        /// frames a write at once had buffered are lost with it.
        Settle(usize),
        Discard,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0u8..12, 1usize..600).prop_map(|(k, n)| Op::Push(k, n)),
            2 => Just(Op::Take),
            2 => (0usize..8).prop_map(Op::Flush),
            1 => (0usize..3).prop_map(Op::Settle),
            1 => Just(Op::Discard),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// pushed = sent + dropped + held after every step, the media bound never passed,
        /// and `stop` never lost while the link lives.
        #[test]
        fn the_accounts_balance_after_every_step(ops in proptest::collection::vec(op(), 1..80)) {
            let q = Queue::new(5, 2000);
            let mut taken = VecDeque::new();
            let mut written = Held::default();
            let mut stopped = false;
            let mut stop_sent = false;
            let mut discarded = false;
            for op in ops {
                match op {
                    Op::Push(k, n) => {
                        let kind = match k {
                            0 => Kind::Stop,
                            1 | 2 => Kind::Control,
                            _ => Kind::Media,
                        };
                        let pushed = q.push(frame(kind, &"x".repeat(n)));
                        stopped |= kind == Kind::Stop && pushed == Pushed::Queued;
                    }
                    Op::Take => q.take_all(&mut taken, &mut written),
                    Op::Flush(n) => {
                        for _ in 0..n.min(taken.len()) {
                            let f = taken.pop_front().unwrap();
                            stop_sent |= f.kind == Kind::Stop;
                            written.add(&f);
                        }
                    }
                    Op::Settle(lost) => {
                        // Frames a write at once left buffered are held by the queue's
                        // accounts; stand them in as the oldest of what is queued.
                        let mut gone = Held::default();
                        {
                            let mut st = q.state.lock().unwrap();
                            for _ in 0..lost {
                                let Some(pos) = st.items.iter().position(|f| f.kind == Kind::Media) else { break };
                                let f = st.items.remove(pos).unwrap();
                                st.in_socket.add(&f);
                            }
                        }
                        q.settle(&mut taken, &mut written, &mut gone);
                    }
                    Op::Discard => {
                        q.settle(&mut taken, &mut written, &mut Held::default());
                        q.discard();
                        discarded = true;
                    }
                }
                let a = q.accounts();
                proptest::prop_assert!(a.balanced(), "{a:?}");
                proptest::prop_assert!(a.held.media <= 5, "{a:?}");
            }
            // Everything the writer holds comes back; a stop pushed to a live link is there.
            q.settle(&mut taken, &mut written, &mut Held::default());
            let mut rest = VecDeque::new();
            q.take_all(&mut rest, &mut Held::default());
            if stopped && !discarded {
                proptest::prop_assert!(stop_sent || rest.iter().any(|f| f.kind == Kind::Stop));
            }
        }
    }
}
