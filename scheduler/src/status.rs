//! The status snapshot: what `GET /healthz` shows, published by the engine, read without a lock.
//!
//! The engine's committer publishes a fresh [`Status`] on every tick through a
//! `tokio::sync::watch`; the HTTP API only ever borrows the latest value. No request can take or
//! wait for an engine lock, so no request can wedge the engine (nor be wedged by it).

use serde::Serialize;

/// Records with ids the publish gate holds: how many, and since when the oldest. The publisher
/// sends it; the router (ingest stops waiting on the timer's budget while the gate holds) and
/// the monitor read it.
pub(crate) type GateHeld = Option<(usize, std::time::Instant)>;

/// How the process is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Starting or running normally.
    #[default]
    Ok,
    /// Running, but a sweep is failing and being retried: records may be late.
    Degraded,
    /// Stopped taking work after an error it cannot fix (see `reason`); the process exits.
    Failed,
    /// A clean stop is under way.
    Stopping,
}

/// The snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub status: Health,
    /// Why the status is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// 0 until the group has assigned partitions: the process is up but does no work yet.
    pub assigned_partitions: usize,
    /// The ingest partitions this process reads (and writes the watermarks of).
    pub ingest_partitions: Vec<i32>,
    /// Ingest partitions whose watermark lags by more than the cancel lead, whoever owns them:
    /// records with ids wait for them (late, never wrong).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_ingest_partitions: Vec<i32>,
    /// Records read and not yet acknowledged in their next place.
    pub in_flight: usize,
    pub timer_pending: usize,
    /// The earliest due time in the timer (RFC 3339).
    pub next_due: Option<String>,
    /// Bytes of the memory budget in use.
    pub memory_used: u64,
    pub memory_budget: u64,
    /// Sweeps failing and being retried now.
    pub sweeps_behind: usize,
    /// Target topics that refuse deliveries or leave them unacknowledged, longest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing_targets: Vec<FailingTarget>,
    /// The exactly-once mode: when this process's last transaction abort or fence was, and why
    /// (the engine started again from the last committed transaction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transaction_abort: Option<String>,
}

/// A target topic in trouble (see `targets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailingTarget {
    pub topic: String,
    pub for_secs: u64,
    pub error: String,
}

impl Status {
    /// The health that these facts add up to: failed wins, then stopping, then degraded.
    pub fn health(
        fatal: Option<&str>,
        stopping: bool,
        sweeps_behind: usize,
        failing: &[FailingTarget],
        commits_failing: Option<(u64, &str)>,
        gate_held: Option<&str>,
    ) -> (Health, Option<String>) {
        if let Some(reason) = fatal {
            return (Health::Failed, Some(reason.to_string()));
        }
        if stopping {
            return (Health::Stopping, None);
        }
        let mut why = Vec::new();
        if let Some((secs, error)) = commits_failing {
            why.push(format!("offset commits failing for {secs} s: {error}"));
        }
        why.extend(gate_held.map(str::to_string));
        if sweeps_behind > 0 {
            why.push(format!(
                "{sweeps_behind} sweep(s) failing and being retried"
            ));
        }
        why.extend(failing.iter().map(|t| {
            format!(
                "target {} failing for {} s: {}",
                t.topic, t.for_secs, t.error
            )
        }));
        if why.is_empty() {
            (Health::Ok, None)
        } else {
            (Health::Degraded, Some(why.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_outranks_stopping_which_outranks_degraded() {
        let failing = [FailingTarget {
            topic: "orders".into(),
            for_secs: 7,
            error: "Broker: Not enough in-sync replicas".into(),
        }];
        assert_eq!(
            Status::health(None, false, 0, &[], None, None),
            (Health::Ok, None)
        );
        assert_eq!(
            Status::health(None, false, 2, &[], None, None).0,
            Health::Degraded
        );
        let (h, why) = Status::health(None, false, 0, &failing, None, None);
        assert_eq!(h, Health::Degraded);
        assert_eq!(
            why.as_deref(),
            Some("target orders failing for 7 s: Broker: Not enough in-sync replicas")
        );
        assert_eq!(
            Status::health(None, true, 2, &failing, None, None).0,
            Health::Stopping
        );
        let (h, why) = Status::health(
            None,
            false,
            0,
            &[],
            Some((45, "Broker: Coordinator not available")),
            None,
        );
        assert_eq!(h, Health::Degraded);
        assert!(why.unwrap().starts_with("offset commits failing for 45 s"));
        let (h, why) = Status::health(
            None,
            false,
            0,
            &[],
            None,
            Some("3 record(s) with ids held 12 s"),
        );
        assert_eq!(
            (h, why.as_deref()),
            (Health::Degraded, Some("3 record(s) with ids held 12 s"))
        );
        let (h, why) = Status::health(
            Some("the DLQ refused a record"),
            true,
            1,
            &failing,
            None,
            None,
        );
        assert_eq!(h, Health::Failed);
        assert_eq!(why.as_deref(), Some("the DLQ refused a record"));
        let json = serde_json::to_value(Status::default()).unwrap();
        assert_eq!(json["status"], "ok");
        assert!(json.get("reason").is_none());
    }
}
