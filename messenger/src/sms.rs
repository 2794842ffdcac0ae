//! The workload's messages: an SMS as JSON, keyed by recipient, with a due time written in a
//! different accepted format each time, so that every format is exercised on every run.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::Rng;
use scheduler::{DueTime, Zone};
use serde::Serialize;

/// The SMS value, as the original's producer wrote it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Sms {
    pub id: String,
    pub from: String,
    pub to: String,
    pub body: String,
    pub created_at: String,
    /// 1 for the message as first scheduled, 2 for its rescheduled version: a sender that reads
    /// 1 of a rescheduled message got the old version.
    pub revision: u32,
}

/// One message of a run: the SMS, its `time` header, and the due time that header means.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub sms: Sms,
    /// The `topic` header: where the scheduler delivers it.
    pub sms_topic: String,
    pub time_header: String,
    pub due: DueTime,
    /// The record timestamp of this version, fixed when the version is made. The scheduler
    /// orders the versions of an id by record timestamp: a send retried with a fresh timestamp
    /// would outrank a cancel or reschedule sent meanwhile and bring the old version back.
    pub version_ms: i64,
}

impl Scheduled {
    /// The record timestamp to send: [`Scheduled::version_ms`], and 1 ms later for the cancel of
    /// this version, so that the cancel outranks it however their sends are retried.
    pub fn record_timestamp(&self, cancel: bool) -> i64 {
        self.version_ms + i64::from(cancel)
    }

    pub fn key(&self) -> &[u8] {
        self.sms.to.as_bytes()
    }

    pub fn value(&self) -> Vec<u8> {
        serde_json::to_vec(&self.sms).unwrap_or_default()
    }
}

/// A random E.164 number in the North American fictional range (+1 555 01xx...).
fn phone(rng: &mut StdRng) -> String {
    format!("+1555{:07}", rng.random_range(0..10_000_000u32))
}

/// The formats the scheduler accepts, rotated by message number.
pub const FORMATS: usize = 5;

/// Writes `due` in format `n % FORMATS`, and returns the text with the instant it names (formats
/// with whole seconds round down). A local time that is ambiguous in Amsterdam falls back to
/// RFC 3339, which is never ambiguous.
pub fn format_time(due_ms: i64, n: usize) -> (String, DueTime) {
    let utc: DateTime<Utc> = DateTime::from_timestamp_millis(due_ms).unwrap_or_default();
    let ams: Tz = chrono_tz::Europe::Amsterdam;
    let cet: Tz = chrono_tz::CET;
    let text = match n % FORMATS {
        0 => due_ms.to_string(),
        1 => utc
            .with_timezone(&ams)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
        2 => utc.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        3 => format!(
            "{} Europe/Amsterdam",
            utc.with_timezone(&ams).format("%Y-%m-%d %H:%M:%S%.3f")
        ),
        _ => format!(
            "{} CET",
            utc.with_timezone(&cet).format("%-d %b %Y %H:%M:%S")
        ),
    };
    match DueTime::parse(&text, Zone::UTC) {
        Ok(due) => (text, due),
        Err(_) => {
            let text = utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let due = DueTime::from_millis(due_ms)
                .unwrap_or_else(|_| DueTime::from_millis(0).expect("0 is in range"));
            (text, due)
        }
    }
}

/// Message `n` of run `run_id`, produced at `now_ms`, due after a delay in `[min, max]` ms.
pub fn message(
    rng: &mut StdRng,
    run_id: &str,
    n: u64,
    now_ms: i64,
    min_ms: i64,
    max_ms: i64,
    body_len: usize,
) -> Scheduled {
    let delay = if max_ms > min_ms {
        rng.random_range(min_ms..=max_ms)
    } else {
        min_ms
    };
    let (time_header, due) = format_time(now_ms + delay, n as usize);
    let sms = Sms {
        id: format!("{run_id}-{n}"),
        from: phone(rng),
        to: phone(rng),
        body: Alphanumeric.sample_string(rng, body_len),
        created_at: scheduler::time::format_millis(now_ms),
        revision: 1,
    };
    Scheduled {
        sms,
        sms_topic: "sms-messages".into(),
        time_header,
        due,
        version_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_format_names_the_due_time_to_the_precision_it_has() {
        let due = 1_795_291_480_601; // 2026-11-21T20:04:40.601Z
        for n in 0..FORMATS {
            let (text, parsed) = format_time(due, n);
            let want = if n == 4 { due - due % 1000 } else { due };
            assert_eq!(parsed.as_millis(), want, "format {n}: {text}");
        }
        assert_eq!(format_time(due, 4).0, "21 Nov 2026 21:04:40 CET");
        assert_eq!(
            format_time(due, 3).0,
            "2026-11-21 21:04:40.601 Europe/Amsterdam"
        );
    }

    #[test]
    fn an_ambiguous_local_time_falls_back_to_rfc3339() {
        // 2026-10-25 02:30 happens twice in Amsterdam.
        let due = DateTime::parse_from_rfc3339("2026-10-25T00:30:00Z")
            .unwrap()
            .timestamp_millis();
        let (text, parsed) = format_time(due, 3);
        assert_eq!(parsed.as_millis(), due);
        assert!(text.ends_with('Z'), "{text}");
    }

    #[test]
    fn messages_are_sms_with_e164_numbers_and_the_configured_body() {
        let mut rng = StdRng::seed_from_u64(7);
        let m = message(&mut rng, "run-1", 3, 1_000_000, 1_000, 2_000, 12);
        assert_eq!(m.sms.id, "run-1-3");
        assert!(m.sms.to.starts_with("+1555") && m.sms.to.len() == 12);
        assert_eq!(m.sms.body.len(), 12);
        let due = m.due.as_millis();
        assert!((1_001_000..=1_002_000).contains(&due));
        let v: serde_json::Value = serde_json::from_slice(&m.value()).unwrap();
        for k in ["id", "from", "to", "body", "created_at", "revision"] {
            assert!(v.get(k).is_some());
        }
        assert_eq!(m.key(), m.sms.to.as_bytes());
    }
}
