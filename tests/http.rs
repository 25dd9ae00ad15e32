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
    assert_eq!(proxy.get("/calls").await.status(), 401);
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
        let frames = v["data"][0]["backends"][0]["frames_sent"].as_u64();
        if frames == Some(2) {
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
    assert_eq!(proxy.get("/metrics").await.status(), 401);
    assert_eq!(
        proxy.get_with_key("/metrics", "test-key").await.status(),
        200
    );
}
