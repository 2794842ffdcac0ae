//! Batching and retrying for the background writers (audit, MySQL): the send path drops items
//! into a channel and never waits; a writer takes them in batches and retries a failed batch until
//! it is written, so a slow or restarting store delays the record but loses nothing.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use futures::Stream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

/// The items of `rx` in batches: a batch starts with the first item that arrives and holds what
/// else arrives within `window` of it, up to `max` items (tokio-stream's `chunks_timeout`). Ends
/// once the channel is closed and empty.
pub fn batches<T>(
    rx: UnboundedReceiver<T>,
    max: usize,
    window: Duration,
) -> impl Stream<Item = Vec<T>> {
    UnboundedReceiverStream::new(rx).chunks_timeout(max, window)
}

/// Runs `attempt` until it succeeds, waiting between tries from 100 ms doubling to 5 s, with
/// jitter (the workspace's one retry schedule, [`scheduler::retry::backoff`]).
pub async fn retry_until_ok<F, Fut, T, E>(what: &str, attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let forever =
        scheduler::retry::backoff_builder(Duration::from_millis(100), Duration::from_secs(5));
    // Without a limit on tries, the retry ends only in success.
    let _ = attempt
        .retry(forever)
        .notify(|e, retry_in| tracing::warn!(error = %e, ?retry_in, "{what} failed; retrying"))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn batches_what_arrives_together_and_ends_when_closed() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let b = batches(rx, 3, Duration::from_millis(10));
        tokio::pin!(b);
        assert_eq!(b.next().await, Some(vec![0, 1, 2]));
        assert_eq!(
            b.next().await,
            Some(vec![3, 4]),
            "the window closes a short batch"
        );
        tx.send(5).unwrap();
        assert_eq!(b.next().await, Some(vec![5]));
        drop(tx);
        assert_eq!(b.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempt_succeeds() {
        let mut tries = 0;
        retry_until_ok("test", || {
            tries += 1;
            let t = tries;
            async move {
                if t < 3 {
                    Err("not yet")
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(tries, 3);
    }
}
