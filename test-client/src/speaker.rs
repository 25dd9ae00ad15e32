//! A backend for the proxy: accepts its WebSocket, understands every wire format (`twilio`,
//! `compact`, and binary 16-bit PCM), decodes the audio, records each call to a WAV file,
//! plays it when built with the `speaker` feature, and sums each call up in one line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use call_proxy::audio::{mulaw, SAMPLE_RATE};
use futures_util::StreamExt;

use crate::agent::{Agent, Format};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct Options {
    /// The WebSocket path backends are reached on.
    pub path: String,
    /// Write one WAV per call here.
    pub record_dir: Option<PathBuf>,
    /// Play on the sound card (only with the `speaker` feature).
    pub play: bool,
    /// Answer each call as a voice agent would (the proxy's backend must speak).
    pub speak: Option<crate::agent::Speak>,
}

/// One call as the speaker saw it.
#[derive(Debug, Clone, Default)]
pub struct CallSummary {
    pub id: String,
    /// `twilio`, `compact` or `pcm16`.
    pub format: &'static str,
    pub frames: u64,
    pub samples: u64,
    pub sample_rate: u32,
    /// Discontinuities: missing chunks (twilio format) or silences over 100 ms in arrival.
    pub gaps: u64,
    /// Media of a second track (with `both_tracks`) seen but not played or recorded.
    pub other_track_frames: u64,
    pub marks_and_dtmf: u64,
    /// With --speak: marks the agent sent, and clears (on a key press).
    pub marks_sent: u64,
    pub clears_sent: u64,
    /// Whether the call ended with `stop` (rather than the connection dropping).
    pub stopped: bool,
    pub recording: Option<PathBuf>,
}

impl CallSummary {
    pub fn seconds(&self) -> f64 {
        self.samples as f64 / f64::from(self.sample_rate.max(1))
    }
}

impl fmt::Display for CallSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "call {}: {} frames, {:.2} s of audio, {} gaps ({}{})",
            self.id,
            self.frames,
            self.seconds(),
            self.gaps,
            self.format,
            if self.stopped { "" } else { ", no stop" }
        )?;
        if self.marks_sent > 0 || self.clears_sent > 0 {
            write!(
                f,
                "; spoke: {} mark(s) sent, {} echoed back, {} clear(s)",
                self.marks_sent, self.marks_and_dtmf, self.clears_sent
            )?;
        }
        if let Some(path) = &self.recording {
            write!(f, ", recorded to {}", path.display())?;
        }
        Ok(())
    }
}

/// Accepts backend connections until the task is dropped; hands each call's summary to
/// `report` when it ends.
pub async fn serve(
    listener: TcpListener,
    options: Options,
    report: impl Fn(CallSummary) + Send + Sync + 'static,
) -> Result<()> {
    let options = Arc::new(options);
    let report = Arc::new(report);
    let player = Arc::new(player::Player::new(options.play)?);
    let recordings = Arc::new(Recordings::default());
    let mut n = 0u64;
    loop {
        let (stream, peer) = listener.accept().await?;
        n += 1;
        let (options, report, player, recordings) = (
            options.clone(),
            report.clone(),
            player.clone(),
            recordings.clone(),
        );
        tokio::spawn(async move {
            match handle(stream, n, &options, &player, &recordings).await {
                Ok(Some(summary)) => report(summary),
                Ok(None) => {}
                Err(e) => eprintln!("local-speaker: connection from {peer}: {e:#}"),
            }
        });
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn handle(
    stream: TcpStream,
    n: u64,
    options: &Options,
    player: &player::Player,
    recordings: &Arc<Recordings>,
) -> Result<Option<CallSummary>> {
    let _ = stream.set_nodelay(true);
    let path = options.path.clone();
    let check_path = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == path {
            Ok(resp)
        } else {
            let mut refusal =
                ErrorResponse::new(Some(format!("no backend at {}", req.uri().path())));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, check_path)
        .await
        .context("WebSocket handshake")?;
    let (sink, mut ws) = ws.split();
    // The agent takes the sending half at `start`, when the call's format is known.
    let mut sink = Some(sink);
    let mut agent: Option<Agent> = None;
    let mut call: Option<Call> = None;
    while let Some(message) = ws.next().await {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                eprintln!("local-speaker: connection {n}: {e}");
                break;
            }
        };
        match message {
            Message::Text(text) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
                    eprintln!("local-speaker: connection {n}: not JSON: {}", text.as_str());
                    continue;
                };
                match v["event"].as_str().unwrap_or("") {
                    "start" if call.is_none() => {
                        call = Some(Call::start(&v, n, options, recordings));
                        if let (Some(speak), Some(sink)) = (&options.speak, sink.take()) {
                            agent = Some(Agent::start(format_of(&v), speak.clone(), sink));
                        }
                    }
                    "media" => {
                        let call =
                            call.get_or_insert_with(|| Call::unannounced(n, options, recordings));
                        if let Some(codes) = call.media(&v, player)? {
                            if let Some(agent) = agent.as_mut() {
                                agent.heard(&codes);
                            }
                        }
                    }
                    "mark" => {
                        if let Some(call) = call.as_mut() {
                            call.summary.marks_and_dtmf += 1;
                        }
                    }
                    "dtmf" => {
                        if let Some(call) = call.as_mut() {
                            call.summary.marks_and_dtmf += 1;
                            // A key press while the agent talks: barge-in.
                            if let Some(agent) = agent.as_mut() {
                                agent.barge_in();
                                call.summary.clears_sent += 1;
                            }
                        }
                    }
                    "stop" => {
                        if let Some(call) = call.as_mut() {
                            call.summary.stopped = true;
                            // The call goes on in another connection (a proxy's live hand-off).
                            call.moving = v["stop"]["handedOffTo"].is_string()
                                || v["handedOffTo"].is_string();
                        }
                        break;
                    }
                    _ => {}
                }
            }
            Message::Binary(pcm) => {
                let call = call.get_or_insert_with(|| Call::unannounced(n, options, recordings));
                call.pcm16(&pcm, player)?;
                if let Some(agent) = agent.as_mut() {
                    agent.heard_pcm(&pcm);
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    if let (Some(call), Some(agent)) = (call.as_mut(), &agent) {
        call.summary.marks_sent = agent.marks_sent();
    }
    call.map(Call::finish).transpose()
}

/// The call's wire format, from its `start`.
fn format_of(start: &serde_json::Value) -> Format {
    let body = &start["start"];
    if !body.is_object() {
        return Format::Compact;
    }
    if body["mediaFormat"]["encoding"] == "audio/l16" {
        let rate = body["mediaFormat"]["sampleRate"].as_u64().unwrap_or(16000) as u32;
        return Format::Pcm16 { rate };
    }
    Format::Twilio {
        stream_sid: start["streamSid"]
            .as_str()
            .or_else(|| body["streamSid"].as_str())
            .unwrap_or_default()
            .to_string(),
    }
}

struct Call {
    summary: CallSummary,
    track: Option<String>,
    last_chunk: Option<u64>,
    last_arrival: Option<Instant>,
    record_dir: Option<PathBuf>,
    recordings: Arc<Recordings>,
    /// The file this connection writes, shared with the other connection of a handed-off call.
    recording: Option<Arc<Mutex<Recording>>>,
    /// This connection takes the call over from another (`handoffOf` in its `start`).
    joining: bool,
    /// The call went on in another connection (`handedOffTo` in its `stop`).
    moving: bool,
}

impl Call {
    fn start(
        v: &serde_json::Value,
        n: u64,
        options: &Options,
        recordings: &Arc<Recordings>,
    ) -> Call {
        let start = &v["start"];
        let twilio = start.is_object();
        let id = start["callSid"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("call-{n}"));
        let rate = start["mediaFormat"]["sampleRate"]
            .as_u64()
            .or_else(|| v["sampleRate"].as_u64())
            .map(|r| r as u32)
            .unwrap_or(SAMPLE_RATE);
        let track = start["tracks"][0]
            .as_str()
            .map(|t| t.trim_end_matches("_track").to_string());
        let mut call = Call::new(
            id,
            if twilio { "twilio" } else { "compact" },
            rate,
            options,
            recordings,
        );
        call.track = track;
        call.joining = start["customParameters"]["handoffOf"].is_string();
        if call.joining {
            // Held from the start, so the connection it takes over from leaves the file open.
            call.join_recording();
        }
        call
    }

    /// Writes on in the call's file that the connection this one takes over from has open.
    fn join_recording(&mut self) {
        self.recording = self.recordings.join(&self.summary.id);
        if let Some(recording) = &self.recording {
            let path = recording
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .path
                .clone();
            self.summary.recording = Some(path);
        }
    }

    /// Media that came without a `start` (a backend connected mid-call by hand, say).
    fn unannounced(n: u64, options: &Options, recordings: &Arc<Recordings>) -> Call {
        Call::new(
            format!("call-{n}"),
            "compact",
            SAMPLE_RATE,
            options,
            recordings,
        )
    }

    fn new(
        id: String,
        format: &'static str,
        sample_rate: u32,
        options: &Options,
        recordings: &Arc<Recordings>,
    ) -> Call {
        Call {
            summary: CallSummary {
                id,
                format,
                sample_rate,
                ..CallSummary::default()
            },
            track: None,
            last_chunk: None,
            last_arrival: None,
            record_dir: options.record_dir.clone(),
            recordings: recordings.clone(),
            recording: None,
            joining: false,
            moving: false,
        }
    }

    /// One media message; answers the caller's audio (mu-law) it carried, if any.
    fn media(&mut self, v: &serde_json::Value, player: &player::Player) -> Result<Option<Vec<u8>>> {
        let (payload, chunk) = match &v["media"] {
            serde_json::Value::String(compact) => (compact.as_str(), None),
            media => {
                let track = media["track"].as_str().unwrap_or("inbound");
                if let Some(ours) = &self.track {
                    if track != ours {
                        self.summary.other_track_frames += 1;
                        return Ok(None);
                    }
                }
                let chunk = media["chunk"].as_str().and_then(|c| c.parse::<u64>().ok());
                (media["payload"].as_str().unwrap_or(""), chunk)
            }
        };
        let Ok(codes) = base64::engine::general_purpose::STANDARD.decode(payload) else {
            eprintln!(
                "local-speaker: call {}: payload is not base64",
                self.summary.id
            );
            return Ok(None);
        };
        match chunk {
            Some(c) => {
                if let Some(last) = self.last_chunk {
                    if c != last + 1 {
                        self.summary.gaps += 1;
                    }
                }
                self.last_chunk = Some(c);
            }
            None => self.note_arrival(),
        }
        let samples: Vec<i16> = codes.iter().map(|&c| mulaw::decode(c)).collect();
        self.audio(&samples, player)?;
        Ok(Some(codes))
    }

    fn pcm16(&mut self, bytes: &[u8], player: &player::Player) -> Result<()> {
        self.summary.format = "pcm16";
        self.note_arrival();
        let samples: Vec<i16> = bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        self.audio(&samples, player)
    }

    fn note_arrival(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last_arrival {
            if now.duration_since(last) > Duration::from_millis(100) {
                self.summary.gaps += 1;
            }
        }
        self.last_arrival = Some(now);
    }

    fn audio(&mut self, samples: &[i16], player: &player::Player) -> Result<()> {
        self.summary.frames += 1;
        self.summary.samples += samples.len() as u64;
        player.play(samples, self.summary.sample_rate);
        // A connection that takes a call over writes on in the call's file, if the
        // connection it took over from had one open when this one started or has now.
        if self.record_dir.is_some() && self.recording.is_none() && self.joining {
            self.join_recording();
        }
        if let Some(dir) = &self.record_dir {
            if self.recording.is_none() {
                let path = free_path(dir, &self.summary.id);
                let spec = hound::WavSpec {
                    channels: 1,
                    sample_rate: self.summary.sample_rate,
                    bits_per_sample: 16,
                    sample_format: hound::SampleFormat::Int,
                };
                let writer = hound::WavWriter::create(&path, spec)
                    .with_context(|| format!("cannot record to {}", path.display()))?;
                self.recording = Some(self.recordings.open(&self.summary.id, writer, &path));
                self.summary.recording = Some(path);
            }
            let recording = self.recording.as_ref().expect("just opened");
            let mut recording = recording.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(writer) = recording.writer.as_mut() {
                for &s in samples {
                    writer.write_sample(s)?;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<CallSummary> {
        if let Some(recording) = self.recording.take() {
            self.recordings
                .leave(&self.summary.id, recording, self.moving)?;
        }
        Ok(self.summary)
    }
}

/// How long a recording a call left by a hand-off stays open for the connection that takes
/// the call over.
const HANDOFF_WAIT: Duration = Duration::from_secs(30);

type Writer = hound::WavWriter<std::io::BufWriter<std::fs::File>>;

/// One WAV file and the connections writing it.
struct Recording {
    writer: Option<Writer>,
    path: PathBuf,
    holders: usize,
    /// When the last holder left by a hand-off.
    left_at: Option<Instant>,
}

/// The recordings open now, by call id: a call a proxy hands from one instance to another
/// comes on two connections (the new one's `start` names the old stream in `handoffOf`, the
/// old one's `stop` names the new in `handedOffTo`), and both write one file.
#[derive(Default)]
struct Recordings {
    open: Mutex<std::collections::HashMap<String, Arc<Mutex<Recording>>>>,
}

impl Recordings {
    /// A new file for the call `id`, held by the connection that opened it.
    fn open(&self, id: &str, writer: Writer, path: &Path) -> Arc<Mutex<Recording>> {
        let recording = Arc::new(Mutex::new(Recording {
            writer: Some(writer),
            path: path.to_path_buf(),
            holders: 1,
            left_at: None,
        }));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        Self::sweep(&mut open);
        open.insert(id.to_string(), recording.clone());
        recording
    }

    /// The recording of the call `id` that a connection taking the call over writes on in,
    /// when there is one.
    fn join(&self, id: &str) -> Option<Arc<Mutex<Recording>>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let recording = open.get(id)?.clone();
        {
            let mut r = recording.lock().unwrap_or_else(|e| e.into_inner());
            r.holders += 1;
            r.left_at = None;
        }
        Some(recording)
    }

    /// A connection is done with its recording: the last one finishes the file, unless the
    /// call moved to another connection, which has [`HANDOFF_WAIT`] to take it up.
    fn leave(&self, id: &str, recording: Arc<Mutex<Recording>>, moving: bool) -> Result<()> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = recording.lock().unwrap_or_else(|e| e.into_inner());
        r.holders = r.holders.saturating_sub(1);
        if r.holders > 0 {
            return Ok(());
        }
        if moving {
            r.left_at = Some(Instant::now());
            if let Some(writer) = r.writer.as_mut() {
                // The header says what is written so far, in case no one takes the call up.
                writer.flush().context("writing the recording")?;
            }
            return Ok(());
        }
        if let Some(writer) = r.writer.take() {
            writer.finalize().context("finishing the recording")?;
        }
        if open.get(id).is_some_and(|o| Arc::ptr_eq(o, &recording)) {
            open.remove(id);
        }
        Ok(())
    }

    /// Finishes the recordings a hand-off left that no connection took up in time.
    fn sweep(open: &mut std::collections::HashMap<String, Arc<Mutex<Recording>>>) {
        open.retain(|_, recording| {
            let mut r = recording.lock().unwrap_or_else(|e| e.into_inner());
            let stale = r.holders == 0 && r.left_at.is_some_and(|at| at.elapsed() > HANDOFF_WAIT);
            if stale {
                if let Some(writer) = r.writer.take() {
                    let _ = writer.finalize();
                }
            }
            !stale
        });
    }
}

/// `DIR/<id>.wav`, or `DIR/<id>-2.wav` and so on when a reconnect brings the same call again.
fn free_path(dir: &Path, id: &str) -> PathBuf {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut path = dir.join(format!("{safe}.wav"));
    let mut k = 2;
    while path.exists() {
        path = dir.join(format!("{safe}-{k}.wav"));
        k += 1;
    }
    path
}

#[cfg(feature = "speaker")]
mod player {
    //! The sound card, through cpal: a queue of samples, resampled to the device's rate in the
    //! output callback. The cpal stream lives on a thread of its own (it is not `Send` on
    //! every platform); the player only shares the queue with it.
    use std::collections::VecDeque;
    use std::sync::{mpsc, Arc, Mutex};

    use anyhow::{anyhow, Result};
    use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

    pub struct Player {
        queue: Option<Arc<Mutex<Queue>>>,
    }

    struct Queue {
        samples: VecDeque<i16>,
        rate: u32,
        position: f64,
    }

    impl Player {
        pub fn new(play: bool) -> Result<Player> {
            if !play {
                return Ok(Player { queue: None });
            }
            let queue = Arc::new(Mutex::new(Queue {
                samples: VecDeque::new(),
                rate: 8000,
                position: 0.0,
            }));
            let q = queue.clone();
            let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
            std::thread::spawn(move || {
                let opened = open(q);
                match opened {
                    Ok(stream) => {
                        let _ = ready_tx.send(Ok(()));
                        // The stream plays for as long as it lives: keep it for the process.
                        let _stream = stream;
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            ready_rx
                .recv()
                .map_err(|_| anyhow!("sound output thread ended"))??;
            Ok(Player { queue: Some(queue) })
        }

        pub fn play(&self, samples: &[i16], rate: u32) {
            if let Some(q) = &self.queue {
                let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
                q.rate = rate;
                // Keep at most two seconds queued: late audio is worth less than live audio.
                let cap = rate as usize * 2;
                q.samples.extend(samples.iter().copied());
                let excess = q.samples.len().saturating_sub(cap);
                q.samples.drain(..excess);
            }
        }
    }

    fn open(queue: Arc<Mutex<Queue>>) -> Result<cpal::Stream> {
        let device = cpal::default_host()
            .default_output_device()
            .ok_or_else(|| anyhow!("no sound output device"))?;
        let config = device.default_output_config()?;
        let out_rate = config.sample_rate().0 as f64;
        let channels = config.channels() as usize;
        let stream = device.build_output_stream(
            &config.config(),
            move |data: &mut [f32], _| {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                let step = q.rate as f64 / out_rate;
                for frame in data.chunks_mut(channels) {
                    let i = q.position as usize;
                    let v = q.samples.get(i).copied().unwrap_or(0) as f32 / 32768.0;
                    frame.iter_mut().for_each(|s| *s = v);
                    if i < q.samples.len() {
                        q.position += step;
                    }
                    let whole = (q.position as usize).min(q.samples.len());
                    if whole > 0 {
                        q.samples.drain(..whole);
                        q.position -= whole as f64;
                    }
                }
            },
            |e| eprintln!("local-speaker: sound output: {e}"),
            None,
        )?;
        stream.play()?;
        Ok(stream)
    }
}

#[cfg(not(feature = "speaker"))]
mod player {
    //! Built without the `speaker` feature: audio is decoded, counted and recorded, not played.
    use anyhow::{bail, Result};

    pub struct Player;

    impl Player {
        pub fn new(play: bool) -> Result<Player> {
            if play {
                bail!("this build has no sound output: rebuild with `--features speaker`");
            }
            Ok(Player)
        }

        pub fn play(&self, _samples: &[i16], _rate: u32) {}
    }
}
