//! The measurements. Each runs on a broker of its own (Apache Kafka, `testkit::Broker`, with its
//! data in a temporary directory), so that what one section leaves behind does not weigh on the
//! next, and nothing is left on the developer's stack.

use std::collections::HashMap;
use std::time::Duration;

use db_scheduler::{NewMessage, Store};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use scheduler::testkit::*;
use scheduler::DueTime;

use crate::harness::*;

/// Partitions of every target topic.
const TARGET_PARTITIONS: i32 = 4;

/// The scheduler's flags on `broker` for `names`, with the default ladder.
fn scheduler_args(broker: &Broker, names: &Names, extra: &[&str]) -> Vec<String> {
    let bootstrap = broker.bootstrap();
    let mut flags: Vec<&str> = vec!["--bootstrap-servers", &bootstrap];
    flags.extend(DEFAULT_LADDER);
    flags.extend(extra);
    names.args_with(&flags)
}

/// A fresh broker and a group of names with its target topic created.
async fn set_up(test: &str) -> (Broker, Names) {
    let broker = Broker::start();
    let names = Names::new(test);
    create_topic_on(&broker.bootstrap(), &names.target, TARGET_PARTITIONS, &[]).await;
    (broker, names)
}

fn log_name(names: &Names, what: &str) -> String {
    format!("{}-{what}.log", names.group)
}

// ---- 1. throughput -----------------------------------------------------------------------------

pub struct Throughput {
    /// Each round's (relay, scheduler) records/s, whichever of the two ran first.
    pub rounds: Vec<(f64, f64)>,
    /// The scheduler's outcome in every round (for the early and missing counts).
    pub scheduler_outcomes: Vec<Outcome>,
    /// One run on a broker of its own, every record with an `id` (its facts written and checked
    /// at publish).
    pub with_ids: Outcome,
}

impl Throughput {
    /// Median relay and scheduler rates, and the median of the rounds' ratios: one round is
    /// too noisy on a broker whose own rate moves by a third between runs.
    pub fn medians(&self) -> (f64, f64, f64) {
        let relay = median(self.rounds.iter().map(|r| r.0).collect());
        let ours = median(self.rounds.iter().map(|r| r.1).collect());
        let ratio = median(self.rounds.iter().map(|r| r.1 / r.0).collect());
        (relay, ours, ratio)
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `n` records, already due, waiting in a fresh broker's ingest topic (with `id` headers or
/// not), and a reader of the target started for them.
async fn due_backlog(
    name: &str,
    n: usize,
    with_ids: bool,
) -> (
    Broker,
    Names,
    HashMap<String, i64>,
    tokio::task::JoinHandle<Vec<Received>>,
) {
    let (broker, names) = set_up(name).await;
    let bootstrap = broker.bootstrap();
    create_topic_on(&bootstrap, &names.ingest, 16, &[]).await;
    let now = now_ms();
    let p = bulk_producer(&bootstrap);
    let records = (0..n).map(|i| (format!("t-{i}"), now));
    let due = if with_ids {
        produce_bulk_ids(&p, &names.ingest, &names.target, records).await
    } else {
        produce_bulk(&p, &names.ingest, &names.target, records).await
    };
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        due.keys().cloned().collect(),
        Duration::from_secs(600),
    );
    (broker, names, due, reading)
}

/// A scheduler starts beside `n` due records on a fresh broker and delivers them: its rate,
/// measured at a reader.
async fn deliver_due(bins: &Binaries, name: &str, n: usize, with_ids: bool) -> Outcome {
    let (broker, names, due, reading) = due_backlog(name, n, with_ids).await;
    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, &[]),
        &log_name(&names, "tp"),
    )
    .await;
    let got = reading.await.expect("reader");
    sched.stop().await;
    Outcome::of(&got, &due)
}

/// A plain consume-and-produce relay copies `n` due records from the ingest topic to the
/// target on a fresh broker: its rate, measured the same way.
async fn relay_due(n: usize) -> Outcome {
    let (broker, names, due, reading) = due_backlog("bench-tp-relay", n, false).await;
    relayed(start_relay(&broker.bootstrap(), &names.ingest, &names.target, due.len()).await).await;
    let got = reading.await.expect("reader");
    Outcome::of(&got, &due)
}

/// `n` records, already due, wait in the ingest topic; the scheduler's delivery rate (first to
/// last arrival at the target) beside a plain consume-and-produce relay of the same records,
/// with the scheduler's producer settings. Each path runs `rounds` times on a fresh broker,
/// the two alternating which goes first, so that neither always meets a warmer machine.
pub async fn throughput(bins: &Binaries, n: usize, rounds: usize) -> Throughput {
    let (mut pairs, mut scheduler_outcomes) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        let (relay, ours) = if round % 2 == 0 {
            let r = relay_due(n).await;
            (r, deliver_due(bins, "bench-tp", n, false).await)
        } else {
            let s = deliver_due(bins, "bench-tp", n, false).await;
            (relay_due(n).await, s)
        };
        note(format!(
            "throughput round {}: relay {:.0}/s, scheduler {:.0}/s",
            round + 1,
            relay.rate(),
            ours.rate()
        ));
        pairs.push((relay.rate(), ours.rate()));
        scheduler_outcomes.push(ours);
    }
    Throughput {
        rounds: pairs,
        scheduler_outcomes,
        with_ids: deliver_due(bins, "bench-tp-ids", n, true).await,
    }
}

/// A relay process started by [`start_relay`], and its output.
struct Relay {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// The relay as a process of its own, like the scheduler: this benchmark's binary again, with
/// `--relay` (see [`relay_main`]). Returns once the relay holds its partitions and a connection
/// to the broker, so that its start-up is not counted as lateness; [`relayed`] waits for it.
async fn start_relay(bootstrap: &str, from: &str, to: &str, n: usize) -> Relay {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().expect("own path");
    let mut child = tokio::process::Command::new(exe)
        .args(["--relay", bootstrap, from, to, &n.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("relay runs");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = lines.next_line().await.expect("the relay's output");
    assert_eq!(line.as_deref(), Some("ready"), "the relay did not start");
    Relay { child, lines }
}

/// Waits for a relay started by [`start_relay`] to copy its records and exit: the CPU seconds
/// it used, as it reported them last.
async fn relayed(mut relay: Relay) -> f64 {
    let last = relay.lines.next_line().await.expect("the relay's output");
    let status = relay.child.wait().await.expect("relay runs");
    assert!(status.success(), "the relay failed");
    last.as_deref()
        .and_then(|l| l.strip_prefix("cpu "))
        .and_then(|s| s.parse().ok())
        .expect("the relay reports its CPU seconds")
}

/// Reads `n` records from `from` and produces each (key, value, headers) to `to` with the
/// scheduler's producer settings, awaiting acknowledgements concurrently: the floor any
/// Kafka-backed scheduler pays per hop. Prints `ready` once it holds its partitions.
pub async fn relay_main(bootstrap: &str, from: &str, to: &str, n: usize) {
    use rdkafka::consumer::Consumer;
    // The scheduler's ingest fetch settings (librdkafka's defaults). Every partition is assigned
    // rather than joined through a group, so that it reads from the moment it says it is ready.
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("relay"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("relay consumer");
    let metadata = consumer
        .fetch_metadata(Some(from), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in metadata.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(from, part.id(), rdkafka::Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let p: rdkafka::producer::FutureProducer = scheduler::kafka::producer_config(bootstrap, &[])
        .create()
        .expect("producer");
    // The scheduler's producer is connected (its idempotent producer id granted) long before
    // the first record it delivers falls due; the relay's must be too, or its first second of
    // records waits for that and its p99 is the producer's start-up (about 1 s here), not its
    // hop. One record under a key no reader expects does it.
    let warm_up = FutureRecord::<[u8], [u8]>::to(to)
        .key(b"relay-warm-up")
        .payload(b"");
    enqueue(&p, warm_up)
        .await
        .await
        .expect("warm-up acknowledged")
        .expect("warm-up delivered");
    println!("ready");
    let mut acks = Vec::with_capacity(n);
    for read in 0..n {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Ok(m)) => m,
            // A relay that copied fewer than it was asked must not pass for a finished one.
            other => panic!("the relay read {read} of {n}, then: {other:?}"),
        };
        let headers = m.headers().map(|h| h.detach());
        let mut rec = FutureRecord::<[u8], [u8]>::to(to);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        acks.push(enqueue(&p, rec).await);
    }
    for ack in futures::future::join_all(acks).await {
        ack.expect("acknowledgement")
            .expect("relayed record delivered");
    }
    let cpu = cpu_seconds(std::process::id()).expect("own /proc/PID/stat");
    println!("cpu {cpu}");
}

// ---- 2. precision ------------------------------------------------------------------------------

pub struct Precision {
    pub rate: usize,
    pub rows: Vec<(String, Outcome)>,
    /// The scheduler's own p99 of acknowledged lateness (the broker's acknowledgement of a
    /// delivery minus its due time), as the upper bound of its histogram bucket, in ms: it tells
    /// whether a late arrival was late into the broker or late out of it to the reader.
    pub acked_p99_ms: Option<f64>,
    /// CPU seconds the relay process and the scheduler process used for their runs: the
    /// relay's whole life, the scheduler's from the first record produced to the last read.
    pub relay_cpu_s: f64,
    pub ours_cpu_s: f64,
}

impl Precision {
    /// The row whose path name starts with `path`.
    fn row(&self, path: &str) -> Option<&Outcome> {
        self.rows
            .iter()
            .find(|(n, _)| n.starts_with(path))
            .map(|(_, o)| o)
    }

    /// The scheduler's row.
    pub fn scheduler(&self) -> Option<&Outcome> {
        self.row("kafka")
    }

    /// The run's [`Step`]: its on-arrival p99s beside each other, and the acknowledged p99.
    pub fn p99s(&self) -> Step {
        let p99 = |path| self.row(path).map_or(0, |o| o.arrival.p99);
        Step {
            rate: self.rate,
            alone: p99("broker alone"),
            ours: p99("kafka"),
            relay: p99("relay"),
            acked: self.acked_p99_ms,
            ours_cpu_s: self.ours_cpu_s,
            relay_cpu_s: self.relay_cpu_s,
        }
    }
}

/// One rate of the steps: the broker alone's, the scheduler's and a relay's on-arrival p99
/// (ms), and the scheduler's acknowledged p99 bucket bound (ms).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub rate: usize,
    pub alone: i64,
    pub ours: i64,
    /// A one-hop relay's, at the same rate on the same broker.
    pub relay: i64,
    pub acked: Option<f64>,
    /// CPU seconds: the scheduler's and the relay's (see [`Precision`]).
    pub ours_cpu_s: f64,
    pub relay_cpu_s: f64,
}

/// `rate` records per second for `seconds`, each due `delay` after it is produced, through the
/// Kafka scheduler; then, `with_mysql`, the same number of records, falling due at the same rate,
/// through the MySQL baseline polling every 1 s and every 100 ms.
pub async fn precision(
    bins: &Binaries,
    rate: usize,
    seconds: u64,
    delay: Duration,
    with_mysql: bool,
) -> Precision {
    let n = rate * seconds as usize;
    let mut rows = Vec::new();
    let (broker, names) = set_up("bench-prec").await;
    let bootstrap = broker.bootstrap();
    let p = scheduler::kafka::producer_config(&bootstrap, &[])
        .create()
        .expect("producer");

    // The floor: the same records produced straight to a topic and read back, no scheduler.
    let direct = format!("{}-direct", names.target);
    create_topic_on(&bootstrap, &direct, TARGET_PARTITIONS, &[]).await;
    let reading = start_reading(
        &bootstrap,
        &direct,
        TARGET_PARTITIONS,
        (0..n).map(|i| format!("d-{i}")).collect(),
        Duration::from_secs(seconds + 180),
    );
    let due = produce_paced(
        &p,
        &direct,
        &names.target,
        "d",
        rate,
        seconds,
        Duration::ZERO,
    )
    .await;
    note(format!("precision {rate}/s: broker alone, produced"));
    let got = reading.await.expect("reader");
    rows.push((
        "broker alone (produce → read)".to_string(),
        Outcome::of(&got, &due),
    ));
    note(format!("precision {rate}/s: broker alone, read"));

    // The control: the same records through a one-hop relay (a process of its own reading a
    // plain topic and producing to another), which is what the scheduler does with records due
    // within its hold horizon; lateness on arrival after the produce.
    let (relay_in, relay_out) = (format!("{direct}-in"), format!("{}-relay", names.target));
    create_topic_on(&bootstrap, &relay_in, 16, &[]).await;
    create_topic_on(&bootstrap, &relay_out, TARGET_PARTITIONS, &[]).await;
    let reading = start_reading(
        &bootstrap,
        &relay_out,
        TARGET_PARTITIONS,
        (0..n).map(|i| format!("r-{i}")).collect(),
        Duration::from_secs(seconds + 180),
    );
    let relaying = start_relay(&bootstrap, &relay_in, &relay_out, n).await;
    let due = produce_paced(
        &p,
        &relay_in,
        &names.target,
        "r",
        rate,
        seconds,
        Duration::ZERO,
    )
    .await;
    let relay_cpu_s = relayed(relaying).await;
    let got = reading.await.expect("reader");
    rows.push((
        "relay (produce → relay → read)".to_string(),
        Outcome::of(&got, &due),
    ));
    note(format!("precision {rate}/s: relay, read"));

    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, &[]),
        &log_name(&names, "prec"),
    )
    .await;
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        (0..n).map(|i| format!("p-{i}")).collect(),
        delay + Duration::from_secs(seconds + 180),
    );
    let cpu_before = sched.cpu_s();
    let due = produce_paced(&p, &names.ingest, &names.target, "p", rate, seconds, delay).await;
    note(format!("precision {rate}/s: kafka, produced"));
    let got = reading.await.expect("reader");
    let ours_cpu_s = sched.cpu_s() - cpu_before;
    note(format!("precision {rate}/s: kafka, read"));
    rows.push(("kafka scheduler".to_string(), Outcome::of(&got, &due)));
    let acked_p99_ms = sched
        .histogram_quantile("sm_delivery_lateness_seconds", "path=\"kafka\"", 0.99)
        .await
        .map(|s| s * 1000.0);
    sched.stop().await;

    for interval in ["1s", "100ms"].into_iter().filter(|_| with_mysql) {
        let outcome = mysql_run(bins, &broker, n, rate, interval).await;
        rows.push((format!("mysql, poll {interval}"), outcome));
    }
    Precision {
        rate,
        rows,
        acked_p99_ms,
        relay_cpu_s,
        ours_cpu_s,
    }
}

/// `n` rows falling due at `rate` per second, published by the db-scheduler polling every
/// `interval`.
async fn mysql_run(
    bins: &Binaries,
    broker: &Broker,
    n: usize,
    rate: usize,
    interval: &str,
) -> Outcome {
    let bootstrap = broker.bootstrap();
    let url = db_scheduler::testkit::fresh_database().await;
    let topic = unique("bench-mysql");
    create_topic_on(&bootstrap, &topic, TARGET_PARTITIONS, &[]).await;
    let store = Store::connect(&url).await.expect("mysql");
    // Room to insert every row before the first falls due.
    let base = now_ms() + 5_000 + n as i64 / 5;
    let msgs: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage {
            id: format!("m-{i}"),
            topic: topic.clone(),
            key: Some(format!("m-{i}").into_bytes()),
            value: Some(PAYLOAD.to_vec()),
            headers: Vec::new(),
            due: DueTime::from_millis(base + (i as i64 * 1000) / rate as i64).expect("in range"),
        })
        .collect();
    for chunk in msgs.chunks(1000) {
        store.insert(chunk).await.expect("insert");
    }
    let due: HashMap<String, i64> = msgs
        .iter()
        .map(|m| (m.id.clone(), m.due.as_millis()))
        .collect();
    let reading = start_reading(
        &bootstrap,
        &topic,
        TARGET_PARTITIONS,
        due.keys().cloned().collect(),
        Duration::from_secs(600),
    );
    let args = with_flags(
        &db_scheduler::testkit::args(&url, interval, 5000),
        &["--bootstrap-servers", &bootstrap],
    );
    note(format!("mysql {interval}: {n} rows inserted"));
    let mut dbs = Service::start(&bins.db_scheduler, &args, &format!("{topic}.log")).await;
    let got = reading.await.expect("reader");
    note(format!("mysql {interval}: read"));
    dbs.stop().await;
    Outcome::of(&got, &due)
}

// ---- 3. memory ---------------------------------------------------------------------------------

pub struct Memory {
    pub pending: usize,
    pub idle_mib: f64,
    pub pending_mib: f64,
    pub peak_mib: f64,
    pub produce_s: f64,
    pub placed_s: f64,
    /// With ids: seconds to rebuild the index of ids from the state topic, and resident MiB
    /// after it.
    pub rebuild: Option<(f64, f64)>,
    /// The broker alone: records/s one bulk producer wrote the same kind of records to a plain
    /// topic (as many partitions as the ingest topic) on the same broker, before the scheduler
    /// started.
    pub broker_produce_rate: f64,
    /// The control for filing, on the same broker: records/s a one-hop relay copied the same
    /// kind of records from a plain topic while one bulk producer wrote them there (see
    /// [`relay_while_producing`]).
    pub relay_filing_rate: f64,
    /// Without ids: the restart with everything pending (see [`restart`]).
    pub restart: Option<Restart>,
}

impl Memory {
    /// Records/s filed: from the first produced until the last was in its slice.
    pub fn filing_rate(&self) -> f64 {
        self.pending as f64 / self.placed_s
    }

    /// A run that was left out (`--memory-with-ids false`): its figures read as NaN.
    pub fn not_measured(pending: usize) -> Memory {
        Memory {
            pending,
            idle_mib: f64::NAN,
            pending_mib: f64::NAN,
            peak_mib: f64::NAN,
            produce_s: f64::NAN,
            placed_s: f64::NAN,
            rebuild: None,
            broker_produce_rate: f64::NAN,
            relay_filing_rate: f64::NAN,
            restart: None,
        }
    }
}

/// A scheduler restarted with every record still pending, and records due from its start on.
pub struct Restart {
    /// From the new process's spawn to the first record it published within [`ON_TIME_MS`] of
    /// its due time.
    pub first_on_time_s: f64,
    /// Records due in the seconds after the start, and how late each was published.
    pub outcome: Outcome,
}

/// What counts as on time after a restart: published within this of the due time (the safety
/// margin's order of magnitude).
pub const ON_TIME_MS: i64 = 100;

/// Resident memory of an idle scheduler, then with `pending` records due between one and two
/// hours later: all of them written to slices, none held in memory.
pub async fn memory(bins: &Binaries, pending: usize, with_ids: bool) -> Memory {
    let (broker, names) = set_up(if with_ids {
        "bench-mem-ids"
    } else {
        "bench-mem"
    })
    .await;
    let bootstrap = broker.bootstrap();
    let broker_produce_rate = plain_produce_rate(&broker, &names, pending.min(200_000)).await;
    let relay_filing_rate = relay_while_producing(&broker, &names, pending.min(200_000)).await;
    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, &[]),
        &log_name(&names, "mem"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_mib, _) = sched.memory_mib();

    let started = std::time::Instant::now();
    let hour = 3_600_000i64;
    let base = now_ms() + hour;
    let p = bulk_producer(&bootstrap);
    let producing = {
        let (p, ingest, target) = (p.clone(), names.ingest.clone(), names.target.clone());
        tokio::spawn(async move {
            let records = (0..pending)
                .map(move |i| (format!("m-{i}"), base + (i as i64 * hour) / pending as i64));
            if with_ids {
                produce_bulk_ids(&p, &ingest, &target, records).await.len()
            } else {
                produce_bulk(&p, &ingest, &target, records).await.len()
            }
        })
    };
    let mut produced: Option<(usize, f64)> = None;
    let mut peak = idle_mib;
    let mut last_report = std::time::Instant::now();
    let mut producing = Some(producing);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(done) = producing.take_if(|p| p.is_finished()) {
            let acknowledged = done.await.expect("producer");
            produced = Some((acknowledged, started.elapsed().as_secs_f64()));
        }
        let placed = sched.metric("sm_slice_writes_total").await as usize;
        peak = peak.max(sched.memory_mib().0);
        if last_report.elapsed() > Duration::from_secs(15) {
            note(format!(
                "memory: {placed} of {pending} placed in slices, RSS {:.0} MiB",
                sched.memory_mib().0
            ));
            last_report = std::time::Instant::now();
        }
        if produced.is_some_and(|(acknowledged, _)| placed >= acknowledged) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3_600),
            "{placed} of {pending} placed after an hour"
        );
    }
    let placed_s = started.elapsed().as_secs_f64();
    let (pending, produce_s) = produced.unwrap_or((pending, placed_s));
    // Settled: nothing more to do until the first falls due in an hour.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (pending_mib, hwm) = sched.memory_mib();
    let (rebuild, restart) = if with_ids {
        (
            Some(rebuild_index(bins, &broker, &names, &mut sched).await),
            None,
        )
    } else {
        (None, Some(restart(bins, &broker, &names, &mut sched).await))
    };
    Memory {
        broker_produce_rate,
        relay_filing_rate,
        restart,
        pending,
        idle_mib,
        pending_mib,
        peak_mib: peak.max(hwm),
        produce_s,
        placed_s,
        rebuild,
    }
}

/// The broker alone: the rate at which one bulk producer writes `n` records like the
/// benchmark's (due an hour later, same headers and value) to a plain topic with the ingest
/// topic's partitions.
async fn plain_produce_rate(broker: &Broker, names: &Names, n: usize) -> f64 {
    let plain = format!("{}-plain", names.target);
    create_topic_on(&broker.bootstrap(), &plain, 16, &[]).await;
    let started = std::time::Instant::now();
    let took = produce_hour_ahead(&broker.bootstrap(), &plain, &names.target, "b", n).await;
    let rate = took as f64 / started.elapsed().as_secs_f64();
    note(format!(
        "broker alone: {took} records produced at {rate:.0}/s"
    ));
    rate
}

/// Writes `n` records like the benchmark's (keys `<prefix>-<i>`, all due an hour later, for
/// `target`) to `topic` from one bulk producer: how many the broker acknowledged.
async fn produce_hour_ahead(
    bootstrap: &str,
    topic: &str,
    target: &str,
    prefix: &str,
    n: usize,
) -> usize {
    let p = bulk_producer(bootstrap);
    let at = now_ms() + 3_600_000;
    let records = (0..n).map(|i| (format!("{prefix}-{i}"), at));
    produce_bulk(&p, topic, target, records).await.len()
}

/// The control for filing: a one-hop relay reading a plain topic (the ingest topic's partitions)
/// while one bulk producer writes `n` records like the benchmark's there, as the scheduler reads
/// ingest while the user's producer writes it. Filing costs the broker the same per record: the
/// user's write, one read and one write elsewhere. Records/s from the first produced to the last
/// relayed and acknowledged.
async fn relay_while_producing(broker: &Broker, names: &Names, n: usize) -> f64 {
    let bootstrap = broker.bootstrap();
    let (from, to) = (
        format!("{}-relay-in", names.target),
        format!("{}-relay-out", names.target),
    );
    create_topic_on(&bootstrap, &from, 16, &[]).await;
    create_topic_on(&bootstrap, &to, 16, &[]).await;
    let relay = start_relay(&bootstrap, &from, &to, n).await;
    let started = std::time::Instant::now();
    let produced = produce_hour_ahead(&bootstrap, &from, &names.target, "r", n).await;
    relayed(relay).await;
    let rate = produced as f64 / started.elapsed().as_secs_f64();
    note(format!(
        "relay beside the producer: {produced} records filed at {rate:.0}/s"
    ));
    rate
}

/// Stops the scheduler (everything it filed still pending), produces records due every 20 ms
/// over the 10 s after it starts again, and starts it: how soon it publishes on time, with its
/// slices to take over and its ingest to catch up.
async fn restart(bins: &Binaries, broker: &Broker, names: &Names, sched: &mut Service) -> Restart {
    sched.stop().await;
    let bootstrap = broker.bootstrap();
    let p = bulk_producer(&bootstrap);
    // Due from just after the spawn: the first it can meet tells when it is ready.
    let from = now_ms() + 300;
    let records: Vec<(String, i64)> = (0..500)
        .map(|i| (format!("restart-{i}"), from + i * 20))
        .collect();
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        records.iter().map(|(id, _)| id.clone()).collect(),
        Duration::from_secs(300),
    );
    let due = produce_bulk(&p, &names.ingest, &names.target, records).await;
    let spawned = now_ms();
    let again = Service::start(
        &bins.scheduler,
        &scheduler_args(broker, names, &[]),
        &log_name(names, "mem-restart"),
    )
    .await;
    let got = reading.await.expect("reader");
    let first_on_time = got
        .iter()
        .filter(|r| {
            due.get(&key_of(r))
                .is_some_and(|&d| r.timestamp_ms - d <= ON_TIME_MS)
        })
        .map(|r| r.timestamp_ms)
        .min();
    *sched = again;
    let first_on_time_s = first_on_time.map_or(f64::NAN, |t| (t - spawned) as f64 / 1000.0);
    note(format!(
        "restart: first on-time delivery {first_on_time_s:.1} s after the start"
    ));
    Restart {
        first_on_time_s,
        outcome: Outcome::of(&got, &due),
    }
}

/// Stops the scheduler, deletes its index of ids, and starts it again: the seconds until the
/// rebuilt index is fresh (every fact in the state topic read), and the resident MiB then.
async fn rebuild_index(
    bins: &Binaries,
    broker: &Broker,
    names: &Names,
    sched: &mut Service,
) -> (f64, f64) {
    sched.stop().await;
    let dir = std::env::temp_dir()
        .join("sm-test-state")
        .join(&names.group);
    let _ = std::fs::remove_dir_all(&dir);
    let started = std::time::Instant::now();
    let again = Service::start(
        &bins.scheduler,
        &scheduler_args(broker, names, &[]),
        &log_name(names, "mem-rebuild"),
    )
    .await;
    loop {
        let fresh = again
            .get("/api/schedules/no-such-id")
            .await
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|b| b["fresh_as_of"].is_string());
        if fresh {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1_800),
            "the index was not rebuilt in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rebuild_s = started.elapsed().as_secs_f64();
    note(format!("index rebuilt in {rebuild_s:.1} s"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (mib, _) = again.memory_mib();
    *sched = again;
    (rebuild_s, mib)
}

// ---- 4. burst ----------------------------------------------------------------------------------

pub struct Burst {
    pub n: usize,
    pub outcome: Outcome,
    /// Lateness of arrivals against the one due instant.
    pub last_ms: i64,
    /// How long the broker took to accept the `n` records from one producer (the scheduler
    /// running beside it).
    pub accept_ms: i64,
}

/// `n` records due in the same millisecond, produced ahead of time: how long until the last one
/// is delivered, and how late the rest are.
pub async fn burst(bins: &Binaries, n: usize) -> Burst {
    burst_with(bins, n, &[]).await
}

/// [`burst`] with more scheduler flags (`extra`).
pub async fn burst_with(bins: &Binaries, n: usize, extra: &[&str]) -> Burst {
    let (outcome, at, _, accept_ms) = one_instant(bins, "burst", n, PAYLOAD, 20_000, extra).await;
    Burst {
        n,
        accept_ms,
        last_ms: outcome.last_ms - at,
        outcome,
    }
}

/// `n` records with `payload` due in one instant, produced ahead of time (`lead_ms`, plus time
/// to produce and file them) while the scheduler runs: what arrived, the instant, the
/// scheduler's peak resident memory, and the ms the broker took to accept them all.
async fn one_instant(
    bins: &Binaries,
    name: &str,
    n: usize,
    payload: &[u8],
    lead_ms: i64,
    extra: &[&str],
) -> (Outcome, i64, f64, i64) {
    let (broker, names) = set_up(&format!("bench-{name}")).await;
    let bootstrap = broker.bootstrap();
    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, extra),
        &log_name(&names, name),
    )
    .await;
    // Time to produce and file them all (2,000-4,000 per second here) before they fall due.
    let at = now_ms() + lead_ms + n as i64 / 2;
    let ids: Vec<String> = (0..n).map(|i| format!("{name}-{i}")).collect();
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        ids.clone(),
        Duration::from_secs(900),
    );
    let p = bulk_producer(&bootstrap);
    let producing = now_ms();
    let due = produce_bulk_with(
        &p,
        &names.ingest,
        &names.target,
        ids.into_iter().map(|id| (id, at)),
        payload,
    )
    .await;
    let accept_ms = now_ms() - producing;
    note(format!(
        "{name}: {n} x {} B produced, due in {:.1} s",
        payload.len(),
        (at - now_ms()) as f64 / 1000.0
    ));
    let got = reading.await.expect("reader");
    let outcome = Outcome::of(&got, &due);
    let (_, peak_mib) = sched.memory_mib();
    sched.stop().await;
    (outcome, at, peak_mib, accept_ms)
}

// ---- 4b. memory under load --------------------------------------------------------------------

/// One load on the memory budget, and what it cost.
pub struct Pressure {
    pub n: usize,
    pub bytes: usize,
    pub outcome: Outcome,
    /// Peak resident memory of the scheduler process over the whole run (VmHWM).
    pub peak_mib: f64,
    /// From the scheduler's start (backlog) or the due instant (burst) to the last delivery.
    pub drain_s: f64,
}

/// A backlog after an outage: `n` records of `bytes` each, all already past due, produced while
/// no scheduler runs; then the scheduler starts and delivers them. Peak resident memory with the
/// default `--memory-budget`.
pub async fn backlog(bins: &Binaries, n: usize, bytes: usize) -> Pressure {
    let (broker, names) = set_up("bench-backlog").await;
    let bootstrap = broker.bootstrap();
    let args = scheduler_args(&broker, &names, &[]);
    // Started once so that its topics exist as it creates them; stopped for the "outage".
    Service::scheduler(&bins.scheduler, &args, &log_name(&names, "backlog-0"))
        .await
        .stop()
        .await;
    let payload = vec![b'x'; bytes];
    let at = now_ms() - 1_000;
    let p = bulk_producer(&bootstrap);
    let due = produce_bulk_with(
        &p,
        &names.ingest,
        &names.target,
        (0..n).map(|i| (format!("p-{i}"), at)),
        &payload,
    )
    .await;
    note(format!("backlog: {n} x {bytes} B produced, past due"));
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        due.keys().cloned().collect(),
        Duration::from_secs(900),
    );
    let started = now_ms();
    let mut sched = Service::scheduler(&bins.scheduler, &args, &log_name(&names, "backlog")).await;
    let got = reading.await.expect("reader");
    let outcome = Outcome::of(&got, &due);
    let (_, peak_mib) = sched.memory_mib();
    sched.stop().await;
    Pressure {
        n,
        bytes,
        drain_s: (outcome.last_ms - started) as f64 / 1000.0,
        outcome,
        peak_mib,
    }
}

/// `n` records of `bytes` each due in one instant, produced ahead of time while the scheduler
/// runs: peak resident memory (filing them into slices, holding and delivering them) with the
/// default `--memory-budget`.
pub async fn large_burst(bins: &Binaries, n: usize, bytes: usize) -> Pressure {
    let (outcome, at, peak_mib, _) =
        one_instant(bins, "lburst", n, &vec![b'x'; bytes], 30_000, &[]).await;
    Pressure {
        n,
        bytes,
        drain_s: (outcome.last_ms - at) as f64 / 1000.0,
        outcome,
        peak_mib,
    }
}

// ---- 5. recovery -------------------------------------------------------------------------------

pub struct Recovery {
    pub what: &'static str,
    pub outcome: Outcome,
    /// From the fault to the first delivery that could only come after it.
    pub resumed_s: f64,
    /// How long the fault lasted (the broker's downtime; 0 for a restarted scheduler).
    pub down_s: f64,
}

/// The fault to inject halfway through a run.
#[derive(Clone, Copy)]
pub enum Fault {
    /// `kill -9` of the scheduler, restarted at once (same static member id).
    KillScheduler,
    /// `kill -9` of the broker, restarted after a second on the same storage.
    RestartBroker,
    /// Two instances share the work; `kill -9` of one, restarted at once (same static member id)
    /// or not at all (the other takes its partitions once the broker notices it gone).
    KillOneOfTwo { restart: bool },
}

/// `rate` records per second for `seconds`, each due `delay` later; halfway through, `fault`.
/// Lost (must be 0), duplicated, and seconds until deliveries resume.
pub async fn recovery(
    bins: &Binaries,
    fault: Fault,
    rate: usize,
    seconds: u64,
    delay: Duration,
) -> Recovery {
    let (mut broker, names) = set_up("bench-rec").await;
    let bootstrap = broker.bootstrap();
    let instance = format!("{}-1", names.group);
    let args = scheduler_args(&broker, &names, &["--instance-id", &instance]);
    let mut sched = Service::scheduler(&bins.scheduler, &args, &log_name(&names, "rec-1")).await;
    // The other of two instances: its own member id and index directory.
    let other = match fault {
        Fault::KillOneOfTwo { .. } => {
            let instance = format!("{}-2", names.group);
            let dir = std::env::temp_dir()
                .join("sm-test-state")
                .join(&instance)
                .to_string_lossy()
                .into_owned();
            let args = scheduler_args(
                &broker,
                &names,
                &["--instance-id", &instance, "--state-dir", &dir],
            );
            Some(Service::scheduler(&bins.scheduler, &args, &log_name(&names, "rec-other")).await)
        }
        _ => None,
    };
    let n = rate * seconds as usize;
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        (0..n).map(|i| format!("r-{i}")).collect(),
        delay + Duration::from_secs(seconds + 300),
    );
    let producing = {
        let p = bulk_producer(&bootstrap);
        let (ingest, target) = (names.ingest.clone(), names.target.clone());
        tokio::spawn(
            async move { produce_paced(&p, &ingest, &target, "r", rate, seconds, delay).await },
        )
    };
    tokio::time::sleep(delay + Duration::from_secs(seconds / 2)).await;
    let fault_at = now_ms();
    let (what, back_at, second) = match fault {
        Fault::KillScheduler => {
            sched.kill9();
            let second = Service::start(&bins.scheduler, &args, &log_name(&names, "rec-2")).await;
            (
                "scheduler kill -9, restarted at once",
                fault_at,
                Some(second),
            )
        }
        Fault::RestartBroker => {
            tokio::task::block_in_place(|| broker.kill_and_restart(Duration::from_secs(1)));
            ("broker kill -9, restarted after 1 s", now_ms(), None)
        }
        Fault::KillOneOfTwo { restart: true } => {
            sched.kill9();
            let second = Service::start(&bins.scheduler, &args, &log_name(&names, "rec-2")).await;
            (
                "one of two schedulers kill -9, restarted at once",
                fault_at,
                Some(second),
            )
        }
        Fault::KillOneOfTwo { restart: false } => {
            sched.kill9();
            (
                "one of two schedulers kill -9, not restarted",
                fault_at,
                None,
            )
        }
    };
    let due = producing.await.expect("producer");
    let got = reading.await.expect("reader");
    // After a scheduler restart: the first record the new process published (its timestamp is
    // set when produced). After a broker restart: the first record read after it came back
    // (records queued during the outage keep the timestamp of their produce call).
    let resumed = match fault {
        // The other instance never stopped: the figure that counts is the worst lateness.
        Fault::KillOneOfTwo { .. } => None,
        Fault::KillScheduler => got
            .iter()
            .map(|r| r.timestamp_ms)
            .filter(|&t| t > fault_at)
            .min(),
        Fault::RestartBroker => got
            .iter()
            .map(|r| r.received_ms)
            .filter(|&t| t > back_at)
            .min(),
    };
    sched.stop().await;
    for mut s in [second, other].into_iter().flatten() {
        s.stop().await;
    }
    Recovery {
        what,
        outcome: Outcome::of(&got, &due),
        resumed_s: resumed.map_or(f64::NAN, |t| (t - fault_at) as f64 / 1000.0),
        down_s: (back_at - fault_at) as f64 / 1000.0,
    }
}

// ---- 0. an ordinary client at a steady rate ----------------------------------------------------

/// One mode of `steady_client.py`, as it printed it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ClientFigures {
    pub achieved_ratio: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub early: usize,
    pub missing: usize,
    pub duplicates: usize,
    pub broker_cpu_s: Option<f64>,
}

pub struct Client {
    pub rate: usize,
    /// The same producer to a plain topic, nothing else running: the broker alone.
    pub alone: ClientFigures,
    /// To a plain topic that a relay (consume, produce; one hop) copies to the target.
    pub relay: ClientFigures,
    /// To the ingest topic, the scheduler running beside, due `delay` later.
    pub scheduler: ClientFigures,
}

/// The Python that runs the ordinary client: `SM_PYTHON`, else the stack's environment, which
/// `./messagescheduler.sh --stack` fills with confluent-kafka.
fn python() -> String {
    std::env::var("SM_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/venv/bin/python").to_string()
    })
}

/// Runs a Python script of the benches (`args[0]`) and parses the JSON line it prints last.
async fn python_json<T: serde::de::DeserializeOwned>(args: &[String]) -> (T, String) {
    let script = args[0].rsplit('/').next().unwrap_or_default().to_string();
    let out = tokio::process::Command::new(python())
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python with confluent-kafka (./messagescheduler.sh --stack installs it)");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default().to_string();
    let parsed =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{script} printed {line:?}: {e}"));
    (parsed, line)
}

/// Runs `steady_client.py` in `mode` and reads its figures.
async fn steady_client(
    broker: &Broker,
    mode: &str,
    ingest: &str,
    rate: usize,
    seconds: u64,
    delay: Duration,
) -> ClientFigures {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/steady_client.py");
    let args = [
        script.to_string(),
        "--bootstrap".into(),
        broker.bootstrap(),
        "--mode".into(),
        mode.into(),
        "--rate".into(),
        rate.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--delay-ms".into(),
        delay.as_millis().to_string(),
        "--ingest".into(),
        ingest.into(),
        "--broker-pid".into(),
        broker.pid().to_string(),
    ];
    let (figures, line): (ClientFigures, String) = python_json(&args).await;
    note(format!("{mode} at {rate}/s: {line}"));
    figures
}

/// An ordinary external client (Python's confluent-kafka, default settings) producing at a
/// steady rate: to a plain topic with nothing else running (the broker alone), through a one-hop
/// relay (the control), and to the ingest topic with the scheduler running beside it. All three on
/// the same fresh broker, one after another.
pub async fn ordinary_client(
    bins: &Binaries,
    rate: usize,
    seconds: u64,
    delay: Duration,
) -> Client {
    let (broker, names) = set_up("bench-client").await;
    let alone = steady_client(&broker, "broker", &names.ingest, rate, seconds, delay).await;
    let relay = steady_client(&broker, "relay", &names.ingest, rate, seconds, delay).await;
    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, &[]),
        &log_name(&names, "client"),
    )
    .await;
    let scheduler = steady_client(&broker, "scheduler", &names.ingest, rate, seconds, delay).await;
    sched.stop().await;
    Client {
        rate,
        alone,
        relay,
        scheduler,
    }
}

// ---- 10. the delivery modes ---------------------------------------------------------------------

/// One delivery mode under the ordinary client at one rate.
pub struct ModeRun {
    pub mode: &'static str,
    pub client: ClientFigures,
    /// The scheduler's own p99 of acknowledgement minus due time (its histogram's bucket
    /// bound): precision at publish.
    pub publish_p99_ms: Option<f64>,
    /// The scheduler's CPU seconds over the run.
    pub cpu_s: f64,
    /// The p99 of a transaction's commit, gate closed (exactly-once; its histogram's bucket
    /// bound).
    pub commit_p99_ms: Option<f64>,
}

/// The two delivery modes side by side, on one fresh broker: the ordinary client to a plain
/// topic (the broker alone), then to the ingest topic with a scheduler in each mode, one after
/// the other, in the order given.
pub async fn delivery_modes(
    bins: &Binaries,
    rate: usize,
    seconds: u64,
    delay: Duration,
    modes: &[&'static str],
) -> (ClientFigures, Vec<ModeRun>) {
    let (broker, names) = set_up("bench-modes").await;
    let alone = steady_client(&broker, "broker", &names.ingest, rate, seconds, delay).await;
    let mut runs = Vec::new();
    for &mode in modes {
        // Each mode its own topics and group on the same broker (the client makes a target
        // topic of its own per run).
        let names = Names::new(&format!("bench-{mode}"));
        let mut sched = Service::scheduler(
            &bins.scheduler,
            &scheduler_args(&broker, &names, &["--delivery", mode]),
            &log_name(&names, mode),
        )
        .await;
        let cpu_before = sched.cpu_s();
        let client = steady_client(&broker, "scheduler", &names.ingest, rate, seconds, delay).await;
        let publish_p99_ms = sched
            .histogram_quantile("sm_delivery_lateness_seconds", "path=\"kafka\"", 0.99)
            .await
            .map(|s| s * 1000.0);
        let cpu_s = sched.cpu_s() - cpu_before;
        let commit_p99_ms = sched
            .histogram_quantile("sm_transaction_commit_seconds", "", 0.99)
            .await
            .map(|s| s * 1000.0);
        sched.stop().await;
        runs.push(ModeRun {
            mode,
            client,
            publish_p99_ms,
            cpu_s,
            commit_p99_ms,
        });
    }
    (alone, runs)
}

// ---- 9. one target failing, and stops under load -------------------------------------------------

/// Two runs of `isolation.py` (an ordinary client scheduling to ten targets) against one
/// scheduler: without a fault, then with the first target deleted a third of the way in.
pub struct Isolation {
    pub baseline: serde_json::Value,
    pub deleted: serde_json::Value,
}

/// On a broker that does not create topics on demand (as operators run Kafka; on the stack's
/// broker a deleted target is simply created again by the next write), an ordinary client
/// schedules `rate` records/s for `seconds` to ten targets, due 2 s later; in the second run the
/// first target is deleted a third of the way in. A shorter run before both warms up.
pub async fn isolation(bins: &Binaries, rate: usize, seconds: u64) -> Isolation {
    let broker = Broker::start_with(&["auto.create.topics.enable=false"]);
    let names = Names::new("bench-isolation");
    let mut sched = Service::scheduler(
        &bins.scheduler,
        &scheduler_args(&broker, &names, &[]),
        &log_name(&names, "isolation"),
    )
    .await;
    let http = sched.http.trim_start_matches("http://").to_string();
    let run = |seconds: u64, delete_after: u64| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/isolation.py");
        let args = [
            script.to_string(),
            "--bootstrap".into(),
            broker.bootstrap(),
            "--ingest".into(),
            names.ingest.clone(),
            "--dlq".into(),
            names.dlq.clone(),
            "--http".into(),
            http.clone(),
            "--rate".into(),
            rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--delete-after".into(),
            delete_after.to_string(),
        ];
        async move {
            let (figures, line): (serde_json::Value, String) = python_json(&args).await;
            note(format!("isolation (delete after {delete_after} s): {line}"));
            figures
        }
    };
    // A first run warms the broker's JIT and the scheduler's connections up; not reported.
    run(seconds.min(10), 0).await;
    let baseline = run(seconds, 0).await;
    let deleted = run(seconds, (seconds / 3).max(1)).await;
    sched.stop().await;
    Isolation { baseline, deleted }
}

/// `tries` clean stops (SIGTERM) of a scheduler under full load, each started afresh: how long
/// each took to exit, with which status, and what a last process then delivered.
pub struct Stops {
    pub exit_s: Vec<f64>,
    /// Exits with status 0 (a non-zero exit says what was left).
    pub clean: usize,
    pub outcome: Outcome,
    pub timeout_s: f64,
}

/// Each try: a scheduler starts, `per_try` records due over the next 3 s are produced at once
/// (the scheduler delivers at full speed), and 1 s later it gets SIGTERM; the time to its exit is
/// measured. A last scheduler then delivers whatever is left; every record must arrive.
pub async fn stops(bins: &Binaries, tries: usize, per_try: usize) -> Stops {
    let (broker, names) = set_up("bench-stops").await;
    let bootstrap = broker.bootstrap();
    create_topic_on(&bootstrap, &names.ingest, 16, &[]).await;
    let p = bulk_producer(&bootstrap);
    let args = scheduler_args(&broker, &names, &[]);
    let timeout_s = 20.0;
    let (mut due, mut exit_s, mut clean) = (HashMap::new(), Vec::new(), 0);
    for t in 0..tries {
        let mut sched = Service::scheduler(
            &bins.scheduler,
            &args,
            &log_name(&names, &format!("stop-{t}")),
        )
        .await;
        let now = now_ms();
        let records = (0..per_try).map(|i| (format!("s{t}-{i}"), now + (i as i64 * 7) % 3_000));
        due.extend(produce_bulk(&p, &names.ingest, &names.target, records).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (took, status) = sched.terminate().await;
        exit_s.push(took.as_secs_f64());
        clean += usize::from(status == Some(0));
    }
    let reading = start_reading(
        &bootstrap,
        &names.target,
        TARGET_PARTITIONS,
        due.keys().cloned().collect(),
        Duration::from_secs(300),
    );
    let mut last = Service::scheduler(&bins.scheduler, &args, &log_name(&names, "stop-last")).await;
    let got = reading.await.expect("reader");
    last.stop().await;
    Stops {
        exit_s,
        clean,
        outcome: Outcome::of(&got, &due),
        timeout_s,
    }
}
