//! One call's audio path, and the hub that admits calls, lists them and drains them at
//! shutdown. `session` owns the Twilio socket and the call's life, `route` picks the backends,
//! `fanout` runs each backend link, `wire` shapes what each backend receives.

/// How much a WebSocket read asks the socket for at once. tungstenite zeroes this much of its
/// read buffer on every read attempt (128 KiB by default), which at 50 small frames a second
/// per call was half the proxy's CPU; a media frame is about 350 bytes, so 4 KiB reads lose
/// nothing and larger messages are simply read in several steps.
pub const READ_CHUNK: usize = 4096;

pub mod capture;
mod door;
pub mod executions;
pub mod fanout;
pub mod handoff;
pub mod link;
pub mod quality;
pub mod reports;
pub mod route;
pub mod session;
pub mod talkback;
mod watch;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::metrics::{BackendLabel, Metrics};
use crate::store::StateStore;
use fanout::LinkShared;
use link::Endpoint;
use std::collections::HashMap;

/// Everything the media path shares between calls.
pub struct MediaHub {
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn StateStore>,
    calls: DashMap<u64, Arc<CallInfo>>,
    /// The live-call count and whether new calls may enter (closed late in a drain).
    door: door::Door,
    /// Whether the descriptors a new call may need are free.
    headroom: crate::descriptors::Headroom,
    /// The Studio executions streaming here, and the task that keeps the store told.
    pub executions: Arc<executions::Executions>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Where this instance listens: never a backend of its own calls.
    local_addr: OnceLock<SocketAddr>,
    /// Sent on every backend upgrade (`X-Call-Proxy-Hop`); an upgrade to `/media` carrying
    /// it came from this very process, a loop however the backend was named.
    instance_id: String,
    /// Every enabled table backend, ready to connect (TLS trust and headers built once).
    endpoints: HashMap<String, Arc<Endpoint>>,
    /// `backendHosts` backends, one endpoint per URL, so they share a connection cap too.
    /// Only allowlisted hosts get here.
    host_endpoints: DashMap<String, Arc<Endpoint>>,
    /// The calls that ended last, newest first, for the operator page.
    recent: std::sync::Mutex<std::collections::VecDeque<EndedCall>>,
    /// What Twilio reported about streams through its status callbacks.
    pub reports: reports::Reports,
    started: SystemTime,
    /// Live hand-off through Twilio's REST API, with `server.handoff` on.
    mover: Option<handoff::Mover>,
}

/// Why the media path could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Backend(#[from] link::SetupError),
    #[error("server.handoff: {0}")]
    Handoff(#[from] crate::twilio::rest::RestError),
}

/// How many ended calls the hub remembers.
const RECENT_CALLS: usize = 100;

/// A call that has ended, as the operator page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct EndedCall {
    pub call_sid: String,
    pub stream_sid: String,
    pub caller: Option<String>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub seconds: f64,
    pub outcome: String,
    pub backends: Vec<BackendSnapshot>,
    /// What Twilio reported about the stream, when it sent status callbacks here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub twilio: Vec<reports::Reported>,
    /// What the call's frames showed (and its answers, with a voice agent).
    pub quality: quality::CallQuality,
    /// Where a live hand-off took the call: `moved to MZ…`, `moved in from MZ…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// The header that marks a backend link's upgrade with the proxy instance that opened it.
pub const HOP_HEADER: &str = "x-call-proxy-hop";

/// A live call as `/calls` shows it.
pub struct CallInfo {
    pub call_sid: String,
    pub stream_sid: String,
    pub caller: Option<String>,
    pub execution_id: Option<String>,
    pub started_at: SystemTime,
    pub links: Vec<Arc<LinkShared>>,
    /// Published by the session at its tick.
    pub quality: std::sync::Mutex<quality::CallQuality>,
    /// Rung by a drain with `server.handoff` on: the call moves to another instance.
    pub move_now: Arc<tokio::sync::Notify>,
    /// Where a live hand-off has the call, for `/calls` and the page.
    pub handoff: std::sync::Mutex<Option<String>>,
}

impl CallInfo {
    pub fn set_handoff(&self, state: Option<String>) {
        *self.handoff.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn handoff(&self) -> Option<String> {
        self.handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Serialize)]
pub struct CallSnapshot {
    pub call_sid: String,
    pub stream_sid: String,
    pub caller: Option<String>,
    pub execution_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub backends: Vec<BackendSnapshot>,
    /// What Twilio reported about the stream, when it sent status callbacks here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub twilio: Vec<reports::Reported>,
    /// What the call's frames showed (and its answers, with a voice agent).
    pub quality: quality::CallQuality,
    /// A live hand-off under way or done: `moving to another instance`, `moved in from MZ…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct BackendSnapshot {
    pub name: String,
    pub format: &'static str,
    pub state: &'static str,
    /// Talks back to the caller.
    pub speaks: bool,
    /// Every frame of the call meant for this backend: sent + dropped + queued.
    pub frames_pushed: u64,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub frames_queued: usize,
    pub reconnects: u32,
    /// How far behind real time its delivery runs, its first frame, the time it was down.
    pub quality: fanout::LinkQualityView,
}

pub use door::Refusal;

/// What `/readyz` answers: whether a load balancer should send this instance new calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// `media.max_calls` are live.
    Full,
    /// Shutting down: live calls go on, new ones belong elsewhere.
    Draining,
}

/// A place among the live calls, held from the upgrade to the end of the session.
pub struct Admission {
    hub: Arc<MediaHub>,
    id: u64,
    /// The descriptors promised to the call's backends, until they connect.
    descriptors: Option<crate::descriptors::Promise>,
}

impl Admission {
    /// The promise of descriptors, one per link (each link gives its back after its first
    /// connection attempt); the rest are given back now.
    pub fn descriptors_for(&mut self, links: usize) -> Vec<crate::descriptors::Promise> {
        self.descriptors
            .take()
            .map_or_else(Vec::new, |p| p.split(links))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((_, call)) = self.hub.calls.remove(&self.id) {
            if let Some(execution) = &call.execution_id {
                self.hub.executions.ended(execution, &call.stream_sid);
            }
        }
        self.hub.metrics.live_calls.dec();
        self.hub.door.leave();
    }
}

impl MediaHub {
    pub fn new(
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        store: Arc<dyn StateStore>,
    ) -> Result<Arc<Self>, SetupError> {
        let endpoints = link::endpoints(&settings.backends)?;
        let mover = handoff::Mover::new(&settings)?;
        let instance_id = instance_id();
        let headroom = crate::descriptors::Headroom::new(settings.media.max_backends_per_call);
        // The writer task ends by itself once the hub is gone.
        let (executions, _writer) = executions::Executions::new(
            store.clone(),
            Duration::from_millis(settings.store.execution_ttl_ms),
            &instance_id,
        );
        Ok(Arc::new(MediaHub {
            settings,
            metrics,
            store,
            calls: DashMap::new(),
            door: door::Door::default(),
            headroom,
            executions,
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            local_addr: OnceLock::new(),
            instance_id,
            endpoints,
            host_endpoints: DashMap::new(),
            recent: Default::default(),
            reports: Default::default(),
            started: SystemTime::now(),
            mover,
        }))
    }

    /// How to reach a route's target: the table's prepared endpoint, or a plain `ws://` one
    /// for a host the stream named.
    pub fn endpoint(&self, target: &route::Target) -> Arc<Endpoint> {
        match self
            .endpoints
            .get(&target.name)
            .filter(|_| target.from_table)
        {
            Some(endpoint) => endpoint.clone(),
            None => self
                .host_endpoints
                .entry(target.url.clone())
                .or_insert_with(|| {
                    Arc::new(Endpoint::plain(
                        target.url.clone(),
                        self.settings.backends.max_connecting,
                    ))
                })
                .clone(),
        }
    }

    pub fn set_local_addr(&self, addr: SocketAddr) {
        let _ = self.local_addr.set(addr);
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr.get().copied()
    }

    /// Hand-offs through Twilio's REST API, when `server.handoff` is on.
    pub fn mover(&self) -> Option<&handoff::Mover> {
        self.mover.as_ref()
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// When this instance started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// Remembers a call that ended (the last `RECENT_CALLS`), while its entry is still live.
    fn record_ended(&self, admission: &Admission, outcome: crate::metrics::Outcome) {
        let Some(info) = self.calls.get(&admission.id).map(|c| c.value().clone()) else {
            return;
        };
        let ended = EndedCall {
            call_sid: info.call_sid.clone(),
            stream_sid: info.stream_sid.clone(),
            caller: info.caller.clone(),
            started_at: crate::clock::unix_secs(info.started_at),
            seconds: info.started_at.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            outcome: format!("{outcome:?}"),
            backends: info.links.iter().map(|l| backend_snapshot(l)).collect(),
            twilio: Vec::new(),
            quality: *info.quality.lock().unwrap_or_else(|e| e.into_inner()),
            handoff: info.handoff(),
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_front(ended);
        recent.truncate(RECENT_CALLS);
    }

    /// The calls that ended last, newest first, with what Twilio reported about each.
    pub fn recent(&self) -> Vec<EndedCall> {
        let mut recent: Vec<EndedCall> = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for call in &mut recent {
            call.twilio = self.reports.events_for(&call.stream_sid);
        }
        recent
    }

    /// A stream's first message reached this instance: a shared store remembers it, so that
    /// any instance can tell a stream Twilio reported from one that reached nobody. Written
    /// beside the call, never awaited by it.
    pub fn stream_arrived(&self, stream_sid: &str) {
        // One instance alone knows its own streams from its live and recent calls; the note
        // is for other instances sharing the store.
        if self.settings.store.kind == crate::config::StoreKind::Memory {
            return;
        }
        let store = self.store.clone();
        let key = format!("stream:{stream_sid}");
        self.tracker.spawn(async move {
            if let Err(e) = store.claim_once(&key, reports::SEEN_FOR).await {
                tracing::debug!(error = %e, "could not note the stream's arrival in the store");
            }
        });
    }

    /// Twilio's reports on the newest `limit` streams, each placed: here, on another instance,
    /// or nowhere.
    pub async fn twilio_reports(&self, limit: usize) -> Vec<reports::StreamReport> {
        let here = |sid: &str| {
            self.calls.iter().any(|c| c.stream_sid == sid)
                || self
                    .recent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|c| c.stream_sid == sid)
        };
        let store = self.store.clone();
        self.reports
            .view(limit, here, move |sid| {
                let store = store.clone();
                async move { store.is_claimed(&format!("stream:{sid}")).await.ok() }
            })
            .await
    }

    /// Takes a place for a new stream, or says why there is none: `media.max_calls` are
    /// live, the instance is draining and no longer admits calls, or the process is short of
    /// the file descriptors the call and its backends would need.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refusal> {
        self.door.enter(self.settings.media.max_calls)?;
        let Some(descriptors) = self.headroom.promise() else {
            self.door.leave();
            return Err(Refusal::Descriptors);
        };
        self.metrics.live_calls.inc();
        Ok(Admission {
            hub: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            descriptors: Some(descriptors),
        })
    }

    /// Calls holding a place: streaming, or admitted and not yet started.
    pub fn live_calls(&self) -> usize {
        self.door.live()
    }

    /// Whether this instance wants new calls: not draining and below `media.max_calls`.
    pub fn readiness(&self) -> Readiness {
        if self.door.is_draining() {
            Readiness::Draining
        } else if self.door.live() >= self.settings.media.max_calls {
            Readiness::Full
        } else {
            Readiness::Ready
        }
    }

    pub fn is_draining(&self) -> bool {
        self.door.is_draining()
    }

    /// The first step of a drain: readiness turns 503 at once; calls are still admitted
    /// until [`close_door`](Self::close_door), and every live call runs to its own end.
    pub fn begin_drain(&self) {
        self.door.begin_drain();
        self.metrics.draining.set(1);
    }

    /// With `server.handoff` on: asks every live call to move to a ready instance (each one
    /// that can: no speaking backend). A call that starts later in the drain moves at once.
    pub fn hand_off_calls(&self) {
        if self.mover.is_none() {
            return;
        }
        for call in self.calls.iter() {
            call.move_now.notify_one();
        }
    }

    /// From now on, new streams are refused (503 with `Retry-After`).
    pub fn close_door(&self) {
        self.door.close();
    }

    pub fn door_closed(&self) -> bool {
        self.door.is_closed()
    }

    /// Waits for the last live call to end, and closes the door in the same step.
    pub async fn closed_and_idle(&self) {
        self.door.closed_and_idle().await
    }

    /// Lists a started call; its execution (if any) reads as live from now until the
    /// admission is given back.
    fn register(&self, admission: &Admission, info: Arc<CallInfo>) {
        if let Some(execution) = &info.execution_id {
            self.executions.started(execution, &info.stream_sid);
        }
        self.calls.insert(admission.id, info);
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tells every session to end (each sends `stop` to its backends and closes its Twilio
    /// socket), then waits for them up to `deadline`. Answers whether everything finished.
    pub async fn shut_down(&self, deadline: Duration) -> bool {
        self.door.close();
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }

    /// The live calls that have started, oldest first.
    pub fn snapshot(&self) -> Vec<CallSnapshot> {
        let mut calls: Vec<CallSnapshot> = self
            .calls
            .iter()
            .map(|entry| {
                let c = entry.value();
                CallSnapshot {
                    call_sid: c.call_sid.clone(),
                    stream_sid: c.stream_sid.clone(),
                    caller: c.caller.clone(),
                    execution_id: c.execution_id.clone(),
                    started_at: crate::clock::unix_secs(c.started_at),
                    backends: c.links.iter().map(|l| backend_snapshot(l)).collect(),
                    twilio: self.reports.events_for(&c.stream_sid),
                    quality: *c.quality.lock().unwrap_or_else(|e| e.into_inner()),
                    handoff: c.handoff(),
                }
            })
            .collect();
        calls.sort_by_key(|c| c.started_at);
        calls
    }

    /// Sets the queued-frames gauge from the live calls; called before each scrape so the
    /// per-frame path never touches a shared gauge.
    pub fn refresh_queue_gauges(&self) {
        let mut totals: std::collections::HashMap<String, i64> = Default::default();
        for entry in self.calls.iter() {
            for link in &entry.value().links {
                *totals.entry(link.metrics_label.clone()).or_default() += link.queue.len() as i64;
            }
        }
        self.metrics.frames_queued.clear();
        for (backend, n) in totals {
            self.metrics
                .frames_queued
                .get_or_create(&BackendLabel { backend })
                .set(n);
        }
    }
}

/// A random id for this process: loop detection needs only that two processes differ.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded from the operating system's randomness.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

fn backend_snapshot(l: &LinkShared) -> BackendSnapshot {
    // One look under the queue's lock: the three numbers add up to what was pushed.
    let accounts = l.queue.accounts();
    BackendSnapshot {
        name: l.name.clone(),
        format: l.format.as_str(),
        state: l.state().as_str(),
        speaks: l.speaks,
        frames_pushed: accounts.pushed,
        frames_sent: accounts.sent,
        frames_dropped: accounts.dropped,
        frames_queued: accounts.held.frames,
        reconnects: l.reconnects.load(Ordering::Relaxed),
        quality: l.quality.view(l.queue.oldest_waiting()),
    }
}
