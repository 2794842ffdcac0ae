//! Target health: which target topics are failing, so that one failing target cannot hold the
//! deliveries to every other.
//!
//! Owned by the outbox, which tells it of every delivery handed to the producer and of how each
//! ended. A target is *in trouble* when a delivery to it failed, or when it has had sends in
//! flight and none acknowledged for [`TargetHealth::STALL_AFTER`] (librdkafka retries a refused
//! record inside the client until `message.timeout.ms`, 30 s, without telling anyone; a stall
//! is seen long before that). A target the broker says does not exist is named too, for a minute
//! after the last record that found it missing, but holds nothing: its records go to the DLQ as
//! `unknown-topic` at once. While a target is in trouble its new records wait in its retry
//! lane instead of joining the producer's queue, and the lane asks [`TargetHealth::mode`] what
//! to do each round. A record that has waited `--target-give-up` for a target in trouble (all of
//! them, once the lane holds a quarter of the memory budget) goes to the DLQ as
//! `target-unavailable`, but only while the broker itself answers: when the broker is away, every target fails alike and the
//! records wait for it instead. Pure bookkeeping over the instants it is given.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a target topic's retry lane does this round, besides dead-lettering the records that
/// waited `--target-give-up` (see [`TargetHealth::expired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The target is healthy: send everything the lane holds again, in order.
    Resend,
    /// In trouble, nothing in flight: send the lane's first record alone, to learn whether the
    /// target takes records again.
    Probe,
    /// In trouble with records still in flight: hold, and look again after a backoff.
    Wait,
}

/// A target in trouble, as `/healthz` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub topic: String,
    /// How long it has been in trouble.
    pub for_: Duration,
    /// The last error, or that nothing was acknowledged.
    pub error: String,
}

#[derive(Debug)]
struct Target {
    in_flight: u32,
    /// The last acknowledgement, or when a send went out with nothing else in flight.
    progress: Instant,
    /// The first failure since the last acknowledgement, and the last error.
    failing: Option<(Instant, String)>,
    /// The topic does not exist (the broker will not create it): since when, the last time a
    /// record found it missing, and the error. Its records go to the DLQ at once, so nothing is
    /// held for it; `/healthz` names it while records keep finding it missing.
    gone: Option<(Instant, Instant, String)>,
}

/// The health of every target topic that had a delivery.
#[derive(Debug)]
pub struct TargetHealth {
    targets: HashMap<String, Target>,
    give_up: Duration,
}

impl TargetHealth {
    /// Sends in flight and nothing acknowledged for this long: the target is stalled. Far above
    /// a healthy broker's acknowledgement time (milliseconds) and a leader election's (a few
    /// hundred), far below librdkafka's own retry limit.
    pub const STALL_AFTER: Duration = Duration::from_secs(5);

    /// How long a missing target stays named after the last record that found it missing.
    pub const GONE_SHOWN: Duration = Duration::from_secs(60);

    pub fn new(give_up: Duration) -> TargetHealth {
        TargetHealth {
            targets: HashMap::new(),
            give_up,
        }
    }

    /// A delivery to `topic` was handed to the producer.
    pub fn sent(&mut self, topic: &str, now: Instant) {
        match self.targets.get_mut(topic) {
            Some(t) => {
                if t.in_flight == 0 {
                    t.progress = now;
                }
                t.in_flight += 1;
            }
            None => {
                self.targets.insert(
                    topic.to_string(),
                    Target {
                        in_flight: 1,
                        progress: now,
                        failing: None,
                        gone: None,
                    },
                );
            }
        }
    }

    /// A delivery to `topic` was acknowledged: the target takes records; true when it was in
    /// trouble until now.
    pub fn acknowledged(&mut self, topic: &str, now: Instant) -> bool {
        let Some(t) = self.targets.get_mut(topic) else {
            return false;
        };
        let was = t.failing.is_some() || t.stalled(now);
        t.in_flight = t.in_flight.saturating_sub(1);
        t.progress = now;
        t.failing = None;
        t.gone = None;
        if t.in_flight == 0 {
            self.targets.remove(topic);
        }
        was
    }

    /// A delivery to `topic` failed with `error`; true when this put the target in trouble.
    pub fn failed(&mut self, topic: &str, error: &str, now: Instant) -> bool {
        let t = self.entry(topic, now);
        t.in_flight = t.in_flight.saturating_sub(1);
        let newly = t.failing.is_none() && !t.stalled(now);
        let since = t.failing.as_ref().map_or(t.progress.min(now), |f| f.0);
        t.failing = Some((since, error.to_string()));
        newly
    }

    /// A delivery to `topic` found the topic missing (its record goes to the DLQ).
    pub fn missing(&mut self, topic: &str, error: &str, now: Instant) {
        let t = self.entry(topic, now);
        t.in_flight = t.in_flight.saturating_sub(1);
        let since = t.gone.as_ref().map_or(now, |g| g.0);
        t.gone = Some((since, now, error.to_string()));
    }

    fn entry(&mut self, topic: &str, now: Instant) -> &mut Target {
        self.targets.entry(topic.to_string()).or_insert(Target {
            in_flight: 1,
            progress: now,
            failing: None,
            gone: None,
        })
    }

    /// A delivery to `topic` ended saying nothing of the target: no answer (the engine
    /// stopped), or the record itself was refused (too large for it).
    pub fn abandoned(&mut self, topic: &str) {
        if let Some(t) = self.targets.get_mut(topic) {
            t.in_flight = t.in_flight.saturating_sub(1);
            if t.in_flight == 0 && t.failing.is_none() && t.gone.is_none() {
                self.targets.remove(topic);
            }
        }
    }

    /// True when a new record for `topic` should wait in its lane rather than join the
    /// producer's queue behind records the target does not take.
    pub fn holds(&self, topic: &str, now: Instant) -> bool {
        self.targets
            .get(topic)
            .is_some_and(|t| t.failing.is_some() || t.stalled(now))
    }

    /// True when some target is in trouble (the outbox's fast path skips every check otherwise).
    pub fn any(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Deliveries handed to the producer and not answered yet, to every target.
    pub fn in_flight(&self) -> u64 {
        self.targets.values().map(|t| u64::from(t.in_flight)).sum()
    }

    /// True when nothing is in flight to `topic`.
    pub fn idle(&self, topic: &str) -> bool {
        self.targets.get(topic).is_none_or(|t| t.in_flight == 0)
    }

    /// What `topic`'s lane does now.
    pub fn mode(&self, topic: &str, now: Instant) -> Mode {
        match self.targets.get(topic) {
            Some(t) if t.trouble_since(now).is_some() => {
                if t.in_flight > 0 {
                    Mode::Wait
                } else {
                    Mode::Probe
                }
            }
            _ => Mode::Resend,
        }
    }

    /// True when a record of a target in trouble, first handed over at `born`, has waited long
    /// enough to be dead-lettered, or its lane holds too much (`lane_full`: a quarter of the
    /// memory budget) to keep it. A record of a healthy target never expires.
    pub fn expired(&self, topic: &str, born: Instant, lane_full: bool, now: Instant) -> bool {
        self.targets
            .get(topic)
            .is_some_and(|t| t.trouble_since(now).is_some())
            && (lane_full || now.saturating_duration_since(born) >= self.give_up)
    }

    /// The targets in trouble now, longest first.
    pub fn troubles(&self, now: Instant) -> Vec<Trouble> {
        let mut out: Vec<Trouble> = self
            .targets
            .iter()
            .filter_map(|(topic, t)| {
                if let Some((since, last, error)) = &t.gone {
                    if now.saturating_duration_since(*last) < Self::GONE_SHOWN {
                        return Some(Trouble {
                            topic: topic.clone(),
                            for_: now.saturating_duration_since(*since),
                            error: error.clone(),
                        });
                    }
                }
                let since = t.trouble_since(now)?;
                let error = t.failing.as_ref().map_or_else(
                    || format!("{} record(s) unacknowledged", t.in_flight),
                    |f| f.1.clone(),
                );
                Some(Trouble {
                    topic: topic.clone(),
                    for_: now.saturating_duration_since(since),
                    error,
                })
            })
            .collect();
        out.sort_by(|a, b| b.for_.cmp(&a.for_).then(a.topic.cmp(&b.topic)));
        out
    }
}

impl Target {
    fn stalled(&self, now: Instant) -> bool {
        self.in_flight > 0
            && now.saturating_duration_since(self.progress) >= TargetHealth::STALL_AFTER
    }

    fn trouble_since(&self, now: Instant) -> Option<Instant> {
        match &self.failing {
            Some((since, _)) => Some(*since),
            None if self.stalled(now) => Some(self.progress),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_target_that_acknowledges_is_never_in_trouble() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(Duration::from_secs(30));
        for i in 0..100 {
            h.sent("a", at(t0, i * 100));
            assert!(!h.acknowledged("a", at(t0, i * 100 + 3)));
        }
        assert!(!h.any(), "nothing kept for a healthy target");
        assert_eq!(h.mode("a", at(t0, 20_000)), Mode::Resend);
    }

    #[test]
    fn a_stall_is_seen_after_five_seconds_without_an_acknowledgement() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(Duration::from_secs(30));
        h.sent("bad", t0);
        h.sent("good", t0);
        h.acknowledged("good", at(t0, 5));
        assert!(!h.holds("bad", at(t0, 4_999)));
        assert!(h.holds("bad", at(t0, 5_000)));
        assert!(!h.holds("good", at(t0, 5_000)));
        let troubles = h.troubles(at(t0, 6_000));
        assert_eq!(troubles.len(), 1);
        assert_eq!(troubles[0].topic, "bad");
        assert_eq!(troubles[0].for_, Duration::from_secs(6));
        assert_eq!(h.mode("bad", at(t0, 6_000)), Mode::Wait);
    }

    #[test]
    fn a_failing_target_is_probed_and_its_records_expire_after_the_limit() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(Duration::from_secs(30));
        h.sent("bad", t0);
        assert!(h.failed("bad", "Local: Message timed out", at(t0, 30_000)));
        assert!(
            !h.failed("bad", "again", at(t0, 30_001)),
            "already in trouble"
        );
        assert!(h.holds("bad", at(t0, 30_000)));
        assert_eq!(h.mode("bad", at(t0, 30_000)), Mode::Probe);
        // Each record waits the limit from when it was first handed over.
        assert!(h.expired("bad", t0, false, at(t0, 30_000)));
        assert!(!h.expired("bad", at(t0, 10_000), false, at(t0, 30_000)));
        assert!(
            h.expired("bad", at(t0, 29_000), true, at(t0, 30_000)),
            "a lane holding a quarter of the budget lets go at once"
        );
        assert!(!h.expired("good", t0, true, at(t0, 30_000)), "healthy");
        assert!(h.troubles(at(t0, 31_000))[0].error.contains("again"));
        // The probe goes through: healthy again, and forgotten.
        h.sent("bad", at(t0, 31_000));
        assert!(h.acknowledged("bad", at(t0, 31_010)), "it was in trouble");
        assert!(!h.holds("bad", at(t0, 31_010)));
        assert_eq!(h.mode("bad", at(t0, 40_000)), Mode::Resend);
        assert!(!h.expired("bad", t0, false, at(t0, 40_000)));
        assert!(h.troubles(at(t0, 40_000)).is_empty());
    }

    #[test]
    fn a_missing_target_is_named_but_holds_nothing_and_is_forgotten_a_minute_after() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(Duration::from_secs(30));
        h.sent("gone", t0);
        h.missing("gone", "Broker: Unknown topic or partition", at(t0, 100));
        h.sent("gone", at(t0, 200));
        h.missing("gone", "Broker: Unknown topic or partition", at(t0, 300));
        assert!(
            !h.holds("gone", at(t0, 300)),
            "its records go to the DLQ at once"
        );
        assert_eq!(h.mode("gone", at(t0, 300)), Mode::Resend);
        let t = &h.troubles(at(t0, 10_000))[0];
        assert_eq!(
            (t.topic.as_str(), t.for_),
            ("gone", Duration::from_millis(9_900))
        );
        assert!(h.troubles(at(t0, 60_299)).len() == 1);
        assert!(
            h.troubles(at(t0, 60_300)).is_empty(),
            "nothing found it missing for a minute"
        );
    }

    #[test]
    fn trouble_counts_from_the_first_failure_not_the_last() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(Duration::from_secs(10));
        h.sent("bad", t0);
        h.failed("bad", "first", at(t0, 1_000));
        h.sent("bad", at(t0, 2_000));
        h.failed("bad", "second", at(t0, 8_000));
        let t = &h.troubles(at(t0, 10_000))[0];
        assert_eq!(t.for_, Duration::from_secs(10));
        assert_eq!(t.error, "second");
        assert_eq!(h.mode("bad", at(t0, 10_000)), Mode::Probe);
    }
}
