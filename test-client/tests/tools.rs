//! The tools as a developer uses them: real processes, real sockets, the shipped audio.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use call_proxy::audio::{mulaw, wav};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sample(name: &str) -> PathBuf {
    workspace().join("audio-samples").join(name)
}

/// The source audio as Twilio carries it, padded to whole 20 ms frames with silence.
fn source_frames(name: &str) -> Vec<u8> {
    let w = wav::read(&std::fs::read(sample(name)).unwrap()).unwrap();
    let mut audio = w.to_twilio_mulaw().unwrap();
    let whole = audio.len().div_ceil(160) * 160;
    audio.resize(whole, mulaw::SILENCE);
    audio
}

/// The service binary, built beside this package's binaries by `cargo test --workspace`;
/// built here when this package's tests run alone.
fn call_proxy_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_test-client"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = dir.join(format!("call-proxy{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "twilio-call-proxy", "--bin", "call-proxy"])
            .current_dir(workspace())
            .status()
            .unwrap();
        assert!(status.success(), "building call-proxy failed");
    }
    bin
}

/// A child process whose output lines arrive on a channel; killed when dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("process starts");
        let (tx, rx) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Proc { child, lines: rx }
    }

    /// The first output line that `pick` accepts, within `within`.
    fn line<T>(&self, within: Duration, pick: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(t) = pick(&line) {
                        return t;
                    }
                    seen.push(line);
                }
                Err(_) => panic!("no expected line; saw:\n{}", seen.join("\n")),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn speaker(record_dir: &Path) -> (Proc, String) {
    let p = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_local-speaker"))
            .args(["--listen", "127.0.0.1:0", "--record-dir"])
            .arg(record_dir),
    );
    let url = p.line(Duration::from_secs(10), |l| {
        l.strip_prefix("local-speaker listening on ")
            .map(|rest| rest.split(' ').next().unwrap().to_string())
    });
    (p, url)
}

fn proxy(speaker_url: &str, format: &str) -> (Proc, String) {
    let mut cmd = Command::new(call_proxy_bin());
    cmd.env_remove("RUN_MODE")
        .env_remove("TWILIO_AUTH_TOKEN")
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL", speaker_url)
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT", format);
    start_proxy(cmd)
}

fn start_proxy(mut cmd: Command) -> (Proc, String) {
    let p = Proc::spawn(
        cmd.current_dir(workspace())
            // Nothing written into the workspace.
            .env("CALL_PROXY__STORE__PATH", "")
            .env_remove("RUST_LOG")
            .env("CALL_PROXY__SERVER__HOST", "127.0.0.1")
            .env("CALL_PROXY__SERVER__PORT", "0")
            .env("CALL_PROXY__LOG__FORMAT", "json"),
    );
    let addr = p.line(Duration::from_secs(10), |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["message"] == "call-proxy listening").then(|| v["addr"].as_str().unwrap().to_string())
    });
    (p, format!("ws://{addr}/media"))
}

fn play(url: &str, wav: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_test-client"))
        .args(["--once", "--url", url, "--wav"])
        .arg(sample(wav))
        .output()
        .unwrap()
}

#[test]
fn end_to_end_the_recording_holds_exactly_the_source_samples() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["compact", "twilio"] {
        let rec = dir.path().join(format);
        let (speaker, speaker_url) = speaker(&rec);
        let (mut proxy, url) = proxy(&speaker_url, format);

        let out = play(&url, "testing-123.wav");
        assert!(
            out.status.success(),
            "test-client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let source = source_frames("testing-123.wav");
        let frames = source.len() / 160;
        let summary = speaker.line(Duration::from_secs(10), |l| {
            l.starts_with("call ").then(|| l.to_string())
        });
        assert!(
            summary.contains(&format!(": {frames} frames")) && summary.contains(" 0 gaps"),
            "{summary}"
        );

        let files: Vec<PathBuf> = std::fs::read_dir(&rec)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let mut reader = hound::WavReader::open(&files[0]).unwrap();
        assert_eq!(reader.spec().sample_rate, 8000);
        assert_eq!(reader.spec().channels, 1);
        let recorded: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
        let expected: Vec<i16> = source.iter().map(|&c| mulaw::decode(c)).collect();
        assert_eq!(recorded.len(), expected.len(), "{format}: sample count");
        assert!(
            recorded == expected,
            "{format}: samples differ from the source"
        );
        if format == "twilio" {
            let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("CA"), "named after the call sid: {name}");
        }

        // SIGTERM: the service ends cleanly and promptly.
        let pid = proxy.child.id().to_string();
        let began = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = loop {
            if let Some(s) = proxy.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                began.elapsed() < Duration::from_secs(8),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status {status}");
    }
}

/// What a stand-in proxy saw of one test-client call.
struct Received {
    messages: Vec<(Instant, serde_json::Value)>,
}

/// Runs a tool to its end and fails the test, with its stderr, if it did not succeed.
async fn succeeds(cmd: &mut tokio::process::Command) -> std::process::Output {
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn capture_one_call() -> (String, tokio::task::JoinHandle<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/media", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let mut messages = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => {
                    messages.push((Instant::now(), serde_json::from_str(t.as_str()).unwrap()))
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        Received { messages }
    });
    (url, task)
}

#[tokio::test]
async fn test_client_paces_frames_in_real_time_with_twilios_counters() {
    let (url, received) = capture_one_call().await;
    let began = Instant::now();
    succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_test-client"))
            .args(["--once", "--url", &url, "--wav"])
            .arg(sample("hello-en-us.wav"))
            .args(["--backend-ids", "rec,asr", "--execution-id", "FN123"]),
    )
    .await;
    let took = began.elapsed();
    let got = received.await.unwrap().messages;

    let source = source_frames("hello-en-us.wav");
    let frames = source.len() / 160;
    let audio = Duration::from_millis(frames as u64 * 20);
    assert!(
        took >= audio && took < audio + Duration::from_secs(3),
        "{audio:?} of audio took {took:?}"
    );

    let events: Vec<&str> = got
        .iter()
        .map(|(_, v)| v["event"].as_str().unwrap())
        .collect();
    assert_eq!(events[0], "connected");
    assert_eq!(events[1], "start");
    assert_eq!(*events.last().unwrap(), "stop");
    assert_eq!(events.len(), frames + 3);

    let start = &got[1].1;
    assert_eq!(start["start"]["mediaFormat"]["encoding"], "audio/x-mulaw");
    assert_eq!(start["start"]["mediaFormat"]["sampleRate"], 8000);
    assert_eq!(
        start["start"]["customParameters"]["backendIds"],
        r#"["rec","asr"]"#
    );
    assert_eq!(start["start"]["customParameters"]["executionId"], "FN123");

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut audio_back = Vec::new();
    for (i, (_, v)) in got[1..].iter().enumerate() {
        assert_eq!(
            v["sequenceNumber"],
            (i + 1).to_string(),
            "sequence numbers count by one"
        );
    }
    for (i, (_, v)) in got[2..got.len() - 1].iter().enumerate() {
        assert_eq!(v["media"]["chunk"], (i + 1).to_string());
        assert_eq!(v["media"]["timestamp"], (i * 20).to_string());
        let payload = b64.decode(v["media"]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload.len(), 160, "frame {i}");
        audio_back.extend(payload);
    }
    assert!(
        audio_back == source,
        "the audio is the source, header stripped"
    );

    // Paced, not bursted: the middle frame arrives about half-way through.
    let first = got[2].0;
    let middle = got[2 + frames / 2].0;
    let expected = Duration::from_millis((frames / 2) as u64 * 20);
    let actual = middle - first;
    assert!(
        actual + Duration::from_millis(500) >= expected
            && actual <= expected + Duration::from_secs(2),
        "frame {} arrived {actual:?} after the first, expected about {expected:?}",
        frames / 2
    );
}

#[test]
fn test_client_explains_what_went_wrong() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/media", free.local_addr().unwrap());
    drop(free);
    let out = play(&url, "testing-123.wav");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the proxy"), "{err}");

    let out = play(&url, "no-such-file.wav");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-file.wav"));
}

const AUTH_TOKEN: &str = "test-auth-token";
const PIN_KEY: &str = "test-pin-key-0123456789";

/// The service as production runs it (signatures on, route tokens required), with the
/// speaker as its one backend and PIN 2468 opening it, from a `--config` file.
fn production_proxy(speaker_url: &str, dir: &Path) -> (Proc, String) {
    let config = dir.join("site.toml");
    let hash = call_proxy::gate::pins::hash_pin(PIN_KEY, "2468");
    std::fs::write(
        &config,
        format!(
            "[backends.table.speaker]\nenabled = true\nurl = \"{speaker_url}\"\nformat = \"twilio\"\n\n[gate.pins]\n\"{hash}\" = [\"speaker\"]\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(call_proxy_bin());
    cmd.arg("--config")
        .arg(&config)
        .env("RUN_MODE", "production")
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("CALL_PROXY__GATE__PIN_KEY", PIN_KEY)
        .env(
            "CALL_PROXY__SECURITY__ROUTE_TOKEN_SECRET",
            "test-route-token-secret",
        )
        .env("SERVER_API_KEY", "test-api-key")
        // The address is known only once it listens: signatures are over the Host it is
        // called on, as behind a proxy that forwards it.
        .env("CALL_PROXY__TWILIO__TRUST_FORWARDED_HEADERS", "true");
    start_proxy(cmd)
}

fn flow(url: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_test-client"))
        .env_remove("TWILIO_AUTH_TOKEN")
        .args(["--flow", "--url", url, "--caller", "+15550100000", "--wav"])
        .arg(sample("testing-123.wav"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_flow_walk_passes_a_production_configured_proxy_and_only_with_the_right_token_and_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (speaker, speaker_url) = speaker(&dir.path().join("rec"));
    let (_proxy, url) = production_proxy(&speaker_url, dir.path());

    let out = flow(&url, &["--pin", "2468", "--auth-token", AUTH_TOKEN]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "flow failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#"PIN opened ["speaker"]"#), "{stdout}");
    assert!(stdout.contains("gone after the call"), "{stdout}");
    let frames = source_frames("testing-123.wav").len() / 160;
    let summary = speaker.line(Duration::from_secs(10), |l| {
        l.starts_with("call CA").then(|| l.to_string())
    });
    assert!(summary.contains(&format!(": {frames} frames")), "{summary}");

    // Unsigned: refused at the first request.
    let out = flow(&url, &["--pin", "2468"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("X-Twilio-Signature"));
    // Signed with another token: refused.
    let out = flow(&url, &["--pin", "2468", "--auth-token", "not-the-token"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    // The wrong PIN: refused, and counted.
    let out = flow(&url, &["--pin", "1111", "--auth-token", AUTH_TOKEN]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PIN refused") && err.contains(r#""attempts":1"#),
        "{err}"
    );
    // A stream straight to /media: unsigned, the upgrade is refused; signed (--auth-token
    // without --flow signs the upgrade too), it is let in and closed for want of the PIN's
    // route token.
    let out = play(&url, "testing-123.wav");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("refused the stream: HTTP 400"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_test-client"))
        .env_remove("TWILIO_AUTH_TOKEN")
        .args(["--once", "--url", &url, "--auth-token", AUTH_TOKEN, "--wav"])
        .arg(sample("testing-123.wav"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("proxy closed the stream") && err.contains("route token"),
        "{err}"
    );
}

fn talking_speaker(extra: &[&str]) -> (Proc, String) {
    let p = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_local-speaker"))
            .args(["--listen", "127.0.0.1:0", "--speak"])
            .args(extra),
    );
    let url = p.line(Duration::from_secs(10), |l| {
        l.strip_prefix("local-speaker listening on ")
            .map(|rest| rest.split(' ').next().unwrap().to_string())
    });
    (p, url)
}

fn talking_proxy(speaker_url: &str, format: &str) -> (Proc, String) {
    let mut cmd = Command::new(call_proxy_bin());
    cmd.env_remove("RUN_MODE")
        .env_remove("TWILIO_AUTH_TOKEN")
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL", speaker_url)
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT", format)
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__SPEAKS", "true");
    start_proxy(cmd)
}

/// The reply line test-client prints: seconds of audio, first audio (ms), marks, clears.
fn reply_line(stdout: &str) -> (f64, u64, u32, u32) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("test-client: reply: "))
        .unwrap_or_else(|| panic!("no reply line in {stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let seconds: f64 = words[2].parse().unwrap();
    let first: u64 = words[8].parse().unwrap_or(u64::MAX);
    let marks: u32 = words[10].parse().unwrap();
    let clears: u32 = words[13].parse().unwrap();
    (seconds, first, marks, clears)
}

/// A voice agent answering through the proxy, all real binaries: the echo comes back to the
/// caller exactly, marks go round, and a key press makes the agent clear and stop.
#[test]
fn a_voice_agent_answers_the_caller_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_frames("testing-123.wav");
    let seconds = source.len() as f64 / 8000.0;

    // Twilio format, no interruption: the caller hears its own audio back, sample for sample.
    let (speaker, speaker_url) = talking_speaker(&["--echo-delay", "300ms"]);
    let (_proxy, url) = talking_proxy(&speaker_url, "twilio");
    let reply = dir.path().join("reply.wav");
    let out = Command::new(env!("CARGO_BIN_EXE_test-client"))
        .args(["--once", "--url", &url, "--wav"])
        .arg(sample("testing-123.wav"))
        .arg("--reply")
        .arg(&reply)
        .args(["--linger", "2s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (got_seconds, first_ms, marks, clears) = reply_line(&stdout);
    assert!(
        (250..=1000).contains(&first_ms),
        "first audio after {first_ms} ms: {stdout}"
    );
    assert!(marks >= 1, "{stdout}");
    assert_eq!(clears, 0);
    assert!(
        (got_seconds - seconds).abs() < 0.05,
        "{got_seconds} of {seconds} s back"
    );
    let mut wav = hound::WavReader::open(&reply).unwrap();
    let heard: Vec<i16> = wav.samples::<i16>().map(Result::unwrap).collect();
    let said: Vec<i16> = source.iter().map(|&c| mulaw::decode(c)).collect();
    assert!(heard == said, "the echo is the caller's audio exactly");
    let summary = speaker.line(Duration::from_secs(10), |l| {
        l.starts_with("call ").then(|| l.to_string())
    });
    assert!(summary.contains("mark(s) sent"), "{summary}");

    // A long answer, not interrupted, with the default --linger: the call stays on the line
    // until the answer has played out, so all of it is heard and its marks come back.
    let message = sample("hello-en-us.wav");
    let message_seconds = source_frames("hello-en-us.wav").len() as f64 / 8000.0;
    let (_speaker, speaker_url) = talking_speaker(&["--say", message.to_str().unwrap()]);
    let (_proxy, url) = talking_proxy(&speaker_url, "twilio");
    let out = Command::new(env!("CARGO_BIN_EXE_test-client"))
        .args(["--once", "--url", &url, "--wav"])
        .arg(sample("testing-123.wav"))
        .arg("--reply")
        .arg(dir.path().join("whole.wav"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let (got_seconds, _, marks, _) = reply_line(&stdout);
    assert!(
        got_seconds >= message_seconds - 0.05 && message_seconds > seconds,
        "{got_seconds} s of the {message_seconds} s answer heard: {stdout}"
    );
    assert!(marks >= 1, "{stdout}");

    // Compact and pcm16 agents saying a long message, interrupted: a key press 1 s in, the
    // agent clears and stops, and the caller hears no more of it.
    for format in ["compact", "pcm16"] {
        let (_speaker, speaker_url) = talking_speaker(&["--say", message.to_str().unwrap()]);
        let (_proxy, url) = talking_proxy(&speaker_url, format);
        let out = Command::new(env!("CARGO_BIN_EXE_test-client"))
            .args(["--once", "--url", &url, "--wav"])
            .arg(sample("testing-123.wav"))
            .arg("--reply")
            .arg(dir.path().join(format!("{format}.wav")))
            .args(["--linger", "1s", "--dtmf", "9@1s"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{format}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (got_seconds, first_ms, _, clears) = reply_line(&stdout);
        assert!(first_ms < 1000, "{format}: {stdout}");
        assert_eq!(clears, 1, "{format}: {stdout}");
        assert!(
            got_seconds < 1.5 && message_seconds > 3.0,
            "{format}: after the clear the agent stopped: {got_seconds} s of {message_seconds} s heard"
        );
    }
}

/// A captured call played again: the proxy with `media.capture` on writes the call's Twilio
/// messages (the key pressed masked); `test-client --replay` plays the file four times faster
/// to another proxy, whose backend gets the same audio, byte for byte, in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_call_replays_the_same_audio_to_another_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let captures = dir.path().join("captures");
    let (first_url, first) = capture_one_call().await;
    let mut cmd = Command::new(call_proxy_bin());
    cmd.env_remove("RUN_MODE")
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL", &first_url)
        .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__FORMAT", "twilio")
        .env("CALL_PROXY__MEDIA__CAPTURE__ENABLED", "true")
        .env("CALL_PROXY__MEDIA__CAPTURE__DIR", &captures);
    let (_capturing, url) = start_proxy(cmd);
    succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_test-client"))
            .args(["--once", "--url", &url, "--dtmf", "5@1s", "--wav"])
            .arg(sample("testing-123.wav")),
    )
    .await;
    let original = first.await.unwrap();

    // The file is written as the call ends: wait for its stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    let file = loop {
        let found: Vec<PathBuf> = std::fs::read_dir(&captures)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if let [file] = &found[..] {
            if std::fs::read_to_string(file)
                .unwrap()
                .contains("\"event\":\"stop\"")
            {
                break file.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no finished capture in {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""digit":"*""#), "the key pressed is masked");
    assert!(!text.contains(r#""digit":"5""#));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a capture is the service user's alone");
    }

    let (second_url, second) = capture_one_call().await;
    let (_replaying, url) = proxy(&second_url, "twilio");
    let began = Instant::now();
    let out = succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_test-client"))
            .args(["--url", &url, "--speed", "4", "--replay"])
            .arg(&file),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("replayed"), "{stdout}");
    let replayed = second.await.unwrap();
    let media = |r: &Received| -> Vec<String> {
        r.messages
            .iter()
            .filter(|(_, m)| m["event"] == "media")
            .map(|(_, m)| m["media"]["payload"].as_str().unwrap().to_string())
            .collect()
    };
    let (sent, heard) = (media(&original), media(&replayed));
    assert_eq!(sent.len(), source_frames("testing-123.wav").len() / 160);
    assert!(sent == heard, "the same audio, frame for frame");
    let events = |r: &Received| -> Vec<String> {
        r.messages
            .iter()
            .map(|(_, m)| m["event"].as_str().unwrap().to_string())
            .filter(|e| e != "media")
            .collect()
    };
    assert_eq!(events(&replayed), ["start", "dtmf", "stop"]);
    let audio = Duration::from_millis(sent.len() as u64 * 20);
    assert!(
        began.elapsed() < audio / 2,
        "four times faster: {:?} for {audio:?} of audio",
        began.elapsed()
    );

    // The same file as the shape of a load: every frame of every call accounted for.
    let out = succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--url", &url, "--calls", "2", "--fanout", "1"])
            .args(["--duration", "2s", "--ramp", "100ms", "--quiet", "--json"])
            .arg("--replay")
            .arg(&file),
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["shape"]["frames_per_pass"].as_u64(),
        Some(sent.len() as u64),
        "{report}"
    );
    let frames = report["frames_sent"].as_u64().unwrap();
    assert!(frames > 0);
    assert_eq!(
        report["sinks"][0]["received"].as_u64(),
        Some(frames),
        "{report}"
    );
}
