//! Retry lanes: the sends to one topic that failed with a retriable error, held in the order
//! they were first handed to the producer, and the sends that arrive for that topic meanwhile.
//!
//! Owned by the outbox. While a topic's lane is open, every new send to that topic joins it
//! instead of going straight to the producer, and the lane's task sends its records again in
//! their original order once the backoff has passed. So a record retried after an error never
//! ends up behind a later record of the same key: order holds through retries (librdkafka's own
//! retries keep it within `message.timeout.ms`; a lane keeps it beyond). The lane is per topic,
//! not per partition, because the partition a record lands on is chosen by the producer; the
//! errors that open a lane (the broker away, a request timing out) concern every partition alike.

use std::collections::{BTreeMap, HashMap};

/// Open lanes by topic; each holds its records by the sequence number the outbox gave them.
#[derive(Debug)]
pub struct Lanes<T> {
    open: HashMap<String, BTreeMap<u64, T>>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            open: HashMap::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// Holds a failed record; true when this opened the topic's lane (the caller then starts the
    /// task that drains it).
    pub fn hold(&mut self, topic: &str, seq: u64, item: T) -> bool {
        match self.open.get_mut(topic) {
            Some(lane) => {
                lane.insert(seq, item);
                false
            }
            None => {
                self.open
                    .insert(topic.to_string(), BTreeMap::from([(seq, item)]));
                true
            }
        }
    }

    /// A new record for `topic`: joins the lane if one is open (returns `None`), else is handed
    /// back to be sent at once.
    pub fn divert(&mut self, topic: &str, seq: u64, item: T) -> Option<T> {
        match self.open.get_mut(topic) {
            Some(lane) => {
                lane.insert(seq, item);
                None
            }
            None => Some(item),
        }
    }

    /// Everything the lane holds now, in sequence order; the lane stays open (new records keep
    /// joining it) until [`Lanes::close_if_empty`].
    pub fn take(&mut self, topic: &str) -> Vec<(u64, T)> {
        self.open
            .get_mut(topic)
            .map(|lane| std::mem::take(lane).into_iter().collect())
            .unwrap_or_default()
    }

    /// Closes the lane if nothing joined it since the last [`Lanes::take`]; true when closed (or
    /// not open).
    pub fn close_if_empty(&mut self, topic: &str) -> bool {
        match self.open.get(topic) {
            Some(lane) if !lane.is_empty() => false,
            _ => {
                self.open.remove(topic);
                true
            }
        }
    }

    /// The first record of `topic`'s lane (a probe), taken out of it.
    pub fn take_first(&mut self, topic: &str) -> Option<(u64, T)> {
        self.open.get_mut(topic)?.pop_first()
    }

    /// Takes out of `topic`'s lane the records `pick` chooses, in order.
    pub fn take_where(&mut self, topic: &str, mut pick: impl FnMut(&T) -> bool) -> Vec<T> {
        let Some(lane) = self.open.get_mut(topic) else {
            return Vec::new();
        };
        let chosen: Vec<u64> = lane
            .iter()
            .filter(|(_, t)| pick(t))
            .map(|(seq, _)| *seq)
            .collect();
        chosen.iter().filter_map(|seq| lane.remove(seq)).collect()
    }

    /// The sum of `weight` over the records `topic`'s lane holds.
    pub fn weigh(&self, topic: &str, weight: impl Fn(&T) -> u64) -> u64 {
        self.open
            .get(topic)
            .map_or(0, |lane| lane.values().map(weight).sum())
    }

    /// True when no lane is open: every send goes straight to the producer.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Records held in all lanes.
    pub fn held(&self) -> usize {
        self.open.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_lane_opens_on_the_first_failure_and_closes_only_when_empty() {
        let mut l = Lanes::default();
        assert_eq!(l.divert("t", 1, "a"), Some("a"), "no lane: send at once");
        assert!(l.hold("t", 2, "b"), "the first failure opens the lane");
        assert!(!l.hold("t", 3, "c"));
        assert_eq!(l.divert("t", 4, "d"), None, "later records join the lane");
        assert_eq!(
            l.divert("u", 5, "e"),
            Some("e"),
            "other topics are not held"
        );
        assert_eq!(l.take("t"), vec![(2, "b"), (3, "c"), (4, "d")]);
        assert_eq!(l.divert("t", 6, "f"), None, "still open while resending");
        assert!(!l.close_if_empty("t"));
        assert_eq!(l.take("t"), vec![(6, "f")]);
        assert!(l.close_if_empty("t"));
        assert_eq!(l.divert("t", 7, "g"), Some("g"));
    }

    proptest! {
        /// However failures and new records interleave, a lane gives its records back in the
        /// order they were first handed over.
        #[test]
        fn records_come_back_in_first_send_order(mut seqs in proptest::collection::vec(0u64..10_000, 1..100)) {
            seqs.sort_unstable();
            seqs.dedup();
            let mut shuffled = seqs.clone();
            shuffled.reverse();
            shuffled.rotate_left(seqs.len() / 3);
            let mut l = Lanes::default();
            for s in &shuffled {
                if l.divert("t", *s, *s).is_some() {
                    l.hold("t", *s, *s);
                }
            }
            let back: Vec<u64> = l.take("t").into_iter().map(|(s, _)| s).collect();
            prop_assert_eq!(back, seqs);
        }
    }
}
