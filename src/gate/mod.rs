//! Who may call: PIN checks, failed-attempt counting and blocks, withheld caller ids, and the
//! route tokens that carry a passed PIN to the media stream.

pub mod pins;
pub mod route_token;
pub mod withheld;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::clock::unix_now;
use crate::config::Settings;
use crate::logging::mask_caller;
use crate::metrics::Metrics;
use crate::store::{Block, StateStore, StoreError};
use pins::{Grant, PinError, PinProvider};

/// Longest caller id accepted: E.164 numbers are at most 16 characters, SIP and client
/// identities a few dozen.
pub const MAX_CALLER_ID_CHARS: usize = 64;

/// A caller id is at most [`MAX_CALLER_ID_CHARS`] characters with no control characters;
/// answers why not otherwise. (Empty is allowed here: it means "withheld".)
pub fn check_caller_id(id: &str) -> Result<(), &'static str> {
    if id.chars().count() > MAX_CALLER_ID_CHARS {
        return Err("at most 64 characters");
    }
    if id.chars().any(char::is_control) {
        return Err("no control characters allowed");
    }
    Ok(())
}

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
    /// The client's address has failed too many PINs in the window (whatever caller ids it
    /// used): refused until the window closes, without looking at the PIN.
    AddressLimited {
        retry_after: Duration,
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

    fn masked<'a>(&self, caller: &'a str) -> crate::logging::Escaped<'a> {
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

    /// Checks a PIN for a caller. An address that has failed too many PINs, and blocked and
    /// withheld callers, are refused before the PIN is looked at; a wrong PIN counts against
    /// the caller (blocking after too many) and against the client's address, so moving to a
    /// new caller id buys no more guesses. A granted route token is bound to `call_sid` when
    /// the flow sent it.
    pub async fn validate_pin(
        &self,
        caller: &str,
        pin: &str,
        call_sid: Option<&str>,
        client: IpAddr,
    ) -> Result<PinOutcome, GateError> {
        let per_address = self.settings.gate.max_pin_failures_per_ip;
        let address_key = format!("pin-failures:{client}");
        if per_address > 0 {
            if let Some((failures, left)) = self.store.window(&address_key).await? {
                if failures > per_address {
                    return Ok(PinOutcome::AddressLimited { retry_after: left });
                }
            }
        }
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
                    self.settings.security.route_token_secret.expose(),
                    &route_token::Claims {
                        caller: caller.to_string(),
                        backend_ids: grant.backend_ids.clone(),
                        backend_hosts: grant.backend_hosts.clone(),
                        expires_at: unix_now().saturating_add(ttl),
                        call_sid: call_sid.filter(|s| !s.is_empty()).map(str::to_string),
                        nonce: route_token::nonce(),
                    },
                );
                info!(caller = %self.masked(caller), backends = ?grant.backend_ids, "PIN accepted");
                Ok(PinOutcome::Granted { grant, route_token })
            }
            None => {
                let (attempts, blocked) = self.count_failure(caller).await?;
                if per_address > 0 {
                    let window = Duration::from_secs(self.settings.gate.pin_failure_window_secs);
                    let (failures, _) = self.store.count_in_window(&address_key, window).await?;
                    if failures == per_address + 1 {
                        warn!(%client, failures, "address has failed too many PINs; refusing it for the rest of the window");
                    }
                }
                info!(caller = %self.masked(caller), attempts, blocked, "wrong PIN");
                Ok(PinOutcome::Wrong { attempts, blocked })
            }
        }
    }

    /// Counts one failed attempt against the caller, and blocks it once it has more than
    /// `gate.max_invalid_attempts`. Answers the count and whether the caller is now blocked.
    pub async fn count_failure(&self, caller: &str) -> Result<(u64, bool), GateError> {
        self.metrics.pin_failures.inc();
        let ttl = Duration::from_secs(self.settings.gate.attempts_ttl_secs);
        let attempts = self.store.record_failure(caller, ttl).await?;
        let blocked = attempts > self.settings.gate.max_invalid_attempts;
        if blocked {
            self.block(caller, "too many wrong PINs").await?;
        }
        Ok((attempts, blocked))
    }

    /// Blocks a caller (automatically or by an operator).
    pub async fn block(&self, caller: &str, why: &str) -> Result<Block, GateError> {
        let ttl = match self.settings.gate.block_ttl_secs {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        };
        let block = self.store.block(caller, ttl, why).await?;
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
