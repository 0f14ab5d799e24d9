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
