//! The status stage: gathers each stage's health into the [`Status`] snapshot that `/healthz`
//! reads, and the gauges that mirror it.
//!
//! Owns the snapshot's sending end. Receives nothing but ticks (every commit interval) and the
//! run state's changes (a fatal error, a stop, published at once); reads each stage's published
//! health: the partitions owned and the committer's count of records in flight, the timer's view, the sweeps behind, the failing targets, the
//! publish gate, the commits, the budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::committer::CommitsFailing;
use crate::kafka::Fatal;
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::Offsets;
use crate::outbox::{Budget, Outbox};
use crate::state::Ids;
use crate::status::GateHeld;
use crate::status::Status;
use crate::time::format_millis;
use crate::time::Clock;
use crate::timer::TimerView;

pub(crate) struct Monitor {
    pub offsets: Offsets,
    /// Records begun and not finished, from the committer.
    pub in_flight: watch::Receiver<usize>,
    pub timer_view: watch::Receiver<TimerView>,
    pub sweeps_behind: Arc<AtomicUsize>,
    pub life: Arc<Lifecycle>,
    pub outbox: Arc<Outbox>,
    pub gate: watch::Receiver<GateHeld>,
    pub commits: watch::Receiver<CommitsFailing>,
    pub budget: Budget,
    pub memory_budget: u64,
    pub interval: Duration,
    pub status: watch::Sender<Status>,
    /// The ingest watermarks every process writes, as this one read them.
    pub ids: Ids,
    pub clock: Arc<dyn Clock>,
}

/// An ingest partition without a watermark for this long makes the status `degraded`: as
/// long as a gate that holds records (above), and well past a takeover (the session timeout).
const STALE_INGEST_DEGRADED_MS: i64 = 10_000;

impl Monitor {
    /// Publishes every interval and at every change of the run state, until the engine stops
    /// (then once more).
    pub(crate) async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.life.changes();
        while !self.life.token().is_cancelled() {
            changes.borrow_and_update();
            self.publish();
            tokio::select! {
                _ = tick.tick() => {}
                _ = changes.changed() => {}
            }
        }
        self.publish();
    }

    /// Publishes the status snapshot (and the gauges that mirror it).
    pub(crate) fn publish(&self) {
        let (assigned, in_flight) = (self.offsets.owned_count(), *self.in_flight.borrow());
        let timer = *self.timer_view.borrow();
        let behind = self.sweeps_behind.load(Ordering::SeqCst);
        let fatal = self.life.fatal();
        let failing = self.outbox.failing_targets(Instant::now());
        // Commits refused for a while (a coordinator away, the group gone): what is delivered
        // meanwhile would be delivered again after a restart. Said after 30 s, not at the first
        // refusal, which a coordinator moving causes.
        // The publish gate holding records with ids for over 10 s: the index of ids is not fresh
        // (the state topic unread, or the reader stuck); they are late, never wrong.
        let gate = (*self.gate.borrow())
            .map(|(n, since)| (n, since.elapsed().as_secs()))
            .filter(|(_, secs)| *secs >= 10)
            .map(|(n, secs)| {
                format!("{n} record(s) with ids held {secs} s for the index of ids to catch up")
            });
        let stale = self.ids.stale_ingest(self.clock.now_ms());
        let long_stale: Vec<String> = stale
            .iter()
            .filter(|(_, lag)| *lag >= STALE_INGEST_DEGRADED_MS)
            .map(|(p, lag)| format!("{p} ({} s)", lag / 1000))
            .collect();
        let gate = match (gate, long_stale.is_empty()) {
            (gate, true) => gate,
            (gate, false) => Some(
                gate.into_iter()
                    .chain([format!(
                        "ingest partition(s) {} without a watermark: unowned, or their owner \
                         stopped; records with ids wait",
                        long_stale.join(", ")
                    )])
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let commits = self
            .commits
            .borrow()
            .as_ref()
            .map(|(since, e)| (since.elapsed().as_secs(), e.clone()))
            .filter(|(secs, _)| *secs >= 30);
        let (status, reason) = Status::health(
            fatal.map(Fatal::reason),
            self.life.stopping(),
            behind,
            &failing,
            commits.as_ref().map(|(secs, e)| (*secs, e.as_str())),
            gate.as_deref(),
        );
        metrics::gauge!(m::FAILING_TARGETS).set(failing.len() as f64);
        metrics::gauge!(m::TIMER_PENDING).set(timer.pending as f64);
        metrics::gauge!(m::NEXT_DUE).set(timer.next_due.map_or(0.0, |d| d as f64 / 1000.0));
        metrics::gauge!(m::IN_FLIGHT).set(in_flight as f64);
        metrics::gauge!(m::MEMORY_USED).set(self.budget.used() as f64);
        metrics::gauge!(m::SWEEPS_BEHIND).set(behind as f64);
        self.status.send_replace(Status {
            status,
            reason,
            assigned_partitions: assigned,
            ingest_partitions: self.offsets.partitions_of(&self.ids.ingest_topic()),
            stale_ingest_partitions: stale.iter().map(|(p, _)| *p).collect(),
            in_flight,
            timer_pending: timer.pending,
            next_due: timer.next_due.map(format_millis),
            memory_used: self.budget.used(),
            memory_budget: self.memory_budget,
            sweeps_behind: behind,
            failing_targets: failing,
            last_transaction_abort: crate::transaction::last_abort(),
        });
    }
}
