//! Settings: the layers (embedded defaults, run mode, file, environment), the original's
//! environment variables, and the validation that stops a bad config before it serves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, File, FileFormat};
use serde::Deserialize;

/// The defaults compiled into the binary, so a fresh clone runs with no set-up.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// The production layer, also compiled in so `RUN_MODE=production` works from any directory.
pub const PRODUCTION_TOML: &str = include_str!("../config/production.toml");

/// A config that cannot be served, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("config: RUN_MODE={mode}: no file config/{mode}.toml")]
    UnknownMode { mode: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub media: MediaSettings,
    pub backends: BackendSettings,
    pub store: StoreSettings,
    pub security: SecuritySettings,
    pub twilio: TwilioSettings,
    pub gate: GateSettings,
    pub rate_limits: RateLimitSettings,
}

#[derive(Clone, Deserialize)]
pub struct TwilioSettings {
    pub validate_signatures: bool,
    pub auth_token: String,
    pub secondary_auth_token: String,
    pub public_url: String,
    pub trust_forwarded_headers: bool,
    pub max_body_bytes: usize,
    /// HMAC-SHA256 signing keys by id.
    #[serde(default)]
    pub signing_keys: BTreeMap<String, String>,
}

impl std::fmt::Debug for TwilioSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioSettings")
            .field("validate_signatures", &self.validate_signatures)
            .field("auth_token", &redacted(&self.auth_token))
            .field(
                "secondary_auth_token",
                &redacted(&self.secondary_auth_token),
            )
            .field("public_url", &self.public_url)
            .field("trust_forwarded_headers", &self.trust_forwarded_headers)
            .field("max_body_bytes", &self.max_body_bytes)
            .field(
                "signing_keys",
                &self.signing_keys.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<set>"
    }
}

#[derive(Clone, Deserialize)]
pub struct GateSettings {
    pub max_invalid_attempts: u64,
    /// Wrong PINs one client address may send in a window, whatever caller ids it uses;
    /// 0 switches the limit off.
    pub max_pin_failures_per_ip: u64,
    pub pin_failure_window_secs: u64,
    pub attempts_ttl_secs: u64,
    pub block_ttl_secs: u64,
    pub pin_provider: PinProviderKind,
    pub pin_key: String,
    pub pin_service_url: String,
    pub pin_service_timeout_ms: u64,
    /// PIN hash (`hmac-sha256:<hex>`) -> backend ids.
    #[serde(default)]
    pub pins: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for GateSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateSettings")
            .field("max_invalid_attempts", &self.max_invalid_attempts)
            .field("max_pin_failures_per_ip", &self.max_pin_failures_per_ip)
            .field("pin_failure_window_secs", &self.pin_failure_window_secs)
            .field("attempts_ttl_secs", &self.attempts_ttl_secs)
            .field("block_ttl_secs", &self.block_ttl_secs)
            .field("pin_provider", &self.pin_provider)
            .field("pin_key", &redacted(&self.pin_key))
            .field("pin_service_url", &self.pin_service_url)
            .field("pins", &self.pins.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PinProviderKind {
    Directory,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub http_per_ip_per_minute: u32,
    pub http_burst: u32,
    pub upgrades_per_ip_per_minute: u32,
    pub upgrades_burst: u32,
    pub pin_per_caller_per_minute: u32,
    pub pin_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub shutdown_timeout_ms: u64,
    /// Request headers must arrive within this; also how long an idle keep-alive lasts.
    pub header_timeout_ms: u64,
    /// A request body must arrive within this (else 408).
    pub body_timeout_ms: u64,
    pub max_connections: usize,
    /// Behind `twilio.trust_forwarded_headers`: how many proxies of yours append to
    /// `X-Forwarded-For`; the client is that many entries from the right.
    pub trusted_proxy_hops: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
    pub mask_callers: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MediaSettings {
    pub max_calls: usize,
    /// A `/media` socket must send `start` within this of the upgrade.
    pub start_timeout_ms: u64,
    pub max_backends_per_call: usize,
    pub idle_timeout_ms: u64,
    pub max_message_bytes: usize,
    pub all_backends_gone_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendSettings {
    pub default: Vec<String>,
    pub queue_frames: usize,
    /// Each link's queue in bytes, control frames and the writer's batch included.
    pub queue_bytes: usize,
    /// A backend that takes nothing for this long is a failed link.
    pub write_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub reconnect_max_tries: u32,
    pub reconnect_window_ms: u64,
    pub drain_timeout_ms: u64,
    pub hosts_allowlist: Vec<String>,
    pub hosts_format: WireFormat,
    #[serde(default)]
    pub table: BTreeMap<String, BackendSpec>,
}

impl BackendSettings {
    /// A backend of the table, unless it is switched off.
    pub fn enabled(&self, id: &str) -> Option<&BackendSpec> {
        self.table.get(id).filter(|b| b.enabled)
    }
}

/// One row of the backend table.
#[derive(Debug, Clone, Deserialize)]
pub struct BackendSpec {
    pub url: String,
    #[serde(default)]
    pub format: WireFormat,
    /// Overrides `backends.queue_frames` for this backend.
    pub queue_frames: Option<usize>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// How a backend wants the call's messages (SPEC section 3).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// Twilio's messages forwarded byte for byte.
    #[default]
    Twilio,
    /// The original's `{"event":"media","media":"<base64>"}` form.
    Compact,
}

impl WireFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WireFormat::Twilio => "twilio",
            WireFormat::Compact => "compact",
        }
    }
}

#[derive(Clone, Deserialize)]
pub struct StoreSettings {
    pub kind: StoreKind,
    pub execution_ttl_ms: u64,
    pub path: String,
    pub redis_url: String,
    pub key_prefix: String,
    pub timeout_ms: u64,
}

impl std::fmt::Debug for StoreSettings {
    // A Redis URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match self.redis_url.split_once('@') {
            Some((_, host)) => format!("redis://<credentials>@{host}"),
            None => self.redis_url.clone(),
        };
        f.debug_struct("StoreSettings")
            .field("kind", &self.kind)
            .field("execution_ttl_ms", &self.execution_ttl_ms)
            .field("path", &self.path)
            .field("redis_url", &url)
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Clone, Deserialize)]
pub struct SecuritySettings {
    pub api_key: String,
    pub metrics_require_api_key: bool,
    pub require_route_token: bool,
    pub route_token_secret: String,
    pub route_token_ttl_secs: u64,
}

impl std::fmt::Debug for SecuritySettings {
    // Secrets never reach a log line, not even through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecuritySettings")
            .field("api_key", &redacted(&self.api_key))
            .field("metrics_require_api_key", &self.metrics_require_api_key)
            .field("require_route_token", &self.require_route_token)
            .field("route_token_secret", &redacted(&self.route_token_secret))
            .field("route_token_ttl_secs", &self.route_token_ttl_secs)
            .finish()
    }
}

/// Where the layers come from; the environment is passed in so tests need not touch the
/// process environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `RUN_MODE`: selects `config/{mode}.toml`.
    pub run_mode: Option<String>,
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// Environment variables (`CALL_PROXY__*` and the original's names).
    pub env: BTreeMap<String, String>,
}

impl Sources {
    /// The sources a process sees: `RUN_MODE` and the whole environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Sources {
            run_mode: env.get("RUN_MODE").filter(|m| !m.is_empty()).cloned(),
            file,
            env,
        }
    }
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["backends.default", "backends.hosts_allowlist"];

/// The fields of a `backends.table.<id>` row.
const BACKEND_FIELDS: &[&str] = &["url", "format", "queue_frames", "enabled"];

/// The longest TTL any setting or stored record may have: ten years. Longer ones are refused
/// at start-up and held to this when read back from storage, so nothing overflows.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// The longest any `_ms` duration may be: a day.
const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

/// A key no setting has: refused, naming the nearest one that exists, so a typo can never
/// leave a security setting silently at its default.
fn unknown_key(key: &str) -> ConfigError {
    let (parent, name) = key.rsplit_once('.').unwrap_or(("", key));
    let siblings: Vec<String> =
        if parent.starts_with("backends.table.") && !parent[15..].contains('.') {
            BACKEND_FIELDS.iter().map(|f| f.to_string()).collect()
        } else {
            known_keys()
                .into_iter()
                .filter_map(|k| match k.rsplit_once('.') {
                    Some((p, n)) if p == parent => Some(n.to_string()),
                    None if parent.is_empty() => Some(k),
                    _ => None,
                })
                .collect()
        };
    let nearest = siblings
        .iter()
        .map(|s| (strsim::damerau_levenshtein(name, s), s))
        .filter(|(d, s)| *d <= 3.max(s.len() / 4))
        .min();
    let message = match nearest {
        Some((_, s)) if parent.is_empty() => format!("is not a setting; did you mean `{s}`?"),
        Some((_, s)) => format!("is not a setting; did you mean `{parent}.{s}`?"),
        None => "is not a setting".to_string(),
    };
    invalid(key, message)
}

/// Every key of the embedded defaults, tables included, as dotted paths.
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&path, v, out);
                out.push(path);
            }
        }
    }
    let defaults: serde_json::Value = Config::builder()
        .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
        .build()
        .and_then(Config::try_deserialize)
        .unwrap_or_default();
    let mut out = Vec::new();
    walk("", &defaults, &mut out);
    out
}

/// The original Node.js service's environment variables, mapped onto our keys.
const LEGACY_ENV: &[(&str, &str)] = &[
    ("AUDIO_PROXY_PORT", "server.port"),
    ("SERVER_API_KEY", "security.api_key"),
    ("TWILIO_AUTH_TOKEN", "twilio.auth_token"),
    ("VALIDATE_EXTERNAL_CALLS", "twilio.validate_signatures"),
    ("INVALID_AUTH_ATTEMPTS_ALLOWED", "gate.max_invalid_attempts"),
    (
        "INVALID_AUTH_ATTEMPTS_CACHE_TTL_SECONDS",
        "gate.attempts_ttl_secs",
    ),
];

impl Settings {
    /// Builds the layered settings and validates them.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));

        if let Some(mode) = &sources.run_mode {
            let on_disk = Path::new("config").join(format!("{mode}.toml"));
            builder = if on_disk.is_file() {
                builder.add_source(File::from(on_disk).format(FileFormat::Toml))
            } else if mode == "production" {
                builder.add_source(File::from_str(PRODUCTION_TOML, FileFormat::Toml))
            } else if mode == "default" {
                builder
            } else {
                return Err(ConfigError::UnknownMode { mode: mode.clone() });
            };
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(File::from(file.clone()).format(FileFormat::Toml));
        }
        // `CALL_PROXY__SECTION__KEY`, each value kept the string it is: the `config` crate's
        // own environment source guesses types, which turned an API key `000123` into 123
        // and a long numeric token into a float. Fields that are numbers parse their string.
        for (var, value) in &sources.env {
            let Some(path) = var.strip_prefix("CALL_PROXY__") else {
                continue;
            };
            let key = path.to_ascii_lowercase().replace("__", ".");
            builder = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .collect();
                builder.set_override(key, items)?
            } else {
                builder.set_override(key, value.as_str())?
            };
        }
        for (var, key) in LEGACY_ENV {
            if let Some(value) = sources.env.get(*var).filter(|v| !v.is_empty()) {
                builder = builder.set_override(*key, value.as_str())?;
            }
        }
        // The original's switch to Redis: REMOTE_CACHE_ENABLED=true with REDIS_HOST=host[:port].
        let remote = sources.env.get("REMOTE_CACHE_ENABLED").is_some_and(|v| {
            matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")
        });
        if remote {
            builder = builder.set_override("store.kind", "redis")?;
        }
        if let Some(host) = sources
            .env
            .get("REDIS_HOST")
            .filter(|h| !h.trim().is_empty())
        {
            let host = host.trim();
            let url = if host.starts_with("redis://") || host.starts_with("rediss://") {
                host.to_string()
            } else if host.contains(':') {
                format!("redis://{host}")
            } else {
                format!("redis://{host}:6379")
            };
            builder = builder.set_override("store.redis_url", url)?;
        }

        let mut unknown = Vec::new();
        let mut settings: Settings =
            serde_ignored::deserialize(builder.build()?, |path| unknown.push(path.to_string()))?;
        if let Some(key) = unknown.first() {
            return Err(unknown_key(key));
        }
        // `CALL_PROXY__BACKENDS__DEFAULT=` (set to nothing) means an empty list.
        settings.backends.default.retain(|id| !id.trim().is_empty());
        settings
            .backends
            .hosts_allowlist
            .retain(|h| !h.trim().is_empty());
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults alone: what tests start from.
    pub fn defaults() -> Settings {
        Settings::load(&Sources::default()).expect("embedded defaults are valid")
    }

    /// Checks everything a running service would trip over later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.validate_ranges()?;
        if self.media.max_calls == 0 {
            return Err(invalid("media.max_calls", "must be at least 1"));
        }
        if self.media.idle_timeout_ms == 0 {
            return Err(invalid("media.idle_timeout_ms", "must be at least 1"));
        }
        if self.media.max_message_bytes < 1024 {
            return Err(invalid(
                "media.max_message_bytes",
                "must be at least 1024 (a Twilio media message is about 300 bytes)",
            ));
        }
        if self.backends.queue_frames == 0 {
            return Err(invalid("backends.queue_frames", "must be at least 1"));
        }
        if self.backends.connect_timeout_ms == 0 {
            return Err(invalid("backends.connect_timeout_ms", "must be at least 1"));
        }
        if self.store.execution_ttl_ms < 3 {
            return Err(invalid("store.execution_ttl_ms", "must be at least 3"));
        }
        if self.store.kind == StoreKind::Redis {
            if !self.store.redis_url.starts_with("redis://") {
                return Err(invalid(
                    "store.redis_url",
                    "must be a redis:// URL (REDIS_HOST=host[:port] also works)",
                ));
            }
            if self.store.key_prefix.is_empty()
                || self.store.key_prefix.contains(['*', '?', '[', ' '])
            {
                return Err(invalid(
                    "store.key_prefix",
                    "must be non-empty, without spaces or glob characters",
                ));
            }
        }
        if self.store.timeout_ms == 0 {
            return Err(invalid("store.timeout_ms", "must be at least 1"));
        }
        for (id, spec) in &self.backends.table {
            let key = format!("backends.table.{id}");
            if !is_valid_backend_id(id) {
                return Err(invalid(
                    key,
                    "backend ids are lowercase letters, digits, '-' and '_'",
                ));
            }
            if !spec.enabled {
                continue;
            }
            parse_backend_url(&spec.url).map_err(|m| invalid(format!("{key}.url"), m))?;
            if spec.queue_frames == Some(0) {
                return Err(invalid(format!("{key}.queue_frames"), "must be at least 1"));
            }
        }
        for (i, id) in self.backends.default.iter().enumerate() {
            match self.backends.table.get(id) {
                Some(spec) if spec.enabled => {}
                Some(_) => {
                    return Err(invalid(
                        format!("backends.default[{i}]"),
                        format!("backend `{id}` is disabled"),
                    ))
                }
                None => {
                    return Err(invalid(
                        format!("backends.default[{i}]"),
                        format!("no backend `{id}` in backends.table"),
                    ))
                }
            }
        }
        self.validate_gate()?;
        for (i, host) in self.backends.hosts_allowlist.iter().enumerate() {
            if host.trim().is_empty() || host.contains('/') {
                return Err(invalid(
                    format!("backends.hosts_allowlist[{i}]"),
                    "must be a bare host name or IP address",
                ));
            }
        }
        Ok(())
    }

    /// Every number within a range that means something, so no arithmetic on it overflows and
    /// no "forever" hides behind a wrapped value.
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        let (m, b, g) = (&self.media, &self.backends, &self.gate);
        let durations_ms = [
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("media.start_timeout_ms", m.start_timeout_ms),
            ("media.idle_timeout_ms", m.idle_timeout_ms),
            (
                "media.all_backends_gone_grace_ms",
                m.all_backends_gone_grace_ms,
            ),
            ("backends.connect_timeout_ms", b.connect_timeout_ms),
            ("backends.write_timeout_ms", b.write_timeout_ms),
            ("backends.reconnect_window_ms", b.reconnect_window_ms),
            ("backends.drain_timeout_ms", b.drain_timeout_ms),
            ("store.timeout_ms", self.store.timeout_ms),
            ("store.execution_ttl_ms", self.store.execution_ttl_ms),
            ("gate.pin_service_timeout_ms", g.pin_service_timeout_ms),
        ];
        for (key, value) in durations_ms {
            if !(1..=MAX_DURATION_MS).contains(&value) {
                return Err(invalid(
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
                return Err(invalid(
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
                "media.max_backends_per_call",
                m.max_backends_per_call as u64,
                1,
                64,
            ),
            (
                "media.max_message_bytes",
                m.max_message_bytes as u64,
                1024,
                16 << 20,
            ),
            ("backends.queue_frames", b.queue_frames as u64, 1, 1_000_000),
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
                return Err(invalid(
                    key,
                    format!("must be from {min} to {max}, got {value}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_gate(&self) -> Result<(), ConfigError> {
        let t = &self.twilio;
        if t.validate_signatures && t.auth_token.is_empty() && t.signing_keys.is_empty() {
            return Err(invalid(
                "twilio.auth_token",
                "required when twilio.validate_signatures is on (set TWILIO_AUTH_TOKEN)",
            ));
        }
        if !t.public_url.is_empty() {
            let ok = (t.public_url.starts_with("https://") || t.public_url.starts_with("http://"))
                && !t.public_url.contains(['?', '#']);
            if !ok {
                return Err(invalid(
                    "twilio.public_url",
                    "must be an http(s):// base URL without query, like https://proxy.example.com",
                ));
            }
        }
        if t.max_body_bytes < 256 {
            return Err(invalid("twilio.max_body_bytes", "must be at least 256"));
        }
        let g = &self.gate;
        match g.pin_provider {
            PinProviderKind::Directory => {
                if !g.pins.is_empty() && g.pin_key.len() < 16 {
                    return Err(invalid(
                        "gate.pin_key",
                        "required (16 characters or more) to check the PINs in gate.pins",
                    ));
                }
            }
            PinProviderKind::Http => {
                let url = &g.pin_service_url;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(
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
                return Err(invalid(
                    key,
                    "not a PIN hash: use the line `call-proxy hash-pin` prints",
                ));
            }
            for id in ids {
                if !self.backends.table.contains_key(id) {
                    return Err(invalid(key, format!("no backend `{id}` in backends.table")));
                }
            }
        }
        let s = &self.security;
        if s.route_token_secret.len() < 16 {
            return Err(invalid(
                "security.route_token_secret",
                "required, 16 characters or more, the same on every instance",
            ));
        }
        if s.route_token_ttl_secs == 0 {
            return Err(invalid(
                "security.route_token_ttl_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let host = self
            .server
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().map_err(|_| {
            invalid(
                "server.host",
                format!("`{}` is not an IP address", self.server.host),
            )
        })?;
        Ok(SocketAddr::new(ip, self.server.port))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.media.idle_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.server.body_timeout_ms)
    }
}

pub fn is_valid_backend_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Accepts `ws://host[:port]/path`; answers why not otherwise.
pub fn parse_backend_url(url: &str) -> Result<(), String> {
    let rest = if let Some(rest) = url.strip_prefix("ws://") {
        rest
    } else if url.starts_with("wss://") {
        return Err("wss:// backends are not supported yet: use ws:// on a private network".into());
    } else {
        return Err(format!("`{url}` is not a ws:// URL"));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{url}` has no host"));
    }
    tokio_tungstenite::tungstenite::http::Uri::try_from(url)
        .map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn embedded_defaults_serve_the_local_demo() {
        let s = Settings::defaults();
        assert_eq!(s.listen_addr().unwrap().to_string(), "0.0.0.0:8999");
        assert_eq!(s.backends.default, vec!["speaker".to_string()]);
        assert_eq!(s.backends.queue_frames, 250);
        assert_eq!(
            s.backends.enabled("speaker").unwrap().format,
            WireFormat::Compact
        );
    }

    #[test]
    fn environment_overrides_files_and_the_originals_names_work() {
        let s = Settings::load(&with_env(&[
            ("CALL_PROXY__MEDIA__MAX_CALLS", "7"),
            (
                "CALL_PROXY__BACKENDS__HOSTS_ALLOWLIST",
                "10.0.0.1,backend.internal",
            ),
            ("AUDIO_PROXY_PORT", "9100"),
            ("SERVER_API_KEY", "k1"),
            ("INVALID_AUTH_ATTEMPTS_ALLOWED", "3"),
            ("INVALID_AUTH_ATTEMPTS_CACHE_TTL_SECONDS", "60"),
            ("VALIDATE_EXTERNAL_CALLS", "true"),
            ("TWILIO_AUTH_TOKEN", "tok"),
        ]))
        .unwrap();
        assert_eq!(s.gate.max_invalid_attempts, 3);
        assert_eq!(s.store.kind, StoreKind::Memory);
        assert_eq!(s.gate.attempts_ttl_secs, 60);
        assert!(s.twilio.validate_signatures);
        assert_eq!(s.twilio.auth_token, "tok");
        assert_eq!(s.media.max_calls, 7);
        assert_eq!(s.server.port, 9100);
        assert_eq!(s.security.api_key, "k1");
        assert_eq!(
            s.backends.hosts_allowlist,
            vec!["10.0.0.1".to_string(), "backend.internal".to_string()]
        );
    }

    fn production(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(&Sources {
            run_mode: Some("production".into()),
            ..with_env(env)
        })
    }

    const PRODUCTION_SECRETS: &[(&str, &str)] = &[
        ("TWILIO_AUTH_TOKEN", "an-auth-token"),
        ("CALL_PROXY__GATE__PIN_KEY", "a-pin-key-of-some-length"),
        (
            "CALL_PROXY__SECURITY__ROUTE_TOKEN_SECRET",
            "a-route-token-secret",
        ),
    ];

    #[test]
    fn production_requires_its_secrets_and_names_each_missing_one() {
        assert!(production(PRODUCTION_SECRETS).is_ok());
        for (i, key) in [
            (0, "twilio.auth_token"),
            (1, "gate.pin_key"),
            (2, "security.route_token_secret"),
        ] {
            let mut env = PRODUCTION_SECRETS.to_vec();
            env.remove(i);
            let err = production(&env).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn production_mode_allows_no_hosts_and_drops_the_demo_speaker() {
        let s = production(PRODUCTION_SECRETS).unwrap();
        assert!(s.twilio.validate_signatures);
        assert!(s.security.require_route_token);
        assert!(s.backends.hosts_allowlist.is_empty());
        assert!(s.backends.default.is_empty());
        assert!(s.backends.enabled("speaker").is_none());
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("CALL_PROXY__BACKENDS__DEFAULT", "nope")],
                "backends.default[0]",
            ),
            (
                &[("CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL", "http://x/")],
                "backends.table.speaker.url",
            ),
            (
                &[("CALL_PROXY__SERVER__HOST", "example.com")],
                "server.host",
            ),
            (&[("CALL_PROXY__MEDIA__MAX_CALLS", "0")], "media.max_calls"),
            (
                &[("CALL_PROXY__BACKENDS__QUEUE_FRAMES", "0")],
                "backends.queue_frames",
            ),
        ];
        for (env, key) in cases {
            let err = Settings::load(&with_env(env)).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
        let err = Settings::load(&with_env(&[("AUDIO_PROXY_PORT", "eighty")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn an_empty_environment_list_is_an_empty_list() {
        let s = Settings::load(&with_env(&[
            ("CALL_PROXY__BACKENDS__DEFAULT", ""),
            ("CALL_PROXY__BACKENDS__HOSTS_ALLOWLIST", ""),
        ]))
        .unwrap();
        assert!(s.backends.default.is_empty());
        assert!(s.backends.hosts_allowlist.is_empty());
    }

    #[test]
    fn the_originals_redis_switch() {
        let s = Settings::load(&with_env(&[
            ("REMOTE_CACHE_ENABLED", "true"),
            ("REDIS_HOST", "cache.internal"),
        ]))
        .unwrap();
        assert_eq!(s.store.kind, StoreKind::Redis);
        assert_eq!(s.store.redis_url, "redis://cache.internal:6379");
        let s = Settings::load(&with_env(&[("REDIS_HOST", "10.0.0.5:6380")])).unwrap();
        assert_eq!(
            s.store.kind,
            StoreKind::Memory,
            "REDIS_HOST alone does not switch"
        );
        assert_eq!(s.store.redis_url, "redis://10.0.0.5:6380");
        let s = Settings::load(&with_env(&[(
            "CALL_PROXY__STORE__REDIS_URL",
            "redis://:s3cret@cache:6379",
        )]))
        .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn unknown_run_mode_is_refused() {
        let err = Settings::load(&Sources {
            run_mode: Some("staging-typo".into()),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("config/staging-typo.toml"));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Settings::load(&with_env(&[
            ("SERVER_API_KEY", "hunter2"),
            ("TWILIO_AUTH_TOKEN", "hunter3"),
            ("CALL_PROXY__TWILIO__SECONDARY_AUTH_TOKEN", "hunter4"),
            ("CALL_PROXY__GATE__PIN_KEY", "hunter5-hunter5-hunter5"),
            (
                "CALL_PROXY__SECURITY__ROUTE_TOKEN_SECRET",
                "hunter6-hunter6-hunter6",
            ),
        ]))
        .unwrap();
        let debug = format!("{s:?}");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5", "hunter6"] {
            assert!(!debug.contains(secret), "{secret} leaked");
        }
    }

    #[test]
    fn the_pin_directory_is_checked() {
        let mut s = Settings::defaults();
        s.gate.pins.insert(
            format!("hmac-sha256:{}", "ab".repeat(32)),
            vec!["ghost".into()],
        );
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no backend `ghost`"));
        let mut s = Settings::defaults();
        s.gate.pins.insert("1234".into(), vec!["speaker".into()]);
        assert!(s.validate().unwrap_err().to_string().contains("hash-pin"));
        let demo = crate::gate::pins::hash_pin(&Settings::defaults().gate.pin_key, "1234");
        assert!(
            Settings::defaults().gate.pins.contains_key(&demo),
            "demo PIN 1234"
        );
    }

    #[test]
    fn strings_stay_the_strings_they_were_given() {
        let token = "12345678901234567890123456789012";
        let s = Settings::load(&with_env(&[
            ("CALL_PROXY__SECURITY__API_KEY", "000123456789"),
            ("CALL_PROXY__TWILIO__AUTH_TOKEN", token),
            ("CALL_PROXY__TWILIO__SECONDARY_AUTH_TOKEN", "1e5"),
            ("CALL_PROXY__STORE__KEY_PREFIX", "true"),
            ("CALL_PROXY__BACKENDS__DEFAULT", "speaker"),
            ("CALL_PROXY__TWILIO__VALIDATE_SIGNATURES", "true"),
        ]))
        .unwrap();
        assert_eq!(s.security.api_key, "000123456789");
        assert_eq!(s.twilio.auth_token, token);
        assert_eq!(s.twilio.secondary_auth_token, "1e5");
        assert_eq!(s.store.key_prefix, "true");
        assert!(
            s.twilio.validate_signatures,
            "booleans still read as booleans"
        );
        let s = Settings::load(&with_env(&[
            ("TWILIO_AUTH_TOKEN", token),
            ("SERVER_API_KEY", "007"),
        ]))
        .unwrap();
        assert_eq!(s.twilio.auth_token, token);
        assert_eq!(s.security.api_key, "007");
    }

    #[test]
    fn unknown_keys_are_refused_with_the_nearest_known_one() {
        for (var, named, suggested) in [
            (
                "CALL_PROXY__GATE__MAX_INVALID_ATEMPTS",
                "gate.max_invalid_atempts",
                Some("gate.max_invalid_attempts"),
            ),
            (
                "CALL_PROXY__TWILIO__VALIDATE_SIGNATURE",
                "twilio.validate_signature",
                Some("twilio.validate_signatures"),
            ),
            (
                "CALL_PROXY__BACKENDS__TABLE__SPEAKER__FROMAT",
                "backends.table.speaker.fromat",
                Some("backends.table.speaker.format"),
            ),
            ("CALL_PROXY__NOTHING__LIKE_IT", "nothing", None),
        ] {
            let err = Settings::load(&with_env(&[(var, "3")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{named}`")), "{var}: {err}");
            match suggested {
                Some(key) => assert!(err.contains(&format!("did you mean `{key}`")), "{err}"),
                None => assert!(!err.contains("did you mean"), "{err}"),
            }
        }
    }
}
