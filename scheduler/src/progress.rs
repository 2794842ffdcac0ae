//! What became of the records one sweep read, and which slice windows have writes on their way:
//! the reports the outbox sends back to the sweeps (a stage below both, so neither imports the
//! other).
//!
//! Owns two counters behind short locks (never held across an `.await`): [`SliceWrites`], per
//! window, and [`ActiveSweep`], per running sweep. The outbox ends a [`SliceWrite`] and reports
//! [`Placed`] as the broker acknowledges; the sweeps wait on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::jobs::JobCounts;
use crate::kafka::lock;
use crate::slice::SliceId;

/// How long a sweep may see no progress at all before the attempt fails (and is retried).
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// Writes into slice windows that this process has sent and the broker has not yet
/// acknowledged. A window's sweep waits for them before it reads the high watermark: a write routed
/// just before the sweep time (the safety margin) can take longer than the margin to be
/// acknowledged on a loaded broker, and would then land behind the sweep and wait a whole turn of
/// the ring (r+1+f windows) to be found. Writes of other instances are covered by the margin alone.
#[derive(Default)]
pub(crate) struct SliceWrites {
    pending: Mutex<HashMap<SliceId, usize>>,
    changed: Notify,
}

impl SliceWrites {
    pub(crate) fn begin(self: &Arc<Self>, id: SliceId) -> SliceWrite {
        *lock(&self.pending).entry(id).or_default() += 1;
        SliceWrite {
            writes: self.clone(),
            id,
        }
    }

    /// Waits until no write into `id` is unacknowledged, or `timeout`; returns how many remain.
    pub(crate) async fn settled(&self, id: SliceId, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let left = lock(&self.pending).get(&id).copied().unwrap_or(0);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return left;
            }
        }
    }
}

/// One unacknowledged write into a slice window; dropping it (acknowledged, dead-lettered, or
/// abandoned at shutdown) ends it.
pub(crate) struct SliceWrite {
    writes: Arc<SliceWrites>,
    id: SliceId,
}

impl Drop for SliceWrite {
    fn drop(&mut self) {
        let mut pending = lock(&self.writes.pending);
        if let Some(n) = pending.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.id);
            }
        }
        drop(pending);
        self.writes.changed.notify_waiters();
    }
}

/// What became of the records one sweep routed: counted as their sends are acknowledged (or as
/// they enter the timer), so the sweep can wait until every record it read has its next place.
#[derive(Default)]
pub(crate) struct ActiveSweep {
    progress: Mutex<Placement>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Placement {
    routed: u64,
    placed: u64,
    counts: JobCounts,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Placed {
    Slice,
    Timer,
    DeadLetter,
    /// Not sent: its partition was revoked first (exactly-once); its next owner places it.
    Elsewhere,
}

impl ActiveSweep {
    pub(crate) fn routed(&self) {
        let mut p = lock(&self.progress);
        p.routed += 1;
        p.counts.records += 1;
    }

    pub(crate) fn placed(&self, how: Placed) {
        {
            let mut p = lock(&self.progress);
            p.placed += 1;
            match how {
                Placed::Slice => p.counts.to_slices += 1,
                Placed::Timer => p.counts.to_timer += 1,
                Placed::DeadLetter => p.counts.dead_lettered += 1,
                Placed::Elsewhere => {}
            }
        }
        self.wake.notify_waiters();
    }

    /// Waits until every routed record is placed; false after [`STALL`] without progress.
    pub(crate) async fn all_placed(&self, stop: &CancellationToken) -> Result<JobCounts, String> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let before = {
                let p = lock(&self.progress);
                if p.placed >= p.routed {
                    return Ok(p.counts);
                }
                p.placed
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(STALL) => {
                    if lock(&self.progress).placed == before {
                        return Err("records not acknowledged in time".into());
                    }
                }
                _ = stop.cancelled() => return Err("shutting down".into()),
            }
        }
    }
}
