//! Scheduled message delivery for Apache Kafka.
//!
//! A record produced to the ingest topic with headers `time` and `topic` waits in Kafka, in
//! time-slice topics ([`slice`]), and is republished to `topic` at `time` by the [`engine`]: never
//! early, at least once, with its key, value and headers. [`run`] is the whole service; the
//! `scheduler` binary only parses [`config::Config`] and calls it.

mod committer;
pub mod config;
pub mod domain;
pub mod engine;
pub mod facts;
mod http;
pub mod index;
mod ingest;
pub mod jobs;
pub mod kafka;
pub mod lanes;
pub mod latency;
pub mod metrics;
pub mod offsets;
pub mod outbox;
mod planner;
pub mod retry;
pub mod slice;
mod state;
pub mod status;
mod sweep;
pub mod targets;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod timer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

pub use config::{Config, Settings};
pub use time::{Clock, DueTime, SystemClock, Zone};

/// Errors that stop the scheduler. Per-record problems never become one of these: they go to the
/// DLQ or are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("could not create topic {0}: {1}")]
    CreateTopic(String, RDKafkaErrorCode),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("fatal: {0}")]
    Fatal(String),
    /// The consumer group fenced this process's static member id (see [`kafka::Fatal::Fenced`]).
    #[error("fenced: {0}")]
    Fenced(String),
    /// A clean stop ran out of time with work left (what, and what stays uncommitted).
    #[error("stopped with work left: {0}")]
    Unfinished(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A running scheduler: its HTTP address, and a way to stop it.
pub struct Scheduler {
    pub http_addr: SocketAddr,
    engine: engine::Engine,
    http: tokio::task::JoinHandle<()>,
    http_stop: tokio_util::sync::CancellationToken,
}

impl Scheduler {
    /// Starts the engine and the HTTP API (bind to port 0 to let the OS pick).
    pub async fn start(settings: Settings, clock: Arc<dyn Clock>) -> Result<Scheduler> {
        let prometheus = metrics::install();
        let listener = tokio::net::TcpListener::bind(settings.config.http_addr).await?;
        let http_addr = listener.local_addr()?;
        let state_dir = settings.state_dir(http_addr.port());
        let engine = engine::Engine::start(settings, clock, &state_dir).await?;
        let app = http::router(http::Api {
            shared: engine.shared.clone(),
            status: engine.status(),
            prometheus,
        });
        let http_stop = tokio_util::sync::CancellationToken::new();
        let stop = http_stop.clone();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(%http_addr, "http api listening");
        Ok(Scheduler {
            http_addr,
            engine,
            http,
            http_stop,
        })
    }

    /// Makes the next `n` sweep attempts fail (test builds only), to drive the retry path.
    #[cfg(feature = "testkit")]
    pub fn fail_next_sweeps(&self, n: usize) {
        self.engine
            .shared
            .injected_sweep_failures
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes every delivery to `topic` fail after `after` (test builds only), as a target whose
    /// partition leader is away would; `None` lets it take records again.
    #[cfg(feature = "testkit")]
    pub fn refuse_target(&self, topic: &str, after: Option<std::time::Duration>) {
        let mut refusals = kafka::lock(&self.engine.shared.injected_refusals);
        match after {
            Some(after) => refusals.insert(topic.to_string(), after),
            None => refusals.remove(topic),
        };
    }

    /// Runs one round of the janitor of ids as if the clock said `now_ms` (test builds only):
    /// the number of facts removed.
    #[cfg(feature = "testkit")]
    pub async fn janitor_round(&self, now_ms: i64) -> usize {
        self.engine.shared.janitor_round(now_ms).await
    }

    /// Waits for `shutdown` (or a fatal error), then stops cleanly.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down"),
            reason = self.engine.failed() => tracing::error!(%reason, "engine stopped"),
        }
        self.stop().await
    }

    /// Stops the engine (in-flight sends finish, safe offsets are committed) and the HTTP API.
    pub async fn stop(self) -> Result<()> {
        let result = self.engine.stop().await;
        self.http_stop.cancel();
        let _ = self.http.await;
        result
    }
}

/// Bounds glibc's malloc to two arenas (unless `MALLOC_ARENA_MAX` says otherwise). glibc gives
/// each thread that allocates an arena of its own, up to eight per core, and the scheduler runs
/// some forty threads, most of them librdkafka's, which allocate buffers that other threads
/// free: every arena kept its own peak. Call it first in `main`, before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; called before other threads run.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Hands the pages of freed memory back to the system (glibc's `malloc_trim`). glibc keeps what a
/// burst of work freed mapped for the next one: after filing a million records at full speed the
/// process stayed at about 60 MiB resident with nothing held, against 20 MiB before. The engine
/// calls it once the process has gone quiet (the committer's `Trimmer` decides when).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): the set-up every binary of the
/// workspace shares.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
}

/// How often a fenced engine may start again with new clients (see [`kafka::Fatal::Fenced`]).
pub const REJOIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether a fenced engine may start again: once per [`REJOIN_WINDOW`]. A fence after a broker
/// restart happens once; two processes that share an instance id fence each other again and
/// again, and the second fence within the window stops this one with the reason.
#[derive(Debug, Default)]
struct RejoinBudget {
    last: Option<std::time::Instant>,
}

impl RejoinBudget {
    fn allow(&mut self, now: std::time::Instant) -> bool {
        let allowed = self
            .last
            .is_none_or(|last| now.duration_since(last) >= REJOIN_WINDOW);
        if allowed {
            self.last = Some(now);
        }
        allowed
    }
}

/// Runs the scheduler with the system clock until `shutdown` resolves. A fenced static member
/// starts again with new clients (the HTTP API too) within the [`RejoinBudget`]; every other
/// fatal error returns.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut budget = RejoinBudget::default();
    loop {
        let scheduler = Scheduler::start(settings.clone(), Arc::new(SystemClock)).await?;
        // Whether `shutdown` resolved: a future is not polled again after it completed.
        let mut asked_to_stop = false;
        let stopping = async {
            shutdown.as_mut().await;
            asked_to_stop = true;
        };
        let result = scheduler.run_until(stopping).await;
        match result {
            Err(Error::Fenced(reason))
                if !asked_to_stop && budget.allow(std::time::Instant::now()) =>
            {
                tracing::warn!(
                    %reason,
                    "fenced: starting again with new clients (a second fence within {}s stops the process)",
                    REJOIN_WINDOW.as_secs()
                );
                ::metrics::counter!(metrics::ENGINE_RESTARTS, "reason" => "fenced").increment(1);
            }
            done => return done,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `kill` and container runtimes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_fenced_engine_starts_again_once_per_window() {
        let mut budget = RejoinBudget::default();
        let t0 = Instant::now();
        assert!(
            budget.allow(t0),
            "the first fence (a broker restart) is recovered"
        );
        assert!(
            !budget.allow(t0 + Duration::from_secs(10)),
            "a second fence soon after is another process with the same id: stop"
        );
        assert!(
            budget.allow(t0 + REJOIN_WINDOW + Duration::from_secs(1)),
            "a window later, a fence is recovered again"
        );
        assert!(!budget.allow(t0 + REJOIN_WINDOW + Duration::from_secs(2)));
    }
}
