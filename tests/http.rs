//! The plain HTTP routes: health, readiness, metrics, the operator API key, errors as JSON.

mod common;

use call_proxy::config::WireFormat;
use common::*;

#[tokio::test]
async fn health_routes_answer() {
    let proxy = Proxy::start(settings(&[])).await;
    let r = proxy.get("/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "OK");
    assert_eq!(proxy.get("/healthz").await.status(), 200);
    let r = proxy.get("/readyz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "ready"
    );
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    let proxy = Proxy::start(settings(&[])).await;
    let r = proxy.get("/nope").await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].is_string());

    // A plain GET on the media endpoint is not an upgrade.
    let r = proxy.get("/media").await;
    assert!(r.status().is_client_error(), "{}", r.status());
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains("upgrade"));
}

#[tokio::test]
async fn operator_routes_need_the_api_key() {
    let rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    assert_eq!(proxy.get("/calls").await.status(), 403);
    assert_eq!(proxy.get_with_key("/calls", "wrong").await.status(), 403);
    let r = reqwest::Client::new()
        .get(proxy.url("/calls"))
        .bearer_auth("test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut call = TwilioCall::connect(&proxy, "list").await;
    call.start(&[("backendIds", "rec"), ("callerId", "+15551234567")])
        .await;
    call.media(&payload(0)).await;
    let deadline = std::time::Instant::now() + WAIT;
    let listed = loop {
        let v: serde_json::Value = proxy
            .get_with_key("/calls", "test-key")
            .await
            .json()
            .await
            .unwrap();
        // The media frame; the `start` each connection begins with is not one of the
        // call's frames.
        let frames = v["data"][0]["backends"][0]["frames_sent"].as_u64();
        if frames == Some(1) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let c = &listed["data"][0];
    assert_eq!(c["call_sid"], "CAlist");
    assert_eq!(c["stream_sid"], "MZlist");
    assert_eq!(c["caller"], "+15551234567");
    assert_eq!(c["backends"][0]["name"], "rec");
    assert_eq!(c["backends"][0]["state"], "connected");
    assert_eq!(c["backends"][0]["frames_dropped"], 0);
}

#[tokio::test]
async fn without_a_configured_key_operator_routes_are_closed() {
    let mut s = settings(&[]);
    s.security.api_key = "".into();
    let proxy = Proxy::start(s).await;
    assert_eq!(proxy.get_with_key("/calls", "").await.status(), 403);
    assert_eq!(proxy.get_with_key("/calls", "anything").await.status(), 403);
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_can_require_the_key() {
    let proxy = Proxy::start(settings(&[])).await;
    let text = proxy.metrics().await;
    for name in [
        "call_proxy_live_calls",
        "call_proxy_frames_in_total",
        "call_proxy_forward_latency_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert_eq!(metric(&text, "call_proxy_live_calls"), Some(0.0));

    let mut s = settings(&[]);
    s.security.metrics_require_api_key = true;
    let proxy = Proxy::start(s).await;
    assert_eq!(proxy.get("/metrics").await.status(), 403);
    assert_eq!(
        proxy.get_with_key("/metrics", "test-key").await.status(),
        200
    );
}

/// The media endpoint's upgrade checks, each tried with the rest of a good request: every
/// refusal is a JSON error with its status, and the same request done right is accepted.
#[tokio::test]
async fn a_media_upgrade_is_refused_unless_it_is_a_websocket_handshake() {
    let proxy = Proxy::start(settings(&[])).await;
    let client = reqwest::Client::new();
    let good = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let request = |method: reqwest::Method, skip: &str, replace: Option<(&str, &str)>| {
        let mut r = client.request(method, proxy.url("/media"));
        for (name, value) in good {
            if name == skip {
                continue;
            }
            let value = match replace {
                Some((n, v)) if n == name => v,
                _ => value,
            };
            r = r.header(name, value);
        }
        r
    };
    let refused = [
        (request(reqwest::Method::POST, "", None), 405),
        (request(reqwest::Method::GET, "connection", None), 400),
        (
            request(reqwest::Method::GET, "", Some(("connection", "upgraded"))),
            400,
        ),
        (request(reqwest::Method::GET, "upgrade", None), 400),
        (
            request(reqwest::Method::GET, "", Some(("upgrade", "h2c"))),
            400,
        ),
        (
            request(reqwest::Method::GET, "sec-websocket-version", None),
            400,
        ),
        (
            request(
                reqwest::Method::GET,
                "",
                Some(("sec-websocket-version", "8")),
            ),
            400,
        ),
        (
            request(reqwest::Method::GET, "sec-websocket-key", None),
            400,
        ),
    ];
    for (i, (r, status)) in refused.into_iter().enumerate() {
        let r = r.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "case {i}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "case {i}: {body}");
    }

    // The same handshake by hand, answered as RFC 6455 says (the key is the RFC's example).
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut head = String::from("GET /media HTTP/1.1\r\nHost: proxy\r\n");
    for (name, value) in good {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, raw.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
    assert!(
        answer.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{answer}"
    );
}

/// Readiness means "send me new calls": 503 at `media.max_calls` (and a further upgrade 503
/// with `Retry-After`), 200 again once a call ends.
#[tokio::test]
async fn readiness_turns_503_at_max_calls_and_back_when_a_call_ends() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.max_calls = 2;
    let proxy = Proxy::start(s).await;
    let mut first = TwilioCall::connect(&proxy, "cap1").await;
    first.start(&[("backendIds", "rec")]).await;
    assert_eq!(proxy.get("/readyz").await.status(), 200, "one of two");
    let mut second = TwilioCall::connect(&proxy, "cap2").await;
    second.start(&[("backendIds", "rec")]).await;
    let r = proxy.get("/readyz").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("capacity"),
        "{body}"
    );
    match tokio_tungstenite::connect_async(proxy.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("a third stream: {other:?}"),
    }
    assert_eq!(
        proxy.get("/healthz").await.status(),
        200,
        "alive, only full"
    );

    first.stop().await;
    first.closed().await;
    rec.wait_for_stop().await;
    proxy.wait_status("/readyz", 200, WAIT).await;
    second.stop().await;
}
