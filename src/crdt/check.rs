//! `Doc::dbg_check`: a deep walk over every invariant of the tree, the id index and the RGA order.
//! For tests and `debug_assert!`; it panics on the first violation and is O(n log n).

use super::doc::{origin_rule_holds, Doc};
use super::id::OpId;
use super::tree::{Tree, LEAF_CAP, NONE};

impl Doc {
    /// Walks every invariant; panics on a violation (tests / `debug_assert!`).
    ///
    /// # Panics
    /// On the first broken invariant, naming it.
    pub fn dbg_check(&self) {
        let t = &self.tree;
        t.index.dbg_check();
        let mut leaves_in_order = Vec::new();
        let (total, _) = check_subtree(t, t.root, t.height, NONE, &mut leaves_in_order);
        assert_eq!(total, t.total, "tree total");
        // The leaf chain visits the leaves in tree order.
        let mut chain = Vec::new();
        let mut prev = NONE;
        let mut leaf = 0u32;
        while leaf != NONE {
            assert_eq!(
                t.leaves[leaf as usize].prev, prev,
                "prev link of leaf {leaf}"
            );
            chain.push(leaf);
            prev = leaf;
            leaf = t.leaves[leaf as usize].next;
        }
        assert_eq!(chain, leaves_in_order, "leaf chain order");
        assert_eq!(chain.len(), t.leaves.len(), "every leaf is in the tree");
        if let Some((leaf, start)) = t.cursor {
            assert_eq!(t.leaf_start(leaf), start, "cursor start");
        }
        if let Some((leaf, idx, start)) = t.span_cursor() {
            let l = &t.leaves[leaf as usize];
            let before: u64 = l.spans()[..idx]
                .iter()
                .map(|s| s.visible_len() as u64)
                .sum();
            assert_eq!(t.leaf_start(leaf) + before, start, "span cursor start");
            assert!(!l.spans[idx].deleted(), "span cursor on a tombstone");
        }
        for (i, &r) in self.tree.replicas.iter().enumerate() {
            assert_eq!(self.replica_idx.get(&r), Some(&(i as u32)), "replica table");
        }
        assert_eq!(
            self.tree.replicas.len(),
            self.replica_idx.len(),
            "replica table size"
        );
        let mut ids = Vec::new();
        let mut stack = Vec::new();
        for (leaf, idx, s) in self.spans() {
            assert!(
                (s.replica as usize) < self.tree.replicas.len(),
                "span replica index"
            );
            let replica = self.tree.replicas[s.replica as usize];
            let id = OpId::new(s.lamport(), replica);
            assert!(s.len() >= 1, "empty span");
            assert!(
                s.end() - 1 <= self.max_lamport.unwrap_or(0),
                "span past max_lamport"
            );
            assert!(replica <= self.max_replica, "replica past max_replica");
            if !s.deleted() {
                assert!(
                    s.arena() as usize + s.len() as usize <= self.arena.len(),
                    "span text past the arena"
                );
            }
            // The index maps every id of the span to its leaf.
            assert_eq!(
                t.cover(s.replica, s.lamport()),
                Some(leaf),
                "index cover of {id:?}"
            );
            for (_, l) in t.index.range(s.replica, s.lamport() + 1, s.end()) {
                assert_eq!(l, leaf, "index key inside span {id:?}");
            }
            let found = self.find(id).expect("span first id is findable");
            assert_eq!(
                (found.leaf, found.idx, found.off),
                (leaf, idx, 0),
                "find({id:?})"
            );
            assert!(
                origin_rule_holds(&mut stack, id, s.len() as u64),
                "RGA order: origin of {id:?} has no smaller lamport"
            );
            ids.push((replica, s.lamport(), s.end()));
        }
        ids.sort_unstable();
        for w in ids.windows(2) {
            assert!(
                w[0].0 != w[1].0 || w[0].2 <= w[1].1,
                "ids used twice: {w:?}"
            );
        }
    }
}

/// Checks the subtree at `id` (a leaf when `height == 0`); returns its visible count and its smallest id.
fn check_subtree(
    t: &Tree,
    id: u32,
    height: u8,
    parent: u32,
    leaves: &mut Vec<u32>,
) -> (u64, Option<OpId>) {
    if height == 0 {
        let l = &t.leaves[id as usize];
        assert_eq!(l.parent, parent, "parent of leaf {id}");
        if parent != NONE {
            assert_eq!(
                t.nodes[parent as usize].children[l.slot as usize], id,
                "slot of leaf {id}"
            );
        }
        assert!(l.n as usize <= LEAF_CAP, "leaf {id} over capacity");
        assert!(l.n >= 1 || t.leaves.len() == 1, "empty leaf {id}");
        let visible: u64 = l.spans().iter().map(|s| s.visible_len() as u64).sum();
        assert_eq!(visible, l.visible, "visible count of leaf {id}");
        leaves.push(id);
        let min = l
            .spans()
            .iter()
            .map(|s| OpId::new(s.lamport(), t.replicas[s.replica as usize]))
            .min();
        return (visible, min);
    }
    let node = &t.nodes[id as usize];
    assert_eq!(node.parent, parent, "parent of node {id}");
    if parent != NONE {
        assert_eq!(
            t.nodes[parent as usize].children[node.slot as usize], id,
            "slot of node {id}"
        );
    }
    assert_eq!(node.height, height, "height of node {id}");
    assert!(
        node.n >= 2 || parent == NONE && node.n >= 1,
        "node {id} too small"
    );
    let mut sum = 0;
    let mut min: Option<OpId> = None;
    for i in 0..node.n as usize {
        let (c, m) = check_subtree(t, node.children[i], height - 1, id, leaves);
        assert_eq!(c, node.counts[i], "count of child {i} of node {id}");
        let m = m.expect("a non-root leaf holds a span");
        assert_eq!(m, node.mins[i], "smallest id under child {i} of node {id}");
        sum += c;
        min = Some(min.map_or(m, |x| x.min(m)));
    }
    (sum, min)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::crdt::{Doc, Op, OpId};

    /// xorshift64, so that a failure reproduces from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Every known id is found at the right item, and ids never used are not found.
    fn every_id_found(doc: &Doc, known: &HashMap<OpId, bool>, rng: &mut Rng) {
        doc.dbg_check();
        for (&id, &deleted) in known {
            let loc = doc
                .find(id)
                .unwrap_or_else(|| panic!("known id {id:?} not found"));
            assert_eq!(doc.id_of(loc), id, "find({id:?}) lands on another item");
            let s = doc.tree.span(loc.leaf, loc.idx);
            assert_eq!(s.deleted(), deleted, "state of {id:?}");
        }
        for _ in 0..200 {
            let id = OpId::new(rng.below(1 << 20), 1 + rng.below(12));
            if !known.contains_key(&id) {
                assert!(doc.find(id).is_none(), "unknown id {id:?} found");
            }
        }
    }

    /// The id index under random local typing and deleting by several replicas (spans split, leaves split), and remote
    /// inserts whose ids come below ids already known for their replica (the index's out-of-order paths), checked
    /// against a model of every id ever inserted.
    #[test]
    fn index_finds_every_known_id() {
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut doc = Doc::new();
            let mut known: HashMap<OpId, bool> = HashMap::new();
            // Replicas 1..=5 type locally; replicas 10..=12 send remote inserts with scattered lamports.
            for step in 0..3_000u32 {
                let len = doc.len();
                match rng.below(10) {
                    0..=4 => {
                        let replica = 1 + rng.below(5);
                        let pos = rng.below(len as u64 + 1) as usize;
                        let n = 1 + rng.below(3) as usize;
                        let text: String = "abcdefgh"[..n].to_owned();
                        let Op::Insert { id, .. } = doc.insert_local(replica, pos, &text) else {
                            panic!("insert_local returns an insert")
                        };
                        for i in 0..n as u64 {
                            known.insert(OpId::new(id.lamport + i, replica), false);
                        }
                    }
                    5..=6 if len > 0 => {
                        let pos = rng.below(len as u64) as usize;
                        let k = 1 + rng.below(4).min((len - pos - 1) as u64) as usize;
                        for op in doc.delete_local(pos, k) {
                            let Op::Delete { id, len } = op else {
                                panic!("delete_local returns deletes")
                            };
                            for i in 0..len {
                                known.insert(OpId::new(id.lamport + i, id.replica), true);
                            }
                        }
                    }
                    _ => {
                        // A remote insert after a random known item, with a lamport anywhere above it: for the
                        // replica, often below ids it already has.
                        let replica = 10 + rng.below(3);
                        let after = if len == 0 || rng.below(8) == 0 {
                            None
                        } else {
                            doc.id_at(rng.below(len as u64) as usize)
                        };
                        let floor = after.map_or(0, |a| a.lamport + 1);
                        let n = 1 + rng.below(3);
                        let lamport = floor + rng.below(4_000);
                        let free =
                            (0..n).all(|i| !known.contains_key(&OpId::new(lamport + i, replica)));
                        if !free {
                            continue;
                        }
                        let text: String = "xyz"[..n as usize].to_owned();
                        let id = OpId::new(lamport, replica);
                        doc.apply_remote(Some(replica), &[Op::Insert { id, after, text }])
                            .expect("valid remote insert");
                        for i in 0..n {
                            known.insert(OpId::new(lamport + i, replica), false);
                        }
                    }
                }
                if step % 250 == 0 {
                    every_id_found(&doc, &known, &mut rng);
                }
            }
            assert!(doc.stats().n_leaves > 20, "leaves split (seed {seed})");
            every_id_found(&doc, &known, &mut rng);
            // A replica rebuilt from a snapshot (spans appended in order) indexes the same ids.
            let rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("own snapshot");
            every_id_found(&rebuilt, &known, &mut rng);
        }
    }

    /// The document of the s2 load (ten replicas, one-char inserts at random positions: a span per char) stays under
    /// 40 heap bytes per char (it was 84 with a `BTreeMap` index and 20-byte spans); a guard against layout regressions.
    #[test]
    fn fragmented_document_heap_per_char() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut doc = Doc::new();
        let n = 6_200;
        for i in 0..n {
            let pos = rng.below(doc.len() as u64 + 1) as usize;
            doc.insert_local(1 + (i % 10) as u64, pos, "x");
        }
        doc.dbg_check();
        let stats = doc.stats();
        assert_eq!(stats.n_spans, n as usize);
        assert!(
            stats.n_index_keys <= n as usize * 101 / 100,
            "about one index key per span: {stats:?}"
        );
        let per_char = doc.heap_bytes() as f64 / n as f64;
        assert!(
            per_char < 40.0,
            "{per_char:.1} heap bytes per char, {stats:?}"
        );
    }
}
