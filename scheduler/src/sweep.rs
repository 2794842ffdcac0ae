//! Sweeps: reading one slice window's partitions and moving each record to its next place.
//!
//! Each worker owns readers (`--sweep-readers`), consumers outside the group that are assigned a
//! job's partitions (dealt among them, read at once) only while it sweeps them and nothing in
//! between, so slice partitions cost no fetches between their sweeps and the group's fetches carry
//! only the ingest partitions, whose records are wanted at once. The group's consumer
//! keeps them assigned and paused: it decides which instance owns them and commits their offsets.
//! Receives job ids from the planner and the control task; sends records to the outbox and the
//! timer; reports each job on the board. A failed sweep is retried with backoff and jitter until it
//! succeeds or its partitions are revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::domain::Scheduled;
use crate::error::Error;
use crate::jobs::{Board, Job, JobCounts, JobKind};
use crate::kafka::BROKER_TIMEOUT;
use crate::kafka::{self, lock, Lookup};
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::{Offsets, Tp};
use crate::outbox::weight;
use crate::progress::{ActiveSweep, STALL};
use crate::router::Router;
use crate::slice::{Route, SliceId};
use crate::time::Clock;

/// How long a sweep's reader may wait for a record before it looks at its position (which
/// moves past transaction markers without a record to show for it).
const QUIET_CHECK: Duration = Duration::from_millis(200);

/// Where a slice partition's next sweep starts, under the assignment generation it was learnt in.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    generation: u64,
    next: Option<i64>,
}

/// One partition of a running sweep: its cursor held, read from `next` up to `end`.
struct PartitionSweep {
    tp: Tp,
    generation: u64,
    cursor: tokio::sync::OwnedMutexGuard<Cursor>,
    next: i64,
    /// The high watermark when the sweep began; records at or after it arrived late.
    began_at_end: i64,
    /// Where the sweep stops, moved on by stragglers found when it gets there.
    end: i64,
    /// Records below this offset that belong in this very slot (a later window, or beyond the
    /// top level's horizon) are written again at the end; from this offset on, such a record ends
    /// the sweep of this partition, so a sweep never reads its own re-writes.
    reappend_below: i64,
    done: bool,
}

/// A sweep worker's readers (`--sweep-readers`; settings in [`kafka::sweep_reader_config`]).
pub(crate) fn readers(settings: &Settings) -> Result<Vec<StreamConsumer>, Error> {
    (0..settings.config.sweep_readers)
        .map(|_| Ok(kafka::sweep_reader_config(settings).create()?))
        .collect()
}

/// Deals `items` round-robin into at most `hands` groups, none empty: the partitions of a sweep
/// among its readers.
fn deal<T>(items: Vec<T>, hands: usize) -> Vec<Vec<T>> {
    let n = hands.min(items.len());
    let mut groups: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        groups[i % n].push(item);
    }
    groups
}

/// Delays between attempts of a failed sweep: 200 ms doubling to 10 s, with jitter.
fn sweep_retry_delays() -> impl Iterator<Item = Duration> {
    crate::retry::backoff(Duration::from_millis(200), Duration::from_secs(10))
}

/// The sweep stage, shared by its workers: the cursors are its own; the rest are handles.
pub(crate) struct Sweeper {
    router: Arc<Router>,
    /// Asked which slice partitions are ours and under which generation; told "begun".
    offsets: Offsets,
    board: Arc<Board>,
    lookup: Arc<Lookup>,
    settings: Arc<Settings>,
    clock: Arc<dyn Clock>,
    life: Arc<Lifecycle>,
    /// Where each partition's next sweep starts (one lock per partition, held by its sweep).
    cursors: Mutex<HashMap<Tp, Arc<tokio::sync::Mutex<Cursor>>>>,
    /// Sweeps failing and being retried now (the process is `degraded` while any are).
    behind: Arc<AtomicUsize>,
    /// Sweep attempts to fail on purpose (test builds only), to drive the retry path without
    /// a broker fault.
    #[cfg(feature = "testkit")]
    injected_failures: AtomicUsize,
}

impl Sweeper {
    pub(crate) fn new(
        router: Arc<Router>,
        offsets: Offsets,
        board: Arc<Board>,
        lookup: Arc<Lookup>,
        life: Arc<Lifecycle>,
    ) -> Sweeper {
        Sweeper {
            settings: router.settings.clone(),
            clock: router.clock.clone(),
            router,
            offsets,
            board,
            lookup,
            life,
            cursors: Mutex::default(),
            behind: Arc::default(),
            #[cfg(feature = "testkit")]
            injected_failures: AtomicUsize::new(0),
        }
    }

    /// How many sweeps are failing and being retried now, for the status.
    pub(crate) fn behind(&self) -> Arc<AtomicUsize> {
        self.behind.clone()
    }

    /// Makes the next `n` sweep attempts fail (test builds only).
    #[cfg(feature = "testkit")]
    pub(crate) fn fail_next(&self, n: usize) {
        self.injected_failures.store(n, Ordering::SeqCst);
    }

    /// A worker: takes jobs one at a time and runs each with its own readers.
    pub(crate) async fn run_worker(
        self: Arc<Self>,
        id: String,
        jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<u64>>>,
        readers: Vec<StreamConsumer>,
    ) {
        self.board.join(&id, self.clock.now_ms());
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            let job = tokio::select! {
                _ = self.life.intake().cancelled() => break,
                _ = beat.tick() => {
                    self.board.heartbeat(&id, self.clock.now_ms());
                    continue;
                }
                job = async { jobs.lock().await.recv().await } => job,
            };
            let Some(job_id) = job else { break };
            self.run_job(job_id, &id, &readers).await;
        }
        self.board.leave(&id);
    }

    /// Runs a job until it succeeds, its partitions are gone, or the engine stops; each failed
    /// attempt is counted, shown on the board, and marks the process `degraded` until it passes.
    async fn run_job(self: &Arc<Self>, job_id: u64, worker: &str, readers: &[StreamConsumer]) {
        let Some(job) = self.board.get(job_id) else {
            return;
        };
        let mut delays = sweep_retry_delays();
        let mut behind = false;
        let started = self.clock.now_ms();
        metrics::gauge!(m::WORKERS_BUSY).increment(1.0);
        let outcome = loop {
            let partitions = self.offsets.partitions_of(&job.slot_topic);
            if partitions.is_empty() {
                break None; // revoked, or never ours
            }
            self.board
                .start(job_id, worker, partitions.clone(), self.clock.now_ms());
            match self.sweep_once(&job, &partitions, readers).await {
                Ok(counts) => break Some(Ok(counts)),
                Err(e) if self.life.intake().is_cancelled() => break Some(Err(e)),
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "sweep failed; retrying");
                    metrics::counter!(m::SWEEP_FAILURES, "level" => job.level.to_string())
                        .increment(1);
                    self.board.attempt_failed(job_id, e);
                    if !behind {
                        behind = true;
                        self.behind.fetch_add(1, Ordering::SeqCst);
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.life.intake().cancelled() => break Some(Err("shutting down".into())),
                    }
                }
            }
        };
        if behind {
            self.behind.fetch_sub(1, Ordering::SeqCst);
        }
        metrics::gauge!(m::WORKERS_BUSY).decrement(1.0);
        let now = self.clock.now_ms();
        let (counts, error) = match outcome {
            None => {
                self.board.discard(job_id);
                return;
            }
            Some(Ok(counts)) => (counts, None),
            Some(Err(e)) => (JobCounts::default(), Some(e)),
        };
        let status = if error.is_some() { "error" } else { "done" };
        self.board.finish(job_id, counts, error, now);
        metrics::counter!(m::JOBS, "status" => status).increment(1);
        metrics::histogram!(m::JOB_DURATION, "level" => job.level.to_string())
            .record((now - started) as f64 / 1000.0);
        // A scheduled sweep's window start; a catch-up has none.
        if let Some(begins) = job.lower_ms {
            metrics::histogram!(m::SWEEP_LATENESS, "level" => job.level.to_string())
                .record((now - begins).max(0) as f64 / 1000.0);
        }
    }

    /// One attempt at a job: every owned partition of its slot, from where the last sweep stopped
    /// up to the high watermark (and the stragglers found there).
    async fn sweep_once(
        self: &Arc<Self>,
        job: &Job,
        partitions: &[i32],
        readers: &[StreamConsumer],
    ) -> Result<JobCounts, String> {
        #[cfg(feature = "testkit")]
        if self
            .injected_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("injected sweep failure (testkit)".into());
        }
        let top = job.level + 1 == self.settings.ladder.levels();
        // Scheduled sweeps, and catch-ups of the top level (which also holds what lies beyond its
        // horizon, mixed with due windows), rewrite in-place records; other catch-ups stop at them.
        let reappend = job.kind == JobKind::Sweep || top;
        if let Some(window) = job.window {
            let id = SliceId {
                level: job.level,
                window,
            };
            let left = self.router.slice_writes.settled(id, BROKER_TIMEOUT).await;
            if left > 0 {
                tracing::warn!(job = %job.name, left, "writes into this window still unacknowledged; sweeping without them");
            }
        }
        let parts = self
            .sweep_starts(&job.slot_topic, partitions, reappend)
            .await?;
        self.read_sweep(&job.slot_topic, parts, readers).await
    }

    /// Where each partition's sweep starts and ends. Takes each partition's cursor first (so two
    /// jobs never sweep one partition at once; always in partition order, so they cannot
    /// deadlock), then asks for every partition's watermarks, and the committed offsets of those
    /// without a cursor, in a few requests for the whole job.
    async fn sweep_starts(
        &self,
        topic: &str,
        partitions: &[i32],
        reappend: bool,
    ) -> Result<Vec<PartitionSweep>, String> {
        let mut held = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let tp: Tp = (topic.to_string(), partition);
            let cursor = lock(&self.cursors).entry(tp.clone()).or_default().clone();
            let mut cursor = cursor.lock_owned().await;
            let Some(generation) = self.offsets.generation(topic, partition) else {
                continue; // revoked meanwhile
            };
            if cursor.generation != generation {
                *cursor = Cursor {
                    generation,
                    next: None,
                };
            }
            held.push((tp, generation, cursor));
        }
        let tps: Vec<Tp> = held.iter().map(|(tp, ..)| tp.clone()).collect();
        // Neither swept under this assignment nor read by the rebalance callback (exactly-once):
        // only those need the group's committed offsets.
        let unknown: Vec<Tp> = held
            .iter()
            .filter(|(tp, _, c)| {
                c.next.is_none() && self.offsets.committed_at(&tp.0, tp.1).is_none()
            })
            .map(|(tp, ..)| tp.clone())
            .collect();
        let (marks, committed) = kafka::look(&self.lookup, move |l| {
            let marks = l.watermarks(&tps, BROKER_TIMEOUT)?;
            let committed = if unknown.is_empty() {
                HashMap::new()
            } else {
                l.committed(&unknown, BROKER_TIMEOUT)?
            };
            Ok((marks, committed))
        })
        .await?;
        held.into_iter()
            .map(|(tp, generation, cursor)| {
                let &(low, high) = marks
                    .get(&tp)
                    .ok_or_else(|| format!("no watermarks for partition {}", tp.1))?;
                let known = cursor
                    .next
                    .or(self.offsets.committed_at(&tp.0, tp.1))
                    .or(committed.get(&tp).copied());
                if let Some(from) = known.filter(|&from| from < low) {
                    // Retention deleted records this process never swept: they are lost. Count
                    // and report it; carry on from what is left rather than stop for ever.
                    metrics::counter!(m::SLICE_DATA_LOST).increment((low - from) as u64);
                    tracing::error!(topic = %tp.0, partition = tp.1, from, low, "slice records deleted by retention before they were swept");
                }
                let next = known.unwrap_or(low).max(low);
                Ok(PartitionSweep {
                    tp,
                    generation,
                    cursor,
                    next,
                    began_at_end: high,
                    end: high,
                    reappend_below: if reappend { high } else { next },
                    done: next >= high,
                })
            })
            .collect()
    }

    /// Reads the partitions with the worker's readers (dealt among them, read at once) and routes
    /// each record on; returns once every record read has been placed (acknowledged in a finer
    /// slice or the DLQ, or in the timer).
    async fn read_sweep(
        self: &Arc<Self>,
        topic: &str,
        mut parts: Vec<PartitionSweep>,
        readers: &[StreamConsumer],
    ) -> Result<JobCounts, String> {
        let sweep = Arc::new(ActiveSweep::default());
        let open: Vec<&mut PartitionSweep> = parts.iter_mut().filter(|p| !p.done).collect();
        let reads =
            deal(open, readers.len())
                .into_iter()
                .zip(readers)
                .map(|(mut group, reader)| {
                    let sweep = &sweep;
                    async move { self.read_group(topic, &mut group, reader, sweep).await }
                });
        // Every group runs to its end before the first failure is returned, so that no reader is
        // left assigned.
        let outcome: Result<Vec<()>, String> =
            futures::future::join_all(reads).await.into_iter().collect();
        for p in &mut parts {
            p.cursor.next = Some(p.next);
        }
        drop(parts);
        outcome?;
        sweep.all_placed(self.life.token()).await
    }

    /// One reader's share of a sweep: assigned these partitions for the length of the read.
    async fn read_group(
        self: &Arc<Self>,
        topic: &str,
        parts: &mut [&mut PartitionSweep],
        reader: &StreamConsumer,
        sweep: &Arc<ActiveSweep>,
    ) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for p in parts.iter() {
            tpl.add_partition_offset(topic, p.tp.1, Offset::Offset(p.next))
                .map_err(|e| e.to_string())?;
        }
        reader.assign(&tpl).map_err(|e| e.to_string())?;
        // Read to the end in a block of its own, so that every way out of it unassigns.
        let outcome = async {
            let mut quiet = Duration::ZERO;
            while parts.iter().any(|p| !p.done) {
                let msg = tokio::select! {
                    m = tokio::time::timeout(QUIET_CHECK, reader.recv()) => m,
                    _ = self.life.intake().cancelled() => return Err("shutting down".into()),
                };
                let rec = match msg {
                    Err(_) => {
                        // Nothing came: the reader may have passed records it never hands out
                        // (transaction markers, aborted records: the exactly-once mode writes
                        // slices in transactions), so its position, not the last record, says
                        // how far it read.
                        quiet += QUIET_CHECK;
                        if quiet >= STALL {
                            return Err(format!("no record for {STALL:?}"));
                        }
                        let positions = reader.position().map_err(|e| e.to_string())?;
                        for p in parts.iter_mut().filter(|p| !p.done) {
                            let at = positions
                                .find_partition(topic, p.tp.1)
                                .and_then(|e| e.offset().to_raw());
                            if let Some(at) = at.filter(|&at| at > p.next) {
                                p.next = at;
                            }
                            if p.next >= p.end {
                                self.caught_up(p).await?;
                            }
                        }
                        continue;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!(m::SLICE_READ_ERRORS).increment(1);
                        return Err(format!("reading the slice failed: {e}"));
                    }
                    Ok(Ok(m)) => kafka::detach(&m),
                };
                quiet = Duration::ZERO;
                let Some(p) = parts
                    .iter_mut()
                    .find(|p| p.tp.1 == rec.partition && rec.topic == topic)
                else {
                    continue;
                };
                if p.done || rec.offset < p.next {
                    continue; // past where this partition stops, or read again after a seek
                }
                if self
                    .offsets
                    .skip_done(topic, rec.partition, rec.offset)
                    .is_some()
                {
                    // Written on by the previous owner's committed transaction (exactly-once):
                    // skipped; the commit point already passes it.
                    metrics::counter!(m::REPLAY_SKIPPED).increment(1);
                    p.next = rec.offset + 1;
                    if p.next >= p.end {
                        self.caught_up(p).await?;
                    }
                    continue;
                }
                let now = self.clock.now_ms();
                let parsed = Scheduled::from_slice(&rec, &self.settings.internal).map(|s| {
                    let route = self.router.next_place(s.due.as_millis(), now);
                    (s, route)
                });
                if let Ok((_, Route::Slice(id))) = &parsed {
                    if rec.offset >= p.reappend_below && self.router.slice_topic(*id) == rec.topic {
                        // Already in the right place for a later window: leave it, and the rest,
                        // for then.
                        p.done = true;
                        continue;
                    }
                }
                // The record's share before its ticket: a record counts as in flight only
                // once it holds its part of the memory budget.
                let permit = match &parsed {
                    Ok((s, Route::Timer)) => Some(self.router.budget.reserve_hold(weight(s)).await),
                    Ok((s, Route::Slice(_))) => Some(self.router.budget.reserve(weight(s)).await),
                    Err(_) => None,
                };
                let ticket = self.offsets.begin_in(
                    &rec.topic,
                    rec.partition,
                    rec.offset,
                    p.generation,
                );
                let Some(ticket) = ticket else {
                    // Revoked (perhaps assigned again meanwhile): not a failure. Its new owner, or
                    // the catch-up of the new assignment, sweeps it from the committed offset.
                    p.done = true;
                    continue;
                };
                if rec.offset >= p.began_at_end {
                    metrics::counter!(m::STRAGGLERS).increment(1);
                }
                p.next = rec.offset + 1;
                sweep.routed();
                match parsed {
                    Ok((s, route)) => {
                        self.router
                            .forward(s, route, ticket, Some(sweep.clone()), permit)
                            .await
                    }
                    Err(why) => {
                        tracing::error!(source = %rec.source(), detail = %why, "corrupt record in a slice; dead-lettering");
                        self.router
                            .dead_letter_original(&rec, &why, ticket, Some(sweep.clone()))
                            .await;
                    }
                }
                if p.next >= p.end {
                    self.caught_up(p).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = reader.unassign() {
            tracing::warn!(error = %e, "unassigning the sweep reader failed");
        }
        outcome
    }

    /// A partition read to where its sweep was to end: takes stragglers written since the sweep
    /// began (the end moves on), or stops.
    async fn caught_up(&self, p: &mut PartitionSweep) -> Result<(), String> {
        let tps = vec![p.tp.clone()];
        let tp = p.tp.clone();
        let end = p.end;
        let h = kafka::look(&self.lookup, move |l| l.ends(&tps, BROKER_TIMEOUT))
            .await
            .map(|ends| ends.get(&tp).copied().unwrap_or(end))?;
        if h > p.end {
            p.end = h;
        } else {
            p.done = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::deal;

    #[test]
    fn a_sweep_deals_its_partitions_among_its_readers() {
        assert_eq!(deal(vec![0, 1, 2, 3], 2), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(deal(vec![0, 1, 2], 2), vec![vec![0, 2], vec![1]]);
        // No reader is handed nothing: one partition, one reader.
        assert_eq!(deal(vec![7], 4), vec![vec![7]]);
        assert!(deal(Vec::<i32>::new(), 2).is_empty());
        assert_eq!(deal(vec![0, 1, 2, 3], 1), vec![vec![0, 1, 2, 3]]);
    }
}
