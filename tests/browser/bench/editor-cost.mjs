// Measures, in headless Chromium on a 100,000-character document, what one remote edit and
// one local keystroke cost in the CodeMirror demo (/) and in the textarea demo (/textarea).
// Not a test (no assertions on time): prints one line per run and a summary for
// docs/benchmarks.md.
//
//   cd tests/browser && node bench/editor-cost.mjs [RUNS=3] [EDITS=200]
//
// Each run loads both pages fresh. A remote edit is an op of another replica integrated into
// the page's replica and handed to the binding exactly as an `op_echo` is (RgaDoc.applyOps,
// then the client's change events), then layout is forced (CodeMirror: its measure pass and
// a layout read; textarea: a layout read), all timed with performance.now(). A keystroke is
// CodeMirror's `replaceSelection` transaction (what typing dispatches) or, for the textarea,
// `setRangeText` plus the `input` event its binding listens to, then the same forced layout.
// The textarea demo's caret overlay redraws later, in a timer, and is not counted.
import { CollabClient } from '../../../clients/js/collab.js';
import WebSocket from 'ws';
import { startServer, launchBrowser, tempDir } from '../lib/harness.js';

const RUNS = Number(process.argv[2] || 3);
const EDITS = Number(process.argv[3] || 200);
const DOC_CHARS = 100000;

function text100k() {
  const words = ['collaboration', 'engine', 'replica', 'shard', 'durable', 'ordered', 'cursor', 'presence', 'editor', 'text'];
  let s = '';
  let line = '';
  let i = 0;
  while (s.length + line.length < DOC_CHARS) {
    line += `${words[(i * 7 + (i >> 3)) % words.length]} `;
    i++;
    if (line.length > 60) { s += `${line.trimEnd()}\n`; line = ''; }
  }
  return (s + line).slice(0, DOC_CHARS);
}

/** Runs in the page: times `n` remote edits and `n` keystrokes; returns per-edit ms arrays. */
function measureInPage([kind, n]) {
  const { client } = window.collabDemo;
  const doc = client.doc;
  let seed = 12345;
  const rand = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed / 0x7fffffff; };
  const fakeReplica = 987654321;
  let layout;
  let keystroke;
  if (kind === 'codemirror') {
    const { view } = window.collabDemo;
    layout = () => { view.measure(); return view.contentDOM.getBoundingClientRect().height + document.body.offsetHeight; };
    view.focus();
    view.dispatch({ selection: { anchor: Math.floor(view.state.doc.length / 2) }, scrollIntoView: true });
    layout();
    keystroke = () => view.dispatch(view.state.replaceSelection('x'), { userEvent: 'input.type' });
  } else {
    const ta = document.getElementById('editor');
    layout = () => ta.scrollHeight + document.body.offsetHeight;
    ta.focus();
    const mid = Math.floor(ta.value.length / 2);
    ta.setSelectionRange(mid, mid);
    layout();
    keystroke = () => {
      const at = ta.selectionStart;
      ta.setRangeText('x', at, ta.selectionEnd, 'end');
      ta.dispatchEvent(new InputEvent('input', { inputType: 'insertText', data: 'x' }));
    };
  }
  // Remote edits anywhere in the document (mostly outside the visible part), then within
  // 400 characters of the caret (on screen).
  const remoteAt = (pick) => {
    const out = [];
    for (let i = 0; i < n; i++) {
      const pos = pick();
      const op = { kind: 'ins', id: [doc.maxLamport + 1, fakeReplica], after: doc.idAt(pos - 1), text: 'y' };
      const t0 = performance.now();
      const changes = doc.applyOps([op]);
      client._emitChanges(changes);
      layout();
      out.push(performance.now() - t0);
    }
    return out;
  };
  const remote = remoteAt(() => 1 + Math.floor(rand() * (doc.length - 2)));
  const middle = Math.floor(doc.length / 2);
  const remoteVisible = remoteAt(() => middle - 400 + Math.floor(rand() * 800));
  const local = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    keystroke();
    layout();
    local.push(performance.now() - t0);
  }
  return { remote, remoteVisible, local, length: doc.length };
}

const quantile = (xs, q) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(q * s.length))]; };
const fmt = (x) => x.toFixed(3);

const data = tempDir('collab-bench-');
const server = await startServer({ dataDir: data.dir });
const browser = await launchBrowser();
const docName = `bench-${Date.now()}`;
const seedClient = new CollabClient({ url: server.ws, doc: docName, WebSocket });
await seedClient.whenSaved();
seedClient.insert(0, text100k());
await seedClient.whenSaved();
seedClient.close();

const results = { codemirror: { remote: [], visible: [], local: [] }, textarea: { remote: [], visible: [], local: [] } };
for (let run = 1; run <= RUNS; run++) {
  for (const kind of ['codemirror', 'textarea']) {
    const ctx = await browser.newContext({ viewport: { width: 1200, height: 800 } });
    const page = await ctx.newPage();
    // The remote edits stay in this page's replica (they are not sent); the keystrokes are
    // real edits and reach the server, so each load starts EDITS characters longer.
    const path = kind === 'codemirror' ? '/' : '/textarea';
    await page.goto(`${server.http}${path}?doc=${encodeURIComponent(docName)}&name=bench`);
    await page.waitForFunction(() => window.collabDemo && window.collabDemo.client.status === 'saved', null, { timeout: 30000 });
    await page.waitForTimeout(500);
    const r = await page.evaluate(measureInPage, [kind, EDITS]);
    const line = { run, kind, chars: r.length, remote_p50_ms: quantile(r.remote, 0.5), remote_p95_ms: quantile(r.remote, 0.95), remote_visible_p50_ms: quantile(r.remoteVisible, 0.5), remote_visible_p95_ms: quantile(r.remoteVisible, 0.95), local_p50_ms: quantile(r.local, 0.5), local_p95_ms: quantile(r.local, 0.95) };
    console.log(JSON.stringify(line));
    results[kind].remote.push(line.remote_p50_ms);
    results[kind].visible.push(line.remote_visible_p50_ms);
    results[kind].local.push(line.local_p50_ms);
    await ctx.close();
  }
}
console.log(`\nmedian per edit over ${EDITS} edits per run, ${RUNS} runs (min-max of the run medians):`);
for (const kind of ['codemirror', 'textarea']) {
  const r = results[kind];
  const span = (xs) => `${fmt(quantile(xs, 0.5))} ms (${fmt(Math.min(...xs))}-${fmt(Math.max(...xs))})`;
  console.log(`${kind}: remote edit anywhere ${span(r.remote)}; on screen ${span(r.visible)}; keystroke ${span(r.local)}`);
}
await browser.close();
await server.stop();
data.cleanup();
