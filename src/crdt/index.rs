//! `IdIndex`: the id index of the content tree, an ordered map from `(replica, lamport)` keys to leaves.
//! A key maps the ids of its replica from its lamport up to the next key of that replica (see `Tree::index`).
//! Per replica, the keys are kept in sorted chunks of at most `CHUNK` entries of 8 bytes (lamport offset from the
//! chunk's first key, leaf), found by a binary search over the chunks' first keys and then within the chunk.
//! That is about a third of the memory of a `BTreeMap<(u32, u64), u32>` per key and one or two cache misses per lookup.
//! This module knows nothing of spans or leaves beyond their numbers; `tree.rs` keeps the keys right.

/// Most entries of a chunk; a full chunk passes an entry to a neighbour with room, else splits in two, or starts a new
/// chunk when the key goes after the last one.
const CHUNK: usize = 64;

/// Makes room for one more entry in a chunk that is not full, growing it by at most `GROW` entries (not doubling):
/// chunks are small and many, so the slack of doubling would be about a sixth of the index.
#[inline]
fn grow(ents: &mut Vec<(u32, u32)>) {
    if ents.len() == ents.capacity() {
        ents.reserve_exact(GROW.min(CHUNK - ents.len()));
    }
}

/// Entries a chunk grows by when it is full below `CHUNK`.
const GROW: usize = 8;

/// Keys of one replica: chunks in key order, each non-empty, each holding keys `first .. first + 2^32`.
#[derive(Clone, Default)]
struct Runs {
    /// First key of each chunk, ascending (searched first, so it stays small and dense).
    firsts: Vec<u64>,
    /// Entries of each chunk: (key - first key of the chunk, leaf), ascending; the first offset is 0.
    chunks: Vec<Vec<(u32, u32)>>,
}

/// A key's place: chunk and entry index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    chunk: usize,
    ent: usize,
}

impl Runs {
    #[inline]
    fn key(&self, at: At) -> u64 {
        self.firsts[at.chunk] + self.chunks[at.chunk][at.ent].0 as u64
    }

    #[inline]
    fn leaf(&self, at: At) -> u32 {
        self.chunks[at.chunk][at.ent].1
    }

    /// The last key at or below `k`.
    #[inline]
    fn last_at_or_below(&self, k: u64) -> Option<At> {
        let chunk = self.firsts.partition_point(|&f| f <= k).checked_sub(1)?;
        // Every key of the chunk is below its first key + 2^32: past that, the chunk's last key is the answer.
        let off = (k - self.firsts[chunk]).min(u32::MAX as u64) as u32;
        let ents = &self.chunks[chunk];
        let ent = ents.partition_point(|e| e.0 <= off) - 1;
        Some(At { chunk, ent })
    }

    /// The place after `at` (the next key), if any.
    #[inline]
    fn next(&self, at: At) -> Option<At> {
        if at.ent + 1 < self.chunks[at.chunk].len() {
            Some(At {
                ent: at.ent + 1,
                ..at
            })
        } else if at.chunk + 1 < self.chunks.len() {
            Some(At {
                chunk: at.chunk + 1,
                ent: 0,
            })
        } else {
            None
        }
    }

    /// The place before `at` (the previous key), if any.
    #[inline]
    fn prev(&self, at: At) -> Option<At> {
        if at.ent > 0 {
            Some(At {
                ent: at.ent - 1,
                ..at
            })
        } else if at.chunk > 0 {
            let chunk = at.chunk - 1;
            Some(At {
                chunk,
                ent: self.chunks[chunk].len() - 1,
            })
        } else {
            None
        }
    }

    /// The first key at or above `k`.
    #[inline]
    fn first_at_or_above(&self, k: u64) -> Option<At> {
        match self.last_at_or_below(k) {
            Some(at) if self.key(at) == k => Some(at),
            Some(at) => self.next(at),
            None if self.firsts.is_empty() => None,
            None => Some(At { chunk: 0, ent: 0 }),
        }
    }

    /// Sets `k` to `leaf`; returns whether the key is new.
    fn insert(&mut self, k: u64, leaf: u32) -> bool {
        let Some(at) = self.last_at_or_below(k) else {
            return self.insert_front(k, leaf);
        };
        if self.key(at) == k {
            self.chunks[at.chunk][at.ent].1 = leaf;
            return false;
        }
        let chunk = at.chunk;
        let first = self.firsts[chunk];
        let ent = at.ent + 1;
        let Ok(off) = u32::try_from(k - first) else {
            // Too far above the chunk's first key for an offset (so above all its keys): a chunk of its own.
            self.new_chunk(chunk + 1, k, leaf);
            return true;
        };
        let last_chunk = chunk + 1 == self.chunks.len();
        let ents = &mut self.chunks[chunk];
        if ents.len() < CHUNK {
            grow(ents);
            ents.insert(ent, (off, leaf));
            return true;
        }
        // Full: pass an entry to a neighbour with room, so that chunks stay nearly full (and the index small).
        if !last_chunk && self.chunks[chunk + 1].len() < CHUNK {
            if ent == CHUNK {
                if self.push_front(chunk + 1, k, leaf) {
                    return true;
                }
            } else {
                let (last_off, last_leaf) = self.chunks[chunk][CHUNK - 1];
                if self.push_front(chunk + 1, first + last_off as u64, last_leaf) {
                    let ents = &mut self.chunks[chunk];
                    ents.pop();
                    ents.insert(ent, (off, leaf));
                    return true;
                }
            }
        }
        // The chunk's first key moves back; `k` stays in this chunk, above its new first key, when `ent >= 2`.
        if chunk > 0 && ent >= 2 && self.chunks[chunk - 1].len() < CHUNK {
            let first_leaf = self.chunks[chunk][0].1;
            if let Ok(prev_off) = u32::try_from(first - self.firsts[chunk - 1]) {
                grow(&mut self.chunks[chunk - 1]);
                self.chunks[chunk - 1].push((prev_off, first_leaf));
                self.remove_at(At { chunk, ent: 0 });
                let off = (k - self.firsts[chunk]) as u32;
                self.chunks[chunk].insert(ent - 1, (off, leaf));
                return true;
            }
        }
        if ent == CHUNK && last_chunk {
            // Appending at the end of the last chunk (new ids): keep the full chunk full.
            self.new_chunk(chunk + 1, k, leaf);
            return true;
        }
        // Split the full chunk in half, then insert into the half that holds the place.
        let mid = CHUNK / 2;
        let mut right = self.chunks[chunk].split_off(mid);
        self.chunks[chunk].shrink_to(mid + GROW);
        right.reserve_exact(GROW);
        let base = right[0].0;
        for e in &mut right {
            e.0 -= base;
        }
        self.firsts.insert(chunk + 1, first + base as u64);
        self.chunks.insert(chunk + 1, right);
        if ent <= mid {
            self.chunks[chunk].insert(ent, (off, leaf));
        } else {
            self.chunks[chunk + 1].insert(ent - mid, (off - base, leaf));
        }
        true
    }

    /// Inserts `k`, below every key, at the front of the first chunk (or a new chunk when that one is full or too wide).
    fn insert_front(&mut self, k: u64, leaf: u32) -> bool {
        let full = self.chunks.first().map_or(true, |ents| ents.len() == CHUNK);
        if full || !self.push_front(0, k, leaf) {
            self.new_chunk(0, k, leaf);
        }
        true
    }

    /// Puts `k` (below every key of chunk `chunk`, above every key of the chunk before) at the front of chunk `chunk`,
    /// which has room; returns false, changing nothing, when the chunk's keys would then span 2^32 or more.
    fn push_front(&mut self, chunk: usize, k: u64, leaf: u32) -> bool {
        let ents = &mut self.chunks[chunk];
        debug_assert!(ents.len() < CHUNK && k < self.firsts[chunk]);
        let shift = self.firsts[chunk] - k;
        if shift + ents[ents.len() - 1].0 as u64 > u32::MAX as u64 {
            return false;
        }
        for e in ents.iter_mut() {
            e.0 += shift as u32;
        }
        grow(ents);
        ents.insert(0, (0, leaf));
        self.firsts[chunk] = k;
        true
    }

    fn new_chunk(&mut self, chunk: usize, k: u64, leaf: u32) {
        let mut ents = Vec::with_capacity(4);
        ents.push((0, leaf));
        self.firsts.insert(chunk, k);
        self.chunks.insert(chunk, ents);
    }

    /// Removes the key at `at`; returns its leaf.
    fn remove_at(&mut self, at: At) -> u32 {
        let ents = &mut self.chunks[at.chunk];
        let (_, leaf) = ents.remove(at.ent);
        if ents.is_empty() {
            self.chunks.remove(at.chunk);
            self.firsts.remove(at.chunk);
        } else if at.ent == 0 {
            // The next key becomes the chunk's first.
            let base = ents[0].0;
            for e in ents.iter_mut() {
                e.0 -= base;
            }
            self.firsts[at.chunk] += base as u64;
        }
        leaf
    }

    fn heap_bytes(&self) -> usize {
        self.firsts.capacity() * 8
            + self.chunks.capacity() * std::mem::size_of::<Vec<(u32, u32)>>()
            + self.chunks.iter().map(|c| c.capacity() * 8).sum::<usize>()
    }
}

/// The id index: per dense replica index, its keys; see the module doc.
#[derive(Clone, Default)]
pub(crate) struct IdIndex {
    replicas: Vec<Runs>,
    len: usize,
}

impl IdIndex {
    #[inline]
    fn runs(&self, replica: u32) -> Option<&Runs> {
        self.replicas.get(replica as usize)
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The key covering `lamport` of `replica` (the last at or below it): its lamport, the next key's (`u64::MAX` if
    /// none) and its leaf.
    #[inline]
    pub(crate) fn cover(&self, replica: u32, lamport: u64) -> Option<(u64, u64, u32)> {
        let runs = self.runs(replica)?;
        let at = runs.last_at_or_below(lamport)?;
        let hi = runs.next(at).map_or(u64::MAX, |n| runs.key(n));
        Some((runs.key(at), hi, runs.leaf(at)))
    }

    /// The leaf of exactly key `lamport` of `replica`.
    pub(crate) fn get(&self, replica: u32, lamport: u64) -> Option<u32> {
        let runs = self.runs(replica)?;
        let at = runs.last_at_or_below(lamport)?;
        (runs.key(at) == lamport).then(|| runs.leaf(at))
    }

    /// The last key of `replica` strictly below `lamport`, with its leaf.
    pub(crate) fn before(&self, replica: u32, lamport: u64) -> Option<(u64, u32)> {
        let runs = self.runs(replica)?;
        let at = runs.last_at_or_below(lamport)?;
        let at = if runs.key(at) == lamport {
            runs.prev(at)?
        } else {
            at
        };
        Some((runs.key(at), runs.leaf(at)))
    }

    /// The first key of `replica` at or above `lamport`, with its leaf.
    #[cfg(test)]
    pub(crate) fn at_or_after(&self, replica: u32, lamport: u64) -> Option<(u64, u32)> {
        let runs = self.runs(replica)?;
        let at = runs.first_at_or_above(lamport)?;
        Some((runs.key(at), runs.leaf(at)))
    }

    /// Keys of `replica` in `start .. end`, ascending, with their leaves.
    pub(crate) fn range(
        &self,
        replica: u32,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, u32)> + '_ {
        let runs = self.runs(replica);
        let mut at = runs.and_then(|r| r.first_at_or_above(start));
        std::iter::from_fn(move || {
            let runs = runs?;
            let cur = at?;
            let k = runs.key(cur);
            if k >= end {
                at = None;
                return None;
            }
            at = runs.next(cur);
            Some((k, runs.leaf(cur)))
        })
    }

    /// Maps key `lamport` of `replica` to `leaf`, adding the key if it is new.
    pub(crate) fn insert(&mut self, replica: u32, lamport: u64, leaf: u32) {
        let r = replica as usize;
        if r >= self.replicas.len() {
            self.replicas.resize_with(r + 1, Runs::default);
        }
        if self.replicas[r].insert(lamport, leaf) {
            self.len += 1;
        }
    }

    /// Removes key `lamport` of `replica`; returns its leaf, `None` if there was no such key.
    pub(crate) fn remove(&mut self, replica: u32, lamport: u64) -> Option<u32> {
        let runs = self.replicas.get_mut(replica as usize)?;
        let at = runs.last_at_or_below(lamport)?;
        if runs.key(at) != lamport {
            return None;
        }
        self.len -= 1;
        Some(runs.remove_at(at))
    }

    /// Re-points ids `start .. end` of `replica`, all known and all in leaf `from` until now, to leaf `to` (a leaf
    /// split moved them), with one search in the common case: keys inside the range (which can only map to `from`) go,
    /// the key covering `start` is re-pointed in place (or merged into the key before it when that maps to `to`, or a
    /// key is added at `start`, unless the covering key maps to `to` already), and ids from `end` on keep their leaf:
    /// a key at `end` mapping to `to` goes, and where no key is at `end`, one to `from` is added if `from_holds(end,
    /// next key)` says `from` still holds an id there (unknown ids may map anywhere; none is known at or above
    /// `lamport_end`).
    pub(crate) fn repoint(
        &mut self,
        replica: u32,
        [start, end]: [u64; 2],
        [from, to]: [u32; 2],
        lamport_end: u64,
        from_holds: impl FnOnce(u64, u64) -> bool,
    ) {
        let Some(runs) = self.replicas.get_mut(replica as usize) else {
            // Unreachable for known ids; mapping them is still right.
            self.insert(replica, start, to);
            return;
        };
        let Some(at) = runs.last_at_or_below(start) else {
            self.insert(replica, start, to);
            return;
        };
        while let Some(n) = runs.next(at) {
            if runs.key(n) >= end {
                break;
            }
            debug_assert_eq!(runs.leaf(n), from, "index key inside a moved span");
            runs.remove_at(n);
            self.len -= 1;
        }
        let next = runs.next(at).map(|n| (runs.key(n), runs.leaf(n)));
        if runs.key(at) == start {
            let merges_left = runs.prev(at).is_some_and(|p| runs.leaf(p) == to);
            if merges_left {
                runs.remove_at(at);
                self.len -= 1;
            } else {
                runs.chunks[at.chunk][at.ent].1 = to;
            }
        } else if runs.leaf(at) != to {
            // Covered by a key at or before `start` that maps to `from`.
            self.insert(replica, start, to);
        }
        match next {
            Some((k, l)) if k == end && l == to => {
                self.remove(replica, end);
            }
            Some((k, _)) if k == end => {}
            _ if end < lamport_end && from_holds(end, next.map_or(u64::MAX, |n| n.0)) => {
                self.insert(replica, end, from);
            }
            _ => {}
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.replicas.capacity() * std::mem::size_of::<Runs>()
            + self.replicas.iter().map(Runs::heap_bytes).sum::<usize>()
    }

    /// Checks the layout (chunks non-empty, within capacity, sorted, offsets from each chunk's first key) and the key
    /// count; for `Doc::dbg_check`.
    ///
    /// # Panics
    /// On the first violation.
    pub(crate) fn dbg_check(&self) {
        let mut n = 0;
        for (r, runs) in self.replicas.iter().enumerate() {
            assert_eq!(
                runs.firsts.len(),
                runs.chunks.len(),
                "index r{r}: chunk count"
            );
            let mut last: Option<u64> = None;
            for (c, ents) in runs.chunks.iter().enumerate() {
                assert!(!ents.is_empty(), "index r{r}: empty chunk {c}");
                assert!(ents.len() <= CHUNK, "index r{r}: chunk {c} over capacity");
                assert_eq!(ents[0].0, 0, "index r{r}: chunk {c} first offset");
                for e in ents {
                    let k = runs.firsts[c] + e.0 as u64;
                    assert!(
                        last.map_or(true, |l| l < k),
                        "index r{r}: keys out of order at {k}"
                    );
                    last = Some(k);
                }
                n += ents.len();
            }
        }
        assert_eq!(n, self.len, "index key count");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{IdIndex, CHUNK};

    /// xorshift64: a deterministic stream for the model test.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    fn same(index: &IdIndex, model: &BTreeMap<(u32, u64), u32>, probes: &[(u32, u64)]) {
        index.dbg_check();
        assert_eq!(index.len(), model.len());
        for &(r, k) in probes {
            let want = model
                .range((r, 0)..=(r, k))
                .next_back()
                .map(|(&(_, lo), &leaf)| {
                    let hi = model
                        .range((r, k + 1)..=(r, u64::MAX))
                        .next()
                        .map_or(u64::MAX, |(&(_, hi), _)| hi);
                    (lo, hi, leaf)
                });
            assert_eq!(index.cover(r, k), want, "cover r{r} {k}");
            assert_eq!(index.get(r, k), model.get(&(r, k)).copied(), "get r{r} {k}");
            let before = model
                .range((r, 0)..(r, k))
                .next_back()
                .map(|(&(_, lo), &l)| (lo, l));
            assert_eq!(index.before(r, k), before, "before r{r} {k}");
            let after = model
                .range((r, k)..=(r, u64::MAX))
                .next()
                .map(|(&(_, lo), &l)| (lo, l));
            assert_eq!(index.at_or_after(r, k), after, "at_or_after r{r} {k}");
            let end = k.saturating_add(1000);
            let got: Vec<_> = index.range(r, k, end).collect();
            let want: Vec<_> = model
                .range((r, k)..(r, end))
                .map(|(&(_, lo), &l)| (lo, l))
                .collect();
            assert_eq!(got, want, "range r{r} {k}..{end}");
        }
    }

    /// Random inserts, overwrites and removes against a `BTreeMap` model, with keys dense (chunk splits, front inserts)
    /// and sparse (offsets past 2^32 force chunks of their own).
    #[test]
    fn matches_a_btreemap() {
        for (seed, spread) in [(1u64, 3_000u64), (2, 200), (3, 1 << 40), (4, u64::MAX / 2)] {
            let mut next = rng(seed);
            let mut index = IdIndex::default();
            let mut model = BTreeMap::new();
            let mut probes = Vec::new();
            for step in 0..6_000u64 {
                let r = (next() % 3) as u32;
                let k = next() % spread;
                match next() % 10 {
                    0..=5 => {
                        let leaf = (next() % 50) as u32;
                        index.insert(r, k, leaf);
                        model.insert((r, k), leaf);
                    }
                    6 => {
                        // Mostly ascending keys, as new ids are.
                        let k = step * (spread / 6_000).max(1);
                        index.insert(r, k, 7);
                        model.insert((r, k), 7);
                    }
                    _ => {
                        // Remove an existing key when there is one near `k`.
                        let existing = model
                            .range((r, k)..=(r, u64::MAX))
                            .next()
                            .map(|(&(_, key), _)| key);
                        let target = existing.unwrap_or(k);
                        assert_eq!(index.remove(r, target), model.remove(&(r, target)));
                    }
                }
                probes.push((r, k));
                if step % 500 == 0 {
                    let sample: Vec<_> = probes.iter().rev().take(200).copied().collect();
                    same(&index, &model, &sample);
                }
            }
            let all: Vec<_> = model.keys().copied().collect();
            same(&index, &model, &all);
            same(&index, &model, &probes);
        }
    }

    #[test]
    fn ascending_keys_fill_chunks() {
        let mut index = IdIndex::default();
        let n = CHUNK as u64 * 10;
        for k in 0..n {
            index.insert(0, k * 3, k as u32);
        }
        index.dbg_check();
        assert_eq!(
            index.replicas[0].chunks.len(),
            10,
            "appends keep chunks full"
        );
        for k in 0..n {
            assert_eq!(
                index.cover(0, k * 3 + 1),
                Some((
                    k * 3,
                    if k + 1 < n { k * 3 + 3 } else { u64::MAX },
                    k as u32
                ))
            );
        }
        assert_eq!(index.cover(1, 0), None);
        assert_eq!(index.cover(0, u64::MAX).map(|c| c.2), Some(n as u32 - 1));
    }

    #[test]
    fn keys_far_apart_get_their_own_chunks() {
        let mut index = IdIndex::default();
        let keys = [5u64, 1 << 33, (1 << 33) + 1, 1 << 53, 3, (1 << 53) - 1];
        for (i, &k) in keys.iter().enumerate() {
            index.insert(2, k, i as u32);
        }
        index.dbg_check();
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(index.get(2, k), Some(i as u32));
            assert_eq!(index.cover(2, k).map(|c| (c.0, c.2)), Some((k, i as u32)));
        }
        assert_eq!(index.cover(2, (1 << 32) + 7).map(|c| c.0), Some(5));
        assert_eq!(index.remove(2, 3), Some(4));
        assert_eq!(index.remove(2, 3), None);
        index.dbg_check();
        assert_eq!(index.cover(2, 4), None);
    }
}
