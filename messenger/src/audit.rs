//! The audit store in MongoDB: database `messagescheduler`, collection `messages`, one document
//! per message and path (`_id` = `<id>:<path>`). Writes are upserts batched into one `update`
//! command each, by a task of their own, so the audit never blocks the send path and the order in
//! which "produced" and "received" reach the store does not matter.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::sync::{mpsc, oneshot};

use crate::batch::{batches, retry_until_ok};
use crate::report::AuditRow;
use crate::{Error, Path};
use futures::StreamExt;

/// One fact for the audit.
#[derive(Debug)]
pub enum AuditOp {
    Produced {
        run_id: String,
        id: String,
        path: Path,
        due_ms: i64,
        produced_ms: i64,
    },
    ProduceFailed {
        run_id: String,
        id: String,
        path: Path,
        error: String,
    },
    Received {
        run_id: String,
        id: String,
        path: Path,
        due_ms: i64,
        received_ms: i64,
        sender: String,
        sent_ok: bool,
        /// The value's revision (2: a rescheduled message's new version).
        revision: u32,
    },
    /// The workload cancelled or rescheduled the message after scheduling it.
    Changed {
        run_id: String,
        id: String,
        path: Path,
        /// `cancelled` or `rescheduled`.
        change: &'static str,
        new_due_ms: Option<i64>,
    },
    /// Answers once every op sent before it is written.
    Flush(oneshot::Sender<()>),
}

fn key(id: &str, path: Path) -> String {
    format!("{id}:{}", path.as_str())
}

impl AuditOp {
    /// The upsert statement of the `update` command.
    fn statement(&self) -> Option<Document> {
        let (q, u) = match self {
            AuditOp::Produced {
                run_id,
                id,
                path,
                due_ms,
                produced_ms,
            } => (
                key(id, *path),
                doc! {
                    "$set": { "msg_id": id, "path": path.as_str(), "run_id": run_id,
                              "due_at": DateTime::from_millis(*due_ms), "produced_at": DateTime::from_millis(*produced_ms) },
                    "$setOnInsert": { "deliveries": 0_i64, "status": "pending" },
                },
            ),
            AuditOp::ProduceFailed {
                run_id,
                id,
                path,
                error,
            } => (
                key(id, *path),
                doc! { "$set": { "msg_id": id, "path": path.as_str(), "run_id": run_id, "status": "produce-failed", "error": error } },
            ),
            AuditOp::Received {
                run_id,
                id,
                path,
                due_ms,
                received_ms,
                sender,
                sent_ok,
                revision,
            } => (
                key(id, *path),
                doc! {
                    "$inc": { "deliveries": 1_i64, "sent_ok": i64::from(*sent_ok) },
                    "$addToSet": { "revisions": i64::from(*revision) },
                    "$min": { "received_at": DateTime::from_millis(*received_ms), "lateness_ms": received_ms - due_ms },
                    "$set": { "msg_id": id, "path": path.as_str(), "run_id": run_id, "due_at": DateTime::from_millis(*due_ms),
                              "sender": sender, "status": if *sent_ok { "sent" } else { "failed" } },
                },
            ),
            AuditOp::Changed {
                run_id,
                id,
                path,
                change,
                new_due_ms,
            } => {
                let mut set = doc! { "msg_id": id, "path": path.as_str(), "run_id": run_id, "change": *change };
                if let Some(due) = new_due_ms {
                    set.insert("new_due_at", DateTime::from_millis(*due));
                }
                (key(id, *path), doc! { "$set": set })
            }
            AuditOp::Flush(_) => return None,
        };
        Some(doc! { "q": { "_id": q }, "u": u, "upsert": true })
    }
}

/// The collection, and the `runs` collection that lists experiments.
#[derive(Debug, Clone)]
pub struct Audit {
    db: Database,
    messages: Collection<Document>,
    runs: Collection<Document>,
}

impl Audit {
    pub async fn connect(uri: &str, database: &str) -> Result<Audit, Error> {
        let client = Client::with_uri_str(uri).await?;
        let db = client.database(database);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
            let uri = scheduler::secret::redact_url(uri);
            Error::Unreachable(format!("MongoDB at {uri}: {e}"))
        })?;
        let messages = db.collection::<Document>("messages");
        for field in ["due_at", "received_at", "path", "run_id"] {
            let index = IndexModel::builder()
                .keys(doc! { field: 1 })
                .options(IndexOptions::builder().name(format!("{field}_1")).build())
                .build();
            messages.create_index(index).await?;
        }
        let runs = db.collection::<Document>("runs");
        Ok(Audit { db, messages, runs })
    }

    /// Writes ops as one `update` command of upserts (one round trip for the batch).
    pub async fn write(&self, ops: &[AuditOp]) -> Result<(), Error> {
        let updates: Vec<Document> = ops.iter().filter_map(AuditOp::statement).collect();
        for chunk in updates.chunks(1000) {
            self.db
                .run_command(
                    doc! { "update": "messages", "updates": chunk.to_vec(), "ordered": false },
                )
                .await?;
        }
        Ok(())
    }

    pub async fn start_run(
        &self,
        run_id: &str,
        experiment: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), Error> {
        let exp = mongodb::bson::to_document(experiment).unwrap_or_default();
        self.runs
            .insert_one(doc! { "_id": run_id, "experiment": exp, "started_at": DateTime::from_millis(now_ms) })
            .await?;
        Ok(())
    }

    pub async fn finish_run(
        &self,
        run_id: &str,
        report: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), Error> {
        let report = mongodb::bson::to_document(report).unwrap_or_default();
        self.runs
            .update_one(
                doc! { "_id": run_id },
                doc! { "$set": { "finished_at": DateTime::from_millis(now_ms), "report": report } },
            )
            .await?;
        Ok(())
    }

    /// The most recently started run.
    pub async fn latest_run(&self) -> Result<Option<String>, Error> {
        let mut cursor = self
            .runs
            .find(doc! {})
            .sort(doc! { "started_at": -1 })
            .limit(1)
            .await?;
        Ok(cursor
            .try_next()
            .await?
            .and_then(|d| d.get_str("_id").ok().map(String::from)))
    }

    /// Every audit row of a run.
    pub async fn rows(&self, run_id: &str) -> Result<Vec<AuditRow>, Error> {
        let mut cursor = self
            .messages
            .find(doc! { "run_id": run_id })
            .projection(
                doc! { "path": 1, "deliveries": 1, "lateness_ms": 1, "status": 1, "sent_ok": 1, "change": 1, "revisions": 1 },
            )
            .await?;
        let mut rows = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            let int = |k: &str| {
                d.get_i64(k)
                    .ok()
                    .or_else(|| d.get_i32(k).ok().map(i64::from))
            };
            rows.push(AuditRow {
                path: d.get_str("path").unwrap_or_default().to_string(),
                deliveries: int("deliveries").unwrap_or(0),
                lateness_ms: int("lateness_ms"),
                status: d.get_str("status").unwrap_or("pending").to_string(),
                sent_ok: int("sent_ok").unwrap_or(0),
                change: d.get_str("change").ok().map(String::from),
                old_revision: d.get_array("revisions").is_ok_and(|r| {
                    r.iter()
                        .any(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from)) == Some(1))
                }),
            });
        }
        Ok(rows)
    }
}

/// Where the send path drops audit facts: an unbounded channel, so it never waits on MongoDB.
#[derive(Debug, Clone)]
pub struct AuditSink(mpsc::UnboundedSender<AuditOp>);

impl AuditSink {
    pub fn send(&self, op: AuditOp) {
        if self.0.send(op).is_err() {
            tracing::warn!("audit writer stopped; a fact was not recorded");
        }
    }

    /// Waits until everything sent so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(AuditOp::Flush(tx));
        let _ = rx.await;
    }
}

/// Starts the writer: it batches ops (up to 2,000, or what arrived within 100 ms) and retries a
/// failed batch with backoff, so a slow or restarting MongoDB delays the audit but loses nothing.
pub fn spawn_writer(audit: Audit) -> (AuditSink, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel::<AuditOp>();
    let task = tokio::spawn(async move {
        let batches = batches(rx, 2_000, Duration::from_millis(100));
        tokio::pin!(batches);
        while let Some(batch) = batches.next().await {
            retry_until_ok("audit write", || audit.write(&batch)).await;
            for op in batch {
                if let AuditOp::Flush(done) = op {
                    let _ = done.send(());
                }
            }
        }
    });
    (AuditSink(tx), task)
}
