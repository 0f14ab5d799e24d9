// Helpers for driving the CodeMirror demo page (/) in Chromium: open it, read the editor's
// and the replica's text, wait for pages to converge.
import assert from 'node:assert/strict';
import { sleep } from './harness.js';

/**
 * Opens the demo for `doc` in a fresh browser context (its own window); `query` adds URL
 * parameters (e.g. `{ token }`). Collects page errors in `page.problems`. With `wait`
 * ('saved' by default) it returns once the page is joined and saved.
 */
export async function openDemo(browser, http, doc, name, { query = {}, wait = 'saved' } = {}) {
  const ctx = await browser.newContext({ viewport: { width: 900, height: 560 } });
  const page = await ctx.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.problems = problems;
  const params = new URLSearchParams({ doc, name, ...query });
  await page.goto(`${http}/?${params}`);
  if (wait === 'saved') await waitSaved(page);
  return page;
}

/** Waits until the page's client is joined with nothing pending and the page says so. */
export async function waitSaved(page, timeout = 20000) {
  await page.waitForFunction(() => window.collabDemo && window.collabDemo.client.status === 'saved' &&
    document.getElementById('status').dataset.status === 'saved', null, { timeout });
}

/** The editor's text (CodeMirror's document). */
export const editorText = (page) => page.evaluate(() => window.collabDemo.view.state.doc.toString());
/** The client replica's text. */
export const replicaText = (page) => page.evaluate(() => window.collabDemo.client.text());

/** Waits until every page shows the same text in its editor and its replica, all saved. */
export async function converged(pages, timeout = 20000) {
  const t0 = Date.now();
  for (;;) {
    const states = [];
    for (const p of pages) {
      states.push(await p.evaluate(() => ({
        editor: window.collabDemo.view.state.doc.toString(),
        replica: window.collabDemo.client.text(),
        status: window.collabDemo.client.status,
        pending: window.collabDemo.binding.pending.empty,
      })));
    }
    const texts = states.flatMap((s) => [s.editor, s.replica]);
    if (texts.every((t) => t === texts[0]) && states.every((s) => s.status === 'saved' && s.pending)) return texts[0];
    if (Date.now() - t0 > timeout) assert.fail(`pages did not converge: ${JSON.stringify(states)}`);
    await sleep(50);
  }
}

/** Whether the characters of `small` appear in `big` in order. */
export function isSubsequence(small, big) {
  const chars = Array.from(small);
  let i = 0;
  for (const ch of big) if (i < chars.length && ch === chars[i]) i++;
  return i === chars.length;
}

/** Places the page's selection on the first occurrence of `text` (or a caret at `pos`). */
export async function select(page, textOrPos, len = 0) {
  await page.evaluate(([what, n]) => {
    const { view } = window.collabDemo;
    const from = typeof what === 'string' ? view.state.doc.toString().indexOf(what) : what;
    if (from < 0) throw new Error(`no ${what} in the editor`);
    const to = typeof what === 'string' ? from + what.length : from + n;
    view.focus();
    view.dispatch({ selection: { anchor: from, head: to } });
  }, [textOrPos, len]);
}

/** The selected text of the page's editor. */
export const selectedText = (page) => page.evaluate(() => {
  const { view } = window.collabDemo;
  const r = view.state.selection.main;
  return view.state.sliceDoc(r.from, r.to);
});

/** Page errors other than the failed WebSocket connections while a server was down. */
export const realProblems = (page) => page.problems.filter((m) => !/WebSocket|ERR_CONNECTION_REFUSED|Failed to load resource/.test(m));
