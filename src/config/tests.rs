//! Loading and validating settings, through the same layers a process sees.

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
    // Signature checks are off locally, so only this machine may reach it.
    assert_eq!(s.listen_addr().unwrap().to_string(), "127.0.0.1:8999");
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
    ("SERVER_API_KEY", "an-api-key"),
    (
        "CALL_PROXY__TWILIO__PUBLIC_URL",
        "https://proxy.example.com",
    ),
];

#[test]
fn production_requires_its_secrets_and_names_each_missing_one() {
    let s = production(PRODUCTION_SECRETS).expect("complete");
    assert_eq!(s.listen_addr().unwrap().to_string(), "0.0.0.0:8999");
    for (i, key) in [
        (0, "twilio.auth_token"),
        (1, "gate.pin_key"),
        (2, "security.route_token_secret"),
        (3, "security.api_key"),
        (4, "twilio.public_url"),
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
    let demo = crate::gate::pins::hash_pin(Settings::defaults().gate.pin_key.expose(), "1234");
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

#[test]
fn a_relative_journal_lives_in_systemds_state_directory() {
    let s = Settings::load(&with_env(&[("STATE_DIRECTORY", "/var/lib/call-proxy")])).unwrap();
    assert_eq!(s.store.path, "/var/lib/call-proxy/state.log");
    let s = Settings::load(&with_env(&[
        ("STATE_DIRECTORY", "/var/lib/call-proxy"),
        ("CALL_PROXY__STORE__PATH", "/srv/proxy/journal.log"),
    ]))
    .unwrap();
    assert_eq!(
        s.store.path, "/srv/proxy/journal.log",
        "an absolute path is kept"
    );
    let s = Settings::defaults();
    assert_eq!(s.store.path, "data/state.log", "a checkout keeps its data/");
}

#[test]
fn a_bad_backend_url_or_header_is_refused_without_showing_its_secrets() {
    let err = Settings::load(&with_env(&[(
        "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
        "wss://user:TOPSECRETPW@asr.example.com/v1?key=ALSOSECRET",
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("backends.table.asr.url"), "{err}");
    assert!(err.contains("credentials"), "{err}");
    assert!(
        !err.contains("TOPSECRETPW") && !err.contains("ALSOSECRET"),
        "{err}"
    );

    let err = Settings::load(&with_env(&[
        (
            "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
            "wss://asr.example.com/v1",
        ),
        (
            "CALL_PROXY__BACKENDS__TABLE__ASR__HEADERS__AUTHORIZATION",
            "Bearer ${ASR_TOKEN",
        ),
        ("ASR_TOKEN", "secret-token"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("without its closing"), "{err}");
    assert!(!err.contains("secret-token"), "{err}");
}

#[test]
fn a_ca_file_that_is_a_device_is_refused_not_read_forever() {
    let began = std::time::Instant::now();
    let err = load_ca_file("/dev/zero").unwrap_err();
    assert!(err.contains("larger than"), "{err}");
    assert!(began.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_header_value_from_the_environment_that_is_not_ascii_is_refused() {
    let err = Settings::load(&with_env(&[
        (
            "CALL_PROXY__BACKENDS__TABLE__ASR__URL",
            "wss://asr.example.com/v1",
        ),
        (
            "CALL_PROXY__BACKENDS__TABLE__ASR__HEADERS__AUTHORIZATION",
            "${ASR_TOKEN}",
        ),
        ("ASR_TOKEN", "Bearer t\u{f6}kenXYZZY"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("non-ASCII"), "{err}");
    assert!(!err.contains("XYZZY"), "the value is not shown: {err}");
}

#[test]
fn capture_settings_are_checked_together() {
    let err = Settings::load(&with_env(&[
        ("CALL_PROXY__MEDIA__CAPTURE__SHARE", "1.5"),
        ("CALL_PROXY__MEDIA__CAPTURE__BACKENDS", "speaker,nosuch"),
        ("CALL_PROXY__MEDIA__CAPTURE__RETENTION_SECS", "1"),
    ]))
    .unwrap_err()
    .to_string();
    for expected in [
        "media.capture.share",
        "media.capture.backends[1]",
        "media.capture.retention_secs",
    ] {
        assert!(err.contains(expected), "{expected} in {err}");
    }
    let s = Settings::load(&with_env(&[
        ("CALL_PROXY__MEDIA__CAPTURE__ENABLED", "true"),
        ("CALL_PROXY__MEDIA__CAPTURE__BACKENDS", "speaker"),
        ("STATE_DIRECTORY", "/var/lib/call-proxy"),
    ]))
    .unwrap();
    assert_eq!(s.media.capture.backends, ["speaker"]);
    assert_eq!(s.media.capture.dir, "/var/lib/call-proxy/captures");
}

#[test]
fn the_otlp_export_is_off_by_default_and_checked_when_on() {
    let s = Settings::defaults();
    assert!(
        s.log.otlp.endpoint.is_empty(),
        "nothing leaves the machine by default"
    );

    let err = Settings::load(&with_env(&[
        (
            "CALL_PROXY__LOG__OTLP__ENDPOINT",
            "collector:4318/v1/traces",
        ),
        ("CALL_PROXY__LOG__OTLP__TIMEOUT_MS", "0"),
        ("CALL_PROXY__LOG__OTLP__HEADERS__X-KEY", "${OTLP_KEY}"),
        ("OTLP_KEY", "k\u{1}SECRETKEY"),
    ]))
    .unwrap_err()
    .to_string();
    for expected in [
        "log.otlp.endpoint",
        "http:// or https://",
        "log.otlp.timeout_ms",
        "log.otlp.headers.x-key",
        "control characters",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    assert!(!err.contains("SECRETKEY"), "the value is not shown: {err}");

    let err = Settings::load(&with_env(&[(
        "CALL_PROXY__LOG__OTLP__HEADERS__AUTHORIZATION",
        "Bearer ${NOT_SET_ANYWHERE}",
    )]))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("log.otlp.headers.authorization") && err.contains("NOT_SET_ANYWHERE"),
        "{err}"
    );

    let s = Settings::load(&with_env(&[
        (
            "CALL_PROXY__LOG__OTLP__ENDPOINT",
            "https://collector.example.com/v1/traces",
        ),
        (
            "CALL_PROXY__LOG__OTLP__HEADERS__AUTHORIZATION",
            "Bearer ${OTLP_KEY}",
        ),
        ("OTLP_KEY", "abc"),
    ]))
    .unwrap();
    assert_eq!(s.log.otlp.headers["authorization"], "Bearer abc");
}

#[test]
fn hand_off_needs_the_rest_apis_account_credentials_and_public_url() {
    let s = Settings::defaults();
    assert!(!s.server.handoff, "off until configured");
    assert_eq!(s.twilio.api_base_url, "https://api.twilio.com");

    let err = Settings::load(&with_env(&[("CALL_PROXY__SERVER__HANDOFF", "true")]))
        .unwrap_err()
        .to_string();
    for expected in [
        "twilio.account_sid",
        "twilio.auth_token",
        "twilio.public_url",
        "store.kind",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }

    // Half an API key, and an API base that is not a URL, are refused whether or not hand-off
    // is on.
    let err = Settings::load(&with_env(&[
        ("CALL_PROXY__TWILIO__API_KEY_SID", "SK0123"),
        ("CALL_PROXY__TWILIO__API_BASE_URL", "api.twilio.com"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("twilio.api_key_secret"), "{err}");
    assert!(err.contains("twilio.api_base_url"), "{err}");

    let s = Settings::load(&with_env(&[
        ("CALL_PROXY__SERVER__HANDOFF", "true"),
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        (
            "CALL_PROXY__TWILIO__API_KEY_SID",
            "SK0123456789abcdef0123456789abcdef",
        ),
        ("CALL_PROXY__TWILIO__API_KEY_SECRET", "key-secret"),
        (
            "CALL_PROXY__TWILIO__PUBLIC_URL",
            "https://proxy.example.com",
        ),
        ("CALL_PROXY__STORE__KIND", "redis"),
    ]))
    .unwrap();
    assert!(s.server.handoff);
    assert_eq!(s.twilio.account_sid, "AC0123456789abcdef0123456789abcdef");
    assert!(
        !format!("{s:?}").contains("key-secret"),
        "the secret never shows"
    );
}
