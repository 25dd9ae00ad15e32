//! The memory engine's journal: an append-only file of the changes to blocks and attempts,
//! fsynced one by one, so a block survives `kill -9`. At start-up it is replayed and rewritten
//! compact (only what is still live).
//!
//! One record per line: `<crc32 hex> <json>`. A line whose checksum or JSON does not hold (a
//! write cut short by a crash, a flipped bit) is reported and skipped; the records around it
//! still count.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Block;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    Block(Block),
    Unblock {
        caller: String,
    },
    /// The caller's failed attempts now, and when the count expires (Unix seconds).
    Attempts {
        caller: String,
        n: u64,
        expires_at: u64,
    },
    ClearAttempts {
        caller: String,
    },
}

/// What a replay recovered.
#[derive(Debug, Default)]
pub struct Replayed {
    pub blocks: HashMap<String, Block>,
    /// Caller -> (count, expiry in Unix seconds).
    pub attempts: HashMap<String, (u64, u64)>,
    pub records: usize,
    /// Lines skipped, each with its line number and why.
    pub skipped: Vec<(usize, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("store.path {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Records in the file: what compaction wrote plus what was appended since.
    records: usize,
    /// Bytes up to the end of the last record known to be whole on disk.
    len: u64,
    /// A failed write may have left part of a record after `len`.
    torn: bool,
}

/// Below this many records a journal is never worth rewriting while running.
const COMPACT_AT: usize = 4096;

fn encode(record: &Record) -> String {
    let json = serde_json::to_string(record).expect("records serialize");
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

fn decode(line: &str) -> Result<Record, String> {
    let (sum, json) = line
        .split_once(' ')
        .ok_or_else(|| "no checksum".to_string())?;
    let expected = u32::from_str_radix(sum, 16).map_err(|_| "bad checksum field".to_string())?;
    if crc32fast::hash(json.as_bytes()) != expected {
        return Err("checksum mismatch (torn or damaged write)".into());
    }
    serde_json::from_str(json).map_err(|e| format!("unreadable record: {e}"))
}

/// Replays a journal's records in order, dropping what has expired by `now`.
pub fn replay(path: &Path, now: u64) -> Result<Replayed, JournalError> {
    let io = |source| JournalError {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Replayed::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = buf.ends_with(b"\n");
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            continue;
        }
        if !complete {
            out.skipped.push((
                line_no,
                "last record has no line end (write cut short)".into(),
            ));
            continue;
        }
        let record = match decode(text) {
            Ok(r) => r,
            Err(why) => {
                out.skipped.push((line_no, why));
                continue;
            }
        };
        out.records += 1;
        match record {
            Record::Block(b) => {
                out.blocks.insert(b.caller.clone(), b);
            }
            Record::Unblock { caller } => {
                out.blocks.remove(&caller);
                out.attempts.remove(&caller);
            }
            Record::Attempts {
                caller,
                n,
                expires_at,
            } => {
                out.attempts.insert(caller, (n, expires_at));
            }
            Record::ClearAttempts { caller } => {
                out.attempts.remove(&caller);
            }
        }
    }
    out.blocks
        .retain(|_, b| b.expires_at.is_none_or(|at| at > now));
    out.attempts.retain(|_, (_, at)| *at > now);
    Ok(out)
}

impl Journal {
    /// Rewrites the journal to hold exactly `state` (written beside it, fsynced, renamed over
    /// it), then opens it for appending.
    pub fn compact(path: &Path, state: &Replayed) -> Result<Journal, JournalError> {
        let io = |source| JournalError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("compacting");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            let mut blocks: Vec<&Block> = state.blocks.values().collect();
            blocks.sort_by(|a, b| a.caller.cmp(&b.caller));
            for b in blocks {
                f.write_all(encode(&Record::Block(b.clone())).as_bytes())
                    .map_err(io)?;
            }
            let mut attempts: Vec<_> = state.attempts.iter().collect();
            attempts.sort();
            for (caller, (n, expires_at)) in attempts {
                let r = Record::Attempts {
                    caller: caller.clone(),
                    n: *n,
                    expires_at: *expires_at,
                };
                f.write_all(encode(&r).as_bytes()).map_err(io)?;
            }
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself must reach the disk.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            records: state.blocks.len() + state.attempts.len(),
            len,
            torn: false,
        })
    }

    /// Appends one record and waits until it is on disk. A write that fails (a full disk)
    /// is cut back off, so the file ends with its last good record and the next record
    /// starts a line of its own: nothing acknowledged is lost at replay.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        let fail = |path: &Path, source| JournalError {
            path: path.to_path_buf(),
            source,
        };
        if self.torn {
            // An earlier failure could not be cut off: no record goes after a torn one.
            self.cut_back().map_err(|e| fail(&self.path, e))?;
        }
        let line = encode(record);
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data());
        if let Err(source) = written {
            self.torn = true;
            if let Err(e) = self.cut_back() {
                tracing::error!(path = %self.path.display(), error = %e, "could not cut a failed journal write back off; retrying before the next record");
            }
            return Err(fail(&self.path, source));
        }
        self.len += line.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Truncates the file to its last good record.
    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.torn = false;
        Ok(())
    }

    /// Whether the file has outgrown the `live` entries it describes enough to be rewritten:
    /// a running instance compacts as it goes, not only at start-up.
    pub fn outgrown(&self, live: usize) -> bool {
        self.records >= COMPACT_AT.max(live.saturating_mul(4))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(caller: &str, expires_at: Option<u64>) -> Record {
        Record::Block(Block {
            caller: caller.into(),
            blocked_on: 100,
            expires_at,
            reason: None,
        })
    }

    fn attempts(caller: &str, n: u64) -> Record {
        Record::Attempts {
            caller: caller.into(),
            n,
            expires_at: 10_000,
        }
    }

    #[test]
    fn replays_in_order_and_compacts_to_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.log");
        let mut j = Journal::compact(&path, &Replayed::default()).unwrap();
        for r in [
            block("+1", None),
            block("+2", Some(150)),
            attempts("+3", 1),
            attempts("+3", 2),
            block("+4", None),
            Record::Unblock {
                caller: "+4".into(),
            },
            attempts("+5", 1),
            Record::ClearAttempts {
                caller: "+5".into(),
            },
        ] {
            j.append(&r).unwrap();
        }
        let state = replay(&path, 200).unwrap();
        assert_eq!(state.records, 8);
        assert!(state.skipped.is_empty());
        assert_eq!(
            state.blocks.keys().collect::<Vec<_>>(),
            ["+1"],
            "+2 expired, +4 unblocked"
        );
        assert_eq!(state.attempts.get("+3"), Some(&(2, 10_000)));
        assert!(!state.attempts.contains_key("+5"));

        Journal::compact(&path, &state).unwrap();
        let again = replay(&path, 200).unwrap();
        assert_eq!(again.records, 2, "one line per live entry");
        assert_eq!(again.blocks, state.blocks);
        assert_eq!(again.attempts, state.attempts);
    }

    #[test]
    fn a_torn_tail_and_a_damaged_line_are_skipped_without_losing_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let mut j = Journal::compact(&path, &Replayed::default()).unwrap();
        j.append(&block("+1", None)).unwrap();
        drop(j);
        let mut text = std::fs::read_to_string(&path).unwrap();
        // A damaged line in the middle, a good record after it, then a write cut short.
        text.push_str("0badc0de {\"t\":\"block\",\"caller\":\"+9\",\"blocked_on\":1}\n");
        text.push_str(&encode(&block("+2", None)));
        let torn = encode(&block("+3", None));
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, text).unwrap();

        let state = replay(&path, 200).unwrap();
        let mut callers: Vec<_> = state.blocks.keys().cloned().collect();
        callers.sort();
        assert_eq!(callers, ["+1", "+2"]);
        assert_eq!(state.skipped.len(), 2);
        assert_eq!(state.skipped[0].0, 2);
        assert!(state.skipped[0].1.contains("checksum"));
        assert_eq!(state.skipped[1].0, 4);
        assert!(state.skipped[1].1.contains("cut short"));

        // Compaction leaves a clean file, and appending after it works.
        let mut j = Journal::compact(&path, &state).unwrap();
        j.append(&block("+3", None)).unwrap();
        let state = replay(&path, 200).unwrap();
        assert!(state.skipped.is_empty());
        assert_eq!(state.blocks.len(), 3);
    }

    #[test]
    fn a_complete_line_with_a_half_written_record_is_caught_by_its_checksum() {
        let line = encode(&attempts("+1", 5));
        let cut = format!("{}\n", &line[..line.len() - 6]);
        assert!(decode(cut.trim_end()).is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn checksummed(json: &str) -> String {
            format!("{:08x} {json}", crc32fast::hash(json.as_bytes()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            #[test]
            fn any_line_decodes_or_is_refused(line in any::<String>(), json in any::<String>()) {
                let _ = decode(&line);
                // Past the checksum, whatever JSON a damaged file holds.
                let _ = decode(&checksummed(&json));
            }

            #[test]
            fn records_with_numbers_at_their_limits_replay(
                n in any::<u64>(),
                at in any::<u64>(),
                caller in any::<String>(),
                block in any::<bool>(),
            ) {
                let json = if block {
                    serde_json::json!({"t": "block", "caller": caller, "blocked_on": n, "expires_at": at})
                } else {
                    serde_json::json!({"t": "attempts", "caller": caller, "n": n, "expires_at": at})
                };
                let record = decode(&checksummed(&json.to_string()));
                prop_assert!(record.is_ok());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            #[test]
            fn any_file_replays_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("state.log");
                std::fs::write(&path, &bytes).unwrap();
                prop_assert!(replay(&path, 1_000).is_ok());
            }
        }
    }
}
