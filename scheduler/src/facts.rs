//! Cancel and reschedule by id: the contract's pure core (issue #13), without I/O.
//!
//! A record with an `id` has a [`Version`]: its record timestamp, then its ingest partition and
//! offset, a total order comparable across partitions. For each id the highest version wins:
//! a later schedule reschedules, a later `cancel: true` record cancels. What the engine knows
//! about an id is a set of [`Fact`]s keyed by version; [`verdict`] says whether a copy of a
//! given version may be delivered: only if no known fact of its id has a higher version.
//!
//! The rule needs no reads before writes and no coordination: any process may learn the facts in
//! any order, and compaction (dropping every fact of an id but its highest) never changes a
//! verdict, because only the highest version matters. The property tests below hold this for
//! any interleaving.

use std::collections::BTreeMap;

/// The order of the records of one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// The record's timestamp (the producer's clock, or the broker's with `LogAppendTime`).
    pub timestamp_ms: i64,
    /// The ingest partition; [`Version::HTTP`] for a cancel made over HTTP.
    pub partition: i32,
    /// The offset in that partition; for an HTTP cancel, a random number.
    pub offset: i64,
}

impl Version {
    /// The partition of an HTTP cancel's version: after every ingest partition, so that a cancel
    /// made in the same millisecond as the record it cancels was produced still wins.
    pub const HTTP: i32 = i32::MAX;

    /// `<timestamp ms>.<partition>.<offset>`, as in the `sm-version` header.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.timestamp_ms, self.partition, self.offset)
    }

    pub fn decode(s: &str) -> Option<Version> {
        let mut parts = s.splitn(3, '.');
        Some(Version {
            timestamp_ms: parts.next()?.parse().ok()?,
            partition: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
        })
    }
}

/// What is known about one version of an id; in the state topic, JSON such as
/// `{"fact":"pending","due_ms":1764680000000,"target":"sms"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "fact", rename_all = "lowercase")]
pub enum Fact {
    /// Scheduled for `due_ms` to `target`; `recurrence` describes a recurring schedule (whose
    /// occurrence this version is).
    Pending {
        due_ms: i64,
        target: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recurrence: Option<String>,
    },
    /// A cancel.
    Cancelled,
    /// Acknowledged by its target.
    Delivered,
}

impl Fact {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(value: &[u8]) -> Option<Fact> {
        serde_json::from_slice(value).ok()
    }

    /// The status the API reports for an id whose newest fact is this one.
    pub fn status(&self) -> &'static str {
        match self {
            Fact::Pending { .. } => "pending",
            Fact::Cancelled => "cancelled",
            Fact::Delivered => "delivered",
        }
    }
}

/// The key of a fact in the state topic: `<version>/<id>`. Each (id, version) is one key, so
/// compaction keeps a version's latest news (`Delivered` after `Pending`) and never merges two
/// versions; the version comes first because it has no `/` and an id may.
pub fn fact_key(id: &str, version: Version) -> String {
    format!("{}/{id}", version.encode())
}

/// Reads a key written by [`fact_key`].
pub fn parse_fact_key(key: &[u8]) -> Option<(String, Version)> {
    let key = std::str::from_utf8(key).ok()?;
    let (version, id) = key.split_once('/')?;
    Some((id.to_string(), Version::decode(version)?))
}

/// The key of an ingest watermark in the state topic: `~watermark/<ingest partition>`, one key
/// per partition, so compaction keeps only the newest. It never reads as a fact key (`~watermark`
/// is no version), so the index, the janitor and the status API never see it; an older release
/// skips it as malformed.
pub fn watermark_key(partition: i32) -> String {
    format!("{WATERMARK_PREFIX}{partition}")
}

const WATERMARK_PREFIX: &str = "~watermark/";

/// The ingest partition of a key written by [`watermark_key`].
pub fn parse_watermark_key(key: &[u8]) -> Option<i32> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(WATERMARK_PREFIX)?
        .parse()
        .ok()
}

/// An ingest watermark: every record of its ingest partition that Kafka acknowledged before
/// `before_ms` (the writer's clock) has been read, and its fact is acknowledged in the state
/// topic. In the state topic, JSON such as
/// `{"before_ms":1764680000000,"offset":1234,"by":"scheduler-1"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Watermark {
    /// The writer's clock when it asked the partition's end offset.
    pub before_ms: i64,
    /// That end offset: every record below it is read, with its fact acknowledged.
    pub offset: i64,
    /// Who wrote it (the instance id, or the process id), for whoever reads the topic.
    pub by: String,
}

impl Watermark {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(value: &[u8]) -> Option<Watermark> {
        serde_json::from_slice(value).ok()
    }
}

/// What the status API reports for an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdStatus {
    /// `pending`, `delivered` or `cancelled`.
    pub status: &'static str,
    /// The newest version known.
    pub version: Version,
    /// The due time of a pending version.
    pub due_ms: Option<i64>,
    /// A pending recurring schedule's rule (`every 5m`, `cron 0 9 * * * in Europe/Paris`).
    pub recurrence: Option<String>,
}

/// The status of an id from its facts (any order): the newest fact's, except that a cancel that
/// came after its version was delivered (closer to the due time than the cancel lead) reports
/// `delivered`, because that is what happened.
pub fn status(facts: &[(Version, Fact)]) -> Option<IdStatus> {
    let mut facts: Vec<&(Version, Fact)> = facts.iter().collect();
    facts.sort_by_key(|(v, _)| *v);
    let (version, newest) = *facts.last()?;
    let status = match newest {
        Fact::Cancelled => {
            let before = facts.iter().rev().find(|(_, f)| *f != Fact::Cancelled);
            match before {
                Some((_, Fact::Delivered)) => "delivered",
                _ => "cancelled",
            }
        }
        other => other.status(),
    };
    Some(IdStatus {
        status,
        version: *version,
        due_ms: match newest {
            Fact::Pending { due_ms, .. } => Some(*due_ms),
            _ => None,
        },
        recurrence: match newest {
            Fact::Pending { recurrence, .. } => recurrence.clone(),
            _ => None,
        },
    })
}

/// May a copy of `version` be delivered, given the versions known for its id?
pub fn verdict(known: impl IntoIterator<Item = Version>, version: Version) -> bool {
    known.into_iter().all(|k| k <= version)
}

/// Why a copy of `version` is not delivered, given the facts known for its id: the newest fact
/// says, `cancelled` when it is a cancel, `superseded` when it is a newer schedule (or that
/// schedule's delivery); `None` when no fact is newer than `version`. Only the newest fact
/// counts, so an index reads one per judgement, however many versions the id has.
pub fn withheld(facts: &[(Version, Fact)], version: Version) -> Option<&'static str> {
    let (newest, fact) = facts.iter().max_by_key(|(v, _)| *v)?;
    if *newest <= version {
        return None;
    }
    Some(if *fact == Fact::Cancelled {
        "cancelled"
    } else {
        "superseded"
    })
}

/// The facts of ids, as an index holds them: the model the on-disk index follows.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    by_id: BTreeMap<String, BTreeMap<Version, Fact>>,
}

impl Facts {
    /// Learns a fact; a fact learnt twice is the same fact (each key is written once).
    pub fn learn(&mut self, id: &str, version: Version, fact: Fact) {
        let facts = self.by_id.entry(id.to_string()).or_default();
        match (facts.get(&version), &fact) {
            // Delivered is learnt after Pending for the same version; keep the later news.
            (Some(Fact::Delivered), Fact::Pending { .. }) => {}
            _ => {
                facts.insert(version, fact);
            }
        }
    }

    /// May a copy of `version` of `id` be delivered?
    pub fn may_deliver(&self, id: &str, version: Version) -> bool {
        self.by_id
            .get(id)
            .is_none_or(|f| verdict(f.keys().copied(), version))
    }

    /// The fact with the highest version of `id`: what the status API reports.
    pub fn latest(&self, id: &str) -> Option<(Version, &Fact)> {
        self.by_id.get(id)?.iter().next_back().map(|(v, f)| (*v, f))
    }

    /// Compaction: forgets every fact of `id` but the highest.
    pub fn compact(&mut self, id: &str) {
        if let Some(facts) = self.by_id.get_mut(id) {
            while facts.len() > 1 {
                facts.pop_first();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(timestamp_ms: i64, partition: i32, offset: i64) -> Version {
        Version {
            timestamp_ms,
            partition,
            offset,
        }
    }

    #[test]
    fn versions_order_by_time_then_partition_then_offset_and_round_trip() {
        assert!(v(1, 9, 9) < v(2, 0, 0));
        assert!(v(5, 0, 9) < v(5, 1, 0));
        assert!(v(5, 1, 3) < v(5, 1, 4));
        assert!(
            v(5, 15, 9) < v(5, Version::HTTP, 0),
            "an HTTP cancel sorts after every record of its millisecond"
        );
        for x in [v(1_700_000_000_000, 3, 42), v(0, Version::HTTP, i64::MAX)] {
            assert_eq!(Version::decode(&x.encode()), Some(x));
        }
        assert_eq!(Version::decode("1.2"), None);
        assert_eq!(Version::decode("a.b.c"), None);
    }

    #[test]
    fn the_highest_version_wins() {
        let mut f = Facts::default();
        let pending = |due_ms| Fact::Pending {
            due_ms,
            target: "t".into(),
            recurrence: None,
        };
        f.learn("x", v(10, 0, 1), pending(100));
        assert!(f.may_deliver("x", v(10, 0, 1)));
        f.learn("x", v(20, 1, 5), pending(200));
        assert!(!f.may_deliver("x", v(10, 0, 1)), "rescheduled");
        assert!(f.may_deliver("x", v(20, 1, 5)));
        f.learn("x", v(30, 0, 2), Fact::Cancelled);
        assert!(!f.may_deliver("x", v(20, 1, 5)), "cancelled");
        assert_eq!(f.latest("x"), Some((v(30, 0, 2), &Fact::Cancelled)));
        let known = [
            (v(10, 0, 1), pending(100)),
            (v(20, 1, 5), pending(200)),
            (v(30, 0, 2), Fact::Cancelled),
        ];
        assert_eq!(withheld(&known[..2], v(10, 0, 1)), Some("superseded"));
        assert_eq!(withheld(&known[..2], v(20, 1, 5)), None);
        assert_eq!(withheld(&known, v(20, 1, 5)), Some("cancelled"));
        assert_eq!(withheld(&known, v(10, 0, 1)), Some("cancelled"));
        assert_eq!(withheld(&[], v(1, 0, 0)), None, "unknown ids are not held");
        assert!(
            f.may_deliver("other", v(1, 0, 0)),
            "unknown ids are not held"
        );
    }

    #[test]
    fn keys_and_facts_round_trip() {
        for id in ["order-1", "a/b/c", "ünï"] {
            let key = fact_key(id, v(17, 2, 9));
            assert_eq!(
                parse_fact_key(key.as_bytes()),
                Some((id.to_string(), v(17, 2, 9)))
            );
        }
        for fact in [
            Fact::Pending {
                due_ms: 5,
                target: "sms".into(),
                recurrence: None,
            },
            Fact::Cancelled,
            Fact::Delivered,
        ] {
            assert_eq!(Fact::decode(&fact.encode()), Some(fact));
        }
        assert_eq!(Fact::decode(b"{\"fact\":\"later\"}"), None);
        let key = watermark_key(7);
        assert_eq!(parse_watermark_key(key.as_bytes()), Some(7));
        assert_eq!(
            parse_fact_key(key.as_bytes()),
            None,
            "a watermark is never a fact"
        );
        assert_eq!(
            parse_watermark_key(fact_key("x", v(1, 2, 3)).as_bytes()),
            None
        );
        let mark = Watermark {
            before_ms: 17,
            offset: 4,
            by: "a".into(),
        };
        assert_eq!(Watermark::decode(&mark.encode()), Some(mark));
    }

    #[test]
    fn the_status_is_the_newest_facts_unless_a_late_cancel_met_a_delivery() {
        let pending = Fact::Pending {
            due_ms: 9,
            target: "t".into(),
            recurrence: None,
        };
        assert_eq!(status(&[]), None);
        let s = status(&[(v(1, 0, 0), pending.clone())]).unwrap();
        assert_eq!((s.status, s.due_ms), ("pending", Some(9)));
        let s = status(&[
            (v(2, Version::HTTP, 5), Fact::Cancelled),
            (v(1, 0, 0), pending.clone()),
        ]);
        assert_eq!(
            s.map(|s| (s.status, s.version)),
            Some(("cancelled", v(2, Version::HTTP, 5)))
        );
        let late = status(&[
            (v(1, 0, 0), Fact::Delivered),
            (v(2, Version::HTTP, 5), Fact::Cancelled),
        ]);
        assert_eq!(
            late.map(|s| s.status),
            Some("delivered"),
            "the cancel came too late"
        );
        let reused = status(&[
            (v(1, 0, 0), Fact::Delivered),
            (v(3, 0, 1), pending),
            (v(4, Version::HTTP, 2), Fact::Cancelled),
        ]);
        assert_eq!(
            reused.map(|s| s.status),
            Some("cancelled"),
            "the newer schedule was cancelled"
        );
    }

    /// One fact of a test: (id, version, cancel?).
    fn fact() -> impl Strategy<Value = (u8, Version, bool)> {
        (0u8..4, 0i64..20, -1i32..3, 0i64..5, any::<bool>())
            .prop_map(|(id, t, p, o, cancel)| (id, v(t, p, o), cancel))
    }

    proptest! {
        /// Whatever order the facts arrive in, and wherever compactions fall between them, the
        /// verdicts at the end are those of the full set: only the highest version of each id
        /// may be delivered, and only if it is a schedule. A cancelled version never comes back.
        #[test]
        fn any_interleaving_and_compaction_gives_the_same_verdicts(
            facts in proptest::collection::vec(fact(), 1..40),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 40),
            compactions in proptest::collection::vec(any::<bool>(), 40),
        ) {
            // Each (id, version) is one record: a schedule or a cancel, never both.
            let mut facts = facts;
            facts.sort_by_key(|(id, v, _)| (*id, *v));
            facts.dedup_by_key(|(id, v, _)| (*id, *v));
            let mut shuffled = facts.clone();
            for (i, ix) in order.iter().enumerate().take(shuffled.len()) {
                let j = ix.index(shuffled.len());
                shuffled.swap(i, j);
            }
            let mut index = Facts::default();
            let mut cancelled_seen: Vec<(String, Version)> = Vec::new();
            for (i, (id, version, cancel)) in shuffled.iter().enumerate() {
                let id = format!("id-{id}");
                let fact = if *cancel { Fact::Cancelled } else { Fact::Pending { due_ms: 0, target: "t".into() , recurrence: None} };
                index.learn(&id, *version, fact);
                if *cancel {
                    cancelled_seen.push((id.clone(), *version));
                }
                if compactions[i % compactions.len()] {
                    index.compact(&id);
                }
                // Once a cancel is known, no lower version is ever deliverable again.
                for (cid, cv) in &cancelled_seen {
                    for (_, other, _) in facts.iter().filter(|(x, _, _)| format!("id-{x}") == *cid) {
                        if other < cv {
                            prop_assert!(!index.may_deliver(cid, *other));
                        }
                    }
                }
            }
            for (id, version, cancel) in &facts {
                let id = format!("id-{id}");
                let highest = facts
                    .iter()
                    .filter(|(x, _, _)| format!("id-{x}") == id)
                    .map(|(_, v, _)| *v)
                    .max()
                    .expect("its own fact");
                let deliverable = index.may_deliver(&id, *version) && !cancel;
                prop_assert_eq!(deliverable, *version == highest && !cancel);
            }
        }
    }
}
