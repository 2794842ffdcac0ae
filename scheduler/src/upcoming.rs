//! The load ahead (issue #32): how many records fall due in each slice window of the next minutes,
//! from the slice topics' offsets and what the timer holds, without reading a record.
//!
//! A slot topic holds one window at a time (its ring is sized so: [`crate::slice::Ladder::slots`]),
//! and its sweep commits past each window's records once they are placed, so the records of the
//! slot's current window are those between the group's committed offset and the end: two
//! ListOffsets requests (earliest, latest) and one OffsetFetch for every slot topic's partitions
//! together. Its `timer` part is the asking process's own. The top
//! level also holds what is due beyond the ladder's horizon, in any of its windows: its counts are
//! "due at the window's start or later".

use std::time::Duration;

use serde::Serialize;

use crate::config::Settings;
use crate::kafka::Lookup;
use crate::offsets::Tp;
use crate::slice::SliceId;

/// One slice window's records still to be swept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    pub level: usize,
    pub from_ms: i64,
    pub to_ms: i64,
    pub topic: String,
    pub records: u64,
    /// Top level: its records are due at `from_ms` or any time later.
    pub open_ended: bool,
}

/// The slice windows that begin before `now_ms + minutes`, earliest first.
pub fn windows(
    settings: &Settings,
    lookup: &Lookup,
    now_ms: i64,
    minutes: u32,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<Window>> {
    let ladder = &settings.ladder;
    let until = now_ms.saturating_add(i64::from(minutes) * 60_000);
    let top = ladder.levels() - 1;
    let mut slots = Vec::new();
    for level in 1..ladder.levels() {
        let slots_of = ladder.slots_of(level);
        // The earliest window whose records may still be in its slot: the one whose sweep began
        // last may not be committed yet.
        let oldest = ladder.current_window(level, now_ms) - 1;
        for k in 0..slots_of {
            let id = SliceId {
                level,
                window: oldest + k,
            };
            let (from, to) = ladder.bounds(id);
            if from < until {
                slots.push((
                    id,
                    from,
                    to,
                    ladder.window_topic(&settings.config.slice_prefix, id),
                ));
            }
        }
    }
    let partitions = settings.config.slice_partitions;
    let tps: Vec<Tp> = slots
        .iter()
        .flat_map(|(_, _, _, topic)| (0..partitions).map(move |p| (topic.clone(), p)))
        .collect();
    let marks = lookup.watermarks(&tps, timeout)?;
    let committed = lookup.committed(&tps, timeout)?;
    let mut out: Vec<Window> = slots
        .into_iter()
        .map(|(id, from_ms, to_ms, topic)| {
            let records = (0..partitions)
                .map(|p| {
                    let tp = (topic.clone(), p);
                    let (low, high) = marks.get(&tp).copied().unwrap_or((0, 0));
                    let from = committed.get(&tp).copied().unwrap_or(low).max(low);
                    u64::try_from(high - from).unwrap_or(0)
                })
                .sum();
            Window {
                level: id.level,
                from_ms,
                to_ms,
                topic,
                records,
                open_ended: id.level == top,
            }
        })
        .collect();
    out.sort_by_key(|w| (w.from_ms, w.level));
    Ok(out)
}

/// Sets the gauge of records due within the next hour ([`crate::metrics::UPCOMING_HOUR`]) from
/// `windows` (asked at `now_ms`) and the timer: windows that begin within the hour count whole.
pub fn record_next_hour(windows: &[Window], now_ms: i64, timer: usize) {
    let hour = now_ms.saturating_add(3_600_000);
    let records: u64 = windows
        .iter()
        .filter(|w| w.from_ms < hour)
        .map(|w| w.records)
        .sum();
    metrics::gauge!(crate::metrics::UPCOMING_HOUR).set((records + timer as u64) as f64);
}

/// How often [`keep_gauge`] counts the next hour.
const GAUGE_EVERY: Duration = Duration::from_secs(30);

/// Keeps [`crate::metrics::UPCOMING_HOUR`] current: the next hour's count every [`GAUGE_EVERY`]
/// (three requests to the broker each time, whatever the number of slot topics).
pub(crate) async fn keep_gauge(
    settings: std::sync::Arc<Settings>,
    lookup: std::sync::Arc<Lookup>,
    clock: std::sync::Arc<dyn crate::time::Clock>,
    timer: tokio::sync::watch::Receiver<crate::timer::TimerView>,
) {
    let mut tick = tokio::time::interval(GAUGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock.now_ms();
        if let Ok(Ok(w)) = count(settings.clone(), lookup.clone(), now, 60).await {
            record_next_hour(&w, now, timer.borrow().pending);
        }
    }
}

/// [`windows`] off the async threads (its broker round trips block), within 5 s each.
pub(crate) async fn count(
    settings: std::sync::Arc<Settings>,
    lookup: std::sync::Arc<Lookup>,
    now_ms: i64,
    minutes: u32,
) -> Result<rdkafka::error::KafkaResult<Vec<Window>>, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        windows(&settings, &lookup, now_ms, minutes, Duration::from_secs(5))
    })
    .await
}
