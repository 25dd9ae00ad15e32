//! The `call-proxy` binary: parses the command line, loads settings, starts the service.

use std::path::PathBuf;
use std::process::ExitCode;

use call_proxy::config::{Settings, Sources};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "call-proxy",
    version,
    about = "Fans Twilio call audio out to your backends"
)]
struct Cli {
    /// A TOML file layered over the embedded defaults and config/{RUN_MODE}.toml.
    #[arg(long, short, env = "CALL_PROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Validate the configuration and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&Sources::from_process(cli.config)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("call-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!(
                "config OK: listening on {}, {} backend(s), default {:?}, store {:?}",
                settings
                    .listen_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                settings
                    .backends
                    .table
                    .values()
                    .filter(|b| b.enabled)
                    .count(),
                settings.backends.default,
                settings.store.kind,
            );
            ExitCode::SUCCESS
        }
        Command::Serve => serve(settings),
    }
}

fn serve(settings: Settings) -> ExitCode {
    call_proxy::logging::init(&settings.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("call-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let addr = match settings.listen_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("call-proxy: {e}");
                return ExitCode::from(2);
            }
        };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        match call_proxy::run(listener, settings, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
