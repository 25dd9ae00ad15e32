//! Tracing set-up (human or JSON, `RUST_LOG`-style filters) and caller-id masking.

use std::borrow::Cow;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// What must outlive serving: the OTLP exporter, whose last batch is sent at exit.
#[must_use = "dropping the guard loses the spans still batched; call `finish` at exit"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    exporter: Option<crate::otlp::Exporter>,
}

impl Guard {
    /// Sends the spans still batched (the last calls of a drain), within the export timeout.
    pub fn finish(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            exporter.shutdown();
        }
    }
}

/// Installs the global subscriber: logs to stderr, human or JSON, `RUST_LOG` winning over
/// `log.filter`; and, with `log.otlp.endpoint` set, the call spans to the collector, sent
/// through `runtime`.
pub fn init(settings: &LogSettings, runtime: &tokio::runtime::Handle) -> Result<Guard, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if settings.otlp.endpoint.is_empty() {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let _ = match settings.format {
            LogFormat::Human => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
        return Ok(Guard {
            #[cfg(feature = "otlp")]
            exporter: None,
        });
    }
    with_export(settings, filter, runtime)
}

/// Logs filtered as configured beside the exporter, which has its own filter: the log filter
/// never decides which spans an operator's tracing tool gets.
#[cfg(feature = "otlp")]
fn with_export(
    settings: &LogSettings,
    filter: EnvFilter,
    runtime: &tokio::runtime::Handle,
) -> Result<Guard, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let exporter = crate::otlp::Exporter::new(&settings.otlp, runtime.clone())?;
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match settings.format {
        LogFormat::Human => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(exporter.layer())
        .try_init();
    Ok(Guard {
        exporter: Some(exporter),
    })
}

#[cfg(not(feature = "otlp"))]
fn with_export(_: &LogSettings, _: EnvFilter, _: &tokio::runtime::Handle) -> Result<Guard, String> {
    Err(
        "log.otlp.endpoint: this build has no OTLP export (built without the `otlp` feature)"
            .into(),
    )
}

/// Longest attacker-chosen text a log line carries.
const MAX_LOGGED_CHARS: usize = 128;

/// Text someone outside chose (a caller id, a stream parameter, a backend name), as a log
/// line may show it: control characters and the invisible ones that reorder text are written
/// as escapes, so no value can end a line, forge another, or drive a terminal; long values are
/// cut short.
#[derive(Debug, Clone)]
pub struct Escaped<'a>(Cow<'a, str>);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_LOGGED_CHARS {
                return f.write_str("...");
            }
            if needs_escape(c) {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Escapes text for a log line (see [`Escaped`]).
pub fn escape(text: &str) -> Escaped<'_> {
    Escaped(Cow::Borrowed(text))
}

/// A caller id as logs show it: `+155***67` when masking (the first four characters and the
/// last two), whole otherwise; escaped either way.
pub fn mask_caller(caller: &str, mask: bool) -> Escaped<'_> {
    if !mask {
        return escape(caller);
    }
    let chars: Vec<char> = caller.chars().collect();
    if chars.len() <= 6 {
        return Escaped(Cow::Owned("*".repeat(chars.len())));
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    Escaped(Cow::Owned(format!("{head}***{tail}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_only_the_ends() {
        assert_eq!(
            mask_caller("+15551234567", false).to_string(),
            "+15551234567"
        );
        assert_eq!(mask_caller("+15551234567", true).to_string(), "+155***67");
        assert_eq!(mask_caller("12345", true).to_string(), "*****");
    }

    #[test]
    fn nothing_chosen_outside_can_forge_a_line_or_drive_a_terminal() {
        let forged = "+1555\n2026-12-02T00:00:00Z  INFO call-proxy: PIN accepted\x1b[2J\u{202e}";
        for shown in [
            escape(forged).to_string(),
            mask_caller(forged, true).to_string(),
        ] {
            assert!(!shown.chars().any(needs_escape), "{shown:?}");
        }
        let shown = escape(forged).to_string();
        assert!(
            shown.contains("\\u{a}") && shown.contains("\\u{1b}") && shown.contains("\\u{202e}"),
            "{shown}"
        );
        let long = "9".repeat(10_000);
        assert_eq!(escape(&long).to_string().len(), MAX_LOGGED_CHARS + 3);
    }
}
