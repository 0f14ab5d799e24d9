// The zero-dependency demo at /textarea: one <textarea> bound to a collab-engine document,
// the connection and saved state, the people present and their carets. Served by the server
// itself, no build step (the main demo at / is the CodeMirror one, src/main.js).
import { CollabClient, TextareaBinding } from '/collab.js';

const COLORS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#0f9b9b', '#d6338a', '#808000', '#9a6324', '#000075'];
const ADJECTIVES = ['amber', 'brisk', 'calm', 'dapper', 'eager', 'fuzzy', 'gentle', 'happy', 'jolly', 'keen', 'lucky', 'mellow', 'nimble', 'plucky', 'quiet', 'rapid', 'sunny', 'tidy', 'vivid', 'witty'];
const ANIMALS = ['otter', 'heron', 'lynx', 'panda', 'koala', 'falcon', 'badger', 'gecko', 'walrus', 'marten', 'puffin', 'tapir', 'ibis', 'yak', 'wombat', 'newt', 'crane', 'bison', 'lemur', 'orca'];

const pick = (a) => a[Math.floor(Math.random() * a.length)];
const $ = (id) => document.getElementById(id);

// The document comes from the URL; without one, offer a fresh random name.
const params = new URLSearchParams(location.search);
let docName = params.get('doc');
if (docName && new TextEncoder().encode(docName).length > 512) docName = null; // Over the limit.
if (!docName) {
  docName = `${pick(ADJECTIVES)}-${pick(ANIMALS)}-${Math.floor(Math.random() * 1000)}`;
  params.set('doc', docName);
  history.replaceState(null, '', `${location.pathname}?${params}`);
}
document.title = `${docName} · collab-engine`;
$('doc-name').value = docName;
$('doc-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('doc-name').value.trim();
  if (name) location.search = `?doc=${encodeURIComponent(name)}`;
});
$('share-link').href = location.href;
$('share-link').textContent = location.href;

// Who we are: a name per tab (editable), and a colour that follows from our replica id once
// the server gave us one (replicas are handed out in sequence, so people rarely share one).
const me = {
  name: params.get('name') || sessionStorage.getItem('collab-name') || `${pick(ADJECTIVES)} ${pick(ANIMALS)}`,
  color: '#888888',
};
sessionStorage.setItem('collab-name', me.name);
$('me-name').value = me.name;
$('me-swatch').style.setProperty('--c', me.color);

const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
const client = new CollabClient({ url: wsBase, doc: docName, token: params.get('token') || undefined });
const ta = $('editor');
const binding = new TextareaBinding(ta, client, { presence: me });

client.on('status', () => {
  if (client.replica === null) return;
  const color = COLORS[(client.replica - 1) % COLORS.length];
  if (color === me.color) return;
  me.color = color;
  $('me-swatch').style.setProperty('--c', me.color);
  binding.setPresence({ ...me });
});

$('me-name').addEventListener('input', () => {
  me.name = $('me-name').value.trim().slice(0, 32) || 'anonymous';
  sessionStorage.setItem('collab-name', me.name);
  binding.setPresence({ ...me });
});

// --- status and saved state ----------------------------------------------------------
const STATUS_TEXT = {
  connecting: () => 'connecting…',
  online: (n) => `online · saving ${n} edit${n === 1 ? '' : 's'}…`,
  saved: () => 'online · all changes saved',
  offline: (n) => (n ? `offline · ${n} edit${n === 1 ? '' : 's'} not saved yet, reconnecting…` : 'offline · reconnecting…'),
  denied: () => `access denied: ${client.deniedReason}`,
};
function renderStatus() {
  const s = client.status;
  $('status').dataset.status = s;
  $('status-text').textContent = STATUS_TEXT[s](client.pending);
}
client.on('status', renderStatus);
client.on('error', (e) => console.warn('collab error', e.code, e.message));
renderStatus();

// --- people and carets ----------------------------------------------------------------
function peerList() {
  const out = [];
  for (const [replica, st] of client.peers) {
    if (!st || typeof st !== 'object') continue;
    const name = typeof st.name === 'string' && st.name ? st.name.slice(0, 32) : `replica ${replica}`;
    const color = typeof st.color === 'string' && /^#[0-9a-fA-F]{3,8}$/.test(st.color) ? st.color : '#888';
    out.push({ replica, name, color, anchor: st.anchor ?? null, head: st.head ?? null });
  }
  return out.sort((a, b) => a.replica - b.replica);
}

function renderPeople() {
  const ul = $('people');
  ul.replaceChildren();
  const doc = client.doc;
  const peers = peerList();
  for (const p of peers) {
    const li = document.createElement('li');
    li.dataset.replica = String(p.replica);
    const sw = document.createElement('span');
    sw.className = 'swatch';
    sw.style.setProperty('--c', p.color);
    const nm = document.createElement('span');
    nm.className = 'name';
    nm.textContent = p.name;
    const where = document.createElement('span');
    where.className = 'where';
    if (client.ready && Array.isArray(p.head)) where.textContent = `@${doc.positionOfAnchor(p.head)}`;
    li.append(sw, nm, where);
    ul.append(li);
  }
  $('alone').hidden = peers.length > 0;
}

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
  for (const p of client.ready ? peerList() : []) {
    const valid = (a) => a === null || (Array.isArray(a) && a.length === 2 && Number.isSafeInteger(a[0]) && Number.isSafeInteger(a[1]));
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
    renderPeople();
    renderCarets();
    $('stats').textContent = `${client.doc.length} characters · replica ${client.replica ?? '…'}`;
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
