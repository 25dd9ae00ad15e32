//! Rate limits (governor): per client IP on HTTP routes and, separately, on WebSocket
//! upgrades; per caller id on `/validate-pin`. Over the limit: 429 with `Retry-After`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::{ApiError, AppState};
use crate::config::RateLimitSettings;

pub struct Limiters {
    http: Option<DefaultKeyedRateLimiter<IpAddr>>,
    upgrades: Option<DefaultKeyedRateLimiter<IpAddr>>,
    pins: Option<DefaultKeyedRateLimiter<String>>,
    /// WARN lines about one client (its 429s, wrong keys, bad signatures): a few, then one a
    /// second at most, so one client cannot flood the log. Every refusal is still counted.
    log_lines: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

/// WARN lines about one client: a burst of this many, then one a second.
const LOG_BURST: u32 = 5;

fn limiter<K: std::hash::Hash + Eq + Clone>(
    per_minute: u32,
    burst: u32,
) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(per_minute)?;
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Some(DefaultKeyedRateLimiter::keyed(
        Quota::per_minute(rate).allow_burst(burst),
    ))
}

/// Too many requests; retry after this long.
#[derive(Debug)]
pub struct Limited(pub Duration);

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("rate limited; retry in {} s", secs.max(1)),
        )
        .retry_after(secs)
        .into_response()
    }
}

impl Limiters {
    pub fn new(settings: &RateLimitSettings) -> Limiters {
        Limiters {
            http: limiter(settings.http_per_ip_per_minute, settings.http_burst),
            upgrades: limiter(settings.upgrades_per_ip_per_minute, settings.upgrades_burst),
            pins: limiter(settings.pin_per_caller_per_minute, settings.pin_burst),
            log_lines: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(NonZeroU32::MIN)
                    .allow_burst(NonZeroU32::new(LOG_BURST).unwrap_or(NonZeroU32::MIN)),
            ),
            clock: DefaultClock::default(),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &Option<DefaultKeyedRateLimiter<K>>,
        key: &K,
    ) -> Result<(), Limited> {
        match limiter {
            None => Ok(()),
            Some(l) => l
                .check_key(key)
                .map_err(|not_until| Limited(not_until.wait_time_from(self.clock.now()))),
        }
    }

    pub fn check_caller(&self, caller: &str) -> Result<(), Limited> {
        self.check(&self.pins, &caller.to_string())
    }

    /// Whether a WARN line about `client` may be written now (see `log_lines`).
    pub fn may_log(&self, client: IpAddr) -> bool {
        self.log_lines.check_key(&client).is_ok()
    }

    /// Forgets keys that have been quiet long enough to be full again; run periodically so
    /// the maps do not grow with every address ever seen.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.http {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.upgrades {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.pins {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.log_lines.retain_recent();
        self.log_lines.shrink_to_fit();
    }
}

/// The client's address, as the routes after the rate limit see it (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// The client's address. Behind proxies this service trusts (`trust_forwarded_headers`),
/// the `X-Forwarded-For` entry `server.trusted_proxy_hops` from the right: each trusted proxy
/// appends the address it saw, so entries further left were written by the client and prove
/// nothing. Otherwise the socket's peer.
fn client_ip(state: &AppState, request: &Request) -> IpAddr {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if !state.settings.twilio.trust_forwarded_headers {
        return peer;
    }
    let hops = state.settings.server.trusted_proxy_hops;
    forwarded_for(request.headers(), hops).unwrap_or(peer)
}

/// The `hops`-th entry from the right of every `X-Forwarded-For` header, read as one list.
fn forwarded_for(headers: &axum::http::HeaderMap, hops: usize) -> Option<IpAddr> {
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let index = entries.len().checked_sub(hops.max(1))?;
    entries[index].parse().ok()
}

pub async fn per_ip(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, Limited> {
    let ip = client_ip(&state, &request);
    request.extensions_mut().insert(ClientIp(ip));
    let (limiter, scope) = if request.uri().path() == "/media" {
        (&state.limits.upgrades, "upgrades_per_ip")
    } else {
        (&state.limits.http, "http_per_ip")
    };
    if let Err(limited) = state.limits.check(limiter, &ip) {
        state.metrics.limited(scope);
        if state.limits.may_log(ip) {
            tracing::warn!(%ip, limit = scope, "rate limited (repeated lines about one client are rate limited too)");
        }
        return Err(limited);
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_entry_the_trusted_proxies_wrote() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        headers.append("x-forwarded-for", "10.0.0.9".parse().unwrap());
        let ip = |h: usize| forwarded_for(&headers, h).map(|ip| ip.to_string());
        assert_eq!(ip(1).as_deref(), Some("10.0.0.9"));
        assert_eq!(ip(2).as_deref(), Some("1.2.3.4"));
        assert_eq!(ip(3).as_deref(), Some("6.6.6.6"));
        assert_eq!(
            ip(4),
            None,
            "fewer entries than trusted hops: the peer counts"
        );
        let mut bad = axum::http::HeaderMap::new();
        bad.append("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(forwarded_for(&bad, 1), None);
    }
}
