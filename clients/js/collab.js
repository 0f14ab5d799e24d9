// collab-engine JavaScript client: an RGA replica, a WebSocket connection that speaks
// protocol version 1 (docs/protocol.md), and a <textarea> binding.
//
// One ES module, no build step, no runtime dependencies. Works in browsers and in Node 20+
// (pass a WebSocket implementation, e.g. the `ws` package, where there is no global one).
//
// Positions in the replica API count Unicode code points, as the wire contract does.
// Editors that count UTF-16 units (the DOM, JavaScript strings) get `index16`/`length16`
// in change events and the `utf16ToCp`/`cpToUtf16` conversions.

// ---------------------------------------------------------------------------------------
// Ids and small helpers
// ---------------------------------------------------------------------------------------

/** Greatest lamport or replica the contract allows (2^53-1). */
export const MAX_ID_COMPONENT = Number.MAX_SAFE_INTEGER;

/** Compares ids (lamport, replica) lexicographically: negative, zero or positive. */
export function compareIds(l1, r1, l2, r2) {
  if (l1 !== l2) return l1 < l2 ? -1 : 1;
  if (r1 !== r2) return r1 < r2 ? -1 : 1;
  return 0;
}

/** Number of code points in a string. */
export function cpLength(s) {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    // A high surrogate followed by a low surrogate is one code point.
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) { n--; i++; }
    }
  }
  return n;
}

/** UTF-16 offset of code point offset `cp` in `s` (`s` of `cpLen` code points). */
function u16Offset(s, cpLen, cp) {
  if (s.length === cpLen) return cp;
  let i = 0;
  for (let k = 0; k < cp; k++) {
    const c = s.charCodeAt(i);
    i += (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) ? 2 : 1;
  }
  return i;
}

/** Code point offset of UTF-16 offset `u` in `s` (rounded down to a code point boundary). */
function cpOffset(s, cpLen, u) {
  if (s.length === cpLen) return u;
  let i = 0;
  let k = 0;
  while (i < u && i < s.length) {
    const c = s.charCodeAt(i);
    const w = (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) ? 2 : 1;
    if (i + w > u) break;
    i += w;
    k++;
  }
  return k;
}

/** Slice of `s` (of `cpLen` code points) by code point offsets. */
function cpSlice(s, cpLen, a, b) {
  if (s.length === cpLen) return s.slice(a, b);
  return s.slice(u16Offset(s, cpLen, a), u16Offset(s, cpLen, b));
}

function isId(v) {
  return Array.isArray(v) && v.length === 2 && Number.isSafeInteger(v[0]) && v[0] >= 0 &&
    Number.isSafeInteger(v[1]) && v[1] >= 0;
}

/** Raised for ops that cannot be integrated (unknown target, malformed op). */
export class OpError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'OpError';
    /** The contract's error code: `unknown_id`, `invalid_op` or `bad_message`. */
    this.code = code;
  }
}

// ---------------------------------------------------------------------------------------
// The replica
// ---------------------------------------------------------------------------------------

// A run holds consecutive ids [lamport .. lamport+len-1] of one replica that sit next to
// each other in document order, all visible (`text` holds their characters) or all
// tombstones (`text` is null). Runs live in chunks; a chunk caches its visible length in
// code points and UTF-16 units so that positions are found chunk by chunk, not char by char.
class Run {
  constructor(lamport, replica, len, text, u16) {
    this.lamport = lamport;
    this.replica = replica;
    this.len = len;
    this.text = text;
    this.u16 = u16;
    this.chunk = null;
  }
  get vis() { return this.text === null ? 0 : this.len; }
}

class Chunk {
  constructor() {
    this.runs = [];
    this.vis = 0;
    this.vis16 = 0;
    this.idx = 0;
  }
}

/** Runs per index block before it splits. */
const BLOCK_MAX = 256;

/**
 * One replica's runs sorted by lamport, in blocks of at most BLOCK_MAX: finding, adding and
 * removing a run cost O(log runs + BLOCK_MAX), never a shift of every run of the replica.
 */
class RunIndex {
  constructor() {
    /** Non-empty sorted blocks (one empty block only when the index is empty). */
    this.blocks = [[]];
  }

  /** Index of the block that holds (or would hold) `lamport`. */
  _block(lamport) {
    const bs = this.blocks;
    let lo = 0;
    let hi = bs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (bs[mid][0].lamport <= lamport) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  /** Index in `arr` of the last run whose lamport <= `lamport`, or -1. */
  static _search(arr, lamport) {
    let lo = 0;
    let hi = arr.length - 1;
    let ans = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (arr[mid].lamport <= lamport) { ans = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return ans;
  }

  find(lamport) {
    const b = this.blocks[this._block(lamport)];
    const i = RunIndex._search(b, lamport);
    if (i < 0) return null;
    const r = b[i];
    return lamport < r.lamport + r.len ? r : null;
  }

  add(run) {
    const bi = this._block(run.lamport);
    const b = this.blocks[bi];
    b.splice(RunIndex._search(b, run.lamport) + 1, 0, run);
    if (b.length > BLOCK_MAX) this.blocks.splice(bi + 1, 0, b.splice(BLOCK_MAX >> 1));
  }

  remove(run) {
    const bi = this._block(run.lamport);
    const b = this.blocks[bi];
    const i = RunIndex._search(b, run.lamport);
    if (b[i] !== run) throw new Error('rga: index out of sync');
    b.splice(i, 1);
    if (b.length === 0 && this.blocks.length > 1) this.blocks.splice(bi, 1);
  }
}

/** Runs per chunk before it splits; a position lookup costs O(chunks + CHUNK_MAX). */
const CHUNK_MAX = 64;

/**
 * A replica of the contract's RGA sequence: items with ids `[lamport, replica]`, tombstones
 * kept, inserts integrated by the contract's rule. Local edits take code point positions and
 * return the ops to send; remote ops return change descriptions for an editor.
 */
export class RgaDoc {
  /** `replica` names local inserts; it may be set later (before the first local edit). */
  constructor(replica = null) {
    this.replica = replica;
    this._reset();
  }

  _reset() {
    this.chunks = [new Chunk()];
    /** replica -> RunIndex of its runs; finds an id in O(log runs). */
    this.byReplica = new Map();
    /** Greatest lamport seen; local inserts use greater ones. */
    this.maxLamport = -1;
    this.nItems = 0;
  }

  /** Visible length in code points. */
  get length() {
    let n = 0;
    for (const c of this.chunks) n += c.vis;
    return n;
  }

  /** Visible length in UTF-16 units (the length of `text()` as a JavaScript string). */
  get length16() {
    let n = 0;
    for (const c of this.chunks) n += c.vis16;
    return n;
  }

  /** The visible text. */
  text() {
    const parts = [];
    for (const c of this.chunks) for (const r of c.runs) if (r.text !== null) parts.push(r.text);
    return parts.join('');
  }

  // --- index maintenance ---------------------------------------------------------------

  /** The run containing id (lamport, replica), or null. */
  _find(lamport, replica) {
    const idx = this.byReplica.get(replica);
    return idx ? idx.find(lamport) : null;
  }

  _indexAdd(run) {
    let idx = this.byReplica.get(run.replica);
    if (!idx) { idx = new RunIndex(); this.byReplica.set(run.replica, idx); }
    idx.add(run);
  }

  _indexRemove(run) {
    this.byReplica.get(run.replica).remove(run);
  }

  /** Puts `run` at `pos` in `chunk` and keeps the caches; splits an overfull chunk. */
  _chunkInsert(chunk, pos, run) {
    chunk.runs.splice(pos, 0, run);
    run.chunk = chunk;
    if (run.text !== null) { chunk.vis += run.len; chunk.vis16 += run.u16; }
    if (chunk.runs.length > CHUNK_MAX) this._splitChunk(chunk);
  }

  _splitChunk(chunk) {
    const half = chunk.runs.length >> 1;
    const right = new Chunk();
    right.runs = chunk.runs.splice(half);
    for (const r of right.runs) {
      r.chunk = right;
      if (r.text !== null) { right.vis += r.len; right.vis16 += r.u16; }
    }
    chunk.vis -= right.vis;
    chunk.vis16 -= right.vis16;
    this.chunks.splice(chunk.idx + 1, 0, right);
    for (let i = chunk.idx + 1; i < this.chunks.length; i++) this.chunks[i].idx = i;
  }

  /** Splits `run` at offset `off` (0 < off < len); returns the new right part. */
  _splitRun(run, off) {
    let lt = null;
    let rt = null;
    let lu = 0;
    let ru = 0;
    if (run.text !== null) {
      const cut = u16Offset(run.text, run.len, off);
      lt = run.text.slice(0, cut);
      rt = run.text.slice(cut);
      lu = lt.length;
      ru = rt.length;
    }
    const right = new Run(run.lamport + off, run.replica, run.len - off, rt, ru);
    run.len = off;
    run.text = lt;
    run.u16 = lu;
    const chunk = run.chunk;
    // The caches stay right: the visible total of the two parts equals the old run's.
    if (right.text !== null) { chunk.vis -= right.len; chunk.vis16 -= right.u16; }
    this._indexAdd(right);
    this._chunkInsert(chunk, chunk.runs.indexOf(run) + 1, right);
    return right;
  }

  /** Visible code points and UTF-16 units before `run`. */
  _before(run) {
    let n = 0;
    let n16 = 0;
    const chunk = run.chunk;
    for (let i = 0; i < chunk.idx; i++) { n += this.chunks[i].vis; n16 += this.chunks[i].vis16; }
    for (const r of chunk.runs) {
      if (r === run) break;
      if (r.text !== null) { n += r.len; n16 += r.u16; }
    }
    return [n, n16];
  }

  /** The run after `run` in document order, or null. */
  _next(run) {
    const chunk = run.chunk;
    const i = chunk.runs.indexOf(run);
    if (i + 1 < chunk.runs.length) return chunk.runs[i + 1];
    for (let c = chunk.idx + 1; c < this.chunks.length; c++) {
      if (this.chunks[c].runs.length) return this.chunks[c].runs[0];
    }
    return null;
  }

  /** Merges `b` into `a` when `a` directly precedes it with the next ids and same state. */
  _tryMerge(a, b) {
    if (!a || !b || a.chunk !== b.chunk) return false;
    if (a.replica !== b.replica || a.lamport + a.len !== b.lamport) return false;
    if ((a.text === null) !== (b.text === null)) return false;
    const chunk = a.chunk;
    const i = chunk.runs.indexOf(b);
    if (i < 1 || chunk.runs[i - 1] !== a) return false;
    chunk.runs.splice(i, 1);
    this._indexRemove(b);
    a.len += b.len;
    if (a.text !== null) { a.text += b.text; a.u16 += b.u16; }
    return true;
  }

  /** The visible run and offset holding code point `pos` (0 <= pos < length). */
  _locate(pos) {
    let p = pos;
    for (const chunk of this.chunks) {
      if (p >= chunk.vis) { p -= chunk.vis; continue; }
      for (const r of chunk.runs) {
        if (r.text === null) continue;
        if (p < r.len) return [r, p];
        p -= r.len;
      }
    }
    throw new RangeError(`position ${pos} out of range`);
  }

  // --- positions and ids ---------------------------------------------------------------

  /** Id `[lamport, replica]` of the visible character at code point `pos`. */
  idAt(pos) {
    const [r, o] = this._locate(pos);
    return [r.lamport + o, r.replica];
  }

  /** Whether the document holds item `id` (visible or tombstone). */
  has(id) {
    return this._find(id[0], id[1]) !== null;
  }

  /**
   * Code point position of item `id`: its index when visible, else the number of visible
   * characters before it. Returns -1 for an unknown id.
   */
  positionOf(id) {
    const r = this._find(id[0], id[1]);
    if (!r) return -1;
    const [n] = this._before(r);
    return r.text === null ? n : n + (id[0] - r.lamport);
  }

  /** Whether item `id` is visible (false for tombstones and unknown ids). */
  isVisible(id) {
    const r = this._find(id[0], id[1]);
    return r !== null && r.text !== null;
  }

  /**
   * An anchor for the gap at code point `pos`: the id of the character before it, or null
   * at the start. Anchors survive remote edits; `positionOfAnchor` turns one back.
   */
  anchorAt(pos) {
    return pos <= 0 ? null : this.idAt(Math.min(pos, this.length) - 1);
  }

  /** The gap position an anchor names now (start of document for null or unknown ids). */
  positionOfAnchor(anchor) {
    if (!anchor) return 0;
    const r = this._find(anchor[0], anchor[1]);
    if (!r) return 0;
    const [n] = this._before(r);
    return r.text === null ? n : n + (anchor[0] - r.lamport) + 1;
  }

  /** UTF-16 offset of code point position `pos` in `text()`. */
  cpToUtf16(pos) {
    let p = pos;
    let u = 0;
    for (const chunk of this.chunks) {
      if (p >= chunk.vis) { p -= chunk.vis; u += chunk.vis16; continue; }
      for (const r of chunk.runs) {
        if (r.text === null) continue;
        if (p < r.len) return u + u16Offset(r.text, r.len, p);
        p -= r.len;
        u += r.u16;
      }
    }
    return u;
  }

  /** Code point position of UTF-16 offset `u` in `text()` (rounded down). */
  utf16ToCp(u) {
    let q = u;
    let p = 0;
    for (const chunk of this.chunks) {
      if (q >= chunk.vis16) { q -= chunk.vis16; p += chunk.vis; continue; }
      for (const r of chunk.runs) {
        if (r.text === null) continue;
        if (q < r.u16) return p + cpOffset(r.text, r.len, q);
        q -= r.u16;
        p += r.len;
      }
    }
    return p;
  }

  // --- integration ---------------------------------------------------------------------

  /**
   * Integrates an insert of `text` with ids [lamport..] of `replica` after `after` (an id or
   * null). Already-known ids are skipped (idempotent). Returns the changes it made.
   */
  _integrateIns(lamport, replica, after, text, changes) {
    let n = cpLength(text);
    if (n === 0) throw new OpError('invalid_op', 'empty insert');
    if (lamport + n - 1 > MAX_ID_COMPONENT) throw new OpError('invalid_op', 'ids run past 2^53-1');
    // Skip the prefix that is already integrated (a resend or our own echo).
    let skipped = 0;
    while (skipped < n) {
      const known = this._find(lamport + skipped, replica);
      if (!known) break;
      skipped = Math.min(n, known.lamport + known.len - lamport);
    }
    if (skipped === n) return;
    if (skipped > 0) {
      after = [lamport + skipped - 1, replica];
      text = cpSlice(text, n, skipped, n);
      lamport += skipped;
      n -= skipped;
    }
    // Where scanning starts: right after `after`, or at the document start.
    let chunk;
    let idx;
    if (after === null) {
      chunk = this.chunks[0];
      idx = 0;
    } else {
      const p = this._find(after[0], after[1]);
      if (!p) throw new OpError('unknown_id', `unknown after id [${after}]`);
      if (lamport <= after[0]) throw new OpError('invalid_op', 'lamport not above its parent');
      const off = after[0] - p.lamport;
      if (off + 1 < p.len) this._splitRun(p, off + 1);
      chunk = p.chunk;
      idx = chunk.runs.indexOf(p) + 1;
    }
    // Skip every following item with a greater id. Ids grow along a run, so comparing a
    // run's first id decides the whole run.
    for (;;) {
      if (idx >= chunk.runs.length) {
        if (chunk.idx + 1 < this.chunks.length) { chunk = this.chunks[chunk.idx + 1]; idx = 0; continue; }
        break;
      }
      const r = chunk.runs[idx];
      if (compareIds(r.lamport, r.replica, lamport, replica) > 0) { idx++; continue; }
      break;
    }
    // Prefer the end of the previous chunk over the start of the next one: typing at the
    // end of a run then extends it.
    if (idx === 0 && chunk.idx > 0) {
      chunk = this.chunks[chunk.idx - 1];
      idx = chunk.runs.length;
    }
    const prev = idx > 0 ? chunk.runs[idx - 1] : null;
    let run;
    if (prev && prev.text !== null && prev.replica === replica && prev.lamport + prev.len === lamport) {
      // Extend the previous run in place.
      prev.text += text;
      prev.len += n;
      prev.u16 += text.length;
      chunk.vis += n;
      chunk.vis16 += text.length;
      run = prev;
    } else {
      run = new Run(lamport, replica, n, text, text.length);
      this._indexAdd(run);
      this._chunkInsert(chunk, idx, run);
    }
    this.nItems += n;
    if (lamport + n - 1 > this.maxLamport) this.maxLamport = lamport + n - 1;
    if (changes) {
      const [b, b16] = this._before(run);
      const off = lamport - run.lamport;
      const index = b + off;
      const index16 = b16 + (run === prev ? u16Offset(run.text, run.len, off) : 0);
      changes.push({ index, length: 0, text, index16, length16: 0 });
    }
  }

  /**
   * Deletes ids [lamport .. lamport+len-1] of `replica`; tombstones stay tombstones. All or
   * nothing: an unknown id anywhere in the range throws before anything changes.
   */
  _integrateDel(lamport, replica, len, changes) {
    if (!(len >= 1)) throw new OpError('invalid_op', 'delete of len < 1');
    for (let j = 0; j < len;) {
      const r = this._find(lamport + j, replica);
      if (!r) throw new OpError('unknown_id', `unknown delete target [${lamport + j},${replica}]`);
      j += r.lamport + r.len - (lamport + j);
    }
    let k = 0;
    while (k < len) {
      let r = this._find(lamport + k, replica);
      if (!r) throw new OpError('unknown_id', `unknown delete target [${lamport + k},${replica}]`);
      const off = lamport + k - r.lamport;
      const m = Math.min(r.len - off, len - k);
      k += m;
      if (r.text === null) continue;
      if (off > 0) r = this._splitRun(r, off);
      if (m < r.len) this._splitRun(r, m);
      let b = 0;
      let b16 = 0;
      if (changes) [b, b16] = this._before(r);
      const removed = r.text;
      r.chunk.vis -= r.len;
      r.chunk.vis16 -= r.u16;
      r.text = null;
      r.u16 = 0;
      if (changes) changes.push({ index: b, length: m, text: '', index16: b16, length16: removed.length });
      // Keep runs long: join neighbouring tombstones with consecutive ids.
      const chunk = r.chunk;
      const i = chunk.runs.indexOf(r);
      const next = i + 1 < chunk.runs.length ? chunk.runs[i + 1] : null;
      this._tryMerge(r, next);
      if (i > 0) this._tryMerge(chunk.runs[i - 1], r);
    }
  }

  /** Checks one op's shape; throws OpError('bad_message') when it is malformed. */
  static validateOp(op) {
    if (!op || typeof op !== 'object') throw new OpError('bad_message', 'op is not an object');
    if (!isId(op.id)) throw new OpError('bad_message', 'bad id');
    if (op.kind === 'ins') {
      if (typeof op.text !== 'string') throw new OpError('bad_message', 'bad text');
      if (op.after !== null && !isId(op.after)) throw new OpError('bad_message', 'bad after');
    } else if (op.kind === 'del') {
      if (!Number.isSafeInteger(op.len)) throw new OpError('bad_message', 'bad len');
    } else {
      throw new OpError('bad_message', `unknown op kind ${op.kind}`);
    }
  }

  /**
   * Applies ops (remote or re-applied local ones) in order. Returns the visible changes as
   * `{index, length, text, index16, length16}` to apply one after another to the old text:
   * remove `length` code points (`length16` UTF-16 units) at `index`, then insert `text`.
   * @throws {OpError} for an op that cannot apply; earlier ops of the array stay applied.
   */
  applyOps(ops) {
    const changes = [];
    for (const op of ops) {
      RgaDoc.validateOp(op);
      if (op.kind === 'ins') this._integrateIns(op.id[0], op.id[1], op.after, op.text, changes);
      else this._integrateDel(op.id[0], op.id[1], op.len, changes);
    }
    return changes;
  }

  // --- local edits ---------------------------------------------------------------------

  /**
   * Inserts `text` at code point position `pos`. Returns the op to send (or null for an
   * empty text). Every character gets a lamport above any seen so far.
   */
  localInsert(pos, text) {
    if (this.replica === null) throw new Error('rga: replica not set yet');
    if (pos < 0 || pos > this.length) throw new RangeError(`insert position ${pos} out of range`);
    if (text.length === 0) return null;
    const after = pos === 0 ? null : this.idAt(pos - 1);
    const op = { kind: 'ins', id: [this.maxLamport + 1, this.replica], after, text };
    this._integrateIns(op.id[0], op.id[1], after, text, null);
    return op;
  }

  /** Deletes `len` code points at `pos`. Returns the del ops to send (possibly []). */
  localDelete(pos, len) {
    if (pos < 0 || len < 0 || pos + len > this.length) throw new RangeError(`delete ${pos}+${len} out of range`);
    const ranges = [];
    let left = len;
    if (left > 0) {
      let [r, off] = this._locate(pos);
      while (left > 0) {
        if (r.text !== null) {
          const m = Math.min(r.len - off, left);
          const last = ranges[ranges.length - 1];
          if (last && last.id[1] === r.replica && last.id[0] + last.len === r.lamport + off) last.len += m;
          else ranges.push({ kind: 'del', id: [r.lamport + off, r.replica], len: m });
          left -= m;
        }
        off = 0;
        r = this._next(r);
      }
    }
    for (const op of ranges) this._integrateDel(op.id[0], op.id[1], op.len, null);
    return ranges;
  }

  // --- snapshots -----------------------------------------------------------------------

  /** Replaces the content with a snapshot's runs (`hello_ack.snapshot.runs`). */
  loadSnapshot(runs) {
    this._reset();
    let chunk = this.chunks[0];
    let last = null;
    for (const s of runs) {
      if (!s || !isId(s.id)) throw new OpError('bad_message', 'bad snapshot run');
      let run;
      if (typeof s.text === 'string') {
        const n = cpLength(s.text);
        if (n === 0) throw new OpError('bad_message', 'empty snapshot run');
        run = new Run(s.id[0], s.id[1], n, s.text, s.text.length);
      } else {
        if (!Number.isSafeInteger(s.deleted) || s.deleted < 1) throw new OpError('bad_message', 'bad snapshot run');
        run = new Run(s.id[0], s.id[1], s.deleted, null, 0);
      }
      this.nItems += run.len;
      if (run.lamport + run.len - 1 > this.maxLamport) this.maxLamport = run.lamport + run.len - 1;
      if (last && last.replica === run.replica && last.lamport + last.len === run.lamport &&
          (last.text === null) === (run.text === null)) {
        last.len += run.len;
        if (run.text !== null) { last.text += run.text; last.u16 += run.u16; chunk.vis += run.len; chunk.vis16 += run.u16; }
        continue;
      }
      if (chunk.runs.length >= CHUNK_MAX / 2) {
        chunk = new Chunk();
        chunk.idx = this.chunks.length;
        this.chunks.push(chunk);
      }
      this._indexAdd(run);
      this._chunkInsert(chunk, chunk.runs.length, run);
      last = run;
    }
  }

  /** The content as snapshot runs, tombstones included, in document order. */
  toSnapshot() {
    const runs = [];
    for (const c of this.chunks) {
      for (const r of c.runs) {
        runs.push(r.text === null ? { id: [r.lamport, r.replica], deleted: r.len } : { id: [r.lamport, r.replica], text: r.text });
      }
    }
    return { runs };
  }

  /** Number of runs (for tests and statistics). */
  get nRuns() {
    let n = 0;
    for (const c of this.chunks) n += c.runs.length;
    return n;
  }

  /** Walks the whole structure and throws on a broken invariant (tests only: O(n)). */
  check() {
    let items = 0;
    for (let ci = 0; ci < this.chunks.length; ci++) {
      const c = this.chunks[ci];
      if (c.idx !== ci) throw new Error('check: chunk idx');
      let vis = 0;
      let vis16 = 0;
      for (const r of c.runs) {
        if (r.chunk !== c) throw new Error('check: run chunk');
        if (r.len < 1) throw new Error('check: empty run');
        if (r.text !== null) {
          if (cpLength(r.text) !== r.len || r.text.length !== r.u16) throw new Error('check: run text length');
          vis += r.len;
          vis16 += r.u16;
        } else if (r.u16 !== 0) throw new Error('check: tombstone u16');
        if (this._find(r.lamport, r.replica) !== r || this._find(r.lamport + r.len - 1, r.replica) !== r) {
          throw new Error('check: id index');
        }
        items += r.len;
      }
      if (vis !== c.vis || vis16 !== c.vis16) throw new Error('check: chunk caches');
    }
    let indexed = 0;
    for (const idx of this.byReplica.values()) {
      const arr = idx.blocks.flat();
      for (let i = 0; i < arr.length; i++) {
        indexed += arr[i].len;
        if (i > 0 && arr[i - 1].lamport + arr[i - 1].len > arr[i].lamport) throw new Error('check: index order');
      }
    }
    if (items !== this.nItems || indexed !== items) throw new Error('check: item count');
  }
}

// ---------------------------------------------------------------------------------------
// Ops to messages
// ---------------------------------------------------------------------------------------

/** Ops per `op` message; the contract allows 10,000. */
const OPS_PER_MESSAGE_MAX = 1000;
/** Code points per `ins` op; keeps every message far below the 64 KiB minimum limit. */
const INS_TEXT_MAX = 8192;
/** Approximate JSON bytes per message before starting a new one. */
const MESSAGE_BYTES_MAX = 48 * 1024;

/** Appends `op` to `ops`, merging it into the last op when it continues it. */
function pushCoalesced(ops, op) {
  const last = ops[ops.length - 1];
  if (last && last.kind === 'ins' && op.kind === 'ins' && last.id[1] === op.id[1] && op.after) {
    const n = cpLength(last.text);
    if (last.id[0] + n === op.id[0] && op.after[0] === op.id[0] - 1 && op.after[1] === op.id[1] &&
        n + op.text.length < INS_TEXT_MAX) {
      last.text += op.text;
      return;
    }
  }
  if (last && last.kind === 'del' && op.kind === 'del' && last.id[1] === op.id[1]) {
    if (last.id[0] + last.len === op.id[0]) { last.len += op.len; return; }
    if (op.id[0] + op.len === last.id[0]) { last.id = [op.id[0], op.id[1]]; last.len += op.len; return; }
  }
  ops.push(op);
}

/** Splits an `ins` op with a long text into a chain of ops that each stay small. */
function splitLongInsert(op) {
  const chars = Array.from(op.text);
  if (chars.length <= INS_TEXT_MAX) return [op];
  const out = [];
  let after = op.after;
  for (let i = 0; i < chars.length; i += INS_TEXT_MAX) {
    const id = [op.id[0] + i, op.id[1]];
    const text = chars.slice(i, i + INS_TEXT_MAX).join('');
    out.push({ kind: 'ins', id, after, text });
    after = [id[0] + cpLength(text) - 1, id[1]];
  }
  return out;
}

/** Groups ops into message-sized batches. */
function batchOps(ops) {
  const batches = [];
  let cur = [];
  let bytes = 0;
  for (const big of ops) {
    for (const op of big.kind === 'ins' ? splitLongInsert(big) : [big]) {
      const size = 64 + (op.kind === 'ins' ? op.text.length * 3 : 0);
      if (cur.length && (cur.length >= OPS_PER_MESSAGE_MAX || bytes + size > MESSAGE_BYTES_MAX)) {
        batches.push(cur);
        cur = [];
        bytes = 0;
      }
      cur.push(op);
      bytes += size;
    }
  }
  if (cur.length) batches.push(cur);
  return batches;
}

// ---------------------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------------------

/**
 * Acknowledged messages kept by default for the lost-history rule (docs/protocol.md, "Lost
 * history"); the `historyMax` option changes it. A keystroke message costs a few hundred bytes.
 */
const HISTORY_MAX_DEFAULT = 100000;

/** Error codes after which a refused `op` stays pending and is sent again after a reconnect. */
const RETRY_CODES = new Set(['rate_limited', 'overloaded', 'unavailable']);

/**
 * The server's rate-limit cost of an `op` message (docs/protocol.md, "Rate limits"): 1 plus 1
 * per 100 items, one item per op and, for a `del`, its `len` up to 100,000.
 */
export function opMessageCost(ops) {
  let items = 0;
  for (const op of ops) items += op.kind === 'del' ? 1 + Math.min(op.len, 100000) : 1;
  return 1 + Math.floor(items / 100);
}

/** A tiny event emitter: `on(type, fn)` returns a function that unsubscribes. */
class Emitter {
  constructor() { this._handlers = new Map(); }
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) { this._handlers.get(type)?.delete(fn); }
  emit(type, ev) {
    const hs = this._handlers.get(type);
    if (!hs) return;
    for (const fn of [...hs]) {
      try { fn(ev); } catch (e) { if (type !== 'error') this.emit('error', { code: 'handler', message: String(e && e.stack || e) }); }
    }
  }
}

/** Builds the WebSocket URL for `doc` from a base such as `ws://host:8000` or `ws://host/ws`. */
export function docUrl(base, doc) {
  let b = String(base).replace(/\/+$/, '');
  if (!/\/ws$/.test(b)) b += '/ws';
  return `${b}/${encodeURIComponent(doc)}`;
}

/**
 * A live replica of one document on a collab-engine server.
 *
 * Events (`client.on(type, fn)`):
 * - `change` `{index, length, text, index16, length16, remote, reset?}` for every edit: remote
 *   ones (`remote: true`; `reset: true` when a snapshot replaced the whole text) and local
 *   ones made through this API (`remote: false`).
 * - `presence` `{replica, state}`; `state` null when that replica left.
 * - `status` `{status, pending, reason?}`, status one of `connecting`, `online`, `saved`,
 *   `offline`, `denied` (terminal: the server refused the token; `reason` says why).
 * - `error` `{code, message, client_seq?}`.
 * - `auth` `{exp, role}` when the server accepted a refreshed token (`auth_ack`).
 */
export class CollabClient extends Emitter {
  /**
   * @param {object} opts
   * @param {string} opts.url  server base, e.g. `ws://127.0.0.1:8000` (or `.../ws`)
   * @param {string} opts.doc  document name
   * @param {Function} [opts.WebSocket]  constructor; defaults to `globalThis.WebSocket`
   * @param {number} [opts.replica]  reuse a replica id (else the server assigns one)
   * @param {string|Function} [opts.token]  sent as `hello.token` when the server requires
   *   auth: a string, or a function returning a token or a promise of one, called before
   *   every connection and again shortly before the token's `exp` to refresh it in place
   * @param {number} [opts.refreshBeforeMs=60000]  how long before `exp` a token function is
   *   called to refresh (at most half the token's remaining lifetime)
   * @param {object} [opts.presence]  initial presence state
   * @param {number} [opts.flushDelayMs=16]  edits made within this time go in one message
   * @param {number} [opts.backoffMinMs=250]  first reconnect delay
   * @param {number} [opts.backoffMaxMs=5000]  reconnect delay cap
   * @param {boolean} [opts.autoConnect=true]  connect in the constructor
   * @param {number} [opts.sendRate=1000]  `op` message cost (see `opMessageCost`) sent per
   *   second at most once `sendBurst` is spent; half the server's default rate limit, so that
   *   a resend of many messages after a reconnect is not refused as `rate_limited`
   * @param {number} [opts.sendBurst=2000]  cost sent at once on a new connection
   * @param {number} [opts.historyMax=100000]  acknowledged messages kept to send again if the
   *   server loses history (docs/protocol.md, "Lost history"); older ones are forgotten
   */
  constructor(opts) {
    super();
    if (!opts || typeof opts.doc !== 'string' || !opts.doc) throw new TypeError('CollabClient: doc is required');
    if (new TextEncoder().encode(opts.doc).length > 512) throw new RangeError('CollabClient: doc names are at most 512 bytes of UTF-8');
    this.url = docUrl(opts.url, opts.doc);
    this.docName = opts.doc;
    if (opts.token != null && typeof opts.token !== 'string' && typeof opts.token !== 'function') {
      throw new TypeError('CollabClient: token must be a string or a function');
    }
    /** The token option: a string, a function that yields one, or null. */
    this.token = opts.token ?? null;
    this.refreshBeforeMs = opts.refreshBeforeMs ?? 60000;
    /** The token sent last (the string itself, or what the token function gave). */
    this._currentToken = null;
    /** Counts `_open` calls, so that a token that arrives late for an older attempt is dropped. */
    this._openGen = 0;
    /** Timer for the next token refresh (only with a token function and an `exp`). */
    this._refreshTimer = null;
    /** What the server says we may do: `read`, `write` or `admin` (`write` without auth). */
    this.role = 'write';
    /** The token's user (`sub`) and expiry (unix seconds), when the server checks tokens. */
    this.user = null;
    this.exp = null;
    /** Why the server refused us (set with status `denied`, cleared by `connect()`). */
    this.deniedReason = null;
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError('CollabClient: no WebSocket; pass opts.WebSocket');
    this.flushDelayMs = opts.flushDelayMs ?? 16;
    this.backoffMinMs = opts.backoffMinMs ?? 250;
    this.backoffMaxMs = opts.backoffMaxMs ?? 5000;
    this.historyMax = opts.historyMax ?? HISTORY_MAX_DEFAULT;
    this.sendRate = opts.sendRate ?? 1000;
    this.sendBurst = opts.sendBurst ?? 2000;
    if (!(this.sendRate > 0) || !(this.sendBurst >= 1)) throw new RangeError('CollabClient: sendRate must be > 0 and sendBurst >= 1');
    /** `op` messages waiting for send budget, and the budget (a token bucket per connection). */
    this._opQueue = [];
    this._opQueueHead = 0;
    this._sendTokens = 0;
    this._sendTokensAt = 0;
    this._pumpTimer = null;
    if (!Number.isSafeInteger(this.historyMax) || this.historyMax < 0) throw new RangeError('CollabClient: historyMax must be an integer >= 0');
    this.doc = new RgaDoc(opts.replica ?? null);
    /** Old id -> new id of the edits last re-issued with a new replica (see resolveId). */
    this._remap = null;
    /** Last server_seq applied, and the epoch it belongs to (null before the first join). */
    this.since = null;
    this.epoch = null;
    /** Head announced by the last hello_ack. */
    this.head = 0;
    /** Local ops not yet in a message. */
    this._outbox = [];
    /** Sent (or to be sent) messages awaiting their echo or ack, in client_seq order. */
    this._unacked = [];
    /**
     * Our latest acknowledged messages, sent again if the server loses history: the live ones
     * are `_acked[_ackedHead..]`, at most `historyMax` of them (older slots hold undefined).
     */
    this._acked = [];
    this._ackedHead = 0;
    this._nextSeq = 0;
    this._ws = null;
    this._joined = false;
    this._everJoined = false;
    this._attempt = 0;
    this._timer = null;
    this._flushTimer = null;
    this._presenceTimer = null;
    this._closed = true;
    this._resync = false;
    this._status = 'offline';
    this._presenceState = opts.presence ?? null;
    this._presenceDirty = this._presenceState !== null;
    /** replica -> presence state of the other connected replicas. */
    this.peers = new Map();
    /**
     * replica -> `{user, name}` the server attached to their presence (from their tokens;
     * trust these over a name in the presence state, which the peer chose itself).
     */
    this.peerUsers = new Map();
    // In a browser, retry at once when the network comes back instead of waiting out the backoff.
    this._onNetworkOnline = () => {
      if (!this._closed && this._ws === null && this._timer !== null) {
        clearTimeout(this._timer);
        this._timer = null;
        this._open();
      }
    };
    if (opts.autoConnect !== false) this.connect();
  }

  /** This client's replica id (null until the first `hello_ack`). */
  get replica() { return this.doc.replica; }
  /** Connection status: `connecting`, `online`, `saved`, `offline` or `denied`. */
  get status() { return this._status; }
  /** Whether local edits are refused: the server gave a `read` role, or refused the token. */
  get readOnly() { return this.role === 'read' || this.deniedReason !== null; }
  /** Whether the first `hello_ack` arrived, so local edits are possible. */
  get ready() { return this._everJoined; }
  /** Number of local ops not yet acknowledged by the server. */
  get pending() {
    let n = this._outbox.length;
    for (const m of this._unacked) n += m.ops.length;
    return n;
  }
  /** The document text. */
  text() { return this.doc.text(); }

  /**
   * Replaces the token option (a string or a function) for the next connection; use it with
   * `connect()` after a `denied` status.
   */
  setToken(token) {
    if (token != null && typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('CollabClient: token must be a string or a function');
    }
    this.token = token ?? null;
  }

  /** Opens the connection (again, after `close()` or a `denied` status). */
  connect() {
    this._closed = false;
    this.deniedReason = null;
    globalThis.addEventListener?.('online', this._onNetworkOnline);
    this._open();
  }

  /** Closes the connection and stops reconnecting. Pending edits stay queued. */
  close() {
    this._closed = true;
    globalThis.removeEventListener?.('online', this._onNetworkOnline);
    clearTimeout(this._timer);
    this._timer = null;
    this._flushNow();
    if (this._ws) {
      const ws = this._ws;
      this._detach();
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this._joined = false;
    this._setStatus('offline');
  }

  /** Resolves when every local edit is acknowledged and the connection is up. */
  whenSaved() {
    if (this._status === 'saved') return Promise.resolve();
    return new Promise((resolve) => {
      const off = this.on('status', (s) => { if (s.status === 'saved') { off(); resolve(); } });
    });
  }

  // --- local edits ---------------------------------------------------------------------

  /** Inserts `text` at code point position `pos`. */
  insert(pos, text) {
    this.replace(pos, 0, text);
  }

  /** Deletes `len` code points at position `pos`. */
  delete(pos, len) {
    this.replace(pos, len, '');
  }

  /**
   * Replaces `len` code points at `pos` with `text`. Emits one `change` with `remote: false`
   * (so that views other than the one that made the edit can follow).
   */
  replace(pos, len, text) {
    this._needReady();
    if (this.readOnly) {
      throw new Error(this.deniedReason !== null ? `CollabClient: access denied: ${this.deniedReason}` : 'CollabClient: read-only (the token allows reading only)');
    }
    const doc = this.doc;
    const index16 = doc.cpToUtf16(pos);
    const length16 = len ? doc.cpToUtf16(pos + len) - index16 : 0;
    const ops = doc.localDelete(pos, len);
    const ins = doc.localInsert(pos, text);
    if (ins) ops.push(ins);
    if (!ops.length) return;
    this._queue(ops);
    this.emit('change', { index: pos, length: len, text, index16, length16, remote: false });
  }

  _needReady() {
    if (!this._everJoined) throw new Error('CollabClient: not joined yet (wait for status online/saved)');
  }

  _queue(ops) {
    for (const op of ops) pushCoalesced(this._outbox, op);
    this._setStatus(this._joined ? 'online' : this._status);
    if (this._flushTimer === null) {
      this._flushTimer = setTimeout(() => { this._flushTimer = null; this._flushNow(); }, this.flushDelayMs);
    }
  }

  /** Turns the outbox into messages now (sending them when joined). */
  flush() { this._flushNow(); }

  _flushNow() {
    if (this._flushTimer !== null) { clearTimeout(this._flushTimer); this._flushTimer = null; }
    if (!this._outbox.length) return;
    const batches = batchOps(this._outbox);
    this._outbox = [];
    for (const ops of batches) {
      const msg = { client_seq: this._nextSeq++, ops };
      this._unacked.push(msg);
      if (this._joined) this._sendOp(msg);
    }
  }

  // --- presence ------------------------------------------------------------------------

  /** Sets this client's presence state (any JSON; sent at most once per flush delay). */
  setPresence(state) {
    this._presenceState = state;
    this._presenceDirty = true;
    if (this._presenceTimer === null) {
      this._presenceTimer = setTimeout(() => { this._presenceTimer = null; this._sendPresence(); }, Math.max(this.flushDelayMs, 30));
    }
  }

  _sendPresence() {
    if (!this._joined || !this._presenceDirty) return;
    // Send edits first so that ids named in the presence state are known to the peers
    // (edits waiting for send budget first too: `_pumpOps` sends the presence after them).
    this._flushNow();
    if (this._opQueue.length > this._opQueueHead || !this._presenceDirty) return;
    this._presenceDirty = false;
    this._send({ type: 'presence', state: this._presenceState });
  }

  // --- socket --------------------------------------------------------------------------

  _setStatus(s) {
    // Denied is terminal until connect() clears it.
    if (this.deniedReason !== null && s !== 'denied') return;
    let status = s;
    if ((s === 'online' || s === 'saved') && this._joined) status = this.pending ? 'online' : 'saved';
    if (status === this._status) return;
    this._status = status;
    const ev = { status, pending: this.pending };
    if (status === 'denied') ev.reason = this.deniedReason;
    this.emit('status', ev);
  }

  /**
   * The server refused our token: stop for good (no reconnect loop, a new token would be
   * refused the same way until the application supplies another one and calls `connect()`).
   */
  _deny(reason) {
    this.deniedReason = reason || 'unauthorized';
    this._closed = true;
    globalThis.removeEventListener?.('online', this._onNetworkOnline);
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    if (ws) {
      this._detach();
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this._joined = false;
    this._setStatus('denied');
  }

  _open() {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._closed) return;
    this._joined = false;
    this._setStatus('connecting');
    const gen = ++this._openGen;
    if (typeof this.token === 'function') {
      // Ask for a fresh token before every connection: the last one may have expired.
      let pending;
      try { pending = Promise.resolve(this.token()); } catch (e) { pending = Promise.reject(e); }
      pending.then((token) => {
        if (gen !== this._openGen || this._closed || this._ws !== null) return;
        if (typeof token !== 'string') throw new TypeError('the token function gave no string');
        this._currentToken = token;
        this._openSocket();
      }).catch((e) => {
        if (gen !== this._openGen || this._closed) return;
        this.emit('error', { code: 'token', message: `could not get a token: ${e && e.message || e}` });
        this._setStatus('offline');
        this._scheduleReconnect();
      });
      return;
    }
    this._currentToken = this.token;
    this._openSocket();
  }

  _openSocket() {
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (e) {
      this.emit('error', { code: 'connect', message: String(e) });
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      const hello = { type: 'hello', doc: this.docName };
      if (this.doc.replica !== null) hello.replica = this.doc.replica;
      if (this._currentToken !== null) hello.token = this._currentToken;
      if (this.since !== null && !this._resync) { hello.since = this.since; hello.epoch = this.epoch; }
      this._sendTokens = this.sendBurst;
      this._sendTokensAt = Date.now();
      this._send(hello);
    };
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data));
      } catch {
        this.emit('error', { code: 'bad_message', message: 'unparsable message from server' });
        return;
      }
      try {
        this._onMessage(msg);
      } catch (e) {
        this.emit('error', { code: e.code || 'client', message: String(e && e.message || e) });
        // A missed echo is repaired by a replay; anything else our replica refused that the
        // server accepted, by starting over from a snapshot.
        if (e.code !== 'gap') this._resync = true;
        this._dropSocket();
      }
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._detach();
      this._joined = false;
      const reason = (ev && ev.reason) || '';
      if (ev && ev.code === 1008 && (/unauthorized|revoked/.test(reason) || (/token expired/.test(reason) && typeof this.token !== 'function'))) {
        // Refused or revoked (an expired token is only final when we cannot get another one).
        this._deny(reason);
        return;
      }
      if (ev && ev.code === 1008 && /replaced/.test(reason)) {
        // Another connection took over our replica: reconnecting would steal it back.
        this._closed = true;
        this.emit('error', { code: 'replaced', message: 'another connection took over this replica' });
        this._setStatus('offline');
        return;
      }
      this._setStatus('offline');
      this._scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  _detach() {
    const ws = this._ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onerror = null;
    ws.onclose = null;
    this._ws = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    // Every pending message is sent again after the next hello_ack.
    this._opQueue = [];
    this._opQueueHead = 0;
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    // Offline we do not know who is there; the next hello_ack says.
    this.peerUsers.clear();
    if (this.peers.size) {
      this.peers.clear();
      this.emit('presence', { replica: null, state: null, reset: true });
    }
  }

  /** Closes the socket and reconnects: at once, or after the backoff delay with `backoff`. */
  _dropSocket({ backoff = false } = {}) {
    const ws = this._ws;
    if (!ws) return;
    this._detach();
    this._joined = false;
    try { ws.close(1000); } catch { /* ignore */ }
    this._setStatus('offline');
    this._scheduleReconnect(backoff ? undefined : 0);
  }

  /** Sends an `op` message when the send budget allows, else queues it (order kept). */
  _sendOp(m) {
    this._opQueue.push(m);
    if (this._opQueue.length - this._opQueueHead === 1) this._pumpOps();
  }

  _pumpOps() {
    this._pumpTimer = null;
    if (!this._joined) return;
    const now = Date.now();
    this._sendTokens = Math.min(this.sendBurst, this._sendTokens + (now - this._sendTokensAt) * this.sendRate / 1000);
    this._sendTokensAt = now;
    while (this._opQueueHead < this._opQueue.length) {
      const m = this._opQueue[this._opQueueHead];
      // Like the server: a cost above the burst needs a full bucket, no more.
      const cost = Math.min(opMessageCost(m.ops), this.sendBurst);
      if (this._sendTokens < cost) {
        const waitMs = Math.ceil((cost - this._sendTokens) * 1000 / this.sendRate);
        this._pumpTimer = setTimeout(() => this._pumpOps(), waitMs);
        return;
      }
      this._sendTokens -= cost;
      this._opQueue[this._opQueueHead++] = undefined;
      this._send({ type: 'op', client_seq: m.client_seq, ops: m.ops });
    }
    this._opQueue = [];
    this._opQueueHead = 0;
    if (this._presenceDirty) this._sendPresence();
  }

  _scheduleReconnect(delayMs) {
    if (this._closed || this._timer !== null) return;
    // Exponential backoff with jitter: uniform in [cap/2, cap].
    const cap = Math.min(this.backoffMaxMs, this.backoffMinMs * 2 ** Math.min(this._attempt, 16));
    const delay = delayMs ?? cap / 2 + Math.random() * cap / 2;
    this._attempt++;
    this._timer = setTimeout(() => { this._timer = null; this._open(); }, delay);
  }

  _send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  _emitChanges(changes) {
    for (const c of changes) this.emit('change', { ...c, remote: true });
  }

  _onMessage(msg) {
    switch (msg.type) {
      case 'hello_ack': this._onHelloAck(msg); break;
      case 'op_echo': this._onEcho(msg); this._setStatus('online'); break;
      case 'ack': this._ackSeq(msg.client_seq); this._setStatus('online'); break;
      case 'presence': this._onPresence(msg); break;
      case 'error': this._onError(msg); break;
      case 'auth_ack': this._onAuthAck(msg); break;
      default: break; // Unknown types are additions a newer server may send.
    }
  }

  _ackSeq(seq) {
    const i = this._unacked.findIndex((m) => m.client_seq === seq);
    if (i < 0) return;
    this._keepAcked(this._unacked[i]);
    this._unacked.splice(i, 1);
  }

  /** Keeps an acknowledged message, forgetting the oldest past `historyMax` (O(1) amortised). */
  _keepAcked(m) {
    if (this.historyMax === 0) return;
    this._acked.push(m);
    if (this._acked.length - this._ackedHead > this.historyMax) this._acked[this._ackedHead++] = undefined;
    if (this._ackedHead > 1024 && this._ackedHead * 2 > this._acked.length) {
      this._acked = this._acked.slice(this._ackedHead);
      this._ackedHead = 0;
    }
  }

  /** The kept acknowledged messages, oldest first, and forgets them. */
  _takeAcked() {
    const kept = this._acked.slice(this._ackedHead);
    this._acked = [];
    this._ackedHead = 0;
    return kept;
  }

  _onEcho(e) {
    if (e.replica === this.doc.replica) this._ackSeq(e.client_seq);
    if (this.since !== null && e.server_seq <= this.since) return;
    if (this.since !== null && e.server_seq > this.since + 1) {
      // A gap: we missed echoes. Reconnect; the server replays from `since`.
      throw new OpError('gap', `echo ${e.server_seq} after ${this.since}`);
    }
    this._emitChanges(this.doc.applyOps(e.ops));
    this.since = e.server_seq;
  }

  _onPresence(msg) {
    const { replica, state } = msg;
    if (replica === this.doc.replica) return;
    if (state === null || state === undefined) {
      this.peers.delete(replica);
      this.peerUsers.delete(replica);
    } else {
      this.peers.set(replica, state);
      this._notePeerUser(msg);
    }
    this.emit('presence', { replica, state: state ?? null });
  }

  /** Keeps the user and name the server vouches for (from the token, when auth is on). */
  _notePeerUser(entry) {
    if (typeof entry.user !== 'string') return;
    this.peerUsers.set(entry.replica, { user: entry.user, name: typeof entry.name === 'string' ? entry.name : null });
  }

  _onError(msg) {
    this.emit('error', { code: msg.code, message: msg.message, client_seq: msg.client_seq });
    if (msg.code === 'unauthorized') {
      // Terminal: the server closes with 1008 next; reconnecting would be refused again.
      this._deny(typeof msg.message === 'string' && msg.message ? msg.message : 'unauthorized');
      return;
    }
    if (RETRY_CODES.has(msg.code) && typeof msg.client_seq === 'number' && this._unacked.some((m) => m.client_seq === msg.client_seq)) {
      // Not refused for what it is: keep it pending and send it again after a reconnect,
      // after the backoff delay (the messages sent after it are refused the same way).
      this._attempt = Math.max(this._attempt, 1);
      this._dropSocket({ backoff: true });
      return;
    }
    if (typeof msg.client_seq === 'number' && this._unacked.some((m) => m.client_seq === msg.client_seq)) {
      // The server refused one of our edits, so our replica holds text nobody else has.
      // Forget that edit (it is not kept as acknowledged either: a loss of history must not
      // send it again) and reload the document; the other pending edits are resent.
      this._unacked = this._unacked.filter((m) => m.client_seq !== msg.client_seq);
      this._resync = true;
      this._dropSocket();
    }
  }

  _onHelloAck(ack) {
    const firstJoin = !this._everJoined;
    let reissue = false;
    if (this.doc.replica === null) this.doc.replica = ack.replica;
    else if (ack.replica !== this.doc.replica) {
      // The server gave us another replica: our unacked ops can no longer be resent as-is.
      this.doc.replica = ack.replica;
      reissue = true;
    }
    const lostHistory = this.epoch !== null && (ack.epoch !== this.epoch || (this.since !== null && ack.head < this.since));
    this._flushNow();
    if (ack.strategy === 'replay') {
      for (const e of ack.ops || []) this._onEcho(e);
    } else {
      const oldLen = this.doc.length;
      const oldLen16 = this.doc.length16;
      const pending = this._unacked;
      this.doc.loadSnapshot((ack.snapshot && ack.snapshot.runs) || []);
      if (reissue) {
        // Our replica changed: the old ids cannot be sent under the new one, so our edits the
        // snapshot lacks (acknowledged ones too when history was lost) become new edits with
        // fresh ids.
        this._unacked = [];
        const acked = this._takeAcked();
        this._reissue(lostHistory ? acked.concat(pending) : pending);
      } else if (lostHistory) {
        // The server lacks history we saw: the lost-history rule, original ids and client_seq.
        this._remap = null;
        this._resendLost(pending);
      } else {
        // Re-apply pending edits; the server will integrate their resends idempotently.
        for (const m of pending) {
          try { this.doc.applyOps(m.ops); } catch { /* the server will refuse it too */ }
        }
      }
      this.since = ack.head;
      if (!firstJoin || this.doc.length) {
        this.emit('change', { index: 0, length: oldLen, text: this.doc.text(), index16: 0, length16: oldLen16, remote: true, reset: true });
      }
    }
    this._resync = false;
    this.role = typeof ack.role === 'string' ? ack.role : 'write';
    this.user = typeof ack.user === 'string' ? ack.user : null;
    this.exp = Number.isFinite(ack.exp) ? ack.exp : null;
    this.epoch = ack.epoch;
    this.head = ack.head;
    this._joined = true;
    this._everJoined = true;
    this._attempt = 0;
    this.peers.clear();
    this.peerUsers.clear();
    for (const p of ack.presence || []) {
      if (p.replica !== this.doc.replica && p.state != null) {
        this.peers.set(p.replica, p.state);
        this._notePeerUser(p);
      }
    }
    this.emit('presence', { replica: null, state: null, reset: true });
    for (const m of this._unacked) this._sendOp(m);
    this._flushNow();
    if (this._presenceState !== null) { this._presenceDirty = true; this._sendPresence(); }
    this._setStatus('online');
    this._scheduleRefresh();
  }

  _onAuthAck(msg) {
    if (Number.isFinite(msg.exp)) this.exp = msg.exp;
    // A refreshed token may carry another role; a server that says so is believed at once
    // (one that does not refuses the next edit with `forbidden`, and the rejoin tells).
    if (typeof msg.role === 'string') this.role = msg.role;
    this.emit('auth', { exp: this.exp, role: this.role });
    this._scheduleRefresh();
  }

  /** With a token function and a token that expires: refresh it in place before `exp`. */
  _scheduleRefresh(delayMs) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this.token !== 'function' || this.exp === null || !this._joined) return;
    const leftMs = this.exp * 1000 - Date.now();
    if (leftMs <= 0) return; // The server closes with `token expired`; the reconnect asks anew.
    const delay = delayMs ?? Math.max(0, leftMs - Math.min(this.refreshBeforeMs, leftMs / 2));
    // setTimeout's delay is a signed 32-bit count of milliseconds.
    this._refreshTimer = setTimeout(() => { this._refreshTimer = null; this._refresh(); }, Math.min(delay, 2 ** 31 - 1));
  }

  _refresh() {
    const ws = this._ws;
    let pending;
    try { pending = Promise.resolve(this.token()); } catch (e) { pending = Promise.reject(e); }
    pending.then((token) => {
      if (this._ws !== ws || !this._joined) return; // A reconnect asks for its own token.
      if (typeof token !== 'string') throw new TypeError('the token function gave no string');
      this._currentToken = token;
      this._send({ type: 'auth', token });
    }).catch((e) => {
      if (this._ws !== ws) return;
      this.emit('error', { code: 'token', message: `could not refresh the token: ${e && e.message || e}` });
      // Try again a little later while the token still lives.
      if (this.exp !== null && this.exp * 1000 - Date.now() > 2000) this._scheduleRefresh(1000);
    });
  }

  /**
   * The id an item has now: the same id, unless the item was re-issued with a fresh id because
   * the server gave this client another replica (then the new one). For anchors kept across a
   * `reset` change; after a loss of history our edits keep their ids, so this is the identity.
   */
  resolveId(id) {
    if (!id || !this._remap) return id;
    return this._remap.get(`${id[0]},${id[1]}`) || id;
  }

  /**
   * The lost-history rule (docs/protocol.md, "Lost history"), on the snapshot just loaded: our
   * messages, the kept acknowledged ones and `pending`, in client_seq order, are applied again
   * op by op with their original ids. An op that changes the document is kept; one that changes
   * nothing (the server kept it, or deletes tombstones) or cannot apply (its target is another
   * client's edit the server lost) is dropped. Every message that kept an op becomes pending
   * again with only those ops and its original client_seq, to be sent before any newer edit;
   * the others are forgotten.
   */
  _resendLost(pending) {
    const own = this._takeAcked().concat(pending);
    own.sort((x, y) => x.client_seq - y.client_seq);
    const kept = [];
    for (const m of own) {
      const ops = [];
      for (const op of m.ops) {
        let changes;
        try {
          changes = this.doc.applyOps([op]);
        } catch {
          continue; // Its target is not in the snapshot (applyOps changed nothing).
        }
        if (changes.length) ops.push(op);
      }
      if (ops.length) kept.push({ client_seq: m.client_seq, ops });
    }
    this._unacked = kept;
  }

  /** Re-creates local edits with fresh ids of a new replica on the current document. */
  _reissue(messages) {
    const remap = new Map();
    this._remap = remap;
    const key = (id) => `${id[0]},${id[1]}`;
    const ops = [];
    for (const m of messages) {
      for (const op of m.ops) {
        if (op.kind === 'ins') {
          if (this.doc.has(op.id)) continue; // The server kept this one.
          let after = op.after;
          if (after && remap.has(key(after))) after = remap.get(key(after));
          if (after && !this.doc.has(after)) continue;
          const chars = Array.from(op.text);
          const id = [this.doc.maxLamport + 1, this.doc.replica];
          const nop = { kind: 'ins', id, after, text: op.text };
          this.doc.applyOps([nop]);
          for (let i = 0; i < chars.length; i++) remap.set(key([op.id[0] + i, op.id[1]]), [id[0] + i, id[1]]);
          ops.push(nop);
        } else {
          for (let i = 0; i < op.len; i++) {
            let id = [op.id[0] + i, op.id[1]];
            if (remap.has(key(id))) id = remap.get(key(id));
            if (!this.doc.isVisible(id)) continue;
            const d = { kind: 'del', id, len: 1 };
            this.doc.applyOps([d]);
            pushCoalesced(ops, d);
          }
        }
      }
    }
    for (const op of ops) pushCoalesced(this._outbox, op);
  }
}

// ---------------------------------------------------------------------------------------
// <textarea> binding
// ---------------------------------------------------------------------------------------

function isHigh(c) { return c >= 0xd800 && c <= 0xdbff; }
function isLow(c) { return c >= 0xdc00 && c <= 0xdfff; }

/**
 * Computes the edit that turns `a` into `b` as `[start, removed, inserted]` in UTF-16 units,
 * placing it so that it ends at `caret` (the caret after the edit) when that is possible.
 */
export function diffAroundCaret(a, b, caret = b.length) {
  let suffix = 0;
  const suffixMax = Math.min(a.length, b.length, Math.max(0, b.length - caret));
  while (suffix < suffixMax && a.charCodeAt(a.length - 1 - suffix) === b.charCodeAt(b.length - 1 - suffix)) suffix++;
  let prefix = 0;
  const prefixMax = Math.min(a.length, b.length) - suffix;
  while (prefix < prefixMax && a.charCodeAt(prefix) === b.charCodeAt(prefix)) prefix++;
  // Never split a surrogate pair.
  if (prefix > 0 && isHigh(a.charCodeAt(prefix - 1))) prefix--;
  while (suffix > 0 && isLow(a.charCodeAt(a.length - suffix))) suffix--;
  return [prefix, a.length - suffix - prefix, b.slice(prefix, b.length - suffix)];
}

/**
 * Binds a `<textarea>` to a client: user input becomes edits, remote edits are applied
 * without moving the local selection (it is anchored to item ids), and the caret is
 * published as presence `{...presence, anchor, head}` (ids or null).
 */
export class TextareaBinding {
  /**
   * @param {HTMLTextAreaElement} textarea
   * @param {CollabClient} client
   * @param {object} [opts]
   * @param {object} [opts.presence]  extra presence fields (name, color)
   */
  constructor(textarea, client, opts = {}) {
    this.ta = textarea;
    this.client = client;
    this.presence = opts.presence || {};
    this._value = client.text();
    this.ta.value = this._value;
    this.ta.readOnly = !client.ready || client.readOnly;
    this._onInput = () => this._input();
    this._onSelect = () => this._publishCaret();
    this.ta.addEventListener('input', this._onInput);
    this.ta.addEventListener('select', this._onSelect);
    this.ta.addEventListener('keyup', this._onSelect);
    this.ta.addEventListener('mouseup', this._onSelect);
    this.ta.addEventListener('focus', this._onSelect);
    const doc = this.ta.ownerDocument;
    this._onSelChange = () => { if (doc.activeElement === this.ta) this._publishCaret(); };
    doc.addEventListener('selectionchange', this._onSelChange);
    this._offs = [
      client.on('change', (c) => { if (!this._editing) this._change(c); }),
      client.on('status', () => {
        const readOnly = !client.ready || client.readOnly;
        if (readOnly !== this.ta.readOnly) { this.ta.readOnly = readOnly; this._publishCaret(); }
      }),
    ];
    this._publishCaret();
  }

  /** Stops listening. */
  destroy() {
    this.ta.removeEventListener('input', this._onInput);
    this.ta.removeEventListener('select', this._onSelect);
    this.ta.removeEventListener('keyup', this._onSelect);
    this.ta.removeEventListener('mouseup', this._onSelect);
    this.ta.removeEventListener('focus', this._onSelect);
    this.ta.ownerDocument.removeEventListener('selectionchange', this._onSelChange);
    for (const off of this._offs) off();
  }

  /** Changes the extra presence fields (name, colour) and republishes. */
  setPresence(fields) {
    this.presence = fields;
    this._publishCaret();
  }

  _input() {
    const client = this.client;
    const next = this.ta.value;
    if (!client.ready || client.readOnly) { this.ta.value = this._value; return; }
    const [start16, removed16, inserted] = diffAroundCaret(this._value, next, this.ta.selectionEnd);
    const doc = client.doc;
    const start = doc.utf16ToCp(start16);
    const removed = doc.utf16ToCp(start16 + removed16) - start;
    if (removed > 0 || inserted.length > 0) {
      this._editing = true;
      try { client.replace(start, removed, inserted); } finally { this._editing = false; }
    }
    this._value = next;
    this._publishCaret();
  }

  _selectionAnchors() {
    const doc = this.client.doc;
    const s = doc.utf16ToCp(this.ta.selectionStart);
    const e = doc.utf16ToCp(this.ta.selectionEnd);
    const backward = this.ta.selectionDirection === 'backward';
    return { start: doc.anchorAt(s), end: doc.anchorAt(e), backward };
  }

  /** Applies a change made elsewhere (remote, or local through the client API). */
  _change(c) {
    const ta = this.ta;
    if (c.reset) {
      // A snapshot replaced everything: find the selection again by its item ids.
      const dir = ta.selectionDirection;
      const scroll = ta.scrollTop;
      let s = ta.selectionStart;
      let e = ta.selectionEnd;
      ta.value = this.client.text();
      const doc = this.client.doc;
      const resolve = (anchor, old) => {
        const id = this.client.resolveId(anchor);
        if (id && !doc.has(id)) return Math.min(old, ta.value.length); // Lost: stay put.
        return doc.cpToUtf16(doc.positionOfAnchor(id));
      };
      if (this._anchors) {
        s = resolve(this._anchors.start, s);
        e = resolve(this._anchors.end, e);
      }
      this._value = ta.value;
      ta.setSelectionRange(Math.min(s, e), Math.max(s, e), dir);
      ta.scrollTop = scroll;
      // Our caret's ids may have changed (re-issued edits): publish them again.
      this._publishCaret();
      return;
    }
    // Same result as re-resolving the id anchors (the id of the character before each end):
    // ends before the edit stay, ends after it shift, ends inside a removed range collapse to
    // its start. That is what setRangeText's "preserve" mode does; check rather than trust.
    // Nothing here reads layout (scrollTop, sizes): in a long text one layout per frame, not
    // per edit, is what keeps remote typing cheap.
    const end16 = c.index16 + c.length16;
    const shift = c.text.length - c.length16;
    const map = (p) => (p <= c.index16 ? p : p >= end16 ? p + shift : c.index16);
    const s = map(ta.selectionStart);
    const e = map(ta.selectionEnd);
    const dir = ta.selectionDirection;
    ta.setRangeText(c.text, c.index16, end16, 'preserve');
    this._value = ta.value;
    if (ta.selectionStart !== s || ta.selectionEnd !== e) ta.setSelectionRange(s, e, dir);
  }

  _publishCaret() {
    if (!this.client.ready) return;
    if (this.ta.value !== this._value) return; // An input event is on its way.
    const sel = this._selectionAnchors();
    this._anchors = sel;
    const anchor = sel.backward ? sel.end : sel.start;
    const head = sel.backward ? sel.start : sel.end;
    const prev = this._lastCaret;
    const key = JSON.stringify([anchor, head, this.presence]);
    if (prev === key) return;
    this._lastCaret = key;
    this.client.setPresence({ ...this.presence, anchor, head });
  }
}
