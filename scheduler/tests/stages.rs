//! The engine's stages under stress, against the real local broker: the HTTP API keeps answering
//! while partitions are revoked and assigned again and again, the memory budget holds while a
//! burst far larger than it falls due at once, and a failing sweep is retried until it succeeds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::testkit::*;

/// `/healthz` is called without pause while a second process joins and leaves the group four
/// times (each time partitions are revoked from the first and assigned back). Before the stages,
/// `health()` locked the tracker then the timer while the revoke path locked the timer then the
/// tracker: this could deadlock. Every call must answer within a second, and every record
/// scheduled across the rebalances must arrive, none early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_and_deliveries_go_on_through_repeated_rebalances() {
    let names = Names::new("wedge");
    create_topic(&names.target, 2).await;
    let a = start_in_process(&names).await;
    let http = a.http_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while healthz(&http).await["assigned_partitions"] == 0 {
        assert!(Instant::now() < deadline, "no partitions assigned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, slowest_us, calls, http) = (
            stop.clone(),
            slowest_us.clone(),
            calls.clone(),
            http.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let answer = client
                    .get(format!("http://{http}/healthz"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                assert!(answer.is_ok(), "/healthz did not answer: {answer:?}");
                slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::SeqCst);
                calls.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let records: Vec<(String, i64)> = (0..400)
        .map(|i| (format!("w-{i}"), now_ms() + 1_000 + (i * 37) % 12_000))
        .collect();
    schedule_records(&names, &records).await;
    let due: HashMap<String, i64> = records.into_iter().collect();
    let reader = reader(&names.target, 2);

    for _ in 0..4 {
        let b = start_in_process(&names).await;
        // Wait (with a deadline) until the second process owns something: a revoke happened.
        let b_http = b.http_addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while healthz(&b_http).await["assigned_partitions"] == 0 {
            assert!(
                Instant::now() < deadline,
                "the second process never got partitions"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.stop().await.expect("clean stop");
    }

    let got = collect_all(&reader, due.keys(), Vec::new(), Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    prober.await.expect("the prober never failed");
    assert_all_arrived(due.keys(), &got);
    for r in &got {
        let id = r.header("sm-id").expect("sm-id");
        assert!(r.timestamp_ms >= due[&id], "{id} early");
    }
    let slowest = Duration::from_micros(slowest_us.load(Ordering::SeqCst));
    assert!(calls.load(Ordering::SeqCst) > 50, "the prober ran");
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest /healthz took {slowest:?}"
    );
    a.stop().await.expect("clean stop");
}

/// 4,000 records of 2 KiB (8 MiB) fall due in the same instant, against a 1 MiB budget: the
/// records the scheduler holds at once (read and not yet placed, as `/healthz` reports them)
/// never exceed what the budget admits, and every record is still delivered, none early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_memory_budget_is_delivered_within_it() {
    let names = Names::new("budget");
    create_topic(&names.target, 2).await;
    let budget: u64 = 1 << 20;
    let sched = start_in_process_with(&names, &["--memory-budget", "1MiB"]).await;
    let http = sched.http_addr.to_string();

    let instant = now_ms() + 4_000;
    let value = vec![b'x'; 2048];
    let p = producer();
    let ids: Vec<String> = (0..4_000).map(|i| format!("b-{i}")).collect();
    futures::future::join_all(ids.iter().map(|id| {
        let (p, value, time) = (&p, &value, instant.to_string());
        let names = &names;
        async move {
            let headers = [
                ("time", time.as_bytes()),
                ("topic", names.target.as_bytes()),
                ("id", id.as_bytes()),
            ];
            produce(p, &names.ingest, Some(id.as_bytes()), value, &headers).await
        }
    }))
    .await;

    let reader = reader(&names.target, 2);
    // Records read and not yet placed, counted by the offset tracker, which knows nothing of
    // the budget: if any stage read records without taking their share, this would pass the
    // bound. Each record holds at least its value three times (see `outbox::in_memory`).
    let bound = budget / (3 * value.len() as u64);
    let mut peak = 0u64;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < ids.len() && Instant::now() < deadline {
        let h = healthz(&http).await;
        peak = peak.max(h["in_flight"].as_u64().expect("in_flight"));
        assert_eq!(h["memory_budget"], budget);
        let batch = collect(&reader, Duration::from_millis(50), |r| r.len() >= 500).await;
        seen.extend(batch.iter().map(|r| r.id()));
        got.extend(batch);
    }
    assert_all_arrived(&ids, &got);
    for r in &got {
        assert!(r.timestamp_ms >= instant, "{} early", r.id());
    }
    assert!(
        peak >= bound / 4,
        "the budget was in use: {peak} held at most"
    );
    assert!(
        peak <= bound,
        "held {peak} records of 2 KiB at once; the 1 MiB budget admits {bound}"
    );
    sched.stop().await.expect("clean stop");
}

/// A sweep that fails is retried with backoff until it succeeds, never skipped: the process
/// reports `degraded` meanwhile, each failed attempt is counted, it reports `ok` again after, and
/// every record routed through the slices arrives, none early. (The failures are injected: the
/// first attempts of whatever sweeps run next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sweep_is_retried_until_it_succeeds_and_nothing_is_skipped() {
    let names = Names::new("sweepfail");
    create_topic(&names.target, 2).await;
    let sched = start_in_process(&names).await;
    let http = sched.http_addr.to_string();
    // 3 to 8 s ahead: beyond the test ladder's hold horizon, so they wait in slices.
    let base = now_ms() + 3_000;
    let records: Vec<(String, i64)> = (0..200)
        .map(|i| (format!("s-{i}"), base + (i * 37) % 5_000))
        .collect();
    // Watch /healthz from before the failures: the sweeps that fail may be the start-up
    // catch-up ones, retried and done while the records are still being produced.
    let watching = {
        let http = http.clone();
        tokio::spawn(
            async move { health_reaches(&http, "degraded", Duration::from_secs(30)).await },
        )
    };
    sched.fail_next_sweeps(6);
    schedule_records(&names, &records).await;
    let due: std::collections::HashMap<String, i64> = records.into_iter().collect();
    let degraded = watching.await.expect("the watcher ran");
    assert_eq!(
        degraded["status"], "degraded",
        "degraded while a sweep is failing: {degraded}"
    );
    assert!(degraded["sweeps_behind"].as_u64() >= Some(1), "{degraded}");

    let got = collect_all(
        &reader(&names.target, 2),
        due.keys(),
        Vec::new(),
        Duration::from_secs(60),
    )
    .await;
    assert_all_arrived(due.keys(), &got);
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
    }
    let failures = metric_sum(&http, "sm_sweep_failures_total").await;
    assert!(failures >= 6.0, "{failures} failed attempts counted");
    let h = health_reaches(&http, "ok", Duration::from_secs(30)).await;
    assert_eq!(h["status"], "ok", "still {h}");
    sched.stop().await.expect("clean stop");
}
