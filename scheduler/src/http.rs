//! The HTTP API (axum): the job queue, the workers, the job log, the configuration, health and
//! Prometheus metrics, which show this process's view; and the schedules by id
//! (`GET`/`DELETE /api/schedules/{id}`), whose state is in Kafka.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use tokio::sync::watch;

use rdkafka::producer::FutureProducer;

use crate::config::Settings;
use crate::jobs::Board;
use crate::state::Ids;
use crate::status::{Health, Status};
use crate::time::Clock;

/// What the API reads; it holds no engine object.
#[derive(Clone)]
pub(crate) struct Api {
    /// The engine's status snapshot: read without any engine lock.
    pub status: watch::Receiver<Status>,
    /// The job board (display data behind its own short lock).
    pub board: Arc<Board>,
    /// The index of ids, for the schedules by id.
    pub ids: Ids,
    /// Writes a cancel's fact.
    pub producer: FutureProducer,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    /// Positions of the slice topics, for the load ahead.
    pub lookup: Arc<crate::kafka::Lookup>,
    pub prometheus: PrometheusHandle,
}

pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/api/jq", get(job_queue))
        .route("/api/wq", get(worker_queue))
        .route("/api/job_log", get(job_log))
        .route("/api/config", get(config))
        .route(
            "/api/schedules/{id}",
            get(schedule_status).delete(cancel_schedule),
        )
        .route("/api/upcoming", get(upcoming))
        .route("/config", get(config))
        .route("/healthz", get(health))
        .route("/metrics", get(prometheus))
        .with_state(api)
}

async fn job_queue(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "job_queue": api.board.queue() }))
}

async fn worker_queue(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "worker_queue": api.board.workers() }))
}

async fn job_log(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "job_log": api.board.log() }))
}

async fn config(State(api): State<Api>) -> impl IntoResponse {
    Json(api.settings.view())
}

/// 200 while `ok` or `degraded` (the process works, perhaps late), 503 once `failed` or
/// `stopping`, so a load balancer or an orchestrator's probe can tell.
async fn health(State(api): State<Api>) -> impl IntoResponse {
    let status = api.status.borrow().clone();
    let code = match status.status {
        Health::Ok | Health::Degraded => StatusCode::OK,
        Health::Failed | Health::Stopping => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(status))
}

/// `?minutes=N` of `/api/upcoming` (60 by default, at most a week).
#[derive(serde::Deserialize)]
struct Ahead {
    minutes: Option<u32>,
}

/// The load ahead: records due in each slice window that begins within `minutes` (from the slice
/// topics' offsets, [`crate::upcoming`]), what the timer holds, and their total.
async fn upcoming(
    State(api): State<Api>,
    axum::extract::Query(ahead): axum::extract::Query<Ahead>,
) -> impl IntoResponse {
    let minutes = ahead.minutes.unwrap_or(60).clamp(1, 7 * 24 * 60);
    let now = api.clock.now_ms();
    let counted =
        crate::upcoming::count(api.settings.clone(), api.lookup.clone(), now, minutes).await;
    let windows = match counted {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("the broker did not answer: {e}") })),
            )
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": e.to_string() })),
            )
        }
    };
    let status = api.status.borrow().clone();
    let in_slices: u64 = windows.iter().map(|w| w.records).sum();
    if minutes >= 60 {
        crate::upcoming::record_next_hour(&windows, now, status.timer_pending);
    }
    let slices: Vec<serde_json::Value> = windows
        .iter()
        .map(|w| {
            json!({
                "from": rfc3339(w.from_ms),
                "to": rfc3339(w.to_ms),
                "level": w.level,
                "topic": w.topic,
                "records": w.records,
                "open_ended": w.open_ended,
            })
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({
            "now": rfc3339(now),
            "minutes": minutes,
            "timer": { "records": status.timer_pending, "next_due": status.next_due },
            "slices": slices,
            "total": in_slices + status.timer_pending as u64,
        })),
    )
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// An id as the ingest topic accepts it: UTF-8 of 1 to 256 bytes.
fn valid_id(id: &str) -> Result<(), (StatusCode, Json<serde_json::Value>)> {
    if id.is_empty() || id.len() > 256 {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "an id is UTF-8 of 1 to 256 bytes" })),
        ));
    }
    Ok(())
}

/// The status of a schedule by id, as this process's index knows it: `pending` (with `due`),
/// `delivered`, `cancelled`, or `unknown` (404). `fresh_as_of` says up to when the index is
/// known to hold every fact.
async fn schedule_status(State(api): State<Api>, Path(id): Path<String>) -> impl IntoResponse {
    if let Err(e) = valid_id(&id) {
        return e;
    }
    let fresh = api.ids.fresh_as_of();
    let status = match api.ids.status(&id) {
        Ok(status) => status,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "id": id, "error": e.to_string() })),
            )
        }
    };
    match status {
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "id": id, "status": "unknown", "fresh_as_of": rfc3339(fresh) })),
        ),
        Some(s) => (
            StatusCode::OK,
            Json(json!({
                "id": id,
                "status": s.status,
                "due": s.due_ms.and_then(rfc3339),
                "recurrence": s.recurrence,
                "version": s.version.encode(),
                "fresh_as_of": rfc3339(fresh),
            })),
        ),
    }
}

/// Cancels every version of `id` known or scheduled before now: writes a `cancelled` fact and
/// answers once the broker acknowledged it, with the status before and the earliest due time
/// from which the cancel is guaranteed (the acknowledgement's time + the cancel lead). An unknown
/// id may be cancelled too: a schedule produced later (a newer version) wins again.
async fn cancel_schedule(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> (StatusCode, Json<serde_json::Value>) {
    if let Err(e) = valid_id(&id) {
        return e;
    }
    let before = api
        .ids
        .status(&id)
        .ok()
        .flatten()
        .map_or("unknown", |s| s.status);
    let now = api.clock.now_ms();
    let version = crate::facts::Version {
        timestamp_ms: now,
        partition: crate::facts::Version::HTTP,
        offset: i64::from(rand::random::<u32>()),
    };
    let out = api.ids.record(&id, version, &crate::facts::Fact::Cancelled);
    let sent = api
        .producer
        .send(
            crate::kafka::record(&out),
            std::time::Duration::from_secs(10),
        )
        .await;
    if let Err((e, _)) = sent {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "id": id, "error": format!("the cancel was not acknowledged: {e}") })),
        );
    }
    // The guarantee counts from when the cancel is durable: now, after the acknowledgement.
    let acknowledged = api.clock.now_ms();
    metrics::counter!(crate::metrics::CANCELS, "via" => "http").increment(1);
    (
        StatusCode::OK,
        Json(json!({
            "id": id,
            "status": "cancelled",
            "previous": before,
            "version": version.encode(),
            "honoured_if_due_after":
                rfc3339(acknowledged.saturating_add(api.settings.cancel_lead_ms())),
        })),
    )
}

async fn prometheus(State(api): State<Api>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.prometheus.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::Mock;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A clock that moves a second at every reading, so a reading after the broker's
    /// acknowledgement shows as later than one before the send.
    struct Moving(AtomicI64);

    impl Clock for Moving {
        fn now_ms(&self) -> i64 {
            self.0.fetch_add(1_000, Ordering::SeqCst)
        }
    }

    /// The guarantee counts from when the cancel is durable: the broker's acknowledgement, not
    /// the request's arrival.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_is_honoured_from_its_acknowledgement_on() {
        let mock = Mock::new("http-cancel");
        let api = Api {
            status: watch::channel(Status::default()).1,
            board: Arc::new(Board::default()),
            ids: mock.ids.clone(),
            producer: mock.producer(),
            settings: mock.settings.clone(),
            clock: Arc::new(Moving(AtomicI64::new(1_800_000_000_000))),
            lookup: Arc::new(crate::kafka::Lookup::new(&mock.settings).expect("a lookup client")),
            prometheus: crate::metrics::install(),
        };
        let lead = api.settings.cancel_lead_ms();
        let (code, Json(body)) = cancel_schedule(State(api), Path("x".into())).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let version = crate::facts::Version::decode(body["version"].as_str().unwrap()).unwrap();
        let honoured =
            chrono::DateTime::parse_from_rfc3339(body["honoured_if_due_after"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
        assert!(
            honoured > version.timestamp_ms + lead,
            "honoured from {honoured}, the request's time {} + the lead {lead}: {body}",
            version.timestamp_ms
        );
    }
}
