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
    /// Refused without looking at the PIN until `retry_after`: the call has had its
    /// `gate.max_pin_attempts_per_call` checks (whatever caller ids it claimed), or — only
    /// where requests are not signed by Twilio — the client's address has failed too many.
    Limited {
        retry_after: Duration,
        why: Limit,
    },
}

/// Which guard refused a PIN check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    PerCall,
    PerAddress,
}

/// How long a call's PIN checks are counted: longer than any call waits at a PIN prompt.
const PER_CALL_WINDOW: Duration = Duration::from_secs(3600);
/// The window wrong PINs over all callers are counted in, for the alarm.
const ALARM_WINDOW: Duration = Duration::from_secs(3600);

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
        let gate = &self.settings.gate;
        // Every request Twilio signs comes from Twilio's addresses (or the load balancer's):
        // a limit keyed on the address would lock every caller out together. It holds only
        // where requests are not signed.
        let per_address = if self.settings.twilio.validate_signatures {
            0
        } else {
            gate.max_pin_failures_per_ip
        };
        let address_key = format!("pin-failures:{client}");
        if per_address > 0 {
            if let Some((failures, left)) = self.store.window(&address_key).await? {
                if failures > per_address {
                    return Ok(PinOutcome::Limited {
                        retry_after: left,
                        why: Limit::PerAddress,
                    });
                }
            }
        }
        // At most so many checks per call, whatever caller id each claims: counted first and
        // decided after, in one atomic step on every engine, so concurrent tries cannot all
        // pass a count read before any of them was counted.
        if let Some(call) = call_sid.filter(|c| !c.is_empty()) {
            let max = gate.max_pin_attempts_per_call;
            if max > 0 {
                let key = format!("pin-checks:{call}");
                let (checks, left) = self.store.count_in_window(&key, PER_CALL_WINDOW).await?;
                if checks > max {
                    if checks == max + 1 {
                        warn!(call_sid = %crate::logging::escape(call), max, "a call has used its PIN checks; further ones are refused");
                    }
                    return Ok(PinOutcome::Limited {
                        retry_after: left,
                        why: Limit::PerCall,
                    });
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
                        handoff_of: None,
                    },
                );
                info!(caller = %self.masked(caller), backends = ?grant.backend_ids, "PIN accepted");
                Ok(PinOutcome::Granted { grant, route_token })
            }
            None => {
                let (attempts, blocked) = self.count_failure(caller).await?;
                self.sound_alarm().await;
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

    /// Counts a wrong PIN over all callers in the alarm window: the gauge shows it, a WARN
    /// goes out once a window when it passes `gate.pin_failure_alarm_per_hour`, and while it
    /// is over, wrong answers wait `gate.failure_delay_ms` (right ones never do). A store
    /// that cannot count leaves the alarm as it was: the answer itself is not held up.
    async fn sound_alarm(&self) {
        let gate = &self.settings.gate;
        let Ok((failures, _)) = self
            .store
            .count_in_window("pin-failures-all", ALARM_WINDOW)
            .await
        else {
            return;
        };
        self.metrics.pin_failures_per_hour.set(failures as i64);
        let alarm = gate.pin_failure_alarm_per_hour;
        if alarm == 0 || failures <= alarm {
            return;
        }
        if failures == alarm + 1 {
            warn!(
                failures,
                alarm,
                "wrong PINs over all callers passed the alarm level this hour: someone may be guessing across caller ids"
            );
        }
        if gate.failure_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(gate.failure_delay_ms)).await;
        }
    }

    /// Whether wrong PINs over all callers are above the alarm level now (for the page).
    pub fn alarm_on(&self) -> bool {
        let alarm = self.settings.gate.pin_failure_alarm_per_hour;
        alarm > 0 && self.metrics.pin_failures_per_hour.get() > alarm as i64
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
