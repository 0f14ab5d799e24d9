// End to end in headless Chromium against the real server binary: the zero-dependency
// textarea demo (/textarea) served by the server, two pages typing at once, a late third page, a server crash and restart on the
// same port and data dir, presence carets. Screenshots land in target/browser-test/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, tempDir, ensureOutDir, sleep } from '../lib/harness.js';
import { startFakeServer } from '../lib/fake-server.js';

// COLLAB_E2E_SERVER=fake runs the pages against the in-memory stand-in (for working on the
// page without a server build); the default is the real binary.
const FAKE = process.env.COLLAB_E2E_SERVER === 'fake';

let browser;
let server;
let data;
let fakeRooms = new Map();

async function start(listen) {
  if (FAKE) {
    const port = listen ? Number(listen.split(':')[1]) : 0;
    const s = await startFakeServer({ port, rooms: fakeRooms });
    return { ...s, http: `http://127.0.0.1:${s.port}`, stop: () => s.stop({ abrupt: true }) };
  }
  return startServer({ dataDir: data.dir, listen });
}

before(async () => {
  data = tempDir('collab-e2e-');
  // One after the other, so that `after` can close whatever did start.
  browser = await launchBrowser();
  server = await start();
});

after(async () => {
  await browser?.close();
  await server?.stop();
  data?.cleanup();
});

/** Opens the textarea demo for `doc` in a fresh browser context (its own window). */
async function openPage(doc, name) {
  const ctx = await browser.newContext({ viewport: { width: 900, height: 560 } });
  const page = await ctx.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  await page.goto(`${server.http}/textarea?doc=${encodeURIComponent(doc)}&name=${encodeURIComponent(name)}`);
  await waitSaved(page);
  page.problems = problems;
  return page;
}

async function waitSaved(page, timeout = 20000) {
  await page.waitForFunction(() => window.collabDemo && window.collabDemo.client.status === 'saved' &&
    document.getElementById('status').dataset.status === 'saved', null, { timeout });
}

const value = (page) => page.$eval('#editor', (ta) => ta.value);
const replicaText = (page) => page.evaluate(() => window.collabDemo.client.text());

/** Waits until every page shows the same text in its textarea and replica, all saved. */
async function converged(pages, timeout = 20000) {
  const t0 = Date.now();
  for (;;) {
    const texts = [];
    for (const p of pages) {
      texts.push(await value(p), await replicaText(p));
      texts.push(await p.evaluate(() => window.collabDemo.client.status));
    }
    const values = texts.filter((_, i) => i % 3 !== 2);
    const statuses = texts.filter((_, i) => i % 3 === 2);
    if (values.every((t) => t === values[0]) && statuses.every((s) => s === 'saved')) return values[0];
    if (Date.now() - t0 > timeout) {
      assert.fail(`pages did not converge: ${JSON.stringify({ values, statuses })}`);
    }
    await sleep(50);
  }
}

function isSubsequence(smallText, big) {
  const small = Array.from(smallText);
  let i = 0;
  for (const ch of big) if (i < small.length && ch === small[i]) i++;
  return i === small.length;
}

test('two pages, a late third page, a server restart, presence carets', { timeout: 180000 }, async () => {
  const doc = `e2e ${Date.now()}/ü`;
  const alice = await openPage(doc, 'Alice');
  const bob = await openPage(doc, 'Bob');

  // The page shows who we are and the connection state.
  assert.equal(await alice.$eval('#doc-name', (e) => e.value), doc);
  assert.match(await alice.$eval('#status-text', (e) => e.textContent), /saved/);

  // Both type at the same time into the same (empty) document.
  await alice.click('#editor');
  await bob.click('#editor');
  const aText = 'Hello from Alice, typing along. ';
  const bText = 'Bob writes here: ünïcødé 😀 too! ';
  await Promise.all([
    alice.keyboard.type(aText, { delay: 15 }),
    bob.keyboard.type(bText, { delay: 12 }),
  ]);
  let text = await converged([alice, bob]);
  assert.equal(Array.from(text).length, Array.from(aText).length + Array.from(bText).length);
  assert.ok(isSubsequence(aText, text) && isSubsequence(bText, text), text);

  // Concurrent edits in the middle: Alice selects and replaces, Bob deletes with Backspace.
  await alice.keyboard.press('Home');
  await alice.keyboard.type('[A] ', { delay: 10 });
  await Promise.all([
    bob.keyboard.press('Backspace').then(() => bob.keyboard.press('Backspace')).then(() => bob.keyboard.type('!! ', { delay: 10 })),
    alice.keyboard.press('End').then(() => alice.keyboard.type('\nsecond line', { delay: 10 })),
  ]);
  text = await converged([alice, bob]);
  assert.ok(text.includes('[A] ') && text.includes('second line') && text.includes('!! '), text);

  // Presence: each page shows the other's name in the list and caret in the text.
  await bob.waitForSelector('#carets .rc[data-name="Alice"]', { timeout: 10000 });
  await alice.waitForSelector('#carets .rc[data-name="Bob"]', { timeout: 10000 });
  assert.deepEqual(await bob.$$eval('#people li .name', (els) => els.map((e) => e.textContent)), ['Alice']);
  // Bob's caret sits where Bob's textarea caret is: after "!! " in his text.
  const bobCaret = await bob.evaluate(() => {
    const ta = document.getElementById('editor');
    return ta.value.slice(0, ta.selectionEnd);
  });
  const caretAtAlice = await alice.evaluate(() => {
    // The overlay holds one block per paragraph; find the text before Bob's caret.
    const box = document.getElementById('carets');
    let s = '';
    for (const [i, para] of [...box.children].entries()) {
      if (i > 0) s += '\n';
      for (const n of para.childNodes) {
        if (n.nodeType === 1 && n.classList.contains('rc') && n.dataset.name === 'Bob') return s;
        s += n.textContent.replace(/\u200b/g, '');
      }
    }
    return null;
  });
  assert.equal(caretAtAlice, bobCaret);

  // Remote edits do not move the local selection off its text, and edits made through the
  // client API show up in the page that made them too.
  await alice.evaluate(() => {
    const ta = document.getElementById('editor');
    const i = ta.value.indexOf('second');
    ta.focus();
    ta.setSelectionRange(i, i + 'second'.length);
  });
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'PREFIX '));
  assert.ok((await value(bob)).startsWith('PREFIX '));
  await alice.waitForFunction(() => document.getElementById('editor').value.startsWith('PREFIX '));
  assert.equal(await alice.evaluate(() => {
    const ta = document.getElementById('editor');
    return ta.value.slice(ta.selectionStart, ta.selectionEnd);
  }), 'second');
  await alice.keyboard.type('2nd', { delay: 10 });
  text = await converged([alice, bob]);
  assert.ok(text.startsWith('PREFIX ') && text.includes('2nd line') && !text.includes('second'), text);

  // A screenshot of the session: both windows side by side.
  const out = ensureOutDir();
  const shots = [await alice.screenshot(), await bob.screenshot()];
  const board = await browser.newPage({ viewport: { width: 1820, height: 600 } });
  await board.setContent(`<body style="margin:0;background:#333;display:flex;gap:20px;padding:20px">${
    shots.map((b) => `<img style="width:890px;border:1px solid #000" src="data:image/png;base64,${b.toString('base64')}">`).join('')}</body>`);
  await board.screenshot({ path: join(out, 'textarea-two-pages.png') });
  await board.close();

  // A third page opened later gets the whole document.
  const carol = await openPage(doc, 'Carol');
  assert.equal(await value(carol), text);
  await alice.waitForSelector('#people li[data-replica] >> text=Carol', { timeout: 10000 });

  // Crash the server; the pages notice, keep local edits, and reconnect by themselves once
  // it is back on the same port and data dir.
  const listen = `127.0.0.1:${server.port}`;
  const epochBefore = await alice.evaluate(() => window.collabDemo.client.epoch);
  await server.stop('SIGKILL');
  for (const p of [alice, bob, carol]) {
    await p.waitForFunction(() => ['offline', 'connecting'].includes(window.collabDemo.client.status), null, { timeout: 15000 });
  }
  await carol.click('#editor');
  await carol.keyboard.press('End');
  await carol.keyboard.type(' (written offline)', { delay: 5 });
  assert.match(await carol.$eval('#status-text', (e) => e.textContent), /offline|connecting/);
  server = await start(listen);
  text = await converged([alice, bob, carol], 30000);
  const epochAfter = await alice.evaluate(() => window.collabDemo.client.epoch);
  // The server kept the document (same epoch), Carol's offline edit is in exactly once, and
  // her caret is still right after what she typed.
  assert.equal(epochAfter, epochBefore, 'the restarted server lost the document');
  assert.equal(text.split('(written offline)').length, 2, text);
  assert.ok(await carol.evaluate(() => {
    const ta = document.getElementById('editor');
    return ta.value.slice(0, ta.selectionEnd).endsWith('(written offline)');
  }), 'caret kept its place');

  // Further edits after the restart still converge.
  await bob.click('#editor');
  await alice.click('#editor');
  await Promise.all([
    alice.keyboard.type(' after-restart-A', { delay: 10 }),
    bob.keyboard.type(' after-restart-B', { delay: 10 }),
    carol.keyboard.type(' after-restart-C', { delay: 10 }),
  ]);
  text = await converged([alice, bob, carol]);
  for (const s of [' after-restart-A', ' after-restart-B', ' after-restart-C']) assert.ok(isSubsequence(s, text), s);
  await alice.screenshot({ path: join(out, 'textarea-after-restart.png') });
  writeFileSync(join(out, 'textarea-final-text.txt'), text);

  for (const p of [alice, bob, carol]) {
    // Only the expected noise: failed WebSocket connections while the server was down.
    const real = p.problems.filter((m) => !/WebSocket|ERR_CONNECTION_REFUSED|Failed to load resource/.test(m));
    assert.deepEqual(real, []);
  }
});

test('the server serves the page and the module itself', async () => {
  const res = await fetch(`${server.http}/collab.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /javascript/);
  assert.match(await res.text(), /export class CollabClient/);
  const page = await fetch(`${server.http}/textarea`);
  assert.match(page.headers.get('content-type'), /text\/html/);
  assert.match(await page.text(), /<textarea id="editor"/);
  const main = await fetch(`${server.http}/`);
  assert.match(await main.text(), /<div id="editor" class="cm-host">/);
});
