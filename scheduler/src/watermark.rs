//! Ingest watermarks (issue #30): what lets the publish gate cover a cancel or reschedule produced
//! to the ingest topic, whichever process owns its partition and however far behind it is.
//!
//! The owner of an ingest partition writes, about every [`EVERY`], a watermark into the state
//! topic (one compacted key per ingest partition, [`crate::facts::watermark_key`]): "every record
//! of partition p that Kafka acknowledged before T is read, and its fact is acknowledged". T is
//! the owner's clock when it asked the partition's end offset E (the high watermark): a record
//! Kafka acknowledged to its producer before T (`acks=all`) lies below E. Once the owner's
//! consumer has read past E and the fact of every record below E is acknowledged
//! ([`crate::offsets::ReadMarks::handled_to`]), it writes (p, T). An owner with nothing to read writes too, so an
//! empty partition never holds anything.
//!
//! Record timestamps play no part: they are the producers' clocks, which may be anywhere (and
//! a record stamped early could be written late). T is a scheduler's clock, compared by the gate
//! with due times on scheduler clocks: skew between scheduler processes (not producers) comes off
//! the cancel lead.
//!
//! Every process's state reader keeps the newest watermark of each ingest partition
//! ([`IngestGate`]). The gate's freshness is the least of the state topic's own ("every fact
//! acknowledged before T_r is in the index", proved by a round noted at T_r) and the lowest
//! watermark read *before* that round was noted ([`gate_ms`]): a watermark is written after the
//! facts it covers were acknowledged, so one read before T_r covers facts acknowledged before
//! T_r, which that round put in the index. A partition nobody writes for (unowned, its owner
//! stopped, slow or of an older release) holds the gate: records with ids wait, late but never
//! wrong, and it shows on `/healthz` (`stale_ingest_partitions`) and in
//! `sm_ingest_watermark_lag_seconds`.
//!
//! Records waiting at the gate hold their shares of the memory budget, and a watermark moves only
//! as ingest reads on: ingest must never wait for what only the gate gives back. So while the gate
//! holds records, an ingest record only the timer could take goes to a slice instead of waiting
//! for room among the timer's holds ([`crate::router::Router::place`]); its fact and slice write
//! take the part of the budget that sends free as the broker acknowledges them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Settings;
use crate::facts::{watermark_key, Watermark};
use crate::kafka::{self, Lookup, BROKER_TIMEOUT};
use crate::lifecycle::Lifecycle;
use crate::offsets::Offsets;
use crate::time::Clock;

/// How often an owner asks its ingest partitions' end offsets and writes their watermarks. The
/// gate's freshness then lags the clock by about this plus the state reader's round (100 ms
/// while a record with an id is due soon) and a few round trips: well inside the default cancel
/// lead (1 s). Each owned ingest partition costs one small record per round on the state topic
/// (compacted: one key per partition).
pub(crate) const EVERY: Duration = Duration::from_millis(100);

/// On every process: the newest watermark of each ingest partition, as the state reader read
/// them.
#[derive(Debug, Clone)]
pub(crate) struct IngestGate {
    /// The ingest topic's partition count; 0 until the reader has asked it.
    partitions: i32,
    latest: HashMap<i32, i64>,
    /// When the reader started: a partition with no watermark yet lags from then.
    since_ms: i64,
}

impl IngestGate {
    pub(crate) fn new(partitions: i32, since_ms: i64) -> IngestGate {
        IngestGate {
            partitions,
            latest: HashMap::new(),
            since_ms,
        }
    }

    /// A watermark read: the newest of a partition counts (any one is true for ever, so a late
    /// one from a previous owner lowers nothing).
    pub(crate) fn learn(&mut self, partition: i32, before_ms: i64) {
        let w = self.latest.entry(partition).or_insert(before_ms);
        *w = (*w).max(before_ms);
    }

    /// The lowest watermark over every ingest partition: every record any of them holds that
    /// Kafka acknowledged before it has its fact acknowledged. `i64::MIN` while a partition has
    /// none.
    pub(crate) fn low(&self) -> i64 {
        (0..self.partitions)
            .map(|p| self.latest.get(&p).copied().unwrap_or(i64::MIN))
            .min()
            .unwrap_or(i64::MAX)
    }

    /// How far each partition's watermark lags `now_ms` (from the reader's start if it has
    /// none), by partition.
    pub(crate) fn lags(&self, now_ms: i64) -> Vec<(i32, i64)> {
        (0..self.partitions)
            .map(|p| {
                let w = self.latest.get(&p).copied().unwrap_or(self.since_ms);
                (p, now_ms.saturating_sub(w).max(0))
            })
            .collect()
    }

    /// The partitions whose watermark lags `now_ms` by more than `lag_ms`: they hold the gate
    /// for records due within `lag_ms` minus the cancel lead.
    pub(crate) fn stale(&self, now_ms: i64, lag_ms: i64) -> Vec<(i32, i64)> {
        self.lags(now_ms)
            .into_iter()
            .filter(|(_, lag)| *lag > lag_ms)
            .collect()
    }
}

/// The publish gate's freshness: a state round noted at `state_ms` proved every fact
/// acknowledged before then is in the index; `ingest_low` is the lowest ingest watermark read
/// before that round was noted ([`IngestGate::low`] then).
pub(crate) fn gate_ms(state_ms: i64, ingest_low: i64) -> i64 {
    state_ms.min(ingest_low)
}

/// A watermark waiting for its partition to be read up to `end`.
#[derive(Debug, Clone, Copy)]
struct Goal {
    generation: u64,
    before_ms: i64,
    end: i64,
}

/// Writes the watermarks of the ingest partitions this process owns.
pub(crate) struct Writer {
    pub offsets: Offsets,
    pub lookup: Arc<Lookup>,
    pub producer: FutureProducer,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub life: Arc<Lifecycle>,
}

impl Writer {
    /// Every [`EVERY`] until the engine stops (through a clean stop's drain): asks the end offsets of the owned ingest
    /// partitions that have no goal, and writes the watermark of each partition read up to its
    /// goal.
    pub(crate) async fn run(self) {
        let ingest = self.settings.internal.ingest.clone();
        let by = self
            .settings
            .config
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("pid-{}", std::process::id()));
        let mut goals: HashMap<i32, Goal> = HashMap::new();
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.life.token().cancelled() => return,
                _ = tick.tick() => {}
            }
            let owned: Vec<(i32, u64)> = self
                .offsets
                .partitions_of(&ingest)
                .into_iter()
                .filter_map(|p| Some((p, self.offsets.generation(&ingest, p)?)))
                .collect();
            goals.retain(|p, g| owned.contains(&(*p, g.generation)));
            self.offsets.read_marks(|m| m.retain(&owned));
            if owned.is_empty() {
                continue;
            }
            let unknown: Vec<(i32, u64)> = owned
                .iter()
                .copied()
                .filter(|(p, g)| self.offsets.read_marks(|m| m.unknown(*p, *g)))
                .collect();
            if !unknown.is_empty() {
                self.learn_bases(&ingest, &unknown).await;
            }
            let ask: Vec<(i32, u64)> = owned
                .iter()
                .copied()
                .filter(|(p, _)| !goals.contains_key(p))
                .collect();
            if !ask.is_empty() {
                // Noted before the request leaves: a record acknowledged before this instant is
                // below the end offset the broker answers.
                let before_ms = self.clock.now_ms();
                let tps: Vec<_> = ask.iter().map(|(p, _)| (ingest.clone(), *p)).collect();
                let asked = kafka::look(&self.lookup, move |l| l.ends(&tps, BROKER_TIMEOUT));
                // A stop does not wait for the broker's answer (up to BROKER_TIMEOUT).
                let answer = tokio::select! {
                    _ = self.life.token().cancelled() => return,
                    a = asked => a,
                };
                match answer {
                    Ok(ends) => {
                        for (p, generation) in ask {
                            if let Some(&end) = ends.get(&(ingest.clone(), p)) {
                                goals.insert(
                                    p,
                                    Goal {
                                        generation,
                                        before_ms,
                                        end,
                                    },
                                );
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "ingest end offsets for the watermarks"),
                }
            }
            let met: Vec<(i32, Goal)> = goals
                .iter()
                .filter(|(p, g)| {
                    self.offsets
                        .read_marks(|m| m.handled_to(**p, g.generation))
                        .is_some_and(|h| h >= g.end)
                })
                .map(|(p, g)| (*p, *g))
                .collect();
            for (p, goal) in met {
                goals.remove(&p);
                self.write(p, goal, &by);
            }
        }
    }

    /// The committed offsets (else the first offsets) of partitions nothing was read from yet.
    async fn learn_bases(&self, ingest: &str, unknown: &[(i32, u64)]) {
        let tps: Vec<_> = unknown
            .iter()
            .map(|(p, _)| (ingest.to_string(), *p))
            .collect();
        let asked = kafka::look(&self.lookup, move |l| {
            let committed = l.committed(&tps, BROKER_TIMEOUT)?;
            let marks = l.watermarks(&tps, BROKER_TIMEOUT)?;
            Ok(tps
                .iter()
                .filter_map(|tp| {
                    let low = marks.get(tp)?.0;
                    Some((tp.1, committed.get(tp).map_or(low, |&c| c.max(low))))
                })
                .collect::<Vec<_>>())
        });
        let found = tokio::select! {
            _ = self.life.token().cancelled() => return,
            f = asked => f,
        };
        match found {
            Ok(bases) => self.offsets.read_marks(|m| {
                for (p, base) in bases {
                    if let Some(&(_, g)) = unknown.iter().find(|(q, _)| *q == p) {
                        m.base(p, g, base);
                    }
                }
            }),
            Err(e) => tracing::debug!(error = %e, "ingest committed offsets for the watermarks"),
        }
    }

    /// Writes partition `p`'s watermark; one lost is replaced by the next.
    fn write(&self, p: i32, goal: Goal, by: &str) {
        let key = watermark_key(p);
        let value = Watermark {
            before_ms: goal.before_ms,
            offset: goal.end,
            by: by.to_string(),
        }
        .encode();
        let record = FutureRecord::to(&self.settings.internal.state)
            .key(key.as_bytes())
            .payload(&value);
        if let Err((e, _)) = self.producer.send_result(record) {
            tracing::debug!(error = %e, partition = p, "ingest watermark not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::{ReadMarks, Ticket};
    use crate::time::ManualClock;

    fn ticket(partition: i32, offset: i64, generation: u64) -> Ticket {
        Ticket {
            topic: "in".into(),
            partition,
            offset,
            generation,
        }
    }

    #[test]
    fn a_partition_is_handled_up_to_its_first_unacknowledged_fact() {
        let mut m = ReadMarks::default();
        assert_eq!(m.handled_to(0, 1), None, "nothing known");
        m.base(0, 1, 10);
        assert_eq!(m.handled_to(0, 1), Some(10), "committed below 10");
        m.read(&ticket(0, 10, 1), false);
        m.read(&ticket(0, 11, 1), true);
        m.read(&ticket(0, 12, 1), true);
        assert_eq!(m.handled_to(0, 1), Some(11), "the fact of 11 is on its way");
        m.acked(&ticket(0, 12, 1));
        assert_eq!(m.handled_to(0, 1), Some(11));
        m.acked(&ticket(0, 11, 1));
        assert_eq!(m.handled_to(0, 1), Some(13));
        m.position(0, 1, 20);
        assert_eq!(
            m.handled_to(0, 1),
            Some(20),
            "past markers the consumer never hands out"
        );
        // A new assignment starts afresh; acknowledgements of the old one change nothing.
        m.read(&ticket(0, 20, 2), true);
        m.acked(&ticket(0, 20, 1));
        assert_eq!(m.handled_to(0, 2), Some(20));
        assert_eq!(m.handled_to(0, 1), None, "the old assignment is gone");
        m.retain(&[(1, 3)]);
        assert_eq!(m.handled_to(0, 2), None, "revoked");
    }

    /// The gate's freshness is the least of the state topic's and every ingest partition's
    /// newest watermark, as read before the state round began; a partition with none, or whose
    /// owner stopped writing, holds it (and is stale once it lags by more than the lead).
    #[test]
    fn the_gate_waits_for_the_lowest_ingest_watermark() {
        let clock = ManualClock::new(1_000_000);
        let lead = 1_000;
        let mut gate = IngestGate::new(3, clock.now_ms());
        assert_eq!(gate.low(), i64::MIN, "no watermark yet: nothing is proven");
        let t = clock.now_ms();
        for p in 0..3 {
            gate.learn(p, t - 50);
        }
        assert_eq!(gate_ms(t, gate.low()), t - 50);
        assert_eq!(
            gate_ms(t - 100, gate.low()),
            t - 100,
            "the state topic lags more"
        );

        // Partition 1's owner stops; the others go on.
        for _ in 0..20 {
            clock.advance(100);
            let now = clock.now_ms();
            gate.learn(0, now - 50);
            gate.learn(2, now - 50);
        }
        let now = clock.now_ms();
        assert_eq!(gate.low(), t - 50, "held by partition 1");
        let due = now;
        assert!(
            gate_ms(now, gate.low()) < due - lead,
            "a record due now waits"
        );
        assert_eq!(gate.stale(now, lead), vec![(1, 2_050)]);
        // An older watermark (a previous owner's, read late) lowers nothing.
        gate.learn(0, t - 500);
        assert_eq!(gate.low(), t - 50);
        // Its partition is taken over: the new owner's watermark opens the gate.
        gate.learn(1, now - 50);
        assert_eq!(gate_ms(now, gate.low()), now - 50);
        assert!(gate_ms(now, gate.low()) >= due - lead);
        assert!(gate.stale(now, lead).is_empty());

        // A partition that never had a watermark lags from the reader's start.
        let fresh = IngestGate::new(2, clock.now_ms());
        clock.advance(1_500);
        assert_eq!(
            fresh.stale(clock.now_ms(), lead),
            vec![(0, 1_500), (1, 1_500)]
        );
        assert_eq!(IngestGate::new(0, 0).low(), i64::MAX, "no partitions");
    }
}
