//! The db-scheduler baseline: scheduled messages as rows of a MySQL table, polled and published
//! to Kafka. Built the way a careful engineer would (an index on the due time, `SKIP LOCKED`
//! for several pollers, marks only after the broker's acknowledgement), so that comparing it with
//! the Kafka scheduler is fair. The messenger feeds it through [`store::Store::insert`].

pub mod config;
pub mod poller;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::FutureProducer;
use scheduler::domain::InternalTopics;
use scheduler::{Clock, SystemClock};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use store::{NewMessage, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach MySQL at {url}: {source}")]
    Connect {
        url: scheduler::secret::SecretUrl,
        source: sqlx::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
struct Api {
    store: Store,
    prometheus: PrometheusHandle,
}

/// A running db-scheduler.
pub struct DbScheduler {
    pub http_addr: SocketAddr,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl DbScheduler {
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<DbScheduler, Error> {
        let prometheus = scheduler::metrics::install();
        let store = Store::connect(config.mysql_url.expose()).await?;
        let producer: FutureProducer =
            scheduler::kafka::producer_config(&config.bootstrap_servers, &config.kafka_properties)
                .create()?;
        let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
        let http_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let poller = poller::Poller {
            store: store.clone(),
            producer,
            clock,
            interval: config.poll_interval,
            batch: config.batch_size,
            internal: InternalTopics {
                ingest: "SCHEDULED_MESSAGES".into(),
                dlq: "SCHEDULED_MESSAGES.DLQ".into(),
                state: "SCHEDULED_MESSAGES.STATE".into(),
                slice_prefix: "__SM_SLICE".into(),
            },
        };
        tasks.spawn(poller.run(stop.clone()));
        let app = Router::new()
            .route(
                "/healthz",
                get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/metrics", get(render_metrics))
            .route("/api/status", get(status))
            .with_state(Api { store, prometheus });
        let http_stop = stop.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tasks.close();
        tracing::info!(%http_addr, interval = ?config.poll_interval, "db-scheduler started");
        Ok(DbScheduler {
            http_addr,
            stop,
            tasks,
        })
    }

    /// Stops polling (a poll in progress finishes and commits) and the HTTP API.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

async fn render_metrics(State(api): State<Api>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.prometheus.render(),
    )
}

async fn status(State(api): State<Api>) -> impl IntoResponse {
    match api.store.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Runs with the system clock until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let s = DbScheduler::start(config, Arc::new(SystemClock)).await?;
    shutdown.await;
    s.stop().await;
    Ok(())
}
