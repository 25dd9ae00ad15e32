//! Test harness: the real service on port 0, real WebSocket backends, a client that plays
//! Twilio's part of a media stream, a real `redis-server`, and the binary as a process. One
//! file per fixture; this one holds the settings every test starts from.
// Each test crate uses a part of the harness; the rest is unused there, not dead.
#![allow(dead_code, unused_imports)]

mod backend;
pub mod fake_twilio;
mod process;
mod proxy;
mod redis;
mod speaker;
mod tls;
mod twilio;

pub use backend::*;
pub use process::*;
pub use proxy::*;
pub use redis::*;
pub use speaker::*;
pub use tls::*;
pub use twilio::*;

use std::time::Duration;

use call_proxy::config::{BackendSpec, Settings, WireFormat};

pub const WAIT: Duration = Duration::from_secs(10);

/// Settings for tests: no default backend, quick timeouts, the given backends in the table.
pub fn settings(backends: &[(&str, &str, WireFormat)]) -> Settings {
    let mut s = Settings::defaults();
    s.backends.default.clear();
    s.backends.table.clear();
    s.gate.pins.clear();
    // In memory unless a test asks for the journal or Redis.
    s.store.path.clear();
    for (id, url, format) in backends {
        s.backends.table.insert(
            id.to_string(),
            BackendSpec {
                url: url.to_string(),
                format: *format,
                queue_frames: None,
                enabled: true,
                ca_file: String::new(),
                headers: Default::default(),
                sample_rate: None,
                speaks: false,
            },
        );
    }
    s.backends.connect_timeout_ms = 1000;
    s.backends.reconnect_window_ms = 5000;
    s.server.shutdown_timeout_ms = 3000;
    s.security.api_key = "test-key".into();
    // The operator tools the tests use (POST /blocked-callers/{id}); a test of the switch
    // itself turns it off.
    s.security.enable_debug_routes = true;
    s.validate().expect("test settings are valid");
    s
}

/// Adds a PIN to the directory, as `call-proxy hash-pin` would.
pub fn add_pin(s: &mut Settings, pin: &str, backends: &[&str]) {
    let hash = call_proxy::gate::pins::hash_pin(s.gate.pin_key.expose(), pin);
    s.gate
        .pins
        .insert(hash, backends.iter().map(|b| b.to_string()).collect());
    s.validate().expect("valid PIN entry");
}

/// Reads one metric sample (`name{labels} value`) from the exposition text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
