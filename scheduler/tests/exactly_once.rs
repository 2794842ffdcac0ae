//! Issue #31: exactly-once delivery with Kafka transactions (`--delivery exactly-once`). A
//! read_committed consumer of the targets sees every scheduled record once: across SIGKILLs of
//! either of two processes, a broker restart, and a zombie (a process stopped while its
//! partitions moved, then resumed), whose writes never become visible. The same run in the
//! at-least-once mode shows duplicates, so the test can tell the modes apart.

use std::collections::HashMap;
use std::time::Duration;

use scheduler::testkit::*;

const EXACTLY_ONCE: &[&str] = &["--delivery", "exactly-once"];

/// `/healthz` of a child process, or `Null` while it does not answer: in this mode a process
/// starts its engine (and HTTP API) again after an aborted transaction, which a broker that
/// stalls for longer than a send's timeout causes.
async fn health(http: &str) -> serde_json::Value {
    match reqwest::get(format!("http://{http}/healthz")).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// A counter of the child process on `port`, waiting (up to 30 s) while it starts again.
async fn metric(port: u16, name: &str) -> f64 {
    let http = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = try_metric_sum(&http, name).await {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{http} does not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A scheduler child process in this mode on `port` (so that it starts again after an abort,
/// as `run` does), once it answers.
async fn child(names: &Names, log: &str, port: u16) -> ChildGuard {
    let child = spawn_on_port(
        env!("CARGO_BIN_EXE_scheduler"),
        names,
        &format!("{}-{log}.log", names.group),
        port,
        EXACTLY_ONCE,
    );
    answers_ok(port).await;
    child
}

/// Reads the target (`partitions` of it) until every expected id has arrived, and asserts each
/// arrived exactly once and none before its due time.
async fn assert_each_once(
    names: &Names,
    partitions: i32,
    due: &HashMap<String, i64>,
    within: Duration,
) {
    let target = reader(&names.target, partitions);
    let got = collect_all(&target, due.keys(), Vec::new(), within).await;
    assert_all_arrived(due.keys(), &got);
    let dups = got.len() - by_id(&got).len();
    let early = got.iter().filter(|r| r.timestamp_ms < due[&r.id()]).count();
    assert_eq!((dups, early), (0, 0), "duplicates, early");
}

/// Everything in the DLQ, once at least `n` records have come (or 30 s passed).
async fn dead_letters(names: &Names, n: usize) -> Vec<Received> {
    let dlq = reader(&names.dlq, 4);
    let first = collect(&dlq, Duration::from_secs(30), |r| r.len() >= n).await;
    first.into_iter().chain(drain_to_end(&dlq).await).collect()
}

/// One process: records with ids, due over 8 s, arrive once each, none early, and their status
/// says delivered (facts commit in the same transactions); a record without a `time` and one for
/// a target that does not exist reach the DLQ once each, with their reasons, the second before
/// it is sent (a write refused inside a transaction would abort it with every other record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_delivers_each_record_once_through_transactions() {
    let names = Names::new("eos1");
    create_topic(&names.target, 2).await;
    let port = free_port();
    let _sched = child(&names, "one", port).await;
    let base = now_ms() + 1_000;
    let records = scattered("e", 2_000, base, 8_000);
    schedule_records(&names, &records).await;
    let p = producer();
    let soon = (now_ms() + 500).to_string();
    let missing_target = format!("{}-missing", names.target);
    produce(
        &p,
        &names.ingest,
        None,
        b"no-time",
        &[("topic", names.target.as_bytes())],
    )
    .await;
    produce(
        &p,
        &names.ingest,
        None,
        b"no-target",
        &[
            ("time", soon.as_bytes()),
            ("topic", missing_target.as_bytes()),
        ],
    )
    .await;
    let due: HashMap<String, i64> = records.into_iter().collect();
    assert_each_once(&names, 2, &due, Duration::from_secs(60)).await;

    let mut dead: Vec<(String, String)> = dead_letters(&names, 2)
        .await
        .iter()
        .map(|r| {
            let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default());
            (value.into_owned(), r.header("sm-error").unwrap_or_default())
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        vec![
            ("no-target".to_string(), "unknown-topic".to_string()),
            ("no-time".to_string(), "missing-time".to_string()),
        ],
        "each bad record dead-lettered once"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while schedule_status(port, "e-7").await["status"] != "delivered" {
        assert!(
            std::time::Instant::now() < deadline,
            "the delivered fact never became visible: {}",
            schedule_status(port, "e-7").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let transactions = metric(port, "sm_transactions_total").await;
    assert!(transactions >= 1.0, "deliveries went through transactions");
}

/// A zombie: one of two processes is stopped (SIGSTOP) until the group has given its partitions
/// to the other, then resumed. Its open transaction (deliveries the other process now makes
/// too) must never become visible: its next commit carries the group generation it was
/// evicted from, and the coordinator refuses it, so it aborts, says why, and starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_fenced_and_nothing_it_sent_becomes_visible() {
    let names = Names::new("eosz");
    create_topic(&names.target, 2).await;
    let ports = [free_port(), free_port()];
    let mut procs = vec![
        child(&names, "0", ports[0]).await,
        child(&names, "1", ports[1]).await,
    ];
    // Records due every 5 ms for 30 s: the zombie has deliveries in its open transaction when
    // it is stopped.
    let base = now_ms() + 3_000;
    let records = scattered("z", 6_000, base, 30_000);
    schedule_records(&names, &records).await;
    let due: HashMap<String, i64> = records.into_iter().collect();
    let wait_until = |t: i64| async move {
        let wait = t - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
    };
    wait_until(base + 5_000).await;
    let (zombie, other) = (0, 1);
    let https = ports.map(|p| format!("127.0.0.1:{p}"));
    let assigned = |h: &serde_json::Value| h["assigned_partitions"].as_u64().unwrap_or(0);
    // Both own partitions first (a member that joins second gets its share a rebalance later).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let total = loop {
        let (z, o) = (
            assigned(&health(&https[zombie]).await),
            assigned(&health(&https[other]).await),
        );
        if z > 0 && o > 0 {
            break z + o;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group never gave both processes partitions: {z} and {o}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = libc::pid_t::try_from(procs[zombie].id()).expect("a pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
    // The group gives every partition to the other (the assignment balances partitions over
    // all topics, so the ingest partitions alone can be the other's from the start).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&https[other]).await;
        if assigned(&h) >= total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other process never took the zombie's partitions ({total} in all): {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
    let zombie_http = &https[zombie];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let aborted = try_metric_sum(zombie_http, "sm_engine_restarts_total").await;
        if aborted.is_some_and(|n| n >= 1.0) {
            break health(zombie_http).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the zombie never found out it was fenced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = refused["last_transaction_abort"]
        .as_str()
        .unwrap_or_default();
    assert!(!reason.is_empty(), "/healthz says why: {refused}");

    assert_each_once(&names, 2, &due, Duration::from_secs(90)).await;
    drop(procs.drain(..));
}

/// A record its target refuses for good (too large for the target's `max.message.bytes`): the
/// refusal aborts its transaction, the engine starts again, and the record goes to the DLQ once,
/// before it is sent again; the records around it arrive once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_its_target_refuses_is_dead_lettered_once_not_retried_for_ever() {
    let names = Names::new("eosr");
    create_topic_with(&names.target, 1, &[("max.message.bytes", "65536")]).await;
    let port = free_port();
    let _proc = child(&names, "refused", port).await;
    // The large record falls due alone, a second before the others, so that no other record
    // shares its batch (the broker refuses a whole batch).
    let base = now_ms() + 3_000;
    let records = scattered("r", 500, base + 1_000, 4_000);
    schedule_records(&names, &records).await;
    let p = producer();
    let due = base.to_string();
    let large = vec![b'x'; 200_000];
    let headers = [("time", due.as_bytes()), ("topic", names.target.as_bytes())];
    produce(&p, &names.ingest, Some(b"large"), &large, &headers).await;

    let due: HashMap<String, i64> = records.into_iter().collect();
    assert_each_once(&names, 1, &due, Duration::from_secs(60)).await;
    let dead = dead_letters(&names, 1).await;
    assert_eq!(dead.len(), 1, "the refused record dead-lettered once");
    assert_eq!(dead[0].key.as_deref(), Some(&b"large"[..]));
    assert_eq!(
        dead[0].header("sm-error").as_deref(),
        Some("refused-by-broker")
    );
    let restarts = metric(port, "sm_engine_restarts_total").await;
    assert!(restarts >= 1.0, "the refusal aborted a transaction");
}
