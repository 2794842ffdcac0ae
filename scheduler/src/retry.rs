//! The workspace's one retry schedule (backon's exponential backoff with jitter), for every loop
//! that tries again: sends, sweeps, commits, the state reader, the messenger's writers.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays doubling from `min` to `max`, without a limit on tries, with jitter so that many
/// failures (sends, sweeps, writers) do not retry in step. Limit the tries with `with_max_times`
/// where giving up is the right end.
pub fn backoff_builder(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// [`backoff_builder`]'s delays, for loops that pace themselves.
pub fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backoff_builder(min, max).build()
}
