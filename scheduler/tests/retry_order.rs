//! Order holds through retries: records of one key due at one instant reach the target in the
//! order they were produced, even when the broker is away long enough that librdkafka gives up
//! on them (`message.timeout.ms`) and the scheduler sends them again itself. This test runs its
//! own broker, so it lives in a test binary of its own (it points the whole process at that
//! broker).

use std::collections::HashMap;
use std::time::Duration;

use scheduler::testkit::*;

const KEYS: usize = 4;
const PER_KEY: usize = 100;

fn header<'a>(key: &'a str, value: &'a str) -> rdkafka::message::Header<'a, &'a str> {
    rdkafka::message::Header {
        key,
        value: Some(value),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_one_key_keep_their_order_when_their_delivery_is_retried() {
    let mut broker = Broker::start();
    std::env::set_var("SM_BOOTSTRAP_SERVERS", broker.bootstrap());
    let names = Names::new("order");
    create_topic(&names.target, 1).await;
    // librdkafka gives up on a record after 1 s, so the broker's 3 s absence below makes every
    // due record fail back to the scheduler, which must send them again in their order.
    // Held in the timer from ingest on (one hop), so they are all there when the broker goes.
    let flags = ["-X", "message.timeout.ms=1000", "--hold-horizon", "10s"];
    let sched = start_in_process_with(&names, &flags).await;
    let http = sched.http_addr.to_string();

    let p = producer();
    let due = now_ms() + 5_000;
    let time = due.to_string();
    // Enqueued one after another (the idempotent producer keeps their order), acknowledged
    // together.
    let mut acks = Vec::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            let (key, id, value) = (format!("k{k}"), format!("k{k}-{i}"), i.to_string());
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(header("time", &time))
                .insert(header("topic", &names.target))
                .insert(header("id", &id));
            let record = rdkafka::producer::FutureRecord::to(&names.ingest)
                .key(&key)
                .payload(&value)
                .headers(headers);
            acks.push(p.send_result(record).map_err(|(e, _)| e).expect("queued"));
        }
    }
    for ack in acks {
        ack.await
            .expect("delivered")
            .map_err(|(e, _)| e)
            .expect("acknowledged");
    }
    assert!(
        now_ms() < due - 1_500,
        "scheduling took too long for the test to mean anything"
    );

    // Away from just before the due time until 3 s after it.
    let wait = Duration::from_millis((due - 200 - now_ms()).max(0) as u64);
    tokio::time::sleep_until(tokio::time::Instant::now() + wait).await;
    tokio::task::block_in_place(|| broker.kill_and_restart(Duration::from_secs(3)));

    let reader = reader(&names.target, 1);
    let want = KEYS * PER_KEY;
    let got = collect(&reader, Duration::from_secs(90), |r| by_id(r).len() >= want).await;
    assert_eq!(by_id(&got).len(), want, "every record arrives");
    assert!(
        metric_sum(&http, "sm_send_retries_total").await > 0.0,
        "the scheduler itself retried sends (else this test did not test retries)"
    );

    // Per key, the first copy of each record in the order the target holds them.
    let mut got = got;
    got.sort_by_key(|r| r.offset);
    let mut order: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in &got {
        assert!(r.timestamp_ms >= due, "{} early", r.id());
        if !seen.insert(r.id()) {
            continue;
        }
        let i: usize = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
            .parse()
            .expect("value is the sequence number");
        order
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(i);
    }
    for (key, seq) in &order {
        let sorted: Vec<usize> = (0..PER_KEY).collect();
        assert_eq!(
            seq,
            &sorted,
            "key {} arrived out of order",
            String::from_utf8_lossy(key)
        );
    }
    sched.stop().await.expect("clean stop");
}
