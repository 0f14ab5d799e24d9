//! Newtypes for the ids that cross module boundaries, so local and wire ids never mix.

/// Index of a worker shard, `0..n_shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

/// A connection's key in its shard's slab; meaningful only inside that shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnToken(pub usize);

/// A document's editing replica (`1 ..= 2^53-1` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(pub u64);

/// Position of an accepted op message in its document's history; the first is 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServerSeq(pub u64);

/// Picks the shard that owns a document: a stable hash (FNV-1a, 64 bit) of its name, so the
/// same document lands on the same shard in every process with the same shard count.
pub fn shard_for_doc(doc: &str, n_shards: usize) -> ShardId {
    assert!(n_shards > 0, "at least one shard");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in doc.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ShardId((hash % n_shards as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_choice_is_stable_and_in_range() {
        assert_eq!(shard_for_doc("doc-a", 4), shard_for_doc("doc-a", 4));
        for n in 1..8 {
            for doc in ["", "a", "b", "some/long/name", "ünïcode"] {
                assert!(shard_for_doc(doc, n).0 < n);
            }
        }
        // Golden value: changing the hash would move documents between shards.
        assert_eq!(
            shard_for_doc("hello", 1_000_003).0,
            (0xa430_d846_80aa_bd0b_u64 % 1_000_003) as usize
        );
    }
}
