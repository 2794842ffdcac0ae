//! The domain: header names, a scheduled record as parsed once at the door, why a record is refused,
//! and the records built for each next place (a slice, the target, the dead-letter topic).
//!
//! Parsing happens once, here; everything downstream holds a [`Scheduled`] whose due time and
//! target are already valid. Internal headers are rebuilt on every hop, never appended.

use crate::facts::Version;
use crate::recur::{self, RecurError, Recurrence};
use crate::time::{DueTime, TimeError, Zone};

/// Header names. Everything starting with `sm-` is reserved for the scheduler.
pub mod header {
    /// When to deliver (user-supplied).
    pub const TIME: &str = "time";
    /// Where to deliver (user-supplied).
    pub const TOPIC: &str = "topic";
    /// The schedule's id (user-supplied, optional).
    pub const ID: &str = "id";
    /// The schedule's id, on every delivered copy (and on slice copies of the earlier format).
    pub const SM_ID: &str = "sm-id";
    /// The due time in UTC epoch milliseconds, on every delivered copy (and on slice copies of the
    /// earlier format).
    pub const SM_DUE_MS: &str = "sm-due-ms";
    /// Written by the db-scheduler baseline only (`sm-path: mysql`), so that the SMS workload
    /// can tell its copies apart. The scheduler's own copies go without it (a copy without it is
    /// the workload's way of saying `kafka`): a delivered copy carries only what names its
    /// schedule, not a label of this project's benchmark.
    pub const SM_PATH: &str = "sm-path";
    /// Slice copies of the earlier format (still read, so that records written before an
    /// upgrade are delivered after it): the validated target topic...
    pub const SM_TOPIC: &str = "sm-topic";
    /// ...`partition-offset` of the record in the ingest topic (the tie-break that keeps the order
    /// of records due at the same instant)...
    pub const SM_ORIGIN: &str = "sm-origin";
    /// ...and how many slices the record had passed through. [`SM_COPY`] carries all three now.
    pub const SM_HOPS: &str = "sm-hops";
    /// The version of a record with an id (`<timestamp ms>.<partition>.<offset>`, see
    /// [`crate::facts::Version`]): on slice copies and delivered copies, so that (`sm-id`,
    /// `sm-version`) names one version and an exact duplicate can be told from a newer one. A
    /// header of its own, not a field of [`SM_COPY`], so that an instance of the previous release
    /// still reads the slice copies of a rolling upgrade.
    pub const SM_VERSION: &str = "sm-version";
    /// Everything a slice copy needs, in one header (see [`super::SliceCopy`]): one compact header
    /// instead of six named ones (and the user's `time`, `topic` and `id`, which it replaces), so
    /// fewer bytes in every slice write and read.
    pub const SM_COPY: &str = "sm-copy";
    /// On a dead-lettered copy: the reason code.
    pub const SM_ERROR: &str = "sm-error";
    /// On a dead-lettered copy: the reason in words.
    pub const SM_ERROR_DETAIL: &str = "sm-error-detail";
    /// On a dead-lettered copy: `topic/partition/offset` it was read from.
    pub const SM_SOURCE: &str = "sm-source";
    /// The prefix of every reserved header.
    pub const RESERVED_PREFIX: &str = "sm-";
}

/// A header as it came off the wire. The name may not be UTF-8, which rdkafka's own accessor
/// would panic on, so records are read through [`crate::kafka::detach`] into this form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    pub name: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A record read from Kafka, detached from the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (the producer's clock, or the broker's with `LogAppendTime`); 0
    /// when it has none. It orders the versions of an id.
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
}

impl Incoming {
    /// Bytes of key, value and headers: what a copy of it holds in memory.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum();
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len) + headers
    }

    /// The last header with this name (Kafka's `lastHeader` convention for repeated names).
    fn last(&self, name: &str) -> Option<&RawHeader> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.name == name.as_bytes())
    }

    /// `topic/partition/offset`, for logs and the DLQ's `sm-source` header.
    pub fn source(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// A header that will be written: a UTF-8 name and an optional value.
pub type Header = (String, Option<Vec<u8>>);

/// A record on its way to its next place. Owned, so a failed send can be retried or
/// dead-lettered without going back to the consumer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    /// The partition to write to; `None`: the producer's partitioner chooses (by key).
    pub partition: Option<i32>,
}

impl Outgoing {
    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// The position of a record in the ingest topic. Ids default to it, and it orders records due at
/// the same millisecond the way they were produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
}

impl Origin {
    fn encode(&self) -> String {
        format!("{}-{}", self.partition, self.offset)
    }

    fn decode(s: &str) -> Option<Origin> {
        let (p, o) = s.split_once('-')?;
        Some(Origin {
            partition: p.parse().ok()?,
            offset: o.parse().ok()?,
        })
    }
}

/// A target topic that passed every check: a legal Kafka name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetTopic(String);

impl TargetTopic {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The topics a user may never target: the ingest topic, its DLQ, the slices, and anything starting
/// with `__` (Kafka's own `__consumer_offsets`, `__transaction_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalTopics {
    pub ingest: String,
    pub dlq: String,
    /// The facts of ids (cancels, reschedules, deliveries): compacted, never a target.
    pub state: String,
    pub slice_prefix: String,
}

impl InternalTopics {
    pub fn contains(&self, topic: &str) -> bool {
        topic == self.ingest
            || topic == self.dlq
            || topic == self.state
            || topic.starts_with(&self.slice_prefix)
            || topic.starts_with("__")
    }

    /// Checks a target topic name: Kafka's rules (1-249 characters of `[A-Za-z0-9._-]`, not `.`
    /// or `..`), then that it is not internal.
    pub fn target(&self, name: &str) -> Result<TargetTopic, Rejection> {
        let legal = !name.is_empty()
            && name.len() <= 249
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !legal {
            return Err(Rejection::InvalidTopic(name.chars().take(300).collect()));
        }
        if self.contains(name) {
            return Err(Rejection::InternalTopic(name.to_string()));
        }
        Ok(TargetTopic(name.to_string()))
    }
}

/// Why a record goes to the dead-letter topic instead of its target. Each has a stable code for
/// the `sm-error` header and a sentence for `sm-error-detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the record has no 'time' header")]
    MissingTime,
    #[error("the 'time' header is invalid: {0}")]
    InvalidTime(#[from] TimeError),
    #[error("the record has no 'topic' header")]
    MissingTopic,
    #[error("the 'topic' header is not a legal topic name: {0:?}")]
    InvalidTopic(String),
    #[error("the target topic {0:?} is internal to the scheduler or to Kafka")]
    InternalTopic(String),
    #[error("the 'id' header must be UTF-8 of 1 to 256 bytes")]
    InvalidId,
    #[error("a header name is not UTF-8")]
    InvalidHeaderName,
    #[error("an internal record is corrupt: {0}")]
    CorruptInternal(String),
    #[error("the target topic {0:?} does not exist and the broker will not create it")]
    UnknownTopic(String),
    #[error("the broker refused the record: {0}")]
    RefusedByBroker(String),
    #[error("the target topic {topic:?} took no record for {for_secs} s while the broker answered: {error}")]
    TargetUnavailable {
        topic: String,
        for_secs: u64,
        error: String,
    },
    #[error("a 'cancel' record needs an 'id' header: the id to cancel")]
    MissingId,
    #[error("the 'cancel' header must be exactly \"true\" (got {0:?})")]
    InvalidCancel(String),
    #[error("invalid recurrence: {0}")]
    InvalidRecurrence(#[from] RecurError),
}

impl Rejection {
    /// The `sm-error` code: stable, lowercase, for filters and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MissingTime => "missing-time",
            Rejection::InvalidTime(_) => "invalid-time",
            Rejection::MissingTopic => "missing-topic",
            Rejection::InvalidTopic(_) => "invalid-topic",
            Rejection::InternalTopic(_) => "internal-topic",
            Rejection::InvalidId => "invalid-id",
            Rejection::InvalidHeaderName => "invalid-header",
            Rejection::CorruptInternal(_) => "corrupt-internal-record",
            Rejection::UnknownTopic(_) => "unknown-topic",
            Rejection::RefusedByBroker(_) => "refused-by-broker",
            Rejection::TargetUnavailable { .. } => "target-unavailable",
            Rejection::MissingId => "missing-id",
            Rejection::InvalidCancel(_) => "invalid-cancel",
            Rejection::InvalidRecurrence(_) => "invalid-recurrence",
        }
    }
}

/// Header that turns a record with an `id` into a cancel of that id.
pub const CANCEL: &str = "cancel";

/// What a record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Deliver it at its time (with an id: the id's newest schedule).
    Schedule,
    /// Cancel every older version of this id; the record's key, value, `time` and `topic` are
    /// ignored, so a client may send the original back with one header added.
    Cancel,
}

/// Reads the `cancel` header. Absent: a schedule (a null value is never a cancel: a scheduled
/// tombstone for a compacted target is a real use). `true`: a cancel, which needs an id. Any other
/// value is refused, so that a typo never turns into a reschedule carrying the cancel's payload.
pub fn command(cancel: Option<&[u8]>, has_id: bool) -> Result<Command, Rejection> {
    match cancel {
        None => Ok(Command::Schedule),
        Some(b"true") if has_id => Ok(Command::Cancel),
        Some(b"true") => Err(Rejection::MissingId),
        Some(other) => Err(Rejection::InvalidCancel(
            String::from_utf8_lossy(other).chars().take(64).collect(),
        )),
    }
}

/// A record accepted for scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    /// The user's `id`, or the record's origin (`partition-offset`) when it had none.
    pub id: String,
    /// Whether `id` came from the user (a copy sent to the DLQ then carries it again).
    pub explicit_id: bool,
    /// The version of a record with a user's id: only the newest version of an id is delivered.
    /// `None` without an id (such records cannot be cancelled, and cost nothing).
    pub version: Option<Version>,
    pub due: DueTime,
    pub target: TargetTopic,
    pub origin: Origin,
    pub hops: u32,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The user's headers in order, without the scheduling ones (`time`, `topic`, `id`, and a
    /// recurring schedule's `cron`, `every`, `zone`...: their meaning is in the fields above) and
    /// without reserved `sm-*` ones.
    pub user_headers: Vec<Header>,
    /// A recurring schedule's rule and where it stands: this record is one occurrence. Boxed:
    /// every record the timer holds carries this field, few of them a recurrence.
    pub recurrence: Option<Box<Recurrence>>,
}

/// The one internal header of a slice copy: `1;<due ms>;<hops>;<origin>;<target>;<id>`, where
/// `<id>` is empty when the id is the origin. The id comes last because it may hold `;`; the target
/// cannot (it is a legal topic name). The leading `1` is the format's version.
struct SliceCopy;

impl SliceCopy {
    const VERSION: &'static str = "1";

    fn encode(s: &Scheduled) -> String {
        format!(
            "{};{};{};{};{};{}",
            Self::VERSION,
            s.due.as_millis(),
            s.hops.saturating_add(1),
            s.origin.encode(),
            s.target.as_str(),
            if s.explicit_id { s.id.as_str() } else { "" }
        )
    }

    /// `(due ms, hops, origin, target, explicit id)`, or what is wrong with it.
    fn decode(v: &str) -> Result<(i64, u32, Origin, &str, Option<&str>), &'static str> {
        let mut parts = v.splitn(6, ';');
        let mut next = || parts.next().ok_or("too few fields in sm-copy");
        if next()? != Self::VERSION {
            return Err("unknown sm-copy version");
        }
        let due = next()?.parse().map_err(|_| "bad due time in sm-copy")?;
        let hops = next()?.parse().map_err(|_| "bad hop count in sm-copy")?;
        let origin = Origin::decode(next()?).ok_or("bad origin in sm-copy")?;
        let target = next()?;
        let id = Some(next()?).filter(|id| !id.is_empty());
        Ok((due, hops, origin, target, id))
    }
}

/// Whether a user header is one of the scheduling headers, whose meaning the scheduler keeps in
/// [`Scheduled`]'s fields: a recurring record's recurrence headers too (a one-off record's `zone`
/// or `count` is the user's own and travels on).
fn is_scheduling(name: &str, recurring: bool) -> bool {
    name == header::TIME
        || name == header::TOPIC
        || name == header::ID
        || (recurring && recur::header::ALL.contains(&name))
}

fn utf8(raw: &[u8]) -> Option<&str> {
    std::str::from_utf8(raw).ok()
}

/// The user's headers: UTF-8 names only; reserved and scheduling ones dropped.
fn user_headers(rec: &Incoming, recurring: bool) -> Result<Vec<Header>, Rejection> {
    let mut out = Vec::with_capacity(rec.headers.len());
    for h in &rec.headers {
        let name = utf8(&h.name).ok_or(Rejection::InvalidHeaderName)?;
        if !name.starts_with(header::RESERVED_PREFIX) && !is_scheduling(name, recurring) {
            out.push((name.to_string(), h.value.clone()));
        }
    }
    Ok(out)
}

/// What a valid record of the ingest topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Deliver it at its time (with an id: the id's newest version).
    Schedule(Scheduled),
    /// Cancel every older version of `id`: the record's key, value, `time` and `topic` are
    /// ignored, so a client may send the original back with one header added.
    Cancel { id: String, version: Version },
}

impl Ingested {
    /// Parses a record from the ingest topic: `id` and `cancel` first (a cancel needs neither
    /// `time` nor `topic`; a malformed cancel says why: `missing-id`, `invalid-cancel`), then
    /// `time` and `topic` for a schedule.
    pub fn parse(
        rec: &Incoming,
        default_zone: Zone,
        internal: &InternalTopics,
    ) -> Result<Ingested, Rejection> {
        // Header names are checked first: a name that is not UTF-8 is refused as such.
        user_headers(rec, false)?;
        let origin = Origin {
            partition: rec.partition,
            offset: rec.offset,
        };
        let (id, explicit_id) = match rec.last(header::ID).and_then(|h| h.value.as_deref()) {
            None => (origin.encode(), false),
            Some(raw) => match utf8(raw) {
                Some(id) if !id.is_empty() && id.len() <= 256 => (id.to_string(), true),
                _ => return Err(Rejection::InvalidId),
            },
        };
        let version = explicit_id.then_some(Version {
            timestamp_ms: rec.timestamp_ms,
            partition: origin.partition,
            offset: origin.offset,
        });
        // A `cancel` header with a null value is a malformed cancel, not an absent one.
        let cancel = rec
            .last(CANCEL)
            .map(|h| h.value.as_deref().unwrap_or_default());
        if let (Command::Cancel, Some(version)) = (command(cancel, explicit_id)?, version) {
            return Ok(Ingested::Cancel { id, version });
        }
        let mut recurrence = match rec.last(recur::header::SM_RECUR) {
            // An occurrence the scheduler filed: the recurrence as it stands.
            Some(h) => Some(Recurrence::decode(h.value.as_deref().unwrap_or_default())?),
            None => {
                Recurrence::from_headers(|name| rec.last(name).and_then(|h| h.value.as_deref()))?
            }
        }
        .map(Box::new);
        if let Some(r) = recurrence.as_mut() {
            if !explicit_id {
                return Err(RecurError::MissingId.into());
            }
            // The schedule's versions order by its own record's timestamp, carried by every
            // occurrence the scheduler files (see `crate::recur`).
            if r.version_ms.is_none() {
                if rec.timestamp_ms <= 0 {
                    return Err(RecurError::NoTimestamp.into());
                }
                r.version_ms = Some(rec.timestamp_ms);
            }
        }
        let version = version.map(|v| Version {
            timestamp_ms: recurrence
                .as_ref()
                .and_then(|r| r.version_ms)
                .unwrap_or(v.timestamp_ms),
            ..v
        });
        let time = rec.last(header::TIME).and_then(|h| h.value.as_deref());
        let due = match (time, &recurrence) {
            (Some(time), _) => DueTime::parse_bytes(time, default_zone)?,
            // A recurrence without `time`: its first occurrence from when the record was made.
            (None, Some(r)) => {
                let first = r.first(rec.timestamp_ms).ok_or(RecurError::NoOccurrence)?;
                DueTime::from_millis(first)?
            }
            (None, None) => return Err(Rejection::MissingTime),
        };
        let topic = rec
            .last(header::TOPIC)
            .and_then(|h| h.value.as_deref())
            .ok_or(Rejection::MissingTopic)?;
        let topic = utf8(topic).ok_or_else(|| {
            Rejection::InvalidTopic(String::from_utf8_lossy(topic).chars().take(300).collect())
        })?;
        let target = internal.target(topic.trim())?;
        Ok(Ingested::Schedule(Scheduled {
            id,
            explicit_id,
            version,
            due,
            target,
            origin,
            hops: 0,
            key: rec.key.clone(),
            payload: rec.payload.clone(),
            user_headers: user_headers(rec, recurrence.is_some())?,
            recurrence,
        }))
    }
}

impl Scheduled {
    /// Parses a record from a slice topic, written by [`Scheduled::to_slice`]: the compact
    /// `sm-copy` header, or the named headers an earlier version wrote (still read, so that
    /// records written before an upgrade are delivered after it).
    pub fn from_slice(rec: &Incoming, internal: &InternalTopics) -> Result<Scheduled, Rejection> {
        let corrupt =
            |what: &str| Rejection::CorruptInternal(format!("{what} at {}", rec.source()));
        let text = |name: &str| {
            rec.last(name)
                .and_then(|h| h.value.as_deref())
                .and_then(utf8)
                .ok_or_else(|| corrupt(&format!("missing or non-UTF-8 {name}")))
        };
        let (due_ms, hops, origin, target, id) = match rec.last(header::SM_COPY) {
            Some(_) => SliceCopy::decode(text(header::SM_COPY)?).map_err(corrupt)?,
            None => (
                text(header::SM_DUE_MS)?
                    .parse()
                    .map_err(|_| corrupt("bad sm-due-ms"))?,
                text(header::SM_HOPS)?
                    .parse()
                    .map_err(|_| corrupt("bad sm-hops"))?,
                Origin::decode(text(header::SM_ORIGIN)?).ok_or_else(|| corrupt("bad sm-origin"))?,
                text(header::SM_TOPIC)?,
                Some(text(header::SM_ID)?),
            ),
        };
        let due = DueTime::from_millis(due_ms).map_err(|_| corrupt("due time out of range"))?;
        // Legacy copies always named the id; one equal to the origin was the default.
        let explicit_id = id.is_some_and(|id| id != origin.encode());
        // A copy of a record with an id written before versions existed is version 0 of its
        // origin: any cancel or reschedule made since supersedes it.
        let version = match rec.last(header::SM_VERSION) {
            Some(_) => Some(
                Version::decode(text(header::SM_VERSION)?)
                    .ok_or_else(|| corrupt("bad sm-version"))?,
            ),
            None => explicit_id.then_some(Version {
                timestamp_ms: 0,
                partition: origin.partition,
                offset: origin.offset,
            }),
        };
        Ok(Scheduled {
            explicit_id,
            version,
            id: id.map_or_else(|| origin.encode(), str::to_string),
            due,
            target: internal.target(target)?,
            origin,
            hops,
            key: rec.key.clone(),
            payload: rec.payload.clone(),
            user_headers: user_headers(rec, false)?,
            recurrence: rec
                .last(recur::header::SM_RECUR)
                .map(|h| Recurrence::decode(h.value.as_deref().unwrap_or_default()).map(Box::new))
                .transpose()
                .map_err(|e| corrupt(&e.to_string()))?,
        })
    }

    /// The copy written into a slice topic: the user's other headers and one internal header.
    pub fn to_slice(&self, topic: String) -> Outgoing {
        let mut headers = Vec::with_capacity(self.user_headers.len() + 2);
        headers.extend(self.user_headers.iter().cloned());
        headers.push(h(header::SM_COPY, SliceCopy::encode(self)));
        if let Some(v) = self.version {
            headers.push(h(header::SM_VERSION, v.encode()));
        }
        if let Some(r) = &self.recurrence {
            headers.push(h(recur::header::SM_RECUR, r.encode()));
        }
        Outgoing {
            topic,
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
            ..Default::default()
        }
    }

    /// The delivered copy: same key and value, the user's own headers (the scheduling headers
    /// `time`, `topic` and `id` removed, so the copy cannot be re-scheduled by accident), plus
    /// `sm-id` and `sm-due-ms`, and `sm-version` for a record with an id. Nothing more (see
    /// [`header::SM_PATH`]).
    pub fn to_target(&self) -> Outgoing {
        let mut headers: Vec<Header> = Vec::with_capacity(self.user_headers.len() + 3);
        headers.extend(self.user_headers.iter().cloned());
        headers.push(h(header::SM_ID, self.id.clone()));
        if let Some(v) = self.version {
            headers.push(h(header::SM_VERSION, v.encode()));
        }
        headers.push(h(header::SM_DUE_MS, self.due.as_millis().to_string()));
        if let Some(r) = &self.recurrence {
            headers.push(h(
                recur::header::SM_OCCURRENCE,
                r.occurrence(self.due.as_millis()),
            ));
        }
        Outgoing {
            topic: self.target.as_str().to_string(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
            ..Default::default()
        }
    }

    /// Builds an outgoing copy with `build` and moves the key and value into it instead of
    /// copying them, so that a record on its way is held once, not twice;
    /// [`Scheduled::restore_body`] brings them back when it must go elsewhere (the DLQ).
    pub fn lend_body(&mut self, build: impl FnOnce(&Scheduled) -> Outgoing) -> Outgoing {
        let (key, payload) = (self.key.take(), self.payload.take());
        let mut out = build(self);
        out.key = key;
        out.payload = payload;
        out
    }

    /// Takes the key and value back from `out` (see [`Scheduled::lend_body`]).
    pub fn restore_body(&mut self, out: &mut Outgoing) {
        if self.key.is_none() {
            self.key = out.key.take();
        }
        if self.payload.is_none() {
            self.payload = out.payload.take();
        }
    }

    /// The dead-lettered copy of an accepted record the target refused: `time` (as epoch
    /// milliseconds), `topic` and `id` (when the user gave one), so that it can be resubmitted as
    /// it is after a fix, then the user's other headers and the reason.
    pub fn to_dlq(&self, dlq: &str, why: &Rejection) -> Outgoing {
        let mut headers = vec![
            h(header::TIME, self.due.as_millis().to_string()),
            h(header::TOPIC, self.target.as_str().to_string()),
        ];
        if self.explicit_id {
            headers.push(h(header::ID, self.id.clone()));
        }
        if let Some(r) = &self.recurrence {
            headers.extend(r.user_headers());
        }
        headers.extend(self.user_headers.iter().cloned());
        headers.extend(reason_headers(why));
        headers.push(h(header::SM_ID, self.id.clone()));
        Outgoing {
            topic: dlq.to_string(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
            ..Default::default()
        }
    }
}

impl Scheduled {
    /// The record that files a recurring schedule's next occurrence, due at `at_ms` with the
    /// recurrence `next`, into the ingest topic: the same key, value and user headers, `time`,
    /// `topic`, `id` and `sm-recur`, which carries the schedule's own timestamp for its version.
    /// It goes to this occurrence's ingest partition, so that it is newer than this occurrence
    /// (a later offset) and older than whatever the user sent after the schedule (see
    /// [`crate::recur`]); its record timestamp is the producer's clock, so retention and the
    /// broker's timestamp checks treat it as the new record it is.
    pub fn next_occurrence(&self, ingest: &str, at_ms: i64, next: &Recurrence) -> Outgoing {
        let time =
            DueTime::from_millis(at_ms).map_or_else(|_| at_ms.to_string(), |d| d.to_rfc3339());
        let mut headers = vec![
            h(header::TIME, time),
            h(header::TOPIC, self.target.as_str().to_string()),
            h(header::ID, self.id.clone()),
            h(recur::header::SM_RECUR, next.encode()),
        ];
        headers.extend(self.user_headers.iter().cloned());
        Outgoing {
            topic: ingest.to_string(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
            partition: Some(self.origin.partition),
        }
    }
}

fn h(name: &str, value: String) -> Header {
    (name.to_string(), Some(value.into_bytes()))
}

fn reason_headers(why: &Rejection) -> [Header; 2] {
    [
        h(header::SM_ERROR, why.code().to_string()),
        h(header::SM_ERROR_DETAIL, why.to_string()),
    ]
}

/// The dead-lettered copy of a record the scheduler made itself (a recurring schedule's next
/// occurrence the ingest topic refused): the record as it was, to the DLQ, with the reason.
pub fn dead_lettered(mut out: Outgoing, dlq: &str, why: &Rejection) -> Outgoing {
    out.topic = dlq.to_string();
    out.partition = None;
    out.headers.extend(reason_headers(why));
    out
}

/// The dead-lettered copy of a record refused at the door: the original record with every header
/// it had (a name that is not UTF-8 is written lossily, the only change), plus the reason and
/// where it was read from.
pub fn dlq_original(rec: &Incoming, dlq: &str, why: &Rejection) -> Outgoing {
    let mut headers: Vec<Header> = rec
        .headers
        .iter()
        .map(|hd| {
            (
                String::from_utf8_lossy(&hd.name).into_owned(),
                hd.value.clone(),
            )
        })
        .collect();
    headers.extend(reason_headers(why));
    headers.push(h(header::SM_SOURCE, rec.source()));
    Outgoing {
        topic: dlq.to_string(),
        key: rec.key.clone(),
        payload: rec.payload.clone(),
        headers,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn internal() -> InternalTopics {
        InternalTopics {
            ingest: "SCHEDULED_MESSAGES".into(),
            dlq: "SCHEDULED_MESSAGES.DLQ".into(),
            state: "SCHEDULED_MESSAGES.STATE".into(),
            slice_prefix: "__SM_SLICE".into(),
        }
    }

    /// A schedule parsed from the ingest topic.
    fn schedule(
        rec: &Incoming,
        zone: Zone,
        internal: &InternalTopics,
    ) -> Result<Scheduled, Rejection> {
        match Ingested::parse(rec, zone, internal)? {
            Ingested::Schedule(s) => Ok(s),
            cancel => panic!("not a schedule: {cancel:?}"),
        }
    }

    fn rec(headers: &[(&str, &[u8])]) -> Incoming {
        Incoming {
            topic: "SCHEDULED_MESSAGES".into(),
            partition: 3,
            offset: 17,
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"k".to_vec()),
            payload: Some(b"v".to_vec()),
            headers: headers
                .iter()
                .map(|(n, v)| RawHeader {
                    name: n.as_bytes().to_vec(),
                    value: Some(v.to_vec()),
                })
                .collect(),
        }
    }

    /// An outgoing record as it is read back at `offset`, with the partition and timestamp it
    /// was written with.
    fn read_back_at(out: &Outgoing, offset: i64) -> Incoming {
        Incoming {
            topic: out.topic.clone(),
            partition: out.partition.unwrap_or(0),
            offset,
            timestamp_ms: 1_800_000_000_000,
            key: out.key.clone(),
            payload: out.payload.clone(),
            headers: out
                .headers
                .iter()
                .map(|(n, v)| RawHeader {
                    name: n.as_bytes().to_vec(),
                    value: v.clone(),
                })
                .collect(),
        }
    }

    /// A recurring record: its first occurrence counts from its timestamp; its recurrence
    /// headers are the scheduler's, not the user's; it crosses a slice whole; its delivered copy
    /// says which occurrence it is; its next occurrence, filed into the ingest topic, is a newer
    /// version of the id on the same partition, and reads back as the second occurrence.
    #[test]
    fn a_recurring_record_crosses_every_hop_and_files_its_next_occurrence() {
        let headers: [(&str, &[u8]); 5] = [
            ("topic", b"reminders"),
            ("id", b"standup"),
            ("every", b"1m"),
            ("zone", b"Europe/Paris"),
            ("trace-id", b"t-1"),
        ];
        let incoming = rec(&headers);
        let s = schedule(&incoming, Zone::UTC, &internal()).expect("a recurring schedule");
        assert_eq!(s.due.as_millis(), incoming.timestamp_ms + 60_000);
        let names: Vec<&str> = s.user_headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["trace-id"], "every and zone are the schedule's");
        let r = s.recurrence.clone().expect("a recurrence");
        assert_eq!((r.n, r.describe()), (1, "every 1m".to_string()));

        let slice = s.to_slice("__SM_SLICE.1.0".into());
        let swept = Scheduled::from_slice(&read_back_at(&slice, 5), &internal()).expect("a copy");
        assert_eq!(swept.recurrence, s.recurrence);

        let delivered = swept.to_target();
        assert!(delivered.header("sm-occurrence").is_some());
        assert!(delivered.header(recur::header::SM_RECUR).is_none());
        assert!(delivered.header("every").is_none());

        let turn = r.turn(s.due.as_millis(), s.due.as_millis() + 3);
        let (at, next) = turn.next.expect("a next occurrence");
        let filed = swept.next_occurrence("SCHEDULED_MESSAGES", at, &next);
        assert_eq!(filed.partition, Some(incoming.partition));
        let again = schedule(&read_back_at(&filed, 90), Zone::UTC, &internal()).expect("parses");
        assert_eq!(again.due.as_millis(), at);
        assert_eq!(again.recurrence.as_ref().map(|r| r.n), Some(2));
        assert_eq!(again.user_headers, s.user_headers);
        assert!(
            again.version > s.version,
            "newer than the occurrence before it"
        );
        // Read back with the filing's own record timestamp, it still orders by the schedule's.
        assert_eq!(
            again.version.map(|v| v.timestamp_ms),
            Some(incoming.timestamp_ms)
        );

        // A one-off record's own `zone` or `count` header is the user's, and travels on.
        let one_off = rec(&[
            ("time", b"2030-01-01T00:00:00Z"),
            ("topic", b"t"),
            ("zone", b"mine"),
        ]);
        let s = schedule(&one_off, Zone::UTC, &internal()).expect("a one-off schedule");
        assert_eq!(s.recurrence, None);
        assert_eq!(
            s.user_headers,
            vec![("zone".to_string(), Some(b"mine".to_vec()))]
        );
    }

    #[test]
    fn bad_recurrences_are_refused_with_a_reason() {
        let parse = |h: &[(&str, &[u8])]| {
            Ingested::parse(&rec(h), Zone::UTC, &internal()).map_err(|e| e.to_string())
        };
        let no_id = parse(&[("topic", b"t"), ("every", b"1m")]).expect_err("refused");
        assert!(no_id.contains("needs an 'id'"), "{no_id}");
        let past_end = parse(&[
            ("topic", b"t"),
            ("id", b"x"),
            ("every", b"1m"),
            ("end", b"2001-01-01T00:00:00Z"),
        ])
        .expect_err("refused");
        assert!(past_end.contains("no occurrence"), "{past_end}");
        let corrupt = parse(&[
            ("topic", b"t"),
            ("id", b"x"),
            ("time", b"2030-01-01T00:00:00Z"),
            ("sm-recur", b"{"),
        ])
        .expect_err("refused");
        assert!(corrupt.contains("corrupt"), "{corrupt}");
    }

    #[test]
    fn a_cancel_is_a_cancel_of_its_id_and_a_malformed_one_says_why() {
        let zone = Zone::UTC;
        let parse = |r: &Incoming| Ingested::parse(r, zone, &internal()).map_err(|e| e.code());
        let time: &[u8] = b"2030-01-01T00:00:00Z";
        let version = Version {
            timestamp_ms: 1_700_000_000_000,
            partition: 3,
            offset: 17,
        };
        let cancel_of = |id: &str| {
            Ok(Ingested::Cancel {
                id: id.into(),
                version,
            })
        };
        // With time and topic, as a client sending the original back with one header added.
        let cancel = [
            ("time", time),
            ("topic", b"t"),
            ("id", b"order-1"),
            ("cancel", b"true"),
        ];
        assert_eq!(parse(&rec(&cancel)), cancel_of("order-1"));
        assert_eq!(
            parse(&rec(&[("id", b"order-1"), ("cancel", b"true")])),
            cancel_of("order-1"),
            "a cancel needs no time or topic"
        );
        assert_eq!(parse(&rec(&[("cancel", b"true")])), Err("missing-id"));
        assert_eq!(
            parse(&rec(&[
                ("time", time),
                ("topic", b"t"),
                ("id", b"x"),
                ("cancel", b"yes")
            ])),
            Err("invalid-cancel")
        );
        let mut null_cancel = rec(&[("time", time), ("topic", b"t"), ("id", b"x")]);
        null_cancel.headers.push(RawHeader {
            name: b"cancel".to_vec(),
            value: None,
        });
        assert_eq!(parse(&null_cancel), Err("invalid-cancel"));
        // A null value with time and topic is a scheduled tombstone, never a cancel.
        let mut tombstone = rec(&[("time", time), ("topic", b"t"), ("id", b"x")]);
        tombstone.payload = None;
        let s = schedule(&tombstone, zone, &internal()).expect("a schedule");
        assert_eq!(s.payload, None);
        assert_eq!(s.version, Some(version));
        // Its copies name the version, so that a duplicate can be told from a newer version.
        let out = s.to_target();
        assert_eq!(out.header("sm-version"), Some(version.encode().as_bytes()));
        let slice =
            Scheduled::from_slice(&read_back(&s.to_slice("__SM_SLICE_1".into())), &internal());
        assert_eq!(slice.map(|c| c.version), Ok(Some(version)));
        // Without an id: no version, no header, nothing to cancel.
        let plain = schedule(&rec(&[("time", time), ("topic", b"t")]), zone, &internal()).unwrap();
        assert_eq!(plain.version, None);
        assert_eq!(plain.to_target().header("sm-version"), None);
    }

    /// The record as a consumer would read back what `out` wrote.
    fn read_back(out: &Outgoing) -> Incoming {
        read_back_at(out, 0)
    }

    #[test]
    fn a_good_record_survives_every_hop_intact() {
        let r = rec(&[
            ("trace", b"abc"),
            ("time", b"2030-01-01T00:00:00Z"),
            ("topic", b"orders"),
            ("sm-hops", b"99"),
        ]);
        let s = schedule(&r, Zone::UTC, &internal()).unwrap();
        assert_eq!(s.id, "3-17");
        assert_eq!(s.target.as_str(), "orders");
        // Reserved headers from the user are dropped, not trusted.
        assert!(s.user_headers.iter().all(|(n, _)| !n.starts_with("sm-")));

        let out = s.to_slice("__SM_SLICE_16000MS_5".into());
        // One internal header, and the user's other headers: nothing else for the broker to store.
        let names: Vec<&str> = out.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["trace", "sm-copy"]);
        let s2 = Scheduled::from_slice(&read_back(&out), &internal()).unwrap();
        assert_eq!(s2.hops, 1);
        assert_eq!(
            s2,
            Scheduled {
                hops: 1,
                ..s.clone()
            }
        );
        // Internal headers are replaced on each hop, never appended.
        let again = s2.to_slice("t".into());
        assert_eq!(again.headers.len(), 2);
        let s3 = Scheduled::from_slice(&read_back(&again), &internal()).unwrap();
        assert_eq!(s3.hops, 2);

        let delivered = s2.to_target();
        assert_eq!(delivered.topic, "orders");
        assert_eq!(delivered.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(delivered.payload.as_deref(), Some(&b"v"[..]));
        let names: Vec<&str> = delivered.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["trace", "sm-id", "sm-due-ms"]);
    }

    #[test]
    fn a_lent_body_travels_once_and_comes_back_for_the_dlq() {
        let r = rec(&[
            ("time", b"1700000000000"),
            ("topic", b"orders"),
            ("id", b"x"),
        ]);
        let original = schedule(&r, Zone::UTC, &internal()).unwrap();
        let mut s = original.clone();
        let mut out = s.lend_body(Scheduled::to_target);
        assert_eq!(out, original.to_target(), "the copy sent is whole");
        assert!(s.key.is_none() && s.payload.is_none(), "and held once");
        s.restore_body(&mut out);
        let why = Rejection::UnknownTopic("orders".into());
        assert_eq!(s.to_dlq("DLQ", &why), original.to_dlq("DLQ", &why));
    }

    #[test]
    fn an_explicit_id_with_separators_survives_a_slice_and_returns_on_the_dlq_copy() {
        let r = rec(&[
            ("time", b"1700000000000"),
            ("topic", b"t"),
            ("id", b"order;42;x"),
        ]);
        let s = schedule(&r, Zone::UTC, &internal()).unwrap();
        assert!(s.explicit_id);
        let back = Scheduled::from_slice(&read_back(&s.to_slice("x".into())), &internal()).unwrap();
        assert_eq!((back.id.as_str(), back.explicit_id), ("order;42;x", true));
        // Refused by its target later: the DLQ copy can be produced again as it is.
        let dlq = back.to_dlq("DLQ", &Rejection::UnknownTopic("t".into()));
        let again = schedule(&read_back(&dlq), Zone::UTC, &internal()).unwrap();
        assert_eq!((again.id, again.due, again.target), (s.id, s.due, s.target));
    }

    #[test]
    fn slice_copies_of_the_earlier_format_are_still_read() {
        let legacy = rec(&[
            ("trace", b"abc"),
            ("time", b"2030-01-01T00:00:00Z"),
            ("topic", b"orders"),
            ("sm-id", b"5-9"),
            ("sm-due-ms", b"1893456000000"),
            ("sm-topic", b"orders"),
            ("sm-origin", b"5-9"),
            ("sm-hops", b"2"),
            ("sm-slice", b"3:7"),
        ]);
        let s = Scheduled::from_slice(&legacy, &internal()).unwrap();
        assert_eq!((s.id.as_str(), s.explicit_id, s.hops), ("5-9", false, 2));
        assert_eq!(s.due.as_millis(), 1_893_456_000_000);
        assert_eq!(
            s.user_headers,
            vec![("trace".to_string(), Some(b"abc".to_vec()))]
        );
        let corrupt = rec(&[("sm-copy", b"1;12;x;0-1;t;")]);
        assert_eq!(
            Scheduled::from_slice(&corrupt, &internal())
                .unwrap_err()
                .code(),
            "corrupt-internal-record"
        );
    }

    #[test]
    fn an_explicit_id_is_kept() {
        let r = rec(&[
            ("time", b"1700000000000"),
            ("topic", b"t"),
            ("id", b"order-42"),
        ]);
        assert_eq!(schedule(&r, Zone::UTC, &internal()).unwrap().id, "order-42");
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        type Case<'a> = (&'a [(&'a str, &'a [u8])], &'a str);
        let cases: [Case; 9] = [
            (&[("topic", b"t")], "missing-time"),
            (&[("time", b"soon"), ("topic", b"t")], "invalid-time"),
            (&[("time", b"1700000000000")], "missing-topic"),
            (
                &[("time", b"1700000000000"), ("topic", b"a b")],
                "invalid-topic",
            ),
            (
                &[("time", b"1700000000000"), ("topic", b"")],
                "invalid-topic",
            ),
            (
                &[("time", b"1700000000000"), ("topic", b"SCHEDULED_MESSAGES")],
                "internal-topic",
            ),
            (
                &[
                    ("time", b"1700000000000"),
                    ("topic", b"__SM_SLICE_1000MS_0"),
                ],
                "internal-topic",
            ),
            (
                &[("time", b"1700000000000"), ("topic", b"__consumer_offsets")],
                "internal-topic",
            ),
            (
                &[("time", b"1700000000000"), ("topic", b"t"), ("id", b"")],
                "invalid-id",
            ),
        ];
        for (headers, code) in cases {
            let err = schedule(&rec(headers), Zone::UTC, &internal()).unwrap_err();
            assert_eq!(err.code(), code, "{headers:?}");
        }
        let mut bad_name = rec(&[("time", b"1700000000000"), ("topic", b"t")]);
        bad_name.headers.push(RawHeader {
            name: vec![0xff],
            value: None,
        });
        let err = schedule(&bad_name, Zone::UTC, &internal()).unwrap_err();
        assert_eq!(err, Rejection::InvalidHeaderName);
        // The DLQ copy keeps everything, with the reason and the source.
        let dlq = dlq_original(&bad_name, "DLQ", &err);
        assert_eq!(dlq.payload.as_deref(), Some(&b"v"[..]));
        assert_eq!(dlq.header("sm-error"), Some(&b"invalid-header"[..]));
        assert_eq!(
            dlq.header("sm-source"),
            Some(&b"SCHEDULED_MESSAGES/3/17"[..])
        );
        assert_eq!(dlq.headers.len(), 3 + 3);
    }

    proptest! {
        /// Hostile headers never panic the parser: each record is either accepted or rejected.
        #[test]
        fn arbitrary_headers_never_panic(
            headers in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..12),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))),
                0..8),
            with_time in any::<bool>(),
        ) {
            let mut r = rec(&[]);
            r.headers = headers.into_iter().map(|(name, value)| RawHeader { name, value }).collect();
            if with_time {
                r.headers.push(RawHeader { name: b"time".to_vec(), value: Some(b"0".to_vec()) });
            }
            match schedule(&r, Zone::UTC, &internal()) {
                Ok(s) => { let _ = s.to_target(); }
                Err(e) => { let _ = dlq_original(&r, "DLQ", &e); }
            }
            let _ = Scheduled::from_slice(&r, &internal());
        }
    }

    #[test]
    fn a_null_value_with_a_time_is_a_schedule_and_cancel_needs_true_and_an_id() {
        assert_eq!(command(None, false), Ok(Command::Schedule));
        assert_eq!(command(None, true), Ok(Command::Schedule));
        assert_eq!(command(Some(b"true"), true), Ok(Command::Cancel));
        assert_eq!(command(Some(b"true"), false), Err(Rejection::MissingId));
        for typo in [&b"True"[..], b"yes", b"1", b"", b"false"] {
            assert!(
                matches!(command(Some(typo), true), Err(Rejection::InvalidCancel(_))),
                "{typo:?}"
            );
        }
    }
}
