//! The workload's producer: paces the run's messages, sends each to the scheduler's ingest topic
//! (and, at the same moment, to the MySQL baseline), and records them in the audit. Sends are
//! enqueued without waiting: acknowledgements are awaited concurrently, and a transient failure
//! is retried with backoff, so a large run is never slowed to one round trip per message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use db_scheduler::{NewMessage, Store};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use scheduler::domain::header;
use tokio::sync::mpsc;

use crate::audit::{AuditOp, AuditSink};
use crate::batch::{batches, retry_until_ok};
use crate::config::{Connections, Experiment};
use crate::live::Live;
use crate::sms::{self, Scheduled};
use crate::{metric, now_ms, Error, Path};
use backon::Retryable;

/// What producing a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Produced {
    pub sent: u64,
    pub failed: u64,
    /// The latest due time of the run.
    pub last_due_ms: i64,
}

/// Test hooks: leave message `n` out of the Kafka path while still auditing it (it must then be
/// reported missing).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub skip_kafka: Vec<u64>,
}

pub(crate) struct Workload<'a> {
    pub conn: &'a Connections,
    pub producer: &'a FutureProducer,
    pub audit: &'a AuditSink,
    pub live: &'a Live,
    pub progress: &'a AtomicU64,
}

/// Sends one record, retrying failures with backoff and jitter (5 tries in all).
async fn send_with_retry(
    producer: FutureProducer,
    topic: String,
    m: Arc<Scheduled>,
) -> Result<(), KafkaError> {
    let tries =
        scheduler::outbox::backoff_builder(Duration::from_millis(100), Duration::from_secs(5))
            .with_max_times(4);
    (|| send_once(&producer, &topic, &m))
        .retry(tries)
        .notify(
            |e, retry_in| tracing::warn!(error = %e, id = %m.sms.id, ?retry_in, "produce failed"),
        )
        .await
}

/// Sends one record and awaits its acknowledgement, waiting while the producer's queue is full.
async fn send_once(
    producer: &FutureProducer,
    topic: &str,
    m: &Scheduled,
) -> Result<(), KafkaError> {
    let value = m.value();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: header::TIME,
            value: Some(m.time_header.as_bytes()),
        })
        .insert(Header {
            key: header::TOPIC,
            value: Some(m.sms_topic.as_bytes()),
        })
        .insert(Header {
            key: header::ID,
            value: Some(m.sms.id.as_bytes()),
        });
    let mut record = FutureRecord::to(topic)
        .key(m.key())
        .payload(&value)
        .headers(headers);
    let queued = loop {
        match producer.send_result(record) {
            Ok(f) => break f,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err((e, _)) => return Err(e),
        }
    };
    match queued.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Inserts the MySQL path's messages in batches (up to 500, or every 100 ms).
fn spawn_mysql_writer(
    store: Store,
) -> (
    mpsc::UnboundedSender<NewMessage>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<NewMessage>();
    let task = tokio::spawn(async move {
        let batches = batches(rx, 500, Duration::from_millis(100));
        tokio::pin!(batches);
        while let Some(batch) = batches.next().await {
            retry_until_ok("MySQL insert", || store.insert(&batch)).await;
        }
        Ok(())
    });
    (tx, task)
}

impl Workload<'_> {
    /// Produces every message of the run at the experiment's rate.
    pub async fn produce(
        &self,
        run_id: &str,
        exp: &Experiment,
        faults: &Faults,
    ) -> Result<Produced, Error> {
        let rate = exp.rate();
        let (min_ms, max_ms) = (
            exp.min_delay.as_millis() as i64,
            exp.max_delay.as_millis() as i64,
        );
        let mut rng = StdRng::from_os_rng();
        let mysql = if exp.mysql {
            Some(spawn_mysql_writer(
                Store::connect(&self.conn.mysql_url).await?,
            ))
        } else {
            None
        };
        let mut pending = FuturesUnordered::new();
        let mut out = Produced::default();
        let start = tokio::time::Instant::now();
        for n in 0..exp.count {
            let at = start + Duration::from_secs_f64(n as f64 / rate);
            // Wait for this message's slot, taking in acknowledgements meanwhile.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => break,
                    Some(r) = pending.next(), if !pending.is_empty() => self.acknowledged(run_id, r, &mut out),
                }
            }
            let now = now_ms();
            let mut m = sms::message(&mut rng, run_id, n, now, min_ms, max_ms, exp.value_size);
            m.sms_topic = self.conn.sms_topic.clone();
            let m = Arc::new(m);
            out.last_due_ms = out.last_due_ms.max(m.due.as_millis());
            for path in exp.paths() {
                self.audit.send(AuditOp::Produced {
                    run_id: run_id.to_string(),
                    id: m.sms.id.clone(),
                    path,
                    due_ms: m.due.as_millis(),
                    produced_ms: now,
                });
                self.live.sent(run_id, path);
                metrics::counter!(metric::SENT, "path" => path.as_str()).increment(1);
            }
            if exp.kafka && !faults.skip_kafka.contains(&n) {
                let (producer, topic, m2) = (
                    self.producer.clone(),
                    self.conn.ingest_topic.clone(),
                    m.clone(),
                );
                pending.push(async move {
                    (
                        m2.sms.id.clone(),
                        send_with_retry(producer, topic, m2).await,
                    )
                });
            }
            if let Some((tx, _)) = &mysql {
                let _ = tx.send(NewMessage {
                    id: m.sms.id.clone(),
                    topic: self.conn.sms_topic.clone(),
                    key: Some(m.key().to_vec()),
                    value: Some(m.value()),
                    headers: Vec::new(),
                    due: m.due,
                });
            }
            self.progress.fetch_add(1, Ordering::Relaxed);
            while pending.len() > 50_000 {
                if let Some(r) = pending.next().await {
                    self.acknowledged(run_id, r, &mut out);
                }
            }
        }
        while let Some(r) = pending.next().await {
            self.acknowledged(run_id, r, &mut out);
        }
        if let Some((tx, task)) = mysql {
            drop(tx);
            task.await
                .map_err(|e| Error::Unreachable(e.to_string()))??;
        }
        Ok(out)
    }

    fn acknowledged(
        &self,
        run_id: &str,
        (id, result): (String, Result<(), KafkaError>),
        out: &mut Produced,
    ) {
        match result {
            Ok(()) => out.sent += 1,
            Err(e) => {
                out.failed += 1;
                tracing::error!(%id, error = %e, "could not produce after retries");
                self.audit.send(AuditOp::ProduceFailed {
                    run_id: run_id.to_string(),
                    id,
                    path: Path::Kafka,
                    error: e.to_string(),
                });
            }
        }
    }
}
