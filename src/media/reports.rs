//! Twilio's view of each stream, from its status callbacks, kept beside the proxy's own: what
//! Twilio saw (started, stopped, an error and its code), and whether the stream reached this
//! instance, another one, or none — the only record there is of a stream Twilio started that
//! failed before it reached any instance (a handshake or TLS error, a timeout).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::twilio::stream_status::{error_code, StreamStatus};

/// How many streams' reports an instance keeps (the newest).
const KEPT: usize = 500;
/// How many events one stream keeps (a stream has three at most, unless Twilio repeats).
const EVENTS_PER_STREAM: usize = 8;
/// How long after Twilio's first word a stream that reached no instance may still arrive.
const ARRIVAL_GRACE: Duration = Duration::from_secs(30);
/// How long the store remembers that a stream reached an instance.
pub const SEEN_FOR: Duration = Duration::from_secs(24 * 3600);

/// One thing Twilio reported about a stream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reported {
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The Media Streams error code the error names (31900–31999).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u16>,
    /// Twilio's time for it.
    pub timestamp: String,
}

/// Where a stream Twilio reported on got to.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reached {
    /// This instance had (or has) the stream.
    Here,
    /// Another instance sharing the store had it.
    AnotherInstance,
    /// No instance had it, and it is too late (or too broken) to arrive.
    NoInstance,
    /// Not yet: Twilio's callback can come before the stream's first message.
    NotYet,
}

impl Reached {
    pub fn text(self) -> &'static str {
        match self {
            Reached::Here => "reached this instance",
            Reached::AnotherInstance => "reached another instance",
            Reached::NoInstance => "reached no instance",
            Reached::NotYet => "not arrived yet",
        }
    }
}

/// A stream as `/calls` and the page show Twilio's reports on it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub stream_sid: String,
    pub call_sid: String,
    pub name: String,
    pub reached: Reached,
    pub events: Vec<Reported>,
}

struct Entry {
    report: StreamReport,
    first_heard: SystemTime,
    /// Whether `reached` is final.
    settled: bool,
}

/// The reports of the last [`KEPT`] streams Twilio told this instance about, newest first.
#[derive(Default)]
pub struct Reports {
    streams: Mutex<VecDeque<Entry>>,
}

impl Reports {
    /// Adds one callback to its stream's report.
    pub fn record(&self, status: &StreamStatus) {
        let reported = Reported {
            event: status.event.as_str(),
            error_code: status.error.as_deref().and_then(error_code),
            error: status.error.clone(),
            timestamp: status.timestamp.clone(),
        };
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        match streams
            .iter_mut()
            .find(|e| e.report.stream_sid == status.stream_sid)
        {
            Some(entry) => {
                if entry.report.events.len() < EVENTS_PER_STREAM {
                    entry.report.events.push(reported);
                }
            }
            None => {
                streams.push_front(Entry {
                    report: StreamReport {
                        stream_sid: status.stream_sid.clone(),
                        call_sid: status.call_sid.clone(),
                        name: status.name.clone(),
                        reached: Reached::NotYet,
                        events: vec![reported],
                    },
                    first_heard: SystemTime::now(),
                    settled: false,
                });
                streams.truncate(KEPT);
            }
        }
    }

    /// What Twilio reported about one stream, oldest first.
    pub fn events_for(&self, stream_sid: &str) -> Vec<Reported> {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|e| e.report.stream_sid == stream_sid)
            .map(|e| e.report.events.clone())
            .unwrap_or_default()
    }

    /// The newest `limit` reports, each with where its stream got to: `here` says whether
    /// this instance had a stream, `elsewhere` asks the store whether any instance did.
    pub async fn view<F, Fut>(
        &self,
        limit: usize,
        here: impl Fn(&str) -> bool,
        elsewhere: F,
    ) -> Vec<StreamReport>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Option<bool>>,
    {
        let open: Vec<(String, bool)> = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            for entry in streams.iter_mut().take(limit) {
                if !entry.settled && here(&entry.report.stream_sid) {
                    entry.report.reached = Reached::Here;
                    entry.settled = true;
                }
            }
            streams
                .iter()
                .take(limit)
                .filter(|e| !e.settled)
                .map(|e| {
                    let late = e.first_heard.elapsed().unwrap_or_default() >= ARRIVAL_GRACE
                        || e.report.events.iter().any(|r| r.event != "stream-started");
                    (e.report.stream_sid.clone(), late)
                })
                .collect()
        };
        // Asked outside the lock: the store is another process.
        let answers =
            futures_util::future::join_all(open.iter().map(|(sid, _)| elsewhere(sid.clone())))
                .await;
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for ((sid, late), seen) in open.into_iter().zip(answers) {
            let Some(entry) = streams.iter_mut().find(|e| e.report.stream_sid == sid) else {
                continue;
            };
            (entry.report.reached, entry.settled) = match seen {
                Some(true) => (Reached::AnotherInstance, true),
                Some(false) if late => (Reached::NoInstance, true),
                // Not yet, or the store did not answer: asked again next time.
                _ => (Reached::NotYet, false),
            };
        }
        streams
            .iter()
            .take(limit)
            .map(|e| e.report.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::stream_status::StreamEvent;

    fn status(sid: &str, event: StreamEvent, error: Option<&str>) -> StreamStatus {
        StreamStatus {
            stream_sid: sid.into(),
            call_sid: "CA1".into(),
            account_sid: "AC1".into(),
            name: String::new(),
            event,
            error: error.map(str::to_string),
            timestamp: "2026-12-04T20:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn each_stream_is_placed_here_elsewhere_or_nowhere() {
        let r = Reports::default();
        r.record(&status("MZhere", StreamEvent::Started, None));
        r.record(&status("MZthere", StreamEvent::Started, None));
        r.record(&status(
            "MZfailed",
            StreamEvent::Error,
            Some("31920 handshake"),
        ));
        r.record(&status("MZsoon", StreamEvent::Started, None));
        let view = r
            .view(
                10,
                |sid| sid == "MZhere",
                |sid| async move { Some(sid == "MZthere") },
            )
            .await;
        let reached: Vec<(&str, Reached)> = view
            .iter()
            .map(|v| (v.stream_sid.as_str(), v.reached))
            .collect();
        assert_eq!(
            reached,
            [
                ("MZsoon", Reached::NotYet),
                ("MZfailed", Reached::NoInstance),
                ("MZthere", Reached::AnotherInstance),
                ("MZhere", Reached::Here),
            ]
        );
        assert_eq!(view[1].events[0].error_code, Some(31920));
        // A store that does not answer settles nothing.
        r.record(&status("MZsoon", StreamEvent::Stopped, None));
        let view = r.view(10, |_| false, |_| async { None }).await;
        assert_eq!(view[0].reached, Reached::NotYet);
        assert_eq!(view[0].events.len(), 2);
    }

    #[test]
    fn reports_are_bounded() {
        let r = Reports::default();
        for i in 0..KEPT + 10 {
            r.record(&status(&format!("MZ{i}"), StreamEvent::Started, None));
        }
        for _ in 0..20 {
            r.record(&status("MZ0x", StreamEvent::Started, None));
        }
        let streams = r.streams.lock().unwrap();
        assert_eq!(streams.len(), KEPT);
        assert!(streams
            .iter()
            .all(|e| e.report.events.len() <= EVENTS_PER_STREAM));
    }
}
