//! Tracing set-up (human or JSON, `RUST_LOG`-style filters) and caller-id masking.

use std::borrow::Cow;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.filter`.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A caller id as logs show it: `+1555***1234` when masking, whole otherwise.
pub fn mask_caller(caller: &str, mask: bool) -> Cow<'_, str> {
    if !mask {
        return Cow::Borrowed(caller);
    }
    let chars: Vec<char> = caller.chars().collect();
    if chars.len() <= 6 {
        return Cow::Owned("*".repeat(chars.len()));
    }
    let head: String = chars[..chars.len().min(5) - 1].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    Cow::Owned(format!("{head}***{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_only_the_ends() {
        assert_eq!(mask_caller("+15551234567", false), "+15551234567");
        assert_eq!(mask_caller("+15551234567", true), "+155***67");
        assert_eq!(mask_caller("12345", true), "*****");
    }
}
