// The CodeMirror demo (/) in headless Chromium against the real server binary: two pages
// typing at once, multi-change transactions, remote carets where the other user is, a
// selection that stays on its text during remote edits, undo of only the local user's
// edits, a snapshot reload, IME composition with remote edits arriving meanwhile, a late joiner and a reload,
// a server crash and restart. Screenshots land in target/browser-test/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, tempDir, ensureOutDir } from '../lib/harness.js';
import { openDemo, waitSaved, editorText, converged, isSubsequence, select, selectedText, realProblems } from '../lib/cm-page.js';

let browser;
let server;
let data;

before(async () => {
  data = tempDir('collab-cm-');
  browser = await launchBrowser();
  server = await startServer({ dataDir: data.dir });
});

after(async () => {
  await browser?.close();
  await server?.stop();
  data?.cleanup();
});

const open = (doc, name) => openDemo(browser, server.http, doc, name);
const uniqueDoc = (what) => `cm ${what} ${Date.now()}/ü`;

/** Where the caret widget of `name` sits in `page`'s editor (a UTF-16 offset), or null. */
const caretOf = (page, name) => page.evaluate((n) => {
  const { view } = window.collabDemo;
  const el = [...view.contentDOM.querySelectorAll('.cm-remote-caret')].find((e) => e.dataset.name === n);
  return el ? view.posAtDOM(el) : null;
}, name);

const head = (page) => page.evaluate(() => window.collabDemo.view.state.selection.main.head);

test('two pages type at once and converge; carets; selections; late joiner; reload; restart', { timeout: 240000 }, async () => {
  const doc = uniqueDoc('main');
  const alice = await open(doc, 'Alice');
  const bob = await open(doc, 'Bob');
  assert.equal(await alice.$eval('#doc-name', (e) => e.value), doc);
  assert.match(await alice.$eval('#status-text', (e) => e.textContent), /saved/);
  assert.ok(await alice.$('.cm-editor .cm-lineNumbers'), 'line numbers');

  // Both type at the same time into the same (empty) document.
  await alice.click('.cm-content');
  await bob.click('.cm-content');
  const aText = 'Hello from Alice, typing along. ';
  const bText = 'Bob writes here: ünïcødé 😀 too! ';
  await Promise.all([
    alice.keyboard.type(aText, { delay: 15 }),
    bob.keyboard.type(bText, { delay: 12 }),
  ]);
  let text = await converged([alice, bob]);
  assert.equal(Array.from(text).length, Array.from(aText).length + Array.from(bText).length);
  assert.ok(isSubsequence(aText, text) && isSubsequence(bText, text), text);

  // Keys that make edits other than typing: Enter, Backspace over an emoji, a new line.
  await Promise.all([
    bob.keyboard.press('Backspace').then(() => bob.keyboard.press('Backspace')).then(() => bob.keyboard.type('!! ', { delay: 10 })),
    alice.keyboard.press('End').then(() => alice.keyboard.press('Enter')).then(() => alice.keyboard.type('second line', { delay: 10 })),
  ]);
  text = await converged([alice, bob]);
  assert.ok(text.includes('\nsecond line') && text.includes('!! '), text);

  // One transaction with several changes (as multiple cursors or a search-and-replace make),
  // around characters outside the BMP: each change reaches the others, in order.
  await alice.evaluate(() => {
    const { view } = window.collabDemo;
    const s = view.state.doc.toString();
    const emoji = s.indexOf('😀');
    view.dispatch({
      changes: [
        { from: 0, insert: '«' },
        { from: emoji, to: emoji + 2, insert: '🎉🎉' },
        { from: s.length, insert: ' »' },
      ],
      userEvent: 'input',
    });
  });
  text = await converged([alice, bob]);
  assert.ok(text.startsWith('«') && text.endsWith(' »') && text.includes('🎉🎉') && !text.includes('😀'), text);

  // Remote carets: each page shows the other's caret where the other's selection head is.
  await bob.keyboard.press('End');
  await alice.waitForFunction(() => document.querySelector('.cm-remote-caret[data-name="Bob"]'), null, { timeout: 10000 });
  await bob.waitForFunction(() => document.querySelector('.cm-remote-caret[data-name="Alice"]'), null, { timeout: 10000 });
  const bobHead = await head(bob);
  await alice.waitForFunction((h) => {
    const { view } = window.collabDemo;
    const el = document.querySelector('.cm-remote-caret[data-name="Bob"]');
    return el && view.posAtDOM(el) === h;
  }, bobHead, { timeout: 10000 });
  assert.equal(await caretOf(alice, 'Bob'), bobHead);
  assert.equal(await caretOf(bob, 'Alice'), await head(alice));
  assert.deepEqual(await bob.$$eval('#people li .name', (els) => els.map((e) => e.textContent)), ['Alice']);
  // A remote selection is drawn as a range in the person's colour.
  await select(bob, 'second');
  await alice.waitForFunction(() => [...document.querySelectorAll('.cm-remote-selection')].map((e) => e.textContent).join('') === 'second', null, { timeout: 10000 });

  // A local selection stays on its text while the other page edits before, inside and after it.
  await select(alice, 'second');
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'PREFIX '));
  await select(bob, 'Hello');
  await bob.keyboard.type('Howdy', { delay: 10 });
  await bob.evaluate(() => { const c = window.collabDemo.client; c.insert(c.doc.length, ' SUFFIX'); });
  await alice.waitForFunction(() => window.collabDemo.view.state.doc.toString().endsWith(' SUFFIX'), null, { timeout: 10000 });
  await alice.waitForFunction(() => window.collabDemo.view.state.doc.toString().includes('Howdy'), null, { timeout: 10000 });
  assert.equal(await selectedText(alice), 'second');
  await alice.keyboard.type('2nd', { delay: 10 });
  text = await converged([alice, bob]);
  assert.ok(text.startsWith('PREFIX «') && text.includes('\n2nd line') && !text.includes('second') && text.includes('Howdy'), text);

  // A screenshot of the session: both windows side by side.
  const out = ensureOutDir();
  const shots = [await alice.screenshot(), await bob.screenshot()];
  const board = await browser.newPage({ viewport: { width: 1820, height: 600 } });
  await board.setContent(`<body style="margin:0;background:#333;display:flex;gap:20px;padding:20px">${
    shots.map((b) => `<img style="width:890px;border:1px solid #000" src="data:image/png;base64,${b.toString('base64')}">`).join('')}</body>`);
  await board.screenshot({ path: join(out, 'two-pages.png') });
  await board.close();

  // A late joiner and a reload show the same text.
  const carol = await open(doc, 'Carol');
  assert.equal(await editorText(carol), text);
  await alice.waitForSelector('#people li[data-replica] >> text=Carol', { timeout: 10000 });
  await bob.reload();
  await waitSaved(bob);
  assert.equal(await editorText(bob), text);
  assert.equal(await converged([alice, bob, carol]), text);

  // Crash the server; the pages notice, keep local edits, and reconnect by themselves once
  // it is back on the same port and data dir.
  const listen = `127.0.0.1:${server.port}`;
  const epochBefore = await alice.evaluate(() => window.collabDemo.client.epoch);
  await server.stop('SIGKILL');
  for (const p of [alice, bob, carol]) {
    await p.waitForFunction(() => ['offline', 'connecting'].includes(window.collabDemo.client.status), null, { timeout: 15000 });
  }
  await carol.click('.cm-content');
  await carol.keyboard.press('Control+End');
  await carol.keyboard.type(' (written offline)', { delay: 5 });
  assert.match(await carol.$eval('#status-text', (e) => e.textContent), /offline|connecting/);
  server = await startServer({ dataDir: data.dir, listen });
  text = await converged([alice, bob, carol], 30000);
  assert.equal(await alice.evaluate(() => window.collabDemo.client.epoch), epochBefore, 'the restarted server lost the document');
  assert.equal(text.split('(written offline)').length, 2, text);
  assert.ok(await carol.evaluate(() => {
    const { view } = window.collabDemo;
    return view.state.sliceDoc(0, view.state.selection.main.head).endsWith('(written offline)');
  }), 'caret kept its place');

  // Further edits after the restart still converge.
  await bob.click('.cm-content');
  await alice.click('.cm-content');
  await Promise.all([
    alice.keyboard.type(' after-restart-A', { delay: 10 }),
    bob.keyboard.type(' after-restart-B', { delay: 10 }),
    carol.keyboard.type(' after-restart-C', { delay: 10 }),
  ]);
  text = await converged([alice, bob, carol]);
  for (const s of [' after-restart-A', ' after-restart-B', ' after-restart-C']) assert.ok(isSubsequence(s, text), s);
  await alice.screenshot({ path: join(out, 'after-restart.png') });
  writeFileSync(join(out, 'final-text.txt'), text);
  for (const p of [alice, bob, carol]) assert.deepEqual(realProblems(p), []);
  for (const p of [alice, bob, carol]) await p.context().close();
});

test('undo and redo revert only the local user\'s edits, also after concurrent remote edits', { timeout: 120000 }, async () => {
  const doc = uniqueDoc('undo');
  const alice = await open(doc, 'Alice');
  const bob = await open(doc, 'Bob');
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'base text\n'));
  await converged([alice, bob]);

  // Alice types at the end; Bob, meanwhile, types at the start and in the middle of
  // Alice's words, so Alice's history has to be mapped through his edits.
  await alice.click('.cm-content');
  await alice.keyboard.press('Control+End');
  await alice.keyboard.type('alpha beta', { delay: 10 });
  await converged([alice, bob]);
  await select(bob, 0);
  await bob.keyboard.type('BOB1 ', { delay: 10 });
  await select(bob, 'alpha'.length + (await editorText(bob)).indexOf('alpha'));
  await bob.keyboard.type('-bob2-', { delay: 10 });
  let text = await converged([alice, bob]);
  assert.equal(text, 'BOB1 base text\nalpha-bob2- beta');

  // Alice undoes: her typing goes, Bob's edits (including the one inside her words) stay.
  await alice.keyboard.press('Control+z');
  text = await converged([alice, bob]);
  assert.equal(text, 'BOB1 base text\n-bob2-');
  // Bob's own undo reverts only his last edit, not Alice's undo.
  await bob.keyboard.press('Control+z');
  text = await converged([alice, bob]);
  assert.ok(!text.includes('-bob2-') && text.includes('BOB1 '), text);
  // Alice redoes: her words come back around whatever is there now.
  await alice.keyboard.press('Control+Shift+z');
  text = await converged([alice, bob]);
  assert.ok(text.includes('alpha') && text.includes('beta') && !text.includes('-bob2-'), text);
  // Remote edits are not in anyone's history: more undos on Alice's side never remove Bob's text.
  for (let i = 0; i < 5; i++) await alice.keyboard.press('Control+z');
  text = await converged([alice, bob]);
  assert.ok(text.includes('BOB1 base text'), text);
  assert.ok(!text.includes('alpha') && !text.includes('beta'), text);
  for (const p of [alice, bob]) assert.deepEqual(realProblems(p), []);
  for (const p of [alice, bob]) await p.context().close();
});

test('a snapshot reload keeps the selection on its text and the undo history', { timeout: 120000 }, async () => {
  const doc = uniqueDoc('snapshot');
  const alice = await open(doc, 'Alice');
  const bob = await open(doc, 'Bob');
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'base\n'));
  await converged([alice, bob]);
  await select(alice, 'base\n'.length);
  await alice.keyboard.type('alpha beta', { delay: 10 });
  await converged([alice, bob]);
  await select(alice, 'beta');
  // Alice goes away; Bob edits; Alice comes back asking for a snapshot (as after a refused
  // edit), so her editor gets the whole text again as one reset.
  await alice.evaluate(() => window.collabDemo.client.close());
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'BOB '));
  await waitSaved(bob);
  const resets = alice.evaluate(() => new Promise((resolve) => {
    const off = window.collabDemo.client.on('change', (c) => { if (c.reset) { off(); resolve(true); } });
  }));
  await alice.evaluate(() => { const c = window.collabDemo.client; c._resync = true; c.connect(); });
  assert.equal(await resets, true);
  let text = await converged([alice, bob]);
  assert.equal(text, 'BOB base\nalpha beta');
  assert.equal(await selectedText(alice), 'beta');
  // Alice's undo still knows her typing, mapped through the reload.
  await alice.keyboard.press('Control+z');
  text = await converged([alice, bob]);
  assert.equal(text, 'BOB base\n');
  for (const p of [alice, bob]) assert.deepEqual(realProblems(p), []);
  for (const p of [alice, bob]) await p.context().close();
});

test('remote edits wait while an IME composition is open and land when it ends', { timeout: 120000 }, async () => {
  const doc = uniqueDoc('ime');
  const alice = await open(doc, 'Alice');
  const bob = await open(doc, 'Bob');
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'one two'));
  await converged([alice, bob]);
  await select(alice, 'one two'.length);
  await alice.keyboard.type(' ', { delay: 5 });
  await converged([alice, bob]);

  // Chromium's own IME path, through the DevTools protocol: a composition that shows "にほ".
  const cdp = await alice.context().newCDPSession(alice);
  await cdp.send('Input.imeSetComposition', { text: 'に', selectionStart: 1, selectionEnd: 1 });
  await cdp.send('Input.imeSetComposition', { text: 'にほ', selectionStart: 2, selectionEnd: 2 });
  await alice.waitForFunction(() => window.collabDemo.view.composing, null, { timeout: 10000 });

  // Bob edits before the composition while it is open.
  await bob.evaluate(() => window.collabDemo.client.insert(0, 'REMOTE '));
  await alice.waitForFunction(() => window.collabDemo.client.text().startsWith('REMOTE '), null, { timeout: 10000 });
  // Alice's editor holds the remote edit back and the composition is still open.
  assert.equal(await alice.evaluate(() => window.collabDemo.view.composing), true);
  assert.ok(!(await editorText(alice)).startsWith('REMOTE '), 'the remote edit waits for the composition');
  assert.equal(await alice.evaluate(() => window.collabDemo.binding.pending.empty), false);

  // The user picks the conversion, still composing; the remote edit still waits.
  await cdp.send('Input.imeSetComposition', { text: '日本', selectionStart: 2, selectionEnd: 2 });
  await alice.waitForFunction(() => window.collabDemo.view.state.doc.toString().endsWith('日本'), null, { timeout: 10000 });
  assert.ok(!(await editorText(alice)).startsWith('REMOTE '), 'the remote edit waits for the composition');
  // The composition is committed; then the remote edit lands and all converge.
  await cdp.send('Input.insertText', { text: '日本' });
  const text = await converged([alice, bob]);
  assert.equal(text, 'REMOTE one two 日本');
  assert.equal(await alice.evaluate(() => window.collabDemo.view.composing), false);
  // The caret is after the composed text, not moved by the remote edit.
  assert.equal(await head(alice), text.length);
  await cdp.detach();
  for (const p of [alice, bob]) assert.deepEqual(realProblems(p), []);
  for (const p of [alice, bob]) await p.context().close();
});
