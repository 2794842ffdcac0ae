//! The report: per path, what was sent, what arrived, what is missing, duplicated or early, and
//! the lateness distribution, computed from the audit rows of one run.

use std::fmt::Write as _;

use scheduler::latency::Latency;
use serde::Serialize;

/// What the audit holds for one message on one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub path: String,
    /// Copies that arrived at a sender (0: missing; 2 or more: duplicated).
    pub deliveries: i64,
    /// Consumer's clock at the first arrival minus the due time.
    pub lateness_ms: Option<i64>,
    /// `pending`, `sent`, `failed` (the last simulated SMS send), or `produce-failed`.
    pub status: String,
    /// Send attempts that succeeded (a message is an SMS failed when it arrived and none did).
    pub sent_ok: i64,
    /// `cancelled` or `rescheduled` when the workload changed the message.
    pub change: Option<String>,
    /// A copy of the first revision arrived (for a rescheduled message: the old version).
    pub old_revision: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PathReport {
    pub path: String,
    pub sent: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub early: u64,
    pub not_produced: u64,
    pub sms_failed: u64,
    /// Messages cancelled after scheduling (not counted in `sent`), and those that arrived
    /// anyway (must be 0).
    pub cancelled: u64,
    pub cancelled_delivered: u64,
    /// Messages rescheduled, and those of which the old version arrived (must be 0).
    pub rescheduled: u64,
    pub rescheduled_old_delivered: u64,
    pub lateness_p50_ms: Option<i64>,
    pub lateness_p99_ms: Option<i64>,
    pub lateness_p999_ms: Option<i64>,
    pub lateness_max_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub run_id: String,
    pub paths: Vec<PathReport>,
}

impl Report {
    pub fn from_rows(run_id: &str, rows: &[AuditRow]) -> Report {
        let mut names: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let paths = names
            .into_iter()
            .map(|path| {
                let mut p = PathReport {
                    path: path.to_string(),
                    ..Default::default()
                };
                let mut late = Latency::default();
                for r in rows.iter().filter(|r| r.path == path) {
                    if r.status == "produce-failed" {
                        p.not_produced += 1;
                        continue;
                    }
                    match r.change.as_deref() {
                        Some("cancelled") => {
                            p.cancelled += 1;
                            p.cancelled_delivered += u64::from(r.deliveries > 0);
                            continue;
                        }
                        Some("rescheduled") => {
                            p.rescheduled += 1;
                            p.rescheduled_old_delivered += u64::from(r.old_revision);
                        }
                        _ => {}
                    }
                    p.sent += 1;
                    if r.deliveries > 0 {
                        p.received += 1;
                        p.duplicates += (r.deliveries - 1) as u64;
                        if let Some(l) = r.lateness_ms {
                            late.record(l);
                        }
                    } else {
                        p.missing += 1;
                    }
                    p.sms_failed += u64::from(r.deliveries > 0 && r.sent_ok == 0);
                }
                let sum = late.summary();
                p.early = sum.early;
                p.lateness_p50_ms = sum.p50_ms;
                p.lateness_p99_ms = sum.p99_ms;
                p.lateness_p999_ms = sum.p999_ms;
                p.lateness_max_ms = sum.max_ms;
                p
            })
            .collect();
        Report {
            run_id: run_id.to_string(),
            paths,
        }
    }

    /// True when nothing was lost, nothing arrived early, and no cancelled message or old
    /// version of a rescheduled one arrived.
    pub fn ok(&self) -> bool {
        self.paths.iter().all(|p| {
            p.missing == 0
                && p.early == 0
                && p.cancelled_delivered == 0
                && p.rescheduled_old_delivered == 0
        })
    }

    /// A table for the terminal.
    pub fn table(&self) -> String {
        let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        let mut out = format!("run {}\n", self.run_id);
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10}",
            "path",
            "sent",
            "received",
            "missing",
            "dup",
            "early",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "cancelled",
            "moved"
        );
        for p in &self.paths {
            let _ = writeln!(
                out,
                "{:<6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10}",
                p.path,
                p.sent,
                p.received,
                p.missing,
                p.duplicates,
                p.early,
                ms(p.lateness_p50_ms),
                ms(p.lateness_p99_ms),
                ms(p.lateness_p999_ms),
                ms(p.lateness_max_ms),
                format!("{} ({} arr.)", p.cancelled, p.cancelled_delivered),
                format!("{} ({} old)", p.rescheduled, p.rescheduled_old_delivered)
            );
        }
        out.push_str(if self.ok() {
            "OK: nothing lost, nothing early, no cancelled message or old version arrived\n"
        } else {
            "FAILED: messages lost or early, or a cancelled message or an old version arrived\n"
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, deliveries: i64, lateness: Option<i64>, status: &str) -> AuditRow {
        AuditRow {
            path: path.into(),
            deliveries,
            lateness_ms: lateness,
            status: status.into(),
            // One successful attempt per copy, unless the last attempt failed.
            sent_ok: if status == "failed" { 0 } else { deliveries },
            change: None,
            old_revision: false,
        }
    }

    #[test]
    fn counts_missing_duplicates_early_and_percentiles_per_path() {
        let mut rows: Vec<AuditRow> = (1..=100)
            .map(|l| row("kafka", 1, Some(l), "sent"))
            .collect();
        rows.push(row("kafka", 0, None, "pending"));
        rows.push(row("kafka", 3, Some(5), "sent"));
        rows.push(row("mysql", 1, Some(-2), "failed"));
        rows.push(row("mysql", 0, None, "produce-failed"));
        let r = Report::from_rows("run-1", &rows);
        let k = &r.paths[0];
        assert_eq!(
            (
                k.path.as_str(),
                k.sent,
                k.received,
                k.missing,
                k.duplicates,
                k.early
            ),
            ("kafka", 102, 101, 1, 2, 0)
        );
        assert_eq!(
            (k.lateness_p50_ms, k.lateness_p99_ms, k.lateness_max_ms),
            (Some(50), Some(99), Some(100))
        );
        let m = &r.paths[1];
        assert_eq!(
            (m.sent, m.received, m.early, m.not_produced, m.sms_failed),
            (1, 1, 1, 1, 1)
        );
        // A message handled twice, the last attempt failed but an earlier one succeeded: sent.
        let twice = AuditRow {
            sent_ok: 1,
            ..row("kafka", 2, Some(3), "failed")
        };
        assert_eq!(Report::from_rows("r", &[twice]).paths[0].sms_failed, 0);
        assert!(!r.ok());
        assert!(r.table().contains("FAILED"));
    }

    #[test]
    fn cancelled_messages_are_not_expected_and_must_not_arrive_nor_old_versions() {
        let changed = |deliveries, change: &str, old_revision| AuditRow {
            change: Some(change.into()),
            old_revision,
            ..row("kafka", deliveries, Some(1), "sent")
        };
        let good = [
            changed(0, "cancelled", false),
            changed(1, "rescheduled", false),
            row("kafka", 1, Some(2), "sent"),
        ];
        let r = Report::from_rows("r", &good);
        let k = &r.paths[0];
        assert_eq!(
            (k.sent, k.missing, k.cancelled, k.rescheduled),
            (2, 0, 1, 1),
            "a cancelled message is neither sent nor missing"
        );
        assert!(r.ok(), "{}", r.table());
        for bad in [
            changed(1, "cancelled", false),
            changed(1, "rescheduled", true),
        ] {
            let r = Report::from_rows("r", &[bad]);
            assert!(!r.ok(), "{}", r.table());
            let k = &r.paths[0];
            assert_eq!(k.cancelled_delivered + k.rescheduled_old_delivered, 1);
        }
    }
}
