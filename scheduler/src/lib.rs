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
mod error;
pub mod facts;
mod http;
pub mod index;
mod ingest;
pub mod jobs;
pub mod kafka;
pub mod lanes;
pub mod latency;
mod lifecycle;
mod memory;
pub mod metrics;
mod monitor;
pub mod offsets;
pub mod outbox;
mod planner;
mod progress;
mod publisher;
pub mod recur;
pub mod replay;
pub mod retry;
mod router;
pub mod secret;
pub mod slice;
mod state;
pub mod status;
mod sweep;
pub mod targets;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod timer;
pub mod transaction;
pub mod upcoming;
pub mod watermark;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{Config, Settings};
pub use error::{Error, Result};
pub use memory::{release_free_memory, tune_allocator};
pub use time::{Clock, DueTime, SystemClock, Zone};

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
        let mut settings = settings;
        if settings.exactly_once() {
            settings.config.transactional_id = Some(settings.transactional_id(http_addr.port()));
        }
        let state_dir = settings.state_dir(http_addr.port());
        let engine = engine::Engine::start(settings, clock, &state_dir).await?;
        let app = http::router(engine.api(prometheus));
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
        self.engine.fail_next_sweeps(n);
    }

    /// Makes every delivery to `topic` fail after `after` (test builds only), as a target whose
    /// partition leader is away would; `None` lets it take records again.
    #[cfg(feature = "testkit")]
    pub fn refuse_target(&self, topic: &str, after: Option<std::time::Duration>) {
        self.engine.refuse_target(topic, after);
    }

    /// Runs one pass of the janitor of ids as if the clock said `now_ms` (test builds only):
    /// the number of facts removed.
    #[cfg(feature = "testkit")]
    pub async fn janitor_pass(&self, now_ms: i64) -> usize {
        self.engine.janitor_pass(now_ms).await
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
/// starts again with new clients (the HTTP API too) within the [`RejoinBudget`]; an aborted
/// transaction (exactly-once) starts again a second later, from the last committed one; every
/// other fatal error returns.
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
            Err(Error::Aborted(reason)) if !asked_to_stop => {
                tracing::warn!(%reason, "starting again from the last committed transaction");
                ::metrics::counter!(metrics::ENGINE_RESTARTS, "reason" => "aborted").increment(1);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
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
