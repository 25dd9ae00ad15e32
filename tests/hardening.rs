//! Attacks on the running service, each trying to get past one guard (SPEC sections 3 and 4):
//! sockets that never start a stream, slow and idle HTTP clients, too many connections, PIN
//! guessing across caller ids, replayed and rebound route tokens, fan-out floods and loops,
//! hostile caller ids, big frames to stalled backends, and errors that must stay JSON.

mod common;

use std::time::{Duration, Instant};

use call_proxy::config::WireFormat;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn calls(proxy: &Proxy) -> Value {
    proxy
        .get_with_key("/calls", "test-key")
        .await
        .json()
        .await
        .unwrap()
}

/// Reads until the server closes the connection; answers what it sent and how long it took.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let began = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(began.elapsed()), stream.read(&mut buf))
            .await
        {
            Err(_) => panic!(
                "the server kept the connection open for {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), began.elapsed())
}

// ---- sockets that never start a stream -----------------------------------------------------

#[tokio::test]
async fn sockets_that_only_ping_lose_their_call_slot_and_a_real_call_gets_in() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.max_calls = 2;
    s.media.start_timeout_ms = 400;
    let proxy = Proxy::start(s).await;

    // Two sockets take every slot and only ever ping.
    let mut squatters = Vec::new();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::connect_async(proxy.ws_url())
            .await
            .unwrap();
        squatters.push(ws);
    }
    let pinging = tokio::spawn(async move {
        let mut closes = Vec::new();
        for mut ws in squatters {
            let began = Instant::now();
            let code = loop {
                if ws.send(Message::Ping(vec![1].into())).await.is_err() {
                    break None;
                }
                match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                    Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
                    Ok(None) | Ok(Some(Err(_))) => break None,
                    _ => {}
                }
                // A keep-alive's pace, well under the ping-flood limit.
                tokio::time::sleep(Duration::from_millis(40)).await;
                assert!(began.elapsed() < WAIT, "a pinging socket was never closed");
            };
            closes.push(code);
        }
        closes
    });
    let refused = tokio_tungstenite::connect_async(proxy.ws_url()).await;
    assert!(refused.is_err(), "every slot is taken for now");

    let closes = pinging.await.unwrap();
    assert_eq!(
        closes,
        [Some(1008), Some(1008)],
        "closed as a policy breach"
    );

    // The slots are free: a real call streams.
    let deadline = Instant::now() + WAIT;
    let mut call = loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(proxy.ws_url()).await {
            break ws;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(call.close(None).await);
    let mut call = TwilioCall::connect(&proxy, "real").await;
    call.start(&[("backendIds", "rec")]).await;
    call.media(&payload(0)).await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()), [payload(0)]);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, r#"call_proxy_calls_total{outcome="start_timeout"}"#),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_started_stream_that_only_pings_is_idle() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.idle_timeout_ms = 500;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "pinger").await;
    call.start(&[("backendIds", "rec")]).await;
    let began = Instant::now();
    let code = loop {
        call.ws.send(Message::Ping(vec![7].into())).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(50), call.ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| f.reason.to_string()),
            Ok(None) | Ok(Some(Err(_))) => break None,
            _ => {}
        }
        // A keep-alive's pace, well under the ping-flood limit.
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(began.elapsed() < WAIT, "pings kept an idle stream open");
    };
    assert!(code.unwrap_or_default().contains("idle"));
    assert!(began.elapsed() >= Duration::from_millis(450));
    rec.wait_for_stop().await;
}

// ---- slow, idle and too many HTTP clients --------------------------------------------------

#[tokio::test]
async fn slow_headers_idle_keep_alives_and_slow_bodies_are_cut_off() {
    let mut s = settings(&[]);
    s.server.header_timeout_ms = 300;
    s.server.body_timeout_ms = 300;
    let proxy = Proxy::start(s).await;

    // Headers a byte at a time, never finished.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    let dribble = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let (_, took) = read_until_closed(&mut slow, WAIT).await;
        took
    });

    // A keep-alive connection that asks once, then idles.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut idle, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took >= Duration::from_millis(250),
        "closed too soon: {took:?}"
    );

    // A body promised and never sent: 408, JSON, connection closed.
    let mut body = TcpStream::connect(proxy.addr).await.unwrap();
    body.write_all(
        b"POST /validate-pin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pin\":",
    )
    .await
    .unwrap();
    let (answer, _) = read_until_closed(&mut body, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#"{"error":"#), "{answer}");

    let took = dribble.await.unwrap();
    assert!(
        took < Duration::from_secs(3),
        "slowloris held on for {took:?}"
    );
    // The service is fine.
    assert_eq!(proxy.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_at_once_and_the_cap_recovers() {
    let mut s = settings(&[]);
    s.server.max_connections = 3;
    let proxy = Proxy::start(s).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        // Each is a live keep-alive connection.
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (answer, took) = read_until_closed(&mut extra, WAIT).await;
    assert_eq!(answer, "", "refused before anything is served");
    assert!(took < Duration::from_secs(1));

    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = client().get(proxy.url("/healthz")).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let m = proxy.metrics().await;
    assert!(
        metric(&m, r#"call_proxy_rate_limited_total{scope="connections"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

// ---- PIN guessing --------------------------------------------------------------------------

fn pin_settings() -> call_proxy::Settings {
    let mut s = settings(&[("rec", "ws://127.0.0.1:9/media", WireFormat::Twilio)]);
    add_pin(&mut s, "1234", &["rec"]);
    s.rate_limits.pin_per_caller_per_minute = 0;
    s.gate.max_pin_failures_per_ip = 5;
    s
}

async fn try_pin(
    proxy: &Proxy,
    caller: &str,
    pin: &str,
    forwarded: Option<&str>,
) -> reqwest::Response {
    let mut r = client()
        .post(proxy.url("/validate-pin"))
        .json(&json!({"pin": pin, "callerId": caller}));
    if let Some(ip) = forwarded {
        r = r.header("X-Forwarded-For", ip);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn rotating_the_caller_id_buys_no_more_guesses() {
    let proxy = Proxy::start(pin_settings()).await;
    let mut answered = 0;
    let limited = loop {
        let caller = format!("+1555000{answered:04}");
        let r = try_pin(&proxy, &caller, "0000", None).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["authenticated"], false);
        assert_eq!(v["attempts"]["attempts"], 1, "each caller id is new");
        answered += 1;
        assert!(answered <= 10, "no limit across caller ids");
    };
    assert_eq!(answered, 6, "more than 5 failures, then 429");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3000..=3600).contains(&retry),
        "the rest of the hour: {retry}"
    );
    let body: Value = limited.json().await.unwrap();
    assert!(body["error"].is_string());
    // Not even the right PIN gets through from that address now.
    assert_eq!(
        try_pin(&proxy, "+15559999999", "1234", None).await.status(),
        429
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_address_is_the_one_it_appended() {
    let mut s = pin_settings();
    s.twilio.trust_forwarded_headers = true;
    let proxy = Proxy::start(s).await;
    // The client writes whatever it likes on the left; the proxy appends the real address.
    for i in 0..6 {
        let xff = format!("10.9.9.{i}, 203.0.113.7");
        let r = try_pin(&proxy, &format!("+1555111{i:04}"), "0000", Some(&xff)).await;
        assert_eq!(r.status(), 200);
    }
    let r = try_pin(
        &proxy,
        "+15551119999",
        "0000",
        Some("10.1.1.1, 203.0.113.7"),
    )
    .await;
    assert_eq!(r.status(), 429, "a forged left-most entry changes nothing");
    // Another client behind the same proxy is not affected.
    let r = try_pin(&proxy, "+15551119999", "1234", Some("203.0.113.8")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);
}

#[tokio::test]
async fn hostile_caller_ids_are_refused_naming_the_field() {
    let proxy = Proxy::start(pin_settings()).await;
    for bad in [
        "+1555\n2026-12-02T00:00:00Z INFO PIN accepted".to_string(),
        "+1555\u{1b}[2J".to_string(),
        "9".repeat(65),
        "9".repeat(15_000),
    ] {
        let r = try_pin(&proxy, &bad, "0000", None).await;
        assert_eq!(r.status(), 400, "{bad:?}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().starts_with("callerId"), "{v}");
        let path = format!(
            "/blocked-callers/{}",
            form_urlencoded::byte_serialize(bad.as_bytes()).collect::<String>()
        );
        for method in ["GET", "POST", "DELETE"] {
            let r = client()
                .request(method.parse().unwrap(), proxy.url(&path))
                .header("apiKey", "test-key")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{method} {bad:?}");
        }
    }
    // 64 characters is the limit, not over it.
    let r = try_pin(&proxy, &"9".repeat(64), "0000", None).await;
    assert_eq!(r.status(), 200);
    // Nothing was stored for the refused ones.
    let blocked: Value = proxy
        .get_with_key("/blocked-callers", "test-key")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(blocked["data"], json!([]));
}

// ---- route tokens --------------------------------------------------------------------------

async fn token_for(proxy: &Proxy, caller: &str, call_sid: Option<&str>) -> String {
    let mut body = json!({"pin": "1234", "callerId": caller});
    if let Some(sid) = call_sid {
        body["callSid"] = json!(sid);
    }
    let v: Value = client()
        .post(proxy.url("/validate-pin"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["routeToken"].as_str().expect("a token").to_string()
}

#[tokio::test]
async fn a_token_opens_one_stream_of_its_own_call_and_none_once_its_caller_is_blocked() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.security.require_route_token = true;
    s.rate_limits.pin_per_caller_per_minute = 0;
    add_pin(&mut s, "1234", &["rec"]);
    let proxy = Proxy::start(s).await;

    let refused = |reason: &'static str| async move {
        move |frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>| {
            let frame = frame.expect("close frame");
            assert_eq!(u16::from(frame.code), 1008);
            assert!(frame.reason.contains(reason), "{}", frame.reason);
        }
    };

    // Bound to CAbound: another call cannot use it; then its own call can, once.
    let token = token_for(&proxy, "+15552220000", Some("CAbound")).await;
    let mut thief = TwilioCall::connect(&proxy, "thief").await;
    thief.start(&[("routeToken", &token)]).await;
    refused("another call").await(thief.closed().await);
    let mut own = TwilioCall::connect(&proxy, "bound").await;
    own.start(&[("routeToken", &token)]).await;
    own.media(&payload(0)).await;
    own.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()), [payload(0)]);
    let mut again = TwilioCall::connect(&proxy, "bound").await;
    again.start(&[("routeToken", &token)]).await;
    refused("already used").await(again.closed().await);

    // Unbound tokens are single-use too, with or without a callerId.
    let token = token_for(&proxy, "+15552220000", None).await;
    let mut first = TwilioCall::connect(&proxy, "u1").await;
    first.start(&[("routeToken", &token)]).await;
    first.media(&payload(1)).await;
    rec.wait_for("the first stream's frame", |log| {
        payloads(&texts(log)).contains(&payload(1))
    })
    .await;
    let mut second = TwilioCall::connect(&proxy, "u2").await;
    second
        .start(&[("routeToken", &token), ("callerId", "+15552220000")])
        .await;
    refused("already used").await(second.closed().await);
    first.stop().await;

    // Issued, then the caller is blocked: the token opens nothing.
    let token = token_for(&proxy, "+15552220000", None).await;
    let r = client()
        .post(proxy.url("/blocked-callers/+15552220000"))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut late = TwilioCall::connect(&proxy, "late").await;
    late.start(&[("routeToken", &token)]).await;
    refused("blocked").await(late.closed().await);
}

// ---- fan-out floods and loops --------------------------------------------------------------

#[tokio::test]
async fn a_start_naming_thousands_of_hosts_gets_the_cap_and_one_log_line_of_reasons() {
    let mut spk = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[]);
    s.media.max_backends_per_call = 3;
    let proxy = Proxy::start(s).await;
    let port = spk.addr.port();
    // Case variants of one backend, then thousands of ports nobody listens on.
    let mut hosts: Vec<String> = ["localhost", "LOCALHOST", "LocalHost", "lOcAlHoSt"]
        .iter()
        .map(|h| format!("{h}:{port}"))
        .collect();
    hosts.extend((1..3000).map(|p| format!("127.0.0.1:{p}")));
    let mut call = TwilioCall::connect(&proxy, "flood").await;
    call.start(&[("backendHosts", &serde_json::to_string(&hosts).unwrap())])
        .await;
    call.media(&payload(0)).await;
    spk.wait_for("the frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    let live = calls(&proxy).await;
    let backends = live["data"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3, "{live}");
    assert_eq!(backends[0]["name"], format!("localhost:{port}"));
    call.stop().await;
    spk.wait_for_stop().await;
    assert_eq!(
        spk.connections(),
        1,
        "one link, however the host was spelled"
    );
}

#[tokio::test]
async fn the_proxy_never_streams_into_itself() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = listener.local_addr().unwrap();
    let mut rec = Backend::start(Behaviour::Normal).await;
    // A table entry that (by mistake or by design) is the proxy itself, under another name.
    let mut s = settings(&[
        ("rec", &rec.url(), WireFormat::Twilio),
        (
            "looped",
            &format!("ws://localhost:{}/media", own.port()),
            WireFormat::Twilio,
        ),
    ]);
    s.backends.hosts_format = WireFormat::Twilio;
    s.backends.reconnect_window_ms = 1000;
    s.media.max_calls = 4;
    let proxy = Proxy::start_on(listener, s);

    // backendHosts naming the proxy's own port: refused before any connect.
    let mut call = TwilioCall::connect(&proxy, "self").await;
    call.start(&[("backendHosts", &format!(r#"["127.0.0.1:{}"]"#, own.port()))])
        .await;
    let frame = call.closed().await.expect("close frame");
    assert!(frame.reason.contains("itself"), "{}", frame.reason);

    // A table backend that loops back: its upgrades are refused, the other backend streams.
    let mut call = TwilioCall::connect(&proxy, "loop").await;
    call.start(&[("backendIds", "rec,looped")]).await;
    call.media(&payload(0)).await;
    rec.wait_for("the first frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    for i in 1..20 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let live = calls(&proxy).await;
        assert_eq!(
            live["data"].as_array().unwrap().len(),
            1,
            "the loop opened no call of its own: {live}"
        );
    }
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()).len(), 20);
    let m = proxy.metrics().await;
    assert!(
        metric(&m, r#"call_proxy_calls_total{outcome="refused_loop"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

// ---- queues bounded in bytes, stalled writers ----------------------------------------------

#[tokio::test]
async fn big_frames_to_a_stalled_backend_stay_within_the_byte_bound() {
    let stalled = Backend::start(Behaviour::Stall).await;
    let mut healthy = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("stalled", &stalled.url(), WireFormat::Twilio),
        ("healthy", &healthy.url(), WireFormat::Twilio),
    ]);
    s.backends.queue_bytes = 256 * 1024;
    // Long enough that the stalled link is not dropped while this test fills it.
    s.backends.write_timeout_ms = 60_000;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "big").await;
    call.start(&[("backendIds", "stalled,healthy")]).await;
    // 45 KB of base64 per message, 25 a second: 100 of them would be 4.5 MB.
    let frames = 100;
    for i in 0..frames {
        call.media(&sized_payload(i, 34_000)).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    healthy
        .wait_for("every frame", |log| payloads(&texts(log)).len() == frames)
        .await;
    let live = calls(&proxy).await;
    let stalled_link = &live["data"][0]["backends"][0];
    assert_eq!(stalled_link["name"], "stalled");
    let held = stalled_link["frames_queued"].as_u64().unwrap();
    // 256 KiB holds at most five 45 KB messages (plus the control frames, never dropped).
    assert!(held <= 6, "held {held} frames: {live}");
    call.stop().await;
    healthy.wait_for_stop().await;
    drop(stalled);
}

#[tokio::test]
async fn a_backend_that_stops_reading_is_dropped_and_reconnected_with_its_buffer() {
    let mut flaky = Backend::start(Behaviour::StallFirst).await;
    let mut s = settings(&[("flaky", &flaky.url(), WireFormat::Twilio)]);
    s.backends.write_timeout_ms = 300;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "stall").await;
    call.start(&[("backendIds", "flaky")]).await;
    // Enough to fill the stalled socket, so writes block and the deadline passes.
    let frames = 400;
    for i in 0..frames {
        call.media(&sized_payload(i, 6000)).await;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    flaky
        .wait_for("a second connection", |log| {
            log.iter().any(|s| matches!(s, Seen::Connected(2)))
        })
        .await;
    call.media(&payload(9999)).await;
    call.stop().await;
    flaky
        .wait_for("stop on the new connection", |log| {
            log.iter()
                .any(|s| matches!(s, Seen::Text(2, t) if event(t) == "stop"))
        })
        .await;
    let again = flaky.texts_of(2);
    assert_eq!(event(&again[0]), "start", "the call's start again first");
    let got = payloads(&again);
    assert_eq!(
        got.last(),
        Some(&payload(9999)),
        "live frames after the buffer"
    );
    assert!(got.len() > 1, "the buffered frames came too");
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            r#"call_proxy_backend_reconnects_total{backend="flaky"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

// ---- errors and headers --------------------------------------------------------------------

#[tokio::test]
async fn every_error_is_json_and_operator_answers_are_never_cached() {
    let proxy = Proxy::start(settings(&[])).await;
    let cases = [
        ("PUT", "/validate-pin", 405),
        ("DELETE", "/healthz", 405),
        ("GET", "/blocked-callers/%FF%FE", 400),
        ("GET", "/no/such/route", 404),
    ];
    for (method, path, status) in cases {
        let r = client()
            .request(method.parse().unwrap(), proxy.url(path))
            .header("apiKey", "test-key")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}"
        );
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    for path in ["/calls", "/blocked-callers", "/metrics"] {
        let r = proxy.get_with_key(path, "test-key").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
    }
}

/// A damaged or hostile journal record with numbers at their limits: the routes that show it
/// answer, the service does not panic.
#[tokio::test]
async fn stored_times_at_their_limit_are_shown_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.log");
    let json = r#"{"t":"block","caller":"+15550009999","blocked_on":18446744073709551615,"expires_at":18446744073709551615}"#;
    std::fs::write(
        &path,
        format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())),
    )
    .unwrap();
    let mut s = settings(&[]);
    s.store.path = path.to_string_lossy().into_owned();
    let proxy = Proxy::start(s).await;
    let one: Value = proxy
        .get("/blocked-callers/+15550009999")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["blocked"], true, "{one}");
    assert!(
        one["blockedOn"].as_str().unwrap().starts_with("9999-12-31"),
        "{one}"
    );
    let all = proxy.get_with_key("/blocked-callers", "test-key").await;
    assert_eq!(all.status(), 200);
    assert_eq!(proxy.get("/healthz").await.status(), 200);
}

/// A stream refused for anything but its token — another caller id, backends the token does
/// not open — leaves the token unused: the real stream with it still gets in.
#[tokio::test]
async fn a_stream_refused_for_its_caller_or_backends_does_not_burn_the_token() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("rec", &rec.url(), WireFormat::Twilio),
        ("other", &rec.url(), WireFormat::Twilio),
    ]);
    s.security.require_route_token = true;
    s.rate_limits.pin_per_caller_per_minute = 0;
    add_pin(&mut s, "1234", &["rec"]);
    let proxy = Proxy::start(s).await;
    let token = token_for(&proxy, "+15553330000", None).await;

    for (name, params) in [
        ("wrongcaller", vec![("callerId", "+15559999999")]),
        ("morebackends", vec![("backendIds", "rec,other")]),
    ] {
        let mut call = TwilioCall::connect(&proxy, name).await;
        let mut p = params.clone();
        p.push(("routeToken", token.as_str()));
        call.start(&p).await;
        let frame = call.closed().await.expect("a close frame");
        assert_eq!(u16::from(frame.code), 1008, "{name}: {}", frame.reason);
    }
    let mut call = TwilioCall::connect(&proxy, "real").await;
    call.start(&[("routeToken", &token), ("callerId", "+15553330000")])
        .await;
    call.media(&payload(0)).await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(
        payloads(&rec.texts()),
        [payload(0)],
        "the token still opened the call"
    );
}
