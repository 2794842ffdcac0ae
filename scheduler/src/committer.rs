//! The committer: owns the offset tracker and commits, per partition, up to the lowest record not
//! yet acknowledged in its next place, marking a point committed only once the broker has
//! acknowledged the commit. It also hands freed memory back to the system once the process has
//! gone quiet ([`Trimmer`]); the pending-records statistics ([`Stats`]) live here too.
//!
//! Runs on a thread of its own, not a task: librdkafka's rebalance callback must have the revoked
//! partitions' commit points before it returns, on the thread that polls the consumer (an async
//! worker), and a thread can answer it while that worker waits. The commits themselves (blocking
//! broker round trips) run on a second thread, so a slow commit never holds up an answer.
//!
//! Owns the [`OffsetTracker`] and the record of failing commits. Receives [`Note`]s, in order:
//! "assigned" and "revoked" from the rebalance callback, "begun", "also" and "finished" from the
//! stages, "commit now" from a clean stop. Sends commits to the broker, the failing commits and
//! the count of records in flight on `watch` channels for the status stage.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::Retryable;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaResult;
use tokio::sync::{oneshot, watch};

use crate::config::Settings;
use crate::kafka::{commit_offsets, EngineContext, Fatal, Lookup, BROKER_TIMEOUT};
use crate::lifecycle::Lifecycle;
use crate::memory::release_free_memory;
use crate::metrics as m;
use crate::offsets::{CommitOutcome, CommitPoint, Note, OffsetTracker, Offsets};
use crate::outbox::Budget;
use crate::retry::backoff_builder;
use crate::transaction::{Txn, TxnError};

/// How long the committer lets notes gather after a batch (see [`Committer::run`]).
const GATHER: Duration = Duration::from_millis(2);

/// How long a transaction's commit waits for its sends to be settled before it aborts: the
/// producer answers every send within its message timeout (10 s in the exactly-once mode).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Partitions a transaction commits for the last time, and the group's metadata as the
/// rebalance callback saw it.
struct Revoking<'a> {
    tps: &'a [crate::offsets::Tp],
    group: Option<&'a rdkafka::consumer::ConsumerGroupMetadata>,
}

/// Since when commits have been refused, and the last error (`None` while they succeed).
pub(crate) type CommitsFailing = Option<(Instant, String)>;

pub(crate) struct Committer {
    pub consumer: Arc<StreamConsumer<EngineContext>>,
    pub notes: mpsc::Receiver<Note>,
    /// Its own handle: the commit thread sends each commit's outcome back as a note.
    pub offsets: Offsets,
    pub budget: Budget,
    pub interval: Duration,
    pub failing: watch::Sender<CommitsFailing>,
    /// Records begun and not yet finished, after each commit and tick.
    pub in_flight: watch::Sender<usize>,
    /// The exactly-once mode: commits are transactions ([`Committer::transact`]).
    pub txn: Option<Arc<Txn>>,
    pub life: Arc<Lifecycle>,
}

/// The committer's loop state besides the tracker: the commit in flight, if any, and who waits
/// for commits.
#[derive(Default)]
struct Commits {
    running: bool,
    /// Waiting for the commit now running.
    answering: Vec<oneshot::Sender<CommitOutcome>>,
    /// Asked while a commit was running: answered by the next one, which starts when it ends.
    queued: Vec<oneshot::Sender<CommitOutcome>>,
}

impl Committer {
    /// Starts the committer's thread. It ends on [`Offsets::close`].
    pub(crate) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sm-committer".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        if let Some(txn) = self.txn.clone() {
            // Transactions commit on this thread: no commit thread, no plain commits.
            return self.run_transactions(&txn, OffsetTracker::default());
        }
        let (points_tx, points_rx) = mpsc::sync_channel::<Vec<CommitPoint>>(1);
        let consumer = self.consumer.clone();
        let back = self.offsets.clone();
        // The broker round trips: one commit at a time, its outcome sent back as a note.
        let sender = std::thread::Builder::new()
            .name("sm-commit".into())
            .spawn(move || {
                for points in points_rx {
                    let result = commit_offsets(&*consumer, &points).map_err(|e| e.to_string());
                    back.committed(points, result);
                }
            });
        if let Err(e) = sender {
            tracing::error!(error = %e, "could not start the commit thread; nothing is committed");
            return;
        }
        let mut tracker = OffsetTracker::default();
        let mut commits = Commits::default();
        let mut trimmer = Trimmer::default();
        let mut next_tick = Instant::now() + self.interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.notes.recv_timeout(wait) {
                Ok(Note::Close) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(note) => {
                    self.apply(note, &mut tracker, &mut commits, &points_tx);
                    // Take what else has come, then let notes gather for a moment: a sender
                    // wakes this thread only while it waits in `recv`, and at thousands of
                    // records a second a wake per note cost more than the notes themselves.
                    let mut closed = false;
                    while let Ok(note) = self.notes.try_recv() {
                        if matches!(note, Note::Close) {
                            closed = true;
                            break;
                        }
                        self.apply(note, &mut tracker, &mut commits, &points_tx);
                    }
                    if closed {
                        break;
                    }
                    std::thread::sleep(GATHER);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Checked after every note too: a busy channel never times out.
            if Instant::now() >= next_tick {
                if !commits.running {
                    self.start(&tracker, &mut commits, &points_tx);
                }
                self.in_flight.send_replace(tracker.in_flight());
                if trimmer.should_trim(self.budget.used(), Instant::now()) {
                    release_free_memory();
                }
                next_tick = Instant::now() + self.interval;
            }
        }
        self.in_flight.send_replace(tracker.in_flight());
    }

    /// The exactly-once mode's loop: as [`Committer::run`], but each commit is a transaction,
    /// run on this thread (it must see every note of the sends it commits).
    fn run_transactions(&self, txn: &Txn, mut tracker: OffsetTracker) {
        let mut deferred = std::collections::VecDeque::new();
        let mut next_tick = Instant::now() + self.interval;
        loop {
            let note = match deferred.pop_front() {
                Some(note) => Ok(note),
                None => self
                    .notes
                    .recv_timeout(next_tick.saturating_duration_since(Instant::now())),
            };
            match note {
                Ok(Note::Close) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Note::Revoked(tps, group, reply)) => {
                    // The partitions' progress commits with everything written for them, before
                    // they move; the callback then has nothing left to commit.
                    let revoking = Revoking {
                        tps: &tps,
                        group: group.as_ref().map(|g| &*g.0),
                    };
                    let _ = self.transact(txn, &mut tracker, Some(revoking), &mut deferred);
                    let _ = reply.send(Vec::new());
                }
                Ok(Note::CommitNow(reply)) => {
                    let outcome = self
                        .transact(txn, &mut tracker, None, &mut deferred)
                        .map(|()| tracker.in_flight());
                    let _ = reply.send(outcome);
                }
                Ok(note) => self.track(note, &mut tracker),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                if txn.dirty() || tracker.moved() {
                    let _ = self.transact(txn, &mut tracker, None, &mut deferred);
                }
                self.in_flight.send_replace(tracker.in_flight());
                next_tick = Instant::now() + self.interval;
            }
        }
        self.in_flight.send_replace(tracker.in_flight());
    }

    /// The notes that only change the tracker (others change nothing here).
    fn track(&self, note: Note, tracker: &mut OffsetTracker) {
        match note {
            Note::Assigned(list, done) => tracker.assign(list, &done),
            Note::Begun(ticket) => {
                tracker.begin(&ticket);
            }
            Note::Also(ticket) => {
                tracker.also(&ticket);
            }
            Note::Finished(ticket) => tracker.finish(&ticket),
            _ => {}
        }
    }

    /// Commits the open transaction: closes the gate (no stage enqueues a send), waits until
    /// every send in it is settled (applying the notes they send meanwhile; others are kept for
    /// after), then commits every partition's point and progress with it, and opens the next.
    /// Partitions being `revoking` leave the tracker only then, once every write for them is
    /// known; if their commit fails, the transaction aborts, since what it wrote for them would
    /// otherwise commit later without their offsets. An abort or a fence stops the engine: the
    /// next engine, or the next owner, goes on from the last committed transaction.
    fn transact(
        &self,
        txn: &Txn,
        tracker: &mut OffsetTracker,
        revoking: Option<Revoking<'_>>,
        deferred: &mut std::collections::VecDeque<Note>,
    ) -> Result<(), String> {
        let failed = self.life.fatal().map(|f| f.reason().to_string());
        let gate = txn.close();
        if let Some(why) = failed {
            // Stopped by a fatal error: nothing more of this transaction may become visible.
            drop(txn.abort(why.clone(), BROKER_TIMEOUT));
            return Err(why);
        }
        let mut take = |note: Note, tracker: &mut OffsetTracker| match note {
            n @ (Note::Revoked(..) | Note::CommitNow(_) | Note::Close | Note::Committed(..)) => {
                deferred.push_back(n)
            }
            n => self.track(n, tracker),
        };
        let settle_by = Instant::now() + SETTLE_TIMEOUT;
        while txn.unsettled() > 0 {
            match self.notes.recv_timeout(Duration::from_millis(1)) {
                Ok(note) => take(note, tracker),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("the engine has gone".into()),
            }
            if self.life.token().is_cancelled() && self.life.fatal().is_some() {
                break; // failed meanwhile: the commit below aborts (the transaction is doomed)
            }
            if Instant::now() >= settle_by {
                // A send the producer never answered (it answers every send within its
                // timeout) or one lost at a stop: the commit below aborts.
                txn.doom(format!(
                    "{} sends unsettled after {SETTLE_TIMEOUT:?}",
                    txn.unsettled()
                ));
                break;
            }
        }
        while let Ok(note) = self.notes.try_recv() {
            take(note, tracker);
        }
        if let Some(fatal) = self.life.fatal() {
            txn.doom(fatal.reason().to_string());
        }
        // The revoking partitions are among them; they leave the tracker now.
        let points = tracker.transaction_points();
        if let Some(r) = &revoking {
            tracker.revoke(r.tps);
        }
        let now = rdkafka::consumer::Consumer::group_metadata(&*self.consumer);
        let group = revoking.as_ref().and_then(|r| r.group).or(now.as_ref());
        let mut result = txn.commit(&points, group, BROKER_TIMEOUT);
        if let (Some(_), Err(TxnError::Later(e))) = (&revoking, &result) {
            result = Err(txn.abort(
                format!("the commit before a revoke failed: {e}"),
                BROKER_TIMEOUT,
            ));
        }
        drop(gate);
        match result {
            Ok(marks) => {
                tracker.committed(&points);
                if !marks.is_empty() {
                    self.offsets.read_marks(|m| {
                        for ticket in &marks {
                            m.acked(ticket);
                        }
                    });
                }
                self.commits_succeed();
                Ok(())
            }
            Err(TxnError::Later(e)) => {
                self.commit_refused(&e);
                Err(e)
            }
            Err(TxnError::Aborted(e)) => {
                let why = format!("transaction aborted, nothing of it is visible: {e}");
                self.life.fail(Fatal::Aborted(why.clone()));
                Err(why)
            }
            Err(TxnError::Fenced(e)) => {
                let why = format!("transactional producer fenced: {e}");
                self.life.fail(Fatal::Fenced(why.clone()));
                Err(why)
            }
        }
    }

    fn apply(
        &self,
        note: Note,
        tracker: &mut OffsetTracker,
        commits: &mut Commits,
        points_tx: &mpsc::SyncSender<Vec<CommitPoint>>,
    ) {
        match note {
            Note::Revoked(tps, _, reply) => {
                let _ = reply.send(tracker.revoke(&tps));
            }
            Note::CommitNow(reply) => {
                commits.queued.push(reply);
                if !commits.running {
                    self.start(tracker, commits, points_tx);
                }
            }
            Note::Committed(points, result) => {
                commits.running = false;
                let outcome = self.committed(tracker, &points, result);
                for reply in commits.answering.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
                if !commits.queued.is_empty() {
                    self.start(tracker, commits, points_tx);
                }
                self.in_flight.send_replace(tracker.in_flight());
            }
            note => self.track(note, tracker),
        }
    }

    /// Starts a commit of every partition's safe point that moved, for those waiting in
    /// `queued`; with nothing to commit they are answered at once.
    fn start(
        &self,
        tracker: &OffsetTracker,
        commits: &mut Commits,
        points_tx: &mpsc::SyncSender<Vec<CommitPoint>>,
    ) {
        let points = tracker.commit_points();
        if points.is_empty() {
            for reply in commits.queued.drain(..) {
                let _ = reply.send(Ok(tracker.in_flight()));
            }
            return;
        }
        commits.answering.append(&mut commits.queued);
        commits.running = points_tx.send(points).is_ok();
        if !commits.running {
            for reply in commits.answering.drain(..) {
                let _ = reply.send(Err("the commit thread has ended".into()));
            }
        }
    }

    /// A commit's outcome: points marked committed once acknowledged; a refusal counted,
    /// published, and offered again on the next tick.
    fn committed(
        &self,
        tracker: &mut OffsetTracker,
        points: &[CommitPoint],
        result: Result<(), String>,
    ) -> CommitOutcome {
        match result {
            Ok(()) => {
                tracker.committed(points);
                self.commits_succeed();
                Ok(tracker.in_flight())
            }
            Err(e) => {
                self.commit_refused(&e);
                Err(e)
            }
        }
    }

    /// A commit (or transaction) went through: commits no longer fail.
    fn commits_succeed(&self) {
        self.failing.send_if_modified(|f| f.take().is_some());
    }

    /// A commit (or transaction) was refused and is offered again on the next tick: counted,
    /// and published with since when commits fail.
    fn commit_refused(&self, e: &str) {
        metrics::counter!(m::COMMIT_FAILURES).increment(1);
        self.failing.send_modify(|failing| {
            let since = failing.as_ref().map_or_else(Instant::now, |f| f.0);
            if failing.is_none() {
                tracing::warn!(error = %e, "commit failed; retrying");
            } else {
                tracing::debug!(error = %e, "commit failed again; retrying");
            }
            *failing = Some((since, e.to_string()));
        });
    }
}

/// The last commit of a clean stop, asked of the committer again (with jitter) until `end`: a
/// commit refused once (a coordinator moving or loading, a request timing out under load) would
/// otherwise leave delivered records uncommitted, and the next owner would send them again.
pub(crate) async fn commit_before(offsets: &Offsets, end: tokio::time::Instant) -> bool {
    let attempt = || offsets.commit_now();
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
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the last commit failed; the next owner sends the uncommitted records again");
            false
        }
    }
}

/// The pending-records statistics.
pub(crate) struct Stats {
    pub offsets: Offsets,
    pub lookup: Arc<Lookup>,
    pub settings: Arc<Settings>,
    pub life: Arc<Lifecycle>,
    /// slice topic -> (level, slot)
    pub slices: Arc<HashMap<String, (usize, i64)>>,
}

impl Stats {
    /// Pending records per level in the slices this process owns (high watermark minus the
    /// committed offset), every 30 s: one round trip per partition, so not more often.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.life.intake().cancelled() => break,
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
        let mut per_level = vec![0i64; self.settings.ladder.levels()];
        let mut ingest = 0;
        let owned = self.offsets.owned();
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
