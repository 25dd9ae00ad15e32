//! State that survives: the service as real processes, killed with SIGKILL and restarted on
//! its journal; two instances sharing one real Redis; Redis going away mid-call.

mod common;

use std::time::{Duration, Instant};

use call_proxy::config::WireFormat;
use common::*;
use serde_json::{json, Value};

async fn validate_pin(base: &str, pin: &str, caller: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/validate-pin"))
        .json(&json!({"pin": pin, "callerId": caller}))
        .send()
        .await
        .unwrap()
}

async fn wrong_pin(base: &str, caller: &str) -> Value {
    let r = validate_pin(base, "0000", caller).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn status(url: String) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

async fn attempts(p: &ServiceProcess, caller: &str) -> Option<u64> {
    let r = reqwest::Client::new()
        .get(p.url(&format!("/auth-attempts/{caller}")))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    r.json::<Value>().await.unwrap()["attempts"].as_u64()
}

#[tokio::test]
async fn blocks_and_attempts_survive_kill_9_and_a_half_written_record() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("state.log");
    let journal_s = journal.to_string_lossy().into_owned();
    let env = [
        ("CALL_PROXY__STORE__PATH", journal_s.as_str()),
        ("ENABLE_DEBUG_ROUTES", "true"),
    ];

    let mut a = ServiceProcess::spawn(&env);
    let r = reqwest::Client::new()
        .post(a.url("/blocked-callers/+15550001000"))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for _ in 0..3 {
        wrong_pin(&a.url(""), "+15550002000").await;
    }
    a.kill_9();

    let mut b = ServiceProcess::spawn(&env);
    b.wait_for_log("journal replayed");
    assert_eq!(
        status(b.url("/blocked-callers/+15550001000")).await,
        200,
        "still blocked"
    );
    assert_eq!(attempts(&b, "+15550002000").await, Some(3), "still counted");
    let v = wrong_pin(&b.url(""), "+15550002000").await;
    assert_eq!(v["attempts"]["attempts"], 4);
    b.kill_9();

    // A crash mid-write leaves half a record at the end of the file.
    let mut text = std::fs::read(&journal).unwrap();
    text.extend_from_slice(b"7a3f9c1e {\"t\":\"block\",\"caller\":\"+15550003");
    std::fs::write(&journal, text).unwrap();
    let c = ServiceProcess::spawn(&env);
    let skipped = c.wait_for_log("journal record skipped");
    assert!(
        skipped["why"].as_str().unwrap().contains("cut short"),
        "{skipped}"
    );
    assert_eq!(status(c.url("/blocked-callers/+15550001000")).await, 200);
    assert_eq!(attempts(&c, "+15550002000").await, Some(4));
    assert_eq!(status(c.url("/blocked-callers/+15550003000")).await, 404);
}

#[tokio::test]
async fn two_instances_on_one_redis_share_blocks_attempts_and_live_calls() {
    let redis = RedisServer::start();
    let mut rec = Backend::start(Behaviour::Normal).await;
    let url = rec.url();
    let env = [
        ("CALL_PROXY__STORE__KIND", "redis"),
        ("CALL_PROXY__STORE__REDIS_URL", redis.url().leak() as &str),
        ("CALL_PROXY__STORE__EXECUTION_TTL_MS", "1500"),
        ("CALL_PROXY__BACKENDS__TABLE__REC__URL", url.as_str()),
        ("CALL_PROXY__BACKENDS__TABLE__REC__FORMAT", "twilio"),
        ("INVALID_AUTH_ATTEMPTS_ALLOWED", "100"),
        ("CALL_PROXY__RATE_LIMITS__PIN_PER_CALLER_PER_MINUTE", "0"),
        ("ENABLE_DEBUG_ROUTES", "true"),
    ];
    let mut a = ServiceProcess::spawn(&env);
    let b = ServiceProcess::spawn(&env);

    // A block made through A is seen by B.
    let r = reqwest::Client::new()
        .post(a.url("/blocked-callers/+15551000000"))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(status(b.url("/blocked-callers/+15551000000")).await, 200);

    // 50 wrong PINs spread over A and B count 50, concurrently.
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let base = if i % 2 == 0 { a.url("") } else { b.url("") };
            tokio::spawn(async move { wrong_pin(&base, "+15552000000").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(attempts(&a, "+15552000000").await, Some(50));
    assert_eq!(attempts(&b, "+15552000000").await, Some(50));

    // A stream live on A is connected on B, and gone on both soon after it ends.
    let mut call = TwilioCall::connect_url(&a.ws_url(), "shared").await;
    call.start(&[("backendIds", "rec"), ("executionId", "FNshared")])
        .await;
    call.media(&payload(0)).await;
    rec.wait_for("a frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    assert_eq!(status(b.url("/executions/FNshared/connected")).await, 200);
    assert_eq!(status(a.url("/executions/FNshared/connected")).await, 200);
    call.stop().await;
    call.closed().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while status(b.url("/executions/FNshared/connected")).await != 410 {
        assert!(Instant::now() < deadline, "B still sees the ended call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(a.url("/executions/FNshared/connected")).await, 410);

    // A crashes mid-call: the call's entry expires by itself.
    let mut call = TwilioCall::connect_url(&a.ws_url(), "crash").await;
    call.start(&[("backendIds", "rec"), ("executionId", "FNcrash")])
        .await;
    call.media(&payload(1)).await;
    rec.wait_for("the second call", |log| payloads(&texts(log)).len() == 2)
        .await;
    assert_eq!(status(b.url("/executions/FNcrash/connected")).await, 200);
    // Alive past one TTL: the refresh keeps it.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        status(b.url("/executions/FNcrash/connected")).await,
        200,
        "refreshed"
    );
    a.kill_9();
    let killed = Instant::now();
    while status(b.url("/executions/FNcrash/connected")).await != 410 {
        assert!(killed.elapsed() < Duration::from_secs(5), "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The TTL is 1.5 s; the rest is slack for a busy machine.
    assert!(
        killed.elapsed() <= Duration::from_millis(3500),
        "{:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn redis_going_away_mid_call_stops_the_gate_not_the_call() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mut rec = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[("rec", &rec.url(), WireFormat::Twilio)]);
    use_redis(&mut s, &redis, "outage");
    // A second instance on the same Redis, asked about the call that lives on the first.
    let other = Proxy::start(s.clone()).await;
    let proxy = Proxy::start(s).await;
    assert_eq!(proxy.get("/readyz").await.status(), 200);

    let mut call = TwilioCall::connect(&proxy, "outage").await;
    call.start(&[("backendIds", "rec"), ("executionId", "FNout")])
        .await;
    for i in 0..50 {
        call.media(&payload(i)).await;
    }
    rec.wait_for("frames before", |log| payloads(&texts(log)).len() == 50)
        .await;
    // Written beside the call, so it may land a moment after the first frames.
    other
        .wait_status("/executions/FNout/connected", 200, Duration::from_secs(3))
        .await;

    redis.stop();
    for i in 50..150 {
        call.media(&payload(i)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = validate_pin(&proxy.url(""), "1234", "+15553000000").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("unavailable"),
        "{body}"
    );
    assert_eq!(
        proxy.get("/blocked-callers/+15553000000").await.status(),
        503
    );
    // Readiness is "send me new calls", and calls still stream: a store outage must not make
    // every instance unready at once. Liveness reports the store as down.
    assert_eq!(proxy.get("/readyz").await.status(), 200);
    let health = proxy.get("/healthz").await;
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["store"], "down", "{health}");
    // The flow hangs up on anything but 200: the instance holding the call answers for it
    // from its own list; another instance cannot know, and says the store is unavailable.
    assert_eq!(proxy.get("/executions/FNout/connected").await.status(), 200);
    assert_eq!(other.get("/executions/FNout/connected").await.status(), 503);
    rec.wait_for("frames during the outage", |log| {
        payloads(&texts(log)).len() == 150
    })
    .await;

    // Back, and empty: the instance writes its live executions again within seconds, not
    // at the next refresh a third of the TTL later.
    let _redis = RedisServer::start_on(port);
    let back = Instant::now();
    loop {
        assert_eq!(proxy.get("/executions/FNout/connected").await.status(), 200);
        if other.get("/executions/FNout/connected").await.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "the execution was not written again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health: Value = proxy.get("/healthz").await.json().await.unwrap();
        if health["store"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store never came back: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = validate_pin(&proxy.url(""), "0000", "+15553000000").await;
    assert_eq!(r.status(), 200, "the gate works again without a restart");
    for i in 150..160 {
        call.media(&payload(i)).await;
    }
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(
        payloads(&rec.texts()),
        (0..160).map(payload).collect::<Vec<_>>(),
        "the call lost nothing"
    );
    // Ended: gone on both instances (the end reached the store, no refresh wrote it back).
    call.closed().await;
    other
        .wait_status("/executions/FNout/connected", 410, Duration::from_secs(3))
        .await;
    assert_eq!(proxy.get("/executions/FNout/connected").await.status(), 410);
}

/// A backend that notes when each media message arrives.
async fn timing_backend() -> (String, tokio::sync::mpsc::UnboundedReceiver<Instant>) {
    use futures_util::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/media", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.to_text().is_ok_and(|t| t.contains(r#""event":"media""#)) {
                        let _ = tx.send(Instant::now());
                    }
                }
            });
        }
    });
    (url, rx)
}

/// Execution refreshes go to the store beside the calls: a Redis that stalls for 900 ms at a
/// time delays no frame of any call by more than 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_redis_delays_no_frame() {
    let redis = RedisServer::start_stallable();
    let (url, mut arrivals) = timing_backend().await;
    let mut s = settings(&[("rec", &url, WireFormat::Twilio)]);
    use_redis(&mut s, &redis, "stall");
    s.store.timeout_ms = 2000;
    // Refreshed every 100 ms, so refreshes keep landing inside the stalls.
    s.store.execution_ttl_ms = 300;
    let proxy = Proxy::start(s).await;

    let stalls = {
        let port = redis.port;
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            for _ in 0..3 {
                conn.write_all(b"DEBUG SLEEP 0.9\r\n").await.unwrap();
                let mut ok = [0u8; 5];
                conn.read_exact(&mut ok).await.unwrap();
                assert_eq!(&ok, b"+OK\r\n");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut calls = Vec::new();
    for n in 0..3 {
        let mut call = TwilioCall::connect(&proxy, &format!("stall{n}")).await;
        call.start(&[
            ("backendIds", "rec"),
            ("executionId", &format!("FNstall{n}")),
        ])
        .await;
        calls.push(call);
    }
    let frames = 150; // 3 s at 20 ms
    let began = Instant::now();
    for i in 0..frames {
        for call in calls.iter_mut() {
            call.media(&payload(i)).await;
        }
        let next = began + Duration::from_millis(20 * (i as u64 + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    stalls.await.unwrap();
    let mut times = Vec::new();
    while times.len() < frames * 3 {
        let t = tokio::time::timeout(WAIT, arrivals.recv())
            .await
            .expect("every frame arrives")
            .unwrap();
        times.push(t);
    }
    let worst = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap();
    assert!(
        worst < Duration::from_millis(120),
        "a gap of {worst:?} between frames sent every 20 ms"
    );
    for call in calls.iter_mut() {
        call.stop().await;
    }
}
