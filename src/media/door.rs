//! Who may start a call on this instance: the live-call count under `media.max_calls`, and the
//! door a drain closes. The count and the closed bit share one atomic word, so "the last call
//! has ended" and "no call may enter any more" are decided together: a call admitted in the
//! same instant as the exit decision is either seen (and waited for) or refused, never lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The top bit of the word: set once no new call may enter.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Why a call was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `media.max_calls` are live.
    Full,
    /// The instance is draining and its admission window has passed.
    Closed,
    /// The process is short of file descriptors for another call and its backends.
    Descriptors,
}

#[derive(Default)]
pub struct Door {
    /// Live calls in the low bits, [`CLOSED`] in the top one.
    word: AtomicUsize,
    /// Set at the first shutdown signal: readiness turns 503 at once, while upgrades are still
    /// admitted until the door closes.
    draining: AtomicBool,
    /// Woken whenever the last live call leaves.
    idle: Notify,
}

impl Door {
    /// Takes a place, or says why not. Counted before it is checked, in one step, so any
    /// number of concurrent upgrades never passes `max` together.
    pub fn enter(&self, max: usize) -> Result<(), Refusal> {
        self.word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & CLOSED == 0 && w < max).then_some(w + 1)
            })
            .map(|_| ())
            .map_err(|w| {
                if w & CLOSED != 0 {
                    Refusal::Closed
                } else {
                    Refusal::Full
                }
            })
    }

    /// Gives a place back.
    pub fn leave(&self) {
        let before = self.word.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before & !CLOSED > 0, "a place given back twice");
        if before & !CLOSED == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Calls holding a place now (admitted sockets that have not started yet included).
    pub fn live(&self) -> usize {
        self.word.load(Ordering::Acquire) & !CLOSED
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// No new call may enter from now on; the live ones go on.
    pub fn close(&self) {
        self.word.fetch_or(CLOSED, Ordering::AcqRel);
    }

    pub fn is_closed(&self) -> bool {
        self.word.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Closes the door if no call is live, in one step; answers whether it is now closed with
    /// nothing live behind it.
    fn close_if_idle(&self) -> bool {
        match self
            .word
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(w) => w == CLOSED,
        }
    }

    /// Waits until no call is live, then closes the door in the same step: once this returns,
    /// nothing is live and nothing can enter.
    pub async fn closed_and_idle(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            // Registered before the check, so a last call leaving in between still wakes it.
            woken.as_mut().enable();
            if self.close_if_idle() {
                return;
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_cap_and_the_closed_door_refuse_with_their_own_reason() {
        let door = Door::default();
        assert_eq!(door.enter(2), Ok(()));
        assert_eq!(door.enter(2), Ok(()));
        assert_eq!(door.enter(2), Err(Refusal::Full));
        door.close();
        assert_eq!(door.live(), 2);
        door.leave();
        assert_eq!(door.enter(2), Err(Refusal::Closed));
        assert_eq!(door.live(), 1);
    }

    #[tokio::test]
    async fn closed_and_idle_waits_for_the_last_call_and_then_lets_none_in() {
        let door = Arc::new(Door::default());
        door.enter(10).unwrap();
        door.enter(10).unwrap();
        let waiter = tokio::spawn({
            let door = door.clone();
            async move { door.closed_and_idle().await }
        });
        tokio::task::yield_now().await;
        door.leave();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one call is still live");
        // Still open while a call is live: a late upgrade in the admission window gets in.
        assert_eq!(door.enter(10), Ok(()));
        door.leave();
        door.leave();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the last call leaving")
            .unwrap();
        assert_eq!(door.enter(10), Err(Refusal::Closed));
    }

    #[test]
    fn racing_entries_and_the_exit_decision_never_lose_a_call() {
        // Many threads try to enter while one decides to close: every entry that succeeded
        // happened before the close, so the close saw it (it did not close on an idle door).
        for _ in 0..200 {
            let door = Arc::new(Door::default());
            let entered = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (door, entered) = (door.clone(), entered.clone());
                    std::thread::spawn(move || {
                        if door.enter(100).is_ok() {
                            entered.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            let closed_idle = door.close_if_idle();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let entered = entered.load(Ordering::SeqCst);
            if closed_idle {
                assert_eq!(entered, 0, "a call got in behind a door closed as idle");
            }
            assert_eq!(door.live(), entered);
        }
    }
}
