//! local-speaker: a backend for the proxy that plays or records what it receives.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use test_client::agent::Speak;
use test_client::speaker::{self, Options};

#[derive(Parser)]
#[command(
    version,
    about = "A backend WebSocket server that plays or records call audio"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free one; the first line printed says which).
    #[arg(long, env = "LOCAL_SPEAKER_LISTEN", default_value = "127.0.0.1:8888")]
    listen: SocketAddr,
    /// WebSocket path.
    #[arg(long, default_value = "/media")]
    path: String,
    /// Write each call to DIR/<call sid>.wav (16-bit PCM); the compact format's `start`
    /// carries no call sid, so those calls are DIR/call-<n>.wav, numbered per connection. A
    /// call the proxy hands from one instance to another (`handoffOf`) is one file.
    #[arg(long)]
    record_dir: Option<PathBuf>,
    /// Do not play on the sound card (builds with the `speaker` feature play by default).
    #[arg(long)]
    mute: bool,
    /// Answer each call as a voice agent would: echo the caller after --echo-delay (or say
    /// --say FILE), send a mark after each stretch of speech, and on a key press send clear
    /// and stop talking. The proxy's backend must have `speaks = true`.
    #[arg(long)]
    speak: bool,
    /// With --speak: say this 8 kHz mono WAV instead of echoing.
    #[arg(long, value_name = "FILE", requires = "speak")]
    say: Option<PathBuf>,
    /// With --speak: how long after the caller the echo comes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "speak")]
    echo_delay: std::time::Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("local-speaker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(dir) = &cli.record_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let play = cfg!(feature = "speaker") && !cli.mute;
    println!(
        "local-speaker listening on ws://{}{} ({})",
        listener.local_addr()?,
        cli.path,
        if play {
            "playing"
        } else {
            "not playing: built without the speaker feature or --mute"
        }
    );
    let speak = match (cli.speak, &cli.say) {
        (false, _) => None,
        (true, Some(file)) => Some(Speak::Say(test_client::play::load_audio(file)?)),
        (true, None) => Some(Speak::Echo(cli.echo_delay)),
    };
    let options = Options {
        path: cli.path,
        record_dir: cli.record_dir,
        play,
        speak,
    };
    tokio::select! {
        served = speaker::serve(listener, options, |summary| println!("{summary}")) => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
