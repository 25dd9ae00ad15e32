//! A few rarely-ready futures beside a busy one, looked at only when they may have something.
//!
//! A call's session wakes 50 times a second for Twilio's next frame, and besides it waits for
//! shutdown, its idle tick, its start deadline and its links' news. Polled as `select!`
//! branches, each of those costs something on every frame: a lock for a cancellation token
//! or a `Notify`, a timer's state, and with 500 calls each in memory that has gone cold since
//! the call's last frame 20 ms ago, every line touched is a cache miss. `FuturesUnordered`
//! avoids the polls but not the memory: its ready queue, list head and length are three more
//! lines a frame.
//!
//! Here the watched futures are polled with one shared waker, the [`Alarm`], which notes that
//! one of them woke and wakes the task. The alarm is looked at when the task was woken and the
//! busy future has nothing (the wake-up may have been the alarm's), and at least every
//! [`LOOK_EVERY`]th result of the busy future (a ring that came with a frame is noticed within
//! that many). A frame costs nothing here.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A ring is noticed within this many results of the busy future, while it keeps delivering.
/// For a media stream: 16 frames, 320 ms.
pub const LOOK_EVERY: u32 = 16;

/// Rings when any watched future wakes, and wakes the task that polls the [`Watches`].
///
/// The task's waker stays registered across rings (it is replaced only when the task's
/// changes), so that every ring wakes the task, even one that came while the task was busy
/// and did not look.
struct Alarm {
    rung: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Which of the two had something.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke<T, B> {
    Watch(T),
    Busy(B),
}

/// Futures that each end with a `T`, polled in the order they were added, only after the
/// alarm rang (or an [`Watches::add`]).
pub struct Watches<T> {
    alarm: Arc<Alarm>,
    /// The alarm as a waker: what every watched future is polled with.
    waker: Waker,
    /// The task's waker as last registered with the alarm.
    task: Option<Waker>,
    /// Results of the busy future since the alarm was last looked at.
    since_look: u32,
    pending: Vec<Boxed<T>>,
}

impl<T: Send + 'static> Default for Watches<T> {
    fn default() -> Self {
        let alarm = Arc::new(Alarm {
            rung: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        Watches {
            waker: Waker::from(alarm.clone()),
            alarm,
            task: None,
            since_look: LOOK_EVERY,
            pending: Vec::new(),
        }
    }
}

impl<T: Send + 'static> Watches<T> {
    /// Watches `event`; once it completes, a look gives `then`.
    pub fn add(&mut self, event: impl Future + Send + 'static, then: T) {
        self.pending.push(Box::pin(async move {
            event.await;
            then
        }));
        // A new future has not registered its own wake-up yet: look on the next poll.
        self.alarm.rung.store(true, Ordering::Release);
        self.since_look = LOOK_EVERY;
    }

    /// `busy`'s result, or a watched future's, whichever comes first (see the module's
    /// comment for when the watches are looked at). Never a watch's while nothing is watched.
    pub async fn beside<B: Future>(&mut self, busy: B) -> Woke<T, B::Output> {
        let mut busy = pin!(busy);
        // The first poll comes straight after the last result was handled, not from a
        // wake-up: a ring since then has woken the task again, and the next poll looks.
        let mut woken = false;
        std::future::poll_fn(move |cx| {
            // A ring wakes the waker the alarm holds: when the task's is another (a first
            // poll, or a future moved between contexts), register it and look now, since a
            // ring may have gone to the old one.
            let stale = !self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if stale || self.since_look >= LOOK_EVERY {
                if let Poll::Ready(then) = self.look(cx) {
                    return Poll::Ready(Woke::Watch(then));
                }
            }
            if let Poll::Ready(out) = busy.as_mut().poll(cx) {
                self.since_look += 1;
                return Poll::Ready(Woke::Busy(out));
            }
            if woken {
                if let Poll::Ready(then) = self.look(cx) {
                    return Poll::Ready(Woke::Watch(then));
                }
            }
            woken = true;
            Poll::Pending
        })
        .await
    }

    /// The first watched future that is ready, if the alarm has rung.
    fn look(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        self.since_look = 0;
        if !self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *self.alarm.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            self.task = Some(cx.waker().clone());
        }
        // A plain load: the common answer ("nothing rang") then leaves the line shared
        // instead of taking it exclusive for a write.
        if !self.alarm.rung.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Cleared before polling, so a wake-up during the polls rings it again.
        self.alarm.rung.store(false, Ordering::Release);
        let mut watched = Context::from_waker(&self.waker);
        for i in 0..self.pending.len() {
            if let Poll::Ready(then) = self.pending[i].as_mut().poll(&mut watched) {
                drop(self.pending.remove(i));
                // Others may be ready too: look again on the next poll.
                self.alarm.rung.store(true, Ordering::Release);
                self.since_look = LOOK_EVERY;
                return Poll::Ready(then);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::sync::{mpsc, Notify};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_watch_fires_once_in_its_turn() {
        let mut watches = Watches::default();
        let notify = Arc::new(Notify::new());
        watches.add(tokio::time::sleep(Duration::from_secs(2)), "late");
        watches.add(tokio::time::sleep(Duration::from_secs(1)), "early");
        watches.add(notify.clone().notified_owned(), "notified");
        let idle = std::future::pending::<()>;
        assert!(
            watches.beside(idle()).now_or_never().is_none(),
            "nothing is ready yet"
        );

        notify.notify_one();
        assert_eq!(watches.beside(idle()).await, Woke::Watch("notified"));
        let started = tokio::time::Instant::now();
        assert_eq!(watches.beside(idle()).await, Woke::Watch("early"));
        assert_eq!(watches.beside(idle()).await, Woke::Watch("late"));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(
            tokio::time::timeout(Duration::from_secs(60), watches.beside(idle()))
                .await
                .is_err(),
            "with nothing watched, only the busy future can end a wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_ready_at_once_both_come_out_in_order() {
        let mut watches = Watches::default();
        watches.add(std::future::ready(()), 1);
        watches.add(std::future::ready(()), 2);
        let idle = std::future::pending::<()>;
        assert_eq!(watches.beside(idle()).await, Woke::Watch(1));
        assert_eq!(watches.beside(idle()).await, Woke::Watch(2));
    }

    /// A watch that fires while the busy side keeps delivering is noticed within
    /// `LOOK_EVERY` of its results; one that fires while it is quiet, at once.
    #[tokio::test]
    async fn a_ring_is_noticed_while_busy_and_at_once_while_quiet() {
        let mut watches = Watches::default();
        let notify = Arc::new(Notify::new());
        watches.add(notify.clone().notified_owned(), "shutdown");
        let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        // Settle the first look, then ring with plenty still queued.
        assert_eq!(watches.beside(rx.recv()).await, Woke::Busy(Some(0)));
        notify.notify_one();
        let mut delivered = 0;
        let fired = loop {
            match watches.beside(rx.recv()).await {
                Woke::Busy(_) => delivered += 1,
                Woke::Watch(w) => break w,
            }
        };
        assert_eq!(fired, "shutdown");
        assert!(delivered <= LOOK_EVERY, "noticed after {delivered} results");

        // Quiet now: the busy side has nothing, and a ring from another task wakes this one.
        while rx.try_recv().is_ok() {}
        watches.add(notify.clone().notified_owned(), "again");
        let waker = notify.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waker.notify_one();
        });
        let woke = tokio::time::timeout(Duration::from_secs(5), watches.beside(rx.recv())).await;
        assert_eq!(woke.expect("the ring woke the task"), Woke::Watch("again"));
    }

    /// The ring comes with a result and is not looked at then; with the busy side quiet
    /// afterwards, it is not lost (a later ring, the session's tick, would find it too).
    #[tokio::test(start_paused = true)]
    async fn a_ring_that_came_with_a_result_is_not_lost() {
        let mut watches = Watches::default();
        let rung = Arc::new(Notify::new());
        watches.add(rung.clone().notified_owned(), "rung with a frame");
        watches.add(tokio::time::sleep(Duration::from_secs(1)), "tick");
        let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
        tx.send(0).unwrap();
        assert_eq!(watches.beside(rx.recv()).await, Woke::Busy(Some(0)));
        // Frame and ring together, then nothing: the frame comes out first.
        tx.send(1).unwrap();
        rung.notify_one();
        assert_eq!(watches.beside(rx.recv()).await, Woke::Busy(Some(1)));
        let woke = tokio::time::timeout(Duration::from_secs(5), watches.beside(rx.recv())).await;
        assert_eq!(woke.expect("not lost"), Woke::Watch("rung with a frame"));
    }
}
