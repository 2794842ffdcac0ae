//! The in-memory timer: records due soon, in due order, handed on never before their time.
//!
//! One ordered map owned by one task ([`run`]), not a timer per record and not a lock: ingest and
//! the sweeps hand entries over through a channel ([`TimerCmd`]); the task sends each entry, once
//! due by the [`Clock`], to the publisher on another channel, in due order, and publishes a
//! [`TimerView`] for the status snapshot. What it holds is bounded by the memory budget (each
//! entry carries its share), never by the number pending. It knows nothing of Kafka, so its rules
//! are tested with a manual clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::domain::Origin;
use crate::time::Clock;

/// What the timer orders by.
pub trait Timed {
    fn due_ms(&self) -> i64;
    fn origin(&self) -> Origin;
}

/// What the timer task receives.
pub enum TimerCmd<E> {
    Insert(E),
    /// Keep only the entries this accepts (partitions were revoked: drop what they handed over;
    /// their new owner reads it again).
    Retain(Box<dyn Fn(&E) -> bool + Send>),
}

/// What the timer holds, as the status snapshot shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerView {
    pub pending: usize,
    pub next_due: Option<i64>,
}

/// How long the task sleeps at most before it reads the clock again: a test's manual clock moves
/// without waking it.
const TICK: Duration = Duration::from_millis(20);

/// The timer task. Sleeps until the earliest due time or a command, sends everything due by the
/// clock to `due` in `(due, origin, arrival)` order, and returns when `stop` fires or every sender
/// of `commands` is gone and nothing is left.
pub async fn run<E: Timed + Send + 'static>(
    clock: Arc<dyn Clock>,
    mut commands: mpsc::Receiver<TimerCmd<E>>,
    due: mpsc::Sender<E>,
    view: watch::Sender<TimerView>,
    stop: CancellationToken,
) {
    let mut queue: TimerQueue<E> = TimerQueue::default();
    let mut open = true;
    loop {
        let now = clock.now_ms();
        for entry in queue.pop_due(now) {
            if due.send(entry).await.is_err() {
                return;
            }
        }
        view.send_replace(TimerView {
            pending: queue.len(),
            next_due: queue.next_due(),
        });
        if !open && queue.is_empty() {
            return;
        }
        let wait = queue.next_due().map_or(TICK, |d| {
            Duration::from_millis(u64::try_from(d - now).unwrap_or(0)).min(TICK)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            cmd = commands.recv(), if open => {
                // Take what else is queued before looking at the clock again.
                let mut next = cmd;
                if next.is_none() {
                    open = false;
                }
                while let Some(cmd) = next {
                    match cmd {
                        TimerCmd::Insert(e) => queue.insert(e.due_ms(), e.origin(), e),
                        TimerCmd::Retain(keep) => queue.retain(|e| keep(e)),
                    }
                    next = commands.try_recv().ok();
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Records ordered by `(due, origin, arrival)`: due time first; at the same millisecond, the order
/// they had in the ingest topic, so records of one key due together keep their order.
#[derive(Debug)]
pub struct TimerQueue<V> {
    entries: BTreeMap<(i64, Origin, u64), V>,
    arrivals: u64,
}

impl<V> Default for TimerQueue<V> {
    fn default() -> Self {
        TimerQueue {
            entries: BTreeMap::new(),
            arrivals: 0,
        }
    }
}

impl<V> TimerQueue<V> {
    pub fn insert(&mut self, due_ms: i64, origin: Origin, value: V) {
        self.arrivals += 1;
        self.entries.insert((due_ms, origin, self.arrivals), value);
    }

    /// The earliest due time held.
    pub fn next_due(&self) -> Option<i64> {
        self.entries.keys().next().map(|(due, _, _)| *due)
    }

    /// Removes and returns, in order, everything due at or before `now`: never anything later.
    pub fn pop_due(&mut self, now_ms: i64) -> Vec<V> {
        let later = self.entries.split_off(&(
            now_ms.saturating_add(1),
            Origin {
                partition: i32::MIN,
                offset: i64::MIN,
            },
            0,
        ));
        std::mem::replace(&mut self.entries, later)
            .into_values()
            .collect()
    }

    /// Keeps only the entries `keep` accepts (used to drop what a revoked partition handed over).
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.entries.retain(|_, v| keep(v));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(partition: i32, offset: i64) -> Origin {
        Origin { partition, offset }
    }

    #[test]
    fn pops_only_what_is_due_in_due_then_origin_order() {
        let mut q = TimerQueue::default();
        q.insert(200, o(0, 5), "c");
        q.insert(100, o(1, 9), "b");
        q.insert(100, o(1, 2), "a");
        q.insert(300, o(0, 1), "d");
        assert_eq!(q.next_due(), Some(100));
        assert_eq!(q.pop_due(99), Vec::<&str>::new());
        assert_eq!(q.pop_due(200), vec!["a", "b", "c"]);
        assert_eq!(q.len(), 1);
        q.retain(|v| *v != "d");
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }

    #[derive(Debug, PartialEq)]
    struct E(i64, Origin, &'static str);

    impl Timed for E {
        fn due_ms(&self) -> i64 {
            self.0
        }
        fn origin(&self) -> Origin {
            self.1
        }
    }

    struct Harness {
        clock: crate::time::ManualClock,
        commands: mpsc::Sender<TimerCmd<E>>,
        due: mpsc::Receiver<E>,
        view: watch::Receiver<TimerView>,
        stop: CancellationToken,
    }

    fn start(now: i64) -> Harness {
        let clock = crate::time::ManualClock::new(now);
        let (commands, rx) = mpsc::channel(16);
        let (tx, due) = mpsc::channel(16);
        let (view_tx, view) = watch::channel(TimerView::default());
        let stop = CancellationToken::new();
        tokio::spawn(run(Arc::new(clock.clone()), rx, tx, view_tx, stop.clone()));
        Harness {
            clock,
            commands,
            due,
            view,
            stop,
        }
    }

    impl Harness {
        /// What the timer hands on within a few of its ticks (tokio's clock is paused: this takes
        /// no real time).
        async fn out(&mut self) -> Vec<&'static str> {
            let mut got = Vec::new();
            while let Ok(Some(e)) = tokio::time::timeout(TICK * 5, self.due.recv()).await {
                assert!(
                    e.0 <= crate::time::Clock::now_ms(&self.clock),
                    "handed on early: {e:?}"
                );
                got.push(e.2);
            }
            got
        }

        async fn insert(&self, due: i64, origin: Origin, name: &'static str) {
            let cmd = TimerCmd::Insert(E(due, origin, name));
            self.commands.send(cmd).await.expect("timer running");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_hands_on_each_record_at_its_due_time_in_order_never_before() {
        let mut h = start(10_000);
        h.insert(12_000, o(0, 9), "c").await;
        h.insert(11_000, o(1, 5), "b").await;
        h.insert(11_000, o(0, 7), "a").await;
        h.insert(9_000, o(2, 1), "past due").await;
        assert_eq!(
            h.out().await,
            ["past due"],
            "what is already due goes at once"
        );
        assert_eq!(h.view.borrow().pending, 3);
        assert_eq!(h.view.borrow().next_due, Some(11_000));
        h.clock.set(10_999);
        assert_eq!(h.out().await, Vec::<&str>::new(), "1 ms early is early");
        h.clock.set(11_000);
        assert_eq!(h.out().await, ["a", "b"], "same due time: ingest order");
        h.clock.set(11_999);
        assert_eq!(h.out().await, Vec::<&str>::new());
        h.clock.set(13_000);
        assert_eq!(h.out().await, ["c"]);
        assert_eq!(*h.view.borrow(), TimerView::default());
        h.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_purge_drops_what_revoked_partitions_handed_over() {
        let mut h = start(0);
        h.insert(500, o(0, 1), "kept").await;
        h.insert(500, o(3, 1), "revoked").await;
        let keep = TimerCmd::Retain(Box::new(|e: &E| e.1.partition != 3));
        h.commands.send(keep).await.unwrap();
        h.clock.set(500);
        assert_eq!(h.out().await, ["kept"]);
        h.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_input_drains_what_is_held_then_ends() {
        let mut h = start(0);
        h.insert(100, o(0, 1), "last").await;
        drop(h.commands);
        h.clock.set(100);
        assert_eq!(h.due.recv().await.map(|e| e.2), Some("last"));
        assert!(h.due.recv().await.is_none(), "the task ended");
    }

    proptest! {
        #[test]
        fn never_pops_early_and_never_loses(items in proptest::collection::vec((0i64..1000, 0i32..3, 0i64..50), 0..200), cut in 0i64..1000) {
            let mut q = TimerQueue::default();
            for (i, (due, p, off)) in items.iter().enumerate() {
                q.insert(*due, o(*p, *off), (i, *due));
            }
            let popped = q.pop_due(cut);
            prop_assert!(popped.iter().all(|(_, due)| *due <= cut));
            prop_assert!(popped.windows(2).all(|w| w[0].1 <= w[1].1));
            prop_assert!(q.next_due().is_none_or(|d| d > cut));
            prop_assert_eq!(popped.len() + q.len(), items.len());
        }
    }
}
