//! One Twilio media stream, from the upgrade to the close: reads Twilio's messages, opens the
//! backend links at `start`, pushes every frame to each link's queue, and ends the call
//! cleanly whatever ends it (Twilio's `stop`, a dropped socket, idleness, every backend gone,
//! shutdown). The session never waits on a backend.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::{debug, info, warn, Instrument as _, Span};

use super::capture::{self, Capture};
use super::fanout::{self, Frame, Kind, Link, Policy};
use super::handoff::{self, Mailbox, Movable, News};
use super::quality::{self, CallQuality, TalkbackQuality, TwilioQuality};
use super::route::{self, Route};
use super::talkback::{self, TowardTwilio};
use super::watch::{Watches, Woke};
use super::wire;
use super::{Admission, CallInfo, MediaHub};
use crate::clock::unix_now;
use crate::config::WireFormat;
use crate::gate::route_token;
use crate::logging::mask_caller;
use crate::metrics::{Outcome, Rejection};
use crate::twilio::messages::{self, Event, Start};

/// WebSocket close codes (RFC 6455 section 7.4.1).
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// Pings a socket may send in a second (Twilio sends none; a client library's keep-alive one
/// every few seconds): more is a flood.
pub const PINGS_PER_SECOND: u32 = 50;

/// The most a peer's socket holds unsent (pongs, close frames, talk-back not yet taken by the
/// kernel): past it, writes fail and the peer is closed rather than buffered without end.
pub fn max_unsent(max_message_bytes: usize) -> usize {
    (1 << 20) + max_message_bytes
}

/// What ended the call, and what the Twilio side is told.
struct End {
    outcome: Outcome,
    /// The close frame to send to Twilio; `None` when its socket is already gone.
    close: Option<(u16, String)>,
}

impl End {
    fn new(outcome: Outcome, code: u16, reason: impl Into<String>) -> Self {
        End {
            outcome,
            close: Some((code, reason.into())),
        }
    }
}

/// What the session does after one message.
enum Step {
    Continue,
    End(End),
    /// Route the call: the one step that waits (on the store, and on connecting nothing: the
    /// links connect in their own tasks). Every other message is handled without an `.await`,
    /// so a media frame never sets up a future in the session's memory, which is cold since
    /// the call's last frame.
    Start(Box<Start>, Utf8Bytes),
}

/// The call once `start` has been routed. In declaration order (`repr(C)`), what every media
/// frame reads first: with [`Session::frames_in`] before it, those fit one cache line, and a
/// call's memory has gone cold in the 20 ms since its last frame.
#[repr(C)]
struct Streaming {
    links: Vec<Link>,
    /// The speaker's words on their way to the caller, when the call has a speaker.
    toward: Option<Box<TowardDrive>>,
    any_compact: bool,
    any_twilio: bool,
    any_pcm: bool,
    /// Read with every message: whether it goes to the backends now.
    phase: Phase,
    start: Box<Start>,
    /// Compact and pcm16 backends carry one track: the call's first (the caller's voice).
    caller_track: Box<str>,
    started: Instant,
    /// This call's messages on their way to a capture file, when it is captured.
    capture: Option<Box<Capture>>,
    /// What the caller's frames show.
    twilio: TwilioQuality,
    /// This frame's pcm16 frames per rate, for the links that share a resampler (kept for
    /// its capacity).
    pcm_made: Vec<(u32, Vec<Message>)>,
    /// The call as `/calls` lists it, where the quality figures are published.
    info: Arc<CallInfo>,
    /// What a hand-off needs, when `server.handoff` is on and the call has no speaker.
    movable: Option<Box<Movable>>,
    /// The wall clock at `started`, so an arrival can be told to another instance.
    started_unix_ms: u64,
}

impl Streaming {
    /// An arrival on the wall clock, in Unix milliseconds.
    fn unix_ms(&self, at: Instant) -> u64 {
        // A frame's undelayed arrival may be before the call started here (its `start` was
        // routed while frames waited).
        match at.checked_duration_since(self.started) {
            Some(after) => self.started_unix_ms + after.as_millis() as u64,
            None => self
                .started_unix_ms
                .saturating_sub(self.started.duration_since(at).as_millis() as u64),
        }
    }
}

/// Where a started call is in its life on this instance. The transitions are the methods of
/// [`Session`] that take a [`News`] or a watch; nothing else moves a call between phases.
enum Phase {
    /// Frames go to the backends.
    Live,
    /// (the new stream of a hand-off) Taking the call over from another stream: Twilio's
    /// messages are held until that stream's instance says where it stopped forwarding.
    Joining(Box<Joining>),
    /// (the old stream) Twilio is asked for a new stream; frames still go to the backends.
    Leaving(Box<Leaving>),
    /// (the old stream) The backends moved to the stream `to` and have had `stop`; Twilio's
    /// messages are dropped until it stops this stream.
    Left { to: String },
    /// (the new stream) The old instance gave the hand-off up and forwarded everything itself;
    /// this stream's messages are dropped until Twilio stops it.
    Abandoned,
}

impl Phase {
    /// Whether Twilio's messages go to the backends now.
    fn forwards(&self) -> bool {
        matches!(self, Phase::Live | Phase::Leaving(_))
    }
}

struct Joining {
    from: String,
    /// Twilio's messages since the first frame, with their arrival.
    held: std::collections::VecDeque<(Utf8Bytes, Instant)>,
    /// Takes the first frame's arrival (unix ms) to the task that notes the switch.
    first: Option<tokio::sync::oneshot::Sender<u64>>,
    mailbox: Arc<Mailbox>,
    /// Media messages held.
    frames: usize,
    /// The old stream's word, once it came: where it stopped forwarding (`None`: nowhere
    /// known). Acted on once enough frames are held to place them.
    decided: Option<Option<u64>>,
}

/// Frames a joining stream holds at least before it places them against the old stream's
/// cut: the first ones may have been read late (they wait while `start` is routed), the later
/// ones come in real time and show where in the call the stream is.
const PLACED_AFTER: usize = 12;

/// Held messages at most while joining: 2 x the hand-off timeout of both tracks is far less
/// (the oldest beyond it are dropped, and counted).
const MAX_HELD: usize = 2000;

struct Leaving {
    mailbox: Arc<Mailbox>,
    /// Takes where in the call the last forwarded frame is (its undelayed arrival, unix ms)
    /// to the hand-off's task.
    cut: Option<tokio::sync::oneshot::Sender<u64>>,
}

/// Writes the speaker's queued words to Twilio whenever its socket can take them, from the
/// session's own task: the socket is never split, and no write ever holds up a read.
struct TowardDrive {
    queue: Arc<TowardTwilio>,
    stream_sid: String,
    /// A message taken from the queue that the socket was not yet ready for, and what it
    /// means for the answer's timing once it is written.
    held: Option<(Message, Note)>,
    unflushed: bool,
    metrics: crate::metrics::LinkMetrics,
    /// How the agent's answers reach the caller.
    quality: TalkbackQuality,
}

/// What a message toward Twilio means for the talk-back figures, noted when it is written.
enum Note {
    Audio { ms: u64 },
    Mark(String),
    Clear { said: Option<Instant> },
}

impl TowardDrive {
    /// Writes what the socket takes without waiting; registers for a wake-up when there is
    /// more to write or room to write it. A failed write is left for the read side to see.
    fn drive<S>(&mut self, socket: &mut S, cx: &mut std::task::Context<'_>)
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        use std::task::Poll;
        loop {
            // Only what the socket has taken leaves the queue: while a write waits on the
            // kernel, the speaker's words stay where their bounds are.
            if self.unflushed {
                match Pin::new(&mut *socket).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(_)) | Poll::Pending => return,
                }
            }
            if self.held.is_none() {
                match self.queue.poll_next_since(cx) {
                    Poll::Ready((said, since)) => {
                        let note = match &said {
                            // Mu-law is 8 bytes a millisecond; base64 is 4 characters for 3.
                            talkback::Said::Media(p) => Note::Audio {
                                ms: (p.len() / 4 * 3 / 8) as u64,
                            },
                            talkback::Said::Mark(name) => Note::Mark(name.clone()),
                            talkback::Said::Clear => Note::Clear { said: since },
                        };
                        let text = talkback::to_twilio(said, &self.stream_sid);
                        self.held = Some((Message::Text(text.into()), note));
                    }
                    Poll::Pending => return,
                }
            }
            match Pin::new(&mut *socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let Some((message, note)) = self.held.take() else {
                        return;
                    };
                    if Pin::new(&mut *socket).start_send(message).is_err() {
                        return;
                    }
                    self.metrics.talkback_out.inc();
                    self.unflushed = true;
                    let now = Instant::now();
                    let histograms = &self.metrics.quality;
                    match note {
                        Note::Audio { ms } => self.quality.audio(ms, now, histograms),
                        Note::Mark(name) => self.quality.mark_sent(name, now),
                        Note::Clear { said } => self.quality.cleared(said, now, histograms),
                    }
                }
                Poll::Ready(Err(_)) | Poll::Pending => return,
            }
        }
    }
}

/// The next message from Twilio, writing the speaker's words while waiting for it.
fn next_from_twilio<'a, S>(
    socket: &'a mut S,
    toward: Option<&'a mut TowardDrive>,
) -> impl std::future::Future<Output = Option<Result<Message, tungstenite::Error>>> + 'a
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    let mut toward = toward;
    std::future::poll_fn(move |cx| {
        if let Some(drive) = toward.as_deref_mut() {
            drive.drive(socket, cx);
        }
        Pin::new(&mut *socket).poll_next(cx)
    })
}

/// What a session waits for besides Twilio's next message (see [`Watches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    Shutdown,
    /// Time to check for idleness and report the frame count.
    Tick,
    StartDeadline,
    LinksChanged,
    /// The grace period after every backend gave up has run out.
    BackendsGone,
    /// A drain asks this call to move to another instance.
    MoveNow,
    /// A hand-off's task has news.
    Handoff,
    /// The backends moved long enough ago: the old stream is closed from this side.
    LeftDeadline,
}

/// `repr(C)`, aligned to a cache line: the fields every media frame touches come first (see
/// [`Streaming`]).
#[repr(C, align(64))]
struct Session {
    frames_in: u64,
    streaming: Option<Streaming>,
    hub: Arc<MediaHub>,
    admission: Admission,
    links_changed: Arc<Notify>,
    frames_in_reported: u64,
    /// A media payload too big for the stack, decoded (kept for its capacity).
    decoded: Vec<u8>,
    /// Reasons already logged for this call: each is logged once and counted always, so a
    /// misbehaving peer cannot flood the log at 50 messages a second.
    logged: u32,
    /// Watches a step asked for, added by the loop after the step.
    asks: Vec<(WatchFuture, Watch)>,
}

type WatchFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs the session for an accepted upgrade. Generic over the socket: the service hands it
/// the upgraded TCP socket, the unit tests below a pair of channels under paused time.
pub async fn run<S>(hub: Arc<MediaHub>, admission: Admission, mut socket: S)
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin
        + Send,
{
    let settings = hub.settings.clone();
    let mut session = Session {
        hub: hub.clone(),
        admission,
        streaming: None,
        links_changed: Arc::new(Notify::new()),
        frames_in: 0,
        frames_in_reported: 0,
        decoded: Vec::new(),
        logged: 0,
        asks: Vec::new(),
    };

    let idle_timeout = settings.idle_timeout();
    let tick_every = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let grace = Duration::from_millis(settings.media.all_backends_gone_grace_ms);
    // A socket that never starts a stream would hold a call slot for nothing.
    let start_timeout = Duration::from_millis(settings.media.start_timeout_ms);

    // A child of the service's token, so that cancelling reaches this session alone through
    // its own node.
    let mut watches = Watches::<Watch>::default();
    watches.add(
        hub.shutdown_token().child_token().cancelled_owned(),
        Watch::Shutdown,
    );
    watches.add(tokio::time::sleep(tick_every), Watch::Tick);
    watches.add(tokio::time::sleep(start_timeout), Watch::StartDeadline);
    watches.add(
        session.links_changed.clone().notified_owned(),
        Watch::LinksChanged,
    );
    let mut backends_gone = false;

    // The runtime's clock, so paused-time tests can drive the idle timeout.
    let mut last_activity = tokio::time::Instant::now();
    let mut frames_at_tick = 0u64;
    // Twilio's messages only: pings and pongs are not a stream's activity.
    let mut messages = 0u64;
    let mut pings = super::talkback::FloodMeter::new(PINGS_PER_SECOND, usize::MAX);

    let end = loop {
        let woke = watches
            .beside(next_from_twilio(
                &mut socket,
                session
                    .streaming
                    .as_mut()
                    .and_then(|c| c.toward.as_deref_mut()),
            ))
            .await;
        match woke {
            Woke::Watch(watch) => match watch {
                Watch::Shutdown => {
                    break End::new(
                        Outcome::shutdown,
                        close::GOING_AWAY,
                        "service shutting down",
                    );
                }
                Watch::Tick => {
                    let now = tokio::time::Instant::now();
                    if messages != frames_at_tick {
                        frames_at_tick = messages;
                        last_activity = now;
                    } else if now.duration_since(last_activity) >= idle_timeout {
                        warn!(
                            fault = "twilio",
                            idle_ms = idle_timeout.as_millis() as u64,
                            "stream idle; closing"
                        );
                        break End::new(
                            Outcome::idle_timeout,
                            close::NORMAL,
                            "idle timeout: no message received",
                        );
                    }
                    session.report_frames();
                    session.publish_quality();
                    watches.add(tokio::time::sleep(tick_every), Watch::Tick);
                }
                Watch::StartDeadline => {
                    if session.streaming.is_none() {
                        warn!(
                            fault = "twilio",
                            start_timeout_ms = start_timeout.as_millis() as u64,
                            "no start message in time; closing"
                        );
                        break End::new(
                            Outcome::start_timeout,
                            close::POLICY,
                            "no start message in time",
                        );
                    }
                }
                Watch::LinksChanged => {
                    watches.add(
                        session.links_changed.clone().notified_owned(),
                        Watch::LinksChanged,
                    );
                    if !backends_gone && session.all_links_gone() {
                        backends_gone = true;
                        warn!(
                            grace_ms = grace.as_millis() as u64,
                            fault = "backend",
                            "every backend is gone; closing the stream after the grace period"
                        );
                        watches.add(tokio::time::sleep(grace), Watch::BackendsGone);
                    }
                }
                Watch::BackendsGone => {
                    break End::new(
                        Outcome::backends_gone,
                        close::INTERNAL,
                        "every backend of this call is gone",
                    );
                }
                Watch::MoveNow => {
                    session.begin_leaving();
                    session.add_asked(&mut watches);
                }
                Watch::Handoff => {
                    let ended = session.on_handoff_news();
                    session.add_asked(&mut watches);
                    if let Some(end) = ended {
                        break end;
                    }
                }
                Watch::LeftDeadline => {
                    break End::new(
                        Outcome::handed_off,
                        close::NORMAL,
                        "the call moved to another stream",
                    );
                }
            },
            Woke::Busy(incoming) => {
                let step = match incoming {
                    None => {
                        debug!("Twilio closed the socket");
                        Step::End(End {
                            outcome: Outcome::twilio_closed,
                            close: None,
                        })
                    }
                    Some(Ok(Message::Text(text))) => {
                        messages += 1;
                        match session.on_text(text) {
                            Step::Start(start, raw) => {
                                let step = session.on_start(start, raw).await;
                                session.add_asked(&mut watches);
                                step
                            }
                            step => step,
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        warn!(fault = "twilio", "binary frame on a media stream; closing");
                        Step::End(End::new(
                            Outcome::protocol_error,
                            close::UNSUPPORTED,
                            "binary frames are not part of the Media Streams protocol",
                        ))
                    }
                    Some(Ok(Message::Close(_))) => Step::End(End {
                        outcome: Outcome::twilio_closed,
                        close: None,
                    }),
                    Some(Ok(Message::Ping(_))) => {
                        // Every ping queues a pong toward a peer that may not read them: a
                        // flood is closed, not answered without end.
                        if pings.over(0) {
                            warn!(
                                fault = "twilio",
                                max_per_second = PINGS_PER_SECOND,
                                "ping flood on the media stream; closing"
                            );
                            Step::End(End::new(
                                Outcome::protocol_error,
                                close::POLICY,
                                "too many pings",
                            ))
                        } else {
                            Step::Continue
                        }
                    }
                    Some(Ok(_)) => Step::Continue,
                    Some(Err(e)) => Step::End(read_error(e, settings.media.max_message_bytes)),
                };
                if let Step::End(end) = step {
                    break end;
                }
            }
        }
    };
    session.finish(end, &mut socket).await;
}

fn read_error(e: tungstenite::Error, limit: usize) -> End {
    if let tungstenite::Error::Capacity(cap) = &e {
        warn!(fault = "twilio", error = %cap, limit, "message over the size limit; closing");
        return End::new(
            Outcome::protocol_error,
            close::TOO_BIG,
            format!("message over the {limit}-byte limit"),
        );
    }
    info!(fault = "twilio", error = %e, "Twilio socket failed");
    End {
        outcome: Outcome::twilio_closed,
        close: None,
    }
}

impl Session {
    fn on_text(&mut self, text: Utf8Bytes) -> Step {
        let event = match messages::parse(text.as_str()) {
            Ok(event) => event,
            Err(e) => {
                self.reject(Rejection::malformed_json, &e);
                return Step::Continue;
            }
        };
        if let Some(capture) = self
            .streaming
            .as_mut()
            .and_then(|c| c.capture.as_deref_mut())
        {
            capture.message(text.as_str());
        }
        if matches!(event, Event::Media(_)) {
            self.frames_in += 1;
        }
        if self.streaming.as_ref().is_some_and(|c| !c.phase.forwards()) {
            if let Some(step) = self.not_forwarding(&event, &text) {
                return step;
            }
        }
        self.dispatch(&text, event, None)
    }

    /// A message while the call is not forwarding: held while joining, dropped once moved.
    fn not_forwarding(&mut self, event: &Event<'_>, text: &Utf8Bytes) -> Option<Step> {
        // Twilio stops a joining stream whose cut is known: what it held after the cut goes
        // to the backends before their `stop`.
        if let (
            Some(Streaming {
                phase: Phase::Joining(join),
                ..
            }),
            Event::Stop(_),
        ) = (&self.streaming, event)
        {
            if let Some(after) = join.decided {
                self.joined(after);
            }
            return None;
        }
        let call = self.streaming.as_mut()?;
        let held = matches!(event, Event::Media(_) | Event::Dtmf(_) | Event::Mark(_));
        let now = Instant::now();
        let now_ms = call.unix_ms(now);
        match &mut call.phase {
            Phase::Joining(join) if held => {
                if let (Event::Media(_), Some(first)) = (event, join.first.take()) {
                    let _ = first.send(now_ms);
                }
                if join.held.len() == MAX_HELD {
                    join.held.pop_front();
                    self.hub.metrics.rejected(Rejection::held_too_long);
                }
                join.held.push_back((text.clone(), now));
                join.frames += usize::from(matches!(event, Event::Media(_)));
                if let Some(after) = join.decided.filter(|_| join.frames >= PLACED_AFTER) {
                    self.joined_live(after);
                }
                Some(Step::Continue)
            }
            Phase::Left { .. } | Phase::Abandoned if held => Some(Step::Continue),
            Phase::Left { .. } if matches!(event, Event::Stop(_)) => Some(Step::End(End::new(
                Outcome::handed_off,
                close::NORMAL,
                "stream stopped",
            ))),
            _ => None,
        }
    }

    /// Handles one of Twilio's messages; `arrived` is when a held one came (else now).
    fn dispatch(&mut self, text: &Utf8Bytes, event: Event<'_>, arrived: Option<Instant>) -> Step {
        match event {
            Event::Media(media) => {
                let Some(call) = &mut self.streaming else {
                    self.reject(Rejection::media_before_start, "media before start");
                    return Step::Continue;
                };
                // Compact and pcm16 backends carry one track: the caller's voice.
                let is_caller = *media.track == *call.caller_track;
                let callers = (call.any_compact || call.any_pcm) && is_caller;
                // Every payload is checked to be base64; it is decoded, once, only when a
                // backend takes its audio (or a voice agent's answers are timed from the
                // caller's speech). An ordinary frame decodes on the stack, which is warm; a
                // buffer of the call's own would be memory gone cold since its last frame.
                let mut stack;
                let decoded = if callers || (is_caller && call.toward.is_some()) {
                    stack = [0u8; wire::STACK_PAYLOAD];
                    wire::decode_payload(&media.payload, &mut stack, &mut self.decoded)
                } else {
                    wire::is_base64(&media.payload).then_some(&[][..])
                };
                let Some(decoded) = decoded else {
                    self.reject(Rejection::invalid_payload, "media payload is not base64");
                    return Step::Continue;
                };
                let now = arrived.unwrap_or_else(Instant::now);
                if is_caller {
                    call.twilio.frame(&media.chunk, &media.timestamp, now);
                    if let Some(toward) = call.toward.as_deref_mut() {
                        if quality::is_speech(decoded) {
                            toward.quality.caller_spoke = Some(now);
                        }
                    }
                }
                let twilio = call.any_twilio.then(|| wire::forward(text));
                let compact = (call.any_compact && callers)
                    .then(|| wire::compact_payload(&media.payload, decoded))
                    .flatten()
                    .map(|payload| wire::compact_media(&payload));
                let audio = (call.any_pcm && callers)
                    .then(|| wire::caller_audio(&media.payload, decoded))
                    .flatten();
                let media = |message| Frame {
                    kind: Kind::Media,
                    message,
                    received: now,
                };
                // pcm16 frames are made once per rate: the first link at a rate holds the
                // resampler, the others at that rate get the same frames.
                let mut made = std::mem::take(&mut call.pcm_made);
                made.clear();
                for link in &mut call.links {
                    let message = match link.format {
                        WireFormat::Twilio => twilio.clone(),
                        WireFormat::Compact => compact.clone(),
                        WireFormat::Pcm16 => {
                            let Some(audio) = &audio else { continue };
                            if let Some(mut pcm) = link.pcm.take() {
                                let mut frames = Vec::new();
                                pcm.frames(audio, |message| {
                                    frames.push(message.clone());
                                    link.push(media(message))
                                });
                                made.push((pcm.rate(), frames));
                                link.pcm = Some(pcm);
                            } else if let Some((_, frames)) =
                                made.iter().find(|(rate, _)| *rate == link.pcm_rate)
                            {
                                for message in frames {
                                    link.push(media(message.clone()));
                                }
                            }
                            None
                        }
                    };
                    if let Some(message) = message {
                        link.push(media(message));
                    }
                }
                call.pcm_made = made;
                Step::Continue
            }
            Event::Start(start) => {
                if self.streaming.is_some() {
                    self.reject(
                        Rejection::duplicate_start,
                        "second start on one stream ignored",
                    );
                    return Step::Continue;
                }
                Step::Start(start, text.clone())
            }
            Event::Dtmf(dtmf) => {
                // Every backend hears the keypad, in its own format.
                if let Some(call) = &mut self.streaming {
                    push_control(&mut call.links, Kind::Control, |link| {
                        Some(wire::dtmf(link.format, text, &dtmf.digit))
                    });
                }
                Step::Continue
            }
            Event::Mark(mark) => {
                // Twilio echoes a mark once it has played the audio before it: that is news
                // for the backend that sent the mark, the speaker, and for no one else.
                if let Some(call) = &mut self.streaming {
                    if let Some(toward) = call.toward.as_deref_mut() {
                        toward
                            .quality
                            .mark_echoed(&mark.name, &self.hub.metrics.quality);
                    }
                    push_control(&mut call.links, Kind::Control, |link| {
                        link.speaks
                            .then(|| wire::mark(link.format, text, &mark.name))
                    });
                }
                Step::Continue
            }
            Event::Stop(_) => {
                if let Some(call) = &mut self.streaming {
                    push_control(&mut call.links, Kind::Stop, |link| {
                        Some(wire::stop(link.format, text))
                    });
                }
                Step::End(End::new(
                    Outcome::completed,
                    close::NORMAL,
                    "stream stopped",
                ))
            }
            Event::Connected(c) => {
                debug!(protocol = %c.protocol, version = %c.version, "Twilio connected");
                Step::Continue
            }
            Event::Unknown(name) => {
                self.reject(
                    Rejection::unknown_event,
                    format!("unknown event `{}` skipped", crate::logging::escape(&name)),
                );
                Step::Continue
            }
        }
    }

    async fn on_start(&mut self, start: Box<Start>, raw: Utf8Bytes) -> Step {
        let span = Span::current();
        span.record("call_sid", start.call_sid.as_str());
        span.record("stream_sid", start.stream_sid.as_str());
        // Reached an instance, whatever happens next: Twilio's reports on it say so.
        self.hub.stream_arrived(&start.stream_sid);
        let caller = start
            .param("callerId")
            .or_else(|| start.param("from"))
            .map(str::to_string);
        if let Some(caller) = &caller {
            span.record(
                "caller",
                tracing::field::display(mask_caller(caller, self.hub.settings.log.mask_callers)),
            );
        }

        let token = match self.verify_token(&start).await {
            Ok(token) => token,
            Err(refused) => return refused,
        };
        if let (Some(claims), None) = (&token, &caller) {
            span.record(
                "caller",
                tracing::field::display(mask_caller(
                    &claims.caller,
                    self.hub.settings.log.mask_callers,
                )),
            );
        }
        let caller = caller.or_else(|| token.as_ref().map(|c| c.caller.clone()));

        let limits = route::Limits {
            max_backends: self.hub.settings.media.max_backends_per_call,
            own: self.hub.local_addr(),
        };
        let route = match route::choose(&start, &self.hub.settings.backends, token.as_ref(), limits)
        {
            Ok(route) => route,
            Err(e) => {
                let outcome = match e {
                    route::RouteError::NotAllowed(_) | route::RouteError::OtherCaller => {
                        self.hub.metrics.route_token_failures.inc();
                        Outcome::refused_route_token
                    }
                    route::RouteError::NoneUsable(ref entries) => {
                        for _ in entries {
                            self.hub.metrics.rejected(Rejection::backend_entry);
                        }
                        Outcome::refused_no_backend
                    }
                    route::RouteError::NoBackend => Outcome::refused_no_backend,
                };
                warn!(fault = "twilio", error = %e, "stream refused");
                return Step::End(End::new(outcome, close::POLICY, e.to_string()));
            }
        };
        // Used up only now that nothing else refuses the stream.
        if let (Some(raw), Some(claims)) = (start.param("routeToken"), &token) {
            if let Err(e) =
                route_token::claim(self.hub.store.as_ref(), raw, claims, unix_now()).await
            {
                return self.token_refused(e);
            }
        }
        let Route {
            source,
            targets,
            skipped,
        } = route;
        for why in &skipped {
            warn!(fault = "twilio", "{why}");
            self.hub.metrics.rejected(Rejection::backend_entry);
        }

        let policy = self.link_policy();
        // The route leaves at most one speaker; its words reach the caller through this.
        let toward = targets.iter().find(|t| t.speaks).map(|t| {
            (
                Arc::new(TowardTwilio::new(self.hub.settings.media.talkback_queue_ms)),
                self.hub.metrics.link(&t.metrics_label),
            )
        });
        // A hand-off token: this stream takes the call over from another one.
        let joining_from = token.as_ref().and_then(|c| c.handoff_of.clone());
        let mut descriptors = self.admission.descriptors_for(targets.len()).into_iter();
        let links: Vec<Link> = targets
            .iter()
            .map(|t| {
                fanout::spawn(
                    t,
                    fanout::Opening {
                        endpoint: self.hub.endpoint(t),
                        start: match &joining_from {
                            Some(from) => wire::handoff_start(t.format, &raw, t.sample_rate, from),
                            None => wire::start(t.format, &raw, t.sample_rate),
                        },
                        toward: toward
                            .as_ref()
                            .filter(|_| t.speaks)
                            .map(|(queue, _)| queue.clone()),
                        descriptor: descriptors.next(),
                    },
                    policy.clone(),
                    self.hub.metrics.link(&t.metrics_label),
                    self.links_changed.clone(),
                    self.hub.tracker(),
                )
            })
            .collect();
        let mut links = links;
        share_resamplers(&mut links);
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let captures = &self.hub.settings.media.capture;
        let capture = capture::chosen(captures, names.iter().copied()).then(|| {
            Box::new(Capture::begin(
                captures,
                &start,
                raw.as_str(),
                self.hub.tracker(),
            ))
        });
        info!(backends = ?names, source = ?source, tracks = ?start.tracks, captured = capture.is_some(), "stream started");

        let movable = (self.hub.mover().is_some() && toward.is_none())
            .then(|| movable(&targets, caller.clone()));
        let execution_id = start.param("executionId").map(str::to_string);
        let info = Arc::new(CallInfo {
            call_sid: start.call_sid.clone(),
            stream_sid: start.stream_sid.clone(),
            caller,
            execution_id,
            started_at: SystemTime::now(),
            links: links.iter().map(|l| l.shared.clone()).collect(),
            quality: Default::default(),
            move_now: Default::default(),
            handoff: Default::default(),
        });
        self.hub.register(&self.admission, info.clone());
        let phase = match joining_from {
            Some(from) => self.begin_joining(from, &start.stream_sid, &info),
            None => Phase::Live,
        };
        if movable.is_some() {
            self.watch_for_moves(&info);
        }
        let caller_track = start
            .tracks
            .first()
            .map(|t| t.trim_end_matches("_track"))
            .unwrap_or("inbound")
            .into();
        self.streaming = Some(Streaming {
            any_compact: links.iter().any(|l| l.format == WireFormat::Compact),
            any_twilio: links.iter().any(|l| l.format == WireFormat::Twilio),
            any_pcm: links.iter().any(|l| l.format == WireFormat::Pcm16),
            toward: toward.map(|(queue, metrics)| {
                Box::new(TowardDrive {
                    queue,
                    stream_sid: start.stream_sid.clone(),
                    held: None,
                    unflushed: false,
                    metrics,
                    quality: TalkbackQuality::default(),
                })
            }),
            caller_track,
            links,
            start,
            started: Instant::now(),
            capture,
            twilio: TwilioQuality::default(),
            pcm_made: Vec::new(),
            info,
            phase,
            movable,
            started_unix_ms: crate::clock::unix_now_ms(),
        });
        Step::Continue
    }

    /// The new stream of a hand-off: a task notes the switch at its first frame and waits for
    /// the old stream's cut; until then its messages are held.
    fn begin_joining(&mut self, from: String, stream_sid: &str, info: &CallInfo) -> Phase {
        let mailbox = Arc::new(Mailbox::default());
        let (first, arrival) = tokio::sync::oneshot::channel();
        self.hub.tracker().spawn(
            handoff::join(
                self.hub.clone(),
                from.clone(),
                stream_sid.to_string(),
                arrival,
                mailbox.clone(),
            )
            .instrument(Span::current()),
        );
        self.asks.push((Box::pin(mailbox.rung()), Watch::Handoff));
        info.set_handoff(Some(format!(
            "moving in from {}",
            crate::logging::escape(&from)
        )));
        info!(from = %crate::logging::escape(&from), "hand-off: this stream takes the call over");
        Phase::Joining(Box::new(Joining {
            from,
            held: Default::default(),
            first: Some(first),
            mailbox,
            frames: 0,
            decided: None,
        }))
    }

    /// A movable call waits for a drain to ask it to move; one that starts during a drain is
    /// asked at once.
    fn watch_for_moves(&mut self, info: &CallInfo) {
        self.asks.push((
            Box::pin(info.move_now.clone().notified_owned()),
            Watch::MoveNow,
        ));
        if self.hub.is_draining() {
            info.move_now.notify_one();
        }
    }

    /// Adds the watches the last step asked for.
    fn add_asked(&mut self, watches: &mut Watches<Watch>) {
        for (future, watch) in self.asks.drain(..) {
            watches.add(future, watch);
        }
    }

    /// A drain asks the call to move: Twilio is asked for a new stream on it, by a task of
    /// its own, while the frames go on to the backends. Only a live, movable call moves; one
    /// still joining moves once it has joined.
    fn begin_leaving(&mut self) {
        let hub = self.hub.clone();
        let Some(call) = &mut self.streaming else {
            return;
        };
        let Some(movable) = call.movable.as_deref().cloned() else {
            return;
        };
        if !matches!(call.phase, Phase::Live) {
            return;
        }
        let mailbox = Arc::new(Mailbox::default());
        let (cut, told) = tokio::sync::oneshot::channel();
        let start = Arc::new((*call.start).clone());
        hub.tracker().spawn(
            handoff::leave(hub.clone(), start, movable, mailbox.clone(), told)
                .instrument(Span::current()),
        );
        self.asks.push((Box::pin(mailbox.rung()), Watch::Handoff));
        call.phase = Phase::Leaving(Box::new(Leaving {
            mailbox,
            cut: Some(cut),
        }));
        call.info
            .set_handoff(Some("moving to another instance".into()));
        info!("hand-off: asking Twilio for a new stream on the call");
    }

    /// What a hand-off's task said, and the call's next phase; an end when there is one.
    fn on_handoff_news(&mut self) -> Option<End> {
        let call = self.streaming.as_mut()?;
        let news = match &call.phase {
            Phase::Joining(join) => join.mailbox.take(),
            Phase::Leaving(leaving) => leaving.mailbox.take(),
            _ => None,
        }?;
        match news {
            News::Switch { to } => {
                // Where in the call the last forwarded frame is: its undelayed arrival.
                let last = call.unix_ms(call.twilio.last_position().unwrap_or(call.started));
                if let Phase::Leaving(leaving) = &mut call.phase {
                    if let Some(cut) = leaving.cut.take() {
                        let _ = cut.send(last);
                    }
                }
                let start = &call.start;
                push_control(&mut call.links, Kind::Stop, |link| {
                    Some(wire::handoff_stop(link.format, start, &to))
                });
                info!(to = %crate::logging::escape(&to), last_ms = last, "hand-off: the backends have had their last frame from this stream");
                call.info
                    .set_handoff(Some(format!("moved to {}", crate::logging::escape(&to))));
                call.phase = Phase::Left { to };
                // Twilio stops this stream at the old instance's request; if it does not, the
                // stream is closed from this side.
                let wait = Duration::from_millis(self.hub.settings.server.handoff_timeout_ms)
                    + Duration::from_secs(1);
                self.asks
                    .push((Box::pin(tokio::time::sleep(wait)), Watch::LeftDeadline));
            }
            News::Failed => {
                call.phase = Phase::Live;
                call.info.set_handoff(None);
            }
            News::Cut(after) => self.decided(Some(after)),
            News::Orphaned => self.decided(None),
            News::Abandoned => {
                info!("hand-off: the old stream kept the call; this stream's frames are dropped until Twilio stops it");
                call.phase = Phase::Abandoned;
                call.info.set_handoff(None);
            }
        }
        None
    }

    /// The old stream's word has come: acted on now, or once enough frames are held.
    fn decided(&mut self, after: Option<u64>) {
        let Some(Streaming {
            phase: Phase::Joining(join),
            ..
        }) = &mut self.streaming
        else {
            return;
        };
        if join.frames >= PLACED_AFTER {
            self.joined_live(after);
        } else {
            join.decided = Some(after);
        }
    }

    /// The new stream has the call: its held messages that arrived after the old stream's
    /// cut (all of them without one) go to the backends, and it goes on live.
    fn joined(&mut self, after: Option<u64>) {
        let Some(call) = &mut self.streaming else {
            return;
        };
        let Phase::Joining(join) = std::mem::replace(&mut call.phase, Phase::Live) else {
            return;
        };
        let from = join.from;
        call.info.set_handoff(Some(format!(
            "moved in from {}",
            crate::logging::escape(&from)
        )));
        // Where in the call each held frame is: the caller's frames are placed by Twilio's
        // timestamps from the least delayed one (a backlog read late after `start` would
        // otherwise look later than it is); anything else by its arrival.
        let caller_track = call.caller_track.clone();
        let position = |text: &Utf8Bytes| -> Option<u64> {
            match messages::parse(text.as_str()) {
                Ok(Event::Media(m)) if *m.track == *caller_track => m.timestamp.parse().ok(),
                _ => None,
            }
        };
        let timestamps: Vec<Option<u64>> =
            join.held.iter().map(|(text, _)| position(text)).collect();
        let origin = join
            .held
            .iter()
            .zip(&timestamps)
            .filter_map(|((_, at), ts)| at.checked_sub(Duration::from_millis((*ts)?)))
            .min();
        let mut repeated = 0u64;
        let mut released = 0u64;
        for ((text, at), ts) in join.held.into_iter().zip(timestamps) {
            let placed = match (origin, ts) {
                (Some(origin), Some(ts)) => origin + Duration::from_millis(ts),
                _ => at,
            };
            let placed_ms = self.streaming.as_ref().map_or(0, |c| c.unix_ms(placed));
            // Within half a frame of the cut is the same frame.
            if after.is_some_and(|cut| placed_ms <= cut + 10) {
                repeated += 1;
                continue;
            }
            if let Ok(event) = messages::parse(text.as_str()) {
                released += 1;
                let _ = self.dispatch(&text, event, Some(at));
            }
        }
        info!(
            from = %from,
            dropped = repeated,
            released,
            cut_ms = after,
            origin_ms = origin.map(|o| self.streaming.as_ref().map_or(0, |c| c.unix_ms(o))),
            "hand-off: this stream has the call"
        );
    }

    /// Joined during a drain of this instance too: the call moves on again.
    fn joined_live(&mut self, after: Option<u64>) {
        self.joined(after);
        if self.hub.is_draining() {
            self.begin_leaving();
        }
    }

    /// How this call's backend links behave: timeouts, pings, reconnects, limits.
    fn link_policy(&self) -> Policy {
        let backends = &self.hub.settings.backends;
        Policy {
            connect_timeout: Duration::from_millis(backends.connect_timeout_ms),
            write_timeout: Duration::from_millis(backends.write_timeout_ms),
            ping_interval: Duration::from_millis(backends.ping_interval_ms),
            pong_timeout: Duration::from_millis(backends.pong_timeout_ms),
            hop: self.hub.instance_id().to_string(),
            queue_bytes: backends.queue_bytes,
            reconnect_max_tries: backends.reconnect_max_tries,
            reconnect_window: Duration::from_millis(backends.reconnect_window_ms),
            max_message_bytes: self.hub.settings.media.max_message_bytes,
            max_unsolicited: (
                backends.max_unsolicited_messages_per_second,
                backends.max_unsolicited_bytes_per_second,
            ),
            max_spoken: (
                backends.max_speaker_messages_per_second,
                backends.max_speaker_bytes_per_second,
            ),
        }
    }

    /// The stream's route token, verified (not yet used up); a stream without one where one is
    /// required, or with one that does not verify, is refused.
    async fn verify_token(&mut self, start: &Start) -> Result<Option<route_token::Claims>, Step> {
        let security = &self.hub.settings.security;
        match start.param("routeToken") {
            Some(raw) => route_token::check(
                self.hub.store.as_ref(),
                security.route_token_secret.expose(),
                raw,
                &start.call_sid,
                unix_now(),
            )
            .await
            .map(Some)
            .map_err(|e| self.token_refused(e)),
            None if security.require_route_token => {
                self.hub.metrics.route_token_failures.inc();
                warn!(
                    fault = "twilio",
                    "stream refused: no route token and security.require_route_token is on"
                );
                Err(Step::End(End::new(
                    Outcome::refused_route_token,
                    close::POLICY,
                    "a route token from /validate-pin is required",
                )))
            }
            None => Ok(None),
        }
    }

    /// A stream refused for its route token: counted, logged with whose fault it is.
    fn token_refused(&self, e: route_token::TokenError) -> Step {
        self.hub.metrics.route_token_failures.inc();
        let fault = match e {
            route_token::TokenError::Unavailable(_) => "store",
            _ => "twilio",
        };
        warn!(fault, error = %e, "stream refused");
        Step::End(End::new(
            Outcome::refused_route_token,
            close::POLICY,
            e.to_string(),
        ))
    }

    /// Logs a skipped message once per reason per call, and counts every one.
    fn reject(&mut self, reason: Rejection, detail: impl std::fmt::Display) {
        self.hub.metrics.rejected(reason);
        let bit = 1u32 << (reason as u32);
        if self.logged & bit == 0 {
            self.logged |= bit;
            warn!(fault = "twilio", reason = ?reason, "{detail}; skipped (further ones on this call are counted, not logged)");
        }
    }

    /// The call's quality figures, for `/calls` and the page.
    fn publish_quality(&self) {
        if let Some(call) = &self.streaming {
            let now = CallQuality {
                twilio: call.twilio.view(),
                talkback: call.toward.as_ref().map(|t| t.quality.view()),
            };
            *call.info.quality.lock().unwrap_or_else(|e| e.into_inner()) = now;
        }
    }

    fn report_frames(&mut self) {
        let new = self.frames_in - self.frames_in_reported;
        if new > 0 {
            self.hub.metrics.frames_in.inc_by(new);
            self.frames_in_reported = self.frames_in;
        }
    }

    fn all_links_gone(&self) -> bool {
        self.streaming
            .as_ref()
            .is_some_and(|c| c.links.iter().all(|l| l.shared.is_gone()))
    }

    /// Ends the call: `stop` to every backend that did not get Twilio's, the Twilio socket
    /// closed with a reason, backends given a bounded time to take their last frames.
    async fn finish<S>(mut self, end: End, socket: &mut S)
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin
            + Send,
    {
        let mut end = end;
        // A stream that ends while it holds frames the old one did not forward (its cut known,
        // too few frames yet to place them by) gives them to the backends before their `stop`.
        if let Some(Streaming {
            phase: Phase::Joining(join),
            ..
        }) = &self.streaming
        {
            if let Some(after) = join.decided {
                self.joined(after);
            }
        }
        // A call whose backends moved ended here by moving, however the old stream closed.
        let moved_to = match self.streaming.as_ref().map(|c| &c.phase) {
            Some(Phase::Left { to }) => Some(to.clone()),
            _ => None,
        };
        if moved_to.is_some() {
            end.outcome = Outcome::handed_off;
        }
        self.report_frames();
        self.publish_quality();
        if let Some(call) = &mut self.streaming {
            call.links.iter_mut().for_each(Link::flush_metrics);
            let histograms = &self.hub.metrics.quality;
            call.twilio.observe(histograms);
            if let Some(toward) = &call.toward {
                toward.quality.observe(histograms);
            }
            if let Some(lost) = call.capture.take().map(|c| c.dropped).filter(|n| *n > 0) {
                warn!(lines = lost, "the disk did not keep up with the call's capture; some messages are missing from it");
                self.hub.metrics.capture_lines_dropped.inc_by(lost);
            }
        }
        self.hub.metrics.call_ended(end.outcome);
        // The call's outcome on its span, for the operators' tracing tool (OTLP): an error
        // there is a call that did not end as the caller or Twilio ended it.
        let span = Span::current();
        span.record("outcome", tracing::field::debug(end.outcome));
        if !matches!(end.outcome, Outcome::completed | Outcome::twilio_closed) {
            span.record("otel.status_code", "error");
        }
        if let Some((code, reason)) = &end.close {
            let frame = CloseFrame {
                code: (*code).into(),
                reason: truncate_reason(reason).into(),
            };
            let closing = async {
                socket.send(Message::Close(Some(frame))).await?;
                // Give the peer a moment to answer the close; never wait on it for long.
                while let Some(Ok(message)) = socket.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<_, tungstenite::Error>(())
            };
            let _ = tokio::time::timeout(Duration::from_millis(500), closing).await;
        }

        if let Some(mut call) = self.streaming.take() {
            // The backends of a call that moved have had their `stop` (with `handedOffTo`).
            if end.outcome != Outcome::completed && moved_to.is_none() {
                let start = &call.start;
                push_control(&mut call.links, Kind::Stop, |link| {
                    Some(wire::synthetic_stop(link.format, start))
                });
            }
            let backends = &self.hub.settings.backends;
            let drain = Duration::from_millis(backends.drain_timeout_ms);
            let aborts: Vec<_> = call.links.iter().map(|l| l.task.abort_handle()).collect();
            let queues: Vec<_> = call.links.iter().map(|l| l.shared.clone()).collect();
            let mut writers =
                futures_util::future::join_all(call.links.iter_mut().map(|l| &mut l.task));
            if tokio::time::timeout(drain, &mut writers).await.is_err() {
                // Time is up: a link that is reconnecting stops (a new connection now would
                // be a `start` with no `stop`), a connected one sends what is left but media.
                warn!(
                    fault = "backend",
                    drain_ms = drain.as_millis() as u64,
                    "a backend did not take the end of the call in time; its last media is dropped"
                );
                for link in &queues {
                    link.queue.give_up();
                }
                // A backend that takes not even `stop` within the write deadline is cut off.
                let last = Duration::from_millis(backends.write_timeout_ms);
                if tokio::time::timeout(last, &mut writers).await.is_err() {
                    aborts.iter().for_each(|a| a.abort());
                }
            }
            // After the links are done, so the recent call's counts are their last ones.
            self.hub.record_ended(&self.admission, end.outcome);
            info!(
                outcome = ?end.outcome,
                frames_in = self.frames_in,
                seconds = call.started.elapsed().as_secs_f32(),
                moved_to = moved_to
                    .as_deref()
                    .map(|t| tracing::field::display(crate::logging::escape(t))),
                "call ended"
            );
        } else {
            info!(outcome = ?end.outcome, "stream ended before start");
        }
    }
}

/// What a call needs to move (`server.handoff`): the backends it has, whose call it is. Only
/// a call without a speaking backend moves: Twilio cannot restart a `<Connect><Stream>` by
/// REST.
fn movable(targets: &[route::Target], caller: Option<String>) -> Box<Movable> {
    let names = |table: bool| -> Vec<String> {
        targets
            .iter()
            .filter(|t| t.from_table == table)
            .map(|t| t.name.clone())
            .collect()
    };
    Box::new(Movable {
        backend_ids: names(true),
        backend_hosts: names(false),
        caller,
    })
}

/// One resampler per rate: each holds some 20 KiB of state and costs an FFT a frame, and
/// links at the same rate would compute the same frames.
fn share_resamplers(links: &mut [Link]) {
    let mut rates = Vec::new();
    for link in links {
        match link.pcm.as_ref().map(|p| p.rate()) {
            Some(rate) if rates.contains(&rate) => link.pcm = None,
            Some(rate) => rates.push(rate),
            None => {}
        }
    }
}

/// Pushes a control message (never dropped) to every link that wants one in its format.
fn push_control(links: &mut [Link], kind: Kind, message_for: impl Fn(&Link) -> Option<Message>) {
    let now = Instant::now();
    for link in links {
        if let Some(message) = message_for(link) {
            link.push(Frame {
                kind,
                message,
                received: now,
            });
        }
    }
}

/// Close reasons are limited to 123 bytes by the protocol.
fn truncate_reason(reason: &str) -> String {
    if reason.len() <= 123 {
        return reason.to_string();
    }
    let mut end = 120;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_the_protocol() {
        let long = "é".repeat(100);
        let r = truncate_reason(&long);
        assert!(r.len() <= 123);
        assert!(r.ends_with("..."));
        assert_eq!(truncate_reason("short"), "short");
    }

    /// A socket made of two channels: what the test sends, and what the session answers.
    struct Channel {
        incoming: tokio::sync::mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
        outgoing: tokio::sync::mpsc::UnboundedSender<Message>,
    }

    impl Stream for Channel {
        type Item = Result<Message, tungstenite::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    impl Sink<Message> for Channel {
        type Error = tungstenite::Error;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn start_send(self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.outgoing
                .send(item)
                .map_err(|_| tungstenite::Error::ConnectionClosed)
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    type Sent = tokio::sync::mpsc::UnboundedSender<Result<Message, tungstenite::Error>>;
    type Answers = tokio::sync::mpsc::UnboundedReceiver<Message>;

    fn session(
        settings: crate::config::Settings,
    ) -> (Arc<MediaHub>, tokio::task::JoinHandle<()>, Sent, Answers) {
        let settings = Arc::new(settings);
        let hub = MediaHub::new(
            settings,
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(crate::store::MemoryStore::new()),
        )
        .expect("the demo backends are valid");
        let admission = hub.admit().expect("a free slot");
        let (to_session, incoming) = tokio::sync::mpsc::unbounded_channel();
        let (outgoing, answers) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(hub.clone(), admission, Channel { incoming, outgoing }));
        (hub, task, to_session, answers)
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_never_starts_is_closed_at_the_deadline_whatever_it_sends() {
        let (hub, task, tx, mut answers) = session(crate::config::Settings::defaults());
        assert_eq!(hub.live_calls(), 1);
        // Pings, and even Twilio's `connected`, do not start a stream.
        tx.send(Ok(Message::Text(
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into(),
        )))
        .unwrap();
        for _ in 0..49 {
            tx.send(Ok(Message::Ping(vec![1].into()))).unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!(answers.try_recv().is_err(), "nothing before the deadline");
        assert!(!task.is_finished());
        tokio::time::advance(Duration::from_millis(150)).await;
        let Some(Message::Close(Some(frame))) = answers.recv().await else {
            panic!("a close frame")
        };
        assert_eq!(u16::from(frame.code), close::POLICY);
        assert!(frame.reason.contains("no start"), "{}", frame.reason);
        drop(tx);
        task.await.unwrap();
        assert_eq!(hub.live_calls(), 0, "the slot is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn pings_do_not_keep_a_started_stream_alive() {
        let mut settings = crate::config::Settings::defaults();
        // Shorter than the time a backend that is not there takes to count as gone.
        settings.media.idle_timeout_ms = 3000;
        // The demo speaker's backend, moved to a port this test holds without listening, so
        // every connect is refused whatever else runs on the machine (the walk-through's own
        // local-speaker may have the default port).
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        settings.backends.table.get_mut("speaker").unwrap().url =
            format!("ws://127.0.0.1:{port}/media");
        let (hub, task, tx, mut answers) = session(settings);
        let start = crate::twilio::messages::outbound::start(
            1,
            &crate::twilio::messages::outbound::StartInfo {
                account_sid: "AC1",
                call_sid: "CA1",
                stream_sid: "MZ1",
                tracks: &["inbound"],
                custom_parameters: &Default::default(),
            },
        );
        tx.send(Ok(Message::Text(start.into()))).unwrap();
        let idle = hub.settings.idle_timeout();
        let began = tokio::time::Instant::now();
        let frame = loop {
            tx.send(Ok(Message::Ping(vec![1].into()))).unwrap();
            // Paused time moves on by itself while everything waits.
            if let Ok(Some(Message::Close(frame))) =
                tokio::time::timeout(Duration::from_millis(500), answers.recv()).await
            {
                break frame.expect("a close frame");
            }
            assert!(began.elapsed() < idle * 2, "pings kept the stream open");
        };
        assert!(frame.reason.contains("idle"), "{}", frame.reason);
        assert!(began.elapsed() >= idle);
        drop(tx);
        task.await.unwrap();
    }
}
