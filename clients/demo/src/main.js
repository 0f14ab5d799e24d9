// The demo editor at /: CodeMirror 6 bound to a collab-engine document through
// clients/codemirror/collab-codemirror.js, with line numbers, the connection and saved state,
// the people present and their carets, and the share link. The token (when the server checks
// them) comes from the page's own address, `/?doc=NAME&token=JWT`.
//
// Bundled with CodeMirror into dist/app.js by ../build.sh; the server embeds that file.
import { EditorState } from '@codemirror/state';
import { EditorView, keymap, lineNumbers, drawSelection, highlightActiveLine, highlightActiveLineGutter } from '@codemirror/view';
import { defaultKeymap, history, historyKeymap } from '@codemirror/commands';
import { CollabClient } from '../../js/collab.js';
import { collab, collabBinding } from '../../codemirror/collab-codemirror.js';

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
  window.history.replaceState(null, '', `${location.pathname}?${params}`);
}
const token = params.get('token') || null;
document.title = `${docName} · collab-engine`;
$('doc-name').value = docName;
$('doc-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('doc-name').value.trim();
  if (!name) return;
  const next = new URLSearchParams({ doc: name });
  if (token) next.set('token', token);
  location.search = `?${next}`;
});
// The share link names the document, never our token or name: everyone brings their own.
const share = new URL(location.href);
share.searchParams.delete('token');
share.searchParams.delete('name');
$('share-link').href = share.href;
$('share-link').textContent = share.href;

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
const client = new CollabClient({ url: wsBase, doc: docName, token, presence: null });

const view = new EditorView({
  parent: $('editor'),
  state: EditorState.create({
    doc: client.text(),
    extensions: [
      lineNumbers(),
      highlightActiveLineGutter(),
      highlightActiveLine(),
      drawSelection(),
      history(),
      keymap.of([...defaultKeymap, ...historyKeymap]),
      EditorView.lineWrapping,
      EditorView.contentAttributes.of({ spellcheck: 'false', 'aria-label': 'Document' }),
      collab(client, { presence: me }),
    ],
  }),
});
const binding = collabBinding(view);

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

// --- status, saved state, access -----------------------------------------------------
const STATUS_TEXT = {
  connecting: () => 'connecting…',
  online: (n) => `online · saving ${n} edit${n === 1 ? '' : 's'}…`,
  saved: () => 'online · all changes saved',
  offline: (n) => (n ? `offline · ${n} edit${n === 1 ? '' : 's'} not saved yet, reconnecting…` : 'offline · reconnecting…'),
  denied: () => `access denied: ${client.deniedReason}`,
};
function renderStatus() {
  const s = client.status;
  const readOnly = client.ready && client.role === 'read';
  $('status').dataset.status = s;
  $('status-text').textContent = STATUS_TEXT[s](client.pending) + (readOnly && s !== 'denied' ? ' · read-only' : '');
  const denied = $('denied');
  denied.hidden = s !== 'denied';
  if (s === 'denied') {
    denied.textContent = `access denied: ${client.deniedReason}. Open this page with a valid token (?token=…) to edit.`;
  }
  $('editor').classList.toggle('read-only', client.readOnly || !client.ready);
  const role = $('role');
  role.hidden = !client.ready || client.user === null;
  if (client.user !== null) role.textContent = `signed in as ${client.user} · ${client.role}${readOnly ? ' (read-only)' : ''}`;
}
client.on('status', renderStatus);
client.on('auth', renderStatus);
client.on('error', (e) => console.warn('collab error', e.code, e.message));
renderStatus();

// --- people ---------------------------------------------------------------------------
function renderPeople() {
  const ul = $('people');
  ul.replaceChildren();
  const doc = client.doc;
  const peers = [];
  for (const [replica, st] of client.peers) {
    if (!st || typeof st !== 'object') continue;
    const verified = client.peerUsers.get(replica);
    const chosen = typeof st.name === 'string' && st.name ? st.name.slice(0, 32) : `replica ${replica}`;
    const name = verified && verified.name ? verified.name.slice(0, 32) : chosen;
    const color = typeof st.color === 'string' && /^#[0-9a-fA-F]{3,8}$/.test(st.color) ? st.color : '#888';
    peers.push({ replica, name, color, head: st.head ?? null, user: verified ? verified.user : null });
  }
  peers.sort((a, b) => a.replica - b.replica);
  for (const p of peers) {
    const li = document.createElement('li');
    li.dataset.replica = String(p.replica);
    const sw = document.createElement('span');
    sw.className = 'swatch';
    sw.style.setProperty('--c', p.color);
    const nm = document.createElement('span');
    nm.className = 'name';
    nm.textContent = p.name;
    if (p.user) nm.title = p.user;
    const where = document.createElement('span');
    where.className = 'where';
    const validHead = Array.isArray(p.head) && p.head.length === 2 && Number.isSafeInteger(p.head[0]) && Number.isSafeInteger(p.head[1]);
    if (client.ready && validHead && doc.has(p.head)) where.textContent = `@${doc.positionOfAnchor(p.head)}`;
    li.append(sw, nm, where);
    ul.append(li);
  }
  $('alone').hidden = peers.length > 0;
}

// The sidebar and the stats at most once a frame, whatever the edit rate.
let frame = 0;
function scheduleRender() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    renderPeople();
    $('stats').textContent = `${client.doc.length} characters · replica ${client.replica ?? '…'}`;
  });
}
client.on('presence', scheduleRender);
client.on('change', scheduleRender);
client.on('status', scheduleRender);
scheduleRender();

// For the browser tests and for poking around in the console.
window.collabDemo = { client, view, binding, docName, me };
