//! The way back: what a speaking backend says to the caller. Its messages are read by its link's
//! writer, checked here (JSON shape, base64, sizes; PCM brought to 8 kHz mu-law), and queued
//! toward Twilio; the call's session writes them to Twilio with the call's `streamSid`.
//!
//! The queue toward Twilio is bounded in audio (`media.talkback_queue_ms`), and in items and
//! bytes, marks and clears included: past a bound the oldest media goes (a speaker that fills
//! it with marks alone loses the newest mark). `clear` jumps the queue: it goes to Twilio at
//! once and everything queued before it that is audio is discarded, so a caller who barges in
//! stops hearing the agent now, not after a backlog; clears in a row are one. Empty media is
//! refused. The session takes from the queue only what Twilio's socket can take.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll};

use base64::Engine as _;
use futures_util::task::AtomicWaker;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::audio::{mulaw, resample::Resampler, SAMPLE_RATE};
use crate::config::WireFormat;

/// Something the speaker said, checked, on its way to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    /// Base64 mu-law, 8 kHz.
    Media(String),
    Mark(String),
    Clear,
}

/// Why a speaker's message was dropped (the call goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum Refused {
    #[error("not a JSON message this format speaks")]
    Malformed = 0,
    #[error("an event a speaker does not send")]
    UnknownEvent = 1,
    #[error("media payload is not base64")]
    NotBase64 = 2,
    #[error("media payload over the size limit")]
    TooLarge = 3,
    #[error("a binary frame from a speaker that speaks JSON")]
    Binary = 4,
    #[error("PCM that is not whole 16-bit samples")]
    BadPcm = 5,
    #[error("a mark without a name, or with an overlong one")]
    BadMark = 6,
    #[error("media with no audio in it")]
    EmptyMedia = 7,
}

/// The longest mark name passed on.
const MAX_MARK_NAME: usize = 256;

/// Reads one speaker's messages in its wire format.
pub struct Reader {
    format: WireFormat,
    /// Largest media payload taken, in base64 characters (PCM: in bytes).
    max_payload: usize,
    /// `pcm16`: the speaker's PCM on its way to 8 kHz.
    pcm: Option<PcmUp>,
}

struct PcmUp {
    resampler: Resampler,
    samples: Vec<i16>,
    out: Vec<i16>,
}

#[derive(Deserialize)]
struct Envelope {
    event: String,
    #[serde(default)]
    media: Option<serde_json::Value>,
    #[serde(default)]
    mark: Option<MarkBody>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct MarkBody {
    name: Option<String>,
}

impl Reader {
    pub fn new(
        format: WireFormat,
        sample_rate: u32,
        max_payload: usize,
    ) -> Result<Reader, crate::audio::resample::ResampleError> {
        let pcm = match format {
            WireFormat::Pcm16 => Some(PcmUp {
                resampler: Resampler::new(sample_rate, SAMPLE_RATE)?,
                samples: Vec::new(),
                out: Vec::new(),
            }),
            WireFormat::Twilio | WireFormat::Compact => None,
        };
        Ok(Reader {
            format,
            max_payload,
            pcm,
        })
    }

    /// What one message from the speaker says. `Ok(None)`: nothing for the caller (yet).
    pub fn read(&mut self, message: &Message) -> Result<Option<Said>, Refused> {
        match message {
            Message::Binary(bytes) => match &mut self.pcm {
                None => Err(Refused::Binary),
                Some(pcm) => {
                    if bytes.len() > self.max_payload {
                        return Err(Refused::TooLarge);
                    }
                    if bytes.is_empty() {
                        return Err(Refused::EmptyMedia);
                    }
                    pcm.audio(bytes).map(|audio| audio.map(Said::Media))
                }
            },
            Message::Text(text) => self.read_text(text.as_str()),
            _ => Ok(None),
        }
    }

    fn read_text(&mut self, text: &str) -> Result<Option<Said>, Refused> {
        let envelope: Envelope = serde_json::from_str(text).map_err(|_| Refused::Malformed)?;
        match envelope.event.as_str() {
            "media" if self.pcm.is_none() => {
                // Twilio's shape carries `media.payload`; the compact one `media` itself.
                let payload = match (self.format, envelope.media) {
                    (WireFormat::Compact, Some(serde_json::Value::String(p))) => p,
                    (_, Some(serde_json::Value::Object(mut body))) => {
                        match body.remove("payload") {
                            Some(serde_json::Value::String(p)) => p,
                            _ => return Err(Refused::Malformed),
                        }
                    }
                    _ => return Err(Refused::Malformed),
                };
                if payload.len() > self.max_payload {
                    return Err(Refused::TooLarge);
                }
                // Empty audio costs a queue slot and plays nothing.
                if payload.trim().is_empty() {
                    return Err(Refused::EmptyMedia);
                }
                if base64::engine::general_purpose::STANDARD
                    .decode(&payload)
                    .is_err()
                {
                    return Err(Refused::NotBase64);
                }
                Ok(Some(Said::Media(payload)))
            }
            "mark" => {
                let name = envelope
                    .mark
                    .and_then(|m| m.name)
                    .or(envelope.name)
                    .filter(|n| !n.is_empty() && n.len() <= MAX_MARK_NAME)
                    .ok_or(Refused::BadMark)?;
                Ok(Some(Said::Mark(name)))
            }
            "clear" => Ok(Some(Said::Clear)),
            _ => Err(Refused::UnknownEvent),
        }
    }
}

impl PcmUp {
    /// Little-endian 16-bit PCM at the speaker's rate, as base64 mu-law at 8 kHz.
    fn audio(&mut self, bytes: &[u8]) -> Result<Option<String>, Refused> {
        if !bytes.len().is_multiple_of(2) {
            return Err(Refused::BadPcm);
        }
        self.samples.clear();
        self.samples.extend(
            bytes
                .chunks_exact(2)
                .map(|p| i16::from_le_bytes([p[0], p[1]])),
        );
        self.out.clear();
        self.resampler.push(&self.samples, &mut self.out);
        if self.out.is_empty() {
            return Ok(None);
        }
        let codes: Vec<u8> = self.out.iter().map(|&s| mulaw::encode(s)).collect();
        Ok(Some(
            base64::engine::general_purpose::STANDARD.encode(codes),
        ))
    }
}

/// What happened to a message queued toward Twilio.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// Dropped to stay within the bounds: the oldest media, or the new mark when only
    /// marks are left to drop.
    pub dropped: usize,
    /// Media discarded by a `clear`.
    pub cleared: usize,
}

/// The speaker's messages waiting for the Twilio socket.
pub struct TowardTwilio {
    state: Mutex<State>,
    /// The session's waker: it writes to Twilio.
    waker: AtomicWaker,
    /// Bound on queued audio, in mu-law bytes (8 a millisecond).
    max_audio: usize,
    /// Bound on what the queue holds in all, marks and clears included.
    max_items: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct State {
    items: VecDeque<Said>,
    /// When the speaker sent the clear now queued (merged clears keep the first).
    clear_since: Option<std::time::Instant>,
    /// Mu-law bytes of the queued media (base64 length × 3/4).
    audio: usize,
    /// What the queued items weigh, in bytes (see [`weight`]).
    bytes: usize,
}

fn audio_len(said: &Said) -> usize {
    match said {
        Said::Media(payload) => payload.len() / 4 * 3,
        Said::Mark(_) | Said::Clear => 0,
    }
}

/// What an item costs the queue's byte bound: its text, and a slot's worth for the rest.
fn weight(said: &Said) -> usize {
    const SLOT: usize = 64;
    SLOT + match said {
        Said::Media(payload) => payload.len(),
        Said::Mark(name) => name.len(),
        Said::Clear => 0,
    }
}

impl State {
    fn remove(&mut self, pos: usize) -> Option<Said> {
        let said = self.items.remove(pos)?;
        self.audio -= audio_len(&said);
        self.bytes -= weight(&said);
        Some(said)
    }
}

impl TowardTwilio {
    /// A queue holding at most `max_ms` of audio; in items and bytes, what that audio would
    /// be in 20 ms frames, with as much again for marks.
    pub fn new(max_ms: u64) -> TowardTwilio {
        let max_audio = (max_ms as usize).saturating_mul(SAMPLE_RATE as usize / 1000);
        let frames = (max_ms as usize / 20).max(1);
        TowardTwilio {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            max_audio,
            max_items: frames * 2,
            // Base64 of the audio, and a slot per item.
            max_bytes: max_audio / 3 * 4 + frames * 2 * weight(&Said::Clear) + 64 * 1024,
        }
    }

    pub fn push(&self, said: Said) -> Queued {
        let mut outcome = Queued::default();
        {
            let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Said::Clear = said {
                let before = q.items.len();
                let media: Vec<usize> = (0..before)
                    .rev()
                    .filter(|&i| matches!(q.items[i], Said::Media(_)))
                    .collect();
                for pos in media {
                    q.remove(pos);
                }
                outcome.cleared = before - q.items.len();
                // Clears in a row are one: the queue holds no audio for a second to clear.
                if !matches!(q.items.front(), Some(Said::Clear)) {
                    q.bytes += weight(&Said::Clear);
                    q.items.push_front(Said::Clear);
                    q.clear_since = Some(std::time::Instant::now());
                }
            } else {
                let (len, cost) = (audio_len(&said), weight(&said));
                let over = |q: &State| {
                    q.audio + len > self.max_audio
                        || q.items.len() >= self.max_items
                        || q.bytes + cost > self.max_bytes
                };
                while over(&q) {
                    let Some(pos) = q.items.iter().position(|s| matches!(s, Said::Media(_))) else {
                        break;
                    };
                    q.remove(pos);
                    outcome.dropped += 1;
                }
                if over(&q) {
                    // Nothing left to drop but marks and a clear: the newcomer goes.
                    outcome.dropped += 1;
                    return outcome;
                }
                q.audio += len;
                q.bytes += cost;
                q.items.push_back(said);
            }
        }
        self.waker.wake();
        outcome
    }

    /// The next message for Twilio, or `Pending` (and a wake-up) until there is one.
    #[cfg(test)]
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Said> {
        self.poll_next_since(cx).map(|(said, _)| said)
    }

    /// The next message for Twilio, with when the speaker sent it for a `clear`, or
    /// `Pending` (and a wake-up) until there is one.
    pub fn poll_next_since(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<(Said, Option<std::time::Instant>)> {
        self.waker.register(cx.waker());
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match q.remove(0) {
            Some(Said::Clear) => Poll::Ready((Said::Clear, q.clear_since.take())),
            Some(said) => Poll::Ready((said, None)),
            None => Poll::Pending,
        }
    }

    /// Audio queued, in milliseconds.
    #[cfg(test)]
    pub fn queued_ms(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).audio / (SAMPLE_RATE as usize / 1000)
    }
}

/// What Twilio gets for something the speaker said, on the call's stream: the text of one
/// outbound Media Streams message.
pub fn to_twilio(said: Said, stream_sid: &str) -> String {
    match said {
        Said::Media(payload) => {
            // Base64 and a stream sid need no escaping; written by hand, as media is the
            // message sent 50 times a second.
            format!(
                r#"{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"{payload}"}}}}"#
            )
        }
        Said::Mark(name) => serde_json::json!({
            "event": "mark", "streamSid": stream_sid, "mark": {"name": name}
        })
        .to_string(),
        Said::Clear => serde_json::json!({"event": "clear", "streamSid": stream_sid}).to_string(),
    }
}

/// Counts messages per second from a backend that does not speak, to tell chatter from a flood.
#[derive(Debug)]
pub struct FloodMeter {
    /// The runtime's clock, so paused-time tests see the same second the limits do.
    window_start: tokio::time::Instant,
    messages: u32,
    bytes: usize,
    max_messages: u32,
    max_bytes: usize,
}

impl FloodMeter {
    pub fn new(max_messages: u32, max_bytes: usize) -> FloodMeter {
        FloodMeter {
            window_start: tokio::time::Instant::now(),
            messages: 0,
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Counts one message of `len` bytes; answers whether the backend is over the limit.
    pub fn over(&mut self, len: usize) -> bool {
        if self.window_start.elapsed() >= std::time::Duration::from_secs(1) {
            self.window_start = tokio::time::Instant::now();
            self.messages = 0;
            self.bytes = 0;
        }
        self.messages += 1;
        self.bytes += len;
        self.messages > self.max_messages || self.bytes > self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.to_string().into())
    }

    #[test]
    fn each_format_says_media_mark_and_clear_its_own_way() {
        let mut twilio = Reader::new(WireFormat::Twilio, 8000, 1000).unwrap();
        assert_eq!(
            twilio.read(&text(
                r#"{"event":"media","streamSid":"MZx","media":{"payload":"AAEC"}}"#
            )),
            Ok(Some(Said::Media("AAEC".into())))
        );
        assert_eq!(
            twilio.read(&text(
                r#"{"event":"mark","streamSid":"MZx","mark":{"name":"turn-1"}}"#
            )),
            Ok(Some(Said::Mark("turn-1".into())))
        );
        assert_eq!(
            twilio.read(&text(r#"{"event":"clear"}"#)),
            Ok(Some(Said::Clear))
        );
        let mut compact = Reader::new(WireFormat::Compact, 8000, 1000).unwrap();
        assert_eq!(
            compact.read(&text(r#"{"event":"media","media":"AAEC"}"#)),
            Ok(Some(Said::Media("AAEC".into())))
        );
        assert_eq!(
            compact.read(&text(r#"{"event":"mark","name":"m"}"#)),
            Ok(Some(Said::Mark("m".into())))
        );
        let mut pcm = Reader::new(WireFormat::Pcm16, 8000, 1000).unwrap();
        let samples: Vec<u8> = [1000i16, -1000, 0, 32000]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let Ok(Some(Said::Media(b64))) = pcm.read(&Message::Binary(samples.into())) else {
            panic!("PCM at 8 kHz is audio at once")
        };
        let codes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            codes,
            [1000i16, -1000, 0, 32000].map(mulaw::encode).to_vec()
        );
        assert_eq!(
            pcm.read(&text(r#"{"event":"clear"}"#)),
            Ok(Some(Said::Clear))
        );
    }

    #[test]
    fn bad_messages_are_refused_with_the_reason() {
        let mut twilio = Reader::new(WireFormat::Twilio, 8000, 100).unwrap();
        let cases: &[(Message, Refused)] = &[
            (text("not json"), Refused::Malformed),
            (
                text(r#"{"event":"media","media":{"payload":"not base64!"}}"#),
                Refused::NotBase64,
            ),
            (text(r#"{"event":"media","media":{}}"#), Refused::Malformed),
            (
                text(&format!(
                    r#"{{"event":"media","media":{{"payload":"{}"}}}}"#,
                    "A".repeat(1 << 20)
                )),
                Refused::TooLarge,
            ),
            (text(r#"{"event":"start"}"#), Refused::UnknownEvent),
            (text(r#"{"event":"mark","mark":{}}"#), Refused::BadMark),
            (Message::Binary(vec![0u8; 4].into()), Refused::Binary),
            (
                text(r#"{"event":"media","media":{"payload":""}}"#),
                Refused::EmptyMedia,
            ),
        ];
        for (message, why) in cases {
            assert_eq!(twilio.read(message), Err(*why), "{message:?}");
        }
        let mut pcm = Reader::new(WireFormat::Pcm16, 16000, 100).unwrap();
        assert_eq!(
            pcm.read(&Message::Binary(vec![0u8; 3].into())),
            Err(Refused::BadPcm)
        );
        assert_eq!(
            pcm.read(&Message::Binary(vec![0u8; 200].into())),
            Err(Refused::TooLarge)
        );
        assert_eq!(
            pcm.read(&text(r#"{"event":"media","media":{"payload":"AAEC"}}"#)),
            Err(Refused::UnknownEvent),
            "a pcm16 speaker's audio comes in binary frames"
        );
    }

    fn media(ms: usize) -> Said {
        Said::Media("A".repeat(ms * 8 / 3 * 4))
    }

    fn drain(q: &TowardTwilio) -> Vec<Said> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(s) = q.poll_next(&mut cx) {
            out.push(s);
        }
        out
    }

    #[test]
    fn the_queue_keeps_its_bound_marks_and_clears() {
        let q = TowardTwilio::new(100);
        for _ in 0..3 {
            assert_eq!(q.push(media(30)), Queued::default());
        }
        assert_eq!(q.push(Said::Mark("a".into())), Queued::default());
        let pushed = q.push(media(30));
        assert_eq!(pushed.dropped, 1, "oldest media out to stay within 100 ms");
        assert!(q.queued_ms() <= 100);
        let cleared = q.push(Said::Clear);
        assert_eq!(cleared.cleared, 3);
        assert_eq!(
            drain(&q),
            [Said::Clear, Said::Mark("a".into())],
            "clear first, marks kept"
        );
    }

    /// Marks, empty-handed clears and media a Twilio socket that reads slowly leaves queued:
    /// the queue holds its bounds in items and bytes, whatever the mix.
    #[test]
    fn marks_and_clears_count_toward_the_bounds() {
        let q = TowardTwilio::new(1000);
        let name = "m".repeat(MAX_MARK_NAME);
        let mut dropped = 0;
        for _ in 0..100_000 {
            dropped += q.push(Said::Mark(name.clone())).dropped;
        }
        let held = q.state.lock().unwrap();
        assert!(held.items.len() <= q.max_items, "{}", held.items.len());
        assert!(held.bytes <= q.max_bytes);
        assert_eq!(
            dropped,
            100_000 - held.items.len(),
            "every mark not kept is counted"
        );
        drop(held);

        // A clear storm is one clear, and finds the audio gone.
        let q = TowardTwilio::new(1000);
        q.push(Said::Media("AAAA".into()));
        let mut cleared = 0;
        for _ in 0..10_000 {
            cleared += q.push(Said::Clear).cleared;
        }
        assert_eq!(cleared, 1);
        assert_eq!(q.state.lock().unwrap().items.len(), 1);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(Said::Clear));
        assert_eq!(q.poll_next(&mut cx), Poll::Pending);
        let st = q.state.lock().unwrap();
        assert_eq!((st.audio, st.bytes), (0, 0), "nothing left accounted");
    }
}
