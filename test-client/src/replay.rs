//! Replays a call the proxy captured (`media.capture`): its Twilio messages in order, at the
//! pace they arrived (or `speed` times faster), against any proxy — a call that went wrong in
//! production, played again where it can be looked at. Stream parameters given on the command
//! line replace the captured ones (the route token is masked in a capture, and would not
//! open another proxy anyway).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use call_proxy::twilio::messages::outbound;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A capture file, read.
#[derive(Debug)]
pub struct Capture {
    /// Each message with its time since the first, in milliseconds.
    pub messages: Vec<(u64, Value)>,
    /// The file ended before the call did (`media.capture.max_bytes`).
    pub truncated: bool,
}

/// Reads a capture; a line that is not one names its number.
pub fn load(path: &Path) -> Result<Capture> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut capture = Capture {
        messages: Vec::new(),
        truncated: false,
    };
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
        if v.get("capture").is_some() {
            continue;
        }
        if v.get("truncated").is_some() {
            capture.truncated = true;
            continue;
        }
        match (v["at_ms"].as_u64(), v.get("message")) {
            (Some(at), Some(message)) if message.is_object() => {
                capture.messages.push((at, message.clone()))
            }
            _ => bail!(
                "{} line {}: not a captured message (at_ms and message)",
                path.display(),
                n + 1
            ),
        }
    }
    if !capture
        .messages
        .first()
        .is_some_and(|(_, m)| m["event"] == "start")
    {
        bail!("{}: a capture begins with the call's start", path.display());
    }
    Ok(capture)
}

/// How a replay went.
#[derive(Debug)]
pub struct ReplayReport {
    pub messages: usize,
    pub took: Duration,
    /// How the proxy closed the stream, if it sent a close frame.
    pub close: Option<(u16, String)>,
}

/// Plays `capture` to the proxy at `url`: `connected`, then every captured message at its
/// time divided by `speed`, `params` replacing the start's stream parameters; a `stop` of its
/// own when the capture was cut short.
pub async fn replay(
    url: &str,
    headers: &[(String, String)],
    capture: &Capture,
    speed: f64,
    params: &BTreeMap<String, String>,
) -> Result<ReplayReport> {
    let ws = crate::play::connect(url, headers).await?;
    let (mut tx, mut rx) = ws.split();
    // The proxy's side: a close ends the replay early.
    let reader = tokio::spawn(async move {
        while let Some(message) = rx.next().await {
            match message {
                Ok(Message::Close(frame)) => {
                    return frame.map(|f| (u16::from(f.code), f.reason.to_string()))
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    });
    tx.send(Message::Text(outbound::connected().into())).await?;
    let began = Instant::now();
    let mut sent = 0;
    for (at, message) in &capture.messages {
        let due = began + Duration::from_secs_f64(*at as f64 / 1000.0 / speed);
        tokio::time::sleep_until(due.into()).await;
        if reader.is_finished() {
            break;
        }
        let mut message = message.clone();
        if message["event"] == "start" {
            if let Some(custom) = message
                .pointer_mut("/start/customParameters")
                .and_then(Value::as_object_mut)
            {
                for (k, v) in params {
                    custom.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        tx.send(Message::Text(message.to_string().into()))
            .await
            .context("the proxy dropped the stream")?;
        sent += 1;
    }
    if sent < capture.messages.len() {
        let why = match reader.await.ok().flatten() {
            Some((code, reason)) => format!("{code} {reason}"),
            None => "no close frame".to_string(),
        };
        bail!(
            "the proxy closed the stream after {sent} of {} messages: {why}",
            capture.messages.len()
        );
    }
    let ended = capture
        .messages
        .last()
        .is_some_and(|(_, m)| m["event"] == "stop");
    if !ended {
        let start = &capture.messages[0].1["start"];
        let text = |k: &str| start[k].as_str().unwrap_or_default().to_string();
        tx.send(Message::Text(
            outbound::stop(
                sent as u64 + 2,
                &text("accountSid"),
                &text("callSid"),
                &text("streamSid"),
            )
            .into(),
        ))
        .await?;
    }
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "replay ended".into(),
        })))
        .await;
    let close = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    Ok(ReplayReport {
        messages: sent,
        took: began.elapsed(),
        close,
    })
}
