//! A short loadgen run against the real service, so the benchmark tool cannot silently break.
//! No timing assertions here: timing lives in the benchmark (BENCHMARKS.md).

use call_proxy::config::Settings;

/// The service in-process on port 0, taking the sinks loadgen names in `backendHosts`.
async fn serve() -> (std::net::SocketAddr, Service) {
    let mut settings = Settings::defaults();
    settings.store.path.clear();
    settings.backends.default.clear();
    settings.backends.hosts_format = call_proxy::config::WireFormat::Twilio;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // One signal: a drain, which ends at once with no call left.
    let signal = futures_util::stream::once(async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(call_proxy::run(listener, settings, signal));
    (addr, Service { stop, server })
}

/// Runs loadgen to its end: its JSON report, and what it said on standard error.
async fn loadgen(cmd: &mut tokio::process::Command) -> (serde_json::Value, String) {
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

struct Service {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Drains the service (no call is left) and waits for it to end cleanly.
    async fn end(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_runs_against_the_service_and_accounts_for_every_frame() {
    let (addr, service) = serve().await;

    let (report, stderr) = loadgen(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--url", &format!("ws://{addr}/media")])
            .args([
                "--calls",
                "4",
                "--fanout",
                "2",
                "--duration",
                "2s",
                "--ramp",
                "500ms",
            ])
            .args(["--proxy-pid", &std::process::id().to_string(), "--json"]),
    )
    .await;
    assert_eq!(report["calls_connected"], 4);
    assert_eq!(report["calls_held"], 4);
    let sent = report["frames_sent"].as_u64().unwrap();
    assert!(sent > 0);
    let sinks = report["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 2);
    for s in sinks {
        assert_eq!(s["received"].as_u64().unwrap(), sent, "{report}");
        assert_eq!(s["lost"], 0);
        assert_eq!(s["foreign"], 0);
    }
    assert!(report["latency"]["samples"].as_u64().unwrap() > 0);
    assert!(report["proxy"]["rss_full_mib"].as_f64().unwrap() > 0.0);
    // Progress lines went to standard error.
    assert!(stderr.contains("calls 4 up"));

    service.end().await;

    // Anything but this machine is refused.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--url", "ws://192.0.2.1:8999/media", "--calls", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only targets this machine"));
}

/// A value of the proxy's Prometheus text: the sample named exactly `name` (labels included).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// `loadgen --replay FILE`: each call takes a captured call's shape — here half a second of
/// speech, two frames Twilio skipped, half a second of silence, a key press, more speech —
/// looped; the proxy sees the shape (its quality figures count the skipped frames and the
/// silence of every pass), and the sinks still account for every frame sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_replays_a_capture_as_the_shape_of_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shape.jsonl");
    let mut lines = vec![
        r#"{"capture":1,"call_sid":"CAshape","stream_sid":"MZshape","started_at_ms":0}"#
            .to_string(),
        format!(
            r#"{{"at_ms":0,"message":{}}}"#,
            call_proxy::twilio::messages::outbound::start(
                1,
                &call_proxy::twilio::messages::outbound::StartInfo {
                    account_sid: "ACshape",
                    call_sid: "CAshape",
                    stream_sid: "MZshape",
                    tracks: &["inbound"],
                    custom_parameters: &Default::default(),
                },
            )
        ),
    ];
    let payload = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0x55u8; 160]);
    let frame = |at: u64, chunk: u64| {
        format!(
            r#"{{"at_ms":{at},"message":{}}}"#,
            call_proxy::twilio::messages::outbound::media(
                chunk + 1,
                "MZshape",
                "inbound",
                chunk,
                (chunk - 1) * 20,
                &payload
            )
        )
    };
    for i in 1..=25 {
        lines.push(frame(20 * i, i));
    }
    // Chunks 26 and 27 never came; then half a second of nothing.
    for i in 28..=52 {
        lines.push(frame(20 * i + 500, i));
    }
    lines.push(
        r#"{"at_ms":1560,"message":{"event":"dtmf","streamSid":"MZshape","sequenceNumber":"60","dtmf":{"track":"inbound_track","digit":"*"}}}"#
            .to_string(),
    );
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let (addr, service) = serve().await;

    let (report, _) = loadgen(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--url", &format!("ws://{addr}/media")])
            .args(["--calls", "3", "--fanout", "2", "--duration", "3500ms"])
            .args(["--ramp", "300ms", "--quiet", "--json", "--replay"])
            .arg(&file),
    )
    .await;
    assert_eq!(report["shape"]["frames_per_pass"], 50, "{report}");
    assert_eq!(report["calls_held"], 3, "{report}");
    let sent = report["frames_sent"].as_u64().unwrap();
    for s in report["sinks"].as_array().unwrap() {
        assert_eq!(s["received"].as_u64().unwrap(), sent, "{report}");
        assert_eq!(s["lost"], 0);
    }

    // The calls have ended (loadgen sent each its stop): the proxy's figures hold the shape.
    // The proxy records a call's figures as it ends, which may be a moment after loadgen's exit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let metrics = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let calls = sample(&metrics, "call_proxy_twilio_frames_missing_count");
        if calls == 3.0 {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{calls} calls ended: {metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // Two skipped in each pass; every call went through at least two passes of 1.58 s.
    let missing = sample(&metrics, "call_proxy_twilio_frames_missing_sum");
    assert!(missing >= 3.0 * 2.0 * 2.0, "{missing}");
    // Every call's longest silence is the capture's half second, not a frame's 20 ms.
    let under_quarter = sample(
        &metrics,
        "call_proxy_twilio_longest_gap_seconds_bucket{le=\"0.256\"}",
    );
    assert_eq!(under_quarter, 0.0, "{metrics}");

    service.end().await;
}
