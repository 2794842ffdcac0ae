//! Live figures for `/monitor`, the live page and the progress view: what each run sent and
//! received per path, lateness as it arrives, and the senders' reported totals. In memory only;
//! the audit store is the record.
//!
//! The counts, defined once (the report computes the same from the audit):
//! - *received*: distinct messages that arrived at a sender; *duplicates*: copies beyond the first.
//! - *SMS failed*: received messages of which no send attempt succeeded (a message is an SMS; a
//!   retry after a failed attempt that succeeds makes it sent).
//! - *attempts*: simulated sends in this run (every copy handled), and *re-processed*: attempts
//!   beyond one per message (a message handled twice).
//! - the senders' own totals (the status topic) are attempts since each sender started, over all
//!   runs: they are shown per sender, never as the run's figure.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Path;
use scheduler::latency::Latency;

/// A sender's totals as published on the status topic (the original's shape).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SenderStatus {
    pub sender_id: String,
    pub success_count: u64,
    pub failed_count: u64,
    pub total_processing_time: f64,
}

#[derive(Debug, Default)]
struct PathStats {
    sent: u64,
    arrivals: u64,
    seen: HashSet<String>,
    lateness: Latency,
    /// Per message handled by a sender: whether any attempt succeeded.
    outcome: HashMap<String, bool>,
    attempts: u64,
    /// Messages the workload cancelled: not expected; any arrival of one is counted apart.
    cancelled: HashSet<String>,
    cancelled_arrived: u64,
    rescheduled: u64,
}

impl PathStats {
    fn sms_failed(&self) -> u64 {
        self.outcome.values().filter(|ok| !**ok).count() as u64
    }
}

#[derive(Debug, Default)]
struct RunStats {
    expected: u64,
    paths: BTreeMap<&'static str, PathStats>,
    /// The run has reported: what has not arrived is missing, not pending.
    finished: bool,
}

/// One second of arrivals on one path, for the chart.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Bucket {
    count: u64,
    sum_ms: i64,
    max_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    runs: HashMap<String, RunStats>,
    latest: Option<String>,
    senders: BTreeMap<String, SenderStatus>,
    series: VecDeque<(i64, BTreeMap<&'static str, Bucket>)>,
}

/// A count of things begun and not yet finished.
#[derive(Debug, Default)]
pub struct InProgress(AtomicU64);

impl InProgress {
    pub fn begin(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn end(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
pub struct Live {
    inner: Mutex<Inner>,
    /// Simulated sends begun and not yet handed to the audit writer.
    pub sends: InProgress,
    /// Runs started and not yet reported.
    pub runs: InProgress,
}

const SERIES_SECONDS: usize = 600;

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run starts; `expected` messages per path.
    pub fn start_run(&self, run_id: &str, expected: u64) {
        let mut inner = self.lock();
        inner.runs.insert(
            run_id.to_string(),
            RunStats {
                expected,
                ..Default::default()
            },
        );
        inner.latest = Some(run_id.to_string());
    }

    pub fn sent(&self, run_id: &str, path: Path) {
        if let Some(run) = self.lock().runs.get_mut(run_id) {
            run.paths.entry(path.as_str()).or_default().sent += 1;
        }
    }

    /// A copy arrived at a sender.
    pub fn arrived(&self, run_id: &str, id: &str, path: Path, received_ms: i64, lateness_ms: i64) {
        let mut inner = self.lock();
        if let Some(run) = inner.runs.get_mut(run_id) {
            let p = run.paths.entry(path.as_str()).or_default();
            if p.cancelled.contains(id) {
                p.cancelled_arrived += 1;
                return;
            }
            p.arrivals += 1;
            if p.seen.insert(id.to_string()) {
                p.lateness.record(lateness_ms);
            }
        }
        let second = received_ms.div_euclid(1000);
        if inner.series.back().is_none_or(|(s, _)| *s < second) {
            inner.series.push_back((second, BTreeMap::new()));
            if inner.series.len() > SERIES_SECONDS {
                inner.series.pop_front();
            }
        }
        if let Some((_, buckets)) = inner.series.iter_mut().rev().find(|(s, _)| *s == second) {
            let b = buckets.entry(path.as_str()).or_default();
            b.count += 1;
            b.sum_ms += lateness_ms;
            b.max_ms = b.max_ms.max(lateness_ms);
        }
    }

    /// The workload cancelled or rescheduled `id` after scheduling it.
    pub fn changed(&self, run_id: &str, id: &str, path: Path, change: crate::producer::Change) {
        if let Some(run) = self.lock().runs.get_mut(run_id) {
            let p = run.paths.entry(path.as_str()).or_default();
            match change {
                crate::producer::Change::Cancel => {
                    p.cancelled.insert(id.to_string());
                }
                crate::producer::Change::Reschedule => p.rescheduled += 1,
            }
        }
    }

    /// A sender finished a simulated send of a copy of `id`.
    pub fn handled(&self, run_id: &str, id: &str, path: Path, ok: bool) {
        if let Some(run) = self.lock().runs.get_mut(run_id) {
            let p = run.paths.entry(path.as_str()).or_default();
            p.attempts += 1;
            *p.outcome.entry(id.to_string()).or_default() |= ok;
        }
    }

    /// The run has reported.
    pub fn finish_run(&self, run_id: &str) {
        if let Some(run) = self.lock().runs.get_mut(run_id) {
            run.finished = true;
        }
    }

    pub fn sender_status(&self, status: SenderStatus) {
        let mut inner = self.lock();
        let entry = inner.senders.entry(status.sender_id.clone()).or_default();
        // Status updates are cumulative; keep the newest (largest) totals.
        if status.success_count + status.failed_count >= entry.success_count + entry.failed_count {
            *entry = status;
        }
    }

    /// Distinct messages of the run that arrived, per path, and whether every one has.
    pub fn complete(&self, run_id: &str, paths: &[Path]) -> bool {
        let inner = self.lock();
        inner.runs.get(run_id).is_some_and(|run| {
            paths.iter().all(|p| {
                run.paths
                    .get(p.as_str())
                    .is_some_and(|s| (s.seen.len() + s.cancelled.len()) as u64 >= run.expected)
            })
        })
    }

    /// Arrivals of a run (all copies), over all paths.
    pub fn arrivals(&self, run_id: &str) -> u64 {
        self.lock()
            .runs
            .get(run_id)
            .map_or(0, |r| r.paths.values().map(|p| p.arrivals).sum())
    }

    /// Totals reported by the senders.
    pub fn senders(&self) -> BTreeMap<String, SenderStatus> {
        self.lock().senders.clone()
    }

    /// What `GET /monitor` and the live page show, for the latest run.
    pub fn monitor(&self) -> serde_json::Value {
        let inner = self.lock();
        let mut paths = serde_json::Map::new();
        let (mut sent, mut delivered, mut failed, mut attempts, mut handled) = (0, 0, 0, 0, 0);
        let mut cancelled = 0;
        let mut finished = false;
        if let Some(run) = inner.latest.as_ref().and_then(|id| inner.runs.get(id)) {
            finished = run.finished;
            for (name, p) in &run.paths {
                let late = p.lateness.summary();
                let received = p.seen.len() as u64;
                // As in the report: a cancelled message is not expected, so it is not "sent".
                let expected = p.sent.saturating_sub(p.cancelled.len() as u64);
                sent += expected;
                delivered += received;
                cancelled += p.cancelled.len() as u64;
                failed += p.sms_failed();
                attempts += p.attempts;
                handled += p.outcome.len() as u64;
                let left = expected.saturating_sub(received);
                paths.insert(
                    name.to_string(),
                    serde_json::json!({
                        "sent": expected, "received": received, "duplicates": p.arrivals - received,
                        "pending": if run.finished { 0 } else { left },
                        "missing": run.finished.then_some(left),
                        "early": late.early,
                        "p50_ms": late.p50_ms, "p99_ms": late.p99_ms, "p999_ms": late.p999_ms,
                        "max_ms": late.max_ms,
                        "sms_failed": p.sms_failed(),
                        "cancelled": p.cancelled.len(), "cancelled_arrived": p.cancelled_arrived,
                        "rescheduled": p.rescheduled,
                        "distribution": run.finished.then(|| p.lateness.decades()),
                    }),
                );
            }
        }
        let series: Vec<serde_json::Value> = inner
            .series
            .iter()
            .map(|(t, buckets)| {
                let mut point = serde_json::json!({ "t": t });
                for (path, b) in buckets {
                    point[format!("{path}_avg_ms")] =
                        serde_json::json!(b.sum_ms / b.count.max(1) as i64);
                    point[format!("{path}_max_ms")] = serde_json::json!(b.max_ms);
                }
                point
            })
            .collect();
        serde_json::json!({
            "run_id": inner.latest,
            "finished": finished,
            "senders": inner.senders,
            "total": {
                "sent": sent, "delivered": delivered, "failed": failed,
                "pending": if finished { 0 } else { sent.saturating_sub(delivered) },
                "cancelled": cancelled,
                "attempts": attempts, "reprocessed": attempts.saturating_sub(handled),
            },
            "paths": paths,
            "series": series,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_arrivals_duplicates_and_completion() {
        let live = Live::default();
        live.start_run("r", 2);
        for _ in 0..2 {
            live.sent("r", Path::Kafka);
        }
        live.arrived("r", "r-0", Path::Kafka, 5_000, 3);
        assert!(!live.complete("r", &[Path::Kafka]));
        live.arrived("r", "r-0", Path::Kafka, 5_100, 9);
        live.arrived("r", "r-1", Path::Kafka, 6_000, 7);
        assert!(live.complete("r", &[Path::Kafka]));
        assert!(!live.complete("r", &[Path::Kafka, Path::Mysql]));
        let m = live.monitor();
        assert_eq!(m["paths"]["kafka"]["received"], 2);
        assert_eq!(m["paths"]["kafka"]["duplicates"], 1);
        assert_eq!(m["paths"]["kafka"]["max_ms"], 7);
        assert_eq!(m["series"].as_array().unwrap().len(), 2);
        live.sender_status(SenderStatus {
            sender_id: "s1".into(),
            success_count: 2,
            failed_count: 1,
            total_processing_time: 0.3,
        });
        live.sender_status(SenderStatus {
            sender_id: "s1".into(),
            success_count: 1,
            failed_count: 0,
            total_processing_time: 0.1,
        });
        assert_eq!(
            live.senders()["s1"].success_count,
            2,
            "an older, smaller total does not win"
        );
    }

    #[test]
    fn a_message_fails_only_when_no_attempt_sent_it_and_missing_shows_once_finished() {
        let live = Live::default();
        live.start_run("r", 3);
        for _ in 0..3 {
            live.sent("r", Path::Kafka);
        }
        for (id, ok) in [("a", false), ("a", true), ("b", false), ("b", false)] {
            live.arrived("r", id, Path::Kafka, 1_000, 5);
            live.handled("r", id, Path::Kafka, ok);
        }
        let m = live.monitor();
        assert_eq!(m["total"]["failed"], 1, "a was sent on its second attempt");
        assert_eq!(m["total"]["attempts"], 4);
        assert_eq!(m["total"]["reprocessed"], 2);
        assert_eq!(m["paths"]["kafka"]["pending"], 1);
        assert!(m["paths"]["kafka"]["missing"].is_null());
        live.finish_run("r");
        let m = live.monitor();
        assert_eq!(m["paths"]["kafka"]["missing"], 1);
        assert_eq!(m["paths"]["kafka"]["pending"], 0);
        assert_eq!(m["paths"]["kafka"]["distribution"][1]["count"], 2);
    }
}
