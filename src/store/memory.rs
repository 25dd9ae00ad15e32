//! The embedded engine: concurrent maps with expiry times, for a single instance.

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::{StateStore, StoreFuture};

#[derive(Default)]
pub struct MemoryStore {
    /// Execution id -> its live streams and when each expires unless refreshed.
    executions: DashMap<String, Vec<(String, Instant)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StateStore for MemoryStore {
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
        Box::pin(std::future::ready(Ok(())))
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
        Box::pin(std::future::ready(Ok(())))
    }

    fn execution_is_live<'a>(&'a self, execution_id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let live = self
            .executions
            .get(execution_id)
            .is_some_and(|streams| streams.iter().any(|(_, at)| *at > now));
        Box::pin(std::future::ready(Ok(live)))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
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
}
