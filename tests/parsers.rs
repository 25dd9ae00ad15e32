//! Property tests: every parser that faces the network is fed thousands of generated inputs,
//! hostile and near-valid, and must answer (a value or an error), never panic (SPEC section 4).

use call_proxy::gate::route_token::{self, Claims};
use call_proxy::twilio::{messages, signature};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 3000,
        ..ProptestConfig::default()
    }
}

/// JSON that is nearly a Twilio message: the right keys with arbitrary values.
fn twilio_like() -> impl Strategy<Value = String> {
    let event = prop_oneof![
        Just("connected"),
        Just("start"),
        Just("media"),
        Just("dtmf"),
        Just("mark"),
        Just("stop"),
        Just("clear"),
        Just(""),
    ];
    let scalar = prop_oneof![
        any::<String>().prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ];
    (event, scalar.clone(), scalar.clone(), scalar.clone(), scalar).prop_map(
        |(event, a, b, c, d)| {
            serde_json::json!({
                "event": event,
                "sequenceNumber": a,
                "streamSid": b,
                "start": {"streamSid": c, "callSid": d, "tracks": a, "customParameters": {"routeToken": b, "x": c}, "mediaFormat": d},
                "media": {"track": a, "chunk": b, "timestamp": c, "payload": d},
                "dtmf": {"digit": a, "track": b},
                "mark": {"name": c},
                "stop": {"callSid": d},
            })
            .to_string()
        },
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn twilio_messages_never_panic(text in any::<String>()) {
        let _ = messages::parse(&text);
    }

    #[test]
    fn near_valid_twilio_messages_never_panic(text in twilio_like()) {
        let _ = messages::parse(&text);
        // Cut anywhere on a character boundary: a torn frame.
        for cut in [1, text.len() / 2, text.len().saturating_sub(1)] {
            if text.is_char_boundary(cut) {
                let _ = messages::parse(&text[..cut]);
            }
        }
    }

    #[test]
    fn route_tokens_never_panic_and_never_verify_when_changed(
        raw in any::<String>(),
        caller in "\\PC{0,80}",
        ids in proptest::collection::vec("\\PC{0,20}", 0..5),
        flip in any::<prop::sample::Index>(),
        expires_at in any::<u64>(),
    ) {
        let secret = "a-route-token-secret-for-tests";
        let _ = route_token::verify(secret, &raw, 1);
        let claims = Claims {
            caller,
            backend_ids: ids,
            backend_hosts: vec![],
            expires_at,
            call_sid: None,
            nonce: 3,
            handoff_of: None,
        };
        let token = route_token::issue(secret, &claims);
        let verified = route_token::verify(secret, &token, 0);
        if expires_at > 0 {
            prop_assert_eq!(verified.unwrap(), claims);
        }
        let mut bytes = token.clone().into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        if let Ok(changed) = String::from_utf8(bytes) {
            if changed != token {
                prop_assert!(route_token::verify(secret, &changed, 0).is_err());
            }
        }
    }

    #[test]
    fn signature_inputs_never_panic(
        header in any::<String>(),
        url in any::<String>(),
        params in proptest::collection::vec((any::<String>(), any::<String>()), 0..6),
        presented in any::<String>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = signature::parse_settings(&header);
        for variant in signature::url_variants(&url) {
            let data = signature::signed_data(&variant, &params);
            prop_assert!(!signature::verify(signature::Algorithm::HmacSha1, b"token", &data, &presented)
                || presented.trim() == signature::sign(signature::Algorithm::HmacSha1, b"token", &data));
        }
        let _ = signature::body_sha256_param(&url);
        // Form bodies as the guard reads them.
        let pairs: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let _ = signature::signed_data("https://proxy.example.com/validate-pin", &pairs);
    }

    #[test]
    fn signed_urls_keep_their_variants_well_formed(
        host in "[a-z0-9.-]{1,30}",
        port in proptest::option::of(any::<u16>()),
        path in "(/[a-zA-Z0-9%._~-]{0,10}){0,3}",
        query in proptest::option::of("[a-zA-Z0-9=&%]{0,30}"),
        scheme in prop_oneof![Just("https"), Just("http"), Just("wss"), Just("ws")],
    ) {
        let mut url = format!("{scheme}://{host}");
        if let Some(p) = port { url.push_str(&format!(":{p}")); }
        url.push_str(&path);
        if let Some(q) = &query { url.push('?'); url.push_str(q); }
        let variants = signature::url_variants(&url);
        prop_assert_eq!(&variants[0], &url, "the URL itself is always tried first");
        for v in &variants {
            let prefix = format!("{scheme}://");
            prop_assert!(v.starts_with(&prefix));
        }
    }
}
