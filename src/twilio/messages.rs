//! Twilio Media Streams messages: what Twilio sends on the WebSocket, parsed in one pass.
//!
//! Media frames are parsed borrowing from the received text, so a frame costs no allocation
//! unless its strings carry JSON escapes. Control messages (rare) are owned.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One message from Twilio.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    Connected(Connected),
    Start(Box<Start>),
    Media(Media<'a>),
    Dtmf(Dtmf),
    Mark(Mark),
    Stop(Stop),
    /// An event this service does not know: skipped, never fatal.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub protocol: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    pub encoding: String,
    pub sample_rate: u32,
    pub channels: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub sequence_number: String,
    pub stream_sid: String,
    pub account_sid: String,
    pub call_sid: String,
    pub tracks: Vec<String>,
    pub media_format: Option<MediaFormat>,
    /// Studio's stream parameters; values are strings on the wire.
    pub custom_parameters: BTreeMap<String, String>,
}

impl Start {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.custom_parameters
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media<'a> {
    pub sequence_number: Cow<'a, str>,
    pub track: Cow<'a, str>,
    pub chunk: Cow<'a, str>,
    pub timestamp: Cow<'a, str>,
    /// Base64 mu-law, 8 kHz mono; 160 bytes (20 ms) in practice.
    pub payload: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtmf {
    pub track: String,
    pub digit: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub account_sid: String,
    pub call_sid: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a JSON object with an `event`: {0}")]
    Json(String),
    #[error("`{event}` message without `{field}`")]
    Missing {
        event: &'static str,
        field: &'static str,
    },
}

// The wire shapes. Every field optional so one pass reads any event; the checks that a
// given event carries what it needs are in `parse`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Text<'a>,
    #[serde(borrow, default)]
    sequence_number: Option<Counter<'a>>,
    // Borrowed: every media frame carries it, and it is only kept from `start`.
    #[serde(borrow, default)]
    stream_sid: Option<Text<'a>>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    start: Option<StartBody>,
    #[serde(borrow, default)]
    media: Option<MediaBody<'a>>,
    #[serde(default)]
    dtmf: Option<DtmfBody>,
    #[serde(default)]
    mark: Option<MarkBody>,
    #[serde(default)]
    stop: Option<StopBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    #[serde(default)]
    stream_sid: Option<String>,
    #[serde(default)]
    account_sid: String,
    #[serde(default)]
    call_sid: String,
    // Twilio sends a list; the original service's own test client sent one string.
    #[serde(default, deserialize_with = "one_or_many")]
    tracks: Vec<String>,
    #[serde(default)]
    media_format: Option<MediaFormat>,
    #[serde(default)]
    custom_parameters: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct MediaBody<'a> {
    #[serde(borrow, default)]
    track: Option<Text<'a>>,
    #[serde(borrow, default)]
    chunk: Option<Counter<'a>>,
    #[serde(borrow, default)]
    timestamp: Option<Counter<'a>>,
    #[serde(borrow)]
    payload: Option<Text<'a>>,
}

/// A string that borrows from the message when it holds no escapes. serde's own `Cow`
/// always copies; this is what keeps a media frame allocation-free.
struct Text<'a>(Cow<'a, str>);

/// Reads a [`Text`]; `numbers` also takes a JSON number, written as its digits.
struct TextVisitor {
    numbers: bool,
}

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Text<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.numbers {
            "a string or a number"
        } else {
            "a string"
        })
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v.to_string())))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.number(v)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.number(v)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.number(v)
    }
}

impl TextVisitor {
    fn number<'de, E: serde::de::Error>(self, v: impl ToString) -> Result<Text<'de>, E> {
        if self.numbers {
            Ok(Text(Cow::Owned(v.to_string())))
        } else {
            Err(E::custom("expected a string"))
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor { numbers: false })
    }
}

/// A counter (`sequenceNumber`, `chunk`, `timestamp`): Twilio sends strings; some clients,
/// the original service's test client among them, send numbers or words. Any is kept as text.
struct Counter<'a>(Text<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Counter<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor { numbers: true })
            .map(Counter)
    }
}

fn counter(c: Option<Counter<'_>>) -> Option<Cow<'_, str>> {
    c.map(|c| c.0 .0)
}

/// A list, or one string standing for a list of one.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(one)) => vec![one],
        Some(OneOrMany::Many(many)) => many,
    })
}

fn cow(t: Option<Text<'_>>) -> Option<Cow<'_, str>> {
    t.map(|t| t.0)
}

#[derive(Deserialize)]
struct DtmfBody {
    #[serde(default)]
    track: String,
    digit: Option<String>,
}

#[derive(Deserialize)]
struct MarkBody {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StopBody {
    #[serde(default)]
    account_sid: String,
    #[serde(default)]
    call_sid: String,
}

/// Parses one text message from Twilio. Media frames in Twilio's own shape take a fast path
/// (see [`super::fast_media`]); everything else, and anything that path does not take, the
/// general one.
pub fn parse(text: &str) -> Result<Event<'_>, ParseError> {
    match super::fast_media::media(text) {
        Some(media) => Ok(Event::Media(media)),
        None => parse_general(text),
    }
}

/// Parses any message with serde: every event, every shape the service accepts.
pub(crate) fn parse_general(text: &str) -> Result<Event<'_>, ParseError> {
    let env: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let seq = counter(env.sequence_number).unwrap_or(Cow::Borrowed(""));
    Ok(match env.event.0.as_ref() {
        "connected" => Event::Connected(Connected {
            protocol: env.protocol.unwrap_or_default(),
            version: env.version.unwrap_or_default(),
        }),
        "start" => {
            let body = env.start.ok_or(ParseError::Missing {
                event: "start",
                field: "start",
            })?;
            let stream_sid = cow(env.stream_sid)
                .map(Cow::into_owned)
                .or(body.stream_sid)
                .filter(|s| !s.is_empty())
                .ok_or(ParseError::Missing {
                    event: "start",
                    field: "streamSid",
                })?;
            let custom_parameters = body
                .custom_parameters
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect();
            Event::Start(Box::new(Start {
                sequence_number: seq.into_owned(),
                stream_sid,
                account_sid: body.account_sid,
                call_sid: body.call_sid,
                tracks: body.tracks,
                media_format: body.media_format,
                custom_parameters,
            }))
        }
        "media" => {
            let body = env.media.ok_or(ParseError::Missing {
                event: "media",
                field: "media",
            })?;
            Event::Media(Media {
                sequence_number: seq,
                track: cow(body.track).unwrap_or(Cow::Borrowed("inbound")),
                chunk: counter(body.chunk).unwrap_or_default(),
                timestamp: counter(body.timestamp).unwrap_or_default(),
                payload: cow(body.payload).ok_or(ParseError::Missing {
                    event: "media",
                    field: "media.payload",
                })?,
            })
        }
        "dtmf" => {
            let body = env.dtmf.ok_or(ParseError::Missing {
                event: "dtmf",
                field: "dtmf",
            })?;
            Event::Dtmf(Dtmf {
                track: body.track,
                digit: body.digit.ok_or(ParseError::Missing {
                    event: "dtmf",
                    field: "dtmf.digit",
                })?,
            })
        }
        "mark" => Event::Mark(Mark {
            name: env.mark.and_then(|m| m.name).unwrap_or_default(),
        }),
        "stop" => {
            let body = env.stop.unwrap_or(StopBody {
                account_sid: String::new(),
                call_sid: String::new(),
            });
            Event::Stop(Stop {
                account_sid: body.account_sid,
                call_sid: body.call_sid,
            })
        }
        other => Event::Unknown(other.to_string()),
    })
}

/// Builders for the messages Twilio sends, used by the tools and tests that play Twilio's part.
pub mod outbound {
    use serde_json::json;
    use std::collections::BTreeMap;

    pub fn connected() -> String {
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string()
    }

    pub struct StartInfo<'a> {
        pub account_sid: &'a str,
        pub call_sid: &'a str,
        pub stream_sid: &'a str,
        pub tracks: &'a [&'a str],
        pub custom_parameters: &'a BTreeMap<String, String>,
    }

    pub fn start(seq: u64, info: &StartInfo<'_>) -> String {
        json!({
            "event": "start",
            "sequenceNumber": seq.to_string(),
            "streamSid": info.stream_sid,
            "start": {
                "accountSid": info.account_sid,
                "streamSid": info.stream_sid,
                "callSid": info.call_sid,
                "tracks": info.tracks,
                "customParameters": info.custom_parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        })
        .to_string()
    }

    /// A `media` message; `payload_b64` is base64 of mu-law bytes.
    pub fn media(
        seq: u64,
        stream_sid: &str,
        track: &str,
        chunk: u64,
        timestamp_ms: u64,
        payload_b64: &str,
    ) -> String {
        // Written by hand: it is the one message sent 50 times a second per call.
        format!(
            r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"{timestamp_ms}","payload":"{payload_b64}"}},"streamSid":"{stream_sid}"}}"#
        )
    }

    pub fn dtmf(seq: u64, stream_sid: &str, digit: &str) -> String {
        json!({
            "event": "dtmf", "streamSid": stream_sid, "sequenceNumber": seq.to_string(),
            "dtmf": {"track": "inbound_track", "digit": digit}
        })
        .to_string()
    }

    pub fn mark(seq: u64, stream_sid: &str, name: &str) -> String {
        json!({
            "event": "mark", "sequenceNumber": seq.to_string(), "streamSid": stream_sid,
            "mark": {"name": name}
        })
        .to_string()
    }

    pub fn stop(seq: u64, account_sid: &str, call_sid: &str, stream_sid: &str) -> String {
        json!({
            "event": "stop", "sequenceNumber": seq.to_string(), "streamSid": stream_sid,
            "stop": {"accountSid": account_sid, "callSid": call_sid}
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes copied from Twilio's Media Streams documentation.
    const START: &str = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"ACxx","streamSid":"MZxx","callSid":"CAxx","tracks":["inbound","outbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"backendIds":"[\"rec\"]","n":5}},"streamSid":"MZxx"}"#;
    const MEDIA: &str = r#"{"event":"media","sequenceNumber":"3","media":{"track":"outbound","chunk":"1","timestamp":"5","payload":"no+JhoaJjpzSHxAKBgYJ"},"streamSid":"MZxx"}"#;

    #[test]
    fn parses_every_event() {
        let Event::Start(start) = parse(START).unwrap() else {
            panic!()
        };
        assert_eq!(start.stream_sid, "MZxx");
        assert_eq!(start.call_sid, "CAxx");
        assert_eq!(start.tracks, vec!["inbound", "outbound"]);
        assert_eq!(start.media_format.as_ref().unwrap().sample_rate, 8000);
        assert_eq!(start.param("backendIds"), Some(r#"["rec"]"#));
        assert_eq!(start.param("n"), Some("5"));

        let Event::Media(media) = parse(MEDIA).unwrap() else {
            panic!()
        };
        assert_eq!(media.track, "outbound");
        assert_eq!(media.chunk, "1");
        assert_eq!(media.payload, "no+JhoaJjpzSHxAKBgYJ");
        assert!(
            matches!(media.payload, Cow::Borrowed(_)),
            "no copy per frame"
        );

        let connected = parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
        assert_eq!(
            connected.unwrap(),
            Event::Connected(Connected {
                protocol: "Call".into(),
                version: "1.0.0".into()
            })
        );
        let dtmf = parse(
            r#"{"event":"dtmf","streamSid":"MZ","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#,
        );
        assert_eq!(
            dtmf.unwrap(),
            Event::Dtmf(Dtmf {
                track: "inbound_track".into(),
                digit: "1".into()
            })
        );
        let mark = parse(
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ","mark":{"name":"my label"}}"#,
        );
        assert_eq!(
            mark.unwrap(),
            Event::Mark(Mark {
                name: "my label".into()
            })
        );
        let stop = parse(
            r#"{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"AC","callSid":"CA"},"streamSid":"MZ"}"#,
        );
        assert_eq!(
            stop.unwrap(),
            Event::Stop(Stop {
                account_sid: "AC".into(),
                call_sid: "CA".into()
            })
        );
        assert_eq!(
            parse(r#"{"event":"clear","streamSid":"MZ"}"#).unwrap(),
            Event::Unknown("clear".into())
        );
    }

    #[test]
    fn rejects_what_twilio_never_sends() {
        assert!(matches!(parse("not json"), Err(ParseError::Json(_))));
        assert!(matches!(
            parse(r#"{"streamSid":"x"}"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(parse(r#"[1,2]"#), Err(ParseError::Json(_))));
        assert_eq!(
            parse(r#"{"event":"media","media":{"track":"inbound"}}"#),
            Err(ParseError::Missing {
                event: "media",
                field: "media.payload"
            })
        );
        assert_eq!(
            parse(r#"{"event":"start","start":{"callSid":"CA"}}"#),
            Err(ParseError::Missing {
                event: "start",
                field: "streamSid"
            })
        );
    }

    #[test]
    fn builders_round_trip() {
        let params = BTreeMap::from([("backendIds".to_string(), "rec".to_string())]);
        let info = outbound::StartInfo {
            account_sid: "AC1",
            call_sid: "CA1",
            stream_sid: "MZ1",
            tracks: &["inbound"],
            custom_parameters: &params,
        };
        let Event::Start(start) = parse(&outbound::start(1, &info)).unwrap() else {
            panic!()
        };
        assert_eq!(start.param("backendIds"), Some("rec"));
        let text = outbound::media(2, "MZ1", "inbound", 1, 20, "AAAA");
        let Event::Media(m) = parse(&text).unwrap() else {
            panic!()
        };
        assert_eq!((m.chunk.as_ref(), m.timestamp.as_ref()), ("1", "20"));
    }

    /// What the original service's own test client sent: `tracks` as one string, counters
    /// as numbers and words, a whole WAV file as one payload.
    #[test]
    fn the_originals_test_client_is_understood() {
        let start = r#"{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","tracks":"inbound","customParameters":{}},"streamSid":"MZ1"}"#;
        let Event::Start(start) = parse(start).unwrap() else {
            panic!()
        };
        assert_eq!(start.tracks, ["inbound"]);
        let media = r#"{"event":"media","sequenceNumber":2,"media":{"track":"inbound","chunk":1,"timestamp":"now","payload":"UklGRgAA"},"streamSid":"MZ1"}"#;
        let Event::Media(media) = parse(media).unwrap() else {
            panic!()
        };
        assert_eq!(media.sequence_number, "2");
        assert_eq!(media.chunk, "1");
        assert_eq!(media.timestamp, "now");
    }
}
