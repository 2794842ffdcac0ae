//! Which offsets may be committed: per partition, everything below the lowest record not yet
//! acknowledged in its next place.
//!
//! A record is begun when it is read and finished when its next place (a slice, the target, the
//! DLQ) has acknowledged it; records held by the timer stay unfinished until published. A commit
//! therefore never passes a record that a crash would lose.

use std::collections::{BTreeMap, HashMap};

/// A topic partition.
pub type Tp = (String, i32);

/// Proof that a record was begun under the current assignment of its partition. After a revoke
/// and re-assign the generation changes, so a late acknowledgement cannot move the new owner's
/// commit point.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub generation: u64,
}

/// An offset that may be committed for a partition, under the assignment it was computed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPoint {
    pub tp: Tp,
    pub offset: i64,
    pub generation: u64,
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    /// Offsets begun and not finished, each with the acknowledgements it still waits for (two
    /// for a record with an id: its fact in the state topic and its copy in its next place).
    in_flight: BTreeMap<i64, u32>,
    /// One past the highest offset begun.
    next: Option<i64>,
    committed: Option<i64>,
}

impl PartitionState {
    fn commit_point(&self) -> Option<i64> {
        self.in_flight
            .first_key_value()
            .map(|(o, _)| *o)
            .or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Tp, PartitionState>,
    generations: u64,
}

impl OffsetTracker {
    /// Starts tracking newly assigned partitions, each under a fresh generation.
    pub fn assign(&mut self, tps: impl IntoIterator<Item = Tp>) {
        for tp in tps {
            self.generations += 1;
            self.partitions.insert(
                tp,
                PartitionState {
                    generation: self.generations,
                    in_flight: BTreeMap::new(),
                    next: None,
                    committed: None,
                },
            );
        }
    }

    /// Stops tracking revoked partitions; returns their last safe commit points, to commit before
    /// they are handed to another member.
    pub fn revoke<'a>(&mut self, tps: impl IntoIterator<Item = &'a Tp>) -> Vec<CommitPoint> {
        tps.into_iter()
            .filter_map(|tp| {
                let state = self.partitions.remove(tp)?;
                let point = state.commit_point()?;
                (Some(point) != state.committed).then(|| CommitPoint {
                    tp: tp.clone(),
                    offset: point,
                    generation: state.generation,
                })
            })
            .collect()
    }

    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.partitions
            .contains_key(&(topic.to_string(), partition))
    }

    /// The generation a partition is tracked under, if it is assigned.
    pub fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.partitions
            .get(&(topic.to_string(), partition))
            .map(|s| s.generation)
    }

    /// Records that `offset` was read and is on its way; `None` when the partition is not ours.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let state = self.partitions.get_mut(&(topic.to_string(), partition))?;
        *state.in_flight.entry(offset).or_insert(0) += 1;
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(Ticket {
            topic: topic.to_string(),
            partition,
            offset,
            generation: state.generation,
        })
    }

    /// [`OffsetTracker::begin`], but only under `generation`: a reader that started under an
    /// earlier assignment of the partition must not begin offsets under the new one (nothing
    /// would ever finish them, and that assignment's commit point would stop there).
    pub fn begin_in(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<Ticket> {
        if self.generation(topic, partition) != Some(generation) {
            return None;
        }
        self.begin(topic, partition, offset)
    }

    /// Records that the ticket's record reached its next place. Stale tickets are ignored.
    pub fn finish(&mut self, ticket: &Ticket) {
        if let Some(state) = self.current_mut(ticket) {
            if let Some(waiting) = state.in_flight.get_mut(&ticket.offset) {
                *waiting -= 1;
                if *waiting == 0 {
                    state.in_flight.remove(&ticket.offset);
                }
            }
        }
    }

    /// Makes the ticket's record wait for one more acknowledgement (a second place it is
    /// written to) before its offset may be committed; returns the ticket for that write, or
    /// `None` when the ticket is stale.
    pub fn also(&mut self, ticket: &Ticket) -> Option<Ticket> {
        let state = self.current_mut(ticket)?;
        *state.in_flight.get_mut(&ticket.offset)? += 1;
        Some(ticket.clone())
    }

    /// Whether the ticket belongs to the partition's current assignment.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.partitions
            .get(&(ticket.topic.clone(), ticket.partition))
            .is_some_and(|s| s.generation == ticket.generation)
    }

    fn current_mut(&mut self, ticket: &Ticket) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(&(ticket.topic.clone(), ticket.partition))
            .filter(|s| s.generation == ticket.generation)
    }

    /// Commit points that moved since the last acknowledged commit. They are not marked
    /// committed here: only [`OffsetTracker::committed`], once the broker has acknowledged the
    /// commit, does that, so a failed commit is simply offered again.
    pub fn commit_points(&self) -> Vec<CommitPoint> {
        let mut out = Vec::new();
        for (tp, state) in &self.partitions {
            if let Some(point) = state.commit_point() {
                if state.committed != Some(point) {
                    out.push(CommitPoint {
                        tp: tp.clone(),
                        offset: point,
                        generation: state.generation,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.tp.cmp(&b.tp));
        out
    }

    /// Records that the broker acknowledged these commits. A point of an earlier assignment of
    /// its partition (revoked and assigned again meanwhile) changes nothing.
    pub fn committed(&mut self, points: &[CommitPoint]) {
        for p in points {
            if let Some(state) = self.partitions.get_mut(&p.tp) {
                if state.generation == p.generation {
                    state.committed = Some(p.offset);
                }
            }
        }
    }

    /// The assigned partitions of a topic, in order.
    pub fn partitions_of(&self, topic: &str) -> Vec<i32> {
        let mut out: Vec<i32> = self
            .partitions
            .keys()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect();
        out.sort_unstable();
        out
    }

    /// How many partitions this process owns now.
    pub fn owned_count(&self) -> usize {
        self.partitions.len()
    }

    /// The partitions this process owns now.
    pub fn owned(&self) -> Vec<Tp> {
        self.partitions.keys().cloned().collect()
    }

    /// Records begun and not yet finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    fn offsets(points: &[CommitPoint]) -> Vec<(Tp, i64)> {
        points.iter().map(|p| (p.tp.clone(), p.offset)).collect()
    }

    #[test]
    fn commits_stop_below_the_lowest_unacknowledged_record() {
        let mut t = OffsetTracker::default();
        assert_eq!(
            t.begin("t", 0, 0),
            None,
            "unassigned partitions are not tracked"
        );
        t.assign([tp(0)]);
        let a = t.begin("t", 0, 10).unwrap();
        let b = t.begin("t", 0, 11).unwrap();
        let c = t.begin("t", 0, 12).unwrap();
        t.finish(&b);
        t.finish(&c);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 10)]);
        assert_eq!(
            offsets(&t.commit_points()),
            vec![(tp(0), 10)],
            "not acknowledged yet: offered again"
        );
        let points = t.commit_points();
        t.committed(&points);
        assert_eq!(
            t.commit_points(),
            vec![],
            "unchanged points are not recommitted"
        );
        t.finish(&a);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 13)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_record_written_to_two_places_waits_for_both_acknowledgements() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let copy = t.begin("t", 0, 7).unwrap();
        let fact = t.also(&copy).unwrap();
        t.finish(&copy);
        assert_eq!(
            offsets(&t.commit_points()),
            vec![(tp(0), 7)],
            "the fact is not in yet"
        );
        t.finish(&fact);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 8)]);
        assert_eq!(
            t.also(&fact),
            None,
            "a finished record takes no more writes"
        );
    }

    #[test]
    fn a_late_ack_after_reassignment_is_ignored() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let old = t.begin("t", 0, 5).unwrap();
        assert_eq!(offsets(&t.revoke([&tp(0)])), vec![(tp(0), 5)]);
        t.assign([tp(0)]);
        let new = t.begin("t", 0, 5).unwrap();
        assert!(!t.is_current(&old));
        t.finish(&old);
        assert_eq!(
            offsets(&t.commit_points()),
            vec![(tp(0), 5)],
            "the old ack must not release offset 5"
        );
        t.finish(&new);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 6)]);
    }

    #[test]
    fn a_reader_of_an_earlier_assignment_begins_nothing_under_the_new_one() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let old = t.generation("t", 0).unwrap();
        t.revoke([&tp(0)]);
        t.assign([tp(0)]);
        assert_eq!(t.begin_in("t", 0, 3, old), None);
        assert_eq!(t.in_flight(), 0, "nothing holds the new commit point");
        let new = t.generation("t", 0).unwrap();
        assert!(t.begin_in("t", 0, 3, new).is_some());
    }

    #[test]
    fn a_commit_acknowledged_for_an_earlier_assignment_marks_nothing() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let a = t.begin("t", 0, 7).unwrap();
        t.finish(&a);
        let stale = t.commit_points();
        t.revoke([&tp(0)]);
        t.assign([tp(0)]);
        let b = t.begin("t", 0, 7).unwrap();
        t.finish(&b);
        t.committed(&stale);
        assert_eq!(
            offsets(&t.commit_points()),
            vec![(tp(0), 8)],
            "the new assignment's point is still to commit"
        );
    }
}
