//! Routing: where an accepted record goes next (the timer, a slice window, the DLQ), within the
//! memory budget. Ingest and the sweeps route through one [`Router`]; it owns nothing but handles
//! on the stages it feeds.
//!
//! Receives parsed records with their offset tickets; sends [`TimerEntry`]s to the timer and
//! [`Send`]s to the outbox (slice writes, DLQ copies, facts of ids).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::domain::{dlq_original, Incoming, Origin, Outgoing, Rejection, Scheduled};
use crate::facts::{Fact, Version};
use crate::metrics as m;
use crate::offsets::Ticket;
use crate::outbox::{in_memory, weight, Budget, Outbox, Send, Share, Then};
use crate::progress::{ActiveSweep, Placed, SliceWrites};
use crate::slice::{Route, SliceId};
use crate::state::Ids;
use crate::status::GateHeld;
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
    /// What the publish gate holds: while it holds records, ingest never waits for room among
    /// the timer's holds (see [`Router::place`]).
    pub gate_held: watch::Receiver<GateHeld>,
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

    /// The record that writes `fact` of `id` at `version` to the state topic, and the bytes it
    /// occupies while it is sent.
    pub(crate) fn fact_record(&self, id: &str, version: Version, fact: &Fact) -> (Outgoing, usize) {
        let out = self.ids.record(id, version, fact);
        let size = out.key.as_ref().map_or(0, Vec::len) + out.payload.as_ref().map_or(0, Vec::len);
        (out, in_memory(size))
    }

    /// Writes the fact of an id that an ingest record makes to the state topic, with a share of
    /// its own; `ticket` is finished, and the record counts as handled for its partition's
    /// watermark, once it is acknowledged.
    pub(crate) async fn write_fact(&self, id: &str, version: Version, fact: Fact, ticket: Ticket) {
        let (out, bytes) = self.fact_record(id, version, &fact);
        let permit = self.budget.reserve(bytes).await;
        self.send_fact(out, &fact, ticket, permit).await;
    }

    /// [`Router::write_fact`] within `permit`: a clone of the share the record's copy holds
    /// too, sized for both (see [`Share`]).
    pub(crate) async fn send_fact(
        &self,
        out: Outgoing,
        fact: &Fact,
        ticket: Ticket,
        permit: Share,
    ) {
        let then = Then::Fact {
            fact: fact.status(),
            read_mark: true,
        };
        self.send_within(out, then, ticket, None, permit).await;
    }

    /// Where an ingest record due at `due_ms`, routed to `route` at `now_ms`, goes, with its
    /// share of `bytes`. Near (within the hold horizon), the timer holds it if the budget has room
    /// now; otherwise its slice takes it.
    ///
    /// A record only the timer can take waits for room among the timer's holds, except while the
    /// publish gate holds records: those hold their shares until the ingest watermarks pass them,
    /// and the watermarks wait for ingest to read on, so waiting for holds then could wait for
    /// ever (a burst with ids due at once, larger than the budget, behind an ingest backlog).
    /// Then the record goes to the next slice window whose sweep is still ahead instead, like a
    /// record routed there: a slice write takes only the part of the budget that sends free as
    /// the broker acknowledges them, whatever the gate does. It arrives late (once that window is
    /// swept), never early, and never wrong.
    pub(crate) async fn place(
        &self,
        due_ms: i64,
        now_ms: i64,
        route: Route,
        bytes: usize,
    ) -> (Route, Share) {
        match route {
            Route::Slice(id) => {
                if due_ms.saturating_sub(now_ms) <= self.settings.hold_ms {
                    if let Some(share) = self.budget.try_reserve_hold(bytes) {
                        return (Route::Timer, share);
                    }
                }
                (Route::Slice(id), self.budget.reserve(bytes).await)
            }
            Route::Timer => {
                let mut held = self.gate_held.clone();
                tokio::select! {
                    biased;
                    share = self.budget.reserve_hold(bytes) => (Route::Timer, share),
                    Ok(()) = async { held.wait_for(Option::is_some).await.map(|_| ()) } => {
                        let now = self.clock.now_ms();
                        match self.next_open_slice(now) {
                            Some(id) => (Route::Slice(id), self.budget.reserve(bytes).await),
                            None => (Route::Timer, self.budget.reserve_hold(bytes).await),
                        }
                    }
                }
            }
        }
    }

    /// The first slice window the ladder routes to at `now_ms` (the finest whose sweep is still
    /// ahead), for a record that cannot wait in the timer.
    fn next_open_slice(&self, now_ms: i64) -> Option<SliceId> {
        let ladder = &self.settings.ladder;
        let step = ladder.width(1).max(1);
        (1..=4 * ladder.slots()).find_map(|k| {
            match ladder.route(now_ms.saturating_add(k.saturating_mul(step)), now_ms) {
                Route::Slice(id) => Some(id),
                Route::Timer => None,
            }
        })
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
        self.send_within(out, then, ticket, sweep, permit).await;
    }

    /// Sends a record that is not a scheduled copy, held in `permit` until the broker has
    /// answered.
    async fn send_within(
        &self,
        out: Outgoing,
        then: Then,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
        permit: Share,
    ) {
        self.outbox
            .send(Send {
                out,
                then,
                scheduled: None,
                ticket,
                sweep,
                slice_write: None,
                next: None,
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
                        next: None,
                        _permit: permit,
                    })
                    .await;
            }
        }
    }
}
