//! The load generator: N Twilio-like calls at real-time pace, each fanned out by the proxy to
//! K sinks hosted here, with the latency the proxy adds measured on every frame.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use call_proxy::twilio::messages::outbound;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::load::{self, Latency, ProcSample, Sink};
use crate::shape::{self, Cursor, Shape, Step};

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub calls: u32,
    pub fanout: u32,
    /// How long all calls stream together, after the ramp.
    pub duration: Duration,
    pub ramp: Duration,
    /// The proxy's pid, for its CPU and memory.
    pub proxy_pid: Option<String>,
    /// Print a progress line every second.
    pub progress: bool,
    /// How the proxy reaches the sinks.
    pub sinks: SinkMode,
    /// With table sinks: the first sink talks back (the proxy's table must say it speaks),
    /// and the callers measure the way back.
    pub speak: bool,
    /// With table sinks: one more sink, `sink<fanout>`, that floods the proxy with junk
    /// (a misbehaving backend that does not speak); the others are measured as usual.
    pub flood: bool,
    /// Latency is reported in two parts: the full-load window up to this long after the ramp
    /// (`latency_before_split`), and after it (`latency`). For a measurement around an event
    /// at that instant, such as a drain.
    pub split_at: Option<Duration>,
    /// Every call takes this captured call's shape (`--replay`): its messages at their
    /// recorded times, looped; otherwise a frame every 20 ms.
    pub shape: Option<Arc<Shape>>,
}

/// How calls name their sinks to the proxy.
#[derive(Debug, Clone, Default)]
pub enum SinkMode {
    /// Free ports, named in `backendHosts` (the proxy needs nothing configured).
    #[default]
    Hosts,
    /// Ports `base_port..base_port + fanout`, named in `backendIds` as `sink0`, `sink1`, ...:
    /// the proxy's backend table must hold them (as `ws://` or, with `tls`, `wss://`).
    Table {
        base_port: u16,
        tls: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Serialize)]
pub struct SinkReport {
    pub port: u16,
    pub received: u64,
    pub lost: u64,
    pub foreign: u64,
}

#[derive(Debug, Serialize)]
pub struct TalkbackReport {
    pub received: u64,
    pub latency: Latency,
}

#[derive(Debug, Serialize)]
pub struct ProcReport {
    /// Average over the full-load window, percent of one core.
    pub cpu_percent: f64,
    pub rss_idle_mib: f64,
    pub rss_full_mib: f64,
    pub rss_end_mib: f64,
    /// RSS every `RSS_EVERY` from the start of the run: seconds since the start, MiB.
    pub rss_series: Vec<(f64, f64)>,
    /// Least-squares slope of RSS over the second half of the full-load window, MiB per
    /// minute: near zero when memory is flat, positive and steady when something leaks.
    pub rss_slope_mib_per_min: Option<f64>,
}

/// How often the proxy's RSS is recorded for the report.
const RSS_EVERY: Duration = Duration::from_secs(10);

/// The captured call every call took the shape of.
#[derive(Debug, Serialize)]
pub struct ShapeReport {
    /// Media frames in one pass of the capture, and how long a pass lasts.
    pub frames_per_pass: usize,
    pub pass_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub calls: u32,
    pub fanout: u32,
    pub duration_s: f64,
    pub ramp_s: f64,
    pub calls_connected: u32,
    /// Calls still streaming when the run ended (not closed or refused by the proxy).
    pub calls_held: u32,
    pub frames_sent: u64,
    pub sinks: Vec<SinkReport>,
    pub frames_lost: u64,
    pub loss_percent: f64,
    /// Added latency over the full-load window (ramp excluded); with `--split-at`, over the
    /// part after the split.
    pub latency: Latency,
    /// With `--split-at`: added latency over the full-load window before the split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_before_split: Option<Latency>,
    /// With --speak: what the callers heard back, and the latency the proxy added on the way
    /// back (the sink's send to the caller's read).
    pub talkback: Option<TalkbackReport>,
    pub proxy: Option<ProcReport>,
    /// Proxy CPU per 1000 frames written to sinks, milliseconds.
    pub proxy_cpu_ms_per_1000_frames: Option<f64>,
    /// (RSS at full load - RSS idle) / calls, KiB.
    pub proxy_rss_kib_per_call: Option<f64>,
    pub loadgen_cpu_percent: f64,
    /// With `--replay`: the shape the calls took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<ShapeReport>,
}

type CallSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How often (in frames) a call looks for a close from the proxy: once a second.
const CLOSE_CHECK_EVERY: u64 = 50;

struct Call {
    index: u32,
    stream_sid: String,
    call_sid: String,
    /// One socket, not split: the driver writes and, now and then, looks for a close without
    /// waiting. A reader task per call and the lock between split halves cost more than the
    /// proxy's work on small loads: only calls that must hear the way back have one.
    socket: Conn,
    seq: u64,
    chunk: u64,
    closed: bool,
    /// Media frames sent: the stamp's sequence number, and when to look for a close.
    frames: u64,
    /// With a shape: where this call is in it.
    cursor: Cursor,
}

enum Conn {
    Whole(Box<CallSocket>),
    /// The reading half is with a task that hears the way back; it flags the end.
    Split(
        futures_util::stream::SplitSink<CallSocket, Message>,
        Arc<AtomicBool>,
    ),
}

impl Conn {
    async fn send(&mut self, message: Message) -> bool {
        match self {
            Conn::Whole(s) => s.send(message).await.is_ok(),
            Conn::Split(s, _) => s.send(message).await.is_ok(),
        }
    }
}

async fn open_call(
    opts: &Options,
    index: u32,
    route: &(String, String),
    heard: Option<(&Arc<Sink>, Instant)>,
) -> Result<Call> {
    let (mut socket, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(&opts.url),
    )
    .await
    .context("upgrade timed out")?
    .with_context(|| format!("upgrade to {}", opts.url))?;
    if let MaybeTlsStream::Plain(s) = socket.get_ref() {
        let _ = s.set_nodelay(true);
    }
    let stream_sid = format!("MZ{index:032x}");
    let call_sid = format!("CA{index:032x}");
    let params = BTreeMap::from([route.clone()]);
    socket
        .send(Message::Text(outbound::connected().into()))
        .await?;
    socket
        .send(Message::Text(
            outbound::start(
                1,
                &outbound::StartInfo {
                    account_sid: "AC00000000000000000000000000000000",
                    call_sid: &call_sid,
                    stream_sid: &stream_sid,
                    tracks: &["inbound"],
                    custom_parameters: &params,
                },
            )
            .into(),
        ))
        .await?;
    let socket = match heard {
        None => Conn::Whole(Box::new(socket)),
        Some((tally, origin)) => {
            let (tx, rx) = socket.split();
            let ended = Arc::new(AtomicBool::new(false));
            let (tally, flag) = (tally.clone(), ended.clone());
            tokio::spawn(async move {
                tally.hear(rx, origin).await;
                flag.store(true, Ordering::Relaxed);
            });
            Conn::Split(tx, ended)
        }
    };
    Ok(Call {
        index,
        stream_sid,
        call_sid,
        socket,
        seq: 2,
        chunk: 0,
        closed: false,
        frames: 0,
        cursor: Cursor::new(Instant::now()),
    })
}

impl Call {
    /// The proxy says nothing on a healthy call: anything but a ping, or an error, or the end
    /// of the stream means the proxy dropped the call. Looks without waiting.
    fn check_closed(&mut self) -> bool {
        match &mut self.socket {
            Conn::Whole(socket) => {
                while !self.closed {
                    match socket.next().now_or_never() {
                        None => break,
                        Some(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                        Some(_) => self.closed = true,
                    }
                }
            }
            Conn::Split(_, ended) => self.closed |= ended.load(Ordering::Relaxed),
        }
        self.closed
    }

    async fn send_frame(&mut self, origin: Instant, b64: &base64::engine::GeneralPurpose) -> bool {
        if !self.open() {
            return false;
        }
        self.chunk += 1;
        self.frames += 1;
        let sent_us = origin.elapsed().as_micros() as u64;
        let payload = load::stamped_payload(self.index, self.frames as u32, sent_us);
        let text = outbound::media(
            self.seq,
            &self.stream_sid,
            "inbound",
            self.chunk,
            (self.chunk - 1) * 20,
            &b64.encode(payload),
        );
        self.send_text(text).await
    }

    /// Still streaming? Looks for a close once a second's worth of frames.
    fn open(&mut self) -> bool {
        if self.frames.is_multiple_of(CLOSE_CHECK_EVERY) {
            self.check_closed();
        }
        !self.closed
    }

    async fn send_text(&mut self, text: String) -> bool {
        self.seq += 1;
        if !self.socket.send(Message::Text(text.into())).await {
            self.closed = true;
        }
        !self.closed
    }

    /// Sends every step of the shape due by `now`; answers how many media frames went.
    async fn send_shaped(
        &mut self,
        shape: &Shape,
        now: Instant,
        origin: Instant,
        b64: &base64::engine::GeneralPurpose,
    ) -> u64 {
        let mut frames = 0;
        while let Some((step, pass)) = self.cursor.due(shape, now) {
            if !self.open() {
                break;
            }
            let text = match step {
                Step::Media {
                    track,
                    chunk,
                    timestamp,
                    audio,
                    ..
                } => {
                    self.frames += 1;
                    let sent_us = origin.elapsed().as_micros() as u64;
                    let stamp = load::stamped_payload(self.index, self.frames as u32, sent_us);
                    let period_ms = shape.period.as_millis() as u64;
                    outbound::media(
                        self.seq,
                        &self.stream_sid,
                        track,
                        pass * shape.chunks + chunk,
                        pass * period_ms + timestamp,
                        &b64.encode(shape::stamped(audio, &stamp)),
                    )
                }
                Step::Other { message, .. } => {
                    let mut message = message.clone();
                    message["streamSid"] = self.stream_sid.clone().into();
                    message["sequenceNumber"] = self.seq.to_string().into();
                    message.to_string()
                }
            };
            let media = matches!(step, Step::Media { .. });
            if !self.send_text(text).await {
                break;
            }
            frames += u64::from(media);
        }
        frames
    }

    async fn stop(mut self) {
        let text = outbound::stop(
            self.seq,
            "AC00000000000000000000000000000000",
            &self.call_sid,
            &self.stream_sid,
        );
        self.socket.send(Message::Text(text.into())).await;
        match &mut self.socket {
            Conn::Whole(s) => {
                let _ = (**s).close(None).await;
            }
            Conn::Split(s, _) => {
                let _ = s.close().await;
            }
        }
    }
}

/// Runs the load and reports. `on_progress` gets a line a second when asked for.
pub async fn run(
    opts: Options,
    on_progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Report> {
    if opts.calls == 0 || opts.fanout == 0 {
        bail!("--calls and --fanout must be at least 1");
    }
    let origin = Instant::now();
    let mut sinks: Vec<Arc<Sink>> = Vec::new();
    let hosts = match &opts.sinks {
        SinkMode::Hosts => {
            for _ in 0..opts.fanout {
                sinks.push(load::start_sink(origin).await?);
            }
            let hosts: Vec<String> = sinks
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port))
                .collect();
            ("backendHosts".to_string(), serde_json::to_string(&hosts)?)
        }
        SinkMode::Table { base_port, tls } => {
            let acceptor = match tls {
                Some(dir) => Some(crate::tls::acceptor(dir)?),
                None => None,
            };
            let mut ids = Vec::new();
            for i in 0..opts.fanout + u32::from(opts.flood) {
                let port = base_port
                    .checked_add(i as u16)
                    .context("sink ports past 65535")?;
                let role = if i == opts.fanout {
                    load::Role::Flood
                } else if i == 0 && opts.speak {
                    load::Role::Speak
                } else {
                    load::Role::Listen
                };
                let sink = load::start_sink_as(origin, port, acceptor.clone(), role)
                    .await
                    .with_context(|| format!("sink on port {port}"))?;
                if role != load::Role::Flood {
                    sinks.push(sink);
                }
                ids.push(format!("sink{i}"));
            }
            ("backendIds".to_string(), serde_json::to_string(&ids)?)
        }
    };
    let heard = opts.speak.then(Sink::tally);
    let pid = opts.proxy_pid.clone();
    let proc_idle = pid.as_deref().and_then(load::sample_proc);
    let self_start = load::sample_proc("self");

    let sent = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let held = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    // The proxy's RSS over the run, for the memory trend.
    let rss_series = Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    // Progress, once a second.
    let progress = {
        let (sent, connected, sinks, pid, done, rss_series) = (
            sent.clone(),
            connected.clone(),
            sinks.clone(),
            pid.clone(),
            done.clone(),
            rss_series.clone(),
        );
        let show = opts.progress;
        tokio::spawn(async move {
            let mut last = pid.as_deref().and_then(load::sample_proc);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut next_rss = Instant::now();
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                // One reading a second serves both the RSS record and the progress line.
                let now = pid.as_deref().and_then(load::sample_proc);
                if let Some(p) = now.filter(|p| p.at >= next_rss) {
                    next_rss += RSS_EVERY;
                    let at = p.at.duration_since(origin).as_secs_f64();
                    rss_series.lock().unwrap().push((at, p.rss_mib()));
                }
                if !show {
                    continue;
                }
                let proxy = match (&last, &now) {
                    (Some(a), Some(b)) => format!(
                        ", proxy CPU {:.0}% RSS {:.0} MiB",
                        load::cpu_percent(a, b),
                        b.rss_mib()
                    ),
                    _ => String::new(),
                };
                last = now;
                let received: Vec<String> =
                    sinks.iter().map(|s| s.received().to_string()).collect();
                let p99 = sinks
                    .iter()
                    .map(|s| Latency::of(&s.latency()).p99_ms)
                    .fold(0.0, f64::max);
                on_progress(format!(
                    "[{:>4.0}s] calls {} up, frames sent {}, received {}, p99 {:.1} ms{proxy}",
                    origin.elapsed().as_secs_f64(),
                    connected.load(Ordering::Relaxed),
                    sent.load(Ordering::Relaxed),
                    received.join("/"),
                    p99,
                ));
            }
        })
    };

    // Calls are driven by a few tasks, each owning a share of them. Every call has a phase
    // within the 20 ms frame period so frames are spread over time, as real calls are.
    let drivers = opts.calls.div_ceil(500).clamp(1, 8);
    let ramp_end = Instant::now() + opts.ramp;
    let end = ramp_end + opts.duration;
    let full_load = Arc::new(std::sync::Mutex::new(None::<(ProcSample, Vec<u64>)>));
    let mut tasks = Vec::new();
    for d in 0..drivers {
        let indices: Vec<u32> = (0..opts.calls).filter(|i| i % drivers == d).collect();
        let (opts, hosts, sent, connected, held, heard) = (
            opts.clone(),
            hosts.clone(),
            sent.clone(),
            connected.clone(),
            held.clone(),
            heard.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let counts = Counts {
                sent: &sent,
                connected: &connected,
                held: &held,
                heard: heard.as_ref(),
            };
            drive(&opts, &indices, &hosts, origin, ramp_end, end, counts).await
        }));
    }
    // Sample the proxy once everything is up: the start of the full-load window.
    {
        let (pid, full_load, sinks, connected, heard) = (
            pid.clone(),
            full_load.clone(),
            sinks.clone(),
            connected.clone(),
            heard.clone(),
        );
        let calls = opts.calls as u64;
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(ramp_end)).await;
            // Give the last calls a moment to connect.
            for _ in 0..50 {
                if connected.load(Ordering::Relaxed) >= calls {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let sample = pid.as_deref().and_then(load::sample_proc);
            let received = sinks.iter().map(|s| s.received()).collect();
            for s in sinks.iter().chain(&heard) {
                s.reset_latency();
            }
            if let Some(sample) = sample {
                *full_load.lock().unwrap() = Some((sample, received));
            } else {
                *full_load.lock().unwrap() = Some((
                    ProcSample {
                        at: Instant::now(),
                        cpu_ticks: 0,
                        rss_kib: 0,
                    },
                    received,
                ));
            }
        });
    }
    // With --split-at: the window's latency so far is set aside, and measured afresh.
    let before_split = opts.split_at.map(|split| {
        let sinks = sinks.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(ramp_end + split)).await;
            let mut before = load::histogram();
            for s in &sinks {
                let _ = before.add(s.latency());
                s.reset_latency();
            }
            Latency::of(&before)
        })
    });
    for t in tasks {
        t.await.context("driver task")??;
    }
    let proc_end = pid.as_deref().and_then(load::sample_proc);
    // Let the last frames arrive: wait until the counts stop moving.
    let mut last: Vec<u64> = sinks.iter().map(|s| s.received()).collect();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now: Vec<u64> = sinks.iter().map(|s| s.received()).collect();
        if now == last {
            break;
        }
        last = now;
    }
    done.store(true, Ordering::Relaxed);
    progress.abort();
    let self_end = load::sample_proc("self");

    let frames_sent = sent.load(Ordering::Relaxed);
    let mut window = load::histogram();
    let mut sink_reports = Vec::new();
    let mut lost_total = 0;
    for s in &sinks {
        let received = s.received();
        let lost = load::loss(frames_sent, received);
        lost_total += lost;
        let _ = window.add(s.latency());
        sink_reports.push(SinkReport {
            port: s.port,
            received,
            lost,
            foreign: s.foreign(),
        });
    }
    let before_window = full_load.lock().unwrap().take();
    let rss_series = std::mem::take(&mut *rss_series.lock().unwrap());
    let (proxy, cpu_per_1000, rss_per_call) = match (&proc_idle, &before_window, &proc_end) {
        (Some(idle), Some((full, received_then)), Some(end)) if full.cpu_ticks > 0 => {
            let forwarded: u64 = sinks
                .iter()
                .zip(received_then)
                .map(|(s, then)| s.received().saturating_sub(*then))
                .sum();
            let cpu_ms =
                end.cpu_ticks.saturating_sub(full.cpu_ticks) as f64 / load::TICKS_PER_SEC * 1000.0;
            (
                Some(ProcReport {
                    cpu_percent: load::cpu_percent(full, end),
                    rss_idle_mib: idle.rss_mib(),
                    rss_full_mib: full.rss_mib(),
                    rss_end_mib: end.rss_mib(),
                    rss_slope_mib_per_min: {
                        let from = full.at.duration_since(origin).as_secs_f64();
                        let to = end.at.duration_since(origin).as_secs_f64();
                        let half: Vec<(f64, f64)> = rss_series
                            .iter()
                            .copied()
                            .filter(|(at, _)| *at >= (from + to) / 2.0 && *at <= to)
                            .collect();
                        load::slope(&half).map(|per_s| per_s * 60.0)
                    },
                    rss_series,
                }),
                (forwarded > 0).then(|| cpu_ms / (forwarded as f64 / 1000.0)),
                Some((full.rss_kib as f64 - idle.rss_kib as f64) / opts.calls as f64),
            )
        }
        _ => (None, None, None),
    };
    let expected = frames_sent * opts.fanout as u64;
    Ok(Report {
        calls: opts.calls,
        fanout: opts.fanout,
        duration_s: opts.duration.as_secs_f64(),
        ramp_s: opts.ramp.as_secs_f64(),
        calls_connected: connected.load(Ordering::Relaxed) as u32,
        calls_held: held.load(Ordering::Relaxed) as u32,
        frames_sent,
        sinks: sink_reports,
        frames_lost: lost_total,
        loss_percent: if expected == 0 {
            0.0
        } else {
            lost_total as f64 * 100.0 / expected as f64
        },
        latency: Latency::of(&window),
        latency_before_split: match before_split {
            Some(task) if task.is_finished() => Some(task.await.context("split task")?),
            Some(task) => {
                task.abort();
                None
            }
            None => None,
        },
        talkback: heard.as_ref().map(|h| TalkbackReport {
            received: h.received(),
            latency: Latency::of(&h.latency()),
        }),
        proxy,
        proxy_cpu_ms_per_1000_frames: cpu_per_1000,
        proxy_rss_kib_per_call: rss_per_call,
        loadgen_cpu_percent: match (&self_start, &self_end) {
            (Some(a), Some(b)) => load::cpu_percent(a, b),
            _ => 0.0,
        },
        shape: opts.shape.as_ref().map(|s| ShapeReport {
            frames_per_pass: s.frames,
            pass_s: s.period.as_secs_f64(),
        }),
    })
}

/// What the driver tasks count together.
struct Counts<'a> {
    sent: &'a AtomicU64,
    connected: &'a AtomicU64,
    held: &'a AtomicU64,
    /// With --speak: what the callers hear back.
    heard: Option<&'a Arc<Sink>>,
}

async fn drive(
    opts: &Options,
    indices: &[u32],
    hosts: &(String, String),
    origin: Instant,
    ramp_end: Instant,
    end: Instant,
    counts: Counts<'_>,
) -> Result<()> {
    let Counts {
        sent,
        connected,
        held,
        heard,
    } = counts;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Phase slots: a call with phase p sends on every tick where tick % 20 == p.
    let mut slots: Vec<Vec<Call>> = (0..20).map(|_| Vec::new()).collect();
    let start = Instant::now();
    let per_call = if indices.is_empty() {
        Duration::ZERO
    } else {
        opts.ramp / indices.len() as u32
    };
    let mut pending = indices.iter().enumerate().peekable();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Open the calls whose turn in the ramp has come.
        while let Some((k, &index)) = pending.peek() {
            if now < start + per_call * (*k as u32) && now < ramp_end {
                break;
            }
            match open_call(opts, index, hosts, heard.map(|h| (h, origin))).await {
                Ok(call) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    slots[(index % 20) as usize].push(call);
                }
                Err(e) => eprintln!("loadgen: call {index}: {e:#}"),
            }
            pending.next();
        }
        match &opts.shape {
            // A captured shape has its own times: every call looks at every tick.
            Some(shape) => {
                for call in slots.iter_mut().flatten() {
                    let frames = call.send_shaped(shape, now, origin, &b64).await;
                    sent.fetch_add(frames, Ordering::Relaxed);
                }
            }
            None => {
                for call in slots[(n % 20) as usize].iter_mut() {
                    if call.send_frame(origin, &b64).await {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        n += 1;
    }
    for mut call in slots.into_iter().flatten() {
        if !call.check_closed() {
            held.fetch_add(1, Ordering::Relaxed);
        }
        call.stop().await;
    }
    Ok(())
}

impl Report {
    pub fn human(&self) -> String {
        let mut out = String::new();
        out += &format!(
            "loadgen: {} calls x fan-out {}, {:.0} s at full load (ramp {:.0} s), 50 frames/s per call\n",
            self.calls, self.fanout, self.duration_s, self.ramp_s
        );
        if let Some(shape) = &self.shape {
            out += &format!(
                "each call shaped as the capture: {} frames over {:.1} s, looped\n",
                shape.frames_per_pass, shape.pass_s
            );
        }
        out += &format!(
            "calls: {} connected, {} held to the end\n",
            self.calls_connected, self.calls_held
        );
        out += &format!("frames sent: {}\n", self.frames_sent);
        for (i, s) in self.sinks.iter().enumerate() {
            out += &format!(
                "  backend {i} (port {}): received {}, lost {}{}\n",
                s.port,
                s.received,
                s.lost,
                if s.foreign > 0 {
                    format!(", {} unstamped", s.foreign)
                } else {
                    String::new()
                }
            );
        }
        out += &format!(
            "loss: {} frames ({:.4} %)\n",
            self.frames_lost, self.loss_percent
        );
        let mut windows = vec![("at full load", &self.latency)];
        if let Some(before) = &self.latency_before_split {
            windows = vec![
                ("before the split", before),
                ("after the split", &self.latency),
            ];
        }
        for (when, l) in windows {
            out += &format!(
                "added latency {when}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} frames)\n",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.samples
            );
        }
        if let Some(t) = &self.talkback {
            let l = &t.latency;
            out += &format!(
                "way back (speaker to caller): {} frames heard; added latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
                t.received, l.p50_ms, l.p99_ms, l.max_ms
            );
        }
        if let Some(p) = &self.proxy {
            out += &format!(
                "proxy: CPU {:.1} % of one core; RSS idle {:.1} MiB, full load {:.1} MiB, end {:.1} MiB\n",
                p.cpu_percent, p.rss_idle_mib, p.rss_full_mib, p.rss_end_mib
            );
            if let Some(slope) = p.rss_slope_mib_per_min {
                let (lo, hi) = p
                    .rss_series
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(lo, hi), (_, m)| {
                        (lo.min(*m), hi.max(*m))
                    });
                out += &format!(
                    "proxy RSS over the run: {lo:.1}..{hi:.1} MiB; slope over the last half of full load {slope:+.3} MiB/min\n"
                );
            }
        }
        if let Some(c) = self.proxy_cpu_ms_per_1000_frames {
            out += &format!("proxy CPU per 1000 frames delivered: {c:.2} ms\n");
        }
        if let Some(m) = self.proxy_rss_kib_per_call {
            out += &format!("proxy memory per live call: {m:.1} KiB\n");
        }
        out += &format!(
            "loadgen itself: CPU {:.1} % of one core\n",
            self.loadgen_cpu_percent
        );
        out
    }
}
