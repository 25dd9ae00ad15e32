//! The embedded engine: concurrent maps with expiry times, for a single instance. Blocks
//! and attempts go through the journal (when `store.path` is set), so they survive a crash;
//! live executions are not worth keeping across a restart and stay in memory.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::time::Instant;
use tracing::{info, warn};

use super::journal::{self, Journal, JournalError, Record};
use super::{Block, OperatorSession, StateStore, StoreError, StoreFuture};
use crate::clock::unix_now;
use crate::config::MAX_TTL_SECS;

#[derive(Default)]
struct Maps {
    /// Execution id -> its live streams and when each expires unless refreshed.
    executions: DashMap<String, Vec<(String, Instant)>>,
    /// Caller -> failed attempts and when the count expires.
    attempts: DashMap<String, (u64, Instant)>,
    blocks: DashMap<String, Block>,
    /// Fixed-window counters: key -> count and when the window closes.
    windows: DashMap<String, (u64, Instant)>,
    /// Keys written once, their values, and when they expire.
    claims: DashMap<String, (String, Instant)>,
    /// Operator sessions and when each expires (in memory: a restart logs everyone out).
    sessions: DashMap<String, (OperatorSession, Instant)>,
}

#[derive(Default)]
pub struct MemoryStore {
    maps: Arc<Maps>,
    /// Held from reading the state a change starts from until the change is applied, so
    /// changes happen one at a time, in the file's order. `None` inside: no file.
    journal: Arc<Mutex<Option<Journal>>>,
}

impl Maps {
    /// Makes a journal record's change: the only way blocks and attempts change, once the
    /// record is on disk.
    fn apply(&self, record: &Record) {
        match record {
            Record::Block(block) => {
                self.blocks.insert(block.caller.clone(), block.clone());
            }
            Record::Unblock { caller } => {
                self.blocks.remove(caller);
                self.attempts.remove(caller);
            }
            Record::Attempts {
                caller,
                n,
                expires_at,
            } => {
                let left = expires_at.saturating_sub(unix_now()).min(MAX_TTL_SECS);
                self.attempts.insert(
                    caller.clone(),
                    (*n, Instant::now() + Duration::from_secs(left)),
                );
            }
            Record::ClearAttempts { caller } => {
                self.attempts.remove(caller);
            }
        }
    }
}

fn ready<T: Send + 'static>(value: T) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(Ok(value)))
}

fn live(block: &Block, now: u64) -> bool {
    block.expires_at.is_none_or(|at| at > now)
}

impl MemoryStore {
    /// A store that forgets everything when the process ends.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose blocks and attempts are replayed from, and written to, the journal at
    /// `path`. Damaged records are reported and skipped; the file is rewritten compact.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let now_unix = unix_now();
        let state = journal::replay(path, now_unix)?;
        for (line, why) in &state.skipped {
            warn!(path = %path.display(), line, why = %why, "journal record skipped");
        }
        let journal = Journal::compact(path, &state)?;
        info!(
            path = %path.display(),
            records = state.records,
            blocks = state.blocks.len(),
            callers_with_attempts = state.attempts.len(),
            "journal replayed"
        );
        let maps = Maps::default();
        let now = Instant::now();
        for (caller, block) in state.blocks {
            maps.blocks.insert(caller, block);
        }
        for (caller, (n, expires_at)) in state.attempts {
            // A stored expiry far in the future is held to the longest TTL config allows.
            let left = Duration::from_secs(expires_at.saturating_sub(now_unix).min(MAX_TTL_SECS));
            maps.attempts.insert(caller, (n, now + left));
        }
        Ok(MemoryStore {
            maps: Arc::new(maps),
            journal: Arc::new(Mutex::new(Some(journal))),
        })
    }

    /// Makes a change: `plan` reads the state and says what the change is (the answer, and
    /// the record that makes it, if anything changes), and the change takes effect only once
    /// its record is written and fsynced. A write that fails (a full disk) changes nothing
    /// and answers 503. The file work runs on the blocking pool, never on a runtime worker.
    fn change<T, F>(&self, plan: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Maps) -> (T, Option<Record>) + Send + 'static,
    {
        let journal = self.journal.clone();
        let maps = self.maps.clone();
        let make = move || {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            let (value, record) = plan(&maps);
            let Some(record) = record else {
                return Ok(value);
            };
            let Some(journal) = journal.as_mut() else {
                maps.apply(&record);
                return Ok(value);
            };
            journal.append(&record).map_err(|e| {
                tracing::error!(error = %e, "journal write failed; the change was not made");
                StoreError::Unavailable(e.to_string())
            })?;
            maps.apply(&record);
            if journal.outgrown(maps.blocks.len() + maps.attempts.len()) {
                // Still under the journal lock: no change slips in between the snapshot
                // and the rewrite.
                let path = journal.path().to_path_buf();
                match Journal::compact(&path, &maps.snapshot()) {
                    Ok(compacted) => *journal = compacted,
                    // The old file is still whole and still appended to.
                    Err(e) => warn!(error = %e, "journal compaction failed"),
                }
            }
            Ok(value)
        };
        if !self.has_journal() {
            return Box::pin(std::future::ready(make()));
        }
        Box::pin(async move {
            tokio::task::spawn_blocking(make)
                .await
                .map_err(|e| StoreError::Unavailable(format!("journal task failed: {e}")))?
        })
    }

    fn has_journal(&self) -> bool {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl StateStore for MemoryStore {
    fn record_failure<'a>(&'a self, caller: &'a str, ttl: Duration) -> StoreFuture<'a, u64> {
        let caller = caller.to_string();
        self.change(move |maps| {
            let now = Instant::now();
            // Changes happen one at a time (see `change`): read, then count one more.
            let before = maps
                .attempts
                .get(&caller)
                .filter(|e| e.1 > now)
                .map_or(0, |e| e.0);
            let n = before.saturating_add(1);
            let record = Record::Attempts {
                caller,
                n,
                expires_at: unix_now().saturating_add(ttl.as_secs().max(1)),
            };
            (n, Some(record))
        })
    }

    fn attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<u64>> {
        let now = Instant::now();
        let n = self
            .maps
            .attempts
            .get(caller)
            .filter(|e| e.1 > now)
            .map(|e| e.0);
        ready(n)
    }

    fn clear_attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, ()> {
        if !self.maps.attempts.contains_key(caller) {
            // Nothing to forget: no journal write on every good PIN.
            return ready(());
        }
        let caller = caller.to_string();
        self.change(move |_| ((), Some(Record::ClearAttempts { caller })))
    }

    fn block<'a>(
        &'a self,
        caller: &'a str,
        ttl: Option<Duration>,
        reason: &'a str,
    ) -> StoreFuture<'a, Block> {
        let caller = caller.to_string();
        let reason = reason.to_string();
        self.change(move |maps| {
            let now = unix_now();
            let fresh = Block::placed(&caller, now, ttl, &reason);
            match maps.blocks.get(&caller) {
                Some(b) if live(&b, now) => (b.clone(), None),
                // None, or one that has expired: this block is the new one.
                _ => (fresh.clone(), Some(Record::Block(fresh))),
            }
        })
    }

    fn unblock<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, bool> {
        let caller = caller.to_string();
        self.change(move |maps| {
            let now = unix_now();
            let had_attempts = maps.attempts.contains_key(&caller);
            let block = maps.blocks.get(&caller).map(|b| b.clone());
            let was = block.as_ref().is_some_and(|b| live(b, now));
            let record = (had_attempts || block.is_some()).then_some(Record::Unblock { caller });
            (was, record)
        })
    }

    fn blocked<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<Block>> {
        let now = unix_now();
        let block = self
            .maps
            .blocks
            .get(caller)
            .filter(|b| live(b, now))
            .map(|b| b.clone());
        ready(block)
    }

    fn blocks(&self) -> StoreFuture<'_, Vec<Block>> {
        let now = unix_now();
        let mut all: Vec<Block> = self
            .maps
            .blocks
            .iter()
            .filter(|b| live(b, now))
            .map(|b| b.clone())
            .collect();
        super::sort_blocks(&mut all);
        ready(all)
    }

    fn execution_live<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        let now = Instant::now();
        let expires = now + ttl;
        let mut streams = self
            .maps
            .executions
            .entry(execution_id.to_string())
            .or_default();
        streams.retain(|(sid, at)| sid != stream_sid && *at > now);
        streams.push((stream_sid.to_string(), expires));
        ready(())
    }

    fn execution_ended<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
    ) -> StoreFuture<'a, ()> {
        let now = Instant::now();
        self.maps
            .executions
            .remove_if_mut(execution_id, |_, streams| {
                streams.retain(|(sid, at)| sid != stream_sid && *at > now);
                streams.is_empty()
            });
        ready(())
    }

    fn execution_is_live<'a>(&'a self, execution_id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let live = self
            .maps
            .executions
            .get(execution_id)
            .is_some_and(|streams| streams.iter().any(|(_, at)| *at > now));
        ready(live)
    }

    fn refresh_executions<'a>(
        &'a self,
        live: &'a [(String, String)],
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        for (execution, stream) in live {
            // Cannot fail in memory; the future is ready at once.
            drop(self.execution_live(execution, stream, ttl));
        }
        ready(())
    }

    fn count_in_window<'a>(
        &'a self,
        key: &'a str,
        window: Duration,
    ) -> StoreFuture<'a, (u64, Duration)> {
        let now = Instant::now();
        let mut entry = self
            .maps
            .windows
            .entry(key.to_string())
            .or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 = entry.0.saturating_add(1);
        ready((entry.0, entry.1 - now))
    }

    fn window<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(u64, Duration)>> {
        let now = Instant::now();
        let open = self
            .maps
            .windows
            .get(key)
            .filter(|e| e.1 > now)
            .map(|e| (e.0, e.1 - now));
        ready(open)
    }

    fn note_once<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let written = match self.maps.claims.entry(key.to_string()) {
            Entry::Occupied(e) if e.get().1 > now => false,
            Entry::Occupied(mut e) => {
                e.insert((value.to_string(), now + ttl));
                true
            }
            Entry::Vacant(e) => {
                e.insert((value.to_string(), now + ttl));
                true
            }
        };
        ready(written)
    }

    fn noted<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        let now = Instant::now();
        ready(
            self.maps
                .claims
                .get(key)
                .filter(|e| e.1 > now)
                .map(|e| e.0.clone()),
        )
    }

    fn session_open<'a>(&'a self, session: &'a OperatorSession) -> StoreFuture<'a, ()> {
        let ttl = Duration::from_secs(session.expires_at.saturating_sub(unix_now()));
        self.maps
            .sessions
            .insert(session.id.clone(), (session.clone(), Instant::now() + ttl));
        ready(())
    }

    fn session_live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        ready(self.maps.sessions.get(id).is_some_and(|e| e.1 > now))
    }

    fn sessions(&self) -> StoreFuture<'_, Vec<OperatorSession>> {
        let now = Instant::now();
        let mut open: Vec<OperatorSession> = self
            .maps
            .sessions
            .iter()
            .filter(|e| e.1 > now)
            .map(|e| e.0.clone())
            .collect();
        super::sort_sessions(&mut open);
        ready(open)
    }

    fn session_close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        ready(
            self.maps
                .sessions
                .remove(id)
                .is_some_and(|(_, (_, at))| at > now),
        )
    }

    fn purge_expired(&self) -> StoreFuture<'_, ()> {
        self.maps.purge(Instant::now(), unix_now());
        ready(())
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        ready(())
    }
}

impl Maps {
    /// What is live now, as the journal writes it at compaction.
    fn snapshot(&self) -> journal::Replayed {
        let now = Instant::now();
        let now_unix = unix_now();
        let mut state = journal::Replayed::default();
        for b in self.blocks.iter().filter(|b| live(b, now_unix)) {
            state.blocks.insert(b.key().clone(), b.value().clone());
        }
        for a in self.attempts.iter().filter(|a| a.1 > now) {
            let left = (a.1 - now).as_secs() + 1;
            state
                .attempts
                .insert(a.key().clone(), (a.0, now_unix.saturating_add(left)));
        }
        state
    }

    /// Drops every entry that has expired: without this a long-running instance that sees a
    /// stream of distinct callers would keep them all until restart.
    fn purge(&self, now: Instant, now_unix: u64) {
        self.attempts.retain(|_, (_, at)| *at > now);
        self.blocks.retain(|_, b| live(b, now_unix));
        self.windows.retain(|_, (_, at)| *at > now);
        self.claims.retain(|_, (_, at)| *at > now);
        self.sessions.retain(|_, (_, at)| *at > now);
        self.executions.retain(|_, streams| {
            streams.retain(|(_, at)| *at > now);
            !streams.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn executions_expire_unless_refreshed() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(30);
        store.execution_live("FN1", "MZ1", ttl).await.unwrap();
        assert!(store.execution_is_live("FN1").await.unwrap());
        assert!(!store.execution_is_live("FN2").await.unwrap());

        tokio::time::advance(Duration::from_secs(20)).await;
        store.execution_live("FN1", "MZ1", ttl).await.unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(store.execution_is_live("FN1").await.unwrap(), "refreshed");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!store.execution_is_live("FN1").await.unwrap(), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn an_execution_stays_live_while_any_stream_is() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(30);
        store.execution_live("FN1", "MZ1", ttl).await.unwrap();
        store.execution_live("FN1", "MZ2", ttl).await.unwrap();
        store.execution_ended("FN1", "MZ1").await.unwrap();
        assert!(store.execution_is_live("FN1").await.unwrap());
        store.execution_ended("FN1", "MZ2").await.unwrap();
        assert!(!store.execution_is_live("FN1").await.unwrap());
        assert!(store.maps.executions.is_empty(), "nothing left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_count_and_expire_after_the_latest_failure() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(60);
        assert_eq!(store.attempts("+1").await.unwrap(), None);
        assert_eq!(store.record_failure("+1", ttl).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(store.record_failure("+1", ttl).await.unwrap(), 2);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(
            store.attempts("+1").await.unwrap(),
            Some(2),
            "refreshed by the latest"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(store.attempts("+1").await.unwrap(), None);
        assert_eq!(
            store.record_failure("+1", ttl).await.unwrap(),
            1,
            "counting starts over"
        );
        store.clear_attempts("+1").await.unwrap();
        assert_eq!(store.attempts("+1").await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_failures_all_count() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move {
                    s.record_failure("+1", Duration::from_secs(60))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut seen: Vec<u64> = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (1..=200).collect::<Vec<_>>(),
            "each failure got its own count"
        );
    }

    #[tokio::test]
    async fn blocks_persist_until_removed_and_removal_clears_attempts() {
        let store = MemoryStore::new();
        store
            .record_failure("+1", Duration::from_secs(60))
            .await
            .unwrap();
        let b = store.block("+1", None, "a test").await.unwrap();
        assert_eq!(b.expires_at, None);
        assert_eq!(store.blocked("+1").await.unwrap(), Some(b.clone()));
        assert_eq!(
            store
                .block("+1", Some(Duration::from_secs(5)), "a test")
                .await
                .unwrap(),
            b,
            "kept"
        );
        assert_eq!(store.blocks().await.unwrap(), vec![b]);
        assert!(store.unblock("+1").await.unwrap());
        assert!(!store.unblock("+1").await.unwrap());
        assert_eq!(store.blocked("+1").await.unwrap(), None);
        assert_eq!(store.attempts("+1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_journal_brings_blocks_and_attempts_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        {
            let store = MemoryStore::open(&path).unwrap();
            store.block("+1", None, "a test").await.unwrap();
            store.block("+2", None, "a test").await.unwrap();
            store.unblock("+2").await.unwrap();
            for _ in 0..3 {
                store
                    .record_failure("+3", Duration::from_secs(600))
                    .await
                    .unwrap();
            }
            store
                .record_failure("+4", Duration::from_secs(600))
                .await
                .unwrap();
            store.clear_attempts("+4").await.unwrap();
        }
        let store = MemoryStore::open(&path).unwrap();
        assert!(store.blocked("+1").await.unwrap().is_some());
        assert!(store.blocked("+2").await.unwrap().is_none());
        assert_eq!(store.attempts("+3").await.unwrap(), Some(3));
        assert_eq!(store.attempts("+4").await.unwrap(), None);
        assert_eq!(
            store
                .record_failure("+3", Duration::from_secs(600))
                .await
                .unwrap(),
            4
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_not_just_hidden() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(60);
        for i in 0..500 {
            let caller = format!("+1555{i:07}");
            store.record_failure(&caller, ttl).await.unwrap();
            store.count_in_window(&caller, ttl).await.unwrap();
            store.claim_once(&caller, ttl).await.unwrap();
            store.execution_live(&caller, "MZ", ttl).await.unwrap();
        }
        store
            .record_failure("+keep", Duration::from_secs(600))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        store.purge_expired().await.unwrap();
        assert_eq!(store.maps.attempts.len(), 501, "nothing is due yet");
        tokio::time::advance(Duration::from_secs(31)).await;
        store.purge_expired().await.unwrap();
        assert_eq!(store.maps.attempts.len(), 1, "only the live one stays");
        assert!(store.maps.windows.is_empty());
        assert!(store.maps.claims.is_empty());
        assert!(store.maps.executions.is_empty());
        assert_eq!(store.attempts("+keep").await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn a_running_journal_is_compacted_once_it_outgrows_its_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let store = MemoryStore::open(&path).unwrap();
        let ttl = Duration::from_secs(600);
        for _ in 0..5000 {
            store.record_failure("+1", ttl).await.unwrap();
        }
        store.block("+2", None, "a test").await.unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 1000, "{lines} lines for two live entries");
        drop(store);
        let store = MemoryStore::open(&path).unwrap();
        assert_eq!(store.attempts("+1").await.unwrap(), Some(5000));
        assert!(store.blocked("+2").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn stored_numbers_at_their_limits_neither_wrap_nor_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        {
            let mut j = Journal::compact(&path, &journal::Replayed::default()).unwrap();
            j.append(&Record::Attempts {
                caller: "+1".into(),
                n: u64::MAX,
                expires_at: u64::MAX,
            })
            .unwrap();
            j.append(&Record::Block(Block {
                caller: "+2".into(),
                blocked_on: u64::MAX,
                expires_at: Some(u64::MAX),
                reason: None,
            }))
            .unwrap();
        }
        let store = MemoryStore::open(&path).unwrap();
        assert_eq!(
            store
                .record_failure("+1", Duration::from_secs(60))
                .await
                .unwrap(),
            u64::MAX,
            "saturates instead of wrapping to 0"
        );
        assert!(store.blocked("+2").await.unwrap().is_some());
        assert_eq!(store.blocks().await.unwrap().len(), 1);
    }
}
