//! Twilio's stream status callbacks: what Twilio itself saw of a Media Stream, posted as a
//! form to the `statusCallback` of `<Stream>` (or of the Stream resource): `stream-started`,
//! `stream-stopped`, or `stream-error` with Twilio's error text — the only word there is of a
//! stream that never reached the proxy (a failed handshake, a TLS error, a timeout).

/// One callback, as Twilio posts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    pub stream_sid: String,
    pub call_sid: String,
    pub account_sid: String,
    /// The stream's name, when it was given one.
    pub name: String,
    pub event: StreamEvent,
    /// Twilio's error text, with `stream-error`.
    pub error: Option<String>,
    /// When Twilio says it happened, as it wrote it.
    pub timestamp: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamEvent {
    Started,
    Stopped,
    Error,
}

impl StreamEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEvent::Started => "stream-started",
            StreamEvent::Stopped => "stream-stopped",
            StreamEvent::Error => "stream-error",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatusError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0}: at most {1} characters, no control characters")]
    Unfit(&'static str, usize),
    #[error("StreamEvent is not stream-started, stream-stopped or stream-error")]
    UnknownEvent,
}

/// The longest error text kept: Twilio's are a line; anything longer is cut.
const MAX_ERROR: usize = 512;

/// Reads a status callback's form body. Ids and names are checked (they are shown and used
/// as keys); Twilio's error text is kept to a line, without control characters.
pub fn parse(body: &[u8]) -> Result<StreamStatus, StatusError> {
    let mut fields: [Option<String>; 7] = Default::default();
    const NAMES: [&str; 7] = [
        "StreamSid",
        "CallSid",
        "AccountSid",
        "StreamName",
        "StreamEvent",
        "StreamError",
        "Timestamp",
    ];
    for (k, v) in form_urlencoded::parse(body) {
        if let Some(i) = NAMES.iter().position(|n| *n == k) {
            fields[i] = Some(v.into_owned());
        }
    }
    let [stream_sid, call_sid, account_sid, name, event, error, timestamp] = fields;
    let checked = |field: &'static str, value: Option<String>, max: usize, required: bool| {
        let value = value.unwrap_or_default();
        if required && value.is_empty() {
            return Err(StatusError::Missing(field));
        }
        if value.chars().count() > max || value.chars().any(char::is_control) {
            return Err(StatusError::Unfit(field, max));
        }
        Ok(value)
    };
    let event = match event.as_deref().map(str::trim) {
        None | Some("") => return Err(StatusError::Missing("StreamEvent")),
        Some("stream-started") => StreamEvent::Started,
        Some("stream-stopped") => StreamEvent::Stopped,
        Some("stream-error") => StreamEvent::Error,
        Some(_) => return Err(StatusError::UnknownEvent),
    };
    let error = error
        .map(|e| {
            e.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_ERROR)
                .collect::<String>()
                .trim()
                .to_string()
        })
        .filter(|e| !e.is_empty());
    Ok(StreamStatus {
        stream_sid: checked("StreamSid", stream_sid, 64, true)?,
        call_sid: checked("CallSid", call_sid, 64, true)?,
        account_sid: checked("AccountSid", account_sid, 64, false)?,
        name: checked("StreamName", name, 128, false)?,
        event,
        error,
        timestamp: checked("Timestamp", timestamp, 64, false)?,
    })
}

/// The Media Streams error code (31900–31999) Twilio's error text names, if it names one:
/// the label metrics count errors by, so that their number stays fixed whatever the text.
pub fn error_code(error: &str) -> Option<u16> {
    let bytes = error.as_bytes();
    bytes
        .windows(5)
        .enumerate()
        .filter(|(i, w)| {
            w.iter().all(u8::is_ascii_digit)
                && (*i == 0 || !bytes[i - 1].is_ascii_digit())
                && bytes.get(i + 5).is_none_or(|b| !b.is_ascii_digit())
        })
        .filter_map(|(_, w)| std::str::from_utf8(w).ok()?.parse::<u16>().ok())
        .find(|code| (31900..=31999).contains(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
            .into_bytes()
    }

    #[test]
    fn twilios_callback_is_read_as_it_is_posted() {
        let body = form(&[
            ("AccountSid", "AC00000000000000000000000000000001"),
            ("CallSid", "CA00000000000000000000000000000002"),
            ("StreamSid", "MZ00000000000000000000000000000003"),
            ("StreamName", "call-proxy-FN1"),
            ("StreamEvent", "stream-error"),
            (
                "StreamError",
                "31920: Stream - WebSocket - Handshake Error\r\nmore",
            ),
            ("Timestamp", "2026-12-04T20:00:00.000Z"),
        ]);
        let s = parse(&body).unwrap();
        assert_eq!(s.event, StreamEvent::Error);
        assert_eq!(s.stream_sid, "MZ00000000000000000000000000000003");
        assert_eq!(s.name, "call-proxy-FN1");
        let error = s.error.unwrap();
        assert!(!error.contains('\n'), "one line: {error:?}");
        assert_eq!(error_code(&error), Some(31920));
    }

    #[test]
    fn what_is_missing_or_unfit_is_named() {
        assert_eq!(
            parse(&form(&[
                ("CallSid", "CA1"),
                ("StreamEvent", "stream-started")
            ])),
            Err(StatusError::Missing("StreamSid"))
        );
        assert_eq!(
            parse(&form(&[("StreamSid", "MZ1"), ("CallSid", "CA1")])),
            Err(StatusError::Missing("StreamEvent"))
        );
        assert_eq!(
            parse(&form(&[
                ("StreamSid", "MZ1"),
                ("CallSid", "CA1"),
                ("StreamEvent", "stream-exploded")
            ])),
            Err(StatusError::UnknownEvent)
        );
        assert_eq!(
            parse(&form(&[
                ("StreamSid", "MZ1\nforged"),
                ("CallSid", "CA1"),
                ("StreamEvent", "stream-started")
            ])),
            Err(StatusError::Unfit("StreamSid", 64))
        );
    }

    #[test]
    fn only_a_media_streams_code_counts_as_one() {
        assert_eq!(error_code("31930 buffer overflow"), Some(31930));
        assert_eq!(error_code("Error 31901: timeout"), Some(31901));
        assert_eq!(error_code("code 11200 then 31910"), Some(31910));
        assert_eq!(error_code("319200"), None, "six digits are not a code");
        assert_eq!(error_code("11200 HTTP retrieval failure"), None);
        assert_eq!(error_code(""), None);
    }
}
