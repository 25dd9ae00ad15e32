//! Live hand-off, through the real binaries: two instances on one Redis behind a load
//! balancer, a fake Twilio whose calls stream the same audio to every stream of a call and
//! whose REST API starts and stops streams. A draining instance moves its one-way calls to
//! the other, and each backend hears one call across its two connections.

mod common;

use std::time::{Duration, Instant};

use common::fake_twilio::{self, FakeTwilio, LoadBalancer};
use common::*;
use serde_json::Value;

/// Two instances' settings: Redis, hand-off on with the fake's REST API, the load balancer's
/// address as the public URL; `rec` records, `spk` speaks.
fn env(
    redis: &RedisServer,
    fake: &FakeTwilio,
    lb: std::net::SocketAddr,
    rec: &str,
    spk: &str,
    timeout_ms: u64,
) -> Vec<(String, String)> {
    [
        ("CALL_PROXY__STORE__KIND", "redis".to_string()),
        ("CALL_PROXY__STORE__REDIS_URL", redis.url()),
        ("CALL_PROXY__SERVER__HANDOFF", "true".into()),
        (
            "CALL_PROXY__SERVER__HANDOFF_TIMEOUT_MS",
            timeout_ms.to_string(),
        ),
        (
            "CALL_PROXY__TWILIO__ACCOUNT_SID",
            fake_twilio::ACCOUNT.into(),
        ),
        (
            "CALL_PROXY__TWILIO__AUTH_TOKEN",
            fake_twilio::AUTH_TOKEN.into(),
        ),
        ("CALL_PROXY__TWILIO__API_BASE_URL", fake.base_url()),
        ("CALL_PROXY__TWILIO__PUBLIC_URL", format!("http://{lb}")),
        ("CALL_PROXY__BACKENDS__TABLE__REC__URL", rec.to_string()),
        ("CALL_PROXY__BACKENDS__TABLE__REC__FORMAT", "twilio".into()),
        ("CALL_PROXY__BACKENDS__TABLE__SPK__URL", spk.to_string()),
        ("CALL_PROXY__BACKENDS__TABLE__SPK__FORMAT", "twilio".into()),
        ("CALL_PROXY__BACKENDS__TABLE__SPK__SPEAKS", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn spawn(env: &[(String, String)]) -> ServiceProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ServiceProcess::start(&env).await
}

/// One connection's messages at the recording backend, parsed.
fn connection(rec: &Backend, conn: usize) -> Vec<Value> {
    rec.texts_of(conn)
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

/// The recording backend's connections of one call, in order, each as its messages.
fn connections_of(rec: &Backend, call_sid: &str) -> Vec<Vec<Value>> {
    (1..=rec.connections())
        .map(|c| connection(rec, c))
        .filter(|m| m.first().is_some_and(|s| s["start"]["callSid"] == call_sid))
        .collect()
}

/// The frame numbers of a connection's media, in order.
fn frames(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m["event"] == "media")
        .map(|m| frame_number(m["media"]["payload"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_moves_its_one_way_calls_and_the_backends_hear_one_call() {
    let redis = RedisServer::start();
    let fake = FakeTwilio::start().await;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut spk = TalkingBackend::start().await;
    // The public URL is the balancer's; it serves once the instances listen.
    let balancer = LoadBalancer::bind().await;
    let lb = balancer.addr;
    let env = env(&redis, &fake, lb, &rec.url(), &spk.url(), 3000);
    let a = spawn(&env).await;
    let b = spawn(&env).await;
    balancer.serve(vec![a.addr, b.addr]);

    // Three one-way calls and one with a voice agent, on A, 8 s each.
    const FRAMES: usize = 400;
    let mut calls = Vec::new();
    for i in 0..3 {
        let caller = format!("+1555000100{i}");
        calls.push(
            fake.call(
                &a.ws_url(),
                &[
                    ("backendIds", "rec"),
                    ("callerId", &caller),
                    ("executionId", "FNmove"),
                ],
                FRAMES,
            )
            .await,
        );
    }
    let talking = fake
        .call(&a.ws_url(), &[("backendIds", "spk")], FRAMES)
        .await;
    spk.wait_for_start(1).await;
    rec.wait_for("every call's first second", |log| {
        payloads(&texts(log)).len() >= 3 * 50
    })
    .await;

    let began = Instant::now();
    a.sigterm();
    rec.wait_for("the three calls handed off", |log| {
        texts(log)
            .iter()
            .filter(|t| t.contains("handedOffTo"))
            .count()
            == 3
    })
    .await;
    let moved_in = began.elapsed();
    assert!(moved_in < Duration::from_secs(2), "moved in {moved_in:?}");
    // A says so while it waits for the talking call.
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("call_proxy_handoffs_total{outcome=\"moved\"} 3"),
        "{metrics}"
    );

    // A exits as soon as the talking call has ended: no one-way call holds it.
    spk.wait_for("the talking call's stop", |log| {
        log.iter()
            .any(|(_, m)| m.to_text().is_ok_and(|t| event(t) == "stop"))
    })
    .await;
    let talking_ended = Instant::now();
    let (status, a) = a.exited(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        talking_ended.elapsed() < Duration::from_secs(3),
        "A exited {:?} after its last call",
        talking_ended.elapsed()
    );

    rec.wait_for("every call's end", |log| {
        texts(log)
            .iter()
            .filter(|t| event(t) == "stop" && !t.contains("handedOffTo"))
            .count()
            == 3
    })
    .await;
    for call in &calls {
        let conns = connections_of(&rec, call);
        assert_eq!(conns.len(), 2, "{call}: two connections");
        let (old, new) = (&conns[0], &conns[1]);
        let old_sid = old[0]["start"]["streamSid"].as_str().unwrap();
        let new_sid = new[0]["start"]["streamSid"].as_str().unwrap();
        // The old connection ends with a stop naming the new stream, the new one begins with
        // a start naming the old, carrying the call's parameters.
        let stop = old.last().unwrap();
        assert_eq!(stop["event"], "stop");
        assert_eq!(stop["stop"]["handedOffTo"], new_sid);
        let params = &new[0]["start"]["customParameters"];
        assert_eq!(params["handoffOf"], old_sid);
        assert_eq!(params["executionId"], "FNmove");
        assert!(params["callerId"]
            .as_str()
            .unwrap()
            .starts_with("+1555000100"));
        assert_eq!(new.last().unwrap()["event"], "stop");
        assert!(new.last().unwrap()["stop"].get("handedOffTo").is_none());

        // Across both: the call's audio, with at most one frame repeated or missing.
        let (before, after) = (frames(old), frames(new));
        let heard: Vec<u64> = before.iter().chain(&after).copied().collect();
        assert_eq!(heard[0], 0);
        assert_eq!(
            *heard.last().unwrap(),
            FRAMES as u64 - 1,
            "{call}: to the end"
        );
        let join = before.len();
        for (i, pair) in heard.windows(2).enumerate() {
            let step = pair[1] as i64 - pair[0] as i64;
            if i + 1 == join {
                assert!(
                    (0..=2).contains(&step),
                    "{call}: at the join {} then {}",
                    pair[0],
                    pair[1]
                );
            } else {
                assert_eq!(step, 1, "{call}: frame {} then {}", pair[0], pair[1]);
            }
        }
    }

    // The talking call never moved: one connection, its start and stop without hand-off.
    let heard = spk.texts();
    assert!(heard
        .iter()
        .all(|t| !t.contains("handoffOf") && !t.contains("handedOffTo")));
    assert!(spk.log.iter().all(|(conn, _)| *conn == 1));
    let asked: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/Streams.json"))
        .collect();
    assert_eq!(asked.len(), 3, "one new stream per one-way call");
    assert!(asked.iter().all(|r| !r.path.contains(&talking)));

    // What Twilio was asked: Twilio's fields, Basic auth (the fake refuses anything else).
    for r in &asked {
        assert_eq!(r.field("Url"), Some(format!("ws://{lb}/media").as_str()));
        assert_eq!(r.field("Track"), Some("inbound_track"));
        assert_eq!(
            r.field("StatusCallback"),
            Some(format!("http://{lb}/twilio/stream-status").as_str())
        );
        let p = r.parameters();
        assert!(p["routeToken"].starts_with("v1."), "{p:?}");
        assert!(p["handoffOf"].starts_with("MZ"));
    }
    // And each old stream was stopped through the API.
    let stopped = fake
        .requests()
        .into_iter()
        .filter(|r| r.field("Status") == Some("stopped"))
        .count();
    assert_eq!(stopped, 3);
    let ended: Vec<String> = a.lines();
    assert!(
        ended
            .iter()
            .filter(|l| l.contains("\"outcome\":\"handed_off\"") && l.contains("call ended"))
            .count()
            == 3,
        "A logged three calls ended by moving"
    );
    drop(b);
}
