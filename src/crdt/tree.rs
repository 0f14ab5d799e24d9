//! The content tree: a B-tree of spans in document order, counted by visible length, plus the id index.
//! A span is a run of items with consecutive ids (same replica, consecutive lamports), adjacent in the document.
//! Leaves hold up to `LEAF_CAP` spans and are chained (`prev`, `next`); internal nodes hold the visible count of each child.
//! The id index maps id ranges to the leaf that holds them, so id lookups and position lookups are O(log n).
//! This module knows nothing of ops, validation or text; `doc.rs` drives it.

use super::id::OpId;
use super::index::IdIndex;

/// Most spans in a leaf; an edit may push a leaf to `LEAF_CAP + 2` for a moment, then it splits.
pub(crate) const LEAF_CAP: usize = 32;
/// Most children of an internal node.
pub(crate) const NODE_CAP: usize = 16;
/// Span hints kept for id lookups (by replica index), so that a few concurrent typists each keep theirs.
const N_HINTS: usize = 4;
/// "No node" in `parent`, `prev`, `next`.
pub(crate) const NONE: u32 = u32::MAX;
/// Bits of `Span::word` for the lamport (at most 2^53 - 1, the contract's limit); above them the tombstone bit
/// and the length.
const LAMPORT_BITS: u32 = 53;
const LAMPORT_MASK: u64 = (1 << LAMPORT_BITS) - 1;
/// Set in `Span::word` for a tombstone.
const DEL_BIT: u64 = 1 << LAMPORT_BITS;
/// Where the length starts in `Span::word`.
const LEN_SHIFT: u32 = LAMPORT_BITS + 1;
/// Longest span (the length shares a word with the lamport); longer runs are stored as several spans.
pub(crate) const SPAN_MAX: u32 = (1 << (64 - LEN_SHIFT)) - 1;
/// The arena offset of a tombstone whose text this `Doc` never had (it came deleted, from a snapshot).
pub(crate) const NO_TEXT: u32 = u32::MAX;

const _: () = assert!(LEAF_CAP >= 4 && LEAF_CAP + 2 <= u8::MAX as usize);
const _: () = assert!(NODE_CAP >= 4);
const _: () = assert!(super::id::MAX_ID_COMPONENT == LAMPORT_MASK);
const _: () = assert!(std::mem::size_of::<Span>() == 16);

/// Items `lamport .. lamport+len` of one replica, adjacent in the document, all visible or all deleted.
/// Packed to 16 bytes, since spans are most of the memory of a document: the lamport, the tombstone bit and the
/// length share a word (53 + 1 + 10 bits, so a span holds at most `SPAN_MAX` items). A tombstone keeps the arena
/// offset of its text (the HTTP API reads the text of recent deletions for `?at=`), or `NO_TEXT`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed(4))]
pub(crate) struct Span {
    /// Lamport of the first item (low 53 bits), the tombstone bit, the length (high 10 bits).
    word: u64,
    /// Index into `Doc::replicas`.
    pub replica: u32,
    /// Arena offset of the first char (`NO_TEXT` for a tombstone without text).
    arena: u32,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lamport, replica) = (self.lamport(), self.replica);
        write!(
            f,
            "[{lamport},r{replica}]x{}{}",
            self.len(),
            if self.deleted() { "del" } else { "" }
        )
    }
}

impl Span {
    pub(crate) fn new(lamport: u64, replica: u32, len: u32, arena: u32, deleted: bool) -> Span {
        debug_assert!(lamport <= LAMPORT_MASK);
        debug_assert!((1..=SPAN_MAX).contains(&len));
        debug_assert!(deleted || arena != NO_TEXT);
        Span {
            word: lamport | if deleted { DEL_BIT } else { 0 } | (len as u64) << LEN_SHIFT,
            replica,
            arena,
        }
    }
    /// Lamport of the first item.
    #[inline]
    pub(crate) fn lamport(&self) -> u64 {
        self.word & LAMPORT_MASK
    }
    #[inline]
    pub(crate) fn len(&self) -> u32 {
        (self.word >> LEN_SHIFT) as u32
    }
    #[inline]
    pub(crate) fn deleted(&self) -> bool {
        self.word & DEL_BIT != 0
    }
    #[inline]
    pub(crate) fn visible_len(&self) -> u32 {
        if self.deleted() {
            0
        } else {
            self.len()
        }
    }
    /// Arena offset of the first char (`NO_TEXT` for a tombstone that came without text).
    #[inline]
    pub(crate) fn arena(&self) -> u32 {
        self.arena
    }
    /// Lamport one past the last item.
    #[inline]
    pub(crate) fn end(&self) -> u64 {
        self.lamport() + self.len() as u64
    }
    #[inline]
    pub(crate) fn contains(&self, replica: u32, lamport: u64) -> bool {
        self.replica == replica && lamport >= self.lamport() && lamport < self.end()
    }
    #[inline]
    fn set_len(&mut self, len: u32) {
        debug_assert!((1..=SPAN_MAX).contains(&len));
        self.word = (self.word & (LAMPORT_MASK | DEL_BIT)) | (len as u64) << LEN_SHIFT;
    }
    #[inline]
    fn set_deleted(&mut self) {
        self.word |= DEL_BIT;
    }
    /// Keeps items `0..at` and returns the rest.
    #[inline]
    fn split_off(&mut self, at: u32) -> Span {
        let len = self.len();
        debug_assert!(at > 0 && at < len);
        let arena = if self.arena == NO_TEXT {
            NO_TEXT
        } else {
            self.arena.wrapping_add(at)
        };
        let right = Span::new(
            self.lamport() + at as u64,
            self.replica,
            len - at,
            arena,
            self.deleted(),
        );
        self.set_len(at);
        right
    }
    /// Whether `next` continues this span: same replica, next lamport, same state, the next arena slot (or both
    /// tombstones without text), and room for both.
    #[inline]
    fn can_append(&self, next: &Span) -> bool {
        let text_continues = match (self.arena, next.arena) {
            (NO_TEXT, NO_TEXT) => true,
            (NO_TEXT, _) | (_, NO_TEXT) => false,
            (a, b) => a.wrapping_add(self.len()) == b,
        };
        self.replica == next.replica
            && self.end() == next.lamport()
            && self.deleted() == next.deleted()
            && text_continues
            && self.len() + next.len() <= SPAN_MAX
    }
}

/// A leaf: spans in document order.
#[derive(Clone)]
pub(crate) struct Leaf {
    pub spans: [Span; LEAF_CAP + 2],
    pub n: u8,
    /// Visible chars in this leaf.
    pub visible: u64,
    pub parent: u32,
    /// Index of this leaf among its parent's children.
    pub slot: u8,
    pub prev: u32,
    pub next: u32,
}

impl Leaf {
    fn empty() -> Leaf {
        Leaf {
            spans: [Span::default(); LEAF_CAP + 2],
            n: 0,
            visible: 0,
            parent: NONE,
            slot: 0,
            prev: NONE,
            next: NONE,
        }
    }
    #[inline]
    pub(crate) fn spans(&self) -> &[Span] {
        &self.spans[..self.n as usize]
    }
    #[inline]
    fn insert(&mut self, idx: usize, span: Span) {
        let n = self.n as usize;
        debug_assert!(n < LEAF_CAP + 2 && idx <= n);
        self.spans.copy_within(idx..n, idx + 1);
        self.spans[idx] = span;
        self.n += 1;
    }
    fn remove(&mut self, idx: usize) {
        let n = self.n as usize;
        self.spans.copy_within(idx + 1..n, idx);
        self.n -= 1;
    }
}

/// Placeholder in unused `Node::mins` slots and the min of an empty leaf: above every valid id.
const NO_MIN: OpId = OpId::new(u64::MAX, u64::MAX);

/// An internal node: children are leaves when `height == 1`, else nodes.
#[derive(Clone)]
pub(crate) struct Node {
    pub children: [u32; NODE_CAP + 1],
    /// Visible chars under each child.
    pub counts: [u64; NODE_CAP + 1],
    /// Smallest id under each child (tombstones included), for the skip and origin searches.
    pub mins: [OpId; NODE_CAP + 1],
    pub n: u8,
    pub height: u8,
    pub parent: u32,
    /// Index of this node among its parent's children.
    pub slot: u8,
}

impl Node {
    #[inline]
    fn slot_of(&self, child: u32) -> usize {
        let n = self.n as usize;
        match self.children[..n].iter().position(|&c| c == child) {
            Some(i) => i,
            None => unreachable!("child {child} not under its parent"),
        }
    }
    fn insert(&mut self, idx: usize, child: u32, count: u64, min: OpId) {
        let n = self.n as usize;
        self.children.copy_within(idx..n, idx + 1);
        self.counts.copy_within(idx..n, idx + 1);
        self.mins.copy_within(idx..n, idx + 1);
        self.children[idx] = child;
        self.counts[idx] = count;
        self.mins[idx] = min;
        self.n += 1;
    }
    fn min(&self) -> OpId {
        self.mins[..self.n as usize]
            .iter()
            .copied()
            .min()
            .unwrap_or(NO_MIN)
    }
}

/// A place in the document: item `off` of span `idx` of leaf `leaf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub leaf: u32,
    pub idx: usize,
    pub off: u32,
}

/// The content tree and the id index.
#[derive(Clone)]
pub(crate) struct Tree {
    /// Boxed so that growing the vector moves and over-allocates pointers, not whole leaves.
    #[allow(clippy::vec_box)]
    pub leaves: Vec<Box<Leaf>>,
    pub nodes: Vec<Node>,
    /// A leaf index when `height == 0`, else a node index.
    pub root: u32,
    pub height: u8,
    /// Visible chars in the document.
    pub total: u64,
    /// Replica ids by dense index (`Span::replica`); the tree needs them to compare ids.
    pub replicas: Vec<u64>,
    /// Id index: key `(replica, lamport)` maps the ids of that replica from `lamport` up to the
    /// next key to the leaf that holds them. Ids that are not known may map anywhere; a lookup
    /// confirms by scanning the leaf.
    pub index: IdIndex,
    /// Local-edit cursor: a leaf and the visible chars before it.
    /// Set by position lookups; cleared when the visible count of another leaf changes (its start may move).
    pub cursor: Option<(u32, u64)>,
    /// Id-index cache: the last segment looked up through `&mut self`, valid until the index changes (`assign` clears it).
    /// Kept out of `&self` lookups so that `Doc` stays `Sync`.
    seg: Option<Seg>,
    /// Span hints for `find_mut`, one slot per replica index modulo `N_HINTS`: the last span of that replica found or
    /// inserted into, as (leaf, span index); checked exactly before use, so they never go stale.
    hints: [(u32, u32); N_HINTS],
    /// Bumped by every change to spans or counts; `span_cursor` is valid only at the version it was taken.
    version: u64,
    /// Local typing cursor: leaf, span index, visible chars before the span, and `version` when set.
    /// `insert_local` sets it after its own insert, so the next keystroke finds its place without scanning.
    span_cursor: Option<(u32, usize, u64, u64)>,
    /// One past the highest lamport ever given to `assign`: no id at or above it is known.
    lamport_end: u64,
}

/// A segment of the id index: ids `lo .. hi` of `replica` map to `leaf`, and no key lies strictly inside.
#[derive(Clone, Copy, Debug)]
struct Seg {
    replica: u32,
    lo: u64,
    hi: u64,
    leaf: u32,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            leaves: vec![Box::new(Leaf::empty())],
            nodes: Vec::new(),
            root: 0,
            height: 0,
            total: 0,
            replicas: Vec::new(),
            index: IdIndex::default(),
            cursor: None,
            seg: None,
            hints: [(0, u32::MAX); N_HINTS],
            version: 0,
            span_cursor: None,
            lamport_end: 0,
        }
    }
}

impl Tree {
    #[inline]
    pub(crate) fn span(&self, leaf: u32, idx: usize) -> Span {
        self.leaves[leaf as usize].spans[idx]
    }

    /// Adds `delta` visible chars to `leaf` and its ancestors.
    #[inline]
    fn add_count(&mut self, leaf: u32, delta: i64) {
        if delta == 0 {
            return;
        }
        if self.cursor.is_some_and(|(c, _)| c != leaf) {
            self.cursor = None;
        }
        let d = delta as u64;
        let l = &mut self.leaves[leaf as usize];
        l.visible = l.visible.wrapping_add(d);
        self.total = self.total.wrapping_add(d);
        let mut slot = l.slot as usize;
        let mut p = l.parent;
        while p != NONE {
            let node = &mut self.nodes[p as usize];
            node.counts[slot] = node.counts[slot].wrapping_add(d);
            slot = node.slot as usize;
            p = node.parent;
        }
    }

    /// Id of the first (and smallest) item of `span`.
    #[inline]
    pub(crate) fn first_id(&self, span: &Span) -> OpId {
        OpId::new(span.lamport(), self.replicas[span.replica as usize])
    }

    /// Smallest id in `leaf` (`NO_MIN` if empty); lamports rise along a span, so its first item is its smallest.
    pub(crate) fn leaf_min(&self, leaf: u32) -> OpId {
        self.leaves[leaf as usize]
            .spans()
            .iter()
            .map(|s| self.first_id(s))
            .min()
            .unwrap_or(NO_MIN)
    }

    /// Records a new item `id` in `leaf`: lowers the smallest id of its ancestors where needed.
    #[inline]
    fn lower_min(&mut self, leaf: u32, id: OpId) {
        let l = &self.leaves[leaf as usize];
        let mut slot = l.slot as usize;
        let mut p = l.parent;
        while p != NONE {
            let node = &mut self.nodes[p as usize];
            if node.mins[slot] <= id {
                return;
            }
            node.mins[slot] = id;
            slot = node.slot as usize;
            p = node.parent;
        }
    }

    /// The first span at or after span `idx` of `leaf`, in document order, whose first item is smaller than `id`.
    /// O(`LEAF_CAP` + height * `NODE_CAP`): it climbs until a right sibling holds a smaller id, then descends to it.
    pub(crate) fn first_below(&self, leaf: u32, idx: usize, id: OpId) -> Option<(u32, usize)> {
        let in_leaf = |leaf: u32, from: usize| {
            let l = &self.leaves[leaf as usize];
            (from..l.n as usize)
                .find(|&i| self.first_id(&l.spans[i]) < id)
                .map(|i| (leaf, i))
        };
        if let Some(found) = in_leaf(leaf, idx) {
            return Some(found);
        }
        let l = &self.leaves[leaf as usize];
        let (mut slot, mut p) = (l.slot as usize, l.parent);
        while p != NONE {
            let node = &self.nodes[p as usize];
            if let Some(i) = (slot + 1..node.n as usize).find(|&i| node.mins[i] < id) {
                let mut cur = node.children[i];
                for _ in 1..node.height {
                    let down = &self.nodes[cur as usize];
                    let j = (0..down.n as usize).find(|&j| down.mins[j] < id)?;
                    cur = down.children[j];
                }
                return in_leaf(cur, 0);
            }
            slot = node.slot as usize;
            p = node.parent;
        }
        None
    }

    /// The last span before span `idx` of `leaf`, in document order, whose first item is smaller than `id`.
    /// O(`LEAF_CAP` + height * `NODE_CAP`), the mirror of `first_below`.
    pub(crate) fn last_below(&self, leaf: u32, idx: usize, id: OpId) -> Option<(u32, usize)> {
        let in_leaf = |leaf: u32, to: usize| {
            let l = &self.leaves[leaf as usize];
            (0..to)
                .rev()
                .find(|&i| self.first_id(&l.spans[i]) < id)
                .map(|i| (leaf, i))
        };
        if let Some(found) = in_leaf(leaf, idx) {
            return Some(found);
        }
        let l = &self.leaves[leaf as usize];
        let (mut slot, mut p) = (l.slot as usize, l.parent);
        while p != NONE {
            let node = &self.nodes[p as usize];
            if let Some(i) = (0..slot).rev().find(|&i| node.mins[i] < id) {
                let mut cur = node.children[i];
                for _ in 1..node.height {
                    let down = &self.nodes[cur as usize];
                    let j = (0..down.n as usize).rev().find(|&j| down.mins[j] < id)?;
                    cur = down.children[j];
                }
                return in_leaf(cur, self.leaves[cur as usize].n as usize);
            }
            slot = node.slot as usize;
            p = node.parent;
        }
        None
    }

    /// Visible chars before `leaf`.
    pub(crate) fn leaf_start(&self, leaf: u32) -> u64 {
        let mut pos = 0;
        let l = &self.leaves[leaf as usize];
        let mut slot = l.slot as usize;
        let mut p = l.parent;
        while p != NONE {
            let node = &self.nodes[p as usize];
            pos += node.counts[..slot].iter().sum::<u64>();
            slot = node.slot as usize;
            p = node.parent;
        }
        pos
    }

    /// The leaf holding visible char `pos` (`pos < total`) and the visible chars before that leaf.
    pub(crate) fn leaf_at(&self, pos: u64) -> (u32, u64) {
        debug_assert!(pos < self.total);
        let mut rest = pos;
        let mut cur = self.root;
        for _ in 0..self.height {
            let node = &self.nodes[cur as usize];
            let n = node.n as usize;
            let mut i = 0;
            while i + 1 < n && rest >= node.counts[i] {
                rest -= node.counts[i];
                i += 1;
            }
            cur = node.children[i];
        }
        (cur, pos - rest)
    }

    /// Location of visible char `pos` (`pos < total`), through the cursor when it covers `pos`.
    #[inline]
    pub(crate) fn locate_visible(&mut self, pos: u64) -> Loc {
        if let Some((leaf, idx, start, version)) = self.span_cursor {
            if version == self.version {
                let s = self.leaves[leaf as usize].spans[idx];
                if !s.deleted() && pos >= start && pos < start + s.len() as u64 {
                    let off = (pos - start) as u32;
                    return Loc { leaf, idx, off };
                }
            }
        }
        if let Some((leaf, start)) = self.cursor {
            if pos >= start && pos < start + self.leaves[leaf as usize].visible {
                return self.loc_in_leaf(leaf, pos - start);
            }
        }
        let (leaf, start) = self.leaf_at(pos);
        self.cursor = Some((leaf, start));
        self.loc_in_leaf(leaf, pos - start)
    }

    /// Remembers that the visible span at `leaf`, `idx` starts at position `start` (see `span_cursor`).
    #[inline]
    pub(crate) fn set_span_cursor(&mut self, leaf: u32, idx: usize, start: u64) {
        self.span_cursor = Some((leaf, idx, start, self.version));
    }

    /// The span cursor, if still valid: leaf, span index, visible chars before the span.
    pub(crate) fn span_cursor(&self) -> Option<(u32, usize, u64)> {
        self.span_cursor
            .filter(|c| c.3 == self.version)
            .map(|(leaf, idx, start, _)| (leaf, idx, start))
    }

    /// Location of visible char `rest` within `leaf`.
    #[inline]
    pub(crate) fn loc_in_leaf(&self, leaf: u32, mut rest: u64) -> Loc {
        let l = &self.leaves[leaf as usize];
        for (idx, s) in l.spans().iter().enumerate() {
            let v = s.visible_len() as u64;
            if rest < v {
                return Loc {
                    leaf,
                    idx,
                    off: rest as u32,
                };
            }
            rest -= v;
        }
        unreachable!("visible char past the end of leaf {leaf}")
    }

    /// Visible chars before item `loc` (the item itself excluded).
    pub(crate) fn position(&self, loc: Loc) -> u64 {
        let l = &self.leaves[loc.leaf as usize];
        let mut pos = self.leaf_start(loc.leaf);
        for s in &l.spans()[..loc.idx] {
            pos += s.visible_len() as u64;
        }
        let s = l.spans[loc.idx];
        if !s.deleted() {
            pos += loc.off as u64;
        }
        pos
    }

    /// The index segment holding `(replica, lamport)`, through the cache.
    #[inline]
    fn segment(&self, replica: u32, lamport: u64) -> Option<Seg> {
        if let Some(seg) = self.seg {
            if seg.replica == replica && lamport >= seg.lo && lamport < seg.hi {
                return Some(seg);
            }
        }
        let (lo, hi, leaf) = self.index.cover(replica, lamport)?;
        let seg = Seg {
            replica,
            lo,
            hi,
            leaf,
        };
        Some(seg)
    }

    /// Leaf the index maps `(replica, lamport)` to, bypassing the cache.
    fn cover_raw(&self, replica: u32, lamport: u64) -> Option<u32> {
        self.index.cover(replica, lamport).map(|c| c.2)
    }

    /// Leaf the index maps `(replica, lamport)` to, if any.
    #[inline]
    pub(crate) fn cover(&self, replica: u32, lamport: u64) -> Option<u32> {
        self.segment(replica, lamport).map(|s| s.leaf)
    }

    /// Location of a known item.
    #[inline]
    pub(crate) fn find(&self, replica: u32, lamport: u64) -> Option<Loc> {
        let leaf = self.cover(replica, lamport)?;
        self.find_in(leaf, replica, lamport)
    }

    /// Like `find`, and remembers the index segment for the next lookup.
    #[inline]
    pub(crate) fn find_mut(&mut self, replica: u32, lamport: u64) -> Option<Loc> {
        let (leaf, idx) = self.hints[replica as usize % N_HINTS];
        let l = &self.leaves[leaf as usize];
        let idx = idx as usize;
        if idx < l.n as usize && l.spans[idx].contains(replica, lamport) {
            let off = (lamport - l.spans[idx].lamport()) as u32;
            return Some(Loc { leaf, idx, off });
        }
        let seg = self.segment(replica, lamport)?;
        self.seg = Some(seg);
        let loc = self.find_in(seg.leaf, replica, lamport)?;
        self.hints[replica as usize % N_HINTS] = (loc.leaf, loc.idx as u32);
        Some(loc)
    }

    #[inline]
    fn find_in(&self, leaf: u32, replica: u32, lamport: u64) -> Option<Loc> {
        let l = &self.leaves[leaf as usize];
        let idx = l
            .spans()
            .iter()
            .position(|s| s.contains(replica, lamport))?;
        Some(Loc {
            leaf,
            idx,
            off: (lamport - l.spans[idx].lamport()) as u32,
        })
    }

    /// Whether any item of `replica` with lamport in `start .. end` is known.
    pub(crate) fn any_known(&self, replica: u32, start: u64, end: u64) -> bool {
        let overlaps = |leaf: u32| {
            self.leaves[leaf as usize]
                .spans()
                .iter()
                .any(|s| s.replica == replica && s.lamport() < end && start < s.end())
        };
        if self.cover(replica, start).is_some_and(overlaps) {
            return true;
        }
        self.index
            .range(replica, start + 1, end)
            .any(|(_, leaf)| overlaps(leaf))
    }

    /// Makes the index map ids `start .. end` of `replica` to `leaf`.
    #[inline]
    fn assign(&mut self, replica: u32, start: u64, end: u64, leaf: u32) {
        let lamport_end_before = self.lamport_end;
        self.lamport_end = self.lamport_end.max(end);
        // Fast path: already mapped and no key inside the range.
        let seg = self.segment(replica, start);
        if seg.is_some_and(|s| s.leaf == leaf && end <= s.hi) {
            self.seg = seg;
            return;
        }
        self.assign_slow(replica, start, end, leaf, seg, lamport_end_before);
    }

    /// `assign` when the cached or looked-up segment does not already map the range to `leaf`.
    #[inline(never)]
    fn assign_slow(
        &mut self,
        replica: u32,
        start: u64,
        end: u64,
        leaf: u32,
        seg: Option<Seg>,
        lamport_end_before: u64,
    ) {
        self.seg = None;
        if let Some(s) = seg.filter(|s| end <= s.hi) {
            // One segment holds the whole range, mapped to another leaf: re-point just the range.
            let merges_left = s.lo == start
                && self
                    .index
                    .before(replica, start)
                    .is_some_and(|(_, l)| l == leaf);
            if merges_left {
                self.index.remove(replica, start);
            } else {
                self.index.insert(replica, start, leaf);
            }
            if end < s.hi && end < lamport_end_before {
                self.index.insert(replica, end, s.leaf);
            }
            return;
        }
        // Ids from `end` on keep their leaf; none is known when `end` is past every assigned id.
        let end_cover = if end >= lamport_end_before {
            None
        } else {
            self.cover_raw(replica, end)
        };
        loop {
            let inside = self.index.range(replica, start, end).next();
            let Some((k, _)) = inside else { break };
            self.index.remove(replica, k);
        }
        let before = if start > 0 {
            self.cover_raw(replica, start - 1)
        } else {
            None
        };
        if before != Some(leaf) {
            self.index.insert(replica, start, leaf);
        }
        match self.index.get(replica, end) {
            Some(at_end) => {
                if at_end == leaf {
                    self.index.remove(replica, end);
                }
            }
            None => {
                if let Some(c) = end_cover {
                    if c != leaf {
                        self.index.insert(replica, end, c);
                    }
                }
            }
        }
        self.seg = None;
    }

    /// Re-points ids `start .. end` of `replica`, all known and all in leaf `from` until now, to leaf `to` (a split
    /// moved them): cheaper than `assign`, since every key inside the range maps to `from` and what covers `end` stays
    /// (`IdIndex::repoint`: one index search in the common case instead of about eight operations).
    /// Ids from `end` on get a key of their own only if `from` still holds one of them, and a run already covered by a
    /// key to `to` (set for an earlier run of this split) gets none.
    /// Called once per moved run, after the spans have moved (so `from` holds only what stays).
    fn repoint(&mut self, replica: u32, start: u64, end: u64, from: u32, to: u32) {
        self.seg = None;
        let from_leaf = &self.leaves[from as usize];
        self.index.repoint(
            replica,
            [start, end],
            [from, to],
            self.lamport_end,
            |lo, hi| leaf_holds(from_leaf, replica, lo, hi),
        );
    }

    /// Inserts `span` (new ids) right after item `after`, or at the document start; returns where its first item is.
    pub(crate) fn insert_after(&mut self, after: Option<Loc>, span: Span) -> Loc {
        self.version += 1;
        // Whether a span was split here, the only way the append path below can grow the leaf.
        let mut split = false;
        let (leaf, idx) = match after {
            None => (0u32, 0usize),
            Some(loc) => {
                let l = &mut self.leaves[loc.leaf as usize];
                let s = &mut l.spans[loc.idx];
                if loc.off + 1 < s.len() {
                    let right = s.split_off(loc.off + 1);
                    l.insert(loc.idx + 1, right);
                    split = true;
                }
                (loc.leaf, loc.idx + 1)
            }
        };
        let vis = span.visible_len() as i64;
        let l = &mut self.leaves[leaf as usize];
        if idx > 0 && l.spans[idx - 1].can_append(&span) {
            let prev = &mut l.spans[idx - 1];
            let off = prev.len();
            prev.set_len(off + span.len());
            self.add_count(leaf, vis);
            self.assign(span.replica, span.lamport(), span.end(), leaf);
            let loc = Loc {
                leaf,
                idx: idx - 1,
                off,
            };
            // Extending a span adds none to the leaf: it can be over capacity only if a split added one above.
            let loc = if split { self.fix_overflow(loc) } else { loc };
            self.hints[span.replica as usize % N_HINTS] = (loc.leaf, loc.idx as u32);
            return loc;
        }
        l.insert(idx, span);
        self.add_count(leaf, vis);
        self.lower_min(leaf, self.first_id(&span));
        self.assign(span.replica, span.lamport(), span.end(), leaf);
        let loc = self.fix_overflow(Loc { leaf, idx, off: 0 });
        self.hints[span.replica as usize % N_HINTS] = (loc.leaf, loc.idx as u32);
        loc
    }

    /// Deletes `len` items starting at `loc` (all within its span); returns how many were visible.
    pub(crate) fn delete_in_span(&mut self, loc: Loc, len: u32) -> u32 {
        self.version += 1;
        let l = &mut self.leaves[loc.leaf as usize];
        let s = l.spans[loc.idx];
        debug_assert!(loc.off + len <= s.len());
        if s.deleted() {
            return 0;
        }
        let mut idx = loc.idx;
        if loc.off > 0 {
            let right = l.spans[idx].split_off(loc.off);
            l.insert(idx + 1, right);
            idx += 1;
        }
        if len < l.spans[idx].len() {
            let right = l.spans[idx].split_off(len);
            l.insert(idx + 1, right);
        }
        l.spans[idx].set_deleted();
        // Merge with neighbouring tombstones of consecutive ids.
        if idx + 1 < l.n as usize && l.spans[idx].can_append(&l.spans[idx + 1]) {
            let nl = l.spans[idx].len() + l.spans[idx + 1].len();
            l.spans[idx].set_len(nl);
            l.remove(idx + 1);
        }
        if idx > 0 && l.spans[idx - 1].can_append(&l.spans[idx]) {
            let nl = l.spans[idx - 1].len() + l.spans[idx].len();
            l.spans[idx - 1].set_len(nl);
            l.remove(idx);
            idx -= 1;
        }
        self.add_count(loc.leaf, -(len as i64));
        self.fix_overflow(Loc {
            leaf: loc.leaf,
            idx,
            off: 0,
        });
        len
    }

    /// Splits `loc.leaf` if it is over `LEAF_CAP`; returns where `loc` is afterwards.
    /// Inlined: the check runs on every edit, the split (`split_at`) about once per `LEAF_CAP / 2` new spans.
    #[inline]
    fn fix_overflow(&mut self, loc: Loc) -> Loc {
        let n = self.leaves[loc.leaf as usize].n as usize;
        if n <= LEAF_CAP {
            return loc;
        }
        self.split_at(loc, n)
    }

    /// The split of `fix_overflow`, for a leaf of `n > LEAF_CAP` spans.
    #[inline(never)]
    fn split_at(&mut self, loc: Loc, n: usize) -> Loc {
        // Appending at the end of the document: keep the left leaf full.
        let at_end = self.leaves[loc.leaf as usize].next == NONE && loc.idx + 2 >= n;
        let mid = if at_end { LEAF_CAP - 1 } else { n / 2 };
        let new_leaf = self.split_leaf(loc.leaf, mid);
        if loc.idx >= mid {
            Loc {
                leaf: new_leaf,
                idx: loc.idx - mid,
                off: loc.off,
            }
        } else {
            loc
        }
    }

    /// Moves spans `mid..` of `leaf` into a new leaf after it; returns the new leaf.
    fn split_leaf(&mut self, leaf: u32, mid: usize) -> u32 {
        let new_idx = self.leaves.len() as u32;
        let mut right = Box::new(Leaf::empty());
        let l = &mut self.leaves[leaf as usize];
        let n = l.n as usize;
        right.spans[..n - mid].copy_from_slice(&l.spans[mid..n]);
        right.n = (n - mid) as u8;
        right.visible = right.spans().iter().map(|s| s.visible_len() as u64).sum();
        l.n = mid as u8;
        l.visible -= right.visible;
        right.prev = leaf;
        right.next = l.next;
        right.parent = l.parent;
        l.next = new_idx;
        if right.next != NONE {
            self.leaves[right.next as usize].prev = new_idx;
        }
        let moved: Vec<Span> = right.spans().to_vec();
        let right_visible = right.visible;
        self.leaves.push(right);
        // Re-point the index at the moved spans, merging runs of consecutive ids.
        let mut i = 0;
        while i < moved.len() {
            let (r, start) = (moved[i].replica, moved[i].lamport());
            let mut end = moved[i].end();
            let mut j = i + 1;
            while j < moved.len() && moved[j].replica == r && moved[j].lamport() == end {
                end = moved[j].end();
                j += 1;
            }
            self.repoint(r, start, end, leaf, new_idx);
            i = j;
        }
        let left_visible = self.leaves[leaf as usize].visible;
        let mins = [self.leaf_min(leaf), self.leaf_min(new_idx)];
        self.insert_child(leaf, new_idx, [left_visible, right_visible], mins, 0);
        new_idx
    }

    /// Puts `right` after `left` (both at `height`) in their parent with the given counts and smallest ids,
    /// splitting upward as needed.
    fn insert_child(
        &mut self,
        left: u32,
        right: u32,
        [left_count, right_count]: [u64; 2],
        [left_min, right_min]: [OpId; 2],
        height: u8,
    ) {
        let parent = self.parent_of(left, height);
        if parent == NONE {
            let root = self.nodes.len() as u32;
            let mut node = Node {
                children: [NONE; NODE_CAP + 1],
                counts: [0; NODE_CAP + 1],
                mins: [NO_MIN; NODE_CAP + 1],
                n: 2,
                height: height + 1,
                parent: NONE,
                slot: 0,
            };
            node.children[0] = left;
            node.children[1] = right;
            node.counts[0] = left_count;
            node.counts[1] = right_count;
            node.mins[0] = left_min;
            node.mins[1] = right_min;
            self.nodes.push(node);
            self.set_parent(left, height, root, 0);
            self.set_parent(right, height, root, 1);
            self.root = root;
            self.height = height + 1;
            return;
        }
        let node = &mut self.nodes[parent as usize];
        let slot = node.slot_of(left);
        node.counts[slot] = left_count;
        node.mins[slot] = left_min;
        node.insert(slot + 1, right, right_count, right_min);
        // Children from `right` on moved one slot up.
        let (children, n) = (node.children, node.n as usize);
        for (i, &c) in children.iter().enumerate().take(n).skip(slot + 1) {
            self.set_parent(c, height, parent, i as u8);
        }
        let node = &mut self.nodes[parent as usize];
        if node.n as usize > NODE_CAP {
            let new_node = self.nodes.len() as u32;
            let node = &mut self.nodes[parent as usize];
            let n = node.n as usize;
            let mid = n / 2;
            let mut right_node = Node {
                children: [NONE; NODE_CAP + 1],
                counts: [0; NODE_CAP + 1],
                mins: [NO_MIN; NODE_CAP + 1],
                n: (n - mid) as u8,
                height: height + 1,
                parent: NONE,
                slot: 0,
            };
            right_node.children[..n - mid].copy_from_slice(&node.children[mid..n]);
            right_node.counts[..n - mid].copy_from_slice(&node.counts[mid..n]);
            right_node.mins[..n - mid].copy_from_slice(&node.mins[mid..n]);
            node.mins[mid..n].fill(NO_MIN);
            node.n = mid as u8;
            let (left_min, right_min) = (node.min(), right_node.min());
            let left_total: u64 = node.counts[..mid].iter().sum();
            let right_total: u64 = right_node.counts[..n - mid].iter().sum();
            let moved: Vec<u32> = right_node.children[..n - mid].to_vec();
            self.nodes.push(right_node);
            for (i, c) in moved.into_iter().enumerate() {
                self.set_parent(c, height, new_node, i as u8);
            }
            self.insert_child(
                parent,
                new_node,
                [left_total, right_total],
                [left_min, right_min],
                height + 1,
            );
        }
    }

    fn parent_of(&self, id: u32, height: u8) -> u32 {
        if height == 0 {
            self.leaves[id as usize].parent
        } else {
            self.nodes[id as usize].parent
        }
    }

    fn set_parent(&mut self, id: u32, height: u8, parent: u32, slot: u8) {
        if height == 0 {
            let l = &mut self.leaves[id as usize];
            (l.parent, l.slot) = (parent, slot);
        } else {
            let n = &mut self.nodes[id as usize];
            (n.parent, n.slot) = (parent, slot);
        }
    }

    /// Appends a span at the end of the document (snapshot rebuild).
    pub(crate) fn push_back(&mut self, span: Span) {
        let last = self.last_leaf();
        let n = self.leaves[last as usize].n as usize;
        if n == 0 {
            self.insert_after(None, span);
        } else {
            let s = self.leaves[last as usize].spans[n - 1];
            self.insert_after(
                Some(Loc {
                    leaf: last,
                    idx: n - 1,
                    off: s.len() - 1,
                }),
                span,
            );
        }
    }

    pub(crate) fn last_leaf(&self) -> u32 {
        let mut cur = self.root;
        for _ in 0..self.height {
            let node = &self.nodes[cur as usize];
            cur = node.children[node.n as usize - 1];
        }
        cur
    }

    /// Heap bytes held by the tree and the index.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.leaves.capacity() * std::mem::size_of::<Box<Leaf>>()
            + self.leaves.len() * std::mem::size_of::<Leaf>()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.index.heap_bytes()
    }
}

/// Whether `leaf` holds an id of `replica` in `lo .. hi`.
fn leaf_holds(leaf: &Leaf, replica: u32, lo: u64, hi: u64) -> bool {
    leaf.spans()
        .iter()
        .any(|s| s.replica == replica && s.lamport() < hi && s.end() > lo)
}
