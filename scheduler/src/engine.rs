//! The engine: the data path from the ingest topic through the slices and the timer to the target,
//! and the wiring of its stages.
//!
//! - ingest ([`crate::ingest`]): the group's consumer reads the ingest topic (slice partitions
//!   stay assigned to it but paused: it owns and commits them, the sweep readers read them); each
//!   record goes to the timer (due within the hold horizon: one hop), a slice, or the DLQ.
//! - the planner ([`crate::planner`]) queues a sweep job per window as its sweep time comes; workers
//!   ([`crate::sweep`]) run them with readers of their own.
//! - the timer ([`crate::timer`]) publishes what it holds, in due order, never before its time.
//! - the outbox ([`crate::outbox`]) sends, within the memory budget, and decides each failure's fate.
//! - the committer ([`crate::committer`]) commits, per partition, up to the lowest record not yet
//!   acknowledged in its next place ([`OffsetTracker`]), and publishes the status snapshot.
//! - the state reader ([`crate::state`]) keeps this process's index of ids fresh from the state
//!   topic; the publisher asks it, just before a record with an id is sent, whether a newer
//!   version (a cancel, a reschedule) is known, and holds the record while the index is not
//!   fresh enough to say.
//! - control ([`crate::planner`]) applies rebalance events (drop what a revoked partition handed over,
//!   catch up newly assigned slices).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{Origin, Scheduled};
use crate::jobs::Board;
use crate::kafka::{self, lock, EngineContext, Fatal, TopicSpec};
use crate::lanes::Lanes;
use crate::metrics as m;
use crate::offsets::{OffsetTracker, Ticket, Tp};
use crate::outbox::{Budget, InFlight, Send, Then, Tracked};
use crate::slice::{Ladder, SliceId};
use crate::state::State;
use crate::status::Status;
use crate::sweep::{Cursor, SliceWrites};
use crate::targets::TargetHealth;
use crate::time::Clock;
use crate::timer::{self, Timed, TimerCmd, TimerView};
use crate::Error;

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
    pub(crate) lookup: Arc<kafka::Lookup>,
    pub(crate) tracker: Arc<Mutex<OffsetTracker>>,
    pub(crate) timer: mpsc::Sender<TimerCmd<TimerEntry>>,
    pub(crate) timer_view: watch::Receiver<TimerView>,
    pub(crate) slice_writes: Arc<SliceWrites>,
    pub(crate) budget: Budget,
    pub(crate) cursors: Mutex<HashMap<Tp, Arc<tokio::sync::Mutex<Cursor>>>>,
    /// slice topic -> (level, slot)
    pub(crate) slices: HashMap<String, (usize, i64)>,
    /// The tasks settling failed sends, and the retry lanes: rare, and each may wait.
    pub(crate) acks: TaskTracker,
    /// Sends the producer took, to the acknowledgement collector ([`Shared::collect`]).
    pub(crate) in_flight: mpsc::UnboundedSender<InFlight>,
    /// Stops everything: the timer, the committer, send retries.
    pub(crate) token: CancellationToken,
    /// Stops taking work in (the consumer loop, planner, workers, control); a child of `token`.
    /// A clean stop cancels it first, so the timer can drain before the last commit.
    pub(crate) intake: CancellationToken,
    pub(crate) fatal: Mutex<Option<Fatal>>,
    /// Sends waiting for a retry, per topic, in their first order (see [`crate::lanes`]).
    pub(crate) lanes: Mutex<Lanes<Tracked>>,
    /// Since when commits have been refused, and the last error (`None` while they succeed).
    pub(crate) commits_failing: Mutex<Option<(std::time::Instant, String)>>,
    /// When each slice topic found missing was last created again (see `outbox::failed`).
    pub(crate) slices_recreated: Mutex<HashMap<String, std::time::Instant>>,
    /// Records with ids the publish gate holds (how many, since when the oldest): a gate that
    /// holds them for long says the index of ids is not read (see `committer::publish_status`).
    pub(crate) gate_held: Mutex<Option<(usize, std::time::Instant)>>,
    /// Records the timer released that the publisher has not published yet.
    pub(crate) publisher_backlog: AtomicUsize,
    /// Which targets are failing (see [`crate::targets`]).
    pub(crate) targets: Mutex<TargetHealth>,
    /// The order in which sends were handed over, for the lanes.
    pub(crate) send_seq: AtomicU64,
    /// Sweep attempts to fail on purpose (test builds only), to drive the retry path without
    /// a broker fault.
    #[cfg(feature = "testkit")]
    pub(crate) injected_sweep_failures: AtomicUsize,
    /// Target topics whose deliveries fail on purpose, after the given time (test builds only),
    /// as a target whose partition leader is away would.
    #[cfg(feature = "testkit")]
    pub(crate) injected_refusals: Mutex<HashMap<String, Duration>>,
    /// Sweeps failing and being retried now (the process is `degraded` while any are).
    pub(crate) sweeps_behind: AtomicUsize,
    pub(crate) status: watch::Sender<Status>,
    /// The index of ids and how fresh it is.
    pub(crate) state: State,
    pub(crate) per_record: m::PerRecord,
}

/// A started engine; [`Engine::stop`] shuts it down cleanly.
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
    tasks: TaskTracker,
    /// The acknowledgement collector: it outlives the other tasks, to settle what they sent.
    collector: tokio::task::JoinHandle<()>,
    /// The state reader's thread: it ends soon after the engine's token is cancelled.
    state_thread: std::thread::JoinHandle<()>,
}

impl Engine {
    /// Creates the topics, connects, subscribes, and starts every task; the index of ids lives
    /// in `state_dir`.
    pub async fn start(
        settings: Settings,
        clock: Arc<dyn Clock>,
        state_dir: &std::path::Path,
    ) -> Result<Engine, Error> {
        let cfg = &settings.config;
        let retention = settings.retention_ms();
        let mut topics = vec![
            TopicSpec {
                name: settings.internal.ingest.clone(),
                partitions: cfg.ingest_partitions,
                configs: vec![("retention.ms".into(), retention.to_string())],
            },
            TopicSpec {
                name: settings.internal.dlq.clone(),
                partitions: cfg.ingest_partitions,
                configs: vec![],
            },
            // Facts of ids: compacted (each key is one version of one id, written once, or
            // twice: pending, then delivered), so it holds what is live however long it runs.
            // Every process reads every partition: a few are enough.
            TopicSpec {
                name: settings.internal.state.clone(),
                partitions: cfg.slice_partitions,
                configs: vec![("cleanup.policy".into(), "compact".to_string())],
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
                configs: vec![("retention.ms".into(), retention.to_string())],
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
        // Each worker's own readers.
        let worker_readers = (0..settings.config.workers)
            .map(|_| crate::sweep::readers(&settings))
            .collect::<Result<Vec<_>, _>>()?;

        let (state, state_reader) = crate::state::open(&settings, state_dir)?;

        let token = CancellationToken::new();
        let (timer_tx, timer_rx) = mpsc::channel(4096);
        let (view_tx, view_rx) = watch::channel(TimerView::default());
        let budget = Budget::new(settings.config.memory_budget);
        let levels = settings.ladder.levels();
        let give_up = settings.config.target_give_up;
        let (in_flight, in_flight_rx) = mpsc::unbounded_channel();
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
            in_flight,
            intake: token.child_token(),
            token,
            fatal: Mutex::new(None),
            lanes: Mutex::default(),
            targets: Mutex::new(TargetHealth::new(give_up)),
            commits_failing: Mutex::new(None),
            publisher_backlog: AtomicUsize::new(0),
            gate_held: Mutex::new(None),
            slices_recreated: Mutex::default(),
            send_seq: AtomicU64::new(0),
            #[cfg(feature = "testkit")]
            injected_sweep_failures: AtomicUsize::new(0),
            #[cfg(feature = "testkit")]
            injected_refusals: Mutex::default(),
            sweeps_behind: AtomicUsize::new(0),
            status: watch::channel(Status::default()).0,
            state,
            per_record: m::PerRecord::new(levels),
        });

        m::register_counters();
        let tasks = TaskTracker::new();
        // Every stage ends where it waits once its token is cancelled (budget, a full queue, a
        // broker round trip): no stage can hold a stop up by waiting for what never comes.
        let (intake, token) = (shared.intake.clone(), shared.token.clone());
        let until = |stop: &CancellationToken, work| spawn_until(&tasks, stop.clone(), work);
        let (jobs_tx, jobs_rx) = mpsc::channel::<u64>(1024);
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        let collector = tokio::spawn(shared.clone().collect(in_flight_rx));
        until(&intake, Box::pin(shared.clone().consume()));
        let (due_tx, due_rx) = mpsc::channel(1024);
        // The timer ends with the token; the publisher when the timer is gone and it has
        // published what the timer released before (a clean stop's drain counts on it).
        tasks.spawn(timer::run(
            shared.clock.clone(),
            timer_rx,
            due_tx,
            view_tx,
            shared.token.clone(),
        ));
        tasks.spawn(shared.clone().run_publisher(due_rx));
        until(&token, Box::pin(shared.clone().run_committer()));
        until(
            &intake,
            Box::pin(shared.clone().run_planner(jobs_tx.clone())),
        );
        until(
            &intake,
            Box::pin(shared.clone().run_control(events_rx, jobs_tx)),
        );
        until(&intake, Box::pin(shared.clone().run_stats()));
        until(&intake, Box::pin(shared.clone().run_janitor()));
        let state_thread = state_reader.spawn(&shared)?;
        for (n, readers) in worker_readers.into_iter().enumerate() {
            let id = format!("{}-w{}", std::process::id(), n + 1);
            until(
                &intake,
                Box::pin(shared.clone().run_worker(id, jobs_rx.clone(), readers)),
            );
        }
        tasks.close();
        tracing::info!(
            levels = shared.settings.ladder.levels(),
            widths_ms = ?shared.settings.ladder.widths(),
            hold_ms = shared.settings.hold_ms,
            memory_budget = shared.settings.config.memory_budget,
            "scheduler started"
        );
        Ok(Engine {
            shared,
            tasks,
            collector,
            state_thread,
        })
    }

    /// The status snapshot, for the HTTP API: a receiver it reads without any engine lock.
    pub(crate) fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Resolves when the engine stopped by itself (a fatal error).
    pub async fn failed(&self) -> String {
        self.shared.token.cancelled().await;
        lock(&self.shared.fatal)
            .as_ref()
            .map_or_else(|| "stopped".into(), |f| f.reason().to_string())
    }

    /// Stops reading, lets the timer publish what it holds (records due within the hold horizon,
    /// or within `w_1 + lead_1` from a sweep: 6 s with the defaults) and in-flight sends finish,
    /// all within `--shutdown-timeout`; commits what is safe, and returns. A restart after a clean
    /// stop therefore re-delivers nothing; what could not finish stays uncommitted and is read
    /// again by the next owner.
    pub async fn stop(self) -> Result<(), Error> {
        let s = &self.shared;
        s.intake.cancel();
        s.publish_status();
        let ladder = s.ladder();
        let started = tokio::time::Instant::now();
        // The flushes at the end get up to 2 s of the timeout.
        let timeout = s.settings.config.shutdown_timeout;
        let end = started + timeout.saturating_sub(Duration::from_secs(2));
        let held = s.settings.hold_ms.max(ladder.width(1) + ladder.lead(1));
        let drain =
            Duration::from_millis((held + ladder.margin_ms()) as u64) + Duration::from_secs(1);
        let deadline = (started + drain).min(end);
        let mut view = s.timer_view.clone();
        let backlog = || {
            s.publisher_backlog
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        while (view.borrow_and_update().pending > 0 || backlog() > 0)
            && !s.token.is_cancelled()
            && tokio::time::Instant::now() < deadline
        {
            // The timer's view tells its changes; the publisher's backlog is looked at often.
            let _ = tokio::time::timeout(Duration::from_millis(10), view.changed()).await;
        }
        let undrained = view.borrow().pending + backlog();
        if undrained > 0 {
            tracing::info!(
                records = undrained,
                "stopping with records still in the timer; they stay uncommitted for the next owner"
            );
        }
        s.token.cancel();
        let mut left = Vec::new();
        if tokio::time::timeout_at(end, self.tasks.wait())
            .await
            .is_err()
        {
            left.push("a stage did not end".to_string());
        }
        let state_thread = self.state_thread;
        let joined = tokio::task::spawn_blocking(move || state_thread.join());
        if tokio::time::timeout_at(end, joined).await.is_err() {
            left.push("the state reader did not end".to_string());
        }
        let mut collector = self.collector;
        let settled = tokio::time::timeout_at(end, &mut collector).await.is_ok();
        collector.abort();
        s.acks.close();
        let unanswered = lock(&s.targets).in_flight();
        if !settled || tokio::time::timeout_at(end, s.acks.wait()).await.is_err() || unanswered > 0
        {
            left.push(format!("{unanswered} deliveries unacknowledged"));
        }
        let waiting = lock(&s.lanes).held();
        if waiting > 0 {
            left.push(format!("{waiting} record(s) waiting in retry lanes"));
        }
        // The flushes' 2 s are kept out of `end`; the commit may use up to 1 s of them.
        if !s.commit_before(end + Duration::from_secs(1)).await {
            left.push("the last commit failed".to_string());
        }
        // librdkafka's flush and unsubscribe block their thread: off the async ones.
        let me = s.clone();
        let closing = tokio::task::spawn_blocking(move || {
            let _ = me.producer.flush(Duration::from_millis(500));
            let _ = me.slice_producer.flush(Duration::from_millis(500));
            me.consumer.unsubscribe();
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        match lock(&s.fatal).clone() {
            Some(Fatal::Fenced(reason)) => Err(Error::Fenced(reason)),
            Some(Fatal::Other(reason)) => Err(Error::Fatal(reason)),
            None if left.is_empty() => Ok(()),
            None => {
                let uncommitted = lock(&s.tracker).in_flight();
                let what = format!(
                    "{} when the stop ended (its timeout: {}); {uncommitted} record(s) stay \
                     uncommitted and their next owner sends them again",
                    left.join(", "),
                    humantime::format_duration(timeout)
                );
                tracing::warn!("{what}");
                Err(Error::Unfinished(what))
            }
        }
    }
}

/// Spawns `work` on `tasks`; it is dropped where it waits once `until` is cancelled.
fn spawn_until(
    tasks: &TaskTracker,
    until: CancellationToken,
    work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + std::marker::Send>>,
) {
    tasks.spawn(async move {
        tokio::select! {
            biased;
            _ = until.cancelled() => {}
            _ = work => {}
        }
    });
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
    pub(crate) fn fail(&self, fatal: Fatal) {
        tracing::error!(reason = fatal.reason(), "fatal error, stopping");
        lock(&self.fatal).get_or_insert(fatal);
        self.publish_status();
        self.token.cancel();
    }

    /// Hands each record the timer says is due to the outbox, in the timer's order, unless its
    /// partition was revoked meanwhile (its new owner reads it again). A record with an id
    /// whose due time the index of ids is not yet fresh enough to judge waits (late, never
    /// wrong) in a queue of its own, in order, so records with ids keep the timer's order among
    /// themselves; records without an id never wait.
    async fn run_publisher(self: Arc<Self>, mut due: mpsc::Receiver<TimerEntry>) {
        let mut fresh = self.state.fresh.clone();
        // Each with the time it was parked: a gate that holds records for long is reported.
        let mut parked: std::collections::VecDeque<(std::time::Instant, TimerEntry)> =
            Default::default();
        loop {
            // What the timer released and is not published yet: a clean stop waits for it.
            self.publisher_backlog.store(
                due.len() + parked.len(),
                std::sync::atomic::Ordering::SeqCst,
            );
            *lock(&self.gate_held) = parked.front().map(|(at, _)| (parked.len(), *at));
            tokio::select! {
                entry = due.recv() => {
                    let Some(entry) = entry else { return };
                    if !lock(&self.tracker).is_current(&entry.ticket) {
                        continue;
                    }
                    let waits = entry.scheduled.version.is_some()
                        && (!parked.is_empty() || !self.fresh_for(entry.scheduled.due.as_millis()));
                    if waits {
                        metrics::counter!(m::HELD_FOR_FRESHNESS).increment(1);
                        parked.push_back((std::time::Instant::now(), entry));
                    } else {
                        self.publish(entry).await;
                    }
                }
                changed = fresh.changed(), if !parked.is_empty() => {
                    if changed.is_err() {
                        return;
                    }
                    while parked
                        .front()
                        .is_some_and(|(_, e)| self.fresh_for(e.scheduled.due.as_millis()))
                    {
                        if let Some((_, entry)) = parked.pop_front() {
                            if lock(&self.tracker).is_current(&entry.ticket) {
                                self.publish(entry).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends a due record to its target, unless its id has a newer version (a cancel or a
    /// reschedule): then it is done, and its offset may be committed.
    async fn publish(self: &Arc<Self>, entry: TimerEntry) {
        {
            let s = &entry.scheduled;
            if let Some(version) = s.version {
                match self.state.index.withheld(&s.id, version) {
                    Ok(None) => {}
                    Ok(Some(reason)) => {
                        metrics::counter!(m::WITHHELD, "reason" => reason).increment(1);
                        lock(&self.tracker).finish(&entry.ticket);
                        return;
                    }
                    Err(e) => return self.fail(Fatal::Other(e.to_string())),
                }
            }
        }
        {
            let mut scheduled = entry.scheduled;
            let out = scheduled.lend_body(Scheduled::to_target);
            let send = Send {
                out,
                then: Then::Deliver {
                    due_ms: scheduled.due.as_millis(),
                },
                scheduled: Some(scheduled),
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
}
