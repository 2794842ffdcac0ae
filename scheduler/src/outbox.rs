//! The outbox: every record the engine sends (to a slice, a target or the DLQ), its byte budget,
//! and what happens when the broker acknowledges or refuses it.
//!
//! Receives [`Send`]s from ingest, the sweeps and the timer; a send holds a share of the memory
//! budget ([`Budget`]) from the moment its record is read until the broker acknowledged it in its
//! next place, then finishes its offset ticket. Each failure has one fate, decided by [`fate`]:
//! retried in place with backoff and jitter, dead-lettered with a reason, the missing slice topic
//! created again, or the process halted (a refused DLQ write, a fatal client error): never dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{Outgoing, Rejection, Scheduled};
use crate::facts::Fact;
use crate::kafka::{self, Lookup, TopicSpec, BROKER_TIMEOUT};
use crate::lanes::Lanes;
use crate::lifecycle::Lifecycle;
use crate::metrics as m;
use crate::offsets::{Offsets, Ticket};
use crate::progress::{ActiveSweep, Placed, SliceWrite};
use crate::retry::backoff;
use crate::state::fact_record;
use crate::status::FailingTarget;
use crate::targets::{Mode, TargetHealth};
use crate::time::Clock;

/// Records and targets refused for good inside a transaction (exactly-once), with why and when:
/// process-wide, so that the engine started again after the abort dead-letters them before
/// sending, instead of aborting again on the same record for ever. Keyed by the record's source
/// (`topic/partition/offset`) when the record itself was refused (too large for its target), by
/// the target when the target refuses everything (not authorised, a policy). Forgotten after
/// `--target-give-up`, when they are tried again.
static REFUSING_TARGETS: std::sync::LazyLock<Mutex<HashMap<String, (Instant, Rejection)>>> =
    std::sync::LazyLock::new(Mutex::default);

/// Remembers that `key` (see [`refusal_key`]) was refused for good (see [`REFUSING_TARGETS`]).
fn remember_refusal(key: String, why: Rejection) {
    kafka::lock(&REFUSING_TARGETS).insert(key, (Instant::now(), why));
}

/// What a refusal inside a transaction is remembered under: the record's source when the broker
/// refused the record itself, else the target.
fn refusal_key(err: &KafkaError, send: &Send) -> String {
    match err.rdkafka_error_code() {
        Some(code) if refuses_the_record(code) => source_key(&send.ticket),
        _ => send.out.topic.clone(),
    }
}

/// Whether a send error says the record itself is unacceptable (wherever it is sent), not its
/// destination.
fn refuses_the_record(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidMessage
            | C::InvalidRecord
            | C::BadMessage
            | C::InvalidTimestamp
    )
}

fn source_key(t: &Ticket) -> String {
    format!("{}/{}/{}", t.topic, t.partition, t.offset)
}

/// Why the send's target, or its record, is refused, if it was within `window`.
fn refusal(send: &Send, window: Duration) -> Option<Rejection> {
    let mut map = kafka::lock(&REFUSING_TARGETS);
    if map.is_empty() {
        return None;
    }
    map.retain(|_, (at, _)| at.elapsed() < window);
    map.get(&send.out.topic)
        .or_else(|| map.get(&source_key(&send.ticket)))
        .map(|(_, why)| why.clone())
}

/// Sends of one record retried this many times for an error code [`fate`] does not know, before
/// the record is dead-lettered (a target) or the process halts (our own topics).
const UNKNOWN_ERROR_ATTEMPTS: usize = 5;

/// The bytes of records held in memory at once: in the timer, and sent but not acknowledged.
/// Reading stops while it is exhausted, so memory follows the budget, not the input. A handle:
/// clones share one budget.
///
/// Records the timer holds may take at most three quarters of it, so that sends in flight always
/// have room; and records held by choice (due within the hold horizon, which a slice could take
/// instead) at most half of that, so that records only the timer can take (due in a window whose
/// sweep has begun) find room. Without these parts, records held by choice took the whole budget
/// and ingest waited, for the next record only the timer could take, until their delivery freed
/// room: at 10,000/s due 5 s ahead, 29% of records reached the timer past due.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total: u32,
    holds: Arc<Semaphore>,
    hold_total: u32,
}

/// Bytes per permit: small enough that a record of a few hundred bytes is not charged a multiple
/// of its cost, large enough that a u32 counts budgets up to 1 TiB.
const UNIT: u64 = 256;

/// A record's share of the [`Budget`], given back when its last clone is dropped: of the whole,
/// and, for a record the timer holds, of the part holds may take, kept until its delivery is
/// acknowledged (or dead-lettered), so that part bounds the timer and the deliveries in flight
/// together.
///
/// A record with an id read from the ingest topic is on its way twice (its fact to the state
/// topic, its copy to its next place) and stays in flight until both are acknowledged: the fact's
/// send and the copy hold clones of one share, sized for both, so the record holds all of it
/// until the last of the two is acknowledged. With a share of its own, the fact held about 1 KiB
/// while its record stayed in flight after its copy was placed, and ingest read on: in a burst
/// whose facts were acknowledged later than its slice writes, 300 records of 2 KiB were in
/// flight within a budget that admits 170.
#[derive(Clone)]
pub struct Share(Arc<Permits>);

struct Permits {
    all: OwnedSemaphorePermit,
    _hold: Option<OwnedSemaphorePermit>,
}

impl Share {
    fn new(all: OwnedSemaphorePermit, hold: Option<OwnedSemaphorePermit>) -> Share {
        Share(Arc::new(Permits { all, _hold: hold }))
    }

    /// Bytes of the whole budget this share holds.
    pub fn bytes(&self) -> u64 {
        self.0.all.num_permits() as u64 * UNIT
    }
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        let total = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        let hold_total = (u64::from(total) * 3 / 4).max(1) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            holds: Arc::new(Semaphore::new(hold_total as usize)),
            hold_total,
        }
    }

    /// A record's share in permits: at least one, and never more than `of`, so that a record
    /// larger than the budget still goes through alone.
    fn share(bytes: usize, of: u32) -> u32 {
        u32::try_from((bytes as u64).div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, of)
    }

    async fn acquire(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
        sem.clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphores are never closed")
    }

    /// Waits until `bytes` fit: a send (a slice write, a fact, a DLQ copy).
    pub async fn reserve(&self, bytes: usize) -> Share {
        Share::new(
            Self::acquire(&self.permits, Self::share(bytes, self.total)).await,
            None,
        )
    }

    /// Waits until a record only the timer can take fits among the records it holds, then in the
    /// whole.
    pub async fn reserve_hold(&self, bytes: usize) -> Share {
        let hold = Self::acquire(&self.holds, Self::share(bytes, self.hold_total)).await;
        Share::new(
            Self::acquire(&self.permits, Self::share(bytes, self.total)).await,
            Some(hold),
        )
    }

    /// Reserves `bytes` for a record the timer may hold by choice, if they fit now within the
    /// half of the holds' part left to choice.
    pub fn try_reserve_hold(&self, bytes: usize) -> Option<Share> {
        let n = Self::share(bytes, self.hold_total);
        let left = self.holds.available_permits() as u64;
        if left < u64::from(n) + u64::from(self.hold_total / 2) {
            return None;
        }
        let hold = self.holds.clone().try_acquire_many_owned(n).ok()?;
        let all = self
            .permits
            .clone()
            .try_acquire_many_owned(Self::share(bytes, self.total))
            .ok()?;
        Some(Share::new(all, Some(hold)))
    }

    /// Bytes of the whole budget.
    pub fn total(&self) -> u64 {
        u64::from(self.total) * UNIT
    }

    /// Bytes in use now.
    pub fn used(&self) -> u64 {
        u64::from(self.total).saturating_sub(self.permits.available_permits() as u64) * UNIT
    }
}

/// What one record held by the engine is charged beyond its bytes (counted three times: the parsed
/// record, the outgoing copy, librdkafka's): bookkeeping, the timer's map entry, the collector's
/// entry (424 B for a send in flight) and librdkafka's message.
///
/// Measured on Kafka 4.4 on 2026-12-06 with every record held (a 1 GiB budget), an ordinary client
/// at 10,000 and 20,000 records/s of 200 B due 5 s ahead: peak resident 71-75 MiB with 50,000
/// held and 155 MiB with 100,000, against 22 MiB idle, so 1.0-1.3 KiB a record; 3 x 210 + 512 B
/// charges 1.1 KiB (1,280 B in 256 B units). The 2 KiB used before, in whole KiB, charged such a
/// record 3 KiB: the default budget admitted 8,192 held records where 25,000 fit.
const PER_RECORD_OVERHEAD: usize = 512;

/// The memory a record of `bytes` (key, value and headers) occupies while the engine holds it:
/// three copies (the parsed record, the outgoing copy, librdkafka's) plus [`PER_RECORD_OVERHEAD`].
pub fn in_memory(bytes: usize) -> usize {
    3 * bytes + PER_RECORD_OVERHEAD
}

/// [`in_memory`] of a parsed record.
pub fn weight(s: &Scheduled) -> usize {
    let headers: usize = s
        .user_headers
        .iter()
        .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    in_memory(s.key.as_ref().map_or(0, Vec::len) + s.payload.as_ref().map_or(0, Vec::len) + headers)
}

/// What acknowledging a send means.
#[derive(Debug, Clone, Copy)]
pub enum Then {
    Slice {
        level: usize,
    },
    Deliver {
        due_ms: i64,
    },
    DeadLetter {
        reason: &'static str,
    },
    /// A fact of an id in the state topic (`pending`, `cancelled`, `delivered`); `read_mark`
    /// when it is the fact of an ingest record, which counts as handled for its partition's
    /// watermark ([`crate::watermark`]) once the fact is acknowledged.
    Fact {
        fact: &'static str,
        read_mark: bool,
    },
    /// A recurring schedule's next occurrence, filed into the ingest topic.
    Recur,
}

/// A record on its way, with what to do once it is acknowledged.
pub(crate) struct Send {
    pub(crate) out: Outgoing,
    pub(crate) then: Then,
    /// The parsed record, to build a DLQ copy from if the destination refuses it for good; its
    /// key and value travel in `out` meanwhile (lent, see `Scheduled::lend_body`).
    pub(crate) scheduled: Option<Scheduled>,
    pub(crate) ticket: Ticket,
    pub(crate) sweep: Option<Arc<ActiveSweep>>,
    /// Held while the record is on its way into a slice window (see `sweep::SliceWrites`).
    pub(crate) slice_write: Option<SliceWrite>,
    /// A recurring schedule's next occurrence, filed into the ingest topic once this delivery is
    /// acknowledged, before the record's offset may be committed ([`crate::recur`]).
    pub(crate) next: Option<Box<Outgoing>>,
    /// Its share of the memory budget, held until the send is dropped (acknowledged, or
    /// abandoned at shutdown).
    pub(crate) _permit: Share,
}

/// Where a send was going, for [`fate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Target,
    Slice,
    DeadLetter,
    State,
    /// A recurring schedule's next occurrence, into the ingest topic.
    Ingest,
}

impl Then {
    fn destination(&self) -> Destination {
        match self {
            Then::Slice { .. } => Destination::Slice,
            Then::Deliver { .. } => Destination::Target,
            Then::DeadLetter { .. } => Destination::DeadLetter,
            Then::Fact { .. } => Destination::State,
            Then::Recur => Destination::Ingest,
        }
    }
}

/// What follows a failed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The broker or the network is unwell; the record is fine: retry in place with backoff.
    Retry,
    /// Not an error this table knows: retry a few times, then treat as refused for good.
    RetryFew,
    /// The record can never be accepted there: send it to the DLQ with this reason.
    DeadLetter(Rejection),
    /// One of our slice topics is gone (deleted by hand): create it again, then retry.
    RecreateSlice,
    /// Nothing this process can do fixes it (a refused DLQ write, authorisation, a fenced or
    /// fatal producer): stop taking work, report `failed`, keep the record uncommitted.
    Halt(String),
}

/// The one table of send errors: by librdkafka error code and destination (`topic`, named in
/// a rejection), what follows.
pub fn fate(err: &KafkaError, to: Destination, topic: &str) -> Fate {
    use RDKafkaErrorCode as C;
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        // Canceled (the producer is closing), a queue error, a client-side problem that
        // says nothing about the record.
        _ => return Fate::Retry,
    };
    let refused = || match to {
        Destination::DeadLetter => Fate::Halt(format!("the DLQ refused a record: {code}")),
        Destination::State => Fate::Halt(format!("the state topic refused a fact: {code}")),
        _ => Fate::DeadLetter(Rejection::RefusedByBroker(code.to_string())),
    };
    let ours_refused = || match to {
        // A next occurrence the ingest topic will not take (no WRITE there, a policy) ends its
        // schedule in the DLQ, where it can be sent back once fixed: halting would only have the
        // next owner deliver the occurrence again and halt again.
        Destination::Target | Destination::Ingest => {
            Fate::DeadLetter(Rejection::RefusedByBroker(code.to_string()))
        }
        Destination::Slice => Fate::Halt(format!("a slice topic refuses our writes: {code}")),
        Destination::DeadLetter => Fate::Halt(format!("the DLQ refuses our writes: {code}")),
        Destination::State => Fate::Halt(format!("the state topic refuses our writes: {code}")),
    };
    match code {
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => match to {
            Destination::Target => Fate::DeadLetter(Rejection::UnknownTopic(topic.to_string())),
            Destination::Slice => Fate::RecreateSlice,
            Destination::DeadLetter => Fate::Halt(format!("the DLQ topic is missing: {code}")),
            Destination::State => Fate::Halt(format!("the state topic is missing: {code}")),
            Destination::Ingest => Fate::Halt(format!("the ingest topic is missing: {code}")),
        },
        // The record itself is unacceptable, whoever sends it wherever.
        c if refuses_the_record(c) => refused(),
        // The destination will not take our writes: a target's problem is the record's; our own
        // topics' is the deployment's.
        C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::PolicyViolation
        | C::InvalidArgument
        | C::InvalidRequiredAcks => ours_refused(),
        C::Fatal
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::UnsupportedForMessageFormat
        | C::Authentication
        | C::SaslAuthenticationFailed => Fate::Halt(format!("producer error: {code}")),
        C::MessageTimedOut
        | C::RequestTimedOut
        | C::QueueFull
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::Resolve
        | C::KafkaStorageError
        | C::OutOfOrderSequenceNumber
        | C::DuplicateSequenceNumber
        | C::UnknownProducerId
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::ConcurrentTransactions
        | C::ThrottlingQuotaExceeded
        | C::PurgeQueue
        | C::PurgeInflight
        | C::BrokerDestroy
        | C::WaitCache
        | C::Retry
        | C::Fail => Fate::Retry,
        _ => Fate::RetryFew,
    }
}

/// Delays between retries of one send: 100 ms doubling to 5 s.
fn retry_delays() -> impl Iterator<Item = Duration> {
    backoff(Duration::from_millis(100), Duration::from_secs(5))
}

/// A send with its place in the outbox's order and its count of unknown errors.
pub(crate) struct Tracked {
    send: Send,
    seq: u64,
    unknown_attempts: usize,
    /// Holds one of the open transaction's unsettled sends (exactly-once; see
    /// [`crate::transaction::Txn::sent`]).
    counted: bool,
    /// Handed to the producer: a failure now is a failure of the transaction.
    enqueued: bool,
    /// When it was first handed over: a record waits at most `--target-give-up` for a target
    /// in trouble.
    born: Instant,
}

impl Tracked {
    fn new(send: Send, seq: u64) -> Tracked {
        Tracked {
            send,
            seq,
            unknown_attempts: 0,
            counted: false,
            enqueued: false,
            born: Instant::now(),
        }
    }

    fn to_target(&self) -> bool {
        matches!(self.send.then, Then::Deliver { .. })
    }
}

/// How a send handed to the producer ended.
enum Outcome {
    Acknowledged,
    Failed(KafkaError),
    /// The producer is gone (shutdown): the record stays uncommitted.
    Abandoned,
}

async fn outcome(queued: Result<DeliveryFuture, KafkaError>) -> Outcome {
    match queued {
        Ok(fut) => match fut.await {
            Ok(result) => match kafka::confirmed(result.map_err(|(e, _)| e)) {
                Ok(_) => Outcome::Acknowledged,
                Err(e) => Outcome::Failed(e),
            },
            Err(_) => Outcome::Abandoned,
        },
        Err(e) => Outcome::Failed(e),
    }
}

/// A send the producer has taken, waiting for the broker's answer in [`Outbox::collect`].
pub(crate) struct InFlight {
    tracked: Tracked,
    delivery: DeliveryFuture,
}

/// The outbox stage. Its state (the retry lanes, the health of each target, the tasks settling
/// failures) is its own; other stages hand it [`Send`]s through [`Outbox::send`] and ask it
/// only for what the status and a clean stop report.
pub(crate) struct Outbox {
    settings: Arc<Settings>,
    clock: Arc<dyn Clock>,
    per_record: Arc<m::PerRecord>,
    life: Arc<Lifecycle>,
    /// Told "finished" for each ticket whose record was acknowledged in its next place.
    offsets: Offsets,
    budget: Budget,
    lookup: Arc<Lookup>,
    /// Deliveries, facts and the DLQ.
    producer: FutureProducer,
    /// Slice writes: batched longer, and never in front of a due delivery. In the exactly-once
    /// mode both are the transactional producer.
    slice_producer: FutureProducer,
    /// For writes that are not the engine's sends (an HTTP cancel, the janitor's tombstones):
    /// never transactional.
    plain: FutureProducer,
    /// The exactly-once mode's transaction: first sends pass its gate.
    txn: Option<Arc<crate::transaction::Txn>>,
    /// Targets known to exist (exactly-once: a write to a missing topic would abort the whole
    /// transaction, so a record for one is dead-lettered before it is sent).
    known_targets: Mutex<std::collections::HashSet<String>>,
    /// The tasks settling failed sends, and the retry lanes: rare, and each may wait.
    acks: TaskTracker,
    /// Sends the producer took, to the acknowledgement collector ([`Outbox::collect`]).
    in_flight: mpsc::UnboundedSender<InFlight>,
    /// Sends waiting for a retry, per topic, in their first order (see [`crate::lanes`]).
    lanes: Mutex<Lanes<Tracked>>,
    /// Which targets are failing (see [`crate::targets`]).
    targets: Mutex<TargetHealth>,
    /// The order in which sends were handed over, for the lanes.
    send_seq: AtomicU64,
    /// When each slice topic found missing was last created again (see [`Outbox::failed`]).
    slices_recreated: Mutex<HashMap<String, Instant>>,
    /// Target topics whose deliveries fail on purpose, after the given time (test builds only),
    /// as a target whose partition leader is away would.
    #[cfg(feature = "testkit")]
    injected_refusals: Mutex<HashMap<String, Duration>>,
}

/// What the outbox is made of; [`Outbox::new`] adds its own state.
pub(crate) struct OutboxParts {
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    pub per_record: Arc<m::PerRecord>,
    pub life: Arc<Lifecycle>,
    pub offsets: Offsets,
    pub budget: Budget,
    pub lookup: Arc<Lookup>,
    pub producer: FutureProducer,
    pub slice_producer: FutureProducer,
    pub plain: FutureProducer,
    pub txn: Option<Arc<crate::transaction::Txn>>,
}

impl Outbox {
    /// The outbox, and the receiving end its collector ([`Outbox::collect`]) runs on.
    pub(crate) fn new(p: OutboxParts) -> (Arc<Outbox>, mpsc::UnboundedReceiver<InFlight>) {
        let (in_flight, queued) = mpsc::unbounded_channel();
        let give_up = p.settings.config.target_give_up;
        let outbox = Outbox {
            settings: p.settings,
            clock: p.clock,
            per_record: p.per_record,
            life: p.life,
            offsets: p.offsets,
            budget: p.budget,
            lookup: p.lookup,
            producer: p.producer,
            slice_producer: p.slice_producer,
            plain: p.plain,
            txn: p.txn,
            known_targets: Mutex::default(),
            acks: TaskTracker::new(),
            in_flight,
            lanes: Mutex::default(),
            targets: Mutex::new(TargetHealth::new(give_up)),
            send_seq: AtomicU64::new(0),
            slices_recreated: Mutex::default(),
            #[cfg(feature = "testkit")]
            injected_refusals: Mutex::default(),
        };
        (Arc::new(outbox), queued)
    }

    /// A producer for a write that is not a send of the engine's (the HTTP cancel's fact, the
    /// janitor's tombstones): never transactional.
    pub(crate) fn producer(&self) -> FutureProducer {
        self.plain.clone()
    }

    /// The targets failing now, for the status.
    pub(crate) fn failing_targets(&self, now: Instant) -> Vec<FailingTarget> {
        kafka::lock(&self.targets)
            .troubles(now)
            .into_iter()
            .map(|t| FailingTarget {
                topic: t.topic,
                for_secs: t.for_.as_secs(),
                error: t.error,
            })
            .collect()
    }

    /// What a stop leaves: deliveries the broker has not answered, records in retry lanes.
    pub(crate) fn left(&self) -> (u64, usize) {
        let unanswered = kafka::lock(&self.targets).in_flight();
        let waiting = kafka::lock(&self.lanes).held();
        (unanswered, waiting)
    }

    /// Waits until `end` for the failures being settled and the retry lanes (they end with the
    /// engine's token); false if some did not end.
    pub(crate) async fn settled_by(&self, end: tokio::time::Instant) -> bool {
        self.acks.close();
        tokio::time::timeout_at(end, self.acks.wait()).await.is_ok()
    }

    /// Flushes both producers (blocking: call it off the async threads).
    pub(crate) fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(timeout);
        let _ = self.slice_producer.flush(timeout);
    }

    /// Makes every delivery to `topic` fail after `after` (test builds only); `None` lets it
    /// take records again.
    #[cfg(feature = "testkit")]
    pub(crate) fn refuse_target(&self, topic: &str, after: Option<Duration>) {
        let mut refusals = kafka::lock(&self.injected_refusals);
        match after {
            Some(after) => refusals.insert(topic.to_string(), after),
            None => refusals.remove(topic),
        };
    }

    /// Enqueues the record now (so records leave in the order they are handed over); the one
    /// acknowledgement collector ([`Outbox::collect`]) awaits the broker's answer, so sends never
    /// wait on each other. While its topic has an open retry lane ([`crate::lanes`]), the record
    /// joins the lane instead, behind the records that failed before it.
    pub(crate) async fn send(self: &Arc<Self>, send: Send) {
        let seq = self.send_seq.fetch_add(1, Ordering::Relaxed);
        self.dispatch(Tracked::new(send, seq)).await;
    }

    /// Sends a record at once, unless its topic's lane is open (then it joins the lane).
    async fn dispatch(self: &Arc<Self>, t: Tracked) {
        let Some(t) = self.divert(t) else { return };
        self.send_now(t).await;
    }

    /// Hands a send to the producer, past any lane. In the exactly-once mode a first send
    /// passes the transaction's gate, and only while its partition is still ours: after a
    /// revoke committed the partition's progress, a send of it would reach the target twice.
    async fn send_now(self: &Arc<Self>, t: Tracked) {
        #[cfg(feature = "testkit")]
        let Some(t) = self.inject_refusal(t) else {
            return;
        };
        let mut t = t;
        let mut pass = None;
        if let Some(txn) = self.txn.as_ref().filter(|_| !t.counted) {
            if t.to_target() {
                let topic = &t.send.out.topic;
                let why = match refusal(&t.send, self.settings.config.target_give_up) {
                    Some(why) => Some(why),
                    None if !self.target_exists(topic).await => {
                        Some(Rejection::UnknownTopic(topic.clone()))
                    }
                    None => None,
                };
                if let Some(why) = why {
                    tracing::warn!(%topic, reason = why.code(), "the target refuses records; dead-lettering before sending");
                    return Box::pin(self.dead_letter_send(t.send, &why)).await;
                }
            }
            let entered = txn.enter().await;
            if !self.offsets.is_current(&t.send.ticket) {
                return self.revoked(t.send);
            }
            txn.sent();
            t.counted = true;
            pass = Some(entered);
        }
        match enqueue(self.producer_for(t.send.then), &t.send.out).await {
            Ok(delivery) => {
                t.enqueued = true;
                self.handed(&t);
                self.await_ack(t, delivery);
            }
            Err(e) => self.settle(t, Outcome::Failed(e)),
        }
        drop(pass);
    }

    /// A first send of a partition revoked meanwhile (exactly-once): not sent; it is pending in
    /// the progress its revoke committed, and its next owner sends it.
    fn revoked(&self, send: Send) {
        if let Some(sweep) = &send.sweep {
            sweep.placed(Placed::Elsewhere);
        }
    }

    /// Whether a target topic exists (exactly-once), from the metadata of the lookup client,
    /// which never creates topics. Known targets are remembered; when the broker does not
    /// answer, the send goes ahead (and a failure aborts the transaction, as any other).
    async fn target_exists(&self, topic: &str) -> bool {
        if kafka::lock(&self.known_targets).contains(topic) {
            return true;
        }
        let name = topic.to_string();
        match kafka::look(&self.lookup, move |l| {
            l.partition_count(&name, BROKER_TIMEOUT)
        })
        .await
        {
            Ok(0) => false,
            Ok(_) => {
                kafka::lock(&self.known_targets).insert(topic.to_string());
                true
            }
            Err(_) => true,
        }
    }

    /// A delivery to a target a test made refuse (test builds only): it goes nowhere, and fails
    /// as librdkafka reports a record its partition's leader never took, after the time the test
    /// chose, so that the stall, the lane, the probe and the give-up run as they would.
    #[cfg(feature = "testkit")]
    fn inject_refusal(self: &Arc<Self>, t: Tracked) -> Option<Tracked> {
        let after = kafka::lock(&self.injected_refusals)
            .get(&t.send.out.topic)
            .copied();
        let Some(after) = after.filter(|_| t.to_target()) else {
            return Some(t);
        };
        self.handed(&t);
        let me = self.clone();
        self.acks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = me.life.token().cancelled() => return,
            }
            let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
            me.settle(t, Outcome::Failed(timed_out));
        });
        None
    }

    /// Tells the target health a delivery went to the producer.
    fn handed(&self, t: &Tracked) {
        if t.to_target() {
            kafka::lock(&self.targets).sent(&t.send.out.topic, Instant::now());
        }
    }

    /// Tells the target health how a delivery ended.
    fn ended(&self, t: &Tracked, outcome: &Outcome) {
        if !t.to_target() {
            return;
        }
        let topic = &t.send.out.topic;
        let mut targets = kafka::lock(&self.targets);
        match outcome {
            Outcome::Acknowledged => {
                if targets.acknowledged(topic, Instant::now()) {
                    tracing::info!(%topic, "target takes records again");
                }
            }
            // Only what says something of the target: broker trouble with it (retried), or the
            // topic missing. A record refused for itself (too large) says nothing of the others.
            Outcome::Failed(e) => match fate(e, Destination::Target, topic) {
                Fate::Retry | Fate::RetryFew => {
                    if targets.failed(topic, &e.to_string(), Instant::now()) {
                        tracing::warn!(%topic, error = %e, "a target refuses deliveries; its records wait in a lane of their own");
                    }
                }
                Fate::DeadLetter(Rejection::UnknownTopic(_)) => {
                    targets.missing(topic, &e.to_string(), Instant::now())
                }
                _ => targets.abandoned(topic),
            },
            Outcome::Abandoned => targets.abandoned(topic),
        }
    }

    /// [`Outbox::dispatch`] for a send made while settling another (a DLQ copy, a delivered
    /// fact), which must not wait: at once when the producer's queue has room, else from a task
    /// that waits for it.
    fn follow_up(self: &Arc<Self>, mut t: Tracked) {
        // A follow-up belongs to the transaction of the send that caused it: counted before
        // that send is settled, and past the gate, which the commit waiting for it holds.
        if let Some(txn) = &self.txn {
            txn.sent();
            t.counted = true;
        }
        let Some(mut t) = self.divert(t) else { return };
        match self
            .producer_for(t.send.then)
            .send_result(kafka::record(&t.send.out))
        {
            Ok(delivery) => {
                t.enqueued = true;
                self.handed(&t);
                self.await_ack(t, delivery)
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                let me = self.clone();
                self.acks.spawn(async move { me.dispatch(t).await });
            }
            Err((e, _)) => self.settle(t, Outcome::Failed(e)),
        }
    }

    /// The send back, unless its topic has an open retry lane, which takes it, or is a target in
    /// trouble, whose lane it opens: a record for a target that takes nothing must not join the
    /// producer's queue (and hold its share of the budget there) behind records it never takes.
    fn divert(self: &Arc<Self>, t: Tracked) -> Option<Tracked> {
        if self.txn.is_some() {
            // Exactly-once: no lanes (see `failed`); a failing target aborts the transaction.
            return Some(t);
        }
        let t = {
            let mut lanes = kafka::lock(&self.lanes);
            if lanes.is_empty() {
                t
            } else {
                let topic = t.send.out.topic.clone();
                lanes.divert(&topic, t.seq, t)?
            }
        };
        if t.to_target() {
            let held = {
                let targets = kafka::lock(&self.targets);
                targets.any() && targets.holds(&t.send.out.topic, Instant::now())
            };
            if held {
                self.hold(t);
                return None;
            }
        }
        Some(t)
    }

    /// Hands a send the producer took to the collector. Should the collector be gone (the
    /// engine stopped), the record stays uncommitted and its next owner sends it again.
    fn await_ack(self: &Arc<Self>, tracked: Tracked, delivery: DeliveryFuture) {
        if let Err(refused) = self.in_flight.send(InFlight { tracked, delivery }) {
            // Counted as handed: count it as ended too, or the stop reports it unanswered.
            self.settle(refused.0.tracked, Outcome::Abandoned);
        }
    }

    /// Does what a send's outcome says. An acknowledgement is handled here, at once; a failure
    /// (rare, and it may wait: a backoff, creating a topic) in a task of its own.
    ///
    /// In the exactly-once mode a send the producer took that fails dooms the transaction (it
    /// aborts, and the engine starts again from the last committed one); one the producer
    /// refused to take fails as in the other mode, and is sent again outside the count.
    fn settle(self: &Arc<Self>, mut t: Tracked, outcome: Outcome) {
        self.ended(&t, &outcome);
        let counted = std::mem::take(&mut t.counted);
        match outcome {
            Outcome::Acknowledged => self.acknowledged(t.send),
            Outcome::Abandoned => {}
            Outcome::Failed(e) => match &self.txn {
                Some(txn) if t.enqueued => {
                    let topic = &t.send.out.topic;
                    if let Fate::DeadLetter(why) = fate(&e, Destination::Target, topic) {
                        if t.to_target() {
                            remember_refusal(refusal_key(&e, &t.send), why);
                        }
                    }
                    txn.doom(format!("a write to {topic} failed: {e}"));
                }
                _ => {
                    t.enqueued = false;
                    let me = self.clone();
                    self.acks.spawn(async move {
                        me.failed(t, e).await;
                    });
                }
            },
        }
        if let Some(txn) = self.txn.as_ref().filter(|_| counted) {
            txn.settled();
        }
    }

    /// The one acknowledgement collector: awaits every send in flight together and settles
    /// each as its answer comes. One task for all sends (424 bytes held per send), where a task
    /// per send held the whole failure path in its future and cost a trip through the runtime's
    /// queue.
    /// Ends once the engine has stopped, every stage in `stages` has ended, and nothing is left
    /// in flight: no send waiting here, none queued to it, no failure or retry lane still
    /// working. It waits for the stages because some send after the engine's token is cancelled
    /// (the publisher hands over what the timer released before the stop): a send handed to the
    /// producer after the collector had ended was never settled, and a clean stop under CI's
    /// load reported "36 deliveries unacknowledged" after its full timeout.
    pub(crate) async fn collect(
        self: Arc<Self>,
        mut queued: mpsc::UnboundedReceiver<InFlight>,
        stages: TaskTracker,
    ) {
        let mut waiting = FuturesUnordered::new();
        // Looks for the end every 20 ms: the engine's stop is a state, not an event this loop
        // could miss (a `select!` evaluates a branch's condition only when it starts waiting).
        let mut check = tokio::time::interval(Duration::from_millis(20));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some((t, outcome)) = waiting.next(), if !waiting.is_empty() => {
                    self.settle(t, outcome);
                }
                next = queued.recv() => match next {
                    Some(InFlight { tracked, delivery }) => {
                        waiting.push(async move { (tracked, outcome(Ok(delivery)).await) });
                    }
                    None if waiting.is_empty() => return,
                    None => {}
                },
                _ = check.tick() => {
                    let idle = waiting.is_empty() && queued.is_empty() && self.acks.is_empty();
                    if idle && self.life.token().is_cancelled() && stages.is_empty() {
                        // A send that still comes (none should: the stages have ended) is
                        // refused by the closed channel and settled as abandoned.
                        queued.close();
                        while let Ok(InFlight { tracked, .. }) = queued.try_recv() {
                            self.settle(tracked, Outcome::Abandoned);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Deliveries and the DLQ on one producer (linger ~1 ms: they are due now), slice writes on
    /// another that batches longer: a burst of slice writes never queues in front of a due record.
    fn producer_for(&self, then: Then) -> &FutureProducer {
        match then {
            Then::Slice { .. } => &self.slice_producer,
            _ => &self.producer,
        }
    }

    /// Does what [`fate`] says with a failed send: a retry joins its topic's lane (in its first
    /// send's order, so records of one key keep their order behind it), a refusal goes to the
    /// DLQ (its copy is dispatched as a send of its own), a missing slice topic is created again,
    /// anything else halts the process. True when the record went back into its lane.
    async fn failed(self: &Arc<Self>, mut t: Tracked, err: KafkaError) -> bool {
        let to = t.send.then.destination();
        let mut fate = fate(&err, to, &t.send.out.topic);
        if fate == Fate::RetryFew {
            t.unknown_attempts += 1;
            fate = if t.unknown_attempts < UNKNOWN_ERROR_ATTEMPTS {
                Fate::Retry
            } else if matches!(to, Destination::Target | Destination::Ingest) {
                Fate::DeadLetter(Rejection::RefusedByBroker(format!(
                    "{err} (after {} attempts)",
                    t.unknown_attempts
                )))
            } else {
                Fate::Halt(format!("{} refuses our writes: {err}", t.send.out.topic))
            };
        }
        if let Some(txn) = self
            .txn
            .as_ref()
            .filter(|_| !matches!(fate, Fate::DeadLetter(_) | Fate::Halt(_)))
        {
            // No retry lanes in the exactly-once mode: their re-sends would pass neither the
            // gate nor the count. The transaction aborts and the engine starts again.
            txn.doom(format!("a write to {} failed: {err}", t.send.out.topic));
            return false;
        }
        match fate {
            Fate::DeadLetter(why) => {
                tracing::warn!(topic = %t.send.out.topic, reason = why.code(), detail = %why, "dead-lettering");
                let send = t.send;
                self.dead_letter_send(send, &why).await;
                false
            }
            // The record stays uncommitted; the next owner (after a fix) sends it again.
            Fate::Halt(reason) => {
                self.life.fail(kafka::Fatal::Other(reason));
                false
            }
            Fate::RecreateSlice => {
                // Once per topic per 10 s: every write to a deleted slice fails alike, and each
                // creation is an admin client and a broker round trip.
                let due = {
                    let mut last = kafka::lock(&self.slices_recreated);
                    let now = Instant::now();
                    let fresh = last
                        .get(&t.send.out.topic)
                        .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(10));
                    if !fresh {
                        last.insert(t.send.out.topic.clone(), now);
                    }
                    !fresh
                };
                if due {
                    tracing::warn!(topic = %t.send.out.topic, "slice topic missing; creating it again");
                    let spec = self.slice_spec(&t.send.out.topic);
                    if let Err(e) = kafka::ensure_topics(&self.settings, &[spec]).await {
                        tracing::warn!(error = %e, "could not create the slice topic");
                    }
                }
                self.hold(t);
                true
            }
            Fate::Retry | Fate::RetryFew => {
                if t.to_target() {
                    // The target's health says it once, when the target gets into trouble.
                    tracing::debug!(topic = %t.send.out.topic, error = %err, "send failed; retrying");
                } else {
                    tracing::warn!(topic = %t.send.out.topic, error = %err, "send failed; retrying");
                }
                metrics::counter!(m::SEND_RETRIES).increment(1);
                self.hold(t);
                true
            }
        }
    }

    /// Sends a record that its destination will not take to the DLQ with the reason, in place
    /// of the original (its share of the budget and its ticket go with it).
    ///
    /// In the exactly-once mode it is a first send (through the gate, while the record's
    /// partition is ours): it is not the follow-up of an acknowledgement in the open
    /// transaction, so it must not slip into one whose offsets are being chosen.
    async fn dead_letter_send(self: &Arc<Self>, mut send: Send, why: &Rejection) {
        let dlq = &self.settings.internal.dlq;
        send.out = match send.scheduled.as_mut() {
            Some(s) => {
                s.restore_body(&mut send.out);
                s.to_dlq(dlq, why)
            }
            // A recurring schedule's next occurrence: the record as it was to be filed.
            None => crate::domain::dead_lettered(send.out, dlq, why),
        };
        send.then = Then::DeadLetter { reason: why.code() };
        send.slice_write = None;
        // A dead-lettered occurrence ends its schedule: its DLQ copy carries the recurrence.
        send.next = None;
        let seq = self.send_seq.fetch_add(1, Ordering::Relaxed);
        if self.txn.is_some() {
            self.dispatch(Tracked::new(send, seq)).await;
        } else {
            self.follow_up(Tracked::new(send, seq));
        }
    }

    /// Puts a failed send in its topic's retry lane, starting the lane's task if it was closed.
    fn hold(self: &Arc<Self>, t: Tracked) {
        let topic = t.send.out.topic.clone();
        if kafka::lock(&self.lanes).hold(&topic, t.seq, t) {
            let me = self.clone();
            self.acks.spawn(async move { me.drain_lane(topic).await });
        }
    }

    /// A topic's retry lane: after a backoff, sends what it holds again, all in their first
    /// order, and awaits them in that order; closes once everything in it was acknowledged (or
    /// given another fate) and nothing new joined. Stops with the engine: what it holds then
    /// stays uncommitted.
    async fn drain_lane(self: Arc<Self>, topic: String) {
        let mut delays = retry_delays();
        let mut wait = true;
        loop {
            if wait && !self.pause(&mut delays).await {
                return;
            }
            wait = false;
            self.expire(&topic).await;
            let mode = kafka::lock(&self.targets).mode(&topic, Instant::now());
            let batch = match mode {
                Mode::Resend => kafka::lock(&self.lanes).take(&topic),
                Mode::Wait => {
                    wait = true;
                    Vec::new()
                }
                Mode::Probe => {
                    self.probe(&topic).await;
                    wait = true;
                    Vec::new()
                }
            };
            let mut queued = Vec::with_capacity(batch.len());
            for (_, t) in batch {
                let q = enqueue(self.producer_for(t.send.then), &t.send.out).await;
                if q.is_ok() {
                    self.handed(&t);
                }
                queued.push((t, q));
            }
            for (t, q) in queued {
                let outcome = outcome(q).await;
                self.ended(&t, &outcome);
                match outcome {
                    Outcome::Acknowledged => self.acknowledged(t.send),
                    Outcome::Abandoned => return,
                    // Back in the lane: wait a backoff before the next round.
                    Outcome::Failed(e) => wait |= self.failed(t, e).await,
                }
            }
            if kafka::lock(&self.lanes).close_if_empty(&topic) {
                return;
            }
            if !wait {
                delays = retry_delays();
            }
        }
    }

    /// Sends the lane's first record alone, past the lane: its answer says whether the target
    /// takes records again (an acknowledgement turns the lane back to [`Mode::Resend`]).
    async fn probe(self: &Arc<Self>, topic: &str) {
        let first = kafka::lock(&self.lanes).take_first(topic);
        if let Some((_, t)) = first {
            self.send_now(t).await;
        }
    }

    /// Dead-letters, as `target-unavailable`, each record of a target in trouble that has waited
    /// `--target-give-up` since it was first handed over (every record, once the lane holds a
    /// quarter of the memory budget, so that one target never holds what the others need), but
    /// only once the broker is known to answer: when it does not, every target fails alike, and
    /// the records wait for the broker instead.
    async fn expire(self: &Arc<Self>, topic: &str) {
        let now = Instant::now();
        let quarter = self.budget.total() / 4;
        let (due, trouble) = {
            let targets = kafka::lock(&self.targets);
            let Some(trouble) = targets.troubles(now).into_iter().find(|t| t.topic == topic) else {
                return;
            };
            let lanes = kafka::lock(&self.lanes);
            let full = lanes.weigh(topic, |t| t.send._permit.bytes()) > quarter;
            let oldest_expired = lanes.weigh(topic, |t| {
                u64::from(targets.expired(topic, t.born, full, now))
            }) > 0;
            (oldest_expired.then_some(full), trouble)
        };
        let Some(full) = due else { return };
        let name = topic.to_string();
        if let Err(e) = kafka::look(&self.lookup, move |l| l.answers(&name, BROKER_TIMEOUT)).await {
            tracing::warn!(%topic, error = %e, "a target is in trouble and the broker does not answer: its records wait for the broker");
            return;
        }
        let why = Rejection::TargetUnavailable {
            topic: topic.to_string(),
            for_secs: trouble.for_.as_secs(),
            error: trouble.error,
        };
        let expired = {
            let targets = kafka::lock(&self.targets);
            let now = Instant::now();
            kafka::lock(&self.lanes).take_where(topic, |t| {
                t.to_target() && targets.expired(topic, t.born, full, now)
            })
        };
        tracing::warn!(%topic, records = expired.len(), reason = why.code(), detail = %why, "dead-lettering records a target did not take");
        for t in expired {
            self.dead_letter_send(t.send, &why).await;
        }
    }

    /// Sleeps the next retry delay; false when the engine stops meanwhile.
    async fn pause(&self, delays: &mut impl Iterator<Item = Duration>) -> bool {
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.life.token().cancelled() => false,
        }
    }

    /// The topic spec a slice topic is created with.
    fn slice_spec(&self, name: &str) -> TopicSpec {
        TopicSpec {
            name: name.to_string(),
            partitions: self.settings.config.slice_partitions,
            configs: vec![(
                "retention.ms".into(),
                self.settings.retention_ms().to_string(),
            )],
        }
    }

    fn acknowledged(self: &Arc<Self>, mut send: Send) {
        if let Some(next) = send.next.take() {
            self.file_next(*next, &send);
        }
        let placed = match send.then {
            Then::Slice { level } => {
                self.per_record.slice_write(level);
                Some(Placed::Slice)
            }
            Then::Deliver { due_ms } => {
                let late = (self.clock.now_ms() - due_ms).max(0) as f64 / 1000.0;
                self.per_record.lateness.record(late);
                self.per_record.delivered.increment(1);
                if let Some((id, version)) = send
                    .scheduled
                    .as_ref()
                    .and_then(|s| Some((&s.id, s.version?)))
                {
                    // Delivered: the status API says so once this fact is in. The record's
                    // offset waits for it, so a crash before it delivers the record again
                    // rather than leave its id pending for ever.
                    let out =
                        fact_record(&self.settings.internal.state, id, version, &Fact::Delivered);
                    let fact = Send {
                        out,
                        then: Then::Fact {
                            fact: Fact::Delivered.status(),
                            read_mark: false,
                        },
                        scheduled: None,
                        ticket: send.ticket,
                        sweep: None,
                        slice_write: None,
                        next: None,
                        _permit: send._permit,
                    };
                    let seq = self.send_seq.fetch_add(1, Ordering::Relaxed);
                    self.follow_up(Tracked::new(fact, seq));
                    return;
                }
                Some(Placed::Timer)
            }
            Then::DeadLetter { reason } => {
                metrics::counter!(m::DEAD_LETTERED, "reason" => reason).increment(1);
                Some(Placed::DeadLetter)
            }
            Then::Fact { fact, read_mark } => {
                self.per_record.fact_written(fact);
                if read_mark {
                    match &self.txn {
                        // Counts for the watermarks once its transaction is visible.
                        Some(txn) => txn.mark_on_commit(send.ticket.clone()),
                        None => self.offsets.read_marks(|m| m.acked(&send.ticket)),
                    }
                }
                None
            }
            Then::Recur => {
                metrics::counter!(m::OCCURRENCES_FILED).increment(1);
                None
            }
        };
        self.offsets.finish(&send.ticket);
        if let (Some(sweep), Some(placed)) = (&send.sweep, placed) {
            sweep.placed(placed);
        }
    }
}

impl Outbox {
    /// Files a recurring schedule's next occurrence once the current one is acknowledged: the
    /// record's offset waits for this write too, so a crash delivers the occurrence again rather
    /// than lose the schedule.
    fn file_next(self: &Arc<Self>, out: Outgoing, current: &Send) {
        // `None`: the partition was revoked; its next owner delivers the occurrence again and
        // files the next one.
        let ticket = if self.txn.is_some() {
            // Exactly-once: the revoke that may have begun meanwhile commits only once this
            // write is settled, so the occurrence and its next one commit together.
            self.offsets.also_whatever(&current.ticket)
        } else {
            match self.offsets.also(&current.ticket) {
                Some(ticket) => ticket,
                None => return,
            }
        };
        let send = Self::next_occurrence(out, ticket, current._permit.clone());
        self.follow_up(Tracked::new(
            send,
            self.send_seq.fetch_add(1, Ordering::Relaxed),
        ));
    }

    /// Files a recurring schedule's next occurrence in place of an occurrence not delivered
    /// (missed, and the schedule says `missed: none`): a first send, as any the publisher hands
    /// over.
    pub(crate) async fn file_missed(
        self: &Arc<Self>,
        out: Outgoing,
        ticket: Ticket,
        permit: Share,
    ) {
        self.send(Self::next_occurrence(out, ticket, permit)).await;
    }

    fn next_occurrence(out: Outgoing, ticket: Ticket, permit: Share) -> Send {
        Send {
            out,
            then: Then::Recur,
            scheduled: None,
            ticket,
            sweep: None,
            slice_write: None,
            next: None,
            _permit: permit,
        }
    }
}

/// Hands the record to the producer's queue, waiting while the queue is full.
async fn enqueue(producer: &FutureProducer, out: &Outgoing) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(kafka::record(out)) {
            Ok(fut) => return Ok(fut),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as C;

    fn of(code: RDKafkaErrorCode, to: Destination) -> Fate {
        fate(&KafkaError::MessageProduction(code), to, "t")
    }

    /// A recurring schedule's next occurrence the ingest topic refuses (too large, not
    /// authorised, a policy) ends its schedule in the DLQ; it never halts the process, whose
    /// successor would deliver the occurrence again and halt again.
    #[test]
    fn a_refused_next_occurrence_is_dead_lettered_not_a_halt() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::PolicyViolation,
        ] {
            assert!(
                matches!(of(code, Destination::Ingest), Fate::DeadLetter(_)),
                "{code:?}"
            );
        }
    }

    /// An acknowledgement that names no offset (librdkafka's implicit acks, which lost records
    /// on new partitions here) is a failure the outbox retries: a duplicate, never a loss.
    #[test]
    fn an_acknowledgement_without_an_offset_is_sent_again() {
        use rdkafka::producer::future_producer::Delivery;
        use rdkafka::Timestamp;
        let delivery = |offset| Delivery {
            partition: 3,
            offset,
            timestamp: Timestamp::NotAvailable,
        };
        assert_eq!(kafka::confirmed(Ok(delivery(42))), Ok(delivery(42)));
        let err = kafka::confirmed(Ok(delivery(-1001))).expect_err("not confirmed");
        for to in [
            Destination::Target,
            Destination::Slice,
            Destination::DeadLetter,
            Destination::State,
            Destination::Ingest,
        ] {
            assert_eq!(fate(&err, to, "t"), Fate::Retry, "{to:?}");
        }
        let refused = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(kafka::confirmed(Err(refused.clone())), Err(refused));
    }

    #[test]
    fn a_missing_topic_is_the_records_fault_only_at_a_target() {
        assert!(matches!(
            of(C::UnknownTopicOrPartition, Destination::Target),
            Fate::DeadLetter(Rejection::UnknownTopic(t)) if t == "t"
        ));
        assert_eq!(
            of(C::UnknownTopicOrPartition, Destination::Slice),
            Fate::RecreateSlice
        );
        assert!(matches!(
            of(C::UnknownTopic, Destination::DeadLetter),
            Fate::Halt(_)
        ));
    }

    #[test]
    fn a_record_too_large_is_dead_lettered_unless_the_dlq_refuses_it() {
        for to in [Destination::Target, Destination::Slice] {
            assert!(matches!(
                of(C::MessageSizeTooLarge, to),
                Fate::DeadLetter(Rejection::RefusedByBroker(_))
            ));
        }
        assert!(matches!(
            of(C::MessageSizeTooLarge, Destination::DeadLetter),
            Fate::Halt(_)
        ));
    }

    #[test]
    fn authorisation_on_our_own_topics_halts_and_on_a_target_dead_letters() {
        assert!(matches!(
            of(C::TopicAuthorizationFailed, Destination::Target),
            Fate::DeadLetter(_)
        ));
        for to in [Destination::Slice, Destination::DeadLetter] {
            assert!(matches!(of(C::TopicAuthorizationFailed, to), Fate::Halt(_)));
        }
    }

    #[test]
    fn fatal_and_fenced_producers_halt_everywhere() {
        for code in [C::Fatal, C::ProducerFenced, C::ClusterAuthorizationFailed] {
            for to in [
                Destination::Target,
                Destination::Slice,
                Destination::DeadLetter,
            ] {
                assert!(matches!(of(code, to), Fate::Halt(_)), "{code:?} to {to:?}");
            }
        }
    }

    #[test]
    fn broker_trouble_is_retried_and_unknown_codes_only_a_few_times() {
        for code in [
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::NotEnoughReplicas,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::KafkaStorageError,
        ] {
            assert_eq!(of(code, Destination::Target), Fate::Retry, "{code:?}");
            assert_eq!(of(code, Destination::DeadLetter), Fate::Retry, "{code:?}");
        }
        assert_eq!(
            of(C::InvalidSessionTimeout, Destination::Target),
            Fate::RetryFew
        );
        assert_eq!(
            fate(&KafkaError::Canceled, Destination::Target, "t"),
            Fate::Retry,
            "a client-side error says nothing about the record"
        );
    }

    use futures::FutureExt;

    #[test]
    fn the_budget_counts_quarter_kib_and_lets_a_huge_record_through_alone() {
        let b = Budget::new(4 << 20);
        let small = b.reserve(10).now_or_never().expect("fits");
        assert_eq!(b.used(), 256, "a small record costs one unit, not a KiB");
        assert!(
            b.reserve(100 << 20).now_or_never().is_none(),
            "the whole budget is not free"
        );
        drop(small);
        let huge = b
            .reserve(100 << 20)
            .now_or_never()
            .expect("a record over the budget takes all of it, alone");
        assert!(
            b.reserve(1).now_or_never().is_none(),
            "nothing else fits meanwhile"
        );
        drop(huge);
        assert_eq!(b.used(), 0);
    }

    /// A record with an id holds one share for its fact and its copy: placing the copy first
    /// gives nothing back while the fact is on its way, so a record in flight always holds its
    /// whole share (the burst test once saw 300 records of 2 KiB in flight in a 1 MiB budget).
    #[test]
    fn a_share_for_a_fact_and_a_copy_is_held_until_both_are_done() {
        let b = Budget::new(4 << 20);
        let copy = b.reserve_hold(8 << 10).now_or_never().expect("fits");
        let fact = copy.clone();
        assert_eq!(fact.bytes(), 8 << 10);
        drop(copy);
        assert_eq!(b.used(), 8 << 10, "the fact still holds the record's share");
        drop(fact);
        assert_eq!(b.used(), 0);
    }

    /// Holds by choice once took the whole budget: the next record only the timer could take
    /// waited for their delivery, and ingest with it (29% of records past due at 10,000/s).
    #[test]
    fn holds_by_choice_leave_room_for_what_only_the_timer_can_take_and_sends_always_have_room() {
        let b = Budget::new(4 << 20);
        let mut held = Vec::new();
        // Takes KiB shares while `take` grants them; the bytes taken.
        let mut fill = |take: &dyn Fn() -> Option<Share>| {
            let before = held.len();
            while let Some(s) = take() {
                held.push(s);
            }
            (held.len() - before) as u64 * 1024
        };
        let by_choice = fill(&|| b.try_reserve_hold(1024));
        assert_eq!(
            by_choice,
            (4 << 20) * 3 / 8,
            "holds by choice stop at half of the holds' part"
        );
        let must = fill(&|| b.reserve_hold(1024).now_or_never());
        assert_eq!(
            must,
            (4 << 20) * 3 / 8,
            "what only the timer can take still finds the other half"
        );
        let sends = fill(&|| b.reserve(1024).now_or_never());
        assert_eq!(sends, (4 << 20) / 4, "a quarter is always there for sends");
    }

    #[test]
    fn a_send_in_flight_is_held_in_a_few_hundred_bytes() {
        // The collector holds this per send (beside the record's own bytes and librdkafka's
        // copy); a task per send held its whole failure path, several KiB.
        let size = std::mem::size_of::<InFlight>();
        assert!(size <= 512, "{size} bytes");
    }

    #[test]
    fn retry_delays_grow_with_jitter_and_stay_bounded() {
        let d: Vec<Duration> = retry_delays().take(20).collect();
        assert!(d[0] >= Duration::from_millis(100));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(10)));
        assert!(d[6] > d[0]);
    }
}
