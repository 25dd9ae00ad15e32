//! Loading settings from their layers: the embedded defaults, `config/{RUN_MODE}.toml`,
//! `--config FILE`, `CALL_PROXY__SECTION__KEY` variables (each value the string it is), and
//! the original service's variables. A key no setting has is refused, naming the nearest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use config::{Config, File, FileFormat};

use super::{invalid, ConfigError, Settings};

/// The defaults compiled into the binary, so a fresh clone runs with no set-up.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
/// The production layer, also compiled in so `RUN_MODE=production` works from any directory.
pub const PRODUCTION_TOML: &str = include_str!("../../config/production.toml");

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
const LIST_KEYS: &[&str] = &[
    "backends.default",
    "backends.hosts_allowlist",
    "media.capture.backends",
];

/// The fields of a `backends.table.<id>` row.
const BACKEND_FIELDS: &[&str] = &[
    "url",
    "format",
    "queue_frames",
    "enabled",
    "ca_file",
    "headers",
    "sample_rate",
    "speaks",
];

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

/// The settings the layers describe, and each value that is not of its setting's type. A
/// wrong value is noted and replaced by the embedded default so that the rest is still read:
/// every such mistake is reported at once. A key no setting has stops at once (it is named
/// with its nearest), as does anything that is not a value's fault (a file that is not TOML).
fn deserialize_all(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<(Settings, Vec<ConfigError>), ConfigError> {
    let mut problems = Vec::new();
    let mut patched: Vec<(String, serde_json::Value)> = Vec::new();
    loop {
        let mut layered = builder.clone();
        for (key, value) in &patched {
            layered = layered.set_override(key, config_value(value))?;
        }
        let mut unknown = Vec::new();
        let error = match serde_ignored::deserialize(layered.build()?, |path| {
            unknown.push(path.to_string())
        }) {
            Ok(settings) => {
                if let Some(key) = unknown.first() {
                    return Err(unknown_key(key));
                }
                return Ok((settings, problems));
            }
            Err(e) => e,
        };
        let (key, message) = match &error {
            config::ConfigError::Type {
                key: Some(key),
                unexpected,
                expected,
                ..
            } => (key.clone(), format!("{unexpected} is not {expected}")),
            config::ConfigError::At {
                key: Some(key),
                error,
                ..
            } => (key.clone(), error.to_string()),
            _ => return Err(error.into()),
        };
        let fallback = default_at(&key).filter(|_| !patched.iter().any(|(k, _)| *k == key));
        problems.push(invalid(&key, message));
        match fallback {
            Some(value) => patched.push((key, value)),
            // Nothing to read on with: what was found so far is the report.
            None => {
                return Err(super::validate::Problems(problems)
                    .into_result()
                    .unwrap_err())
            }
        }
    }
}

/// The embedded default at a dotted key, for reading on past a wrong value. A backend's field
/// takes the demo backend's.
fn default_at(key: &str) -> Option<serde_json::Value> {
    let defaults: serde_json::Value = Config::builder()
        .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
        .build()
        .and_then(Config::try_deserialize)
        .ok()?;
    let at = |path: &str| {
        path.split('.')
            .try_fold(&defaults, |v, part| v.get(part))
            .filter(|v| !v.is_object())
            .cloned()
    };
    at(key).or_else(|| {
        let field = key.strip_prefix("backends.table.")?.split_once('.')?.1;
        at(&format!("backends.table.speaker.{field}"))
    })
}

fn config_value(value: &serde_json::Value) -> config::Value {
    match value {
        serde_json::Value::Bool(b) => (*b).into(),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or_default().into(),
        },
        serde_json::Value::String(s) => s.as_str().into(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(config_value)
            .collect::<Vec<config::Value>>()
            .into(),
        _ => config::Value::from(Option::<String>::None),
    }
}

/// Which layer set `key`: the environment variable, or the file, that an operator should
/// look at. The embedded defaults are not named (they are not the operator's to fix).
fn origin(sources: &Sources, key: &str) -> Option<String> {
    // `backends.default[1]` was set by whatever set `backends.default`.
    let key = key.split('[').next().unwrap_or(key);
    let from_env = sources.env.keys().find(|var| {
        var.strip_prefix("CALL_PROXY__")
            .is_some_and(|p| p.to_ascii_lowercase().replace("__", ".") == key)
    });
    if let Some(var) = from_env {
        return Some(var.clone());
    }
    let legacy = LEGACY_ENV
        .iter()
        .map(|(var, k)| (*var, *k))
        .chain([
            ("SERVER_API_HOST", "gate.pin_service_url"),
            ("SERVER_API_TIMEOUT_MS", "gate.pin_service_timeout_ms"),
            ("REDIS_HOST", "store.redis_url"),
            ("REMOTE_CACHE_ENABLED", "store.kind"),
        ])
        .find(|(var, k)| *k == key && sources.env.get(*var).is_some_and(|v| !v.is_empty()));
    if let Some((var, _)) = legacy {
        return Some(var.to_string());
    }
    let sets = |text: &str| {
        toml_value(text)
            .is_some_and(|v| key.split('.').try_fold(&v, |v, part| v.get(part)).is_some())
    };
    if let Some(file) = &sources.file {
        if std::fs::read_to_string(file).is_ok_and(|t| sets(&t)) {
            return Some(file.display().to_string());
        }
    }
    let mode = sources.run_mode.as_deref()?;
    let on_disk = Path::new("config").join(format!("{mode}.toml"));
    match std::fs::read_to_string(&on_disk) {
        Ok(text) if sets(&text) => Some(on_disk.display().to_string()),
        Err(_) if mode == "production" && sets(PRODUCTION_TOML) => {
            Some("RUN_MODE=production (its embedded layer)".to_string())
        }
        _ => None,
    }
}

/// A TOML text as a tree, through the same reader the layers use.
fn toml_value(text: &str) -> Option<serde_json::Value> {
    Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .build()
        .and_then(Config::try_deserialize)
        .ok()
}

/// The original Node.js service's environment variables, mapped onto our keys.
const LEGACY_ENV: &[(&str, &str)] = &[
    ("AUDIO_PROXY_PORT", "server.port"),
    ("SERVER_API_KEY", "security.api_key"),
    ("TWILIO_AUTH_TOKEN", "twilio.auth_token"),
    // Not the original's, but the name Twilio's own tools read.
    ("TWILIO_ACCOUNT_SID", "twilio.account_sid"),
    ("VALIDATE_EXTERNAL_CALLS", "twilio.validate_signatures"),
    ("INVALID_AUTH_ATTEMPTS_ALLOWED", "gate.max_invalid_attempts"),
    (
        "INVALID_AUTH_ATTEMPTS_CACHE_TTL_SECONDS",
        "gate.attempts_ttl_secs",
    ),
    ("ENABLE_DEBUG_ROUTES", "security.enable_debug_routes"),
];

impl Settings {
    /// Builds the layered settings and validates them: every problem is reported at once,
    /// each naming its key and the variable or file that set it.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let (mut settings, problems) = Settings::layers(sources)?;
        let mut found = super::validate::Problems(problems);
        if let Err(e) = settings.fill_from_environment(&sources.env) {
            found.0.push(e);
        }
        settings.place_state(&sources.env);
        settings.find_problems(&mut found);
        for problem in &mut found.0 {
            if let ConfigError::Invalid { key, message } = problem {
                if let Some(source) = origin(sources, key) {
                    message.push_str(&format!(" (set by {source})"));
                }
            }
        }
        found.into_result()?;
        Ok(settings)
    }

    /// The layered settings as read, without the checks a service needs before it serves
    /// (secrets, backend headers from the environment): for tools that use a few settings,
    /// such as `hash-pin`, which needs the PIN key and the backend table and nothing else.
    pub fn layered(sources: &Sources) -> Result<Settings, ConfigError> {
        let (settings, problems) = Settings::layers(sources)?;
        super::validate::Problems(problems).into_result()?;
        Ok(settings)
    }

    /// The layers merged, and the values that were not of their setting's type.
    fn layers(sources: &Sources) -> Result<(Settings, Vec<ConfigError>), ConfigError> {
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
        // The original's PIN service: SERVER_API_HOST, with SERVER_API_KEY as its apiKey
        // header and SERVER_API_TIMEOUT_MS (10 s unless said, as the original).
        if let Some(host) = sources
            .env
            .get("SERVER_API_HOST")
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
        {
            let url = format!(
                "{}/server-api/audio-proxy/authenticate",
                host.trim_end_matches('/')
            );
            builder = builder
                .set_override("gate.pin_provider", "http")?
                .set_override("gate.pin_service_url", url)?
                .set_override("gate.pin_service_timeout_ms", "10000")?;
            if let Some(key) = sources.env.get("SERVER_API_KEY").filter(|k| !k.is_empty()) {
                builder = builder.set_override("gate.pin_service_api_key", key.as_str())?;
            }
        }
        if let Some(ms) = sources
            .env
            .get("SERVER_API_TIMEOUT_MS")
            .filter(|v| !v.trim().is_empty())
        {
            builder = builder.set_override("gate.pin_service_timeout_ms", ms.trim())?;
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

        let (mut settings, problems) = deserialize_all(builder)?;
        settings.production = sources.run_mode.as_deref() == Some("production");
        // `CALL_PROXY__BACKENDS__DEFAULT=` (set to nothing) means an empty list.
        settings.backends.default.retain(|id| !id.trim().is_empty());
        settings
            .backends
            .hosts_allowlist
            .retain(|h| !h.trim().is_empty());
        Ok((settings, problems))
    }

    /// The embedded defaults alone: what tests start from.
    pub fn defaults() -> Settings {
        Settings::load(&Sources::default()).expect("embedded defaults are valid")
    }
}

impl Settings {
    /// Fills `${NAME}` in backend and OTLP header values from the environment, so secrets stay out of
    /// config files. A variable that is not set stops the service, naming it and the key.
    fn fill_from_environment(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (id, spec) in self.backends.table.iter_mut() {
            for (name, value) in spec.headers.iter_mut() {
                let key = format!("backends.table.{id}.headers.{name}");
                let filled = substitute(value.expose(), env).map_err(|why| invalid(&key, why))?;
                value.set(filled);
            }
        }
        for (name, value) in self.log.otlp.headers.iter_mut() {
            let key = format!("log.otlp.headers.{name}");
            let filled = substitute(value.expose(), env).map_err(|why| invalid(&key, why))?;
            value.set(filled);
        }
        Ok(())
    }
}

impl Settings {
    /// A relative `store.path` lives in the state directory systemd gives the service
    /// (`StateDirectory=` sets `STATE_DIRECTORY`), else under the working directory (a
    /// checkout's `data/`). Containers and units set an absolute path.
    fn place_state(&mut self, env: &BTreeMap<String, String>) {
        // systemd lists one directory per StateDirectory= entry, separated by ':'.
        let Some(dir) = env
            .get("STATE_DIRECTORY")
            .and_then(|d| d.split(':').next())
            .filter(|d| !d.is_empty())
        else {
            return;
        };
        for path in [&mut self.store.path, &mut self.media.capture.dir] {
            let relative = Path::new(path.as_str());
            if path.is_empty() || relative.is_absolute() {
                continue;
            }
            let file = relative.file_name().map_or(relative, Path::new);
            *path = Path::new(dir).join(file).to_string_lossy().into_owned();
        }
    }
}

/// `text` with every `${NAME}` replaced by the variable's value. A missing variable, or a
/// `${` never closed, is the error (said without the value, which may be a secret).
fn substitute(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            return Err("`${` without its closing `}`".to_string());
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(
            env.get(name)
                .ok_or_else(|| format!("environment variable `{name}` is not set"))?,
        );
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}
