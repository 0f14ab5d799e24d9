// The zero-dependency demo at /textarea: one <textarea> bound to a collab-engine document,
// the connection and saved state, the people present and their carets. Served by the server
// itself, no build step (the main demo at / is the CodeMirror one, src/main.js); the page's
// chrome (document, share link, name, status and access, people) is page.js, as on /.
import { CollabClient, TextareaBinding } from '/collab.js';
import { $, setUpPage, identity, followReplica, showStatus, peerList, renderPeople, isAnchor } from '/page.js';

const { params, docName, token, wsUrl } = setUpPage();
const me = identity(params);
const client = new CollabClient({ url: wsUrl, doc: docName, token: token || undefined });
const ta = $('editor');
const binding = new TextareaBinding(ta, client, { presence: me });

followReplica(client, binding, me);
showStatus(client);

// --- carets ---------------------------------------------------------------------------
/**
 * Draws the other people's carets and selections in an overlay laid out like the textarea:
 * one block per paragraph, and only the paragraphs whose text or marks changed are rebuilt,
 * so the browser re-lays out a few lines per keystroke, not the whole document.
 */
let paraKeys = [];
function renderCarets() {
  const box = $('carets');
  box.style.left = `${ta.offsetLeft + ta.clientLeft}px`;
  box.style.top = `${ta.offsetTop + ta.clientTop}px`;
  box.style.width = `${ta.clientWidth}px`;
  box.style.height = `${ta.clientHeight}px`;
  const doc = client.doc;
  const marks = [];
  for (const p of client.ready ? peerList(client) : []) {
    const valid = (a) => a === null || isAnchor(a);
    if (!valid(p.head) || !valid(p.anchor)) continue;
    // Presence can overtake the edit it points into; draw the caret once that edit arrives.
    if ((p.head && !doc.has(p.head)) || (p.anchor && !doc.has(p.anchor))) continue;
    const head = doc.cpToUtf16(doc.positionOfAnchor(p.head));
    const anchor = doc.cpToUtf16(doc.positionOfAnchor(p.anchor));
    if (anchor !== head) {
      marks.push({ at: Math.min(anchor, head), kind: 'sel-start', p }, { at: Math.max(anchor, head), kind: 'sel-end', p });
    }
    marks.push({ at: head, kind: 'caret', p });
  }
  if (!marks.length) {
    if (paraKeys.length) { box.replaceChildren(); paraKeys = []; }
    return;
  }
  const order = { 'sel-end': 0, caret: 1, 'sel-start': 2 };
  marks.sort((a, b) => a.at - b.at || order[a.kind] - order[b.kind]);
  // Split into paragraphs, each with its marks and the selections open at its start.
  const paras = ta.value.split('\n');
  const keys = new Array(paras.length);
  const specs = new Array(paras.length);
  const open = [];
  const markKey = (m) => `${m.kind}:${m.at}:${m.p.replica}:${m.p.name}:${m.p.color}`;
  let start = 0;
  let mi = 0;
  for (let i = 0; i < paras.length; i++) {
    const end = start + paras[i].length;
    const spec = { text: paras[i], open: [...open], marks: [] };
    while (mi < marks.length && marks[mi].at <= end) {
      const m = marks[mi++];
      spec.marks.push({ ...m, at: m.at - start });
      if (m.kind === 'sel-start') open.push(m.p);
      else if (m.kind === 'sel-end') open.splice(open.indexOf(m.p), 1);
    }
    specs[i] = spec;
    keys[i] = `${spec.text}\u0000${spec.open.map((p) => p.color).join()}\u0000${spec.marks.map(markKey).join()}`;
    start = end + 1;
  }
  // Rebuild only the changed middle: keep the common prefix and suffix of paragraphs.
  let pre = 0;
  const maxPre = Math.min(keys.length, paraKeys.length);
  while (pre < maxPre && keys[pre] === paraKeys[pre]) pre++;
  let suf = 0;
  while (suf < maxPre - pre && keys[keys.length - 1 - suf] === paraKeys[paraKeys.length - 1 - suf]) suf++;
  for (let i = paraKeys.length - suf - 1; i >= pre; i--) box.children[i].remove();
  const frag = document.createDocumentFragment();
  for (let i = pre; i < keys.length - suf; i++) frag.append(paragraphEl(specs[i]));
  box.insertBefore(frag, box.children[pre] || null);
  paraKeys = keys;
  box.scrollTop = ta.scrollTop;
}

function paragraphEl(spec) {
  const div = document.createElement('div');
  const open = [...spec.open];
  let at = 0;
  const pushText = (s) => {
    if (!s) return;
    if (open.length) {
      const span = document.createElement('span');
      span.className = 'sel';
      span.style.setProperty('--c', open[open.length - 1].color);
      span.textContent = s;
      div.append(span);
    } else div.append(s);
  };
  for (const m of spec.marks) {
    pushText(spec.text.slice(at, m.at));
    at = m.at;
    if (m.kind === 'sel-start') open.push(m.p);
    else if (m.kind === 'sel-end') open.splice(open.indexOf(m.p), 1);
    else {
      const c = document.createElement('span');
      c.className = 'rc';
      c.dataset.name = m.p.name;
      c.dataset.replica = String(m.p.replica);
      c.style.setProperty('--c', m.p.color);
      div.append(c);
    }
  }
  pushText(spec.text.slice(at));
  // An empty paragraph still takes up a line, as in the textarea.
  if (!spec.text) div.append('\u200b');
  return div;
}

// Renders are spaced by a few times their own cost, so a slow one (the first overlay of a big
// document) never makes typing lag.
let frame = 0;
let renderCostMs = 0;
let lastRenderAt = 0;
function scheduleRender() {
  if (frame) return;
  const wait = Math.max(0, lastRenderAt + Math.min(500, renderCostMs * 4) - performance.now());
  frame = setTimeout(() => requestAnimationFrame(() => {
    const t0 = performance.now();
    renderPeople(client);
    renderCarets();
    void $('carets').offsetHeight; // Count the layout in the cost.
    lastRenderAt = performance.now();
    renderCostMs = lastRenderAt - t0;
    frame = 0;
  }), wait);
}
client.on('presence', scheduleRender);
client.on('change', scheduleRender);
client.on('status', scheduleRender);
ta.addEventListener('input', scheduleRender);
ta.addEventListener('scroll', () => { $('carets').scrollTop = ta.scrollTop; });
window.addEventListener('resize', scheduleRender);
scheduleRender();

// For the browser tests and for poking around in the console.
window.collabDemo = { client, binding, docName, me };
