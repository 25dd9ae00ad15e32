//! The embedded engine: concurrent maps with expiry times, for a single instance.

use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::time::Instant;

use super::{unix_now, Block, StateStore, StoreFuture};

#[derive(Default)]
pub struct MemoryStore {
    /// Execution id -> its live streams and when each expires unless refreshed.
    executions: DashMap<String, Vec<(String, Instant)>>,
    /// Caller -> failed attempts and when the count expires.
    attempts: DashMap<String, (u64, Instant)>,
    blocks: DashMap<String, Block>,
}

fn ready<T: Send + 'static>(value: T) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(Ok(value)))
}

fn live(block: &Block, now: u64) -> bool {
    block.expires_at.is_none_or(|at| at > now)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StateStore for MemoryStore {
    fn record_failure<'a>(&'a self, caller: &'a str, ttl: Duration) -> StoreFuture<'a, u64> {
        let now = Instant::now();
        // The entry lock makes the read-increment-write atomic per caller.
        let mut entry = self.attempts.entry(caller.to_string()).or_insert((0, now));
        if entry.1 <= now {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now + ttl;
        ready(entry.0)
    }

    fn attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<u64>> {
        let now = Instant::now();
        let n = self.attempts.get(caller).filter(|e| e.1 > now).map(|e| e.0);
        if n.is_none() {
            self.attempts.remove_if(caller, |_, e| e.1 <= now);
        }
        ready(n)
    }

    fn clear_attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, ()> {
        self.attempts.remove(caller);
        ready(())
    }

    fn block<'a>(&'a self, caller: &'a str, ttl: Option<Duration>) -> StoreFuture<'a, Block> {
        let now = unix_now();
        let fresh = Block {
            caller: caller.to_string(),
            blocked_on: now,
            expires_at: ttl.map(|t| now + t.as_secs().max(1)),
        };
        let block = match self.blocks.entry(caller.to_string()) {
            Entry::Occupied(e) if live(e.get(), now) => e.get().clone(),
            Entry::Occupied(mut e) => {
                e.insert(fresh.clone());
                fresh
            }
            Entry::Vacant(e) => {
                e.insert(fresh.clone());
                fresh
            }
        };
        ready(block)
    }

    fn unblock<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, bool> {
        let now = unix_now();
        self.attempts.remove(caller);
        let was = self
            .blocks
            .remove(caller)
            .is_some_and(|(_, b)| live(&b, now));
        ready(was)
    }

    fn blocked<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<Block>> {
        let now = unix_now();
        let block = self
            .blocks
            .get(caller)
            .filter(|b| live(b, now))
            .map(|b| b.clone());
        if block.is_none() {
            self.blocks.remove_if(caller, |_, b| !live(b, now));
        }
        ready(block)
    }

    fn blocks(&self) -> StoreFuture<'_, Vec<Block>> {
        let now = unix_now();
        self.blocks.retain(|_, b| live(b, now));
        let mut all: Vec<Block> = self.blocks.iter().map(|b| b.clone()).collect();
        all.sort_by(|a, b| {
            a.blocked_on
                .cmp(&b.blocked_on)
                .then_with(|| a.caller.cmp(&b.caller))
        });
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
        let mut streams = self.executions.entry(execution_id.to_string()).or_default();
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
        self.executions.remove_if_mut(execution_id, |_, streams| {
            streams.retain(|(sid, at)| sid != stream_sid && *at > now);
            streams.is_empty()
        });
        ready(())
    }

    fn execution_is_live<'a>(&'a self, execution_id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let live = self
            .executions
            .get(execution_id)
            .is_some_and(|streams| streams.iter().any(|(_, at)| *at > now));
        ready(live)
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        ready(())
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
        assert!(store.executions.is_empty(), "nothing left behind");
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
        let b = store.block("+1", None).await.unwrap();
        assert_eq!(b.expires_at, None);
        assert_eq!(store.blocked("+1").await.unwrap(), Some(b.clone()));
        assert_eq!(
            store
                .block("+1", Some(Duration::from_secs(5)))
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
}
