//! Kafka plumbing: client configurations, topic creation, reading records safely, classifying send
//! errors, and the consumer context that turns rebalances into events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header as KafkaHeader, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::config::{Property, Settings};
use crate::domain::{Header, Incoming, Outgoing, RawHeader};
use crate::error::Error;
use crate::offsets::{CommitPoint, Offsets, Owned, Tp};

/// The base configuration every client shares: bootstrap servers, then the pass-through
/// properties (TLS, SASL...), which may override anything.
pub fn client_config(bootstrap: &str, properties: &[Property]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set_log_level(RDKafkaLogLevel::Warning);
    for p in properties {
        c.set(&p.key, &p.value);
    }
    c
}

pub fn base_config(settings: &Settings) -> ClientConfig {
    client_config(
        &settings.config.bootstrap_servers,
        &settings.config.kafka_properties,
    )
}

/// Producer settings for at-least-once without reordering: idempotence (so librdkafka's retries
/// neither duplicate nor reorder), `acks=all`, and Java's murmur2 partitioner so that a record
/// lands on the partition an ordinary Java producer would pick for its key. Shared with the
/// db-scheduler baseline, so both paths publish the same way.
pub fn producer_config(bootstrap: &str, properties: &[Property]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "sm-deliver")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "500000")
        .set("topic.metadata.propagation.max.ms", "10000");
    merge(c, client_config(bootstrap, properties))
}

/// Producer settings for slice writes: as [`producer_config`], but batched longer. A slice write
/// is due well after it is sent, so a few milliseconds cost nothing, and fewer, larger batches cost
/// the broker less (one write per partition batch) and leave room for deliveries.
pub fn slice_producer_config(bootstrap: &str, properties: &[Property]) -> ClientConfig {
    let mut c = producer_config(bootstrap, &[]);
    c.set("client.id", "sm-slices")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000");
    merge(c, client_config(bootstrap, properties))
}

/// The exactly-once mode's producer: as [`producer_config`] (idempotent, `acks=all`), with a
/// transactional id. A transaction left open by a process that died blocks read_committed
/// readers of what it wrote until the broker aborts it: at once when a process with the same id
/// starts, else after `transaction.timeout.ms`, kept short (10 s) because a transaction commits
/// every --commit-interval.
pub fn transactional_producer_config(settings: &Settings, transactional_id: &str) -> ClientConfig {
    let mut c = producer_config(&settings.config.bootstrap_servers, &[]);
    c.set("client.id", "sm-transactions")
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "10000")
        // librdkafka requires it within the transaction's timeout: a send unacknowledged for
        // that long fails, its transaction aborts, and the engine starts again from the last
        // committed one.
        .set("message.timeout.ms", "10000");
    merge(c, base_config(settings))
}

/// Consumer settings: nothing is committed or stored automatically; the engine commits what the
/// offset tracker says is safe.
pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let session_ms = settings.config.session_timeout.as_millis();
    let mut c = ClientConfig::new();
    c.set("client.id", "sm-ingest")
        .set("group.id", &settings.config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // A member that dies is noticed within the session timeout, and its partitions deliver
        // again about a second later (`session_timeout` below says how long).
        .set("session.timeout.ms", session_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (session_ms / 3).min(1_000).to_string(),
        )
        // Incremental rebalancing: a member joining or leaving moves only the partitions that
        // change owner; the others keep delivering through the rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Fetches: librdkafka's defaults (fetch.min.bytes 1, fetch.wait.max.ms 500). Kafka answers
        // a waiting fetch as soon as one record arrives, so the wait costs an idle consumer
        // nothing and a record nothing: an already-due record is read within milliseconds. A
        // larger fetch.min.bytes makes the broker hold each fetch until that much is waiting or
        // the wait is up, which every record below that rate pays (BENCHMARKS.md, "Fetch
        // settings on Kafka", gives the A/B runs).
        // librdkafka prefetches up to 64 MB and 100,000 records per partition by default; the
        // engine routes records as fast as they come, so a backlog in the ingest topic only
        // inflated resident memory (from 15 MiB to over 200 MiB in the benchmark). But a cap
        // below what one fetch brings makes the consumer stop fetching while the engine works
        // through its queue, and fetch again only when it is drained. Benchmark 4b, a past-due
        // backlog of 200,000 x 1 KiB, two alternating runs each way (2026-12-04): 6,445 and
        // 6,360 records/s at 4 MiB (256 KiB per partition, 4 MiB per response), peak resident
        // 62 and 76 MiB; 8,082 and 8,437/s at 16 MiB (1 MiB per partition, 16 MiB per
        // response), peak 95 MiB both times. Records of 100 B already due (section 1) moved at
        // about a relay's rate either way (medians of three rounds 0.98 and 1.12 at 4 MiB, 1.25
        // and 1.04 at 16 MiB): the difference is in bytes, not records.
        .set("queued.min.messages", "10000")
        .set("queued.max.messages.kbytes", "16384")
        // Once that queue is full librdkafka pauses fetching for fetch.queue.backoff.ms (1 s by
        // default): a past-due backlog then moved one queue (16 MiB) a second. A/B on one broker,
        // 200,000 x 1 KiB past due, drain from the start, two runs each (2026-12-07): 1 s
        // 13.6/13.5 s, peak resident 97/98 MiB; 100 ms 3.6/3.0 s, 119/122 MiB; 10 ms (earlier,
        // one run) 4.1 s, 130 MiB. Steady 20,000/s for 10 s from a Python client, five runs
        // each: on-arrival p99 median 948 ms at 1 s, 940 ms at 100 ms; at 10,000/s two runs
        // each, 453/704 ms at 1 s, 480/326 ms at 100 ms. (An earlier single run at 20,000/s
        // had favoured 1 s over 10 ms; five runs show that spread is noise.) The sweep readers
        // use 10 ms.
        .set("fetch.queue.backoff.ms", "100")
        // A fetch response is held whole while its records are handed out; librdkafka's default
        // of 50 MiB per response made fetch buffers the largest item of a backlog's peak heap.
        .set("fetch.max.bytes", "16777216")
        .set("fetch.message.max.bytes", "1048576")
        .set("topic.metadata.refresh.interval.ms", "10000");
    if let Some(id) = &settings.config.instance_id {
        c.set("group.instance.id", id);
    }
    merge(c, base_config(settings))
}

/// Kafka's default `group.min.session.timeout.ms`: what a broker allows that does not say.
pub const KAFKA_MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The session timeout the group's consumer asks for: `--session-timeout`, raised to the
/// broker's `group.min.session.timeout.ms` when that is higher, since a broker refuses a join
/// below it (INVALID_SESSION_TIMEOUT) and the process would never get a partition. The worst
/// lateness when an instance dies and is not restarted is about this plus a second (A/B in
/// BENCHMARKS.md, "Takeover": 7.1 s at 6 s, 4.3 s at 3 s, 3.1 s at 2 s). Kafka's newer group
/// protocol (KIP-848) would not shorten it: its session timeout is the broker's alone
/// (`group.consumer.session.timeout.ms`, 45 s by default). If the broker's setting cannot be
/// read (no DescribeConfigs right), Kafka's default minimum is assumed.
pub async fn session_timeout(settings: &Settings) -> Duration {
    let asked = settings.config.session_timeout;
    match broker_min_session_timeout(settings).await {
        Ok(min) => asked.max(min),
        Err(e) => {
            tracing::warn!(
                "could not read the broker's group.min.session.timeout.ms ({e}); assuming Kafka's default, {}",
                humantime::format_duration(KAFKA_MIN_SESSION_TIMEOUT)
            );
            asked.max(KAFKA_MIN_SESSION_TIMEOUT)
        }
    }
}

/// `group.min.session.timeout.ms` of the broker that answers our metadata request.
async fn broker_min_session_timeout(settings: &Settings) -> Result<Duration, Error> {
    use rdkafka::admin::ResourceSpecifier;
    const KEY: &str = "group.min.session.timeout.ms";
    let admin: AdminClient<DefaultClientContext> = base_config(settings).create()?;
    // Not `orig_broker_id()`: when the bootstrap connection answers, librdkafka gives that
    // connection's id, -1, and DescribeConfigs refuses it as an invalid argument (CI saw this).
    // Every broker of one cluster is started with the same floor, so any listed one will do.
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let broker = metadata
        .brokers()
        .iter()
        .map(|b| b.id())
        .min()
        .ok_or_else(|| Error::Fatal("the metadata lists no broker".into()))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Broker(broker)], &opts)
        .await?;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| Error::Fatal("no answer to DescribeConfigs".into()))?
        .map_err(|code| Error::Fatal(format!("DescribeConfigs: {code}")))?;
    resource
        .get(KEY)
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .ok_or_else(|| Error::Fatal(format!("the broker did not give {KEY}")))
}

/// A sweep worker's reader: outside the group, nothing committed, nothing assigned between
/// sweeps. Offsets that are out of range are an error, never a silent reset: a slice read that
/// finds its data already deleted has lost records, and that must be counted and seen.
pub fn sweep_reader_config(settings: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    // librdkafka refuses assign() without a group.id. This one is never joined (assign() does not
    // join a group) and never committed to: our group's consumer commits the slices.
    c.set("client.id", "sm-sweep")
        .set(
            "group.id",
            format!("{}.sweep-readers", settings.config.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        // Keep the prefetch small: the sweep routes as fast as records come, and the memory
        // budget, not librdkafka's queue, should hold what is waiting.
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "2000")
        // Once its queue passes either threshold, librdkafka postpones the partition's next fetch
        // by this much (1 s by default): a sweep of more than a queue's worth of records then
        // read about 10,000 records/s, in steps a second apart. Measured 2026-12-06 (ordinary
        // client, 10,000/s due 5 s ahead, level-1 windows of 1 s so every record is swept): p99
        // 1,622 ms at the default, sweeps placing their records 1.1 s after their window began
        // on average (sm_sweep_lateness_seconds); 208 ms at 10 ms, 0.08 s on average.
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.max.bytes", "2097152")
        .set("fetch.message.max.bytes", "262144")
        .set("topic.metadata.refresh.interval.ms", "10000");
    merge(c, base_config(settings))
}

/// A client for the round trips that look positions up: watermarks and the group's committed
/// offsets. It is separate from the engine's consumer so that these requests never queue in front
/// of the consumer's fetches (a Kafka broker answers one connection's requests one at a time, in
/// order, so a lookup would wait behind a fetch that is waiting for data), and it asks for many
/// partitions in one request instead of one round trip per partition. It never joins the group.
pub struct Lookup {
    client: BaseConsumer,
}

impl Lookup {
    pub fn new(settings: &Settings) -> Result<Lookup, Error> {
        let mut c = ClientConfig::new();
        c.set("client.id", "sm-lookup")
            .set("group.id", &settings.config.group_id)
            .set("enable.auto.commit", "false")
            // End offsets are high watermarks, not the last stable offset: a record Kafka
            // acknowledged lies below it even behind an open transaction, which the ingest
            // watermarks count on (they then wait for the transaction, late, never wrong).
            // The scheduler's own topics have no transactions: the same offsets either way.
            .set("isolation.level", "read_uncommitted");
        let c = merge(c, base_config(settings));
        Ok(Lookup {
            client: c.create()?,
        })
    }

    /// Whether the broker answers a metadata request for `topic` within `timeout`: tells a
    /// target's own trouble (the broker answers) from the broker's (it does not).
    pub fn answers(&self, topic: &str, timeout: Duration) -> KafkaResult<()> {
        self.client.fetch_metadata(Some(topic), timeout).map(drop)
    }

    /// How many partitions `topic` has: 0 when it does not exist (this client never creates
    /// topics: `allow.auto.create.topics` is off for consumers).
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> KafkaResult<usize> {
        let md = self.client.fetch_metadata(Some(topic), timeout)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .sum())
    }

    /// The earliest and the latest offset of each partition: two requests, however many
    /// partitions.
    pub fn watermarks(
        &self,
        tps: &[Tp],
        timeout: Duration,
    ) -> KafkaResult<HashMap<Tp, (i64, i64)>> {
        let low = self.list_offsets(tps, Offset::Beginning, timeout)?;
        let high = self.list_offsets(tps, Offset::End, timeout)?;
        Ok(low
            .into_iter()
            .filter_map(|(tp, l)| high.get(&tp).map(|&h| (tp, (l, h))))
            .collect())
    }

    /// The latest offset (the high watermark) of each partition, in one request.
    pub fn ends(&self, tps: &[Tp], timeout: Duration) -> KafkaResult<HashMap<Tp, i64>> {
        self.list_offsets(tps, Offset::End, timeout)
    }

    /// ListOffsets with the special timestamps of the protocol: `Beginning` (-2) asks for the
    /// earliest offset, `End` (-1) for the latest.
    fn list_offsets(
        &self,
        tps: &[Tp],
        at: Offset,
        timeout: Duration,
    ) -> KafkaResult<HashMap<Tp, i64>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in tps {
            tpl.add_partition_offset(topic, *partition, at)?;
        }
        let answer = self.client.offsets_for_times(tpl, timeout)?;
        offsets_of(&answer)
    }

    /// The group's committed offset of each partition that has one, in one request.
    pub fn committed(&self, tps: &[Tp], timeout: Duration) -> KafkaResult<HashMap<Tp, i64>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in tps {
            tpl.add_partition(topic, *partition);
        }
        let answer = self.client.committed_offsets(tpl, timeout)?;
        offsets_of(&answer)
    }
}

/// The concrete offsets of a list the broker answered, failing on a partition it refused.
fn offsets_of(list: &TopicPartitionList) -> KafkaResult<HashMap<Tp, i64>> {
    let mut out = HashMap::new();
    for e in list.elements() {
        e.error()?;
        if let Offset::Offset(o) = e.offset() {
            out.insert((e.topic().to_string(), e.partition()), o);
        }
    }
    Ok(out)
}

pub(crate) fn merge(mut defaults: ClientConfig, overrides: ClientConfig) -> ClientConfig {
    for (k, v) in overrides.config_map() {
        defaults.set(k, v);
    }
    defaults.set_log_level(overrides.log_level);
    defaults
}

/// A topic to create at start-up.
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub configs: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic of `partitions` partitions with the broker's default configuration.
    pub fn new(name: &str, partitions: i32) -> TopicSpec {
        TopicSpec {
            name: name.to_string(),
            partitions,
            configs: Vec::new(),
        }
    }

    /// With the topic configuration `key=value`.
    pub fn with(mut self, key: &str, value: impl ToString) -> TopicSpec {
        self.configs.push((key.to_string(), value.to_string()));
        self
    }
}

/// Creates the topics that do not exist yet. Existing topics are left as they are (their partition
/// counts are the operator's to change).
pub async fn ensure_topics(settings: &Settings, topics: &[TopicSpec]) -> Result<(), Error> {
    create_topics(
        base_config(settings),
        topics,
        settings.config.replication_factor,
    )
    .await
}

/// Creates the topics that do not exist yet with the client configuration `config`, and returns
/// once every partition of every one of them is served by its leader ([`await_leaders`]): a
/// write sooner can be lost.
pub async fn create_topics(
    config: ClientConfig,
    topics: &[TopicSpec],
    replication: i32,
) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            t.configs.iter().fold(
                NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(replication)),
                |nt, (k, v)| nt.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(Error::CreateTopic(name, code)),
        }
    }
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let client = config.create::<BaseConsumer>()?;
    tokio::task::spawn_blocking(move || await_leaders(&client, &names, TOPICS_VISIBLE_WITHIN))
        .await
        .map_err(|e| Error::Fatal(format!("waiting for the topics: {e}")))?
}

/// How long created topics may take to be served by their leaders before the start fails.
const TOPICS_VISIBLE_WITHIN: Duration = Duration::from_secs(30);

/// Waits until every partition of the topics in `names` is served by its leader: in the broker's
/// metadata with a leader, and answering a ListOffsets request. CreateTopics answers once the
/// controller has the topic; the brokers learn it a moment later, and a leader answers
/// NOT_LEADER_OR_FOLLOWER for about a second more (on 2 cores). Writes in that window are worse
/// than late: an idempotent librdkafka producer whose first batches to a new partition are refused
/// and whose next one is taken acknowledges the refused ones as written (with no offset) and they
/// are lost (seen here with Kafka 4.4 and librdkafka 2.12: BENCHMARKS.md, "Records lost to a
/// partition's first second"; [`confirmed`] catches the acknowledgements).
fn await_leaders(client: &BaseConsumer, names: &[String], within: Duration) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let Err(last) = partitions_served(client, names) else {
            return Ok(());
        };
        if std::time::Instant::now() >= deadline {
            return Err(Error::Fatal(format!(
                "topics created but not served by their leaders after {within:?}: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `Ok` when every partition of `names` has a leader that answers for it; else why not.
fn partitions_served(client: &BaseConsumer, names: &[String]) -> Result<(), String> {
    let md = client
        .fetch_metadata(None, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for name in names {
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == name.as_str() && t.error().is_none())
            .ok_or_else(|| format!("{name} is not in the metadata yet"))?;
        if topic.partitions().is_empty() || topic.partitions().iter().any(|p| p.leader() < 0) {
            return Err(format!("{name} has a partition without a leader"));
        }
        for p in topic.partitions() {
            tpl.add_partition_offset(name, p.id(), Offset::End)
                .map_err(|e| e.to_string())?;
        }
    }
    let answer = client
        .offsets_for_times(tpl, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    offsets_of(&answer).map(|_| ()).map_err(|e| e.to_string())
}

/// A delivery report that names no offset is not a proof that the record is in the log: the
/// idempotent producer reports records it gave up tracking (acknowledged implicitly by a later
/// batch, or answered DUPLICATE_SEQUENCE_NUMBER) that way, and around a partition's leader change
/// some of those were never written (librdkafka's confluent-kafka-go#921; reproduced here on a new
/// partition). Such a send is treated as failed with a retriable code, so it is sent again: at
/// worst a duplicate, never a loss.
pub fn confirmed(
    result: Result<rdkafka::producer::future_producer::Delivery, KafkaError>,
) -> Result<rdkafka::producer::future_producer::Delivery, KafkaError> {
    match result {
        Ok(d) if d.offset < 0 => {
            metrics::counter!(crate::metrics::UNCONFIRMED_ACKS).increment(1);
            tracing::warn!(
                partition = d.partition,
                "a write was acknowledged without an offset; sending it again"
            );
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::DuplicateSequenceNumber,
            ))
        }
        other => other,
    }
}

/// Copies a consumed record out of the consumer. Header names are read as bytes through
/// librdkafka's C API because rdkafka's safe accessor panics on a name that is not UTF-8, and a
/// hostile producer must not be able to crash the scheduler.
pub fn detach(msg: &BorrowedMessage<'_>) -> Incoming {
    Incoming {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
        key: msg.key().map(<[u8]>::to_vec),
        payload: msg.payload().map(<[u8]>::to_vec),
        headers: raw_headers(msg),
    }
}

fn raw_headers(msg: &BorrowedMessage<'_>) -> Vec<RawHeader> {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    // SAFETY: `msg.ptr()` is a live rd_kafka_message_t for the lifetime of `msg`; the headers it
    // returns and the name/value pointers read from them are owned by that message and are copied
    // out before `msg` can be dropped. Names are NUL-terminated C strings per librdkafka's API.
    unsafe {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(msg.ptr(), &mut headers)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return out;
        }
        let count = rd::rd_kafka_header_cnt(headers);
        for idx in 0..count {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            if rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null())
                .then(|| std::slice::from_raw_parts(value as *const u8, size).to_vec());
            out.push(RawHeader { name, value });
        }
    }
    out
}

/// Builds the headers of an outgoing record.
pub fn owned_headers(headers: &[Header]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |acc, (k, v)| {
            acc.insert(KafkaHeader {
                key: k.as_str(),
                value: v.as_deref(),
            })
        },
    )
}

/// A `FutureRecord` over an [`Outgoing`], partitioned by key (never a forced partition).
pub fn record<'a>(out: &'a Outgoing) -> FutureRecord<'a, [u8], [u8]> {
    let mut r = FutureRecord::to(&out.topic).headers(owned_headers(&out.headers));
    if let Some(k) = out.key.as_deref() {
        r = r.key(k);
    }
    if let Some(p) = out.payload.as_deref() {
        r = r.payload(p);
    }
    if let Some(partition) = out.partition {
        r = r.partition(partition);
    }
    r
}

/// Why the engine stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// The group fenced this process's static member id (`FencedInstanceId`). librdkafka's
    /// consumer cannot go on after it, but a new consumer with the same id takes the membership
    /// back. Right after a broker restart librdkafka can fence itself this way (a request with
    /// the old member id races its own rejoin; confluent-kafka-go#494), so [`crate::run`] starts
    /// the engine again, once per [`crate::REJOIN_WINDOW`]; a second fence within it means
    /// another process really uses the id.
    Fenced(String),
    /// The exactly-once mode's transaction was aborted (a send in it failed, or the group
    /// moved on while this process was away): [`crate::run`] starts the engine again, which
    /// goes on from the last committed transaction.
    Aborted(String),
    /// Anything else: authorisation, an invalid configuration, a refused DLQ write.
    Other(String),
}

impl Fatal {
    pub fn reason(&self) -> &str {
        match self {
            Fatal::Fenced(r) | Fatal::Aborted(r) | Fatal::Other(r) => r,
        }
    }
}

/// The reason to stop, when a consumer error is one the process cannot recover from by waiting:
/// fencing (another member with our static id), authorisation, an invalid configuration, or
/// librdkafka's own fatal error. Anything else (a broker restarting, a timeout) is retried.
pub fn fatal_consumer_error(err: &KafkaError) -> Option<Fatal> {
    use RDKafkaErrorCode as C;
    let code = err.rdkafka_error_code()?;
    if code == C::FencedInstanceId {
        return Some(Fatal::Fenced(format!("consumer error: {err}")));
    }
    matches!(
        code,
        C::Fatal
            | C::GroupAuthorizationFailed
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::InvalidConfig
            | C::InvalidSessionTimeout
            | C::UnsupportedVersion
    )
    .then(|| Fatal::Other(format!("consumer error: {err}")))
}

/// A change of this process's partitions, sent to the engine's control task.
#[derive(Debug, Clone)]
pub enum RebalanceEvent {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
    /// Assigned, but where their previous owner left them could not be read (exactly-once):
    /// they stay unowned, and the engine must start again.
    Unreadable(Vec<Tp>),
}

/// The consumer context. It keeps the ownership every stage reads ([`Owned`]) and the committer's
/// tracker in step with the group synchronously (so no record of a newly assigned partition is
/// read while it is unknown, and no ack for a revoked one is committed), pauses slice partitions the moment they are assigned (they
/// are read only during their sweeps), commits what is safe before a revoke, and reports each
/// change to the engine as an event.
pub struct EngineContext {
    /// Tells the committer's tracker of assignments and asks it for revoked commit points.
    pub offsets: Offsets,
    /// The ownership every stage reads; written here alone.
    pub owned: watch::Sender<Owned>,
    pub slice_topics: HashSet<String>,
    pub events: UnboundedSender<RebalanceEvent>,
    /// The exactly-once mode: an assignment reads what the previous owner's last transaction
    /// had done (the committed offsets' metadata), so that it is skipped, not done again.
    pub exactly_once: bool,
}

/// Where newly assigned partitions were committed, and what their metadata (written by the
/// exactly-once mode's transactions) says is done above that. Read by the group's consumer,
/// which asks for stable offsets (`read_committed`): a transaction's offsets count only once
/// its markers are written, after its commit returned. Tried again for up to a minute; `None`
/// when it could not be read, and then nothing of these partitions may be read (their done
/// records would be done again).
fn replayed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    assigned: &[Tp],
) -> Option<HashMap<Tp, Arc<crate::replay::Progress>>> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in assigned {
        tpl.add_partition(topic, *partition);
    }
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut delays = crate::retry::backoff(Duration::from_millis(50), Duration::from_secs(2));
    let committed = loop {
        match consumer.committed_offsets(tpl.clone(), BROKER_TIMEOUT) {
            Ok(c) => break c,
            // The consumer is being closed (its engine stopped): nothing to read it for.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerDestroy) => {
                tracing::debug!(error = %e, "the consumer is closing; its assignment is not read");
                return None;
            }
            Err(e) if std::time::Instant::now() < end => {
                tracing::warn!(error = %e, "reading the committed progress of assigned partitions; trying again");
                std::thread::sleep(delays.next().unwrap_or(Duration::from_secs(2)));
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the committed progress of assigned partitions failed");
                return None;
            }
        }
    };
    Some(
        committed
            .elements()
            .iter()
            .filter_map(|e| {
                let Offset::Offset(from) = e.offset() else {
                    return None;
                };
                let progress = crate::replay::Progress::decode(from, e.metadata()).unwrap_or(
                    crate::replay::Progress {
                        from,
                        upto: from,
                        pending: Vec::new(),
                    },
                );
                Some(((e.topic().to_string(), e.partition()), Arc::new(progress)))
            })
            .collect(),
    )
}

fn tps(list: &TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for EngineContext {}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = tps(list);
            // First no stage may begin anything more of them, then the tracker gives their last
            // safe points (it has every note sent before this one).
            self.owned.send_modify(|o| o.revoke(&revoked));
            // Exactly-once: the committer commits them in a transaction after every write for
            // them is settled, which may take a send's timeout; a commit it ends after this
            // wait is refused (it carries this generation), and the transaction aborts.
            let (group, wait) = if self.exactly_once {
                (consumer.group_metadata(), REVOKE_COMMIT_TIMEOUT)
            } else {
                (None, BROKER_TIMEOUT)
            };
            let revoke = || self.offsets.revoke(revoked.clone(), group, wait);
            // This runs on the async worker that polls the consumer. The exactly-once commit
            // waits for the acknowledgement collector, a task that may sit in this very worker's
            // queue (its next-task slot, which no other worker takes): without handing the
            // worker's queue over, the wait ran out at 30 s and the transaction aborted.
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let points = if self.exactly_once && multi_thread {
                tokio::task::block_in_place(revoke)
            } else {
                revoke()
            };
            if !points.is_empty() {
                if let Err(e) = commit_offsets(consumer, &points) {
                    tracing::warn!(error = %e, "commit before revoke failed; the next owner re-reads from the previous commit");
                }
            }
            let _ = self.events.send(RebalanceEvent::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned = tps(list);
                let mut slices = TopicPartitionList::new();
                for (topic, partition) in assigned
                    .iter()
                    .filter(|(t, _)| self.slice_topics.contains(t))
                {
                    slices.add_partition(topic, *partition);
                }
                if slices.count() > 0 {
                    if let Err(e) = consumer.pause(&slices) {
                        tracing::error!(error = %e, "could not pause slice partitions");
                    }
                }
                let done = if self.exactly_once {
                    match replayed(consumer, &assigned) {
                        Some(done) => done,
                        None => {
                            // Unowned, nothing of them is read; the engine starts again.
                            let _ = self.events.send(RebalanceEvent::Unreadable(assigned));
                            return;
                        }
                    }
                } else {
                    HashMap::new()
                };
                // The tracker hears of them while the watch is held for writing, before any
                // stage can see them as owned, so every "begun" note of theirs comes after it.
                self.owned.send_modify(|o| {
                    let list = o.assign(assigned.iter().cloned());
                    o.replay(done.clone());
                    self.offsets.assigned(list, done);
                });
                let _ = self.events.send(RebalanceEvent::Assigned(assigned));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Locks a std mutex, carrying on with the data if a panicking thread poisoned it: every structure
/// behind these locks stays consistent between statements.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a lookup (a broker round trip on the lookup client) off the async threads.
pub(crate) async fn look<T: Send + 'static>(
    lookup: &Arc<Lookup>,
    f: impl FnOnce(&Lookup) -> rdkafka::error::KafkaResult<T> + Send + 'static,
) -> Result<T, String> {
    let lookup = lookup.clone();
    tokio::task::spawn_blocking(move || f(&lookup))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// How long the rebalance callback waits for the exactly-once mode's commit of revoked
/// partitions: the settling of their sends (at most a send's 10 s timeout) and the commit.
pub const REVOKE_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout of the broker round trips the engine makes (watermarks, committed offsets, metadata).
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_authorisation_and_bad_configuration_are_fatal_for_the_consumer() {
        use RDKafkaErrorCode as C;
        for code in [
            C::Fatal,
            C::FencedInstanceId,
            C::GroupAuthorizationFailed,
            C::InvalidConfig,
        ] {
            let e = KafkaError::MessageConsumption(code);
            let fatal = fatal_consumer_error(&e).expect("fatal");
            assert_eq!(
                matches!(fatal, Fatal::Fenced(_)),
                code == C::FencedInstanceId,
                "{code:?}: only fencing is recovered by a new consumer"
            );
        }
        for code in [
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::RequestTimedOut,
        ] {
            let e = KafkaError::MessageConsumption(code);
            assert_eq!(fatal_consumer_error(&e), None, "{code:?}");
        }
    }
}
