//! Checking settings before anything serves: every number in a range that means something,
//! every reference (backend ids, PIN hashes, URLs) resolved, every secret production needs
//! present. A failure names the key.

use std::collections::BTreeMap;

use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use super::{
    invalid, is_valid_backend_id, load_ca_file, parse_backend_url, ConfigError, PinProviderKind,
    Secret, Settings, StoreKind, WireFormat, MAX_TTL_SECS, PCM16_RATES,
};

/// The longest any `_ms` duration may be: a day.
const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

/// Every problem found, each naming its key: a config is checked whole, so an operator fixes
/// it in one pass rather than one error per start.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<ConfigError>);

impl Problems {
    /// Adds a problem; a key already found wrong keeps its first problem (a value out of
    /// range is not also reported by each check that builds on it).
    fn push(&mut self, problem: ConfigError) {
        let key = |e: &ConfigError| match e {
            ConfigError::Invalid { key, .. } => Some(key.clone()),
            _ => None,
        };
        if let Some(k) = key(&problem) {
            if self.0.iter().any(|e| key(e).as_ref() == Some(&k)) {
                return;
            }
        }
        self.0.push(problem);
    }

    /// Nothing found: Ok; one problem: that one; more: all of them.
    pub(super) fn into_result(mut self) -> Result<(), ConfigError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            _ => Err(ConfigError::Several(self.0)),
        }
    }
}

impl Settings {
    /// Checks everything a running service would trip over later; reports every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.find_problems(&mut problems);
        problems.into_result()
    }

    /// Adds every problem these settings have to `p`.
    pub(super) fn find_problems(&self, p: &mut Problems) {
        if let Err(e) = self.listen_addr() {
            p.push(e);
        }
        self.validate_ranges(p);
        if self.store.execution_ttl_ms < 3 {
            p.push(invalid("store.execution_ttl_ms", "must be at least 3"));
        }
        if self.store.kind == StoreKind::Redis {
            if !self.store.redis_url.starts_with("redis://") {
                p.push(invalid(
                    "store.redis_url",
                    "must be a redis:// URL (REDIS_HOST=host[:port] also works)",
                ));
            }
            if self.store.key_prefix.is_empty()
                || self.store.key_prefix.contains(['*', '?', '[', ' '])
            {
                p.push(invalid(
                    "store.key_prefix",
                    "must be non-empty, without spaces or glob characters",
                ));
            }
        }
        for (id, spec) in &self.backends.table {
            let key = format!("backends.table.{id}");
            if !is_valid_backend_id(id) {
                p.push(invalid(
                    &key,
                    "backend ids are lowercase letters, digits, '-' and '_'",
                ));
            }
            if !spec.enabled {
                continue;
            }
            if let Err(m) = parse_backend_url(&spec.url) {
                p.push(invalid(format!("{key}.url"), m));
            }
            if spec.queue_frames == Some(0) {
                p.push(invalid(format!("{key}.queue_frames"), "must be at least 1"));
            }
            if let Some(rate) = spec.sample_rate {
                if spec.format != WireFormat::Pcm16 {
                    p.push(invalid(
                        format!("{key}.sample_rate"),
                        "only a pcm16 backend has a sample rate",
                    ));
                } else if !PCM16_RATES.contains(&rate) {
                    p.push(invalid(
                        format!("{key}.sample_rate"),
                        format!("must be 8000, 16000 or 24000, got {rate}"),
                    ));
                }
            }
            if !spec.ca_file.is_empty() {
                if !spec.url.starts_with("wss://") {
                    p.push(invalid(
                        format!("{key}.ca_file"),
                        "only a wss:// backend has certificates to check",
                    ));
                } else if let Err(m) = load_ca_file(&spec.ca_file) {
                    p.push(invalid(format!("{key}.ca_file"), m));
                }
            }
            check_headers(&format!("{key}.headers"), &spec.headers, p);
        }
        for (i, id) in self.backends.default.iter().enumerate() {
            match self.backends.table.get(id) {
                Some(spec) if spec.enabled => {}
                Some(_) => p.push(invalid(
                    format!("backends.default[{i}]"),
                    format!("backend `{id}` is disabled"),
                )),
                None => p.push(invalid(
                    format!("backends.default[{i}]"),
                    format!("no backend `{id}` in backends.table"),
                )),
            }
        }
        self.validate_gate(p);
        self.validate_otlp(p);
        self.validate_handoff(p);
        let capture = &self.media.capture;
        if !(0.0..=1.0).contains(&capture.share) {
            p.push(invalid(
                "media.capture.share",
                format!("must be from 0 to 1, got {}", capture.share),
            ));
        }
        if capture.enabled && capture.dir.trim().is_empty() {
            p.push(invalid(
                "media.capture.dir",
                "required when capture is enabled",
            ));
        }
        for (i, id) in capture.backends.iter().enumerate() {
            if !self.backends.table.contains_key(id) {
                p.push(invalid(
                    format!("media.capture.backends[{i}]"),
                    format!("no backend `{id}` in backends.table"),
                ));
            }
        }
        for (i, host) in self.backends.hosts_allowlist.iter().enumerate() {
            if host.trim().is_empty() || host.contains('/') {
                p.push(invalid(
                    format!("backends.hosts_allowlist[{i}]"),
                    "must be a bare host name or IP address",
                ));
            }
        }
    }

    /// A live hand-off needs the REST API's account and credentials, and the public URL the
    /// new stream is started on.
    fn validate_handoff(&self, p: &mut Problems) {
        let t = &self.twilio;
        let base = &t.api_base_url;
        if !is_http_url(base) {
            p.push(invalid(
                "twilio.api_base_url",
                "must be an https:// URL (Twilio's is https://api.twilio.com)",
            ));
        }
        if t.api_key_sid.is_empty() != t.api_key_secret.is_empty() {
            p.push(invalid(
                "twilio.api_key_secret",
                "an API key needs both twilio.api_key_sid and twilio.api_key_secret",
            ));
        }
        if !self.server.handoff {
            return;
        }
        if !(t.account_sid.starts_with("AC") && t.account_sid.len() == 34) {
            p.push(invalid(
                "twilio.account_sid",
                "server.handoff needs the account sid (AC followed by 32 characters)",
            ));
        }
        if t.api_key_sid.is_empty() && t.auth_token.is_empty() {
            p.push(invalid(
                "twilio.auth_token",
                "server.handoff needs REST credentials: twilio.api_key_sid and api_key_secret, or twilio.auth_token",
            ));
        }
        if t.public_url.is_empty() {
            p.push(invalid(
                "twilio.public_url",
                "server.handoff starts each new stream on the public URL: set it (https://...)",
            ));
        }
        // The new stream reaches another instance: the two meet only in a shared store.
        if self.store.kind != StoreKind::Redis {
            p.push(invalid(
                "store.kind",
                "server.handoff moves calls between instances, which meet in a shared store: use redis",
            ));
        }
    }

    /// The OTLP export: a URL the exporter can send to, in a build that has it.
    fn validate_otlp(&self, p: &mut Problems) {
        let otlp = &self.log.otlp;
        check_headers("log.otlp.headers", &otlp.headers, p);
        if otlp.endpoint.is_empty() {
            return;
        }
        if !cfg!(feature = "otlp") {
            p.push(invalid(
                "log.otlp.endpoint",
                "this build has no OTLP export (it was built without the `otlp` feature)",
            ));
        } else if !is_http_url(&otlp.endpoint) {
            p.push(invalid(
                "log.otlp.endpoint",
                "must be an http:// or https:// URL, e.g. http://127.0.0.1:4318/v1/traces",
            ));
        }
        if otlp.service_name.trim().is_empty() {
            p.push(invalid("log.otlp.service_name", "must not be empty"));
        }
    }

    /// Every number within a range that means something, so no arithmetic on it overflows and
    /// no "forever" hides behind a wrapped value.
    fn validate_ranges(&self, p: &mut Problems) {
        let (m, b, g) = (&self.media, &self.backends, &self.gate);
        let durations_ms = [
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
            ("server.drain_accept_ms", self.server.drain_accept_ms),
            ("server.drain_timeout_ms", self.server.drain_timeout_ms),
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("media.start_timeout_ms", m.start_timeout_ms),
            ("media.idle_timeout_ms", m.idle_timeout_ms),
            (
                "media.all_backends_gone_grace_ms",
                m.all_backends_gone_grace_ms,
            ),
            ("backends.connect_timeout_ms", b.connect_timeout_ms),
            ("backends.ping_interval_ms", b.ping_interval_ms),
            ("backends.pong_timeout_ms", b.pong_timeout_ms),
            ("backends.write_timeout_ms", b.write_timeout_ms),
            ("backends.reconnect_window_ms", b.reconnect_window_ms),
            ("backends.drain_timeout_ms", b.drain_timeout_ms),
            ("store.timeout_ms", self.store.timeout_ms),
            ("store.execution_ttl_ms", self.store.execution_ttl_ms),
            ("gate.pin_service_timeout_ms", g.pin_service_timeout_ms),
            ("log.otlp.timeout_ms", self.log.otlp.timeout_ms),
            ("server.handoff_timeout_ms", self.server.handoff_timeout_ms),
        ];
        for (key, value) in durations_ms {
            if !(1..=MAX_DURATION_MS).contains(&value) {
                p.push(invalid(
                    key,
                    format!("must be from 1 to {MAX_DURATION_MS} (a day), got {value}"),
                ));
            }
        }
        let ttls = [
            ("gate.attempts_ttl_secs", g.attempts_ttl_secs, 1),
            ("gate.block_ttl_secs", g.block_ttl_secs, 0),
            ("gate.pin_failure_window_secs", g.pin_failure_window_secs, 1),
            (
                "security.route_token_ttl_secs",
                self.security.route_token_ttl_secs,
                1,
            ),
        ];
        for (key, value, min) in ttls {
            if !(min..=MAX_TTL_SECS).contains(&value) {
                p.push(invalid(
                    key,
                    format!("must be from {min} to {MAX_TTL_SECS} (ten years), got {value}"),
                ));
            }
        }
        let counts = [
            (
                "server.max_connections",
                self.server.max_connections as u64,
                1,
                1_000_000,
            ),
            (
                "server.trusted_proxy_hops",
                self.server.trusted_proxy_hops as u64,
                1,
                16,
            ),
            ("media.max_calls", m.max_calls as u64, 1, 1_000_000),
            (
                "server.max_connections_per_address",
                self.server.max_connections_per_address as u64,
                0,
                1_000_000,
            ),
            (
                "media.max_backends_per_call",
                m.max_backends_per_call as u64,
                1,
                64,
            ),
            ("media.talkback_queue_ms", m.talkback_queue_ms, 20, 600_000),
            (
                "backends.max_unsolicited_messages_per_second",
                u64::from(b.max_unsolicited_messages_per_second),
                1,
                1_000_000,
            ),
            (
                "backends.max_unsolicited_bytes_per_second",
                b.max_unsolicited_bytes_per_second as u64,
                1024,
                1 << 30,
            ),
            (
                "backends.max_speaker_messages_per_second",
                u64::from(b.max_speaker_messages_per_second),
                1,
                1_000_000,
            ),
            (
                "backends.max_speaker_bytes_per_second",
                b.max_speaker_bytes_per_second as u64,
                1024,
                // Also the largest message read from a speaker: a bound on what one may hold.
                64 << 20,
            ),
            (
                "media.max_message_bytes",
                m.max_message_bytes as u64,
                1024,
                16 << 20,
            ),
            ("backends.queue_frames", b.queue_frames as u64, 1, 1_000_000),
            (
                "backends.max_connecting",
                b.max_connecting as u64,
                1,
                100_000,
            ),
            ("backends.queue_bytes", b.queue_bytes as u64, 4096, 1 << 30),
            (
                "backends.reconnect_max_tries",
                u64::from(b.reconnect_max_tries),
                0,
                1000,
            ),
            (
                "gate.max_invalid_attempts",
                g.max_invalid_attempts,
                0,
                1_000_000,
            ),
            (
                "gate.max_pin_attempts_per_call",
                g.max_pin_attempts_per_call,
                0,
                1000,
            ),
            (
                "gate.pin_failure_alarm_per_hour",
                g.pin_failure_alarm_per_hour,
                0,
                1_000_000_000,
            ),
            ("gate.failure_delay_ms", g.failure_delay_ms, 0, 60_000),
            (
                "media.capture.max_bytes",
                m.capture.max_bytes,
                4096,
                1 << 36,
            ),
            (
                "media.capture.retention_secs",
                m.capture.retention_secs,
                60,
                MAX_TTL_SECS,
            ),
            (
                "gate.max_pin_failures_per_ip",
                g.max_pin_failures_per_ip,
                0,
                1_000_000,
            ),
            (
                "twilio.max_body_bytes",
                self.twilio.max_body_bytes as u64,
                256,
                16 << 20,
            ),
        ];
        for (key, value, min, max) in counts {
            if !(min..=max).contains(&value) {
                p.push(invalid(
                    key,
                    format!("must be from {min} to {max}, got {value}"),
                ));
            }
        }
    }

    fn validate_gate(&self, p: &mut Problems) {
        let t = &self.twilio;
        if t.validate_signatures && t.auth_token.is_empty() && t.signing_keys.is_empty() {
            p.push(invalid(
                "twilio.auth_token",
                "required when twilio.validate_signatures is on (set TWILIO_AUTH_TOKEN)",
            ));
        }
        if !t.public_url.is_empty() {
            let ok = (t.public_url.starts_with("https://") || t.public_url.starts_with("http://"))
                && !t.public_url.contains(['?', '#']);
            if !ok {
                p.push(invalid(
                    "twilio.public_url",
                    "must be an http(s):// base URL without query, like https://proxy.example.com",
                ));
            }
        }
        let g = &self.gate;
        match g.pin_provider {
            PinProviderKind::Directory => {
                if !g.pins.is_empty() && g.pin_key.len() < 16 {
                    p.push(invalid(
                        "gate.pin_key",
                        "required (16 characters or more) to check the PINs in gate.pins",
                    ));
                }
            }
            PinProviderKind::Http => {
                let url = &g.pin_service_url;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    p.push(invalid(
                        "gate.pin_service_url",
                        "required as an http(s):// URL when gate.pin_provider = \"http\"",
                    ));
                }
            }
        }
        for (hash, ids) in &g.pins {
            let key = format!("gate.pins.\"{hash}\"");
            let hex = hash.strip_prefix("hmac-sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.push(invalid(
                    &key,
                    "not a PIN hash: use the line `call-proxy hash-pin` prints",
                ));
            }
            for id in ids {
                if !self.backends.table.contains_key(id) {
                    p.push(invalid(
                        &key,
                        format!("no backend `{id}` in backends.table"),
                    ));
                }
            }
        }
        let s = &self.security;
        if self.production {
            if s.api_key.is_empty() {
                p.push(invalid(
                    "security.api_key",
                    "required in production: the operator routes and page (set SERVER_API_KEY or CALL_PROXY__SECURITY__API_KEY)",
                ));
            }
            if t.public_url.is_empty() && !t.trust_forwarded_headers {
                p.push(invalid(
                    "twilio.public_url",
                    "required in production: the https:// address Twilio calls, which signatures are checked against (or set twilio.trust_forwarded_headers behind a proxy you run)",
                ));
            }
        }
        if s.route_token_secret.len() < 16 {
            p.push(invalid(
                "security.route_token_secret",
                "required, 16 characters or more, the same on every instance",
            ));
        }
    }
}

/// An `http://` or `https://` URL that parses as one (the REST API's base, a collector's).
fn is_http_url(text: &str) -> bool {
    (text.starts_with("https://") || text.starts_with("http://"))
        && text
            .parse::<tokio_tungstenite::tungstenite::http::Uri>()
            .is_ok()
}

/// HTTP headers from config (a backend's upgrade, the OTLP export): valid names, and values
/// that are ASCII without control characters. The value may be a secret: what is wrong with it
/// is said, never what it is.
fn check_headers(at: &str, headers: &BTreeMap<String, Secret>, p: &mut Problems) {
    for (name, value) in headers {
        let key = format!("{at}.{name}");
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            p.push(invalid(&key, "not a valid HTTP header name"));
        }
        // `HeaderValue` takes bytes past ASCII (obs-text); a header of ours must not.
        if !value.expose().is_ascii() || HeaderValue::from_str(value.expose()).is_err() {
            p.push(invalid(
                key,
                "the value is not a valid HTTP header value (control characters or non-ASCII)",
            ));
        }
    }
}
