//! The in-memory timer: records due before any slice could be swept again, in due order.
//!
//! One ordered map and one task (see `engine::run_timer`), not a timer per record. It only ever
//! holds what level 0 hands over shortly before it is due, so its size is bounded by the rate of
//! due records times about `w_0 + w_0/r`, never by the number pending.

use std::collections::BTreeMap;

use crate::domain::Origin;

/// Records ordered by `(due, origin, arrival)`: due time first; at the same millisecond, the order
/// they had in the ingest topic, so records of one key due together keep their order.
#[derive(Debug)]
pub struct TimerQueue<V> {
    entries: BTreeMap<(i64, Origin, u64), V>,
    arrivals: u64,
}

impl<V> Default for TimerQueue<V> {
    fn default() -> Self {
        TimerQueue {
            entries: BTreeMap::new(),
            arrivals: 0,
        }
    }
}

impl<V> TimerQueue<V> {
    pub fn insert(&mut self, due_ms: i64, origin: Origin, value: V) {
        self.arrivals += 1;
        self.entries.insert((due_ms, origin, self.arrivals), value);
    }

    /// The earliest due time held.
    pub fn next_due(&self) -> Option<i64> {
        self.entries.keys().next().map(|(due, _, _)| *due)
    }

    /// Removes and returns, in order, everything due at or before `now`: never anything later.
    pub fn pop_due(&mut self, now_ms: i64) -> Vec<V> {
        let later = self.entries.split_off(&(
            now_ms.saturating_add(1),
            Origin {
                partition: i32::MIN,
                offset: i64::MIN,
            },
            0,
        ));
        std::mem::replace(&mut self.entries, later)
            .into_values()
            .collect()
    }

    /// Keeps only the entries `keep` accepts (used to drop what a revoked partition handed over).
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.entries.retain(|_, v| keep(v));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(partition: i32, offset: i64) -> Origin {
        Origin { partition, offset }
    }

    #[test]
    fn pops_only_what_is_due_in_due_then_origin_order() {
        let mut q = TimerQueue::default();
        q.insert(200, o(0, 5), "c");
        q.insert(100, o(1, 9), "b");
        q.insert(100, o(1, 2), "a");
        q.insert(300, o(0, 1), "d");
        assert_eq!(q.next_due(), Some(100));
        assert_eq!(q.pop_due(99), Vec::<&str>::new());
        assert_eq!(q.pop_due(200), vec!["a", "b", "c"]);
        assert_eq!(q.len(), 1);
        q.retain(|v| *v != "d");
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }

    proptest! {
        #[test]
        fn never_pops_early_and_never_loses(items in proptest::collection::vec((0i64..1000, 0i32..3, 0i64..50), 0..200), cut in 0i64..1000) {
            let mut q = TimerQueue::default();
            for (i, (due, p, off)) in items.iter().enumerate() {
                q.insert(*due, o(*p, *off), (i, *due));
            }
            let popped = q.pop_due(cut);
            prop_assert!(popped.iter().all(|(_, due)| *due <= cut));
            prop_assert!(popped.windows(2).all(|w| w[0].1 <= w[1].1));
            prop_assert!(q.next_due().is_none_or(|d| d > cut));
            prop_assert_eq!(popped.len() + q.len(), items.len());
        }
    }
}
