//! Metric names and the Prometheus exporter. Names are shared with the db-scheduler baseline so one
//! Grafana panel can compare both paths.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram: seconds between the due time and the target's acknowledgement, label `path`.
pub const LATENESS: &str = "sm_delivery_lateness_seconds";
/// Counter: records accepted from the ingest topic.
pub const SCHEDULED: &str = "sm_scheduled_total";
/// Counter: records delivered to their target (acknowledged), label `path`.
pub const DELIVERED: &str = "sm_delivered_total";
/// Counter: records already past due when accepted.
pub const PAST_DUE: &str = "sm_past_due_total";
/// Counter: records dead-lettered, label `reason`.
pub const DEAD_LETTERED: &str = "sm_dead_lettered_total";
/// Counter: records written into a slice, label `level`.
pub const SLICE_WRITES: &str = "sm_slice_writes_total";
/// Counter: sends retried after a transient broker error.
pub const SEND_RETRIES: &str = "sm_send_retries_total";
/// Histogram: how long before its due time a record reached the timer (0 when it arrived due).
pub const TIMER_HEADROOM: &str = "sm_timer_headroom_seconds";
/// Counter: records that reached the timer only after their due time (excluding those already
/// past due when accepted): each one is late because a sweep or a hop was slow.
pub const TIMER_LATE: &str = "sm_timer_late_total";
/// Counter: records a sweep found written after it began (later than the safety margin allows):
/// a sign that the margin is below the broker's produce latency.
pub const STRAGGLERS: &str = "sm_stragglers_total";
/// Gauge: records waiting in the timer.
pub const TIMER_PENDING: &str = "sm_timer_pending";
/// Gauge: the earliest due time in the timer, epoch seconds (0 when empty).
pub const NEXT_DUE: &str = "sm_next_due_timestamp_seconds";
/// Gauge: records pending in the slice topics this process owns, label `level`.
pub const SLICE_PENDING: &str = "sm_slice_pending";
/// Gauge: records in the ingest partitions this process owns not yet committed (consumer lag).
pub const INGEST_LAG: &str = "sm_ingest_lag";
/// Gauge: records read but not yet acknowledged in their next place.
pub const IN_FLIGHT: &str = "sm_in_flight";
/// Histogram: sweep job durations, label `level`.
pub const JOB_DURATION: &str = "sm_job_duration_seconds";
/// Histogram: how long after its window began a sweep had placed every record it read (0 when
/// before), label `level`: above 0, the records of that window reached the timer late.
pub const SWEEP_LATENESS: &str = "sm_sweep_lateness_seconds";
/// Counter: jobs finished, label `status`.
pub const JOBS: &str = "sm_jobs_total";
/// Gauge: workers running a job.
pub const WORKERS_BUSY: &str = "sm_workers_busy";
/// Counter: failed sweep attempts (each is retried), label `level`.
pub const SWEEP_FAILURES: &str = "sm_sweep_failures_total";
/// Gauge: sweeps failing and being retried now (`/healthz` says `degraded` while it is above 0).
pub const SWEEPS_BEHIND: &str = "sm_sweeps_behind";
/// Counter: slice records deleted by retention before they were swept (lost: raise the retention).
pub const SLICE_DATA_LOST: &str = "sm_slice_records_lost_total";
/// Counter: errors reading a slice (among them offsets out of range).
pub const SLICE_READ_ERRORS: &str = "sm_slice_read_errors_total";
/// Counter: engine restarts with new Kafka clients inside the process, label `reason` (`fenced`).
pub const ENGINE_RESTARTS: &str = "sm_engine_restarts_total";
/// Counter: transactions of the exactly-once mode, label `outcome` (`committed`, `aborted`,
/// `fenced`).
pub const TRANSACTIONS: &str = "sm_transactions_total";
/// Counter: transaction commits put off to the next tick (a partition's progress too long for
/// the offset metadata, or the broker asked to retry).
pub const TXN_POSTPONED: &str = "sm_transaction_postponed_total";
/// Histogram: how long a transaction's commit took (offsets and commit, gate closed).
pub const TXN_COMMIT_SECONDS: &str = "sm_transaction_commit_seconds";
/// Counter: records skipped on replay because the previous owner's committed transaction had
/// already written them (exactly-once).
pub const REPLAY_SKIPPED: &str = "sm_replay_skipped_total";
/// Counter: offset commits the broker refused (retried on the next tick).
pub const COMMIT_FAILURES: &str = "sm_commit_failures_total";
/// Gauge: target topics that refuse deliveries or leave them unacknowledged now (`/healthz`
/// names them).
pub const FAILING_TARGETS: &str = "sm_failing_targets";
/// Gauge: bytes of the memory budget in use (records in the timer and sends in flight).
pub const MEMORY_USED: &str = "sm_memory_used_bytes";
/// Counter: writes the producer acknowledged without an offset, sent again (see
/// [`crate::kafka::confirmed`]).
pub const UNCONFIRMED_ACKS: &str = "sm_unconfirmed_acks_total";
/// Counter: cancels accepted, label `via` (`kafka`, `http`).
pub const CANCELS: &str = "sm_cancels_total";
/// Counter: records of a version not delivered because a newer fact of their id is known, label
/// `reason`, the id's newest fact: `cancelled`, or `superseded` (rescheduled).
pub const WITHHELD: &str = "sm_withheld_total";
/// Counter: due records with an id that waited for the index of ids to be fresh enough.
pub const HELD_FOR_FRESHNESS: &str = "sm_held_for_freshness_total";
/// Counter: facts written to the state topic, label `fact`.
pub const FACTS_WRITTEN: &str = "sm_state_facts_written_total";
/// Counter: state records read into the index.
pub const STATE_FACTS_READ: &str = "sm_state_facts_read_total";
/// Counter: facts of ids the janitor removed (tombstoned) from the state topic.
pub const FACTS_REMOVED: &str = "sm_state_facts_removed_total";
/// Gauge: records due within the next hour (slice windows that begin within it, and the timer),
/// as `/api/upcoming` or the monitor last counted them.
pub const UPCOMING_HOUR: &str = "sm_upcoming_hour_records";
/// Counter: next occurrences of recurring schedules filed into the ingest topic.
pub const OCCURRENCES_FILED: &str = "sm_occurrences_filed_total";
/// Counter: occurrences of recurring schedules not delivered because they were missed and the
/// schedule says `missed: none`.
pub const OCCURRENCES_SKIPPED: &str = "sm_occurrences_skipped_total";
/// Counter: state records that are not facts (skipped).
pub const STATE_MALFORMED: &str = "sm_state_malformed_total";
/// Counter: state indexes emptied at start to be read again, because they were read from
/// another state topic; label `reason` (`cluster`, `topic`, `partitions`, `unrecorded`).
pub const INDEX_REBUILDS: &str = "sm_index_rebuilds_total";
/// Gauge: how far behind the clock the index of ids is proven complete (seconds).
pub const STATE_LAG: &str = "sm_state_lag_seconds";
/// Gauge: how far behind the clock the oldest ingest watermark is (seconds): a record with an
/// id waits while it lags by more than the cancel lead (an ingest partition unowned, or its
/// owner stopped or slow).
pub const INGEST_WATERMARK_LAG: &str = "sm_ingest_watermark_lag_seconds";

/// The metrics touched once or more per record, looked up once: each `counter!` call hashes the
/// name and labels and searches the recorder's registry, which was measurable at thousands of
/// records per second. Take it after [`install`] (handles taken before are no-ops).
pub struct PerRecord {
    pub scheduled: Counter,
    pub past_due: Counter,
    pub timer_headroom: Histogram,
    pub timer_late: Counter,
    pub lateness: Histogram,
    pub delivered: Counter,
    /// By level.
    slice_writes: Vec<Counter>,
    /// By fact name: `pending`, `delivered`, `cancelled`.
    facts_written: [(&'static str, Counter); 3],
}

impl PerRecord {
    pub fn new(levels: usize) -> PerRecord {
        PerRecord {
            scheduled: metrics::counter!(SCHEDULED),
            past_due: metrics::counter!(PAST_DUE),
            timer_headroom: metrics::histogram!(TIMER_HEADROOM),
            timer_late: metrics::counter!(TIMER_LATE),
            lateness: metrics::histogram!(LATENESS, "path" => "kafka"),
            delivered: metrics::counter!(DELIVERED, "path" => "kafka"),
            slice_writes: (0..levels)
                .map(|l| metrics::counter!(SLICE_WRITES, "level" => l.to_string()))
                .collect(),
            facts_written: ["pending", "delivered", "cancelled"]
                .map(|f| (f, metrics::counter!(FACTS_WRITTEN, "fact" => f))),
        }
    }

    pub fn slice_write(&self, level: usize) {
        match self.slice_writes.get(level) {
            Some(c) => c.increment(1),
            None => metrics::counter!(SLICE_WRITES, "level" => level.to_string()).increment(1),
        }
    }

    pub fn fact_written(&self, fact: &'static str) {
        match self.facts_written.iter().find(|(f, _)| *f == fact) {
            Some((_, c)) => c.increment(1),
            None => metrics::counter!(FACTS_WRITTEN, "fact" => fact).increment(1),
        }
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Registers the unlabelled counters at zero, so dashboards show 0 rather than "no data" before
/// the first event.
pub fn register_counters() {
    for name in [
        SCHEDULED,
        PAST_DUE,
        SEND_RETRIES,
        TIMER_LATE,
        STRAGGLERS,
        SLICE_DATA_LOST,
        SLICE_READ_ERRORS,
        UNCONFIRMED_ACKS,
        COMMIT_FAILURES,
        TXN_POSTPONED,
        REPLAY_SKIPPED,
        HELD_FOR_FRESHNESS,
        STATE_FACTS_READ,
        STATE_MALFORMED,
        FACTS_REMOVED,
        OCCURRENCES_FILED,
        OCCURRENCES_SKIPPED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for outcome in ["committed", "aborted", "fenced"] {
        metrics::counter!(TRANSACTIONS, "outcome" => outcome).increment(0);
    }
    for via in ["kafka", "http"] {
        metrics::counter!(CANCELS, "via" => via).increment(0);
    }
    for reason in ["cancelled", "superseded"] {
        metrics::counter!(WITHHELD, "reason" => reason).increment(0);
    }
}

/// Installs the process-wide recorder once and returns its handle; later calls (several schedulers
/// in one test process) share it. Also starts its upkeep (once), which drains histograms into
/// their summaries every few seconds: without it they only drain when `/metrics` is scraped, and
/// grow without bound in a process nobody scrapes.
pub fn install() -> PrometheusHandle {
    static UPKEEP: OnceLock<()> = OnceLock::new();
    let handle = recorder();
    if tokio::runtime::Handle::try_current().is_ok() {
        UPKEEP.get_or_init(|| {
            let h = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    h.run_upkeep();
                }
            });
        });
    }
    handle
}

fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is a non-empty constant")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding program; ours then only
            // renders what it sees, which is better than refusing to start.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
