//! `cargo bench -p messenger --bench compare [-- --messages N --rate R --seconds S --burst B]`
//!
//! Side by side on one machine and one broker (the local stack): the Kafka scheduler's throughput
//! beside a plain consume-and-produce relay, its lateness at a fixed rate beside the MySQL
//! baseline polling every 1 s and every 100 ms (the same due times), and a burst due in one
//! instant. Prints a table and writes BENCHMARKS.md with the machine and the command.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use db_scheduler::{NewMessage, Store};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use scheduler::testkit::*;
use scheduler::{DueTime, SystemClock};

/// The default ladder (1 s × 4 up to 1 day, 100 ms margin), as users run it; the test ladder of
/// the testkit is tuned for short tests, not for measuring.
const DEFAULT_LADDER: [&str; 8] = [
    "--smallest-slice",
    "1s",
    "--slice-ratio",
    "4",
    "--largest-slice",
    "1day",
    "--safety-margin",
    "100ms",
];

/// What limits each figure, as far as this machine showed; appended to BENCHMARKS.md.
const LIMITS: &str = "
## What limits these figures

- Everything runs on 2 cores: the broker, MariaDB, the scheduler, the baseline and the readers
  share them, so every figure is a floor for this machine, not for the design.
- The broker is nisshi with SQLite storage. It does not answer a waiting fetch when data arrives
  (a consumer sees a record after half its fetch.wait.max.ms on average), its ListOffsets round
  trips take 30-400 ms under load, and idle polling keeps it at 50-100% of a core.
- Throughput (1): the scheduler's figure includes joining the consumer group; the relay's does
  not. Both pay the broker's produce acknowledgement (acks=all).
- Precision (2): the Kafka path pays three produce acknowledgements and two consumer fetches per
  record on a broker that is CPU-bound here; its tail has not been profiled yet. Level-1 sweeps
  (0.4-1.8 s on this broker: two ListOffsets round trips each, plus reading and re-producing)
  start 2 s (sweep lead 2 x w0) before their window. The MySQL baseline is bounded by its poll
  interval, as expected.
- Burst (4): bounded by the broker's produce rate for the deliveries.
- Not yet measured here: resident memory with 1,000,000 pending, and recovery times after kill -9
  of the scheduler and of the broker (the fault tests in the suite cover correctness: nothing
  lost, none early).
";

struct Args {
    messages: usize,
    rate: usize,
    seconds: u64,
    burst: usize,
}

fn args() -> Args {
    let mut a = Args {
        messages: 20_000,
        rate: 1_000,
        seconds: 10,
        burst: 20_000,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (argv[i].as_str(), value) {
            ("--messages", Some(v)) => a.messages = v,
            ("--rate", Some(v)) => a.rate = v,
            ("--seconds", Some(v)) => a.seconds = v as u64,
            ("--burst", Some(v)) => a.burst = v,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Lateness percentiles (ms) of arrivals: p50, p99, p99.9, max, and how many were early.
fn stats(late: &mut [i64]) -> (i64, i64, i64, i64, usize) {
    late.sort_unstable();
    let pct = |p: f64| late[((late.len() as f64 * p).ceil() as usize).clamp(1, late.len()) - 1];
    let early = late.iter().filter(|l| **l < 0).count();
    (pct(0.5), pct(0.99), pct(0.999), late[late.len() - 1], early)
}

/// Starts reading `topic` now, in the background, until every one of `ids` has arrived (or 3
/// minutes): reading must begin before the records fall due, or the time spent producing them
/// would count as lateness.
fn start_reading(topic: &str, ids: Vec<String>) -> tokio::task::JoinHandle<Vec<Received>> {
    let consumer = reader(topic, 4);
    tokio::spawn(async move {
        collect_all(&consumer, ids.iter(), Vec::new(), Duration::from_secs(180)).await
    })
}

/// Lateness on arrival against `due`, and how many never came.
fn lateness_of(
    got: &[Received],
    due: &HashMap<String, i64>,
) -> ((i64, i64, i64, i64, usize), usize) {
    let mut late: Vec<i64> = got
        .iter()
        .filter_map(|r| Some(r.received_ms - due.get(&r.header("sm-id")?)?))
        .collect();
    let missing = due.len() - by_id(got).len();
    if late.is_empty() {
        late.push(0);
    }
    (stats(&mut late), missing)
}

/// Records already in the ingest topic, due now: how fast does the scheduler move them to their
/// target? And a plain relay of the same records through the same broker.
async fn throughput(n: usize) -> (f64, f64) {
    let names = Names::new("bench-tp");
    create_topic(&names.target, 4).await;
    create_topic(&names.ingest, 16).await;
    let now = now_ms();
    let records: Vec<(String, i64)> = (0..n).map(|i| (format!("t-{i}"), now)).collect();
    schedule_records(&names, &records).await;
    let started = Instant::now();
    let sched = start_in_process_with(&names, &DEFAULT_LADDER).await;
    let got = collect(&reader(&names.target, 4), Duration::from_secs(600), |r| {
        r.len() >= n
    })
    .await;
    let scheduler_rate = got.len() as f64 / started.elapsed().as_secs_f64();
    sched.stop().await.expect("stop");

    // The relay: read the same ingest topic, produce each record to another topic, await acks.
    let relay_target = format!("{}-relay", names.target);
    create_topic(&relay_target, 4).await;
    let consumer = reader(&names.ingest, 16);
    let p = producer();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    let mut read = 0;
    while read < n {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Ok(m)) => m,
            _ => break,
        };
        let mut rec = FutureRecord::<[u8], [u8]>::to(&relay_target);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        if let Ok(f) = p.send_result(rec) {
            pending.push(f);
        }
        read += 1;
    }
    futures::future::join_all(pending).await;
    let relay_rate = read as f64 / started.elapsed().as_secs_f64();
    consumer.unsubscribe();
    (scheduler_rate, relay_rate)
}

/// `rate` messages per second for `seconds`, each due 3 s after it is produced, through the Kafka
/// scheduler; the same due times through the MySQL baseline at each poll interval.
async fn precision(rate: usize, seconds: u64) -> Vec<(String, (i64, i64, i64, i64, usize), usize)> {
    let mut rows = Vec::new();
    let n = rate * seconds as usize;
    // Kafka path.
    let names = Names::new("bench-prec");
    create_topic(&names.target, 4).await;
    let sched = start_in_process_with(&names, &DEFAULT_LADDER).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = producer();
    let reading = start_reading(&names.target, (0..n).map(|i| format!("p-{i}")).collect());
    let started = Instant::now();
    let mut due = HashMap::new();
    let mut sends = Vec::new();
    for i in 0..n {
        let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at.into()).await;
        let d = now_ms() + 3_000;
        let id = format!("p-{i}");
        due.insert(id.clone(), d);
        let (time, topic) = (d.to_string(), names.target.clone());
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header {
                key: "time",
                value: Some(time.as_bytes()),
            })
            .insert(rdkafka::message::Header {
                key: "topic",
                value: Some(topic.as_bytes()),
            })
            .insert(rdkafka::message::Header {
                key: "id",
                value: Some(id.as_bytes()),
            });
        if let Ok(f) = p.send_result(
            FutureRecord::<[u8], [u8]>::to(&names.ingest)
                .key(id.as_bytes())
                .payload(b"x")
                .headers(headers),
        ) {
            sends.push(f);
        }
    }
    futures::future::join_all(sends).await;
    let got = reading.await.expect("reader");
    let (lateness, missing) = lateness_of(&got, &due);
    rows.push(("kafka scheduler".to_string(), lateness, missing));
    sched.stop().await.expect("stop");

    // MySQL path: the same due times, spread the same way, at each poll interval.
    for interval in ["1s", "100ms"] {
        let url = db_scheduler::testkit::fresh_database().await;
        let topic = unique("bench-mysql");
        create_topic(&topic, 4).await;
        let store = Store::connect(&url).await.expect("mysql");
        let base = now_ms() + 5_000;
        let msgs: Vec<NewMessage> = (0..n)
            .map(|i| NewMessage {
                id: format!("m-{i}"),
                topic: topic.clone(),
                key: Some(format!("m-{i}").into_bytes()),
                value: Some(b"x".to_vec()),
                headers: Vec::new(),
                due: DueTime::from_millis(base + (i as i64 * 1000) / rate as i64)
                    .expect("in range"),
            })
            .collect();
        for chunk in msgs.chunks(1000) {
            store.insert(chunk).await.expect("insert");
        }
        let due: HashMap<String, i64> = msgs
            .iter()
            .map(|m| (m.id.clone(), m.due.as_millis()))
            .collect();
        let config = db_scheduler::testkit::config(&url, interval, 5000);
        let reading = start_reading(&topic, due.keys().cloned().collect());
        let dbs = db_scheduler::DbScheduler::start(config, Arc::new(SystemClock))
            .await
            .expect("db-scheduler");
        let got = reading.await.expect("reader");
        let (lateness, missing) = lateness_of(&got, &due);
        rows.push((format!("mysql, poll {interval}"), lateness, missing));
        dbs.stop().await;
    }
    rows
}

/// `n` records due in the same second: until when is the last one delivered?
async fn burst(n: usize) -> ((i64, i64, i64, i64, usize), i64) {
    let names = Names::new("bench-burst");
    create_topic(&names.target, 4).await;
    let sched = start_in_process_with(&names, &DEFAULT_LADDER).await;
    let at = now_ms() + 8_000 + (n as i64 / 10);
    let records: Vec<(String, i64)> = (0..n).map(|i| (format!("b-{i}"), at)).collect();
    schedule_records(&names, &records).await;
    let due: HashMap<String, i64> = records.into_iter().collect();
    let got = collect_all(
        &reader(&names.target, 4),
        due.keys(),
        Vec::new(),
        Duration::from_secs(300),
    )
    .await;
    let last = got.iter().map(|r| r.received_ms).max().unwrap_or(at) - at;
    let mut late: Vec<i64> = got.iter().map(|r| r.received_ms - at).collect();
    sched.stop().await.expect("stop");
    (stats(&mut late), last)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let command = format!(
        "cargo bench -p messenger --bench compare -- --messages {} --rate {} --seconds {} --burst {}",
        a.messages, a.rate, a.seconds, a.burst
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\nCommand (after `./messagescheduler.sh --stack`): `{command}`\n"
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(out, "Machine: {cores} cores ({cpu}), broker: nisshi 0.8.1 with SQLite storage on 127.0.0.1, MariaDB 10.11; bench build profile (optimised); lateness is measured on arrival at a consumer against the due time.\n");

    let (sched_rate, relay_rate) = throughput(a.messages).await;
    let _ = writeln!(
        out,
        "## 1. Throughput ({} records already due)\n\n| path | records/s |\n| --- | --- |",
        a.messages
    );
    let _ = writeln!(out, "| plain consume-and-produce relay | {relay_rate:.0} |\n| Kafka scheduler (ingest → timer → target) | {sched_rate:.0} |\n| ratio | {:.2} |\n", sched_rate / relay_rate);

    let rows = precision(a.rate, a.seconds).await;
    let _ = writeln!(out, "## 2. Precision: {} msg/s for {} s, each due 3 s after it is produced\n\n| path | p50 ms | p99 ms | p99.9 ms | max ms | early | missing |\n| --- | --- | --- | --- | --- | --- | --- |", a.rate, a.seconds);
    for (name, (p50, p99, p999, max, early), missing) in &rows {
        let _ = writeln!(
            out,
            "| {name} | {p50} | {p99} | {p999} | {max} | {early} | {missing} |"
        );
    }
    let ((p50, p99, p999, max, early), last) = burst(a.burst).await;
    let _ = writeln!(out, "\n## 4. Burst: {} records due in the same millisecond\n\n| last delivered after | p50 ms | p99 ms | p99.9 ms | max ms | early |\n| --- | --- | --- | --- | --- | --- |\n| {last} ms | {p50} | {p99} | {p999} | {max} | {early} |", a.burst);
    let _ = writeln!(out, "{}", LIMITS);
    print!("{out}");
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"),
        &out,
    )
    .expect("write BENCHMARKS.md");
}
