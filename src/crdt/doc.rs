//! `Doc`: the replicated document; validates op messages, integrates them with the RGA rule, and serves positions.
//! Validation runs over the whole message before anything is mutated, so a refused message leaves the doc untouched.
//! Never does I/O or touches a clock; ids come from the caller.

use std::collections::{BTreeMap, HashMap};

use super::buf::OpBuf;
use super::error::{CrdtError, InvalidOpReason};
use super::id::{Applied, Op, OpId, Run, RunContent, MAX_ID_COMPONENT};
use super::text::TextArena;
use super::tree::{Loc, Span, Tree, NONE, NO_TEXT, SPAN_MAX};

/// The replicated document: an RGA sequence of characters with tombstones.
#[derive(Clone, Default)]
pub struct Doc {
    pub(crate) tree: Tree,
    pub(crate) arena: TextArena,
    pub(crate) replica_idx: HashMap<u64, u32>,
    pub(crate) max_lamport: Option<u64>,
    pub(crate) max_replica: u64,
}

impl std::fmt::Debug for Doc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doc")
            .field("len", &self.len())
            .field("n_leaves", &self.tree.leaves.len())
            .field("n_replicas", &self.tree.replicas.len())
            .field("max_lamport", &self.max_lamport)
            .finish()
    }
}

/// Sizes of a document's internal structures (see `Doc::stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocStats {
    /// Spans (runs of consecutive ids) in the content tree.
    pub n_spans: usize,
    /// Leaves of the content tree.
    pub n_leaves: usize,
    /// Internal nodes of the content tree.
    pub n_nodes: usize,
    /// Keys of the id index.
    pub n_index_keys: usize,
    /// Chars in the text arena, deleted text included.
    pub n_arena_chars: usize,
}

/// An insert validated earlier in the same message, not yet applied.
struct Pending<'a> {
    id: OpId,
    n: u64,
    after: Option<OpId>,
    text: &'a str,
    /// `text` as chars, built on the first compare at an offset when `text` is not ASCII (so offsets cost O(1)).
    chars: Option<Vec<char>>,
}

impl Pending<'_> {
    fn contains(&self, id: OpId) -> bool {
        id.replica == self.id.replica
            && id.lamport >= self.id.lamport
            && id.lamport < self.id.lamport + self.n
    }

    /// Whether chars `off .. off+k` of the text equal the next `k` of `other`; O(k).
    fn text_eq(&mut self, off: usize, k: usize, other: &mut std::str::Chars<'_>) -> bool {
        if self.text.len() as u64 == self.n {
            // ASCII: a char offset is a byte offset.
            return self.text[off..off + k].chars().eq(other.take(k));
        }
        let text = self.text;
        let chars = self.chars.get_or_insert_with(|| text.chars().collect());
        chars[off..off + k].iter().copied().eq(other.take(k))
    }
}

/// The new inserts validated so far in a message, by `(replica, first lamport)`; their id ranges are disjoint
/// (an insert overlapping an earlier one is a resend or a conflict, never pending), so a lookup is O(log k).
/// `None` until the first one: a one-op message (the common case) then costs nothing, not even dropping a map.
#[derive(Default)]
struct PendingSet<'a> {
    by_start: Option<BTreeMap<(u64, u64), Pending<'a>>>,
}

impl<'a> PendingSet<'a> {
    fn is_empty(&self) -> bool {
        self.by_start.is_none()
    }

    fn add(&mut self, p: Pending<'a>) {
        self.by_start
            .get_or_insert_with(BTreeMap::new)
            .insert((p.id.replica, p.id.lamport), p);
    }

    /// The pending insert holding `id`.
    fn get_mut(&mut self, id: OpId) -> Option<&mut Pending<'a>> {
        self.by_start
            .as_mut()?
            .range_mut(..=(id.replica, id.lamport))
            .next_back()
            .map(|(_, p)| p)
            .filter(|p| p.contains(id))
    }

    fn contains(&self, id: OpId) -> bool {
        self.by_start.as_ref().is_some_and(|m| {
            m.range(..=(id.replica, id.lamport))
                .next_back()
                .is_some_and(|(_, p)| p.contains(id))
        })
    }

    /// Whether a pending insert holds any id of `replica` in `start .. end`.
    fn overlaps(&self, replica: u64, start: u64, end: u64) -> bool {
        self.contains(OpId::new(start, replica))
            || self
                .by_start
                .as_ref()
                .is_some_and(|m| m.range((replica, start)..(replica, end)).next().is_some())
    }
}

/// Id ranges a message's earlier deletes already covered (merged, by `(replica, start)` to end), so that a later
/// delete skips them: each span is walked at most once per message however many deletes repeat it.
/// `None` until the first range, so a one-op message does not even drop a map.
#[derive(Default)]
struct Covered {
    ranges: Option<BTreeMap<(u64, u64), u64>>,
}

impl Covered {
    /// End of the covered range holding `lamport` of `replica`.
    fn until(&self, replica: u64, lamport: u64) -> Option<u64> {
        self.ranges
            .as_ref()?
            .range(..=(replica, lamport))
            .next_back()
            .filter(|(&(r, _), &end)| r == replica && lamport < end)
            .map(|(_, &end)| end)
    }

    /// Covers `start .. end` of `replica`, merging with the ranges it overlaps or touches.
    fn add(&mut self, replica: u64, mut start: u64, mut end: u64) {
        let ranges = self.ranges.get_or_insert_with(BTreeMap::new);
        if let Some((&(r, s), &e)) = ranges.range(..=(replica, start)).next_back() {
            if r == replica && e >= start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&(r, s), &e)) = ranges.range((replica, start)..).next() {
            if r != replica || s > end {
                break;
            }
            end = end.max(e);
            ranges.remove(&(r, s));
        }
        ranges.insert((replica, start), end);
    }
}

/// How an insert's ids relate to the known ones.
enum Usage {
    New,
    Same,
    Conflict,
}

fn invalid(op_index: usize, reason: InvalidOpReason) -> CrdtError {
    CrdtError::InvalidOp { op_index, reason }
}

impl Doc {
    /// An empty document.
    pub fn new() -> Doc {
        Doc::default()
    }

    /// Integrates one op message atomically, ops in order; later ops may reference ids inserted by earlier ones.
    /// `sender`: `Some(replica)` requires every insert id to have that replica; `None` skips the check (log or snapshot replay).
    /// `Ok(Unchanged)`: every insert was already integrated with identical text and `after`, every delete target already a tombstone.
    ///
    /// # Errors
    /// `UnknownId`, `IdConflict` or `InvalidOp` for the first bad op; the doc is then exactly as before.
    pub fn apply_remote(&mut self, sender: Option<u64>, ops: &[Op]) -> Result<Applied, CrdtError> {
        let mut pending = PendingSet::default();
        let mut covered = Covered::default();
        let mut changed = false;
        // Where the `after` of a one-op message's insert was found: nothing changes the tree before it is applied.
        let mut found_after: Option<Loc> = None;
        for (op_index, op) in ops.iter().enumerate() {
            match op {
                Op::Insert { id, after, text } => {
                    let id = *id;
                    if id.lamport > MAX_ID_COMPONENT || id.replica > MAX_ID_COMPONENT {
                        return Err(invalid(op_index, InvalidOpReason::IdOverflow));
                    }
                    if sender.is_some_and(|s| s != id.replica) {
                        return Err(invalid(op_index, InvalidOpReason::ForeignReplica));
                    }
                    if text.is_empty() {
                        return Err(invalid(op_index, InvalidOpReason::EmptyText));
                    }
                    let n = text.chars().count() as u64;
                    if n - 1 > MAX_ID_COMPONENT - id.lamport {
                        return Err(invalid(op_index, InvalidOpReason::IdOverflow));
                    }
                    if let Some(p) = *after {
                        if p.lamport >= id.lamport {
                            return Err(invalid(op_index, InvalidOpReason::LamportNotAboveParent));
                        }
                        match self.find_mut(p) {
                            Some(loc) => found_after = Some(loc),
                            None if pending.contains(p) => {}
                            None => return Err(CrdtError::UnknownId { op_index, id: p }),
                        }
                    }
                    match self.usage(id, n, text, *after, &mut pending) {
                        Usage::New => {
                            // Only later ops of this message can see it; a one-op message needs no list.
                            if op_index + 1 < ops.len() {
                                pending.add(Pending {
                                    id,
                                    n,
                                    after: *after,
                                    text,
                                    chars: None,
                                });
                            }
                            changed = true;
                        }
                        Usage::Same => {}
                        Usage::Conflict => return Err(CrdtError::IdConflict { op_index }),
                    }
                }
                Op::Delete { id, len } => {
                    let (id, len) = (*id, *len);
                    if len == 0 {
                        return Err(invalid(op_index, InvalidOpReason::ZeroLength));
                    }
                    if id.lamport > MAX_ID_COMPONENT
                        || id.replica > MAX_ID_COMPONENT
                        || len - 1 > MAX_ID_COMPONENT - id.lamport
                    {
                        return Err(invalid(op_index, InvalidOpReason::IdOverflow));
                    }
                    let end = id.lamport + len;
                    let mut lamport = id.lamport;
                    while lamport < end {
                        if let Some(e) = covered.until(id.replica, lamport) {
                            // Checked by an earlier delete of this message.
                            lamport = e.min(end);
                            continue;
                        }
                        let at = OpId::new(lamport, id.replica);
                        if let Some(loc) = self.find_mut(at) {
                            let s = self.tree.span(loc.leaf, loc.idx);
                            changed |= !s.deleted();
                            lamport = s.end().min(end);
                        } else if let Some(p) = pending.get_mut(at) {
                            lamport = (p.id.lamport + p.n).min(end);
                        } else {
                            return Err(CrdtError::UnknownId { op_index, id: at });
                        }
                    }
                    if op_index + 1 < ops.len() {
                        covered.add(id.replica, id.lamport, end);
                    }
                }
            }
        }
        if !changed {
            return Ok(Applied::Unchanged);
        }
        let mut deleted = Covered::default();
        for (op_index, op) in ops.iter().enumerate() {
            match op {
                Op::Insert { id, after, text } => {
                    if self.max_lamport.is_some_and(|m| id.lamport <= m) && self.find(*id).is_some()
                    {
                        continue;
                    }
                    let at = match (ops.len(), found_after) {
                        (1, Some(loc)) => Some(loc),
                        _ => after.map(|p| self.find_mut(p).expect("validated: after is known")),
                    };
                    let at = self.skip_greater(at, *id);
                    self.insert_run(at, *id, text);
                }
                Op::Delete { id, len } => {
                    self.delete_ids(*id, *len, &deleted);
                    if op_index + 1 < ops.len() {
                        deleted.add(id.replica, id.lamport, id.lamport + len);
                    }
                }
            }
        }
        Ok(Applied::Changed)
    }

    /// Whether `id` is known to the doc or inserted earlier in the message.
    fn known(&self, id: OpId, pending: &PendingSet<'_>) -> bool {
        self.find(id).is_some() || pending.contains(id)
    }

    /// Compares an insert's ids with the known ones: all new, all the same (text and `after`), or a conflict.
    fn usage(
        &self,
        id: OpId,
        n: u64,
        text: &str,
        after: Option<OpId>,
        pending: &mut PendingSet<'_>,
    ) -> Usage {
        let end = id.lamport + n;
        let above_all = self.max_lamport.map_or(true, |m| id.lamport > m);
        if above_all && pending.is_empty() {
            return Usage::New;
        }
        if !self.known(id, pending) {
            let in_doc = self
                .replica_index_of(id.replica)
                .is_some_and(|r| self.tree.any_known(r, id.lamport, end));
            let in_pending = pending.overlaps(id.replica, id.lamport, end);
            return if in_doc || in_pending {
                Usage::Conflict
            } else {
                Usage::New
            };
        }
        let mut chars = text.chars();
        let mut lamport = id.lamport;
        while lamport < end {
            let at = OpId::new(lamport, id.replica);
            let expected_origin = if lamport == id.lamport {
                after
            } else {
                Some(OpId::new(lamport - 1, id.replica))
            };
            if let Some(loc) = self.find(at) {
                let s = self.tree.span(loc.leaf, loc.idx);
                let k = s.end().min(end) - lamport;
                if self.origin_of(loc) != expected_origin {
                    return Usage::Conflict;
                }
                if s.deleted() {
                    // Tombstone text is not kept (a snapshot does not carry it), so only ids and `after` are compared.
                    chars.by_ref().take(k as usize).for_each(drop);
                } else {
                    let base = s.arena() as usize + loc.off as usize;
                    for j in 0..k as usize {
                        if chars.next() != Some(self.arena.get(base + j)) {
                            return Usage::Conflict;
                        }
                    }
                }
                lamport += k;
            } else if let Some(p) = pending.get_mut(at) {
                let off = lamport - p.id.lamport;
                let k = (p.id.lamport + p.n).min(end) - lamport;
                let origin = if off == 0 {
                    p.after
                } else {
                    Some(OpId::new(lamport - 1, id.replica))
                };
                if origin != expected_origin {
                    return Usage::Conflict;
                }
                if !p.text_eq(off as usize, k as usize, &mut chars) {
                    return Usage::Conflict;
                }
                lamport += k;
            } else {
                return Usage::Conflict;
            }
        }
        Usage::Same
    }

    /// The item `loc` was inserted after: the nearest earlier item with a smaller id (the RGA invariant), `None` for the start.
    /// O(log n): the tree's smallest-id counts lead straight to the nearest earlier span holding a smaller id.
    fn origin_of(&self, loc: Loc) -> Option<OpId> {
        let me = self.id_of(loc);
        if loc.off > 0 {
            return Some(OpId::new(me.lamport - 1, me.replica));
        }
        let (leaf, idx) = self.tree.last_below(loc.leaf, loc.idx, me)?;
        let s = self.tree.span(leaf, idx);
        let r = self.tree.replicas[s.replica as usize];
        // The span's first item is smaller than `me`; its last item below `me` is the nearest one.
        let last = s.end() - 1;
        let lamport = if r < me.replica {
            last.min(me.lamport)
        } else {
            last.min(me.lamport - 1)
        };
        Some(OpId::new(lamport, r))
    }

    /// From "right after `at`", skips every following item whose id is greater than `id`; returns the item to insert after.
    /// O(log n) however many items it skips: the tree's smallest-id counts find the first smaller item directly.
    fn skip_greater(&self, at: Option<Loc>, id: OpId) -> Option<Loc> {
        let (leaf, idx) = match at {
            None => (0u32, 0usize),
            Some(l) => {
                let s = self.tree.span(l.leaf, l.idx);
                if l.off + 1 < s.len() {
                    // Lamports rise along a span: if the next item is greater, the rest of the span is too.
                    let next = OpId::new(
                        s.lamport() + l.off as u64 + 1,
                        self.tree.replicas[s.replica as usize],
                    );
                    if next < id {
                        return at;
                    }
                }
                // Usually the next span is already smaller (no concurrent insert here): answer without searching.
                let lf = &self.tree.leaves[l.leaf as usize];
                if l.idx + 1 < lf.n as usize && self.tree.first_id(&lf.spans[l.idx + 1]) < id {
                    return Some(Loc {
                        off: s.len() - 1,
                        ..l
                    });
                }
                (l.leaf, l.idx + 1)
            }
        };
        // Every item before the first smaller span is skipped; the new items go right after the last of them.
        match self.tree.first_below(leaf, idx, id) {
            Some((leaf, idx)) => self.item_before(leaf, idx),
            None => self.last_item(),
        }
    }

    /// The last item before span `idx` of `leaf`, `None` at the document start.
    fn item_before(&self, mut leaf: u32, idx: usize) -> Option<Loc> {
        let mut idx = idx;
        while idx == 0 {
            leaf = self.tree.leaves[leaf as usize].prev;
            if leaf == NONE {
                return None;
            }
            idx = self.tree.leaves[leaf as usize].n as usize;
        }
        let s = self.tree.span(leaf, idx - 1);
        Some(Loc {
            leaf,
            idx: idx - 1,
            off: s.len() - 1,
        })
    }

    /// The last item of the document, `None` if it has none.
    fn last_item(&self) -> Option<Loc> {
        let leaf = self.tree.last_leaf();
        self.item_before(leaf, self.tree.leaves[leaf as usize].n as usize)
    }

    /// Inserts new items `id..` with `text` right after `at` (no skipping).
    /// Returns where the last new item is and the number of new items.
    fn insert_run(&mut self, at: Option<Loc>, id: OpId, text: &str) -> (Loc, usize) {
        let r = self.intern_replica(id.replica);
        let arena = self.arena.push_str(text);
        let n = self.arena.len() - arena;
        assert!(
            self.arena.len() <= u32::MAX as usize,
            "text arena over 4 GiB chars"
        );
        let last = id.lamport + n as u64 - 1;
        self.max_lamport = Some(self.max_lamport.map_or(last, |m| m.max(last)));
        self.max_replica = self.max_replica.max(id.replica);
        // One span, the common case, with the location kept in registers (no `Option<Loc>` through memory).
        let k = n.min(SPAN_MAX as usize) as u32;
        let loc = self
            .tree
            .insert_after(at, Span::new(id.lamport, r, k, arena as u32, false));
        let mut last = Loc {
            off: loc.off + k - 1,
            ..loc
        };
        let mut done = k as usize;
        while done < n {
            let k = (n - done).min(SPAN_MAX as usize) as u32;
            let span = Span::new(id.lamport + done as u64, r, k, (arena + done) as u32, false);
            let loc = self.tree.insert_after(Some(last), span);
            last = Loc {
                off: loc.off + k - 1,
                ..loc
            };
            done += k as usize;
        }
        (last, n)
    }

    /// Marks the known items `id .. id+len` deleted, skipping the ranges earlier deletes of the message covered.
    fn delete_ids(&mut self, id: OpId, len: u64, done: &Covered) {
        let end = id.lamport + len;
        let mut lamport = id.lamport;
        while lamport < end {
            if let Some(e) = done.until(id.replica, lamport) {
                lamport = e.min(end);
                continue;
            }
            let loc = self
                .find_mut(OpId::new(lamport, id.replica))
                .expect("validated: delete target is known");
            let s = self.tree.span(loc.leaf, loc.idx);
            let k = s.end().min(end) - lamport;
            self.tree.delete_in_span(loc, k as u32);
            lamport += k;
        }
    }

    fn replica_index_of(&self, replica: u64) -> Option<u32> {
        self.replica_idx.get(&replica).copied()
    }

    fn intern_replica(&mut self, replica: u64) -> u32 {
        if let Some(&r) = self.tree.replicas.last() {
            if r == replica {
                return self.tree.replicas.len() as u32 - 1;
            }
        }
        if let Some(&i) = self.replica_idx.get(&replica) {
            return i;
        }
        let i = self.tree.replicas.len() as u32;
        self.tree.replicas.push(replica);
        self.replica_idx.insert(replica, i);
        i
    }

    #[inline]
    fn replica_index_fast(&self, replica: u64) -> Option<u32> {
        if self.tree.replicas.len() == 1 && self.tree.replicas[0] == replica {
            Some(0)
        } else {
            self.replica_index_of(replica)
        }
    }

    /// Location of a known item.
    #[inline]
    pub(crate) fn find(&self, id: OpId) -> Option<Loc> {
        let r = self.replica_index_fast(id.replica)?;
        self.tree.find(r, id.lamport)
    }

    /// Like `find`, and remembers the index segment, which the next lookup or insert nearby reuses.
    #[inline]
    fn find_mut(&mut self, id: OpId) -> Option<Loc> {
        let r = self.replica_index_fast(id.replica)?;
        self.tree.find_mut(r, id.lamport)
    }

    #[inline]
    pub(crate) fn id_of(&self, loc: Loc) -> OpId {
        let s = self.tree.span(loc.leaf, loc.idx);
        OpId::new(
            s.lamport() + loc.off as u64,
            self.tree.replicas[s.replica as usize],
        )
    }

    /// Local edit: inserts `text` at code-point position `pos` and returns the op to send.
    /// Its lamport is one above the highest lamport seen (0 for an empty history).
    /// `insert_local_into` does the same without allocating the op.
    ///
    /// # Panics
    /// If `pos > len()`, `text` is empty, or `replica` or the new ids are past 2^53 - 1 (caller bugs).
    pub fn insert_local(&mut self, replica: u64, pos: usize, text: &str) -> Op {
        let (id, after) = self.insert_local_ids(replica, pos, text);
        Op::Insert {
            id,
            after,
            text: text.to_owned(),
        }
    }

    /// Local edit like `insert_local`, writing the op into `out` instead of returning it: with a buffer that is
    /// cleared and reused, typing allocates nothing per edit.
    ///
    /// # Panics
    /// As `insert_local`; nothing is written then.
    pub fn insert_local_into(&mut self, replica: u64, pos: usize, text: &str, out: &mut OpBuf) {
        let (id, after) = self.insert_local_ids(replica, pos, text);
        out.push_insert(id, after, text);
    }

    /// The work of `insert_local`: returns the new first id and the item it went after.
    fn insert_local_ids(&mut self, replica: u64, pos: usize, text: &str) -> (OpId, Option<OpId>) {
        assert!(
            pos <= self.len(),
            "insert position {pos} past the end ({})",
            self.len()
        );
        assert!(!text.is_empty(), "empty insert");
        assert!(replica <= MAX_ID_COMPONENT, "replica past 2^53-1");
        let lamport = self.max_lamport.map_or(0, |m| m + 1);
        // Checked before anything changes; the byte length bounds the char count, so this is cheap and safe.
        assert!(
            text.len() as u64 <= MAX_ID_COMPONENT + 1 - lamport
                || lamport + text.chars().count() as u64 - 1 <= MAX_ID_COMPONENT,
            "lamport past 2^53-1"
        );
        let at = if pos == 0 {
            None
        } else {
            Some(self.tree.locate_visible(pos as u64 - 1))
        };
        let after = at.map(|loc| self.id_of(loc));
        let id = OpId::new(lamport, replica);
        let (last, n) = self.insert_run(at, id, text);
        // The last new char is at `pos + n - 1`, `last.off` chars into its (visible) span.
        let span_start = (pos + n - 1) as u64 - last.off as u64;
        self.tree.set_span_cursor(last.leaf, last.idx, span_start);
        (id, after)
    }

    /// Local edit: deletes visible code points `pos .. pos+len`; returns one `Delete` per run of consecutive ids.
    /// `delete_local_into` does the same without allocating.
    ///
    /// # Panics
    /// If `pos + len > len()`.
    pub fn delete_local(&mut self, pos: usize, len: usize) -> Vec<Op> {
        if len == 0 {
            self.check_delete_range(pos, len);
            return Vec::new();
        }
        // Usually one op: no room for more until needed.
        let mut ops: Vec<Op> = Vec::with_capacity(1);
        self.delete_local_ids(pos, len, |id, k| {
            if let Some(Op::Delete {
                id: last,
                len: last_len,
            }) = ops.last_mut()
            {
                if last.replica == id.replica && last.lamport + *last_len == id.lamport {
                    *last_len += k;
                    return;
                }
            }
            ops.push(Op::Delete { id, len: k });
        });
        ops
    }

    /// Local edit like `delete_local`, appending its ops to `out` (the same ops, in the same order).
    ///
    /// # Panics
    /// As `delete_local`; nothing is written then.
    pub fn delete_local_into(&mut self, pos: usize, len: usize, out: &mut OpBuf) {
        let mark = out.len();
        self.delete_local_ids(pos, len, |id, k| out.push_delete(id, k, mark));
    }

    fn check_delete_range(&self, pos: usize, len: usize) {
        assert!(
            pos.checked_add(len).is_some_and(|end| end <= self.len()),
            "delete range past the end"
        );
    }

    /// The work of `delete_local`: calls `emit(first id, count)` for each run of consecutive ids deleted, in order.
    fn delete_local_ids(&mut self, pos: usize, len: usize, mut emit: impl FnMut(OpId, u64)) {
        self.check_delete_range(pos, len);
        let mut rest = len as u64;
        while rest > 0 {
            let loc = self.tree.locate_visible(pos as u64);
            let s = self.tree.span(loc.leaf, loc.idx);
            let k = rest.min((s.len() - loc.off) as u64);
            let id = self.id_of(loc);
            self.tree.delete_in_span(loc, k as u32);
            rest -= k;
            emit(id, k);
        }
    }

    /// Spans in document order, leaf by leaf.
    pub(crate) fn spans(&self) -> impl Iterator<Item = (u32, usize, Span)> + '_ {
        let mut leaf = 0u32;
        let mut idx = 0usize;
        std::iter::from_fn(move || loop {
            if leaf == NONE {
                return None;
            }
            let l = &self.tree.leaves[leaf as usize];
            if idx < l.n as usize {
                idx += 1;
                return Some((leaf, idx - 1, l.spans[idx - 1]));
            }
            leaf = l.next;
            idx = 0;
        })
    }

    /// The whole document as runs in order, tombstones included; adjacent runs of consecutive ids are merged.
    pub fn snapshot(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        // (replica, lamport one past the last run's end) for merging.
        let mut last_end: Option<(u64, u64)> = None;
        for (_, _, s) in self.spans() {
            let replica = self.tree.replicas[s.replica as usize];
            let mergeable = last_end == Some((replica, s.lamport()));
            match runs.last_mut() {
                Some(Run {
                    content: RunContent::Deleted(n),
                    ..
                }) if mergeable && s.deleted() => *n += s.len() as u64,
                Some(Run {
                    content: RunContent::Text(t),
                    ..
                }) if mergeable && !s.deleted() => {
                    self.arena.write_to(t, s.arena() as usize, s.len() as usize)
                }
                _ => {
                    let content = if s.deleted() {
                        RunContent::Deleted(s.len() as u64)
                    } else {
                        let mut t = String::new();
                        self.arena
                            .write_to(&mut t, s.arena() as usize, s.len() as usize);
                        RunContent::Text(t)
                    };
                    runs.push(Run {
                        id: OpId::new(s.lamport(), replica),
                        content,
                    });
                }
            }
            last_end = Some((replica, s.end()));
        }
        runs
    }

    /// Rebuilds a replica from a snapshot; it integrates later ops exactly like the original.
    ///
    /// # Errors
    /// `InvalidOp` for an empty run or ids past 2^53 - 1, or when the order breaks the RGA rule (an item whose nearest
    /// earlier smaller id does not have a smaller lamport); `IdConflict` for ids used twice. `op_index` is the run's index.
    pub fn from_snapshot(runs: &[Run]) -> Result<Doc, CrdtError> {
        let mut doc = Doc::new();
        let mut stack: Vec<(OpId, u64)> = Vec::new();
        for (op_index, run) in runs.iter().enumerate() {
            let id = run.id;
            if id.lamport > MAX_ID_COMPONENT || id.replica > MAX_ID_COMPONENT {
                return Err(invalid(op_index, InvalidOpReason::IdOverflow));
            }
            let n = match &run.content {
                RunContent::Text(t) if t.is_empty() => {
                    return Err(invalid(op_index, InvalidOpReason::EmptyText))
                }
                RunContent::Text(t) => t.chars().count() as u64,
                RunContent::Deleted(0) => {
                    return Err(invalid(op_index, InvalidOpReason::ZeroLength))
                }
                RunContent::Deleted(n) => *n,
            };
            if n - 1 > MAX_ID_COMPONENT - id.lamport {
                return Err(invalid(op_index, InvalidOpReason::IdOverflow));
            }
            if doc
                .replica_index_of(id.replica)
                .is_some_and(|r| doc.tree.any_known(r, id.lamport, id.lamport + n))
            {
                return Err(CrdtError::IdConflict { op_index });
            }
            if !origin_rule_holds(&mut stack, id, n) {
                return Err(invalid(op_index, InvalidOpReason::LamportNotAboveParent));
            }
            let r = doc.intern_replica(id.replica);
            match &run.content {
                RunContent::Text(t) => {
                    let arena = doc.arena.push_str(t);
                    assert!(
                        doc.arena.len() <= u32::MAX as usize,
                        "text arena over 4 GiB chars"
                    );
                    push_spans(&mut doc.tree, id.lamport, r, n, Some(arena as u32));
                }
                RunContent::Deleted(_) => push_spans(&mut doc.tree, id.lamport, r, n, None),
            }
            let last = id.lamport + n - 1;
            doc.max_lamport = Some(doc.max_lamport.map_or(last, |m| m.max(last)));
            doc.max_replica = doc.max_replica.max(id.replica);
        }
        Ok(doc)
    }

    /// The visible text.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.len());
        for (_, _, s) in self.spans() {
            if !s.deleted() {
                self.arena
                    .write_to(&mut out, s.arena() as usize, s.len() as usize);
            }
        }
        out
    }

    /// Number of visible code points.
    pub fn len(&self) -> usize {
        self.tree.total as usize
    }

    /// Whether no character is visible.
    pub fn is_empty(&self) -> bool {
        self.tree.total == 0
    }

    /// Id of the visible char at `pos`, `None` past the end.
    pub fn id_at(&self, pos: usize) -> Option<OpId> {
        if pos >= self.len() {
            return None;
        }
        let (leaf, start) = self.tree.leaf_at(pos as u64);
        Some(self.id_of(self.tree.loc_in_leaf(leaf, pos as u64 - start)))
    }

    /// Number of visible chars before the item `id` (a tombstone too: a cursor anchor); `None` if unknown.
    pub fn position_of(&self, id: OpId) -> Option<usize> {
        self.find(id).map(|loc| self.tree.position(loc) as usize)
    }

    /// Whether the item `id` is visible (`Some(false)`: a tombstone, `None`: unknown).
    pub fn is_visible(&self, id: OpId) -> Option<bool> {
        self.find(id)
            .map(|loc| !self.tree.span(loc.leaf, loc.idx).deleted())
    }

    /// Appends to `out` the visible items among `id .. id+len` (one replica, consecutive
    /// lamports) as `(first, count)` ranges, one lookup per span; stops at the first unknown
    /// id (such a delete is refused anyway).
    pub fn visible_ranges(&self, id: OpId, len: u64, out: &mut Vec<(OpId, u64)>) {
        let mut done = 0u64;
        while done < len {
            let first = OpId::new(id.lamport + done, id.replica);
            let Some(loc) = self.find(first) else {
                return;
            };
            let s = self.tree.span(loc.leaf, loc.idx);
            let k = u64::from(s.len() - loc.off).min(len - done);
            if !s.deleted() {
                out.push((first, k));
            }
            done += k;
        }
    }

    /// The document as it was at an earlier point, as snapshot runs in document order:
    /// `state(id, visible_now)` says whether the item was there then (`None`: not yet
    /// inserted) and visible (`Some(true)`) or a tombstone (`Some(false)`). Items visible then
    /// must have their text in the arena (visible now, or deleted in this `Doc`'s life).
    pub fn snapshot_where(&self, mut state: impl FnMut(OpId, bool) -> Option<bool>) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        // Items in the last run, and whether it is visible text.
        let mut last: Option<(u64, bool)> = None;
        for (_, _, s) in self.spans() {
            let replica = self.tree.replicas[s.replica as usize];
            let visible_now = !s.deleted();
            for k in 0..s.len() {
                let id = OpId::new(s.lamport() + k as u64, replica);
                let Some(visible) = state(id, visible_now) else {
                    continue;
                };
                let extends = match (runs.last(), last) {
                    (Some(run), Some((n, text))) => {
                        text == visible
                            && run.id.replica == id.replica
                            && run.id.lamport + n == id.lamport
                    }
                    _ => false,
                };
                let ch = || self.char_of(&s, k);
                match (extends, runs.last_mut(), last.as_mut()) {
                    (true, Some(run), Some((n, _))) => {
                        *n += 1;
                        match &mut run.content {
                            RunContent::Text(t) => t.push(ch()),
                            RunContent::Deleted(d) => *d += 1,
                        }
                    }
                    _ => {
                        let content = if visible {
                            RunContent::Text(ch().to_string())
                        } else {
                            RunContent::Deleted(1)
                        };
                        runs.push(Run { id, content });
                        last = Some((1, visible));
                    }
                }
            }
        }
        runs
    }

    /// The text of the items, visible or not, for which `keep(id, visible)` holds, in
    /// document order: a past version of the document (the HTTP API's `?at=`). The caller
    /// keeps only tombstones deleted in this `Doc`'s life (their text is still in the
    /// arena); a tombstone read as one from a snapshot has no text, and what this returns
    /// for it is meaningless.
    pub fn text_where(&self, mut keep: impl FnMut(OpId, bool) -> bool) -> String {
        let mut out = String::new();
        for (_, _, s) in self.spans() {
            let replica = self.tree.replicas[s.replica as usize];
            let visible = !s.deleted();
            for k in 0..s.len() {
                let id = OpId::new(s.lamport() + k as u64, replica);
                if keep(id, visible) {
                    out.push(self.char_of(&s, k));
                }
            }
        }
        out
    }

    /// Char `k` of span `s`: from the arena, or U+FFFD for a tombstone that came without text.
    fn char_of(&self, s: &Span, k: u32) -> char {
        match s.arena() {
            NO_TEXT => char::REPLACEMENT_CHARACTER,
            a => self.arena.get(a as usize + k as usize),
        }
    }

    /// Highest lamport of any known item, `None` for an empty history.
    pub fn max_lamport(&self) -> Option<u64> {
        self.max_lamport
    }

    /// Largest replica in any known id (0 if none).
    pub fn max_replica(&self) -> u64 {
        self.max_replica
    }

    /// Sizes of the internal structures, for benchmarks and tuning.
    pub fn stats(&self) -> DocStats {
        DocStats {
            n_spans: self.spans().count(),
            n_leaves: self.tree.leaves.len(),
            n_nodes: self.tree.nodes.len(),
            n_index_keys: self.tree.index.len(),
            n_arena_chars: self.arena.len(),
        }
    }

    /// Approximate heap bytes held (tree, index, text arena, replica table).
    pub fn heap_bytes(&self) -> usize {
        self.tree.heap_bytes()
            + self.arena.heap_bytes()
            + self.tree.replicas.capacity() * 8
            + self.replica_idx.capacity() * 16
    }
}

/// Appends items `lamport .. lamport+n` at the end of the document, as spans of at most `SPAN_MAX` (tombstones
/// without text: `arena` = `None`).
fn push_spans(tree: &mut Tree, lamport: u64, r: u32, n: u64, arena: Option<u32>) {
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(SPAN_MAX as u64) as u32;
        let a = arena.map_or(NO_TEXT, |a| a + done as u32);
        tree.push_back(Span::new(lamport + done, r, k, a, arena.is_none()));
        done += k as u64;
    }
}

/// Feeds the next run (in document order) to a monotonic stack of runs; returns whether the nearest earlier item with a
/// smaller id (the item it must have been inserted after) has a smaller lamport, as the RGA rule requires.
/// Within a run each item follows the previous one, so only the first item needs the check; O(1) amortized.
pub(crate) fn origin_rule_holds(stack: &mut Vec<(OpId, u64)>, id: OpId, n: u64) -> bool {
    while stack.last().is_some_and(|&(first, _)| first > id) {
        stack.pop();
    }
    let ok = match stack.last() {
        None => true,
        // The top run's first item is smaller than `id`; its largest item below `id` is the origin.
        Some(&(first, last)) => {
            let origin = if first.replica < id.replica {
                last.min(id.lamport)
            } else {
                last.min(id.lamport - 1)
            };
            origin < id.lamport
        }
    };
    stack.push((id, id.lamport + n - 1));
    ok
}
