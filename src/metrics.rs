//! Every metric the service exports, named in one place, and the Prometheus text encoder.
//!
//! Hot-path counters are plain atomics behind `Counter` handles that each call or backend link
//! fetches once; per-frame work is one relaxed add, never a label lookup.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: Rejection,
}

/// How a call ended, from the service's point of view.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Twilio sent `stop`.
    completed,
    /// The Twilio socket closed or failed without `stop`.
    twilio_closed,
    /// The stream sent nothing for the idle timeout.
    idle_timeout,
    /// The socket sent no `start` within `media.start_timeout_ms`.
    start_timeout,
    /// The upgrade came from this very process (a backend that named the proxy itself).
    refused_loop,
    /// Every backend was gone for good.
    backends_gone,
    /// The service shut down while the call was live.
    shutdown,
    /// The `start` message could be routed to no backend.
    refused_no_backend,
    /// The peer broke the protocol (binary frame, oversized message).
    protocol_error,
    /// Over `media.max_calls`: the upgrade was answered 503.
    refused_capacity,
    /// Draining past its admission window: the upgrade was answered 503.
    refused_draining,
    /// No valid route token where one is needed.
    refused_route_token,
    /// Moved to another stream on a ready instance (a live hand-off).
    handed_off,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabel {
    pub outcome: HandoffOutcome,
}

/// How a live hand-off went, counted by the instance the call leaves.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HandoffOutcome {
    /// The backends switched to the new stream.
    moved,
    /// Twilio's REST API refused or could not be reached; the call stayed.
    rest_failed,
    /// No new stream reached an instance in time; the call stayed.
    timed_out,
    /// The call ended while it was being moved.
    call_ended,
}

/// Why a single message from Twilio was skipped.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejection {
    malformed_json,
    media_before_start,
    duplicate_start,
    invalid_payload,
    unknown_event,
    backend_entry,
    /// Held past its bound while a hand-off's new stream waited for the old one's word.
    held_too_long,
}

/// A Twilio stream status callback: its event, and the Media Streams error code it named
/// (`none` for events without an error, `other` for an error with no such code), so the
/// label's values are a fixed set whatever Twilio's text.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamEventLabel {
    pub event: &'static str,
    pub error_code: String,
}

/// Media quality, measured per call and per link and observed here without per-call labels:
/// what Twilio's frames show, how each backend's delivery runs against real time, and how a
/// voice agent's answers reach the caller.
#[derive(Clone, Debug)]
pub struct Quality {
    /// Per call: frames Twilio skipped (gaps in `chunk`, or jumps in `timestamp`).
    pub frames_missing: Histogram,
    /// Per call: the arrival jitter of Twilio's frames at the call's end (RFC 3550's).
    pub jitter: Histogram,
    /// Per call: the longest time between two of Twilio's frames.
    pub longest_gap: Histogram,
    /// Per link: the most a frame waited between its arrival and its write.
    pub backend_lag: Histogram,
    /// Per link: from the call's start to the backend's first frame.
    pub first_frame: Histogram,
    /// Each time a backend's link was down during a call, until it was up again.
    pub reconnect_gap: Histogram,
    /// Each answer: from the caller's last speech to the agent's first audio on Twilio's socket.
    pub response: Histogram,
    /// Per call: the most audio sent ahead of what the caller has heard.
    pub lead: Histogram,
    /// Each mark: from its write to Twilio to Twilio's echo.
    pub mark_round_trip: Histogram,
    /// Each clear: from the speaker's message to its write to Twilio.
    pub clear: Histogram,
}

impl Quality {
    fn new() -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        Quality {
            frames_missing: Histogram::new([0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0]),
            jitter: seconds(),
            longest_gap: seconds(),
            backend_lag: seconds(),
            first_frame: seconds(),
            reconnect_gap: seconds(),
            response: seconds(),
            lead: seconds(),
            mark_round_trip: seconds(),
            clear: seconds(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        for (name, help, h) in [
            (
                "twilio_frames_missing",
                "Frames Twilio skipped, per call",
                &self.frames_missing,
            ),
            (
                "twilio_jitter_seconds",
                "Arrival jitter of Twilio's frames, per call",
                &self.jitter,
            ),
            (
                "twilio_longest_gap_seconds",
                "The longest time between two of Twilio's frames, per call",
                &self.longest_gap,
            ),
            (
                "backend_lag_seconds",
                "The most a frame waited for its backend, per link",
                &self.backend_lag,
            ),
            (
                "backend_first_frame_seconds",
                "From a call's start to a backend's first frame, per link",
                &self.first_frame,
            ),
            (
                "backend_reconnect_gap_seconds",
                "Each time a backend link was down during a call",
                &self.reconnect_gap,
            ),
            (
                "talkback_response_seconds",
                "From the caller's last speech to the agent's first audio, per answer",
                &self.response,
            ),
            (
                "talkback_lead_seconds",
                "The most audio sent ahead of what the caller has heard, per call",
                &self.lead,
            ),
            (
                "talkback_mark_round_trip_seconds",
                "From a mark's write to Twilio to its echo",
                &self.mark_round_trip,
            ),
            (
                "talkback_clear_seconds",
                "From a speaker's clear to its write to Twilio",
                &self.clear,
            ),
        ] {
            registry.register(name, help, h.clone());
        }
    }
}

/// An HTTP request: the route's pattern as the router names it (a fixed set, never the path
/// a client wrote), the method (`other` beyond the usual ones) and the status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub route: String,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabel {
    pub route: String,
    pub method: &'static str,
}

/// From half a millisecond to about 16 s: a page render, a PIN check against a slow PIN
/// service, a signature failure answered after its delay.
fn http_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The process's own figures, read from `/proc` at each scrape (Linux; elsewhere none):
/// CPU seconds, resident and virtual memory, open and allowed descriptors, start time.
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    /// `(cpu seconds, start time in Unix seconds, virtual bytes, resident bytes)`.
    fn stat() -> Option<(f64, f64, f64, f64)> {
        // /proc reports CPU in USER_HZ ticks, 100 a second on Linux whatever the kernel's HZ.
        const TICKS: f64 = 100.0;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
        let cpu = (field(14)? + field(15)?) / TICKS;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let started = boot + field(22)? / TICKS;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
                .map(|k| k * 1024.0)
        };
        Some((cpu, started, kib("VmSize:")?, kib("VmRSS:")?))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((cpu, started, virtual_bytes, resident)) = Self::stat() else {
            return Ok(());
        };
        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            counter.metric_type(),
        )?)?;
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as f64;
        let max = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0.0, |(soft, _)| soft as f64);
        for (name, help, value) in [
            (
                "process_start_time_seconds",
                "When the process started, in Unix seconds",
                started,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                virtual_bytes,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                resident,
            ),
            ("process_open_fds", "Open file descriptors", open),
            ("process_max_fds", "The limit on open file descriptors", max),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    pub scope: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub signature_failures: Family<ScopeLabel, Counter>,
    pub pin_failures: Counter,
    /// Wrong PINs over all callers in the current hour's window (the alarm's count).
    pub pin_failures_per_hour: Gauge,
    pub blocks: Counter,
    pub rate_limited: Family<ScopeLabel, Counter>,
    pub route_token_failures: Counter,
    pub live_calls: Gauge,
    /// 1 from the first shutdown signal until the process exits.
    pub draining: Gauge,
    pub calls: Family<OutcomeLabel, Counter>,
    pub handoffs: Family<HandoffLabel, Counter>,
    pub frames_in: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub frames_out: Family<BackendLabel, Counter>,
    pub frames_dropped: Family<BackendLabel, Counter>,
    /// Refreshed from the live calls at each scrape.
    pub frames_queued: Family<BackendLabel, Gauge>,
    pub backend_connects: Family<BackendLabel, Counter>,
    pub backend_failures: Family<BackendLabel, Counter>,
    pub backend_reconnects: Family<BackendLabel, Counter>,
    pub backend_ignored: Family<BackendLabel, Counter>,
    pub backend_rejected: Family<BackendLabel, Counter>,
    pub backend_misbehaving: Family<BackendLabel, Counter>,
    pub talkback_out: Family<BackendLabel, Counter>,
    pub talkback_dropped: Family<BackendLabel, Counter>,
    pub talkback_cleared: Family<BackendLabel, Counter>,
    pub forward_latency: LatencyHistogram,
    pub twilio_stream_events: Family<StreamEventLabel, Counter>,
    pub capture_lines_dropped: Counter,
    pub quality: Quality,
    pub http_requests: Family<HttpLabel, Counter>,
    pub http_duration: Family<HttpRouteLabel, Histogram, fn() -> Histogram>,
    /// Totals over every label, for the operator page's headline figures.
    signature_failures_total: std::sync::atomic::AtomicU64,
    rate_limited_total: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The service's own metrics under `call_proxy_`; the process's under the names every
        // Prometheus exporter gives them (`process_cpu_seconds_total`, ...).
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("call_proxy");
        let m = Metrics {
            signature_failures: Family::default(),
            pin_failures: Counter::default(),
            pin_failures_per_hour: Gauge::default(),
            blocks: Counter::default(),
            rate_limited: Family::default(),
            route_token_failures: Counter::default(),
            live_calls: Gauge::default(),
            draining: Gauge::default(),
            calls: Family::default(),
            handoffs: Family::default(),
            frames_in: Counter::default(),
            rejected: Family::default(),
            frames_out: Family::default(),
            frames_dropped: Family::default(),
            frames_queued: Family::default(),
            backend_connects: Family::default(),
            backend_failures: Family::default(),
            backend_reconnects: Family::default(),
            backend_ignored: Family::default(),
            backend_rejected: Family::default(),
            backend_misbehaving: Family::default(),
            talkback_out: Family::default(),
            talkback_dropped: Family::default(),
            talkback_cleared: Family::default(),
            twilio_stream_events: Family::default(),
            capture_lines_dropped: Counter::default(),
            quality: Quality::new(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_histogram),
            forward_latency: LatencyHistogram::default(),
            signature_failures_total: Default::default(),
            rate_limited_total: Default::default(),
            registry: Registry::default(),
        };
        registry.register("live_calls", "Calls streaming now", m.live_calls.clone());
        registry.register(
            "pin_failures_this_hour",
            "Wrong PINs over all callers in the current hour's window",
            m.pin_failures_per_hour.clone(),
        );
        registry.register(
            "draining",
            "1 while the instance drains: live calls go on, new ones belong elsewhere",
            m.draining.clone(),
        );
        registry.register("calls", "Calls ended, by outcome", m.calls.clone());
        registry.register(
            "handoffs",
            "Live hand-offs of a draining instance's calls, by outcome",
            m.handoffs.clone(),
        );
        registry.register(
            "frames_in",
            "Media frames received from Twilio",
            m.frames_in.clone(),
        );
        registry.register(
            "rejected_messages",
            "Messages from Twilio skipped, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "backend_frames_out",
            "Messages written to a backend",
            m.frames_out.clone(),
        );
        registry.register(
            "backend_frames_dropped",
            "Media frames dropped because a backend's queue was full",
            m.frames_dropped.clone(),
        );
        registry.register(
            "backend_frames_queued",
            "Messages waiting in backend queues",
            m.frames_queued.clone(),
        );
        registry.register(
            "backend_connects",
            "Successful backend connections",
            m.backend_connects.clone(),
        );
        registry.register(
            "backend_failures",
            "Backend connection attempts that failed and connections that broke",
            m.backend_failures.clone(),
        );
        registry.register(
            "backend_reconnects",
            "Backend connections made again after a failure during a call",
            m.backend_reconnects.clone(),
        );
        registry.register(
            "backend_ignored_messages",
            "Messages from backends that were not forwarded",
            m.backend_ignored.clone(),
        );
        registry.register(
            "backend_rejected_messages",
            "Messages from a speaking backend dropped as malformed (fault=backend)",
            m.backend_rejected.clone(),
        );
        registry.register(
            "backend_misbehaving",
            "Links dropped because a backend that does not speak flooded the proxy",
            m.backend_misbehaving.clone(),
        );
        registry.register(
            "talkback_messages_out",
            "Messages from a speaking backend written to Twilio",
            m.talkback_out.clone(),
        );
        registry.register(
            "talkback_frames_dropped",
            "Speaker media dropped because the queue toward Twilio was full",
            m.talkback_dropped.clone(),
        );
        registry.register(
            "talkback_frames_cleared",
            "Speaker media discarded by a clear before Twilio got it",
            m.talkback_cleared.clone(),
        );
        registry.register(
            "forward_latency_seconds",
            "Time from a frame's arrival to its write to a backend (oldest frame of each batch)",
            m.forward_latency.clone(),
        );
        registry.register(
            "signature_failures",
            "Requests refused for a missing or wrong Twilio signature, by why",
            m.signature_failures.clone(),
        );
        registry.register(
            "twilio_stream_events",
            "Twilio's stream status callbacks, by event and Media Streams error code",
            m.twilio_stream_events.clone(),
        );
        m.quality.register(registry);
        registry.register(
            "capture_lines_dropped",
            "Messages left out of call captures because the disk did not keep up",
            m.capture_lines_dropped.clone(),
        );
        registry.register(
            "build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route (the router's pattern), method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route and method",
            m.http_duration.clone(),
        );
        registry.register("pin_failures", "Wrong PINs", m.pin_failures.clone());
        registry.register("blocks", "Callers blocked", m.blocks.clone());
        registry.register(
            "rate_limited",
            "Requests answered 429, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "route_token_failures",
            "Streams refused for a missing, forged, expired or exceeded route token",
            m.route_token_failures.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Counts one answered HTTP request under its route's pattern (`unmatched` for none).
    pub fn http_answered(
        &self,
        route: &str,
        method: &axum::http::Method,
        status: u16,
        took: std::time::Duration,
    ) {
        let method = match *method {
            axum::http::Method::GET => "GET",
            axum::http::Method::POST => "POST",
            axum::http::Method::DELETE => "DELETE",
            axum::http::Method::HEAD => "HEAD",
            axum::http::Method::PUT => "PUT",
            axum::http::Method::PATCH => "PATCH",
            axum::http::Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        self.http_requests
            .get_or_create(&HttpLabel {
                route: route.to_string(),
                method,
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&HttpRouteLabel {
                route: route.to_string(),
                method,
            })
            .observe(took.as_secs_f64());
    }

    pub fn handoff(&self, outcome: HandoffOutcome) {
        self.handoffs.get_or_create(&HandoffLabel { outcome }).inc();
    }

    pub fn call_ended(&self, outcome: Outcome) {
        self.calls.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Signature failures, rate-limit hits and wrong PINs since start-up, whatever their labels.
    pub fn headline(&self) -> (u64, u64, u64) {
        (
            self.signature_failures_total.load(Ordering::Relaxed),
            self.rate_limited_total.load(Ordering::Relaxed),
            self.pin_failures.get(),
        )
    }

    pub fn signature_failed(&self, scope: &'static str) {
        self.signature_failures_total
            .fetch_add(1, Ordering::Relaxed);
        self.signature_failures
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }

    pub fn limited(&self, scope: &'static str) {
        self.rate_limited_total.fetch_add(1, Ordering::Relaxed);
        self.rate_limited.get_or_create(&ScopeLabel { scope }).inc();
    }

    /// Counts one of Twilio's stream status callbacks.
    pub fn twilio_stream_event(&self, event: &'static str, error: Option<&str>, code: Option<u16>) {
        let error_code = match (error, code) {
            (None, _) => "none".to_string(),
            (Some(_), Some(code)) => code.to_string(),
            (Some(_), None) => "other".to_string(),
        };
        self.twilio_stream_events
            .get_or_create(&StreamEventLabel { event, error_code })
            .inc();
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The handles one backend link updates, fetched once when the link is made.
    pub fn link(&self, backend: &str) -> LinkMetrics {
        let label = BackendLabel {
            backend: backend.to_string(),
        };
        LinkMetrics {
            frames_out: self.frames_out.get_or_create_owned(&label),
            frames_dropped: self.frames_dropped.get_or_create_owned(&label),
            connects: self.backend_connects.get_or_create_owned(&label),
            failures: self.backend_failures.get_or_create_owned(&label),
            reconnects: self.backend_reconnects.get_or_create_owned(&label),
            ignored: self.backend_ignored.get_or_create_owned(&label),
            rejected: self.backend_rejected.get_or_create_owned(&label),
            misbehaving: self.backend_misbehaving.get_or_create_owned(&label),
            talkback_out: self.talkback_out.get_or_create_owned(&label),
            talkback_dropped: self.talkback_dropped.get_or_create_owned(&label),
            talkback_cleared: self.talkback_cleared.get_or_create_owned(&label),
            forward_latency: self.forward_latency.clone(),
            quality: self.quality.clone(),
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone)]
pub struct LinkMetrics {
    pub frames_out: Counter,
    pub frames_dropped: Counter,
    pub connects: Counter,
    pub failures: Counter,
    pub reconnects: Counter,
    pub ignored: Counter,
    pub rejected: Counter,
    pub misbehaving: Counter,
    pub talkback_out: Counter,
    pub talkback_dropped: Counter,
    pub talkback_cleared: Counter,
    pub forward_latency: LatencyHistogram,
    pub quality: Quality,
}

/// Upper bounds of the latency buckets, in seconds: 0.1 ms doubling to about 3.3 s.
const LATENCY_BOUNDS: [f64; 16] = [
    0.000_1, 0.000_2, 0.000_4, 0.000_8, 0.001_6, 0.003_2, 0.006_4, 0.012_8, 0.025_6, 0.051_2,
    0.102_4, 0.204_8, 0.409_6, 0.819_2, 1.638_4, 3.276_8,
];

/// A histogram of plain atomics. The client library's histogram takes a lock on every
/// observation, shared by every backend writer; this one never locks, so the writers of
/// different calls do not queue behind each other on the forwarding path.
#[derive(Clone, Default, Debug)]
pub struct LatencyHistogram {
    inner: Arc<LatencyInner>,
}

#[derive(Default, Debug)]
struct LatencyInner {
    /// One more than the bounds: the last counts everything above them.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

fn bucket_of(elapsed: std::time::Duration) -> usize {
    let secs = elapsed.as_secs_f64();
    LATENCY_BOUNDS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(LATENCY_BOUNDS.len())
}

/// Observations gathered by one writer, to be added to the shared histogram in one go.
#[derive(Default, Debug)]
pub struct LatencyBatch {
    buckets: [u64; LATENCY_BOUNDS.len() + 1],
    sum_ns: u64,
    count: u64,
}

impl LatencyBatch {
    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.buckets[bucket_of(elapsed)] += 1;
        self.sum_ns += elapsed.as_nanos() as u64;
        self.count += 1;
    }
}

impl LatencyHistogram {
    /// Adds a batch and empties it.
    pub fn absorb(&self, batch: &mut LatencyBatch) {
        if batch.count == 0 {
            return;
        }
        for (shared, n) in self.inner.buckets.iter().zip(batch.buckets.iter()) {
            if *n > 0 {
                shared.fetch_add(*n, Ordering::Relaxed);
            }
        }
        self.inner.sum_ns.fetch_add(batch.sum_ns, Ordering::Relaxed);
        self.inner.count.fetch_add(batch.count, Ordering::Relaxed);
        *batch = LatencyBatch::default();
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_histogram_encodes_cumulative_buckets() {
        let m = Metrics::new();
        let mut batch = LatencyBatch::default();
        for ms in [0.05, 1.0, 1.0, 10_000.0] {
            batch.record(Duration::from_secs_f64(ms / 1000.0));
        }
        m.forward_latency.absorb(&mut batch);
        let text = m.encode();
        let line = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
                .to_string()
        };
        assert!(line(r#"call_proxy_forward_latency_seconds_bucket{le="0.0001"}"#).ends_with(" 1"));
        assert!(line(r#"call_proxy_forward_latency_seconds_bucket{le="0.0016"}"#).ends_with(" 3"));
        assert!(line(r#"call_proxy_forward_latency_seconds_bucket{le="+Inf"}"#).ends_with(" 4"));
        assert!(line("call_proxy_forward_latency_seconds_count").ends_with(" 4"));
        let sum: f64 = line("call_proxy_forward_latency_seconds_sum")
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 10.00205).abs() < 1e-6, "{sum}");
    }
}
