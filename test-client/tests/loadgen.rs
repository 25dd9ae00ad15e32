//! A short loadgen run against the real service, so the benchmark tool cannot silently break.
//! No timing assertions here: timing lives in the benchmark (BENCHMARKS.md).

use call_proxy::config::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_runs_against_the_service_and_accounts_for_every_frame() {
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

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
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
        .args(["--proxy-pid", &std::process::id().to_string(), "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("calls 4 up"));

    let _ = stop.send(());
    server.await.unwrap().unwrap();

    // Anything but this machine is refused.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--url", "ws://192.0.2.1:8999/media", "--calls", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only targets this machine"));
}
