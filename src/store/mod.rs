//! The service's shared state behind one interface, so the media and gate code never know
//! which engine holds it: live executions, failed-PIN attempts and blocked callers.
//! Engines: `memory` (embedded, one instance, with a journal file) and `redis` (shared by
//! every instance).

pub mod journal;
pub mod memory;
pub mod redis;

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

/// A blocked caller. Times are Unix seconds so every engine stores them the same way.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    pub caller: String,
    pub blocked_on: u64,
    /// `None`: blocked until removed.
    pub expires_at: Option<u64>,
    /// Why: too many wrong PINs, or an operator's hand. (Older records carry none.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Block {
    /// A block placed `now` (Unix seconds), lasting `ttl` (at least a second) or until removed.
    pub fn placed(caller: &str, now: u64, ttl: Option<Duration>, reason: &str) -> Block {
        Block {
            caller: caller.to_string(),
            blocked_on: now,
            expires_at: ttl.map(|t| now.saturating_add(t.as_secs().max(1))),
            reason: Some(reason.to_string()),
        }
    }
}

/// An operator logged in to the page: who is in, since when, from where. The id is the
/// secret half of the session cookie (the other half is a tag under the API key), so the page
/// shows a handle derived from it, never the id itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OperatorSession {
    pub id: String,
    /// Unix seconds.
    pub opened_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// The address the login came from.
    pub client: String,
}

/// The order every engine lists sessions in: oldest first, then by id.
pub fn sort_sessions(sessions: &mut [OperatorSession]) {
    sessions.sort_by(|a, b| a.opened_at.cmp(&b.opened_at).then_with(|| a.id.cmp(&b.id)));
}

/// The order every engine lists blocks in: oldest first, then by caller.
pub fn sort_blocks(blocks: &mut [Block]) {
    blocks.sort_by(|a, b| {
        a.blocked_on
            .cmp(&b.blocked_on)
            .then_with(|| a.caller.cmp(&b.caller))
    });
}

/// State shared by every instance of the service.
pub trait StateStore: Send + Sync + 'static {
    /// Counts one failed PIN for the caller and answers the count, atomically (concurrent
    /// failures all count). The count expires `ttl` after the latest failure.
    fn record_failure<'a>(&'a self, caller: &'a str, ttl: Duration) -> StoreFuture<'a, u64>;

    /// The caller's failed attempts, if any are counted.
    fn attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<u64>>;

    fn clear_attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, ()>;

    /// Blocks the caller (for `ttl`, or until removed) for `reason`; an existing block is kept
    /// as it is.
    fn block<'a>(
        &'a self,
        caller: &'a str,
        ttl: Option<Duration>,
        reason: &'a str,
    ) -> StoreFuture<'a, Block>;

    /// Removes a block and the caller's attempts; answers whether there was a block.
    fn unblock<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, bool>;

    fn blocked<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<Block>>;

    /// Every caller blocked now.
    fn blocks(&self) -> StoreFuture<'_, Vec<Block>>;

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

    /// Marks every `(execution id, stream sid)` live for `ttl` more, in one batch.
    fn refresh_executions<'a>(
        &'a self,
        live: &'a [(String, String)],
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;

    /// Counts one event against `key` in a fixed window that opens with the first event and
    /// lasts `window`; answers the count so far and how long the window has left.
    fn count_in_window<'a>(
        &'a self,
        key: &'a str,
        window: Duration,
    ) -> StoreFuture<'a, (u64, Duration)>;

    /// The count in `key`'s open window and the time it has left; `None` when none is open.
    fn window<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(u64, Duration)>>;

    /// Writes `value` under `key` for `ttl` unless the key is taken: `true` for the first
    /// writer, `false` for everyone after while it lasts (on every instance). A note is never
    /// changed once written, so whoever reads it reads the first writer's value.
    fn note_once<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// The value written under `key` by [`note_once`](Self::note_once), while it lasts.
    fn noted<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Takes `key` for `ttl`: `true` for the first taker, `false` for everyone after while it
    /// lasts (on every instance).
    fn claim_once<'a>(&'a self, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        self.note_once(key, "1", ttl)
    }

    /// Whether `key` is taken by [`claim_once`](Self::claim_once) now (on any instance).
    fn is_claimed<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(self.noted(key).await?.is_some()) })
    }

    /// Opens an operator session until its `expires_at`.
    fn session_open<'a>(&'a self, session: &'a OperatorSession) -> StoreFuture<'a, ()>;

    /// Whether the operator session `id` is open (not expired, not closed).
    fn session_live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;

    /// Every operator session open now, on every instance.
    fn sessions(&self) -> StoreFuture<'_, Vec<OperatorSession>>;

    /// Closes the operator session `id` (a logout or a revocation): it opens nothing from now on, on any
    /// instance. Answers whether it was open.
    fn session_close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;

    /// Forgets what has expired. Engines that expire entries by themselves do nothing.
    fn purge_expired(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Readiness: the engine answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

/// Opens the memory engine's journal. A relative path that the working directory cannot hold
/// (a service started from `/` by an unprivileged user) moves to the user's state directory
/// (`$XDG_STATE_HOME/call-proxy/`, or `~/.local/state/call-proxy/`), said in a warning, so the
/// service starts from any directory; in a checkout it stays `data/state.log` as ever.
fn open_journal(path: &std::path::Path) -> Result<MemoryStore, String> {
    let error = match MemoryStore::open(path) {
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    let denied = matches!(
        error.source.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    );
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .map(|h| std::path::PathBuf::from(h).join(".local/state"))
        });
    let (Some(state_home), Some(file), true) =
        (state_home, path.file_name(), denied && path.is_relative())
    else {
        return Err(format!(
            "{error} (set store.path, e.g. CALL_PROXY__STORE__PATH, to an absolute path the service may write)"
        ));
    };
    let elsewhere = state_home.join("call-proxy").join(file);
    let store = MemoryStore::open(&elsewhere).map_err(|e| {
        format!("{error}; and in the user's state directory: {e} (set store.path to an absolute path the service may write)")
    })?;
    tracing::warn!(
        wanted = %path.display(),
        using = %elsewhere.display(),
        "the working directory cannot hold the journal; keeping it in the user's state directory"
    );
    Ok(store)
}

/// Builds the engine the settings name. Must run inside the tokio runtime (the Redis
/// connection manager starts its reconnecting task there); Redis itself may still be down.
pub fn from_settings(settings: &StoreSettings) -> Result<Arc<dyn StateStore>, String> {
    Ok(match settings.kind {
        StoreKind::Memory if settings.path.is_empty() => Arc::new(MemoryStore::new()),
        StoreKind::Memory => Arc::new(open_journal(std::path::Path::new(&settings.path))?),
        StoreKind::Redis => Arc::new(redis::RedisStore::new(settings).map_err(|e| e.to_string())?),
    })
}
