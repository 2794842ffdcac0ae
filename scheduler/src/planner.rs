//! The planner: queues a sweep job per window of levels 1 and up as its sweep time comes, and
//! turns rebalance events into work (drop what a revoked partition handed to the timer; catch up
//! the slices of newly assigned partitions).
//!
//! Receives [`RebalanceEvent`]s from the consumer's context; sends job ids to the workers
//! ([`crate::sweep`]) and [`TimerCmd::Retain`] to the timer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::jobs::{Board, JobKind, JobSpec};
use crate::kafka::RebalanceEvent;
use crate::lifecycle::Lifecycle;
use crate::offsets::Offsets;
use crate::router::TimerEntry;
use crate::slice::{Ladder, SliceId};
use crate::time::Clock;
use crate::timer::TimerCmd;

/// The planner and control stage: it owns no state beyond its loops; jobs go on the board.
pub(crate) struct Planner {
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub board: Arc<Board>,
    pub life: Arc<Lifecycle>,
    /// Asked whether a timer entry's ticket is still current after a revoke.
    pub offsets: Offsets,
    pub timer: mpsc::Sender<TimerCmd<TimerEntry>>,
    /// slice topic -> (level, slot)
    pub slices: Arc<HashMap<String, (usize, i64)>>,
}

impl Planner {
    fn sweep_job(&self, level: usize, window: i64) -> u64 {
        let id = SliceId { level, window };
        let ladder = &self.settings.ladder;
        let spec = JobSpec {
            kind: JobKind::Sweep,
            level,
            window: Some(window),
            slot_topic: ladder.window_topic(&self.settings.internal.slice_prefix, id),
            bounds: Some(ladder.bounds(id)),
            sweep_at: Some(ladder.sweep_at(id)),
        };
        self.board.create(spec, self.clock.now_ms())
    }

    /// Queues one sweep job per window of levels 1 and up (level 0 is never written), each when
    /// its sweep time comes. After a start or a rebalance, catch-up jobs (from `run_control`)
    /// cover the windows already due.
    pub(crate) async fn run_planner(self: Arc<Self>, jobs: mpsc::Sender<u64>) {
        plan(
            &self.settings.ladder,
            &*self.clock,
            self.life.intake(),
            |id| self.sweep_job(id.level, id.window),
            &jobs,
        )
        .await;
    }

    pub(crate) async fn run_control(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<RebalanceEvent>,
        jobs: mpsc::Sender<u64>,
    ) {
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = self.life.intake().cancelled() => None,
            };
            match event {
                None => return,
                Some(RebalanceEvent::Revoked(tps)) => {
                    tracing::info!(partitions = tps.len(), "partitions revoked");
                    // Drop what revoked partitions handed to the timer; their new owner re-reads
                    // it from the committed offset. Current tickets (a re-assignment) stay.
                    let offsets = self.offsets.clone();
                    let keep = move |e: &TimerEntry| offsets.is_current(&e.ticket);
                    let _ = self.timer.send(TimerCmd::Retain(Box::new(keep))).await;
                }
                Some(RebalanceEvent::Unreadable(tps)) => {
                    return self.life.fail(crate::kafka::Fatal::Aborted(format!(
                        "could not read where the previous owner left {} assigned partitions \
                         (their committed offsets stayed unstable for a minute: a transaction \
                         still holds them; one that outlives the broker's transaction timeout \
                         is hanging, see `kafka-transactions.sh find-hanging`)",
                        tps.len()
                    )));
                }
                Some(RebalanceEvent::Assigned(tps)) => {
                    tracing::info!(partitions = tps.len(), "partitions assigned");
                    let topics: BTreeSet<&String> = tps
                        .iter()
                        .map(|(t, _)| t)
                        .filter(|t| self.slices.contains_key(*t))
                        .collect();
                    for topic in topics {
                        let Some(&(level, _)) = self.slices.get(topic) else {
                            continue;
                        };
                        let spec = JobSpec {
                            kind: JobKind::CatchUp,
                            level,
                            window: None,
                            slot_topic: topic.clone(),
                            bounds: None,
                            sweep_at: None,
                        };
                        let id = self.board.create(spec, self.clock.now_ms());
                        if jobs.send(id).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Hands each window's job to `due` when its sweep time comes by `clock`, in sweep-time order,
/// every window of every swept level once, none skipped (a clock that jumps ahead releases every
/// window it passed, in order). `create` makes a window's job as soon as it is the next of its
/// level, so the job board shows it READY. Returns when `stop` is cancelled or `due` is closed.
pub(crate) async fn plan<J>(
    ladder: &Ladder,
    clock: &dyn Clock,
    stop: &CancellationToken,
    mut create: impl FnMut(SliceId) -> J,
    due: &mpsc::Sender<J>,
) {
    let now = clock.now_ms();
    // Per swept level: its next window, and that window's job.
    let mut upcoming: Vec<(SliceId, Option<J>)> = (1..ladder.levels())
        .map(|level| {
            let id = SliceId {
                level,
                window: ladder.current_window(level, now) + 1,
            };
            (id, Some(create(id)))
        })
        .collect();
    loop {
        let Some(slot) = (0..upcoming.len()).min_by_key(|&i| ladder.sweep_at(upcoming[i].0)) else {
            return;
        };
        let id = upcoming[slot].0;
        let wait = ladder.sweep_at(id) - clock.now_ms();
        if wait > 0 {
            // Look again at least every 50 ms: the clock may be a test's manual clock.
            let nap = Duration::from_millis((wait as u64).min(50));
            tokio::select! {
                _ = tokio::time::sleep(nap) => continue,
                _ = stop.cancelled() => return,
            }
        }
        if let Some(job) = upcoming[slot].1.take() {
            if due.send(job).await.is_err() {
                return;
            }
        }
        let following = SliceId {
            level: id.level,
            window: id.window + 1,
        };
        upcoming[slot] = (following, Some(create(following)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ManualClock;

    /// Levels of 400, 800, 1,600 and 3,200 ms (ratio 2); level i's window is swept one level-(i-1)
    /// width before it starts.
    fn ladder() -> Ladder {
        Ladder::new(400, 2, 3_200, 50).expect("valid ladder")
    }

    /// Runs the planner against a manual clock for `steps` steps of `step_ms`, and returns each
    /// window with the clock's time when it was released.
    async fn released(start: i64, step_ms: i64, steps: usize) -> Vec<(SliceId, i64)> {
        let clock = Arc::new(ManualClock::new(start));
        let stop = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(1024);
        let l = ladder();
        let (c, s) = (clock.clone(), stop.clone());
        let planner = tokio::spawn(async move { plan(&l, &*c, &s, |id| id, &tx).await });
        // Let the planner start (and read the starting time) before the clock moves.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut out = Vec::new();
        for _ in 0..steps {
            clock.advance(step_ms);
            // Paused tokio time: let the planner's naps run out and it look at the clock again.
            tokio::time::sleep(Duration::from_millis(60)).await;
            while let Ok(id) = rx.try_recv() {
                out.push((id, clock.now_ms()));
            }
        }
        stop.cancel();
        planner.await.expect("planner ends");
        out
    }

    #[tokio::test(start_paused = true)]
    async fn every_window_is_released_once_in_order_never_before_its_sweep_time() {
        let l = ladder();
        let start = 1_000_000;
        let got = released(start, 10, 2_000).await;
        for (id, at) in &got {
            assert!(
                *at >= l.sweep_at(*id),
                "{id:?} released at {at}, before its sweep time"
            );
            assert!(*at < l.sweep_at(*id) + 20, "{id:?} released late: {at}");
        }
        let times: Vec<i64> = got.iter().map(|(id, _)| l.sweep_at(*id)).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "in sweep-time order"
        );
        for level in 1..l.levels() {
            let windows: Vec<i64> = got
                .iter()
                .filter(|(id, _)| id.level == level)
                .map(|(id, _)| id.window)
                .collect();
            assert!(!windows.is_empty(), "level {level} swept");
            assert!(
                windows.windows(2).all(|w| w[1] == w[0] + 1),
                "level {level}: each window once, none skipped: {windows:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_that_jumps_ahead_releases_every_window_it_passed() {
        let l = ladder();
        let start = 2_000_000;
        // One jump of 10 s: level 1 (800 ms windows) has about a dozen windows due at once.
        let got = released(start, 10_000, 1).await;
        let level1: Vec<i64> = got
            .iter()
            .filter(|(id, _)| id.level == 1)
            .map(|(id, _)| id.window)
            .collect();
        let first = l.current_window(1, start) + 1;
        let last = l.current_window(1, start + 10_000);
        assert_eq!(level1, (first..=last).collect::<Vec<_>>());
    }
}
