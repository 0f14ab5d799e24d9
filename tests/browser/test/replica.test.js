// The JavaScript RGA replica on its own: traces, ordering rules, random concurrent edits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { RgaDoc, cpLength } from '../../../clients/js/collab.js';
import { rng } from '../lib/harness.js';

const DATA = fileURLToPath(new URL('../../data/', import.meta.url));

function loadTrace(name) {
  return JSON.parse(gunzipSync(readFileSync(DATA + name)).toString('utf8'));
}

/** Replays a trace as local edits on one replica and as remote ops on a second one. */
function replayTrace(name) {
  const trace = loadTrace(name);
  const local = new RgaDoc(1);
  const remote = new RgaDoc(2);
  let nOps = 0;
  for (const txn of trace.txns) {
    for (const [pos, del, ins] of txn.patches) {
      const ops = del > 0 ? local.localDelete(pos, del) : [];
      if (ins.length) ops.push(local.localInsert(pos, ins));
      remote.applyOps(ops);
      nOps += ops.length;
    }
  }
  return { trace, local, remote, nOps };
}

for (const name of ['automerge-paper.json.gz', 'seph-blog1.json.gz']) {
  test(`trace ${name} replays to endContent`, () => {
    const t0 = Date.now();
    const { trace, local, remote } = replayTrace(name);
    const ms = Date.now() - t0;
    assert.equal(local.text(), trace.endContent);
    assert.equal(remote.text(), trace.endContent);
    assert.equal(local.length, cpLength(trace.endContent));
    local.check();
    remote.check();
    // A snapshot round trip keeps text and tombstones.
    const copy = new RgaDoc(3);
    copy.loadSnapshot(local.toSnapshot().runs);
    copy.check();
    assert.equal(copy.text(), trace.endContent);
    assert.equal(copy.nItems, local.nItems);
    console.log(`# ${name}: ${ms} ms for both replicas, ${local.nRuns} runs, ${local.chunks.length} chunks`);
  });
}

test('random concurrent edits converge in every causal delivery order', () => {
  for (const seed of [1, 2, 3]) {
    const rand = rng(seed);
    const n = 4;
    const docs = Array.from({ length: n }, (_, i) => new RgaDoc(i + 1));
    const log = [];
    const seen = docs.map(() => new Set());
    const chars = Array.from('abcdefgh \n😀éxyz');
    for (let step = 0; step < 3000; step++) {
      const r = Math.floor(rand() * n);
      const d = docs[r];
      if (rand() < 0.2) {
        // Catch up with a random part of the log, in log order (a causal order).
        const upto = Math.floor(rand() * (log.length + 1));
        for (let i = 0; i < upto; i++) {
          if (!seen[r].has(i)) { d.applyOps(log[i]); seen[r].add(i); }
        }
        continue;
      }
      let ops;
      if (d.length > 0 && rand() < 0.35) {
        const pos = Math.floor(rand() * d.length);
        ops = d.localDelete(pos, Math.min(d.length - pos, 1 + Math.floor(rand() * 5)));
      } else {
        let s = '';
        for (let k = 1 + Math.floor(rand() * 6); k > 0; k--) s += chars[Math.floor(rand() * chars.length)];
        ops = [d.localInsert(Math.floor(rand() * (d.length + 1)), s)];
      }
      seen[r].add(log.length);
      log.push(ops);
    }
    for (let r = 0; r < n; r++) {
      for (let i = 0; i < log.length; i++) if (!seen[r].has(i)) docs[r].applyOps(log[i]);
      docs[r].check();
    }
    const text = docs[0].text();
    for (const d of docs) assert.equal(d.text(), text, `seed ${seed}`);
    const fresh = new RgaDoc(99);
    for (const ops of log) fresh.applyOps(ops);
    assert.equal(fresh.text(), text);
    assert.ok(fresh.chunks.length > 1, 'the test reaches chunk splits');
  }
});

test('positions, anchors and UTF-16 conversions agree with a plain string', () => {
  const d = new RgaDoc(1);
  d.localInsert(0, 'a😀b');
  d.localInsert(3, 'cé𝄞');
  d.localInsert(1, 'XY');
  const s = d.text();
  assert.equal(s, 'aXY😀bcé𝄞');
  const cps = Array.from(s);
  for (let i = 0; i <= cps.length; i++) {
    const u = cps.slice(0, i).join('').length;
    assert.equal(d.cpToUtf16(i), u);
    assert.equal(d.utf16ToCp(u), i);
    assert.equal(d.positionOfAnchor(d.anchorAt(i)), i);
    if (i < cps.length) assert.equal(d.positionOf(d.idAt(i)), i);
  }
  // An anchor on a deleted character still names the same gap.
  const a = d.anchorAt(4);
  d.localDelete(2, 3);
  assert.equal(d.positionOfAnchor(a), 2);
  assert.equal(d.text(), 'aXcé𝄞');
});

test('a keystroke in a 200k-character document stays cheap', () => {
  const d = new RgaDoc(1);
  const rand = rng(5);
  // Build a fragmented document: many runs, as after a long editing session.
  for (let i = 0; i < 20000; i++) d.localInsert(Math.floor(rand() * (d.length + 1)), 'abcdefghij');
  assert.equal(d.length, 200000);
  const t0 = process.hrtime.bigint();
  const n = 20000;
  for (let i = 0; i < n; i++) {
    const pos = Math.floor(rand() * d.length);
    if (i % 2) d.localInsert(pos, 'k'); else d.localDelete(pos, 1);
  }
  const usPerOp = Number(process.hrtime.bigint() - t0) / 1000 / n;
  d.check();
  console.log(`# ${usPerOp.toFixed(1)} us per keystroke with ${d.nRuns} runs in ${d.chunks.length} chunks`);
});

test('a delete whose range reaches an unknown id changes nothing', () => {
  const d = new RgaDoc(1);
  d.applyOps([{ kind: 'ins', id: [0, 1], after: null, text: 'abc' }]);
  // [0..2] exist, [3,1] does not: the whole op is refused and "abc" stays.
  assert.throws(() => d.applyOps([{ kind: 'del', id: [0, 1], len: 4 }]), (e) => e.code === 'unknown_id');
  assert.equal(d.text(), 'abc');
  d.check();
  assert.deepEqual(d.applyOps([{ kind: 'del', id: [1, 1], len: 2 }]).map((c) => c.length), [2]);
  assert.equal(d.text(), 'a');
});
