//! Who may call: PIN checks, failed-attempt counting and blocks, withheld caller ids, and the
//! route tokens that carry a passed PIN to the media stream.

pub mod pins;
pub mod route_token;
pub mod withheld;

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Settings;
use crate::logging::mask_caller;
use crate::metrics::Metrics;
use crate::store::{unix_now, Block, StateStore, StoreError};
use pins::{Grant, PinError, PinProvider};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pins(#[from] PinError),
}

/// The answer to a PIN.
#[derive(Debug)]
pub enum PinOutcome {
    Granted {
        grant: Grant,
        route_token: String,
    },
    /// Withheld or already blocked: the PIN was neither checked nor counted.
    Blocked,
    Wrong {
        attempts: u64,
        blocked: bool,
    },
}

/// Where a caller stands.
#[derive(Debug)]
pub enum CallerStatus {
    Withheld,
    Blocked(Block),
    Clear,
}

pub struct Gate {
    settings: Arc<Settings>,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    pins: PinProvider,
}

impl Gate {
    pub fn new(
        settings: Arc<Settings>,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Gate, PinError> {
        let pins = PinProvider::from_settings(&settings.gate)?;
        Ok(Gate {
            settings,
            store,
            metrics,
            pins,
        })
    }

    fn masked<'a>(&self, caller: &'a str) -> std::borrow::Cow<'a, str> {
        mask_caller(caller, self.settings.log.mask_callers)
    }

    pub async fn status(&self, caller: &str) -> Result<CallerStatus, GateError> {
        if withheld::is_withheld(caller) {
            return Ok(CallerStatus::Withheld);
        }
        Ok(match self.store.blocked(caller).await? {
            Some(block) => CallerStatus::Blocked(block),
            None => CallerStatus::Clear,
        })
    }

    /// Checks a PIN for a caller. Blocked and withheld callers are refused before the PIN is
    /// looked at; a wrong PIN counts against the caller and blocks after too many.
    pub async fn validate_pin(&self, caller: &str, pin: &str) -> Result<PinOutcome, GateError> {
        if !matches!(self.status(caller).await?, CallerStatus::Clear) {
            info!(caller = %self.masked(caller), "PIN refused: caller is blocked or withheld");
            return Ok(PinOutcome::Blocked);
        }
        let grant = match self.pins.check(pin).await {
            Ok(grant) => grant,
            Err(e) => {
                warn!(error = %e, "PIN check failed; answering 503");
                return Err(e.into());
            }
        };
        match grant {
            Some(grant) => {
                self.store.clear_attempts(caller).await?;
                let ttl = self.settings.security.route_token_ttl_secs;
                let route_token = route_token::issue(
                    &self.settings.security.route_token_secret,
                    &route_token::Claims {
                        caller: caller.to_string(),
                        backend_ids: grant.backend_ids.clone(),
                        backend_hosts: grant.backend_hosts.clone(),
                        expires_at: unix_now() + ttl,
                    },
                );
                info!(caller = %self.masked(caller), backends = ?grant.backend_ids, "PIN accepted");
                Ok(PinOutcome::Granted { grant, route_token })
            }
            None => {
                self.metrics.pin_failures.inc();
                let ttl = Duration::from_secs(self.settings.gate.attempts_ttl_secs);
                let attempts = self.store.record_failure(caller, ttl).await?;
                let blocked = attempts > self.settings.gate.max_invalid_attempts;
                if blocked {
                    self.block(caller, "too many wrong PINs").await?;
                }
                info!(caller = %self.masked(caller), attempts, blocked, "wrong PIN");
                Ok(PinOutcome::Wrong { attempts, blocked })
            }
        }
    }

    /// Blocks a caller (automatically or by an operator).
    pub async fn block(&self, caller: &str, why: &str) -> Result<Block, GateError> {
        let ttl = match self.settings.gate.block_ttl_secs {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        };
        let block = self.store.block(caller, ttl).await?;
        self.metrics.blocks.inc();
        warn!(caller = %self.masked(caller), reason = why, "caller blocked");
        Ok(block)
    }

    pub async fn unblock(&self, caller: &str) -> Result<bool, GateError> {
        let was = self.store.unblock(caller).await?;
        if was {
            info!(caller = %self.masked(caller), "caller unblocked");
        }
        Ok(was)
    }

    pub async fn attempts(&self, caller: &str) -> Result<Option<u64>, GateError> {
        Ok(self.store.attempts(caller).await?)
    }

    pub async fn blocks(&self) -> Result<Vec<Block>, GateError> {
        Ok(self.store.blocks().await?)
    }
}
