//! HTTP (axum): start runs, watch them live, read reports.
//!
//! `POST /produce-messages` starts a run (the JSON body overrides the configured experiment) and
//! answers at once with its id; `GET /monitor` and the server-sent events of `GET /events` carry
//! the live figures; `GET /api/report` the audited report; `GET /` the live page.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;

use crate::{Error, Experiment, Faults, Messenger};

#[derive(Clone)]
struct App {
    messenger: Arc<Messenger>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    messenger: Arc<Messenger>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    tracing::info!(addr = %listener.local_addr()?, "messenger http listening");
    axum::serve(listener, router(messenger))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

pub(crate) fn router(messenger: Arc<Messenger>) -> Router {
    let app = App {
        messenger,
        prometheus: scheduler::metrics::install(),
    };
    Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/produce-messages", post(produce))
        .route("/monitor", get(monitor))
        .route("/events", get(events))
        .route("/api/report", get(report))
        .route("/api/upcoming", get(upcoming))
        .route("/metrics", get(render_metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .with_state(app)
}

/// The scheduler's load ahead (`/api/upcoming?minutes=60` at `SM_SCHEDULER_URL`), for the live
/// page's chart of what is due: the page asks its own origin, which the browser allows.
async fn upcoming(State(app): State<App>) -> Response {
    let base = app
        .messenger
        .conn
        .scheduler_url
        .expose()
        .trim_end_matches('/');
    let url = format!("{base}/api/upcoming?minutes=60");
    let asked = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let answer = match asked {
        Ok(r) => {
            let code = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            r.json::<serde_json::Value>().await.map(|body| (code, body))
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok((code, body)) => (code, Json(body)).into_response(),
        // The URL may carry a password: never in the answer.
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("the scheduler did not answer: {}", e.without_url()),
        ),
    }
}

fn error(status: StatusCode, message: impl ToString) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

/// Applies the JSON body's fields over the configured experiment.
fn merged(base: &Experiment, body: &serde_json::Value) -> Result<Experiment, String> {
    let mut value = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if let (Some(v), Some(b)) = (value.as_object_mut(), body.as_object()) {
        for (k, x) in b {
            v.insert(k.clone(), x.clone());
        }
    } else if !body.is_null() {
        return Err("the body must be a JSON object".into());
    }
    let exp: Experiment = serde_json::from_value(value).map_err(|e| e.to_string())?;
    exp.validate().map_err(|e| e.to_string())?;
    Ok(exp)
}

async fn produce(State(app): State<App>, body: Option<Json<serde_json::Value>>) -> Response {
    let body = body.map(|Json(b)| b).unwrap_or(serde_json::Value::Null);
    let exp = match merged(&app.messenger.experiment, &body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let messenger = app.messenger.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let run = messenger
            .run_experiment_announced(&exp, &Faults::default(), tx)
            .await;
        if let Err(e) = run {
            tracing::error!(error = %e, "run failed");
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(run_id)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "run_id": run_id, "count": body.get("count") })),
        )
            .into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the run did not start; see the messenger's log",
        ),
    }
}

async fn monitor(State(app): State<App>) -> impl IntoResponse {
    Json(app.messenger.live.monitor())
}

fn monitor_stream(app: App) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let data = app.messenger.live.monitor().to_string();
            yield Ok(Event::default().event("monitor").data(data));
        }
    }
}

async fn events(State(app): State<App>) -> impl IntoResponse {
    Sse::new(monitor_stream(app)).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
struct ReportQuery {
    run_id: Option<String>,
}

async fn report(State(app): State<App>, Query(q): Query<ReportQuery>) -> Response {
    match app.messenger.report(q.run_id.as_deref()).await {
        Ok(r) => Json(r).into_response(),
        Err(Error::NoRun) => error(StatusCode::NOT_FOUND, "no run yet"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn render_metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_overrides_the_configured_experiment() {
        let base = Experiment {
            count: 7,
            ..Default::default()
        };
        let e = merged(&base, &serde_json::json!({"rate": 50, "max_delay": "5s"})).unwrap();
        assert_eq!(
            (e.count, e.rate(), e.max_delay),
            (7, 50.0, Duration::from_secs(5))
        );
        assert_eq!(merged(&base, &serde_json::Value::Null).unwrap(), base);
        assert!(merged(&base, &serde_json::json!({"count": 0}))
            .unwrap_err()
            .contains("count"));
        assert!(merged(&base, &serde_json::json!([1])).is_err());
    }
}
