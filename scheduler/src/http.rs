//! The HTTP API (axum): the job queue, the workers, the job log, the configuration, health and
//! Prometheus metrics. Read-only: it shows this process's view; the state that matters is in Kafka.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use tokio::sync::watch;

use crate::engine::Shared;
use crate::status::{Health, Status};

#[derive(Clone)]
pub(crate) struct Api {
    /// For the job board (display data behind its own short lock) and the settings.
    pub shared: Arc<Shared>,
    /// The engine's status snapshot: read without any engine lock.
    pub status: watch::Receiver<Status>,
    pub prometheus: PrometheusHandle,
}

pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/api/jq", get(job_queue))
        .route("/api/wq", get(worker_queue))
        .route("/api/job_log", get(job_log))
        .route("/api/config", get(config))
        .route("/config", get(config))
        .route("/healthz", get(health))
        .route("/metrics", get(prometheus))
        .with_state(api)
}

async fn job_queue(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "job_queue": api.shared.board.queue() }))
}

async fn worker_queue(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "worker_queue": api.shared.board.workers() }))
}

async fn job_log(State(api): State<Api>) -> impl IntoResponse {
    Json(json!({ "job_log": api.shared.board.log() }))
}

async fn config(State(api): State<Api>) -> impl IntoResponse {
    Json(api.shared.settings.view())
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

async fn prometheus(State(api): State<Api>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.prometheus.render(),
    )
}
