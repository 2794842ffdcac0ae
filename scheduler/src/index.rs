//! The local index of the facts of ids (issue #13), on disk: what the publish gate and the status
//! API ask. It is a cache of the state topic: it stores, in the same transaction as the facts,
//! how far it has read each state partition, so a restart goes on from there, and a lost or
//! locked file is simply rebuilt from Kafka.
//!
//! redb keeps the facts in a B-tree keyed by (id, version): the newest fact of an id is the last
//! entry of its range, and memory is redb's page cache (capped), not a map of every id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::facts::{Fact, IdStatus, Version};

/// (id, timestamp ms, partition, offset) -> when the fact was written (8 bytes, little-endian
/// epoch ms), then the fact, encoded.
const FACTS: TableDefinition<(&str, i64, i32, i64), &[u8]> = TableDefinition::new("facts");
/// State partition -> the next offset to read.
const POSITIONS: TableDefinition<i32, i64> = TableDefinition::new("positions");

/// What the index was read from, under the key `source` (JSON of a [`Source`]).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// redb's page cache: the index's share of memory, whatever the number of ids.
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Boxed: redb's error is large, and this one travels on every index call's `Result`.
    #[error("state index: {0}")]
    Store(Box<redb::Error>),
    #[error("state index {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> Self {
                IndexError::Store(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Which state topic the index's facts and positions were read from. The name alone does not
/// say it: after the stack's data is removed (`-c`), the state topic deleted and made again, or
/// with another cluster behind the same address, the same name holds other records at the same
/// offsets, and an index that kept its positions would answer from facts that no longer exist
/// (and prove freshness it does not have). A topic's id changes whenever the topic is made again
/// and the cluster id with the cluster; a different partition count moves ids between partitions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// The cluster id (`None` if the cluster did not say).
    pub cluster: Option<String>,
    /// The state topic's topic id, base64 as Kafka's tools print it (`None` if the cluster did
    /// not say: brokers before Kafka 2.8 have none).
    pub topic: Option<String>,
    pub partitions: i32,
}

impl Source {
    /// What differs from `old`: `cluster`, `topic` or `partitions`; `None` if nothing.
    pub fn changed_from(&self, old: &Source) -> Option<&'static str> {
        if self.cluster != old.cluster {
            Some("cluster")
        } else if self.topic != old.topic {
            Some("topic")
        } else if self.partitions != old.partitions {
            Some("partitions")
        } else {
            None
        }
    }
}

/// Why [`Index::adopt`] emptied the index, and what it had been read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// `cluster`, `topic` or `partitions` (see [`Source::changed_from`]), or `unrecorded`: an
    /// index with facts or positions and no source, written before sources were stored.
    pub reason: &'static str,
    pub was: Option<Source>,
}

/// What a record of the state topic holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A fact of a version of an id, and when it was written (the record's timestamp).
    Fact {
        id: String,
        version: Version,
        fact: Fact,
        written_ms: i64,
    },
    /// The janitor removed this version's fact.
    Tombstone { id: String, version: Version },
    /// Not a fact (skipped; its position still moves).
    Skip,
}

/// One record read from the state topic: its position and what it holds.
#[derive(Debug, Clone)]
pub struct Learnt {
    pub partition: i32,
    pub offset: i64,
    pub entry: Entry,
}

/// A stored value: when the fact was written, then the fact.
fn encode_value(written_ms: i64, fact: &Fact) -> Vec<u8> {
    let mut v = written_ms.to_le_bytes().to_vec();
    v.extend(fact.encode());
    v
}

#[cfg(test)]
thread_local! {
    /// Stored facts decoded by this thread: what a read of the index costs, for the tests.
    static DECODED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn decode_value(v: &[u8]) -> Option<(i64, Fact)> {
    #[cfg(test)]
    DECODED.with(|d| d.set(d.get() + 1));
    let (ts, fact) = v.split_first_chunk::<8>()?;
    Some((i64::from_le_bytes(*ts), Fact::decode(fact)?))
}

type FactKey<'a> = (&'a str, i64, i32, i64);

/// The index, open on one file.
pub struct Index {
    db: Database,
    path: PathBuf,
    /// Removed on drop: a file opened because the usual one was locked.
    temporary: bool,
}

impl Index {
    /// Opens (or creates) `dir/index.redb`. If another process (or another engine in this one)
    /// holds it, opens a file of this process's own beside it instead, rebuilt from Kafka and
    /// removed at the end: the index is a cache, so two processes on one machine both run.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::Io(dir.to_path_buf(), e))?;
        remove_leftovers(dir);
        let path = dir.join("index.redb");
        match Self::open_file(&path, false) {
            Err(IndexError::Store(e)) if matches!(*e, redb::Error::DatabaseAlreadyOpen) => {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let own = dir.join(format!("index-{}-{n}.redb", std::process::id()));
                tracing::warn!(
                    locked = %path.display(),
                    using = %own.display(),
                    "the state index is in use by another process; using a temporary one, rebuilt from Kafka"
                );
                let _ = std::fs::remove_file(&own);
                Self::open_file(&own, true)
            }
            other => other,
        }
    }

    fn open_file(path: &Path, temporary: bool) -> Result<Index, IndexError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(FACTS)?;
        txn.open_table(POSITIONS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
            temporary,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a batch of records read from the state topic and their positions, in one
    /// transaction: after a crash the index holds either all of a batch or none of it, and
    /// reading resumes where its facts end. `Eventual` durability: a batch lost in a crash is
    /// read again from Kafka.
    pub fn apply(&self, batch: &[Learnt]) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Eventual);
        {
            let mut facts = txn.open_table(FACTS)?;
            let mut positions = txn.open_table(POSITIONS)?;
            for l in batch {
                match &l.entry {
                    Entry::Fact {
                        id,
                        version: v,
                        fact,
                        written_ms,
                    } => {
                        let key = (id.as_str(), v.timestamp_ms, v.partition, v.offset);
                        // Delivered is news about a Pending of the same version: never undo it.
                        let delivered = facts.get(key)?.is_some_and(|old| {
                            decode_value(old.value()).is_some_and(|(_, f)| f == Fact::Delivered)
                        });
                        if !(delivered && matches!(fact, Fact::Pending { .. })) {
                            facts.insert(key, encode_value(*written_ms, fact).as_slice())?;
                        }
                    }
                    Entry::Tombstone { id, version: v } => {
                        facts.remove((id.as_str(), v.timestamp_ms, v.partition, v.offset))?;
                    }
                    Entry::Skip => {}
                }
                let next = positions.get(l.partition)?.map(|g| g.value());
                if next.is_none_or(|n| n <= l.offset) {
                    positions.insert(l.partition, l.offset + 1)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records that partitions were read up to these offsets with nothing in between (an empty
    /// or deleted stretch of the log).
    pub fn advance(&self, ends: &HashMap<i32, i64>) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Eventual);
        {
            let mut positions = txn.open_table(POSITIONS)?;
            for (&p, &end) in ends {
                let next = positions.get(p)?.map(|g| g.value());
                if next.is_none_or(|n| n < end) {
                    positions.insert(p, end)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Makes the index one of `source`: when it was read from another (or from one it did not
    /// record), it is emptied, facts and positions, so that it is read again from the start of
    /// the topic; then `source` is stored. Says why when it emptied it. One transaction, durable
    /// at once: a crash leaves the old index and its old source, or the new empty one.
    pub fn adopt(&self, source: &Source) -> Result<Option<Rebuild>, IndexError> {
        let txn = self.db.begin_write()?;
        let rebuild = {
            let mut meta = txn.open_table(META)?;
            let was: Option<Source> = meta
                .get("source")?
                .and_then(|v| serde_json::from_str(v.value()).ok());
            let reason = match &was {
                Some(old) => source.changed_from(old),
                None => {
                    let used = !txn.open_table(FACTS)?.is_empty()?
                        || !txn.open_table(POSITIONS)?.is_empty()?;
                    used.then_some("unrecorded")
                }
            };
            let encoded = serde_json::to_string(source).unwrap_or_default();
            meta.insert("source", encoded.as_str())?;
            reason.map(|reason| Rebuild { reason, was })
        };
        if rebuild.is_some() {
            txn.delete_table(FACTS)?;
            txn.delete_table(POSITIONS)?;
            txn.open_table(FACTS)?;
            txn.open_table(POSITIONS)?;
        }
        txn.commit()?;
        Ok(rebuild)
    }

    /// How far each state partition has been read (the next offset to read).
    pub fn positions(&self) -> Result<HashMap<i32, i64>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(POSITIONS)?;
        let mut out = HashMap::new();
        for entry in table.iter()? {
            let (p, next) = entry?;
            out.insert(p.value(), next.value());
        }
        Ok(out)
    }

    /// Every fact known for `id`, oldest version first (the status API's input).
    pub fn facts(&self, id: &str) -> Result<Vec<(Version, Fact)>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let mut out = Vec::new();
        for entry in table.range(Self::range_of(id))? {
            let (k, v) = entry?;
            if let Some((_, f)) = decode_value(v.value()) {
                out.push((Self::version(k.value()), f));
            }
        }
        Ok(out)
    }

    /// The facts of ids that no copy can need any more: every fact of the id was written, and
    /// every pending version of it fell due, more than `keep_ms` before `now_ms` (a copy lives in
    /// Kafka at most the slice retention). All of an id's facts go together, so a verdict never
    /// changes for a copy that might still exist. At most about `limit`, whole ids only.
    ///
    /// An id that lives on (a recurring schedule files a version per occurrence) also loses its
    /// old versions one by one, once each is past that horizon, except its newest version that is
    /// not a cancel and every version after it: the newest fact alone decides a verdict, and the
    /// status reads back from it through trailing cancels to that version (a cancel after a
    /// delivery reports `delivered`), so neither changes.
    pub fn expired(
        &self,
        now_ms: i64,
        keep_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, Version)>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let mut out = Vec::new();
        // One id's versions in order: each with the later of its write and its due time, and
        // whether it is a cancel.
        type Group = Vec<(String, Version, i64, bool)>;
        let mut group: Group = Vec::new();
        let old = |horizon: i64| horizon.saturating_add(keep_ms) < now_ms;
        let flush = |out: &mut Vec<(String, Version)>, group: &mut Group| {
            let whole = group.iter().all(|(_, _, h, _)| old(*h));
            let removable = if whole {
                group.len()
            } else {
                // Up to the newest version that is not a cancel, which stays with all after it.
                group
                    .iter()
                    .rposition(|(_, _, _, cancel)| !cancel)
                    .unwrap_or(group.len().saturating_sub(1))
            };
            out.extend(
                group
                    .drain(..)
                    .take(removable)
                    .filter(|(_, _, h, _)| old(*h))
                    .map(|(id, version, _, _)| (id, version)),
            );
            group.clear();
        };
        for entry in table.iter()? {
            let (k, v) = entry?;
            let key: FactKey<'_> = k.value();
            if group.first().is_some_and(|(id, _, _, _)| id != key.0) {
                flush(&mut out, &mut group);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            let (written, fact) = decode_value(v.value()).unwrap_or((i64::MAX, Fact::Cancelled));
            let due = match fact {
                Fact::Pending { due_ms, .. } => due_ms,
                _ => i64::MIN,
            };
            let cancel = fact == Fact::Cancelled;
            group.push((
                key.0.to_string(),
                Self::version(key),
                written.max(due),
                cancel,
            ));
        }
        flush(&mut out, &mut group);
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn range_of(id: &str) -> std::ops::RangeInclusive<(&str, i64, i32, i64)> {
        (id, i64::MIN, i32::MIN, i64::MIN)..=(id, i64::MAX, i32::MAX, i64::MAX)
    }

    fn version((_, timestamp_ms, partition, offset): (&str, i64, i32, i64)) -> Version {
        Version {
            timestamp_ms,
            partition,
            offset,
        }
    }

    /// Why a copy of `version` of `id` is not delivered ([`crate::facts::withheld`]); `None`
    /// when no fact of a higher version is known. Reads one stored fact, the id's newest, which
    /// alone decides: the gate judges every copy of an id, and reading all of its facts for each
    /// made an id of N versions cost N² reads.
    pub fn withheld(&self, id: &str, version: Version) -> Result<Option<&'static str>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let Some(entry) = table.range(Self::range_of(id))?.next_back() else {
            return Ok(None);
        };
        let (k, v) = entry?;
        // A value that does not decode still names a newer version: withheld all the same.
        let fact = decode_value(v.value()).map_or(Fact::Delivered, |(_, f)| f);
        Ok(crate::facts::withheld(
            &[(Self::version(k.value()), fact)],
            version,
        ))
    }

    /// What the status API reports for `id` ([`crate::facts::status`]): read from the newest
    /// fact back, through the cancels to the newest fact that is not one, which is all that
    /// decides it; not every fact of the id.
    pub fn status(&self, id: &str) -> Result<Option<IdStatus>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let mut newest = Vec::new();
        for entry in table.range(Self::range_of(id))?.rev() {
            let (k, v) = entry?;
            if let Some((_, fact)) = decode_value(v.value()) {
                let cancel = fact == Fact::Cancelled;
                newest.push((Self::version(k.value()), fact));
                if !cancel {
                    break;
                }
            }
        }
        Ok(crate::facts::status(&newest))
    }
}

/// Removes the temporary indexes (`index-<pid>-<n>.redb`, see [`Index::open`]) that processes
/// killed with SIGKILL left behind: their drop never ran. redb holds its file with an exclusive
/// `flock` for as long as it is open, so a file whose lock can be taken is no one's; a temporary
/// index in use (another process's, or another engine's in this one) is kept. Nothing else in
/// the directory is touched: `index.redb` itself is the index, and redb writes no other file.
fn remove_leftovers(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("index-") && name.ends_with(".redb")) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
            continue;
        };
        // SAFETY: flock on the descriptor of a file this function holds open; the lock goes
        // with the file at the end of the iteration.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if free && std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed a temporary state index left behind");
        }
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(timestamp_ms: i64, partition: i32, offset: i64) -> Version {
        Version {
            timestamp_ms,
            partition,
            offset,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-index-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The janitor's tombstones for `gone`, read from partition 0 from `offset` on.
    fn tombstones(gone: Vec<(String, Version)>, offset: i64) -> Vec<Learnt> {
        gone.into_iter()
            .enumerate()
            .map(|(i, (id, version))| Learnt {
                partition: 0,
                offset: offset + i as i64,
                entry: Entry::Tombstone { id, version },
            })
            .collect()
    }

    fn learnt(partition: i32, offset: i64, id: &str, version: Version, fact: Fact) -> Learnt {
        Learnt {
            partition,
            offset,
            entry: Entry::Fact {
                id: id.into(),
                version,
                fact,
                written_ms: version.timestamp_ms,
            },
        }
    }

    #[test]
    fn verdicts_positions_and_delivered_survive_a_reopen() {
        let d = dir("reopen");
        let pending = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
            recurrence: None,
        };
        {
            let index = Index::open(&d).unwrap();
            index
                .apply(&[
                    learnt(0, 0, "a", v(10, 1, 1), pending(100)),
                    learnt(0, 1, "a", v(20, 2, 7), pending(200)),
                    learnt(1, 5, "b", v(15, 0, 3), pending(150)),
                    learnt(1, 6, "b", v(15, 0, 3), Fact::Delivered),
                    learnt(2, 0, "c", v(30, Version::HTTP, 9), Fact::Cancelled),
                ])
                .unwrap();
            // A Pending read again (a re-read after a crash) does not undo Delivered.
            index
                .apply(&[learnt(1, 5, "b", v(15, 0, 3), pending(150))])
                .unwrap();
        }
        let index = Index::open(&d).unwrap();
        assert_eq!(
            index.withheld("a", v(10, 1, 1)).unwrap(),
            Some("superseded")
        );
        assert_eq!(index.withheld("a", v(20, 2, 7)).unwrap(), None);
        assert_eq!(
            index.facts("b").unwrap(),
            vec![(v(15, 0, 3), Fact::Delivered)]
        );
        assert_eq!(index.withheld("c", v(29, 0, 0)).unwrap(), Some("cancelled"));
        assert_eq!(
            index.withheld("zz", v(1, 0, 0)).unwrap(),
            None,
            "unknown ids pass"
        );
        assert_eq!(index.facts("zz").unwrap(), vec![]);
        assert_eq!(
            index.facts("a").unwrap(),
            vec![(v(10, 1, 1), pending(100)), (v(20, 2, 7), pending(200))]
        );
        assert_eq!(
            index.positions().unwrap(),
            HashMap::from([(0, 2), (1, 7), (2, 1)])
        );
        index.advance(&HashMap::from([(0, 1), (3, 40)])).unwrap();
        assert_eq!(index.positions().unwrap()[&0], 2, "never backwards");
        assert_eq!(index.positions().unwrap()[&3], 40);
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_locked_index_gives_way_to_a_temporary_one() {
        let d = dir("locked");
        let first = Index::open(&d).unwrap();
        let second = Index::open(&d).unwrap();
        assert_ne!(first.path(), second.path());
        let own = second.path().to_path_buf();
        assert!(own.exists());
        drop(second);
        assert!(!own.exists(), "the temporary index is removed");
        drop(first);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_id_expires_whole_once_its_last_write_and_due_are_older_than_the_keep() {
        let d = dir("expire");
        let index = Index::open(&d).unwrap();
        let pending = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
            recurrence: None,
        };
        index
            .apply(&[
                // Delivered long ago, rescheduled from a version due later: kept for that one.
                learnt(0, 0, "a", v(10, 0, 1), pending(5_000)),
                learnt(0, 1, "a", v(20, 0, 2), Fact::Delivered),
                // Cancelled, all old: goes.
                learnt(0, 2, "b", v(10, 0, 3), pending(100)),
                learnt(0, 3, "b", v(30, Version::HTTP, 4), Fact::Cancelled),
                // Written recently: stays.
                learnt(0, 4, "c", v(900, 0, 5), Fact::Delivered),
            ])
            .unwrap();
        let keep = 100;
        let gone = index.expired(1_000, keep, 10).unwrap();
        assert_eq!(
            gone,
            vec![
                ("b".to_string(), v(10, 0, 3)),
                ("b".to_string(), v(30, Version::HTTP, 4))
            ]
        );
        assert_eq!(
            index.expired(5_101, keep, 10).unwrap().len(),
            5,
            "all of a, b and c"
        );
        assert_eq!(
            index.expired(5_101, keep, 1).unwrap().len(),
            2,
            "whole ids only"
        );
        index.apply(&tombstones(gone, 5)).unwrap();
        assert_eq!(index.facts("b").unwrap(), vec![]);
        assert_eq!(index.withheld("b", v(10, 0, 3)).unwrap(), None, "forgotten");
        assert_eq!(index.facts("a").unwrap().len(), 2);
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A recurring schedule files a version per occurrence and never expires whole: its old
    /// versions go one by one, all but the newest two, and verdicts and status stay as they were.
    #[test]
    fn an_id_that_lives_on_loses_its_old_versions_but_its_newest_two() {
        let d = dir("lives-on");
        let index = Index::open(&d).unwrap();
        let occurrence = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
            recurrence: Some("every 1s".into()),
        };
        index
            .apply(&[
                learnt(0, 0, "r", v(10, 0, 1), occurrence(100)),
                learnt(0, 1, "r", v(10, 0, 2), occurrence(200)),
                learnt(0, 2, "r", v(10, 0, 3), occurrence(300)),
                learnt(0, 3, "r", v(10, 0, 4), occurrence(5_000)),
            ])
            .unwrap();
        let status = index.status("r").unwrap();
        let gone = index.expired(1_000, 100, 10).unwrap();
        assert_eq!(
            gone,
            vec![
                ("r".to_string(), v(10, 0, 1)),
                ("r".to_string(), v(10, 0, 2)),
                ("r".to_string(), v(10, 0, 3))
            ],
            "the old versions before the newest"
        );
        index.apply(&tombstones(gone, 4)).unwrap();
        assert_eq!(index.status("r").unwrap(), status);
        assert_eq!(index.withheld("r", v(10, 0, 4)).unwrap(), None);
        assert_eq!(
            index.withheld("r", v(10, 0, 3)).unwrap(),
            Some("superseded")
        );
        assert_eq!(
            index.expired(5_101, 100, 10).unwrap().len(),
            1,
            "then whole"
        );
        // Cancels after a delivery: the delivered version stays while a newer fact is young, or
        // the status would turn from `delivered` to `cancelled`.
        index
            .apply(&[
                learnt(0, 10, "c", v(10, 0, 11), Fact::Delivered),
                learnt(0, 11, "c", v(20, Version::HTTP, 12), Fact::Cancelled),
                learnt(0, 12, "c", v(5_000, Version::HTTP, 13), Fact::Cancelled),
            ])
            .unwrap();
        assert_eq!(
            index.status("c").unwrap().map(|s| s.status),
            Some("delivered")
        );
        assert!(
            !index
                .expired(1_000, 100, 10)
                .unwrap()
                .iter()
                .any(|(id, _)| id == "c"),
            "nothing of c goes while its newest cancel is young"
        );
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn leftover_temporary_indexes_are_removed_at_open_and_one_in_use_is_kept() {
        let d = dir("leftover");
        let first = Index::open(&d).unwrap();
        let in_use = Index::open(&d).unwrap();
        // What a process killed with SIGKILL leaves: a temporary index nobody holds.
        let leftover = d.join("index-4194305-0.redb");
        drop(Database::create(&leftover).unwrap());
        assert!(leftover.exists());
        let third = Index::open(&d).unwrap();
        assert!(!leftover.exists(), "the leftover is removed");
        assert!(in_use.path().exists(), "a temporary index in use is kept");
        assert!(first.path().exists());
        drop((first, in_use, third));
        std::fs::write(&leftover, b"not even a database").unwrap();
        let alone = Index::open(&d).unwrap();
        assert!(
            !leftover.exists(),
            "removed when the usual file is free too"
        );
        assert_eq!(alone.path(), d.join("index.redb"));
        drop(alone);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The publish gate judges every copy of an id, one version after another: with N versions
    /// known, that must read about N stored facts in all, not N for each (N²).
    #[test]
    fn judging_each_version_of_an_id_reads_a_bounded_number_of_facts() {
        const N: i64 = 1_000;
        let d = dir("many");
        let index = Index::open(&d).unwrap();
        let pending = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
            recurrence: None,
        };
        let batch: Vec<Learnt> = (0..N)
            .map(|i| learnt(0, i, "x", v(i, 0, i), pending(i)))
            .collect();
        index.apply(&batch).unwrap();
        let decoded = || DECODED.with(std::cell::Cell::get);
        let before = decoded();
        for i in 0..N {
            let expected = (i < N - 1).then_some("superseded");
            assert_eq!(index.withheld("x", v(i, 0, i)).unwrap(), expected);
        }
        let read = decoded() - before;
        assert!(
            read <= 4 * N as u64,
            "judging {N} versions read {read} stored facts"
        );
        let status = |index: &Index| {
            let before = decoded();
            let s = index.status("x").unwrap().unwrap();
            (s.status, s.version, decoded() - before)
        };
        assert_eq!(status(&index), ("pending", v(N - 1, 0, N - 1), 1));
        index
            .apply(&[
                learnt(0, N, "x", v(N + 1, Version::HTTP, 1), Fact::Cancelled),
                learnt(0, N + 1, "x", v(N + 2, Version::HTTP, 2), Fact::Cancelled),
            ])
            .unwrap();
        assert_eq!(
            status(&index),
            ("cancelled", v(N + 2, Version::HTTP, 2), 3),
            "the cancels, then the newest schedule"
        );
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_index_of_another_source_is_emptied_and_says_why() {
        let d = dir("source");
        let index = Index::open(&d).unwrap();
        let source = |cluster: &str, topic: &str, partitions| Source {
            cluster: Some(cluster.into()),
            topic: Some(topic.into()),
            partitions,
        };
        let fill = |index: &Index| {
            index
                .apply(&[learnt(0, 0, "a", v(10, 0, 1), Fact::Cancelled)])
                .unwrap()
        };
        assert_eq!(index.adopt(&source("c1", "t1", 2)).unwrap(), None, "new");
        fill(&index);
        assert_eq!(index.adopt(&source("c1", "t1", 2)).unwrap(), None, "same");
        assert_eq!(index.facts("a").unwrap().len(), 1);
        for (next, reason) in [
            (source("c1", "t2", 2), "topic"),
            (source("c2", "t2", 2), "cluster"),
            (source("c2", "t2", 3), "partitions"),
        ] {
            fill(&index);
            let rebuilt = index.adopt(&next).unwrap().expect("emptied");
            assert_eq!(rebuilt.reason, reason);
            assert_eq!(index.facts("a").unwrap(), vec![]);
            assert_eq!(index.positions().unwrap(), HashMap::new());
        }
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
        let index = Index::open(&d).unwrap();
        fill(&index);
        let rebuilt = index
            .adopt(&source("c1", "t1", 2))
            .unwrap()
            .expect("emptied");
        assert_eq!(
            (rebuilt.reason, rebuilt.was),
            ("unrecorded", None),
            "an index of an earlier version"
        );
        drop(index);
        let _ = std::fs::remove_dir_all(&d);
    }
}
