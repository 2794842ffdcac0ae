//! The engine: the wiring of the stages, and its clean stop. Nothing below imports it; each stage
//! owns its state and is joined to the next by a channel or a small typed handle:
//!
//! - ingest ([`crate::ingest`]): the group's consumer reads the ingest topic (slice partitions
//!   stay assigned to it but paused: it owns and commits them, the sweep readers read them); each
//!   record goes, through the [`Router`], to the timer (due within the hold horizon: one hop), a
//!   slice, or the DLQ.
//! - the planner ([`crate::planner`]) queues a sweep job per window as its sweep time comes, and
//!   turns rebalance events into work; workers ([`crate::sweep`]) run the jobs with readers of
//!   their own and route what they read through the same [`Router`].
//! - the timer ([`crate::timer`]) releases what it holds, in due order, never before its time, to
//!   the publisher ([`crate::publisher`]), which asks the index of ids ([`crate::state`]) whether
//!   a newer version is known and hands the rest to the outbox.
//! - the outbox ([`crate::outbox`]) sends, within the memory budget, and decides each failure's
//!   fate; it tells the committer ([`Offsets`], a channel of notes) what was acknowledged.
//! - the committer ([`crate::committer`]), on a thread of its own, owns the offset tracker: the
//!   stages send it notes ("begun", "finished"), the rebalance callback "assigned" and "revoked";
//!   it commits, per partition, up to the lowest record not yet acknowledged in its next place.
//!   Which partitions are ours is the callback's alone to write ([`crate::offsets::Owned`], a
//!   `watch` every stage reads).
//! - the status stage ([`crate::monitor`]) gathers each stage's published health into the
//!   snapshot `/healthz` reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::committer::{Committer, Stats};
use crate::config::Settings;
use crate::error::Error;
use crate::http;
use crate::ingest::Ingest;
use crate::jobs::Board;
use crate::kafka::{self, EngineContext, Fatal, TopicSpec};
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::monitor::Monitor;
use crate::offsets::{Offsets, OffsetsEnds};
use crate::outbox::{Budget, Outbox, OutboxParts};
use crate::progress::SliceWrites;
use crate::publisher::Publisher;
use crate::router::Router;
use crate::state::{Janitor, ReaderParts};
use crate::status::Status;
use crate::sweep::Sweeper;
use crate::time::Clock;
use crate::timer::{self, TimerView};

/// The state topic rolls a segment this often (see the topic's creation).
const STATE_SEGMENT_MS: i64 = 3_600_000;

/// Takes this process's transactional id (the exactly-once mode), which aborts what an earlier
/// process with the id left open, and opens the first transaction.
async fn start_transactions(settings: &Settings) -> Result<crate::transaction::Txn, Error> {
    let id = settings.transactional_id(0);
    let producer: FutureProducer = kafka::transactional_producer_config(settings, &id).create()?;
    let txn = tokio::task::spawn_blocking(move || {
        crate::transaction::Txn::start(producer, kafka::BROKER_TIMEOUT)
    })
    .await
    .map_err(|e| Error::Fatal(e.to_string()))??;
    tracing::info!(transactional_id = %id, "exactly-once: transactions started");
    Ok(txn)
}

/// A started engine; [`Engine::stop`] shuts it down cleanly.
pub struct Engine {
    settings: Arc<Settings>,
    clock: Arc<dyn Clock>,
    life: Arc<Lifecycle>,
    offsets: Offsets,
    consumer: Arc<StreamConsumer<EngineContext>>,
    outbox: Arc<Outbox>,
    /// Records begun and not finished, as the committer last counted them.
    in_flight: watch::Receiver<usize>,
    /// Ends the committer's thread when the engine goes, stopped or dropped.
    _close_on_drop: CloseOnDrop,
    board: Arc<Board>,
    ids: crate::state::Ids,
    /// Positions of the slice topics, for the load ahead (`/api/upcoming`).
    lookup: Arc<kafka::Lookup>,
    timer_view: watch::Receiver<TimerView>,
    /// Records the timer released that the publisher has not published yet.
    publisher_backlog: Arc<AtomicUsize>,
    status: watch::Receiver<Status>,
    tasks: TaskTracker,
    /// The acknowledgement collector: it outlives the other tasks, to settle what they sent.
    collector: tokio::task::JoinHandle<()>,
    /// The state reader's thread: it ends soon after the engine's token is cancelled.
    state_thread: std::thread::JoinHandle<()>,
    #[cfg(feature = "testkit")]
    sweeper: Arc<Sweeper>,
    #[cfg(feature = "testkit")]
    janitor: Arc<Janitor>,
    /// An engine dropped without a stop (a panicking test) stops its tasks and threads.
    _stop_on_drop: DropGuard,
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
            // Every process reads every partition: a few are enough. The log cleaner compacts
            // only closed segments, and the broker's defaults close one at 1 GiB or after 7
            // days: without a roll every hour the janitor's tombstones removed nothing from the
            // disk, and an index rebuild read every fact ever written, for a week.
            TopicSpec {
                name: settings.internal.state.clone(),
                partitions: cfg.slice_partitions,
                configs: vec![
                    ("cleanup.policy".into(), "compact".to_string()),
                    ("segment.ms".into(), STATE_SEGMENT_MS.to_string()),
                ],
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
        let mut settings = settings;
        settings.config.session_timeout = kafka::session_timeout(&settings).await;
        tracing::info!(
            "group session timeout {}: a process that stops answering loses its partitions after that long",
            humantime::format_duration(settings.config.session_timeout)
        );

        let settings = Arc::new(settings);
        let slices = Arc::new(slices);
        let OffsetsEnds {
            offsets,
            notes,
            owned,
        } = Offsets::channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let life = Arc::new(Lifecycle::new());
        let context = EngineContext {
            offsets: offsets.clone(),
            owned,
            // Every slice partition stays paused in the group's consumer: sweeps read them with
            // readers of their own. (Level 0 is no longer written; an earlier version's records
            // there are read by the catch-up sweep on assignment.)
            slice_topics: slices.keys().cloned().collect(),
            events: events_tx,
            exactly_once: settings.exactly_once(),
        };
        let consumer: StreamConsumer<EngineContext> =
            kafka::consumer_config(&settings).create_with_context(context)?;
        let mut subscription: Vec<&str> = vec![settings.internal.ingest.as_str()];
        subscription.extend(slices.keys().map(String::as_str));
        consumer.subscribe(&subscription)?;
        let consumer = Arc::new(consumer);
        let lookup = Arc::new(kafka::Lookup::new(&settings)?);
        let plain: FutureProducer = kafka::producer_config(
            &settings.config.bootstrap_servers,
            &settings.config.kafka_properties,
        )
        .create()?;
        let txn = if settings.exactly_once() {
            Some(Arc::new(start_transactions(&settings).await?))
        } else {
            None
        };
        // Exactly-once: every send of the engine goes through the one transactional producer.
        let (producer, slice_producer) = match &txn {
            Some(txn) => (txn.producer().clone(), txn.producer().clone()),
            None => (
                plain.clone(),
                kafka::slice_producer_config(
                    &settings.config.bootstrap_servers,
                    &settings.config.kafka_properties,
                )
                .create()?,
            ),
        };
        // Each worker's own readers.
        let worker_readers = (0..settings.config.workers)
            .map(|_| crate::sweep::readers(&settings))
            .collect::<Result<Vec<_>, _>>()?;
        let (ids, state_reader) = crate::state::open(&settings, state_dir)?;
        let state_reader = state_reader.verify(settings.clone()).await?;

        m::register_counters();
        let (timer_tx, timer_rx) = mpsc::channel(4096);
        let (view_tx, view_rx) = watch::channel(TimerView::default());
        let budget = Budget::new(settings.config.memory_budget);
        let per_record = Arc::new(m::PerRecord::new(settings.ladder.levels()));
        let board = Arc::new(Board::default());
        let (outbox, in_flight) = Outbox::new(OutboxParts {
            settings: settings.clone(),
            clock: clock.clone(),
            per_record: per_record.clone(),
            life: life.clone(),
            offsets: offsets.clone(),
            budget: budget.clone(),
            lookup: lookup.clone(),
            producer: producer.clone(),
            slice_producer,
            plain: plain.clone(),
            txn: txn.clone(),
        });
        let (gate_tx, gate_rx) = watch::channel(None);
        let router = Arc::new(Router {
            settings: settings.clone(),
            clock: clock.clone(),
            per_record,
            budget: budget.clone(),
            timer: timer_tx.clone(),
            outbox: outbox.clone(),
            slice_writes: Arc::new(SliceWrites::default()),
            ids: ids.clone(),
            gate_held: gate_rx.clone(),
        });
        let sweeper = Arc::new(Sweeper::new(
            router.clone(),
            offsets.clone(),
            board.clone(),
            lookup.clone(),
            life.clone(),
        ));
        let planner = Arc::new(crate::planner::Planner {
            settings: settings.clone(),
            clock: clock.clone(),
            board: board.clone(),
            life: life.clone(),
            offsets: offsets.clone(),
            timer: timer_tx,
            slices: slices.clone(),
        });
        let publisher_backlog = Arc::new(AtomicUsize::new(0));
        let publisher = Publisher {
            outbox: outbox.clone(),
            clock: clock.clone(),
            ingest_topic: settings.config.ingest_topic.clone(),
            offsets: offsets.clone(),
            ids: ids.clone(),
            life: life.clone(),
            gate: gate_tx,
            backlog: publisher_backlog.clone(),
        };
        let (commits_tx, commits_rx) = watch::channel(None);
        let (in_flight_tx, in_flight_rx) = watch::channel(0);
        let committer = Committer {
            consumer: consumer.clone(),
            notes,
            offsets: offsets.clone(),
            budget: budget.clone(),
            interval: settings.config.commit_interval,
            failing: commits_tx,
            in_flight: in_flight_tx,
            txn,
            life: life.clone(),
        };
        let stats = Arc::new(Stats {
            offsets: offsets.clone(),
            lookup: lookup.clone(),
            settings: settings.clone(),
            life: life.clone(),
            slices,
        });
        let janitor = Arc::new(Janitor {
            ids: ids.clone(),
            offsets: offsets.clone(),
            producer: plain.clone(),
            settings: settings.clone(),
            clock: clock.clone(),
            life: life.clone(),
        });
        let (status_tx, status) = watch::channel(Status::default());
        let monitor = Arc::new(Monitor {
            offsets: offsets.clone(),
            in_flight: in_flight_rx.clone(),
            timer_view: view_rx.clone(),
            sweeps_behind: sweeper.behind(),
            life: life.clone(),
            outbox: outbox.clone(),
            gate: gate_rx,
            commits: commits_rx,
            budget,
            memory_budget: settings.config.memory_budget,
            interval: settings.config.commit_interval,
            status: status_tx,
            ids: ids.clone(),
            clock: clock.clone(),
        });
        let watermarks = crate::watermark::Writer {
            offsets: offsets.clone(),
            lookup: lookup.clone(),
            producer: plain,
            settings: settings.clone(),
            clock: clock.clone(),
            life: life.clone(),
        };

        let tasks = TaskTracker::new();
        // Every stage ends where it waits once its token is cancelled (budget, a full queue, a
        // broker round trip): no stage can hold a stop up by waiting for what never comes.
        let (intake, token) = (life.intake().clone(), life.token().clone());
        let until = |stop: &CancellationToken, work| spawn_until(&tasks, stop.clone(), work);
        let (jobs_tx, jobs_rx) = mpsc::channel::<u64>(1024);
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        let collector = tokio::spawn(outbox.clone().collect(in_flight, tasks.clone()));
        let ingest = Ingest {
            consumer: consumer.clone(),
            offsets: offsets.clone(),
            router,
            life: life.clone(),
        };
        until(&intake, Box::pin(ingest.run()));
        let (due_tx, due_rx) = mpsc::channel(1024);
        // The timer ends with the token; the publisher when the timer is gone and it has
        // published what the timer released before (a clean stop's drain counts on it).
        tasks.spawn(timer::run(
            clock.clone(),
            timer_rx,
            due_tx,
            view_tx,
            token.clone(),
        ));
        tasks.spawn(publisher.run(due_rx));
        // Stays up through a stop for its last commit; the stop closes it.
        committer.spawn()?;
        tasks.spawn(monitor.run());
        until(
            &intake,
            Box::pin(planner.clone().run_planner(jobs_tx.clone())),
        );
        until(&intake, Box::pin(planner.run_control(events_rx, jobs_tx)));
        until(&intake, Box::pin(stats.run()));
        until(&intake, Box::pin(janitor.clone().run()));
        until(
            &intake,
            Box::pin(crate::upcoming::keep_gauge(
                settings.clone(),
                lookup.clone(),
                clock.clone(),
                view_rx.clone(),
            )),
        );
        // Through a clean stop's drain too: records with ids the timer releases then still need
        // this process's partitions' watermarks (read up to where the intake stopped).
        until(&token, Box::pin(watermarks.run()));
        let state_thread = state_reader.spawn(ReaderParts {
            settings: settings.clone(),
            clock: clock.clone(),
            lookup: lookup.clone(),
            life: life.clone(),
        })?;
        for (n, readers) in worker_readers.into_iter().enumerate() {
            let id = format!("{}-w{}", std::process::id(), n + 1);
            until(
                &intake,
                Box::pin(sweeper.clone().run_worker(id, jobs_rx.clone(), readers)),
            );
        }
        tasks.close();
        tracing::info!(
            levels = settings.ladder.levels(),
            widths_ms = ?settings.ladder.widths(),
            hold_ms = settings.hold_ms,
            memory_budget = settings.config.memory_budget,
            "scheduler started"
        );
        Ok(Engine {
            _stop_on_drop: token.drop_guard(),
            settings,
            clock,
            life,
            offsets: offsets.clone(),
            consumer,
            outbox,
            in_flight: in_flight_rx,
            _close_on_drop: CloseOnDrop(offsets.clone()),
            board,
            ids,
            lookup,
            timer_view: view_rx,
            publisher_backlog,
            status,
            tasks,
            collector,
            state_thread,
            #[cfg(feature = "testkit")]
            sweeper,
            #[cfg(feature = "testkit")]
            janitor,
        })
    }

    /// What the HTTP API reads: the status snapshot (a watch, read without any engine lock),
    /// the job board, the index of ids, and the producer its cancels are written with.
    pub(crate) fn api(&self, prometheus: PrometheusHandle) -> http::Api {
        http::Api {
            status: self.status.clone(),
            board: self.board.clone(),
            ids: self.ids.clone(),
            producer: self.outbox.producer(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
            lookup: self.lookup.clone(),
            prometheus,
        }
    }

    /// Makes the next `n` sweep attempts fail (test builds only).
    #[cfg(feature = "testkit")]
    pub(crate) fn fail_next_sweeps(&self, n: usize) {
        self.sweeper.fail_next(n);
    }

    /// Makes every delivery to `topic` fail after `after` (test builds only).
    #[cfg(feature = "testkit")]
    pub(crate) fn refuse_target(&self, topic: &str, after: Option<Duration>) {
        self.outbox.refuse_target(topic, after);
    }

    /// One janitor pass as of `now_ms` (test builds only).
    #[cfg(feature = "testkit")]
    pub(crate) async fn janitor_pass(&self, now_ms: i64) -> usize {
        self.janitor
            .janitor_pass(now_ms, crate::state::JANITOR_BATCH)
            .await
    }

    /// Resolves when the engine stopped by itself (a fatal error).
    pub async fn failed(&self) -> String {
        self.life.token().cancelled().await;
        self.life
            .fatal()
            .map_or_else(|| "stopped".into(), |f| f.reason().to_string())
    }

    /// Stops reading, lets the timer publish what it holds (records due within the hold horizon,
    /// 6 s by default, or within `w_1 + lead_1` from a sweep: 1.5 s with the defaults) and
    /// in-flight sends finish, all within `--shutdown-timeout`; commits what is safe, and
    /// returns. A restart after a clean stop therefore re-delivers nothing; what could not finish
    /// stays uncommitted and is read again by the next owner.
    pub async fn stop(self) -> Result<(), Error> {
        self.life.stop_intake();
        let ladder = &self.settings.ladder;
        let started = tokio::time::Instant::now();
        // The flushes at the end get up to 2 s of the timeout.
        let timeout = self.settings.config.shutdown_timeout;
        let end = started + timeout.saturating_sub(Duration::from_secs(2));
        let held = self
            .settings
            .hold_ms
            .max(ladder.width(1).saturating_add(ladder.lead(1)));
        let drain = Duration::from_millis(held.saturating_add(ladder.margin_ms()).max(0) as u64)
            + Duration::from_secs(1);
        // The stages need a moment to end once told to (a lookup on its way, a last write):
        // the drain stops short of `end` by up to a second, or the stop would report stages as
        // not ended merely because it told them at its very end.
        let grace = Duration::from_secs(1).min((end - started) / 2);
        let deadline = (started + drain).min(end - grace);
        let mut view = self.timer_view.clone();
        let backlog = || self.publisher_backlog.load(Ordering::SeqCst);
        while (view.borrow_and_update().pending > 0 || backlog() > 0)
            && !self.life.token().is_cancelled()
            && tokio::time::Instant::now() < deadline
        {
            // The timer's view tells its changes; the publisher's backlog is looked at often.
            let _ = tokio::time::timeout(Duration::from_millis(10), view.changed()).await;
        }
        // Records the timer or the publisher still hold (due after the drain, or waiting at the
        // publish gate, which cannot prove what a stopped intake has not read) are the next
        // owner's by design: they stay uncommitted, and the stop is not unfinished for them. (A
        // stop that reported them as left failed every clean stop under a steady stream of ids.)
        let undrained = view.borrow().pending + backlog();
        if undrained > 0 {
            tracing::info!(
                records = undrained,
                "stopping with records still in the timer; they stay uncommitted for the next owner"
            );
        }
        self.life.stop();
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
        let collected = tokio::time::timeout_at(end, &mut collector).await.is_ok();
        collector.abort();
        let settled = self.outbox.settled_by(end).await;
        let (unanswered, waiting) = self.outbox.left();
        if !collected || !settled || unanswered > 0 {
            left.push(format!("{unanswered} deliveries unacknowledged"));
        }
        if waiting > 0 {
            left.push(format!("{waiting} record(s) waiting in retry lanes"));
        }
        // The flushes' 2 s are kept out of `end`; the commit may use up to 1 s of them. An
        // engine stopped by a fatal error in the exactly-once mode commits nothing: its
        // transaction is aborted, and the next engine goes on from the last committed one.
        let aborted = self.settings.exactly_once() && self.life.fatal().is_some();
        if !aborted
            && !crate::committer::commit_before(&self.offsets, end + Duration::from_secs(1)).await
        {
            left.push("the last commit failed".to_string());
        }
        // librdkafka's flush and unsubscribe block their thread: off the async ones.
        let (outbox, consumer) = (self.outbox.clone(), self.consumer.clone());
        let closing = tokio::task::spawn_blocking(move || {
            outbox.flush(Duration::from_millis(500));
            consumer.unsubscribe();
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        match self.life.fatal().cloned() {
            Some(Fatal::Fenced(reason)) => Err(Error::Fenced(reason)),
            Some(Fatal::Aborted(reason)) => Err(Error::Aborted(reason)),
            Some(Fatal::Other(reason)) => Err(Error::Fatal(reason)),
            None if left.is_empty() => Ok(()),
            None => {
                let uncommitted = *self.in_flight.borrow();
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

/// Closes the committer's thread when dropped: it holds the group's consumer, which must leave
/// the group when an engine is dropped without a stop (a test's simulated crash).
struct CloseOnDrop(Offsets);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
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
