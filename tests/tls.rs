//! `wss://` backends against a real TLS WebSocket server with certificates made here: a
//! private CA trusted through `ca_file`, certificates that must not verify (another CA, another
//! name, expired), headers and query strings on the upgrade, secrets kept out of sight, and a
//! reconnect over TLS after the backend restarts.

mod common;

use std::time::Duration;

use call_proxy::config::WireFormat;
use common::*;

const TOKEN: &str = "Bearer sk-live-do-not-log-7f3a9c";

fn tls_backend(s: &mut call_proxy::Settings, id: &str, url: &str, ca: &TestCa) {
    let spec = s.backends.table.get_mut(id).expect("backend in the table");
    spec.url = url.to_string();
    spec.ca_file = ca.pem_path();
    spec.headers.insert("Authorization".into(), TOKEN.into());
    s.validate().expect("valid TLS backend settings");
}

#[tokio::test]
async fn a_backend_behind_a_private_ca_gets_the_call_with_its_headers_and_query() {
    let ca = TestCa::new("call-proxy test CA");
    let mut asr = TlsBackend::start(ca.server_cert(Made::Good)).await;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("asr", "ws://placeholder/", WireFormat::Twilio),
        ("rec", &rec.url(), WireFormat::Twilio),
    ]);
    let url = asr.url("/v1/listen?encoding=mulaw&sample_rate=8000&channels=1");
    tls_backend(&mut s, "asr", &url, &ca);
    let proxy = Proxy::start(s).await;

    let mut call = TwilioCall::connect(&proxy, "tls").await;
    call.start(&[("backendIds", "asr,rec")]).await;
    for i in 0..50 {
        call.media(&payload(i)).await;
    }
    asr.wait_for("50 frames", |c| {
        c.len() == 1 && payloads(&c[0].texts).len() == 50
    })
    .await;
    let live = proxy
        .get_with_key("/calls", "test-key")
        .await
        .text()
        .await
        .unwrap();
    let metrics = proxy.metrics().await;
    call.stop().await;
    asr.wait_for("stop", |c| c[0].texts.iter().any(|t| event(t) == "stop"))
        .await;
    rec.wait_for_stop().await;

    let seen = asr.connections.lock().unwrap()[0].clone();
    assert_eq!(
        seen.path_and_query, "/v1/listen?encoding=mulaw&sample_rate=8000&channels=1",
        "path and query kept"
    );
    assert_eq!(seen.authorization.as_deref(), Some(TOKEN));
    assert_eq!(seen.texts[0], call.start_text, "Twilio's start, as sent");
    assert_eq!(
        payloads(&seen.texts),
        (0..50).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(payloads(&rec.texts()).len(), 50);
    for shown in [&live, &metrics] {
        assert!(!shown.contains("sk-live"), "a header value showed: {shown}");
    }
    assert!(live.contains(r#""name":"asr""#), "{live}");
}

#[tokio::test]
async fn certificates_that_do_not_verify_are_failed_connects_and_cost_the_call_nothing() {
    let ca = TestCa::new("trusted CA");
    let stranger = TestCa::new("some other CA");
    let mut other_ca = TlsBackend::start(stranger.server_cert(Made::Good)).await;
    let mut other_name = TlsBackend::start(ca.server_cert(Made::OtherName)).await;
    let mut expired = TlsBackend::start(ca.server_cert(Made::Expired)).await;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("other-ca", "ws://placeholder/", WireFormat::Twilio),
        ("other-name", "ws://placeholder/", WireFormat::Twilio),
        ("expired", "ws://placeholder/", WireFormat::Twilio),
        ("rec", &rec.url(), WireFormat::Twilio),
    ]);
    tls_backend(&mut s, "other-ca", &other_ca.url("/media"), &ca);
    tls_backend(&mut s, "other-name", &other_name.url("/media"), &ca);
    tls_backend(&mut s, "expired", &expired.url("/media"), &ca);
    s.backends.reconnect_window_ms = 60_000;
    let proxy = Proxy::start(s).await;

    let mut call = TwilioCall::connect(&proxy, "badtls").await;
    call.start(&[("backendIds", "other-ca,other-name,expired,rec")])
        .await;
    for i in 0..100 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (name, backend) in [
        ("another CA", &mut other_ca),
        ("another name", &mut other_name),
        ("expired", &mut expired),
    ] {
        backend
            .wait_for(&format!("two refused handshakes ({name})"), |_| true)
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while *backend.refused.lock().unwrap() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: not retried"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            backend.connections.lock().unwrap().is_empty(),
            "{name}: no WebSocket ever opened"
        );
    }
    rec.wait_for("every frame", |log| payloads(&texts(log)).len() == 100)
        .await;
    let m = proxy.metrics().await;
    for id in ["other-ca", "other-name", "expired"] {
        let failures = metric(
            &m,
            &format!(r#"call_proxy_backend_failures_total{{backend="{id}"}}"#),
        )
        .unwrap_or(0.0);
        assert!(failures >= 2.0, "{id}: {failures} failures counted");
        assert_eq!(
            metric(
                &m,
                &format!(r#"call_proxy_backend_connects_total{{backend="{id}"}}"#)
            )
            .unwrap_or(0.0),
            0.0,
            "{id} never connected"
        );
    }
    assert!(!m.contains("sk-live"));
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(
        payloads(&rec.texts()),
        (0..100).map(payload).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_tls_backend_that_restarts_is_reconnected_and_gets_start_again() {
    let ca = TestCa::new("call-proxy test CA");
    let mut asr = TlsBackend::start(ca.server_cert(Made::Good)).await;
    let mut s = settings(&[("asr", "ws://placeholder/", WireFormat::Twilio)]);
    tls_backend(&mut s, "asr", &asr.url("/media"), &ca);
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "tlsre").await;
    call.start(&[("backendIds", "asr")]).await;
    for i in 0..10 {
        call.media(&payload(i)).await;
    }
    asr.wait_for("10 frames", |c| {
        !c.is_empty() && payloads(&c[0].texts).len() == 10
    })
    .await;

    asr.stop();
    for i in 10..20 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    asr.restart().await;
    for i in 20..30 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    asr.wait_for("a second connection with the last frame", |c| {
        c.len() == 2 && payloads(&c[1].texts).contains(&payload(29))
    })
    .await;
    let again = asr.connections.lock().unwrap()[1].clone();
    assert_eq!(again.texts[0], call.start_text, "start again first");
    assert_eq!(again.authorization.as_deref(), Some(TOKEN));
    call.stop().await;
}

/// A pcm16 voice agent behind TLS: the caller's audio reaches it as PCM at 16 kHz, and what it
/// says comes back to the caller as Twilio's audio.
#[tokio::test]
async fn a_pcm16_agent_over_wss_hears_the_caller_and_talks_back() {
    use base64::Engine as _;
    use futures_util::StreamExt;
    let ca = TestCa::new("call-proxy test CA");
    let mut agent = TlsBackend::start_echoing(ca.server_cert(Made::Good)).await;
    let mut s = settings(&[("agent", "ws://placeholder/", WireFormat::Pcm16)]);
    tls_backend(&mut s, "agent", &agent.url("/v1/realtime?rate=16000"), &ca);
    let spec = s.backends.table.get_mut("agent").unwrap();
    spec.speaks = true;
    spec.sample_rate = Some(16000);
    s.validate().unwrap();
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "wsspcm").await;
    call.start(&[("backendIds", "agent")]).await;
    agent
        .wait_for("start", |c| !c.is_empty() && !c[0].texts.is_empty())
        .await;
    for i in 0..50 {
        call.media(&payload(i)).await;
    }
    let mut heard = 0usize;
    let deadline = tokio::time::Instant::now() + WAIT;
    while heard < 8000 * 8 / 10 {
        let m = tokio::time::timeout_at(deadline, call.ws.next())
            .await
            .expect("the agent's answer reaches the caller")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["event"] == "media" {
            heard += base64::engine::general_purpose::STANDARD
                .decode(v["media"]["payload"].as_str().unwrap())
                .unwrap()
                .len();
        }
    }
    assert!(
        *agent.binary_bytes.lock().unwrap() >= 50 * 320 * 2 * 9 / 10,
        "a second of 16 kHz PCM reached the agent"
    );
    call.stop().await;
}
