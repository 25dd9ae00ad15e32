//! Which backends a call's audio goes to, decided once at `start` (SPEC section 3): what the
//! route token allows, else `backendIds` from the table, else allowlisted `backendHosts`, else
//! the configured default.

use std::net::{IpAddr, SocketAddr};

use crate::config::{BackendSettings, WireFormat};
use crate::gate::route_token::Claims;
use crate::logging::escape;
use crate::twilio::messages::Start;
use crate::twilio::params::parse_list;

/// Bounds on what one stream may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `media.max_backends_per_call`.
    pub max_backends: usize,
    /// This proxy's own listening address: never one of its backends.
    pub own: Option<SocketAddr>,
}

/// How many skip reasons a route keeps: a stream that names thousands of bad entries gets a
/// count, not thousands of log lines.
const MAX_REASONS: usize = 4;

/// One backend link to open for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The backend id, or `host:port` for a `backendHosts` entry: names it in logs, `/calls`
    /// and (through `metrics_label`) metrics.
    pub name: String,
    /// Metrics label: the id, or `host:<host>` so that ports cannot blow up label cardinality.
    pub metrics_label: String,
    pub url: String,
    pub format: WireFormat,
    pub queue_frames: usize,
    /// A backend of the table (reached as its config says), not a host the stream named.
    pub from_table: bool,
    /// For `pcm16`: the rate of its PCM.
    pub sample_rate: u32,
    /// Talks back to the caller (at most one per call: the first the route names).
    pub speaks: bool,
}

/// Where the targets came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    RouteToken,
    BackendIds,
    BackendHosts,
    /// Both lists, as the original's Studio Flow passes them.
    BackendIdsAndHosts,
    Default,
}

#[derive(Debug)]
pub struct Route {
    pub source: Source,
    pub targets: Vec<Target>,
    /// Entries named by the stream but not used, each with the reason; logged and counted.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no backend for this stream: it names none and backends.default is empty")]
    NoBackend,
    #[error("no usable backend: {}", .0.join("; "))]
    NoneUsable(Vec<String>),
    #[error("the route token does not allow {0}")]
    NotAllowed(String),
    #[error("the route token was issued to another caller")]
    OtherCaller,
}

/// Chooses the call's backends from its `start` message and, when the stream carries one, its
/// verified route token. With a token, the stream may narrow what the token allows (by
/// naming some of its backends) but never widen it.
pub fn choose(
    start: &Start,
    backends: &BackendSettings,
    token: Option<&Claims>,
    limits: Limits,
) -> Result<Route, RouteError> {
    let route = choose_unbounded(start, backends, token, limits)?;
    Ok(bounded(route, limits.max_backends))
}

fn choose_unbounded(
    start: &Start,
    backends: &BackendSettings,
    token: Option<&Claims>,
    limits: Limits,
) -> Result<Route, RouteError> {
    if let Some(claims) = token {
        return choose_by_token(start, backends, claims, limits);
    }
    let list = |param: &str| start.param(param).map(parse_list).unwrap_or_default();
    // Both lists count together, as in the original: its flow passes the PIN service's ids
    // (which this table may not know: logged and skipped) and the hosts to connect.
    let (ids, hosts) = (list("backendIds"), list("backendHosts"));
    let source = match (ids.is_empty(), hosts.is_empty()) {
        (false, false) => Source::BackendIdsAndHosts,
        (false, true) => Source::BackendIds,
        (true, false) => Source::BackendHosts,
        (true, true) if backends.default.is_empty() => return Err(RouteError::NoBackend),
        (true, true) => return by_ids(Source::Default, backends.default.clone(), backends),
    };
    both(source, ids, hosts, backends, limits)
}

/// The table backends `ids` names and the allowlisted `hosts`, de-duplicated; refused only
/// when neither leaves anything usable.
fn both(
    source: Source,
    ids: Vec<String>,
    hosts: Vec<String>,
    backends: &BackendSettings,
    limits: Limits,
) -> Result<Route, RouteError> {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for part in [
        by_ids(source, ids, backends),
        by_hosts(source, hosts, backends, limits),
    ] {
        match part {
            Ok(route) => {
                targets.extend(route.targets);
                skipped.extend(route.skipped);
            }
            Err(RouteError::NoneUsable(s)) => skipped.extend(s),
            Err(_) => {}
        }
    }
    finish(source, targets, skipped)
}

/// At most `max` targets (the first named win), at most one speaker (the first named), and a
/// bounded list of reasons.
fn bounded(mut route: Route, max: usize) -> Route {
    if route.targets.len() > max {
        route.skipped.push(format!(
            "{} backend(s) over media.max_backends_per_call ({max}) not connected",
            route.targets.len() - max
        ));
        route.targets.truncate(max);
    }
    let mut speakers = route.targets.iter_mut().filter(|t| t.speaks);
    if speakers.next().is_some() {
        for extra in speakers {
            extra.speaks = false;
            route.skipped.push(format!(
                "`{}` also speaks; only the first speaker named talks to the caller",
                extra.name
            ));
        }
    }
    route.skipped = summarized(std::mem::take(&mut route.skipped));
    route
}

fn summarized(mut reasons: Vec<String>) -> Vec<String> {
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - (MAX_REASONS - 1);
        reasons.truncate(MAX_REASONS - 1);
        reasons.push(format!("and {more} more entries not used"));
    }
    reasons
}

fn choose_by_token(
    start: &Start,
    backends: &BackendSettings,
    claims: &Claims,
    limits: Limits,
) -> Result<Route, RouteError> {
    if let Some(caller) = start.param("callerId") {
        if caller.trim() != claims.caller.trim() {
            return Err(RouteError::OtherCaller);
        }
    }
    let narrowed = |param: &str, allowed: &[String]| -> Result<Vec<String>, RouteError> {
        match start.param(param).map(parse_list).filter(|l| !l.is_empty()) {
            None => Ok(allowed.to_vec()),
            Some(asked) => {
                if let Some(extra) = asked.iter().find(|a| !allowed.contains(a)) {
                    return Err(RouteError::NotAllowed(format!("`{}`", escape(extra))));
                }
                Ok(asked)
            }
        }
    };
    // A hand-off token names the backends the call has: the stream's own lists, carried
    // over from the first stream, may name entries that were skipped there.
    if claims.handoff_of.is_some() {
        let (ids, hosts) = (claims.backend_ids.clone(), claims.backend_hosts.clone());
        return both(Source::RouteToken, ids, hosts, backends, limits);
    }
    let ids = narrowed("backendIds", &claims.backend_ids)?;
    let hosts = narrowed("backendHosts", &claims.backend_hosts)?;
    both(Source::RouteToken, ids, hosts, backends, limits)
}

fn by_ids(
    source: Source,
    ids: Vec<String>,
    backends: &BackendSettings,
) -> Result<Route, RouteError> {
    let mut skipped = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for id in ids {
        match backends.enabled(&id) {
            Some(spec) => {
                if targets.iter().all(|t| t.name != id) {
                    targets.push(Target {
                        metrics_label: id.clone(),
                        url: spec.url.clone(),
                        format: spec.format,
                        queue_frames: spec.queue_frames.unwrap_or(backends.queue_frames),
                        from_table: true,
                        sample_rate: spec.pcm_rate(),
                        speaks: spec.speaks,
                        name: id,
                    });
                }
            }
            None => skipped.push(format!("unknown backend id `{}`", escape(&id))),
        }
    }
    finish(source, targets, skipped)
}

fn by_hosts(
    source: Source,
    hosts: Vec<String>,
    backends: &BackendSettings,
    limits: Limits,
) -> Result<Route, RouteError> {
    let mut skipped = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for entry in hosts {
        match host_target(&entry, backends, limits.own) {
            Ok(t) if targets.iter().any(|o| o.name == t.name) => {}
            Ok(t) => targets.push(t),
            Err(why) => skipped.push(why),
        }
    }
    finish(source, targets, skipped)
}

fn finish(source: Source, targets: Vec<Target>, skipped: Vec<String>) -> Result<Route, RouteError> {
    if targets.is_empty() {
        return Err(if skipped.is_empty() {
            RouteError::NoBackend
        } else {
            RouteError::NoneUsable(summarized(skipped))
        });
    }
    Ok(Route {
        source,
        targets,
        skipped,
    })
}

/// A `host:port` entry, checked against the allowlist and against this proxy's own address.
/// Anything else in the entry (a scheme, a path, credentials) is refused rather than guessed
/// at. Host names are compared, and named, in lowercase, so case variants are one backend.
fn host_target(
    entry: &str,
    backends: &BackendSettings,
    own: Option<SocketAddr>,
) -> Result<Target, String> {
    let (host, port) =
        split_host_port(entry).ok_or_else(|| format!("`{}` is not host:port", escape(entry)))?;
    let host = host.to_ascii_lowercase();
    let host = host.as_str();
    let allowed = backends.hosts_allowlist.iter().any(|a| {
        a.trim_start_matches('[')
            .trim_end_matches(']')
            .eq_ignore_ascii_case(host)
    });
    if !allowed {
        return Err(format!(
            "`{}` is not on backends.hosts_allowlist",
            escape(entry)
        ));
    }
    if own.is_some_and(|own| is_self(host, port, own)) {
        return Err(format!("`{}` is this proxy itself", escape(entry)));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Target {
        metrics_label: format!("host:{host}"),
        url: format!("ws://{authority}/media"),
        name: authority,
        format: backends.hosts_format,
        queue_frames: backends.queue_frames,
        from_table: false,
        sample_rate: crate::config::PCM16_DEFAULT_RATE,
        speaks: false,
    })
}

/// Whether `host:port` names the address this proxy listens on. (A name that resolves here
/// some other way is caught when its upgrade arrives carrying this instance's hop header.)
fn is_self(host: &str, port: u16, own: SocketAddr) -> bool {
    if port != own.port() {
        return false;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == own.ip() || ip.is_loopback() || ip.is_unspecified(),
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    }
}

fn split_host_port(entry: &str) -> Option<(&str, u16)> {
    let entry = entry.trim();
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        entry.rsplit_once(':')?
    };
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    valid_host.then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use std::collections::BTreeMap;

    fn start(params: &[(&str, &str)]) -> Start {
        Start {
            sequence_number: "1".into(),
            stream_sid: "MZ1".into(),
            account_sid: "AC1".into(),
            call_sid: "CA1".into(),
            tracks: vec!["inbound".into()],
            media_format: None,
            custom_parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    const LIMITS: Limits = Limits {
        max_backends: 8,
        own: None,
    };

    fn pick(start: &Start, backends: &BackendSettings) -> Result<Route, RouteError> {
        choose(start, backends, None, LIMITS)
    }

    fn backends() -> BackendSettings {
        let mut b = Settings::defaults().backends;
        let mut rec = b.table["speaker"].clone();
        rec.url = "ws://10.1.1.1:9000/rec".into();
        rec.format = WireFormat::Twilio;
        b.table.insert("rec".into(), rec);
        b
    }

    #[test]
    fn backend_ids_and_hosts_both_count_and_accept_json_or_comma_lists() {
        for raw in [
            r#"["rec","speaker"]"#,
            "rec, speaker",
            r#"["rec","speaker","rec"]"#,
        ] {
            let route = pick(
                &start(&[("backendIds", raw), ("backendHosts", r#"["127.0.0.1:1"]"#)]),
                &backends(),
            )
            .unwrap();
            assert_eq!(route.source, Source::BackendIdsAndHosts);
            let names: Vec<_> = route.targets.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["rec", "speaker", "127.0.0.1:1"], "{raw}");
            assert_eq!(route.targets[0].format, WireFormat::Twilio);
        }
        let route = pick(&start(&[("backendIds", "rec")]), &backends()).unwrap();
        assert_eq!(route.source, Source::BackendIds);
    }

    #[test]
    fn the_originals_ids_are_its_pin_services_and_only_skipped() {
        // The original's test client, as it ships: its PIN service's numeric ids, and the
        // hosts it connects.
        let route = pick(
            &start(&[
                ("backendIds", r#"["123123"]"#),
                ("backendHosts", r#"["localhost:8888"]"#),
            ]),
            &backends(),
        )
        .unwrap();
        let names: Vec<_> = route.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["localhost:8888"]);
        assert!(route.skipped[0].contains("123123"), "{:?}", route.skipped);
    }

    #[test]
    fn unknown_ids_are_skipped_and_all_unknown_is_refused() {
        let route = pick(&start(&[("backendIds", r#"["rec","ghost"]"#)]), &backends()).unwrap();
        assert_eq!(route.targets.len(), 1);
        assert!(route.skipped[0].contains("ghost"));
        let err = pick(&start(&[("backendIds", r#"["ghost"]"#)]), &backends()).unwrap_err();
        assert!(matches!(err, RouteError::NoneUsable(_)));
        assert!(err.to_string().contains("unknown backend id `ghost`"));
    }

    #[test]
    fn hosts_are_allowlisted() {
        let route = pick(
            &start(&[(
                "backendHosts",
                r#"["127.0.0.1:8888","169.254.169.254:80","localhost:9","[::1]:7"]"#,
            )]),
            &backends(),
        )
        .unwrap();
        let urls: Vec<_> = route.targets.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "ws://127.0.0.1:8888/media",
                "ws://localhost:9/media",
                "ws://[::1]:7/media"
            ]
        );
        assert_eq!(route.targets[0].format, WireFormat::Compact);
        assert_eq!(route.targets[0].metrics_label, "host:127.0.0.1");
        assert!(route.skipped[0].contains("169.254.169.254"));

        for bad in [
            r#"["169.254.169.254:80"]"#,
            r#"["127.0.0.1"]"#,
            r#"["ws://127.0.0.1:80/x"]"#,
            r#"["user@127.0.0.1:80"]"#,
            r#"["127.0.0.1:80/path"]"#,
            r#"["127.0.0.1:0"]"#,
        ] {
            assert!(
                pick(&start(&[("backendHosts", bad)]), &backends()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn default_backends_and_none_at_all() {
        let route = pick(&start(&[("backendIds", "[]")]), &backends()).unwrap();
        assert_eq!(route.source, Source::Default);
        assert_eq!(route.targets[0].name, "speaker");
        let mut none = backends();
        none.default.clear();
        assert_eq!(pick(&start(&[]), &none).unwrap_err(), RouteError::NoBackend);
    }

    fn claims(ids: &[&str], hosts: &[&str]) -> Claims {
        Claims {
            caller: "+15551234567".into(),
            backend_ids: ids.iter().map(|s| s.to_string()).collect(),
            backend_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            expires_at: u64::MAX,
            call_sid: None,
            nonce: 0,
            handoff_of: None,
        }
    }

    #[test]
    fn a_route_token_decides_and_the_stream_may_only_narrow_it() {
        let token = claims(&["rec", "speaker"], &["127.0.0.1:9"]);
        let all = choose(&start(&[]), &backends(), Some(&token), LIMITS).unwrap();
        assert_eq!(all.source, Source::RouteToken);
        let names: Vec<_> = all.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["rec", "speaker", "127.0.0.1:9"]);

        let narrowed = choose(
            &start(&[("backendIds", "rec")]),
            &backends(),
            Some(&token),
            LIMITS,
        )
        .unwrap();
        assert_eq!(narrowed.targets[0].name, "rec");

        let err = choose(
            &start(&[("backendIds", "rec,admin")]),
            &backends(),
            Some(&token),
            LIMITS,
        );
        assert_eq!(err.unwrap_err(), RouteError::NotAllowed("`admin`".into()));
        let err = choose(
            &start(&[("backendHosts", r#"["127.0.0.1:10"]"#)]),
            &backends(),
            Some(&token),
            LIMITS,
        );
        assert!(matches!(err.unwrap_err(), RouteError::NotAllowed(_)));
        let err = choose(
            &start(&[("callerId", "+19999999999")]),
            &backends(),
            Some(&token),
            LIMITS,
        );
        assert_eq!(err.unwrap_err(), RouteError::OtherCaller);
        let ok = choose(
            &start(&[("callerId", "+15551234567")]),
            &backends(),
            Some(&token),
            LIMITS,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn case_variants_are_one_backend_and_a_stream_gets_at_most_the_cap() {
        let mut many: Vec<String> = Vec::new();
        for i in 0..300 {
            // LOCALHOST, LocalHost, ... and the same with distinct ports.
            let mut name: Vec<char> = "localhost".chars().collect();
            for (j, c) in name.iter_mut().enumerate() {
                if (i >> (j % 9)) & 1 == 1 {
                    *c = c.to_ascii_uppercase();
                }
            }
            many.push(format!("{}:9", name.iter().collect::<String>()));
        }
        let list = serde_json::to_string(&many).unwrap();
        let route = pick(&start(&[("backendHosts", &list)]), &backends()).unwrap();
        assert_eq!(route.targets.len(), 1, "one backend, however it is spelled");
        assert_eq!(route.targets[0].url, "ws://localhost:9/media");

        let distinct: Vec<String> = (1..=3000).map(|p| format!("127.0.0.1:{p}")).collect();
        let list = serde_json::to_string(&distinct).unwrap();
        let route = pick(&start(&[("backendHosts", &list)]), &backends()).unwrap();
        assert_eq!(route.targets.len(), 8);
        assert!(route.skipped.len() <= MAX_REASONS, "{:?}", route.skipped);
        assert!(route.skipped[0].contains("2992"), "{:?}", route.skipped);

        let junk: Vec<String> = (0..3000).map(|i| format!("junk{i}")).collect();
        let list = serde_json::to_string(&junk).unwrap();
        let RouteError::NoneUsable(reasons) =
            pick(&start(&[("backendHosts", &list)]), &backends()).unwrap_err()
        else {
            panic!("junk is not usable")
        };
        assert!(reasons.len() <= MAX_REASONS);
        assert!(reasons.last().unwrap().contains("2997 more"), "{reasons:?}");
    }

    #[test]
    fn the_proxy_is_never_its_own_backend() {
        let own: SocketAddr = "0.0.0.0:8999".parse().unwrap();
        let limits = Limits {
            max_backends: 8,
            own: Some(own),
        };
        for me in [
            "127.0.0.1:8999",
            "LOCALHOST:8999",
            "[::1]:8999",
            "localhost:8999",
        ] {
            let list = serde_json::to_string(&[me]).unwrap();
            let err = choose(
                &start(&[("backendHosts", &list)]),
                &backends(),
                None,
                limits,
            )
            .unwrap_err();
            assert!(err.to_string().contains("this proxy itself"), "{me}: {err}");
        }
        let list = serde_json::to_string(&["127.0.0.1:8998"]).unwrap();
        assert!(choose(
            &start(&[("backendHosts", &list)]),
            &backends(),
            None,
            limits
        )
        .is_ok());
    }

    #[test]
    fn names_chosen_by_the_stream_are_escaped_in_reasons() {
        let err = pick(
            &start(&[("backendIds", "[\"evil\\n2026 INFO forged\\u001b[2J\"]")]),
            &backends(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }

    /// `backendHosts` and `backendIds` as a stream sends them, through the whole routing step.
    mod properties {
        use super::super::{choose, Limits};
        use crate::config::Settings;
        use crate::twilio::messages::Start;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 3000,
                ..ProptestConfig::default()
            }
        }

        fn start(param: &str, value: &str) -> Start {
            super::start(&[(param, value)])
        }

        fn entry() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[A-Za-z0-9.:\\[\\]-]{0,40}",
                ("[a-zA-Z0-9.-]{0,20}", any::<u32>()).prop_map(|(h, p)| format!("{h}:{p}")),
                ("[0-9a-fA-F:]{0,30}", any::<u16>()).prop_map(|(h, p)| format!("[{h}]:{p}")),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn any_list_routes_or_is_refused_within_the_bounds(
                entries in proptest::collection::vec(entry(), 0..40),
                raw in any::<String>(),
                as_json in any::<bool>(),
            ) {
                let backends = Settings::defaults().backends;
                let limits = Limits { max_backends: 8, own: Some("127.0.0.1:8999".parse().unwrap()) };
                let list = if as_json { serde_json::to_string(&entries).unwrap() } else { entries.join(",") };
                for param in ["backendHosts", "backendIds"] {
                    for value in [list.as_str(), raw.as_str()] {
                        let _ = crate::twilio::params::parse_list(value);
                        match choose(&start(param, value), &backends, None, limits) {
                            Ok(r) => {
                                prop_assert!(!r.targets.is_empty() && r.targets.len() <= 8);
                                prop_assert!(r.skipped.len() <= 4);
                                for t in &r.targets {
                                    prop_assert!(t.url.starts_with("ws://"));
                                    prop_assert!(!t.url.contains(":8999/") || !t.url.contains("127.0.0.1"));
                                }
                            }
                            Err(e) => {
                                let text = e.to_string();
                                prop_assert!(!text.chars().any(char::is_control), "{:?}", text);
                            }
                        }
                    }
                }
            }
        }
    }
}
