//! The messenger: the SMS simulation that drives and judges the system (seed 000). It produces
//! scheduled SMS to the Kafka scheduler and, with the same id, due time, key and value, to the
//! MySQL baseline; its senders consume what is delivered, time each arrival on the consumer's
//! clock and report their totals; every message and its arrivals are audited in MongoDB, from which
//! the report (sent, received, missing, duplicates, early, lateness percentiles) is computed.
//!
//! Data path: [`Messenger::run_experiment`] → `producer` (workload) → scheduler / db-scheduler →
//! `senders` (arrival, lateness, status) → `audit` (MongoDB) → [`report::Report`].

pub mod audit;
mod batch;
pub mod config;
mod http;
pub mod live;
pub mod producer;
pub mod report;
pub mod senders;
pub mod sms;

use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};
use scheduler::kafka::TopicSpec;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Connections, Experiment};
pub use producer::Faults;
pub use report::Report;

/// Metric names.
pub mod metric {
    /// Histogram: consumer's clock at arrival minus due time, seconds, label `path`.
    pub const ARRIVAL_LATENESS: &str = "sm_arrival_lateness_seconds";
    /// Counter: messages sent, label `path`.
    pub const SENT: &str = "sm_messenger_sent_total";
    /// Counter: copies received by senders, label `path`.
    pub const RECEIVED: &str = "sm_messenger_received_total";
    /// Gauge: duplicates in the last report, label `path`.
    pub const DUPLICATES: &str = "sm_messenger_duplicates";
    /// Gauge: missing messages in the last report, label `path`.
    pub const MISSING: &str = "sm_messenger_missing";
}

/// Which scheduler delivered a copy: the baseline labels its copies `sm-path: mysql`, the Kafka
/// scheduler's carry no label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    Kafka,
    Mysql,
}

impl Path {
    pub fn as_str(&self) -> &'static str {
        match self {
            Path::Kafka => "kafka",
            Path::Mysql => "mysql",
        }
    }
}

impl FromStr for Path {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "kafka" => Ok(Path::Kafka),
            "mysql" => Ok(Path::Mysql),
            _ => Err(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("mysql: {0}")]
    Mysql(#[from] db_scheduler::Error),
    #[error("experiment: {0}")]
    Experiment(#[from] config::ExperimentError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no run to report on")]
    NoRun,
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The running messenger: audit writer, senders, status consumer; experiments run on top.
pub struct Messenger {
    pub conn: Connections,
    pub experiment: Experiment,
    audit: audit::Audit,
    sink: audit::AuditSink,
    pub live: Arc<live::Live>,
    producer: FutureProducer,
    stop: CancellationToken,
    tasks: TaskTracker,
    writer: tokio::task::JoinHandle<()>,
    /// Messages produced so far by the current run (for progress views).
    pub progress: Arc<AtomicU64>,
}

impl Messenger {
    /// Connects (failing clearly if Kafka or MongoDB cannot be reached), creates the SMS topic
    /// with one partition per sender, and starts the senders.
    pub async fn start(conn: Connections, experiment: Experiment) -> Result<Messenger, Error> {
        let producer: FutureProducer =
            scheduler::kafka::producer_config(&conn.bootstrap_servers, &conn.kafka_properties)
                .create()?;
        let probe = producer.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
                .map(|_| ())
        })
        .await
        .map_err(|e| Error::Unreachable(e.to_string()))?
        .map_err(|e| Error::Unreachable(format!("Kafka at {}: {e}", conn.bootstrap_servers)))?;
        let topics = [
            TopicSpec::new(&conn.sms_topic, conn.senders.max(1) as i32),
            TopicSpec::new(&conn.status_topic, 1),
        ];
        let config =
            scheduler::kafka::client_config(&conn.bootstrap_servers, &conn.kafka_properties);
        tokio::time::timeout(
            Duration::from_secs(45),
            scheduler::kafka::create_topics(config, &topics, 1),
        )
        .await
        .map_err(|_| Error::Unreachable(format!("Kafka at {}", conn.bootstrap_servers)))?
        .map_err(|e| Error::Unreachable(format!("Kafka: creating the SMS topics: {e}")))?;
        let audit =
            audit::Audit::connect(conn.mongodb_uri.expose(), &conn.mongodb_database).await?;
        let (sink, writer) = audit::spawn_writer(audit.clone());
        let live = Arc::new(live::Live::default());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        senders::spawn(
            &conn,
            producer.clone(),
            sink.clone(),
            live.clone(),
            stop.clone(),
            &tasks,
        )?;
        Ok(Messenger {
            conn,
            experiment,
            audit,
            sink,
            live,
            producer,
            stop,
            tasks,
            writer,
            progress: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Runs an experiment to the end: produce every message, wait until all have arrived on
    /// every path (or until the last due time plus the grace period), then report from the audit.
    pub async fn run_experiment(&self, exp: &Experiment, faults: &Faults) -> Result<Report, Error> {
        let (tx, _) = tokio::sync::oneshot::channel();
        self.run_experiment_announced(exp, faults, tx).await
    }

    /// As [`Messenger::run_experiment`], telling `started` the run's id once it has begun.
    pub async fn run_experiment_announced(
        &self,
        exp: &Experiment,
        faults: &Faults,
        started: tokio::sync::oneshot::Sender<String>,
    ) -> Result<Report, Error> {
        exp.validate()?;
        self.live.runs.begin();
        let result = self.run_to_report(exp, faults, started).await;
        self.live.runs.end();
        result
    }

    async fn run_to_report(
        &self,
        exp: &Experiment,
        faults: &Faults,
        started: tokio::sync::oneshot::Sender<String>,
    ) -> Result<Report, Error> {
        let run_id = format!("run{}", chrono::Utc::now().format("%Y%m%d%H%M%S%3f"));
        self.audit
            .start_run(
                &run_id,
                &serde_json::to_value(exp).unwrap_or_default(),
                now_ms(),
            )
            .await?;
        self.live.start_run(&run_id, exp.count);
        self.progress.store(0, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%run_id, count = exp.count, rate = exp.rate(), "experiment started");
        let _ = started.send(run_id.clone());
        let workload = producer::Workload {
            conn: &self.conn,
            producer: &self.producer,
            audit: &self.sink,
            live: &self.live,
            progress: &self.progress,
        };
        let produced = workload.produce(&run_id, exp, faults).await?;
        let deadline_ms = produced.last_due_ms + exp.grace.as_millis() as i64;
        let paths = exp.paths();
        while !self.live.complete(&run_id, &paths) && now_ms() < deadline_ms {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Late duplicates arrive within moments of the originals: wait until arrivals are quiet.
        self.arrivals_quiet(
            &run_id,
            Duration::from_secs(1) + self.conn.processing_time * 2,
        )
        .await;
        self.finish(&run_id).await
    }

    /// Writes everything pending to the audit and computes the run's report.
    async fn finish(&self, run_id: &str) -> Result<Report, Error> {
        self.tasks_settle().await;
        self.sink.flush().await;
        let report = self.report(Some(run_id)).await?;
        self.audit
            .finish_run(
                run_id,
                &serde_json::to_value(&report).unwrap_or_default(),
                now_ms(),
            )
            .await?;
        for p in &report.paths {
            metrics::gauge!(metric::MISSING, "path" => p.path.clone()).set(p.missing as f64);
            metrics::gauge!(metric::DUPLICATES, "path" => p.path.clone()).set(p.duplicates as f64);
        }
        self.live.finish_run(run_id);
        tracing::info!(%run_id, ok = report.ok(), "experiment finished");
        Ok(report)
    }

    /// Waits until no copy of the run has arrived for `quiet` (at most 30 s in all).
    async fn arrivals_quiet(&self, run_id: &str, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut seen = self.live.arrivals(run_id);
        let mut since = tokio::time::Instant::now();
        while since.elapsed() < quiet && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now_seen = self.live.arrivals(run_id);
            if now_seen != seen {
                (seen, since) = (now_seen, tokio::time::Instant::now());
            }
        }
    }

    /// Waits until the simulated sends under way have handed their audit records to the writer
    /// (each takes the processing time), so that the flush includes them.
    async fn tasks_settle(&self) {
        let deadline =
            tokio::time::Instant::now() + self.conn.processing_time + Duration::from_secs(10);
        while self.live.sends.now() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The report of a run (the latest when `None`), from the audit store.
    pub async fn report(&self, run_id: Option<&str>) -> Result<Report, Error> {
        report(&self.audit, run_id).await
    }

    /// Stops the senders and the audit writer, after writing what is pending.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.sink.flush().await;
        drop(self.sink);
        let _ = self.writer.await;
    }
}

/// The report of a run from the audit store alone (for `messenger report`).
pub async fn report(audit: &audit::Audit, run_id: Option<&str>) -> Result<Report, Error> {
    let run_id = match run_id {
        Some(id) => id.to_string(),
        None => audit.latest_run().await?.ok_or(Error::NoRun)?,
    };
    Ok(Report::from_rows(&run_id, &audit.rows(&run_id).await?))
}

/// Serves the HTTP API and the live page on the configured address until `shutdown`.
pub async fn serve(
    messenger: Arc<Messenger>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(messenger.conn.http_addr).await?;
    http::serve(listener, messenger, shutdown).await
}

/// Serves on a listener the caller bound (port 0 in tests).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    messenger: Arc<Messenger>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    http::serve(listener, messenger, shutdown).await
}
