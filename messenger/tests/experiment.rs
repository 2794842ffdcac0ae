//! A short experiment end to end against the real broker, MongoDB-compatible server and MariaDB,
//! with the Kafka scheduler and the MySQL baseline running: fully audited, correct lateness, a
//! message removed on purpose reported missing, a duplicated one reported as a duplicate, and the
//! senders' totals matching what arrived.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use messenger::{Experiment, Faults, Messenger};
use mongodb::bson::{doc, Document};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use scheduler::testkit::*;
use support::start_stack;

mod support;

fn experiment(count: u64) -> Experiment {
    Experiment {
        count,
        duration: Duration::from_secs(1),
        rate: Some(200.0),
        value_size: 24,
        min_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(4),
        kafka: true,
        mysql: true,
        grace: Duration::from_secs(15),
        // Due 1-4 s ahead: too close to change (see `CHANGE_LEAD`); the next test changes some.
        cancel_share: 0.0,
        reschedule_share: 0.0,
    }
}

/// A quarter of the messages cancelled (over Kafka and over HTTP alternately; a row update in
/// MySQL) and a quarter rescheduled, on both paths: none of the cancelled and no old version
/// arrives, everything else does, on time, and the live figures agree with the audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_rescheduled_messages_are_honoured_and_audited_on_both_paths() {
    let stack = start_stack("change", 2, 1.0).await;
    let exp = Experiment {
        min_delay: Duration::from_secs(4),
        max_delay: Duration::from_secs(7),
        cancel_share: 0.25,
        reschedule_share: 0.25,
        ..experiment(200)
    };
    let m = Messenger::start(stack.conn.clone(), exp.clone())
        .await
        .expect("messenger starts");
    let report = m
        .run_experiment(&exp, &Faults::default())
        .await
        .expect("the run finishes");
    eprint!("{}", report.table());
    let mon = m.live.monitor();
    for p in &report.paths {
        assert!(
            p.cancelled >= 20 && p.rescheduled >= 20,
            "{}: about 50 of each expected: {p:?}",
            p.path
        );
        assert_eq!(p.sent + p.cancelled, 200, "{p:?}");
        assert_eq!(
            (p.cancelled_delivered, p.rescheduled_old_delivered),
            (0, 0),
            "{p:?}"
        );
        assert_eq!((p.missing, p.early), (0, 0), "{p:?}");
        assert_eq!(mon["paths"][&p.path]["cancelled"], p.cancelled, "{mon}");
        assert_eq!(
            mon["paths"][&p.path]["sent"], p.sent,
            "one definition of sent: {mon}"
        );
        assert_eq!(mon["paths"][&p.path]["cancelled_arrived"], 0, "{mon}");
    }
    assert!(report.ok());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_is_fully_audited_with_missing_and_duplicates_reported() {
    let stack = start_stack("msgr", 3, 0.8).await;
    let conn = stack.conn.clone();
    let database = conn.mongodb_database.clone();
    let sms_topic = conn.sms_topic.clone();
    let m = Arc::new(
        Messenger::start(conn, experiment(300))
            .await
            .expect("messenger starts"),
    );

    // Message 5 never reaches the Kafka scheduler; message 7 arrives twice on the Kafka path.
    let faults = Faults {
        skip_kafka: vec![5],
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runner = {
        let m = m.clone();
        tokio::spawn(async move {
            m.run_experiment_announced(&experiment(300), &faults, tx)
                .await
        })
    };
    let run_id = rx.await.expect("the run started");
    // Duplicate message 7 exactly as delivered: same key, value and headers.
    let dup_id = format!("{run_id}-7");
    let seen = collect(&reader(&sms_topic, 3), Duration::from_secs(20), |r| {
        r.iter()
            .any(|x| x.header("sm-id").as_deref() == Some(&dup_id) && x.header("sm-path").is_none())
    })
    .await;
    let original = seen
        .iter()
        .find(|x| x.header("sm-id").as_deref() == Some(&dup_id) && x.header("sm-path").is_none())
        .expect("message 7 delivered by the Kafka scheduler");
    let headers = original
        .headers
        .iter()
        .fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: v.as_deref(),
            })
        });
    let mut copy = FutureRecord::<[u8], [u8]>::to(&sms_topic).headers(headers);
    if let Some(k) = original.key.as_deref() {
        copy = copy.key(k);
    }
    if let Some(v) = original.value.as_deref() {
        copy = copy.payload(v);
    }
    producer()
        .send(copy, Duration::from_secs(5))
        .await
        .expect("duplicate produced");
    let report = runner.await.unwrap().expect("the run finishes");
    eprint!("{}", report.table());

    let kafka = report
        .paths
        .iter()
        .find(|p| p.path == "kafka")
        .expect("kafka path");
    let mysql = report
        .paths
        .iter()
        .find(|p| p.path == "mysql")
        .expect("mysql path");
    assert_eq!(
        (
            kafka.sent,
            kafka.received,
            kafka.missing,
            kafka.duplicates,
            kafka.early
        ),
        (300, 299, 1, 1, 0)
    );
    assert_eq!(
        (
            mysql.sent,
            mysql.received,
            mysql.missing,
            mysql.duplicates,
            mysql.early
        ),
        (300, 300, 0, 0, 0)
    );
    assert!(!report.ok(), "a missing message fails the run");
    assert!(kafka.lateness_max_ms.unwrap() >= 0);

    // The audit documents themselves: lateness is the first arrival minus the due time.
    let client = mongodb::Client::with_uri_str(
        std::env::var("SM_MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into()),
    )
    .await
    .unwrap();
    let docs: Vec<Document> = client
        .database(&database)
        .collection::<Document>("messages")
        .find(doc! { "run_id": &run_id })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(docs.len(), 600, "one document per message and path");
    let mut checked = 0;
    for d in &docs {
        if let (Ok(received), Ok(due)) = (d.get_datetime("received_at"), d.get_datetime("due_at")) {
            let late = d
                .get_i64("lateness_ms")
                .or_else(|_| d.get_i32("lateness_ms").map(i64::from))
                .unwrap();
            assert_eq!(
                late,
                received.timestamp_millis() - due.timestamp_millis(),
                "{d}"
            );
            assert!(late >= 0, "arrived early: {d}");
            assert!(d.get_str("sender").unwrap().starts_with("sender_"));
            assert!(["sent", "failed"].contains(&d.get_str("status").unwrap()));
            checked += 1;
        }
    }
    assert_eq!(checked, 599);
    let missing = docs
        .iter()
        .find(|d| d.get_str("_id").unwrap() == format!("{run_id}-5:kafka"))
        .unwrap();
    assert_eq!(missing.get_i64("deliveries").unwrap_or(0), 0);

    // The senders' reported totals add up to every copy that arrived (600 = 299 + 1 + 300).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let total = loop {
        let t: u64 = m
            .live
            .senders()
            .values()
            .map(|s| s.success_count + s.failed_count)
            .sum();
        if t >= 600 || std::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(total, m.live.arrivals(&run_id));

    // One definition of each count: /monitor (what -p and the live page show) and the audited
    // report agree on failed SMS (messages no attempt sent), and attempts are every copy handled.
    let mon = m.live.monitor();
    assert_eq!(mon["run_id"], run_id.as_str());
    assert_eq!(mon["finished"], true);
    let report_failed: u64 = report.paths.iter().map(|p| p.sms_failed).sum();
    assert_eq!(mon["total"]["failed"], report_failed, "{mon}");
    assert_eq!(mon["total"]["attempts"], 600);
    assert_eq!(
        mon["total"]["reprocessed"], 1,
        "the one duplicate was handled twice"
    );
    assert_eq!(mon["paths"]["kafka"]["missing"], 1);
    assert_eq!(mon["paths"]["kafka"]["pending"], 0);
    assert!(mon["paths"]["mysql"]["distribution"].is_array());
    assert_eq!(total, 600);

    // The HTTP API: the report, the live figures, and a run started over HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(messenger::serve_on(
        listener,
        m.clone(),
        std::future::pending(),
    ));
    let api: serde_json::Value = reqwest::get(format!("{base}/api/report?run_id={run_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["paths"][0]["missing"], 1);
    let started: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/produce-messages"))
        .json(&serde_json::json!({"count": 40, "rate": 100, "min_delay": "1s", "max_delay": "2s"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second = started["run_id"].as_str().expect("a run id").to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mon: serde_json::Value = reqwest::get(format!("{base}/monitor"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if mon["run_id"] == second.as_str()
            && mon["paths"]["kafka"]["received"] == 40
            && mon["paths"]["mysql"]["received"] == 40
        {
            assert!(mon["paths"]["kafka"]["p99_ms"].as_i64().is_some());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTP run did not complete: {mon}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = reqwest::get(&base).await.unwrap().text().await.unwrap();
    assert!(page.contains("EventSource(\"/events\")"));
    let bad = reqwest::Client::new()
        .post(format!("{base}/produce-messages"))
        .json(&serde_json::json!({"count": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The HTTP run writes its report after its last arrival: wait for that before stopping.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while m.live.runs.now() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTP run never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.stop().await;
}
