//! Attacks tried against the real binary, each with what must bound it: the process's memory
//! under a flood from one socket, measured from outside as an operator would (`/proc`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A WebSocket to the proxy over a socket with a tiny receive window, so that what the proxy
/// sends and nobody reads backs up into the proxy quickly.
async fn never_reading_socket(proxy: &ServiceProcess) -> common::Socket {
    slow_reading_socket(proxy.addr, &proxy.ws_url(), 4096).await
}

/// Sends pings as fast as the socket takes them, never reading, until a send fails (the
/// proxy has closed the connection) or `limit` passes; then reads what is there: answers
/// whether the proxy closed the connection.
async fn flood_pings(ws: &mut common::Socket, limit: Duration) -> bool {
    use futures_util::StreamExt;
    let began = Instant::now();
    let ping = vec![0x5a; 125];
    while began.elapsed() < limit {
        let sent = tokio::time::timeout(
            Duration::from_millis(500),
            ws.send(Message::Ping(ping.clone().into())),
        )
        .await;
        if matches!(sent, Ok(Err(_))) {
            return true;
        }
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Err(_) => return false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_its_pongs_is_closed_and_costs_no_memory() {
    let backend = Backend::start(Behaviour::Normal).await;
    let proxy = recording_to(&backend, &[]).await;
    let pid = proxy.child.id();
    let before = rss_kib(pid);

    // After `start`, and on four sockets that never send one.
    let mut started = never_reading_socket(&proxy).await;
    let mut call = TwilioCall::from_socket(
        tokio_tungstenite::connect_async(proxy.ws_url())
            .await
            .unwrap()
            .0,
        "spare",
    )
    .await;
    call.start(&[]).await;
    started
        .send(Message::Text(
            call_proxy::twilio::messages::outbound::connected().into(),
        ))
        .await
        .unwrap();
    let start = call
        .start_text
        .replace("MZspare", "MZflood")
        .replace("CAspare", "CAflood");
    started.send(Message::Text(start.into())).await.unwrap();
    let mut floods = vec![started];
    for _ in 0..4 {
        floods.push(never_reading_socket(&proxy).await);
    }
    let results = futures_util::future::join_all(
        floods
            .iter_mut()
            .map(|ws| flood_pings(ws, Duration::from_secs(3))),
    )
    .await;
    assert!(
        results.iter().all(|closed| *closed),
        "every flooding socket is closed: {results:?}"
    );
    let after = rss_kib(pid);
    assert!(
        after < before + 10 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    proxy.wait_for_log("ping flood on the media stream; closing");
    // The other call on the same proxy goes on.
    assert!(call.still_open_after(Duration::from_millis(100)).await);
    call.stop().await;
}

/// A speaking backend that, once it has the call's `start`, says `per_second` marks with the
/// longest names allowed, plus as many empty media messages, for `seconds`.
async fn flooding_speaker(per_second: u32, seconds: u64) -> String {
    use futures_util::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/media", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut tx, mut rx) = ws.split();
                // Read (pings, the call) on the side; say marks at the given pace.
                tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
                let name = "n".repeat(256);
                let mark = format!(r#"{{"event":"mark","mark":{{"name":"{name}"}}}}"#);
                let empty = r#"{"event":"media","media":{"payload":""}}"#;
                let began = Instant::now();
                let mut every = tokio::time::interval(Duration::from_millis(10));
                while began.elapsed() < Duration::from_secs(seconds) {
                    every.tick().await;
                    for _ in 0..per_second / 200 {
                        if tx.send(Message::Text(mark.clone().into())).await.is_err()
                            || tx.send(Message::Text(empty.into())).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

/// The binary with one backend, `rec`, as every call's, and these settings besides.
async fn recording_to(backend: &Backend, extra: &[(&str, &str)]) -> ServiceProcess {
    let url = backend.url();
    let mut env = vec![
        ("CALL_PROXY__BACKENDS__TABLE__REC__URL", url.as_str()),
        ("CALL_PROXY__BACKENDS__DEFAULT", "rec"),
    ];
    env.extend_from_slice(extra);
    ServiceProcess::start(&env).await
}

/// The binary with one backend, `spk` at `url`, that speaks, as every call's.
async fn speaking_to(url: &str) -> ServiceProcess {
    ServiceProcess::start(&[
        ("CALL_PROXY__BACKENDS__TABLE__SPK__URL", url),
        ("CALL_PROXY__BACKENDS__TABLE__SPK__FORMAT", "twilio"),
        ("CALL_PROXY__BACKENDS__TABLE__SPK__SPEAKS", "true"),
        ("CALL_PROXY__BACKENDS__DEFAULT", "spk"),
    ])
    .await
}

/// A speaker's flood toward a Twilio socket that does not read: marks with long names and
/// empty media count toward the queue's bounds (empty media is refused outright), so memory
/// stays flat; a speaker past its per-second limit is dropped as misbehaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speaker_flooding_a_slow_caller_is_bounded_and_past_its_limit_dropped() {
    for (per_second, misbehaves) in [(800u32, false), (6000, true)] {
        let url = flooding_speaker(per_second, 5).await;
        let proxy = speaking_to(&url).await;
        let pid = proxy.child.id();
        let before = rss_kib(pid);
        let mut caller = never_reading_socket(&proxy).await;
        caller
            .send(Message::Text(
                call_proxy::twilio::messages::outbound::connected().into(),
            ))
            .await
            .unwrap();
        let start = call_proxy::twilio::messages::outbound::start(
            1,
            &call_proxy::twilio::messages::outbound::StartInfo {
                account_sid: "ACtest",
                call_sid: "CAflood",
                stream_sid: "MZflood",
                tracks: &["inbound"],
                custom_parameters: &Default::default(),
            },
        );
        caller.send(Message::Text(start.into())).await.unwrap();
        // The caller keeps the stream alive with audio, and reads nothing back.
        let began = Instant::now();
        let mut i = 0;
        while began.elapsed() < Duration::from_secs(5) {
            let media = call_proxy::twilio::messages::outbound::media(
                i + 2,
                "MZflood",
                "inbound",
                i + 1,
                (i + 1) * 20,
                &payload(i as usize),
            );
            let _ = caller.send(Message::Text(media.into())).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = rss_kib(pid);
        assert!(
            after < before + 10 * 1024,
            "{per_second}/s: RSS grew from {before} KiB to {after} KiB"
        );
        let lines = proxy.lines();
        let dropped = lines
            .iter()
            .any(|l| l.contains("dropping the link as misbehaving"));
        assert_eq!(dropped, misbehaves, "{per_second}/s");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("media with no audio in it")),
            "empty media refused and logged"
        );
    }
}

/// One address cannot take every connection: past its share the rest of its sockets are
/// closed at once while another address's call still gets in; headers are bounded in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_its_share_of_the_connections_and_headers_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start(Behaviour::Normal).await;
    let proxy = recording_to(
        &backend,
        &[
            ("CALL_PROXY__SERVER__MAX_CONNECTIONS", "300"),
            ("CALL_PROXY__SERVER__MAX_CONNECTIONS_PER_ADDRESS", "20"),
        ],
    )
    .await;
    // 40 idle sockets from 127.0.0.1, each with a request begun and never finished.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
        held.push(tcp);
    }
    let mut closed = 0;
    for tcp in &mut held {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "the address's share is 20");
    // Another address (127.0.0.2, still this machine) streams a call.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket
        .connect(format!("127.0.0.1:{}", proxy.addr.port()).parse().unwrap())
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        proxy.ws_url(),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("another address gets in");
    let mut call = TwilioCall::from_socket(ws, "other").await;
    call.start(&[]).await;
    call.stop().await;
    drop(held);

    // Headers past the bound are refused, not buffered.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = tcp.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}

/// One client hammering a guarded route without a key, and then the rate limit, cannot flood
/// the log: a few lines, then at most one a second; every refusal is still answered and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_flood_the_log_with_refusals() {
    let proxy = ServiceProcess::start(&[
        ("CALL_PROXY__RATE_LIMITS__HTTP_PER_IP_PER_MINUTE", "60"),
        ("CALL_PROXY__RATE_LIMITS__HTTP_BURST", "100"),
    ])
    .await;
    let client = reqwest::Client::new();
    let began = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..300 {
        // No key at all: refused at once every time (a wrong key would be slowed).
        let r = client
            .get(proxy.url("/blocked-callers"))
            .send()
            .await
            .unwrap();
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    let seconds = began.elapsed().as_secs() + 1;
    assert_eq!(statuses.get(&403), Some(&100), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&200), "{statuses:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<String> = proxy
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("127.0.0.1"))
        .collect();
    assert!(
        lines.len() as u64 <= 5 + seconds,
        "{} WARN lines in {seconds} s:\n{}",
        lines.len(),
        lines.join("\n")
    );
    // The limit lets one request a second through again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, r#"call_proxy_rate_limited_total{scope="http_per_ip"}"#),
        Some(200.0),
        "every refusal counted"
    );
}

/// Operator sessions through the real binary: two logins, one revoked from the other's page
/// opens nothing more (nor its CSRF token), and a restart opens no old cookie at all.
#[tokio::test]
async fn a_revoked_or_restarted_session_opens_nothing() {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let log_in = |proxy: &ServiceProcess| {
        let r = client
            .post(proxy.url("/admin/login"))
            .form(&[("key", "test-key")]);
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 303);
            let c = r.headers()["set-cookie"].to_str().unwrap();
            c.split(';').next().unwrap().to_string()
        }
    };
    let page = |proxy: &ServiceProcess, cookie: &str| {
        let r = client.get(proxy.url("/admin")).header("cookie", cookie);
        async move { r.send().await.unwrap().text().await.unwrap() }
    };
    let field = |html: &str, before: &str| {
        let at = html
            .find(before)
            .unwrap_or_else(|| panic!("{before} in {html}"))
            + before.len();
        html[at..].split('"').next().unwrap().to_string()
    };
    let proxy = ServiceProcess::start(&[]).await;
    let lost_laptop = log_in(&proxy).await;
    let desk = log_in(&proxy).await;
    let stolen = page(&proxy, &lost_laptop).await;
    let stolen_csrf = field(&stolen, r#"name="csrf" value=""#);
    let html = page(&proxy, &desk).await;
    let csrf = field(&html, r#"name="csrf" value=""#);
    let other = html
        .split(r#"<tr data-session=""#)
        .skip(1)
        .find(|row| !row.split('>').next().unwrap().contains("mine"))
        .map(|row| row.split('"').next().unwrap().to_string())
        .expect("the other session is listed");
    let r = client
        .post(proxy.url("/admin/revoke"))
        .header("cookie", &desk)
        .form(&[("csrf", csrf.as_str()), ("session", other.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(page(&proxy, &lost_laptop).await.contains(r#"name="key""#));
    let r = client
        .post(proxy.url("/admin/block"))
        .header("cookie", &lost_laptop)
        .form(&[("csrf", stolen_csrf.as_str()), ("callerId", "+15550001234")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "the revoked cookie and its CSRF token open nothing"
    );
    assert!(page(&proxy, &desk).await.contains("Live calls"));
    // The cookie is the same wherever the next process listens.
    drop(proxy);
    let restarted = ServiceProcess::start(&[]).await;
    assert!(
        page(&restarted, &desk).await.contains(r#"name="key""#),
        "a restart opens no old cookie"
    );
}

/// A speaker's message far larger than any audio frame, through the real binary: read whole,
/// dropped and counted, and the link and the call go on (the next message reaches the caller).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speakers_oversized_message_is_dropped_and_the_link_goes_on() {
    use futures_util::StreamExt;
    let mut agent = TalkingBackend::start().await;
    let url = agent.url();
    let proxy = speaking_to(&url).await;
    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "huge").await;
    call.start(&[]).await;
    agent.wait_for_start(1).await;
    let huge = "A".repeat(3 << 20);
    agent.say_text(format!(
        r#"{{"event":"media","media":{{"payload":"{huge}"}}}}"#
    ));
    let fine = payload(7);
    agent.say_text(format!(
        r#"{{"event":"media","media":{{"payload":"{fine}"}}}}"#
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, call.ws.next())
            .await
            .expect("the next message reaches the caller")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = &message {
            assert!(!t.contains(&huge[..64]), "the oversized one never does");
            if t.contains(&fine) {
                break;
            }
        }
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_backend_rejected_messages_total{backend="spk"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"call_proxy_backend_reconnects_total{backend="spk"}"#),
        Some(0.0),
        "the link held"
    );
    call.stop().await;
}
