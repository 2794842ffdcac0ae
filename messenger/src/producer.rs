//! The workload's producer: paces the run's messages, sends each to the scheduler's ingest topic
//! (and, at the same moment, to the MySQL baseline), and records them in the audit. Sends are
//! enqueued without waiting: acknowledgements are awaited concurrently, and a transient failure
//! is retried with backoff, so a large run is never slowed to one round trip per message.
//!
//! A share of the messages is changed right after it is scheduled, on every path: cancelled
//! (over Kafka or over the scheduler's HTTP API, alternately; a row update in MySQL) or
//! rescheduled to a new time with a new revision of its value. The report then checks that no
//! cancelled message and no old revision of a rescheduled one arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use db_scheduler::{NewMessage, Store};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use scheduler::domain::header;
use scheduler::secret::SecretUrl;
use tokio::sync::mpsc;

use crate::audit::{AuditOp, AuditSink};
use crate::batch::{batches, retry_until_ok};
use crate::config::{Connections, Experiment};
use crate::live::Live;
use crate::sms::{self, Scheduled};
use crate::{metric, now_ms, Error, Path};
use backon::Retryable;

/// A message is changed only if it is due at least this long after the change: the scheduler
/// guarantees a change durable `--cancel-lead` (1 s) before the due time, and a change sent over
/// Kafka adds the ingest lag; 3 s leaves room for both on a loaded machine.
pub const CHANGE_LEAD: Duration = Duration::from_secs(3);

/// What the workload does to a message after scheduling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Cancel,
    Reschedule,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Cancel => "cancelled",
            Change::Reschedule => "rescheduled",
        }
    }
}

/// The change for a message due at `due_ms`, produced at `now_ms`: drawn by the experiment's
/// shares, for messages due far enough ahead.
fn draw_change(rng: &mut StdRng, exp: &Experiment, now_ms: i64, due_ms: i64) -> Option<Change> {
    if due_ms - now_ms < CHANGE_LEAD.as_millis() as i64 {
        return None;
    }
    let u: f64 = rng.random();
    if u < exp.cancel_share {
        Some(Change::Cancel)
    } else if u < exp.cancel_share + exp.reschedule_share {
        Some(Change::Reschedule)
    } else {
        None
    }
}

/// An operation of the MySQL path, applied in order: a change never overtakes its insert.
enum MysqlOp {
    Insert(NewMessage),
    Cancel(String),
    Reschedule(NewMessage),
}

/// A send (or an HTTP cancel) on its way: the message's id and how it ended.
type Ack =
    std::pin::Pin<Box<dyn std::future::Future<Output = (String, Result<(), String>)> + Send>>;

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

/// The retries of one send: 5 tries in all, with backoff and jitter.
fn tries() -> backon::ExponentialBuilder {
    scheduler::retry::backoff_builder(Duration::from_millis(100), Duration::from_secs(5))
        .with_max_times(4)
}

/// Sends one record (`cancel`: the cancel of its id instead), retrying failures.
async fn send_with_retry(
    producer: FutureProducer,
    topic: String,
    m: Arc<Scheduled>,
    cancel: bool,
) -> Result<(), String> {
    (|| send_once(&producer, &topic, &m, cancel))
        .retry(tries())
        .notify(
            |e, retry_in| tracing::warn!(error = %e, id = %m.sms.id, ?retry_in, "produce failed"),
        )
        .await
        .map_err(|e| e.to_string())
}

/// Cancels a message over the scheduler's HTTP API, retrying failures.
async fn cancel_over_http(
    client: reqwest::Client,
    base: SecretUrl,
    id: String,
) -> Result<(), String> {
    let url = SecretUrl::new(format!(
        "{}/api/schedules/{id}",
        base.expose().trim_end_matches('/')
    ));
    (|| async {
        let r = client
            .delete(url.expose())
            .send()
            .await
            .map_err(|e| format!("DELETE {url}: {}", e.without_url()))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("DELETE {url}: {}", r.status()))
        }
    })
    .retry(tries())
    .notify(|e, retry_in| tracing::warn!(error = %e, ?retry_in, "cancel failed"))
    .await
}

/// Sends one record and awaits its acknowledgement, waiting while the producer's queue is full.
/// A cancel is the message's key and id with `cancel: true`: what an ordinary client sends.
async fn send_once(
    producer: &FutureProducer,
    topic: &str,
    m: &Scheduled,
    cancel: bool,
) -> Result<(), KafkaError> {
    let value = if cancel { Vec::new() } else { m.value() };
    let headers = OwnedHeaders::new().insert(Header {
        key: header::ID,
        value: Some(m.sms.id.as_bytes()),
    });
    let headers = if cancel {
        headers.insert(Header {
            key: scheduler::domain::CANCEL,
            value: Some("true"),
        })
    } else {
        headers
            .insert(Header {
                key: header::TIME,
                value: Some(m.time_header.as_bytes()),
            })
            .insert(Header {
                key: header::TOPIC,
                value: Some(m.sms_topic.as_bytes()),
            })
    };
    let mut record = FutureRecord::to(topic)
        .key(m.key())
        .payload(&value)
        .headers(headers)
        .timestamp(m.record_timestamp(cancel));
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
    // An acknowledgement without an offset is no proof of the write: sent again
    // (scheduler::kafka::confirmed).
    match queued.await {
        Ok(result) => scheduler::kafka::confirmed(result.map_err(|(e, _)| e)).map(|_| ()),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Applies the MySQL path's operations in batches (up to 500, or every 100 ms): a batch's
/// inserts, then its cancels and reschedules, so a change always follows its insert.
fn spawn_mysql_writer(
    store: Store,
) -> (
    mpsc::UnboundedSender<MysqlOp>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<MysqlOp>();
    let task = tokio::spawn(async move {
        let batches = batches(rx, 500, Duration::from_millis(100));
        tokio::pin!(batches);
        while let Some(batch) = batches.next().await {
            let mut inserts = Vec::new();
            let mut cancels = Vec::new();
            let mut moves = Vec::new();
            for op in batch {
                match op {
                    MysqlOp::Insert(m) => inserts.push(m),
                    MysqlOp::Cancel(id) => cancels.push(id),
                    MysqlOp::Reschedule(m) => moves.push(m),
                }
            }
            retry_until_ok("MySQL insert", || store.insert(&inserts)).await;
            let ids: Vec<&str> = cancels.iter().map(String::as_str).collect();
            retry_until_ok("MySQL cancel", || store.cancel(&ids)).await;
            for m in &moves {
                retry_until_ok("MySQL reschedule", || store.reschedule(m)).await;
            }
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
                Store::connect(self.conn.mysql_url.expose()).await?,
            ))
        } else {
            None
        };
        let client = reqwest::Client::new();
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
            let to_kafka = exp.kafka && !faults.skip_kafka.contains(&n);
            if to_kafka {
                pending.push(self.kafka_send(m.clone(), false));
            }
            let row = |m: &Scheduled| NewMessage {
                id: m.sms.id.clone(),
                topic: self.conn.sms_topic.clone(),
                key: Some(m.key().to_vec()),
                value: Some(m.value()),
                headers: Vec::new(),
                due: m.due,
            };
            if let Some((tx, _)) = &mysql {
                let _ = tx.send(MysqlOp::Insert(row(&m)));
            }
            let change = draw_change(&mut rng, exp, now, m.due.as_millis());
            if let Some(change) = change {
                for path in exp.paths() {
                    self.live.changed(run_id, &m.sms.id, path, change);
                }
            }
            match change {
                None => {}
                Some(Change::Cancel) => {
                    self.audit_change(run_id, exp, &m.sms.id, Change::Cancel, None);
                    if to_kafka {
                        let id = m.sms.id.clone();
                        let ack: Ack = if n % 2 == 0 {
                            self.kafka_send(m.clone(), true)
                        } else {
                            let (client, base) = (client.clone(), self.conn.scheduler_url.clone());
                            Box::pin(async move {
                                let id2 = id.clone();
                                (id, cancel_over_http(client, base, id2).await)
                            })
                        };
                        pending.push(ack);
                    }
                    if let Some((tx, _)) = &mysql {
                        let _ = tx.send(MysqlOp::Cancel(m.sms.id.clone()));
                    }
                }
                Some(Change::Reschedule) => {
                    let earliest = min_ms.max(CHANGE_LEAD.as_millis() as i64);
                    let delay = rng.random_range(earliest..=max_ms.max(earliest));
                    let (time_header, due) = sms::format_time(now + delay, n as usize + 1);
                    let mut sms = m.sms.clone();
                    sms.revision = 2;
                    let moved = Arc::new(Scheduled {
                        sms,
                        time_header,
                        due,
                        sms_topic: m.sms_topic.clone(),
                        // Made after the version it replaces: ranks above it (see version_ms).
                        version_ms: m.version_ms + 1,
                    });
                    out.last_due_ms = out.last_due_ms.max(due.as_millis());
                    let new_due = Some(due.as_millis());
                    self.audit_change(run_id, exp, &m.sms.id, Change::Reschedule, new_due);
                    if to_kafka {
                        pending.push(self.kafka_send(moved.clone(), false));
                    }
                    if let Some((tx, _)) = &mysql {
                        let _ = tx.send(MysqlOp::Reschedule(row(&moved)));
                    }
                }
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

    /// Sends a message (or, with `cancel`, the cancel of its id) to the scheduler's ingest topic.
    fn kafka_send(&self, m: Arc<Scheduled>, cancel: bool) -> Ack {
        let (producer, topic) = (self.producer.clone(), self.conn.ingest_topic.clone());
        Box::pin(async move {
            let id = m.sms.id.clone();
            (id, send_with_retry(producer, topic, m, cancel).await)
        })
    }

    /// Records a change of `id` in the audit, for every path of the run.
    fn audit_change(
        &self,
        run_id: &str,
        exp: &Experiment,
        id: &str,
        change: Change,
        new_due_ms: Option<i64>,
    ) {
        for path in exp.paths() {
            self.audit.send(AuditOp::Changed {
                run_id: run_id.to_string(),
                id: id.to_string(),
                path,
                change: change.as_str(),
                new_due_ms,
            });
        }
    }

    fn acknowledged(
        &self,
        run_id: &str,
        (id, result): (String, Result<(), String>),
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
                    error: e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scheduler::testkit::{bootstrap, collect, create_topic, reader, unique};

    /// The scheduler orders the versions of an id by record timestamp, then partition and
    /// offset. A send retried after the cancel of its id was acknowledged must stay older than
    /// the cancel; with the producer's own timestamps the retry, sent last, came out newest and
    /// brought the cancelled version back. (Against the stack's broker.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_retried_after_its_cancel_stays_older_than_the_cancel() {
        let topic = unique("versions");
        create_topic(&topic, 1).await;
        let producer: FutureProducer = scheduler::kafka::producer_config(&bootstrap(), &[])
            .create()
            .expect("a producer");
        let mut rng = StdRng::seed_from_u64(7);
        let m = sms::message(&mut rng, "run", 1, now_ms(), 60_000, 60_000, 10);
        send_once(&producer, &topic, &m, false).await.expect("sent");
        send_once(&producer, &topic, &m, true)
            .await
            .expect("cancel sent");
        // The retry comes after the cancel's timestamp: a fresh timestamp would rank above it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while now_ms() <= m.record_timestamp(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock did not move"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send_once(&producer, &topic, &m, false)
            .await
            .expect("retry sent");
        let got = collect(&reader(&topic, 1), Duration::from_secs(30), |r| {
            r.len() >= 3
        })
        .await;
        assert_eq!(got.len(), 3, "the three sends");
        let newest = got
            .iter()
            .max_by_key(|r| (r.timestamp_ms, r.partition, r.offset))
            .expect("records");
        assert_eq!(
            newest.header(scheduler::domain::CANCEL).as_deref(),
            Some("true"),
            "the newest version is the cancel: {:?}",
            got.iter()
                .map(|r| (
                    r.timestamp_ms,
                    r.offset,
                    r.header(scheduler::domain::CANCEL)
                ))
                .collect::<Vec<_>>()
        );
    }
}
