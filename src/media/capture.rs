//! Capture: a chosen call's Twilio messages written to a file of its own with their arrival
//! times, for `test-client --replay`. JSON lines: a header, then one line per message,
//! `{"at_ms":<since the start>,"message":<Twilio's message as it came>}`, DTMF digits and the
//! route token masked.
//!
//! The call never waits on the disk: lines go through a bounded channel to a task that writes
//! them; a disk that falls behind loses capture lines (counted), never audio. A file stops
//! growing at `media.capture.max_bytes`; files older than `media.capture.retention_secs` are
//! deleted. A capture holds the caller's voice: the files are readable by the service's user
//! alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::CaptureSettings;
use crate::twilio::messages::Start;

/// Lines waiting for the disk, at most: about twenty seconds of a call.
const BACKLOG: usize = 1024;

/// What replaces a masked value.
pub const MASKED: &str = "*";

/// A call being captured.
pub struct Capture {
    lines: mpsc::Sender<String>,
    began: Instant,
    /// Lines the disk did not take in time.
    pub dropped: u64,
    /// The file is full, or could not be written: nothing more is sent.
    done: bool,
}

/// Whether this call is captured: capture is on, the call goes to one of the chosen backends
/// (or any, when none are chosen), and it falls in the share.
pub fn chosen<'a>(settings: &CaptureSettings, backends: impl Iterator<Item = &'a str>) -> bool {
    if !settings.enabled {
        return false;
    }
    let mut backends = backends;
    let routed =
        settings.backends.is_empty() || backends.any(|b| settings.backends.iter().any(|c| c == b));
    routed && fastrand::f64() < settings.share
}

/// Keeps letters and digits of an id Twilio chose, for a file name.
fn file_part(id: &str) -> String {
    id.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect()
}

impl Capture {
    /// Starts capturing the call whose `start` is `raw`, in a task `tracker` waits for.
    pub fn begin(
        settings: &CaptureSettings,
        start: &Start,
        raw: &str,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Capture {
        let (lines, rx) = mpsc::channel(BACKLOG);
        let path = Path::new(&settings.dir).join(format!(
            "{}-{}.jsonl",
            file_part(&start.call_sid),
            file_part(&start.stream_sid)
        ));
        let header = serde_json::json!({
            "capture": 1,
            "call_sid": start.call_sid,
            "stream_sid": start.stream_sid,
            "started_at_ms": crate::clock::unix_now_ms(),
        });
        tracker.spawn(write(path, header.to_string(), rx, settings.max_bytes));
        let mut capture = Capture {
            lines,
            began: Instant::now(),
            dropped: 0,
            done: false,
        };
        capture.message(&masked_start(raw));
        capture
    }

    /// One message from Twilio, as it came (a `dtmf` with its digit masked).
    pub fn message(&mut self, text: &str) {
        if self.done {
            return;
        }
        let at = self.began.elapsed().as_millis();
        let line = if text.contains("\"dtmf\"") {
            format!("{{\"at_ms\":{at},\"message\":{}}}\n", masked_dtmf(text))
        } else {
            format!("{{\"at_ms\":{at},\"message\":{text}}}\n")
        };
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => self.done = true,
        }
    }
}

/// `start` without its route token (a credential, of no use in a replay anyway).
fn masked_start(raw: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(raw) else {
        return "{}".to_string();
    };
    if let Some(token) = v
        .pointer_mut("/start/customParameters/routeToken")
        .filter(|t| t.is_string())
    {
        *token = MASKED.into();
    }
    v.to_string()
}

/// A `dtmf` message with its digit masked: keys pressed are often PINs and card numbers.
fn masked_dtmf(raw: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(raw) else {
        return "{}".to_string();
    };
    if let Some(digit) = v.pointer_mut("/dtmf/digit") {
        *digit = MASKED.into();
    }
    v.to_string()
}

/// Writes the capture's lines until the call ends or the file is full. A new file each time
/// (never one that exists), readable by the service's user alone.
async fn write(path: PathBuf, header: String, mut rx: mpsc::Receiver<String>, max_bytes: u64) {
    let file = async {
        if let Some(dir) = path.parent() {
            create_private_dir(dir).await?;
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        options.open(&path).await
    };
    let file = match file.await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the call's capture; the call goes on without one");
            return;
        }
    };
    let mut out = tokio::io::BufWriter::new(file);
    let header = header + "\n";
    let mut written = header.len() as u64;
    let mut full = false;
    if out.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    while let Some(line) = rx.recv().await {
        if written + line.len() as u64 > max_bytes {
            full = true;
            break;
        }
        written += line.len() as u64;
        if let Err(e) = out.write_all(line.as_bytes()).await {
            tracing::warn!(path = %path.display(), error = %e, "capture write failed; the rest of the call is not captured");
            break;
        }
    }
    // The sender sees the channel closed and stops building lines.
    rx.close();
    if full {
        let _ = out
            .write_all(b"{\"truncated\":\"media.capture.max_bytes reached\"}\n")
            .await;
    }
    let _ = out.flush().await;
    tracing::info!(path = %path.display(), bytes = written, full, "capture written");
}

async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder.create(dir).await
}

/// Deletes capture files older than `retention` in `dir`; answers how many went.
pub fn purge(dir: &Path, retention: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| now.duration_since(at).unwrap_or_default() > retention)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_tokens_and_digits_are_masked_and_nothing_else_changes() {
        let start = r#"{"event":"start","start":{"callSid":"CA1","customParameters":{"routeToken":"v1.secret.tag","callerId":"+1555"}}}"#;
        let v: serde_json::Value = serde_json::from_str(&masked_start(start)).unwrap();
        assert_eq!(v["start"]["customParameters"]["routeToken"], MASKED);
        assert_eq!(v["start"]["customParameters"]["callerId"], "+1555");
        let dtmf = r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"7"}}"#;
        let v: serde_json::Value = serde_json::from_str(&masked_dtmf(dtmf)).unwrap();
        assert_eq!(v["dtmf"]["digit"], MASKED);
        assert_eq!(v["sequenceNumber"], "5");
    }

    #[test]
    fn file_names_keep_only_letters_and_digits() {
        assert_eq!(file_part("CA12/../../etc"), "CA12etc");
    }

    #[test]
    fn old_files_are_purged_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("CA1-MZ1.jsonl");
        let other = dir.path().join("notes.txt");
        std::fs::write(&old, "{}").unwrap();
        std::fs::write(&other, "keep").unwrap();
        assert_eq!(purge(dir.path(), Duration::from_secs(3600)), 0, "too new");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(purge(dir.path(), Duration::from_millis(10)), 1);
        assert!(!old.exists() && other.exists());
    }
}
