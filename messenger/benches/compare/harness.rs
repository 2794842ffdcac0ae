//! What every section of the benchmark needs: the service binaries as child processes (so that
//! each runs in its own process, as in production, and its memory can be read), paced and bulk
//! producers, readers that start before anything falls due, and lateness statistics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use scheduler::testkit::*;

/// The default ladder (250 ms × 4 up to 1 day, 100 ms margin, sweep lead 2), as users run it;
/// the testkit's ladder is tuned for short tests, not for measuring.
pub const DEFAULT_LADDER: [&str; 16] = [
    "--smallest-slice",
    "250ms",
    "--slice-ratio",
    "4",
    "--largest-slice",
    "1day",
    "--safety-margin",
    "100ms",
    // The scheduler's default; the testkit's own ladder pins a shorter one.
    "--hold-horizon",
    "6s",
    "--ingest-partitions",
    "16",
    "--slice-partitions",
    "4",
    "--workers",
    "4",
];

/// A payload the size of the messenger's SMS JSON (about 200 bytes).
pub const PAYLOAD: &[u8] = br#"{"id":"00000000-0000-0000-0000-000000000000","recipient":"+4917612345678","text":"Your appointment is confirmed for tomorrow at 10:30. Reply STOP to unsubscribe.","time":"2026-11-21T10:30:00+01:00","attempt":1}"#;

/// A progress line on stderr, stamped with the seconds since the benchmark began.
pub fn note(what: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.1} s] {what}");
}

/// CPU seconds (user and system) process `pid` has used so far: fields 14 and 15 of
/// /proc/PID/stat, in clock ticks of 1/100 s (Linux's USER_HZ on every architecture it runs on).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are counted from its ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The release binaries of the services, built once before anything is measured.
pub struct Binaries {
    pub scheduler: PathBuf,
    pub db_scheduler: PathBuf,
}

/// Builds the scheduler and the db-scheduler (a no-op when they are up to date): the benchmark
/// runs them as child processes. Release builds for measuring; the smoke test under `cargo test`
/// uses the debug builds the test run has already made. `SM_BENCH_SCHEDULER` names another
/// scheduler binary to measure instead (an earlier commit's build).
pub fn build(release: bool) -> Binaries {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut args = vec!["build", "--bin", "scheduler", "--bin", "db-scheduler"];
    if release {
        args.push("--release");
    }
    let status = Command::new(cargo)
        .args(&args)
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the services failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join(if release { "release" } else { "debug" });
    Binaries {
        // Another build of the scheduler (an earlier commit's, for a before-and-after run).
        scheduler: std::env::var_os("SM_BENCH_SCHEDULER")
            .map_or_else(|| target.join("scheduler"), PathBuf::from),
        db_scheduler: target.join("db-scheduler"),
    }
}

/// A service running as a child process; killed (SIGKILL) when dropped.
pub struct Service {
    child: Option<ChildGuard>,
    pub http: String,
    log: String,
}

impl Service {
    /// Starts `binary` with `args` plus `--http-addr` on a free port, and waits until its
    /// `/healthz` answers.
    pub async fn start(binary: &Path, args: &[String], log: &str) -> Service {
        let port = free_port();
        let args = with_flags(args, &["--http-addr", &format!("127.0.0.1:{port}")]);
        let child = spawn_binary(&binary.to_string_lossy(), &args, log);
        let mut service = Service {
            child: Some(child),
            http: format!("http://127.0.0.1:{port}"),
            log: log.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while service.get("/healthz").await.is_none() {
            let exited = service
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let log = std::env::temp_dir().join(log);
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{}: /healthz never answered ({exited:?}); its log: {}",
                binary.display(),
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        service
    }

    /// Starts a scheduler and waits until the group has given it partitions, so that what is
    /// measured next is the scheduler working, not the group forming.
    pub async fn scheduler(binary: &Path, args: &[String], log: &str) -> Service {
        let s = Service::start(binary, args, log).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let assigned = s
                .get("/healthz")
                .await
                .and_then(|h| serde_json::from_str::<serde_json::Value>(&h).ok())
                .and_then(|h| h["assigned_partitions"].as_u64())
                .unwrap_or(0);
            if assigned > 0 {
                note(format!("scheduler up with {assigned} partitions"));
                return s;
            }
            assert!(Instant::now() < deadline, "{log}: no partitions assigned");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Option<String> {
        let r = reqwest::get(format!("{}{path}", self.http)).await.ok()?;
        r.text().await.ok()
    }

    /// The sum of every series of a counter or gauge in `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        scheduler::testkit::metric_in(&text, name)
    }

    /// The `q` quantile of a histogram in `/metrics`, as the upper bound of the bucket it falls
    /// in (seconds), over the series whose labels contain `labels`; None without observations.
    pub async fn histogram_quantile(&self, name: &str, labels: &str, q: f64) -> Option<f64> {
        let text = self.get("/metrics").await?;
        bucket_quantile(&text, name, labels, q)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// CPU seconds the process has used so far (user and system).
    pub fn cpu_s(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(f64::NAN)
    }

    /// Resident memory now and at its peak, in MiB (`VmRSS`, `VmHWM` of /proc/PID/status).
    pub fn memory_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGKILL: nothing is flushed or committed.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&mut c);
        }
    }

    /// SIGTERM without waiting first: the time until the process exited, and its exit code.
    pub async fn terminate(&mut self) -> (Duration, Option<i32>) {
        let Some(mut c) = self.child.take() else {
            return (Duration::ZERO, None);
        };
        let started = std::time::Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let status = tokio::task::block_in_place(|| c.wait());
        (started.elapsed(), status.ok().and_then(|s| s.code()))
    }

    /// Keeps its final `/metrics` beside its log (`<log>.metrics`, for a closer look), then
    /// SIGTERM, and waits for the clean stop.
    pub async fn stop(&mut self) {
        if let Some(text) = self.get("/metrics").await {
            let _ = std::fs::write(
                std::env::temp_dir().join(format!("{}.metrics", self.log)),
                text,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A producer tuned for bulk: large batches, a deep queue.
pub fn bulk_producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer")
}

/// A record for the ingest topic: `time`, `topic` and `id` headers, keyed by its id.
fn scheduled<'a>(
    ingest: &'a str,
    target: &str,
    id: &'a str,
    due_ms: i64,
    payload: &'a [u8],
    with_id: bool,
) -> FutureRecord<'a, [u8], [u8]> {
    let time = due_ms.to_string();
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "time",
            value: Some(time.as_bytes()),
        })
        .insert(Header {
            key: "topic",
            value: Some(target.as_bytes()),
        });
    // The key names the record for the readers either way; an `id` header makes it a record
    // that can be cancelled, and costs its facts (issue #13).
    let headers = if with_id {
        headers.insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        })
    } else {
        headers
    };
    FutureRecord::to(ingest)
        .key(id.as_bytes())
        .payload(payload)
        .headers(headers)
}

/// Enqueues without waiting for the acknowledgement, waiting only while the local queue is full.
pub async fn enqueue(p: &FutureProducer, rec: FutureRecord<'_, [u8], [u8]>) -> DeliveryFuture {
    let mut rec = rec;
    loop {
        match p.send_result(rec) {
            Ok(f) => return f,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
}

/// Records produced and not yet acknowledged, at most: more would wait in the producer's queue
/// long enough to time out on a slow broker.
const MAX_UNACKED: usize = 20_000;

/// Awaits acknowledgements, counting failures (a failed produce is not the scheduler's loss, so
/// such records are left out of what is expected).
#[derive(Default)]
pub struct Acks {
    pending: FuturesUnordered<tokio::task::JoinHandle<Option<String>>>,
    failed: Vec<String>,
}

impl Acks {
    /// Adds an acknowledgement to wait for; waits for older ones first when too many are open.
    async fn push(&mut self, id: String, f: DeliveryFuture) {
        while self.pending.len() >= MAX_UNACKED {
            self.next().await;
        }
        // An acknowledgement without an offset is no proof that the record is in the topic
        // (scheduler::kafka::confirmed): such a record is not expected from the scheduler.
        self.pending.push(tokio::spawn(async move {
            match f
                .await
                .map(|r| scheduler::kafka::confirmed(r.map_err(|(e, _)| e)))
            {
                Ok(Ok(_)) => None,
                _ => Some(id),
            }
        }));
    }

    async fn next(&mut self) -> bool {
        match self.pending.next().await {
            Some(r) => {
                if let Ok(Some(id)) = r {
                    self.failed.push(id);
                }
                true
            }
            None => false,
        }
    }

    /// Waits for every acknowledgement; returns the ids whose produce failed.
    pub async fn failed(mut self) -> Vec<String> {
        while self.next().await {}
        if !self.failed.is_empty() {
            note(format!(
                "{} records were not acknowledged by the broker",
                self.failed.len()
            ));
        }
        self.failed
    }
}

/// Records produced so far (id -> due ms) and the acknowledgements still open.
#[derive(Default)]
struct Produced {
    acks: Acks,
    due: HashMap<String, i64>,
    /// Whether the records carry an `id` header.
    with_id: bool,
}

impl Produced {
    async fn send(&mut self, p: &FutureProducer, ingest: &str, target: &str, id: String, at: i64) {
        self.send_with(p, ingest, target, id, at, PAYLOAD).await
    }

    async fn send_with(
        &mut self,
        p: &FutureProducer,
        ingest: &str,
        target: &str,
        id: String,
        at: i64,
        payload: &[u8],
    ) {
        let f = enqueue(p, scheduled(ingest, target, &id, at, payload, self.with_id)).await;
        self.acks.push(id.clone(), f).await;
        self.due.insert(id, at);
    }

    /// Waits for every acknowledgement; returns id -> due of the records the broker took.
    async fn acknowledged(mut self) -> HashMap<String, i64> {
        for id in self.acks.failed().await {
            self.due.remove(&id);
        }
        self.due
    }
}

/// Produces `(id, due)` records to `ingest` as fast as the broker takes them.
pub async fn produce_bulk(
    p: &FutureProducer,
    ingest: &str,
    target: &str,
    records: impl IntoIterator<Item = (String, i64)>,
) -> HashMap<String, i64> {
    produce_bulk_with(p, ingest, target, records, PAYLOAD).await
}

/// [`produce_bulk`], each record with an `id` header (its key): records that can be cancelled.
pub async fn produce_bulk_ids(
    p: &FutureProducer,
    ingest: &str,
    target: &str,
    records: impl IntoIterator<Item = (String, i64)>,
) -> HashMap<String, i64> {
    produce_records(p, ingest, target, records, PAYLOAD, true).await
}

/// [`produce_bulk`] with values of the caller's choosing.
pub async fn produce_bulk_with(
    p: &FutureProducer,
    ingest: &str,
    target: &str,
    records: impl IntoIterator<Item = (String, i64)>,
    payload: &[u8],
) -> HashMap<String, i64> {
    produce_records(p, ingest, target, records, payload, false).await
}

/// The one bulk loop: every record enqueued as fast as the producer takes it, then every
/// acknowledgement awaited; returns id -> due of the records the broker took.
async fn produce_records(
    p: &FutureProducer,
    ingest: &str,
    target: &str,
    records: impl IntoIterator<Item = (String, i64)>,
    payload: &[u8],
    with_id: bool,
) -> HashMap<String, i64> {
    let mut produced = Produced {
        with_id,
        ..Produced::default()
    };
    for (id, at) in records {
        produced.send_with(p, ingest, target, id, at, payload).await;
    }
    produced.acknowledged().await
}

/// Produces `rate` records per second for `seconds`, each due `delay` after it is produced;
/// ids are `prefix-N`. Returns id -> due (ms) of the records the broker acknowledged.
pub async fn produce_paced(
    p: &FutureProducer,
    ingest: &str,
    target: &str,
    prefix: &str,
    rate: usize,
    seconds: u64,
    delay: Duration,
) -> HashMap<String, i64> {
    let n = rate * seconds as usize;
    let delay_ms = delay.as_millis() as i64;
    let mut produced = Produced::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0;
    while sent < n {
        tick.tick().await;
        let by_now = ((started.elapsed().as_secs_f64() * rate as f64) as usize + 1).min(n);
        while sent < by_now {
            let at = now_ms() + delay_ms;
            produced
                .send(p, ingest, target, format!("{prefix}-{sent}"), at)
                .await;
            sent += 1;
        }
    }
    produced.acknowledged().await
}

/// Starts reading `topic` now, in the background, until every one of `ids` has arrived (or
/// `deadline`): reading must begin before the records fall due, or the time spent producing them
/// would count as lateness.
pub fn start_reading(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    ids: Vec<String>,
    deadline: Duration,
) -> tokio::task::JoinHandle<Vec<Received>> {
    let consumer = reader_on(bootstrap, topic, partitions);
    tokio::spawn(async move {
        let mut waiting: std::collections::HashSet<String> = ids.into_iter().collect();
        let mut seen = 0;
        let got = collect(&consumer, deadline, |r| {
            for x in &r[seen..] {
                waiting.remove(&key_of(x));
            }
            seen = r.len();
            waiting.is_empty()
        })
        .await;
        let tail = collect(&consumer, Duration::from_millis(1_500), |_| false).await;
        got.into_iter().chain(tail).collect()
    })
}

/// A benchmark record's name: its key (records with and without an `id` header alike).
pub fn key_of(r: &Received) -> String {
    String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned()
}

/// Percentiles of a set of lateness values, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: i64,
    pub p99: i64,
    pub p999: i64,
    pub max: i64,
}

impl Percentiles {
    /// Summarised by the workspace's one latency definition ([`scheduler::latency::Latency`]).
    pub fn of(v: Vec<i64>) -> Percentiles {
        let s = scheduler::latency::Latency::of(v).summary();
        Percentiles {
            p50: s.p50_ms.unwrap_or(0),
            p99: s.p99_ms.unwrap_or(0),
            p999: s.p999_ms.unwrap_or(0),
            max: s.max_ms.unwrap_or(0),
        }
    }
}

/// What arrived, against what was expected.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub expected: usize,
    pub missing: usize,
    pub duplicates: usize,
    /// Published or received before the due time.
    pub early: usize,
    /// Arrival at the reader minus the due time (what a user sees).
    pub arrival: Percentiles,
    /// The record's timestamp (set when the scheduler produced it) minus the due time: the
    /// scheduler's own lateness, without the reader's fetch.
    pub publish: Percentiles,
    pub first_ms: i64,
    pub last_ms: i64,
}

impl Outcome {
    /// `got` measured against `due` (id -> due ms); a record is matched by its key.
    pub fn of(got: &[Received], due: &HashMap<String, i64>) -> Outcome {
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(due.len());
        let (mut arrival, mut publish, mut early) = (Vec::new(), Vec::new(), 0);
        let (mut first_ms, mut last_ms) = (i64::MAX, 0);
        for r in got {
            let id = key_of(r);
            let Some(&d) = due.get(&id) else { continue };
            *seen.entry(id).or_default() += 1;
            first_ms = first_ms.min(r.received_ms);
            last_ms = last_ms.max(r.received_ms);
            arrival.push(r.received_ms - d);
            publish.push(r.timestamp_ms - d);
            if r.received_ms < d || r.timestamp_ms < d {
                early += 1;
            }
        }
        let delivered: usize = seen.values().sum();
        Outcome {
            expected: due.len(),
            missing: due.len() - seen.len(),
            duplicates: delivered - seen.len(),
            early,
            arrival: Percentiles::of(arrival),
            publish: Percentiles::of(publish),
            first_ms: if first_ms == i64::MAX { 0 } else { first_ms },
            last_ms,
        }
    }

    /// Records per second between the first and the last arrival.
    pub fn rate(&self) -> f64 {
        let span = (self.last_ms - self.first_ms).max(1) as f64 / 1000.0;
        (self.expected - self.missing) as f64 / span
    }
}

/// See [`Service::histogram_quantile`]: reads `name_bucket{...,le="x"} count` lines.
pub fn bucket_quantile(text: &str, name: &str, labels: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(labels))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}
