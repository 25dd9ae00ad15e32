//! Rate limits (governor): per client IP on HTTP routes and, separately, on WebSocket
//! upgrades; per caller id on `/validate-pin`. Over the limit: 429 with `Retry-After`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
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
    clock: DefaultClock,
}

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
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("rate limited; retry in {} s", secs.max(1)),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        response
    }
}

impl Limiters {
    pub fn new(settings: &RateLimitSettings) -> Limiters {
        Limiters {
            http: limiter(settings.http_per_ip_per_minute, settings.http_burst),
            upgrades: limiter(settings.upgrades_per_ip_per_minute, settings.upgrades_burst),
            pins: limiter(settings.pin_per_caller_per_minute, settings.pin_burst),
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
    }
}

/// The client's address: the first `X-Forwarded-For` entry only behind a trusted proxy.
fn client_ip(state: &AppState, request: &Request) -> IpAddr {
    if state.settings.twilio.trust_forwarded_headers {
        if let Some(ip) = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

pub async fn per_ip(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, Limited> {
    let ip = client_ip(&state, &request);
    let (limiter, scope) = if request.uri().path() == "/media" {
        (&state.limits.upgrades, "upgrades_per_ip")
    } else {
        (&state.limits.http, "http_per_ip")
    };
    if let Err(limited) = state.limits.check(limiter, &ip) {
        state.metrics.limited(scope);
        tracing::warn!(%ip, limit = scope, "rate limited");
        return Err(limited);
    }
    Ok(next.run(request).await)
}
