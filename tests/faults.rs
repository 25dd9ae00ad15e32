//! Backend faults lose nothing silently and mislead nobody: every link's accounts balance
//! (pushed = sent + dropped + queued) through late answers, drops, stalls and reconnects; a
//! backend never gets a connection's `start` that no `stop` follows; a backend that stops
//! reading is noticed by its missed pongs; reconnects after a restart are spread out; and
//! connection attempts to one backend are capped.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use call_proxy::config::{Settings, WireFormat};
use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;

/// The calls that ended last, as `/calls/recent` answers.
async fn recent(proxy: &Proxy) -> Vec<Value> {
    let r = proxy.get_with_key("/calls/recent", "test-key").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

/// Waits until the call is among the recent ones (recorded once its links are done).
async fn ended_call(proxy: &Proxy, call_sid: &str) -> Value {
    let began = Instant::now();
    loop {
        if let Some(c) = recent(proxy)
            .await
            .into_iter()
            .find(|c| c["call_sid"] == call_sid)
        {
            return c;
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "{call_sid} never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays `frames` frames `every` apart, then `stop`, and waits for the proxy's close.
async fn play(call: &mut TwilioCall, frames: usize, every: Duration) {
    for i in 0..frames {
        call.media(&payload(i)).await;
        tokio::time::sleep(every).await;
    }
    call.stop().await;
    call.closed().await;
}

/// A backend's accounts at the end of a call: everything pushed is sent or dropped.
fn assert_balanced(call: &Value, pushed: u64) {
    for b in call["backends"].as_array().unwrap() {
        let n = |k: &str| b[k].as_u64().unwrap();
        assert_eq!(n("frames_pushed"), pushed, "{b}");
        assert_eq!(n("frames_queued"), 0, "{b}");
        assert_eq!(
            n("frames_sent") + n("frames_dropped"),
            pushed,
            "pushed = sent + dropped: {b}"
        );
    }
}

/// One backend connection's messages: `start` first, media in order with nothing repeated.
fn assert_connection_in_order(texts: &[String], what: &str) {
    assert_eq!(
        texts.first().map(|t| event(t)),
        Some("start".into()),
        "{what}"
    );
    let frames: Vec<u64> = payloads(texts).iter().map(|p| frame_number(p)).collect();
    assert!(
        frames.windows(2).all(|w| w[0] < w[1]),
        "{what}: frames out of order or repeated: {frames:?}"
    );
}

fn quick(backends: &[(&str, &str, WireFormat)]) -> Settings {
    let mut s = settings(backends);
    s.backends.reconnect_window_ms = 6000;
    s.backends.reconnect_max_tries = 6;
    s
}

#[tokio::test]
async fn a_backend_answered_late_then_dropped_still_gets_the_whole_call_with_its_stop() {
    // The first connection is answered 1.5 s late and dropped right after the upgrade, on a
    // call of 0.8 s: the call has ended before the backend is reached at all.
    for run in 0..3 {
        let mut chaos = Backend::start(Behaviour::Chaos(Fault::late_then_drop_seed(
            Duration::from_millis(1000),
        )))
        .await;
        let proxy = Proxy::start(quick(&[("late", &chaos.url(), WireFormat::Twilio)])).await;
        let mut call = TwilioCall::connect(&proxy, &format!("late{run}")).await;
        call.start(&[("backendIds", "late")]).await;
        play(&mut call, 40, Duration::from_millis(20)).await;
        let ended = ended_call(&proxy, &call.call_sid).await;
        assert_balanced(&ended, 41);
        chaos.wait_for_stop().await;
        let last = chaos.connections();
        let texts = chaos.texts_of(last);
        assert_connection_in_order(&texts, "the last connection");
        assert_eq!(texts.last().map(|t| event(t)), Some("stop".into()));
        assert_eq!(
            payloads(&texts),
            (0..40).map(payload).collect::<Vec<_>>(),
            "run {run}: the whole call, after the fact"
        );
        let b = &ended["backends"][0];
        assert_eq!(b["frames_sent"], 41, "{b}");
    }
}

/// The chaos property: over many seeds of random late answers, drops and stalls, every link's
/// accounts balance, every connection carries frames in order, and the backend never gets a
/// connection's `start` for the ended call that no `stop` follows, unless that connection was
/// the backend's own failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_backends_never_unbalance_the_accounts_or_see_a_start_without_its_stop() {
    let seeds: Vec<u64> = (1..=16).collect();
    let runs = seeds.iter().map(|&seed| async move {
        let mut chaos = Backend::start(Behaviour::Chaos(seed)).await;
        let mut steady = Backend::start(Behaviour::Normal).await;
        let proxy = Proxy::start(quick(&[
            ("chaos", &chaos.url(), WireFormat::Twilio),
            ("steady", &steady.url(), WireFormat::Twilio),
        ]))
        .await;
        let mut call = TwilioCall::connect(&proxy, &format!("chaos{seed}")).await;
        call.start(&[("backendIds", "chaos,steady")]).await;
        play(&mut call, 60, Duration::from_millis(10)).await;
        let ended = ended_call(&proxy, &call.call_sid).await;
        assert_balanced(&ended, 61);
        steady.wait_for_stop().await;
        assert_eq!(
            payloads(&steady.texts()),
            (0..60).map(payload).collect::<Vec<_>>(),
            "seed {seed}: the steady backend lost nothing to the chaotic one"
        );
        let link = ended["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "chaos")
            .unwrap()
            .clone();
        // Let the backend read what it will.
        tokio::time::sleep(Duration::from_millis(300)).await;
        chaos.drain();
        // Connections are numbered as the backend accepted them; some never upgraded.
        let heard: std::collections::BTreeSet<usize> = chaos
            .log
            .iter()
            .filter_map(|s| match s {
                Seen::Text(c, _) => Some(*c),
                _ => None,
            })
            .collect();
        for &conn in &heard {
            let texts = chaos.texts_of(conn);
            let what = format!("seed {seed} connection {conn}: {link}");
            assert_connection_in_order(&texts, &what);
            // A connection the backend did not cut short itself carries the call to its end:
            // never a `start` without its `stop`.
            if !Fault::drops(seed, conn) {
                assert_eq!(
                    texts.last().map(|t| event(t)),
                    Some("stop".into()),
                    "{what}"
                );
            }
        }
        link["state"].as_str().unwrap().to_string()
    });
    let states = futures_util::future::join_all(runs).await;
    assert!(
        states.iter().any(|s| s == "finished"),
        "some seeds reach the backend in time: {states:?}"
    );
}

#[tokio::test]
async fn a_backend_that_stops_reading_is_replaced_once_it_misses_a_pong() {
    let mut quiet = Backend::start(Behaviour::QuietStallFirst).await;
    let mut s = settings(&[("quiet", &quiet.url(), WireFormat::Twilio)]);
    // The write deadline is far away: only the missed pong can see this backend.
    s.backends.write_timeout_ms = 60_000;
    s.backends.ping_interval_ms = 500;
    s.backends.pong_timeout_ms = 1000;
    let proxy = Proxy::start(s).await;
    let mut call = TwilioCall::connect(&proxy, "quiet").await;
    call.start(&[("backendIds", "quiet")]).await;
    quiet
        .wait_for("the first start", |log| {
            texts(log).iter().any(|t| event(t) == "start")
        })
        .await;
    let stalled = Instant::now();
    let mut i = 0;
    while quiet.connections() < 2 {
        call.media(&payload(i)).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        quiet.drain();
        assert!(
            stalled.elapsed() < Duration::from_secs(3),
            "not replaced within ping interval + pong timeout"
        );
    }
    let replaced = stalled.elapsed();
    for j in i..i + 10 {
        call.media(&payload(j)).await;
    }
    call.stop().await;
    quiet.wait_for_stop().await;
    let second = quiet.texts_of(2);
    assert_eq!(
        event(&second[0]),
        "start",
        "the new connection starts the call again"
    );
    assert!(
        payloads(&second).contains(&payload(i + 9)),
        "and carries it on"
    );
    assert!(replaced >= Duration::from_millis(900), "{replaced:?}");
}

#[test]
fn the_default_liveness_check_replaces_a_stalled_backend_within_15_s() {
    let s = Settings::defaults();
    assert!(s.backends.ping_interval_ms + s.backends.pong_timeout_ms <= 15_000);
}

/// A backend on a port the test holds: accepts WebSocket connections, notes when each
/// completed its handshake, and reads them until it is killed.
struct Restartable {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    arrivals: Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl Restartable {
    async fn start(port: u16, arrivals: Arc<std::sync::Mutex<Vec<Instant>>>) -> Restartable {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let noted = arrivals.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let noted = noted.clone();
                conns.spawn(async move {
                    if let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await {
                        noted.lock().unwrap().push(Instant::now());
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                });
            }
        });
        Restartable {
            port,
            task,
            arrivals,
        }
    }

    /// Kills the listener and every connection, as a crash would.
    fn kill(self) -> (u16, Arc<std::sync::Mutex<Vec<Instant>>>) {
        self.task.abort();
        (self.port, self.arrivals)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_backend_restarts_its_calls_come_back_spread_out_not_in_lockstep() {
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Restartable::start(0, arrivals.clone()).await;
    let url = format!("ws://127.0.0.1:{}/media", backend.port);
    let mut s = settings(&[("rec", &url, WireFormat::Twilio)]);
    s.backends.reconnect_window_ms = 20_000;
    s.backends.reconnect_max_tries = 20;
    let proxy = Proxy::start(s).await;
    let calls = 30;
    let mut open = Vec::new();
    for i in 0..calls {
        let mut call = TwilioCall::connect(&proxy, &format!("herd{i}")).await;
        call.start(&[("backendIds", "rec")]).await;
        open.push(call);
    }
    let began = Instant::now();
    while arrivals.lock().unwrap().len() < calls {
        assert!(began.elapsed() < WAIT, "every call connects");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    arrivals.lock().unwrap().clear();
    // The backend dies, and comes back on the same port 1.5 s later.
    let (port, arrivals) = backend.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _back = Restartable::start(port, arrivals.clone()).await;
    let began = Instant::now();
    while arrivals.lock().unwrap().len() < calls {
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "every call comes back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut times: Vec<Duration> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.duration_since(began.min(*t)))
        .collect();
    times.sort();
    let spread = times[calls - 1] - times[0];
    // In lockstep every call would come back within a few milliseconds of the others.
    let most_in_50ms = (0..calls)
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < Duration::from_millis(50))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        spread >= Duration::from_millis(300) && most_in_50ms <= calls / 2,
        "reconnects: spread {spread:?}, at most {most_in_50ms} of {calls} within 50 ms"
    );
    for call in &mut open {
        call.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_to_one_backend_are_capped() {
    // A backend that takes 300 ms to answer each upgrade, and counts how many wait at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/media", listener.local_addr().unwrap());
    let waiting = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    {
        let (waiting, most, connected) = (waiting.clone(), most.clone(), connected.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (waiting, most, connected) = (waiting.clone(), most.clone(), connected.clone());
                tokio::spawn(async move {
                    let now = waiting.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    if let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await {
                        connected.fetch_add(1, Ordering::SeqCst);
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                });
            }
        });
    }
    let mut s = settings(&[("slow", &url, WireFormat::Twilio)]);
    s.backends.max_connecting = 2;
    s.backends.connect_timeout_ms = 2000;
    let proxy = Proxy::start(s).await;
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut call = TwilioCall::connect(&proxy, &format!("cap{i}")).await;
        call.start(&[("backendIds", "slow")]).await;
        calls.push(call);
    }
    let began = Instant::now();
    while connected.load(Ordering::SeqCst) < 8 {
        assert!(began.elapsed() < WAIT, "every call connects in the end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "two attempts in flight at most"
    );
    for call in &mut calls {
        call.stop().await;
    }
}
