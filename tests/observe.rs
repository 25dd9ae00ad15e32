//! Seeing every call: Twilio's stream status callbacks recorded beside the proxy's own view —
//! signed or refused, counted by error code, and a stream Twilio started that never reached
//! any instance told apart from one that reached this instance or another.

mod common;

use call_proxy::config::{Settings, WireFormat};
use call_proxy::twilio::signature::{self, Algorithm};
use common::*;
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "observe-auth-token";

fn signed(backend: &Backend) -> Settings {
    let mut s = settings(&[("rec", &backend.url(), WireFormat::Twilio)]);
    s.twilio.validate_signatures = true;
    s.twilio.auth_token = TOKEN.into();
    s
}

/// Posts a status callback as Twilio does: a form, signed over the URL and its parameters.
async fn callback(proxy: &Proxy, params: &[(&str, &str)], token: Option<&str>) -> u16 {
    let url = proxy.url("/twilio/stream-status");
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let mut request = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(token) = token {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let data = signature::signed_data(&url, &owned);
        let sig = signature::sign(Algorithm::HmacSha1, token.as_bytes(), &data);
        request = request.header(signature::SIGNATURE_HEADER, sig);
    }
    request.send().await.unwrap().status().as_u16()
}

fn status<'a>(stream: &'a str, event: &'a str, error: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut p = vec![
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("CallSid", "CA00000000000000000000000000000002"),
        ("StreamSid", stream),
        ("StreamName", "call-proxy-FN1"),
        ("StreamEvent", event),
        ("Timestamp", "2026-12-04T20:00:00.000Z"),
    ];
    if let Some(e) = error {
        p.push(("StreamError", e));
    }
    p
}

/// A stream with a signed upgrade, as Twilio opens one.
async fn signed_call(proxy: &Proxy, name: &str) -> TwilioCall {
    let url = proxy.ws_url();
    let sig = signature::sign(
        Algorithm::HmacSha1,
        TOKEN.as_bytes(),
        &signature::signed_data(&url, &[]),
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert(signature::SIGNATURE_HEADER, sig.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    TwilioCall::from_socket(ws, name).await
}

/// A report Twilio signs, accepted.
async fn reported(proxy: &Proxy, stream: &str, event: &str, error: Option<&str>) {
    let params = status(stream, event, error);
    assert_eq!(callback(proxy, &params, Some(TOKEN)).await, 204);
}

async fn json(proxy: &Proxy, path: &str) -> Value {
    proxy
        .get_with_key(path, "test-key")
        .await
        .json()
        .await
        .unwrap()
}

/// A signed stream to `rec`, once the backend has its `start`.
async fn streaming(proxy: &Proxy, rec: &mut Backend, name: &str) -> TwilioCall {
    let mut call = signed_call(proxy, name).await;
    call.start(&[("backendIds", "rec")]).await;
    rec.wait_for("start", |log| {
        texts(log).iter().any(|t| event(t) == "start")
    })
    .await;
    call
}

async fn twilio_view(proxy: &Proxy) -> Vec<Value> {
    let calls = json(proxy, "/calls").await;
    calls["twilio"].as_array().unwrap().clone()
}

fn reached<'a>(view: &'a [Value], stream: &str) -> &'a str {
    view.iter()
        .find(|r| r["stream_sid"] == stream)
        .unwrap_or_else(|| panic!("{stream} in {view:?}"))["reached"]
        .as_str()
        .unwrap()
}

#[tokio::test]
async fn twilios_reports_show_beside_the_proxys_and_a_stream_that_never_arrived_is_named() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(signed(&rec)).await;

    // Unsigned or signed with another token: refused, and nothing recorded.
    let failed = status(
        "MZfailed",
        "stream-error",
        Some("31920: WebSocket handshake error"),
    );
    assert_eq!(callback(&proxy, &failed, None).await, 400);
    assert_eq!(callback(&proxy, &failed, Some("not-the-token")).await, 403);
    assert!(twilio_view(&proxy).await.is_empty());
    // Malformed: named.
    assert_eq!(
        callback(&proxy, &status("MZx", "stream-exploded", None), Some(TOKEN)).await,
        400
    );

    // A stream that failed before it reached any instance, and one that streams here.
    assert_eq!(callback(&proxy, &failed, Some(TOKEN)).await, 204);
    let mut call = streaming(&proxy, &mut rec, "here").await;
    reported(&proxy, "MZhere", "stream-started", None).await;
    let view = twilio_view(&proxy).await;
    assert_eq!(reached(&view, "MZfailed"), "no_instance");
    assert_eq!(reached(&view, "MZhere"), "here");
    let failed_view = view.iter().find(|r| r["stream_sid"] == "MZfailed").unwrap();
    assert_eq!(failed_view["events"][0]["error_code"], 31920);
    assert_eq!(
        failed_view["call_sid"],
        "CA00000000000000000000000000000002"
    );
    let calls = json(&proxy, "/calls").await;
    assert_eq!(
        calls["data"][0]["twilio"][0]["event"], "stream-started",
        "the live call carries Twilio's word on it"
    );

    call.stop().await;
    rec.wait_for_stop().await;
    reported(&proxy, "MZhere", "stream-stopped", None).await;
    // The call is listed as ended once its session has finished.
    let deadline = std::time::Instant::now() + WAIT;
    let recent = loop {
        let recent = json(&proxy, "/calls/recent").await;
        if recent["data"][0]["twilio"].is_array() {
            break recent;
        }
        assert!(std::time::Instant::now() < deadline, "{recent}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let events: Vec<&str> = recent["data"][0]["twilio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["stream-started", "stream-stopped"]);

    let m = proxy.metrics().await;
    for (series, n) in [
        (
            r#"call_proxy_twilio_stream_events_total{event="stream-error",error_code="31920"}"#,
            1.0,
        ),
        (
            r#"call_proxy_twilio_stream_events_total{event="stream-started",error_code="none"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&m, series), Some(n), "{series}");
    }
    // An error Twilio words without a Media Streams code counts as "other".
    callback(
        &proxy,
        &status("MZodd", "stream-error", Some("something else")),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        metric(
            &proxy.metrics().await,
            r#"call_proxy_twilio_stream_events_total{event="stream-error",error_code="other"}"#
        ),
        Some(1.0)
    );
}

/// Two instances on one Redis: Twilio's callback reaches one, the stream the other; the one
/// with the callback says the stream reached another instance, not none.
#[tokio::test]
async fn a_stream_on_another_instance_is_not_reported_missing() {
    let redis = RedisServer::start();
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = signed(&rec);
    use_redis(&mut s, &redis, "observe");
    let a = Proxy::start(s.clone()).await;
    let b = Proxy::start(s).await;
    let mut call = streaming(&b, &mut rec, "onb").await;
    reported(&a, "MZonb", "stream-started", None).await;
    callback(
        &a,
        &status("MZnowhere", "stream-error", Some("31910 TLS")),
        Some(TOKEN),
    )
    .await;
    // The arrival is written beside the call: give the store a moment.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let view = twilio_view(&a).await;
        if reached(&view, "MZonb") == "another_instance" {
            assert_eq!(reached(&view, "MZnowhere"), "no_instance");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{view:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    call.stop().await;
}

/// The usual exporter figures: the build, the process (from /proc), and every HTTP request by
/// its route's pattern — never by the path a client wrote, so a client cannot make new series.
#[tokio::test]
async fn build_process_and_http_figures_are_exported_with_fixed_labels() {
    let rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    for caller in ["+15550001111", "+15550002222", "%0aforged"] {
        proxy.get(&format!("/blocked-callers/{caller}")).await;
    }
    proxy.get("/no/such/route/a").await;
    proxy.get("/no/such/route/b").await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            &format!(
                r#"call_proxy_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric(&m, series).is_some_and(|v| v > 0.0), "{series}");
    }
    assert!(metric(&m, "process_cpu_seconds_total").is_some());
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_http_requests_total{route="/blocked-callers/{caller_id}",method="GET",status="404"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_http_requests_total{route="unmatched",method="GET",status="404"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_http_request_duration_seconds_count{route="/blocked-callers/{caller_id}",method="GET"}"#
        ),
        Some(3.0)
    );
    assert!(!m.contains("+1555000"), "no caller id in a label");
    assert!(!m.contains("no/such"), "no client-written path in a label");
}

/// A capture stops growing at its bound, says so in its last line, and the call is none the
/// worse: every frame still reaches the backend.
#[tokio::test]
async fn a_capture_is_bounded_and_the_call_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.capture.enabled = true;
    s.media.capture.backends = vec!["rec".into()];
    s.media.capture.dir = dir.path().to_string_lossy().into_owned();
    s.media.capture.max_bytes = 4096;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "bounded").await;
    call.start(&[("backendIds", "rec")]).await;
    for i in 0..100 {
        call.media(&payload(i)).await;
    }
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()).len(), 100);
    let file = dir.path().join("CAbounded-MZbounded.jsonl");
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&file).is_ok_and(|t| t.contains("truncated")) {
        assert!(std::time::Instant::now() < deadline, "no truncated capture");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let last = text.lines().last().unwrap();
    assert!(last.contains("media.capture.max_bytes"), "{last}");
    assert!(text.len() <= 4096 + last.len() + 1, "{} bytes", text.len());
    assert!(text.lines().nth(1).unwrap().contains(r#""event":"start""#));
}

/// The first live call's figures on `/calls`, once `ready` holds for them (the session
/// publishes at its tick).
async fn live_quality(proxy: &Proxy, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let calls = json(proxy, "/calls").await;
        let call = &calls["data"][0];
        if ready(call) {
            return call.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{calls}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Frames Twilio skipped and a silence on the socket show per call, live and after the end,
/// and in the histograms.
#[tokio::test]
async fn skipped_frames_and_a_silence_show_on_the_call() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    let mut call = TwilioCall::connect(&proxy, "gaps").await;
    call.start(&[("backendIds", "rec")]).await;
    let paced = |call: &mut TwilioCall, from: usize| {
        let texts: Vec<String> = (from..from + 10)
            .map(|i| call.media_text(&payload(i)))
            .collect();
        texts
    };
    for text in paced(&mut call, 0) {
        call.send_text(text).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    call.skip(3);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for text in paced(&mut call, 10) {
        call.send_text(text).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let live = live_quality(&proxy, |c| c["quality"]["twilio"]["frames_missing"] == 3).await;
    let twilio = &live["quality"]["twilio"];
    assert!(
        twilio["longest_gap_ms"].as_f64().unwrap() >= 500.0,
        "{twilio}"
    );
    assert!(twilio["jitter_ms"].as_f64().unwrap() > 5.0, "{twilio}");
    let link = &live["backends"][0]["quality"];
    assert!(link["first_frame_ms"].as_f64().is_some(), "{link}");
    assert_eq!(link["down_ms"], 0);
    call.stop().await;
    rec.wait_for_stop().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let recent = json(&proxy, "/calls/recent").await;
        if recent["data"][0]["quality"]["twilio"]["frames_missing"] == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{recent}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "call_proxy_twilio_frames_missing_sum"),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "call_proxy_twilio_frames_missing_count"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "call_proxy_backend_first_frame_seconds_count"),
        Some(1.0)
    );
}

/// A backend that stops reading for two seconds while large frames come shows how far
/// behind its delivery ran; the other measures stay at zero.
#[tokio::test]
async fn a_backend_made_late_shows_its_lag() {
    let mut slow = Backend::start(Behaviour::PauseFirst(std::time::Duration::from_millis(
        2000,
    )))
    .await;
    let proxy = Proxy::start(settings(&[("slow", &slow.url(), WireFormat::Twilio)])).await;
    let mut call = TwilioCall::connect(&proxy, "late").await;
    call.start(&[("backendIds", "slow")]).await;
    for i in 0..400 {
        call.media(&sized_payload(i, 6000)).await;
        if i % 10 == 9 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let live = live_quality(&proxy, |c| {
        c["backends"][0]["quality"]["lag_worst_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 1000.0)
    })
    .await;
    assert_eq!(live["backends"][0]["quality"]["down_ms"], 0, "{live}");
    call.stop().await;
    slow.wait_for_stop().await;
}

/// A voice agent's answer: from the caller's speech to the agent's first audio, how far
/// ahead it was sent, a mark's round trip and a clear's way to Twilio's socket.
#[tokio::test]
async fn a_talking_backend_shows_its_response_time_and_mark_round_trip() {
    use base64::Engine as _;
    use futures_util::StreamExt;
    let mut agent = TalkingBackend::start().await;
    let mut s = settings(&[("agent", &agent.url(), WireFormat::Twilio)]);
    s.backends.table.get_mut("agent").unwrap().speaks = true;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "answer").await;
    call.start(&[("backendIds", "agent")]).await;
    agent.wait_for_start(1).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let speech = b64.encode([call_proxy::audio::mulaw::encode(8000); 160]);
    for _ in 0..10 {
        call.media(&speech).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let answer = b64.encode([call_proxy::audio::mulaw::SILENCE; 800]);
    agent.say_text(format!(
        r#"{{"event":"media","media":{{"payload":"{answer}"}}}}"#
    ));
    agent.say_text(r#"{"event":"mark","mark":{"name":"said-it"}}"#);
    // Twilio's side: the audio, then the mark, echoed once "played".
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline.into(), call.ws.next())
            .await
            .expect("the mark reaches the caller")
            .unwrap()
            .unwrap();
        if message.to_text().unwrap_or_default().contains("said-it") {
            break;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let echo = call_proxy::twilio::messages::outbound::mark(99, "MZanswer", "said-it");
    call.send_text(echo).await;
    agent.say_text(r#"{"event":"clear"}"#);
    let live = live_quality(&proxy, |c| {
        let t = &c["quality"]["talkback"];
        t["mark_round_trip_ms"].is_number() && t["clear_ms"].is_number()
    })
    .await;
    let talkback = &live["quality"]["talkback"];
    let response = talkback["response_ms"].as_f64().unwrap();
    assert!((150.0..2000.0).contains(&response), "{talkback}");
    assert!(
        talkback["lead_worst_ms"].as_f64().unwrap() >= 90.0,
        "100 ms sent at once: {talkback}"
    );
    assert!(
        talkback["mark_round_trip_ms"].as_f64().unwrap() >= 100.0,
        "{talkback}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "call_proxy_talkback_response_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "call_proxy_talkback_mark_round_trip_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "call_proxy_talkback_clear_seconds_count"),
        Some(1.0)
    );
    call.stop().await;
}

/// What an OTLP/HTTP collector was sent: each export decoded, with its headers.
#[derive(Default)]
struct Collector {
    exports: std::sync::Mutex<Vec<(axum::http::HeaderMap, ExportTraceServiceRequest)>>,
}

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};

/// A collector on port 0 answering `POST /v1/traces` as the OTLP/HTTP spec says (protobuf in,
/// an empty protobuf answer out); a body that does not decode gets 400.
async fn collector() -> (String, std::sync::Arc<Collector>) {
    use axum::http::{HeaderMap, StatusCode as Http};
    use prost::Message as _;
    let seen = std::sync::Arc::new(Collector::default());
    let kept = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(export) => {
                        kept.exports.lock().unwrap().push((headers, export));
                        (
                            Http::OK,
                            [("content-type", "application/x-protobuf")],
                            Vec::new(),
                        )
                    }
                    Err(_) => (
                        Http::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        Vec::new(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

impl Collector {
    /// Every span sent, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for (_, export) in self.exports.lock().unwrap().iter() {
            for rs in &export.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| attribute(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    out.extend(ss.spans.iter().map(|s| (service.clone(), s.clone())));
                }
            }
        }
        out
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

/// Each call's span reaches the operators' collector over OTLP/HTTP with the call's ids and
/// outcome, its backends' spans under it, the configured headers on the export; a refused
/// call is marked an error. The spans of the call a drain waited for are sent at exit, not
/// lost with the process (the batch would otherwise wait 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_span_reaches_an_otlp_collector_with_its_ids_and_outcome() {
    let (endpoint, collector) = collector().await;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let url = rec.url();
    let proxy = ServiceProcess::start(&[
        ("CALL_PROXY__BACKENDS__TABLE__REC__URL", url.as_str()),
        ("CALL_PROXY__BACKENDS__TABLE__REC__FORMAT", "twilio"),
        ("CALL_PROXY__BACKENDS__DEFAULT", "rec"),
        ("CALL_PROXY__LOG__OTLP__ENDPOINT", endpoint.as_str()),
        ("CALL_PROXY__LOG__OTLP__SERVICE_NAME", "proxy-under-test"),
        (
            "CALL_PROXY__LOG__OTLP__HEADERS__AUTHORIZATION",
            "Bearer ${OTLP_TEST_KEY}",
        ),
        ("OTLP_TEST_KEY", "collector-key"),
        // Only the spans matter here; the log filter must not decide what is exported.
        ("CALL_PROXY__LOG__FILTER", "warn,call_proxy=info"),
    ])
    .await;

    let mut forged = TwilioCall::connect_url(&proxy.ws_url(), "otlpforged").await;
    forged.start(&[("routeToken", "v1.forged.token")]).await;
    assert!(forged.closed().await.is_some(), "a forged token is refused");

    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "otlp1").await;
    call.start(&[("callerId", "+15550001111")]).await;
    for i in 0..10 {
        call.media(&payload(i)).await;
    }
    rec.wait_for("ten frames", |log| payloads(&texts(log)).len() >= 10)
        .await;
    // SIGTERM with the call live: the drain waits for it, and its span is sent at exit.
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.stop().await;
    let (status, _) = proxy.exited(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");

    let spans = collector.spans();
    let calls: Vec<&(String, Span)> = spans.iter().filter(|(_, s)| s.name == "call").collect();
    let of = |sid: &str| {
        calls
            .iter()
            .find(|(_, s)| attribute(&s.attributes, "call_sid").as_deref() == Some(sid))
            .unwrap_or_else(|| panic!("no call span for {sid} in {calls:#?}"))
    };
    let (service, done) = of("CAotlp1");
    assert_eq!(service, "proxy-under-test");
    assert_eq!(
        attribute(&done.attributes, "stream_sid").as_deref(),
        Some("MZotlp1")
    );
    assert_eq!(
        attribute(&done.attributes, "caller").as_deref(),
        Some("+15550001111")
    );
    assert_eq!(
        attribute(&done.attributes, "outcome").as_deref(),
        Some("completed")
    );
    assert_ne!(
        done.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32),
        "a completed call is no error"
    );
    let backend = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "backend" && s.trace_id == done.trace_id)
        .expect("the backend's span is in the call's trace");
    assert_eq!(backend.parent_span_id, done.span_id);
    assert_eq!(
        attribute(&backend.attributes, "backend").as_deref(),
        Some("rec")
    );

    let (_, refused) = of("CAotlpforged");
    assert_eq!(
        attribute(&refused.attributes, "outcome").as_deref(),
        Some("refused_route_token")
    );
    assert_eq!(
        refused.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert!(
        refused.events.iter().any(|e| e.name == "stream refused"
            && attribute(&e.attributes, "error").is_some_and(|m| m.contains("route token"))),
        "the refusal's warning is on the span: {:?}",
        refused.events
    );
    // Nothing else: the HTTP requests and the audio path's events are not exported.
    assert!(spans
        .iter()
        .all(|(_, s)| s.name == "call" || s.name == "backend"));
    let exports = collector.exports.lock().unwrap();
    assert!(exports.iter().all(
        |(h, _)| h.get("authorization").map(|v| v.as_bytes()) == Some(b"Bearer collector-key")
    ));
}
