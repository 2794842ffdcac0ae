//! The engine: the data path from the ingest topic through the slices and the timer to the target,
//! and the wiring of its stages.
//!
//! - ingest ([`crate::ingest`]): the group's consumer reads the ingest topic (slice partitions
//!   stay assigned to it but paused: it owns and commits them, the sweep readers read them); each
//!   record goes to the timer (due within the hold horizon: one hop), a slice, or the DLQ.
//! - the planner (`run_planner`) queues a sweep job per window as its sweep time comes; workers
//!   ([`crate::sweep`]) run them with readers of their own.
//! - the timer ([`crate::timer`]) publishes what it holds, in due order, never before its time.
//! - the outbox ([`crate::outbox`]) sends, within the memory budget, and decides each failure's fate.
//! - the committer (`run_committer`) commits, per partition, up to the lowest record not yet
//!   acknowledged in its next place ([`OffsetTracker`]), and publishes the status snapshot.
//! - control (`run_control`) applies rebalance events (drop what a revoked partition handed over,
//!   catch up newly assigned slices).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{Origin, Scheduled};
use crate::jobs::{Board, JobKind, JobSpec};
use crate::kafka::{self, lock, EngineContext, RebalanceEvent, TopicSpec};
use crate::metrics as m;
use crate::offsets::{CommitPoint, OffsetTracker, Ticket, Tp};
use crate::outbox::{Budget, Send, Then};
use crate::slice::{Ladder, SliceId};
use crate::status::Status;
use crate::sweep::{Cursor, SliceWrites};
use crate::time::{format_millis, Clock};
use crate::timer::{self, Timed, TimerCmd, TimerView};
use crate::Error;

/// Timeout of the broker round trips a sweep makes (watermarks, committed offsets).
pub(crate) const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A record waiting in the timer, with the ticket that releases its source offset once
/// published and its share of the memory budget.
pub(crate) struct TimerEntry {
    pub(crate) scheduled: Scheduled,
    pub(crate) ticket: Ticket,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl Timed for TimerEntry {
    fn due_ms(&self) -> i64 {
        self.scheduled.due.as_millis()
    }

    fn origin(&self) -> Origin {
        self.scheduled.origin
    }
}

pub(crate) struct Shared {
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub board: Board,
    /// Deliveries and the DLQ.
    pub(crate) producer: FutureProducer,
    /// Slice writes: batched longer, and never in front of a due delivery.
    pub(crate) slice_producer: FutureProducer,
    pub(crate) consumer: Arc<StreamConsumer<EngineContext>>,
    lookup: Arc<kafka::Lookup>,
    pub(crate) tracker: Arc<Mutex<OffsetTracker>>,
    pub(crate) timer: mpsc::Sender<TimerCmd<TimerEntry>>,
    timer_view: watch::Receiver<TimerView>,
    pub(crate) slice_writes: Arc<SliceWrites>,
    pub(crate) budget: Budget,
    pub(crate) cursors: Mutex<HashMap<Tp, Arc<tokio::sync::Mutex<Cursor>>>>,
    /// slice topic -> (level, slot)
    slices: HashMap<String, (usize, i64)>,
    pub(crate) acks: TaskTracker,
    /// Stops everything: the timer, the committer, send retries.
    pub(crate) token: CancellationToken,
    /// Stops taking work in (the consumer loop, planner, workers, control); a child of `token`.
    /// A clean stop cancels it first, so the timer can drain before the last commit.
    pub(crate) intake: CancellationToken,
    fatal: Mutex<Option<String>>,
    /// Sweeps failing and being retried now (the process is `degraded` while any are).
    pub(crate) sweeps_behind: AtomicUsize,
    status: watch::Sender<Status>,
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
        let retention = settings.retention_ms();
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
        let slices: HashMap<String, (usize, i64)> = settings
            .ladder
            .all_topics(&settings.internal.slice_prefix)
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
            // Every slice partition stays paused in the group's consumer: sweeps read them with
            // readers of their own. (Level 0 is no longer written; an earlier version's records
            // there are read by the catch-up sweep on assignment.)
            slice_topics: slices.keys().cloned().collect(),
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
        let slice_producer: FutureProducer = kafka::slice_producer_config(
            &settings.config.bootstrap_servers,
            &settings.config.kafka_properties,
        )
        .create()?;
        let mut readers = Vec::with_capacity(settings.config.workers);
        for _ in 0..settings.config.workers {
            readers.push(crate::sweep::reader(&settings)?);
        }

        let token = CancellationToken::new();
        let (timer_tx, timer_rx) = mpsc::channel(4096);
        let (view_tx, view_rx) = watch::channel(TimerView::default());
        let budget = Budget::new(settings.config.memory_budget);
        let shared = Arc::new(Shared {
            settings,
            clock,
            board: Board::default(),
            producer,
            slice_producer,
            consumer: Arc::new(consumer),
            lookup: Arc::new(lookup),
            tracker,
            timer: timer_tx,
            timer_view: view_rx,
            slice_writes: Arc::default(),
            budget,
            cursors: Mutex::new(HashMap::new()),
            slices,
            acks: TaskTracker::new(),
            intake: token.child_token(),
            token,
            fatal: Mutex::new(None),
            sweeps_behind: AtomicUsize::new(0),
            status: watch::channel(Status::default()).0,
        });

        m::register_counters();
        let tasks = TaskTracker::new();
        let (jobs_tx, jobs_rx) = mpsc::channel::<u64>(1024);
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        tasks.spawn(shared.clone().consume());
        let (due_tx, due_rx) = mpsc::channel(1024);
        tasks.spawn(timer::run(
            shared.clock.clone(),
            timer_rx,
            due_tx,
            view_tx,
            shared.token.clone(),
        ));
        tasks.spawn(shared.clone().run_publisher(due_rx));
        tasks.spawn(shared.clone().run_committer());
        tasks.spawn(shared.clone().run_planner(jobs_tx.clone()));
        tasks.spawn(shared.clone().run_control(events_rx, jobs_tx));
        tasks.spawn(shared.clone().run_stats());
        for (n, reader) in readers.into_iter().enumerate() {
            let id = format!("{}-w{}", std::process::id(), n + 1);
            tasks.spawn(shared.clone().run_worker(id, jobs_rx.clone(), reader));
        }
        tasks.close();
        tracing::info!(
            levels = shared.settings.ladder.levels(),
            widths_ms = ?shared.settings.ladder.widths(),
            hold_ms = shared.settings.hold_ms,
            memory_budget = shared.settings.config.memory_budget,
            "scheduler started"
        );
        Ok(Engine { shared, tasks })
    }

    /// The status snapshot, for the HTTP API: a receiver it reads without any engine lock.
    pub(crate) fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Resolves when the engine stopped by itself (a fatal error).
    pub async fn failed(&self) -> String {
        self.shared.token.cancelled().await;
        lock(&self.shared.fatal)
            .clone()
            .unwrap_or_else(|| "stopped".into())
    }

    /// Stops reading, lets the timer publish what it holds (records due within the hold horizon,
    /// or within `w_1 + lead_1` from a sweep: 6 s with the defaults) and in-flight sends finish (up
    /// to 10 s), commits what is safe, and returns. A restart after a clean stop therefore
    /// re-delivers nothing; what could not finish stays uncommitted and is read again by the next
    /// owner.
    pub async fn stop(self) -> Result<(), Error> {
        let s = &self.shared;
        s.intake.cancel();
        s.publish_status();
        let ladder = s.ladder();
        let held = s.settings.hold_ms.max(ladder.width(1) + ladder.lead(1));
        let drain =
            Duration::from_millis((held + ladder.margin_ms()) as u64) + Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + drain;
        let mut view = s.timer_view.clone();
        while view.borrow_and_update().pending > 0
            && !s.token.is_cancelled()
            && tokio::time::Instant::now() < deadline
        {
            let _ = tokio::time::timeout_at(deadline, view.changed()).await;
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
        s.commit();
        let _ = s.producer.flush(Duration::from_secs(5));
        let _ = s.slice_producer.flush(Duration::from_secs(5));
        s.consumer.unsubscribe();
        match lock(&s.fatal).clone() {
            Some(reason) => Err(Error::Fatal(reason)),
            None => Ok(()),
        }
    }
}

impl Shared {
    pub(crate) fn ladder(&self) -> &Ladder {
        &self.settings.ladder
    }

    pub(crate) fn slice_topic(&self, id: SliceId) -> String {
        self.ladder().topic(
            &self.settings.internal.slice_prefix,
            id.level,
            self.ladder().slot(id),
        )
    }

    /// Stops the process: it takes no more work, `/healthz` answers `failed` with the reason,
    /// and `run` returns the error (the binary exits non-zero). What is unacknowledged stays
    /// uncommitted.
    pub(crate) fn fail(&self, reason: String) {
        tracing::error!(%reason, "fatal error, stopping");
        lock(&self.fatal).get_or_insert(reason);
        self.publish_status();
        self.token.cancel();
    }

    /// Hands each record the timer says is due to the outbox, in the timer's order, unless its
    /// partition was revoked meanwhile (its new owner reads it again).
    async fn run_publisher(self: Arc<Self>, mut due: mpsc::Receiver<TimerEntry>) {
        while let Some(entry) = due.recv().await {
            if !lock(&self.tracker).is_current(&entry.ticket) {
                continue;
            }
            let send = Send {
                out: entry.scheduled.to_target(),
                then: Then::Deliver {
                    due_ms: entry.scheduled.due.as_millis(),
                },
                scheduled: Some(entry.scheduled),
                ticket: entry.ticket,
                sweep: None,
                slice_write: None,
                _permit: entry.permit,
            };
            self.send(send).await;
        }
    }

    /// Runs a lookup (a broker round trip on the lookup client) off the async threads.
    pub(crate) async fn look<T: std::marker::Send + 'static>(
        &self,
        f: impl FnOnce(&kafka::Lookup) -> KafkaResult<T> + std::marker::Send + 'static,
    ) -> Result<T, String> {
        let lookup = self.lookup.clone();
        tokio::task::spawn_blocking(move || f(&lookup))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    // ---- commits, status and statistics ------------------------------------------------------

    async fn run_committer(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.token.cancelled() => break,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.commit()).await;
            self.publish_status();
        }
    }

    /// Commits every partition's safe point that moved, and marks them committed once the broker
    /// has acknowledged the commit; a failed commit is offered again on the next tick.
    fn commit(&self) {
        let points = lock(&self.tracker).commit_points();
        if points.is_empty() {
            return;
        }
        match commit_offsets(&*self.consumer, &points) {
            Ok(()) => lock(&self.tracker).committed(&points),
            Err(e) => tracing::warn!(error = %e, "commit failed; retrying"),
        }
    }

    /// Publishes the status snapshot (and the gauges that mirror it).
    fn publish_status(&self) {
        let (assigned, in_flight) = {
            let t = lock(&self.tracker);
            (t.owned_count(), t.in_flight())
        };
        let timer = *self.timer_view.borrow();
        let behind = self.sweeps_behind.load(Ordering::SeqCst);
        let fatal = lock(&self.fatal).clone();
        let (status, reason) = Status::health(fatal.as_deref(), self.intake.is_cancelled(), behind);
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
        });
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

    /// Queues one sweep job per window of levels 1 and up (level 0 is never written), each when
    /// its sweep time comes. After a start or a rebalance, catch-up jobs (from `run_control`)
    /// cover the windows already due.
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
                // Look again at least every 50 ms: the clock may be a test's manual clock.
                let nap = Duration::from_millis((wait as u64).min(50));
                tokio::select! {
                    _ = tokio::time::sleep(nap) => continue,
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
                    let keep = move |e: &TimerEntry| lock(&tracker).is_current(&e.ticket);
                    let _ = self.timer.send(TimerCmd::Retain(Box::new(keep))).await;
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

/// Commits the points synchronously: returns once the broker acknowledged (or refused) them.
pub(crate) fn commit_offsets<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    points: &[CommitPoint],
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in points {
        tpl.add_partition_offset(&p.tp.0, p.tp.1, Offset::Offset(p.offset))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)
}
