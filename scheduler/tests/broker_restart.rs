//! The broker itself killed with SIGKILL mid-run (no controlled shutdown) and restarted: the scheduler
//! reconnects and delivers everything, none early. This test runs its own broker on a free port,
//! so it lives in a test binary of its own (it points the whole process at that broker).

use std::time::Duration;

use scheduler::testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_mid_run_loses_nothing() {
    let mut broker = Broker::start();
    // Every helper of this test binary talks to this broker.
    std::env::set_var("SM_BOOTSTRAP_SERVERS", broker.bootstrap());

    let names = Names::new("brk");
    create_topic(&names.target, 2).await;
    let sched = start_in_process(&names).await;
    let base = now_ms() + 1_500;
    let records = scattered("r", 600, base, 8_000);
    schedule_records(&names, &records).await;
    let due: std::collections::HashMap<String, i64> = records.into_iter().collect();
    let reader = reader(&names.target, 2);
    let before = collect(&reader, Duration::from_secs(30), |r| r.len() >= 100).await;
    assert!(!before.is_empty());

    let down_at = now_ms();
    tokio::task::block_in_place(|| broker.kill_and_restart(Duration::from_secs(2)));
    let back_at = now_ms();
    let got = collect_all(&reader, due.keys(), before, Duration::from_secs(120)).await;
    assert_all_arrived(due.keys(), &got);
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
    }
    // Records arrive again once the restarted broker serves the scheduler and this reader.
    let resumed = got
        .iter()
        .map(|r| r.received_ms)
        .filter(|&t| t > back_at)
        .min()
        .unwrap_or(back_at);
    eprintln!(
        "broker down for {:.1} s; deliveries seen again {:.1} s after it came back; {} records, {} duplicates",
        (back_at - down_at) as f64 / 1000.0,
        (resumed - back_at) as f64 / 1000.0,
        due.len(),
        got.len() - due.len()
    );
    let mut copies: std::collections::BTreeMap<usize, usize> = Default::default();
    for v in by_id(&got).values() {
        *copies.entry(v.len()).or_default() += 1;
    }
    eprintln!("records by number of copies: {copies:?}");
    sched.stop().await.expect("clean stop");
}
