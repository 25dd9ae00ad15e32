//! test-client: plays a WAV to the proxy as Twilio would, once or every N seconds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use test_client::flow::{self as studio, FlowOptions};
use test_client::play::{self, CallSpec};

#[derive(Parser)]
#[command(
    version,
    about = "Plays recorded audio to twilio-call-proxy as a Twilio Media Stream"
)]
struct Cli {
    /// The proxy's media endpoint.
    #[arg(
        long,
        env = "TEST_CLIENT_URL",
        default_value = "ws://127.0.0.1:8999/media"
    )]
    url: String,
    /// 8 kHz mono WAV, mu-law or 16-bit PCM.
    #[arg(long, default_value = "audio-samples/hello-en-us.wav")]
    wav: PathBuf,
    /// Play one call and exit (the default).
    #[arg(long, conflicts_with = "every")]
    once: bool,
    /// Start a call every DURATION (e.g. 10s), as the original test client did.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// With --every: stop after this many calls.
    #[arg(long, requires = "every")]
    count: Option<u64>,
    /// `customParameters.backendIds`: backend ids, comma separated.
    #[arg(long)]
    backend_ids: Option<String>,
    /// `customParameters.backendHosts`: host:port entries, comma separated.
    #[arg(long)]
    backend_hosts: Option<String>,
    /// `customParameters.executionId` (Studio's flow.sid).
    #[arg(long)]
    execution_id: Option<String>,
    /// `customParameters.callerId`.
    #[arg(long)]
    caller: Option<String>,
    /// Any other stream parameter, KEY=VALUE; repeatable.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Walk the whole Studio Flow first: blocked check, PIN, then the stream with the
    /// parameters the PIN returned, polling the execution's liveness.
    #[arg(long)]
    flow: bool,
    /// With --flow: the PIN to enter.
    #[arg(long, default_value = "1234", requires = "flow")]
    pin: String,
    /// Sign every request and the upgrade as Twilio does, with this auth token (with or
    /// without --flow).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// The URL Twilio calls the proxy on (its twilio.public_url), when signing.
    #[arg(long)]
    public_url: Option<String>,
    /// Press a key during the call: DIGIT@TIME, e.g. 9@3s; repeatable.
    #[arg(long = "dtmf", value_parser = parse_dtmf)]
    dtmf: Vec<(char, Duration)>,
    /// Record what comes back to the caller (a voice agent's answer, as Twilio would play
    /// it) to this WAV file, and say how it went: time to first audio, marks, clears.
    #[arg(long, value_name = "FILE")]
    reply: Option<PathBuf>,
    /// Replay a call the proxy captured (media.capture): its Twilio messages at their
    /// recorded pace; --backend-ids, --caller and --param replace its stream parameters.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["flow", "every", "reply"])]
    replay: Option<PathBuf>,
    /// With --replay: this many times the recorded pace (2 = twice as fast).
    #[arg(long, default_value = "1", requires = "replay", value_parser = parse_speed)]
    speed: f64,
    /// With --reply: how long to stay on the line once the audio is done and the answer so
    /// far has played out (its marks echoed); an answer that starts within it is heard out.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    linger: Duration,
}

fn parse_dtmf(s: &str) -> Result<(char, Duration), String> {
    let (digit, at) = s
        .split_once('@')
        .ok_or_else(|| format!("`{s}` is not DIGIT@TIME (e.g. 9@3s)"))?;
    let mut chars = digit.chars();
    let (Some(digit), None) = (chars.next(), chars.next()) else {
        return Err(format!("`{digit}` is not one key"));
    };
    if !(digit.is_ascii_digit() || digit == '*' || digit == '#') {
        return Err(format!("`{digit}` is not a keypad key (0-9, * and #)"));
    }
    let at = humantime::parse_duration(at).map_err(|e| format!("`{at}`: {e}"))?;
    Ok((digit, at))
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 1000.0 => Ok(v),
        _ => Err(format!("`{s}` is not a speed from above 0 to 1000")),
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// Studio passes lists as JSON array strings; the proxy reads those.
fn json_list(list: &str) -> String {
    let items: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    serde_json::to_string(&items).unwrap_or_default()
}

fn resolve_wav(path: PathBuf) -> PathBuf {
    if path.exists() || path.is_absolute() {
        return path;
    }
    // Run from elsewhere in the workspace: look beside the workspace root too.
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(&path);
    if beside.exists() {
        beside
    } else {
        path
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test-client: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let frames = if cli.replay.is_some() {
        Vec::new()
    } else {
        play::frames(&play::load_audio(&resolve_wav(cli.wav.clone()))?)
    };
    let mut params = BTreeMap::new();
    if let Some(ids) = &cli.backend_ids {
        params.insert("backendIds".to_string(), json_list(ids));
    }
    if let Some(hosts) = &cli.backend_hosts {
        params.insert("backendHosts".to_string(), json_list(hosts));
    }
    if let Some(id) = &cli.execution_id {
        params.insert("executionId".to_string(), id.clone());
    }
    if let Some(caller) = &cli.caller {
        params.insert("callerId".to_string(), caller.clone());
    }
    params.extend(cli.params.iter().cloned());

    if cli.flow {
        return flow(&cli, &frames).await;
    }
    if let Some(path) = &cli.replay {
        return replay(&cli, path, &params).await;
    }
    let mut n = 0u64;
    loop {
        let began = tokio::time::Instant::now();
        let mut spec = CallSpec::new(&cli.url, n);
        spec.custom_parameters = params.clone();
        spec.dtmf = cli.dtmf.clone();
        if let Some(token) = &cli.auth_token {
            spec.headers.push(studio::upgrade_signature(
                &cli.url,
                cli.public_url.as_deref(),
                token,
            ));
        }
        if cli.reply.is_some() {
            spec.linger = cli.linger;
        }
        let report = play::play(&spec, &frames)
            .await
            .with_context(|| format!("call {}", spec.call_sid))?;
        let closed = match &report.close {
            Some((code, reason)) => format!("proxy closed with {code} {reason}"),
            None => "proxy closed without a close frame".to_string(),
        };
        println!(
            "test-client: call {}: {} frames ({:.2} s of audio) streamed in {:.2} s; {closed}",
            report.call_sid,
            report.frames,
            report.audio.as_secs_f64(),
            report.took.as_secs_f64()
        );
        if let Some(path) = &cli.reply {
            write_reply(path, &report.reply)?;
            let r = &report.reply;
            println!(
                "test-client: reply: {:.2} s of audio, first after {}, {} mark(s) echoed, {} clear(s); recorded to {}",
                r.audio.len() as f64 / 8000.0,
                r.first_audio
                    .map(|d| format!("{} ms", d.as_millis()))
                    .unwrap_or_else(|| "never".into()),
                r.marks_echoed,
                r.clears,
                path.display()
            );
        }
        n += 1;
        let Some(every) = cli.every else {
            return Ok(());
        };
        if cli.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        if report.took > every {
            bail!(
                "a call takes longer ({:?}) than --every {:?}",
                report.took,
                every
            );
        }
        tokio::select! {
            _ = tokio::time::sleep_until(began + every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn replay(
    cli: &Cli,
    path: &std::path::Path,
    params: &BTreeMap<String, String>,
) -> Result<()> {
    let capture = test_client::replay::load(path)?;
    let headers: Vec<(String, String)> = cli
        .auth_token
        .iter()
        .map(|token| studio::upgrade_signature(&cli.url, cli.public_url.as_deref(), token))
        .collect();
    let report = test_client::replay::replay(&cli.url, &headers, &capture, cli.speed, params)
        .await
        .with_context(|| format!("replaying {}", path.display()))?;
    let closed = match &report.close {
        Some((code, reason)) => format!("proxy closed with {code} {reason}"),
        None => "proxy closed without a close frame".to_string(),
    };
    println!(
        "test-client: replayed {} of {} message(s) from {} in {:.2} s{}; {closed}",
        report.messages,
        capture.messages.len(),
        path.display(),
        report.took.as_secs_f64(),
        if capture.truncated {
            " (the capture was cut short: a stop was sent)"
        } else {
            ""
        },
    );
    Ok(())
}

/// The caller's side of the answer, as a 16-bit WAV.
fn write_reply(path: &std::path::Path, reply: &play::Reply) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot write {}", path.display()))?;
    for &code in &reply.audio {
        wav.write_sample(call_proxy::audio::mulaw::decode(code))?;
    }
    wav.finalize()?;
    Ok(())
}

async fn flow(cli: &Cli, frames: &[Vec<u8>]) -> Result<()> {
    let caller = cli
        .caller
        .clone()
        .unwrap_or_else(|| "+15550100000".to_string());
    let execution_id = cli.execution_id.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("FN{stamp:032x}")
    });
    let opts = FlowOptions {
        url: cli.url.clone(),
        caller,
        pin: cli.pin.clone(),
        auth_token: cli.auth_token.clone(),
        public_url: cli.public_url.clone(),
        execution_id,
    };
    let report = studio::run(&opts, frames).await?;
    println!(
        "test-client: flow for {}: PIN opened {}; call {}: {} frames streamed in {:.2} s; \
         execution connected on {} poll(s), {} after the call",
        opts.caller,
        report.backend_ids,
        report.call.call_sid,
        report.call.frames,
        report.call.took.as_secs_f64(),
        report.connected_polls,
        if report.disconnected_after {
            "gone"
        } else {
            "STILL CONNECTED"
        },
    );
    if !report.disconnected_after {
        bail!("the execution still reads as connected after the call ended");
    }
    Ok(())
}
