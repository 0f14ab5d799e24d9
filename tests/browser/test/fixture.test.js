// The JavaScript replica against the Rust CRDT module: the same ops give the same text.
// The fixture comes from `cargo run --release --example js_fixture` (examples/js_fixture.rs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { RgaDoc } from '../../../clients/js/collab.js';

const fixture = JSON.parse(readFileSync(new URL('../fixtures/rust-rga.json', import.meta.url), 'utf8'));

function replay(ops, order = ops.map((_, i) => i), { batch = false, duplicates = false } = {}) {
  const doc = new RgaDoc(1000);
  const seq = order.map((i) => ops[i]);
  if (batch) doc.applyOps(seq);
  else {
    for (const op of seq) {
      doc.applyOps([op]);
      if (duplicates) doc.applyOps([op]);
    }
  }
  doc.check();
  return doc;
}

test('the fixture has ordering and random cases', () => {
  assert.ok(fixture.cases.length >= 10);
  assert.ok(fixture.cases.some((c) => c.orders));
});

for (const c of fixture.cases) {
  test(`same text as Rust: ${c.name}`, () => {
    assert.equal(replay(c.ops).text(), c.text);
    // Batched in one message, and with every op delivered twice (resends).
    assert.equal(replay(c.ops, undefined, { batch: true }).text(), c.text);
    assert.equal(replay(c.ops, undefined, { duplicates: true }).text(), c.text);
    // Each simulated replica's own (causal) delivery order.
    for (const order of c.orders || []) assert.equal(replay(c.ops, order).text(), c.text);
    // A snapshot taken from the result loads back to the same text and items.
    const doc = replay(c.ops);
    const copy = new RgaDoc(1);
    copy.loadSnapshot(doc.toSnapshot().runs);
    copy.check();
    assert.equal(copy.text(), c.text);
    assert.deepEqual(copy.toSnapshot(), doc.toSnapshot());
  });
}
