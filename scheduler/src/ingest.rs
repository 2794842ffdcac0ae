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

use rdkafka::consumer::StreamConsumer;

use crate::domain::{Incoming, Ingested};
use crate::facts::Fact;
use crate::kafka::{self, EngineContext};
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::Offsets;
use crate::outbox::weight;
use crate::router::Router;
use crate::slice::Route;

/// The ingest stage: the group's consumer and what it routes with.
pub(crate) struct Ingest {
    pub consumer: Arc<StreamConsumer<EngineContext>>,
    /// Told "begun" for each record read.
    pub offsets: Offsets,
    pub router: Arc<Router>,
    pub life: Arc<Lifecycle>,
}

impl Ingest {
    pub(crate) async fn run(self) {
        loop {
            let rec = tokio::select! {
                _ = self.life.intake().cancelled() => break,
                msg = self.consumer.recv() => match msg {
                    Ok(msg) => kafka::detach(&msg),
                    Err(e) => {
                        if let Some(reason) = kafka::fatal_consumer_error(&e) {
                            return self.life.fail(reason);
                        }
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if rec.topic == self.router.settings.internal.ingest {
                self.ingest(rec).await;
            }
            // Slice partitions are paused in this consumer: a record of one is a fetch that was
            // in flight at the pause. The sweep reads it.
        }
    }

    /// A record from the ingest topic: accepted and routed, or dead-lettered with its reason.
    async fn ingest(&self, rec: Incoming) {
        let Some(ticket) = self.offsets.begin(&rec.topic, rec.partition, rec.offset) else {
            tracing::debug!(source = %rec.source(), "a record of a partition not assigned here: left to its owner");
            return;
        };
        tracing::trace!(source = %rec.source(), "ingested");
        let r = &*self.router;
        let internal = &r.settings.internal;
        match Ingested::parse(&rec, r.settings.config.default_tz, internal) {
            Err(why) => {
                tracing::warn!(source = %rec.source(), reason = why.code(), detail = %why, "dead-lettering");
                r.dead_letter_original(&rec, &why, ticket, None).await;
            }
            Ok(Ingested::Cancel { id, version }) => {
                metrics::counter!(m::CANCELS, "via" => "kafka").increment(1);
                r.write_fact(&id, version, Fact::Cancelled, ticket).await;
            }
            Ok(Ingested::Schedule(s)) => {
                if let Some(version) = s.version {
                    // The id's newest version is this one: its fact supersedes older copies
                    // wherever they are. The ingest offset waits for the fact and the copy.
                    let pending = Fact::Pending {
                        due_ms: s.due.as_millis(),
                        target: s.target.as_str().to_string(),
                    };
                    let also = self.offsets.also(&ticket);
                    if let Some(fact_ticket) = also {
                        r.write_fact(&s.id, version, pending, fact_ticket).await;
                    }
                }
                r.per_record.scheduled.increment(1);
                let now = r.clock.now_ms();
                let due = s.due.as_millis();
                if due <= now {
                    r.per_record.past_due.increment(1);
                }
                let mut route = r.next_place(due, now);
                let mut permit = None;
                if due.saturating_sub(now) <= r.settings.hold_ms {
                    if let Route::Slice(_) = route {
                        // Near: hold it in memory and deliver it in one hop, if the budget has
                        // room now; otherwise the slice takes it, as further records.
                        permit = r.budget.try_reserve_hold(weight(&s));
                        if permit.is_some() {
                            route = Route::Timer;
                        }
                    }
                }
                r.forward(s, route, ticket, None, permit).await;
            }
        }
    }
}
