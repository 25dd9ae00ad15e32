//! File descriptors: every call holds one for Twilio's socket and one per backend, every HTTP
//! connection one. At start-up the soft limit is raised to the hard one and compared with what
//! the settings may ask for; at each upgrade the service checks that the descriptors the call
//! may need are there, and refuses it with 503 when they are not — rather than accept a call
//! whose backends then cannot be connected.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::Settings;

/// Descriptors kept free beyond a call's own: HTTP requests, the journal, DNS, logs.
const SPARE: usize = 16;

/// Raises the soft descriptor limit to the hard one and says whether the settings fit in it.
/// Answers the limit in force.
pub fn raise_and_check(settings: &Settings) -> Option<u64> {
    #[cfg(unix)]
    {
        let limit = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => limit,
            Err(e) => {
                warn!(error = %e, "could not raise the file descriptor limit");
                rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?.0
            }
        };
        let per_call = 1 + settings.backends.default.len().max(1) as u64;
        let calls = settings.media.max_calls as u64 * per_call;
        let connections = settings.server.max_connections as u64;
        if calls + connections > limit {
            warn!(
                limit,
                max_calls = settings.media.max_calls,
                descriptors_per_call = per_call,
                max_connections = connections,
                "the file descriptor limit is below media.max_calls x (1 + backends per call) + server.max_connections: calls beyond what the limit allows are refused with 503 (raise the hard limit, e.g. LimitNOFILE=, or lower those settings)"
            );
        } else {
            info!(limit, "file descriptor limit");
        }
        Some(limit)
    }
    #[cfg(not(unix))]
    {
        let _ = settings;
        None
    }
}

/// Checks, at an upgrade, that a call's descriptors are there to be had — counting those
/// that calls admitted a moment ago will take once their backends connect.
pub struct Headroom {
    /// A descriptor to duplicate: each duplicate that succeeds is one more that a socket
    /// could have now. `None` where `/dev/null` cannot be opened (the check is skipped).
    probe: Option<File>,
    /// Descriptors a new call may take once admitted: one per backend, at most.
    per_call: usize,
    /// Descriptors promised to admitted calls whose backends have not connected yet.
    promised: Arc<AtomicUsize>,
}

impl Headroom {
    pub fn new(max_backends_per_call: usize) -> Headroom {
        Headroom {
            probe: File::open("/dev/null").ok(),
            per_call: max_backends_per_call,
            promised: Arc::default(),
        }
    }

    /// Promises a new call the descriptors it may need, if they are free now beside what is
    /// promised already (a few `dup`s, once per upgrade); `None` when they are not.
    pub fn promise(&self) -> Option<Promise> {
        let promise = Promise {
            n: self.per_call,
            promised: self.promised.clone(),
        };
        // Promised first, so concurrent upgrades see each other's.
        let before = self.promised.fetch_add(promise.n, Ordering::AcqRel);
        let Some(probe) = &self.probe else {
            return Some(promise);
        };
        let need = before + promise.n + SPARE;
        let mut held = Vec::with_capacity(need);
        for _ in 0..need {
            match probe.try_clone() {
                Ok(f) => held.push(f),
                Err(_) => return None,
            }
        }
        Some(promise)
    }
}

/// Descriptors promised to a call until its backends have taken theirs (or the call ended).
pub struct Promise {
    n: usize,
    promised: Arc<AtomicUsize>,
}

impl Promise {
    /// Keeps `n` of the promised descriptors (one per backend link, each given back when
    /// that link's first connection attempt is over) and gives back the rest.
    pub fn split(mut self, n: usize) -> Vec<Promise> {
        let kept = n.min(self.n);
        self.n -= kept;
        (0..kept)
            .map(|_| Promise {
                n: 1,
                promised: self.promised.clone(),
            })
            .collect()
    }
}

impl Drop for Promise {
    fn drop(&mut self) {
        self.promised.fetch_sub(self.n, Ordering::AcqRel);
    }
}
