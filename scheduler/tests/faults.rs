//! Fault tests against the real broker: hostile input end to end, many messages due at the same
//! instant, and the broker itself killed and restarted mid-run.

use std::collections::HashMap;
use std::time::Duration;

use scheduler::testkit::*;

/// The group's committed offset of ingest partition 0 (`None` when nothing is committed).
fn committed_ingest(names: &Names, flags: &[&str]) -> Option<i64> {
    let settings = names.settings_with(flags);
    let lookup = scheduler::kafka::Lookup::new(&settings).expect("lookup client");
    let tp = (names.ingest.clone(), 0);
    let committed = tokio::task::block_in_place(|| {
        lookup.committed(std::slice::from_ref(&tp), Duration::from_secs(10))
    })
    .expect("committed offsets");
    committed.get(&tp).copied()
}

/// Hostile records through the real broker: huge and many headers, bytes that are not UTF-8,
/// years 9999 and 1960, numbers out of range, empty keys and values. None crashes the scheduler;
/// each is delivered (or parked, if far ahead) or dead-lettered with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_delivered_or_dead_lettered_never_a_crash() {
    let names = Names::new("hostile");
    create_topic(&names.target, 1).await;
    let sched = start_in_process(&names).await;
    let p = producer();
    let t = names.target.as_bytes();
    let soon = (now_ms() + 500).to_string();
    let huge = vec![b'h'; 200_000];
    let many: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| (format!("h{i}"), vec![b'v'; 10]))
        .collect();
    let mut many_headers: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    many_headers.extend([("time", soon.as_bytes()), ("topic", t), ("id", b"many")]);
    // (expected outcome, headers, value): "deliver" or an sm-error code.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, &'a [u8]);
    let cases: Vec<Case> = vec![
        (
            "deliver",
            vec![
                ("big", &huge),
                ("time", soon.as_bytes()),
                ("topic", t),
                ("id", b"huge"),
            ],
            b"v",
        ),
        ("deliver", many_headers, b"v"),
        (
            "deliver",
            vec![
                ("time", b"1960-01-01T00:00:00Z"),
                ("topic", t),
                ("id", b"1960"),
            ],
            b"v",
        ),
        (
            "deliver",
            vec![("time", b"100000000000"), ("topic", t), ("id", b"epoch")],
            b"",
        ),
        // Epoch seconds (a common mistake) are refused, not delivered at once as 1970.
        (
            "invalid-time",
            vec![("time", b"1764633600"), ("topic", t)],
            b"v",
        ),
        (
            "invalid-time",
            vec![("time", b"99999999999999999999"), ("topic", t)],
            b"v",
        ),
        (
            "invalid-time",
            vec![("time", b"10000-01-01T00:00:00Z"), ("topic", t)],
            b"v",
        ),
        (
            "invalid-time",
            vec![("time", &[b'9'; 70]), ("topic", t)],
            b"v",
        ),
        ("invalid-time", vec![("time", b"-5"), ("topic", t)], b"v"),
        (
            "invalid-topic",
            vec![("time", soon.as_bytes()), ("topic", b"\xff\xfe")],
            b"v",
        ),
        (
            "invalid-id",
            vec![("time", soon.as_bytes()), ("topic", t), ("id", b"\xc3\x28")],
            b"v",
        ),
    ];
    for (_, headers, value) in &cases {
        produce(&p, &names.ingest, None, value, headers).await;
    }
    // Year 9999: accepted, parked in the top level, never delivered during the test.
    produce(
        &p,
        &names.ingest,
        None,
        b"v",
        &[
            ("time", b"9999-12-31T23:59:59.999Z"),
            ("topic", t),
            ("id", b"9999"),
        ],
    )
    .await;

    let expected_dead = cases.iter().filter(|c| c.0 != "deliver").count();
    let dlq = reader(&names.dlq, 4);
    let mut dead = collect(&dlq, Duration::from_secs(30), |r| r.len() >= expected_dead).await;
    // Read on until the DLQ is quiet: a record dead-lettered twice, or one that should have been
    // delivered, must show up here too.
    dead.extend(collect(&dlq, Duration::from_secs(2), |_| false).await);
    let mut codes: Vec<String> = dead
        .iter()
        .map(|r| r.header("sm-error").unwrap_or_default())
        .collect();
    let mut want: Vec<String> = cases
        .iter()
        .filter(|c| c.0 != "deliver")
        .map(|c| c.0.to_string())
        .collect();
    codes.sort();
    want.sort();
    assert_eq!(codes, want);
    let delivered = collect(&reader(&names.target, 1), Duration::from_secs(30), |r| {
        r.len() >= 4
    })
    .await;
    let ids: Vec<String> = delivered
        .iter()
        .map(|r| r.header("sm-id").unwrap_or_default())
        .collect();
    for id in ["huge", "many", "1960", "epoch"] {
        assert!(ids.contains(&id.to_string()), "{id} delivered: {ids:?}");
    }
    let huge_copy = delivered
        .iter()
        .find(|r| r.header("sm-id").as_deref() == Some("huge"))
        .unwrap();
    assert_eq!(
        huge_copy.header("big").map(|v| v.len()),
        Some(200_000),
        "the huge header survives"
    );
    let many_copy = delivered
        .iter()
        .find(|r| r.header("sm-id").as_deref() == Some("many"))
        .unwrap();
    assert_eq!(
        many_copy.headers.len(),
        500 + 3,
        "500 user headers plus sm-id, sm-version (it has an id) and sm-due-ms"
    );
    let extra = collect(&reader(&names.target, 1), Duration::from_secs(2), |r| {
        r.len() > 4
    })
    .await;
    assert_eq!(
        extra.len(),
        4,
        "the year-9999 record is parked, not delivered"
    );
    let health: serde_json::Value = reqwest::get(format!("http://{}/healthz", sched.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    sched.stop().await.expect("clean stop");
}

/// 5,000 records due at the same instant, and 50 others due just after: all arrive, none early,
/// and the others are not held up for long by the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_due_at_one_instant_does_not_stall_the_others() {
    let names = Names::new("burst");
    create_topic(&names.target, 4).await;
    let sched = start_in_process(&names).await;
    let at = now_ms() + 4_000;
    let mut records: Vec<(String, i64)> = (0..5_000).map(|i| (format!("b-{i}"), at)).collect();
    records.extend((0..50).map(|i| (format!("o-{i}"), at + 200 + i * 20)));
    schedule_records(&names, &records).await;
    let due: HashMap<String, i64> = records.into_iter().collect();
    let got = collect_all(
        &reader(&names.target, 4),
        due.keys(),
        Vec::new(),
        Duration::from_secs(60),
    )
    .await;
    assert_all_arrived(due.keys(), &got);
    let mut last_burst = 0;
    let mut others_late = Vec::new();
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
        if id.starts_with("b-") {
            last_burst = last_burst.max(r.timestamp_ms - at);
        } else {
            others_late.push(r.timestamp_ms - due[&id]);
        }
    }
    others_late.sort_unstable();
    eprintln!("burst of 5,000: last published {last_burst} ms after its instant; others' lateness max {} ms", others_late[others_late.len() - 1]);
    assert!(
        others_late[others_late.len() - 1] < 5_000,
        "others waited {:?} ms",
        others_late.last()
    );
    sched.stop().await.expect("clean stop");
}

/// A record its target refuses for good and the DLQ refuses too (here: larger than the producer's
/// `message.max.bytes`, so both sends fail in the client) halts the process: `/healthz` answers
/// `failed` with the reason, `stop` returns the error (the binary exits non-zero with it), and
/// the record's offset stays uncommitted, so the next owner (after a fix) sends it again. The
/// record before it is delivered and committed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_dlq_refuses_halts_the_process_and_stays_uncommitted() {
    let names = Names::new("dlqrefused");
    create_topic(&names.target, 1).await;
    let flags = ["-X", "message.max.bytes=20000", "--ingest-partitions", "1"];
    let sched = start_in_process_with(&names, &flags).await;
    let http = sched.http_addr.to_string();
    let p = producer();
    let now = now_ms().to_string();
    let headers = |id: &'static str| {
        vec![
            ("time", now.as_bytes()),
            ("topic", names.target.as_bytes()),
            ("id", id.as_bytes()),
        ]
    };
    produce(&p, &names.ingest, None, b"fits", &headers("ok")).await;
    let reader = reader(&names.target, 1);
    let first = collect(&reader, Duration::from_secs(30), |r| !r.is_empty()).await;
    assert_eq!(first.len(), 1, "the good record is delivered");
    produce(
        &p,
        &names.ingest,
        None,
        &vec![b'x'; 30_000],
        &headers("big"),
    )
    .await;

    let health = health_reaches(&http, "failed", Duration::from_secs(30)).await;
    assert_eq!(health["status"], "failed", "{health}");
    let reason = health["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("DLQ"), "{reason}");
    let stopped = sched.stop().await;
    assert!(
        matches!(&stopped, Err(e) if e.to_string().contains("DLQ")),
        "{stopped:?}"
    );

    let committed = committed_ingest(&names, &flags);
    assert_eq!(
        committed,
        Some(1),
        "committed up to the refused record (offset 1), not past it"
    );
    let rest = collect(&reader, Duration::from_secs(2), |_| false).await;
    assert!(rest.is_empty(), "the refused record was not delivered");
}

/// Slice records deleted before their sweep (as retention would: here by DeleteRecords) are
/// counted as lost (`sm_slice_records_lost_total`) and reported, and the sweep carries on from
/// what is left instead of resetting silently or stopping: every record either arrives (it was
/// swept before the deletion) or is counted, none arrives early, and the process stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_records_deleted_before_their_sweep_are_counted_as_lost() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let names = Names::new("lost");
    create_topic(&names.target, 1).await;
    // A ladder whose first sweep of these records is at least 6 s away (level 2: 16 s windows,
    // swept 8 s ahead), so the deletion below surely comes before it. With the fast test ladder
    // some records were swept before the deletion and none counted: the test raced.
    let ladder = [
        "--smallest-slice",
        "1s",
        "--slice-ratio",
        "4",
        "--largest-slice",
        "64s",
    ];
    let sched = start_in_process_with(&names, &ladder).await;
    let http = sched.http_addr.to_string();
    const LOST: &str = "sm_slice_records_lost_total";
    let lost_before = metric_sum(&http, LOST).await;

    let n = 100;
    let base = now_ms() + 30_000;
    let records: Vec<(String, i64)> = (0..n)
        .map(|i| (format!("l-{i}"), base + (i as i64 * 13) % 1_500))
        .collect();
    schedule_records(&names, &records).await;
    let due: HashMap<String, i64> = records.into_iter().collect();

    // Wait until the records sit in the slices, then delete everything there.
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("lost-admin"))
        .create()
        .expect("client");
    let slices = |client: &BaseConsumer| -> Vec<(String, i32, i64, i64)> {
        let md = client
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        let mut out = Vec::new();
        for t in md
            .topics()
            .iter()
            .filter(|t| t.name().starts_with(&names.prefix))
        {
            for p in t.partitions() {
                let (low, high) = client
                    .fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))
                    .expect("watermarks");
                out.push((t.name().to_string(), p.id(), low, high));
            }
        }
        out
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let held = loop {
        let held = tokio::task::block_in_place(|| slices(&client));
        let filed: i64 = held.iter().map(|(_, _, low, high)| high - low).sum();
        if filed >= n as i64 {
            break held;
        }
        assert!(std::time::Instant::now() < deadline, "only {filed} filed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, low, high) in &held {
        if high > low {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*high))
                .expect("partition");
        }
    }
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("records deleted");

    // Until every record has arrived or been counted lost.
    let reader = reader(&names.target, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    let (arrived, counted) = loop {
        got.extend(collect(&reader, Duration::from_millis(500), |_| false).await);
        let arrived = by_id(&got).len();
        let counted = metric_sum(&http, LOST).await - lost_before;
        if arrived as f64 + counted >= n as f64 {
            break (arrived, counted);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{arrived} arrived and {counted} counted lost, of {n}"
        );
    };
    for r in &got {
        let id = r.header("sm-id").unwrap();
        assert!(r.timestamp_ms >= due[&id], "{id} early");
    }
    assert!(
        counted > 0.0,
        "the deletion was noticed ({arrived} arrived)"
    );
    let h = healthz(&http).await;
    assert_ne!(h["status"], "failed", "{h}");
    sched.stop().await.expect("clean stop");
}

/// A static member fenced by the group (here: another consumer joins with the same
/// `group.instance.id`, as librdkafka itself can race after a broker restart) starts again with
/// new clients and goes on delivering, counted in `sm_engine_restarts_total`; a second fence
/// within the rejoin window is another process really using the id, and `run` returns the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_static_member_rejoins_once_then_stops_honestly() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;

    init_test_logging();
    let names = Names::new("fenced");
    create_topic(&names.target, 1).await;
    let instance = format!("{}-member", names.group);
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let settings = names.settings_with(&[
        "--instance-id",
        &instance,
        "--http-addr",
        &http,
        "--ingest-partitions",
        "1",
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(scheduler::run(settings, async {
        let _ = stopped.await;
    }));
    let p = producer();
    let reader = reader(&names.target, 1);
    let deliver = |id: &'static str| {
        let (p, names) = (&p, &names);
        async move {
            let now = now_ms().to_string();
            let headers = [
                ("time", now.as_bytes()),
                ("topic", names.target.as_bytes()),
                ("id", id.as_bytes()),
            ];
            produce(p, &names.ingest, None, id.as_bytes(), &headers).await;
        }
    };
    // A consumer of the same group and instance id: its join takes the membership over, and the
    // scheduler's next heartbeat is answered FencedInstanceId.
    let intrude = || -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &names.group)
            .set("group.instance.id", &instance)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("intruder");
        c.subscribe(&[&names.ingest]).expect("subscribe");
        c
    };
    let fenced_count = || async { metric_sum(&http, "sm_engine_restarts_total").await };
    let poll_until = |c: &BaseConsumer, what: &str, done: &mut dyn FnMut() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            let _ = c.poll(Duration::from_millis(100));
        }
    };

    deliver("before").await;
    let got = collect(&reader, Duration::from_secs(30), |r| !r.is_empty()).await;
    assert_eq!(got.len(), 1, "delivered before the fence");

    let intruder = intrude();
    let restarted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (flag, http) = (restarted.clone(), http.clone());
        tokio::spawn(async move {
            loop {
                if try_metric_sum(&http, "sm_engine_restarts_total")
                    .await
                    .is_some_and(|n| n >= 1.0)
                {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    tokio::task::block_in_place(|| {
        poll_until(
            &intruder,
            "the scheduler restarted after the fence",
            &mut || restarted.load(std::sync::atomic::Ordering::SeqCst),
        )
    });
    drop(intruder);
    assert!(
        !running.is_finished(),
        "the first fence does not stop the process"
    );
    assert_eq!(fenced_count().await, 1.0);

    deliver("after").await;
    let got = collect(&reader, Duration::from_secs(60), |r| {
        r.iter().any(|r| r.id() == "after")
    })
    .await;
    assert!(
        got.iter().any(|r| r.id() == "after"),
        "the restarted engine delivers"
    );

    // A second fence within the window: another process holds the id; stop with the reason.
    let intruder = intrude();
    tokio::task::block_in_place(|| {
        poll_until(&intruder, "a second fence stops the process", &mut || {
            running.is_finished()
        })
    });
    let result = running.await.expect("run did not panic");
    assert!(
        matches!(&result, Err(scheduler::Error::Fenced(_))),
        "{result:?}"
    );
    drop(stop);
}

/// One target takes nothing (as when its partitions' leader is away: librdkafka keeps each
/// record and reports it timed out much later; injected here, a delay of 8 s per attempt, since
/// one broker cannot lose a topic's leader alone) while another takes records as usual. With a
/// memory budget of a few hundred records, the refused ones would hold all of it: the healthy
/// target's records must still all arrive, `/healthz` must name the failing target (degraded)
/// within 10 s of its first due record, the refused records must reach the DLQ as
/// `target-unavailable` once the give-up time has passed, and once the target takes records
/// again, new ones are delivered to it. Nothing lost, nothing early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_keeps_failing_is_named_dead_lettered_and_holds_no_one_else() {
    let names = Names::new("failing-target");
    let bad = format!("{}-refusing", names.target);
    create_topic(&names.target, 2).await;
    create_topic(&bad, 2).await;
    let flags = ["--memory-budget", "1MiB", "--target-give-up", "5s"];
    let sched = start_in_process_with(&names, &flags).await;
    sched.refuse_target(&bad, Some(Duration::from_secs(8)));
    let http = sched.http_addr.to_string();

    let first_due = now_ms() + 1_000;
    let refused: Vec<(String, i64)> = (0..1_000)
        .map(|i| (format!("bad-{i}"), first_due + i * 5))
        .collect();
    let good: Vec<(String, i64)> = (0..600)
        .map(|i| (format!("good-{i}"), first_due + 500 + i * 5))
        .collect();
    schedule_records_to(&names, &bad, &refused).await;
    schedule_records(&names, &good).await;

    let health = health_reaches(&http, "degraded", Duration::from_secs(30)).await;
    let named_after = now_ms() - first_due;
    let reason = health["reason"].as_str().unwrap_or_default().to_string();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(reason.contains(&bad), "{reason}");
    assert!(
        named_after <= 10_000,
        "named {named_after} ms after its first due record"
    );
    assert_eq!(
        health["failing_targets"][0]["topic"],
        bad.as_str(),
        "{health}"
    );
    assert!(metric_sum(&http, "sm_failing_targets").await >= 1.0);

    let due: HashMap<String, i64> = good.iter().cloned().collect();
    let delivered = collect_all(
        &reader(&names.target, 2),
        due.keys(),
        Vec::new(),
        Duration::from_secs(60),
    )
    .await;
    assert_all_arrived(due.keys(), &delivered);
    for r in &delivered {
        assert!(r.timestamp_ms >= due[&r.id()], "{} early", r.id());
    }

    let refused_ids: Vec<String> = refused.iter().map(|(id, _)| id.clone()).collect();
    let (dead, waiting) = collect_ids(
        &reader(&names.dlq, 4),
        &refused_ids,
        Duration::from_secs(90),
    )
    .await;
    assert!(
        waiting.is_empty(),
        "{} refused records never reached the DLQ, e.g. {:?}",
        waiting.len(),
        waiting.iter().take(3).collect::<Vec<_>>()
    );
    for r in &dead {
        assert_eq!(
            r.header("sm-error").as_deref(),
            Some("target-unavailable"),
            "{}",
            r.id()
        );
        assert!(r
            .header("sm-error-detail")
            .is_some_and(|d| d.contains(&bad)));
    }

    // The target takes records again: the next probe succeeds, and new records are delivered.
    sched.refuse_target(&bad, None);
    let later = now_ms() + 500;
    let back: Vec<(String, i64)> = (0..20).map(|i| (format!("back-{i}"), later + i)).collect();
    schedule_records_to(&names, &bad, &back).await;
    let back_ids: Vec<String> = back.iter().map(|(id, _)| id.clone()).collect();
    let (_, waiting) = collect_ids(&reader(&bad, 2), &back_ids, Duration::from_secs(60)).await;
    assert!(
        waiting.is_empty(),
        "{} never delivered after the target recovered",
        waiting.len()
    );
    let health = health_reaches(&http, "ok", Duration::from_secs(10)).await;
    assert_eq!(health["status"], "ok", "{health}");
    sched.stop().await.expect("clean stop");
}

/// A clean stop ends within `--shutdown-timeout` even when a stage waits for what never comes:
/// deliveries to a target that answers nothing (injected), a give-up time far away, and a budget
/// so small that ingest waits for room that nothing frees. The stop returns in time with an
/// error that says what was left, and commits nothing of the records it could not deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_ends_within_its_timeout_and_says_what_was_left() {
    let names = Names::new("stuck-stop");
    create_topic(&names.target, 2).await;
    let flags = [
        "--memory-budget",
        "1MiB",
        "--target-give-up",
        "1h",
        "--shutdown-timeout",
        "4s",
        "--ingest-partitions",
        "1",
    ];
    let sched = start_in_process_with(&names, &flags).await;
    sched.refuse_target(&names.target, Some(Duration::from_secs(3_600)));
    let http = sched.http_addr.to_string();
    let due = now_ms();
    let records: Vec<(String, i64)> = (0..2_000).map(|i| (format!("s-{i}"), due)).collect();
    schedule_records(&names, &records).await;
    // Every record is past due, so only the timer can take it: the holds' part of the budget
    // (three quarters) fills, and ingest waits for room.
    // Less one record's share: shares need not divide the part exactly.
    let holds_full = 1_048_576 * 3 / 4 - 4096;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut health = healthz(&http).await;
    while health["memory_used"].as_u64().unwrap_or(0) < holds_full
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        health = healthz(&http).await;
    }
    assert!(
        health["memory_used"].as_u64().unwrap_or(0) >= holds_full,
        "the budget's holds never filled: {health}"
    );
    // Deliveries to the target are on their way and stuck (its health says so after 5 s without
    // an answer), not parked at the publish gate, which may hold them a moment at start: a stop
    // then had nothing unanswered to report (CI, 1 run in 5 here).
    let stuck = |h: &serde_json::Value| {
        h["failing_targets"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["topic"] == names.target.as_str()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stuck(&health) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        health = healthz(&http).await;
    }
    assert!(
        stuck(&health),
        "deliveries to the target never got stuck: {health}"
    );

    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), sched.stop())
        .await
        .expect("the stop ends");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the stop took {took:?}");
    assert!(
        matches!(&result, Err(scheduler::Error::Unfinished(what)) if what.contains("unacknowledged") || what.contains("lanes")),
        "{result:?}"
    );

    let committed = committed_ingest(&names, &flags);
    assert!(
        committed.is_none_or(|c| c <= 0),
        "nothing undelivered is committed: {committed:?}"
    );
}
