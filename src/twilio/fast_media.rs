//! The media frame as Twilio writes it, read without the general parser.
//!
//! A call sends 50 of these a second and nothing else of note, and serde's derived reader was
//! the largest single cost of a forwarded frame. This reader takes a strict subset of JSON:
//! one object whose keys are `event`, `sequenceNumber`, `streamSid` and `media`, each at most
//! once; `media` an object of `track`, `chunk`, `timestamp` and `payload`, each at most once;
//! every key and value a string without escapes or control characters; JSON whitespace
//! anywhere between tokens. What it takes, it reads exactly as the general parser does (a
//! property test holds the two together). Anything else — another event, a number, an escape,
//! an unknown or repeated key, a missing payload, a syntax error — is left to the general
//! parser, so nothing it might accept or reject differently is decided here.

use std::borrow::Cow;

use super::messages::Media;

/// The media frame in `text`, or `None` when `text` is not one in the subset read here.
pub fn media(text: &str) -> Option<Media<'_>> {
    let mut r = Reader { text, at: 0 };
    let mut event = None;
    let mut sequence_number = None;
    let mut stream_sid = None;
    let mut body = None;
    r.expect(b'{')?;
    loop {
        let key = r.string()?;
        r.expect(b':')?;
        match key {
            "event" => once(&mut event, r.string()?)?,
            "sequenceNumber" => once(&mut sequence_number, r.string()?)?,
            "streamSid" => once(&mut stream_sid, r.string()?)?,
            "media" => once(&mut body, r.media_body()?)?,
            _ => return None,
        }
        if !r.more(b'}')? {
            break;
        }
    }
    r.end()?;
    if event? != "media" {
        return None;
    }
    let body = body?;
    Some(Media {
        sequence_number: Cow::Borrowed(sequence_number.unwrap_or("")),
        track: Cow::Borrowed(body.track.unwrap_or("inbound")),
        chunk: Cow::Borrowed(body.chunk.unwrap_or("")),
        timestamp: Cow::Borrowed(body.timestamp.unwrap_or("")),
        payload: Cow::Borrowed(body.payload?),
    })
}

#[derive(Default)]
struct Body<'a> {
    track: Option<&'a str>,
    chunk: Option<&'a str>,
    timestamp: Option<&'a str>,
    payload: Option<&'a str>,
}

/// Where a string without escapes ends: the first byte that ends a string or spoils a plain
/// one (a quote, a backslash, a control character) must be its closing quote. One pass:
/// sixteen bytes at a time by a fold the compiler turns into vector compares, then the exact
/// place within the block that has it. Most of a frame's strings are shorter than a block.
fn closing_quote(rest: &[u8]) -> Option<usize> {
    let special = |b: u8| (b == b'"') | (b == b'\\') | (b < 0x20);
    let mut at = 0;
    for block in rest.chunks_exact(16) {
        if block.iter().fold(false, |seen, &b| seen | special(b)) {
            break;
        }
        at += 16;
    }
    let end = at + rest[at..].iter().position(|&b| special(b))?;
    (rest[end] == b'"').then_some(end)
}

/// Sets a field seen for the first time; a repeated key is not for this reader.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    /// The next byte that is not JSON whitespace, consumed.
    fn token(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.at) {
            self.at += 1;
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
        }
        None
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.token()? == want).then_some(())
    }

    /// After a member: true for a comma (another member follows), false for `close`.
    fn more(&mut self, close: u8) -> Option<bool> {
        match self.token()? {
            b',' => Some(true),
            b if b == close => Some(false),
            _ => None,
        }
    }

    /// A string without escapes or control characters, borrowed from the text.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let len = closing_quote(&self.text.as_bytes()[self.at..])?;
        // Both ends are ASCII bytes of a `str`, so the slice is whole characters.
        let s = &self.text[self.at..self.at + len];
        self.at += len + 1;
        Some(s)
    }

    fn media_body(&mut self) -> Option<Body<'a>> {
        let mut body = Body::default();
        self.expect(b'{')?;
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.string()?;
            match key {
                "track" => once(&mut body.track, value)?,
                "chunk" => once(&mut body.chunk, value)?,
                "timestamp" => once(&mut body.timestamp, value)?,
                "payload" => once(&mut body.payload, value)?,
                _ => return None,
            }
            if !self.more(b'}')? {
                return Some(body);
            }
        }
    }

    /// Nothing but whitespace may follow the object.
    fn end(&mut self) -> Option<()> {
        self.token().is_none().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::messages::{outbound, parse_general, Event};
    use super::*;

    #[test]
    fn twilios_own_frames_take_the_fast_path() {
        let frame = outbound::media(7, "MZ1", "inbound", 3, 60, "no+JhoaJjpzSHxAKBgYJ");
        let fast = media(&frame).expect("Twilio's layout is read here");
        assert_eq!(Event::Media(fast), parse_general(&frame).unwrap());
        // Twilio's documented example, key order and all.
        let doc = r#"{"event":"media","sequenceNumber":"3","media":{"track":"outbound","chunk":"1","timestamp":"5","payload":"no+JhoaJjpzSHxAKBgYJ"},"streamSid":"MZxx"}"#;
        assert!(media(doc).is_some());
        let spaced = " {\n \"media\" : { \"payload\" :\"AAAA\" } ,\t\"event\":\"media\"}\r\n";
        assert_eq!(
            media(spaced).map(Event::Media),
            Some(parse_general(spaced).unwrap())
        );
    }

    #[test]
    fn a_strings_end_is_found_at_every_place_in_a_block() {
        for len in 0..70 {
            let plain = "a".repeat(len);
            assert_eq!(closing_quote(format!("{plain}\"x").as_bytes()), Some(len));
            assert_eq!(closing_quote(plain.as_bytes()), None, "unclosed");
            for at in 0..len {
                for spoiler in [b'\\', b'\n', 0x1f, 0] {
                    let mut spoilt = format!("{plain}\"").into_bytes();
                    spoilt[at] = spoiler;
                    assert_eq!(closing_quote(&spoilt), None, "{len} {at} {spoiler}");
                }
                // A quote earlier is the end; what follows it is not this string's.
                let mut early = format!("{plain}\\\"").into_bytes();
                early[at] = b'"';
                assert_eq!(closing_quote(&early), Some(at));
            }
        }
    }

    #[test]
    fn what_it_does_not_take_is_left_to_the_general_parser() {
        for text in [
            r#"{"event":"start","streamSid":"MZ"}"#,
            r#"{"event":"media","media":{"track":"inbound"}}"#,
            r#"{"event":"media","event":"media","media":{"payload":"AAAA"}}"#,
            r#"{"event":"media","media":{"payload":"AAAA","payload":"BBBB"}}"#,
            r#"{"event":"media","sequenceNumber":2,"media":{"payload":"AAAA"}}"#,
            r#"{"event":"media","media":{"payload":"AA\u0041A"}}"#,
            "{\"event\":\"media\",\"media\":{\"payload\":\"AA\tA\"}}",
            r#"{"event":"media","extra":"x","media":{"payload":"AAAA"}}"#,
            r#"{"event":"media","media":{"payload":"AAAA"}} x"#,
            r#"{"event":"media","media":{"payload":"AAAA"},}"#,
            r#"{"event":"media","media":{"payload":"AAAA"}"#,
            r#"{"event":"media","media":{"payload":"AAAA}}"#,
            r#"{"event":"media","media":null}"#,
            "",
            "{}",
        ] {
            assert!(media(text).is_none(), "{text:?} was taken");
        }
    }

    /// A JSON value for a member: mostly strings like Twilio's, sometimes what only the
    /// general parser reads (numbers, escapes, control characters, nulls, nested objects).
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            30 => "[A-Za-z0-9+/=é_ ]{0,12}".prop_map(|s| format!("\"{s}\"")),
            1 => any::<u32>().prop_map(|n| n.to_string()),
            1 => "[a-z\\\\\"\t\u{1}]{0,6}".prop_map(|s| format!("\"{s}\"")),
            1 => Just("null".to_string()),
            1 => Just("{}".to_string()),
        ]
    }

    fn ws() -> impl Strategy<Value = String> {
        prop_oneof![4 => Just(String::new()), 1 => "[ \t\r\n]{1,3}"]
    }

    /// Members of one object, in any order, each `"key": value` with whitespace about.
    fn members(parts: Vec<BoxedStrategy<Option<(String, String)>>>) -> BoxedStrategy<String> {
        (parts, ws(), ws())
            .prop_flat_map(|(parts, a, b)| {
                let members: Vec<String> = parts
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{a}\"{k}\"{b}:{a}{v}{b}"))
                    .collect();
                Just(members).prop_shuffle()
            })
            .prop_map(|members| format!("{{{}}}", members.join(",")))
            .boxed()
    }

    /// A member that is there with probability `weight` in 10.
    fn maybe(
        key: &'static str,
        value: BoxedStrategy<String>,
        weight: u32,
    ) -> BoxedStrategy<Option<(String, String)>> {
        prop_oneof![
            10 - weight => Just(None),
            weight => value.prop_map(move |v| Some((key.to_string(), v))),
        ]
        .boxed()
    }

    /// Mostly frames in Twilio's shape, with now and then what only the general parser
    /// reads: a repeated or unknown key, another event, a number, an escape.
    fn frame() -> impl Strategy<Value = String> {
        let body = members(vec![
            maybe("track", value().boxed(), 7),
            maybe("chunk", value().boxed(), 7),
            maybe("timestamp", value().boxed(), 7),
            maybe("payload", value().boxed(), 9),
            maybe("payload", value().boxed(), 1),
            maybe("other", value().boxed(), 1),
        ]);
        let event = prop_oneof![8 => Just("\"media\"".to_string()), 1 => value()].boxed();
        let top = members(vec![
            maybe("event", event, 9),
            maybe("event", value().boxed(), 1),
            maybe("sequenceNumber", value().boxed(), 7),
            maybe("streamSid", value().boxed(), 7),
            maybe("media", body, 9),
            maybe("media", value().boxed(), 1),
            maybe("x", value().boxed(), 1),
        ]);
        let tail = prop_oneof![8 => Just(""), 1 => Just(","), 1 => Just("}")];
        (top, ws(), tail).prop_map(|(o, w, tail)| format!("{w}{o}{w}{tail}"))
    }

    /// Whatever the fast path takes, the general parser reads the same way; and the
    /// generated texts reach the fast path often enough for that to mean something.
    #[test]
    fn agrees_with_the_general_parser() {
        let cases = 4000;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
        let taken = std::cell::Cell::new(0u32);
        runner
            .run(&frame(), |text| {
                if let Some(fast) = media(&text) {
                    taken.set(taken.get() + 1);
                    prop_assert_eq!(Ok(Event::Media(fast)), parse_general(&text), "{}", text);
                }
                Ok(())
            })
            .unwrap();
        assert!(
            taken.get() >= cases / 10,
            "only {} of {cases} generated texts took the fast path",
            taken.get()
        );
    }
}
