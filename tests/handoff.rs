//! Live hand-off, through the real binaries: two instances on one Redis behind a load
//! balancer, a fake Twilio whose calls stream the same audio to every stream of a call and
//! whose REST API starts and stops streams. A draining instance moves its one-way calls to
//! the other, and each backend hears one call across its two connections.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use call_proxy::config::WireFormat;
use common::fake_twilio::{self, FakeTwilio, LoadBalancer, Mode};
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

/// Two instances on one Redis behind the balancer (A first), the fake Twilio they call, and
/// the backends of their table: `rec` records, `spk` speaks.
struct Pair {
    redis: RedisServer,
    fake: Arc<FakeTwilio>,
    rec: Backend,
    spk: TalkingBackend,
    a: ServiceProcess,
    b: ServiceProcess,
    /// The balancer: the instances' public address.
    lb: std::net::SocketAddr,
}

async fn pair(timeout_ms: u64, extra: &[(&str, &str)]) -> Pair {
    let redis = RedisServer::start();
    let fake = FakeTwilio::start().await;
    let rec = Backend::start(Behaviour::Normal).await;
    let spk = TalkingBackend::start().await;
    // The public URL is the balancer's; it serves once the instances listen.
    let balancer = LoadBalancer::bind().await;
    let lb = balancer.addr;
    let mut env = env(&redis, &fake, lb, &rec.url(), &spk.url(), timeout_ms);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let a = spawn(&env).await;
    let b = spawn(&env).await;
    balancer.serve(vec![a.addr, b.addr]);
    Pair {
        redis,
        fake,
        rec,
        spk,
        a,
        b,
        lb,
    }
}

async fn spawn(env: &[(String, String)]) -> ServiceProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ServiceProcess::start(&env).await
}

/// An operator route's JSON, with the API key the processes are given.
async fn operator_json(p: &ServiceProcess, path: &str) -> Value {
    reqwest::Client::new()
        .get(p.url(path))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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
    let Pair {
        redis: _redis,
        fake,
        mut rec,
        mut spk,
        a,
        b,
        lb,
    } = pair(3000, &[]).await;

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
    // A says so while it waits for the talking call: counted, and each call it ended by moving
    // names the stream that has it; B lists the calls it took over.
    let deadline = Instant::now() + Duration::from_secs(5);
    let recent = loop {
        let recent = operator_json(&a, "/calls/recent").await;
        let moved = recent["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["outcome"] == "handed_off")
            .count();
        if moved == 3 {
            break recent;
        }
        assert!(Instant::now() < deadline, "{recent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for c in recent["data"].as_array().unwrap() {
        if c["outcome"] == "handed_off" {
            assert!(
                c["handoff"].as_str().unwrap().starts_with("moved to MZ"),
                "{c}"
            );
        }
    }
    let page = a.admin_page().await;
    assert_eq!(
        page.matches("<td class=\"handoff\">moved to MZ").count(),
        3,
        "the page's recent calls say where each went: {page}"
    );
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("call_proxy_handoffs_total{outcome=\"moved\"} 3"),
        "{metrics}"
    );
    // B shows each call moving in (its frames held until it has placed them against A's
    // cut), then moved in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let live_on_b = operator_json(&b, "/calls").await;
        let taken = live_on_b["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["handoff"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("moved in from MZ"))
            })
            .count();
        if taken == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{live_on_b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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

/// A hand-off that fails leaves the call where it is: Twilio's API answering 500, or a new
/// stream that never reaches an instance. The call drains on A as it would have, its backend
/// hears it whole on one connection, and the failure is counted by its reason. A stray new
/// stream is stopped through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hand_off_leaves_the_call_to_drain_and_loses_nothing() {
    for (mode, outcome) in [
        (Mode::Fail, "rest_failed"),
        (Mode::NeverConnect, "timed_out"),
    ] {
        let redis = RedisServer::start();
        let fake = FakeTwilio::start().await;
        fake.set_mode(mode);
        let mut rec = Backend::start(Behaviour::Normal).await;
        let spk = TalkingBackend::start().await;
        let balancer = LoadBalancer::bind().await;
        let env = env(&redis, &fake, balancer.addr, &rec.url(), &spk.url(), 1000);
        let a = spawn(&env).await;
        balancer.serve(vec![a.addr]);

        const FRAMES: usize = 200;
        let call = fake
            .call(&a.ws_url(), &[("backendIds", "rec")], FRAMES)
            .await;
        rec.wait_for("the first frames", |log| payloads(&texts(log)).len() >= 20)
            .await;
        a.sigterm();
        let deadline = Instant::now() + Duration::from_secs(3);
        let metrics = loop {
            let metrics = a.metrics().await;
            if metrics.contains(&format!(
                "call_proxy_handoffs_total{{outcome=\"{outcome}\"}} 1"
            )) {
                break metrics;
            }
            assert!(Instant::now() < deadline, "{mode:?}: {metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!metrics.contains("outcome=\"moved\""), "{metrics}");
        let (status, a) = a.exited(Duration::from_secs(20)).await;
        assert!(status.success(), "{mode:?}: {status}");

        rec.wait_for_stop().await;
        assert_eq!(
            rec.connections(),
            1,
            "{mode:?}: the call stayed on its connection"
        );
        let heard = frames(&connection(&rec, 1));
        assert_eq!(
            heard,
            (0..FRAMES as u64).collect::<Vec<_>>(),
            "{mode:?}: every frame, once"
        );
        let last = connection(&rec, 1).pop().unwrap();
        assert_eq!(last["event"], "stop");
        assert!(last["stop"].get("handedOffTo").is_none());
        let requests = fake.requests();
        let stops: Vec<_> = requests
            .iter()
            .filter(|r| r.field("Status") == Some("stopped"))
            .collect();
        match mode {
            // Nothing was started, so nothing is stopped.
            Mode::Fail => assert!(stops.is_empty(), "{requests:?}"),
            // The stream Twilio started and no instance received is stopped, not billed on.
            _ => {
                assert_eq!(stops.len(), 1, "{requests:?}");
                assert!(stops[0].path.contains(&call));
            }
        }
        let log = a.lines().join("\n");
        assert!(
            log.contains("the call stays here"),
            "{mode:?}: the reason is logged"
        );
    }
}

/// A hand-off token opens one stream, of its call, signed with the instances' secret: a
/// replayed one, a forged one and a `handoffOf` without a token each take nothing over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_replayed_hand_off_token_opens_nothing() {
    let Pair {
        redis: _redis,
        fake,
        mut rec,
        a,
        b,
        ..
    } = pair(3000, &[]).await;
    let call = fake
        .call(
            &a.ws_url(),
            &[("backendIds", "rec"), ("callerId", "+15550009000")],
            400,
        )
        .await;
    rec.wait_for("the first frames", |log| payloads(&texts(log)).len() >= 10)
        .await;
    a.sigterm();
    rec.wait_for("the hand-off", |log| {
        let texts = texts(log);
        texts.iter().any(|t| t.contains("handedOffTo"))
            && texts.iter().any(|t| t.contains("handoffOf"))
    })
    .await;
    let asked = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/Streams.json"))
        .unwrap();
    let params = asked.parameters();
    let moved_to = connection(&rec, 2)[0]["start"]["streamSid"]
        .as_str()
        .unwrap()
        .to_string();
    let connections = rec.connections();

    // The same token again, for the same call: used up.
    let call_name = call.strip_prefix("CA").unwrap();
    let mut replayed = TwilioCall::connect_url(&b.ws_url(), call_name).await;
    let pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    replayed.start(&pairs).await;
    let close = replayed.closed().await.expect("a close frame");
    assert!(close.reason.contains("already used"), "{}", close.reason);

    // A token made with another secret, naming the stream that now has the call.
    let forged = call_proxy::gate::route_token::issue(
        "not-the-instances-secret",
        &call_proxy::gate::route_token::Claims {
            caller: "+15550009000".into(),
            backend_ids: vec!["rec".into()],
            backend_hosts: vec![],
            expires_at: call_proxy::clock::unix_now() + 60,
            call_sid: Some(call.clone()),
            nonce: 1,
            handoff_of: Some(moved_to.clone()),
        },
    );
    let mut forger = TwilioCall::connect_url(&b.ws_url(), call_name).await;
    forger
        .start(&[("routeToken", &forged), ("handoffOf", &moved_to)])
        .await;
    let close = forger.closed().await.expect("a close frame");
    assert!(close.reason.contains("signature"), "{}", close.reason);
    assert_eq!(rec.connections(), connections, "neither opened a backend");

    // `handoffOf` alone is a stream parameter like any other: the call it names stays put.
    let mut plain = TwilioCall::connect_url(&b.ws_url(), "plain").await;
    plain
        .start(&[("backendIds", "rec"), ("handoffOf", &moved_to)])
        .await;
    plain.media(&payload(7)).await;
    rec.wait_for("the plain stream's frame", |log| {
        texts(log).iter().any(|t| t.contains("CAplain"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rec.drain();
    let handed: usize = rec
        .texts()
        .iter()
        .filter(|t| t.contains("handedOffTo"))
        .count();
    assert_eq!(handed, 1, "only A's own hand-off");
    assert!(fake
        .requests()
        .iter()
        .all(|r| r.field("Status").is_none() || !r.path.contains(&moved_to)));
    plain.stop().await;
    drop((a, b));
}

/// Waits until the backend has had `n` text messages containing `what`, counting each message
/// once as it comes (a scan of the whole log at each arrival would fall behind the load it
/// measures).
async fn count_until(rec: &mut Backend, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut counted, mut found) = (0, 0);
    loop {
        rec.drain();
        found += rec.log[counted..]
            .iter()
            .filter(|s| matches!(s, Seen::Text(_, t) if t.contains(what)))
            .count();
        counted = rec.log.len();
        if found >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{found} of {n} {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The benchmark (`bench/handoff.sh`, figures in BENCHMARKS.md): `HANDOFF_CALLS` one-way calls
/// (200 by default) of 20 s on A, SIGTERM 5 s in, all moved to B at once. Prints how long the
/// moves took, the frames lost or repeated, and how each join came out. Not a test of speed:
/// it asserts nothing about time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/handoff.sh runs it in release mode"]
async fn bench_many_calls_hand_off_at_once() {
    let calls_wanted: usize = std::env::var("HANDOFF_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    const FRAMES: usize = 1000;
    let Pair {
        redis: _redis,
        fake,
        mut rec,
        a,
        b,
        ..
    } = pair(
        5000,
        &[
            ("CALL_PROXY__RATE_LIMITS__HTTP_PER_IP_PER_MINUTE", "600000"),
            ("CALL_PROXY__RATE_LIMITS__HTTP_BURST", "60000"),
            (
                "CALL_PROXY__RATE_LIMITS__UPGRADES_PER_IP_PER_MINUTE",
                "600000",
            ),
            ("CALL_PROXY__RATE_LIMITS__UPGRADES_BURST", "60000"),
        ],
    )
    .await;

    let mut calls = Vec::new();
    for _ in 0..calls_wanted {
        calls.push(
            fake.call(&a.ws_url(), &[("backendIds", "rec")], FRAMES)
                .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let began = Instant::now();
    a.sigterm();
    count_until(&mut rec, "handedOffTo", calls_wanted).await;
    let moved_in = began.elapsed();
    // A exits as soon as its moved calls' old streams are stopped: its log says what it did.
    let (status, a) = a.exited(Duration::from_secs(60)).await;
    assert!(status.success());
    let a_moved = a
        .lines()
        .iter()
        .filter(|l| l.contains("hand-off: the backends moved to the new stream"))
        .count();
    count_until(&mut rec, "\"event\":\"stop\"", calls_wanted * 2).await;

    // Every connection's messages, grouped by call in one pass over the log.
    rec.drain();
    let mut by_conn: std::collections::BTreeMap<usize, Vec<Value>> = Default::default();
    for seen in &rec.log {
        if let Seen::Text(conn, text) = seen {
            by_conn
                .entry(*conn)
                .or_default()
                .push(serde_json::from_str(text).unwrap());
        }
    }
    let mut by_call: std::collections::HashMap<String, Vec<Vec<Value>>> = Default::default();
    for (_, messages) in by_conn {
        let call = messages[0]["start"]["callSid"]
            .as_str()
            .unwrap()
            .to_string();
        by_call.entry(call).or_default().push(messages);
    }
    let (mut exact, mut repeated, mut missed, mut worse) = (0, 0, 0, 0);
    let (mut lost, mut twice, mut unmoved) = (0i64, 0i64, 0);
    for call in &calls {
        let conns = by_call.remove(call).unwrap_or_default();
        if conns.len() != 2 {
            unmoved += 1;
            continue;
        }
        let (before, after) = (frames(&conns[0]), frames(&conns[1]));
        match after
            .first()
            .map(|f| *f as i64 - *before.last().unwrap() as i64)
        {
            Some(1) => exact += 1,
            Some(0) => repeated += 1,
            Some(2) => missed += 1,
            _ => worse += 1,
        }
        let heard: std::collections::BTreeSet<u64> = before.iter().chain(&after).copied().collect();
        lost += FRAMES as i64 - heard.len() as i64;
        twice += (before.len() + after.len()) as i64 - heard.len() as i64;
    }
    println!(
        "{}",
        serde_json::json!({
            "calls": calls_wanted,
            "moved_all_in_ms": moved_in.as_millis() as u64,
            "not_moved": unmoved,
            "frames_lost": lost,
            "frames_repeated": twice,
            "joins": {"exact": exact, "one_repeated": repeated, "one_missing": missed, "worse": worse},
            "a_logged_moved": a_moved,
        })
    );
    drop(b);
}

/// The original's calls move too: `backendHosts` (allowlisted, the compact form the original's
/// backends speak) beside `backendIds` the table does not know, as its Studio Flow sends
/// them. The hand-off token carries the hosts; the compact backend hears `stop` with
/// `handedOffTo`, then `start` with `handoffOf`, and the call's audio once across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_originals_backend_hosts_call_moves_in_the_compact_form() {
    let mut original = Backend::start(Behaviour::Normal).await;
    let Pair {
        redis: _redis,
        fake,
        a,
        b,
        ..
    } = pair(3000, &[]).await;

    const FRAMES: usize = 250;
    let hosts = format!(r#"["{}"]"#, original.addr);
    fake.call(
        &a.ws_url(),
        &[("backendIds", r#"["12","34"]"#), ("backendHosts", &hosts)],
        FRAMES,
    )
    .await;
    original
        .wait_for("the first frames", |log| payloads(&texts(log)).len() >= 25)
        .await;
    a.sigterm();
    original
        .wait_for("the call's end on the new connection", |log| {
            texts(log).iter().any(|t| t.contains("handedOffTo"))
                && texts(log)
                    .iter()
                    .filter(|t| event(t) == "stop" && !t.contains("handedOffTo"))
                    .count()
                    == 1
        })
        .await;
    let (status, _a) = a.exited(Duration::from_secs(10)).await;
    assert!(status.success());

    assert_eq!(original.connections(), 2);
    let (old, new) = (connection(&original, 1), connection(&original, 2));
    assert_eq!(old[0], serde_json::json!({"event": "start"}));
    let stop = old.last().unwrap();
    assert_eq!(stop["event"], "stop");
    let moved_to = stop["handedOffTo"].as_str().unwrap();
    assert!(moved_to.starts_with("MZ"));
    assert_eq!(new[0]["event"], "start");
    assert!(new[0]["handoffOf"].as_str().unwrap().starts_with("MZ"));
    assert_ne!(new[0]["handoffOf"], moved_to);
    assert_eq!(*new.last().unwrap(), serde_json::json!({"event": "stop"}));
    let compact_frames = |messages: &[Value]| -> Vec<u64> {
        messages
            .iter()
            .filter(|m| m["event"] == "media")
            .map(|m| frame_number(m["media"].as_str().unwrap()))
            .collect()
    };
    let (before, after) = (compact_frames(&old), compact_frames(&new));
    let heard: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert_eq!(heard[0], 0);
    assert_eq!(*heard.last().unwrap(), FRAMES as u64 - 1);
    let step = *after.first().unwrap() as i64 - *before.last().unwrap() as i64;
    assert!(
        (0..=2).contains(&step),
        "at the join {before:?} then {after:?}"
    );
    for pair in before.windows(2).chain(after.windows(2)) {
        assert_eq!(pair[1], pair[0] + 1);
    }
    drop(b);
}

/// A new stream that Twilio stops while it still holds frames (the old stream's cut has come,
/// but too few frames to place them by yet) gives its backends the frames after the cut
/// before their `stop`: a caller who hangs up during a hand-off loses nothing at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_stopped_while_it_holds_frames_gives_them_to_its_backends_first() {
    let redis = RedisServer::start();
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut settings = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    settings.store.kind = call_proxy::config::StoreKind::Redis;
    settings.store.redis_url = redis.url();
    let store = call_proxy::store::from_settings(&settings.store).unwrap();
    let token = call_proxy::gate::route_token::issue(
        settings.security.route_token_secret.expose(),
        &call_proxy::gate::route_token::Claims {
            caller: String::new(),
            backend_ids: vec!["rec".into()],
            backend_hosts: vec![],
            expires_at: call_proxy::clock::unix_now() + 60,
            call_sid: Some("CAheld".into()),
            nonce: 7,
            handoff_of: Some("MZold".into()),
        },
    );
    let proxy = Proxy::start(settings).await;

    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "held").await;
    call.start(&[("routeToken", &token), ("handoffOf", "MZold")])
        .await;
    for i in 0..6 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new stream has noted the switch at its first frame; the old instance answers that it
    // forwarded up to the third frame.
    let deadline = Instant::now() + Duration::from_secs(5);
    let switch = loop {
        if let Some(note) = store.noted("handoff:MZold").await.unwrap() {
            break note;
        }
        assert!(Instant::now() < deadline, "no switch noted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let first_ms: u64 = switch.split(' ').nth(1).unwrap().parse().unwrap();
    let cut = first_ms + 2 * 20;
    assert!(store
        .note_once(
            "handoff-cut:MZold",
            &cut.to_string(),
            Duration::from_secs(60)
        )
        .await
        .unwrap());
    // The session has the cut (a poll or two), but six frames are too few to place by.
    tokio::time::sleep(Duration::from_millis(200)).await;
    rec.drain();
    assert!(payloads(&rec.texts()).is_empty(), "still held");
    call.stop().await;
    rec.wait_for_stop().await;

    let texts = rec.texts();
    let heard: Vec<u64> = payloads(&texts).iter().map(|p| frame_number(p)).collect();
    assert!(
        !heard.is_empty() && heard.iter().all(|f| *f >= 2) && *heard.last().unwrap() == 5,
        "the frames after the cut, then stop: {heard:?}"
    );
    for pair in heard.windows(2) {
        assert_eq!(pair[1], pair[0] + 1);
    }
    assert_eq!(event(texts.last().unwrap()), "stop");
}
