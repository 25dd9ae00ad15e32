//! The talking side of `local-speaker --speak`: answers a call as a voice agent would, in the
//! call's own wire format. It echoes the caller after a delay (or says a WAV file), sends a
//! `mark` after each stretch of speech, and on a key press (barge-in) sends `clear` and drops
//! whatever it had not said yet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use call_proxy::audio::{mulaw, resample::Resampler, FRAME_BYTES, SAMPLE_RATE};
use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How the agent answers.
#[derive(Debug, Clone)]
pub enum Speak {
    /// Says back what the caller said, this much later.
    Echo(Duration),
    /// Says this audio (mu-law, 8 kHz) once the call starts.
    Say(Vec<u8>),
}

/// The wire format of the call the agent is on, as its `start` showed it.
#[derive(Debug, Clone)]
pub enum Format {
    Twilio { stream_sid: String },
    Compact,
    Pcm16 { rate: u32 },
}

/// Echo mode sends a mark after this many frames of speech.
const MARK_EVERY: u64 = 50;

struct Out {
    due: Instant,
    message: Message,
    /// Said before the last barge-in: dropped.
    generation: u64,
}

/// One call's agent: queue speech with [`Agent::say`], barge in with [`Agent::barge_in`].
pub struct Agent {
    format: Format,
    speak: Speak,
    out: mpsc::UnboundedSender<Out>,
    generation: Arc<AtomicU64>,
    now_generation: u64,
    frames_said: u64,
    marks_sent: u64,
    resampler: Option<Resampler>,
}

impl Agent {
    /// Starts the agent's sending task on `sink`.
    pub fn start<S>(format: Format, speak: Speak, mut sink: S) -> Agent
    where
        S: Sink<Message> + Unpin + Send + 'static,
    {
        let (out, mut queue) = mpsc::unbounded_channel::<Out>();
        let generation = Arc::new(AtomicU64::new(0));
        let current = generation.clone();
        tokio::spawn(async move {
            while let Some(o) = queue.recv().await {
                if o.generation < current.load(Ordering::Acquire) {
                    continue;
                }
                tokio::time::sleep_until(o.due).await;
                if o.generation < current.load(Ordering::Acquire) {
                    continue;
                }
                if sink.send(o.message).await.is_err() {
                    return;
                }
            }
        });
        let resampler = match &format {
            Format::Pcm16 { rate } if *rate != SAMPLE_RATE => {
                Resampler::new(SAMPLE_RATE, *rate).ok()
            }
            _ => None,
        };
        let mut agent = Agent {
            format,
            speak,
            out,
            generation,
            now_generation: 0,
            frames_said: 0,
            marks_sent: 0,
            resampler,
        };
        if let Speak::Say(audio) = agent.speak.clone() {
            let begin = Instant::now();
            for (i, frame) in audio.chunks(FRAME_BYTES).enumerate() {
                agent.queue(begin + Duration::from_millis(20 * i as u64), frame);
            }
            let end = begin + Duration::from_millis(20 * audio.len().div_ceil(FRAME_BYTES) as u64);
            agent.mark(end, "said");
        }
        agent
    }

    /// The caller said `audio` (mu-law): echoed back later in echo mode.
    pub fn heard(&mut self, audio: &[u8]) {
        if let Speak::Echo(delay) = self.speak {
            let due = Instant::now() + delay;
            self.queue(due, audio);
            if self.frames_said.is_multiple_of(MARK_EVERY) {
                let name = format!("echo-{}", self.frames_said / MARK_EVERY);
                self.mark(due, &name);
            }
        }
    }

    /// The caller said `pcm` (16-bit LE at the call's rate, on a pcm16 call): echoed back as
    /// it came, later, in echo mode.
    pub fn heard_pcm(&mut self, pcm: &[u8]) {
        if let Speak::Echo(delay) = self.speak {
            let due = Instant::now() + delay;
            self.frames_said += 1;
            self.send(due, Message::Binary(pcm.to_vec().into()));
            if self.frames_said.is_multiple_of(MARK_EVERY) {
                let name = format!("echo-{}", self.frames_said / MARK_EVERY);
                self.mark(due, &name);
            }
        }
    }

    /// The caller pressed a key while the agent talked: stop talking, now.
    pub fn barge_in(&mut self) {
        self.now_generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let clear = match &self.format {
            Format::Twilio { stream_sid } => {
                serde_json::json!({"event": "clear", "streamSid": stream_sid}).to_string()
            }
            Format::Compact | Format::Pcm16 { .. } => r#"{"event":"clear"}"#.to_string(),
        };
        self.send(Instant::now(), Message::Text(clear.into()));
    }

    pub fn marks_sent(&self) -> u64 {
        self.marks_sent
    }

    fn queue(&mut self, due: Instant, audio: &[u8]) {
        self.frames_said += 1;
        let message = match &self.format {
            Format::Twilio { stream_sid } => Message::Text(
                format!(
                    r#"{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"{}"}}}}"#,
                    base64::engine::general_purpose::STANDARD.encode(audio)
                )
                .into(),
            ),
            Format::Compact => Message::Text(
                format!(
                    r#"{{"event":"media","media":"{}"}}"#,
                    base64::engine::general_purpose::STANDARD.encode(audio)
                )
                .into(),
            ),
            Format::Pcm16 { .. } => {
                let samples: Vec<i16> = audio.iter().map(|&c| mulaw::decode(c)).collect();
                let samples = match &mut self.resampler {
                    Some(r) => {
                        let mut out = Vec::new();
                        r.push(&samples, &mut out);
                        out
                    }
                    None => samples,
                };
                let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
                Message::Binary(bytes.into())
            }
        };
        self.send(due, message);
    }

    fn mark(&mut self, due: Instant, name: &str) {
        self.marks_sent += 1;
        let text = match &self.format {
            Format::Twilio { stream_sid } => serde_json::json!({
                "event": "mark", "streamSid": stream_sid, "mark": {"name": name}
            })
            .to_string(),
            Format::Compact | Format::Pcm16 { .. } => {
                serde_json::json!({"event": "mark", "name": name}).to_string()
            }
        };
        self.send(due, Message::Text(text.into()));
    }

    fn send(&self, due: Instant, message: Message) {
        let _ = self.out.send(Out {
            due,
            message,
            generation: self.now_generation,
        });
    }
}
