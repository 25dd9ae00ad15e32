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
        }
    }
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
}

/// Connects, streams `frames` in real time, stops and closes. Fails when the proxy cannot be
/// reached, refuses the upgrade, or closes the stream before the audio is done.
pub async fn play(spec: &CallSpec, frames: &[Vec<u8>]) -> Result<CallReport> {
    let mut request = spec
        .url
        .as_str()
        .into_client_request()
        .with_context(|| format!("bad proxy URL {}", spec.url))?;
    for (name, value) in &spec.headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::try_from(name.as_str())?,
            HeaderValue::from_str(value)?,
        );
    }
    let connecting = tokio_tungstenite::connect_async(request);
    let (ws, _) = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Err(_) => bail!("the proxy at {} did not answer within 5 s", spec.url),
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
        Ok(Err(e)) => bail!("cannot reach the proxy at {}: {e}", spec.url),
        Ok(Ok(ok)) => ok,
    };
    let (mut tx, mut rx) = ws.split();

    // Whatever the proxy says (a close, in practice) is watched for while we stream.
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<Option<(u16, String)>>();
    let reader = tokio::spawn(async move {
        let mut close = None;
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Close(frame) = m {
                close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
        }
        let _ = closed_tx.send(close);
    });

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

    let b64 = base64::engine::general_purpose::STANDARD;
    let began = Instant::now();
    let start = tokio::time::Instant::now();
    let mut seq = 2u64;
    for (i, frame) in frames.iter().enumerate() {
        // Paced against the start, not the previous frame, so delays never accumulate.
        tokio::time::sleep_until(start + Duration::from_millis(i as u64 * FRAME_MS)).await;
        if let Ok(close) = closed_rx.try_recv() {
            let why = close
                .map(|(c, r)| format!("{c} {r}"))
                .unwrap_or_else(|| "no close frame".into());
            bail!("the proxy closed the stream after {i} frames: {why}");
        }
        let text = outbound::media(
            seq,
            &spec.stream_sid,
            "inbound",
            i as u64 + 1,
            i as u64 * FRAME_MS,
            &b64.encode(frame),
        );
        tx.send(Message::Text(text.into()))
            .await
            .context("the proxy dropped the stream")?;
        seq += 1;
    }
    tokio::time::sleep_until(start + Duration::from_millis(frames.len() as u64 * FRAME_MS)).await;
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
    let close = tokio::time::timeout(Duration::from_secs(3), closed_rx)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    reader.abort();
    Ok(CallReport {
        call_sid: spec.call_sid.clone(),
        frames: frames.len(),
        audio: Duration::from_millis(frames.len() as u64 * FRAME_MS),
        took: began.elapsed(),
        close,
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
