//! Batching and retrying for the background writers (audit, MySQL): the send path drops items
//! into a channel and never waits; a writer takes them in batches and retries a failed batch until
//! it is written, so a slow or restarting store delays the record but loses nothing.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

/// Waits for one item, then takes whatever else arrives within `window`, up to `max` items.
/// `None` once the channel is closed and empty.
pub async fn next_batch<T>(
    rx: &mut UnboundedReceiver<T>,
    max: usize,
    window: Duration,
) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    let deadline = tokio::time::Instant::now() + window;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            _ => break,
        }
    }
    Some(batch)
}

/// Runs `attempt` until it succeeds, backing off from 100 ms to 5 s between tries.
pub async fn retry_until_ok<F, Fut, E>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = attempt().await {
        tracing::warn!(error = %e, retry_in = ?backoff, "{what} failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_what_arrives_together_and_ends_when_closed() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        assert_eq!(
            next_batch(&mut rx, 3, Duration::from_millis(10)).await,
            Some(vec![0, 1, 2])
        );
        assert_eq!(
            next_batch(&mut rx, 3, Duration::from_millis(10)).await,
            Some(vec![3, 4])
        );
        drop(tx);
        assert_eq!(
            next_batch(&mut rx, 3, Duration::from_millis(10)).await,
            None
        );
    }

    #[tokio::test]
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
