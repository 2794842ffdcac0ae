//! The `scheduled_messages` table: the one place that writes SQL for it. The messenger inserts
//! through [`Store::insert`], the poller claims and marks rows through [`Store::claim_due`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime};
use scheduler::domain::Header;
use scheduler::DueTime;
use serde::Serialize;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, QueryBuilder, Row, Transaction};

use crate::Error;

/// A message to schedule through the table: the same fields as a record sent to the Kafka
/// scheduler, so both paths get the same work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: String,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub due: DueTime,
}

/// A due row, claimed (locked) by one poller's transaction.
#[derive(Debug, Clone)]
pub struct DueRow {
    pub id: String,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The headers, or why they could not be decoded.
    pub headers: Result<Vec<Header>, String>,
    pub due_ms: i64,
}

/// What `GET /api/status` shows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    pub pending: i64,
    pub delivered: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub oldest_undelivered_due: Option<String>,
}

fn to_naive(ms: i64) -> NaiveDateTime {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .naive_utc()
}

fn encode_headers(headers: &[Header]) -> String {
    let list: Vec<(&str, Option<String>)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_ref().map(|v| B64.encode(v))))
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
}

fn decode_headers(text: &str) -> Result<Vec<Header>, String> {
    let list: Vec<(String, Option<String>)> =
        serde_json::from_str(text).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    list.into_iter()
        .map(|(k, v)| {
            let v = v
                .map(|v| B64.decode(v).map_err(|e| format!("header {k}: {e}")))
                .transpose()?;
            Ok((k, v))
        })
        .collect()
}

/// The table, behind a connection pool. Times are stored as UTC `DATETIME(6)`.
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
}

impl Store {
    /// Connects and applies the migrations (idempotent). A failed connection's error names the
    /// server by its URL, without the password.
    pub async fn connect(url: &str) -> Result<Store, Error> {
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .connect(url)
            .await
            .map_err(|source| Error::Connect {
                url: url.into(),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// Inserts messages in one statement; an id already present is left as it was, so a
    /// resubmitted batch is harmless.
    pub async fn insert(&self, messages: &[NewMessage]) -> Result<(), Error> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut q: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO scheduled_messages (id, topic, msg_key, msg_value, headers, due_at) ",
        );
        q.push_values(messages, |mut b, m| {
            b.push_bind(&m.id)
                .push_bind(&m.topic)
                .push_bind(m.key.as_deref())
                .push_bind(m.value.as_deref())
                .push_bind(encode_headers(&m.headers))
                .push_bind(to_naive(m.due.as_millis()));
        });
        q.push(" ON DUPLICATE KEY UPDATE id = id");
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    /// Cancels pending rows. A row a poller has claimed is locked until its transaction ends:
    /// the cancel waits for it, then finds it delivered and changes nothing. Returns the rows
    /// cancelled.
    pub async fn cancel(&self, ids: &[&str]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut q: QueryBuilder<MySql> = QueryBuilder::new(
            "UPDATE scheduled_messages SET status = 'cancelled' WHERE status = 'pending' AND id IN ",
        );
        q.push_tuples(ids, |mut b, id| {
            b.push_bind(*id);
        });
        Ok(q.build().execute(&self.pool).await?.rows_affected())
    }

    /// Reschedules a pending row: a new due time, key and value. False when the row is no
    /// longer pending (delivered meanwhile) or unknown.
    pub async fn reschedule(&self, m: &NewMessage) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE scheduled_messages SET topic = ?, msg_key = ?, msg_value = ?, headers = ?, \
             due_at = ? WHERE id = ? AND status = 'pending'",
        )
        .bind(&m.topic)
        .bind(m.key.as_deref())
        .bind(m.value.as_deref())
        .bind(encode_headers(&m.headers))
        .bind(to_naive(m.due.as_millis()))
        .bind(&m.id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Opens a transaction and locks up to `limit` pending rows due at `now_ms`, in due order.
    /// `SKIP LOCKED` lets several pollers work the table without ever taking the same row.
    pub async fn claim_due(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<(Transaction<'static, MySql>, Vec<DueRow>), Error> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, topic, msg_key, msg_value, headers, due_at FROM scheduled_messages \
             WHERE status = 'pending' AND due_at <= ? ORDER BY due_at, id LIMIT ? \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(to_naive(now_ms))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let rows = rows
            .into_iter()
            .map(|r| {
                let due: NaiveDateTime = r.try_get("due_at")?;
                let headers: String = r.try_get("headers")?;
                Ok(DueRow {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("msg_key")?,
                    value: r.try_get("msg_value")?,
                    headers: decode_headers(&headers),
                    due_ms: due.and_utc().timestamp_millis(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((tx, rows))
    }

    /// Marks rows delivered (after the broker acknowledged them).
    pub async fn mark_delivered(
        tx: &mut Transaction<'static, MySql>,
        ids: &[&str],
        now_ms: i64,
    ) -> Result<(), Error> {
        Self::mark(tx, ids, "delivered", now_ms, None).await
    }

    /// Marks rows failed for good, with the reason; they are never retried.
    pub async fn mark_failed(
        tx: &mut Transaction<'static, MySql>,
        ids: &[&str],
        now_ms: i64,
        reason: &str,
    ) -> Result<(), Error> {
        Self::mark(tx, ids, "failed", now_ms, Some(reason)).await
    }

    /// Counts a failed attempt on rows left pending (a transient broker error).
    pub async fn mark_retry(
        tx: &mut Transaction<'static, MySql>,
        ids: &[&str],
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut q: QueryBuilder<MySql> =
            QueryBuilder::new("UPDATE scheduled_messages SET attempts = attempts + 1 WHERE id IN ");
        q.push_tuples(ids, |mut b, id| {
            b.push_bind(*id);
        });
        q.build().execute(&mut **tx).await?;
        Ok(())
    }

    async fn mark(
        tx: &mut Transaction<'static, MySql>,
        ids: &[&str],
        status: &str,
        now_ms: i64,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut q: QueryBuilder<MySql> =
            QueryBuilder::new("UPDATE scheduled_messages SET status = ");
        q.push_bind(status)
            .push(", delivered_at = ")
            .push_bind((status == "delivered").then(|| to_naive(now_ms)))
            .push(", attempts = attempts + 1, error = ")
            .push_bind(reason.map(|r| r.chars().take(1000).collect::<String>()))
            .push(" WHERE id IN ");
        q.push_tuples(ids, |mut b, id| {
            b.push_bind(*id);
        });
        q.build().execute(&mut **tx).await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<Status, Error> {
        let row = sqlx::query(
            "SELECT \
               CAST(COALESCE(SUM(status = 'pending'), 0) AS SIGNED) AS pending, \
               CAST(COALESCE(SUM(status = 'delivered'), 0) AS SIGNED) AS delivered, \
               CAST(COALESCE(SUM(status = 'failed'), 0) AS SIGNED) AS failed, \
               CAST(COALESCE(SUM(status = 'cancelled'), 0) AS SIGNED) AS cancelled, \
               MIN(CASE WHEN status = 'pending' THEN due_at END) AS oldest \
             FROM scheduled_messages",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<NaiveDateTime> = row.try_get("oldest")?;
        Ok(Status {
            pending: row.try_get("pending")?,
            delivered: row.try_get("delivered")?,
            failed: row.try_get("failed")?,
            cancelled: row.try_get("cancelled")?,
            oldest_undelivered_due: oldest
                .map(|d| scheduler::time::format_millis(d.and_utc().timestamp_millis())),
        })
    }

    /// The status and error of one row (for tests and operators).
    pub async fn row_status(
        &self,
        id: &str,
    ) -> Result<Option<(String, Option<String>, i32)>, Error> {
        let row =
            sqlx::query("SELECT status, error, attempts FROM scheduled_messages WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok((
                r.try_get("status")?,
                r.try_get("error")?,
                r.try_get("attempts")?,
            ))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_any_bytes() {
        let headers = vec![
            ("a".to_string(), Some(vec![0, 255, 10])),
            ("b".to_string(), None),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)), Ok(headers));
        assert!(decode_headers("not json").is_err());
        assert!(decode_headers(r#"[["a","%%%"]]"#).is_err());
    }
}
