//! The publisher: the gate between the timer and the outbox.
//!
//! Receives each record the timer says is due, in the timer's order; asks the index of ids
//! ([`Ids`]) whether a newer version of a record's id (a cancel, a reschedule) is known, and the
//! ownership ([`crate::offsets::Owned`]) whether the record's partition is still ours; sends what passes to the outbox.
//! Owns the queue of records with ids waiting for the index to be fresh enough; publishes how many
//! wait and since when (for the status), and how many records it holds (for a clean stop).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::domain::Scheduled;
use crate::kafka::Fatal;
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::Offsets;
use crate::outbox::{Outbox, Send, Then};
use crate::router::TimerEntry;
use crate::state::Ids;
use crate::time::Clock;

use crate::status::GateHeld;

pub(crate) struct Publisher {
    pub outbox: Arc<Outbox>,
    /// When a recurring schedule's occurrence is published: whether it was missed.
    pub clock: Arc<dyn Clock>,
    /// Where a recurring schedule's next occurrence is filed.
    pub ingest_topic: String,
    /// Asked whether a ticket is still current; told "finished" for a withheld copy.
    pub offsets: Offsets,
    pub ids: Ids,
    pub life: Arc<Lifecycle>,
    /// What the gate holds (see [`GateHeld`]): a gate that holds records for long says the index
    /// of ids is not read.
    pub gate: watch::Sender<GateHeld>,
    /// Records the timer released that are not published yet: a clean stop waits for them.
    pub backlog: Arc<AtomicUsize>,
}

impl Publisher {
    /// Hands each record the timer says is due to the outbox, in the timer's order, unless its
    /// partition was revoked meanwhile (its new owner reads it again). A record with an id
    /// whose due time the index of ids is not yet fresh enough to judge waits (late, never
    /// wrong) in a queue of its own, in order, so records with ids keep the timer's order among
    /// themselves; records without an id never wait.
    pub(crate) async fn run(self, mut due: mpsc::Receiver<TimerEntry>) {
        let mut fresh = self.ids.freshness();
        // Each with the time it was parked: a gate that holds records for long is reported.
        let mut parked: VecDeque<(Instant, TimerEntry)> = VecDeque::new();
        loop {
            // What the timer released and is not published yet: a clean stop waits for it.
            self.backlog
                .store(due.len() + parked.len(), Ordering::SeqCst);
            let held = parked.front().map(|(at, _)| (parked.len(), *at));
            self.gate
                .send_if_modified(|g| std::mem::replace(g, held) != held);
            tokio::select! {
                entry = due.recv() => {
                    let Some(entry) = entry else { return };
                    if !self.offsets.is_current(&entry.ticket) {
                        continue;
                    }
                    let waits = entry.scheduled.version.is_some()
                        && (!parked.is_empty() || !self.ids.fresh_for(entry.scheduled.due.as_millis()));
                    if waits {
                        metrics::counter!(m::HELD_FOR_FRESHNESS).increment(1);
                        parked.push_back((Instant::now(), entry));
                    } else {
                        self.publish(entry).await;
                    }
                }
                changed = fresh.changed(), if !parked.is_empty() => {
                    if changed.is_err() {
                        return;
                    }
                    while parked
                        .front()
                        .is_some_and(|(_, e)| self.ids.fresh_for(e.scheduled.due.as_millis()))
                    {
                        if let Some((_, entry)) = parked.pop_front() {
                            if self.offsets.is_current(&entry.ticket) {
                                self.publish(entry).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends a due record to its target, unless its id has a newer version (a cancel or a
    /// reschedule): then it is done, and its offset may be committed.
    async fn publish(&self, entry: TimerEntry) {
        let mut scheduled = entry.scheduled;
        if let Some(version) = scheduled.version {
            match self.ids.withheld(&scheduled.id, version) {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    metrics::counter!(m::WITHHELD, "reason" => reason).increment(1);
                    self.offsets.finish(&entry.ticket);
                    return;
                }
                Err(e) => return self.life.fail(Fatal::Other(e.to_string())),
            }
        }
        // A recurring schedule's occurrence: deliver it or not (missed, `missed: none`), and its
        // next occurrence, filed once this one is settled.
        let turn = scheduled
            .recurrence
            .as_ref()
            .map(|r| r.turn(scheduled.due.as_millis(), self.clock.now_ms()));
        let next = turn
            .as_ref()
            .and_then(|t| t.next.as_ref())
            .map(|(at, r)| Box::new(scheduled.next_occurrence(&self.ingest_topic, *at, r)));
        if turn.is_some_and(|t| !t.deliver) {
            metrics::counter!(m::OCCURRENCES_SKIPPED).increment(1);
            return match next {
                Some(next) => {
                    self.outbox
                        .file_missed(*next, entry.ticket, entry.permit)
                        .await
                }
                None => self.offsets.finish(&entry.ticket),
            };
        }
        let out = scheduled.lend_body(Scheduled::to_target);
        let send = Send {
            out,
            then: Then::Deliver {
                due_ms: scheduled.due.as_millis(),
            },
            scheduled: Some(scheduled),
            ticket: entry.ticket,
            sweep: None,
            slice_write: None,
            next,
            _permit: entry.permit,
        };
        self.outbox.send(send).await;
    }
}
