//! The poller: every interval, claim the due rows, publish them, and mark them delivered only
//! after the broker acknowledged them, all in one transaction. A crash between the publish and the
//! commit rolls the marks back, so a row can be delivered twice but never zero times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use scheduler::domain::{header, InternalTopics, Outgoing};
use scheduler::kafka;
use scheduler::metrics as m;
use scheduler::outbox::{fate, Destination, Fate};
use scheduler::Clock;
use tokio_util::sync::CancellationToken;

use crate::store::{DueRow, Store};
use crate::Error;

/// Poll duration, seconds.
pub const POLL_DURATION: &str = "sm_db_poll_duration_seconds";
/// Rows claimed per poll.
pub const BATCH_SIZE: &str = "sm_db_batch_size";
/// Rows found due by the last poll.
pub const ROWS_DUE: &str = "sm_db_rows_due";
/// Rows marked failed, label `reason`.
pub const FAILED: &str = "sm_db_failed_total";

/// What one poll did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    pub claimed: usize,
    pub delivered: usize,
    pub failed: usize,
    pub retried: usize,
}

pub struct Poller {
    pub store: Store,
    pub producer: FutureProducer,
    pub clock: Arc<dyn Clock>,
    pub interval: Duration,
    pub batch: i64,
    pub internal: InternalTopics,
}

enum Verdict {
    Delivered,
    Failed(String, &'static str),
    Retry,
}

impl Poller {
    /// The published copy: the stored key, value and headers, plus `sm-id`, `sm-due-ms` and
    /// `sm-path=mysql`, partitioned by key like any producer would.
    fn outgoing(row: &DueRow, headers: &[scheduler::domain::Header]) -> Outgoing {
        let mut headers = headers.to_vec();
        headers.push((header::SM_ID.into(), Some(row.id.clone().into_bytes())));
        headers.push((
            header::SM_DUE_MS.into(),
            Some(row.due_ms.to_string().into_bytes()),
        ));
        headers.push((header::SM_PATH.into(), Some(b"mysql".to_vec())));
        Outgoing {
            topic: row.topic.clone(),
            key: row.key.clone(),
            payload: row.value.clone(),
            headers,
            ..Default::default()
        }
    }

    /// Publishes one row and waits for the acknowledgement.
    async fn publish(&self, row: &DueRow) -> Verdict {
        let headers = match &row.headers {
            Ok(h) => h,
            Err(e) => return Verdict::Failed(e.clone(), "corrupt-row"),
        };
        if let Err(why) = self.internal.target(&row.topic) {
            return Verdict::Failed(why.to_string(), why.code());
        }
        let out = Self::outgoing(row, headers);
        let delivery = loop {
            match self.producer.send_result(kafka::record(&out)) {
                Ok(fut) => break fut,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err((e, _)) => return self.verdict(&e, row),
            }
        };
        // An acknowledgement without an offset is no proof of the write: the row stays pending
        // (scheduler::kafka::confirmed).
        match delivery
            .await
            .map(|r| scheduler::kafka::confirmed(r.map_err(|(e, _)| e)))
        {
            Ok(Ok(_)) => {
                let late = (self.clock.now_ms() - row.due_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(m::LATENESS, "path" => "mysql").record(late);
                metrics::counter!(m::DELIVERED, "path" => "mysql").increment(1);
                Verdict::Delivered
            }
            Ok(Err(e)) => self.verdict(&e, row),
            Err(_) => Verdict::Retry,
        }
    }

    /// The scheduler's own table of send errors decides, so both paths treat a failure alike.
    fn verdict(&self, e: &KafkaError, row: &DueRow) -> Verdict {
        match fate(e, Destination::Target, &row.topic) {
            Fate::DeadLetter(why) => Verdict::Failed(why.to_string(), why.code()),
            other => {
                tracing::warn!(id = %row.id, error = %e, ?other, "publish failed; the row stays pending");
                Verdict::Retry
            }
        }
    }

    /// One poll: claim, publish (all at once, so the batch costs one round trip, not one per
    /// row), mark, commit.
    pub async fn poll_once(&self) -> Result<PollOutcome, Error> {
        let started = Instant::now();
        let (mut tx, rows) = self
            .store
            .claim_due(self.clock.now_ms(), self.batch)
            .await?;
        metrics::gauge!(ROWS_DUE).set(rows.len() as f64);
        metrics::histogram!(BATCH_SIZE).record(rows.len() as f64);
        // The futures are created (and the records enqueued) in due order.
        let verdicts = join_all(rows.iter().map(|r| self.publish(r))).await;
        let now = self.clock.now_ms();
        let mut outcome = PollOutcome {
            claimed: rows.len(),
            ..Default::default()
        };
        let mut delivered = Vec::new();
        let mut retry = Vec::new();
        for (row, verdict) in rows.iter().zip(verdicts) {
            match verdict {
                Verdict::Delivered => delivered.push(row.id.as_str()),
                Verdict::Retry => retry.push(row.id.as_str()),
                Verdict::Failed(reason, code) => {
                    tracing::warn!(id = %row.id, %reason, "row failed for good");
                    metrics::counter!(FAILED, "reason" => code).increment(1);
                    Store::mark_failed(&mut tx, &[row.id.as_str()], now, &reason).await?;
                    outcome.failed += 1;
                }
            }
        }
        Store::mark_delivered(&mut tx, &delivered, now).await?;
        Store::mark_retry(&mut tx, &retry).await?;
        tx.commit().await?;
        outcome.delivered = delivered.len();
        outcome.retried = retry.len();
        metrics::histogram!(POLL_DURATION).record(started.elapsed().as_secs_f64());
        Ok(outcome)
    }

    /// Polls every `interval` until `stop`; a full batch is followed by another poll at once, so
    /// a backlog drains at the table's speed, not one batch per interval.
    pub async fn run(self, stop: CancellationToken) {
        let failing =
            || scheduler::retry::backoff(Duration::from_millis(100), Duration::from_secs(5));
        let mut delays = failing();
        loop {
            let started = tokio::time::Instant::now();
            let next = match self.poll_once().await {
                Ok(o) if o.claimed as i64 >= self.batch && o.retried == 0 => started,
                Ok(o) => {
                    delays = failing();
                    if o.retried > 0 {
                        // Rows whose publish failed wait at least 100 ms before the next try.
                        started + self.interval.max(Duration::from_millis(100))
                    } else {
                        started + self.interval
                    }
                }
                Err(e) => {
                    let retry_in = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, ?retry_in, "poll failed");
                    started + retry_in
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
