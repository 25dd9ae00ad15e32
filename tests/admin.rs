//! The operator page over HTTP: what it shows with and without a key, the login and its
//! cookie, CSRF on every form, blocking and unblocking, the headers that keep it in its lane.
//! (`admin_browser.rs` drives it in a real browser.)

mod common;

use call_proxy::config::WireFormat;
use common::*;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in; answers the `cp_admin=...` pair to send back.
async fn log_in(proxy: &Proxy, key: &str) -> String {
    let r = client()
        .post(proxy.url("/admin/login"))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "a good key is let in");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age="] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP here: {cookie}");
    cookie.split(';').next().unwrap().to_string()
}

async fn page(proxy: &Proxy, cookie: &str) -> String {
    let r = client()
        .get(proxy.url("/admin"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'self'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    r.text().await.unwrap()
}

/// Posts one of the page's forms with the session's cookie.
async fn submit(proxy: &Proxy, path: &str, cookie: &str, fields: &[(&str, &str)]) -> u16 {
    client()
        .post(proxy.url(path))
        .header("cookie", cookie)
        .form(fields)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Posts a form that ends the session it comes with: a redirect that clears the cookie.
async fn logged_out_by(proxy: &Proxy, path: &str, cookie: &str, fields: &[(&str, &str)]) {
    let r = client()
        .post(proxy.url(path))
        .header("cookie", cookie)
        .form(fields)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

fn csrf_of(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).expect("a CSRF field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn without_a_key_the_page_says_how_to_set_one_and_shows_nothing_else() {
    let mut s = settings(&[]);
    s.security.api_key = "".into();
    let proxy = Proxy::start(s).await;
    let html = client()
        .get(proxy.url("/admin"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("No API key is configured") && html.contains("SERVER_API_KEY"));
    assert!(!html.contains("Live calls"));
    let r = client()
        .post(proxy.url("/admin/login"))
        .form(&[("key", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn a_wrong_key_a_forged_cookie_and_a_missing_csrf_token_are_refused() {
    let proxy = Proxy::start(settings(&[])).await;
    let r = client()
        .post(proxy.url("/admin/login"))
        .form(&[("key", "test-kez")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("not the API key"));

    // A cookie made up, or one whose expiry was stretched, is a login page, not the page.
    for forged in ["cp_admin=9999999999.AAAA", "cp_admin=junk"] {
        let html = page(&proxy, forged).await;
        assert!(
            html.contains("Log in") && !html.contains("Live calls"),
            "{forged}"
        );
    }
    let cookie = log_in(&proxy, "test-key").await;
    let (expires, tag) = cookie["cp_admin=".len()..].split_once('.').unwrap();
    let stretched = format!("cp_admin={}.{tag}", expires.parse::<u64>().unwrap() + 3600);
    assert!(page(&proxy, &stretched).await.contains("Log in"));
    let r = client().get(proxy.url("/admin/live")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the live part needs the session too");

    // A form without the session's CSRF token does nothing.
    let html = page(&proxy, &cookie).await;
    let token = csrf_of(&html);
    for csrf in ["", "not-the-token"] {
        let r = client()
            .post(proxy.url("/admin/block"))
            .header("cookie", &cookie)
            .form(&[("csrf", csrf), ("callerId", "+15550001234")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "csrf {csrf:?}");
    }
    // ...and a token without its session neither.
    let r = client()
        .post(proxy.url("/admin/block"))
        .form(&[("csrf", token.as_str()), ("callerId", "+15550001234")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let blocked = proxy.get("/blocked-callers/+15550001234").await;
    assert_eq!(blocked.status(), 404, "nobody was blocked");
}

#[tokio::test]
async fn the_page_shows_live_calls_blocks_unblocks_and_logs_out() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let spk = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("rec", &rec.url(), WireFormat::Twilio),
        ("spk", &spk.url(), WireFormat::Compact),
    ]);
    s.log.mask_callers = true;
    let proxy = Proxy::start(s).await;
    let cookie = log_in(&proxy, "test-key").await;

    let mut call = TwilioCall::connect(&proxy, "page").await;
    call.start(&[("backendIds", "rec,spk"), ("callerId", "+15557654321")])
        .await;
    call.media(&payload(0)).await;
    rec.wait_for("a frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    let html = page(&proxy, &cookie).await;
    assert!(html.contains("CApage") && html.contains(r#"data-backend="rec""#));
    assert!(html.contains(r#"data-backend="spk""#));
    assert!(
        html.contains("+155***21"),
        "the caller masked as the logs mask it"
    );
    assert!(!html.contains("+15557654321"));

    // Block a caller with the form, see it listed with why, unblock it.
    let token = csrf_of(&html);
    assert_eq!(
        submit(
            &proxy,
            "/admin/block",
            &cookie,
            &[("csrf", token.as_str()), ("callerId", "+15550009999")]
        )
        .await,
        303
    );
    assert_eq!(
        proxy.get("/blocked-callers/+15550009999").await.status(),
        200
    );
    let html = page(&proxy, &cookie).await;
    assert!(html.contains(r#"data-blocked="+15550009999""#));
    assert!(html.contains("blocked by an operator"));
    assert_eq!(
        submit(
            &proxy,
            "/admin/unblock",
            &cookie,
            &[("csrf", token.as_str()), ("callerId", "+15550009999")]
        )
        .await,
        303
    );
    assert_eq!(
        proxy.get("/blocked-callers/+15550009999").await.status(),
        404
    );

    // A hostile caller id is escaped, never markup.
    assert_eq!(
        submit(
            &proxy,
            "/admin/block",
            &cookie,
            &[("csrf", token.as_str()), ("callerId", "<script>x</script>")]
        )
        .await,
        303
    );
    let html = page(&proxy, &cookie).await;
    assert!(!html.contains("<script>x</script>"));
    assert!(
        html.contains("&#60;script&#62;x") || html.contains("&lt;script&gt;x"),
        "listed, escaped"
    );

    // The call ends: it is listed among the recent calls, with its outcome.
    call.stop().await;
    rec.wait_for_stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let html = page(&proxy, &cookie).await;
        if html.contains("Recent calls") && html.contains("completed") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ended call never listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    logged_out_by(
        &proxy,
        "/admin/logout",
        &cookie,
        &[("csrf", token.as_str())],
    )
    .await;
    drop(spk);
}

/// A draining instance says so where operators look: the page ("draining — N calls left"),
/// the `draining` gauge, `/readyz`; and the page and the gate routes keep answering.
#[tokio::test]
async fn a_drain_shows_on_the_page_and_in_the_metrics_while_calls_finish() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(settings(&[("rec", &rec.url(), WireFormat::Twilio)])).await;
    let cookie = log_in(&proxy, "test-key").await;
    assert!(page(&proxy, &cookie).await.contains("taking calls"));
    assert_eq!(
        metric(&proxy.metrics().await, "call_proxy_draining"),
        Some(0.0)
    );

    let mut call = TwilioCall::connect(&proxy, "draining").await;
    call.start(&[("backendIds", "rec")]).await;
    call.media(&payload(0)).await;
    rec.wait_for("a frame", |log| payloads(&texts(log)).len() == 1)
        .await;
    proxy.drain();
    proxy.wait_status("/readyz", 503, WAIT).await;
    let html = page(&proxy, &cookie).await;
    assert!(html.contains("draining — 1 call left"), "{html}");
    assert_eq!(
        metric(&proxy.metrics().await, "call_proxy_draining"),
        Some(1.0)
    );
    assert_eq!(
        proxy.get("/blocked-callers/+15550001111").await.status(),
        404,
        "the gate still answers"
    );

    // The call goes on through the drain and ends by itself; then `run` returns.
    for i in 1..20 {
        call.media(&payload(i)).await;
    }
    call.stop().await;
    assert_eq!(call.closed().await.map(|f| u16::from(f.code)), Some(1000));
    proxy.drained().await;
    rec.wait_for_stop().await;
    assert_eq!(
        payloads(&rec.texts()),
        (0..20).map(payload).collect::<Vec<_>>()
    );
}

/// Wrong PINs over all callers past the alarm level put a banner on the page.
#[tokio::test]
async fn the_pin_alarm_shows_as_a_banner() {
    let mut s = settings(&[]);
    s.gate.pin_failure_alarm_per_hour = 2;
    s.rate_limits.pin_per_caller_per_minute = 0;
    let proxy = Proxy::start(s).await;
    let cookie = log_in(&proxy, "test-key").await;
    assert!(!page(&proxy, &cookie).await.contains("pin-alarm"));
    for i in 0..3 {
        let r = client()
            .post(proxy.url("/validate-pin"))
            .json(&serde_json::json!({"pin": "0000", "callerId": format!("+1555123000{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let html = page(&proxy, &cookie).await;
    assert!(html.contains(r#"id="pin-alarm""#), "{html}");
    assert!(html.contains("3 wrong PINs over all callers this hour"));
}

/// The page says only what the server chose: a crafted `done=` link puts no words on it.
#[tokio::test]
async fn a_crafted_notice_in_the_address_shows_nothing() {
    let proxy = Proxy::start(settings(&[])).await;
    let cookie = log_in(&proxy, "test-key").await;
    let r = client()
        .get(proxy.url("/admin?done=Your%20session%20expired%2C%20call%20%2B1-900-555-0100"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(!html.contains("session expired"), "{html}");
    let r = client()
        .get(proxy.url("/admin?done=blocked"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Blocked: the caller is on the list below."));
}

/// Sessions live in the store: after logout the old cookie and its CSRF token open nothing,
/// while another operator's session goes on.
#[tokio::test]
async fn logout_closes_the_session_for_good_and_only_that_one() {
    let proxy = Proxy::start(settings(&[])).await;
    let mine = log_in(&proxy, "test-key").await;
    let theirs = log_in(&proxy, "test-key").await;
    let token = csrf_of(&page(&proxy, &mine).await);
    assert_eq!(
        submit(&proxy, "/admin/logout", &mine, &[("csrf", token.as_str())]).await,
        303
    );
    let html = page(&proxy, &mine).await;
    assert!(
        html.contains(r#"name="key""#),
        "the login form again: {html}"
    );
    assert_eq!(
        submit(
            &proxy,
            "/admin/block",
            &mine,
            &[("csrf", token.as_str()), ("callerId", "+15550001234")]
        )
        .await,
        401,
        "the old cookie and CSRF token open nothing"
    );
    let r = client()
        .get(proxy.url("/admin/live"))
        .header("cookie", &mine)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        page(&proxy, &theirs).await.contains("Live calls"),
        "the other session goes on"
    );
}

/// The handles of the sessions the page lists, with the one it marks as the reader's own.
fn sessions_of(html: &str) -> (Vec<String>, Option<String>) {
    let mut all = Vec::new();
    let mut mine = None;
    for row in html.split(r#"<tr data-session=""#).skip(1) {
        let handle = row.split('"').next().unwrap().to_string();
        if row.split('>').next().unwrap().contains(r#"class="mine""#) {
            mine = Some(handle.clone());
        }
        all.push(handle);
    }
    (all, mine)
}

/// The page lists every open session (on every instance: the store holds them) and revokes
/// any of them: the revoked cookie opens nothing, the others go on; revoking one's own logs
/// out. A handle that names nothing, or a forged form, closes nothing.
async fn sessions_are_listed_and_revoked(proxy: &Proxy, other_instance: &Proxy) {
    let mine = log_in(proxy, "test-key").await;
    let theirs = log_in(other_instance, "test-key").await;
    let html = page(proxy, &mine).await;
    let (listed, own) = sessions_of(&html);
    assert_eq!(listed.len(), 2, "{html}");
    let own = own.expect("the reader's own session is marked");
    let other = listed.iter().find(|h| **h != own).unwrap().clone();
    assert!(html.contains("127.0.0.1"), "where each login came from");
    assert!(
        !html.contains(mine.split('.').nth(1).unwrap()),
        "the page never shows a session id"
    );
    let token = csrf_of(&html);
    // Without the CSRF token, or with a handle that is no session: nothing closes.
    assert_eq!(
        submit(
            proxy,
            "/admin/revoke",
            &mine,
            &[("csrf", "forged"), ("session", &other)]
        )
        .await,
        403
    );
    assert_eq!(
        submit(
            proxy,
            "/admin/revoke",
            &mine,
            &[("csrf", &token), ("session", "nope")]
        )
        .await,
        303
    );
    assert!(page(other_instance, &theirs).await.contains("Live calls"));
    // Revoked from one instance, refused on the other.
    let r = client()
        .post(proxy.url("/admin/revoke"))
        .header("cookie", &mine)
        .form(&[("csrf", token.as_str()), ("session", other.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/admin?done=revoked");
    assert!(page(other_instance, &theirs)
        .await
        .contains(r#"name="key""#));
    assert_eq!(sessions_of(&page(proxy, &mine).await).0, [own.as_str()]);
    // One's own: a logout.
    logged_out_by(
        proxy,
        "/admin/revoke",
        &mine,
        &[("csrf", token.as_str()), ("session", own.as_str())],
    )
    .await;
    assert!(page(proxy, &mine).await.contains(r#"name="key""#));
}

#[tokio::test]
async fn sessions_are_listed_and_revoked_on_the_memory_engine() {
    let proxy = Proxy::start(settings(&[])).await;
    sessions_are_listed_and_revoked(&proxy, &proxy).await
}

#[tokio::test]
async fn sessions_are_listed_and_revoked_across_instances_on_redis() {
    let redis = RedisServer::start();
    let mut s = settings(&[]);
    use_redis(&mut s, &redis, "sessions");
    let a = Proxy::start(s.clone()).await;
    let b = Proxy::start(s).await;
    sessions_are_listed_and_revoked(&a, &b).await
}

/// One limit for wrong keys, through the `apiKey` header and the login form alike, counted
/// before it is decided: past it wrong keys wait and get 429, and the right key still works
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_are_slowed_by_one_limit_and_the_right_key_is_never_refused() {
    let mut s = settings(&[]);
    s.rate_limits.http_per_ip_per_minute = 0;
    let proxy = std::sync::Arc::new(Proxy::start(s).await);
    // Thirty at once: exactly the limit's twenty are plain refusals.
    let tries = (0..30).map(|_| {
        let proxy = proxy.clone();
        async move {
            client()
                .get(proxy.url("/blocked-callers"))
                .header("apiKey", "guess")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(tries).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        10,
        "{statuses:?}"
    );
    // The form counts against the same limit.
    let r = client()
        .post(proxy.url("/admin/login"))
        .form(&[("key", "another guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // The right key, by header and by form, at once.
    let began = std::time::Instant::now();
    assert_eq!(
        proxy
            .get_with_key("/blocked-callers", "test-key")
            .await
            .status(),
        200
    );
    log_in(&proxy, "test-key").await;
    assert!(began.elapsed() < std::time::Duration::from_millis(500));
}

/// With the store down the limit fails closed: a wrong key is slowed and refused; the right
/// key still works (it needs no store).
#[tokio::test]
async fn the_wrong_key_limit_fails_closed_when_the_store_is_down() {
    let mut redis = RedisServer::start();
    let mut s = settings(&[]);
    use_redis(&mut s, &redis, "keys-down");
    let proxy = Proxy::start(s).await;
    redis.stop();
    let r = client()
        .get(proxy.url("/calls"))
        .header("apiKey", "guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(proxy.get_with_key("/calls", "test-key").await.status(), 200);
}
