//! `Doc`: the replicated document; validates op messages, integrates them with the RGA rule, and serves positions.
//! Validation runs over the whole message before anything is mutated, so a refused message leaves the doc untouched.
//! Never does I/O or touches a clock; ids come from the caller.

use std::collections::HashMap;

use super::error::{CrdtError, InvalidOpReason};
use super::id::{Applied, Op, OpId, Run, RunContent, MAX_ID_COMPONENT};
use super::text::TextArena;
use super::tree::{Loc, Span, Tree, NONE, SPAN_MAX};

/// The replicated document: an RGA sequence of characters with tombstones.
#[derive(Clone, Default)]
pub struct Doc {
    pub(crate) tree: Tree,
    pub(crate) arena: TextArena,
    /// Replica ids by dense index; spans store the index.
    pub(crate) replicas: Vec<u64>,
    pub(crate) replica_idx: HashMap<u64, u32>,
    pub(crate) max_lamport: Option<u64>,
    pub(crate) max_replica: u64,
}

impl std::fmt::Debug for Doc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doc")
            .field("len", &self.len())
            .field("n_leaves", &self.tree.leaves.len())
            .field("n_replicas", &self.replicas.len())
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
}

impl Pending<'_> {
    fn contains(&self, id: OpId) -> bool {
        id.replica == self.id.replica
            && id.lamport >= self.id.lamport
            && id.lamport < self.id.lamport + self.n
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
        let mut pending: Vec<Pending<'_>> = Vec::new();
        let mut changed = false;
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
                        if self.find_mut(p).is_none()
                            && !pending.iter().rev().any(|q| q.contains(p))
                        {
                            return Err(CrdtError::UnknownId { op_index, id: p });
                        }
                    }
                    match self.usage(id, n, text, *after, &pending) {
                        Usage::New => {
                            // Only later ops of this message can see it; a one-op message needs no list.
                            if op_index + 1 < ops.len() {
                                pending.push(Pending {
                                    id,
                                    n,
                                    after: *after,
                                    text,
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
                        let at = OpId::new(lamport, id.replica);
                        if let Some(loc) = self.find_mut(at) {
                            let s = self.tree.span(loc.leaf, loc.idx);
                            changed |= !s.deleted();
                            lamport = s.end().min(end);
                        } else if let Some(p) = pending.iter().rev().find(|p| p.contains(at)) {
                            lamport = (p.id.lamport + p.n).min(end);
                        } else {
                            return Err(CrdtError::UnknownId { op_index, id: at });
                        }
                    }
                }
            }
        }
        if !changed {
            return Ok(Applied::Unchanged);
        }
        for op in ops {
            match op {
                Op::Insert { id, after, text } => {
                    if self.max_lamport.is_some_and(|m| id.lamport <= m) && self.find(*id).is_some()
                    {
                        continue;
                    }
                    let at = after.map(|p| self.find_mut(p).expect("validated: after is known"));
                    let at = self.skip_greater(at, *id);
                    self.insert_run(at, *id, text);
                }
                Op::Delete { id, len } => self.delete_ids(*id, *len),
            }
        }
        Ok(Applied::Changed)
    }

    /// Whether `id` is known to the doc or inserted earlier in the message.
    fn known(&self, id: OpId, pending: &[Pending<'_>]) -> bool {
        self.find(id).is_some() || pending.iter().rev().any(|p| p.contains(id))
    }

    /// Compares an insert's ids with the known ones: all new, all the same (text and `after`), or a conflict.
    fn usage(
        &self,
        id: OpId,
        n: u64,
        text: &str,
        after: Option<OpId>,
        pending: &[Pending<'_>],
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
            let in_pending = pending.iter().any(|p| {
                p.id.replica == id.replica && p.id.lamport < end && id.lamport < p.id.lamport + p.n
            });
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
                    let base = s.arena as usize + loc.off as usize;
                    for j in 0..k as usize {
                        if chars.next() != Some(self.arena.get(base + j)) {
                            return Usage::Conflict;
                        }
                    }
                }
                lamport += k;
            } else if let Some(p) = pending.iter().rev().find(|p| p.contains(at)) {
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
                if !p
                    .text
                    .chars()
                    .skip(off as usize)
                    .take(k as usize)
                    .eq(chars.by_ref().take(k as usize))
                {
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
    /// Costs O(spans between the two).
    fn origin_of(&self, loc: Loc) -> Option<OpId> {
        let me = self.id_of(loc);
        if loc.off > 0 {
            return Some(OpId::new(me.lamport - 1, me.replica));
        }
        let (mut leaf, mut idx) = (loc.leaf, loc.idx);
        loop {
            if idx == 0 {
                leaf = self.tree.leaves[leaf as usize].prev;
                if leaf == NONE {
                    return None;
                }
                idx = self.tree.leaves[leaf as usize].n as usize;
                continue;
            }
            idx -= 1;
            let s = self.tree.span(leaf, idx);
            let r = self.replicas[s.replica as usize];
            if OpId::new(s.lamport, r) < me {
                let last = s.end() - 1;
                let lamport = if r < me.replica {
                    last.min(me.lamport)
                } else {
                    last.min(me.lamport - 1)
                };
                return Some(OpId::new(lamport, r));
            }
        }
    }

    /// From "right after `at`", skips every following item whose id is greater than `id`; returns the item to insert after.
    fn skip_greater(&self, mut at: Option<Loc>, id: OpId) -> Option<Loc> {
        let (mut leaf, mut idx, mut off) = match at {
            None => (0u32, 0usize, 0u32),
            Some(l) => (l.leaf, l.idx, l.off + 1),
        };
        loop {
            let lf = &self.tree.leaves[leaf as usize];
            if idx >= lf.n as usize {
                leaf = lf.next;
                if leaf == NONE {
                    return at;
                }
                (idx, off) = (0, 0);
                continue;
            }
            let s = lf.spans[idx];
            if off >= s.len() {
                (idx, off) = (idx + 1, 0);
                continue;
            }
            // Lamports rise along a span, so if one item is greater, the rest of the span is too.
            if OpId::new(s.lamport + off as u64, self.replicas[s.replica as usize]) > id {
                at = Some(Loc {
                    leaf,
                    idx,
                    off: s.len() - 1,
                });
                (idx, off) = (idx + 1, 0);
            } else {
                return at;
            }
        }
    }

    /// Inserts new items `id..` with `text` right after `at` (no skipping).
    /// Returns where the last new item is.
    fn insert_run(&mut self, mut at: Option<Loc>, id: OpId, text: &str) -> Loc {
        let r = self.intern_replica(id.replica);
        let arena = self.arena.push_str(text);
        let n = self.arena.len() - arena;
        assert!(
            self.arena.len() <= u32::MAX as usize,
            "text arena over 4 GiB chars"
        );
        let mut done = 0usize;
        while done < n {
            let k = (n - done).min(SPAN_MAX as usize) as u32;
            let span = Span::new(id.lamport + done as u64, r, k, (arena + done) as u32, false);
            let loc = self.tree.insert_after(at, span);
            at = Some(Loc {
                off: loc.off + k - 1,
                ..loc
            });
            done += k as usize;
        }
        let last = id.lamport + n as u64 - 1;
        self.max_lamport = Some(self.max_lamport.map_or(last, |m| m.max(last)));
        self.max_replica = self.max_replica.max(id.replica);
        at.expect("text is not empty")
    }

    /// Marks the known items `id .. id+len` deleted.
    fn delete_ids(&mut self, id: OpId, len: u64) {
        let end = id.lamport + len;
        let mut lamport = id.lamport;
        while lamport < end {
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
        if let Some(&r) = self.replicas.last() {
            if r == replica {
                return self.replicas.len() as u32 - 1;
            }
        }
        if let Some(&i) = self.replica_idx.get(&replica) {
            return i;
        }
        let i = self.replicas.len() as u32;
        self.replicas.push(replica);
        self.replica_idx.insert(replica, i);
        i
    }

    #[inline]
    fn replica_index_fast(&self, replica: u64) -> Option<u32> {
        if self.replicas.len() == 1 && self.replicas[0] == replica {
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
            s.lamport + loc.off as u64,
            self.replicas[s.replica as usize],
        )
    }

    /// Local edit: inserts `text` at code-point position `pos` and returns the op to send.
    /// Its lamport is one above the highest lamport seen (0 for an empty history).
    ///
    /// # Panics
    /// If `pos > len()`, `text` is empty, or `replica` or the new ids are past 2^53 - 1 (caller bugs).
    pub fn insert_local(&mut self, replica: u64, pos: usize, text: &str) -> Op {
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
        let last = self.insert_run(at, id, text);
        // The last new char is at `pos + n - 1`, `last.off` chars into its (visible) span.
        let n = text.chars().count();
        let span_start = (pos + n - 1) as u64 - last.off as u64;
        self.tree.set_span_cursor(last.leaf, last.idx, span_start);
        Op::Insert {
            id,
            after,
            text: text.to_owned(),
        }
    }

    /// Local edit: deletes visible code points `pos .. pos+len`; returns one `Delete` per run of consecutive ids.
    ///
    /// # Panics
    /// If `pos + len > len()`.
    pub fn delete_local(&mut self, pos: usize, len: usize) -> Vec<Op> {
        assert!(
            pos.checked_add(len).is_some_and(|end| end <= self.len()),
            "delete range past the end"
        );
        if len == 0 {
            return Vec::new();
        }
        // Usually one op: no room for more until needed.
        let mut ops: Vec<Op> = Vec::with_capacity(1);
        let mut rest = len as u64;
        while rest > 0 {
            let loc = self.tree.locate_visible(pos as u64);
            let s = self.tree.span(loc.leaf, loc.idx);
            let k = rest.min((s.len() - loc.off) as u64);
            let id = self.id_of(loc);
            self.tree.delete_in_span(loc, k as u32);
            rest -= k;
            if let Some(Op::Delete {
                id: last,
                len: last_len,
            }) = ops.last_mut()
            {
                if last.replica == id.replica && last.lamport + *last_len == id.lamport {
                    *last_len += k;
                    continue;
                }
            }
            ops.push(Op::Delete { id, len: k });
        }
        ops
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
            let replica = self.replicas[s.replica as usize];
            let mergeable = last_end == Some((replica, s.lamport));
            match runs.last_mut() {
                Some(Run {
                    content: RunContent::Deleted(n),
                    ..
                }) if mergeable && s.deleted() => *n += s.len() as u64,
                Some(Run {
                    content: RunContent::Text(t),
                    ..
                }) if mergeable && !s.deleted() => {
                    self.arena.write_to(t, s.arena as usize, s.len() as usize)
                }
                _ => {
                    let content = if s.deleted() {
                        RunContent::Deleted(s.len() as u64)
                    } else {
                        let mut t = String::new();
                        self.arena
                            .write_to(&mut t, s.arena as usize, s.len() as usize);
                        RunContent::Text(t)
                    };
                    runs.push(Run {
                        id: OpId::new(s.lamport, replica),
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
                    .write_to(&mut out, s.arena as usize, s.len() as usize);
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
            + self.replicas.capacity() * 8
            + self.replica_idx.capacity() * 16
    }
}

/// Appends items `lamport .. lamport+n` at the end of the document, as spans of at most `SPAN_MAX`.
fn push_spans(tree: &mut Tree, lamport: u64, r: u32, n: u64, arena: Option<u32>) {
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(SPAN_MAX as u64) as u32;
        let a = arena.map_or(0, |a| a + done as u32);
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
