//! Deploys that no caller notices: the real binary, signalled as a rolling deploy signals it,
//! drains — readiness 503 at once, the listener still answering, live calls running to their
//! own end with every frame delivered — and exits as soon as the last call has ended. A
//! second signal, or the drain deadline, ends what is left with `stop` to every backend.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};

/// Twilio's pace: a 20 ms frame.
const FRAME: Duration = Duration::from_millis(20);

fn two_backends(a: &Backend, b: &Backend, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = vec![
        ("CALL_PROXY__BACKENDS__TABLE__A__URL".to_string(), a.url()),
        (
            "CALL_PROXY__BACKENDS__TABLE__A__FORMAT".into(),
            "twilio".into(),
        ),
        ("CALL_PROXY__BACKENDS__TABLE__B__URL".into(), b.url()),
        (
            "CALL_PROXY__BACKENDS__TABLE__B__FORMAT".into(),
            "twilio".into(),
        ),
        ("CALL_PROXY__BACKENDS__DEFAULT".into(), "a,b".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ServiceProcess::spawn(&env)
}

/// How a played call ended, as Twilio's side saw it.
struct Played {
    stream_sid: String,
    sent: usize,
    close: Option<u16>,
    closed_at: Instant,
}

/// Plays a started call at Twilio's pace: `frames` media frames then `stop` (or, with `None`,
/// frames until the proxy closes the stream). Answers how it ended.
fn play(mut call: TwilioCall, frames: Option<usize>) -> JoinHandle<Played> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FRAME);
        let mut sent = 0;
        while frames.is_none_or(|n| sent < n) {
            every.tick().await;
            // A stream the proxy has closed takes no more frames.
            let text = call.media_text(&payload(sent));
            if call.ws.send(Message::Text(text.into())).await.is_err() {
                break;
            }
            sent += 1;
        }
        if frames.is_some() {
            call.stop().await;
        }
        let close = call.closed().await.map(|f| u16::from(f.code));
        Played {
            stream_sid: call.stream_sid.clone(),
            sent,
            close,
            closed_at: Instant::now(),
        }
    })
}

/// The messages a Twilio-format backend received for one stream, in order.
fn stream_texts(backend: &Backend, stream_sid: &str) -> Vec<String> {
    backend
        .texts()
        .into_iter()
        .filter(|t| {
            serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| {
                v["streamSid"] == stream_sid || v["start"]["streamSid"] == stream_sid
            })
        })
        .collect()
}

/// `start`, every frame sent in order, then `stop`: the whole call.
fn assert_whole_call(backend: &Backend, name: &str, stream_sid: &str, frames: usize) {
    let texts = stream_texts(backend, stream_sid);
    assert_eq!(
        texts.first().map(|t| event(t)),
        Some("start".into()),
        "{name} {stream_sid}"
    );
    assert_eq!(
        texts.last().map(|t| event(t)),
        Some("stop".into()),
        "{name} {stream_sid}"
    );
    assert_eq!(
        payloads(&texts),
        (0..frames).map(payload).collect::<Vec<_>>(),
        "{name} got every frame of {stream_sid}, in order"
    );
}

async fn status_of(url: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("answered");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// A new TCP connection gets an HTTP answer (never a connection left in the backlog).
fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).expect("the listener is open");
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)
        .expect("an answer within 2 s");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_live_calls_finish_with_every_frame_then_exits_at_once() {
    let mut a = Backend::start(Behaviour::Normal).await;
    let mut b = Backend::start(Behaviour::Normal).await;
    let proxy = two_backends(&a, &b, &[]);
    let (ready_url, health_url) = (proxy.url("/readyz"), proxy.url("/healthz"));
    assert_eq!(status_of(&ready_url).await.0, 200);

    // Five calls of 6 s (300 frames) each.
    let frames = 300;
    let mut calls = Vec::new();
    for i in 0..5 {
        let mut call = TwilioCall::connect_url(&proxy.ws_url(), &format!("drain{i}")).await;
        call.start(&[]).await;
        calls.push(play(call, Some(frames)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let signalled = Instant::now();
    proxy.sigterm();
    let exited = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let status = proxy.wait_exit(Duration::from_secs(30));
        (status, Instant::now(), proxy)
    });
    loop {
        let (status, body) = status_of(&ready_url).await;
        if status == 503 {
            assert_eq!(body["error"], "draining");
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(300),
            "/readyz still {status} 300 ms after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, health) = status_of(&health_url).await;
    assert_eq!(status, 200, "still alive while draining");
    assert_eq!(health["draining"], true, "{health}");

    let mut last_end = signalled;
    let mut sids = Vec::new();
    for call in calls {
        let played = call.await.unwrap();
        assert_eq!(played.sent, frames);
        assert_eq!(
            played.close,
            Some(1000),
            "the call ran to its own end (never 1001 on a drain)"
        );
        last_end = last_end.max(played.closed_at);
        sids.push(played.stream_sid);
    }
    let (status, exited_at, proxy) = exited.await.unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        exited_at.saturating_duration_since(last_end) < Duration::from_secs(1),
        "exited {:?} after the last call ended",
        exited_at.saturating_duration_since(last_end)
    );
    proxy.wait_for_log("drained: no call is left");

    for backend in [&mut a, &mut b] {
        backend
            .wait_for("every call's stop", |log| {
                texts(log).iter().filter(|t| event(t) == "stop").count() == 5
            })
            .await;
    }
    for sid in &sids {
        assert_whole_call(&a, "a", sid, frames);
        assert_whole_call(&b, "b", sid, frames);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_long_calls_at_once_with_stop_to_every_backend() {
    let mut a = Backend::start(Behaviour::Normal).await;
    let mut b = Backend::start(Behaviour::Normal).await;
    let proxy = two_backends(&a, &b, &[]);
    let mut calls = Vec::new();
    for i in 0..3 {
        let mut call = TwilioCall::connect_url(&proxy.ws_url(), &format!("long{i}")).await;
        call.start(&[]).await;
        // 30 s calls: far longer than this test waits.
        calls.push(play(call, None));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = Instant::now();
    proxy.sigterm();
    proxy.wait_for_log("draining: /readyz answers 503; live calls run to their end");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.sigterm();
    let (status, proxy) = proxy.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        first.elapsed() < Duration::from_secs(6),
        "exited {:?} after the first signal",
        first.elapsed()
    );
    proxy.wait_for_log("second signal: ending the drain now");
    for call in calls {
        let played = call.await.unwrap();
        assert_eq!(
            played.close,
            Some(1001),
            "Twilio is told the service is going away"
        );
        for (name, backend) in [("a", &mut a), ("b", &mut b)] {
            backend
                .wait_for("the call's stop", |log| {
                    texts(log)
                        .iter()
                        .any(|t| event(t) == "stop" && t.contains(played.stream_sid.as_str()))
                })
                .await;
            let texts = stream_texts(backend, &played.stream_sid);
            let got = payloads(&texts);
            assert!(
                !got.is_empty() && got.len() <= played.sent,
                "{name}: {} frames of {}",
                got.len(),
                played.sent
            );
            assert_eq!(
                got,
                (0..got.len()).map(payload).collect::<Vec<_>>(),
                "{name}: in order, nothing skipped"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_admission_window_new_streams_get_503_and_every_connection_an_answer() {
    let mut a = Backend::start(Behaviour::Normal).await;
    let b = Backend::start(Behaviour::Normal).await;
    let proxy = two_backends(&a, &b, &[("CALL_PROXY__SERVER__DRAIN_ACCEPT_MS", "800")]);
    let mut early = TwilioCall::connect_url(&proxy.ws_url(), "early").await;
    early.start(&[]).await;
    let early = play(early, Some(150));

    proxy.sigterm();
    proxy.wait_for_log("draining: /readyz answers 503; live calls run to their end");
    // Within the window (the load balancer may still send one): admitted and streamed.
    let mut late = TwilioCall::connect_url(&proxy.ws_url(), "late").await;
    late.start(&[]).await;
    let late = play(late, Some(50));

    proxy.wait_for_log("draining: new streams are refused from now on");
    match tokio_tungstenite::connect_async(proxy.ws_url()).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(
                response.headers().get("retry-after").is_some(),
                "{response:?}"
            );
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("draining"),
                "{body}"
            );
        }
        other => panic!("a new stream after the window: {other:?}"),
    }
    let addr = proxy.addr;
    let answers =
        tokio::task::spawn_blocking(move || (raw_get(addr, "/healthz"), raw_get(addr, "/readyz")))
            .await
            .unwrap();
    assert!(answers.0.starts_with("HTTP/1.1 200"), "{}", answers.0);
    assert!(answers.1.starts_with("HTTP/1.1 503"), "{}", answers.1);

    let (early, late) = (early.await.unwrap(), late.await.unwrap());
    assert_eq!((early.close, late.close), (Some(1000), Some(1000)));
    let (status, proxy) = proxy.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    let refused = proxy
        .lines()
        .iter()
        .filter(|l| l.contains("stream refused") && l.contains("draining"))
        .count();
    assert_eq!(refused, 1, "the refusal is logged");
    a.wait_for("both calls' stop", |log| {
        texts(log).iter().filter(|t| event(t) == "stop").count() == 2
    })
    .await;
    assert_whole_call(&a, "a", &early.stream_sid, 150);
    assert_whole_call(&a, "a", &late.stream_sid, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_ends_what_is_left_with_stop_and_1001() {
    let mut a = Backend::start(Behaviour::Normal).await;
    let b = Backend::start(Behaviour::Normal).await;
    let proxy = two_backends(&a, &b, &[("CALL_PROXY__SERVER__DRAIN_TIMEOUT_MS", "1500")]);
    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "overtime").await;
    call.start(&[]).await;
    let call = play(call, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    proxy.sigterm();
    let played = call.await.unwrap();
    let after = played.closed_at.duration_since(signalled);
    assert_eq!(played.close, Some(1001));
    assert!(
        after >= Duration::from_millis(1400) && after < Duration::from_secs(5),
        "ended {after:?} after the signal, the deadline is 1.5 s"
    );
    let (status, proxy) = proxy.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    proxy.wait_for_log(
        "drain deadline (server.drain_timeout_ms) reached; ending the calls that are left",
    );
    a.wait_for_stop().await;
    let got = payloads(&stream_texts(&a, &played.stream_sid));
    assert_eq!(got, (0..got.len()).map(payload).collect::<Vec<_>>());
    assert!(
        got.len() >= 80,
        "the call streamed through the drain: {}",
        got.len()
    );
}
