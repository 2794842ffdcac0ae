//! The SMS senders (seed 000): N consumers in one group on the SMS topic. Each arrival is timed
//! the moment it is read (the consumer's clock, before any simulated work), then "sent"
//! concurrently with the configured processing time and success rate, and the sender's totals
//! are published to the status topic. A status consumer keeps the live totals.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use scheduler::domain::header;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditOp, AuditSink};
use crate::config::Connections;
use crate::live::{Live, SenderStatus};
use crate::{metric, now_ms, Error, Path};

/// A delivered copy as a sender reads it.
struct Arrival {
    run_id: String,
    id: String,
    path: Path,
    due_ms: i64,
    received_ms: i64,
    /// The SMS's `revision` (1 when absent).
    revision: u32,
}

fn arrival(msg: &rdkafka::message::BorrowedMessage<'_>, received_ms: i64) -> Option<Arrival> {
    let headers = msg.headers()?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(String::from)
    };
    let id = get(header::SM_ID)?;
    let run_id = id.rsplit_once('-')?.0.to_string();
    let revision = msg
        .payload()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .and_then(|v| v["revision"].as_u64())
        .map_or(1, |r| r as u32);
    Some(Arrival {
        revision,
        // The baseline labels its copies `sm-path: mysql`; the scheduler's carry no label (see
        // `header::SM_PATH`), so an unlabelled copy came through Kafka.
        path: get(header::SM_PATH)
            .map_or(Ok(Path::Kafka), |p| p.parse())
            .ok()?,
        due_ms: get(header::SM_DUE_MS)?.parse().ok()?,
        run_id,
        id,
        received_ms,
    })
}

pub(crate) fn consumer(
    conn: &Connections,
    group: &str,
    offset_reset: &str,
) -> Result<StreamConsumer, Error> {
    let mut c = scheduler::kafka::client_config(&conn.bootstrap_servers, &conn.kafka_properties);
    // The user's properties (TLS, SASL) first; these the senders need whatever they say.
    c.set("group.id", group)
        .set("auto.offset.reset", offset_reset)
        .set("session.timeout.ms", "10000");
    Ok(c.create()?)
}

/// Starts the senders and the status consumer under `tasks`, until `stop`.
pub fn spawn(
    conn: &Connections,
    producer: FutureProducer,
    audit: AuditSink,
    live: Arc<Live>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), Error> {
    for n in 0..conn.senders {
        let consumer = consumer(conn, &conn.senders_group, "earliest")?;
        consumer.subscribe(&[conn.sms_topic.as_str()])?;
        let sender = Sender {
            id: format!("sender_{n}"),
            conn: conn.clone(),
            producer: producer.clone(),
            audit: audit.clone(),
            live: live.clone(),
            totals: Arc::new(Mutex::new(SenderStatus {
                sender_id: format!("sender_{n}"),
                ..Default::default()
            })),
            sends: tasks.clone(),
        };
        tasks.spawn(sender.run(consumer, stop.clone()));
    }
    // Status updates: a fresh group that starts at the end, so it shows this process's senders.
    let status = consumer(
        conn,
        &format!(
            "{}-monitor-{}-{}",
            conn.senders_group,
            std::process::id(),
            now_ms()
        ),
        "latest",
    )?;
    status.subscribe(&[conn.status_topic.as_str()])?;
    tasks.spawn(async move {
        loop {
            let msg = tokio::select! {
                m = status.recv() => m,
                _ = stop.cancelled() => return,
            };
            match msg {
                Ok(m) => match m.payload().map(serde_json::from_slice::<SenderStatus>) {
                    Some(Ok(s)) => live.sender_status(s),
                    _ => tracing::warn!("unreadable status update"),
                },
                Err(e) => tracing::warn!(error = %e, "status consumer"),
            }
        }
    });
    Ok(())
}

struct Sender {
    id: String,
    conn: Connections,
    producer: FutureProducer,
    audit: AuditSink,
    live: Arc<Live>,
    totals: Arc<Mutex<SenderStatus>>,
    sends: TaskTracker,
}

impl Sender {
    async fn run(self, consumer: StreamConsumer, stop: CancellationToken) {
        let mut rng = StdRng::from_os_rng();
        loop {
            let msg = tokio::select! {
                m = consumer.recv() => m,
                _ = stop.cancelled() => return,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(sender = %self.id, error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let received_ms = now_ms();
            let Some(a) = arrival(&msg, received_ms) else {
                tracing::warn!(sender = %self.id, "a record without sm-id/sm-due-ms, or with an unknown sm-path; ignored");
                continue;
            };
            drop(msg);
            let lateness_ms = a.received_ms - a.due_ms;
            metrics::histogram!(metric::ARRIVAL_LATENESS, "path" => a.path.as_str())
                .record(lateness_ms as f64 / 1000.0);
            metrics::counter!(metric::RECEIVED, "path" => a.path.as_str()).increment(1);
            self.live
                .arrived(&a.run_id, &a.id, a.path, a.received_ms, lateness_ms);
            let ok = rng.random_bool(self.conn.success_rate.clamp(0.0, 1.0));
            self.live.sends.begin();
            self.sends.spawn(self.send(a, ok));
        }
    }

    /// Simulates sending the SMS, then reports the totals and records the arrival in the audit.
    fn send(&self, a: Arrival, ok: bool) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (processing, totals, producer, audit) = (
            self.conn.processing_time,
            self.totals.clone(),
            self.producer.clone(),
            self.audit.clone(),
        );
        let (status_topic, sender) = (self.conn.status_topic.clone(), self.id.clone());
        let live = self.live.clone();
        async move {
            tokio::time::sleep(processing).await;
            let status = {
                let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    t.success_count += 1;
                } else {
                    t.failed_count += 1;
                }
                t.total_processing_time += processing.as_secs_f64();
                t.clone()
            };
            let payload = serde_json::to_vec(&status).unwrap_or_default();
            let record = FutureRecord::to(&status_topic)
                .key(sender.as_bytes())
                .payload(&payload);
            if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
                tracing::warn!(error = %e, "status update not published");
            }
            live.handled(&a.run_id, &a.id, a.path, ok);
            audit.send(AuditOp::Received {
                run_id: a.run_id,
                id: a.id,
                path: a.path,
                due_ms: a.due_ms,
                received_ms: a.received_ms,
                sender,
                sent_ok: ok,
                revision: a.revision,
            });
            live.sends.end();
        }
    }
}
