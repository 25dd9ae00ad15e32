//! The operator page, `/admin`: live calls and their backends, recent calls, blocked callers
//! with block and unblock, attempts, and the service's health, rendered on the server from
//! the templates in `templates/admin/`. A small script beside it refreshes the live part.
//!
//! Access is the API key, typed once into a login form: the answer is a session cookie
//! (HttpOnly, SameSite=Strict, Secure when the page is served over TLS) holding a random
//! session id and an expiry, signed with a key derived from the API key, so changing the key
//! ends every session. The session itself lives in the store: logout closes it there, so the
//! old cookie and its CSRF token open nothing afterwards, on any instance. Forms carry a
//! CSRF token bound to the session.

use std::time::SystemTime;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::rate_limit::{ClientIp, Limited};
use super::AppState;
use crate::clock::{rfc3339, unix_now};
use crate::logging::mask_caller;
use crate::media::reports::Reached;
use crate::media::{BackendSnapshot, EndedCall};
use crate::store::OperatorSession;

const COOKIE: &str = "cp_admin";
/// How many streams Twilio reported on the page lists.
const REPORTS_SHOWN: usize = 20;
/// How long a login lasts.
const SESSION_SECS: u64 = 8 * 3600;

/// Content-Security-Policy: nothing from elsewhere, and no inline script or style.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("templates/admin/app.js");
const STYLE: &str = include_str!("templates/admin/app.css");

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(page))
        .route("/admin/live", get(live))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/revoke", post(revoke))
        .route("/admin/block", post(block))
        .route("/admin/unblock", post(unblock))
        .route("/admin/app.js", get(script))
        .route("/admin/app.css", get(style))
}

// ---- sessions and CSRF ----------------------------------------------------------------------

fn mac(api_key: &str, purpose: &str, data: &str) -> Vec<u8> {
    // A key of its own for the page, derived from the API key.
    let mut derive = Hmac::<Sha256>::new_from_slice(api_key.as_bytes()).expect("any key length");
    derive.update(b"call-proxy operator page");
    let key = derive.finalize().into_bytes();
    let mut m = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    m.update(purpose.as_bytes());
    m.update(b":");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// A fresh session id: 32 bytes of the system's randomness.
fn session_id() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// The cookie's value for session `id`: `expires.id.tag`.
fn new_session(api_key: &str, now: u64, id: &str) -> String {
    let signed = format!("{}.{id}", now + SESSION_SECS);
    let tag = URL_SAFE_NO_PAD.encode(mac(api_key, "session", &signed));
    format!("{signed}.{tag}")
}

/// What the page calls a session: a digest of its id, so the list of sessions never shows an
/// id (half of someone's cookie) to whoever reads the page.
fn handle(id: &str) -> String {
    use sha2::Digest;
    let digest = Sha256::new()
        .chain_update(b"operator session handle:")
        .chain_update(id.as_bytes())
        .finalize();
    URL_SAFE_NO_PAD.encode(&digest[..9])
}

/// The session id in a cookie value [`session`] accepted.
fn id_of(session: &str) -> &str {
    session.split('.').nth(1).unwrap_or_default()
}

/// The cookie's session, if it is signed under the API key, not expired, and open in the
/// store. A store that does not answer opens nothing.
async fn live_session(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let key = state.settings.security.api_key.expose();
    let value = session(key, headers, unix_now())?;
    match state.store.session_live(id_of(&value)).await {
        Ok(true) => Some(value),
        _ => None,
    }
}

/// The session cookie's value, if it holds a live session signed under `api_key`.
fn session(api_key: &str, headers: &HeaderMap, now: u64) -> Option<String> {
    if api_key.is_empty() {
        return None;
    }
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
        .next()?
        .to_string();
    let (signed, tag) = value.rsplit_once('.')?;
    let (expires, id) = signed.split_once('.')?;
    let at: u64 = expires.parse().ok()?;
    if at <= now || at > now + SESSION_SECS || id.is_empty() {
        return None;
    }
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    let expected = mac(api_key, "session", signed);
    bool::from(tag.ct_eq(&expected)).then_some(value)
}

fn csrf_token(api_key: &str, session: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(api_key, "csrf", session))
}

fn csrf_ok(api_key: &str, session: &str, presented: &str) -> bool {
    bool::from(
        csrf_token(api_key, session)
            .as_bytes()
            .ct_eq(presented.as_bytes()),
    )
}

/// Whether the page is served over TLS (so the cookie must be `Secure`).
fn over_tls(state: &AppState, headers: &HeaderMap) -> bool {
    let t = &state.settings.twilio;
    t.public_url.starts_with("https://")
        || (t.trust_forwarded_headers
            && headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/admin; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("cookie text is ASCII")
}

// ---- rendering ------------------------------------------------------------------------------

fn html(status: StatusCode, body: Result<String, askama::Error>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "operator page could not be rendered");
            return (StatusCode::INTERNAL_SERVER_ERROR, "page error").into_response();
        }
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[derive(Template)]
#[template(path = "admin/no_key.html")]
struct NoKey;

#[derive(Template)]
#[template(path = "admin/login.html")]
struct Login<'a> {
    error: Option<&'a str>,
}

/// One live call as the page shows it.
struct LiveCall {
    call_sid: String,
    stream_sid: String,
    caller: String,
    started: String,
    duration: String,
    backends: Vec<BackendSnapshot>,
    quality: crate::media::quality::CallQuality,
    /// A live hand-off under way or done.
    handoff: Option<String>,
}

struct RecentCall {
    call_sid: String,
    caller: String,
    started: String,
    duration: String,
    outcome: String,
    trouble: bool,
    /// What Twilio reported about the stream, when it sent status callbacks.
    twilio: String,
    /// Where a live hand-off took the call (`moved to MZ…`, `moved in from MZ…`), or empty.
    handoff: String,
}

/// A stream Twilio reported on, as the page lists it.
struct ReportRow {
    stream_sid: String,
    call_sid: String,
    reached: &'static str,
    events: String,
    /// An error, or a stream that reached no instance.
    trouble: bool,
}

/// Twilio's events for a stream, in a few words: `started, stopped`, `error 31920`.
fn events_text(events: &[crate::media::reports::Reported]) -> String {
    events
        .iter()
        .map(|e| {
            let word = e.event.trim_start_matches("stream-");
            match (e.error_code, &e.error) {
                (Some(code), _) => format!("{word} {code}"),
                (None, Some(text)) => format!("{word}: {text}"),
                (None, None) => word.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One operator session as the page lists it.
struct SessionRow {
    handle: String,
    since: String,
    until: String,
    client: String,
    /// The session the page is shown to.
    mine: bool,
}

struct BlockedRow {
    caller: String,
    since: String,
    until: String,
    reason: String,
}

struct Health {
    store: String,
    store_ok: bool,
    uptime: String,
    version: &'static str,
    live: usize,
    /// Shutting down: the live calls run to their end, new ones go elsewhere.
    draining: bool,
    /// Wrong PINs over all callers this hour, and whether that is past the alarm level.
    pin_failures_this_hour: i64,
    pin_alarm: bool,
    max_calls: usize,
    signature_failures: u64,
    pin_failures: u64,
    rate_limited: u64,
}

#[derive(Template)]
#[template(path = "admin/live.html")]
struct Live {
    calls: Vec<LiveCall>,
    health: Health,
}

#[derive(Template)]
#[template(path = "admin/dashboard.html")]
struct Dashboard {
    live: Live,
    recent: Vec<RecentCall>,
    reports: Vec<ReportRow>,
    blocked: Option<Vec<BlockedRow>>,
    sessions: Option<Vec<SessionRow>>,
    csrf: String,
    lookup: Option<(String, String)>,
    notice: Option<String>,
}

/// A time the store recorded; sessions opened by a build before 0.2 carry none.
fn known_time(unix: u64) -> String {
    if unix == 0 {
        "(not recorded)".into()
    } else {
        rfc3339(unix)
    }
}

fn duration_text(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn masked(state: &AppState, caller: Option<&str>) -> String {
    match caller {
        Some(c) if !c.is_empty() => mask_caller(c, state.settings.log.mask_callers).to_string(),
        _ => "(withheld)".to_string(),
    }
}

async fn live_view(state: &AppState) -> Live {
    let now = unix_now();
    let calls = state
        .hub
        .snapshot()
        .into_iter()
        .map(|c| LiveCall {
            caller: masked(state, c.caller.as_deref()),
            started: rfc3339(c.started_at),
            duration: duration_text(now.saturating_sub(c.started_at)),
            call_sid: c.call_sid,
            stream_sid: c.stream_sid,
            backends: c.backends,
            quality: c.quality,
            handoff: c.handoff,
        })
        .collect();
    let store_ok = state.store_answers().await;
    let (signature_failures, rate_limited, pin_failures) = state.metrics.headline();
    Live {
        calls,
        health: Health {
            store: format!("{:?}", state.settings.store.kind).to_lowercase(),
            store_ok,
            uptime: duration_text(
                SystemTime::now()
                    .duration_since(state.hub.started())
                    .map_or(0, |d| d.as_secs()),
            ),
            version: env!("CARGO_PKG_VERSION"),
            live: state.hub.live_calls(),
            draining: state.hub.is_draining(),
            pin_failures_this_hour: state.metrics.pin_failures_per_hour.get(),
            pin_alarm: state.gate.alarm_on(),
            max_calls: state.settings.media.max_calls,
            signature_failures,
            pin_failures,
            rate_limited,
        },
    }
}

fn recent_view(state: &AppState, recent: Vec<EndedCall>) -> Vec<RecentCall> {
    recent
        .into_iter()
        .map(|c| RecentCall {
            caller: masked(state, c.caller.as_deref()),
            started: rfc3339(c.started_at),
            duration: duration_text(c.seconds as u64),
            trouble: !matches!(
                c.outcome.as_str(),
                "completed" | "twilio_closed" | "handed_off"
            ),
            twilio: events_text(&c.twilio),
            handoff: c.handoff.unwrap_or_default(),
            outcome: c.outcome,
            call_sid: c.call_sid,
        })
        .collect()
}

// ---- handlers -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct PageQuery {
    /// A caller id whose failed attempts to show.
    attempts: Option<String>,
    /// What the last form did.
    done: Option<String>,
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let key = state.settings.security.api_key.expose();
    if key.is_empty() {
        return html(StatusCode::OK, NoKey.render());
    }
    let Some(session) = live_session(&state, &headers).await else {
        return html(StatusCode::OK, Login { error: None }.render());
    };
    let blocked = state.gate.blocks().await.ok().map(|blocks| {
        blocks
            .into_iter()
            .map(|b| BlockedRow {
                caller: b.caller,
                since: rfc3339(b.blocked_on),
                until: b
                    .expires_at
                    .map(rfc3339)
                    .unwrap_or_else(|| "until removed".into()),
                reason: b.reason.unwrap_or_else(|| "(not recorded)".into()),
            })
            .collect()
    });
    let sessions = state.store.sessions().await.ok().map(|open| {
        let mine = id_of(&session);
        open.into_iter()
            .map(|s| SessionRow {
                handle: handle(&s.id),
                since: known_time(s.opened_at),
                until: known_time(s.expires_at),
                client: if s.client.is_empty() {
                    "(not recorded)".into()
                } else {
                    s.client
                },
                mine: s.id == mine,
            })
            .collect()
    });
    let lookup = match query.attempts.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() && crate::gate::check_caller_id(id).is_ok() => {
            let answer = match state.gate.attempts(id).await {
                Ok(Some(n)) => format!("{n} failed attempt(s)"),
                Ok(None) => "no failed attempts".to_string(),
                Err(_) => "the state store did not answer".to_string(),
            };
            Some((id.to_string(), answer))
        }
        Some(id) if !id.is_empty() => Some((
            "(not a caller id)".to_string(),
            "at most 64 characters, no control characters".to_string(),
        )),
        _ => None,
    };
    let dashboard = Dashboard {
        live: live_view(&state).await,
        recent: recent_view(&state, state.hub.recent()),
        reports: state
            .hub
            .twilio_reports(REPORTS_SHOWN)
            .await
            .into_iter()
            .map(|r| ReportRow {
                trouble: r.reached == Reached::NoInstance
                    || r.events.iter().any(|e| e.error.is_some()),
                reached: r.reached.text(),
                events: events_text(&r.events),
                stream_sid: r.stream_sid,
                call_sid: r.call_sid,
            })
            .collect(),
        blocked,
        sessions,
        csrf: csrf_token(key, &session),
        lookup,
        notice: query
            .done
            .as_deref()
            .and_then(Done::from_code)
            .map(|d| d.text().to_string()),
    };
    html(StatusCode::OK, dashboard.render())
}

async fn live(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if live_session(&state, &headers).await.is_none() {
        return super::ApiError::new(StatusCode::UNAUTHORIZED, "log in at /admin").into_response();
    }
    html(StatusCode::OK, live_view(&state).await.render())
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(
    State(state): State<AppState>,
    Extension(ClientIp(client)): Extension<ClientIp>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let key = state.settings.security.api_key.expose();
    if key.is_empty() {
        return html(StatusCode::FORBIDDEN, NoKey.render());
    }
    if !bool::from(form.key.trim().as_bytes().ct_eq(key.as_bytes())) {
        if state.limits.may_log(client) {
            tracing::warn!(%client, "wrong API key typed into the operator page");
        }
        // The same limit as the apiKey header's: wrong keys slow down, the right one never.
        if let Some(retry) = super::api_key::wrong_key(&state, client).await {
            return Limited(retry).into_response();
        }
        let page = Login {
            error: Some("That is not the API key."),
        };
        return html(StatusCode::FORBIDDEN, page.render());
    }
    let Some(id) = session_id() else {
        return super::ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no randomness for a session",
        )
        .into_response();
    };
    let now = unix_now();
    let opened = OperatorSession {
        id,
        opened_at: now,
        expires_at: now + SESSION_SECS,
        client: client.to_string(),
    };
    if state.store.session_open(&opened).await.is_err() {
        let page = Login {
            error: Some("The state store did not answer: try again shortly."),
        };
        return html(StatusCode::SERVICE_UNAVAILABLE, page.render());
    }
    tracing::info!(%client, "operator logged in to the page");
    let mut r = Redirect::to("/admin").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        cookie(
            &new_session(key, now, &opened.id),
            SESSION_SECS,
            over_tls(&state, &headers),
        ),
    );
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

#[derive(Deserialize)]
struct CallerForm {
    csrf: String,
    #[serde(rename = "callerId")]
    caller_id: String,
}

/// Whether a form comes with a live session and that session's CSRF token; answers the
/// session.
async fn checked(
    state: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<String, super::ApiError> {
    let key = state.settings.security.api_key.expose();
    match live_session(state, headers).await {
        Some(s) if csrf_ok(key, &s, csrf) => Ok(s),
        Some(_) => Err(super::ApiError::new(
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match this session; reload the page",
        )),
        None => Err(super::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "log in at /admin",
        )),
    }
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = match checked(&state, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    // Closed in the store: this cookie and its CSRF token open nothing from now on.
    if state.store.session_close(id_of(&session)).await.is_err() {
        return super::ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state store did not answer: the session is still open; try again",
        )
        .into_response();
    }
    let mut r = Redirect::to("/admin").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        cookie("", 0, over_tls(&state, &headers)),
    );
    r
}

#[derive(Deserialize)]
struct RevokeForm {
    csrf: String,
    /// The [`handle`] of the session to close.
    session: String,
}

/// Closes another operator's session (or one's own, which is a logout): that cookie opens
/// nothing from now on, on any instance.
async fn revoke(
    State(state): State<AppState>,
    Extension(ClientIp(client)): Extension<ClientIp>,
    headers: HeaderMap,
    Form(form): Form<RevokeForm>,
) -> Response {
    let session = match checked(&state, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    let Ok(open) = state.store.sessions().await else {
        return back_with(Done::RevokeFailed);
    };
    let Some(target) = open.into_iter().find(|s| handle(&s.id) == form.session) else {
        return back_with(Done::NotOpen);
    };
    match state.store.session_close(&target.id).await {
        Ok(_) => {}
        Err(_) => return back_with(Done::RevokeFailed),
    }
    tracing::info!(%client, session = %handle(&target.id), "operator session revoked from the page");
    if target.id == id_of(&session) {
        let mut r = Redirect::to("/admin").into_response();
        r.headers_mut().insert(
            header::SET_COOKIE,
            cookie("", 0, over_tls(&state, &headers)),
        );
        return r;
    }
    back_with(Done::Revoked)
}

/// What a form did, as the page says it: only these, chosen by the server. The address
/// carries a code, never text, so a crafted link cannot put words on the operator's page.
#[derive(Clone, Copy)]
enum Done {
    Blocked,
    BadCaller,
    BlockFailed,
    Unblocked,
    NotBlocked,
    UnblockFailed,
    Revoked,
    NotOpen,
    RevokeFailed,
}

impl Done {
    const ALL: [Done; 9] = [
        Done::Blocked,
        Done::BadCaller,
        Done::BlockFailed,
        Done::Unblocked,
        Done::NotBlocked,
        Done::UnblockFailed,
        Done::Revoked,
        Done::NotOpen,
        Done::RevokeFailed,
    ];

    fn code(self) -> &'static str {
        match self {
            Done::Blocked => "blocked",
            Done::BadCaller => "bad-caller",
            Done::BlockFailed => "block-failed",
            Done::Unblocked => "unblocked",
            Done::NotBlocked => "not-blocked",
            Done::UnblockFailed => "unblock-failed",
            Done::Revoked => "revoked",
            Done::NotOpen => "not-open",
            Done::RevokeFailed => "revoke-failed",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Done::Blocked => "Blocked: the caller is on the list below.",
            Done::BadCaller => {
                "Not blocked: a caller id is 1 to 64 characters, no control characters."
            }
            Done::BlockFailed => "Not blocked: the state store did not answer.",
            Done::Unblocked => "Unblocked: the caller may call again.",
            Done::NotBlocked => "That caller was not blocked.",
            Done::UnblockFailed => "Not unblocked: the state store did not answer.",
            Done::Revoked => "Revoked: that session opens nothing any more.",
            Done::NotOpen => "That session is not open (it ended or was revoked already).",
            Done::RevokeFailed => "Not revoked: the state store did not answer.",
        }
    }

    fn from_code(code: &str) -> Option<Done> {
        Done::ALL.into_iter().find(|d| d.code() == code)
    }
}

fn back_with(done: Done) -> Response {
    Redirect::to(&format!("/admin?done={}", done.code())).into_response()
}

async fn block(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CallerForm>,
) -> Response {
    if let Err(refused) = checked(&state, &headers, &form.csrf).await {
        return refused.into_response();
    }
    let caller = form.caller_id.trim();
    if caller.is_empty() || crate::gate::check_caller_id(caller).is_err() {
        return back_with(Done::BadCaller);
    }
    match state.gate.block(caller, "blocked by an operator").await {
        Ok(_) => back_with(Done::Blocked),
        Err(_) => back_with(Done::BlockFailed),
    }
}

async fn unblock(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CallerForm>,
) -> Response {
    if let Err(refused) = checked(&state, &headers, &form.csrf).await {
        return refused.into_response();
    }
    let caller = form.caller_id.trim();
    match state.gate.unblock(caller).await {
        Ok(true) => back_with(Done::Unblocked),
        Ok(false) => back_with(Done::NotBlocked),
        Err(_) => back_with(Done::UnblockFailed),
    }
}

async fn script() -> Response {
    static_file("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    static_file("text/css; charset=utf-8", STYLE)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={value}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn sessions_are_signed_expire_and_die_with_the_key() {
        let now = 1_000_000;
        let s = new_session("key-one", now, "id1");
        assert_eq!(id_of(&s), "id1");
        assert_eq!(
            session("key-one", &with_cookie(&s), now + 10).as_deref(),
            Some(s.as_str())
        );
        assert!(
            session("key-two", &with_cookie(&s), now + 10).is_none(),
            "another key"
        );
        assert!(
            session("key-one", &with_cookie(&s), now + SESSION_SECS).is_none(),
            "expired"
        );
        let (expires, rest) = s.split_once('.').unwrap();
        let stretched = format!("{}.{rest}", expires.parse::<u64>().unwrap() + 3600);
        assert!(
            session("key-one", &with_cookie(&stretched), now).is_none(),
            "forged expiry"
        );
        assert!(
            session("", &with_cookie(&s), now).is_none(),
            "no key, no sessions"
        );
        let token = csrf_token("key-one", &s);
        assert!(csrf_ok("key-one", &s, &token));
        assert!(
            !csrf_ok("key-one", &new_session("key-one", now, "id2"), &token),
            "bound to its session"
        );
        assert!(!csrf_ok("key-one", &s, ""));
    }
}
