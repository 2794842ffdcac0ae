//! The committer: commits, per partition, up to the lowest record not yet acknowledged in its
//! next place (the [`OffsetTracker`] says where), and only marks a point committed once the broker
//! acknowledged the commit. It also publishes the status snapshot the HTTP API reads, and the
//! pending-records statistics, and hands freed memory back to the system once the process has gone
//! quiet ([`Trimmer`]).
//!
//! Receives nothing but ticks; reads the tracker, the timer's view and the budget; sends the
//! [`Status`] on a watch channel.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use rdkafka::error::{KafkaError, KafkaResult};

use crate::engine::Shared;
use crate::kafka::{commit_offsets, lock, Fatal, BROKER_TIMEOUT};
use crate::metrics as m;
use crate::retry::backoff_builder;
use crate::status::{FailingTarget, Status};
use crate::time::format_millis;

impl Shared {
    pub(crate) async fn run_committer(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut trimmer = Trimmer::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.token.cancelled() => break,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.commit()).await;
            self.publish_status();
            if trimmer.should_trim(self.budget.used(), Instant::now()) {
                let _ = tokio::task::spawn_blocking(crate::release_free_memory).await;
            }
        }
    }

    /// Commits every partition's safe point that moved, and marks them committed once the broker
    /// has acknowledged the commit; a failed commit is offered again on the next tick.
    pub(crate) fn commit(&self) -> Result<(), KafkaError> {
        let points = lock(&self.tracker).commit_points();
        if points.is_empty() {
            return Ok(());
        }
        match commit_offsets(&*self.consumer, &points) {
            Ok(()) => {
                lock(&self.tracker).committed(&points);
                lock(&self.commits_failing).take();
                Ok(())
            }
            Err(e) => {
                metrics::counter!(m::COMMIT_FAILURES).increment(1);
                let mut failing = lock(&self.commits_failing);
                let since = failing.as_ref().map_or_else(Instant::now, |f| f.0);
                if failing.is_none() {
                    tracing::warn!(error = %e, "commit failed; retrying");
                } else {
                    tracing::debug!(error = %e, "commit failed again; retrying");
                }
                *failing = Some((since, e.to_string()));
                Err(e)
            }
        }
    }

    /// The last commit of a clean stop, tried again (with jitter) until `end`: a commit refused
    /// once (a coordinator moving or loading, a request timing out under load) would otherwise
    /// leave delivered records uncommitted, and the next owner would send them again.
    pub(crate) async fn commit_before(self: &Arc<Self>, end: tokio::time::Instant) -> bool {
        let attempt = || {
            let me = self.clone();
            async move {
                tokio::task::spawn_blocking(move || me.commit())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
        };
        let retries = attempt
            .retry(backoff_builder(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            .when(|_| tokio::time::Instant::now() < end);
        match tokio::time::timeout_at(end, retries)
            .await
            .unwrap_or_else(|_| Err("the shutdown timeout passed".into()))
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the last commit failed; the next owner sends the uncommitted records again");
                false
            }
        }
    }

    /// Publishes the status snapshot (and the gauges that mirror it).
    pub(crate) fn publish_status(&self) {
        let (assigned, in_flight) = {
            let t = lock(&self.tracker);
            (t.owned_count(), t.in_flight())
        };
        let timer = *self.timer_view.borrow();
        let behind = self.sweeps_behind.load(Ordering::SeqCst);
        let fatal = lock(&self.fatal).clone();
        let failing: Vec<FailingTarget> = lock(&self.targets)
            .troubles(std::time::Instant::now())
            .into_iter()
            .map(|t| FailingTarget {
                topic: t.topic,
                for_secs: t.for_.as_secs(),
                error: t.error,
            })
            .collect();
        // Commits refused for a while (a coordinator away, the group gone): what is delivered
        // meanwhile would be delivered again after a restart. Said after 30 s, not at the first
        // refusal, which a coordinator moving causes.
        // The publish gate holding records with ids for over 10 s: the index of ids is not fresh
        // (the state topic unread, or the reader stuck); they are late, never wrong.
        let gate = (*lock(&self.gate_held))
            .map(|(n, since)| (n, since.elapsed().as_secs()))
            .filter(|(_, secs)| *secs >= 10)
            .map(|(n, secs)| {
                format!("{n} record(s) with ids held {secs} s for the index of ids to catch up")
            });
        let commits = lock(&self.commits_failing)
            .as_ref()
            .map(|(since, e)| (since.elapsed().as_secs(), e.clone()))
            .filter(|(secs, _)| *secs >= 30);
        let (status, reason) = Status::health(
            fatal.as_ref().map(Fatal::reason),
            self.intake.is_cancelled(),
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
            in_flight,
            timer_pending: timer.pending,
            next_due: timer.next_due.map(format_millis),
            memory_used: self.budget.used(),
            memory_budget: self.settings.config.memory_budget,
            sweeps_behind: behind,
            failing_targets: failing,
        });
    }

    /// Pending records per level in the slices this process owns (high watermark minus the
    /// committed offset), every 30 s: one round trip per partition, so not more often.
    pub(crate) async fn run_stats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.intake.cancelled() => break,
            }
            let me = self.clone();
            let Ok(Ok((per_level, ingest_lag))) =
                tokio::task::spawn_blocking(move || me.pending()).await
            else {
                continue;
            };
            for (level, pending) in per_level.into_iter().enumerate() {
                metrics::gauge!(m::SLICE_PENDING, "level" => level.to_string()).set(pending as f64);
            }
            metrics::gauge!(m::INGEST_LAG).set(ingest_lag as f64);
        }
    }

    /// Records not yet committed in the partitions this process owns: per slice level, and in
    /// the ingest topic (the consumer lag).
    fn pending(&self) -> KafkaResult<(Vec<i64>, i64)> {
        let mut per_level = vec![0i64; self.ladder().levels()];
        let mut ingest = 0;
        let owned = lock(&self.tracker).owned();
        if owned.is_empty() {
            return Ok((per_level, ingest));
        }
        let committed = self.lookup.committed(&owned, BROKER_TIMEOUT)?;
        let marks = self.lookup.watermarks(&owned, BROKER_TIMEOUT)?;
        for (tp, (low, high)) in marks {
            let from = committed.get(&tp).map_or(low, |&c| c.max(low));
            let lag = (high - from).max(0);
            match self.slices.get(&tp.0) {
                Some(&(level, _)) => per_level[level] += lag,
                None if tp.0 == self.settings.internal.ingest => ingest += lag,
                None => {}
            }
        }
        Ok((per_level, ingest))
    }
}

/// When to hand freed memory back to the system: once the process has held almost nothing of its
/// memory budget (under [`Trimmer::QUIET_BYTES`]) for [`Trimmer::QUIET_FOR`], and then not again
/// until it has been busy in between. Trimming during work would only give back pages that the
/// next records take again.
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    quiet_since: Option<Instant>,
    trimmed: bool,
}

impl Trimmer {
    const QUIET_BYTES: u64 = 1 << 20;
    const QUIET_FOR: Duration = Duration::from_secs(2);

    /// True when a trim is due now, given the budget's bytes in use.
    pub(crate) fn should_trim(&mut self, used: u64, now: Instant) -> bool {
        if used >= Self::QUIET_BYTES {
            *self = Trimmer::default();
            return false;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if self.trimmed || now.duration_since(since) < Self::QUIET_FOR {
            return false;
        }
        self.trimmed = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_quiet_spell_and_again_only_after_work() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let busy = 8 << 20;
        let mut t = Trimmer::default();
        assert!(!t.should_trim(busy, at(0)), "busy");
        assert!(!t.should_trim(0, at(100)), "quiet, not yet for long");
        assert!(!t.should_trim(0, at(2_000)));
        assert!(t.should_trim(0, at(2_100)), "quiet for 2 s");
        assert!(!t.should_trim(0, at(2_200)), "once per quiet spell");
        assert!(!t.should_trim(0, at(60_000)));
        assert!(!t.should_trim(busy, at(60_100)), "busy again");
        assert!(!t.should_trim(1_000, at(60_200)));
        assert!(!t.should_trim(1_000, at(62_100)));
        assert!(t.should_trim(1_000, at(62_200)), "quiet again for 2 s");
    }
}
