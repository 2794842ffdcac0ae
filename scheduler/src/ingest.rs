//! Ingest: the group's consumer reads the ingest topic; each record is parsed once and handed to
//! its next place.
//!
//! Receives records from the ingest topic (the slice partitions are assigned to the same consumer
//! but stay paused: the sweep readers read them). Sends a record due within the hold horizon to
//! the timer (one hop: its ingest offset waits for the delivery), one due further out to the
//! finest slice window that can hold it ([`crate::slice::Ladder::route`]), and a record it cannot
//! schedule to the DLQ with the reason. Every record's share of the memory budget is taken here or in the sweeps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::domain::{dlq_original, Incoming, Ingested, Rejection, Scheduled};
use crate::engine::{Shared, TimerEntry};
use crate::facts::{Fact, Version};
use crate::kafka::{self, lock};
use crate::metrics as m;
use crate::offsets::Ticket;
use crate::outbox::{in_memory, weight, Send, Then};
use crate::slice::Route;
use crate::sweep::ActiveSweep;
use crate::timer::TimerCmd;

impl Shared {
    pub(crate) async fn consume(self: Arc<Self>) {
        loop {
            let rec = tokio::select! {
                _ = self.intake.cancelled() => break,
                msg = self.consumer.recv() => match msg {
                    Ok(msg) => kafka::detach(&msg),
                    Err(e) => {
                        if let Some(reason) = kafka::fatal_consumer_error(&e) {
                            return self.fail(reason);
                        }
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if rec.topic == self.settings.internal.ingest {
                self.ingest(rec).await;
            }
            // Slice partitions are paused in this consumer: a record of one is a fetch that was
            // in flight at the pause. The sweep reads it.
        }
    }

    /// A record from the ingest topic: accepted and routed, or dead-lettered with its reason.
    async fn ingest(self: &Arc<Self>, rec: Incoming) {
        let Some(ticket) = lock(&self.tracker).begin(&rec.topic, rec.partition, rec.offset) else {
            tracing::debug!(source = %rec.source(), "a record of a partition not assigned here: left to its owner");
            return;
        };
        tracing::trace!(source = %rec.source(), "ingested");
        let internal = &self.settings.internal;
        match Ingested::parse(&rec, self.settings.config.default_tz, internal) {
            Err(why) => {
                tracing::warn!(source = %rec.source(), reason = why.code(), detail = %why, "dead-lettering");
                self.dead_letter_original(&rec, &why, ticket, None).await;
            }
            Ok(Ingested::Cancel { id, version }) => {
                metrics::counter!(m::CANCELS, "via" => "kafka").increment(1);
                self.write_fact(&id, version, Fact::Cancelled, ticket).await;
            }
            Ok(Ingested::Schedule(s)) => {
                if let Some(version) = s.version {
                    // The id's newest version is this one: its fact supersedes older copies
                    // wherever they are. The ingest offset waits for the fact and the copy.
                    let pending = Fact::Pending {
                        due_ms: s.due.as_millis(),
                        target: s.target.as_str().to_string(),
                    };
                    let also = lock(&self.tracker).also(&ticket);
                    if let Some(fact_ticket) = also {
                        self.write_fact(&s.id, version, pending, fact_ticket).await;
                    }
                }
                self.per_record.scheduled.increment(1);
                let now = self.clock.now_ms();
                let due = s.due.as_millis();
                if due <= now {
                    self.per_record.past_due.increment(1);
                }
                let mut route = self.next_place(due, now);
                let mut permit = None;
                if due - now <= self.settings.hold_ms {
                    if let Route::Slice(_) = route {
                        // Near: hold it in memory and deliver it in one hop, if the budget has
                        // room now; otherwise the slice takes it, as further records.
                        permit = self.budget.try_reserve(weight(&s));
                        if permit.is_some() {
                            route = Route::Timer;
                        }
                    }
                }
                self.forward(s, route, ticket, None, permit).await;
            }
        }
    }

    /// Where a record due at `due_ms` goes next at `now_ms`: the ladder's route, the finest slice
    /// window of level 1 or up that can hold it, else the timer. Never level 0 (the ladder does not
    /// route there; this match keeps it so): a record due within a level-1 window whose sweep has
    /// begun would only cost one more produce and fetch there; the timer holds it instead, and its
    /// source offset waits for its delivery.
    pub(crate) fn next_place(&self, due_ms: i64, now_ms: i64) -> Route {
        match self.ladder().route(due_ms, now_ms) {
            Route::Slice(id) if id.level > 0 => Route::Slice(id),
            _ => Route::Timer,
        }
    }

    /// Writes a fact of an id to the state topic; `ticket` is finished once it is acknowledged.
    pub(crate) async fn write_fact(
        self: &Arc<Self>,
        id: &str,
        version: Version,
        fact: Fact,
        ticket: Ticket,
    ) {
        let out = self.fact_record(id, version, &fact);
        let size = out.key.as_ref().map_or(0, Vec::len) + out.payload.as_ref().map_or(0, Vec::len);
        let permit = self.budget.reserve(in_memory(size)).await;
        self.send(Send {
            out,
            then: Then::Fact {
                fact: fact.status(),
            },
            scheduled: None,
            ticket,
            sweep: None,
            slice_write: None,
            _permit: permit,
        })
        .await;
    }

    /// Sends the record as it was read to the DLQ with the reason.
    pub(crate) async fn dead_letter_original(
        self: &Arc<Self>,
        rec: &Incoming,
        why: &Rejection,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
    ) {
        let out = dlq_original(rec, &self.settings.internal.dlq, why);
        // Its headers too: a DLQ copy carries all of the original's, which may be most of it.
        let permit = self.budget.reserve(in_memory(rec.size())).await;
        self.send(Send {
            out,
            then: Then::DeadLetter { reason: why.code() },
            scheduled: None,
            ticket,
            sweep,
            slice_write: None,
            _permit: permit,
        })
        .await;
    }

    /// Hands an accepted record to its next place, within the memory budget (waiting for room;
    /// `permit` when the caller already holds the record's share).
    pub(crate) async fn forward(
        self: &Arc<Self>,
        s: Scheduled,
        route: Route,
        ticket: Ticket,
        sweep: Option<Arc<ActiveSweep>>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let permit = match permit {
            Some(p) => p,
            None => self.budget.reserve(weight(&s)).await,
        };
        match route {
            Route::Timer => {
                if s.version.is_some() {
                    self.id_due_at(s.due.as_millis());
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
                    sweep.placed(crate::sweep::Placed::Timer);
                }
            }
            Route::Slice(id) => {
                let mut s = s;
                let topic = self.slice_topic(id);
                let out = s.lend_body(|s| s.to_slice(topic));
                self.send(Send {
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
