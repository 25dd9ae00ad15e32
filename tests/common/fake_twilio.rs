//! Twilio for the hand-off tests: calls whose audio runs in real time, each streamed to any
//! number of Media Streams at once (the same frame to every stream at the same moment, as
//! Twilio does while two streams of one call overlap); a REST API that starts a stream on a
//! live call (opening its WebSocket to the given `Url` with the given parameters) and stops
//! one (its `stop`, then the close); and a tiny load balancer that sends each connection to
//! the first instance whose `/readyz` answers 200.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use call_proxy::twilio::messages::outbound;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::payload;

pub const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "fake-twilio-auth-token";

/// How the REST API answers a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Starts the stream, as Twilio does.
    Normal,
    /// Answers 500, as an outage would.
    Fail,
    /// Answers 201 but never opens the WebSocket.
    NeverConnect,
}

/// A REST request as the fake received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub authorization: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Request {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The stream parameters of a create (`ParameterN.Name`/`ParameterN.Value`).
    pub fn parameters(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for n in 1..=99 {
            let (Some(k), Some(v)) = (
                self.field(&format!("Parameter{n}.Name")),
                self.field(&format!("Parameter{n}.Value")),
            ) else {
                break;
            };
            out.insert(k.to_string(), v.to_string());
        }
        out
    }
}

/// One stream of a call: where its frames go.
struct Stream {
    sid: String,
    to: mpsc::UnboundedSender<Outgoing>,
}

enum Outgoing {
    Media(usize),
    /// `stop`, then the close.
    Stop,
}

struct Call {
    sid: String,
    streams: Mutex<Vec<Stream>>,
}

pub struct FakeTwilio {
    pub addr: SocketAddr,
    calls: Mutex<HashMap<String, Arc<Call>>>,
    pub requests: Mutex<Vec<Request>>,
    mode: Mutex<Mode>,
    next_sid: AtomicU64,
}

impl FakeTwilio {
    pub async fn start() -> Arc<FakeTwilio> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(FakeTwilio {
            addr: listener.local_addr().unwrap(),
            calls: Default::default(),
            requests: Default::default(),
            mode: Mutex::new(Mode::Normal),
            next_sid: AtomicU64::new(1),
        });
        let app = axum::Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Calls/{call}/Streams.json",
                axum::routing::post(create),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Calls/{call}/Streams/{file}",
                axum::routing::post(update),
            )
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn sid(&self, prefix: &str) -> String {
        format!(
            "{prefix}{:032x}",
            self.next_sid.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A call of `frames` frames (20 ms each) whose first stream goes to `url` with `params`.
    /// Its audio starts now; every stream gets the frame due at each moment.
    pub async fn call(
        self: &Arc<Self>,
        url: &str,
        params: &[(&str, &str)],
        frames: usize,
    ) -> String {
        let call = Arc::new(Call {
            sid: self.sid("CA"),
            streams: Mutex::new(Vec::new()),
        });
        self.calls
            .lock()
            .unwrap()
            .insert(call.sid.clone(), call.clone());
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.open_stream(&call, url, &params)
            .await
            .expect("the first stream opens");
        let sid = call.sid.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            for i in 0..frames {
                let due = began + Duration::from_millis(20 * i as u64);
                tokio::time::sleep_until(due.into()).await;
                for s in call.streams.lock().unwrap().iter() {
                    let _ = s.to.send(Outgoing::Media(i));
                }
            }
            for s in call.streams.lock().unwrap().drain(..) {
                let _ = s.to.send(Outgoing::Stop);
            }
        });
        sid
    }

    /// Opens a stream of `call` to `url`: `connected`, `start`, then the call's frames from
    /// the current one on. Answers its sid.
    async fn open_stream(
        self: &Arc<Self>,
        call: &Arc<Call>,
        url: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| e.to_string())?;
        let sid = self.sid("MZ");
        ws.send(Message::Text(outbound::connected().into()))
            .await
            .map_err(|e| e.to_string())?;
        let start = outbound::start(
            1,
            &outbound::StartInfo {
                account_sid: ACCOUNT,
                call_sid: &call.sid,
                stream_sid: &sid,
                tracks: &["inbound"],
                custom_parameters: params,
            },
        );
        ws.send(Message::Text(start.into()))
            .await
            .map_err(|e| e.to_string())?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        call.streams.lock().unwrap().push(Stream {
            sid: sid.clone(),
            to: tx,
        });
        let (call_sid, stream_sid) = (call.sid.clone(), sid.clone());
        tokio::spawn(async move {
            let (mut write, mut read) = ws.split();
            // What the proxy sends is read and dropped, so its close is seen.
            tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
            let mut seq = 2u64;
            let mut chunk = 1u64;
            while let Some(out) = rx.recv().await {
                let text = match out {
                    Outgoing::Media(i) => {
                        let text = outbound::media(
                            seq,
                            &stream_sid,
                            "inbound",
                            chunk,
                            (chunk - 1) * 20,
                            &payload(i),
                        );
                        chunk += 1;
                        text
                    }
                    Outgoing::Stop => {
                        let stop = outbound::stop(seq, ACCOUNT, &call_sid, &stream_sid);
                        let _ = write.send(Message::Text(stop.into())).await;
                        let _ = write.close().await;
                        return;
                    }
                };
                seq += 1;
                if write.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
        });
        Ok(sid)
    }

    /// Stops a stream as Twilio does when asked: `stop` on it, then the close.
    fn stop_stream(&self, call_sid: &str, sid: &str) -> bool {
        let Some(call) = self.calls.lock().unwrap().get(call_sid).cloned() else {
            return false;
        };
        let mut streams = call.streams.lock().unwrap();
        let Some(i) = streams.iter().position(|s| s.sid == sid) else {
            return false;
        };
        let _ = streams.remove(i).to.send(Outgoing::Stop);
        true
    }

    fn record(&self, path: String, headers: &HeaderMap, body: &str) -> Request {
        let request = Request {
            path,
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            form: form_urlencoded::parse(body.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        };
        self.requests.lock().unwrap().push(request.clone());
        request
    }

    /// Basic auth with the account sid and the auth token, as the instances are configured.
    fn authorized(request: &Request) -> bool {
        use base64::Engine as _;
        let expected =
            base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{AUTH_TOKEN}"));
        request.authorization.as_deref() == Some(&format!("Basic {expected}"))
    }
}

type Answer = (StatusCode, axum::Json<serde_json::Value>);

fn problem(status: StatusCode, code: u64, message: &str) -> Answer {
    (
        status,
        axum::Json(
            serde_json::json!({"code": code, "message": message, "status": status.as_u16()}),
        ),
    )
}

/// A request recorded as it came, then let through only for the account, with its auth.
fn received(
    fake: &FakeTwilio,
    uri: &axum::http::Uri,
    account: &str,
    headers: &HeaderMap,
    body: &str,
) -> Result<Request, Answer> {
    let request = fake.record(uri.path().to_string(), headers, body);
    if account != ACCOUNT || !FakeTwilio::authorized(&request) {
        return Err(problem(StatusCode::UNAUTHORIZED, 20003, "Authenticate"));
    }
    Ok(request)
}

async fn create(
    State(fake): State<Arc<FakeTwilio>>,
    Path((account, call_sid)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let request = match received(&fake, &uri, &account, &headers, &body) {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let mode = *fake.mode.lock().unwrap();
    if mode == Mode::Fail {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            20500,
            "Internal Server Error",
        );
    }
    let Some(call) = fake.calls.lock().unwrap().get(&call_sid).cloned() else {
        return problem(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    let Some(url) = request.field("Url").map(str::to_string) else {
        return problem(StatusCode::BAD_REQUEST, 21201, "Url is required");
    };
    let params: BTreeMap<String, String> = request.parameters();
    let sid = if mode == Mode::NeverConnect {
        fake.sid("MZ")
    } else {
        match fake.open_stream(&call, &url, &params).await {
            Ok(sid) => sid,
            Err(e) => return problem(StatusCode::BAD_REQUEST, 31920, &e),
        }
    };
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "sid": sid, "account_sid": ACCOUNT, "call_sid": call_sid,
            "name": request.field("Name"), "status": "in-progress",
        })),
    )
}

async fn update(
    State(fake): State<Arc<FakeTwilio>>,
    Path((account, call_sid, file)): Path<(String, String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let request = match received(&fake, &uri, &account, &headers, &body) {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let Some(sid) = file.strip_suffix(".json") else {
        return problem(StatusCode::NOT_FOUND, 20404, "not found");
    };
    if request.field("Status") != Some("stopped") {
        return problem(StatusCode::BAD_REQUEST, 21218, "Status must be stopped");
    }
    if !fake.stop_stream(&call_sid, sid) {
        return problem(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    }
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"sid": sid, "call_sid": call_sid, "status": "stopped"})),
    )
}

/// A TCP load balancer: each connection goes to the first of its instances whose `/readyz`
/// answers 200 at that moment (a draining instance answers 503). Bound first, so its address
/// can be the instances' public URL; it serves once they listen.
pub struct LoadBalancer {
    listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
}

impl LoadBalancer {
    pub async fn bind() -> LoadBalancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        LoadBalancer { listener, addr }
    }

    pub fn serve(self, instances: Vec<SocketAddr>) {
        tokio::spawn(async move {
            while let Ok((mut client, _)) = self.listener.accept().await {
                let instances = instances.clone();
                tokio::spawn(async move {
                    for instance in instances {
                        if ready(instance).await {
                            if let Ok(mut server) = tokio::net::TcpStream::connect(instance).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                            return;
                        }
                    }
                });
            }
        });
    }
}

async fn ready(instance: SocketAddr) -> bool {
    reqwest::get(format!("http://{instance}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
}
