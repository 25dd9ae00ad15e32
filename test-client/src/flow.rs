//! Walks the sample Studio Flow against the proxy, the way Twilio would run it for a call:
//! is the caller blocked, validate the PIN, stream with what the PIN returned, and keep the
//! call up while the execution is connected. Every request is signed when an auth token is
//! given, so it works against a production-configured proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use call_proxy::twilio::signature::{self, Algorithm};
use serde_json::{json, Value};

use crate::play::{self, CallReport, CallSpec};

pub struct FlowOptions {
    /// The proxy's media URL (`ws://host:port/media`); HTTP routes are beside it.
    pub url: String,
    pub caller: String,
    pub pin: String,
    /// Signs requests as Twilio does when set.
    pub auth_token: Option<String>,
    /// The URL Twilio would have called (the proxy's `twilio.public_url`), for signing.
    pub public_url: Option<String>,
    pub execution_id: String,
}

/// What the flow walk saw.
#[derive(Debug)]
pub struct FlowReport {
    pub backend_ids: String,
    pub call: CallReport,
    /// Liveness polls answered 200 while streaming.
    pub connected_polls: u32,
    /// Whether `/executions/{id}/connected` turned 410 after the call.
    pub disconnected_after: bool,
}

struct Signer {
    http_base: String,
    ws_url: String,
    signed_http_base: String,
    signed_ws_url: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// Twilio's signature over a URL with no parameters (a GET, or the WebSocket upgrade).
fn sign_url(token: &str, signed_url: &str) -> String {
    let data = signature::signed_data(signed_url, &[]);
    signature::sign(Algorithm::HmacSha1, token.as_bytes(), &data)
}

/// The `X-Twilio-Signature` header Twilio would send on the upgrade to `url`: signed over the
/// proxy's public address when given (what Twilio calls), else over `url` itself.
pub fn upgrade_signature(url: &str, public_url: Option<&str>, token: &str) -> (String, String) {
    let signed = match public_url {
        Some(public) => public_ws_url(public),
        None => url.to_string(),
    };
    (
        signature::SIGNATURE_HEADER.to_string(),
        sign_url(token, &signed),
    )
}

/// `https://host` → `wss://host/media`: the stream URL Twilio signs.
fn public_ws_url(public: &str) -> String {
    let ws = public
        .trim_end_matches('/')
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    format!("{ws}/media")
}

impl Signer {
    fn new(opts: &FlowOptions) -> Result<Signer> {
        let (scheme, rest) = opts
            .url
            .split_once("://")
            .context("--url must be ws://host:port/media or wss://...")?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let http_scheme = if scheme == "wss" { "https" } else { "http" };
        let http_base = format!("{http_scheme}://{authority}");
        let (signed_http_base, signed_ws_url) = match &opts.public_url {
            Some(public) => (
                public.trim_end_matches('/').to_string(),
                public_ws_url(public),
            ),
            None => (http_base.clone(), opts.url.clone()),
        };
        Ok(Signer {
            http_base,
            ws_url: opts.url.clone(),
            signed_http_base,
            signed_ws_url,
            token: opts.auth_token.clone(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    fn signature(&self, signed_url: &str) -> Option<String> {
        Some(sign_url(self.token.as_ref()?, signed_url))
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        let mut request = self.client.get(format!("{}{path}", self.http_base));
        if let Some(sig) = self.signature(&format!("{}{path}", self.signed_http_base)) {
            request = request.header(signature::SIGNATURE_HEADER, sig);
        }
        request
            .send()
            .await
            .with_context(|| format!("GET {path}: the proxy at {} did not answer", self.http_base))
    }

    /// A JSON POST as Twilio signs it: the body's SHA-256 in the URL, the URL signed.
    async fn post_json(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        let bytes = serde_json::to_vec(body)?;
        let path = format!("{path}?bodySHA256={}", signature::body_sha256(&bytes));
        let mut request = self
            .client
            .post(format!("{}{path}", self.http_base))
            .header("content-type", "application/json")
            .body(bytes);
        if let Some(sig) = self.signature(&format!("{}{path}", self.signed_http_base)) {
            request = request.header(signature::SIGNATURE_HEADER, sig);
        }
        request.send().await.with_context(|| {
            format!(
                "POST {path}: the proxy at {} did not answer",
                self.http_base
            )
        })
    }
}

/// Answers how a JSON error body reads, for messages.
async fn describe(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    format!("HTTP {status} {body}")
}

pub async fn run(opts: &FlowOptions, frames: &[Vec<u8>]) -> Result<FlowReport> {
    let signer = Signer::new(opts)?;

    // 1. Is the caller blocked? (200 blocked, 404 not)
    let r = signer
        .get(&format!("/blocked-callers/{}", opts.caller))
        .await?;
    match r.status().as_u16() {
        404 => {}
        200 => bail!("the proxy says caller {} is blocked", opts.caller),
        _ => bail!("blocked-caller check failed: {}", describe(r).await),
    }

    // 2. Validate the PIN.
    let r = signer
        .post_json(
            "/validate-pin",
            &json!({"pin": opts.pin, "callerId": opts.caller}),
        )
        .await?;
    if !r.status().is_success() {
        bail!("PIN validation failed: {}", describe(r).await);
    }
    let answer: Value = r.json().await.context("PIN answer is not JSON")?;
    if answer["authenticated"] != true {
        bail!("PIN refused: {answer}");
    }
    let text = |k: &str| answer[k].as_str().unwrap_or("").to_string();

    // 3. Fork the stream with what the PIN returned, as the flow's Fork Stream widget does.
    let mut spec = CallSpec::new(&signer.ws_url, 0);
    let mut params = BTreeMap::new();
    params.insert("backendIds".to_string(), text("backendIds"));
    params.insert("backendHosts".to_string(), text("backendHosts"));
    params.insert("routeToken".to_string(), text("routeToken"));
    params.insert("executionId".to_string(), opts.execution_id.clone());
    params.insert("callerId".to_string(), opts.caller.clone());
    spec.custom_parameters = params;
    if let Some(sig) = signer.signature(&signer.signed_ws_url) {
        spec.headers
            .push((signature::SIGNATURE_HEADER.to_string(), sig));
    }

    // 4. While it streams, the flow polls the execution's liveness.
    let poll_path = format!("/executions/{}/connected", opts.execution_id);
    let streaming = play::play(&spec, frames);
    tokio::pin!(streaming);
    let mut connected_polls = 0;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let call = loop {
        tokio::select! {
            report = &mut streaming => break report?,
            _ = every.tick() => {
                let r = signer.get(&poll_path).await?;
                match r.status().as_u16() {
                    200 => connected_polls += 1,
                    410 => {}
                    _ => bail!("liveness poll failed: {}", describe(r).await),
                }
            }
        }
    };

    // 5. After the stream ends the execution reads as gone, and the flow hangs up.
    let mut disconnected_after = false;
    for _ in 0..50 {
        if signer.get(&poll_path).await?.status().as_u16() == 410 {
            disconnected_after = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(FlowReport {
        backend_ids: text("backendIds"),
        call,
        connected_polls,
        disconnected_after,
    })
}
