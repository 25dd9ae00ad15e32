//! Which Studio executions have a live stream, as `/executions/{id}/connected` answers it. This
//! instance answers for its own calls from its own list, whatever the store says: the Studio
//! Flow hangs up on anything but 200, so a store outage must never read as "the stream is
//! gone" for a call that is streaming here. The store is asked only for executions this
//! instance does not hold.
//!
//! One task writes every change to the store in order — a stream live, a stream ended, the
//! periodic refresh — so a refresh begun before a call ended can never write it back after.
//! When the store lost what it was told (a failed write, or a Redis restarted empty, seen by a
//! sentinel key that disappears with the data), the task writes every live execution again at
//! once, and goes on trying each second until the store takes it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::store::{StateStore, StoreError};

/// How often the task checks that the store still holds what it was told, and retries what
/// failed.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long the sentinel key lives; it is claimed again once it has gone (expired or lost).
const SENTINEL_TTL: Duration = Duration::from_secs(3600);

/// A stream of an execution: (execution id, stream sid).
type Entry = (String, String);

enum Change {
    Live(Entry),
    Ended(Entry),
    /// Answers once everything sent before it has been written (or failed).
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub struct Executions {
    /// Live streams on this instance, per execution id.
    here: DashMap<Box<str>, u32>,
    changes: mpsc::UnboundedSender<Change>,
}

impl Executions {
    /// The list, and the task that keeps the store told (it ends when the list is dropped).
    pub fn new(
        store: Arc<dyn StateStore>,
        ttl: Duration,
        instance_id: &str,
    ) -> (Arc<Executions>, tokio::task::JoinHandle<()>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            store,
            ttl,
            sentinel: format!("executions-sentinel:{instance_id}"),
            live: HashSet::new(),
            unsent_ends: Vec::new(),
            stale: true,
        };
        let task = tokio::spawn(writer.run(rx));
        (
            Arc::new(Executions {
                here: DashMap::new(),
                changes,
            }),
            task,
        )
    }

    /// A stream of `execution` started here.
    pub fn started(&self, execution: &str, stream_sid: &str) {
        *self.here.entry(execution.into()).or_default() += 1;
        let _ = self
            .changes
            .send(Change::Live((execution.into(), stream_sid.into())));
    }

    /// A stream of `execution` that started here has ended.
    pub fn ended(&self, execution: &str, stream_sid: &str) {
        self.here.remove_if_mut(execution, |_, n| {
            *n -= 1;
            *n == 0
        });
        let _ = self
            .changes
            .send(Change::Ended((execution.into(), stream_sid.into())));
    }

    /// Waits until every change so far has reached the store (or failed): at exit, so the
    /// last calls' ends are written before the process goes.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.changes.send(Change::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }

    /// Whether a stream of `execution` is live on this instance.
    pub fn here(&self, execution: &str) -> bool {
        self.here.contains_key(execution)
    }

    /// Whether a stream of `execution` is live here or, by the store, on any instance.
    pub async fn is_live(
        &self,
        store: &dyn StateStore,
        execution: &str,
    ) -> Result<bool, StoreError> {
        if self.here(execution) {
            return Ok(true);
        }
        store.execution_is_live(execution).await
    }
}

struct Writer {
    store: Arc<dyn StateStore>,
    ttl: Duration,
    sentinel: String,
    live: HashSet<Entry>,
    /// Ends the store did not take: sent again at the next check.
    unsent_ends: Vec<Entry>,
    /// The store may not hold every live execution: write them all at the next check.
    stale: bool,
}

impl Writer {
    async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>) {
        let mut refresh = tokio::time::interval(self.ttl / 3);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                change = changes.recv() => match change {
                    Some(change) => self.apply(change).await,
                    None => return,
                },
                _ = refresh.tick() => self.refresh_all().await,
                _ = check.tick() => self.check().await,
            }
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            Change::Live(entry) => {
                let written = self
                    .store
                    .execution_live(&entry.0, &entry.1, self.ttl)
                    .await;
                self.live.insert(entry);
                if let Err(e) = written {
                    // The call keeps streaming; this instance answers for it meanwhile.
                    self.failed(&e);
                }
            }
            Change::Flush(done) => {
                let _ = done.send(());
            }
            Change::Ended(entry) => {
                self.live.remove(&entry);
                if self
                    .store
                    .execution_ended(&entry.0, &entry.1)
                    .await
                    .is_err()
                {
                    self.unsent_ends.push(entry);
                }
            }
        }
    }

    fn failed(&mut self, e: &StoreError) {
        if !self.stale {
            warn!(error = %e, executions = self.live.len(), "could not write live executions; this instance answers for its own calls, and writes them again once the store answers");
        }
        self.stale = true;
    }

    /// Every live execution written again, in one batch.
    async fn refresh_all(&mut self) {
        if self.live.is_empty() {
            self.stale = false;
            return;
        }
        let live: Vec<Entry> = self.live.iter().cloned().collect();
        match self.store.refresh_executions(&live, self.ttl).await {
            Ok(()) => {
                if self.stale {
                    info!(
                        executions = live.len(),
                        "live executions written to the store again"
                    );
                }
                self.stale = false;
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Once a second: ends that failed are sent again, and when the store may have lost what
    /// it holds (a failed write, or the sentinel gone with its data), everything is written.
    async fn check(&mut self) {
        if !self.unsent_ends.is_empty() {
            let mut still = Vec::new();
            for entry in std::mem::take(&mut self.unsent_ends) {
                if self.live.contains(&entry) {
                    continue;
                }
                if self
                    .store
                    .execution_ended(&entry.0, &entry.1)
                    .await
                    .is_err()
                {
                    still.push(entry);
                }
            }
            self.unsent_ends = still;
        }
        if self.live.is_empty() {
            return;
        }
        match self.store.claim_once(&self.sentinel, SENTINEL_TTL).await {
            // Newly claimed: the store did not hold the sentinel, so it may have lost the
            // executions too (a Redis restarted without its data).
            Ok(true) => self.stale = true,
            Ok(false) => {}
            Err(e) => self.failed(&e),
        }
        if self.stale {
            self.refresh_all().await;
        }
    }
}

/// Counts per execution, for tests that compare the list with what was started.
#[cfg(test)]
fn counts(e: &Executions) -> std::collections::HashMap<String, u32> {
    e.here
        .iter()
        .map(|r| (r.key().to_string(), *r.value()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, OperatorSession, StoreFuture};
    use tokio::sync::Notify;

    /// The memory engine, whose batch refresh waits until the test lets it through.
    struct SlowRefresh {
        inner: MemoryStore,
        entered: Notify,
        release: Notify,
    }

    impl StateStore for SlowRefresh {
        fn refresh_executions<'a>(
            &'a self,
            live: &'a [(String, String)],
            ttl: Duration,
        ) -> StoreFuture<'a, ()> {
            Box::pin(async move {
                self.entered.notify_one();
                self.release.notified().await;
                self.inner.refresh_executions(live, ttl).await
            })
        }
        // Everything else as the memory engine does it.
        fn record_failure<'a>(&'a self, c: &'a str, ttl: Duration) -> StoreFuture<'a, u64> {
            self.inner.record_failure(c, ttl)
        }
        fn attempts<'a>(&'a self, c: &'a str) -> StoreFuture<'a, Option<u64>> {
            self.inner.attempts(c)
        }
        fn clear_attempts<'a>(&'a self, c: &'a str) -> StoreFuture<'a, ()> {
            self.inner.clear_attempts(c)
        }
        fn block<'a>(
            &'a self,
            c: &'a str,
            ttl: Option<Duration>,
            reason: &'a str,
        ) -> StoreFuture<'a, crate::store::Block> {
            self.inner.block(c, ttl, reason)
        }
        fn unblock<'a>(&'a self, c: &'a str) -> StoreFuture<'a, bool> {
            self.inner.unblock(c)
        }
        fn blocked<'a>(&'a self, c: &'a str) -> StoreFuture<'a, Option<crate::store::Block>> {
            self.inner.blocked(c)
        }
        fn blocks(&self) -> StoreFuture<'_, Vec<crate::store::Block>> {
            self.inner.blocks()
        }
        fn execution_live<'a>(
            &'a self,
            e: &'a str,
            s: &'a str,
            ttl: Duration,
        ) -> StoreFuture<'a, ()> {
            self.inner.execution_live(e, s, ttl)
        }
        fn execution_ended<'a>(&'a self, e: &'a str, s: &'a str) -> StoreFuture<'a, ()> {
            self.inner.execution_ended(e, s)
        }
        fn execution_is_live<'a>(&'a self, e: &'a str) -> StoreFuture<'a, bool> {
            self.inner.execution_is_live(e)
        }
        fn count_in_window<'a>(
            &'a self,
            k: &'a str,
            w: Duration,
        ) -> StoreFuture<'a, (u64, Duration)> {
            self.inner.count_in_window(k, w)
        }
        fn window<'a>(&'a self, k: &'a str) -> StoreFuture<'a, Option<(u64, Duration)>> {
            self.inner.window(k)
        }
        fn note_once<'a>(&'a self, k: &'a str, v: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
            self.inner.note_once(k, v, ttl)
        }
        fn noted<'a>(&'a self, k: &'a str) -> StoreFuture<'a, Option<String>> {
            self.inner.noted(k)
        }
        fn ping(&self) -> StoreFuture<'_, ()> {
            self.inner.ping()
        }
        fn session_open<'a>(&'a self, s: &'a OperatorSession) -> StoreFuture<'a, ()> {
            self.inner.session_open(s)
        }
        fn sessions(&self) -> StoreFuture<'_, Vec<OperatorSession>> {
            self.inner.sessions()
        }
        fn session_live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
            self.inner.session_live(id)
        }
        fn session_close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
            self.inner.session_close(id)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_begun_before_a_call_ended_never_writes_it_back() {
        let store = Arc::new(SlowRefresh {
            inner: MemoryStore::new(),
            entered: Notify::new(),
            release: Notify::new(),
        });
        let ttl = Duration::from_secs(30);
        let (list, _task) = Executions::new(store.clone(), ttl, "test");
        list.started("FN1", "MZ1");
        // The periodic refresh begins, and waits in the store.
        tokio::time::advance(ttl / 3).await;
        store.entered.notified().await;
        // The call ends meanwhile.
        list.ended("FN1", "MZ1");
        assert!(!list.here("FN1"));
        store.release.notify_one();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !store.inner.execution_is_live("FN1").await.unwrap(),
            "the end came after the refresh in the store too"
        );
    }

    #[tokio::test]
    async fn streams_of_one_execution_are_counted_here() {
        let store = Arc::new(MemoryStore::new());
        let (list, _task) = Executions::new(store.clone(), Duration::from_secs(30), "test");
        list.started("FN1", "MZ1");
        list.started("FN1", "MZ2");
        list.ended("FN1", "MZ1");
        assert_eq!(
            counts(&list),
            std::collections::HashMap::from([("FN1".to_string(), 1)])
        );
        assert!(list.is_live(store.as_ref(), "FN1").await.unwrap());
        list.ended("FN1", "MZ2");
        assert!(counts(&list).is_empty());
    }
}
