//! The service's shared state behind one interface, so the media and gate code never know
//! which engine holds it. Engines: `memory` (embedded, one instance).

pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{StoreKind, StoreSettings};

pub use memory::MemoryStore;

/// A store operation in flight. Boxed so engines can be chosen at run time behind `dyn`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine cannot be reached; callers answer 503 and carry on.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// State shared by every instance of the service.
pub trait StateStore: Send + Sync + 'static {
    /// Marks one stream of a Studio execution live until `ttl` from now; called again to
    /// refresh it while the stream lasts.
    fn execution_live<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;

    /// The stream has ended; the execution stays live while any other stream of it is.
    fn execution_ended<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// Whether any stream of the execution is live on any instance.
    fn execution_is_live<'a>(&'a self, execution_id: &'a str) -> StoreFuture<'a, bool>;

    /// Readiness: the engine answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

/// Builds the engine the settings name.
pub fn from_settings(settings: &StoreSettings) -> Arc<dyn StateStore> {
    match settings.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
    }
}
