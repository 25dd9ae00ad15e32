//! The `call-proxy` binary: parses the command line, loads settings, and serves, checks the
//! config, or hashes a PIN.

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
    /// Ask the instance these settings describe whether it is alive (`GET /healthz` on its
    /// listening port): exit 0 on 200. For a container's HEALTHCHECK, with no HTTP client in
    /// the image.
    Healthcheck {
        /// The path to ask; `/readyz` asks whether it takes new calls.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Print the `[gate.pins]` line for a PIN, hashed with the configured `gate.pin_key`.
    /// Without PIN, reads it from standard input (keeps it out of the shell history).
    HashPin {
        pin: Option<String>,
        /// The backend ids the PIN opens, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        backends: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    let sources = Sources::from_process(cli.config);
    // hash-pin needs the PIN key and the backend table, not the secrets a service needs.
    let loaded = match command {
        Command::HashPin { .. } => Settings::layered(&sources),
        _ => Settings::load(&sources),
    };
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("call-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
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
        Command::HashPin { pin, backends } => hash_pin(&settings, pin, &backends),
        Command::Healthcheck { path } => healthcheck(&settings, &path),
        Command::Serve => serve(settings),
    }
}

fn hash_pin(settings: &Settings, pin: Option<String>, backends: &[String]) -> ExitCode {
    let pin = match pin {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() {
                eprintln!("call-proxy: no PIN given");
                return ExitCode::from(2);
            }
            line
        }
    };
    let pin = pin.trim();
    if pin.is_empty()
        || !pin
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#')
    {
        eprintln!("call-proxy: a PIN is the keypad digits a caller types (0-9, * and #)");
        return ExitCode::from(2);
    }
    if let Some(unknown) = backends
        .iter()
        .find(|b| !settings.backends.table.contains_key(*b))
    {
        eprintln!("call-proxy: no backend `{unknown}` in backends.table");
        return ExitCode::from(2);
    }
    if settings.production && pin.len() < 6 {
        eprintln!("call-proxy: warning: a PIN of {} digits is guessed within a few thousand tries; use 6 or more in production (the gate's limits slow guessing, they cannot stop it across many calls)", pin.len());
    }
    if settings.gate.pin_key.len() < 16 {
        eprintln!("call-proxy: gate.pin_key is not set (16 characters or more)");
        return ExitCode::from(2);
    }
    println!("# under [gate.pins]");
    println!(
        "{}",
        call_proxy::gate::pins::directory_line(settings.gate.pin_key.expose(), pin, backends)
    );
    ExitCode::SUCCESS
}

fn healthcheck(settings: &Settings, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let limit = std::time::Duration::from_secs(3);
    let addr = match settings.listen_addr() {
        // Listening on every interface: ask over loopback.
        Ok(a) if a.ip().is_unspecified() => {
            let ip = match a.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            SocketAddr::new(ip, a.port())
        }
        Ok(a) => a,
        Err(e) => {
            eprintln!("call-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let asked = (|| {
        let mut tcp = TcpStream::connect_timeout(&addr, limit)?;
        tcp.set_read_timeout(Some(limit))?;
        tcp.set_write_timeout(Some(limit))?;
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let n = tcp.read(&mut head)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    })();
    match asked {
        Ok(head) if head.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(head) => {
            eprintln!(
                "call-proxy: {addr}{path} answered {}",
                head.lines().next().unwrap_or("nothing")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("call-proxy: cannot ask {addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("call-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logs = match call_proxy::logging::init(&settings.log, runtime.handle()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("call-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // Installed before the socket is bound: from the first moment a client can reach the
        // service, SIGTERM means a drain, never the default abrupt exit.
        let signals = match shutdown_signals() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("call-proxy: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
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
        match call_proxy::run(listener, settings, signals).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // The spans of the last calls go out while the runtime that sends them still runs.
    logs.finish();
    code
}

/// Each SIGTERM or SIGINT, with both handlers installed now (not when first polled): the
/// first drains, the second ends what is left.
#[cfg(unix)]
fn shutdown_signals() -> std::io::Result<impl futures_util::Stream<Item = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate())?;
    let interrupt = signal(SignalKind::interrupt())?;
    Ok(futures_util::stream::unfold(
        (term, interrupt),
        |(mut term, mut interrupt)| async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            Some(((), (term, interrupt)))
        },
    ))
}

#[cfg(not(unix))]
fn shutdown_signals() -> std::io::Result<impl futures_util::Stream<Item = ()> + Send> {
    Ok(futures_util::stream::unfold((), |()| async {
        let _ = tokio::signal::ctrl_c().await;
        Some(((), ()))
    }))
}
