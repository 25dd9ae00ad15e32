//! What each backend wire format puts on the socket (SPEC section 3, "Backend wire formats").
//!
//! `twilio` forwards the bytes Twilio sent, shared between every backend of the call without a
//! copy; `compact` is the original's `{"event":"media","media":"<base64>"}` form; `pcm16` is
//! raw 16-bit little-endian PCM in binary frames at the backend's rate, with the control
//! messages as Twilio's JSON text.

use std::borrow::Cow;

use base64::Engine as _;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::audio::{mulaw, resample::Resampler, wav};
use crate::config::WireFormat;
use crate::twilio::messages::{outbound, Start};

/// The compact form's control messages never change; built once.
const COMPACT_START: &str = r#"{"event":"start"}"#;
const COMPACT_STOP: &str = r#"{"event":"stop"}"#;

/// The received text for a backend, as it came: shared, not copied (and already UTF-8).
pub fn forward(raw: &Utf8Bytes) -> Message {
    Message::Text(raw.clone())
}

/// The `start` a backend gets on every (re)connect. A `pcm16` backend gets Twilio's, with
/// `start.mediaFormat` saying what its binary frames hold.
pub fn start(format: WireFormat, raw: &Utf8Bytes, sample_rate: u32) -> Message {
    match format {
        WireFormat::Twilio => forward(raw),
        WireFormat::Compact => Message::Text(Utf8Bytes::from_static(COMPACT_START)),
        WireFormat::Pcm16 => {
            let Ok(mut start) = serde_json::from_str::<serde_json::Value>(raw.as_str()) else {
                return forward(raw);
            };
            if let Some(body) = start.get_mut("start").and_then(|b| b.as_object_mut()) {
                body.insert(
                    "mediaFormat".into(),
                    serde_json::json!({
                        "encoding": "audio/l16",
                        "sampleRate": sample_rate,
                        "channels": 1,
                    }),
                );
            }
            Message::Text(start.to_string().into())
        }
    }
}

/// `start` for a backend of a stream that takes a call over from the stream `from` (a live
/// hand-off): Twilio's and pcm16's carry `handoffOf` in their stream parameters already; the
/// compact form gains it as a field.
pub fn handoff_start(format: WireFormat, raw: &Utf8Bytes, sample_rate: u32, from: &str) -> Message {
    match format {
        WireFormat::Compact => compact("start", "handoffOf", from),
        _ => start(format, raw, sample_rate),
    }
}

/// A media frame in compact form. `payload` is base64 the caller has already checked, so it
/// needs no JSON escaping.
pub fn compact_media(payload: &str) -> Message {
    let mut s = String::with_capacity(payload.len() + 32);
    s.push_str(r#"{"event":"media","media":""#);
    s.push_str(payload);
    s.push_str(r#""}"#);
    Message::Text(s.into())
}

/// The base64 of `RIFF`: a payload that starts so is a whole WAV file, as the original's own
/// test client sent.
const WAV_PREFIX: &str = "UklGR";

/// The largest decoded payload [`decode_payload`] takes on the stack: Twilio's 20 ms frames
/// are 160 bytes.
pub const STACK_PAYLOAD: usize = 512;

/// Decodes a media payload: into `stack` when it fits, else into `spill` (emptied first, its
/// capacity reused). `None` when the payload is not base64.
pub fn decode_payload<'a>(
    payload: &str,
    stack: &'a mut [u8; STACK_PAYLOAD],
    spill: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let engine = &base64::engine::general_purpose::STANDARD;
    if payload.len() / 4 * 3 <= STACK_PAYLOAD {
        let n = engine.decode_slice(payload, stack).ok()?;
        return Some(&stack[..n]);
    }
    spill.clear();
    engine.decode_vec(payload, spill).ok()?;
    Some(spill)
}

/// Whether a media payload is base64 exactly as [`decode_payload`] would take it (standard
/// alphabet, canonical padding, no stray bits in the last symbol), without decoding it: a
/// call whose backends all take Twilio's own frames needs the check, not the audio.
pub fn is_base64(payload: &str) -> bool {
    let bytes = payload.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return false;
    }
    let padding = bytes
        .iter()
        .rev()
        .take(2)
        .take_while(|&&b| b == b'=')
        .count();
    let symbols = &bytes[..bytes.len() - padding];
    // A fold without early exit, so the compiler checks many bytes at a time.
    let alphabet = symbols.iter().fold(true, |ok, &b| {
        ok & (b.is_ascii_alphanumeric() | (b == b'+') | (b == b'/'))
    });
    // Before one `=` the last symbol carries 4 bits of data in its 6, before two just 2.
    let unused = match padding {
        0 => 0,
        1 => 0b11,
        _ => 0b1111,
    };
    alphabet && symbols.last().is_none_or(|&b| sextet(b) & unused == 0)
}

/// A base64 symbol's value (for one already checked to be in the alphabet).
fn sextet(b: u8) -> u8 {
    match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        _ => 63,
    }
}

/// The caller's audio in a media payload, as mu-law bytes, given the payload and its decoded
/// bytes: those bytes themselves, or, for a whole WAV file sent as one payload, its samples.
/// `None` when it holds no usable audio.
pub fn caller_audio<'a>(payload: &str, decoded: &'a [u8]) -> Option<Cow<'a, [u8]>> {
    if payload.starts_with(WAV_PREFIX) {
        return wav::read(decoded)
            .ok()?
            .to_twilio_mulaw()
            .ok()
            .map(Cow::Owned);
    }
    Some(Cow::Borrowed(decoded))
}

/// The payload a compact backend gets: the same base64 unless it is a whole WAV file, whose
/// samples are sent as mu-law instead (compact backends expect raw audio).
pub fn compact_payload<'a>(payload: &'a str, decoded: &[u8]) -> Option<Cow<'a, str>> {
    if !payload.starts_with(WAV_PREFIX) {
        return Some(Cow::Borrowed(payload));
    }
    let audio = caller_audio(payload, decoded)?;
    Some(Cow::Owned(
        base64::engine::general_purpose::STANDARD.encode(audio),
    ))
}

/// A `pcm16` link's downstream state: the caller's mu-law, decoded and brought to the
/// backend's rate by a resampler that lives as long as the link.
#[derive(Debug)]
pub struct PcmDown {
    resampler: Resampler,
    /// The backend's rate.
    rate: u32,
    samples: Vec<i16>,
    out: Vec<i16>,
}

impl PcmDown {
    pub fn new(rate: u32) -> Result<PcmDown, crate::audio::resample::ResampleError> {
        Ok(PcmDown {
            resampler: Resampler::new(crate::audio::SAMPLE_RATE, rate)?,
            rate,
            samples: Vec::new(),
            out: Vec::new(),
        })
    }

    /// The backend's rate.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The binary frames for `mulaw`, each handed to `each`: none while the resampler is
    /// still filling, one for an ordinary 20 ms frame, and for a payload longer than two
    /// frames' worth (a whole file in one `media`) one per 20 ms, so no single message grows
    /// with what the stream chose to send.
    pub fn frames(&mut self, mulaw_audio: &[u8], mut each: impl FnMut(Message)) {
        self.samples.clear();
        self.samples
            .extend(mulaw_audio.iter().map(|&c| mulaw::decode(c)));
        self.out.clear();
        self.resampler.push(&self.samples, &mut self.out);
        // 20 ms at the backend's rate; an ordinary frame's output is one piece, whatever
        // the resampler's delay leaves it a sample or two longer or shorter.
        let piece = (self.rate as usize / 50).max(1);
        let chunk = if self.out.len() <= 2 * piece {
            self.out.len().max(1)
        } else {
            piece
        };
        for samples in self.out.chunks(chunk) {
            let mut bytes = Vec::with_capacity(samples.len() * 2);
            for s in samples {
                bytes.extend_from_slice(&s.to_le_bytes());
            }
            each(Message::Binary(bytes.into()));
        }
    }
}

/// Twilio's `dtmf` for a backend: compact gets `{"event":"dtmf","dtmf":"5"}`, the others the
/// message as received.
pub fn dtmf(format: WireFormat, raw: &Utf8Bytes, digit: &str) -> Message {
    match format {
        WireFormat::Compact => compact("dtmf", "dtmf", digit),
        WireFormat::Twilio | WireFormat::Pcm16 => forward(raw),
    }
}

/// Twilio's `mark` echo for the speaker: compact speakers named it `{"event":"mark",
/// "name":...}`, the others get the message as received.
pub fn mark(format: WireFormat, raw: &Utf8Bytes, name: &str) -> Message {
    match format {
        WireFormat::Compact => compact("mark", "name", name),
        WireFormat::Twilio | WireFormat::Pcm16 => forward(raw),
    }
}

/// Twilio's `stop` for a backend.
pub fn stop(format: WireFormat, raw: &Utf8Bytes) -> Message {
    match format {
        WireFormat::Compact => compact_stop(),
        WireFormat::Twilio | WireFormat::Pcm16 => forward(raw),
    }
}

/// `stop` for a backend when Twilio's own `stop` never came (the socket dropped, the call
/// idled out, the service is shutting down): backends always see the call end.
pub fn synthetic_stop(format: WireFormat, start: &Start) -> Message {
    match format {
        WireFormat::Twilio | WireFormat::Pcm16 => Message::Text(
            outbound::stop(0, &start.account_sid, &start.call_sid, &start.stream_sid).into(),
        ),
        WireFormat::Compact => compact_stop(),
    }
}

/// `stop` for a backend whose call moved to the stream `to` (a live hand-off): Twilio's `stop`
/// with `stop.handedOffTo`, or the compact `{"event":"stop","handedOffTo":…}`. The same call
/// goes on in a new connection whose `start` names this stream in `handoffOf`.
pub fn handoff_stop(format: WireFormat, start: &Start, to: &str) -> Message {
    match format {
        WireFormat::Twilio | WireFormat::Pcm16 => Message::Text(
            serde_json::json!({
                "event": "stop", "sequenceNumber": "0", "streamSid": start.stream_sid,
                "stop": {
                    "accountSid": start.account_sid, "callSid": start.call_sid,
                    "handedOffTo": to
                }
            })
            .to_string()
            .into(),
        ),
        WireFormat::Compact => compact("stop", "handedOffTo", to),
    }
}

/// `{"event":<event>,<field>:<value>}`, in the original's key order.
fn compact(event: &str, field: &str, value: &str) -> Message {
    let value = serde_json::Value::from(value);
    Message::Text(format!(r#"{{"event":"{event}","{field}":{value}}}"#).into())
}

pub fn compact_stop() -> Message {
    Message::Text(Utf8Bytes::from_static(COMPACT_STOP))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The check without decoding agrees with the decoder on what is base64: on encodings of
    /// any bytes, and on strings of the alphabet, padding and a few outsiders, where the
    /// last symbol's stray bits and misplaced `=` are what matters.
    #[test]
    fn the_base64_check_agrees_with_the_decoder() {
        let engine = &base64::engine::general_purpose::STANDARD;
        let decodes = |p: &str| engine.decode(p).is_ok();
        for p in [
            "", "AA==", "AB==", "AAA=", "AAB=", "A===", "====", "AA=A", "AAAA", "AAA", "-AAA",
        ] {
            assert_eq!(is_base64(p), decodes(p), "{p:?}");
        }
        let mut runner = proptest::test_runner::TestRunner::default();
        let encoded = proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| engine.encode(b));
        runner
            .run(&encoded, |p| {
                prop_assert!(is_base64(&p));
                Ok(())
            })
            .unwrap();
        let (valid, cases) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(4000));
        runner
            .run(&"[A-Za-z0-9+/=_. -]{0,24}", |p| {
                cases.set(cases.get() + 1);
                valid.set(valid.get() + usize::from(decodes(&p)));
                prop_assert_eq!(is_base64(&p), decodes(&p), "{:?}", p);
                Ok(())
            })
            .unwrap();
        assert!(
            valid.get() > 100 && valid.get() < cases.get(),
            "both answers were tried: {} of {} valid",
            valid.get(),
            cases.get()
        );
    }

    #[test]
    fn compact_media_is_the_originals_shape() {
        let Message::Text(t) = compact_media("AAEC") else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(v, serde_json::json!({"event": "media", "media": "AAEC"}));
    }

    #[test]
    fn twilio_format_forwards_the_same_bytes() {
        let raw = Utf8Bytes::from_static(r#"{"event":"start","x":1}"#);
        let Message::Text(t) = start(WireFormat::Twilio, &raw, 16000) else {
            panic!()
        };
        assert_eq!(t.as_bytes().as_ptr(), raw.as_ptr(), "shared, not copied");
    }

    #[test]
    fn pcm16_start_says_what_the_frames_hold() {
        let raw = Utf8Bytes::from_static(
            r#"{"event":"start","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#,
        );
        let Message::Text(t) = start(WireFormat::Pcm16, &raw, 24000) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(
            v["start"]["mediaFormat"],
            serde_json::json!({"encoding": "audio/l16", "sampleRate": 24000, "channels": 1})
        );
        assert_eq!(v["start"]["callSid"], "CA1");
    }

    #[test]
    fn pcm16_at_8_khz_is_exactly_the_g711_decode() {
        let codes: Vec<u8> = (0..=255).collect();
        let mut down = PcmDown::new(8000).unwrap();
        let mut frames = Vec::new();
        down.frames(&codes, |m| frames.push(m));
        let [Message::Binary(b)] = &frames[..] else {
            panic!("one frame: {frames:?}")
        };
        let samples: Vec<i16> = b
            .chunks(2)
            .map(|p| i16::from_le_bytes([p[0], p[1]]))
            .collect();
        assert_eq!(
            samples,
            codes.iter().map(|&c| mulaw::decode(c)).collect::<Vec<_>>()
        );
    }

    /// A whole file in one payload reaches a pcm16 backend as 20 ms frames, not one message
    /// of the file's length.
    #[test]
    fn long_payloads_go_out_in_20_ms_frames() {
        let codes = vec![0x7fu8; 48_000]; // 6 s at 8 kHz
        let mut down = PcmDown::new(24_000).unwrap();
        let mut sizes = Vec::new();
        down.frames(&codes, |m| sizes.push(m.len()));
        assert!(sizes.len() >= 290, "{} frames", sizes.len());
        assert!(sizes.iter().all(|&n| n <= 24_000 / 50 * 2), "{sizes:?}");
        // An ordinary 20 ms frame stays one message.
        let mut n = 0;
        down.frames(&codes[..160], |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_whole_wav_in_one_payload_is_its_audio() {
        let samples: Vec<u8> = (0..800).map(|i| (i % 251) as u8).collect();
        let file = wav::mulaw_file(&samples);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&file);
        let (mut stack, mut spill) = ([0; STACK_PAYLOAD], Vec::new());
        let decoded = decode_payload(&b64, &mut stack, &mut spill).unwrap();
        assert_eq!(
            caller_audio(&b64, decoded).unwrap().as_ref(),
            samples.as_slice()
        );
        let compact = compact_payload(&b64, decoded).unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(compact.as_ref())
                .unwrap(),
            samples
        );
        // Ordinary frames pass through untouched.
        let decoded = decode_payload("AAEC", &mut stack, &mut spill).unwrap();
        assert_eq!(decoded, [0, 1, 2]);
        assert!(matches!(
            compact_payload("AAEC", decoded),
            Some(Cow::Borrowed("AAEC"))
        ));
    }

    #[test]
    fn payloads_are_checked_as_they_are_decoded() {
        let (mut stack, mut spill) = ([0; STACK_PAYLOAD], vec![9; 8]);
        let mut decode =
            |payload: &str| decode_payload(payload, &mut stack, &mut spill).map(<[u8]>::to_vec);
        assert_eq!(decode("AAEC").unwrap(), [0, 1, 2]);
        // At the stack's size, one past it, and far past it: the same answer either way.
        for chars in [STACK_PAYLOAD / 3 * 4, STACK_PAYLOAD / 3 * 4 + 4, 4000] {
            let payload = "AAEC".repeat(chars / 4);
            let decoded = decode(&payload).unwrap();
            assert_eq!(decoded.len(), chars / 4 * 3);
            assert!(decoded.chunks(3).all(|c| c == [0, 1, 2]));
        }
        let long_bad = format!("{}!", "A".repeat(4000));
        for bad in [
            "not base64!",
            "AAE",
            "AAE=A",
            "AA\nEC",
            "AAEC\u{0}",
            long_bad.as_str(),
        ] {
            assert!(decode(bad).is_none(), "{bad:?} passed");
        }
    }
}
