//! The caller gate, attacked: signatures computed here by an independent implementation and
//! then bent one byte at a time, PIN floods, blocked callers with the right PIN, forged and
//! stale route tokens, rate limits, operator routes without the key.

mod common;

use std::time::Duration;

use base64::Engine as _;
use call_proxy::config::{Settings, WireFormat};
use call_proxy::gate::route_token;
use common::*;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

const PRIMARY: &str = "primary-auth-token";
const SECONDARY: &str = "secondary-auth-token";
const SHA256_KEY: &str = "a-sha256-signing-key";

// ---- an independent signer, written from Twilio's documentation -----------------------

fn hmac_b64<M: Mac + hmac::digest::KeyInit>(key: &str, data: &str) -> String {
    let mut mac = <M as Mac>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Twilio's data to sign: the URL, then `name + value` for each POST parameter, sorted by
/// name (then value), duplicates removed.
fn data_to_sign(url: &str, params: &[(&str, &str)]) -> String {
    let mut p: Vec<(&str, &str)> = params.to_vec();
    p.sort();
    p.dedup();
    let mut s = url.to_string();
    for (k, v) in p {
        s += k;
        s += v;
    }
    s
}

fn sha1_sig(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    hmac_b64::<Hmac<sha1::Sha1>>(token, &data_to_sign(url, params))
}

fn sha256_sig(key: &str, url: &str, params: &[(&str, &str)]) -> String {
    hmac_b64::<Hmac<sha2::Sha256>>(key, &data_to_sign(url, params))
}

fn hex_sha256(body: &[u8]) -> String {
    sha2::Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn form_body(params: &[(&str, &str)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// A form post to `/validate-pin` carrying the given signature.
async fn post_signed(proxy: &Proxy, params: &[(&str, &str)], sig: &str) -> reqwest::Response {
    post_form(
        proxy,
        "/validate-pin",
        &form_body(params),
        &[("X-Twilio-Signature", sig)],
    )
    .await
}

fn signed_settings() -> Settings {
    let mut s = settings(&[("rec", "ws://127.0.0.1:9/media", WireFormat::Twilio)]);
    s.twilio.validate_signatures = true;
    s.twilio.auth_token = PRIMARY.into();
    s.twilio.secondary_auth_token = SECONDARY.into();
    s.twilio.signing_keys.insert("k1".into(), SHA256_KEY.into());
    s.twilio.max_body_bytes = 1024;
    add_pin(&mut s, "1234", &["rec"]);
    s
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_form(
    proxy: &Proxy,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = client()
        .post(proxy.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn form_posts_signed_by_twilio_pass_and_one_changed_byte_fails() {
    let proxy = Proxy::start(signed_settings()).await;
    let path = "/validate-pin?foo=1&bar=2";
    let url = proxy.url(path);
    let params = [
        ("pin", "1234"),
        ("callerId", "+15550001111"),
        ("Digits", "1234"),
    ];
    let body = form_body(&params);

    let sig = sha1_sig(PRIMARY, &url, &params);
    let r = post_form(&proxy, path, &body, &[("X-Twilio-Signature", &sig)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);

    // The secondary token works too (rotation).
    let sig2 = sha1_sig(SECONDARY, &url, &params);
    let r = post_form(&proxy, path, &body, &[("X-Twilio-Signature", &sig2)]).await;
    assert_eq!(r.status(), 200);

    // One byte changed: in the URL, a parameter, the body sent, or the signature.
    let other_url = proxy.url("/validate-pin?foo=1&bar=3");
    let bad_url_sig = sha1_sig(PRIMARY, &other_url, &params);
    let tampered = body.replace("1234", "1235");
    let mut bad_sig = sig.clone().into_bytes();
    bad_sig[3] = if bad_sig[3] == b'A' { b'B' } else { b'A' };
    let bad_sig = String::from_utf8(bad_sig).unwrap();
    for (what, body, sig) in [
        ("url", body.as_str(), bad_url_sig.as_str()),
        ("body", tampered.as_str(), sig.as_str()),
        ("signature", body.as_str(), bad_sig.as_str()),
        (
            "other token",
            body.as_str(),
            &sha1_sig("another-token", &url, &params),
        ),
    ] {
        let r = post_form(&proxy, path, body, &[("X-Twilio-Signature", sig)]).await;
        assert_eq!(r.status(), 403, "{what}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }

    // Missing signature: 400. Body over the limit: 413.
    let r = post_form(&proxy, path, &body, &[]).await;
    assert_eq!(r.status(), 400);
    let big = form_body(&[("pin", &"9".repeat(2000))]);
    let r = post_form(&proxy, path, &big, &[("X-Twilio-Signature", &sig)]).await;
    assert_eq!(r.status(), 413);

    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_signature_failures_total{scope="mismatch"}"#
        ),
        Some(4.0)
    );
}

#[tokio::test]
async fn repeated_parameters_are_signed_deduplicated_and_sorted() {
    let proxy = Proxy::start(signed_settings()).await;
    let params = [
        ("pin", "0000"),
        ("callerId", "+15550002222"),
        ("tag", "b"),
        ("tag", "a"),
        ("tag", "b"),
    ];
    let sig = sha1_sig(PRIMARY, &proxy.url("/validate-pin"), &params);
    let r = post_signed(&proxy, &params, &sig).await;
    assert_eq!(r.status(), 200);
    // Signing the values in the order sent, without sorting, is not what Twilio does.
    let naive = hmac_b64::<Hmac<sha1::Sha1>>(
        PRIMARY,
        &format!(
            "{}pin0000callerId+15550002222tagbtagatagb",
            proxy.url("/validate-pin")
        ),
    );
    let r = post_signed(&proxy, &params, &naive).await;
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn json_bodies_are_checked_through_body_sha256() {
    let proxy = Proxy::start(signed_settings()).await;
    let body = json!({"pin": "1234", "callerId": "+15550003333"}).to_string();
    let path = format!("/validate-pin?bodySHA256={}", hex_sha256(body.as_bytes()));
    let sig = sha1_sig(PRIMARY, &proxy.url(&path), &[]);
    let send = |path: String, body: String, sig: String| {
        client()
            .post(proxy.url(&path))
            .header("content-type", "application/json")
            .header("X-Twilio-Signature", sig)
            .body(body)
            .send()
    };
    let r = send(path.clone(), body.clone(), sig.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);

    // The same signed URL with another body: refused.
    let other = json!({"pin": "1234", "callerId": "+15550003334"}).to_string();
    let r = send(path.clone(), other.clone(), sig.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A valid URL signature over a hash that is not this body's: refused.
    let wrong_hash = format!("/validate-pin?bodySHA256={}", hex_sha256(b"something else"));
    let sig_wrong = sha1_sig(PRIMARY, &proxy.url(&wrong_hash), &[]);
    let r = send(wrong_hash, body.clone(), sig_wrong).await.unwrap();
    assert_eq!(r.status(), 403);
    // A JSON body with no hash at all: refused.
    let sig_bare = sha1_sig(PRIMARY, &proxy.url("/validate-pin"), &[]);
    let r = send("/validate-pin".into(), body, sig_bare).await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_public_url_with_and_without_its_default_port_and_the_wss_upgrade() {
    let mut s = signed_settings();
    s.twilio.public_url = "https://proxy.example.com".into();
    let proxy = Proxy::start(s).await;
    let params = [("pin", "1234"), ("callerId", "+15550004444")];
    for url in [
        "https://proxy.example.com/validate-pin",
        "https://proxy.example.com:443/validate-pin",
    ] {
        let sig = sha1_sig(PRIMARY, url, &params);
        let r = post_form(
            &proxy,
            "/validate-pin",
            &form_body(&params),
            &[("X-Twilio-Signature", &sig)],
        )
        .await;
        assert_eq!(r.status(), 200, "{url}");
    }
    // The local address is not what Twilio called.
    let sig = sha1_sig(PRIMARY, &proxy.url("/validate-pin"), &params);
    let r = post_signed(&proxy, &params, &sig).await;
    assert_eq!(r.status(), 403);

    // The media upgrade is signed over its wss:// URL, with no parameters.
    for (url, ok) in [
        ("wss://proxy.example.com/media", true),
        ("wss://proxy.example.com/media/", true),
        ("wss://proxy.example.com:443/media", true),
        ("https://proxy.example.com/media", false),
        ("wss://proxy.example.com/medium", false),
    ] {
        let sig = sha1_sig(PRIMARY, url, &[]);
        let result = upgrade(&proxy, &[("X-Twilio-Signature", &sig)]).await;
        assert_eq!(result.is_ok(), ok, "{url}: {result:?}");
        if !ok {
            assert_eq!(result.unwrap_err(), 403);
        }
    }
    assert_eq!(upgrade(&proxy, &[]).await.unwrap_err(), 400);
}

async fn upgrade(proxy: &Proxy, headers: &[(&str, &str)]) -> Result<(), u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = proxy.ws_url().into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn hmac_sha256_with_a_named_key() {
    let proxy = Proxy::start(signed_settings()).await;
    let params = [("pin", "1234"), ("callerId", "+15550005555")];
    let url = proxy.url("/validate-pin");
    let body = form_body(&params);
    let settings = (
        "X-Twilio-Webhooks-Signature-Settings",
        "key=k1,algorithm=HMAC_SHA256",
    );
    let good = sha256_sig(SHA256_KEY, &url, &params);
    let unknown = (
        "X-Twilio-Webhooks-Signature-Settings",
        "key=k2,algorithm=HMAC_SHA256",
    );
    // Accepted; then the wrong key, an unknown key id, or a SHA-1 signature under the
    // SHA-256 header: refused.
    for (sig, header, status) in [
        (good.clone(), settings, 200),
        (sha256_sig("not-the-key", &url, &params), settings, 403),
        (good, unknown, 403),
        (sha1_sig(PRIMARY, &url, &params), settings, 403),
    ] {
        let r = post_form(
            &proxy,
            "/validate-pin",
            &body,
            &[("X-Twilio-Signature", &sig), header],
        )
        .await;
        assert_eq!(r.status(), status, "{header:?}");
    }
}

#[tokio::test]
async fn forwarded_headers_count_only_when_trusted() {
    let forwarded = [
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "calls.example.org"),
    ];
    let params = [("pin", "1234"), ("callerId", "+15550006666")];
    let sig = sha1_sig(PRIMARY, "https://calls.example.org/validate-pin", &params);
    for trusted in [false, true] {
        let mut s = signed_settings();
        s.twilio.trust_forwarded_headers = trusted;
        let proxy = Proxy::start(s).await;
        let mut headers = forwarded.to_vec();
        headers.push(("X-Twilio-Signature", &sig));
        let r = post_form(&proxy, "/validate-pin", &form_body(&params), &headers).await;
        assert_eq!(
            r.status(),
            if trusted { 200 } else { 403 },
            "trusted={trusted}"
        );
    }
}

// ---- PINs, attempts and blocks ---------------------------------------------------------

fn pin_settings() -> Settings {
    let mut s = settings(&[("rec", "ws://127.0.0.1:9/media", WireFormat::Twilio)]);
    add_pin(&mut s, "1234", &["rec"]);
    s.rate_limits.pin_per_caller_per_minute = 0;
    s
}

/// `GET /auth-attempts/{caller}` with the key, as JSON.
async fn attempts_of(proxy: &Proxy, caller: &str) -> Value {
    proxy
        .get_with_key(&format!("/auth-attempts/{caller}"), "test-key")
        .await
        .json()
        .await
        .unwrap()
}

async fn validate(proxy: &Proxy, caller: &str, pin: &str) -> Value {
    let r = client()
        .post(proxy.url("/validate-pin"))
        .json(&json!({"pin": pin, "callerId": caller}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_hundred_concurrent_wrong_pins_count_a_hundred() {
    let mut s = pin_settings();
    s.gate.max_invalid_attempts = 99;
    // Counting per caller alone here; the per-address limit has a test of its own.
    s.gate.max_pin_failures_per_ip = 0;
    let proxy = Proxy::start(s).await;
    let url = proxy.url("/validate-pin");
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                client()
                    .post(url)
                    .json(&json!({"pin": format!("9{i:03}"), "callerId": "+15550007777"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let attempts = attempts_of(&proxy, "+15550007777").await;
    assert_eq!(attempts["attempts"], 100);
    let status = proxy.get("/blocked-callers/+15550007777").await;
    assert_eq!(status.status(), 200, "blocked after the 100th");
    // Blocked: even the right PIN is refused, and not counted.
    let v = validate(&proxy, "+15550007777", "1234").await;
    assert_eq!(v, json!({"authenticated": false, "blocked": true}));
    let attempts = attempts_of(&proxy, "+15550007777").await;
    assert_eq!(attempts["attempts"], 100);
}

#[tokio::test]
async fn the_tenth_failure_blocks_by_default_and_a_good_pin_clears_the_count() {
    let proxy = Proxy::start(pin_settings()).await;
    let caller = "+15550008888";
    for n in 1..=3 {
        let v = validate(&proxy, caller, "0000").await;
        assert_eq!(v["attempts"]["attempts"], n);
    }
    let v = validate(&proxy, caller, "1234").await;
    assert_eq!(v["authenticated"], true);
    assert_eq!(
        v["backendIds"], r#"["rec"]"#,
        "a JSON string, as Studio passes it on"
    );
    assert_eq!(v["backendHosts"], "[]");
    assert!(v["routeToken"].as_str().unwrap().starts_with("v1."));
    assert_eq!(
        proxy
            .get_with_key(&format!("/auth-attempts/{caller}"), "test-key")
            .await
            .status(),
        404,
        "a good PIN clears the count"
    );

    for n in 1..=9 {
        let v = validate(&proxy, caller, "0000").await;
        assert_eq!(
            v,
            json!({"authenticated": false, "blocked": false,
                   "attempts": {"id": caller, "attempts": n, "blocked": false}})
        );
    }
    let v = validate(&proxy, caller, "0000").await;
    assert_eq!(v["blocked"], true, "the 10th failure blocks");
    assert_eq!(v["attempts"]["attempts"], 10);
    let v = validate(&proxy, caller, "1234").await;
    assert_eq!(v, json!({"authenticated": false, "blocked": true}));

    let blocked: Value = proxy
        .get(&format!("/blocked-callers/{caller}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(blocked["id"], caller);
    assert_eq!(blocked["blocked"], true);
    assert!(blocked["blockedOn"].as_str().unwrap().ends_with('Z'));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "call_proxy_pin_failures_total"), Some(13.0));
    assert_eq!(metric(&m, "call_proxy_blocks_total"), Some(1.0));
}

#[tokio::test]
async fn withheld_and_empty_caller_ids_are_always_blocked() {
    let proxy = Proxy::start(pin_settings()).await;
    for caller in ["", "anonymous", "266696687", "+7378742833", "Restricted"] {
        let v = validate(&proxy, caller, "1234").await;
        assert_eq!(
            v,
            json!({"authenticated": false, "blocked": true}),
            "{caller:?}"
        );
    }
    let r = proxy.get("/blocked-callers/266696687").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": "266696687", "withheld": true, "blocked": true})
    );
    let r = proxy.get("/blocked-callers/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"blocked": true}));
    assert_eq!(
        proxy.get("/blocked-callers/+15550009999").await.status(),
        404
    );
}

#[tokio::test]
async fn operators_block_list_and_unblock_with_the_key_only() {
    let proxy = Proxy::start(pin_settings()).await;
    let c = client();
    let caller = "+15551110000";
    let routes: [(reqwest::Method, String); 5] = [
        (reqwest::Method::GET, "/blocked-callers".into()),
        (reqwest::Method::POST, format!("/blocked-callers/{caller}")),
        (
            reqwest::Method::DELETE,
            format!("/blocked-callers/{caller}"),
        ),
        (reqwest::Method::GET, format!("/auth-attempts/{caller}")),
        (reqwest::Method::GET, "/calls".into()),
    ];
    for (method, path) in &routes {
        let r = c
            .request(method.clone(), proxy.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            403,
            "{method} {path} without a key (403, as the original)"
        );
        let r = c
            .request(method.clone(), proxy.url(path))
            .header("apiKey", "nope")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path} with a wrong key");
    }
    assert_eq!(
        proxy.get("/blocked-callers/+15551110000").await.status(),
        404,
        "nothing was blocked by those attempts"
    );

    validate(&proxy, caller, "0000").await;
    let r = c
        .post(proxy.url(&format!("/blocked-callers/{caller}")))
        .bearer_auth("test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let list: Value = proxy
        .get_with_key("/blocked-callers", "test-key")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], caller);
    let r = c
        .delete(proxy.url(&format!("/blocked-callers/{caller}")))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        proxy
            .get_with_key(&format!("/auth-attempts/{caller}"), "test-key")
            .await
            .status(),
        404,
        "unblocking clears the attempts"
    );
    let r = c
        .delete(proxy.url(&format!("/blocked-callers/{caller}")))
        .header("apiKey", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // No key configured: every operator route is closed, whatever is sent.
    let mut s = pin_settings();
    s.security.api_key = "".into();
    let closed = Proxy::start(s).await;
    for (method, path) in &routes {
        let r = c
            .request(method.clone(), closed.url(path))
            .header("apiKey", "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
}

#[tokio::test]
async fn malformed_pin_requests_are_400() {
    let proxy = Proxy::start(pin_settings()).await;
    for body in ["not json", "[1,2]", ""] {
        let r = client()
            .post(proxy.url("/validate-pin"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body:?}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }
    // Studio may send the digits unquoted; a form body works too.
    let r = client()
        .post(proxy.url("/validate-pin"))
        .header("content-type", "application/json")
        .body(r#"{"pin": 1234, "callerId": "+15552220000"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);
    let r = post_form(
        &proxy,
        "/validate-pin",
        "pin=1234&callerId=%2B15552220001",
        &[],
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);
}

// ---- the external PIN service ----------------------------------------------------------

async fn pin_service(answer: Value, status: u16, delay: Duration) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/check",
        post(move |axum::Json(req): axum::Json<Value>| {
            let answer = answer.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut a = answer;
                a["echo"] = req["pin"].clone();
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(a),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/check")
}

#[tokio::test]
async fn the_external_pin_service_decides_and_its_failure_is_503_never_a_pass() {
    let ok = pin_service(
        json!({"authenticated": true, "backendIds": ["rec"], "backendHosts": "[\"127.0.0.1:9\"]"}),
        200,
        Duration::ZERO,
    )
    .await;
    let broken = pin_service(json!({"authenticated": true}), 500, Duration::ZERO).await;
    let slow = pin_service(json!({"authenticated": true}), 200, Duration::from_secs(5)).await;
    for (url, expected) in [(ok, 200), (broken, 503), (slow, 503)] {
        let mut s = pin_settings();
        s.gate.pin_provider = call_proxy::config::PinProviderKind::Http;
        s.gate.pin_service_url = url;
        s.gate.pin_service_timeout_ms = 300;
        let proxy = Proxy::start(s).await;
        let r = client()
            .post(proxy.url("/validate-pin"))
            .json(&json!({"pin": "5555", "callerId": "+15553330000"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
        let v: Value = r.json().await.unwrap();
        if expected == 200 {
            assert_eq!(v["backendIds"], r#"["rec"]"#);
            assert_eq!(v["backendHosts"], r#"["127.0.0.1:9"]"#);
        } else {
            assert!(v["error"].as_str().unwrap().contains("unavailable"));
            assert!(v.get("authenticated").is_none());
        }
    }
}

// ---- route tokens at the stream --------------------------------------------------------

#[tokio::test]
async fn streams_need_a_valid_route_token_for_exactly_their_backends() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    let other = Backend::start(Behaviour::Normal).await;
    let mut s = settings(&[
        ("rec", &rec.url(), WireFormat::Twilio),
        ("other", &other.url(), WireFormat::Twilio),
    ]);
    s.security.require_route_token = true;
    s.rate_limits.pin_per_caller_per_minute = 0;
    add_pin(&mut s, "1234", &["rec"]);
    let secret = s.security.route_token_secret.clone();
    let proxy = Proxy::start(s).await;

    let v = validate(&proxy, "+15554440000", "1234").await;
    let token = v["routeToken"].as_str().unwrap().to_string();
    let mut call = TwilioCall::connect(&proxy, "tok").await;
    call.start(&[("routeToken", &token), ("backendIds", r#"["rec"]"#)])
        .await;
    call.media(&payload(0)).await;
    call.stop().await;
    rec.wait_for_stop().await;
    assert_eq!(payloads(&rec.texts()), [payload(0)]);

    let claims = |ids: &[&str], expires_at: u64| route_token::Claims {
        caller: "+15554440000".into(),
        backend_ids: ids.iter().map(|s| s.to_string()).collect(),
        backend_hosts: vec![],
        expires_at,
        call_sid: None,
        nonce: 1,
        handoff_of: None,
    };
    let now = call_proxy::clock::unix_now();
    let expired = route_token::issue(secret.expose(), &claims(&["rec"], now - 1));
    let foreign = route_token::issue("a-secret-from-elsewhere", &claims(&["rec"], now + 60));
    let truncated = token[..token.len() - 4].to_string();
    let other_host = format!(r#"["{}"]"#, other.addr);
    // FRESH stands for a token just issued: each is good for one stream only.
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![], "route token"),
        (vec![("routeToken", &expired)], "expired"),
        (vec![("routeToken", &foreign)], "signature"),
        (vec![("routeToken", &truncated)], "route token"),
        (vec![("routeToken", &token)], "already used"),
        (
            vec![("routeToken", "FRESH"), ("backendIds", "other")],
            "does not allow",
        ),
        (
            vec![("routeToken", "FRESH"), ("backendIds", "rec,other")],
            "does not allow",
        ),
        (
            vec![("routeToken", "FRESH"), ("backendHosts", &other_host)],
            "does not allow",
        ),
        (
            vec![("routeToken", "FRESH"), ("callerId", "+19990000000")],
            "another caller",
        ),
        (vec![("backendIds", "rec")], "route token"),
    ];
    for (params, why) in cases {
        let fresh = validate(&proxy, "+15554440000", "1234").await["routeToken"]
            .as_str()
            .unwrap()
            .to_string();
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|&(k, v)| (k, if v == "FRESH" { fresh.as_str() } else { v }))
            .collect();
        let mut call = TwilioCall::connect(&proxy, "bad").await;
        call.start(&params).await;
        let frame = call.closed().await.expect("close frame");
        assert_eq!(u16::from(frame.code), 1008, "{params:?}");
        assert!(frame.reason.contains(why), "{params:?}: {}", frame.reason);
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "call_proxy_route_token_failures_total"),
        Some(10.0)
    );
    drop(other);
}

// ---- rate limits -----------------------------------------------------------------------

#[tokio::test]
async fn rate_limits_answer_429_and_recover() {
    let mut s = pin_settings();
    s.rate_limits.http_per_ip_per_minute = 60; // one a second once the burst is spent
    s.rate_limits.http_burst = 3;
    s.rate_limits.upgrades_per_ip_per_minute = 60;
    s.rate_limits.upgrades_burst = 2;
    let proxy = Proxy::start(s).await;
    for _ in 0..3 {
        assert_eq!(proxy.get("/healthz").await.status(), 200);
    }
    let r = proxy.get("/healthz").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry, 1, "one token a second");
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());

    // Upgrades have their own budget.
    for _ in 0..2 {
        assert!(upgrade(&proxy, &[]).await.is_ok());
    }
    assert_eq!(upgrade(&proxy, &[]).await.unwrap_err(), 429);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(proxy.get("/healthz").await.status(), 200, "recovered");
    assert!(upgrade(&proxy, &[]).await.is_ok(), "recovered");
}

#[tokio::test]
async fn pin_attempts_are_limited_per_caller() {
    let mut s = pin_settings();
    s.rate_limits.pin_per_caller_per_minute = 60;
    s.rate_limits.pin_burst = 2;
    let proxy = Proxy::start(s).await;
    let send = |caller: &'static str| {
        client()
            .post(proxy.url("/validate-pin"))
            .json(&json!({"pin": "0000", "callerId": caller}))
            .send()
    };
    assert_eq!(send("+15556660000").await.unwrap().status(), 200);
    assert_eq!(send("+15556660000").await.unwrap().status(), 200);
    let r = send("+15556660000").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        send("+15556661111").await.unwrap().status(),
        200,
        "another caller"
    );
    let attempts = attempts_of(&proxy, "+15556660000").await;
    assert_eq!(
        attempts["attempts"], 2,
        "the limited attempt was not counted"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"call_proxy_rate_limited_total{scope="pin_per_caller"}"#
        ),
        Some(1.0)
    );
}

// ---- PIN guessing across caller ids ----------------------------------------------------

/// A signed form post to `/validate-pin`, as Twilio's Studio sends it (every one from the same
/// address: Twilio's, or the load balancer's).
async fn signed_pin(proxy: &Proxy, pin: &str, caller: &str, call_sid: &str) -> reqwest::Response {
    let params = [("pin", pin), ("callerId", caller), ("callSid", call_sid)];
    let sig = sha1_sig(PRIMARY, &proxy.url("/validate-pin"), &params);
    post_signed(proxy, &params, &sig).await
}

/// Forty callers' wrong PINs, all signed and all from one address, lock nobody out: ten
/// callers with the right PIN all get in afterwards (a per-address limit would have refused
/// them for an hour). The alarm over all callers shows on the gauge and the page.
#[tokio::test]
async fn other_callers_failures_never_lock_out_a_caller_with_the_right_pin() {
    let mut s = signed_settings();
    s.rate_limits.pin_per_caller_per_minute = 0;
    s.gate.max_pin_failures_per_ip = 5;
    s.gate.pin_failure_alarm_per_hour = 30;
    let proxy = Proxy::start(s).await;
    for i in 0..40 {
        let r = signed_pin(
            &proxy,
            "0000",
            &format!("+1555600{i:04}"),
            &format!("CAw{i}"),
        )
        .await;
        assert_eq!(r.status(), 200, "wrong PIN {i}");
        assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], false);
    }
    for i in 0..10 {
        let r = signed_pin(
            &proxy,
            "1234",
            &format!("+1555700{i:04}"),
            &format!("CAr{i}"),
        )
        .await;
        assert_eq!(r.status(), 200, "right PIN {i}");
        assert_eq!(r.json::<Value>().await.unwrap()["authenticated"], true);
    }
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "call_proxy_pin_failures_this_hour"), Some(40.0));
}

/// One call may check at most three PINs, whatever caller id each claims — counted before it
/// is decided, so three hundred at once get three answers, on both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_gets_three_pin_checks_however_it_rotates_and_however_fast() {
    let redis = RedisServer::start();
    for engine in ["memory", "redis"] {
        let mut s = signed_settings();
        s.rate_limits.pin_per_caller_per_minute = 0;
        s.rate_limits.http_per_ip_per_minute = 0;
        if engine == "redis" {
            use_redis(&mut s, &redis, "percall");
        }
        let proxy = Proxy::start(s).await;
        let mut answered = 0;
        for i in 0..10 {
            let r = signed_pin(&proxy, "0000", &format!("+1555800{i:04}"), "CArotate").await;
            match r.status().as_u16() {
                200 => answered += 1,
                429 => assert!(r.headers().contains_key("retry-after")),
                other => panic!("{engine}: {other}"),
            }
        }
        assert_eq!(answered, 3, "{engine}: rotating caller ids");
        // Even the right PIN is not checked once the call has had its three.
        let r = signed_pin(&proxy, "1234", "+15558000099", "CArotate").await;
        assert_eq!(r.status(), 429, "{engine}");

        let proxy = std::sync::Arc::new(proxy);
        let tries = (0..300).map(|i| {
            let proxy = proxy.clone();
            async move {
                signed_pin(&proxy, "0000", &format!("+1555900{i:04}"), "CArace")
                    .await
                    .status()
                    .as_u16()
            }
        });
        let statuses = futures_util::future::join_all(tries).await;
        let checked = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(checked, 3, "{engine}: 300 at once: {statuses:?}");
        assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    }
}
