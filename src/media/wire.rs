//! What each backend wire format puts on the socket (SPEC section 3, "Backend wire formats").
//!
//! `twilio` forwards the bytes Twilio sent, shared between every backend of the call without a
//! copy; `compact` is the original's `{"event":"media","media":"<base64>"}` form.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::config::WireFormat;
use crate::twilio::messages::{outbound, Start};

/// The compact form's control messages never change; built once.
const COMPACT_START: &str = r#"{"event":"start"}"#;
const COMPACT_STOP: &str = r#"{"event":"stop"}"#;

/// Re-wraps received text for the backend client, without copying it.
pub fn forward(text: Bytes) -> Message {
    // The bytes came out of a text frame and are UTF-8 already; the check is a cheap scan
    // that keeps this crate free of `unsafe`, and the lossy copy never happens in practice.
    Message::Text(
        Utf8Bytes::try_from(text.clone())
            .unwrap_or_else(|_| String::from_utf8_lossy(&text).into_owned().into()),
    )
}

/// The `start` a backend gets on every (re)connect.
pub fn start(format: WireFormat, raw: &Bytes) -> Message {
    match format {
        WireFormat::Twilio => forward(raw.clone()),
        WireFormat::Compact => Message::Text(Utf8Bytes::from_static(COMPACT_START)),
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

/// `stop` for a backend when Twilio's own `stop` never came (the socket dropped, the call
/// idled out, the service is shutting down): backends always see the call end.
pub fn synthetic_stop(format: WireFormat, start: &Start) -> Message {
    match format {
        WireFormat::Twilio => Message::Text(
            outbound::stop(0, &start.account_sid, &start.call_sid, &start.stream_sid).into(),
        ),
        WireFormat::Compact => compact_stop(),
    }
}

pub fn compact_stop() -> Message {
    Message::Text(Utf8Bytes::from_static(COMPACT_STOP))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let raw = Bytes::from_static(br#"{"event":"start","x":1}"#);
        let Message::Text(t) = start(WireFormat::Twilio, &raw) else {
            panic!()
        };
        assert_eq!(t.as_bytes().as_ptr(), raw.as_ptr(), "shared, not copied");
    }
}
