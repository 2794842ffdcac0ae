//! Due times: parsing the `time` header into a [`DueTime`], the zone rule, and the injectable [`Clock`].
//!
//! Everything downstream works in UTC epoch milliseconds; wall-clock strings and zones exist only
//! here, so a DST change or a server's local zone can never move a delivery.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Latest instant accepted: the end of year 9999, the last year every format can write.
pub const MAX_DUE_MS: i64 = 253_402_300_799_999;
/// Earliest instant accepted: the start of year 1. Anything before 1970 is simply past due.
pub const MIN_DUE_MS: i64 = -62_135_596_800_000;

/// Zone abbreviations that are also tz-database zones with rules of their own. `CET` here means the
/// tz-database zone `CET`, which keeps summer time (`+02:00` in July), not a fixed `+01:00`.
pub const ZONE_ABBREVIATIONS: [&str; 6] = ["UTC", "GMT", "CET", "MET", "EET", "WET"];

/// An instant at which a record must be delivered, in UTC milliseconds since the epoch.
///
/// Only [`DueTime::parse`] and [`DueTime::from_millis`] make one, so a value is always inside
/// [`MIN_DUE_MS`, `MAX_DUE_MS`] and can be formatted and compared without further checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueTime(i64);

/// Why a `time` header was refused. The text goes into the `sm-error-detail` header of the DLQ copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("the time header is empty")]
    Empty,
    #[error("the time header is not UTF-8")]
    NotUtf8,
    #[error("the time header is too long ({0} bytes; at most 64)")]
    TooLong(usize),
    #[error("unrecognised time {0:?}: use RFC 3339, 'YYYY-MM-DD HH:MM:SS[.fff] [Zone/Name]', 'D Mon YYYY HH:MM[:SS] ZONE' or epoch milliseconds")]
    Unrecognised(String),
    #[error("unknown or ambiguous zone {0:?}: use an IANA name such as Europe/Amsterdam, or one of UTC, GMT, CET, MET, EET, WET")]
    UnknownZone(String),
    #[error("{local} does not exist in {zone} (skipped by a daylight-saving change)")]
    NonexistentLocal { local: String, zone: String },
    #[error("{local} is ambiguous in {zone} (it happens twice at a daylight-saving change); give an offset")]
    AmbiguousLocal { local: String, zone: String },
    #[error("time out of range: must lie between year 1 and the end of year 9999")]
    OutOfRange,
    #[error("epoch time {0} is before 1973 as milliseconds: it looks like epoch seconds; send epoch milliseconds (e.g. {0}000)")]
    EpochSeconds(u64),
}

/// Digits-only times below this (1973-03-03 as epoch milliseconds) are refused: they are almost
/// certainly epoch *seconds*, and delivering them at once as a date in 1970 would be wrong.
pub const MIN_EPOCH_MS_DIGITS: u64 = 100_000_000_000;

/// A zone accepted by the zone rule: an IANA `Area/Location` name or one of [`ZONE_ABBREVIATIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(Tz);

impl Zone {
    pub const UTC: Zone = Zone(Tz::UTC);

    pub fn tz(&self) -> Tz {
        self.0
    }
}

impl FromStr for Zone {
    type Err = TimeError;

    /// Accepts `Area/Location` tz names and the six abbreviations that are tz zones themselves.
    /// Other abbreviations (`PST`, `CEST`, `IST`, `EST`...) are refused: they are ambiguous, or in
    /// the tz database mean a fixed offset that most people writing them do not intend.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let allowed = s.contains('/') || ZONE_ABBREVIATIONS.contains(&s);
        match (allowed, s.parse::<Tz>()) {
            (true, Ok(tz)) => Ok(Zone(tz)),
            _ => Err(TimeError::UnknownZone(s.to_string())),
        }
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

impl DueTime {
    /// Wraps epoch milliseconds, refusing what the formats cannot represent.
    pub fn from_millis(ms: i64) -> Result<Self, TimeError> {
        if (MIN_DUE_MS..=MAX_DUE_MS).contains(&ms) {
            Ok(DueTime(ms))
        } else {
            Err(TimeError::OutOfRange)
        }
    }

    pub fn as_millis(&self) -> i64 {
        self.0
    }

    /// Parses a raw `time` header. Naive forms are read in `default_zone`.
    pub fn parse_bytes(raw: &[u8], default_zone: Zone) -> Result<Self, TimeError> {
        let s = std::str::from_utf8(raw).map_err(|_| TimeError::NotUtf8)?;
        Self::parse(s, default_zone)
    }

    /// Parses the accepted forms, tried from the most to the least specific:
    /// epoch milliseconds (digits only), RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff] [Zone]`, and
    /// `D Mon YYYY HH:MM[:SS] [ZONE]`.
    pub fn parse(s: &str, default_zone: Zone) -> Result<Self, TimeError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TimeError::Empty);
        }
        if s.len() > 64 {
            return Err(TimeError::TooLong(s.len()));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            let ms: i64 = s.parse().map_err(|_| TimeError::OutOfRange)?;
            // `ms` is non-negative: only digits were parsed.
            if (ms as u64) < MIN_EPOCH_MS_DIGITS {
                return Err(TimeError::EpochSeconds(ms as u64));
            }
            return Self::from_millis(ms);
        }
        if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
            return Self::from_millis(dt.timestamp_millis());
        }
        let (body, zone) = split_zone(s, default_zone)?;
        for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(naive) = NaiveDateTime::parse_from_str(body, format) {
                return localise(naive, zone);
            }
        }
        if let Some(naive) = parse_day_month_year(body) {
            return localise(naive, zone);
        }
        Err(TimeError::Unrecognised(s.to_string()))
    }

    /// RFC 3339 in UTC with milliseconds, for logs, headers and the HTTP API.
    pub fn to_rfc3339(&self) -> String {
        format_millis(self.0)
    }
}

impl fmt::Display for DueTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC; out-of-range values print as the raw number.
pub fn format_millis(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms) {
        LocalResult::Single(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        _ => ms.to_string(),
    }
}

/// Splits a trailing zone word off. A trailing word is a zone when it contains a letter and does
/// not look like a time of day (`18:40`); a trailing word that is not an accepted zone is an error,
/// never silently read as the default zone.
fn split_zone(s: &str, default_zone: Zone) -> Result<(&str, Zone), TimeError> {
    match s.rsplit_once(' ') {
        Some((body, last))
            if last.chars().any(|c| c.is_ascii_alphabetic()) && !last.contains(':') =>
        {
            Ok((body.trim_end(), last.parse()?))
        }
        _ => Ok((s, default_zone)),
    }
}

/// `1 Sep 2023 18:40` or `1 Sep 2023 18:40:05`, the original project's documented form.
fn parse_day_month_year(body: &str) -> Option<NaiveDateTime> {
    let parts: Vec<&str> = body.split_whitespace().collect();
    let [day, month, year, clock] = parts.as_slice() else {
        return None;
    };
    let date = NaiveDate::parse_from_str(&format!("{day} {month} {year}"), "%d %b %Y").ok()?;
    let time = chrono::NaiveTime::parse_from_str(clock, "%H:%M:%S")
        .or_else(|_| chrono::NaiveTime::parse_from_str(clock, "%H:%M"))
        .ok()?;
    Some(date.and_time(time))
}

fn localise(naive: NaiveDateTime, zone: Zone) -> Result<DueTime, TimeError> {
    match zone.tz().from_local_datetime(&naive) {
        LocalResult::Single(dt) => DueTime::from_millis(dt.timestamp_millis()),
        LocalResult::Ambiguous(_, _) => Err(TimeError::AmbiguousLocal {
            local: naive.to_string(),
            zone: zone.to_string(),
        }),
        LocalResult::None => Err(TimeError::NonexistentLocal {
            local: naive.to_string(),
            zone: zone.to_string(),
        }),
    }
}

/// The scheduler's idea of "now", in UTC epoch milliseconds.
///
/// Due times are wall-clock instants, and tokio's paused time moves `Instant` only, so everything
/// that compares against a due time asks a `Clock`; tests substitute a [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(ms)))
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn parse(s: &str) -> Result<i64, TimeError> {
        DueTime::parse(s, Zone::UTC).map(|d| d.as_millis())
    }

    #[test]
    fn every_documented_form_parses() {
        assert_eq!(
            parse("2026-11-21T18:40:00.250+01:00"),
            Ok(ms("2026-11-21T17:40:00.250Z"))
        );
        assert_eq!(
            parse("2026-11-21T17:40:00Z"),
            Ok(ms("2026-11-21T17:40:00Z"))
        );
        assert_eq!(parse("2026-11-21 18:40:00"), Ok(ms("2026-11-21T18:40:00Z")));
        assert_eq!(
            parse("2026-11-21 18:40:00.5"),
            Ok(ms("2026-11-21T18:40:00.500Z"))
        );
        assert_eq!(
            parse("2026-11-21 18:40:00 Europe/Amsterdam"),
            Ok(ms("2026-11-21T17:40:00Z"))
        );
        assert_eq!(
            parse("1 Sep 2023 18:40 CET"),
            Ok(ms("2023-09-01T16:40:00Z"))
        );
        assert_eq!(
            parse("1 Sep 2023 18:40:30 UTC"),
            Ok(ms("2023-09-01T18:40:30Z"))
        );
        assert_eq!(parse("1700000000123"), Ok(1_700_000_000_123));
    }

    #[test]
    fn cet_keeps_summer_time_and_winter_time() {
        // The tz-database zone CET is +02:00 in summer and +01:00 in winter.
        assert_eq!(
            parse("1 Jul 2026 12:00 CET"),
            Ok(ms("2026-07-01T10:00:00Z"))
        );
        assert_eq!(
            parse("1 Dec 2026 12:00 CET"),
            Ok(ms("2026-12-01T11:00:00Z"))
        );
    }

    #[test]
    fn default_zone_applies_to_naive_forms_only() {
        let ams: Zone = "Europe/Amsterdam".parse().unwrap();
        let naive = DueTime::parse("2026-07-01 12:00:00", ams).unwrap();
        assert_eq!(naive.as_millis(), ms("2026-07-01T10:00:00Z"));
        let explicit = DueTime::parse("2026-07-01T12:00:00Z", ams).unwrap();
        assert_eq!(explicit.as_millis(), ms("2026-07-01T12:00:00Z"));
    }

    #[test]
    fn other_abbreviations_are_refused() {
        for s in [
            "2026-07-01 12:00:00 PST",
            "1 Jul 2026 12:00 CEST",
            "1 Jul 2026 12:00 EST",
            "2026-07-01 12:00:00 Mars/Olympus",
        ] {
            assert!(matches!(parse(s), Err(TimeError::UnknownZone(_))), "{s}");
        }
    }

    #[test]
    fn dst_gaps_and_overlaps_are_refused() {
        // 2026-03-29 02:30 does not exist in Amsterdam; 2026-10-25 02:30 happens twice.
        assert!(matches!(
            parse("2026-03-29 02:30:00 Europe/Amsterdam"),
            Err(TimeError::NonexistentLocal { .. })
        ));
        assert!(matches!(
            parse("2026-10-25 02:30:00 Europe/Amsterdam"),
            Err(TimeError::AmbiguousLocal { .. })
        ));
        // An explicit offset settles the overlap.
        assert_eq!(
            parse("2026-10-25T02:30:00+01:00"),
            Ok(ms("2026-10-25T01:30:00Z"))
        );
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        assert_eq!(parse(""), Err(TimeError::Empty));
        assert_eq!(parse("   "), Err(TimeError::Empty));
        assert!(matches!(parse("tomorrow"), Err(TimeError::Unrecognised(_))));
        assert!(matches!(
            parse("2026-13-01 00:00:00"),
            Err(TimeError::Unrecognised(_))
        ));
        assert_eq!(parse("99999999999999999999"), Err(TimeError::OutOfRange));
        assert_eq!(parse("253402300800000"), Err(TimeError::OutOfRange));
        assert_eq!(
            DueTime::parse_bytes(&[0xff, 0xfe], Zone::UTC),
            Err(TimeError::NotUtf8)
        );
        assert!(matches!(
            parse(&"1".repeat(65)),
            Err(TimeError::TooLong(65))
        ));
    }

    #[test]
    fn epoch_seconds_are_refused_with_a_hint() {
        for secs in ["0", "5", "1764633600", "99999999999"] {
            let err = parse(secs).unwrap_err();
            assert!(matches!(err, TimeError::EpochSeconds(_)), "{secs}: {err:?}");
            assert!(err.to_string().contains("milliseconds"), "{err}");
        }
        assert_eq!(parse("1764633600000"), Ok(1_764_633_600_000));
    }

    #[test]
    fn edges_of_the_range_parse() {
        assert_eq!(parse("9999-12-31T23:59:59.999Z"), Ok(MAX_DUE_MS));
        assert_eq!(
            parse("1969-07-20T20:17:40Z"),
            Ok(ms("1969-07-20T20:17:40Z"))
        );
        assert_eq!(parse("100000000000"), Ok(100_000_000_000));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = DueTime::parse_bytes(&raw, Zone::UTC);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,70}") {
            let _ = DueTime::parse(&s, Zone::UTC);
        }

        /// Around DST changes in zones with 60- and 30-minute shifts, a local time parses iff it
        /// exists exactly once, and then it names that very wall-clock time.
        #[test]
        fn local_times_are_accepted_exactly_when_unambiguous(
            zone in prop_oneof![Just("Europe/Amsterdam"), Just("America/New_York"), Just("Australia/Lord_Howe"), Just("CET")],
            secs in 0i64..4_102_444_800,
        ) {
            let tz: Tz = zone.parse().unwrap();
            let local = DateTime::from_timestamp(secs, 0).unwrap().naive_utc();
            let text = format!("{} {zone}", local.format("%Y-%m-%d %H:%M:%S"));
            match (DueTime::parse(&text, Zone::UTC), tz.from_local_datetime(&local)) {
                (Ok(due), LocalResult::Single(expected)) => {
                    prop_assert_eq!(due.as_millis(), expected.timestamp_millis());
                    let back = tz.timestamp_millis_opt(due.as_millis()).unwrap().naive_local();
                    prop_assert_eq!(back, local);
                }
                (Err(TimeError::NonexistentLocal { .. }), LocalResult::None) => {}
                (Err(TimeError::AmbiguousLocal { .. }), LocalResult::Ambiguous(..)) => {}
                (got, chrono) => prop_assert!(false, "{text}: parsed {got:?}, chrono says {chrono:?}"),
            }
        }

        /// Every instant within 3 hours of a DST change in Amsterdam, written as local time with
        /// the zone, either parses back to itself or is refused as ambiguous (the repeated hour).
        #[test]
        fn instants_near_dst_changes_round_trip_or_are_refused(
            change in prop_oneof![Just("2026-03-29T01:00:00Z"), Just("2026-10-25T01:00:00Z")],
            offset_s in -10_800i64..10_800,
        ) {
            let tz: Tz = "Europe/Amsterdam".parse().unwrap();
            let instant = DateTime::parse_from_rfc3339(change).unwrap().timestamp() + offset_s;
            let local = tz.timestamp_opt(instant, 0).unwrap().naive_local();
            let text = format!("{} Europe/Amsterdam", local.format("%Y-%m-%d %H:%M:%S"));
            match DueTime::parse(&text, Zone::UTC) {
                Ok(due) => prop_assert_eq!(due.as_millis(), instant * 1000),
                Err(TimeError::AmbiguousLocal { .. }) => {}
                Err(e) => prop_assert!(false, "{text}: {e}"),
            }
        }

        #[test]
        fn rfc3339_round_trips(ms in MIN_DUE_MS / 2..MAX_DUE_MS) {
            let due = DueTime::from_millis(ms).unwrap();
            prop_assert_eq!(DueTime::parse(&due.to_rfc3339(), Zone::UTC), Ok(due));
            let digits = ms.max(MIN_EPOCH_MS_DIGITS as i64);
            prop_assert_eq!(DueTime::parse(&digits.to_string(), Zone::UTC).map(|d| d.as_millis()), Ok(digits));
        }
    }
}
