//! The load generator's parts: frames that carry their own send time, sink backends that
//! measure what the proxy added, the statistics, and readings of a process's CPU and memory
//! from `/proc`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Marks a frame as one of ours.
const MAGIC: [u8; 2] = *b"LG";
/// Base64 characters that carry the stamp: 24 characters = 18 bytes.
const STAMP_B64: usize = 24;

/// 160 bytes of mu-law silence whose first 18 bytes say which call, which frame, and when it
/// was sent (microseconds since the run's origin). Any wire format carries it through.
pub fn stamped_payload(call: u32, seq: u32, sent_us: u64) -> [u8; 160] {
    let mut p = [0xffu8; 160];
    p[0..2].copy_from_slice(&MAGIC);
    p[2..6].copy_from_slice(&call.to_be_bytes());
    p[6..10].copy_from_slice(&seq.to_be_bytes());
    p[10..18].copy_from_slice(&sent_us.to_be_bytes());
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub call: u32,
    pub seq: u32,
    pub sent_us: u64,
}

/// Finds the stamp in a media message of any text wire format (`twilio` or `compact`)
/// without parsing the whole JSON: only the payload's first 24 characters are decoded.
pub fn read_stamp(text: &str) -> Option<Stamp> {
    let start = text
        .find(r#""payload":""#)
        .map(|i| i + 11)
        .or_else(|| text.find(r#""media":""#).map(|i| i + 9))?;
    let b64 = text.get(start..start + STAMP_B64)?;
    let mut bytes = [0u8; 18];
    base64::engine::general_purpose::STANDARD
        .decode_slice(b64, &mut bytes)
        .ok()?;
    stamp_of(&bytes)
}

/// The stamp at the start of raw audio bytes (the `pcm16`-less binary case, and tests).
pub fn stamp_of(bytes: &[u8]) -> Option<Stamp> {
    if bytes.len() < 18 || bytes[0..2] != MAGIC {
        return None;
    }
    Some(Stamp {
        call: u32::from_be_bytes(bytes[2..6].try_into().ok()?),
        seq: u32::from_be_bytes(bytes[6..10].try_into().ok()?),
        sent_us: u64::from_be_bytes(bytes[10..18].try_into().ok()?),
    })
}

/// A latency histogram in microseconds, 1 µs to 60 s, 2 significant figures (1 % precision:
/// plenty for milliseconds, and small enough that merging hundreds of them stays cheap).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// What one sink backend saw.
pub struct Sink {
    pub port: u16,
    received: AtomicU64,
    foreign: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Sink {
    /// A tally of stamped frames that is no backend: what the callers hear back from a
    /// speaking sink, measured on the callers' side.
    pub fn tally() -> Arc<Sink> {
        Arc::new(Sink {
            port: 0,
            received: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
        })
    }

    /// Counts what the proxy sends one caller: stamped media (a speaking sink's words) into
    /// the latency record, until the call's socket ends.
    pub async fn hear<S>(&self, mut stream: S, origin: Instant)
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        let mut local = histogram();
        let mut unmerged = 0u64;
        let mut last_merge = Instant::now();
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = &message else {
                if matches!(message, Message::Close(_)) {
                    break;
                }
                continue;
            };
            if let Some(stamp) = read_stamp(text.as_str()) {
                let now_us = origin.elapsed().as_micros() as u64;
                let _ = local.record(now_us.saturating_sub(stamp.sent_us).max(1));
                unmerged += 1;
            }
            if unmerged >= 5_000 || last_merge.elapsed() > Duration::from_secs(2) {
                self.merge(&mut local, &mut unmerged);
                last_merge = Instant::now();
            }
        }
        self.merge(&mut local, &mut unmerged);
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Media messages that carried no stamp of ours.
    pub fn foreign(&self) -> u64 {
        self.foreign.load(Ordering::Relaxed)
    }

    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the latency record afresh (at the end of the ramp).
    pub fn reset_latency(&self) {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
    }
}

/// Starts a sink backend on a free loopback port: every connection's media frames are
/// counted and their latency recorded against `origin`.
pub async fn start_sink(origin: Instant) -> std::io::Result<Arc<Sink>> {
    start_sink_on(origin, 0, None).await
}

/// What a sink does besides counting what it receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Listens.
    #[default]
    Listen,
    /// Answers every stamped frame at once with a frame stamped with its own send time, as a
    /// voice agent talking back (in Twilio's format): the proxy's way back is measured.
    Speak,
    /// Sends junk as fast as it can while it listens: a misbehaving backend.
    Flood,
}

/// A sink on `port` (0: any free one), speaking TLS when given an acceptor.
pub async fn start_sink_on(
    origin: Instant,
    port: u16,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Arc<Sink>> {
    start_sink_as(origin, port, tls, Role::Listen).await
}

pub async fn start_sink_as(
    origin: Instant,
    port: u16,
    tls: Option<tokio_rustls::TlsAcceptor>,
    role: Role,
) -> std::io::Result<Arc<Sink>> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let sink = Arc::new(Sink {
        port: listener.local_addr()?.port(),
        received: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        latency: Mutex::new(histogram()),
    });
    let shared = sink.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let sink = shared.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_sink(stream, &sink, origin, role).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve_sink(stream, &sink, origin, role).await;
                        }
                    }
                }
            });
        }
    });
    Ok(sink)
}

async fn serve_sink<S>(stream: S, sink: &Sink, origin: Instant, role: Role)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Small reads: tungstenite zeroes its whole read buffer on each one, and loadgen must
    // stay lighter than what it measures.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut answer, mut ws) = ws.split();
    if role == Role::Flood {
        // As fast as the socket takes it, until the proxy hangs up.
        tokio::spawn(async move {
            let junk = Message::Text(r#"{"event":"media","media":{"payload":"AAAA"}}"#.into());
            while answer.send(junk.clone()).await.is_ok() {}
        });
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(t) = &message {
                if read_stamp(t.as_str()).is_some() {
                    sink.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    // Recorded locally and merged now and then, so connections never contend.
    let mut local = histogram();
    let mut unmerged = 0u64;
    let mut last_merge = Instant::now();
    while let Some(Ok(message)) = ws.next().await {
        let text = match &message {
            Message::Text(t) => t.as_str(),
            Message::Close(_) => break,
            // pcm16: the audio came resampled, the stamp did not survive; it is counted.
            Message::Binary(_) => {
                unmerged += 1;
                continue;
            }
            _ => continue,
        };
        if !text.contains(r#""event":"media""#) {
            continue;
        }
        match read_stamp(text) {
            Some(stamp) => {
                let now_us = origin.elapsed().as_micros() as u64;
                let _ = local.record(now_us.saturating_sub(stamp.sent_us).max(1));
                unmerged += 1;
                if role == Role::Speak {
                    let stream_sid = text
                        .split(r#""streamSid":""#)
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap_or_default();
                    let sent_us = origin.elapsed().as_micros() as u64;
                    let payload = b64.encode(stamped_payload(stamp.call, stamp.seq, sent_us));
                    let reply = format!(
                        r#"{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"{payload}"}}}}"#
                    );
                    if answer.send(Message::Text(reply.into())).await.is_err() {
                        break;
                    }
                }
            }
            None => {
                sink.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Merging walks the whole histogram: rarely, not per frame.
        if unmerged >= 5_000 || last_merge.elapsed() > Duration::from_secs(2) {
            sink.merge(&mut local, &mut unmerged);
            last_merge = Instant::now();
        }
    }
    sink.merge(&mut local, &mut unmerged);
}

impl Sink {
    fn merge(&self, local: &mut Histogram<u64>, unmerged: &mut u64) {
        if *unmerged == 0 {
            return;
        }
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.add(&*local);
        self.received.fetch_add(*unmerged, Ordering::Relaxed);
        local.reset();
        *unmerged = 0;
    }
}

/// Frames lost on the way to one sink.
pub fn loss(sent: u64, received: u64) -> u64 {
    sent.saturating_sub(received)
}

/// CPU time and resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// User + system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

impl ProcSample {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// Linux reports CPU time in USER_HZ ticks, 100 per second on every mainstream platform.
pub const TICKS_PER_SEC: f64 = 100.0;

pub fn sample_proc(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        at: Instant::now(),
        cpu_ticks: utime + stime,
        rss_kib,
    })
}

/// The least-squares slope of `y` over `x` (units of y per unit of x); `None` for fewer than
/// three points or no spread in `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// CPU used between two samples, as a percentage of one core.
pub fn cpu_percent(from: &ProcSample, to: &ProcSample) -> f64 {
    let secs = to.at.duration_since(from.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (to.cpu_ticks.saturating_sub(from.cpu_ticks)) as f64 / TICKS_PER_SEC / secs * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use call_proxy::twilio::messages::outbound;

    #[test]
    fn stamps_survive_both_text_formats() {
        let payload = stamped_payload(7, 42, 123_456_789);
        let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
        let want = Some(Stamp {
            call: 7,
            seq: 42,
            sent_us: 123_456_789,
        });
        let twilio = outbound::media(3, "MZ1", "inbound", 2, 20, &b64);
        assert_eq!(read_stamp(&twilio), want);
        let compact = format!(r#"{{"event":"media","media":"{b64}"}}"#);
        assert_eq!(read_stamp(&compact), want);
        assert_eq!(stamp_of(&payload), want);
        let other = base64::engine::general_purpose::STANDARD.encode([0xffu8; 160]);
        assert_eq!(read_stamp(&format!(r#"{{"media":"{other}"}}"#)), None);
        assert_eq!(read_stamp(r#"{"event":"start"}"#), None);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms, uniform
        }
        let l = Latency::of(&h);
        assert_eq!(l.samples, 1000);
        // Within the histogram's 1 % precision.
        assert!((l.p50_ms - 5.0).abs() <= 0.05, "{l:?}");
        assert!((l.p90_ms - 9.0).abs() <= 0.09, "{l:?}");
        assert!((l.p99_ms - 9.9).abs() <= 0.099, "{l:?}");
        assert!((l.max_ms - 10.0).abs() <= 0.1, "{l:?}");
        assert_eq!(Latency::of(&histogram()).samples, 0);
    }

    #[test]
    fn slope_of_flat_rising_and_too_few_points() {
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 10.0, 25.0)).collect();
        assert_eq!(slope(&flat), Some(0.0));
        // 0.5 MiB every 10 s = 0.05 per second, with noise that averages out.
        let rising: Vec<(f64, f64)> = (0..10)
            .map(|i| {
                let noise = if i % 2 == 0 { 0.1 } else { -0.1 };
                (i as f64 * 10.0, 20.0 + 0.5 * i as f64 + noise)
            })
            .collect();
        let s = slope(&rising).unwrap();
        assert!((s - 0.05).abs() < 0.005, "{s}");
        assert_eq!(slope(&flat[..2]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn loss_counts_what_did_not_arrive() {
        assert_eq!(loss(1000, 1000), 0);
        assert_eq!(loss(1000, 990), 10);
        assert_eq!(loss(1000, 1003), 0, "duplicates are not negative loss");
    }

    #[test]
    fn reads_this_process() {
        let a = sample_proc("self").expect("/proc/self");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let b = sample_proc("self").unwrap();
        assert!(b.rss_kib > 0);
        assert!(b.cpu_ticks >= a.cpu_ticks);
        assert!(cpu_percent(&a, &b) >= 0.0);
    }
}
