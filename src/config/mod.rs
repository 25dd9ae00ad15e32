//! Settings: what the service can be told, as types. Loading them from the layers is in
//! `load` (embedded defaults, run mode, file, environment, the original's variables, unknown
//! keys refused); checking them before anything serves is in `validate`.

mod load;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use load::{Sources, DEFAULT_TOML, PRODUCTION_TOML};

/// The longest TTL any setting or stored record may have: ten years. Longer ones are refused
/// at start-up and held to this when read back from storage, so nothing overflows.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// A secret setting (a token, a key). It is the string it was given, and it never shows in
/// `{:?}` output, so no log line or error message can carry it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the code that signs or compares with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<set>"
        })
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl Secret {
    /// Replaces the secret's text (used when `${NAME}` is filled in from the environment).
    pub(crate) fn set(&mut self, text: String) {
        self.0 = text;
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl PartialEq<&str> for Secret {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A config that cannot be served, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("config: RUN_MODE={mode}: no file config/{mode}.toml")]
    UnknownMode { mode: String },
    /// Every problem a config has, found in one pass.
    #[error("{}", several(.0))]
    Several(Vec<ConfigError>),
}

/// A setting that is one of a few names: read in any case (`PCM16`, `Redis`), and a name
/// that is none of them is refused listing the ones that are.
macro_rules! named_choice {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            /// The names this setting takes.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                match text.trim().to_ascii_lowercase().as_str() {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(serde::de::Error::custom(format!(
                        "`{}` is not one of: {}",
                        text.escape_debug(),
                        $ty::NAMES.join(", ")
                    ))),
                }
            }
        }
    };
}

named_choice!(PinProviderKind { "directory" => Directory, "http" => Http });
named_choice!(LogFormat { "human" => Human, "json" => Json });
named_choice!(WireFormat { "twilio" => Twilio, "compact" => Compact, "pcm16" => Pcm16 });
named_choice!(StoreKind { "memory" => Memory, "redis" => Redis });

fn several(problems: &[ConfigError]) -> String {
    let mut text = format!("config: {} problems:", problems.len());
    for p in problems {
        text.push_str("\n  - ");
        text.push_str(p.to_string().trim_start_matches("config: "));
    }
    text
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
    /// `RUN_MODE=production`: the secrets production needs are required, not just warned of.
    #[serde(skip)]
    pub production: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TwilioSettings {
    pub validate_signatures: bool,
    pub auth_token: Secret,
    pub secondary_auth_token: Secret,
    pub public_url: String,
    pub trust_forwarded_headers: bool,
    pub max_body_bytes: usize,
    /// The account whose calls stream here: what the REST API (a live hand-off) acts for.
    pub account_sid: String,
    /// An API key for the REST API (`SK…`) and its secret; without one, the auth token.
    pub api_key_sid: String,
    pub api_key_secret: Secret,
    /// Twilio's REST API, or a regional or test one.
    pub api_base_url: String,
    /// HMAC-SHA256 signing keys by id.
    #[serde(default)]
    pub signing_keys: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GateSettings {
    pub max_invalid_attempts: u64,
    /// Wrong PINs one client address may send in a window, whatever caller ids it uses;
    /// 0 switches the limit off. Only where requests are not signed by Twilio.
    pub max_pin_failures_per_ip: u64,
    /// PIN checks one call (`callSid`) may make, whatever caller ids it claims; 0: no limit.
    pub max_pin_attempts_per_call: u64,
    /// Wrong PINs over all callers in an hour past which a WARN goes out and the page shows
    /// a banner; 0: no alarm.
    pub pin_failure_alarm_per_hour: u64,
    /// While the alarm is on, wrong answers wait this long (right ones never do); 0: none.
    pub failure_delay_ms: u64,
    pub pin_failure_window_secs: u64,
    pub attempts_ttl_secs: u64,
    pub block_ttl_secs: u64,
    pub pin_provider: PinProviderKind,
    pub pin_key: Secret,
    pub pin_service_url: String,
    /// Sent as the `apiKey` header to the PIN service (the original's `SERVER_API_KEY`).
    pub pin_service_api_key: Secret,
    pub pin_service_timeout_ms: u64,
    /// PIN hash (`hmac-sha256:<hex>`) -> backend ids.
    #[serde(default)]
    pub pins: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// A drain (the first SIGTERM/SIGINT) admits new streams this long: the load balancer's
    /// deregistration delay.
    pub drain_accept_ms: u64,
    /// A drain ends what is still live after this.
    pub drain_timeout_ms: u64,
    /// A drain moves each one-way stream to a ready instance through Twilio's REST API.
    pub handoff: bool,
    /// A hand-off whose new stream has not arrived within this is given up.
    pub handoff_timeout_ms: u64,
    /// Ending the calls that are left (a second signal, or the drain deadline) takes at most
    /// this: `stop` to every backend, 1001 to Twilio.
    pub shutdown_timeout_ms: u64,
    /// Request headers must arrive within this; also how long an idle keep-alive lasts.
    pub header_timeout_ms: u64,
    /// A request body must arrive within this (else 408).
    pub body_timeout_ms: u64,
    pub max_connections: usize,
    /// Open connections from one client address at most; 0: no cap.
    pub max_connections_per_address: usize,
    /// Behind `twilio.trust_forwarded_headers`: how many proxies of yours append to
    /// `X-Forwarded-For`; the client is that many entries from the right.
    pub trusted_proxy_hops: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
    pub mask_callers: bool,
    pub otlp: OtlpSettings,
}

/// The call spans sent to an OpenTelemetry collector over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
pub struct OtlpSettings {
    /// The collector's traces URL (`http://collector:4318/v1/traces`); empty: not sent.
    pub endpoint: String,
    pub service_name: String,
    /// One export (a batch of spans) gives up after this.
    pub timeout_ms: u64,
    /// Sent with every export (a vendor's API key); `${NAME}` is read from the environment.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The queue toward Twilio of a speaking backend's audio, in milliseconds of audio.
    pub talkback_queue_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_message_bytes: usize,
    pub all_backends_gone_grace_ms: u64,
    pub capture: CaptureSettings,
}

/// Writing chosen calls' Twilio messages to files, with their arrival times, for replay with
/// `test-client --replay`. A capture holds the caller's voice: off unless an operator turns
/// it on.
#[derive(Debug, Clone, Deserialize)]
pub struct CaptureSettings {
    pub enabled: bool,
    /// Only calls routed to one of these backends (all calls when empty).
    pub backends: Vec<String>,
    /// The share of those calls captured, from 0 to 1.
    pub share: f64,
    /// Where the files go; a relative directory sits where the journal does.
    pub dir: String,
    /// The most one call's file holds; the rest of the call is not captured.
    pub max_bytes: u64,
    /// Files older than this are deleted (checked at start-up and every hour).
    pub retention_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendSettings {
    pub default: Vec<String>,
    pub queue_frames: usize,
    /// Each link's queue in bytes, control frames and the writer's batch included.
    pub queue_bytes: usize,
    /// A backend that takes nothing for this long is a failed link.
    pub write_timeout_ms: u64,
    /// A backend that does not speak and sends more than this many messages, or bytes, in a
    /// second is disconnected as misbehaving.
    pub max_unsolicited_messages_per_second: u32,
    pub max_unsolicited_bytes_per_second: usize,
    /// A speaking backend may send this many messages, and bytes, a second (its audio, marks
    /// and clears); more is misbehaving.
    pub max_speaker_messages_per_second: u32,
    pub max_speaker_bytes_per_second: usize,
    pub connect_timeout_ms: u64,
    /// Connection attempts in flight to one backend at most.
    pub max_connecting: usize,
    /// Each backend link is pinged this often ...
    pub ping_interval_ms: u64,
    /// ... and a link whose backend has not answered within this is failed (it stopped
    /// reading, though the kernel may still be taking bytes).
    pub pong_timeout_ms: u64,
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
    /// `ws://` or `wss://`, with any path and query string.
    pub url: String,
    #[serde(default)]
    pub format: WireFormat,
    /// Overrides `backends.queue_frames` for this backend.
    pub queue_frames: Option<usize>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A PEM file of CA certificates trusted for this `wss://` backend, beside the bundled
    /// public roots: for backends behind a private CA.
    #[serde(default)]
    pub ca_file: String,
    /// HTTP headers sent on the upgrade (`Authorization`, ...). `${NAME}` in a value is read
    /// from the environment at start-up; values are secrets and never shown.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// For `pcm16`: the rate of the PCM both ways (8000, 16000 or 24000).
    pub sample_rate: Option<u32>,
    /// This backend talks back: its audio, marks and clears reach the caller.
    #[serde(default)]
    pub speaks: bool,
}

impl BackendSpec {
    /// The PCM rate of a `pcm16` backend.
    pub fn pcm_rate(&self) -> u32 {
        self.sample_rate.unwrap_or(PCM16_DEFAULT_RATE)
    }
}

fn yes() -> bool {
    true
}

/// How a backend wants the call's messages (SPEC section 3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// Twilio's messages forwarded byte for byte.
    #[default]
    Twilio,
    /// The original's `{"event":"media","media":"<base64>"}` form.
    Compact,
    /// Raw 16-bit little-endian PCM in binary frames at the backend's `sample_rate`, with
    /// `start`, `dtmf`, `mark` and `stop` as JSON text.
    Pcm16,
}

impl WireFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WireFormat::Twilio => "twilio",
            WireFormat::Compact => "compact",
            WireFormat::Pcm16 => "pcm16",
        }
    }
}

/// The rates a `pcm16` backend may ask for.
pub const PCM16_RATES: [u32; 3] = [8000, 16000, 24000];

/// A `pcm16` backend's rate when its config names none.
pub const PCM16_DEFAULT_RATE: u32 = 16000;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecuritySettings {
    pub api_key: Secret,
    pub metrics_require_api_key: bool,
    pub require_route_token: bool,
    pub route_token_secret: Secret,
    pub route_token_ttl_secs: u64,
    /// The original's `ENABLE_DEBUG_ROUTES`: `POST /auth-attempts/{id}` and
    /// `POST /blocked-callers/{id}` answer (with the API key); otherwise 404.
    pub enable_debug_routes: bool,
}

impl Settings {
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

    pub fn drain_accept(&self) -> Duration {
        Duration::from_millis(self.server.drain_accept_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.server.drain_timeout_ms)
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

/// Accepts `ws://` or `wss://host[:port][/path][?query]`; answers why not otherwise.
pub fn parse_backend_url(url: &str) -> Result<(), String> {
    // Errors name the URL as it may be shown: no credentials, no query (either may hold a
    // secret).
    let shown = redacted_url(url);
    let Some(rest) = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
    else {
        return Err(format!("`{shown}` is not a ws:// or wss:// URL"));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "`{shown}` carries credentials in the URL: put them in a header (`headers`, with `${{NAME}}` from the environment)"
        ));
    }
    if authority.is_empty() {
        return Err(format!("`{shown}` has no host"));
    }
    tokio_tungstenite::tungstenite::http::Uri::try_from(url)
        .map_err(|e| format!("`{shown}` is not a valid URL: {e}"))?;
    Ok(())
}

/// A URL as logs and errors may show it: credentials and the query string replaced.
pub fn redacted_url(url: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?…"),
        None => (url, ""),
    };
    let (scheme, rest) = before_query.split_once("://").unwrap_or(("", before_query));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => authority.to_string(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    format!("{scheme}{sep}{host}{path}{query}")
}

/// The CA certificates in a PEM file: at least one, each one readable.
pub fn load_ca_file(path: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::io::Read;
    // A CA bundle is kilobytes; a path to a device or a huge file must not hang or fill memory.
    const MAX_CA_FILE: u64 = 4 << 20;
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| format!("cannot read `{path}`: {e}"))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(format!(
            "`{path}` is larger than {} MiB: not a CA file",
            MAX_CA_FILE >> 20
        ));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{path}` is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{path}` holds no certificate"));
    }
    Ok(certs)
}
