//! Exactly-once delivery (issue #31, `--delivery exactly-once`): every record the engine writes
//! (a slice copy, a delivery, a DLQ copy, a fact, a recurring schedule's next occurrence) and the
//! input offsets it consumed commit in one Kafka transaction, so a `read_committed` consumer of a
//! target sees each scheduled record once, across crashes, rebalances and broker restarts.
//!
//! The engine does not read and write in order: the timer releases records in due order, not in
//! offset order, so when a transaction commits, records above a partition's commit point may
//! already be delivered while an earlier one still waits in the timer. A plain offset commit
//! cannot say that, and a restart would deliver those records again. So each partition's commit
//! carries its [`crate::replay::Progress`] in the offset's metadata, in the same transaction: which records
//! above the commit point are still pending (everything else below `upto` is done). The next
//! owner reads the metadata on assignment and skips the records that are done
//! ([`crate::offsets::Owned::already_done`]).
//!
//! Owns the [`Txn`] handle: the transactional producer, the gate sends pass through (a commit
//! closes it, so that every send of a transaction is acknowledged and its outcome known before
//! the offsets are chosen), and the count of sends not yet settled. The committer's thread runs
//! the commits ([`Txn::commit`]); the outbox enters the gate ([`Txn::enter`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::kafka::lock;
use crate::metrics as m;
use crate::offsets::{CommitPoint, Ticket};
use crate::replay::METADATA_LIMIT;

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    /// Not committed, still open: offered again on the next tick (a retriable broker error that
    /// outlasted the attempt, or a progress too long for the offset metadata).
    Later(String),
    /// Aborted: what it wrote is discarded, and the engine starts again from the last committed
    /// transaction (a send that failed inside it, or the group moved on: a zombie's commit).
    Aborted(String),
    /// The producer was fenced (another process took its transactional id) or failed for good.
    Fenced(String),
}

/// The exactly-once mode's handle, shared by the outbox (which sends through the gate) and the
/// committer (which commits).
pub struct Txn {
    producer: FutureProducer,
    /// Read by each first send while it checks ownership and enqueues; written by a commit.
    gate: RwLock<()>,
    /// Sends enqueued in the open transaction whose outcome is not yet handled (a follow-up
    /// write an acknowledgement makes, a delivered fact, counts before its cause is settled).
    unsettled: AtomicUsize,
    /// Whether anything was sent since the last commit.
    dirty: AtomicBool,
    /// Why the open transaction cannot commit (a send in it failed), if it cannot.
    doomed: Mutex<Option<String>>,
    /// Tickets whose fact counts for the ingest watermarks once this transaction commits.
    marks: Mutex<Vec<Ticket>>,
    /// How the transactions ended for good (aborted or fenced): the engine stops, and nothing
    /// more is asked of the producer.
    ended: Mutex<Option<TxnError>>,
}

/// A first send's pass through the gate: while it is held, no commit chooses offsets.
pub struct Entered<'a> {
    _gate: RwLockReadGuard<'a, ()>,
}

impl Txn {
    /// Takes the producer's transactional id (fencing any earlier process that used it, and
    /// aborting what it left open) and opens the first transaction. Blocking.
    pub fn start(producer: FutureProducer, timeout: Duration) -> Result<Txn, KafkaError> {
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        Ok(Txn {
            producer,
            gate: RwLock::new(()),
            unsettled: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
            doomed: Mutex::new(None),
            marks: Mutex::default(),
            ended: Mutex::new(None),
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Waits for the gate, for a first send (one a stage hands over, not a follow-up): the
    /// caller checks the record's partition is still ours while holding it, then enqueues and
    /// calls [`Txn::sent`].
    pub async fn enter(&self) -> Entered<'_> {
        Entered {
            _gate: self.gate.read().await,
        }
    }

    /// A send was enqueued in the open transaction; [`Txn::settled`] once its outcome is
    /// handled.
    pub fn sent(&self) {
        self.unsettled.fetch_add(1, Ordering::SeqCst);
        self.dirty.store(true, Ordering::SeqCst);
    }

    pub fn settled(&self) {
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
    }

    /// A send of the open transaction failed: it must abort.
    pub fn doom(&self, why: String) {
        lock(&self.doomed).get_or_insert(why);
    }

    /// An acknowledged fact that counts for the ingest watermarks once committed.
    pub fn mark_on_commit(&self, ticket: Ticket) {
        lock(&self.marks).push(ticket);
    }

    pub fn dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Closes the gate (blocking: the committer's thread) until the guard is dropped.
    pub fn close(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.gate.blocking_write()
    }

    pub fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::SeqCst)
    }

    /// Commits the open transaction with these partitions' offsets and progress, and opens the
    /// next. Call with the gate closed and every send settled. On success returns the tickets
    /// whose facts now count for the watermarks. Blocking.
    pub fn commit(
        &self,
        points: &[CommitPoint],
        group: Option<&ConsumerGroupMetadata>,
        timeout: Duration,
    ) -> Result<Vec<Ticket>, TxnError> {
        let started = Instant::now();
        if let Some(ended) = lock(&self.ended).clone() {
            return Err(ended);
        }
        if let Some(why) = lock(&self.doomed).clone() {
            return Err(self.abort(why, timeout));
        }
        let mut tpl = TopicPartitionList::new();
        for p in points {
            let metadata = p.progress.encode();
            if metadata.len() > METADATA_LIMIT {
                metrics::counter!(m::TXN_POSTPONED).increment(1);
                return Err(TxnError::Later(format!(
                    "the progress of {}/{} needs {} bytes of offset metadata (the broker takes {METADATA_LIMIT})",
                    p.tp.0,
                    p.tp.1,
                    metadata.len()
                )));
            }
            let mut e = tpl.add_partition(&p.tp.0, p.tp.1);
            e.set_offset(Offset::Offset(p.offset))
                .map_err(|e| TxnError::Later(e.to_string()))?;
            e.set_metadata(metadata);
        }
        // Past this point a call the broker did not answer in time leaves the transaction in a
        // state no send may enter: it aborts.
        let must = |result: Result<(), TxnError>| match result {
            Err(TxnError::Later(e)) => Err(self.abort(format!("{e} (timed out)"), timeout)),
            other => other,
        };
        match group {
            Some(group) if tpl.count() > 0 => must(self.retried(timeout, || {
                self.producer
                    .send_offsets_to_transaction(&tpl, group, timeout)
            }))?,
            // Without offsets nothing checks the group's generation: a transaction that wrote
            // anything must not commit so.
            _ if self.dirty() => {
                return Err(self.abort(
                    "writes without a partition's offsets to commit them with".into(),
                    timeout,
                ))
            }
            _ => {}
        }
        let offsets_sent = started.elapsed();
        must(self.retried(timeout, || self.producer.commit_transaction(timeout)))?;
        tracing::debug!(
            partitions = tpl.count(),
            offsets_ms = offsets_sent.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "transaction committed"
        );
        self.dirty.store(false, Ordering::SeqCst);
        let marks = std::mem::take(&mut *lock(&self.marks));
        metrics::counter!(m::TRANSACTIONS, "outcome" => "committed").increment(1);
        metrics::histogram!(m::TXN_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if let Err(e) = self.producer.begin_transaction() {
            return Err(TxnError::Fenced(format!("beginning a transaction: {e}")));
        }
        Ok(marks)
    }

    /// Runs a transactional call, again while the broker says it may succeed later, within
    /// `timeout`; an error that needs an abort aborts.
    fn retried(
        &self,
        timeout: Duration,
        call: impl Fn() -> Result<(), KafkaError>,
    ) -> Result<(), TxnError> {
        let end = Instant::now() + timeout;
        let mut delays = crate::retry::backoff(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            let err = match call() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match classify(&err) {
                Kind::Retriable if Instant::now() < end => {
                    std::thread::sleep(delays.next().unwrap_or(Duration::from_secs(1)));
                }
                Kind::Retriable => return Err(TxnError::Later(err.to_string())),
                Kind::Abort => return Err(self.abort(err.to_string(), timeout)),
                Kind::Fatal => {
                    metrics::counter!(m::TRANSACTIONS, "outcome" => "fenced").increment(1);
                    let fenced = TxnError::Fenced(err.to_string());
                    remember(&fenced);
                    *lock(&self.ended) = Some(fenced.clone());
                    return Err(fenced);
                }
            }
        }
    }

    /// Aborts the open transaction: nothing it wrote becomes visible to a read_committed reader.
    pub fn abort(&self, why: String, timeout: Duration) -> TxnError {
        let mut ended = lock(&self.ended);
        if let Some(ended) = ended.clone() {
            return ended;
        }
        metrics::counter!(m::TRANSACTIONS, "outcome" => "aborted").increment(1);
        let outcome = match self.producer.abort_transaction(timeout) {
            Ok(()) => TxnError::Aborted(why),
            Err(e) if classify(&e) == Kind::Fatal => {
                TxnError::Fenced(format!("{why}; the abort failed too: {e}"))
            }
            // The broker aborts it when the transaction times out, or when this transactional
            // id is next initialised.
            Err(e) => {
                TxnError::Aborted(format!("{why}; the abort failed ({e}), the broker ends it"))
            }
        };
        remember(&outcome);
        *ended = Some(outcome.clone());
        outcome
    }
}

/// This process's last abort or fence, with its time (it outlives the engine it stopped, which
/// is started again): what `/healthz` shows.
static LAST_ABORT: Mutex<Option<String>> = Mutex::new(None);

fn remember(e: &TxnError) {
    let (what, why) = match e {
        TxnError::Aborted(why) => ("aborted", why),
        TxnError::Fenced(why) => ("fenced", why),
        TxnError::Later(_) => return,
    };
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tracing::error!(%why, "transaction {what}");
    *lock(&LAST_ABORT) = Some(format!("{at} {what}: {why}"));
}

/// See [`LAST_ABORT`].
pub fn last_abort() -> Option<String> {
    lock(&LAST_ABORT).clone()
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Retriable,
    Abort,
    Fatal,
}

/// What a transactional call's error asks for, as librdkafka classifies it.
fn classify(err: &KafkaError) -> Kind {
    match err {
        KafkaError::Transaction(e) if e.is_fatal() => Kind::Fatal,
        KafkaError::Transaction(e) if e.txn_requires_abort() => Kind::Abort,
        KafkaError::Transaction(e) if e.is_retriable() => Kind::Retriable,
        _ => match err.rdkafka_error_code() {
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch) => {
                Kind::Fatal
            }
            _ => Kind::Abort,
        },
    }
}
