//! A few rarely-ready futures beside a busy one, polled only when one of them has woken the
//! task.
//!
//! A call's session wakes 50 times a second for Twilio's next frame, and besides it waits for
//! shutdown, its idle tick, its start deadline and its links' news. Polled as `select!`
//! branches, each of those costs something on every frame: a lock for a cancellation token
//! or a `Notify`, a timer's state, and with 500 calls each in memory that has gone cold since
//! the call's last frame 20 ms ago. `FuturesUnordered` avoids the polls but not the cold
//! memory: its ready queue, list head and length are three more cache lines a frame. Here a
//! frame costs one atomic load on one line, and a comparison of the task's waker with the one
//! kept from the last poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Rings when any watched future wakes, and wakes the task that polls the [`Watches`].
struct Alarm {
    rung: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Futures that each end with a `T`, polled in the order they were added, and only after
/// one of them (or an [`Watches::add`]) has rung the alarm.
pub struct Watches<T> {
    alarm: Arc<Alarm>,
    /// The alarm as a waker: what every watched future is polled with.
    waker: Waker,
    /// The task's waker as last registered with the alarm.
    task: Option<Waker>,
    pending: Vec<Boxed<T>>,
}

impl<T: Send + 'static> Default for Watches<T> {
    fn default() -> Self {
        let alarm = Arc::new(Alarm {
            rung: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        Watches {
            waker: Waker::from(alarm.clone()),
            alarm,
            task: None,
            pending: Vec::new(),
        }
    }
}

impl<T: Send + 'static> Watches<T> {
    /// Watches `event`; once it completes, [`Watches::next`] gives `then`.
    pub fn add(&mut self, event: impl Future + Send + 'static, then: T) {
        self.pending.push(Box::pin(async move {
            event.await;
            then
        }));
        // A new future has not registered its own wake-up yet: poll it on the next check.
        self.alarm.rung.store(true, Ordering::Release);
    }

    /// The next watched future to complete. Never completes while nothing is watched.
    pub fn next(&mut self) -> impl Future<Output = T> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        loop {
            // Registered before the alarm is looked at, so a ring after the look wakes us.
            if !self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                self.alarm.task.register(cx.waker());
                self.task = Some(cx.waker().clone());
            }
            // A plain load: the common answer ("nothing rang") then leaves the line shared
            // instead of taking it exclusive for a write.
            if !self.alarm.rung.load(Ordering::Acquire) {
                return Poll::Pending;
            }
            // A ring takes the registered waker with it: register again before sleeping.
            self.task = None;
            // Cleared before polling, so a wake-up during the polls rings it again.
            self.alarm.rung.store(false, Ordering::Release);
            let mut watched = Context::from_waker(&self.waker);
            for i in 0..self.pending.len() {
                if let Poll::Ready(then) = self.pending[i].as_mut().poll(&mut watched) {
                    drop(self.pending.remove(i));
                    // Others may be ready too: look again on the next poll.
                    self.alarm.rung.store(true, Ordering::Release);
                    return Poll::Ready(then);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::sync::Notify;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_watch_fires_once_in_its_turn() {
        let mut watches = Watches::default();
        let notify = Arc::new(Notify::new());
        watches.add(tokio::time::sleep(Duration::from_secs(2)), "late");
        watches.add(tokio::time::sleep(Duration::from_secs(1)), "early");
        watches.add(notify.clone().notified_owned(), "notified");
        assert!(
            watches.next().now_or_never().is_none(),
            "nothing is ready yet"
        );

        notify.notify_one();
        assert_eq!(watches.next().await, "notified");
        let started = tokio::time::Instant::now();
        assert_eq!(watches.next().await, "early");
        assert_eq!(watches.next().await, "late");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(
            tokio::time::timeout(Duration::from_secs(60), watches.next())
                .await
                .is_err(),
            "with nothing watched, next never completes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_ready_at_once_both_come_out_in_order() {
        let mut watches = Watches::default();
        watches.add(std::future::ready(()), 1);
        watches.add(std::future::ready(()), 2);
        assert_eq!(watches.next().await, 1);
        assert_eq!(watches.next().await, 2);
    }

    /// The task sleeps while only its other branch is busy, and a watch that fires from
    /// another task wakes it.
    #[tokio::test]
    async fn a_wake_from_another_task_reaches_the_waiting_task() {
        let mut watches = Watches::default();
        let notify = Arc::new(Notify::new());
        watches.add(notify.clone().notified_owned(), "shutdown");
        let waker = notify.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waker.notify_one();
        });
        let mut ticks = 0;
        let fired = loop {
            tokio::select! {
                biased;
                w = watches.next() => break w,
                _ = tokio::time::sleep(Duration::from_millis(5)) => ticks += 1,
            }
        };
        assert_eq!(fired, "shutdown");
        assert!(
            ticks >= 2,
            "the other branch kept running meanwhile ({ticks})"
        );
    }
}
