//! The baseline against the real MariaDB and broker: each test has its own database and topics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use db_scheduler::testkit::{config, fresh_database};
use db_scheduler::{DbScheduler, NewMessage, Store};
use scheduler::testkit::*;
use scheduler::{DueTime, SystemClock};

/// `n` messages to `topic`, due from `lead_ms` to `lead_ms + spread_ms` from now, inserted in an
/// order unrelated to their due times.
fn messages(topic: &str, n: usize, lead_ms: i64, spread_ms: i64) -> Vec<NewMessage> {
    let base = now_ms() + lead_ms;
    (0..n)
        .map(|i| NewMessage {
            id: format!("m-{i}"),
            topic: topic.to_string(),
            key: Some(format!("k-{}", i % 7).into_bytes()),
            value: Some(format!("v-{i}").into_bytes()),
            headers: vec![
                ("trace".into(), Some(vec![0, 1, 255])),
                ("empty".into(), None),
            ],
            due: DueTime::from_millis(base + (i as i64 * 7_919) % spread_ms.max(1)).unwrap(),
        })
        .collect()
}

fn due_of(msgs: &[NewMessage]) -> HashMap<String, i64> {
    msgs.iter()
        .map(|m| (m.id.clone(), m.due.as_millis()))
        .collect()
}

/// A test's table and target: a fresh database with `n` messages inserted (see [`messages`]) for
/// a new topic of `partitions` partitions.
struct Setup {
    url: String,
    topic: String,
    store: Store,
    msgs: Vec<NewMessage>,
    due: HashMap<String, i64>,
    partitions: i32,
}

impl Setup {
    async fn new(name: &str, partitions: i32, n: usize, lead_ms: i64, spread_ms: i64) -> Setup {
        let url = fresh_database().await;
        let topic = unique(name);
        create_topic(&topic, partitions).await;
        let store = Store::connect(&url).await.expect("migrated");
        let msgs = messages(&topic, n, lead_ms, spread_ms);
        store.insert(&msgs).await.expect("inserted");
        let due = due_of(&msgs);
        Setup {
            url,
            topic,
            store,
            msgs,
            due,
            partitions,
        }
    }

    async fn start(&self, interval: &str, batch: i64) -> DbScheduler {
        DbScheduler::start(config(&self.url, interval, batch), Arc::new(SystemClock))
            .await
            .expect("db-scheduler starts")
    }

    /// Everything delivered to the topic until every message arrived (failing if one never does).
    async fn delivered(
        &self,
        reader: &rdkafka::consumer::StreamConsumer,
        before: Vec<Received>,
        wait: Duration,
    ) -> Vec<Received> {
        let got = collect_all(reader, self.due.keys(), before, wait).await;
        assert_all_arrived(self.due.keys(), &got);
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_rows_are_delivered_once_in_due_order_and_never_early() {
    let t = Setup::new("dbs-target", 1, 300, 1_000, 3_000).await;
    t.store.insert(&t.msgs[..10]).await.unwrap();
    assert_eq!(
        t.store.status().await.unwrap().pending,
        300,
        "re-inserting an id adds nothing"
    );
    let s = t.start("100ms", 1000).await;
    let got = t
        .delivered(&reader(&t.topic, 1), Vec::new(), Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 300, "each row once");
    let due = &t.due;
    for w in got.windows(2) {
        let (a, b) = (
            due[&w[0].header("sm-id").unwrap()],
            due[&w[1].header("sm-id").unwrap()],
        );
        assert!(a <= b, "delivered out of due order");
    }
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
        assert_eq!(r.header("sm-path").as_deref(), Some("mysql"));
        assert_eq!(r.header("sm-due-ms"), Some(due[&id].to_string()));
        assert_eq!(r.headers[0], ("trace".to_string(), Some(vec![0, 1, 255])));
        assert_eq!(r.headers[1], ("empty".to_string(), None));
        assert_eq!(
            r.value.as_deref(),
            Some(format!("v-{}", &id[2..]).as_bytes())
        );
    }
    let status = t.store.status().await.unwrap();
    assert_eq!(
        (status.pending, status.delivered, status.failed),
        (0, 300, 0)
    );
    let (p50, p99, max) = lateness(&got);
    eprintln!("poll 100 ms: lateness ms p50 {p50} p99 {p99} max {max}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pollers_share_a_table_without_double_delivery() {
    let t = Setup::new("dbs-pair", 2, 2_000, 500, 1_500).await;
    let (a, b) = (t.start("10ms", 50).await, t.start("10ms", 50).await);
    let got = t
        .delivered(
            &reader(&t.topic, t.partitions),
            Vec::new(),
            Duration::from_secs(60),
        )
        .await;
    let twice: Vec<_> = by_id(&got)
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        twice.is_empty(),
        "delivered twice: {:?}",
        &twice[..twice.len().min(5)]
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_poller_loses_nothing() {
    let t = Setup::new("dbs-kill", 2, 1_000, 500, 4_000).await;
    let args = db_scheduler::testkit::args(&t.url, "50ms", 20);
    let binary = env!("CARGO_BIN_EXE_db-scheduler");
    let mut first = spawn_binary(binary, &args, "dbs-kill-first.log");
    let reader = reader(&t.topic, t.partitions);
    let before = collect(&reader, Duration::from_secs(30), |r| r.len() >= 300).await;
    kill9(&mut first);
    let mut second = spawn_binary(binary, &args, "dbs-kill-second.log");
    let got = t.delivered(&reader, before, Duration::from_secs(60)).await;
    kill9(&mut second);
    eprintln!("{} rows, {} deliveries", t.due.len(), got.len());
    assert_eq!(t.store.status().await.unwrap().pending, 0);
}

/// Polling every 500 ms, no row waits much longer than one interval (plus a round trip), and
/// none is early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_interval_bounds_lateness() {
    let t = Setup::new("dbs-interval", 1, 200, 1_000, 4_000).await;
    let s = t.start("500ms", 1000).await;
    let got = t
        .delivered(&reader(&t.topic, 1), Vec::new(), Duration::from_secs(30))
        .await;
    let (p50, p99, max) = lateness(&got);
    eprintln!("poll 500 ms: lateness ms p50 {p50} p99 {p99} max {max}");
    assert!(
        max < 500 + 1_500,
        "a row waited {max} ms with a 500 ms interval"
    );
    assert!(got
        .iter()
        .all(|r| r.timestamp_ms >= t.due[&r.header("sm-id").unwrap()]));
    s.stop().await;
}

/// A row with a bad topic is marked failed with its reason, once, and the rows around it are
/// still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_marked_failed_and_never_stop_the_poller() {
    let url = fresh_database().await;
    let topic = unique("dbs-bad");
    create_topic(&topic, 1).await;
    let store = Store::connect(&url).await.unwrap();
    let mut msgs = messages(&topic, 3, 0, 100);
    msgs[0].topic = "not a topic".into();
    msgs[1].topic = "SCHEDULED_MESSAGES".into();
    store.insert(&msgs).await.unwrap();
    let s = DbScheduler::start(config(&url, "50ms", 1000), Arc::new(SystemClock))
        .await
        .unwrap();
    let got = collect(&reader(&topic, 1), Duration::from_secs(20), |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("sm-id").as_deref(), Some("m-2"));
    // The bad rows are marked in the poll that published the good one: wait for it (deadline).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let failed = |r: Option<(String, Option<String>, i32)>| r.is_some_and(|r| r.0 == "failed");
        let m0 = store.row_status("m-0").await.unwrap();
        let m1 = store.row_status("m-1").await.unwrap();
        if failed(m0) && failed(m1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bad rows never marked failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, error, attempts) = store.row_status("m-0").await.unwrap().unwrap();
    assert_eq!((status.as_str(), attempts), ("failed", 1));
    assert!(error.unwrap().contains("legal topic name"));
    let (status, error, _) = store.row_status("m-1").await.unwrap().unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("internal"));
    let api: serde_json::Value = reqwest::get(format!("http://{}/api/status", s.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["failed"], 2);
    assert_eq!(api["delivered"], 1);
    assert_eq!(api["pending"], 0);
    s.stop().await;
}

/// The baseline runs the same cancel and reschedule workload as the Kafka path: a cancelled row
/// is never delivered, a rescheduled one only as its new version at its new time, and a change
/// to a row already delivered changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_rows_are_never_delivered_and_rescheduled_ones_only_at_their_new_time() {
    let mut t = Setup::new("dbs-cancel", 1, 90, 2_000, 1_000).await;
    let cancelled: Vec<&str> = t.msgs[..30].iter().map(|m| m.id.as_str()).collect();
    assert_eq!(t.store.cancel(&cancelled).await.unwrap(), 30);
    let moved_to = now_ms() + 4_000;
    let mut moved = Vec::new();
    for m in &t.msgs[30..60] {
        let new = NewMessage {
            value: Some(b"v2".to_vec()),
            due: DueTime::from_millis(moved_to).unwrap(),
            ..m.clone()
        };
        assert!(t.store.reschedule(&new).await.unwrap());
        moved.push(new.id);
    }
    for id in &cancelled {
        t.due.remove(*id);
    }
    for id in &moved {
        t.due.insert(id.clone(), moved_to);
    }
    let s = t.start("100ms", 1000).await;
    let got = t
        .delivered(&reader(&t.topic, 1), Vec::new(), Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 60, "each row that was not cancelled, once");
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= t.due[&id], "{id} early");
        if moved.contains(&id) {
            assert_eq!(
                r.value.as_deref(),
                Some(&b"v2"[..]),
                "{id}: the old version"
            );
        }
    }
    // Too late: delivered rows are neither cancelled nor moved.
    assert_eq!(t.store.cancel(&[moved[0].as_str()]).await.unwrap(), 0);
    assert!(!t.store.reschedule(&t.msgs[70]).await.unwrap());
    let status = t.store.status().await.unwrap();
    assert_eq!(
        (status.pending, status.delivered, status.cancelled),
        (0, 60, 30)
    );
    s.stop().await;
}
