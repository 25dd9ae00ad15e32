//! A captured call (`media.capture`) as the shape of every loadgen call: its messages at
//! their recorded times — the silences, the bursts, the chunks Twilio skipped, the keys
//! pressed — played in a loop for as long as the load runs, each frame's audio carrying the
//! load generator's stamp so loss and latency are measured as on a plain run.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use base64::Engine as _;
use serde_json::Value;

use crate::replay::Capture;

/// One message of the shape, at its time from the call's first frame.
#[derive(Debug)]
pub enum Step {
    Media {
        at_ms: u64,
        track: String,
        /// From 1 within one pass, gaps as captured.
        chunk: u64,
        /// Milliseconds from the first frame, as captured.
        timestamp: u64,
        /// The captured audio, at least a stamp long.
        audio: Vec<u8>,
    },
    /// Anything else Twilio sent mid-call (`dtmf`, `mark`), sent as captured.
    Other { at_ms: u64, message: Value },
}

impl Step {
    fn at_ms(&self) -> u64 {
        match self {
            Step::Media { at_ms, .. } | Step::Other { at_ms, .. } => *at_ms,
        }
    }
}

/// A capture made into a call's timeline.
#[derive(Debug)]
pub struct Shape {
    pub steps: Vec<Step>,
    /// One pass: the last message's time and one frame more.
    pub period: Duration,
    /// Chunk numbers one pass takes (the next pass goes on from there).
    pub chunks: u64,
    /// Media frames in one pass.
    pub frames: usize,
}

/// The stamp the load generator writes over the start of each frame's audio.
const STAMP_BYTES: usize = 18;

impl Shape {
    /// The shape of `capture`: the messages between its `start` and its `stop`, timed from its
    /// first media frame. A capture without media has no shape.
    pub fn of(capture: &Capture) -> Result<Shape> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let number = |v: &Value| -> Option<u64> {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        };
        let media: Vec<&(u64, Value)> = capture
            .messages
            .iter()
            .filter(|(_, m)| m["event"] == "media")
            .collect();
        let Some((zero, first)) = media.first().map(|(at, m)| (*at, m)) else {
            bail!("the capture holds no media to shape a call with");
        };
        let first_chunk = number(&first["media"]["chunk"]).unwrap_or(1);
        let first_ts = number(&first["media"]["timestamp"]).unwrap_or(0);
        let mut steps = Vec::new();
        let (mut chunk, mut timestamp) = (0u64, 0u64);
        for (at, message) in &capture.messages {
            let at_ms = at.saturating_sub(zero);
            match message["event"].as_str() {
                Some("media") => {
                    let m = &message["media"];
                    // Counters that do not parse follow the previous frame's, as the proxy
                    // sees a client that sends words for them.
                    chunk = number(&m["chunk"]).map_or(chunk + 1, |c| {
                        c.saturating_sub(first_chunk).saturating_add(1)
                    });
                    timestamp = number(&m["timestamp"])
                        .map_or(timestamp + 20, |t| t.saturating_sub(first_ts));
                    let mut audio = m["payload"]
                        .as_str()
                        .and_then(|p| b64.decode(p).ok())
                        .unwrap_or_default();
                    if audio.len() < STAMP_BYTES {
                        audio.resize(160, 0xff);
                    }
                    steps.push(Step::Media {
                        at_ms,
                        track: m["track"].as_str().unwrap_or("inbound").to_string(),
                        chunk,
                        timestamp,
                        audio,
                    });
                }
                Some("start" | "stop" | "connected") | None => {}
                Some(_) => steps.push(Step::Other {
                    at_ms,
                    message: message.clone(),
                }),
            }
        }
        let last = steps.last().map_or(0, Step::at_ms);
        Ok(Shape {
            frames: steps
                .iter()
                .filter(|s| matches!(s, Step::Media { .. }))
                .count(),
            chunks: chunk,
            period: Duration::from_millis(last + 20),
            steps,
        })
    }
}

/// Where one call is in its shape.
#[derive(Debug)]
pub struct Cursor {
    began: Instant,
    pass: u64,
    next: usize,
}

impl Cursor {
    pub fn new(began: Instant) -> Cursor {
        Cursor {
            began,
            pass: 0,
            next: 0,
        }
    }

    /// The next step due by `now`, with the pass it belongs to; `None` until one is.
    pub fn due<'s>(&mut self, shape: &'s Shape, now: Instant) -> Option<(&'s Step, u64)> {
        let step = shape.steps.get(self.next)?;
        let at = self.began + shape.period * self.pass as u32 + Duration::from_millis(step.at_ms());
        if at > now {
            return None;
        }
        let pass = self.pass;
        self.next += 1;
        if self.next == shape.steps.len() {
            self.next = 0;
            self.pass += 1;
        }
        Some((step, pass))
    }
}

/// The audio of a frame with the stamp over its start.
pub fn stamped(audio: &[u8], stamp: &[u8; 160]) -> Vec<u8> {
    let mut out = audio.to_vec();
    out[..STAMP_BYTES].copy_from_slice(&stamp[..STAMP_BYTES]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn media(chunk: u64, ts: u64) -> Value {
        json!({"event":"media","streamSid":"MZ1","media":{"track":"inbound","chunk":chunk.to_string(),"timestamp":ts.to_string(),"payload":"/////w=="}})
    }

    #[test]
    fn a_capture_becomes_a_timeline_from_its_first_frame_and_loops() {
        let capture = Capture {
            messages: vec![
                (0, json!({"event":"start","start":{}})),
                (40, media(5, 100)),
                (60, media(6, 120)),
                // Two frames Twilio skipped, and a half-second silence.
                (580, media(9, 640)),
                (600, json!({"event":"dtmf","dtmf":{"digit":"*"}})),
                (620, json!({"event":"stop"})),
            ],
            truncated: false,
        };
        let shape = Shape::of(&capture).unwrap();
        assert_eq!(shape.frames, 3);
        assert_eq!(shape.chunks, 5);
        assert_eq!(shape.period, Duration::from_millis(580));
        let chunks: Vec<(u64, u64, u64)> = shape
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Media {
                    at_ms,
                    chunk,
                    timestamp,
                    audio,
                    ..
                } => {
                    assert!(audio.len() >= STAMP_BYTES);
                    Some((*at_ms, *chunk, *timestamp))
                }
                Step::Other { .. } => None,
            })
            .collect();
        assert_eq!(chunks, [(0, 1, 0), (20, 2, 20), (540, 5, 540)]);

        let t0 = Instant::now();
        let mut cursor = Cursor::new(t0);
        let mut at = |ms: u64| {
            let mut fired = Vec::new();
            while let Some((step, pass)) = cursor.due(&shape, t0 + Duration::from_millis(ms)) {
                fired.push((step.at_ms(), pass));
            }
            fired
        };
        assert_eq!(at(0), [(0, 0)]);
        assert_eq!(at(500), [(20, 0)]);
        assert_eq!(at(560), [(540, 0), (560, 0)]);
        // The next pass begins one period after the first.
        assert_eq!(at(579), []);
        assert_eq!(at(600), [(0, 1), (20, 1)]);
    }

    #[test]
    fn a_capture_without_media_has_no_shape() {
        let capture = Capture {
            messages: vec![(0, json!({"event":"start","start":{}}))],
            truncated: false,
        };
        assert!(Shape::of(&capture).is_err());
    }
}
