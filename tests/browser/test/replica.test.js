// The JavaScript RGA replica on its own: traces, ordering rules, random concurrent edits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { RgaDoc, cpLength } from '../../../clients/js/collab.js';

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
