// The Rust client module (collab_engine::client, driven by examples/mixed_client.rs) and the
// JavaScript client edit one document at the same time against the real server and converge.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';
import { CollabClient } from '../../../clients/js/collab.js';
import { REPO, startServer, tempDir, sleep, rng } from '../lib/harness.js';

const BIN = join(process.env.CARGO_TARGET_DIR || join(REPO, 'target'), 'release', 'examples', 'mixed_client');

/** Spawns the Rust participant; `next()` resolves with its next stdout line. */
function rustClient(url, doc, nEdits, seed) {
  const child = spawn(process.env.MIXED_CLIENT_BIN || BIN, [url, doc, String(nEdits), String(seed)], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-4000); });
  const lines = [];
  const waiters = [];
  createInterface({ input: child.stdout }).on('line', (l) => { if (waiters.length) waiters.shift()(l); else lines.push(l); });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return {
    child,
    next: (timeoutMs = 30000) => new Promise((resolve, reject) => {
      if (lines.length) { resolve(lines.shift()); return; }
      const t = setTimeout(() => reject(new Error(`rust client said nothing; stderr: ${stderr}`)), timeoutMs);
      exited.then((code) => { clearTimeout(t); reject(new Error(`rust client exited (${code}); stderr: ${stderr}`)); });
      waiters.push((l) => { clearTimeout(t); resolve(l); });
    }),
    send: (line) => child.stdin.write(`${line}\n`),
    stop: async () => { child.stdin.end(); const t = setTimeout(() => child.kill('SIGKILL'), 5000); await exited; clearTimeout(t); },
  };
}

test('Rust and JavaScript clients edit one document at once and converge', { timeout: 120000 }, async () => {
  const data = tempDir('collab-mixed-');
  const server = await startServer({ dataDir: data.dir });
  const doc = 'mixed rust+js';
  const js = new CollabClient({ url: server.ws, doc, WebSocket, backoffMaxMs: 500 });
  let rust;
  try {
    await js.whenSaved();
    js.insert(0, 'start: ');
    await js.whenSaved();
    rust = rustClient(`${server.ws}/ws`, doc, 300, 7);
    assert.match(await rust.next(), /^joined \d+$/);
    // Both edit at once: the Rust client in its process, the JS one here.
    const rand = rng(11);
    const chars = Array.from('js ✓😀\nab');
    for (let i = 0; i < 300; i++) {
      const len = js.doc.length;
      if (len > 0 && rand() < 0.25) {
        const pos = Math.floor(rand() * len);
        js.delete(pos, Math.min(len - pos, 1 + Math.floor(rand() * 3)));
      } else {
        js.insert(Math.floor(rand() * (len + 1)), chars[Math.floor(rand() * chars.length)]);
      }
      if (i % 5 === 0) await sleep(2);
    }
    const [acked] = await Promise.all([rust.next(), js.whenSaved()]);
    assert.match(acked, /^acked \d+$/);
    // Everyone's edits are acknowledged: a fresh client's head covers them all.
    const probe = new CollabClient({ url: server.ws, doc, WebSocket });
    await probe.whenSaved();
    const head = probe.head;
    const t0 = Date.now();
    while (js.since < head) {
      if (Date.now() - t0 > 20000) assert.fail(`js client stuck at ${js.since} < ${head}`);
      await sleep(10);
    }
    rust.send(`sync ${head}`);
    const line = await rust.next();
    assert.match(line, /^text /);
    const rustText = JSON.parse(line.slice(5));
    assert.equal(js.text(), rustText);
    assert.equal(probe.text(), rustText);
    assert.ok(rustText.includes('🦀') || rustText.includes('ferris') || rustText.includes('rust'), 'rust edits present');
    probe.close();
  } finally {
    js.close();
    await rust?.stop();
    await server.stop('SIGTERM');
    data.cleanup();
  }
});
