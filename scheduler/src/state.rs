//! The state of ids (issue #13): facts in a compacted topic, read by every process into its own
//! [`Index`], and how fresh that index is.
//!
//! A record with an `id` writes a fact (`Pending` at ingest, `Cancelled` for a cancel, `Delivered`
//! once its target acknowledged it) to `<ingest>.STATE`, keyed by id and version. Every process
//! reads every state partition itself (assigned, not through the group), so any process can
//! judge any record. The publish gate ([`crate::engine`]) asks two things of it: is the index
//! fresh enough for this due time ([`State::fresh`]), and is no newer version of the id known
//! ([`Index::withheld`]).
//!
//! Freshness: every [`REFRESH`] while a record with an id waits in the timer (every
//! [`IDLE_REFRESH`] otherwise) the reader notes the time T, then asks the state partitions' end
//! offsets; once it has applied every partition up to them, every fact acknowledged before T is
//! in the index, and it publishes "fresh as of T".
//!
//! The state topic also carries the owners' ingest watermarks ([`crate::watermark`]): the gate
//! is fresh as of the least of T and the lowest ingest watermark read before T was noted, so a
//! cancel produced to the ingest topic is covered too, whoever reads it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use futures::StreamExt;

use std::sync::atomic::{AtomicI64, Ordering};

use rdkafka::producer::FutureProducer;

use crate::config::Settings;
use crate::domain::Outgoing;
use crate::error::Error;
use crate::facts::{fact_key, parse_fact_key, parse_watermark_key, Fact, Version, Watermark};
use crate::index::{Entry, Index, IndexError, Learnt, Source};
use crate::kafka::BROKER_TIMEOUT;
use crate::kafka::{self, Fatal, Lookup};
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::{Offsets, Tp};
use crate::time::Clock;
use crate::watermark::{gate_ms, IngestGate};

/// How often the reader asks the state partitions' end offsets while a record with an id is
/// due soon: the freshness it can prove lags the clock by about this plus a round trip, well
/// inside the default cancel lead (1 s).
const REFRESH: Duration = Duration::from_millis(100);

/// How often otherwise: the broker pays for every request, and records without ids (or none at
/// all) should cost it nothing the scheduler did not cost before ids.
const IDLE_REFRESH: Duration = Duration::from_secs(1);

/// A lookup of end offsets that takes longer is tried again next round (and a stop waits for it
/// at most this long).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Records applied to the index in one transaction at most.
const BATCH: usize = 5_000;

/// What the engine knows of the state of ids: a handle on the index the reader keeps, read by the
/// publish gate and the HTTP API, told by the timer's feeders when a record with an id is due.
#[derive(Clone)]
pub(crate) struct Ids {
    index: Arc<Index>,
    /// Clock time (ms) as of which every acknowledged fact is in the index; `i64::MIN` until the
    /// reader first caught up.
    fresh: watch::Receiver<i64>,
    /// Clock time (ms) as of which every fact acknowledged, and every fact of an ingest record
    /// Kafka acknowledged, is in the index: the least of `fresh` and the ingest watermarks
    /// ([`gate_ms`]). What the publish gate asks.
    gate: watch::Receiver<i64>,
    /// The newest ingest watermarks the reader read.
    ingest: Arc<std::sync::Mutex<IngestGate>>,
    /// Clock time (ms) until which a record with an id waits in the timer: the reader proves
    /// freshness every [`REFRESH`] until then, every [`IDLE_REFRESH`] after.
    busy_until: Arc<AtomicI64>,
    /// How long before its due time a fact must be known to stop a copy.
    cancel_lead_ms: i64,
    /// The state topic.
    topic: String,
    /// The ingest topic.
    ingest_topic: String,
}

impl Ids {
    /// A record with an id due at `due_ms` entered the timer: the reader proves freshness often
    /// until it is published.
    pub(crate) fn due_at(&self, due_ms: i64) {
        let until = due_ms
            .saturating_add(self.cancel_lead_ms)
            .saturating_add(1_000);
        self.busy_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether the index is fresh enough to judge a copy due at `due_ms`: it holds every fact
    /// acknowledged up to the cancel lead before it, and the fact of every ingest record Kafka
    /// acknowledged by then, whichever process reads its partition.
    pub(crate) fn fresh_for(&self, due_ms: i64) -> bool {
        *self.gate.borrow() >= due_ms.saturating_sub(self.cancel_lead_ms)
    }

    /// The ingest partitions whose newest watermark lags `now_ms` by more than the cancel lead,
    /// with their lag (ms): they hold the gate (unowned, or their owner stopped or slow).
    pub(crate) fn stale_ingest(&self, now_ms: i64) -> Vec<(i32, i64)> {
        crate::kafka::lock(&self.ingest).stale(now_ms, self.cancel_lead_ms)
    }

    /// Clock time (ms) as of which every acknowledged fact is in the index.
    pub(crate) fn fresh_as_of(&self) -> i64 {
        *self.fresh.borrow()
    }

    /// Waits until the index is fresh as of `t_ms`: it holds every fact acknowledged before
    /// then. False if the reader is gone.
    pub(crate) async fn caught_up_to(&self, t_ms: i64) -> bool {
        self.fresh.clone().wait_for(|f| *f >= t_ms).await.is_ok()
    }

    /// Changes of the gate's freshness (see [`Ids::fresh_for`]), for the publish gate to wait
    /// on.
    pub(crate) fn freshness(&self) -> watch::Receiver<i64> {
        self.gate.clone()
    }

    /// Why a copy of `id` at `version` must not be sent (a newer version, a cancel), if so.
    pub(crate) fn withheld(
        &self,
        id: &str,
        version: Version,
    ) -> Result<Option<&'static str>, IndexError> {
        self.index.withheld(id, version)
    }

    /// What the status API reports for `id`, if anything is known of it.
    pub(crate) fn status(&self, id: &str) -> Result<Option<crate::facts::IdStatus>, IndexError> {
        self.index.status(id)
    }

    /// The ingest topic whose watermarks the gate waits for.
    pub(crate) fn ingest_topic(&self) -> String {
        self.ingest_topic.clone()
    }

    /// The record that writes `fact` of `id` at `version` to the state topic.
    pub(crate) fn record(&self, id: &str, version: Version, fact: &Fact) -> Outgoing {
        fact_record(&self.topic, id, version, fact)
    }
}

/// The record that writes `fact` of `id` at `version` to the state topic `topic`.
pub(crate) fn fact_record(topic: &str, id: &str, version: Version, fact: &Fact) -> Outgoing {
    Outgoing {
        topic: topic.to_string(),
        key: Some(fact_key(id, version).into_bytes()),
        payload: Some(fact.encode()),
        headers: Vec::new(),
        ..Default::default()
    }
}

/// The state topic's reader, before it runs.
pub(crate) struct Reader {
    consumer: BaseConsumer,
    fresh: watch::Sender<i64>,
    gate: watch::Sender<i64>,
    ids: Ids,
}

/// What the reader reads with, beside its own consumer.
pub(crate) struct ReaderParts {
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub lookup: Arc<Lookup>,
    pub life: Arc<Lifecycle>,
}

/// The state reader's consumer: outside the group (it reads every partition, assigned), nothing
/// committed (its positions are stored in the index, with the facts).
fn reader_config(settings: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "sm-state")
        .set(
            "group.id",
            format!("{}.state-readers", settings.config.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Fetches as the ingest consumer's (librdkafka's defaults): Kafka answers a waiting
        // fetch as soon as a fact arrives, so the index lags the topic by a round trip.
        // Facts are small: small prefetch and fetch buffers keep a rebuild of a million ids
        // from holding tens of MiB of responses.
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "10000")
        .set("fetch.max.bytes", "2097152")
        .set("fetch.message.max.bytes", "262144")
        .set("topic.metadata.refresh.interval.ms", "10000");
    kafka::merge(c, kafka::base_config(settings))
}

/// Opens the index and connects the reader.
pub(crate) fn open(settings: &Settings, dir: &std::path::Path) -> Result<(Ids, Reader), Error> {
    let index = Index::open(dir).map_err(|e| Error::Fatal(e.to_string()))?;
    tracing::info!(path = %index.path().display(), "state index open");
    let (fresh_tx, fresh) = watch::channel(i64::MIN);
    let (gate_tx, gate) = watch::channel(i64::MIN);
    let ids = Ids {
        index: Arc::new(index),
        fresh,
        gate,
        ingest: Arc::new(std::sync::Mutex::new(IngestGate::new(0, i64::MIN))),
        busy_until: Arc::new(AtomicI64::new(i64::MIN)),
        cancel_lead_ms: settings.cancel_lead_ms(),
        topic: settings.internal.state.clone(),
        ingest_topic: settings.internal.ingest.clone(),
    };
    let reader = Reader {
        consumer: reader_config(settings).create()?,
        fresh: fresh_tx,
        gate: gate_tx,
        ids: ids.clone(),
    };
    Ok((ids, reader))
}

/// A state record as the index stores it; a record that is not a fact is skipped (and counted,
/// unless it is an ingest watermark), its position still moves.
fn learnt(msg: &impl Message) -> Learnt {
    if msg.key().and_then(parse_watermark_key).is_some() {
        return Learnt {
            partition: msg.partition(),
            offset: msg.offset(),
            entry: Entry::Skip,
        };
    }
    let entry = match (msg.key().and_then(parse_fact_key), msg.payload()) {
        (Some((id, version)), None) => Entry::Tombstone { id, version },
        (Some((id, version)), Some(value)) => match Fact::decode(value) {
            Some(fact) => Entry::Fact {
                id,
                version,
                fact,
                written_ms: msg.timestamp().to_millis().unwrap_or(0),
            },
            None => Entry::Skip,
        },
        (None, _) => Entry::Skip,
    };
    if entry == Entry::Skip {
        metrics::counter!(m::STATE_MALFORMED).increment(1);
    }
    Learnt {
        partition: msg.partition(),
        offset: msg.offset(),
        entry,
    }
}

/// The reader's progress between steps.
struct Progress {
    tps: Vec<Tp>,
    /// The next offset to read, per partition, as applied to the index.
    applied: HashMap<i32, i64>,
    /// The end offsets to reach, the clock time they were asked at, and the lowest ingest
    /// watermark read before then.
    goal: Option<(i64, HashMap<i32, i64>, i64)>,
    asked: Instant,
    stuck_since: Instant,
    /// The assignment, to pause and resume.
    assignment: TopicPartitionList,
    /// Whether the partitions are fetched now: only while a record with an id is due soon or
    /// the last end offsets showed facts not read yet. A paused reader costs the broker no
    /// fetches at all, only the end-offset request every [`IDLE_REFRESH`].
    reading: bool,
}

impl Reader {
    /// Reads the state topic into the index on a thread of its own until the engine stops (an
    /// engine dropped without a stop, as in a panicking test, cancels its token too). An index
    /// that cannot be written stops the process: the gate could no longer prove anything.
    pub(crate) fn spawn(self, with: ReaderParts) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sm-state".into())
            .spawn(move || {
                let result = self.start(&with).and_then(|mut progress| {
                    while !with.life.token().is_cancelled() {
                        self.step(&with, &mut progress)?;
                    }
                    Ok(())
                });
                if let Err(reason) = result {
                    with.life.fail(Fatal::Other(reason));
                }
            })
    }

    /// Makes sure the index was read from the state topic the cluster holds now (see
    /// [`Source`]): when not, [`Index::adopt`] empties it, and it is read again from the start;
    /// a line at warn and [`m::INDEX_REBUILDS`] say what changed. Before anything reads the
    /// index, so no answer comes from facts of another topic.
    ///
    /// The topic id is the reliable mark of "the same topic": Kafka gives a topic a new one
    /// whenever it is made, whatever its name. rust-rdkafka has no call for it, so it is asked
    /// with librdkafka's DescribeTopics ([`topic_id`]). Watermarks are no substitute: a topic
    /// made again and written as far as the old one's positions looks the same.
    pub(crate) async fn verify(self, settings: Arc<Settings>) -> Result<Reader, Error> {
        let checked = tokio::task::spawn_blocking(move || {
            let topic = &settings.internal.state;
            let partitions = self.partitions(topic, &|| false)?;
            let client = self.consumer.client();
            let source = Source {
                cluster: client.fetch_cluster_id(BROKER_TIMEOUT),
                topic: topic_id(&self.consumer, topic, BROKER_TIMEOUT)?,
                partitions,
            };
            match self.ids.index.adopt(&source).map_err(|e| e.to_string())? {
                Some(rebuild) => {
                    tracing::warn!(
                        reason = rebuild.reason,
                        was = ?rebuild.was,
                        now = ?source,
                        "the state index was read from another state topic ({} changed); \
                         emptied, it is read again from the start of {topic}",
                        rebuild.reason
                    );
                    metrics::counter!(m::INDEX_REBUILDS, "reason" => rebuild.reason).increment(1);
                }
                None => tracing::info!(?source, "the state index is of this state topic"),
            }
            Ok::<_, String>(self)
        })
        .await;
        match checked {
            Ok(Ok(reader)) => Ok(reader),
            Ok(Err(e)) => Err(Error::Fatal(format!("state index: {e}"))),
            Err(e) => Err(Error::Fatal(format!("state index check: {e}"))),
        }
    }

    /// The state topic's partition count. A topic created a moment ago may not be in every
    /// broker's metadata yet: asked again with backoff for up to [`BROKER_TIMEOUT`] × 3, or
    /// until `gone` says to stop.
    fn partitions(&self, topic: &str, gone: &dyn Fn() -> bool) -> Result<i32, String> {
        let until = Instant::now() + BROKER_TIMEOUT * 3;
        let mut delays = crate::retry::backoff(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let found = self
                .consumer
                .fetch_metadata(Some(topic), BROKER_TIMEOUT)
                .map(|m| {
                    m.topics()
                        .first()
                        .map_or(0, |t| t.partitions().len() as i32)
                });
            match found {
                Ok(n) if n > 0 => return Ok(n),
                _ if Instant::now() >= until || gone() => {
                    return Err(format!(
                        "the state topic {topic} has no partitions in the metadata: {found:?}"
                    ))
                }
                _ => std::thread::sleep(delays.next().unwrap_or(Duration::from_secs(2))),
            }
        }
    }

    /// Assigns every state partition from the positions the index stored.
    fn start(&self, with: &ReaderParts) -> Result<Progress, String> {
        let topic = &with.settings.internal.state;
        let partitions = self.partitions(topic, &|| with.life.token().is_cancelled())?;
        let ingest = self.partitions(&with.settings.internal.ingest, &|| {
            with.life.token().is_cancelled()
        })?;
        *crate::kafka::lock(&self.ids.ingest) = IngestGate::new(ingest, with.clock.now_ms());
        let applied = self.ids.index.positions().map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let at = applied
                .get(&p)
                .map_or(Offset::Beginning, |&o| Offset::Offset(o));
            tpl.add_partition_offset(topic, p, at)
                .map_err(|e| e.to_string())?;
        }
        self.consumer.assign(&tpl).map_err(|e| e.to_string())?;
        Ok(Progress {
            assignment: tpl,
            reading: true,
            tps: (0..partitions).map(|p| (topic.clone(), p)).collect(),
            applied,
            goal: None,
            asked: Instant::now()
                .checked_sub(IDLE_REFRESH)
                .unwrap_or_else(Instant::now),
            stuck_since: Instant::now(),
        })
    }

    /// One round: ask the end offsets if it is time, apply what arrived, publish freshness
    /// once every partition reached its end.
    fn step(&self, with: &ReaderParts, p: &mut Progress) -> Result<(), String> {
        let busy = with.clock.now_ms() <= self.ids.busy_until.load(Ordering::Relaxed);
        let every = if busy { REFRESH } else { IDLE_REFRESH };
        if p.goal.is_none() && p.asked.elapsed() >= every {
            p.asked = Instant::now();
            // The watermarks read so far, before T is noted: what they cover was acknowledged
            // before T, so this round puts it in the index.
            let low = crate::kafka::lock(&self.ids.ingest).low();
            let t = with.clock.now_ms();
            // The engine's lookup client (a librdkafka client costs memory and connections):
            // its requests never queue in front of any consumer's fetches.
            match with.lookup.ends(&p.tps, LOOKUP_TIMEOUT) {
                Ok(ends) => {
                    let ends = ends.into_iter().map(|((_, q), o)| (q, o)).collect();
                    p.goal = Some((t, ends, low));
                    p.stuck_since = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "state topic end offsets"),
            }
        }
        let unread = p.goal.as_ref().is_some_and(|(_, ends, _)| {
            ends.iter()
                .any(|(q, end)| p.applied.get(q).copied().unwrap_or(0) < *end)
        });
        let want = busy || unread;
        if want != p.reading {
            let switched = if want {
                self.consumer.resume(&p.assignment)
            } else {
                self.consumer.pause(&p.assignment)
            };
            switched.map_err(|e| format!("state reader pause/resume: {e}"))?;
            p.reading = want;
        }
        let (batch, marks) = self.poll_batch();
        if !marks.is_empty() {
            let mut ingest = crate::kafka::lock(&self.ids.ingest);
            for (partition, before_ms) in marks {
                ingest.learn(partition, before_ms);
            }
        }
        if !batch.is_empty() {
            self.ids.index.apply(&batch).map_err(|e| e.to_string())?;
            metrics::counter!(m::STATE_FACTS_READ).increment(batch.len() as u64);
            for l in &batch {
                let next = p.applied.entry(l.partition).or_insert(0);
                *next = (*next).max(l.offset + 1);
            }
        }
        if batch.is_empty() && p.goal.is_some() {
            // Nothing came: the reader may have passed records it never hands out (the markers
            // of the exactly-once mode's transactions, aborted facts), which only its position
            // shows.
            if let Ok(positions) = self.consumer.position() {
                for e in positions.elements() {
                    if let Some(at) = e.offset().to_raw() {
                        let next = p.applied.entry(e.partition()).or_insert(0);
                        *next = (*next).max(at);
                    }
                }
            }
        }
        let Some((t, ends, low)) = &p.goal else {
            return Ok(());
        };
        let behind: Vec<i32> = ends
            .iter()
            .filter(|(q, end)| p.applied.get(q).copied().unwrap_or(0) < **end)
            .map(|(q, _)| *q)
            .collect();
        if behind.is_empty() {
            let (t, gate) = (*t, gate_ms(*t, *low));
            for (watch, at) in [(&self.fresh, t), (&self.gate, gate)] {
                watch.send_if_modified(|f| {
                    let moved = at > *f;
                    *f = (*f).max(at);
                    moved
                });
            }
            let now = with.clock.now_ms();
            metrics::gauge!(m::STATE_LAG).set((now - t).max(0) as f64 / 1000.0);
            let worst = crate::kafka::lock(&self.ids.ingest)
                .lags(now)
                .into_iter()
                .map(|(_, lag)| lag)
                .max()
                .unwrap_or(0);
            metrics::gauge!(m::INGEST_WATERMARK_LAG).set(worst as f64 / 1000.0);
            p.goal = None;
        } else if batch.is_empty() && p.stuck_since.elapsed() > Duration::from_secs(2) {
            // Nothing comes and a partition is still short of its end: its records before the
            // end may be gone (deleted). Skip to the first offset that exists.
            self.skip_deleted(with, &behind, &mut p.applied)?;
            p.stuck_since = Instant::now();
        }
        Ok(())
    }

    /// Up to [`BATCH`] records, waiting a little for the first; and the ingest watermarks
    /// among them (partition, before ms).
    fn poll_batch(&self) -> (Vec<Learnt>, Vec<(i32, i64)>) {
        let mut batch = Vec::new();
        let mut marks = Vec::new();
        let mut wait = Duration::from_millis(20);
        while batch.len() < BATCH {
            match self.consumer.poll(wait) {
                None => break,
                Some(Ok(msg)) => {
                    if let Some(p) = msg.key().and_then(parse_watermark_key) {
                        if let Some(w) = msg.payload().and_then(Watermark::decode) {
                            marks.push((p, w.before_ms));
                        }
                    }
                    batch.push(learnt(&msg));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "state topic read");
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        (batch, marks)
    }

    /// Moves the partitions in `behind` whose earliest offset is past what was applied up to it.
    fn skip_deleted(
        &self,
        with: &ReaderParts,
        behind: &[i32],
        applied: &mut HashMap<i32, i64>,
    ) -> Result<(), String> {
        let topic = &with.settings.internal.state;
        let tps: Vec<Tp> = behind.iter().map(|p| (topic.clone(), *p)).collect();
        let Ok(marks) = with.lookup.watermarks(&tps, LOOKUP_TIMEOUT) else {
            return Ok(());
        };
        let mut moved = HashMap::new();
        for ((_, p), (low, _)) in marks {
            if applied.get(&p).copied().unwrap_or(0) < low {
                tracing::warn!(
                    partition = p,
                    from = low,
                    "state records deleted before they were read"
                );
                applied.insert(p, low);
                moved.insert(p, low);
            }
        }
        self.ids.index.advance(&moved).map_err(|e| e.to_string())
    }
}

/// The topic id Kafka gave `topic` when it was made (KIP-516), base64 as Kafka's tools print
/// it; `None` when the cluster has none for it (brokers before 2.8). Asked with librdkafka's
/// DescribeTopics admin call, which any client handle may make; rust-rdkafka does not wrap it.
fn topic_id(
    client: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    use rdkafka::bindings as rd;
    use std::ffi::{c_char, CStr, CString};
    let name = CString::new(topic).map_err(|e| e.to_string())?;
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.client().native_ptr();
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: librdkafka's strings are NUL-terminated and live as long as their object,
            // which outlives this copy.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: every object made here is destroyed once, after the last use of anything it owns
    // (the event owns the descriptions and their ids); `name` outlives the collection made of it.
    unsafe {
        let mut names = [name.as_ptr()];
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, topics, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, ms.saturating_add(1_000));
        let found = if event.is_null() {
            Err(format!(
                "no answer to DescribeTopics {topic} within {ms} ms"
            ))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(format!(
                "DescribeTopics {topic}: {}",
                text(rd::rd_kafka_event_error_string(event))
            ))
        } else {
            let result = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut n = 0usize;
            let described = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_DescribeTopics_result_topics(result, &mut n)
            };
            match (0..n).map(|i| *described.add(i)).next() {
                None => Err(format!("DescribeTopics {topic}: no description")),
                Some(d) => {
                    let error = rd::rd_kafka_TopicDescription_error(d);
                    let id = rd::rd_kafka_TopicDescription_topic_id(d);
                    if !error.is_null()
                        && rd::rd_kafka_error_code(error)
                            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    {
                        Err(format!(
                            "DescribeTopics {topic}: {}",
                            text(rd::rd_kafka_error_string(error))
                        ))
                    } else if id.is_null()
                        || (rd::rd_kafka_Uuid_most_significant_bits(id) == 0
                            && rd::rd_kafka_Uuid_least_significant_bits(id) == 0)
                    {
                        Ok(None)
                    } else {
                        Ok(Some(text(rd::rd_kafka_Uuid_base64str(id))))
                    }
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(topics);
        found
    }
}

/// How often the janitor looks for facts no copy can need any more.
const JANITOR_EVERY: Duration = Duration::from_secs(600);

/// Facts a janitor round tombstones at most (whole ids), so that a round's list stays small
/// (about 100 bytes a fact). A pass runs rounds until one finds fewer: with one round a pass,
/// 100,000 new ids per 10 minutes (three facts each) outgrew the janitor for good.
pub(crate) const JANITOR_BATCH: usize = 100_000;

/// The janitor of ids: removes the facts no copy can need any more.
pub(crate) struct Janitor {
    pub ids: Ids,
    pub offsets: Offsets,
    pub producer: FutureProducer,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub life: Arc<Lifecycle>,
}

impl Janitor {
    /// The janitor: in the process that owns ingest partition 0 (one per group at a time; a
    /// second one during a rebalance only writes the same tombstones twice), every
    /// [`JANITOR_EVERY`], once the index is fresh as of the pass (at start: caught up with the
    /// state topic's end offsets), it removes the facts of ids whose every fact was written, and
    /// every pending version fell due, more than the slice retention ago: no copy of any of
    /// their versions can still be in Kafka. Without it the state topic and every index would
    /// keep a record per version of every id for ever.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(JANITOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.life.intake().cancelled() => return,
                _ = tick.tick() => {}
            }
            let ingest = &self.settings.internal.ingest;
            if !self.offsets.owns(ingest, 0) {
                continue;
            }
            // Only from an index that holds every fact written before the pass: one still
            // catching up (at start) may not know a newer write to a key it would tombstone,
            // and the tombstone would delete that fact too.
            let now = self.clock.now_ms();
            tokio::select! {
                _ = self.life.intake().cancelled() => return,
                caught_up = self.ids.caught_up_to(now) => if !caught_up { return },
            }
            self.janitor_pass(now, JANITOR_BATCH).await;
        }
    }

    /// One pass of the janitor as of `now_ms`: rounds of about `batch` facts until a round finds
    /// fewer (or a tombstone is not acknowledged: the next pass tries again). Before each next
    /// round the index must have read the tombstones written so far, or the round would find
    /// the same facts again. The number of facts removed.
    pub(crate) async fn janitor_pass(&self, now_ms: i64, batch: usize) -> usize {
        let mut removed = 0;
        loop {
            let (found, gone) = self.janitor_round(now_ms, batch).await;
            removed += gone;
            if found < batch || gone < found {
                return removed;
            }
            let read_to = self.clock.now_ms();
            tokio::select! {
                _ = self.life.intake().cancelled() => return removed,
                caught_up = self.ids.caught_up_to(read_to) => if !caught_up { return removed },
            }
        }
    }

    /// One round of the janitor as of `now_ms`, of about `batch` facts: how many it found no
    /// copy can need, and how many of them it removed.
    pub(crate) async fn janitor_round(&self, now_ms: i64, batch: usize) -> (usize, usize) {
        let index = self.ids.index.clone();
        let keep = self.settings.retention_ms();
        let expired = tokio::task::spawn_blocking(move || index.expired(now_ms, keep, batch)).await;
        let expired = match expired {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                self.life.fail(Fatal::Other(e.to_string()));
                return (0, 0);
            }
            Err(e) => {
                tracing::warn!(error = %e, "janitor scan");
                return (0, 0);
            }
        };
        let found = expired.len();
        let topic = self.settings.internal.state.clone();
        let tombstones = expired.into_iter().map(move |(id, version)| {
            let producer = self.producer.clone();
            let out = Outgoing {
                topic: topic.clone(),
                key: Some(fact_key(&id, version).into_bytes()),
                payload: None,
                headers: Vec::new(),
                ..Default::default()
            };
            async move {
                producer
                    .send(kafka::record(&out), Duration::from_secs(30))
                    .await
                    .is_ok()
            }
        });
        let removed = futures::stream::iter(tombstones)
            .buffer_unordered(1_000)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        metrics::counter!(m::FACTS_REMOVED).increment(removed as u64);
        if removed > 0 {
            tracing::info!(removed, "janitor: facts no copy can need were removed");
        }
        (found, removed)
    }
}

/// What the unit tests of the index's users run on: librdkafka's mock cluster in this process
/// (no broker), the state topic on it, and an index of ids in a directory of the test's own.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    pub(crate) struct Mock {
        pub cluster: MockCluster<'static, DefaultProducerContext>,
        pub settings: Arc<Settings>,
        pub ids: Ids,
        /// Holds the freshness the test publishes (as the reader would).
        pub fresh: watch::Sender<i64>,
        pub dir: std::path::PathBuf,
    }

    impl Mock {
        pub(crate) fn new(name: &str) -> Mock {
            let cluster = MockCluster::new(1).expect("a mock cluster");
            let dir = std::env::temp_dir().join(format!("sm-state-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let config = <crate::config::Config as clap::Parser>::parse_from([
                "scheduler",
                "--bootstrap-servers",
                &cluster.bootstrap_servers(),
                "--state-dir",
                &dir.to_string_lossy(),
            ]);
            let settings = Arc::new(Settings::new(config).expect("valid settings"));
            cluster
                .create_topic(&settings.internal.state, 1, 1)
                .expect("the state topic");
            let (ids, reader) = open(&settings, &dir).expect("the index opens");
            Mock {
                cluster,
                settings,
                ids,
                fresh: reader.fresh,
                dir,
            }
        }

        pub(crate) fn producer(&self) -> FutureProducer {
            kafka::producer_config(&self.cluster.bootstrap_servers(), &[])
                .create()
                .expect("a producer")
        }

        /// Every record on the state topic now: read up to its end offset as of the call.
        pub(crate) fn state_records_to_end(&self) -> Vec<Learnt> {
            let consumer = self.state_consumer();
            let (_, end) = consumer
                .fetch_watermarks(&self.settings.internal.state, 0, Duration::from_secs(10))
                .expect("the state topic's end");
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while (out.len() as i64) < end {
                assert!(
                    Instant::now() < deadline,
                    "the state topic was not read to its end"
                );
                if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(50)) {
                    out.push(learnt(&msg));
                }
            }
            out
        }

        fn state_consumer(&self) -> BaseConsumer {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", self.cluster.bootstrap_servers())
                .set("group.id", "test")
                .create()
                .expect("a consumer");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.settings.internal.state, 0, Offset::Beginning)
                .expect("partition 0");
            consumer.assign(&tpl).expect("assigned");
            consumer
        }

        /// Every record on the state topic within `within` (at least one, if any comes).
        pub(crate) fn state_records(&self, within: Duration) -> Vec<Learnt> {
            let consumer = self.state_consumer();
            let until = Instant::now() + within;
            let mut out = Vec::new();
            while Instant::now() < until {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(msg)) => out.push(learnt(&msg)),
                    _ if !out.is_empty() => break,
                    _ => {}
                }
            }
            out
        }
    }

    impl Drop for Mock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Mock;
    use super::*;
    use crate::offsets::OffsetsEnds;

    /// A pass goes on, round after round, until a round finds less than a batch, and each next
    /// round waits for the index to have read the tombstones before it (or it finds the same
    /// facts again). One round a pass (100,000 facts every 10 minutes) fell behind 100,000 new
    /// ids per 10 minutes for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_removes_more_than_a_batch_and_each_fact_once() {
        let mock = Mock::new("janitor-pass");
        let old: Vec<Learnt> = (0..25)
            .map(|i| Learnt {
                partition: 0,
                offset: i,
                entry: Entry::Fact {
                    id: format!("old-{i:02}"),
                    version: Version {
                        timestamp_ms: 1 + i,
                        partition: 0,
                        offset: i,
                    },
                    fact: Fact::Cancelled,
                    written_ms: 1,
                },
            })
            .collect();
        mock.ids.index.apply(&old).unwrap();
        let janitor = Arc::new(Janitor {
            ids: mock.ids.clone(),
            offsets: Offsets::channel().offsets,
            producer: mock.producer(),
            settings: mock.settings.clone(),
            clock: Arc::new(crate::time::SystemClock),
            life: Arc::new(Lifecycle::new()),
        });
        let now = chrono::Utc::now().timestamp_millis();
        let pass = tokio::spawn({
            let janitor = janitor.clone();
            async move { janitor.janitor_pass(now, 10).await }
        });
        // The state reader's part: notes the time, reads the state topic to its end as of
        // then into the index, and says the index is fresh as of that time.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pass.is_finished() {
            assert!(Instant::now() < deadline, "the pass did not end");
            let noted = chrono::Utc::now().timestamp_millis();
            let written = tokio::task::block_in_place(|| mock.state_records_to_end());
            mock.ids.index.apply(&written).unwrap();
            mock.fresh.send_replace(noted);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pass.await.unwrap(), 25, "one pass removes every old id");
        let mut removed: Vec<String> = tokio::task::block_in_place(|| mock.state_records_to_end())
            .into_iter()
            .filter_map(|l| match l.entry {
                Entry::Tombstone { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        removed.sort();
        let expected: Vec<String> = (0..25).map(|i| format!("old-{i:02}")).collect();
        assert_eq!(removed, expected, "each fact tombstoned once");
    }

    /// At start the index may not hold the newest writes yet; a janitor that judged from it
    /// could tombstone a key whose newer write it has not read. Its first pass waits until the
    /// index is fresh as of the pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_janitor_waits_for_the_index_to_catch_up_before_its_first_pass() {
        let mock = Mock::new("janitor");
        // An id no copy can need: cancelled and written at the epoch.
        let old = Version {
            timestamp_ms: 1,
            partition: 0,
            offset: 0,
        };
        mock.ids
            .index
            .apply(&[Learnt {
                partition: 0,
                offset: 0,
                entry: Entry::Fact {
                    id: "old".into(),
                    version: old,
                    fact: Fact::Cancelled,
                    written_ms: 1,
                },
            }])
            .unwrap();
        let OffsetsEnds { offsets, owned, .. } = Offsets::channel();
        owned.send_modify(|o| {
            o.assign([(mock.settings.internal.ingest.clone(), 0)]);
        });
        let janitor = Arc::new(Janitor {
            ids: mock.ids.clone(),
            offsets,
            producer: mock.producer(),
            settings: mock.settings.clone(),
            clock: Arc::new(crate::time::SystemClock),
            life: Arc::new(Lifecycle::new()),
        });
        let life = janitor.life.clone();
        // A pass that waits for freshness holds a receiver of it: one more than now.
        let watching = mock.fresh.receiver_count();
        let running = tokio::spawn(janitor.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        while mock.fresh.receiver_count() <= watching {
            assert!(
                Instant::now() < deadline && !running.is_finished(),
                "the janitor's first pass never waited for the index (it ran, or never began)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let early = tokio::task::block_in_place(|| mock.state_records_to_end());
        assert!(
            early.is_empty(),
            "a pass ran before the index caught up: {early:?}"
        );
        mock.fresh
            .send_replace(chrono::Utc::now().timestamp_millis());
        let late = tokio::task::block_in_place(|| mock.state_records(Duration::from_secs(10)));
        assert!(
            matches!(&late[..], [Learnt { entry: Entry::Tombstone { id, version }, .. }]
                if id == "old" && *version == old),
            "once caught up, the pass removes the old id: {late:?}"
        );
        life.stop();
        running.await.unwrap();
    }
}
