//! The engine: the data path from the ingest topic through the slices and the timer to the target.
//!
//! - `consume`: one consumer reads the ingest topic (always) and the slice partitions being swept
//!   (only during their sweep; otherwise they stay paused). Each record is parsed once, routed by
//!   [`Ladder::route`], and handed to its next place; bad records go to the DLQ.
//! - `run_timer`: one task publishes what the timer holds, in due order, never before its time.
//! - `run_planner`: creates a sweep job per window as its sweep time comes; `run_worker` tasks take
//!   jobs and run them (position the slot's partitions, resume, wait until every record up to the
//!   end has been placed, pause).
//! - `run_committer`: commits, per partition, up to the lowest record not yet acknowledged in its
//!   next place ([`OffsetTracker`]).
//! - `run_control`: applies rebalance events (drop what a revoked partition handed over, catch up
//!   newly assigned slices).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{dlq_original, Incoming, Outgoing, Rejection, Scheduled};
use crate::jobs::{Board, JobCounts, JobKind, JobSpec};
use crate::kafka::{self, lock, EngineContext, RebalanceEvent, SendFailure, TopicSpec};
use crate::metrics as m;
use crate::offsets::{OffsetTracker, Ticket, Tp};
use crate::slice::{Ladder, Route, SliceId};
use crate::time::Clock;
use crate::timer::TimerQueue;
use crate::Error;

/// How long a sweep may see no progress at all before it is abandoned (as ERROR) and retried at
/// the slot's next sweep.
const STALL: Duration = Duration::from_secs(30);
/// Timeout of the broker round trips a sweep makes (watermarks, committed offsets, seek).
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Records sent and not yet acknowledged, at most. Beyond it the consumer loop and the timer wait:
/// with a backlog to read and a slow broker, each would otherwise hold a copy of every record
/// read (the benchmark saw resident memory grow with the backlog). At the local broker's ack
/// latency this still allows far more than it can take.
const MAX_IN_FLIGHT: usize = 10_000;

/// A record waiting in the timer, with the ticket that releases its source offset once published.
struct TimerEntry {
    scheduled: Scheduled,
    ticket: Ticket,
}

/// What acknowledging a send means.
#[derive(Debug, Clone, Copy)]
enum Then {
    Slice { level: usize },
    Deliver { due_ms: i64 },
    DeadLetter { reason: &'static str },
}

/// A record on its way, with what to do once it is acknowledged.
struct Send {
    out: Outgoing,
    then: Then,
    /// The parsed record, to build a DLQ copy from if the destination refuses it for good.
    scheduled: Option<Scheduled>,
    ticket: Ticket,
    sweep: Option<Arc<ActiveSweep>>,
    /// Held while the record is on its way into a slice window (see [`SliceWrites`]).
    slice_write: Option<SliceWrite>,
}

/// Writes into slice windows that this process has sent and the broker has not yet
/// acknowledged. A window's sweep waits for them before it reads the high watermark: a write routed
/// just before the sweep time (the safety margin) can take longer than the margin to be
/// acknowledged on a loaded broker, and would then land behind the sweep and wait a whole turn of
/// the ring (r+1+f windows) to be found. Writes of other instances are covered by the margin alone.
#[derive(Default)]
struct SliceWrites {
    pending: Mutex<HashMap<SliceId, usize>>,
    changed: Notify,
}

impl SliceWrites {
    fn begin(self: &Arc<Self>, id: SliceId) -> SliceWrite {
        *lock(&self.pending).entry(id).or_default() += 1;
        SliceWrite {
            writes: self.clone(),
            id,
        }
    }

    /// Waits until no write into `id` is unacknowledged, or `timeout`; returns how many remain.
    async fn settled(&self, id: SliceId, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let left = lock(&self.pending).get(&id).copied().unwrap_or(0);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return left;
            }
        }
    }
}

/// One unacknowledged write into a slice window; dropping it (acknowledged, dead-lettered, or
/// abandoned at shutdown) ends it.
struct SliceWrite {
    writes: Arc<SliceWrites>,
    id: SliceId,
}

impl Drop for SliceWrite {
    fn drop(&mut self) {
        let mut pending = lock(&self.writes.pending);
        if let Some(n) = pending.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.id);
            }
        }
        drop(pending);
        self.writes.changed.notify_waiters();
    }
}

/// Progress of a sweep over one slice partition, shared by the worker that runs it and the
/// consumer loop that routes its records.
struct ActiveSweep {
    /// The high watermark when the sweep began; records at or after it arrived late.
    began_at_end: i64,
    /// Records below this offset that belong in this very slot (a later window, or beyond the top
    /// level's horizon) are written again at the end; from this offset on, such a record ends the
    /// sweep, so a sweep never reads its own re-writes.
    reappend_below: i64,
    progress: Mutex<SweepProgress>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct SweepProgress {
    processed_through: i64,
    stopped_at: Option<i64>,
    routed: u64,
    placed: u64,
    counts: JobCounts,
}

#[derive(Debug, Clone, Copy)]
enum Placed {
    Slice,
    Timer,
    DeadLetter,
}

impl ActiveSweep {
    fn new(began_at_end: i64, reappend_below: i64, next: i64) -> Self {
        ActiveSweep {
            began_at_end,
            reappend_below,
            progress: Mutex::new(SweepProgress {
                processed_through: next - 1,
                ..Default::default()
            }),
            wake: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut SweepProgress)) {
        f(&mut lock(&self.progress));
        self.wake.notify_waiters();
    }

    fn placed(&self, how: Placed) {
        self.update(|p| {
            p.placed += 1;
            match how {
                Placed::Slice => p.counts.to_slices += 1,
                Placed::Timer => p.counts.to_timer += 1,
                Placed::DeadLetter => p.counts.dead_lettered += 1,
            }
        });
    }

    /// Waits until `done` holds, giving up after [`STALL`] without any progress.
    async fn wait(&self, token: &CancellationToken, done: impl Fn(&SweepProgress) -> bool) -> Wait {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&lock(&self.progress)) {
                return Wait::Done;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(STALL) => return Wait::Stalled,
                _ = token.cancelled() => return Wait::Cancelled,
            }
        }
    }
}

enum Wait {
    Done,
    Stalled,
    Cancelled,
}

/// Where a slice partition's next sweep starts, under the assignment generation it was learnt in.
#[derive(Debug, Default)]
struct Cursor {
    generation: u64,
    next: Option<i64>,
}

/// A partition ready to be swept: its cursor held, from `next` up to `high`.
struct SweepStart {
    tp: Tp,
    generation: u64,
    cursor: tokio::sync::OwnedMutexGuard<Cursor>,
    next: i64,
    high: i64,
}

pub(crate) struct Shared {
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub board: Board,
    producer: FutureProducer,
    consumer: Arc<StreamConsumer<EngineContext>>,
    lookup: Arc<kafka::Lookup>,
    tracker: Arc<Mutex<OffsetTracker>>,
    timer: Mutex<TimerQueue<TimerEntry>>,
    timer_wake: Notify,
    sweeps: Mutex<HashMap<Tp, Arc<ActiveSweep>>>,
    slice_writes: Arc<SliceWrites>,
    /// Bounds the records sent and not yet acknowledged ([`MAX_IN_FLIGHT`]).
    in_flight: Arc<tokio::sync::Semaphore>,
    cursors: Mutex<HashMap<Tp, Arc<tokio::sync::Mutex<Cursor>>>>,
    /// slice topic -> (level, slot)
    slices: HashMap<String, (usize, i64)>,
    acks: TaskTracker,
    /// Stops everything: the timer, the committer, send retries.
    token: CancellationToken,
    /// Stops taking work in (the consumer loop, planner, workers, control); a child of `token`.
    /// A clean stop cancels it first, so the timer can drain before the last commit.
    intake: CancellationToken,
    fatal: Mutex<Option<String>>,
}

/// A started engine; [`Engine::stop`] shuts it down cleanly.
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl Engine {
    /// Creates the topics, connects, subscribes, and starts every task.
    pub async fn start(settings: Settings, clock: Arc<dyn Clock>) -> Result<Engine, Error> {
        let cfg = &settings.config;
        let ladder = &settings.ladder;
        let prefix = &settings.internal.slice_prefix;
        let retention = i64::try_from(cfg.slice_retention.as_millis()).unwrap_or(i64::MAX);
        let mut topics = vec![
            TopicSpec {
                name: settings.internal.ingest.clone(),
                partitions: cfg.ingest_partitions,
                configs: vec![("retention.ms", retention.to_string())],
            },
            TopicSpec {
                name: settings.internal.dlq.clone(),
                partitions: cfg.ingest_partitions,
                configs: vec![],
            },
        ];
        let slices: HashMap<String, (usize, i64)> = ladder
            .all_topics(prefix)
            .into_iter()
            .map(|(level, slot, name)| (name, (level, slot)))
            .collect();
        for name in slices.keys() {
            topics.push(TopicSpec {
                name: name.clone(),
                partitions: cfg.slice_partitions,
                configs: vec![("retention.ms", retention.to_string())],
            });
        }
        kafka::ensure_topics(&settings, &topics).await?;

        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let context = EngineContext {
            tracker: tracker.clone(),
            // Level 0 is streamed, never paused; the coarser levels are read only during sweeps.
            slice_topics: slices
                .iter()
                .filter(|(_, (level, _))| *level > 0)
                .map(|(name, _)| name.clone())
                .collect(),
            events: events_tx,
        };
        let consumer: StreamConsumer<EngineContext> =
            kafka::consumer_config(&settings).create_with_context(context)?;
        let mut subscription: Vec<&str> = vec![settings.internal.ingest.as_str()];
        subscription.extend(slices.keys().map(String::as_str));
        consumer.subscribe(&subscription)?;
        let lookup = kafka::Lookup::new(&settings)?;
        let producer: FutureProducer = kafka::producer_config(
            &settings.config.bootstrap_servers,
            &settings.config.kafka_properties,
        )
        .create()?;

        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            settings,
            clock,
            board: Board::default(),
            producer,
            consumer: Arc::new(consumer),
            lookup: Arc::new(lookup),
            tracker,
            timer: Mutex::new(TimerQueue::default()),
            timer_wake: Notify::new(),
            sweeps: Mutex::new(HashMap::new()),
            slice_writes: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            cursors: Mutex::new(HashMap::new()),
            slices,
            acks: TaskTracker::new(),
            intake: token.child_token(),
            token,
            fatal: Mutex::new(None),
        });

        m::register_counters();
        let tasks = TaskTracker::new();
        let (jobs_tx, jobs_rx) = mpsc::channel::<u64>(1024);
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        tasks.spawn(shared.clone().consume());
        tasks.spawn(shared.clone().run_timer());
        tasks.spawn(shared.clone().run_committer());
        tasks.spawn(shared.clone().run_planner(jobs_tx.clone()));
        tasks.spawn(shared.clone().run_control(events_rx, jobs_tx));
        tasks.spawn(shared.clone().run_stats());
        for n in 0..shared.settings.config.workers {
            let id = format!("{}-w{}", std::process::id(), n + 1);
            tasks.spawn(shared.clone().run_worker(id, jobs_rx.clone()));
        }
        tasks.close();
        tracing::info!(
            levels = shared.settings.ladder.levels(),
            widths_ms = ?shared.settings.ladder.widths(),
            "scheduler started"
        );
        Ok(Engine { shared, tasks })
    }

    /// Resolves when the engine stopped by itself (a fatal error).
    pub async fn failed(&self) -> String {
        self.shared.token.cancelled().await;
        lock(&self.shared.fatal)
            .clone()
            .unwrap_or_else(|| "stopped".into())
    }

    /// Stops reading, lets the timer publish what it holds (it only ever holds about
    /// `w_1 + lead_1` of due records: 6 s with the defaults) and in-flight sends finish (up to
    /// 10 s), commits what is safe, and returns. A restart after a clean stop therefore
    /// re-delivers nothing; what could not finish stays uncommitted and is read again by the next
    /// owner.
    pub async fn stop(self) -> Result<(), Error> {
        let s = &self.shared;
        s.intake.cancel();
        let ladder = s.ladder();
        let drain =
            Duration::from_millis((ladder.width(1) + ladder.lead(1) + ladder.margin_ms()) as u64)
                + Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + drain;
        while !lock(&s.timer).is_empty()
            && !s.token.is_cancelled()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.token.cancel();
        self.tasks.wait().await;
        s.acks.close();
        if tokio::time::timeout(Duration::from_secs(10), s.acks.wait())
            .await
            .is_err()
        {
            tracing::warn!("sends still unacknowledged after 10 s; they stay uncommitted");
        }
        s.commit(CommitMode::Sync);
        let _ = s.producer.flush(Duration::from_secs(5));
        s.consumer.unsubscribe();
        match lock(&s.fatal).clone() {
            Some(reason) => Err(Error::Fatal(reason)),
            None => Ok(()),
        }
    }
}

impl Shared {
    fn ladder(&self) -> &Ladder {
        &self.settings.ladder
    }

    fn slice_topic(&self, id: SliceId) -> String {
        self.ladder().topic(
            &self.settings.internal.slice_prefix,
            id.level,
            self.ladder().slot(id),
        )
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "fatal error, stopping");
        lock(&self.fatal).get_or_insert(reason);
        self.token.cancel();
    }

    // ---- the consumer loop -------------------------------------------------------------------

    async fn consume(self: Arc<Self>) {
        loop {
            let rec = tokio::select! {
                _ = self.intake.cancelled() => break,
                msg = self.consumer.recv() => match msg {
                    Ok(msg) => kafka::detach(&msg),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if rec.topic == self.settings.internal.ingest {
                self.ingest(rec).await;
            } else if let Some(&(level, _)) = self.slices.get(&rec.topic) {
                if level == 0 {
                    self.stream_record(rec).await;
                } else {
                    self.sweep_record(rec).await;
                }
            }
        }
    }

    /// A record from the ingest topic: accepted and routed, or dead-lettered with its reason.
    async fn ingest(self: &Arc<Self>, rec: Incoming) {
        let Some(ticket) = lock(&self.tracker).begin(&rec.topic, rec.partition, rec.offset) else {
            return;
        };
        let internal = &self.settings.internal;
        match Scheduled::from_ingest(&rec, self.settings.config.default_tz, internal) {
            Err(why) => {
                tracing::warn!(source = %rec.source(), reason = why.code(), detail = %why, "dead-lettering");
                self.dead_letter_original(&rec, &why, ticket, None).await;
            }
            Ok(s) => {
                metrics::counter!(m::SCHEDULED).increment(1);
                let now = self.clock.now_ms();
                if s.due.as_millis() <= now {
                    metrics::counter!(m::PAST_DUE).increment(1);
                }
                let route = self.ladder().route(s.due.as_millis(), now);
                self.forward(s, route, ticket, None).await;
            }
        }
    }

    /// A record from a level-0 slice. Level 0 is streamed: its partitions are never paused, and
    /// each record goes into the timer as soon as it is read. Records only land in level 0 once
    /// the level-1 window containing them is being swept, so the timer holds at most about
    /// `w_0 + w_1` of due records; one due later than that (written by an instance with a skewed
    /// clock) is routed to the slice it belongs in instead of being held.
    async fn stream_record(self: &Arc<Self>, rec: Incoming) {
        let Some(ticket) = lock(&self.tracker).begin(&rec.topic, rec.partition, rec.offset) else {
            return;
        };
        match Scheduled::from_slice(&rec, &self.settings.internal) {
            Ok(s) => {
                let route = self.route_from_slice(s.due.as_millis(), self.clock.now_ms());
                self.forward(s, route, ticket, None).await;
            }
            Err(why) => {
                tracing::error!(source = %rec.source(), detail = %why, "corrupt record in a slice; dead-lettering");
                self.dead_letter_original(&rec, &why, ticket, None).await;
            }
        }
    }

    /// Where a record read from a slice goes next. Never into level 0: a record the ladder
    /// would put there is due within a level-1 window whose sweep has begun, and level 0 is
    /// streamed straight into the timer, so writing it there would only cost one more produce and
    /// fetch (the benchmark showed level-1 sweeps outlasting their lead for it). It goes into the
    /// timer at once instead; the timer holds the same records either way, and the slice
    /// partition's commit waits for their delivery just as level 0's would.
    fn route_from_slice(&self, due_ms: i64, now_ms: i64) -> Route {
        match self.ladder().route(due_ms, now_ms) {
            Route::Slice(id) if id.level > 0 => Route::Slice(id),
            _ => Route::Timer,
        }
    }

    /// A record from a slice partition under sweep.
    async fn sweep_record(self: &Arc<Self>, rec: Incoming) {
        let key = (rec.topic.clone(), rec.partition);
        let Some(sweep) = lock(&self.sweeps).get(&key).cloned() else {
            // Fetched before the partition was paused; the next sweep seeks back to it.
            return;
        };
        {
            let p = lock(&sweep.progress);
            // Stopped, or a record this sweep already routed (fetched again after a seek).
            if p.stopped_at.is_some() || rec.offset <= p.processed_through {
                return;
            }
        }
        let now = self.clock.now_ms();
        let parsed = Scheduled::from_slice(&rec, &self.settings.internal).map(|s| {
            let route = self.route_from_slice(s.due.as_millis(), now);
            (s, route)
        });
        if let Ok((_, Route::Slice(id))) = &parsed {
            if rec.offset >= sweep.reappend_below && self.slice_topic(*id) == rec.topic {
                // Already in the right place for a later window: leave it, and the rest, for then.
                sweep.update(|p| p.stopped_at = Some(rec.offset));
                return;
            }
        }
        let Some(ticket) = lock(&self.tracker).begin(&rec.topic, rec.partition, rec.offset) else {
            return;
        };
        if rec.offset >= sweep.began_at_end {
            metrics::counter!(m::STRAGGLERS).increment(1);
        }
        sweep.update(|p| {
            p.processed_through = rec.offset;
            p.routed += 1;
            p.counts.records += 1;
        });
        match parsed {
            Ok((s, route)) => self.forward(s, route, ticket, Some(sweep)).await,
            Err(why) => {
                tracing::error!(source = %rec.source(), detail = %why, "corrupt record in a slice; dead-lettering");
                self.dead_letter_original(&rec, &why, ticket, Some(sweep))
                    .await;
            }
        }
    }

    /// Sends the record as it was read to the DLQ with the reason.
    async fn dead_letter_original(
        self: &Arc<Self>,
        rec: &Incoming,
        why: &Rejection,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
    ) {
        let out = dlq_original(rec, &self.settings.internal.dlq, why);
        let then = Then::DeadLetter { reason: why.code() };
        self.send(Send {
            out,
            then,
            scheduled: None,
            ticket,
            sweep,
            slice_write: None,
        })
        .await;
    }

    /// Hands an accepted record to its next place.
    async fn forward(
        self: &Arc<Self>,
        s: Scheduled,
        route: Route,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
    ) {
        match route {
            Route::Timer => {
                let (due, origin) = (s.due.as_millis(), s.origin);
                let headroom = due - self.clock.now_ms();
                metrics::histogram!(m::TIMER_HEADROOM).record(headroom.max(0) as f64 / 1000.0);
                if headroom < 0 && s.hops > 0 {
                    metrics::counter!(m::TIMER_LATE).increment(1);
                }
                lock(&self.timer).insert(
                    due,
                    origin,
                    TimerEntry {
                        scheduled: s,
                        ticket,
                    },
                );
                self.timer_wake.notify_one();
                if let Some(sweep) = sweep {
                    sweep.placed(Placed::Timer);
                }
            }
            Route::Slice(id) => {
                let out = s.to_slice(self.slice_topic(id), id);
                let then = Then::Slice { level: id.level };
                self.send(Send {
                    out,
                    then,
                    scheduled: Some(s),
                    ticket,
                    sweep,
                    slice_write: Some(self.slice_writes.begin(id)),
                })
                .await;
            }
        }
    }

    // ---- sending -----------------------------------------------------------------------------

    /// Enqueues the record now (so records leave in the order they are handed over) and awaits
    /// the broker's acknowledgement in a task of its own, so sends never wait on each other.
    async fn send(self: &Arc<Self>, send: Send) {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return; // never closed
        };
        let queued = self.enqueue(&send.out).await;
        let me = self.clone();
        self.acks.spawn(async move {
            me.complete(send, queued).await;
            drop(permit);
        });
    }

    async fn enqueue(&self, out: &Outgoing) -> Result<DeliveryFuture, KafkaError> {
        loop {
            match self.producer.send_result(kafka::record(out)) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Awaits the acknowledgement; retries transient failures with backoff (never dropping the
    /// record), and dead-letters a record its destination refuses for good.
    async fn complete(
        self: Arc<Self>,
        mut send: Send,
        mut queued: Result<DeliveryFuture, KafkaError>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = match queued {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    // The producer is gone (shutdown): the record stays uncommitted.
                    Err(_) => return,
                },
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(()) => return self.acknowledged(send),
                Err(e) => e,
            };
            if matches!(err, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)) {
                return self.fail(format!("producer fatal error: {err}"));
            }
            match kafka::classify(&err, &send.out.topic) {
                SendFailure::Permanent(why) if !matches!(send.then, Then::DeadLetter { .. }) => {
                    tracing::warn!(topic = %send.out.topic, reason = why.code(), detail = %why, "dead-lettering");
                    let dlq = &self.settings.internal.dlq;
                    send.out = match &send.scheduled {
                        Some(s) => s.to_dlq(dlq, &why),
                        None => send.out,
                    };
                    send.then = Then::DeadLetter { reason: why.code() };
                    send.slice_write = None;
                }
                failure => {
                    // Transient, or the DLQ itself refused: keep the record and retry loudly.
                    tracing::warn!(topic = %send.out.topic, ?failure, retry_in = ?backoff, "send failed");
                    metrics::counter!(m::SEND_RETRIES).increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.token.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            queued = self.enqueue(&send.out).await;
        }
    }

    fn acknowledged(&self, send: Send) {
        let placed = match send.then {
            Then::Slice { level } => {
                metrics::counter!(m::SLICE_WRITES, "level" => level.to_string()).increment(1);
                Placed::Slice
            }
            Then::Deliver { due_ms } => {
                let late = (self.clock.now_ms() - due_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(m::LATENESS, "path" => "kafka").record(late);
                metrics::counter!(m::DELIVERED, "path" => "kafka").increment(1);
                Placed::Timer
            }
            Then::DeadLetter { reason } => {
                metrics::counter!(m::DEAD_LETTERED, "reason" => reason).increment(1);
                Placed::DeadLetter
            }
        };
        lock(&self.tracker).finish(&send.ticket);
        if let Some(sweep) = send.sweep {
            sweep.placed(placed);
        }
    }

    // ---- the timer ---------------------------------------------------------------------------

    /// Publishes due records in due order. It sleeps until the earliest due time (or until a new
    /// record arrives), takes everything due by the clock, and releases the lock before sending.
    async fn run_timer(self: Arc<Self>) {
        loop {
            let now = self.clock.now_ms();
            let (due, next) = {
                let mut timer = lock(&self.timer);
                (timer.pop_due(now), timer.next_due())
            };
            if !due.is_empty() {
                for entry in due {
                    if !lock(&self.tracker).is_current(&entry.ticket) {
                        continue; // revoked: its new owner reads it again
                    }
                    let out = entry.scheduled.to_target();
                    let then = Then::Deliver {
                        due_ms: entry.scheduled.due.as_millis(),
                    };
                    let send = Send {
                        out,
                        then,
                        scheduled: Some(entry.scheduled),
                        ticket: entry.ticket,
                        sweep: None,
                        slice_write: None,
                    };
                    self.send(send).await;
                }
                continue;
            }
            let wait = next.map_or(Duration::from_secs(1), |d| {
                Duration::from_millis(u64::try_from(d - now).unwrap_or(0))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.timer_wake.notified() => {}
                _ = self.token.cancelled() => break,
            }
        }
    }

    // ---- commits and statistics --------------------------------------------------------------

    async fn run_committer(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.token.cancelled() => break,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.commit(CommitMode::Sync)).await;
            let (pending, next) = {
                let timer = lock(&self.timer);
                (timer.len(), timer.next_due())
            };
            metrics::gauge!(m::TIMER_PENDING).set(pending as f64);
            metrics::gauge!(m::NEXT_DUE).set(next.map_or(0.0, |d| d as f64 / 1000.0));
            metrics::gauge!(m::IN_FLIGHT).set(lock(&self.tracker).in_flight() as f64);
        }
    }

    /// Commits every partition's safe point that moved. A failed commit is retried on the next
    /// tick (its points are handed back to the tracker as uncommitted).
    fn commit(&self, mode: CommitMode) {
        let points = lock(&self.tracker).take_commit_points();
        if points.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &points {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "commit failed; retrying");
            lock(&self.tracker).uncommit(points.iter().map(|(tp, _)| tp));
        }
    }

    /// Pending records per level in the slices this process owns (high watermark minus the
    /// committed offset), every 30 s: one round trip per partition, so not more often.
    async fn run_stats(self: Arc<Self>) {
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

    /// What `GET /healthz` reports.
    pub fn health(&self) -> serde_json::Value {
        let tracker = lock(&self.tracker);
        let timer = lock(&self.timer);
        serde_json::json!({
            "status": if self.token.is_cancelled() { "stopping" } else { "ok" },
            // 0 until the group has assigned partitions: the process is up but does no work yet.
            "assigned_partitions": tracker.owned().len(),
            "in_flight": tracker.in_flight(),
            "timer_pending": timer.len(),
            "next_due": timer.next_due().map(crate::time::format_millis),
        })
    }

    // ---- jobs --------------------------------------------------------------------------------

    fn sweep_job(&self, level: usize, window: i64) -> u64 {
        let id = SliceId { level, window };
        let spec = JobSpec {
            kind: JobKind::Sweep,
            level,
            window: Some(window),
            slot_topic: self.slice_topic(id),
            bounds: Some(self.ladder().bounds(id)),
            sweep_at: Some(self.ladder().sweep_at(id)),
        };
        self.board.create(spec, self.clock.now_ms())
    }

    /// Queues one sweep job per window of levels 1 and up (level 0 is streamed), each when its
    /// sweep time comes. After a start or a rebalance, catch-up jobs (from `run_control`) cover
    /// the windows already due.
    async fn run_planner(self: Arc<Self>, jobs: mpsc::Sender<u64>) {
        let now = self.clock.now_ms();
        // Per swept level: the next window, and its READY job.
        let mut upcoming: Vec<(SliceId, u64)> = (1..self.ladder().levels())
            .map(|level| {
                let window = self.ladder().current_window(level, now) + 1;
                (SliceId { level, window }, self.sweep_job(level, window))
            })
            .collect();
        loop {
            let Some(slot) =
                (0..upcoming.len()).min_by_key(|&i| self.ladder().sweep_at(upcoming[i].0))
            else {
                return;
            };
            let (id, job) = upcoming[slot];
            let wait = self.ladder().sweep_at(id) - self.clock.now_ms();
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => continue,
                    _ = self.intake.cancelled() => return,
                }
            }
            if jobs.send(job).await.is_err() {
                return;
            }
            let following = SliceId {
                level: id.level,
                window: id.window + 1,
            };
            upcoming[slot] = (following, self.sweep_job(following.level, following.window));
        }
    }

    async fn run_worker(
        self: Arc<Self>,
        id: String,
        jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<u64>>>,
    ) {
        self.board.join(&id, self.clock.now_ms());
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            let job = tokio::select! {
                _ = self.intake.cancelled() => break,
                _ = beat.tick() => {
                    self.board.heartbeat(&id, self.clock.now_ms());
                    continue;
                }
                job = async { jobs.lock().await.recv().await } => job,
            };
            let Some(job_id) = job else { break };
            self.run_job(job_id, &id).await;
        }
        self.board.leave(&id);
    }

    fn owned_partitions(&self, topic: &str) -> Vec<i32> {
        lock(&self.tracker).partitions_of(topic)
    }

    async fn run_job(self: &Arc<Self>, job_id: u64, worker: &str) {
        let Some(job) = self.board.get(job_id) else {
            return;
        };
        let partitions = self.owned_partitions(&job.slot_topic);
        if partitions.is_empty() {
            self.board.discard(job_id);
            return;
        }
        let started = self.clock.now_ms();
        self.board
            .start(job_id, worker, partitions.clone(), started);
        metrics::gauge!(m::WORKERS_BUSY).increment(1.0);
        let top = job.level + 1 == self.ladder().levels();
        // Scheduled sweeps, and catch-ups of the top level (which also holds what lies beyond its
        // horizon, mixed with due windows), rewrite in-place records; other catch-ups stop at them.
        let reappend = job.kind == JobKind::Sweep || top;
        if let Some(window) = job.window {
            let id = SliceId {
                level: job.level,
                window,
            };
            let left = self.slice_writes.settled(id, BROKER_TIMEOUT).await;
            if left > 0 {
                tracing::warn!(job = %job.name, left, "writes into this window still unacknowledged; sweeping without them");
            }
        }
        let results = match self.sweep_starts(&job.slot_topic, &partitions).await {
            Ok(starts) => {
                join_all(
                    starts
                        .into_iter()
                        .map(|start| self.sweep_partition(start, reappend)),
                )
                .await
            }
            Err(e) => partitions.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut counts = JobCounts::default();
        let mut errors = Vec::new();
        for (p, r) in partitions.iter().zip(results) {
            match r {
                Ok(c) => counts.add(&c),
                Err(e) => errors.push(format!("partition {p}: {e}")),
            }
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        let status = if error.is_some() { "error" } else { "done" };
        if let Some(e) = &error {
            tracing::warn!(job = %job.name, error = %e, "sweep failed");
        }
        let now = self.clock.now_ms();
        self.board.finish(job_id, counts, error, now);
        metrics::gauge!(m::WORKERS_BUSY).decrement(1.0);
        metrics::counter!(m::JOBS, "status" => status).increment(1);
        metrics::histogram!(m::JOB_DURATION, "level" => job.level.to_string())
            .record((now - started) as f64 / 1000.0);
    }

    /// Runs a blocking consumer call (a broker round trip) off the async threads.
    async fn blocking<T: std::marker::Send + 'static>(
        &self,
        f: impl FnOnce(&StreamConsumer<EngineContext>) -> KafkaResult<T> + std::marker::Send + 'static,
    ) -> Result<T, String> {
        off_thread(&self.consumer, f).await
    }

    /// Runs a lookup (a broker round trip on the lookup client) off the async threads.
    async fn look<T: std::marker::Send + 'static>(
        &self,
        f: impl FnOnce(&kafka::Lookup) -> KafkaResult<T> + std::marker::Send + 'static,
    ) -> Result<T, String> {
        off_thread(&self.lookup, f).await
    }

    /// Where each partition's sweep starts and ends. Takes each partition's cursor first (so two
    /// jobs never sweep one partition at once; always in partition order, so they cannot
    /// deadlock), then asks for every partition's watermarks, and the committed offsets of those
    /// without a cursor, in a few requests for the whole job.
    async fn sweep_starts(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<SweepStart>, String> {
        let mut held = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let tp: Tp = (topic.to_string(), partition);
            let cursor = lock(&self.cursors).entry(tp.clone()).or_default().clone();
            let mut cursor = cursor.lock_owned().await;
            let Some(generation) = lock(&self.tracker).generation(topic, partition) else {
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
        let unknown: Vec<Tp> = held
            .iter()
            .filter(|(_, _, c)| c.next.is_none())
            .map(|(tp, ..)| tp.clone())
            .collect();
        let (marks, committed) = self
            .look(move |l| {
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
                let next = cursor
                    .next
                    .or(committed.get(&tp).copied())
                    .unwrap_or(low)
                    .max(low);
                Ok(SweepStart {
                    tp,
                    generation,
                    cursor,
                    next,
                    high,
                })
            })
            .collect()
    }

    /// Sweeps one slice partition: from where the last sweep stopped up to the high watermark
    /// (and any stragglers that arrive meanwhile), routing each record on; returns once every
    /// record read has been placed (acknowledged in a finer slice or the DLQ, or in the timer).
    async fn sweep_partition(
        self: &Arc<Self>,
        start: SweepStart,
        reappend: bool,
    ) -> Result<JobCounts, String> {
        let SweepStart {
            tp,
            generation,
            mut cursor,
            next,
            high,
        } = start;
        let (topic, partition) = (tp.0.as_str(), tp.1);
        let began = std::time::Instant::now();
        if next >= high {
            cursor.next = Some(next);
            return Ok(JobCounts::default());
        }
        let sweep = Arc::new(ActiveSweep::new(
            high,
            if reappend { high } else { next },
            next,
        ));
        lock(&self.sweeps).insert(tp.clone(), sweep.clone());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let t = topic.to_string();
        let positioned = self
            .blocking(move |c| c.seek(&t, partition, Offset::Offset(next), BROKER_TIMEOUT))
            .await
            .and_then(|()| self.consumer.resume(&tpl).map_err(|e| e.to_string()));

        let resumed_at = began.elapsed();
        let mut caught_up_at = None;
        let mut end = high;
        let mut outcome = positioned;
        while outcome.is_ok() {
            let still_ours =
                || lock(&self.tracker).generation(topic, partition) == Some(generation);
            let wait = sweep
                .wait(&self.intake, |p| {
                    p.stopped_at.is_some() || p.processed_through >= end - 1 || !still_ours()
                })
                .await;
            match wait {
                Wait::Done if !still_ours() => outcome = Err("partition revoked".into()),
                Wait::Done if lock(&sweep.progress).stopped_at.is_some() => break,
                Wait::Done => {
                    caught_up_at.get_or_insert(began.elapsed());
                    // Caught up: take stragglers written since the sweep began, then stop.
                    let tps = vec![tp.clone()];
                    match self
                        .look(move |l| l.ends(&tps, BROKER_TIMEOUT))
                        .await
                        .map(|ends| ends.get(&tp).copied().unwrap_or(end))
                    {
                        Ok(h) if h > end => end = h,
                        Ok(_) => break,
                        Err(e) => outcome = Err(e),
                    }
                }
                Wait::Stalled => outcome = Err(format!("no progress for {STALL:?}")),
                Wait::Cancelled => outcome = Err("shutting down".into()),
            }
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, topic, partition, "pause failed");
        }
        lock(&self.sweeps).remove(&tp);
        let resume_at = {
            let p = lock(&sweep.progress);
            p.stopped_at.unwrap_or(p.processed_through + 1)
        };
        cursor.next = Some(resume_at);
        drop(cursor);

        let paused_at = began.elapsed();
        if outcome.is_ok() {
            match sweep.wait(&self.intake, |p| p.placed >= p.routed).await {
                Wait::Done => {}
                Wait::Stalled => outcome = Err("records not acknowledged in time".into()),
                Wait::Cancelled => outcome = Err("shutting down".into()),
            }
        }
        let counts = lock(&sweep.progress).counts;
        tracing::debug!(
            topic,
            partition,
            records = counts.records,
            resumed_ms = resumed_at.as_millis() as u64,
            caught_up_ms = caught_up_at.map_or(0, |d| d.as_millis() as u64),
            paused_ms = paused_at.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "sweep"
        );
        outcome.map(|()| counts)
    }

    // ---- rebalances --------------------------------------------------------------------------

    async fn run_control(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<RebalanceEvent>,
        jobs: mpsc::Sender<u64>,
    ) {
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = self.intake.cancelled() => None,
            };
            match event {
                None => return,
                Some(RebalanceEvent::Revoked(tps)) => {
                    tracing::info!(partitions = tps.len(), "partitions revoked");
                    // Drop what revoked partitions handed to the timer; their new owner re-reads
                    // it from the committed offset. Current tickets (a re-assignment) stay.
                    let tracker = self.tracker.clone();
                    lock(&self.timer).retain(|e| lock(&tracker).is_current(&e.ticket));
                    for sweep in lock(&self.sweeps).values() {
                        sweep.wake.notify_waiters();
                    }
                }
                Some(RebalanceEvent::Assigned(tps)) => {
                    tracing::info!(partitions = tps.len(), "partitions assigned");
                    let topics: BTreeSet<&String> = tps
                        .iter()
                        .map(|(t, _)| t)
                        .filter(|t| self.slices.contains_key(*t))
                        .collect();
                    for topic in topics {
                        let Some(&(level, _)) = self.slices.get(topic).filter(|(l, _)| *l > 0)
                        else {
                            continue; // level 0 is streamed: nothing to catch up
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

/// Runs a blocking call on a shared client in tokio's blocking pool, so a broker round trip never
/// holds an async worker thread.
async fn off_thread<C, T>(
    client: &Arc<C>,
    f: impl FnOnce(&C) -> KafkaResult<T> + std::marker::Send + 'static,
) -> Result<T, String>
where
    C: std::marker::Send + Sync + 'static,
    T: std::marker::Send + 'static,
{
    let client = client.clone();
    tokio::task::spawn_blocking(move || f(&client))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
