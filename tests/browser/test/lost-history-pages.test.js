// Both demo pages in Chromium against the in-memory server when the server loses history
// (docs/protocol.md, "Lost history"): the page sends its lost edits again with their original
// ids, the text the server lost from someone else disappears, and the local selection stays
// on the same characters although their positions moved.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { CollabClient } from '../../../clients/js/collab.js';
import { launchBrowser } from '../lib/harness.js';
import { startFakeServer, loseHistory } from '../lib/fake-server.js';
import { openDemo, editorText, select, selectedText } from '../lib/cm-page.js';

let browser;
let server;

before(async () => {
  browser = await launchBrowser();
  server = await startFakeServer();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const savedOn = (page) => page.waitForFunction(() => window.collabDemo && window.collabDemo.client.status === 'saved', null, { timeout: 20000 });

/** Another user types `text` at the start, then leaves for good (its edit will be lost). */
async function otherUserTypes(doc, text) {
  const other = new CollabClient({ url: server.url, doc, WebSocket });
  await other.whenSaved();
  other.insert(0, text);
  await other.whenSaved();
  other.close();
}

/** The server crashes, comes back on its port with the document forgotten (new epoch). */
async function loseEverything(page, doc) {
  const { port, rooms } = server;
  await server.stop({ abrupt: true });
  await page.waitForFunction(() => ['offline', 'connecting'].includes(window.collabDemo.client.status), null, { timeout: 15000 });
  loseHistory(rooms, doc);
  server = await startFakeServer({ port, rooms });
}

/** The op messages the server received (since message number `from`), as `{client_seq, ops}`. */
const opMessages = (from = 0) => server.stats.received.slice(from).filter((m) => m.type === 'op').map((m) => ({ client_seq: m.client_seq, ops: m.ops }));

test('CodeMirror page: lost edits come back with their ids and the selection stays on its text', { timeout: 90000 }, async () => {
  const doc = 'lost-cm';
  const from = server.stats.received.length;
  const page = await openDemo(browser, `http://127.0.0.1:${server.port}`, doc, 'cm');
  await page.click('.cm-content');
  await page.keyboard.type('alpha beta gamma', { delay: 5 });
  await savedOn(page);
  await otherUserTypes(doc, 'X ');
  await page.waitForFunction(() => window.collabDemo.view.state.doc.toString() === 'X alpha beta gamma', null, { timeout: 10000 });
  await select(page, 'beta');
  const replica = await page.evaluate(() => window.collabDemo.client.replica);
  const sentBefore = opMessages(from).filter((m) => m.ops[0].id[1] === replica);
  await loseEverything(page, doc);
  await savedOn(page);
  // The other user's "X " is gone; ours is back, with the same ids and client_seq values.
  assert.equal(await editorText(page), 'alpha beta gamma');
  assert.equal(server.rooms.get(doc).rga.text(), 'alpha beta gamma');
  assert.deepEqual(opMessages(), sentBefore);
  assert.equal(await selectedText(page), 'beta');
  assert.deepEqual(await page.evaluate(() => { const r = window.collabDemo.view.state.selection.main; return [r.from, r.to]; }), [6, 10]);
  await page.context().close();
});

test('textarea page: lost edits come back with their ids and the selection stays on its text', { timeout: 90000 }, async () => {
  const doc = 'lost-ta';
  const from = server.stats.received.length;
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.port}/textarea?doc=${doc}&name=ta`);
  await savedOn(page);
  await page.click('#editor');
  await page.keyboard.type('alpha beta gamma', { delay: 5 });
  await savedOn(page);
  await otherUserTypes(doc, 'X ');
  await page.waitForFunction(() => document.querySelector('#editor').value === 'X alpha beta gamma', null, { timeout: 10000 });
  await page.evaluate(() => {
    const ta = document.querySelector('#editor');
    ta.focus();
    ta.setSelectionRange(8, 12);
    ta.dispatchEvent(new Event('select'));
  });
  // The binding keeps the selection as item ids (and publishes them as presence).
  await page.waitForFunction(() => { const s = window.collabDemo.binding._anchors; return s && s.start !== null && s.end !== null; }, null, { timeout: 10000 });
  const replica = await page.evaluate(() => window.collabDemo.client.replica);
  const sentBefore = opMessages(from).filter((m) => m.ops[0].id[1] === replica);
  await loseEverything(page, doc);
  await savedOn(page);
  assert.equal(await page.$eval('#editor', (t) => t.value), 'alpha beta gamma');
  assert.equal(server.rooms.get(doc).rga.text(), 'alpha beta gamma');
  assert.deepEqual(opMessages(), sentBefore);
  assert.deepEqual(await page.$eval('#editor', (t) => [t.selectionStart, t.selectionEnd, t.value.slice(t.selectionStart, t.selectionEnd)]), [6, 10, 'beta']);
  await page.context().close();
});
