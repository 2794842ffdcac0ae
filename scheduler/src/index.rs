//! The local index of the facts of ids (issue #13), on disk: what the publish gate and the status
//! API ask. It is a cache of the state topic: it stores, in the same transaction as the facts,
//! how far it has read each state partition, so a restart goes on from there, and a lost or
//! locked file is simply rebuilt from Kafka.
//!
//! redb keeps the facts in a B-tree keyed by (id, version): the newest fact of an id is the last
//! entry of its range, and memory is redb's page cache (capped), not a map of every id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::facts::{Fact, Version};

/// (id, timestamp ms, partition, offset) -> the fact, encoded.
const FACTS: TableDefinition<(&str, i64, i32, i64), &[u8]> = TableDefinition::new("facts");
/// State partition -> the next offset to read.
const POSITIONS: TableDefinition<i32, i64> = TableDefinition::new("positions");

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

/// One record read from the state topic: its position, and the fact it holds (`None` for a
/// record that is not a fact: skipped, but its position still moves).
#[derive(Debug, Clone)]
pub struct Learnt {
    pub partition: i32,
    pub offset: i64,
    pub fact: Option<(String, Version, Fact)>,
}

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
                if let Some((id, v, fact)) = &l.fact {
                    let key = (id.as_str(), v.timestamp_ms, v.partition, v.offset);
                    // Delivered is news about a Pending of the same version: never undo it.
                    let delivered = facts
                        .get(key)?
                        .is_some_and(|old| Fact::decode(old.value()) == Some(Fact::Delivered));
                    if !(delivered && matches!(fact, Fact::Pending { .. })) {
                        facts.insert(key, fact.encode().as_slice())?;
                    }
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

    /// The newest fact known for `id`.
    pub fn latest(&self, id: &str) -> Result<Option<(Version, Fact)>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let Some(entry) = table.range(Self::range_of(id))?.next_back() else {
            return Ok(None);
        };
        let (k, v) = entry?;
        Ok(Fact::decode(v.value()).map(|f| (Self::version(k.value()), f)))
    }

    /// Every fact known for `id`, oldest version first (the status API's input).
    pub fn facts(&self, id: &str) -> Result<Vec<(Version, Fact)>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FACTS)?;
        let mut out = Vec::new();
        for entry in table.range(Self::range_of(id))? {
            let (k, v) = entry?;
            if let Some(f) = Fact::decode(v.value()) {
                out.push((Self::version(k.value()), f));
            }
        }
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

    /// May a copy of `version` of `id` be delivered: is no fact of a higher version known?
    pub fn may_deliver(&self, id: &str, version: Version) -> Result<bool, IndexError> {
        Ok(self.latest(id)?.is_none_or(|(newest, _)| newest <= version))
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

    fn learnt(partition: i32, offset: i64, id: &str, version: Version, fact: Fact) -> Learnt {
        Learnt {
            partition,
            offset,
            fact: Some((id.into(), version, fact)),
        }
    }

    #[test]
    fn verdicts_positions_and_delivered_survive_a_reopen() {
        let d = dir("reopen");
        let pending = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
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
        assert!(!index.may_deliver("a", v(10, 1, 1)).unwrap(), "rescheduled");
        assert!(index.may_deliver("a", v(20, 2, 7)).unwrap());
        assert_eq!(
            index.latest("b").unwrap(),
            Some((v(15, 0, 3), Fact::Delivered))
        );
        assert!(!index.may_deliver("c", v(29, 0, 0)).unwrap(), "cancelled");
        assert!(
            index.may_deliver("zz", v(1, 0, 0)).unwrap(),
            "unknown ids pass"
        );
        assert_eq!(index.latest("zz").unwrap(), None);
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
}
