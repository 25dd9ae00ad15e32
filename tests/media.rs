//! The media path end to end: a real proxy on port 0, real backend WebSocket servers, and a
//! client playing Twilio's part.

mod common;

use std::time::{Duration, Instant};

use call_proxy::config::WireFormat;
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_backends_get_every_frame_in_order() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut spk = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[
        ("rec", &rec.url(), WireFormat::Twilio),
        ("spk", &spk.url(), WireFormat::Compact),
    ]))
    .await;

    let mut call = TwilioCall::connect(&proxy, "1").await;
    call.start(&[("backendIds", r#"["rec","spk"]"#)]).await;
    let sent: Vec<String> = (0..200).map(payload).collect();
    for (i, p) in sent.iter().enumerate() {
        call.media(p).await;
        if i == 100 {
            call.send_text(
                r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"102","dtmf":{"track":"inbound_track","digit":"7"}}"#.into(),
            )
            .await;
        }
    }
    call.send_text(
        r#"{"event":"mark","sequenceNumber":"203","streamSid":"MZ1","mark":{"name":"done"}}"#
            .into(),
    )
    .await;
    call.stop().await;

    rec.wait_for_stop().await;
    spk.wait_for_stop().await;

    // Twilio format: the very bytes Twilio sent, in order, control messages in place.
    let got = rec.texts();
    assert_eq!(got[0], call.start_text, "start forwarded byte for byte");
    let media: Vec<&String> = got.iter().filter(|t| event(t) == "media").collect();
    assert_eq!(media.len(), 200);
    for (g, s) in media.iter().zip(&call.sent_media) {
        assert_eq!(*g, s, "media forwarded byte for byte");
    }
    let events: Vec<String> = got.iter().map(|t| event(t)).collect();
    assert_eq!(events[102], "dtmf", "dtmf between frames 100 and 101");
    assert_eq!(events.last().unwrap(), "stop");
    assert!(
        !events.contains(&"mark".to_string()),
        "Twilio's mark echoes are for the speaker alone"
    );

    // Compact format: the original's messages, same audio.
    let got = spk.texts();
    assert_eq!(got[0], r#"{"event":"start"}"#);
    assert_eq!(payloads(&got), sent);
    assert_eq!(got.last().unwrap(), r#"{"event":"stop"}"#);
    assert_eq!(
        got[102], r#"{"event":"dtmf","dtmf":"7"}"#,
        "dtmf in compact form"
    );
    assert_eq!(got.len(), 203, "start, 200 frames, dtmf, stop");

    assert_eq!(
        call.closed().await.map(|f| u16::from(f.code)),
        Some(1000),
        "the stream is closed normally after stop"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, r#"call_proxy_calls_total{outcome="completed"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&m, "call_proxy_frames_in_total"), Some(200.0));
    assert_eq!(
        metric(&m, r#"call_proxy_backend_frames_out_total{backend="rec"}"#),
        Some(203.0)
    );
}

#[tokio::test]
async fn a_stalled_backend_costs_the_others_nothing() {
    let stalled = Backend::start(Behaviour::Stall).await;
    let mut healthy = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[
        ("stalled", &stalled.url(), WireFormat::Twilio),
        ("healthy", &healthy.url(), WireFormat::Twilio),
    ]))
    .await;

    let mut call = TwilioCall::connect(&proxy, "2").await;
    call.start(&[("backendIds", "stalled,healthy")]).await;
    // Large frames, quickly, so the stalled backend's socket buffers fill within seconds.
    let frames = 3000;
    let mut worst_lag = Duration::ZERO;
    let began = Instant::now();
    for i in 0..frames {
        call.media(&sized_payload(i, 6000)).await;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i % 500 == 499 {
            // The healthy backend keeps up while the other is stuck.
            let sent_at = Instant::now();
            healthy
                .wait_for("frames so far", |log| payloads(&texts(log)).len() > i)
                .await;
            worst_lag = worst_lag.max(sent_at.elapsed());
        }
    }
    // What an operator sees while it happens: one backend in trouble, the other fine.
    let calls: serde_json::Value = proxy
        .get_with_key("/calls", "test-key")
        .await
        .json()
        .await
        .unwrap();
    let call_seen = &calls["data"][0];
    assert_eq!(call_seen["call_sid"], "CA2", "{calls}");
    let link = |name: &str| {
        call_seen["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {calls}"))
            .clone()
    };
    let (stuck, fine) = (link("stalled"), link("healthy"));
    assert!(stuck["frames_dropped"].as_u64().unwrap() > 0, "{stuck}");
    assert!(stuck["frames_queued"].as_u64().unwrap() <= 251, "{stuck}");
    assert_eq!(fine["frames_dropped"], 0, "{fine}");
    assert_eq!(fine["state"], "connected", "{fine}");
    assert!(
        fine["frames_sent"].as_u64().unwrap() > frames as u64 - 100,
        "{fine}"
    );
    call.stop().await;
    healthy.wait_for_stop().await;
    let got = payloads(&healthy.texts());
    assert_eq!(got.len(), frames, "the healthy backend got every frame");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, p)| *p == sized_payload(i, 6000)),
        "in order"
    );
    assert!(
        worst_lag < Duration::from_secs(2),
        "healthy backend lagged {worst_lag:?} (sending took {:?})",
        began.elapsed()
    );

    let m = proxy.metrics().await;
    let dropped = metric(
        &m,
        r#"call_proxy_backend_frames_dropped_total{backend="stalled"}"#,
    )
    .expect("drops are counted");
    assert!(
        dropped > 0.0,
        "the stalled backend's oldest frames were dropped"
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_frames_dropped_total{backend="healthy"}"#
        ),
        Some(0.0)
    );
    // Memory stays bounded: whatever is still queued fits in the configured queue.
    if let Some(queued) = metric(&m, r#"call_proxy_backend_frames_queued{backend="stalled"}"#) {
        assert!(queued <= 251.0, "queued {queued}");
    }
    drop(stalled);
}

#[tokio::test]
async fn a_backend_that_falls_behind_and_catches_up_gets_the_call_in_order() {
    // While the backend keeps up, each frame is written to its socket by the session at
    // once; when the socket fills, the writer takes over and frames queue. Crossing from one
    // to the other and back must neither reorder nor lose a frame that is not counted.
    let mut slow = Backend::start(Behaviour::PauseFirst(Duration::from_millis(2000))).await;
    let proxy = Proxy::start(settings(&[("slow", &slow.url(), WireFormat::Twilio)])).await;
    let mut call = TwilioCall::connect(&proxy, "9").await;
    call.start(&[("backendIds", "slow")]).await;
    let (burst, after) = (1500, 100);
    for i in 0..burst {
        call.media(&sized_payload(i, 6000)).await;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The backend reads again and catches up; the call goes on at Twilio's pace.
    slow.wait_for("the backlog read", |log| {
        payloads(&texts(log))
            .last()
            .is_some_and(|p| frame_number(p) == burst as u64 - 1)
    })
    .await;
    for i in burst..burst + after {
        call.media(&sized_payload(i, 6000)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.stop().await;
    slow.wait_for_stop().await;

    assert_eq!(slow.connections(), 1, "the link held, without a reconnect");
    let numbers: Vec<u64> = payloads(&slow.texts())
        .iter()
        .map(|p| frame_number(p))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice"
    );
    let total = (burst + after) as u64;
    assert_eq!(
        numbers[numbers.len() - after..],
        (burst as u64..total).collect::<Vec<_>>(),
        "every frame after the backend caught up"
    );
    let m = proxy.metrics().await;
    let dropped = metric(
        &m,
        r#"call_proxy_backend_frames_dropped_total{backend="slow"}"#,
    )
    .unwrap() as u64;
    assert!(dropped > 0, "the backend fell behind far enough to drop");
    assert_eq!(
        numbers.len() as u64 + dropped,
        total,
        "every frame is either delivered or counted as dropped"
    );
    assert_eq!(
        metric(&m, r#"call_proxy_backend_frames_out_total{backend="slow"}"#),
        Some(numbers.len() as f64 + 2.0),
        "start, the frames delivered, stop"
    );
}

#[tokio::test]
async fn a_backend_killed_mid_call_is_reconnected_and_the_other_sees_no_gap() {
    let mut flaky = Backend::start(Behaviour::DropAfter(50)).await;
    let mut steady = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[
        ("flaky", &flaky.url(), WireFormat::Twilio),
        ("steady", &steady.url(), WireFormat::Twilio),
    ]))
    .await;
    let mut call = TwilioCall::connect(&proxy, "3").await;
    call.start(&[("backendIds", r#"["flaky","steady"]"#)]).await;
    for i in 0..300 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    call.stop().await;
    steady.wait_for_stop().await;
    flaky.wait_for_stop().await;

    assert_eq!(
        payloads(&steady.texts()),
        (0..300).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(flaky.connections(), 2, "reconnected once");
    let second = flaky.texts_of(2);
    assert_eq!(second[0], call.start_text, "start again first");
    let again = payloads(&second);
    assert!(!again.is_empty(), "frames after the reconnect");
    // What it gets after reconnecting is the call's tail, in order, up to the last frame.
    let first_again: usize = (0..300).position(|i| payload(i) == again[0]).unwrap();
    assert!(first_again >= 50);
    assert_eq!(again, (first_again..300).map(payload).collect::<Vec<_>>());
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_reconnects_total{backend="flaky"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_backend_that_talks_and_closes_while_the_call_is_quiet_is_reconnected() {
    let mut chatty = Backend::start(Behaviour::TalkThenClose).await;
    let proxy = Proxy::start(settings(&[("chatty", &chatty.url(), WireFormat::Twilio)])).await;
    let mut call = TwilioCall::connect(&proxy, "quiet").await;
    call.start(&[("backendIds", r#"["chatty"]"#)]).await;
    // No media flows yet: only the link's own watch on the backend can notice the close,
    // which arrives in one segment behind two messages the backend should not have sent.
    chatty
        .wait_for("a second connection", |log| {
            log.iter()
                .filter(|s| matches!(s, Seen::Connected(_)))
                .count()
                == 2
        })
        .await;
    call.media(&payload(0)).await;
    call.stop().await;
    chatty.wait_for_stop().await;

    let second = chatty.texts_of(2);
    assert_eq!(second[0], call.start_text, "start again first");
    assert_eq!(payloads(&second), vec![payload(0)]);
    let m = proxy.metrics().await;
    let series = |name: &str| format!(r#"call_proxy_{name}{{backend="chatty"}}"#);
    assert_eq!(
        metric(&m, &series("backend_ignored_messages_total")),
        Some(2.0)
    );
    assert_eq!(metric(&m, &series("backend_reconnects_total")), Some(1.0));
}

#[tokio::test]
async fn when_every_backend_is_gone_the_stream_is_closed_after_the_grace_period() {
    let mut s = settings(&[
        ("a", &dead_url().await, WireFormat::Twilio),
        ("b", &dead_url().await, WireFormat::Compact),
    ]);
    s.backends.reconnect_max_tries = 2;
    s.backends.reconnect_window_ms = 2000;
    s.media.all_backends_gone_grace_ms = 700;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "4").await;
    let began = Instant::now();
    call.start(&[("backendIds", "a,b")]).await;
    call.media(&payload(0)).await;
    let frame = call.closed().await.expect("a close frame with a reason");
    let took = began.elapsed();
    assert_eq!(u16::from(frame.code), 1011);
    assert!(frame.reason.contains("backend"), "{}", frame.reason);
    // More than two tries and half the 2 s window (jittered waits may spend the tries
    // sooner), then the 700 ms grace period; never past the window.
    assert!(
        took >= Duration::from_millis(1700) && took < Duration::from_millis(2700 + 1000),
        "closed after {took:?}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, r#"call_proxy_calls_total{outcome="backends_gone"}"#),
        Some(1.0)
    );
    let failures = metric(&m, r#"call_proxy_backend_failures_total{backend="a"}"#).unwrap();
    assert!(failures >= 3.0, "{failures} failures");
}

/// A healthy call that streams in the background while another call misbehaves; answers
/// how many of its frames its backend received.
async fn healthy_call(proxy: &Proxy, backend_id: &str, frames: usize) -> TwilioCall {
    let mut call = TwilioCall::connect(proxy, "healthy").await;
    call.start(&[("backendIds", backend_id)]).await;
    for i in 0..frames {
        call.media(&payload(i)).await;
    }
    call
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_costs_a_healthy_call_nothing() {
    let mut good = Backend::start(Behaviour::Normal).await;
    let mut bad = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("good", &good.url(), WireFormat::Twilio),
        ("bad", &bad.url(), WireFormat::Compact),
    ]);
    s.media.max_message_bytes = 16 * 1024;
    let proxy = Proxy::start(s).await;

    let mut healthy = healthy_call(&proxy, "good", 100).await;

    // Skipped and counted, the call goes on: garbage, media before start, a second start,
    // a payload that is not base64 (the compact backend would have to forward it).
    let mut call = TwilioCall::connect(&proxy, "bad").await;
    call.send_text("{not json".into()).await;
    call.send_text(r#"{"no":"event"}"#.into()).await;
    call.media(&payload(999)).await;
    call.start(&[("backendIds", "bad")]).await;
    call.start(&[("backendIds", "good")]).await;
    call.media(&payload(1)).await;
    call.send_text(
        r#"{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"9","timestamp":"180","payload":"%%%not base64%%%"},"streamSid":"MZbad"}"#.into(),
    )
    .await;
    call.send_text(r#"{"event":"surprise","streamSid":"MZbad"}"#.into())
        .await;
    call.media(&payload(2)).await;
    for i in 100..150 {
        healthy.media(&payload(i)).await;
    }
    // A binary frame is not Twilio: the stream is closed with a reason.
    call.ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let frame = call.closed().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1003);
    bad.wait_for_stop().await;
    assert_eq!(
        payloads(&bad.texts()),
        [payload(1), payload(2)],
        "only the good frames"
    );
    assert_eq!(bad.texts()[0], r#"{"event":"start"}"#);

    // Oversized message: closed with 1009.
    let mut call = TwilioCall::connect(&proxy, "big").await;
    call.start(&[("backendIds", "bad")]).await;
    call.media(&sized_payload(0, 20_000)).await;
    let frame = call.closed().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1009);

    // Routing the stream nowhere: refused with a reason that names the problem.
    for (params, needle) in [
        ([("backendIds", r#"["ghost"]"#)], "ghost"),
        ([("backendHosts", r#"["169.254.169.254:80"]"#)], "allowlist"),
        ([("backendIds", "")], "no backend"),
    ] {
        let mut call = TwilioCall::connect(&proxy, "nowhere").await;
        call.start(&params).await;
        let frame = call.closed().await.expect("close frame");
        assert_eq!(u16::from(frame.code), 1008);
        assert!(
            frame.reason.contains(needle),
            "{} lacks {needle}",
            frame.reason
        );
    }

    for i in 150..200 {
        healthy.media(&payload(i)).await;
    }
    healthy.stop().await;
    good.wait_for_stop().await;
    assert_eq!(
        payloads(&good.texts()),
        (0..200).map(payload).collect::<Vec<_>>(),
        "the healthy call lost nothing"
    );

    let m = proxy.metrics().await;
    for (reason, n) in [
        ("malformed_json", 2.0),
        ("media_before_start", 1.0),
        ("duplicate_start", 1.0),
        ("invalid_payload", 1.0),
        ("unknown_event", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"call_proxy_rejected_messages_total{{reason="{reason}"}}"#)
            ),
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(
        metric(&m, r#"call_proxy_calls_total{outcome="protocol_error"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_calls_total{outcome="refused_no_backend"}"#
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn shutdown_sends_stop_to_every_backend_and_returns_in_time() {
    let mut a = Backend::start(Behaviour::Normal).await;
    let mut b = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[
        ("a", &a.url(), WireFormat::Twilio),
        ("b", &b.url(), WireFormat::Compact),
    ]))
    .await;
    let mut calls = Vec::new();
    for n in 0..3 {
        let mut call = TwilioCall::connect(&proxy, &format!("sd{n}")).await;
        call.start(&[("backendIds", "a,b")]).await;
        for i in 0..20 {
            call.media(&payload(i)).await;
        }
        calls.push(call);
    }
    a.wait_for("three calls' frames", |log| {
        payloads(&texts(log)).len() == 60
    })
    .await;

    let took = proxy.shutdown().await;
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    a.wait_for("three stops", |log| {
        texts(log).iter().filter(|t| event(t) == "stop").count() == 3
    })
    .await;
    b.wait_for("three stops", |log| {
        texts(log).iter().filter(|t| event(t) == "stop").count() == 3
    })
    .await;
    for t in a.texts().iter().filter(|t| event(t) == "stop") {
        let v: serde_json::Value = serde_json::from_str(t).unwrap();
        assert!(
            v["stop"]["callSid"].as_str().unwrap().starts_with("CAsd"),
            "{t}"
        );
    }
    for call in &mut calls {
        let frame = call.closed().await.expect("close frame");
        assert_eq!(u16::from(frame.code), 1001);
    }
}

#[tokio::test]
async fn execution_is_connected_while_the_stream_lives() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    assert_eq!(proxy.get("/executions/FN1/connected").await.status(), 410);

    let mut call = TwilioCall::connect(&proxy, "ex").await;
    call.start(&[("backendIds", "rec"), ("executionId", "FN1")])
        .await;
    call.media(&payload(0)).await;
    rec.wait_for("a frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    let r = proxy.get("/executions/FN1/connected").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["connected"],
        true
    );
    assert_eq!(proxy.get("/executions/FN2/connected").await.status(), 410);

    call.stop().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if proxy.get("/executions/FN1/connected").await.status() == 410 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still connected after the stream ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_stream_is_closed_and_its_backends_get_stop() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.idle_timeout_ms = 400;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "idle").await;
    call.start(&[("backendIds", "rec")]).await;
    // Active for a while: not idle.
    for i in 0..10 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let began = Instant::now();
    let frame = call.closed().await.expect("close frame");
    assert!(frame.reason.contains("idle"), "{}", frame.reason);
    assert!(began.elapsed() >= Duration::from_millis(250));
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()).len(), 10);
}

#[tokio::test]
async fn calls_beyond_the_cap_get_503() {
    let rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    s.media.max_calls = 1;
    let proxy = Proxy::start(s).await;
    let mut first = TwilioCall::connect(&proxy, "cap1").await;
    first.start(&[("backendIds", "rec")]).await;
    let err = tokio_tungstenite::connect_async(proxy.ws_url())
        .await
        .expect_err("second call refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("capacity"), "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    first.stop().await;
    first.closed().await;
    // The place is free again.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tokio_tungstenite::connect_async(proxy.ws_url())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn backend_hosts_on_the_allowlist_get_the_compact_form() {
    let mut spk = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[])).await;
    let mut call = TwilioCall::connect(&proxy, "hosts").await;
    let hosts = format!(r#"["{}","169.254.169.254:80"]"#, spk.addr);
    call.start(&[("backendHosts", &hosts)]).await;
    call.media(&payload(0)).await;
    call.stop().await;
    spk.wait_for_stop().await;
    assert_eq!(
        spk.texts(),
        [
            r#"{"event":"start"}"#.to_string(),
            format!(r#"{{"event":"media","media":"{}"}}"#, payload(0)),
            r#"{"event":"stop"}"#.to_string()
        ]
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_rejected_messages_total{reason="backend_entry"}"#
        ),
        Some(1.0),
        "the off-list entry is counted"
    );
}

/// A client may send its first frames in the same write as the handshake, before it has seen
/// the `101`: hyper reads them with the request, and they must reach the session first, in
/// order, not be lost between the HTTP server and the WebSocket.
#[tokio::test]
async fn frames_sent_with_the_handshake_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    let custom: std::collections::BTreeMap<String, String> =
        [("backendIds".to_string(), r#"["rec"]"#.to_string())].into();
    let start = call_proxy::twilio::messages::outbound::start(
        1,
        &call_proxy::twilio::messages::outbound::StartInfo {
            account_sid: "ACtest",
            call_sid: "CApipelined",
            stream_sid: "MZpipelined",
            tracks: &["inbound"],
            custom_parameters: &custom,
        },
    );
    let media: Vec<String> = (0..5)
        .map(|i| {
            call_proxy::twilio::messages::outbound::media(
                i + 2,
                "MZpipelined",
                "inbound",
                i + 1,
                i * 20,
                &payload(i as usize),
            )
        })
        .collect();
    let stop =
        call_proxy::twilio::messages::outbound::stop(7, "ACtest", "CApipelined", "MZpipelined");

    let mut bytes = b"GET /media HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    for text in std::iter::once(&start).chain(&media).chain([&stop]) {
        let mut frame = Frame::message(text.clone(), OpCode::Data(Data::Text), true);
        frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        frame.format(&mut bytes).unwrap();
    }
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(&bytes).await.unwrap();
    let mut answer = [0u8; 12];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");

    rec.wait_for_stop().await;
    let got = rec.texts();
    assert_eq!(got[0], start, "start first, byte for byte");
    assert_eq!(&got[1..6], &media[..], "every frame, in order");
    assert_eq!(event(&got[6]), "stop");
}

/// A call whose backends all take Twilio's own frames has its payloads checked without being
/// decoded: what is not base64 (a stray symbol, a stray bit before the padding, a missing
/// `=`) is still refused and counted, and is never forwarded.
#[tokio::test]
async fn a_twilio_format_call_forwards_no_payload_that_is_not_base64() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    let mut call = TwilioCall::connect(&proxy, "b64").await;
    call.start(&[("backendIds", r#"["rec"]"#)]).await;
    call.media(&payload(1)).await;
    for bad in ["%%%not base64%%%", "AB==", "AAA", "AA=A"] {
        call.send_text(format!(
            r#"{{"event":"media","sequenceNumber":"9","media":{{"track":"inbound","chunk":"9","timestamp":"180","payload":"{bad}"}},"streamSid":"MZb64"}}"#
        ))
        .await;
    }
    call.media(&payload(2)).await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()), [payload(1), payload(2)]);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_rejected_messages_total{reason="invalid_payload"}"#
        ),
        Some(4.0)
    );
}
