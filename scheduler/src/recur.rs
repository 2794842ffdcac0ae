//! Recurring schedules (issue #32): one record with an `id` and a `cron` or `every` header stands
//! for every occurrence of a schedule.
//!
//! The schedule lives in Kafka like a one-off record: each occurrence is one record of the ingest
//! topic, due at the occurrence's time, and goes through the slices and the timer as any other.
//! Once an occurrence's delivery is acknowledged, the outbox files the next occurrence as a new
//! record of the ingest topic, and the current record's offset waits for that write too
//! ([`crate::offsets::Offsets::also`]): a crash can deliver an occurrence twice (same `sm-id` and
//! `sm-occurrence`), never skip one.
//!
//! Each occurrence is a version of the schedule's id. A filed occurrence goes to the original
//! record's ingest partition and carries its timestamp ([`Recurrence::version_ms`]), which its
//! version orders by, so it is newer than the occurrence before it (a later offset of the same
//! partition) and older than anything the user sends later: a cancel or a new record with the
//! same id ends the recurrence, because the next occurrence is then superseded. Its own record
//! timestamp is the filing's clock: with the schedule's, a schedule older than the ingest topic's
//! retention sat in a segment Kafka could delete before it was read.
//!
//! Time rules: `every` is elapsed time (a grid from `start`, or from the record's timestamp);
//! `cron` is wall-clock time in `zone`, evaluated by the `croner` crate: it fires once per
//! wall-clock time that exists. Across a daylight-saving change, a fixed time that does not exist
//! (02:30 on a spring-forward night) fires once at the first valid time after the gap, while a
//! wildcard or step skips the times of the gap; a time that happens twice (the repeated hour of a
//! fall-back night) fires once, on its first pass, so `* * * * *` is silent for the hour the
//! clock repeats.

use std::str::FromStr;

use chrono::{DateTime, TimeZone as _, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::time::{DueTime, Zone};

/// The recurrence headers of a record of the ingest topic.
pub mod header {
    /// A cron pattern of five fields (minute to weekday) or six (seconds first).
    pub const CRON: &str = "cron";
    /// A period: `30s`, `5m`, `1h`, `1d` (humantime: also `1h 30m`); at least one second.
    pub const EVERY: &str = "every";
    /// The IANA zone `cron`, `start` and `end` are read in (default UTC).
    pub const ZONE: &str = "zone";
    /// No occurrence before this time.
    pub const START: &str = "start";
    /// No occurrence after this time.
    pub const END: &str = "end";
    /// At most this many occurrences are delivered.
    pub const COUNT: &str = "count";
    /// What happens to occurrences missed during an outage: `one` (default), `all`, `none`.
    pub const MISSED: &str = "missed";
    /// On a filed occurrence and on slice copies: the recurrence and where it stands, as JSON
    /// ([`Recurrence`]).
    pub const SM_RECUR: &str = "sm-recur";
    /// On a delivered occurrence: its due time, RFC 3339 in the schedule's zone. With `sm-id`,
    /// it names the occurrence, so a consumer can drop a duplicate.
    pub const SM_OCCURRENCE: &str = "sm-occurrence";

    /// Every user-facing recurrence header.
    pub const ALL: [&str; 7] = [CRON, EVERY, ZONE, START, END, COUNT, MISSED];
}

/// The shortest `every`: a shorter period is refused.
pub const MIN_PERIOD_MS: i64 = 1_000;

/// An occurrence published more than this after its due time was missed (Quartz's default
/// misfire threshold). A shorter delay (a takeover, a restart) is caught up occurrence by
/// occurrence whatever the policy, so a brief outage skips nothing.
pub const MISFIRE_MS: i64 = 60_000;

/// `missed: all` fires at most this many missed occurrences in a row, then goes on as `one`:
/// an every-second schedule after a day's outage must not send 86,400 records at once.
pub const MAX_CATCH_UP: u32 = 1_000;

/// Why a recurrence was refused: the `sm-error-detail` of its DLQ copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecurError {
    #[error("a recurring schedule needs an 'id' header (its occurrences are versions of it, and the id cancels or replaces it)")]
    MissingId,
    #[error("give either 'cron' or 'every', not both")]
    Both,
    #[error("the '{0}' header is not UTF-8")]
    NotUtf8(&'static str),
    #[error("invalid cron pattern {pattern:?}: {why}")]
    InvalidCron { pattern: String, why: String },
    #[error("invalid 'every' {0:?}: use a duration such as 30s, 5m, 1h or 1d")]
    InvalidEvery(String),
    #[error("'every' {0:?} is shorter than one second")]
    EveryTooShort(String),
    #[error("unknown zone {0:?}: use an IANA name such as America/New_York")]
    UnknownZone(String),
    #[error("invalid '{header}' time: {why}")]
    InvalidBound { header: &'static str, why: String },
    #[error("'end' is before 'start'")]
    EndBeforeStart,
    #[error("invalid 'count' {0:?}: a whole number from 1")]
    InvalidCount(String),
    #[error("invalid 'missed' {0:?}: one of one, all, none")]
    InvalidMissed(String),
    #[error("a recurring schedule needs a record timestamp (CreateTime or LogAppendTime): its versions are ordered by it")]
    NoTimestamp,
    #[error("the schedule has no occurrence (its end, or its count, is already reached)")]
    NoOccurrence,
    #[error("an internal recurrence header is corrupt: {0}")]
    Corrupt(String),
}

/// What happens to occurrences missed during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// One delivery stands for all missed occurrences, then the schedule resumes.
    #[default]
    One,
    /// Each missed occurrence is delivered (at most [`MAX_CATCH_UP`] in a row).
    All,
    /// Missed occurrences are not delivered; the schedule resumes with the next one.
    None,
}

/// How occurrences follow each other.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Wall-clock times in the schedule's zone.
    Cron(Box<Cron>),
    /// A fixed period of elapsed time, in milliseconds.
    Every(i64),
}

// croner's `Cron` compares its parsed fields (a derived `PartialEq`), which is an equivalence;
// it only lacks the marker.
impl Eq for Rule {}

/// A recurring schedule, and where it stands: carried by each occurrence (as [`header::SM_RECUR`]
/// on the records the scheduler writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recurrence {
    pub rule: Rule,
    /// The text the user gave for the rule (`cron` or `every`), to show and to file again.
    pub text: String,
    pub zone: Zone,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub count: Option<u32>,
    pub missed: Missed,
    /// This occurrence's number among the delivered ones, from 1.
    pub n: u32,
    /// Missed occurrences `missed: all` has delivered in a row so far.
    pub catching_up: u32,
    /// The timestamp of the record that made the schedule: every occurrence's version orders by
    /// it, not by its own record's timestamp (the filing's clock). `None` until ingest sets it.
    pub version_ms: Option<i64>,
}

/// The form of [`Recurrence`] in the `sm-recur` header.
#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(skip_serializing_if = "Option::is_none")]
    cron: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    every: Option<String>,
    zone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    missed: Missed,
    n: u32,
    #[serde(default)]
    catching_up: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version_ms: Option<i64>,
}

/// What to do with an occurrence about to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Deliver this occurrence (false: it was missed and `missed: none` drops it).
    pub deliver: bool,
    /// The next occurrence to file, with its due time; `None`: the schedule is over.
    pub next: Option<(i64, Recurrence)>,
}

/// Five fields (minute to weekday) or six (seconds first); no year field.
fn cron_pattern(text: &str) -> Result<Cron, RecurError> {
    use croner::parser::{CronParser, Seconds, Year};
    let parser = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build();
    parser.parse(text).map_err(|e| RecurError::InvalidCron {
        pattern: text.chars().take(128).collect(),
        why: e.to_string(),
    })
}

fn every_period(text: &str) -> Result<i64, RecurError> {
    let period = humantime::parse_duration(text.trim())
        .map_err(|_| RecurError::InvalidEvery(text.chars().take(64).collect()))?;
    let ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
    if ms < MIN_PERIOD_MS {
        return Err(RecurError::EveryTooShort(text.chars().take(64).collect()));
    }
    Ok(ms)
}

impl Recurrence {
    /// Reads the recurrence headers of a user's record through `get` (the last header of a
    /// name): `None` when it has neither `cron` nor `every`. Times without a zone in `start` and
    /// `end` are read in `zone`.
    pub fn from_headers<'a>(
        get: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Option<Recurrence>, RecurError> {
        let text = |name: &'static str| -> Result<Option<&'a str>, RecurError> {
            get(name)
                .map(|raw| std::str::from_utf8(raw).map_err(|_| RecurError::NotUtf8(name)))
                .transpose()
        };
        let (rule, rule_text) = match (text(header::CRON)?, text(header::EVERY)?) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => return Err(RecurError::Both),
            (Some(c), None) => (Rule::Cron(Box::new(cron_pattern(c)?)), c),
            (None, Some(e)) => (Rule::Every(every_period(e)?), e),
        };
        let zone = match text(header::ZONE)? {
            None => Zone::UTC,
            Some(z) => Zone::from_str(z.trim())
                .map_err(|_| RecurError::UnknownZone(z.chars().take(64).collect()))?,
        };
        let bound = |name: &'static str| -> Result<Option<i64>, RecurError> {
            text(name)?
                .map(|t| {
                    DueTime::parse(t, zone).map(|d| d.as_millis()).map_err(|e| {
                        RecurError::InvalidBound {
                            header: name,
                            why: e.to_string(),
                        }
                    })
                })
                .transpose()
        };
        let (start_ms, end_ms) = (bound(header::START)?, bound(header::END)?);
        if let (Some(s), Some(e)) = (start_ms, end_ms) {
            if e < s {
                return Err(RecurError::EndBeforeStart);
            }
        }
        let count = text(header::COUNT)?
            .map(|c| match c.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(RecurError::InvalidCount(c.chars().take(32).collect())),
            })
            .transpose()?;
        let missed = match text(header::MISSED)?.map(str::trim) {
            None | Some("one") => Missed::One,
            Some("all") => Missed::All,
            Some("none") => Missed::None,
            Some(other) => return Err(RecurError::InvalidMissed(other.chars().take(32).collect())),
        };
        Ok(Some(Recurrence {
            rule,
            text: rule_text.trim().to_string(),
            zone,
            start_ms,
            end_ms,
            count,
            missed,
            n: 1,
            catching_up: 0,
            version_ms: None,
        }))
    }

    /// The `sm-recur` header's value.
    pub fn encode(&self) -> String {
        let (cron, every) = match self.rule {
            Rule::Cron(_) => (Some(self.text.clone()), None),
            Rule::Every(_) => (None, Some(self.text.clone())),
        };
        let wire = Wire {
            cron,
            every,
            zone: self.zone.to_string(),
            start: self.start_ms,
            end: self.end_ms,
            count: self.count,
            missed: self.missed,
            n: self.n,
            catching_up: self.catching_up,
            version_ms: self.version_ms,
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Reads an `sm-recur` header's value.
    pub fn decode(raw: &[u8]) -> Result<Recurrence, RecurError> {
        let corrupt = |why: String| RecurError::Corrupt(why);
        let wire: Wire = serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string()))?;
        let (rule, text) = match (wire.cron, wire.every) {
            (Some(c), None) => (Rule::Cron(Box::new(cron_pattern(&c)?)), c),
            (None, Some(e)) => (Rule::Every(every_period(&e)?), e),
            _ => return Err(corrupt("neither cron nor every".into())),
        };
        let zone = Zone::from_str(&wire.zone).map_err(|e| corrupt(e.to_string()))?;
        Ok(Recurrence {
            rule,
            text,
            zone,
            start_ms: wire.start,
            end_ms: wire.end,
            count: wire.count,
            missed: wire.missed,
            n: wire.n.max(1),
            catching_up: wire.catching_up,
            version_ms: wire.version_ms,
        })
    }

    /// The user-facing headers that make this schedule again (on a DLQ copy, so that it can be
    /// sent back as it is): the rule, the zone, `missed`, `count`, and the bounds as epoch
    /// milliseconds. Sent back, it starts afresh: `count` counts from there.
    pub fn user_headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let rule = match self.rule {
            Rule::Cron(_) => header::CRON,
            Rule::Every(_) => header::EVERY,
        };
        let missed = match self.missed {
            Missed::One => "one",
            Missed::All => "all",
            Missed::None => "none",
        };
        let mut out = vec![
            (rule, self.text.clone()),
            (header::ZONE, self.zone.to_string()),
            (header::MISSED, missed.to_string()),
        ];
        out.extend(self.start_ms.map(|s| (header::START, s.to_string())));
        out.extend(self.end_ms.map(|e| (header::END, e.to_string())));
        out.extend(self.count.map(|c| (header::COUNT, c.to_string())));
        out.into_iter()
            .map(|(name, value)| (name.to_string(), Some(value.into_bytes())))
            .collect()
    }

    /// What `GET /api/schedules/{id}` shows: `cron 0 9 * * MON-FRI in Europe/Paris`.
    pub fn describe(&self) -> String {
        match self.rule {
            Rule::Cron(_) => format!("cron {} in {}", self.text, self.zone),
            Rule::Every(_) => format!("every {}", self.text),
        }
    }

    /// The first occurrence of a user's record that gives no `time`, made at `from_ms` (its
    /// timestamp): for `cron`, the first match at or after it (and `start`); for `every`, the
    /// first point of the grid from `start` at or after it, or one period after it without a
    /// `start`. `None` past `end` or out of range.
    pub fn first(&self, from_ms: i64) -> Option<i64> {
        let from = self.start_ms.map_or(from_ms, |s| s.max(from_ms));
        let at = match &self.rule {
            Rule::Cron(cron) => cron_at_or_after(cron, self.zone, from)?,
            Rule::Every(period) => match self.start_ms {
                // On the grid from `start`.
                Some(start) => {
                    let steps = (from.checked_sub(start)?.max(0))
                        .checked_add(period - 1)?
                        .div_euclid(*period);
                    start.checked_add(period.checked_mul(steps)?)?
                }
                // A period after the record was made.
                None => from_ms.checked_add(*period)?,
            },
        };
        self.within_end(at)
    }

    /// The first occurrence strictly after `t_ms`, on the grid of the occurrence due at `due_ms`
    /// (for `every`), within `end`.
    fn after(&self, due_ms: i64, t_ms: i64) -> Option<i64> {
        let at = match &self.rule {
            Rule::Cron(cron) => cron_at_or_after(cron, self.zone, t_ms.checked_add(1)?)?,
            Rule::Every(period) => {
                let steps = t_ms.checked_sub(due_ms)?.max(0).div_euclid(*period) + 1;
                due_ms.checked_add(period.checked_mul(steps)?)?
            }
        };
        self.within_end(at)
    }

    /// `at`, unless it is past `end` or beyond what a due time can be.
    fn within_end(&self, at: i64) -> Option<i64> {
        (self.end_ms.is_none_or(|end| at <= end) && DueTime::from_millis(at).is_ok()).then_some(at)
    }

    /// What to do with this occurrence, due at `due_ms`, published at `now_ms`: deliver it or
    /// not (`missed: none`), and which occurrence comes next.
    ///
    /// An occurrence was missed when it is published more than [`MISFIRE_MS`] late. Missed,
    /// `one` delivers it and resumes with the first occurrence after now; `all` delivers it and
    /// goes on with its successor (late too, so published at once), at most [`MAX_CATCH_UP`] in
    /// a row; `none` drops it and resumes after now.
    pub fn turn(&self, due_ms: i64, now_ms: i64) -> Turn {
        let successor = self.after(due_ms, due_ms);
        let missed = now_ms - due_ms > MISFIRE_MS;
        let deliver = !(missed && self.missed == Missed::None);
        if deliver && self.count.is_some_and(|c| self.n >= c) {
            return Turn {
                deliver,
                next: None,
            };
        }
        let (at, catching_up) = match (missed, self.missed) {
            (false, _) => (successor, 0),
            (true, Missed::All) if self.catching_up < MAX_CATCH_UP => {
                (successor, self.catching_up + 1)
            }
            (true, _) => (self.after(due_ms, now_ms), 0),
        };
        let next = at.map(|at| {
            let mut r = self.clone();
            r.n = if deliver {
                self.n.saturating_add(1)
            } else {
                self.n
            };
            r.catching_up = catching_up;
            (at, r)
        });
        Turn { deliver, next }
    }

    /// An occurrence's due time as `sm-occurrence` shows it: RFC 3339 in the schedule's zone.
    pub fn occurrence(&self, due_ms: i64) -> String {
        match Utc.timestamp_millis_opt(due_ms).single() {
            Some(t) => t
                .with_timezone(&self.zone.tz())
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            None => due_ms.to_string(),
        }
    }
}

/// The first instant at or after `from_ms` (rounded up to the second: cron has no finer unit)
/// whose wall clock in `zone` the pattern matches, a repeated wall-clock time counting on its
/// first pass only.
///
/// croner answers a wall-clock time that happens twice with its earlier instant, even when the
/// search began in the later pass: from 01:30:30 EST on a fall-back night, `*/5 * * * *` gave
/// 01:35 EDT, an hour before the search began, and a chain filed from it would come due again
/// and again until the clock left the repeated hour. Such an answer is searched again from the
/// end of the repeated hour.
fn cron_at_or_after(cron: &Cron, zone: Zone, from_ms: i64) -> Option<i64> {
    let mut search = from_ms.div_euclid(1000) + i64::from(from_ms.rem_euclid(1000) != 0);
    for _ in 0..3 {
        let from: DateTime<chrono_tz::Tz> = Utc
            .timestamp_opt(search, 0)
            .single()?
            .with_timezone(&zone.tz());
        let at = cron
            .find_next_occurrence(&from, true)
            .ok()?
            .timestamp_millis();
        if at >= from_ms {
            return Some(at);
        }
        search = end_of_repeat(zone, search)?;
    }
    None
}

/// The first whole minute at or after `t_s` (epoch seconds) whose wall-clock time in `zone`
/// happens once: the end of a repeated hour that `t_s` lies in. Daylight-saving overlaps last
/// an hour or two, and change on a whole minute.
fn end_of_repeat(zone: Zone, t_s: i64) -> Option<i64> {
    let tz = zone.tz();
    let mut t = t_s.div_euclid(60) * 60;
    for _ in 0..=(24 * 60) {
        let local = Utc
            .timestamp_opt(t, 0)
            .single()?
            .with_timezone(&tz)
            .naive_local();
        if t > t_s && tz.from_local_datetime(&local).single().is_some() {
            return Some(t);
        }
        t += 60;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rec(headers: &[(&str, &str)]) -> Result<Option<Recurrence>, RecurError> {
        let map: HashMap<String, Vec<u8>> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        Recurrence::from_headers(|name| map.get(name).map(Vec::as_slice))
    }

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .expect("a test time")
            .timestamp_millis()
    }

    #[test]
    fn bad_recurrences_are_refused_with_a_reason() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[("cron", "61 * * * *")], "invalid cron"),
            (&[("cron", "* * * * *"), ("every", "1m")], "not both"),
            (&[("every", "500ms")], "shorter than one second"),
            (&[("every", "soon")], "invalid 'every'"),
            (&[("every", "1m"), ("zone", "Mars/Olympus")], "unknown zone"),
            (
                &[
                    ("every", "1m"),
                    ("start", "2027-01-02T00:00:00Z"),
                    ("end", "2027-01-01T00:00:00Z"),
                ],
                "before 'start'",
            ),
            (&[("every", "1m"), ("count", "0")], "invalid 'count'"),
            (&[("every", "1m"), ("missed", "some")], "invalid 'missed'"),
        ];
        for (headers, want) in cases {
            let err = rec(headers).expect_err("refused");
            assert!(err.to_string().contains(want), "{headers:?}: {err}");
        }
        assert_eq!(rec(&[("topic", "x")]), Ok(None), "not a recurrence");
    }

    #[test]
    fn the_header_round_trips() {
        let r = rec(&[
            ("cron", "0 9 * * MON-FRI"),
            ("zone", "Europe/Paris"),
            ("start", "2027-01-01 00:00:00"),
            ("count", "10"),
            ("missed", "all"),
        ])
        .expect("valid")
        .expect("a recurrence");
        assert_eq!(r.start_ms, Some(ms("2027-01-01T00:00:00+01:00")));
        assert_eq!(Recurrence::decode(r.encode().as_bytes()), Ok(r.clone()));
        assert_eq!(r.describe(), "cron 0 9 * * MON-FRI in Europe/Paris");
    }

    #[test]
    fn every_is_elapsed_time_on_a_grid() {
        let r = rec(&[("every", "30s"), ("start", "2027-01-01T00:00:00Z")])
            .unwrap()
            .unwrap();
        let start = ms("2027-01-01T00:00:00Z");
        assert_eq!(r.first(start - 5_000), Some(start));
        assert_eq!(r.first(start + 1), Some(start + 30_000));
        let t = r.turn(start, start + 10);
        assert!(t.deliver);
        assert_eq!(
            t.next.as_ref().map(|(at, r)| (*at, r.n)),
            Some((start + 30_000, 2))
        );
        // Without a start: a period after the record was made.
        let r = rec(&[("every", "1m")]).unwrap().unwrap();
        assert_eq!(r.first(1_000_000), Some(1_060_000));
    }

    #[test]
    fn count_and_end_stop_the_schedule() {
        let r = rec(&[("every", "1s"), ("count", "2")]).unwrap().unwrap();
        let first = r.turn(10_000, 10_000);
        let (at, second) = first.next.expect("a second occurrence");
        assert_eq!(at, 11_000);
        assert_eq!(second.turn(at, at).next, None, "count 2 reached");
        let base = ms("2027-01-01T00:00:00Z");
        let end = (base + 10_000).to_string();
        let r = rec(&[("every", "1s"), ("end", &end)]).unwrap().unwrap();
        assert_eq!(
            r.turn(base + 9_000, base + 9_000).next.map(|n| n.0),
            Some(base + 10_000)
        );
        assert_eq!(
            r.turn(base + 10_000, base + 10_000).next,
            None,
            "end is inclusive, and reached"
        );
    }

    #[test]
    fn missed_occurrences_follow_the_policy() {
        let base = ms("2027-01-01T00:00:00Z");
        let policy = |p: &str| {
            rec(&[
                ("every", "1m"),
                ("missed", p),
                ("start", "2027-01-01T00:00:00Z"),
            ])
            .unwrap()
            .unwrap()
        };
        // Published 10 minutes and 30 s late: nine successors are due already.
        let now = base + 630_000;
        let one = policy("one").turn(base, now);
        assert!(one.deliver);
        assert_eq!(
            one.next.map(|n| n.0),
            Some(base + 660_000),
            "resumes after now"
        );
        let all = policy("all").turn(base, now);
        assert!(all.deliver);
        let (at, r) = all.next.expect("the successor");
        assert_eq!(
            (at, r.catching_up),
            (base + 60_000, 1),
            "each missed one, in turn"
        );
        let none = policy("none").turn(base, now);
        assert!(!none.deliver, "a missed occurrence is dropped");
        let (at, r) = none.next.expect("resumes");
        assert_eq!(
            (at, r.n),
            (base + 660_000, 1),
            "a dropped occurrence is not counted"
        );
        // On time: every policy delivers and goes on with the successor.
        for p in ["one", "all", "none"] {
            let t = policy(p).turn(base, base + 5);
            assert!(t.deliver, "{p}");
            assert_eq!(t.next.map(|n| n.0), Some(base + 60_000), "{p}");
        }
        // A delay under the misfire threshold is no miss: caught up one by one, even by `none`.
        let every_second = rec(&[("every", "1s"), ("missed", "none")])
            .unwrap()
            .unwrap();
        let t = every_second.turn(base, base + 3_000);
        assert!(t.deliver);
        assert_eq!(t.next.map(|n| n.0), Some(base + 1_000));
        // `all` stops catching up after MAX_CATCH_UP in a row.
        let mut r = policy("all");
        r.catching_up = MAX_CATCH_UP;
        assert_eq!(r.turn(base, now).next.map(|n| n.0), Some(base + 660_000));
    }

    /// Every minute in New York across both daylight-saving changes of 2027 fires exactly once
    /// per wall-clock minute that exists: none in the skipped hour, and each minute of the
    /// repeated hour once (its first pass); a fixed time fires once on each change day.
    #[test]
    fn cron_across_daylight_saving_changes_in_new_york() {
        use chrono::{NaiveDateTime, TimeDelta};
        let zone = chrono_tz::America::New_York;
        let every_minute = rec(&[("cron", "* * * * *"), ("zone", "America/New_York")])
            .unwrap()
            .unwrap();
        let wall = |t: i64| {
            Utc.timestamp_millis_opt(t)
                .unwrap()
                .with_timezone(&zone)
                .naive_local()
        };
        for (from, to, repeated) in [
            // Spring forward: 02:00 EST becomes 03:00 EDT; 02:00-02:59 do not exist.
            ("2027-03-14T01:30:00-05:00", "2027-03-14T03:30:00-04:00", 0),
            // Fall back: 02:00 EDT becomes 01:00 EST; 01:00-01:59 happen twice.
            ("2027-11-07T00:30:00-04:00", "2027-11-07T02:30:00-05:00", 60),
        ] {
            let (from, to) = (ms(from), ms(to));
            let mut due = every_minute.first(from).expect("an occurrence");
            let mut fired = vec![due];
            while due < to {
                due = every_minute.turn(due, due).next.expect("goes on").0;
                fired.push(due);
            }
            // Every wall-clock minute from the first to the last label that exists in the zone.
            let mut existing: Vec<NaiveDateTime> = Vec::new();
            let mut label = wall(from);
            while label <= wall(to) {
                if zone.from_local_datetime(&label).earliest().is_some() {
                    existing.push(label);
                }
                label += TimeDelta::minutes(1);
            }
            let labels: Vec<NaiveDateTime> = fired.iter().map(|t| wall(*t)).collect();
            assert_eq!(labels, existing, "once per wall-clock minute that exists");
            // In real time: every minute, but for the repeated hour's second pass.
            assert_eq!(
                fired.len() as i64,
                (to - from) / 60_000 + 1 - repeated,
                "{repeated} minutes that repeat"
            );
        }

        let half_past_two = rec(&[("cron", "30 2 * * *"), ("zone", "America/New_York")])
            .unwrap()
            .unwrap();
        let days = |from: &str, n: usize| {
            let mut due = half_past_two.first(ms(from)).expect("an occurrence");
            let mut out = vec![due];
            for _ in 1..n {
                due = half_past_two.turn(due, due).next.expect("goes on").0;
                out.push(due);
            }
            out.into_iter()
                .map(|d| half_past_two.occurrence(d))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            days("2027-03-13T00:00:00-05:00", 3),
            [
                "2027-03-13T02:30:00-05:00",
                // 02:30 does not exist that night: once, at the first valid time after the gap.
                "2027-03-14T03:00:00-04:00",
                "2027-03-15T02:30:00-04:00",
            ]
        );
        assert_eq!(
            days("2027-11-06T00:00:00-04:00", 3),
            [
                "2027-11-06T02:30:00-04:00",
                "2027-11-07T02:30:00-05:00",
                "2027-11-08T02:30:00-05:00",
            ]
        );
        // From inside the repeated hour's second pass: nothing until the clock leaves it (croner
        // alone answered 01:35 EDT, an hour in the past).
        let every_five = rec(&[("cron", "*/5 * * * *"), ("zone", "America/New_York")])
            .unwrap()
            .unwrap();
        let inside = ms("2027-11-07T01:30:30-05:00");
        let first = every_five.first(inside).expect("an occurrence");
        assert_eq!(every_five.occurrence(first), "2027-11-07T02:00:00-05:00");
        let next = every_five.turn(first, inside).next.expect("goes on").0;
        assert!(next > first, "never back in time");

        let half_past_one = rec(&[("cron", "30 1 * * *"), ("zone", "America/New_York")])
            .unwrap()
            .unwrap();
        let first = half_past_one
            .first(ms("2027-11-07T00:00:00-04:00"))
            .expect("an occurrence");
        assert_eq!(half_past_one.occurrence(first), "2027-11-07T01:30:00-04:00");
        let next = half_past_one.turn(first, first).next.expect("goes on").0;
        // 01:30 happens twice that night: only the first counts.
        assert_eq!(half_past_one.occurrence(next), "2027-11-08T01:30:00-05:00");
    }
}
