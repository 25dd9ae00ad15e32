//! Teams on the Node.js original move over without editing anything: its test client's
//! messages as they ship, its PIN service (`SERVER_API_HOST`), its debug routes
//! (`ENABLE_DEBUG_ROUTES`), its status codes. The messages here are written from the
//! original's documented shapes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use call_proxy::config::WireFormat;
use common::*;
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The original's test client, verbatim in shape: its PIN service's numeric id (which this
/// table does not know) and the host it connects, `tracks` as a string, counters as strings,
/// `timestamp` as a word, and a whole WAV file — real recorded speech — as one payload. The
/// compact backend on the named host decodes every byte of the file's audio.
#[tokio::test]
async fn the_originals_test_client_as_it_ships_reaches_its_backend_host() {
    let mut speaker = Backend::start(Behaviour::Normal).await;
    // The original names `localhost:8888`; the test holds a port of its own, named the same way.
    let host = format!("localhost:{}", speaker.addr.port());
    let proxy = Proxy::start(settings(&[])).await;
    let file = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/audio-samples/testing-123.wav"
    ))
    .unwrap();
    let audio = call_proxy::audio::wav::read(&file).unwrap().data;

    let mut call = TwilioCall::connect(&proxy, "orig").await;
    let hosts = serde_json::to_string(&[&host]).unwrap();
    let start = json!({
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "ACtest",
            "streamSid": "MZorig",
            "callSid": "CAorig",
            "tracks": "inbound",
            "customParameters": {"backendIds": "[\"123123\"]", "backendHosts": hosts},
        },
        "streamSid": "MZorig",
    });
    call.send_text(start.to_string()).await;
    let media = json!({
        "event": "media",
        "sequenceNumber": "2",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "test", "payload": B64.encode(&file)},
        "streamSid": "MZorig",
    });
    call.send_text(media.to_string()).await;
    let stop = json!({
        "event": "stop",
        "sequenceNumber": "3",
        "stop": {"accountSid": "ACtest", "callSid": "CAorig"},
        "streamSid": "MZorig",
    });
    call.send_text(stop.to_string()).await;
    assert_eq!(call.closed().await.map(|f| u16::from(f.code)), Some(1000));

    speaker.wait_for_stop().await;
    let texts = speaker.texts();
    assert_eq!(
        texts[0], r#"{"event":"start"}"#,
        "the original's compact form"
    );
    let got = payloads(&texts);
    assert_eq!(got.len(), 1);
    assert_eq!(
        B64.decode(&got[0]).unwrap(),
        audio,
        "every byte of the file's audio, header stripped"
    );
}

/// One request to the PIN service: its path, its `apiKey` header, its body.
type Asked = (String, Option<String>, Value);

/// The original's PIN service, as its `server-api` answers: records what it was asked.
struct PinService {
    url: String,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl PinService {
    async fn start() -> PinService {
        use axum::extract::OriginalUri;
        use axum::http::{HeaderMap, StatusCode};
        let asked: Arc<Mutex<Vec<Asked>>> = Arc::default();
        let noted = asked.clone();
        let app = axum::Router::new().fallback(
            move |uri: OriginalUri, headers: HeaderMap, body: axum::body::Bytes| {
                let noted = noted.clone();
                async move {
                    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let key = headers
                        .get("apikey")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    noted
                        .lock()
                        .unwrap()
                        .push((uri.path().to_string(), key, body.clone()));
                    match body["pin"].as_str() {
                        Some("4242") => (
                            StatusCode::OK,
                            axum::Json(json!({
                                "authenticated": true,
                                "backendIds": [123123],
                                "backendHosts": ["localhost:8888"],
                            })),
                        ),
                        Some("5000") => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({}))),
                        Some("9999") => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            (StatusCode::OK, axum::Json(json!({"authenticated": true})))
                        }
                        _ => (
                            StatusCode::UNAUTHORIZED,
                            axum::Json(json!({"authenticated": false})),
                        ),
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        PinService { url, asked }
    }
}

async fn validate(p: &ServiceProcess, pin: &str, caller: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(p.url("/validate-pin"))
        .json(&json!({"pin": pin, "callerId": caller}))
        .send()
        .await
        .unwrap()
}

async fn attempts(p: &ServiceProcess, caller: &str) -> u16 {
    reqwest::Client::new()
        .get(p.url(&format!("/auth-attempts/{caller}")))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `SERVER_API_HOST`, `SERVER_API_KEY` and `SERVER_API_TIMEOUT_MS` as the original reads them:
/// the path, the `apiKey` header and the body it sends; a good answer becomes the
/// `/validate-pin` answer; a 4xx is a wrong PIN (counted); a 5xx or no answer in time is 503,
/// never a pass and never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_originals_pin_service_is_asked_as_it_was() {
    let service = PinService::start().await;
    let url = service.url.clone();
    let proxy = ServiceProcess::start(&[
        ("SERVER_API_HOST", url.as_str()),
        ("SERVER_API_TIMEOUT_MS", "500"),
    ])
    .await;

    let r = validate(&proxy, "4242", "+15557770001").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["authenticated"], true);
    assert_eq!(v["backendIds"], r#"["123123"]"#);
    assert_eq!(v["backendHosts"], r#"["localhost:8888"]"#);
    {
        let asked = service.asked.lock().unwrap();
        let (path, key, body) = &asked[0];
        assert_eq!(path, "/server-api/audio-proxy/authenticate");
        assert_eq!(key.as_deref(), Some("test-key"), "SERVER_API_KEY as apiKey");
        assert_eq!(body, &json!({"pin": "4242"}));
    }

    // A 4xx: a wrong PIN, counted against the caller.
    let r = validate(&proxy, "0000", "+15557770002").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["authenticated"], false);
    assert_eq!(v["attempts"]["attempts"], 1);

    // A 5xx, and an answer later than SERVER_API_TIMEOUT_MS: 503, nothing counted.
    for (pin, caller) in [("5000", "+15557770003"), ("9999", "+15557770004")] {
        let r = validate(&proxy, pin, caller).await;
        assert_eq!(r.status(), 503, "pin {pin}");
        let v: Value = r.json().await.unwrap();
        assert!(v.get("authenticated").is_none(), "{v}");
        assert_eq!(attempts(&proxy, caller).await, 404, "nothing counted");
    }
}

/// `ENABLE_DEBUG_ROUTES`: without it, `POST /auth-attempts/{id}` and `POST
/// /blocked-callers/{id}` are not there (404, even with the key); with it they count and
/// block (201), and still need the API key.
#[tokio::test]
async fn debug_routes_answer_only_when_enabled_and_only_with_the_key() {
    let mut s = settings(&[("rec", "ws://127.0.0.1:9/media", WireFormat::Twilio)]);
    s.security.enable_debug_routes = false;
    s.gate.max_invalid_attempts = 2;
    let off = Proxy::start(s.clone()).await;
    let post = |proxy: &Proxy, path: &str, key: Option<&str>| {
        let mut r = reqwest::Client::new().post(proxy.url(path));
        if let Some(key) = key {
            r = r.header("apiKey", key);
        }
        r.send()
    };
    for path in [
        "/auth-attempts/+15558880000",
        "/blocked-callers/+15558880000",
    ] {
        let r = post(&off, path, Some("test-key")).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }

    s.security.enable_debug_routes = true;
    let on = Proxy::start(s).await;
    let r = post(&on, "/auth-attempts/+15558880000", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the key is still needed");
    for n in 1..=3u64 {
        let r = post(&on, "/auth-attempts/+15558880000", Some("test-key"))
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v,
            json!({"id": "+15558880000", "attempts": n, "blocked": n > 2})
        );
    }
    assert_eq!(on.get("/blocked-callers/+15558880000").await.status(), 200);
    let r = post(&on, "/blocked-callers/+15558880001", Some("test-key"))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(on.get("/blocked-callers/+15558880001").await.status(), 200);
}

/// A missing `apiKey` answers 403, as the original; `GET /` answers `200 OK`.
#[tokio::test]
async fn status_codes_are_the_originals() {
    let proxy = Proxy::start(settings(&[])).await;
    let r = proxy.get("/blocked-callers").await;
    assert_eq!(r.status(), 403);
    let r = proxy.get("/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "OK");
}
