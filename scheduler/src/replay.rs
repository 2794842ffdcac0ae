//! What a partition's last committed transaction had done above its commit point (issue #31,
//! the exactly-once mode): [`Progress`], and its encoding in the committed offset's metadata,
//! which the next owner reads on assignment to skip what is done (see [`crate::transaction`]).

use base64::Engine as _;

/// What a record that was read has become, per partition, as a transaction commits it: from the
/// commit point `from`, every record below `upto` is done except those in `pending` (sorted,
/// each in `from..upto`); nothing from `upto` on is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    pub from: i64,
    pub upto: i64,
    pub pending: Vec<i64>,
}

/// The prefix of the metadata this version writes; metadata without it (a commit of the
/// at-least-once mode, or of another tool) says nothing is done above the commit point.
const PREFIX: &str = "sm1:";

/// Kafka's default `offset.metadata.max.bytes`: a commit whose metadata is longer is refused.
pub const METADATA_LIMIT: usize = 4096;

impl Progress {
    /// Whether the record at `offset` was done (written where it goes, in a committed
    /// transaction) by the process that committed this progress.
    pub fn is_done(&self, offset: i64) -> bool {
        offset >= self.from && offset < self.upto && self.pending.binary_search(&offset).is_err()
    }

    /// The metadata string: a tag, the span `upto - from`, then the pending records as a bitmap
    /// or as run lengths, whichever is shorter (a bitmap costs a bit per record of the span;
    /// runs a byte or two per change between pending and done), in URL-safe base64.
    pub fn encode(&self) -> String {
        let span = (self.upto - self.from).max(0) as u64;
        let mut bitmap = vec![0u8; span.div_ceil(8) as usize];
        for &o in &self.pending {
            let i = (o - self.from) as usize;
            bitmap[i / 8] |= 1 << (i % 8);
        }
        let mut runs = Vec::new();
        let mut at = self.from;
        for chunk in self.pending_runs() {
            varint(&mut runs, (chunk.0 - at) as u64); // done before this run
            varint(&mut runs, (chunk.1 - chunk.0) as u64); // pending
            at = chunk.1;
        }
        let mut bytes = Vec::with_capacity(bitmap.len().min(runs.len()) + 11);
        if runs.len() < bitmap.len() {
            bytes.push(1);
            varint(&mut bytes, span);
            bytes.extend_from_slice(&runs);
        } else {
            bytes.push(0);
            varint(&mut bytes, span);
            bytes.extend_from_slice(&bitmap);
        }
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// The pending records as half-open runs of consecutive offsets.
    fn pending_runs(&self) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for &o in &self.pending {
            match out.last_mut() {
                Some(run) if run.1 == o => run.1 = o + 1,
                _ => out.push((o, o + 1)),
            }
        }
        out
    }

    /// The progress a commit at `from` with this metadata states; `None` when the metadata is
    /// not ours (nothing above `from` is known to be done) or does not parse.
    pub fn decode(from: i64, metadata: &str) -> Option<Progress> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(metadata.strip_prefix(PREFIX)?)
            .ok()?;
        let (&tag, rest) = bytes.split_first()?;
        let mut rest = rest;
        let span = read_varint(&mut rest)?;
        let upto = from.checked_add(i64::try_from(span).ok()?)?;
        let mut pending = Vec::new();
        match tag {
            0 => {
                if rest.len() as u64 != span.div_ceil(8) {
                    return None;
                }
                for i in 0..span {
                    if rest[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                        pending.push(from + i as i64);
                    }
                }
            }
            1 => {
                let mut at = from;
                while !rest.is_empty() {
                    at = at.checked_add(i64::try_from(read_varint(&mut rest)?).ok()?)?;
                    let len = i64::try_from(read_varint(&mut rest)?).ok()?;
                    let end = at.checked_add(len)?;
                    if end > upto {
                        return None;
                    }
                    pending.extend(at..end);
                    at = end;
                }
            }
            _ => return None,
        }
        Some(Progress {
            from,
            upto,
            pending,
        })
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_pending_is_a_span_alone() {
        let p = Progress {
            from: 100,
            upto: 200,
            pending: vec![],
        };
        let s = p.encode();
        assert!(s.len() < 12, "{s}");
        assert_eq!(Progress::decode(100, &s), Some(p.clone()));
        assert!(p.is_done(100) && p.is_done(199));
        assert!(!p.is_done(99) && !p.is_done(200), "outside the span");
    }

    #[test]
    fn pending_records_are_not_done_and_the_rest_of_the_span_is() {
        let p = Progress {
            from: 10,
            upto: 20,
            pending: vec![10, 11, 15],
        };
        let back = Progress::decode(10, &p.encode()).unwrap();
        assert_eq!(back, p);
        let done: Vec<i64> = (5..25).filter(|&o| back.is_done(o)).collect();
        assert_eq!(done, vec![12, 13, 14, 16, 17, 18, 19]);
    }

    #[test]
    fn metadata_that_is_not_ours_says_nothing_is_done() {
        assert_eq!(Progress::decode(5, ""), None);
        assert_eq!(Progress::decode(5, "committed by a person"), None);
        assert_eq!(Progress::decode(5, "sm1:%%%"), None);
        assert_eq!(Progress::decode(5, "sm1:"), None);
    }

    #[test]
    fn a_window_of_ten_thousand_records_fits_the_default_metadata_limit() {
        // A level-0 window at 20,000 records/s over four slice partitions, half of it delivered
        // at random: the bitmap, 1,250 bytes, is chosen over runs.
        let from = 1_000_000;
        let pending: Vec<i64> = (0..10_000)
            .filter(|i| (i * 7919) % 13 < 6)
            .map(|i| from + i)
            .collect();
        let p = Progress {
            from,
            upto: from + 10_000,
            pending,
        };
        let s = p.encode();
        assert!(s.len() < METADATA_LIMIT / 2, "{}", s.len());
        assert_eq!(Progress::decode(from, &s), Some(p));
    }

    proptest! {
        #[test]
        fn progress_survives_its_metadata(from in 0i64..1 << 40, span in 0i64..5_000, seed in any::<u64>()) {
            let pending: Vec<i64> = (0..span)
                .filter(|i| (seed.rotate_left((*i % 64) as u32) ^ (*i as u64)) % 3 == 0)
                .map(|i| from + i)
                .collect();
            let p = Progress { from, upto: from + span, pending };
            prop_assert_eq!(Progress::decode(from, &p.encode()), Some(p));
        }
    }
}
