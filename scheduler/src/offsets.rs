//! Which offsets may be committed: per partition, everything below the lowest record not yet
//! acknowledged in its next place.
//!
//! A record is begun when it is read and finished when its next place (a slice, the target, the
//! DLQ) has acknowledged it; records held by the timer stay unfinished until published. A commit
//! therefore never passes a record that a crash would lose.
//!
//! Two pieces, each with one writer:
//! - [`Owned`]: which partitions this process owns, under which generation. Written only by the
//!   rebalance callback, read by every stage through a `watch` (a stage asks "is this mine?").
//! - [`OffsetTracker`]: what is in flight per partition. Owned by the committer's thread alone;
//!   the other stages send it [`Note`]s ("begun", "also", "finished") through an [`Offsets`]
//!   handle, which never waits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::replay::Progress;

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
    /// What is done above `offset` (the exactly-once mode commits it as the offset's metadata).
    pub progress: Progress,
}

/// The partitions this process owns, each under the generation of its assignment. Published by
/// the rebalance callback on a `watch`; generations only grow, so a ticket of an earlier
/// assignment of the same partition never looks current.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    partitions: HashMap<Tp, u64>,
    generations: u64,
    /// What the last transaction of each partition's previous owner had done above its commit
    /// point (the exactly-once mode): those records are skipped, not done again.
    done: HashMap<Tp, Arc<Progress>>,
}

impl Owned {
    /// Takes newly assigned partitions, each under a fresh generation; returns them with it.
    pub fn assign(&mut self, tps: impl IntoIterator<Item = Tp>) -> Vec<(Tp, u64)> {
        tps.into_iter()
            .map(|tp| {
                self.generations += 1;
                self.partitions.insert(tp.clone(), self.generations);
                (tp, self.generations)
            })
            .collect()
    }

    pub fn revoke<'a>(&mut self, tps: impl IntoIterator<Item = &'a Tp>) {
        for tp in tps {
            self.partitions.remove(tp);
            self.done.remove(tp);
        }
    }

    /// What the partition's committed transaction says is done above its commit point; set by
    /// the rebalance callback with the assignment, before any record of it is read.
    pub fn replay(&mut self, done: HashMap<Tp, Arc<Progress>>) {
        self.done.extend(done);
    }

    /// Whether the record at `offset` was already written where it goes, in a committed
    /// transaction, by an earlier owner: it is skipped (begun and finished at once).
    pub fn already_done(&self, topic: &str, partition: i32, offset: i64) -> bool {
        // Empty in the at-least-once mode: no key is built for each record read.
        if self.done.is_empty() {
            return false;
        }
        self.done
            .get(&(topic.to_string(), partition))
            .is_some_and(|p| p.is_done(offset))
    }

    /// The generation a partition is owned under, if it is ours.
    pub fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.partitions
            .get(&(topic.to_string(), partition))
            .copied()
    }

    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.generation(topic, partition).is_some()
    }

    /// Whether the ticket belongs to the partition's current assignment.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.generation(&ticket.topic, ticket.partition) == Some(ticket.generation)
    }

    /// A ticket for `offset` under the partition's current generation; `None` when not ours.
    pub fn ticket(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        Some(Ticket {
            topic: topic.to_string(),
            partition,
            offset,
            generation: self.generation(topic, partition)?,
        })
    }

    /// The owned partitions of a topic, in order.
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

    pub fn count(&self) -> usize {
        self.partitions.len()
    }

    pub fn list(&self) -> Vec<Tp> {
        self.partitions.keys().cloned().collect()
    }
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
    /// Records the previous owner left pending (exactly-once), not read again yet: they hold
    /// the commit point as records in flight do.
    unread: BTreeSet<i64>,
}

impl PartitionState {
    fn commit_point(&self) -> Option<i64> {
        let first = self.in_flight.first_key_value().map(|(o, _)| *o);
        match (first, self.unread.first().copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b).or(self.next),
        }
    }

    /// The commit point; with what is done above it when `progress` (a transaction commits it:
    /// a list of every record in flight, not built for a plain commit every tick).
    fn point(&self, tp: &Tp, progress: bool) -> Option<CommitPoint> {
        let offset = self.commit_point()?;
        let pending = if progress {
            // Both sorted; the unread are never in flight (a begin takes them out).
            let mut pending: Vec<i64> = self.in_flight.keys().copied().collect();
            if !self.unread.is_empty() {
                pending.extend(self.unread.iter().copied());
                pending.sort_unstable();
            }
            pending
        } else {
            Vec::new()
        };
        Some(CommitPoint {
            tp: tp.clone(),
            offset,
            generation: self.generation,
            progress: Progress {
                from: offset,
                upto: if progress {
                    self.next.unwrap_or(offset).max(offset)
                } else {
                    offset
                },
                pending,
            },
        })
    }
}

/// The in-flight records of each owned partition. One owner (the committer's thread) applies
/// the notes in the order they were sent; a note of a partition's earlier assignment (a stale
/// generation) changes nothing.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Tp, PartitionState>,
}

impl OffsetTracker {
    /// Starts tracking newly assigned partitions under the generations [`Owned::assign`] gave.
    /// `done` holds, for a partition whose previous owner committed a transaction, what it had
    /// done above its commit point: its pending records hold the commit point until read again,
    /// and the rest of its span counts as read.
    pub fn assign(
        &mut self,
        tps: impl IntoIterator<Item = (Tp, u64)>,
        done: &HashMap<Tp, Arc<Progress>>,
    ) {
        for (tp, generation) in tps {
            let inherited = done.get(&tp);
            self.partitions.insert(
                tp,
                PartitionState {
                    generation,
                    in_flight: BTreeMap::new(),
                    next: inherited.filter(|p| p.upto > p.from).map(|p| p.upto),
                    committed: None,
                    unread: inherited
                        .map(|p| p.pending.iter().copied().collect())
                        .unwrap_or_default(),
                },
            );
        }
    }

    /// Stops tracking revoked partitions; returns their last safe commit points that moved since
    /// the last commit, to commit before they are handed to another member.
    pub fn revoke<'a>(&mut self, tps: impl IntoIterator<Item = &'a Tp>) -> Vec<CommitPoint> {
        tps.into_iter()
            .filter_map(|tp| {
                let state = self.partitions.remove(tp)?;
                state
                    .point(tp, false)
                    .filter(|p| Some(p.offset) != state.committed)
            })
            .collect()
    }

    /// Records that the ticket's record was read and is on its way; false (nothing recorded)
    /// when the ticket is of another assignment.
    pub fn begin(&mut self, ticket: &Ticket) -> bool {
        let Some(state) = self.current_mut(ticket) else {
            return false;
        };
        *state.in_flight.entry(ticket.offset).or_insert(0) += 1;
        state.unread.remove(&ticket.offset);
        let after = ticket.offset.saturating_add(1);
        state.next = Some(state.next.map_or(after, |n| n.max(after)));
        true
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
    /// written to) before its offset may be committed; false when the ticket is stale or its
    /// record already finished.
    pub fn also(&mut self, ticket: &Ticket) -> bool {
        let Some(state) = self.current_mut(ticket) else {
            return false;
        };
        match state.in_flight.get_mut(&ticket.offset) {
            Some(waiting) => {
                *waiting += 1;
                true
            }
            None => false,
        }
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
        let mut out: Vec<CommitPoint> = self
            .partitions
            .iter()
            .filter_map(|(tp, state)| {
                state
                    .point(tp, false)
                    .filter(|p| Some(p.offset) != state.committed)
            })
            .collect();
        out.sort_by(|a, b| a.tp.cmp(&b.tp));
        out
    }

    /// Whether any commit point moved since the last acknowledged commit (what
    /// [`OffsetTracker::commit_points`] would list, without building the list).
    pub fn moved(&self) -> bool {
        self.partitions
            .values()
            .any(|s| s.commit_point().is_some_and(|p| Some(p) != s.committed))
    }

    /// Every partition's commit point with its progress, moved or not: a transaction states
    /// them all, so that what is done above a point that did not move is not forgotten, and
    /// the group coordinator checks the generation of every transaction that wrote anything.
    pub fn transaction_points(&self) -> Vec<CommitPoint> {
        let mut out: Vec<CommitPoint> = self
            .partitions
            .iter()
            .filter_map(|(tp, state)| state.point(tp, true))
            .collect();
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

    /// Records begun and not yet finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }
}

/// The outcome of a commit the committer was asked for: the records still unfinished after it,
/// or why it failed.
pub type CommitOutcome = Result<usize, String>;

/// The group's metadata (generation, member) as the rebalance callback saw it.
#[derive(Clone)]
pub struct GroupSeen(pub Arc<rdkafka::consumer::ConsumerGroupMetadata>);

impl std::fmt::Debug for GroupSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupSeen")
    }
}

/// What the committer's thread receives, in the order it was sent.
#[derive(Debug)]
pub enum Note {
    /// Partitions assigned, with their generations and, in the exactly-once mode, what their
    /// previous owner's last transaction had done (from the rebalance callback, before any
    /// stage can see them as owned).
    Assigned(Vec<(Tp, u64)>, HashMap<Tp, Arc<Progress>>),
    /// Partitions revoked: the reply carries their last safe commit points. In the
    /// exactly-once mode, with the group's metadata as the callback saw it: a commit that ends
    /// after the partitions moved carries the generation they moved from, and is refused.
    Revoked(
        Vec<Tp>,
        Option<GroupSeen>,
        mpsc::SyncSender<Vec<CommitPoint>>,
    ),
    Begun(Ticket),
    Also(Ticket),
    Finished(Ticket),
    /// Commit now (a clean stop's last commit); answered once the broker has answered.
    CommitNow(oneshot::Sender<CommitOutcome>),
    /// The committer's own commit came back (sent by the commit it ran off its thread).
    Committed(Vec<CommitPoint>, Result<(), String>),
    /// A stop's end, after its last commit: the committer's thread ends.
    Close,
}

/// How a stage reaches the offsets: it asks [`Owned`] (a `watch`) whether a partition is its,
/// and tells the committer's tracker a fact by a [`Note`] on an unbounded channel, so no stage
/// ever waits on the tracker or locks anything another stage holds. A note is a few words;
/// what bounds their number is the memory budget, which bounds the records in flight.
#[derive(Debug, Clone)]
pub struct Offsets {
    notes: mpsc::Sender<Note>,
    owned: watch::Receiver<Owned>,
    /// How far each owned ingest partition is read with its facts acknowledged (for the ingest
    /// watermarks, [`crate::watermark`]): a short lock, never held across an await.
    marks: Arc<Mutex<ReadMarks>>,
}

/// The ends [`Offsets::channel`] makes: the stages' handle, the committer's receiver, and the
/// rebalance callback's sending end of the ownership.
pub struct OffsetsEnds {
    pub offsets: Offsets,
    pub notes: mpsc::Receiver<Note>,
    pub owned: watch::Sender<Owned>,
}

impl Offsets {
    pub fn channel() -> OffsetsEnds {
        let (notes_tx, notes) = mpsc::channel();
        let (owned, owned_rx) = watch::channel(Owned::default());
        OffsetsEnds {
            offsets: Offsets {
                notes: notes_tx,
                owned: owned_rx,
                marks: Arc::default(),
            },
            notes,
            owned,
        }
    }

    fn tell(&self, note: Note) {
        // Only fails once the committer has ended (after a stop's last commit): nothing is
        // committed any more, so the note has nobody to change.
        let _ = self.notes.send(note);
    }

    /// Records that `offset` was read and is on its way; `None` when the partition is not ours.
    pub fn begin(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        self.begin_under(topic, partition, offset, None)
    }

    /// [`Offsets::begin`], but only under `generation`: a reader that started under an earlier
    /// assignment of the partition must not begin offsets under the new one (nothing would ever
    /// finish them, and that assignment's commit point would stop there).
    pub fn begin_in(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<Ticket> {
        self.begin_under(topic, partition, offset, Some(generation))
    }

    fn begin_under(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: Option<u64>,
    ) -> Option<Ticket> {
        let ticket = self
            .owned
            .borrow()
            .ticket(topic, partition, offset)
            .filter(|t| generation.is_none_or(|g| t.generation == g))?;
        self.tell(Note::Begun(ticket.clone()));
        Some(ticket)
    }

    /// Makes the ticket's record wait for a second acknowledgement; returns the ticket for that
    /// write, or `None` when the ticket is no longer current.
    pub fn also(&self, ticket: &Ticket) -> Option<Ticket> {
        self.is_current(ticket).then(|| self.also_whatever(ticket))
    }

    /// [`Offsets::also`] whatever the ownership says now (exactly-once: the write is a
    /// follow-up the revoke's transaction waits for; the tracker still ignores a ticket of an
    /// assignment it has forgotten).
    pub fn also_whatever(&self, ticket: &Ticket) -> Ticket {
        self.tell(Note::Also(ticket.clone()));
        ticket.clone()
    }

    /// Records that the ticket's record reached its next place.
    pub fn finish(&self, ticket: &Ticket) {
        self.tell(Note::Finished(ticket.clone()));
    }

    /// Tells the tracker of partitions assigned (the rebalance callback, before it publishes
    /// them as owned).
    pub fn assigned(&self, tps: Vec<(Tp, u64)>, done: HashMap<Tp, Arc<Progress>>) {
        self.tell(Note::Assigned(tps, done));
    }

    /// Asks the tracker for revoked partitions' last safe commit points, waiting up to
    /// `timeout`: the rebalance callback commits them before the partitions move. It runs on
    /// librdkafka's polling thread and the tracker on a thread of its own, so the wait never
    /// holds up the task that would answer it.
    pub fn revoke(
        &self,
        tps: Vec<Tp>,
        group: Option<rdkafka::consumer::ConsumerGroupMetadata>,
        timeout: Duration,
    ) -> Vec<CommitPoint> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tell(Note::Revoked(
            tps,
            group.map(|g| GroupSeen(Arc::new(g))),
            tx,
        ));
        rx.recv_timeout(timeout).unwrap_or_default()
    }

    /// Asks the committer to commit now; `Err` when it failed or the committer has ended.
    pub async fn commit_now(&self) -> CommitOutcome {
        let (tx, rx) = oneshot::channel();
        self.tell(Note::CommitNow(tx));
        rx.await
            .unwrap_or_else(|_| Err("the committer has ended".into()))
    }

    /// A commit's outcome, from the committer's commit thread back to its tracker.
    pub(crate) fn committed(&self, points: Vec<CommitPoint>, result: Result<(), String>) {
        self.tell(Note::Committed(points, result));
    }

    /// Ends the committer's thread (a stop, after its last commit).
    pub(crate) fn close(&self) {
        self.tell(Note::Close);
    }

    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.owned.borrow().is_current(ticket)
    }

    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.owned.borrow().owns(topic, partition)
    }

    /// Where the partition was committed when assigned (exactly-once), as the group's consumer
    /// read it: a stable offset, which the lookup client (read_uncommitted) may not yet see.
    pub fn committed_at(&self, topic: &str, partition: i32) -> Option<i64> {
        self.owned
            .borrow()
            .done
            .get(&(topic.to_string(), partition))
            .map(|p| p.from)
    }

    /// The ticket of a record the previous owner's committed transaction already did (see
    /// [`Owned::already_done`]); `None` for any other record. The record is skipped, and the
    /// tracker is told nothing of it: the inherited progress already counts it as read and done
    /// ([`OffsetTracker::assign`]). Beginning and finishing it instead, two notes, let a commit
    /// that fell between them state it pending again; the process that committed that died before
    /// its next commit, and the next owner did the record a second time (the faults test's one
    /// duplicate).
    pub fn skip_done(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let owned = self.owned.borrow();
        owned
            .already_done(topic, partition, offset)
            .then(|| owned.ticket(topic, partition, offset))
            .flatten()
    }

    pub fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.owned.borrow().generation(topic, partition)
    }

    pub fn partitions_of(&self, topic: &str) -> Vec<i32> {
        self.owned.borrow().partitions_of(topic)
    }

    pub fn owned_count(&self) -> usize {
        self.owned.borrow().count()
    }

    pub fn owned(&self) -> Vec<Tp> {
        self.owned.borrow().list()
    }

    /// Reads or tells the ingest partitions' read marks (see [`ReadMarks`]).
    pub fn read_marks<R>(&self, f: impl FnOnce(&mut ReadMarks) -> R) -> R {
        // A panic elsewhere while holding the marks leaves them usable: they are only counters.
        f(&mut self.marks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How far one ingest partition is read under one assignment, on its owner.
#[derive(Debug, Default)]
struct Mark {
    generation: u64,
    /// One past the highest offset read.
    read_next: Option<i64>,
    /// The consumer's position, as the ingest stage last noted it between records: past
    /// transaction markers and aborted records too, which are never handed out.
    position: Option<i64>,
    /// The group's committed offset when nothing had been read yet: every record below it was
    /// handled by some owner.
    base: Option<i64>,
    /// Records read whose fact is not acknowledged yet, by offset.
    unacked: BTreeMap<i64, u32>,
}

/// On the owner: how far each of its ingest partitions is read with every fact acknowledged.
/// The ingest stage tells it what it reads ([`ReadMarks::read`]) and where its consumer stands;
/// the outbox what facts were acknowledged; the watermark writer
/// ([`crate::watermark`]) asks.
#[derive(Debug, Default)]
pub struct ReadMarks {
    partitions: HashMap<i32, Mark>,
}

impl ReadMarks {
    /// The mark of `partition` under `generation`; a newer generation starts afresh, an older
    /// one gets nothing.
    fn mark(&mut self, partition: i32, generation: u64) -> Option<&mut Mark> {
        let m = self.partitions.entry(partition).or_insert_with(|| Mark {
            generation,
            ..Mark::default()
        });
        if m.generation < generation {
            *m = Mark {
                generation,
                ..Mark::default()
            };
        }
        (m.generation == generation).then_some(m)
    }

    /// The ticket's record was read; `fact` when a fact of it is on its way (then the record
    /// counts as handled only once [`ReadMarks::acked`]).
    pub fn read(&mut self, ticket: &Ticket, fact: bool) {
        if let Some(m) = self.mark(ticket.partition, ticket.generation) {
            if fact {
                *m.unacked.entry(ticket.offset).or_insert(0) += 1;
            }
            let next = ticket.offset.saturating_add(1);
            m.read_next = Some(m.read_next.map_or(next, |n| n.max(next)));
        }
    }

    /// The fact of the ticket's record is acknowledged (or will not be written after all).
    pub fn acked(&mut self, ticket: &Ticket) {
        let Some(m) = self
            .partitions
            .get_mut(&ticket.partition)
            .filter(|m| m.generation == ticket.generation)
        else {
            return;
        };
        if let Some(n) = m.unacked.get_mut(&ticket.offset) {
            *n -= 1;
            if *n == 0 {
                m.unacked.remove(&ticket.offset);
            }
        }
    }

    /// The consumer's position in `partition`, noted by the ingest stage between two records
    /// (so every record below it was handed to [`ReadMarks::read`] first).
    pub fn position(&mut self, partition: i32, generation: u64, offset: i64) {
        if let Some(m) = self.mark(partition, generation) {
            m.position = Some(m.position.map_or(offset, |o| o.max(offset)));
        }
    }

    /// The group's committed offset of `partition` (or its first offset, if none is committed),
    /// for a partition nothing was read from yet.
    pub fn base(&mut self, partition: i32, generation: u64, offset: i64) {
        if let Some(m) = self.mark(partition, generation) {
            m.base = Some(m.base.map_or(offset, |o| o.max(offset)));
        }
    }

    /// Whether nothing is known of how far `partition` is read under `generation`.
    pub fn unknown(&self, partition: i32, generation: u64) -> bool {
        self.handled_to(partition, generation).is_none()
    }

    /// Every record of `partition` below this offset is read and its fact acknowledged (under
    /// `generation`); `None` when nothing is known yet.
    pub fn handled_to(&self, partition: i32, generation: u64) -> Option<i64> {
        let m = self
            .partitions
            .get(&partition)
            .filter(|m| m.generation == generation)?;
        let read = [m.read_next, m.position, m.base]
            .into_iter()
            .flatten()
            .max()?;
        Some(
            m.unacked
                .first_key_value()
                .map_or(read, |(o, _)| (*o).min(read)),
        )
    }

    /// Forgets the partitions not owned (under these generations) any more.
    pub fn retain(&mut self, owned: &[(i32, u64)]) {
        self.partitions
            .retain(|p, m| owned.contains(&(*p, m.generation)));
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

    /// The two writers as the engine runs them: the callback's ownership and the committer's
    /// tracker, fed the same assignments.
    #[derive(Default)]
    struct Both {
        owned: Owned,
        t: OffsetTracker,
    }

    impl Both {
        fn assign(&mut self, tps: &[Tp]) {
            self.assign_after(tps, HashMap::new());
        }
        /// Assigns as the exactly-once mode does, with what the previous owner had done.
        fn assign_after(&mut self, tps: &[Tp], done: HashMap<Tp, Arc<Progress>>) {
            let list = self.owned.assign(tps.iter().cloned());
            self.owned.replay(done.clone());
            self.t.assign(list, &done);
        }
        fn revoke(&mut self, tps: &[Tp]) -> Vec<CommitPoint> {
            self.owned.revoke(tps);
            self.t.revoke(tps)
        }
        fn begin(&mut self, p: i32, offset: i64) -> Option<Ticket> {
            let ticket = self.owned.ticket("t", p, offset)?;
            self.t.begin(&ticket).then_some(ticket)
        }
    }

    #[test]
    fn commits_stop_below_the_lowest_unacknowledged_record() {
        let mut b = Both::default();
        assert_eq!(b.begin(0, 0), None, "unassigned partitions are not tracked");
        b.assign(&[tp(0)]);
        let x = b.begin(0, 10).unwrap();
        let y = b.begin(0, 11).unwrap();
        let z = b.begin(0, 12).unwrap();
        let t = &mut b.t;
        t.finish(&y);
        t.finish(&z);
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
        t.finish(&x);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 13)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_record_written_to_two_places_waits_for_both_acknowledgements() {
        let mut b = Both::default();
        b.assign(&[tp(0)]);
        let copy = b.begin(0, 7).unwrap();
        let t = &mut b.t;
        assert!(t.also(&copy));
        t.finish(&copy);
        assert_eq!(
            offsets(&t.commit_points()),
            vec![(tp(0), 7)],
            "the fact is not in yet"
        );
        t.finish(&copy);
        assert_eq!(offsets(&t.commit_points()), vec![(tp(0), 8)]);
        assert!(!t.also(&copy), "a finished record takes no more writes");
    }

    #[test]
    fn a_late_ack_after_reassignment_is_ignored() {
        let mut b = Both::default();
        b.assign(&[tp(0)]);
        let old = b.begin(0, 5).unwrap();
        assert_eq!(offsets(&b.revoke(&[tp(0)])), vec![(tp(0), 5)]);
        b.assign(&[tp(0)]);
        let new = b.begin(0, 5).unwrap();
        assert!(!b.owned.is_current(&old));
        b.t.finish(&old);
        assert_eq!(
            offsets(&b.t.commit_points()),
            vec![(tp(0), 5)],
            "the old ack must not release offset 5"
        );
        b.t.finish(&new);
        assert_eq!(offsets(&b.t.commit_points()), vec![(tp(0), 6)]);
    }

    #[test]
    fn a_reader_of_an_earlier_assignment_begins_nothing_under_the_new_one() {
        let mut b = Both::default();
        b.assign(&[tp(0)]);
        let old = b.owned.ticket("t", 0, 3).unwrap();
        b.revoke(&[tp(0)]);
        b.assign(&[tp(0)]);
        assert!(!b.t.begin(&old), "a ticket of the earlier assignment");
        assert_eq!(b.t.in_flight(), 0, "nothing holds the new commit point");
        assert!(b.begin(0, 3).is_some());
    }

    #[test]
    fn a_commit_acknowledged_for_an_earlier_assignment_marks_nothing() {
        let mut b = Both::default();
        b.assign(&[tp(0)]);
        let x = b.begin(0, 7).unwrap();
        b.t.finish(&x);
        let stale = b.t.commit_points();
        b.revoke(&[tp(0)]);
        b.assign(&[tp(0)]);
        let y = b.begin(0, 7).unwrap();
        b.t.finish(&y);
        b.t.committed(&stale);
        assert_eq!(
            offsets(&b.t.commit_points()),
            vec![(tp(0), 8)],
            "the new assignment's point is still to commit"
        );
    }

    #[test]
    fn the_handle_begins_only_what_the_callback_published_as_owned() {
        let OffsetsEnds {
            offsets,
            notes,
            owned,
        } = Offsets::channel();
        assert_eq!(offsets.begin("t", 0, 1), None);
        let mut next = owned.borrow().clone();
        let list = next.assign([tp(0)]);
        offsets.assigned(list, HashMap::new());
        owned.send_replace(next);
        let ticket = offsets.begin("t", 0, 1).expect("owned now");
        assert!(offsets.also(&ticket).is_some());
        offsets.finish(&ticket);
        let mut t = OffsetTracker::default();
        for note in notes.try_iter() {
            match note {
                Note::Assigned(list, done) => t.assign(list, &done),
                Note::Begun(k) => assert!(t.begin(&k)),
                Note::Also(k) => assert!(t.also(&k)),
                Note::Finished(k) => t.finish(&k),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(t.in_flight(), 1, "begun, written twice, acknowledged once");
        assert_eq!(offsets.begin_in("t", 0, 2, ticket.generation + 1), None);
    }

    #[test]
    fn a_transaction_states_what_is_done_above_the_commit_point() {
        let mut b = Both::default();
        b.assign(&[tp(0)]);
        let held = b.begin(0, 10).unwrap();
        let sent = b.begin(0, 11).unwrap();
        let _unacked = b.begin(0, 12).unwrap();
        b.t.finish(&sent);
        let points = b.t.transaction_points();
        assert_eq!(offsets(&points), vec![(tp(0), 10)]);
        assert_eq!(
            points[0].progress,
            Progress {
                from: 10,
                upto: 13,
                pending: vec![10, 12]
            }
        );
        b.t.committed(&points);
        assert_eq!(
            b.t.transaction_points().len(),
            1,
            "a transaction states every partition, moved or not"
        );
        b.t.finish(&held);
        assert_eq!(b.t.transaction_points()[0].progress.pending, vec![12]);
    }

    #[test]
    fn a_skipped_record_never_shows_as_pending_to_a_commit() {
        // The previous owner committed at 10: 10 pending, 11 and 12 done.
        let done = Progress {
            from: 10,
            upto: 13,
            pending: vec![10],
        };
        let OffsetsEnds {
            offsets,
            notes,
            owned,
        } = Offsets::channel();
        let mut next = owned.borrow().clone();
        let list = next.assign([tp(0)]);
        let inherited = HashMap::from([(tp(0), Arc::new(done.clone()))]);
        next.replay(inherited.clone());
        offsets.assigned(list, inherited);
        owned.send_replace(next);
        let mut t = OffsetTracker::default();
        match notes.try_recv() {
            Ok(Note::Assigned(list, done)) => t.assign(list, &done),
            other => panic!("unexpected {other:?}"),
        }
        for o in [11, 12] {
            let ticket = offsets.skip_done("t", 0, o).expect("done, so skipped");
            assert_eq!(ticket.offset, o);
            // A note of it (a "begun" before its "finished") could reach a commit alone.
            assert!(
                notes.try_recv().is_err(),
                "skipping {o} tells the tracker nothing"
            );
        }
        assert_eq!(t.transaction_points()[0].progress, done);
        assert_eq!(offsets.skip_done("t", 0, 10), None, "pending: done again");
        assert_eq!(offsets.skip_done("t", 0, 13), None, "beyond what was done");
    }

    #[test]
    fn the_next_owner_skips_what_was_done_and_keeps_stating_it_until_read_past() {
        // The previous owner committed at 10: 10 and 12 pending, 11, 13 and 14 done.
        let done = Progress {
            from: 10,
            upto: 15,
            pending: vec![10, 12],
        };
        let mut b = Both::default();
        b.assign_after(&[tp(0)], HashMap::from([(tp(0), Arc::new(done.clone()))]));
        let skipped: Vec<i64> = (10..16)
            .filter(|&o| b.owned.already_done("t", 0, o))
            .collect();
        assert_eq!(skipped, vec![11, 13, 14]);
        assert_eq!(
            b.t.transaction_points()[0].progress,
            done,
            "before anything is read again, the inherited progress is stated as it was"
        );
        let ten = b.begin(0, 10).unwrap();
        b.t.finish(&ten);
        assert_eq!(
            b.t.transaction_points()[0].progress,
            Progress {
                from: 12,
                upto: 15,
                pending: vec![12]
            },
            "10 done now; 12 still unread holds the point; 13 and 14 stay done"
        );
        let twelve = b.begin(0, 12).unwrap();
        b.t.finish(&twelve);
        let fifteen = b.begin(0, 15).unwrap();
        assert_eq!(offsets(&b.t.transaction_points()), vec![(tp(0), 15)]);
        b.t.finish(&fifteen);
        assert_eq!(offsets(&b.t.transaction_points()), vec![(tp(0), 16)]);
        b.revoke(&[tp(0)]);
        assert!(
            !b.owned.already_done("t", 0, 11),
            "a revoked partition's replay is forgotten"
        );
    }
}
