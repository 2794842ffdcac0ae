//! The goals of the performance issue (#12), each beside the broker's own figure from the same
//! run: what every section contributes, and the table that opens BENCHMARKS.md.

use std::fmt::Write as _;

use crate::harness::Percentiles;

/// A figure and its goal, as one row of the table.
struct Row {
    figure: String,
    measured: String,
    goal: &'static str,
    met: Option<bool>,
}

/// What the sections measured that a goal is about; a section that did not run leaves `None`.
#[derive(Default)]
pub struct Goals {
    /// The ordinary client at its highest rate: (rate, achieved ÷ offered, scheduler p99 ms,
    /// broker-alone p99 ms).
    pub client: Option<(usize, f64, f64, f64)>,
    /// Already-due records/s: (scheduler, relay, ratio), medians over the section's rounds.
    pub throughput: Option<(f64, f64, f64)>,
    /// Each step's on-arrival p99s, in rising rate.
    pub steps: Vec<StepP99s>,
    /// Filing records/s, broker-alone produce records/s, and a one-hop relay's records/s beside
    /// the same kind of producer (the control for filing).
    pub filing: Option<(f64, f64, f64)>,
    /// The burst: (last delivered after the instant, ms the broker took to accept it).
    pub burst: Option<(usize, i64, i64)>,
    /// The scheduler's own lateness at publish at 1,000/s.
    pub publish_1000: Option<Percentiles>,
    /// Resident MiB with the pending records settled, and how many.
    pub pending_mib: Option<(usize, f64)>,
    /// First on-time delivery after a restart with everything pending, seconds.
    pub restart_s: Option<f64>,
    /// Early and missing records over every section.
    pub early: usize,
    pub missing: usize,
}

/// One step: (rate, broker-alone p99 ms, scheduler p99 ms, relay p99 ms).
pub type StepP99s = (usize, i64, i64, i64);

/// Within 1.5× the broker alone's p99, plus 50 ms (the issue's own allowance for small figures).
pub fn within(sched_p99: f64, alone_p99: f64) -> bool {
    sched_p99 <= 1.5 * alone_p99 + 50.0
}

impl Goals {
    /// The highest step rate at which the scheduler's p99 stays within [`within`] the broker
    /// alone's (every lower step too), the same for a one-hop relay, and the highest at which
    /// the broker alone keeps its p99 at or under 1 s.
    pub fn step_limits(&self) -> (usize, usize, usize) {
        let highest = |ok: &dyn Fn(&StepP99s) -> bool| {
            self.steps
                .iter()
                .take_while(|s| ok(s))
                .last()
                .map_or(0, |s| s.0)
        };
        let ours = highest(&|s| within(s.2 as f64, s.1 as f64));
        let relay = highest(&|s| within(s.3 as f64, s.1 as f64));
        let broker = highest(&|s| s.1 <= 1_000);
        (ours, relay, broker)
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some((rate, achieved, sched, alone)) = self.client {
            rows.push(Row {
                figure: format!("ordinary client at {rate}/s: achieved ÷ offered; on-arrival p99 ÷ broker-alone p99"),
                measured: format!("{achieved:.2}; {sched:.0} ÷ {alone:.0} ms = {:.2}", sched / alone),
                goal: "at 2,000/s: ≥ 0.95 and ≤ 1.5 (+50 ms)",
                met: Some(rate >= 2_000 && achieved >= 0.95 && within(sched, alone)),
            });
        }
        if let Some((ours, relay, ratio)) = self.throughput {
            rows.push(Row {
                figure: "already-due throughput ÷ one-hop relay (medians of alternating rounds)"
                    .into(),
                measured: format!("{ours:.0} ÷ {relay:.0}/s; ratio {ratio:.2}"),
                goal: "≥ 1.0",
                met: Some(ratio >= 1.0),
            });
        }
        if !self.steps.is_empty() {
            let (ours, relay, broker) = self.step_limits();
            let ratio = ours as f64 / broker.max(1) as f64;
            let tried = self.steps.last().map_or(0, |s| s.0);
            rows.push(Row {
                figure: "due 5 s ahead: highest rate with p99 ≤ 1.5× broker alone ÷ highest rate with broker-alone p99 ≤ 1 s".into(),
                measured: format!("{ours} ÷ {broker}/s = {ratio:.2} (steps up to {tried}/s; a one-hop relay: {relay} ÷ {broker}/s)"),
                goal: "≥ 0.8",
                met: Some(broker > 0 && ratio >= 0.8),
            });
        }
        if let Some((filing, broker, relay)) = self.filing {
            rows.push(Row {
                figure: "filing rate (due an hour ahead) ÷ broker produce rate".into(),
                // A relay beside the same producer does what filing does per record (the user's
                // write, a read of it, a write elsewhere): what one hop reaches on this broker.
                measured: format!(
                    "{filing:.0} ÷ {broker:.0}/s = {:.2} (a one-hop relay beside the producer: {relay:.0}/s = {:.2}; filing ÷ relay {:.2})",
                    filing / broker,
                    relay / broker,
                    filing / relay
                ),
                goal: "≥ 0.5",
                met: Some(filing >= 0.5 * broker),
            });
        }
        if let Some((n, last, accept)) = self.burst {
            rows.push(Row {
                figure: format!("{n} due in one instant: last delivered after the instant, against the broker's time to accept them from one producer"),
                measured: format!("{:.1} s against {:.1} s", last as f64 / 1000.0, accept as f64 / 1000.0),
                goal: "≤ accept + 2 s",
                met: Some(last <= accept + 2_000),
            });
        }
        if let Some(p) = self.publish_1000 {
            rows.push(Row {
                figure: "publish lateness at 1,000/s, p99 / p99.9".into(),
                measured: format!("{} / {} ms", p.p99, p.p999),
                goal: "≤ 5 / ≤ 10 ms",
                met: Some(p.p99 <= 5 && p.p999 <= 10),
            });
        }
        if let Some((n, mib)) = self.pending_mib {
            rows.push(Row {
                figure: format!("resident memory, {n} pending, settled"),
                measured: format!("{mib:.0} MiB"),
                goal: "≤ 60 MiB",
                met: Some(mib <= 60.0),
            });
        }
        if let Some(s) = self.restart_s {
            rows.push(Row {
                figure: "restart with them pending: first on-time delivery after the start".into(),
                measured: format!("{s:.1} s"),
                goal: "≤ 2 s",
                met: Some(s <= 2.0),
            });
        }
        rows.push(Row {
            figure: "early deliveries, lost records (every section)".into(),
            measured: format!("{}, {}", self.early, self.missing),
            goal: "0, 0",
            met: Some(self.early == 0 && self.missing == 0),
        });
        rows
    }

    /// The table, in Markdown.
    pub fn table(&self) -> String {
        let mut t = String::from("## Goals (issue #12), this run\n\nEach figure beside the broker's own from the same run.\n\n| figure | measured | goal | met |\n| --- | --- | --- | --- |");
        for r in self.rows() {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            let _ = write!(
                t,
                "\n| {} | {} | {} | {met} |",
                r.figure, r.measured, r.goal
            );
        }
        t.push('\n');
        t
    }
}
