//! Whether the engine runs, stops taking work, or has failed: the one thing every stage is told.
//!
//! Owns the two cancellation tokens and the first fatal error. Receives `fail` from any stage (a
//! refused DLQ write, a fatal client error, an index that cannot be written); the status stage
//! ([`crate::monitor`]) is woken by every change, so `/healthz` says it at once.

use std::sync::OnceLock;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kafka::Fatal;

/// The engine's run state. Shared by handle (`Arc<Lifecycle>`): nothing in it is locked, the
/// fatal error is set once.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    /// Stops everything: the timer, the committer, send retries.
    token: CancellationToken,
    /// Stops taking work in (the consumer loop, planner, workers, control); a child of `token`.
    /// A clean stop cancels it first, so the timer can drain before the last commit.
    intake: CancellationToken,
    /// The first fatal error; later ones are only logged.
    fatal: OnceLock<Fatal>,
    /// Bumped on every change of the above, for the status stage (a watch: a change while it
    /// was busy is not missed).
    changed: watch::Sender<()>,
}

impl Lifecycle {
    pub(crate) fn new() -> Lifecycle {
        let token = CancellationToken::new();
        Lifecycle {
            intake: token.child_token(),
            token,
            fatal: OnceLock::new(),
            changed: watch::Sender::new(()),
        }
    }

    /// Cancelled when the engine stops (cleanly or on a fatal error).
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Cancelled when the engine stops taking work in.
    pub(crate) fn intake(&self) -> &CancellationToken {
        &self.intake
    }

    /// Stops the process: it takes no more work, `/healthz` answers `failed` with the reason,
    /// and `run` returns the error (the binary exits non-zero). What is unacknowledged stays
    /// uncommitted.
    pub(crate) fn fail(&self, fatal: Fatal) {
        tracing::error!(reason = fatal.reason(), "fatal error, stopping");
        let _ = self.fatal.set(fatal);
        self.token.cancel();
        self.changed.send_replace(());
    }

    /// The first step of a clean stop: no more work in.
    pub(crate) fn stop_intake(&self) {
        self.intake.cancel();
        self.changed.send_replace(());
    }

    /// The second: everything ends where it waits.
    pub(crate) fn stop(&self) {
        self.token.cancel();
        self.changed.send_replace(());
    }

    pub(crate) fn fatal(&self) -> Option<&Fatal> {
        self.fatal.get()
    }

    pub(crate) fn stopping(&self) -> bool {
        self.intake.is_cancelled()
    }

    /// Changes of the run state, from now on.
    pub(crate) fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}
