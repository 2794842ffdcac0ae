//! Routing: where an accepted record goes next (the timer, a slice window, the DLQ), within the
//! memory budget. Ingest and the sweeps route through one [`Router`]; it owns nothing but handles
//! on the stages it feeds.
//!
//! Receives parsed records with their offset tickets; sends [`TimerEntry`]s to the timer and
//! [`Send`]s to the outbox (slice writes, DLQ copies, facts of ids).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::domain::{dlq_original, Incoming, Origin, Outgoing, Rejection, Scheduled};
use crate::facts::{Fact, Version};
use crate::metrics as m;
use crate::offsets::Ticket;
use crate::outbox::{in_memory, weight, Budget, Outbox, Send, Share, Then};
use crate::progress::{ActiveSweep, Placed, SliceWrites};
use crate::slice::{Route, SliceId};
use crate::state::Ids;
use crate::time::Clock;
use crate::timer::{Timed, TimerCmd};

/// A record waiting in the timer, with the ticket that releases its source offset once
/// published and its share of the memory budget.
pub(crate) struct TimerEntry {
    pub(crate) scheduled: Scheduled,
    pub(crate) ticket: Ticket,
    pub(crate) permit: Share,
}

impl Timed for TimerEntry {
    fn due_ms(&self) -> i64 {
        self.scheduled.due.as_millis()
    }

    fn origin(&self) -> Origin {
        self.scheduled.origin
    }
}

/// The handles a record is routed with.
pub(crate) struct Router {
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub per_record: Arc<m::PerRecord>,
    pub budget: Budget,
    pub timer: mpsc::Sender<TimerCmd<TimerEntry>>,
    pub outbox: Arc<Outbox>,
    pub slice_writes: Arc<SliceWrites>,
    pub ids: Ids,
}

impl Router {
    /// The topic of a slice window.
    pub(crate) fn slice_topic(&self, id: SliceId) -> String {
        self.settings
            .ladder
            .window_topic(&self.settings.internal.slice_prefix, id)
    }

    /// Where a record due at `due_ms` goes next at `now_ms`: the ladder's route, the finest slice
    /// window of level 1 or up that can hold it, else the timer. Never level 0 (the ladder does not
    /// route there; this match keeps it so): a record due within a level-1 window whose sweep has
    /// begun would only cost one more produce and fetch there; the timer holds it instead, and its
    /// source offset waits for its delivery.
    pub(crate) fn next_place(&self, due_ms: i64, now_ms: i64) -> Route {
        match self.settings.ladder.route(due_ms, now_ms) {
            Route::Slice(id) if id.level > 0 => Route::Slice(id),
            _ => Route::Timer,
        }
    }

    /// Writes a fact of an id to the state topic; `ticket` is finished once it is acknowledged.
    pub(crate) async fn write_fact(&self, id: &str, version: Version, fact: Fact, ticket: Ticket) {
        let out = self.ids.record(id, version, &fact);
        let size = out.key.as_ref().map_or(0, Vec::len) + out.payload.as_ref().map_or(0, Vec::len);
        let then = Then::Fact {
            fact: fact.status(),
        };
        self.send_copy(out, then, size, ticket, None).await;
    }

    /// Sends the record as it was read to the DLQ with the reason.
    pub(crate) async fn dead_letter_original(
        &self,
        rec: &Incoming,
        why: &Rejection,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
    ) {
        let out = dlq_original(rec, &self.settings.internal.dlq, why);
        // Its headers too: a DLQ copy carries all of the original's, which may be most of it.
        let then = Then::DeadLetter { reason: why.code() };
        self.send_copy(out, then, rec.size(), ticket, sweep).await;
    }

    /// Sends a record that is not a scheduled copy (a fact, a DLQ copy), its `bytes` held in
    /// the memory budget (waiting for room) until the broker has answered.
    async fn send_copy(
        &self,
        out: Outgoing,
        then: Then,
        bytes: usize,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
    ) {
        let permit = self.budget.reserve(in_memory(bytes)).await;
        self.outbox
            .send(Send {
                out,
                then,
                scheduled: None,
                ticket,
                sweep,
                slice_write: None,
                _permit: permit,
            })
            .await;
    }

    /// Hands an accepted record to its next place, within the memory budget (waiting for room
    /// among what the timer holds, or what is sent; `permit` when the caller already holds the
    /// record's share).
    pub(crate) async fn forward(
        &self,
        s: Scheduled,
        route: Route,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
        permit: Option<Share>,
    ) {
        let permit = match (permit, route) {
            (Some(p), _) => p,
            (None, Route::Timer) => self.budget.reserve_hold(weight(&s)).await,
            (None, Route::Slice(_)) => self.budget.reserve(weight(&s)).await,
        };
        match route {
            Route::Timer => {
                if s.version.is_some() {
                    self.ids.due_at(s.due.as_millis());
                }
                let headroom = s.due.as_millis() - self.clock.now_ms();
                self.per_record
                    .timer_headroom
                    .record(headroom.max(0) as f64 / 1000.0);
                if headroom < 0 && s.hops > 0 {
                    self.per_record.timer_late.increment(1);
                }
                let entry = TimerEntry {
                    scheduled: s,
                    ticket,
                    permit,
                };
                if self.timer.send(TimerCmd::Insert(entry)).await.is_err() {
                    return; // stopping: the record stays uncommitted
                }
                if let Some(sweep) = sweep {
                    sweep.placed(Placed::Timer);
                }
            }
            Route::Slice(id) => {
                let mut s = s;
                let topic = self.slice_topic(id);
                let out = s.lend_body(|s| s.to_slice(topic));
                self.outbox
                    .send(Send {
                        out,
                        then: Then::Slice { level: id.level },
                        scheduled: Some(s),
                        ticket,
                        sweep,
                        slice_write: Some(self.slice_writes.begin(id)),
                        _permit: permit,
                    })
                    .await;
            }
        }
    }
}
