// One JavaScript participant of the mixed Python + JavaScript + Rust test (test_mixed.py):
// `node js_peer.mjs URL DOC N_EDITS SEED` joins DOC with clients/js/collab.js (on the `ws`
// package that tests/interop/setup.sh installs), makes N_EDITS random edits while integrating
// everyone else's, waits until they are acknowledged and prints `acked HEAD`. Then for each
// `sync HEAD` line on stdin it waits until it applied every op up to HEAD and prints
// `text <JSON string>`. The same line protocol as examples/mixed_client.rs.
import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';
import { CollabClient } from '../../js/collab.js';

const require = createRequire(new URL('../../../tests/interop/package.json', import.meta.url));
const WebSocket = require('ws');

const [url, doc, nEditsArg, seedArg] = process.argv.slice(2);
const nEdits = Number(nEditsArg);
let s = (Number(seedArg) >>> 0) || 1;
const rand = () => {
  s ^= s << 13; s >>>= 0;
  s ^= s >>> 17;
  s ^= s << 5; s >>>= 0;
  return s / 2 ** 32;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fail = (msg) => { process.stderr.write(`js peer: ${msg}\n`); process.exit(1); };
setTimeout(() => fail('no result after 90 s'), 90000).unref();

const client = new CollabClient({ url, doc, WebSocket, backoffMaxMs: 500 });
client.on('error', (e) => process.stderr.write(`js peer error: ${JSON.stringify(e)}\n`));
await new Promise((resolve) => { const off = client.on('status', (st) => { if (client.ready) { off(); resolve(); } }); });
console.log(`joined ${client.replica}`);
const words = Array.from(['js ', '✓', '😀', '\n', 'ab']);
for (let i = 0; i < nEdits; i++) {
  const len = client.doc.length;
  if (len > 0 && rand() < 0.25) {
    const pos = Math.floor(rand() * len);
    client.delete(pos, Math.min(len - pos, 1 + Math.floor(rand() * 3)));
  } else {
    client.insert(Math.floor(rand() * (len + 1)), words[Math.floor(rand() * words.length)]);
  }
  if (i % 3 === 0) await sleep(2);
}
await client.whenSaved();
console.log(`acked ${client.since}`);
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.startsWith('sync ')) continue;
  const head = Number(line.slice(5));
  const t0 = Date.now();
  while (client.since < head) {
    if (Date.now() - t0 > 20000) fail(`stuck at ${client.since} < ${head}`);
    await sleep(5);
  }
  console.log(`text ${JSON.stringify(client.text())}`);
}
client.close();
