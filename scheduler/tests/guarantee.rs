//! Issue #30: the cancel guarantee under churn. Two processes, 10,000 ids, random cancels (over
//! Kafka and over HTTP) and reschedules (over Kafka, the only way to reschedule), each made
//! between the cancel lead and 30 s before the due time of the version it replaces, while
//! either process is SIGKILLed at random moments and started again. For every id exactly its
//! last version is delivered (nothing, if its last change is a cancel), none early, and the
//! status by id of both processes agrees once everything settled.
//!
//! The plan is random but seeded; the seed is printed, and `SM_TEST_SEED` replays a run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scheduler::testkit::*;

const IDS: usize = 10_000;
/// The scheduler's `--cancel-lead` (its default).
const LEAD_MS: i64 = 1_000;
/// A change is planned at least this much before the lead, so that the time the test needs to
/// make it (a produce, an HTTP round trip) stays inside the guarantee.
const MARGIN_MS: i64 = 500;
/// The longest lead a change is made with.
const MAX_LEAD_MS: i64 = 30_000;
/// The first version of each id falls due this long after the start, within `SPREAD_MS`.
const FIRST_DUE_MS: i64 = 40_000;
const SPREAD_MS: i64 = 30_000;
/// No change before this (the 10,000 first versions are being produced until then).
const CHANGES_FROM_MS: i64 = 10_000;
const KILLS: usize = 4;
const TARGET_PARTITIONS: i32 = 4;
/// A change made later than the lead before the version it replaces is outside the guarantee:
/// its id is only checked for "never early". More than this share of them and the run proves
/// too little, and fails.
const MAX_UNGUARANTEED_PERCENT: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Kafka,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Cancel(Via),
    /// A new version (`n`, counted per id from 0, the first schedule) due at `due_ms`.
    Reschedule {
        n: u32,
        due_ms: i64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Change {
    at_ms: i64,
    id: usize,
    op: Op,
    /// The due time of the version this change replaces (None: nothing live, after a cancel).
    replaces_due_ms: Option<i64>,
}

/// What the plan means for one id.
#[derive(Debug, Clone, Default)]
struct Expected {
    /// Each version's due time, by `n`.
    dues: Vec<i64>,
    /// The version that must arrive, or None when the last change is a cancel.
    last: Option<u32>,
}

struct Plan {
    first_due: Vec<i64>,
    changes: Vec<Change>,
    expected: Vec<Expected>,
    /// (at, which process, down for) of each kill.
    kills: Vec<(i64, usize, Duration)>,
}

fn plan(rng: &mut StdRng, start: i64) -> Plan {
    let mut first_due = Vec::with_capacity(IDS);
    let mut changes = Vec::new();
    let mut expected = Vec::with_capacity(IDS);
    let min_lead = LEAD_MS + MARGIN_MS;
    for id in 0..IDS {
        let d0 = start + FIRST_DUE_MS + rng.random_range(0..SPREAD_MS);
        first_due.push(d0);
        let mut e = Expected {
            dues: vec![d0],
            last: Some(0),
        };
        let via = |rng: &mut StdRng| {
            if rng.random_bool(0.5) {
                Via::Kafka
            } else {
                Via::Http
            }
        };
        let at1 = (d0 - rng.random_range(min_lead..=MAX_LEAD_MS)).max(start + CHANGES_FROM_MS);
        // A new due time for a reschedule made at `at`: near the old one, and with room after
        // `at` for a change of its own.
        let moved = |rng: &mut StdRng, at: i64, old: i64| {
            (old + rng.random_range(-3_000..=5_000)).max(at + min_lead + 1_000)
        };
        let reschedule = |e: &mut Expected, due: i64| {
            e.dues.push(due);
            let n = (e.dues.len() - 1) as u32;
            e.last = Some(n);
            Op::Reschedule { n, due_ms: due }
        };
        // A change of this id at `at_ms`, replacing the version due at `replaces`.
        let change = |changes: &mut Vec<Change>, at_ms, op, replaces| {
            changes.push(Change {
                at_ms,
                id,
                op,
                replaces_due_ms: replaces,
            })
        };
        match rng.random_range(0..100) {
            0..40 => {
                change(&mut changes, at1, Op::Cancel(via(rng)), Some(d0));
                e.last = None;
            }
            40..60 => {
                let d1 = moved(rng, at1, d0);
                let op = reschedule(&mut e, d1);
                change(&mut changes, at1, op, Some(d0));
            }
            60..70 => {
                // Rescheduled, then the new version cancelled.
                let d1 = moved(rng, at1, d0);
                let op = reschedule(&mut e, d1);
                change(&mut changes, at1, op, Some(d0));
                let at2 = rng.random_range(at1 + 1_000..=d1 - min_lead);
                change(&mut changes, at2, Op::Cancel(via(rng)), Some(d1));
                e.last = None;
            }
            70..75 => {
                // Cancelled, then scheduled again: the newer version wins again.
                change(&mut changes, at1, Op::Cancel(via(rng)), Some(d0));
                let at2 = at1 + rng.random_range(1_000..=5_000);
                let d2 = moved(rng, at2, d0);
                let op = reschedule(&mut e, d2);
                change(&mut changes, at2, op, None);
            }
            _ => {}
        }
        expected.push(e);
    }
    changes.sort_by_key(|c| c.at_ms);
    // Kills spread over the changes, one per stretch, never two at once.
    let stretch = (FIRST_DUE_MS + SPREAD_MS - CHANGES_FROM_MS) / KILLS as i64;
    let kills = (0..KILLS)
        .map(|k| {
            let from = start + CHANGES_FROM_MS + k as i64 * stretch;
            let at = from + rng.random_range(1_000..stretch - 5_000);
            let down = Duration::from_millis(rng.random_range(500..3_000));
            (at, rng.random_range(0..2), down)
        })
        .collect();
    Plan {
        first_due,
        changes,
        expected,
        kills,
    }
}

fn id_of(i: usize) -> String {
    format!("g-{i}")
}

fn value_of(i: usize, n: u32) -> String {
    format!("g-{i}#{n}")
}

/// The two processes, which the killer takes down and starts again.
struct Procs {
    names: Names,
    ports: [u16; 2],
    children: Mutex<[Option<ChildGuard>; 2]>,
    up: [std::sync::atomic::AtomicBool; 2],
}

impl Procs {
    fn start(&self, which: usize) {
        let instance = format!("{}-{which}", self.names.group);
        let log = format!("{}-{which}.log", self.names.group);
        let child = spawn_on_port(
            env!("CARGO_BIN_EXE_scheduler"),
            &self.names,
            &log,
            self.ports[which],
            &["--instance-id", &instance, "--ingest-partitions", "8"],
        );
        self.children.lock().expect("not poisoned")[which] = Some(child);
    }

    fn kill(&self, which: usize) {
        use std::sync::atomic::Ordering;
        self.up[which].store(false, Ordering::SeqCst);
        if let Some(mut child) = self.children.lock().expect("not poisoned")[which].take() {
            kill9(&mut child);
        }
    }

    async fn restarted(&self, which: usize) {
        self.start(which);
        self.ready(which).await;
    }

    /// Waits until `which` answers `ok`; from then on HTTP changes may go to it.
    async fn ready(&self, which: usize) {
        use std::sync::atomic::Ordering;
        answers_ok(self.ports[which]).await;
        self.up[which].store(true, Ordering::SeqCst);
    }

    fn up_ports(&self) -> Vec<u16> {
        use std::sync::atomic::Ordering;
        (0..2)
            .filter(|&w| self.up[w].load(Ordering::SeqCst))
            .map(|w| self.ports[w])
            .collect()
    }
}

/// Cancels `id` over HTTP at a process that is up (the other one, should the first fail);
/// the test's clock once a 2xx came back, or None if none did within 10 s.
async fn cancel_over_http(client: &reqwest::Client, procs: &Procs, id: &str) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut turn = id.len();
    while Instant::now() < deadline {
        let ports = procs.up_ports();
        if let Some(port) = ports.get(turn % ports.len().max(1)) {
            let sent = client
                .delete(format!("http://127.0.0.1:{port}/api/schedules/{id}"))
                .timeout(Duration::from_secs(3))
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                return Some(now_ms());
            }
        }
        turn += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Makes one change; the test's clock once it was acknowledged (Kafka's ack, or the 2xx).
async fn make(
    change: Change,
    p: &rdkafka::producer::FutureProducer,
    client: &reqwest::Client,
    procs: &Procs,
) -> Option<i64> {
    let id = id_of(change.id);
    let (ingest, target) = (&procs.names.ingest, &procs.names.target);
    match change.op {
        Op::Cancel(Via::Kafka) => {
            let headers = [("id", id.as_bytes()), ("cancel", &b"true"[..])];
            produce(p, ingest, Some(b"anything"), b"", &headers).await;
            Some(now_ms())
        }
        Op::Cancel(Via::Http) => cancel_over_http(client, procs, &id).await,
        Op::Reschedule { n, due_ms } => {
            let time = due_ms.to_string();
            let headers = [
                ("time", time.as_bytes()),
                ("topic", target.as_bytes()),
                ("id", id.as_bytes()),
            ];
            let value = value_of(change.id, n);
            produce(p, ingest, Some(id.as_bytes()), value.as_bytes(), &headers).await;
            Some(now_ms())
        }
    }
}

async fn until(t: i64) {
    let wait = t - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// The status by id each process gives for `ids`; retried until it is `want(i)` at both or
/// `within` passes. Returns the ids where some process still disagrees, with what it said.
async fn statuses_settle(
    procs: &Procs,
    ids: Vec<usize>,
    want: impl Fn(usize) -> &'static str,
    within: Duration,
) -> Vec<(usize, u16, Option<String>)> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    let mut left: Vec<(usize, u16)> = ids
        .iter()
        .flat_map(|&i| procs.ports.iter().map(move |&p| (i, p)))
        .collect();
    loop {
        let answers: Vec<(usize, u16, Option<String>)> = futures::stream::iter(left.clone())
            .map(|(i, port)| {
                let client = &client;
                async move {
                    let url = format!("http://127.0.0.1:{port}/api/schedules/{}", id_of(i));
                    let status = match client.get(url).send().await {
                        Ok(r) => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|b| b["status"].as_str().map(str::to_string)),
                        Err(_) => None,
                    };
                    (i, port, status)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let wrong: Vec<_> = answers
            .into_iter()
            .filter(|(i, _, s)| s.as_deref() != Some(want(*i)))
            .collect();
        if wrong.is_empty() || Instant::now() >= deadline {
            return wrong;
        }
        left = wrong.iter().map(|(i, p, _)| (*i, *p)).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_gets_exactly_its_last_version_through_churn_and_kills() {
    let seed: u64 = std::env::var("SM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (SM_TEST_SEED={seed} replays this plan)");
    let mut rng = StdRng::seed_from_u64(seed);

    let names = Names::new("guarantee");
    create_topic(&names.target, TARGET_PARTITIONS).await;
    let procs = Arc::new(Procs {
        names,
        ports: [free_port(), free_port()],
        children: Mutex::new([None, None]),
        up: Default::default(),
    });
    for w in 0..2 {
        procs.start(w);
    }
    for w in 0..2 {
        procs.ready(w).await;
    }

    let start = now_ms();
    let plan = plan(&mut rng, start);
    let p = producer();
    futures::stream::iter(0..IDS)
        .map(|i| {
            let (p, procs, due) = (&p, &procs, plan.first_due[i].to_string());
            async move {
                let id = id_of(i);
                let headers = [
                    ("time", due.as_bytes()),
                    ("topic", procs.names.target.as_bytes()),
                    ("id", id.as_bytes()),
                ];
                let value = value_of(i, 0);
                produce(
                    p,
                    &procs.names.ingest,
                    Some(id.as_bytes()),
                    value.as_bytes(),
                    &headers,
                )
                .await
            }
        })
        .buffer_unordered(500)
        .collect::<Vec<()>>()
        .await;
    assert!(
        now_ms() < start + CHANGES_FROM_MS,
        "the first versions took {} ms to produce: the plan's changes would be late",
        now_ms() - start
    );

    // The killer, beside the changes.
    let killer = {
        let (procs, kills) = (procs.clone(), plan.kills.clone());
        tokio::spawn(async move {
            for (at, which, down) in kills {
                until(at).await;
                procs.kill(which);
                tokio::time::sleep(down).await;
                procs.restarted(which).await;
            }
        })
    };
    // Each change at its time, without waiting for the ones before (an HTTP cancel may retry
    // while its process is down).
    let client = reqwest::Client::new();
    let mut making = tokio::task::JoinSet::new();
    for change in plan.changes.iter().copied() {
        until(change.at_ms).await;
        let (p, client, procs) = (p.clone(), client.clone(), procs.clone());
        making.spawn(async move { (change, make(change, &p, &client, &procs).await) });
    }
    let mut acks = Vec::with_capacity(plan.changes.len());
    while let Some(done) = making.join_next().await {
        acks.push(done.expect("a change panicked"));
    }
    killer.await.expect("the killer panicked");

    // Which ids the guarantee covers: every change acknowledged at least the lead before the
    // due time of the version it replaces.
    let mut unguaranteed: HashSet<usize> = HashSet::new();
    for (c, acked) in &acks {
        let in_time = match (acked, c.replaces_due_ms) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(due)) => at + LEAD_MS <= due,
        };
        if !in_time {
            unguaranteed.insert(c.id);
        }
    }
    let count = |f: &dyn Fn(&Op) -> bool| acks.iter().filter(|(c, _)| f(&c.op)).count();
    let cancels_kafka = count(&|o| *o == Op::Cancel(Via::Kafka));
    let cancels_http = count(&|o| *o == Op::Cancel(Via::Http));
    let reschedules = count(&|o| matches!(o, Op::Reschedule { .. }));
    assert!(
        unguaranteed.len() * 100 <= acks.len() * MAX_UNGUARANTEED_PERCENT,
        "{} of {} changes were acknowledged too late for the guarantee: the run proves too little",
        unguaranteed.len(),
        acks.len()
    );

    // Everything that must arrive arrives; then the topic is read to its end.
    let last_due = plan
        .expected
        .iter()
        .flat_map(|e| e.dues.iter())
        .copied()
        .max()
        .unwrap_or(start);
    let must: HashSet<String> = plan
        .expected
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.last.map(|n| value_of(i, n)))
        .collect();
    let reader = reader(&procs.names.target, TARGET_PARTITIONS);
    let value =
        |r: &Received| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
    let mut waiting = must.clone();
    let mut seen = 0;
    let within = Duration::from_millis((last_due - now_ms()).max(0) as u64 + 90_000);
    let mut got = collect(&reader, within, |r| {
        for x in &r[seen..] {
            waiting.remove(&value(x));
        }
        seen = r.len();
        waiting.is_empty()
    })
    .await;
    assert!(
        waiting.is_empty(),
        "{} last versions never arrived, e.g. {:?}",
        waiting.len(),
        waiting.iter().take(5).collect::<Vec<_>>()
    );
    // Settled: both processes say so for every id, so every delivery is in the topic.
    let last_is_cancel = |i: usize| plan.expected[i].last.is_none();
    let disagree = statuses_settle(
        &procs,
        (0..IDS).collect(),
        |i| {
            if last_is_cancel(i) {
                "cancelled"
            } else {
                "delivered"
            }
        },
        Duration::from_secs(90),
    )
    .await;
    got.extend(drain_to_end(&reader).await);

    // Judge every delivery.
    let mut by_value: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in &got {
        by_value.entry(value(r)).or_default().push(r);
    }
    let mut wrong = Vec::new();
    let mut early = Vec::new();
    let mut duplicates = 0;
    let mut lateness = Vec::new();
    for (i, e) in plan.expected.iter().enumerate() {
        for (n, due) in e.dues.iter().enumerate() {
            let copies = by_value
                .get(&value_of(i, n as u32))
                .map_or(&[][..], Vec::as_slice);
            for r in copies {
                if r.timestamp_ms < *due {
                    early.push((value(r), due - r.timestamp_ms));
                }
            }
            let must_arrive = e.last == Some(n as u32);
            if copies.is_empty() {
                continue;
            }
            if !must_arrive && !unguaranteed.contains(&i) {
                wrong.push(value_of(i, n as u32));
            }
            duplicates += copies.len() - 1;
            if must_arrive {
                lateness.push(
                    copies
                        .iter()
                        .map(|r| r.timestamp_ms - due)
                        .min()
                        .unwrap_or(0),
                );
            }
        }
    }
    let late = lateness.iter().filter(|&&l| l > 100).count();
    let mut histogram =
        hdrhistogram::Histogram::<u64>::new(3).expect("a histogram of three significant digits");
    for l in &lateness {
        histogram.saturating_record(u64::try_from(*l).unwrap_or(0));
    }
    let (p99, worst) = (histogram.value_at_quantile(0.99), histogram.max());
    eprintln!(
        "ids {IDS}, cancels {} (Kafka {cancels_kafka}, HTTP {cancels_http}), reschedules \
         {reschedules}, kills {KILLS}; outside the guarantee {}; wrong deliveries {}, early {}, \
         duplicates {duplicates}; delivered {}, late over 100 ms {late}, p99 {p99} ms, worst \
         {worst} ms; status disagreements {}",
        cancels_kafka + cancels_http,
        unguaranteed.len(),
        wrong.len(),
        early.len(),
        lateness.len(),
        disagree.len()
    );
    assert!(
        wrong.is_empty(),
        "{} versions that a change replaced in time were delivered, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        early.is_empty(),
        "{} copies delivered early, e.g. {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
    assert!(
        disagree.is_empty(),
        "{} statuses disagree after settling, e.g. {:?}",
        disagree.len(),
        &disagree[..disagree.len().min(5)]
    );
    // Dropped: both processes killed.
    drop(procs);
}
