//! What only the real process shows: signals and shutdown, start-up refusals and exit codes,
//! what reaches its log. Each test runs the built `call-proxy` binary.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// A second SIGTERM mid-call, many times over: every run exits 0 after its backend got `stop`
/// and the Twilio side a 1001 close. A race between the signal and the calls' end would show
/// as a run that exits with the backend's socket simply dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_mid_call_always_sends_stop_before_the_process_exits() {
    let runs = 25;
    let mut stops = 0;
    for run in 0..runs {
        let mut backend = Backend::start(Behaviour::Normal).await;
        let url = backend.url();
        let proxy = tokio::task::spawn_blocking(move || {
            ServiceProcess::spawn(&[
                ("CALL_PROXY__BACKENDS__TABLE__REC__URL", url.as_str()),
                ("CALL_PROXY__BACKENDS__TABLE__REC__FORMAT", "twilio"),
                ("CALL_PROXY__BACKENDS__DEFAULT", "rec"),
            ])
        })
        .await
        .unwrap();
        let mut call = TwilioCall::connect_url(&proxy.ws_url(), &format!("term{run}")).await;
        call.start(&[]).await;
        backend
            .wait_for("the call's start", |log| {
                texts(log).iter().any(|t| event(t) == "start")
            })
            .await;
        // Half the runs signal with frames still in flight, half once they have arrived.
        for i in 0..5 {
            call.media(&payload(i)).await;
        }
        if run % 2 == 0 {
            backend
                .wait_for("the frames", |log| payloads(&texts(log)).len() == 5)
                .await;
        }
        let status = tokio::task::spawn_blocking(move || {
            let mut proxy = proxy;
            proxy.sigterm();
            proxy.wait_for_log("draining: /readyz answers 503; live calls run to their end");
            proxy.sigterm();
            let status = proxy.wait_exit(Duration::from_secs(10));
            (status, proxy)
        })
        .await
        .unwrap()
        .0;
        assert!(status.success(), "run {run}: exit status {status}");
        let close = call.closed().await;
        assert_eq!(
            close.map(|f| u16::from(f.code)),
            Some(1001),
            "run {run}: Twilio is told the service is going away"
        );
        backend.wait_for_stop().await;
        assert_eq!(
            payloads(&backend.texts()),
            (0..5).map(payload).collect::<Vec<_>>(),
            "run {run}"
        );
        stops += 1;
    }
    assert_eq!(stops, runs);
}

#[test]
fn sigterm_the_moment_it_listens_is_a_clean_exit() {
    for _ in 0..10 {
        let mut proxy = ServiceProcess::spawn(&[]);
        proxy.sigterm();
        let status = proxy.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{status}");
        proxy.wait_for_log("shutdown complete");
    }
}

fn check_config(env: &[(&str, &str)], file: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy"));
    cmd.env_remove("RUN_MODE").env_remove("RUST_LOG");
    let dir = tempfile::tempdir().unwrap();
    if let Some(text) = file {
        let path = dir.path().join("extra.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .arg("check-config")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2), "{text}");
    }
    (out.status.success(), text)
}

#[test]
fn a_typo_in_a_key_stops_the_service_naming_the_nearest_key() {
    let (ok, text) = check_config(&[], Some("[gate]\nmax_invalid_atempts = 3\n"));
    assert!(!ok, "{text}");
    assert!(text.contains("gate.max_invalid_atempts"), "{text}");
    assert!(
        text.contains("did you mean `gate.max_invalid_attempts`"),
        "{text}"
    );

    let (ok, text) = check_config(
        &[("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FROMAT", "twilio")],
        None,
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("did you mean `backends.table.speaker.format`"),
        "{text}"
    );

    let (ok, text) = check_config(&[("CALL_PROXY__SECURTY__API_KEY", "k")], None);
    assert!(!ok, "{text}");
    assert!(text.contains("did you mean `security`"), "{text}");

    let (ok, text) = check_config(&[("CALL_PROXY__GATE__MAX_INVALID_ATTEMPTS", "3")], None);
    assert!(ok, "{text}");
}

/// Every mistake in one run: wrong names list the right ones (in any case they are accepted),
/// a word where a number belongs, a number out of range, each with the variable or file that
/// set it.
#[test]
fn check_config_reports_every_problem_at_once_naming_where_each_came_from() {
    let (ok, text) = check_config(
        &[
            ("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT", "opus"),
            ("CALL_PROXY__STORE__KIND", "mongo"),
            ("CALL_PROXY__MEDIA__MAX_CALLS", "lots"),
            ("CALL_PROXY__BACKENDS__QUEUE_FRAMES", "0"),
        ],
        Some("[log]\nformat = \"yaml\"\n"),
    );
    assert!(!ok, "{text}");
    assert!(text.contains("5 problems"), "{text}");
    for expected in [
        "`backends.table.speaker.format`: `opus` is not one of: twilio, compact, pcm16 (set by CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT)",
        "`store.kind`: `mongo` is not one of: memory, redis (set by CALL_PROXY__STORE__KIND)",
        "`media.max_calls`: string \"lots\" is not an integer (set by CALL_PROXY__MEDIA__MAX_CALLS)",
        "`backends.queue_frames`: must be from 1 to 1000000, got 0 (set by CALL_PROXY__BACKENDS__QUEUE_FRAMES)",
        "`log.format`: `yaml` is not one of: human, json (set by ",
    ] {
        assert!(text.contains(expected), "{expected}\nin:\n{text}");
    }
    assert!(text.contains("extra.toml)"), "the file named: {text}");
    // The right names in any case.
    let (ok, text) = check_config(
        &[
            ("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT", "PCM16"),
            ("CALL_PROXY__LOG__FORMAT", "Json"),
        ],
        None,
    );
    assert!(ok, "{text}");
}

/// Production refuses to start without the operator API key and the address Twilio calls,
/// as it does without the auth token; `hash-pin` needs none of them, only the PIN key.
#[test]
fn production_requires_every_secret_but_hash_pin_needs_only_the_pin_key() {
    // As an operator's environment file would hold them.
    let file = "RUN_MODE=production\n\
                CALL_PROXY__GATE__PIN_KEY=a-pin-key-of-some-length\n\
                TWILIO_AUTH_TOKEN=an-auth-token\n\
                CALL_PROXY__SECURITY__ROUTE_TOKEN_SECRET=a-route-token-secret\n\
                SERVER_API_KEY=an-api-key\n\
                CALL_PROXY__TWILIO__PUBLIC_URL=https://proxy.example.com";
    let secrets: Vec<(&str, &str)> = file.lines().map(|l| l.split_once('=').unwrap()).collect();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy"));
        cmd.env_remove("RUN_MODE")
            .env_remove("SERVER_API_KEY")
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&secrets, &["check-config"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&secrets[..4], &["check-config"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("2 problems"), "{text}");
    assert!(
        text.contains("`security.api_key`: required in production"),
        "{text}"
    );
    assert!(
        text.contains("`twilio.public_url`: required in production"),
        "{text}"
    );

    let (code, text) = run(
        &secrets[..2],
        &["hash-pin", "12345678", "--backends", "speaker"],
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\"hmac-sha256:"), "{text}");
    let (code, text) = run(
        &secrets[..2],
        &["hash-pin", "4321", "--backends", "speaker"],
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("use 6 or more in production"), "{text}");
    let (code, text) = run(
        &[secrets[0]],
        &["hash-pin", "12345678", "--backends", "speaker"],
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("gate.pin_key"), "{text}");
}

#[test]
fn numbers_at_their_limits_are_refused_naming_the_key() {
    for (var, key) in [
        (
            "CALL_PROXY__GATE__ATTEMPTS_TTL_SECS",
            "gate.attempts_ttl_secs",
        ),
        ("CALL_PROXY__GATE__BLOCK_TTL_SECS", "gate.block_ttl_secs"),
        (
            "CALL_PROXY__SECURITY__ROUTE_TOKEN_TTL_SECS",
            "security.route_token_ttl_secs",
        ),
        (
            "CALL_PROXY__MEDIA__IDLE_TIMEOUT_MS",
            "media.idle_timeout_ms",
        ),
        (
            "INVALID_AUTH_ATTEMPTS_CACHE_TTL_SECONDS",
            "gate.attempts_ttl_secs",
        ),
    ] {
        let (ok, text) = check_config(&[(var, &u64::MAX.to_string())], None);
        assert!(!ok, "{var}: {text}");
        assert!(text.contains(key), "{var}: {text}");
    }
}

/// A numeric-looking API key stays the string it is, end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_looking_api_key_is_the_key_as_written() {
    let proxy = tokio::task::spawn_blocking(|| {
        // The original's variable; CALL_PROXY__SECURITY__API_KEY is read the same way.
        ServiceProcess::spawn(&[("SERVER_API_KEY", "000123456789")])
    })
    .await
    .unwrap();
    let get = |key: &'static str| {
        let url = proxy.url("/calls");
        async move {
            reqwest::Client::new()
                .get(url)
                .header("apiKey", key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get("000123456789").await, 200);
    assert_eq!(get("123456789").await, 403);
}

/// Refused streams are the caller's mistake: logged as warnings, not service errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_a_warning_not_an_error() {
    let proxy = tokio::task::spawn_blocking(|| {
        ServiceProcess::spawn(&[("CALL_PROXY__SECURITY__REQUIRE_ROUTE_TOKEN", "true")])
    })
    .await
    .unwrap();
    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "refused").await;
    call.start(&[]).await;
    assert!(call.closed().await.is_some());
    let line = tokio::task::spawn_blocking(move || {
        proxy.wait_for_log("stream refused: no route token and security.require_route_token is on")
    })
    .await
    .unwrap();
    assert_eq!(line["level"], "WARN", "{line}");
}

/// In the human log format, nothing a caller chooses can start a line of its own or reach the
/// terminal as an escape sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_parameters_cannot_forge_log_lines() {
    use std::io::BufRead;
    // The demo backend on a port held here without listening, whatever else runs here.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_call-proxy"))
        .env_remove("RUST_LOG")
        .env_remove("RUN_MODE")
        .env(
            "CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL",
            format!("ws://{}/media", closed.local_addr().unwrap()),
        )
        .env("CALL_PROXY__SERVER__HOST", "127.0.0.1")
        .env("CALL_PROXY__SERVER__PORT", "0")
        .env("CALL_PROXY__STORE__PATH", "")
        .env("CALL_PROXY__LOG__FORMAT", "human")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx.recv_timeout(WAIT).expect("a listening line");
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let forged = "+1555\n2026-12-02T00:00:00.000000Z  INFO call_proxy::gate: PIN accepted caller=+1999\u{1b}[2J";
    let mut call = TwilioCall::connect_url(&format!("ws://{addr}/media"), "forge").await;
    call.start(&[("callerId", forged), ("backendIds", forged)])
        .await;
    assert!(call.closed().await.is_some());
    drop(
        call.ws
            .next()
            .await
            .map(|m| m.map(|m| matches!(m, Message::Close(_)))),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success());
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("unknown backend id")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(
            !line.starts_with("2026-12-02T00:00:00.000000Z"),
            "forged: {line}"
        );
        assert!(!line.contains('\u{1b}'), "escape reached the log: {line:?}");
    }
}

/// A `wss://` backend whose certificate does not verify is logged with the reason and the
/// backend's id; the header secret from the environment reaches the backend's upgrade and
/// never a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_logged_with_their_reason_and_never_the_secret() {
    let secret = "tok-very-secret-123";
    let ca = TestCa::new("trusted CA");
    let stranger = TestCa::new("some other CA");
    let other_ca = TlsBackend::start(stranger.server_cert(Made::Good)).await;
    let other_name = TlsBackend::start(ca.server_cert(Made::OtherName)).await;
    let expired = TlsBackend::start(ca.server_cert(Made::Expired)).await;
    let mut good = TlsBackend::start(ca.server_cert(Made::Good)).await;
    let mut env: Vec<(String, String)> = vec![
        ("ASR_TOKEN".into(), secret.into()),
        (
            "CALL_PROXY__BACKENDS__DEFAULT".into(),
            "other_ca,other_name,expired,good".into(),
        ),
    ];
    for (id, backend) in [
        ("OTHER_CA", &other_ca),
        ("OTHER_NAME", &other_name),
        ("EXPIRED", &expired),
        ("GOOD", &good),
    ] {
        let key = |k: &str| format!("CALL_PROXY__BACKENDS__TABLE__{id}__{k}");
        env.push((key("URL"), backend.url("/media?model=phone")));
        env.push((key("CA_FILE"), ca.pem_path()));
        env.push((key("HEADERS__AUTHORIZATION"), "Bearer ${ASR_TOKEN}".into()));
    }
    let proxy = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ServiceProcess::spawn(&env)
    })
    .await
    .unwrap();
    let mut call = TwilioCall::connect_url(&proxy.ws_url(), "tlslog").await;
    call.start(&[]).await;
    call.media(&payload(0)).await;
    good.wait_for("the good backend's frame", |c| {
        !c.is_empty() && payloads(&c[0].texts).len() == 1
    })
    .await;
    assert_eq!(
        good.connections.lock().unwrap()[0].authorization.as_deref(),
        Some("Bearer tok-very-secret-123"),
        "the secret reached the backend"
    );
    let proxy = tokio::task::spawn_blocking(move || {
        for (id, reason) in [
            ("other_ca", "UnknownIssuer"),
            ("other_name", "not valid for name"),
            ("expired", "certificate expired"),
        ] {
            let line = proxy.wait_for_line(&format!("{id}'s TLS failure"), |l| {
                l.contains("backend link failed") && l.contains(&format!(r#""backend":"{id}""#))
            });
            let error = serde_json::from_str::<serde_json::Value>(&line).unwrap()["error"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(error.contains(reason), "{id}: {line}");
            assert!(line.contains(r#""fault":"backend""#), "{line}");
        }
        proxy
    })
    .await
    .unwrap();
    call.stop().await;
    let lines = proxy.lines();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(!line.contains(secret), "the secret was logged: {line}");
        assert!(
            !line.contains("model=phone"),
            "a query string was logged: {line}"
        );
    }
}

#[test]
fn a_missing_header_variable_or_a_bad_ca_file_stops_check_config_naming_them() {
    let (ok, text) = check_config(
        &[
            (
                "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
                "wss://asr.example/v1",
            ),
            (
                "CALL_PROXY__BACKENDS__TABLE__ASR__HEADERS__AUTHORIZATION",
                "Bearer ${NO_SUCH_VARIABLE_SET}",
            ),
        ],
        None,
    );
    assert!(!ok, "{text}");
    assert!(text.contains("NO_SUCH_VARIABLE_SET"), "{text}");
    assert!(
        text.contains("backends.table.asr.headers.authorization"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    for path in [
        junk.to_string_lossy().into_owned(),
        "/no/such/ca.pem".to_string(),
    ] {
        let (ok, text) = check_config(
            &[
                (
                    "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
                    "wss://asr.example/v1",
                ),
                ("CALL_PROXY__BACKENDS__TABLE__ASR__CA_FILE", &path),
            ],
            None,
        );
        assert!(!ok, "{path}: {text}");
        assert!(text.contains("backends.table.asr.ca_file"), "{text}");
    }
    let (ok, text) = check_config(
        &[(
            "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
            "wss://asr.example/v1?key=1",
        )],
        None,
    );
    assert!(ok, "{text}");
}

/// Under a small descriptor limit, upgrades beyond what the limit allows get 503 before they
/// are accepted; every call that was accepted reaches its backend (none is dropped with 1011
/// when its backend connection cannot get a descriptor); the start-up log names the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_of_descriptors_an_upgrade_is_refused_not_accepted_and_dropped() {
    if !Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("prlimit is not installed: the descriptor test did not run");
        return;
    }
    let mut backend = Backend::start(Behaviour::Normal).await;
    let url = backend.url();
    let proxy = tokio::task::spawn_blocking(move || {
        ServiceProcess::spawn_under(
            &["prlimit", "--nofile=150:150", "--"],
            &[
                ("CALL_PROXY__BACKENDS__TABLE__REC__URL", url.as_str()),
                ("CALL_PROXY__BACKENDS__TABLE__REC__FORMAT", "twilio"),
                ("CALL_PROXY__BACKENDS__DEFAULT", "rec"),
            ],
        )
    })
    .await
    .unwrap();
    let warned = proxy.wait_for_log("the file descriptor limit is below media.max_calls x (1 + backends per call) + server.max_connections: calls beyond what the limit allows are refused with 503 (raise the hard limit, e.g. LimitNOFILE=, or lower those settings)");
    assert_eq!(warned["limit"], 150);

    let mut calls = Vec::new();
    let refusal = loop {
        match tokio_tungstenite::connect_async(proxy.ws_url()).await {
            Ok((ws, _)) => {
                let mut call = TwilioCall::from_socket(ws, &format!("fd{}", calls.len())).await;
                call.start(&[]).await;
                call.media(&payload(0)).await;
                calls.push(call);
                // Calls arrive one after another, each started before the next comes.
                let n = calls.len();
                backend
                    .wait_for("the call's frame", |log| payloads(&texts(log)).len() == n)
                    .await;
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => break response,
            Err(e) => panic!("after {} calls: {e}", calls.len()),
        }
        assert!(calls.len() < 150, "never refused");
    };
    assert_eq!(refusal.status(), 503);
    let body = String::from_utf8_lossy(refusal.body().as_deref().unwrap_or_default()).to_string();
    assert!(body.contains("descriptors"), "{body}");
    assert!(calls.len() >= 20, "only {} calls got in", calls.len());
    let accepted = calls.len();
    backend
        .wait_for("every accepted call's frame", |log| {
            payloads(&texts(log)).len() == accepted
        })
        .await;
    for call in &mut calls {
        assert!(
            call.still_open_after(Duration::from_millis(10)).await,
            "an accepted call was dropped"
        );
        call.stop().await;
    }
    backend
        .wait_for("every call's stop", |log| {
            texts(log).iter().filter(|t| event(t) == "stop").count() == accepted
        })
        .await;
}
