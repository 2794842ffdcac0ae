//! End-to-end delivery against the real local broker: many records across every slice level, the
//! dead-letter cases, and the HTTP API.

use std::collections::HashMap;
use std::time::Duration;

use scheduler::testkit::*;

const TARGET_PARTITIONS: i32 = 3;

/// 2,000 records with delays from 0 to 8 s (crossing the levels of the test ladder), 40 keys,
/// user headers, and pairs with the same key and due time: every one arrives once, never early,
/// intact, partitioned by key, and pairs keep their order. A record due in a year waits in the top
/// level's slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_records_cross_every_level_and_arrive_on_time_and_intact() {
    let names = Names::new("deliver");
    create_topic(&names.target, TARGET_PARTITIONS).await;
    let sched = start_in_process(&names).await;
    let producer = producer();
    let reader = reader(&names.target, TARGET_PARTITIONS);

    let n = 2_000usize;
    let base = now_ms() + 1_500;
    let mut expected = HashMap::new();
    let mut sends = Vec::new();
    for i in 0..n {
        // Every tenth record shares its key and due time with the one before it.
        let j = if i % 10 == 9 { i - 1 } else { i };
        let due = base + (j as i64 * 7_919) % 8_000;
        let key = format!("key-{}", j % 40);
        let value = format!("value-{i}");
        let time = if i % 2 == 0 {
            due.to_string()
        } else {
            scheduler::DueTime::from_millis(due).unwrap().to_rfc3339()
        };
        let id = format!("id-{i}");
        expected.insert(id.clone(), (due, key.clone(), value.clone()));
        sends.push((key, value, time, id));
    }
    let t0 = now_ms();
    futures::future::join_all(sends.iter().map(|(key, value, time, id)| {
        let (producer, names) = (&producer, &names);
        async move {
            let headers = [
                ("trace", id.as_bytes()),
                ("time", time.as_bytes()),
                ("topic", names.target.as_bytes()),
                ("id", id.as_bytes()),
            ];
            produce(
                producer,
                &names.ingest,
                Some(key.as_bytes()),
                value.as_bytes(),
                &headers,
            )
            .await
        }
    }))
    .await;
    eprintln!("produced {n} records in {} ms", now_ms() - t0);
    let far = (now_ms() + 365 * 86_400_000).to_string();
    produce(
        &producer,
        &names.ingest,
        None,
        b"next year",
        &[
            ("time", far.as_bytes()),
            ("topic", names.target.as_bytes()),
            ("id", b"far"),
        ],
    )
    .await;

    let all = collect_all(
        &reader,
        expected.keys(),
        Vec::new(),
        Duration::from_secs(60),
    )
    .await;
    assert_all_arrived(expected.keys(), &all);
    let ids = by_id(&all);
    assert!(
        !ids.contains_key("far"),
        "the record due next year was delivered"
    );
    assert_eq!(all.len(), n, "duplicates delivered without any failure");

    let mut key_partition: HashMap<Vec<u8>, i32> = HashMap::new();
    for r in &all {
        let id = r.header("sm-id").expect("sm-id");
        let (due, key, value) = &expected[&id];
        assert_eq!(r.header("sm-due-ms"), Some(due.to_string()));
        assert!(
            r.timestamp_ms >= *due,
            "{id} published {} ms early",
            due - r.timestamp_ms
        );
        assert!(
            r.received_ms >= *due,
            "{id} read {} ms before its due time",
            due - r.received_ms
        );
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(r.value.as_deref(), Some(value.as_bytes()));
        let names_: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names_,
            ["trace", "sm-id", "sm-version", "sm-due-ms"],
            "{id}: user header kept, scheduling headers replaced"
        );
        assert_eq!(r.header("trace"), Some(id.clone()));
        let p = *key_partition
            .entry(r.key.clone().unwrap())
            .or_insert(r.partition);
        assert_eq!(p, r.partition, "records of one key must share a partition");
    }
    // Same key, same due time: produced i-1 before i, so delivered in that order.
    let pos: HashMap<String, (i32, i64)> = all
        .iter()
        .map(|r| (r.header("sm-id").unwrap(), (r.partition, r.offset)))
        .collect();
    for i in (9..n).step_by(10) {
        let (a, b) = (pos[&format!("id-{}", i - 1)], pos[&format!("id-{i}")]);
        assert_eq!(a.0, b.0);
        assert!(
            a.1 < b.1,
            "id-{} and id-{i} (same key and due time) arrived out of order",
            i - 1
        );
    }
    let (p50, p99, max) = lateness(&all);
    eprintln!("lateness ms: p50 {p50} p99 {p99} max {max}");

    // The far record waits in one of the top level's slot topics.
    let ladder = names.settings().ladder;
    let top = ladder.levels() - 1;
    // A slice copy names its id last in its one internal header, `sm-copy`.
    let is_far = |x: &Received| x.header("sm-copy").is_some_and(|c| c.ends_with(";far"));
    let mut found = false;
    for slot in 0..ladder.slots() {
        let topic = ladder.topic(&names.prefix, top, slot);
        let recs = collect(&reader_of(&topic), Duration::from_secs(3), |r| {
            r.iter().any(is_far)
        })
        .await;
        found |= recs.iter().any(is_far);
    }
    assert!(
        found,
        "the record due in a year is not in a top-level slice"
    );
    sched.stop().await.expect("clean stop");
}

fn reader_of(topic: &str) -> rdkafka::consumer::StreamConsumer {
    reader(topic, 2)
}

/// Each kind of bad input goes to the DLQ with its reason and the original record, and none of
/// them stops the good record behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_a_reason_and_do_not_block_good_ones() {
    let names = Names::new("dlq");
    create_topic(&names.target, 1).await;
    // Auto-creation off, as on a broker with auto.create.topics.enable=false.
    let no_auto_create = [
        "-X",
        "allow.auto.create.topics=false",
        "-X",
        "topic.metadata.propagation.max.ms=2000",
    ];
    let sched = start_in_process_with(&names, &no_auto_create).await;
    let producer = producer();
    let soon = (now_ms() + 500).to_string();
    let slice_topic = format!("{}_400MS_0", names.prefix);
    let target = names.target.as_str();
    /// (expected `sm-error`, headers, value)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, &'a [u8]);
    let cases: Vec<Case> = vec![
        ("missing-time", vec![("topic", target.as_bytes())], b"v1"),
        (
            "invalid-time",
            vec![("time", b"next tuesday"), ("topic", target.as_bytes())],
            b"v2",
        ),
        (
            "invalid-time",
            vec![
                ("time", b"2026-07-01 12:00:00 PST"),
                ("topic", target.as_bytes()),
            ],
            b"v3",
        ),
        (
            "invalid-time",
            vec![
                ("time", b"2026-03-29 02:30:00 Europe/Amsterdam"),
                ("topic", target.as_bytes()),
            ],
            b"v4",
        ),
        (
            "invalid-time",
            vec![("time", b"\xff\xfe"), ("topic", target.as_bytes())],
            b"v5",
        ),
        ("missing-topic", vec![("time", soon.as_bytes())], b"v6"),
        (
            "invalid-topic",
            vec![("time", soon.as_bytes()), ("topic", b"no spaces allowed")],
            b"v7",
        ),
        (
            "internal-topic",
            vec![
                ("time", soon.as_bytes()),
                ("topic", names.ingest.as_bytes()),
            ],
            b"v8",
        ),
        (
            "internal-topic",
            vec![("time", soon.as_bytes()), ("topic", slice_topic.as_bytes())],
            b"v9",
        ),
        (
            "internal-topic",
            vec![("time", soon.as_bytes()), ("topic", b"__consumer_offsets")],
            b"v10",
        ),
        ("missing-id", vec![("cancel", b"true")], b"v14"),
        (
            "invalid-cancel",
            vec![
                ("time", soon.as_bytes()),
                ("topic", target.as_bytes()),
                ("id", b"order-2"),
                ("cancel", b"yes"),
            ],
            b"v15",
        ),
    ];
    for (_, headers, value) in &cases {
        produce(&producer, &names.ingest, Some(b"k"), value, headers).await;
    }
    // A target that refuses the record for good: it accepts at most 1,000 bytes.
    let small = format!("{}-small", names.target);
    create_topic_with(&small, 1, &[("max.message.bytes", "1000")]).await;
    let big = vec![b'b'; 5_000];
    produce(
        &producer,
        &names.ingest,
        Some(b"k"),
        &big,
        &[("time", soon.as_bytes()), ("topic", small.as_bytes())],
    )
    .await;
    // A target that does not exist, with auto-creation off.
    let absent = format!("{}-absent", names.target);
    produce(
        &producer,
        &names.ingest,
        Some(b"k"),
        b"v12",
        &[("time", soon.as_bytes()), ("topic", absent.as_bytes())],
    )
    .await;
    // A header name that is not UTF-8: rdkafka's own accessor would panic on it.
    produce_with_raw_header_name(&names.ingest, b"\xff\xfe", &soon, target, b"v11");
    produce(
        &producer,
        &names.ingest,
        Some(b"k"),
        b"good",
        &[("time", soon.as_bytes()), ("topic", target.as_bytes())],
    )
    .await;

    let dlq = reader(&names.dlq, 4);
    let dead = collect(&dlq, Duration::from_secs(30), |r| {
        r.len() >= cases.len() + 3
    })
    .await;
    assert_eq!(
        dead.len(),
        cases.len() + 3,
        "every bad record reaches the DLQ"
    );
    let mut seen: Vec<(String, Vec<u8>)> = dead
        .iter()
        .map(|r| {
            (
                r.header("sm-error").unwrap_or_default(),
                r.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut want: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(code, _, v)| (code.to_string(), v.to_vec()))
        .collect();
    want.push(("invalid-header".to_string(), b"v11".to_vec()));
    want.push(("refused-by-broker".to_string(), big.clone()));
    want.push(("unknown-topic".to_string(), b"v12".to_vec()));
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
    for r in &dead {
        assert!(r.header("sm-error-detail").is_some_and(|d| !d.is_empty()));
        let code = r.header("sm-error").unwrap_or_default();
        if code == "refused-by-broker" || code == "unknown-topic" {
            // Refused at delivery: the user's headers as sent, so it can be resubmitted.
            assert!(r.header("topic").is_some_and(|t| t == small || t == absent));
            assert!(r.header("sm-id").is_some());
        } else {
            assert!(r
                .header("sm-source")
                .is_some_and(|s| s.starts_with(&names.ingest)));
        }
        if r.value.as_deref() != Some(&b"v11"[..]) {
            assert_eq!(
                r.key.as_deref(),
                Some(&b"k"[..]),
                "the original key is kept"
            );
        }
    }
    let good = collect(&reader(target, 1), Duration::from_secs(20), |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].value.as_deref(), Some(&b"good"[..]));
    sched.stop().await.expect("clean stop");
}

/// The HTTP API answers in the original's shapes and exports the metrics the dashboards use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_shows_jobs_workers_config_health_and_metrics() {
    let names = Names::new("http");
    create_topic(&names.target, 1).await;
    let sched = start_in_process(&names).await;
    let base = format!("http://{}", sched.http_addr);
    let producer = producer();
    // Due in 5 s: it crosses at least one swept level before the streamed level 0.
    let due = (now_ms() + 5_000).to_string();
    produce(
        &producer,
        &names.ingest,
        None,
        b"x",
        &[("time", due.as_bytes()), ("topic", names.target.as_bytes())],
    )
    .await;
    let got = collect(&reader(&names.target, 1), Duration::from_secs(20), |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(got.len(), 1);

    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            reqwest::get(url)
                .await
                .expect("http")
                .text()
                .await
                .expect("body")
        }
    };
    let jq: serde_json::Value = serde_json::from_str(&get("/api/jq").await).unwrap();
    let jobs = jq["job_queue"].as_array().expect("job_queue is a list");
    assert!(!jobs.is_empty(), "one READY job per level is always queued");
    for key in [
        "job_id",
        "name",
        "lower",
        "upper",
        "creation_time",
        "status",
        "workers",
    ] {
        assert!(jobs[0].get(key).is_some(), "job has {key}");
    }
    let wq: serde_json::Value = serde_json::from_str(&get("/api/wq").await).unwrap();
    let workers = wq["worker_queue"]
        .as_object()
        .expect("worker_queue is a map");
    assert_eq!(workers.len(), 4);
    for w in workers.values() {
        for key in [
            "worker_id",
            "join_time",
            "last_heartbeat",
            "status",
            "job_id",
        ] {
            assert!(w.get(key).is_some(), "worker has {key}");
        }
    }
    let log: serde_json::Value = serde_json::from_str(&get("/api/job_log").await).unwrap();
    let log = log["job_log"].as_array().expect("job_log is a list");
    assert!(
        log.iter()
            .any(|j| j["status"] == "DONE" && j["records"].as_u64() > Some(0)),
        "a finished sweep moved the record"
    );
    let config: serde_json::Value = serde_json::from_str(&get("/api/config").await).unwrap();
    assert_eq!(config["ingest_topic"], names.ingest);
    assert_eq!(
        config["slice_widths_ms"],
        serde_json::json!([400, 800, 1600, 3200, 6400])
    );
    let health: serde_json::Value = serde_json::from_str(&get("/healthz").await).unwrap();
    assert_eq!(health["status"], "ok");
    let metrics = get("/metrics").await;
    for name in [
        "sm_delivery_lateness_seconds_bucket",
        "sm_delivered_total",
        "sm_scheduled_total",
        "sm_slice_writes_total",
        "sm_job_duration_seconds",
        "sm_timer_pending",
        "sm_workers_busy",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    sched.stop().await.expect("clean stop");
}
