//! loadgen: many simulated Twilio calls against the proxy, fanned out to sinks it hosts;
//! reports loss, added latency, and the proxy's CPU and memory.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use test_client::loadgen::{self, Options, SinkMode};

#[derive(Parser)]
#[command(version, about = "Load and latency benchmark for twilio-call-proxy")]
struct Cli {
    /// The proxy's media endpoint (loopback only: this is a load test).
    #[arg(long, default_value = "ws://127.0.0.1:8999/media")]
    url: String,
    /// Concurrent calls.
    #[arg(long, default_value_t = 100)]
    calls: u32,
    /// Sink backends per call.
    #[arg(long, default_value_t = 2)]
    fanout: u32,
    /// How long every call streams together after the ramp.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Calls are started evenly over this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ramp: Duration,
    /// The proxy's process id, for its CPU and RSS.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Host the sinks on ports PORT, PORT+1, ... and name them `sink0`, `sink1`, ... in
    /// `backendIds` (the proxy's table must hold them) instead of `backendHosts`.
    #[arg(long, value_name = "PORT")]
    sink_base_port: Option<u16>,
    /// With --sink-base-port: the sinks speak TLS with the certificate in DIR (see --make-tls).
    #[arg(long, value_name = "DIR", requires = "sink_base_port")]
    sink_tls: Option<std::path::PathBuf>,
    /// With --sink-base-port: `sink0` talks back, answering each frame at once with one
    /// stamped with its own send time (the proxy's table must say `speaks = true`); the report
    /// gains the latency the proxy adds on the way back to the caller.
    #[arg(long, requires = "sink_base_port")]
    speak: bool,
    /// With --sink-base-port: one more sink, `sink<FANOUT>`, floods the proxy with junk as a
    /// misbehaving backend would; the report measures the others.
    #[arg(long, requires = "sink_base_port")]
    flood: bool,
    /// Report latency before and after this long into the full-load window separately (for
    /// a measurement around an event then, such as signalling the proxy to drain).
    #[arg(long, value_parser = humantime::parse_duration)]
    split_at: Option<Duration>,
    /// Every call takes the shape of this captured call (`media.capture`): its messages at
    /// their recorded times — silences, bursts, skipped chunks, key presses — looped for the
    /// whole run, each frame's audio stamped for the measurement.
    #[arg(long, value_name = "FILE")]
    replay: Option<std::path::PathBuf>,
    /// Write a test CA (ca.pem, for the proxy's ca_file) and a localhost certificate for the
    /// sinks into DIR, then exit.
    #[arg(long, value_name = "DIR", exclusive = true)]
    make_tls: Option<std::path::PathBuf>,
}

fn loopback(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(dir) = &cli.make_tls {
        test_client::tls::make(dir)?;
        eprintln!(
            "loadgen: wrote {} (the CA, for ca_file) and the sinks' certificate",
            dir.join(test_client::tls::CA_FILE).display()
        );
        return Ok(());
    }
    if !loopback(&cli.url) {
        anyhow::bail!("loadgen only targets this machine (127.0.0.0/8, localhost, [::1])");
    }
    let opts = Options {
        url: cli.url,
        calls: cli.calls,
        fanout: cli.fanout,
        duration: cli.duration,
        ramp: cli.ramp,
        proxy_pid: cli.proxy_pid.map(|p| p.to_string()),
        progress: !cli.quiet,
        speak: cli.speak,
        flood: cli.flood,
        split_at: cli.split_at,
        shape: match &cli.replay {
            Some(path) => {
                let capture = test_client::replay::load(path)?;
                let shape = test_client::shape::Shape::of(&capture)
                    .with_context(|| format!("{}", path.display()))?;
                Some(std::sync::Arc::new(shape))
            }
            None => None,
        },
        sinks: match cli.sink_base_port {
            None => SinkMode::Hosts,
            Some(base_port) => SinkMode::Table {
                base_port,
                tls: cli.sink_tls,
            },
        },
    };
    let url = opts.url.clone();
    let report = loadgen::run(opts, |line| eprintln!("{line}")).await?;
    if report.calls_connected == 0 {
        anyhow::bail!("no call could connect to {url}");
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}
