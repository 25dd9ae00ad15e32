//! The operator page in a real browser: headless Chromium driven over WebDriver
//! (`chromedriver`, which `scripts/test` installs) against the real service on port 0. An
//! operator logs in, watches a live call's two backends, sees one of them fail, blocks and
//! unblocks a caller, and logs out; a wrong key is refused. A screenshot of the page is left
//! at `target/admin-page.png` for a person to look at.

mod common;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use call_proxy::config::WireFormat;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Driver {
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver not found: scripts/test installs chromium and chromium-driver");
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("chromium");
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1100"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

/// The text of the first element `css` finds, once there is one: pages load and the live
/// part is replaced every 2 s, so an element found a moment ago may be gone; look again.
async fn text_of(c: &Client, css: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(element) = c.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "nothing at {css}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks (or types into) the element `css` finds, once the page has one.
async fn on(c: &Client, css: &str, keys: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(element) = c.find(Locator::Css(css)).await {
            let done = match keys {
                Some(k) => element.send_keys(k).await,
                None => element.click().await,
            };
            if done.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "could not use {css}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the page's text satisfies `pred` (the live part refreshes every 2 s).
async fn until_page(c: &Client, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = text_of(c, "main").await;
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn state_of(c: &Client, backend: &str) -> String {
    text_of(c, &format!(r#"tr[data-backend="{backend}"] td.state"#)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_calls_blocks_and_unblocks_in_a_browser() {
    let mut rec = Backend::start(Behaviour::Normal).await;
    // Drops the call's link after 5 frames; with its listener gone too it cannot come back.
    let flaky = Backend::start(Behaviour::DropAfter(5)).await;
    let mut s = settings(&[
        ("recorder", &rec.url(), WireFormat::Twilio),
        ("transcriber", &flaky.url(), WireFormat::Twilio),
    ]);
    s.backends.reconnect_window_ms = 60_000;
    s.backends.reconnect_max_tries = 1000;
    let proxy = Proxy::start(s).await;
    let driver = chromedriver();
    let c = browser(&driver).await;

    // A wrong key is refused.
    c.goto(&proxy.url("/admin")).await.unwrap();
    on(&c, "#key", Some("not-the-key")).await;
    on(&c, "#login", None).await;
    assert!(text_of(&c, "#login-error")
        .await
        .contains("not the API key"));

    // The right one opens the page.
    on(&c, "#key", Some("test-key")).await;
    on(&c, "#login", None).await;
    until_page(&c, "the empty page", |t| t.contains("No call is streaming")).await;

    // A call with two backends appears by itself.
    let mut call = TwilioCall::connect(&proxy, "browser").await;
    call.start(&[
        ("backendIds", "recorder,transcriber"),
        ("callerId", "+15553217654"),
    ])
    .await;
    for i in 0..3 {
        call.media(&payload(i)).await;
    }
    rec.wait_for("frames", |log| payloads(&texts(log)).len() == 3)
        .await;
    until_page(&c, "the live call", |t| {
        t.contains("CAbrowser") && t.contains("transcriber")
    })
    .await;
    assert_eq!(state_of(&c, "recorder").await, "connected");
    // The call's quality, as its session publishes it: Twilio's frames, each backend's lag.
    until_page(&c, "the call's quality", |t| {
        t.contains("From Twilio: 0 frame(s) missing") && t.contains("lag now / worst")
    })
    .await;

    // The transcriber dies: its state changes on the page, in words.
    drop(flaky);
    for i in 3..10 {
        call.media(&payload(i)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = state_of(&c, "transcriber").await;
        if state == "reconnecting" || state == "gone" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the transcriber still shows {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state_of(&c, "recorder").await,
        "connected",
        "the other is fine"
    );
    let shot = c.screenshot().await.unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("admin-page.png"), &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");

    // Twilio's own reports (signatures are off in this config): one for the live call, one
    // for a stream that failed before it reached any instance.
    for (stream, event, error) in [
        ("MZbrowser", "stream-started", None),
        (
            "MZneverarrived",
            "stream-error",
            Some("31920: Stream - WebSocket - Handshake Error"),
        ),
    ] {
        let mut form = vec![
            ("AccountSid", "ACtest"),
            ("CallSid", "CAbrowser"),
            ("StreamSid", stream),
            ("StreamEvent", event),
            ("Timestamp", "2026-12-04T20:00:00Z"),
        ];
        form.extend(error.map(|e| ("StreamError", e)));
        let r = reqwest::Client::new()
            .post(proxy.url("/twilio/stream-status"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    c.goto(&proxy.url("/admin")).await.unwrap();
    let reports = text_of(&c, "#twilio-reports").await;
    for expected in [
        "MZneverarrived",
        "error 31920",
        "reached no instance",
        "MZbrowser",
        "reached this instance",
    ] {
        assert!(reports.contains(expected), "{expected} in:\n{reports}");
    }

    // Block a caller, then unblock them, while the caller waits on the line.
    on(&c, "#block-caller", Some("+15550004444")).await;
    on(&c, "#block", None).await;
    until_page(&c, "the blocked caller", |t| {
        t.contains("Blocked: the caller is on the list below.") && t.contains("+15550004444")
    })
    .await;
    assert_eq!(
        proxy.get("/blocked-callers/+15550004444").await.status(),
        200
    );
    on(
        &c,
        r#"tr[data-blocked="+15550004444"] button.unblock"#,
        None,
    )
    .await;
    until_page(&c, "the unblock", |t| {
        t.contains("Unblocked: the caller may call again.")
    })
    .await;
    assert_eq!(
        proxy.get("/blocked-callers/+15550004444").await.status(),
        404
    );

    // Log out: back to the login form.
    on(&c, "#logout", None).await;
    until_page(&c, "the login form again", |t| t.contains("API key")).await;
    call.stop().await;
    c.close().await.unwrap();
}
