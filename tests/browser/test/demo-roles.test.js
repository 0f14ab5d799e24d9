// The demo page's access-control states in Chromium, against the in-memory server with its
// `tokens` knob on (it answers as docs/protocol.md's access-control extension says): a read
// role gives a read-only editor that follows the writer, a refused token shows "access
// denied: REASON" and never reconnects. The same page against the real server with real
// tokens is tests/browser/auth/demo-auth.test.js.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launchBrowser, sleep } from '../lib/harness.js';
import { startFakeServer } from '../lib/fake-server.js';
import { openDemo, editorText, converged } from '../lib/cm-page.js';

let browser;
let server;
let http;

before(async () => {
  browser = await launchBrowser();
  server = await startFakeServer();
  server.knobs.tokens = new Map([
    ['tok-write', { role: 'write', user: 'wendy', name: 'Wendy Writer' }],
    ['tok-read', { role: 'read', user: 'rita', name: 'Rita Reader' }],
  ]);
  http = `http://127.0.0.1:${server.port}`;
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('read role: a read-only editor that follows the writer; write role edits', { timeout: 60000 }, async () => {
  const doc = 'roles';
  const writer = await openDemo(browser, http, doc, 'w', { query: { token: 'tok-write' } });
  await writer.click('.cm-content');
  await writer.keyboard.type('by Wendy', { delay: 10 });
  const reader = await openDemo(browser, http, doc, 'r', { query: { token: 'tok-read' } });
  assert.equal(await editorText(reader), 'by Wendy');
  assert.equal(await reader.$eval('.cm-content', (e) => e.getAttribute('contenteditable')), 'false');
  assert.match(await reader.$eval('#status-text', (e) => e.textContent), /read-only/);
  assert.match(await reader.$eval('#role', (e) => e.textContent), /rita · read/);
  await reader.click('.cm-content');
  await reader.keyboard.type('reader was here', { delay: 5 });
  await reader.evaluate(() => window.collabDemo.view.dispatch({ changes: { from: 0, insert: 'sneaky ' } }));
  assert.equal(await editorText(reader), 'by Wendy');
  await writer.keyboard.type(' and more', { delay: 10 });
  assert.equal(await converged([writer, reader]), 'by Wendy and more');
  // The names shown are the ones the server vouches for, not the ones the pages chose.
  await reader.waitForFunction(() => [...document.querySelectorAll('#people li .name')].some((e) => e.textContent === 'Wendy Writer'), null, { timeout: 10000 });
  await writer.waitForFunction(() => document.querySelector('.cm-remote-caret[data-name="Rita Reader"]'), null, { timeout: 10000 });
  assert.equal(server.stats.received.filter((m) => m.type === 'op' && m.ops.some((o) => o.text?.includes('sneaky') || o.text?.includes('reader'))).length, 0);
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  for (const p of [writer, reader]) await p.context().close();
});

test('a refused token: "access denied: REASON", a read-only editor, no reconnect loop', { timeout: 60000 }, async () => {
  const hellosBefore = server.stats.hellos.length;
  const page = await openDemo(browser, http, 'roles-denied', 'm', { query: { token: 'garbage' }, wait: 'none' });
  await page.waitForFunction(() => window.collabDemo && window.collabDemo.client.status === 'denied', null, { timeout: 20000 });
  assert.equal(await page.$eval('#status-text', (e) => e.textContent), 'access denied: token signature invalid');
  assert.equal(await page.$eval('#status', (e) => e.dataset.status), 'denied');
  assert.equal(await page.$eval('#denied', (e) => e.hidden), false);
  assert.match(await page.$eval('#denied', (e) => e.textContent), /^access denied: token signature invalid/);
  assert.equal(await page.$eval('.cm-content', (e) => e.getAttribute('contenteditable')), 'false');
  // A reconnect loop (250 ms backoff) would have said hello again by now.
  await sleep(1500);
  assert.equal(server.stats.hellos.length - hellosBefore, 1);
  // The share link names the document, never the token or the name.
  const share = new URL(await page.$eval('#share-link', (e) => e.href));
  assert.deepEqual([...share.searchParams.keys()], ['doc']);
  await page.context().close();
});
