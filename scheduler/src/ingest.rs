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

use rdkafka::consumer::{Consumer, StreamConsumer};

use crate::domain::{Incoming, Ingested};
use crate::facts::Fact;
use crate::kafka::{self, EngineContext};
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::Offsets;
use crate::outbox::weight;
use crate::router::Router;

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
        // The consumer's position is noted between records, on this task (which also serves
        // the rebalances), for the ingest watermarks: it moves past transaction markers and
        // aborted records, which are never handed out.
        let mut positions = tokio::time::interval(crate::watermark::EVERY / 2);
        positions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let rec = tokio::select! {
                _ = self.life.intake().cancelled() => break,
                _ = positions.tick() => {
                    self.note_positions();
                    continue;
                }
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

    /// Notes the consumer's position in each owned ingest partition (see
    /// [`crate::offsets::ReadMarks::position`]).
    fn note_positions(&self) {
        let ingest = &self.router.settings.internal.ingest;
        let owned = self.offsets.partitions_of(ingest);
        if owned.is_empty() {
            return;
        }
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for e in positions.elements_for_topic(ingest) {
            let (p, rdkafka::Offset::Offset(at)) = (e.partition(), e.offset()) else {
                continue;
            };
            if let Some(generation) = self.offsets.generation(ingest, p) {
                self.offsets.read_marks(|m| m.position(p, generation, at));
            }
        }
    }

    /// A record from the ingest topic: accepted and routed, or dead-lettered with its reason.
    async fn ingest(&self, rec: Incoming) {
        if let Some(done) = self
            .offsets
            .skip_done(&rec.topic, rec.partition, rec.offset)
        {
            // Placed by the previous owner's committed transaction (exactly-once): read, and
            // handled for the watermarks; the commit point already passes it.
            self.offsets.read_marks(|m| m.read(&done, false));
            metrics::counter!(m::REPLAY_SKIPPED).increment(1);
            return;
        }
        let Some(ticket) = self.offsets.begin(&rec.topic, rec.partition, rec.offset) else {
            tracing::debug!(source = %rec.source(), "a record of a partition not assigned here: left to its owner");
            return;
        };
        tracing::trace!(source = %rec.source(), "ingested");
        let r = &*self.router;
        let internal = &r.settings.internal;
        let parsed = Ingested::parse(&rec, r.settings.config.default_tz, internal);
        // Read; with a fact on its way, handled (for the ingest watermarks) once it is
        // acknowledged.
        let fact = match &parsed {
            Ok(Ingested::Cancel { .. }) => true,
            Ok(Ingested::Schedule(s)) => s.version.is_some(),
            Err(_) => false,
        };
        self.offsets.read_marks(|m| m.read(&ticket, fact));
        match parsed {
            Err(why) => {
                tracing::warn!(source = %rec.source(), reason = why.code(), detail = %why, "dead-lettering");
                r.dead_letter_original(&rec, &why, ticket, None).await;
            }
            Ok(Ingested::Cancel { id, version }) => {
                metrics::counter!(m::CANCELS, "via" => "kafka").increment(1);
                r.write_fact(&id, version, Fact::Cancelled, ticket).await;
            }
            Ok(Ingested::Schedule(s)) => {
                r.per_record.scheduled.increment(1);
                let now = r.clock.now_ms();
                let due = s.due.as_millis();
                if due <= now {
                    r.per_record.past_due.increment(1);
                }
                // The id's newest version is this one: its fact supersedes older copies wherever
                // they are. The ingest offset waits for the fact and the copy, and one share,
                // sized for both, stays held until the last of them is acknowledged (see
                // `outbox::Share`).
                let fact = s.version.map(|version| {
                    let pending = Fact::Pending {
                        due_ms: due,
                        target: s.target.as_str().to_string(),
                        recurrence: s.recurrence.as_ref().map(|r| r.describe()),
                    };
                    let (out, bytes) = r.fact_record(&s.id, version, &pending);
                    (pending, out, bytes)
                });
                let bytes = weight(&s) + fact.as_ref().map_or(0, |(_, _, b)| *b);
                let (route, permit) = r.place(due, now, r.next_place(due, now), bytes).await;
                if let Some((pending, out, _)) = fact {
                    match self.offsets.also(&ticket) {
                        Some(fact_ticket) => {
                            r.send_fact(out, &pending, fact_ticket, permit.clone())
                                .await
                        }
                        None => self.offsets.read_marks(|m| m.acked(&ticket)),
                    }
                }
                r.forward(s, route, ticket, None, Some(permit)).await;
            }
        }
    }
}
