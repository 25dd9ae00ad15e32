//! Plays Twilio's part of a media stream: `connected`, `start`, 160-byte `media` frames every
//! 20 ms in real time with Twilio's counters, `stop`, and a clean close.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use call_proxy::audio::{mulaw, wav, FRAME_BYTES, FRAME_MS};
use call_proxy::twilio::messages::outbound;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Loads a WAV as Twilio audio (mu-law bytes, 8 kHz mono), header stripped.
pub fn load_audio(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let wav = wav::read(&bytes).with_context(|| format!("{}", path.display()))?;
    let audio = wav
        .to_twilio_mulaw()
        .with_context(|| format!("{}", path.display()))?;
    if audio.is_empty() {
        bail!("{}: the WAV holds no audio", path.display());
    }
    Ok(audio)
}

/// Splits audio into 20 ms frames; the last is padded with mu-law silence, as Twilio always
/// sends whole frames.
pub fn frames(audio: &[u8]) -> Vec<Vec<u8>> {
    audio
        .chunks(FRAME_BYTES)
        .map(|c| {
            let mut f = c.to_vec();
            f.resize(FRAME_BYTES, mulaw::SILENCE);
            f
        })
        .collect()
}

/// The proxy's media endpoint at `url`, upgraded with these extra headers; a refusal is said
/// with the proxy's answer.
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let mut request = url
        .into_client_request()
        .with_context(|| format!("bad proxy URL {url}"))?;
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::try_from(name.as_str())?,
            HeaderValue::from_str(value)?,
        );
    }
    let connecting = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Err(_) => bail!("the proxy at {url} did not answer within 5 s"),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            bail!(
                "the proxy refused the stream: HTTP {} {body}",
                resp.status()
            )
        }
        Ok(Err(e)) => bail!("cannot reach the proxy at {url}: {e}"),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// One call to play.
#[derive(Debug, Clone)]
pub struct CallSpec {
    pub url: String,
    pub account_sid: String,
    pub call_sid: String,
    pub stream_sid: String,
    pub tracks: Vec<String>,
    pub custom_parameters: BTreeMap<String, String>,
    /// Extra headers on the upgrade (an `X-Twilio-Signature`, for example).
    pub headers: Vec<(String, String)>,
    /// Keys the caller presses, each at its time into the call.
    pub dtmf: Vec<(char, Duration)>,
    /// How long to stay on the line once the caller's audio is done and whatever came back
    /// has played out (and its marks echoed): an answer that starts within it is heard out.
    pub linger: Duration,
}

impl CallSpec {
    /// Ids shaped like Twilio's (prefix + 32 hex digits), distinct per call.
    pub fn new(url: &str, n: u64) -> CallSpec {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = |prefix: &str| format!("{prefix}{:032x}", stamp.wrapping_add(n as u128));
        CallSpec {
            url: url.to_string(),
            account_sid: "AC00000000000000000000000000000000".into(),
            call_sid: id("CA"),
            stream_sid: id("MZ"),
            tracks: vec!["inbound".into()],
            custom_parameters: BTreeMap::new(),
            headers: Vec::new(),
            dtmf: Vec::new(),
            linger: Duration::ZERO,
        }
    }
}

/// What came back to the caller: what a voice agent said, as Twilio would have played it.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    /// The audio the caller heard (mu-law, 8 kHz): what a `clear` cut off is not in it.
    pub audio: Vec<u8>,
    /// From the `start` to the first audio back.
    pub first_audio: Option<Duration>,
    /// Marks echoed back once the audio before them had played (or a clear cut it).
    pub marks_echoed: u32,
    pub clears: u32,
}

/// What happened on one played call.
#[derive(Debug)]
pub struct CallReport {
    pub call_sid: String,
    pub frames: usize,
    pub audio: Duration,
    pub took: Duration,
    /// How the proxy closed the stream, if it sent a close frame.
    pub close: Option<(u16, String)>,
    pub reply: Reply,
}

/// The longest a call stays on the line after its audio, however long the answer.
const MAX_LINGER: Duration = Duration::from_secs(60);

/// Twilio's side of the way back: plays what comes in at real time, echoes each mark when
/// the audio before it has played, and on `clear` cuts what has not played yet.
struct Playback {
    reply: Reply,
    started: Instant,
    /// When the audio received so far will have finished playing.
    played_until: Instant,
    /// Marks waiting for their audio, with when it will have played.
    marks: std::collections::VecDeque<(Instant, String)>,
}

impl Playback {
    fn new(started: Instant) -> Playback {
        Playback {
            reply: Reply::default(),
            started,
            played_until: started,
            marks: Default::default(),
        }
    }

    /// One message from the proxy; answers the marks to echo now.
    fn heard(&mut self, text: &str) -> Vec<String> {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return Vec::new();
        };
        let now = Instant::now();
        match v["event"].as_str() {
            Some("media") => {
                let Some(audio) = v["media"]["payload"]
                    .as_str()
                    .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                else {
                    return Vec::new();
                };
                self.reply
                    .first_audio
                    .get_or_insert_with(|| now.duration_since(self.started));
                let length = Duration::from_micros(audio.len() as u64 * 125);
                self.played_until = self.played_until.max(now) + length;
                self.reply.audio.extend_from_slice(&audio);
                Vec::new()
            }
            Some("mark") => {
                let name = v["mark"]["name"].as_str().unwrap_or_default().to_string();
                self.marks.push_back((self.played_until.max(now), name));
                self.due(now)
            }
            Some("clear") => {
                self.reply.clears += 1;
                // What has not played yet never will.
                let unplayed = self.played_until.saturating_duration_since(now);
                let cut = (unplayed.as_micros() / 125) as usize;
                let keep = self.reply.audio.len().saturating_sub(cut);
                self.reply.audio.truncate(keep);
                self.played_until = now;
                let names: Vec<String> = self.marks.drain(..).map(|(_, n)| n).collect();
                self.reply.marks_echoed += names.len() as u32;
                names
            }
            _ => Vec::new(),
        }
    }

    /// Marks whose audio has played by `now`.
    fn due(&mut self, now: Instant) -> Vec<String> {
        let mut names = Vec::new();
        while self.marks.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, name)) = self.marks.pop_front() {
                names.push(name);
            }
        }
        self.reply.marks_echoed += names.len() as u32;
        names
    }

    fn next_due(&self) -> Option<Instant> {
        self.marks.front().map(|(at, _)| *at)
    }

    /// When everything heard so far will have played and every mark been echoed.
    fn busy_until(&self) -> Instant {
        self.marks
            .back()
            .map_or(self.played_until, |(at, _)| (*at).max(self.played_until))
    }
}

/// Why a send failed: the proxy closed the stream while it went; its close frame says why
/// when the reader gets it in time, else the send's own error.
async fn why_closed(
    closed: &tokio::sync::watch::Receiver<Option<Option<(u16, String)>>>,
    error: impl std::fmt::Display,
) -> String {
    let mut closed = closed.clone();
    let _ =
        tokio::time::timeout(Duration::from_millis(500), closed.wait_for(|c| c.is_some())).await;
    let frame = closed.borrow().clone().flatten();
    frame.map_or_else(
        || error.to_string(),
        |(code, reason)| format!("{code} {reason}"),
    )
}

/// Connects, streams `frames` in real time (pressing the keys `spec.dtmf` names), listens to
/// what comes back as Twilio would play it, stops and closes. Fails when the proxy cannot be
/// reached, refuses the upgrade, or closes the stream before the audio is done.
pub async fn play(spec: &CallSpec, frames: &[Vec<u8>]) -> Result<CallReport> {
    let ws = connect(&spec.url, &spec.headers).await?;
    let (mut tx, mut rx) = ws.split();

    let tracks: Vec<&str> = spec.tracks.iter().map(String::as_str).collect();
    tx.send(Message::Text(outbound::connected().into())).await?;
    tx.send(Message::Text(
        outbound::start(
            1,
            &outbound::StartInfo {
                account_sid: &spec.account_sid,
                call_sid: &spec.call_sid,
                stream_sid: &spec.stream_sid,
                tracks: &tracks,
                custom_parameters: &spec.custom_parameters,
            },
        )
        .into(),
    ))
    .await?;
    let began = Instant::now();

    // What the proxy says is heard while we stream: a close ends the call early; the way
    // back is played, its marks echoed through `echo`.
    let (closed_tx, closed_rx) = tokio::sync::watch::channel::<Option<Option<(u16, String)>>>(None);
    let (echo_tx, mut echo_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (busy_tx, mut busy_rx) = tokio::sync::watch::channel(began);
    let reader = tokio::spawn(async move {
        let mut playback = Playback::new(began);
        loop {
            busy_tx.send_if_modified(|at| {
                let busy = playback.busy_until();
                (busy != *at).then(|| *at = busy).is_some()
            });
            let due = playback.next_due();
            tokio::select! {
                _ = async { tokio::time::sleep_until(due.expect("guarded").into()).await }, if due.is_some() => {
                    for name in playback.due(Instant::now()) {
                        let _ = echo_tx.send(name);
                    }
                }
                m = rx.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        for name in playback.heard(t.as_str()) {
                            let _ = echo_tx.send(name);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let _ = closed_tx.send(Some(frame.map(|f| (u16::from(f.code), f.reason.to_string()))));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        let _ = closed_tx.send(Some(None));
                        break;
                    }
                },
            }
        }
        playback.reply
    });

    let b64 = base64::engine::general_purpose::STANDARD;
    let start = tokio::time::Instant::now();
    let mut seq = 2u64;
    let mut keys: Vec<(char, Duration)> = spec.dtmf.clone();
    keys.sort_by_key(|(_, at)| *at);
    let mut keys = keys.into_iter().peekable();
    let audio_end = Duration::from_millis(frames.len() as u64 * FRAME_MS);
    let mut next = 0usize;
    loop {
        let frame_at = Duration::from_millis(next as u64 * FRAME_MS);
        let key_at = keys.peek().map(|(_, at)| *at);
        // After the audio: until the answer has played out, then `linger` more (at most a
        // minute, or `linger` if longer, past the audio, whatever keeps coming back).
        let answered = busy_rx.borrow().duration_since(began);
        let hang_up =
            (audio_end.max(answered) + spec.linger).min(audio_end + MAX_LINGER.max(spec.linger));
        let (wake, is_key) = match (next < frames.len(), key_at) {
            (true, Some(k)) if k <= frame_at => (k, true),
            (true, _) => (frame_at, false),
            (false, Some(k)) if k <= hang_up => (k, true),
            (false, _) => (hang_up, false),
        };
        tokio::select! {
            Some(name) = echo_rx.recv() => {
                tx.send(Message::Text(outbound::mark(seq, &spec.stream_sid, &name).into())).await?;
                seq += 1;
                continue;
            }
            // More came back: the hang-up moves.
            Ok(()) = busy_rx.changed(), if next >= frames.len() => continue,
            _ = tokio::time::sleep_until(start + wake) => {}
        }
        if let Some(close) = closed_rx.borrow().clone() {
            let why = close
                .map(|(c, r)| format!("{c} {r}"))
                .unwrap_or_else(|| "no close frame".into());
            bail!("the proxy closed the stream after {next} frames: {why}");
        }
        if is_key {
            let (digit, _) = keys.next().expect("peeked");
            let dtmf = outbound::dtmf(seq, &spec.stream_sid, &digit.to_string());
            if let Err(e) = tx.send(Message::Text(dtmf.into())).await {
                let why = why_closed(&closed_rx, e).await;
                bail!("the proxy closed the stream after {next} frames: {why}");
            }
            seq += 1;
            continue;
        }
        let Some(frame) = frames.get(next) else {
            break;
        };
        let text = outbound::media(
            seq,
            &spec.stream_sid,
            "inbound",
            next as u64 + 1,
            next as u64 * FRAME_MS,
            &b64.encode(frame),
        );
        if let Err(e) = tx.send(Message::Text(text.into())).await {
            let why = why_closed(&closed_rx, e).await;
            bail!("the proxy closed the stream after {next} frames: {why}");
        }
        seq += 1;
        next += 1;
    }
    tx.send(Message::Text(
        outbound::stop(seq, &spec.account_sid, &spec.call_sid, &spec.stream_sid).into(),
    ))
    .await?;
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "call ended".into(),
        })))
        .await;
    let mut closed_rx = closed_rx;
    let _ = tokio::time::timeout(Duration::from_secs(3), closed_rx.wait_for(|c| c.is_some())).await;
    let close = closed_rx.borrow().clone().flatten();
    let reply = match tokio::time::timeout(Duration::from_secs(1), reader).await {
        Ok(Ok(reply)) => reply,
        _ => Reply::default(),
    };
    Ok(CallReport {
        call_sid: spec.call_sid.clone(),
        frames: frames.len(),
        audio: audio_end,
        took: began.elapsed(),
        close,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_whole_and_padded_with_silence() {
        let f = frames(&[7u8; 400]);
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|f| f.len() == FRAME_BYTES));
        assert_eq!(&f[2][..80], &[7u8; 80]);
        assert!(f[2][80..].iter().all(|&b| b == mulaw::SILENCE));
    }

    #[test]
    fn missing_and_unusable_files_are_named() {
        let err = load_audio(std::path::Path::new("no/such.wav")).unwrap_err();
        assert!(format!("{err:#}").contains("no/such.wav"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wav");
        std::fs::write(&p, b"not a wav at all").unwrap();
        let err = format!("{:#}", load_audio(&p).unwrap_err());
        assert!(err.contains("x.wav") && err.contains("not a WAV"), "{err}");
    }
}
