//! Recurring schedules (issue #32) against the real local broker: an `every 1s` schedule through
//! a SIGKILL and a restart skips no occurrence and a cancel stops it; a cron in a zone with a
//! count delivers exactly that many; bad recurrences go to the DLQ with a reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use scheduler::testkit::*;

/// The scheduler's `--cancel-lead` (its default).
const LEAD_MS: i64 = 1_000;

fn spawn(names: &Names, log: &str, http: u16) -> ChildGuard {
    let instance = format!("{}-only", names.group);
    spawn_on_port(
        env!("CARGO_BIN_EXE_scheduler"),
        names,
        log,
        http,
        &["--instance-id", &instance],
    )
}

/// Headers as the test produces them.
type Headers<'a> = &'a [(&'a str, &'a [u8])];

/// The occurrences received, by due time, with each one's copies.
fn by_due(got: &[Received]) -> BTreeMap<i64, Vec<&Received>> {
    let mut out: BTreeMap<i64, Vec<&Received>> = BTreeMap::new();
    for r in got {
        let due = r
            .header("sm-due-ms")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("a copy without sm-due-ms: {r:?}"));
        out.entry(due).or_default().push(r);
    }
    out
}

/// `every 1s` from a whole second for a minute: occurrences arrive; the process is SIGKILLed
/// half-way and stays down for 3 s, then is started again; the occurrences due meanwhile arrive late, and none is
/// skipped (a duplicate carries the same `sm-occurrence`); then a cancel over Kafka stops it: no
/// occurrence due later than the cancel's acknowledgement plus the lead arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_survives_a_sigkill_without_a_gap_and_a_cancel_stops_it() {
    let names = Names::new("recur-kill");
    create_topic(&names.target, 1).await;
    let http = free_port();
    let mut first = spawn(&names, &format!("{}-1.log", names.group), http);
    answers_ok(http).await;

    let start = (now_ms() / 1_000 + 2) * 1_000;
    let p = producer();
    let start_text = start.to_string();
    produce(
        &p,
        &names.ingest,
        Some(b"tick-key"),
        b"tick-value",
        &[
            ("id", b"tick"),
            ("topic", names.target.as_bytes()),
            ("every", b"1s"),
            ("start", start_text.as_bytes()),
            ("trace-id", b"t-1"),
        ],
    )
    .await;
    let reader = reader(&names.target, 1);
    // About half of the minute the schedule runs for, then the kill.
    let mut got = collect(&reader, Duration::from_secs(60), |r| r.len() >= 25).await;
    assert!(
        got.len() >= 25,
        "occurrences before the kill: {}",
        got.len()
    );
    // Between an occurrence's delivery and the next one's ingest the id reads `delivered`; the
    // next occurrence is pending a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pending = schedule_status(http, "tick").await;
    while pending["status"] != "pending" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pending = schedule_status(http, "tick").await;
    }
    assert_eq!(pending["status"], "pending", "{pending}");
    assert_eq!(pending["recurrence"], "every 1s", "{pending}");

    kill9(&mut first);
    let down_until = Instant::now() + Duration::from_secs(3);
    got.extend(
        collect(&reader, Duration::from_secs(3), |_| {
            Instant::now() >= down_until
        })
        .await,
    );
    let _second = spawn(&names, &format!("{}-2.log", names.group), http);
    answers_ok(http).await;
    // Caught up, and on time again until a minute of occurrences.
    got.extend(
        collect(&reader, Duration::from_secs(90), |r| {
            r.iter()
                .filter_map(|x| x.header("sm-due-ms")?.parse::<i64>().ok())
                .any(|due| due >= start + 60_000)
        })
        .await,
    );

    produce(
        &p,
        &names.ingest,
        Some(b"tick-key"),
        b"",
        &[("id", b"tick"), ("cancel", b"true")],
    )
    .await;
    let cancelled_at = now_ms();
    let quiet_until = Instant::now() + Duration::from_secs(4);
    got.extend(
        collect(&reader, Duration::from_secs(4), |_| {
            Instant::now() >= quiet_until
        })
        .await,
    );
    got.extend(drain_to_end(&reader).await);

    let occurrences = by_due(&got);
    let dues: Vec<i64> = occurrences.keys().copied().collect();
    assert_eq!(
        dues.first(),
        Some(&start),
        "the first occurrence is at start"
    );
    for pair in dues.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            1_000,
            "an occurrence was skipped: {dues:?}"
        );
    }
    let last = *dues.last().expect("occurrences");
    assert!(
        last <= cancelled_at + LEAD_MS,
        "delivered after the cancel: due {last}, cancel acknowledged at {cancelled_at}"
    );
    assert!(
        last >= start + 60_000,
        "the schedule stopped before its minute: last due {last}, start {start}"
    );
    let mut duplicates = 0;
    for (due, copies) in &occurrences {
        let first = copies[0];
        for r in copies {
            assert!(
                r.timestamp_ms >= *due,
                "early by {} ms",
                due - r.timestamp_ms
            );
            assert_eq!(r.header("sm-occurrence"), first.header("sm-occurrence"));
        }
        duplicates += copies.len() - 1;
        assert_eq!(first.key.as_deref(), Some(&b"tick-key"[..]));
        assert_eq!(first.value.as_deref(), Some(&b"tick-value"[..]));
        assert_eq!(first.header("trace-id").as_deref(), Some("t-1"));
        assert_eq!(first.id(), "tick");
        for scheduling in ["every", "start", "time", "topic", "id", "sm-recur"] {
            assert_eq!(first.header(scheduling), None, "{scheduling} on a copy");
        }
    }
    let second_of = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("a time")
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    };
    assert_eq!(
        occurrences[&start][0].header("sm-occurrence"),
        Some(second_of(start))
    );
    eprintln!(
        "occurrences {}, duplicates {duplicates}, from {start} to {last}; cancel acknowledged at \
         {cancelled_at}",
        occurrences.len()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = schedule_status(http, "tick").await;
        if s["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "status after the cancel: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cron of six fields (every second) in New York with `count: 3` delivers exactly three
/// occurrences, each stamped in that zone; an invalid cron, an unknown zone, `every` under a
/// second, `end` before `start` and a recurrence without an id each go to the DLQ with the code
/// `invalid-recurrence` and a reason that names the problem, and hold no one else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_with_a_count_fires_that_often_and_bad_recurrences_are_dead_lettered() {
    let names = Names::new("recur-cron");
    create_topic(&names.target, 1).await;
    let sched = start_in_process(&names).await;
    let p = producer();
    let target = names.target.as_bytes();
    let bad: [(&str, Headers, &str); 5] = [
        ("bad-cron", &[("cron", b"61 * * * *")], "invalid cron"),
        (
            "bad-zone",
            &[("every", b"1m"), ("zone", b"Mars/Olympus")],
            "unknown zone",
        ),
        (
            "bad-every",
            &[("every", b"10ms")],
            "shorter than one second",
        ),
        (
            "bad-end",
            &[
                ("every", b"1m"),
                ("start", b"2030-01-02T00:00:00Z"),
                ("end", b"2030-01-01T00:00:00Z"),
            ],
            "before 'start'",
        ),
        ("", &[("every", b"1m")], "needs an 'id'"),
    ];
    for (id, headers, _) in &bad {
        let mut all: Vec<(&str, &[u8])> = vec![("topic", target)];
        if !id.is_empty() {
            all.push(("id", id.as_bytes()));
        }
        all.extend_from_slice(headers);
        produce(&p, &names.ingest, Some(b"bad"), id.as_bytes(), &all).await;
    }
    produce(
        &p,
        &names.ingest,
        Some(b"ny"),
        b"ny-value",
        &[
            ("id", b"ny"),
            ("topic", target),
            ("cron", b"* * * * * *"),
            ("zone", b"America/New_York"),
            ("count", b"3"),
        ],
    )
    .await;

    let dlq = collect(&reader(&names.dlq, 4), Duration::from_secs(30), |r| {
        r.len() >= bad.len()
    })
    .await;
    assert_eq!(dlq.len(), bad.len(), "{dlq:?}");
    for (id, _, why) in &bad {
        let copy = dlq
            .iter()
            .find(|r| r.value.as_deref() == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("{id:?} not dead-lettered"));
        assert_eq!(
            copy.header("sm-error").as_deref(),
            Some("invalid-recurrence")
        );
        let detail = copy.header("sm-error-detail").unwrap_or_default();
        assert!(detail.contains(why), "{id:?}: {detail}");
    }

    let reader = reader(&names.target, 1);
    let got = collect(&reader, Duration::from_secs(30), |r| r.len() >= 3).await;
    // Three, and no fourth: the last occurrence files nothing, so waiting 3 s more is enough to
    // see one that should not come.
    let quiet_until = Instant::now() + Duration::from_secs(3);
    let more = collect(&reader, Duration::from_secs(3), |_| {
        Instant::now() >= quiet_until
    })
    .await;
    let all: Vec<Received> = got.into_iter().chain(more).collect();
    let occurrences = by_due(&all);
    assert_eq!(occurrences.len(), 3, "count 3: {:?}", occurrences.keys());
    let dues: Vec<i64> = occurrences.keys().copied().collect();
    assert!(dues.windows(2).all(|w| w[1] - w[0] == 1_000), "{dues:?}");
    for (due, copies) in &occurrences {
        let stamp = copies[0].header("sm-occurrence").unwrap_or_default();
        assert!(
            stamp.ends_with("-05:00") || stamp.ends_with("-04:00"),
            "{stamp}"
        );
        let parsed = chrono::DateTime::parse_from_rfc3339(&stamp).expect("RFC 3339");
        assert_eq!(parsed.timestamp_millis(), *due);
    }
    sched.stop().await.expect("clean stop");
}

/// `/api/upcoming` counts what the slices hold without reading them: records due 20 to 40
/// minutes ahead (in windows whose sweeps are minutes away, so nothing moves meanwhile) are
/// all counted once placed, and each window's count equals what reading its slot topic finds
/// due within it.
///
/// On a ladder up to 4,096 s: the tests' own (up to 6.4 s) keeps such records in its top level,
/// whose windows are swept every 6.4 s and move them on, so a count and a read never met (CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_ahead_agrees_with_reading_the_slices() {
    let names = Names::new("upcoming");
    create_topic(&names.target, 1).await;
    let ladder = [
        "--smallest-slice",
        "1s",
        "--slice-ratio",
        "4",
        "--largest-slice",
        "4096s",
    ];
    let sched = start_in_process_with(&names, &ladder).await;
    let http = sched.http_addr.to_string();
    let now = now_ms();
    let records: Vec<(String, i64)> = (0..300)
        .map(|i| (format!("u-{i}"), now + 20 * 60_000 + i * 4_000))
        .collect();
    schedule_records(&names, &records).await;

    let ask = || async {
        reqwest::get(format!("http://{http}/api/upcoming?minutes=60"))
            .await
            .expect("the API answers")
            .json::<serde_json::Value>()
            .await
            .expect("JSON")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answer = ask().await;
    while answer["total"] != 300 {
        assert!(Instant::now() < deadline, "never counted all 300: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = ask().await;
    }
    let settings = names.settings_with(&ladder);
    let partitions = settings.config.slice_partitions;
    let mut counted = 0;
    for window in answer["slices"].as_array().expect("slices") {
        let records = window["records"].as_u64().expect("a count");
        if records == 0 {
            continue;
        }
        let millis = |k: &str| {
            chrono::DateTime::parse_from_rfc3339(window[k].as_str().expect("a time"))
                .expect("RFC 3339")
                .timestamp_millis()
        };
        let (from, to) = (millis("from"), millis("to"));
        let topic = window["topic"].as_str().expect("a topic");
        let read = drain_to_end(&reader(topic, partitions)).await;
        let within = read
            .iter()
            .filter(|r| {
                let due = records_due(r);
                (from..to).contains(&due) || window["open_ended"] == true && due >= from
            })
            .count() as u64;
        assert_eq!(within, records, "{window}: read {} records", read.len());
        assert_eq!(
            window["open_ended"], false,
            "{window}: not in the top level"
        );
        counted += records;
    }
    assert_eq!(counted, 300);
    assert!(
        metric_sum(&http, "sm_upcoming_hour_records").await >= 300.0,
        "the gauge counts the next hour"
    );
    sched.stop().await.expect("clean stop");
}

/// The due time a slice copy carries (`sm-copy`: `1;<due ms>;...`).
fn records_due(r: &Received) -> i64 {
    r.header("sm-copy")
        .and_then(|c| c.split(';').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("a slice copy without sm-copy: {r:?}"))
}
