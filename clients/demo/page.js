// What both demo pages share: the document from the address, the share link, who we are (a name
// and a colour), the connection and saved state, access (denied, read-only, signed in as) and
// the list of people present. Each page adds only its editor: the CodeMirror one at /
// (src/main.js, bundled with this file into dist/app.js) and the textarea one at /textarea
// (textarea.js, which imports this file as /page.js). Depends on nothing but the DOM.

/** Caret and swatch colours, by replica id. */
export const COLORS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#0f9b9b', '#d6338a', '#808000', '#9a6324', '#000075'];
const ADJECTIVES = ['amber', 'brisk', 'calm', 'dapper', 'eager', 'fuzzy', 'gentle', 'happy', 'jolly', 'keen', 'lucky', 'mellow', 'nimble', 'plucky', 'quiet', 'rapid', 'sunny', 'tidy', 'vivid', 'witty'];
const ANIMALS = ['otter', 'heron', 'lynx', 'panda', 'koala', 'falcon', 'badger', 'gecko', 'walrus', 'marten', 'puffin', 'tapir', 'ibis', 'yak', 'wombat', 'newt', 'crane', 'bison', 'lemur', 'orca'];

const pick = (a) => a[Math.floor(Math.random() * a.length)];

/** The element with this id. */
export const $ = (id) => document.getElementById(id);

/** Longest document name the server takes, in UTF-8 bytes. */
const DOC_NAME_BYTES_MAX = 512;

/**
 * Reads the page's address: the document (a fresh random name written back into the address
 * when there is none or it is over the limit) and the token, if any. Wires the document form
 * (which keeps the token) and the share link (which never carries our token or name: everyone
 * brings their own). Returns `{ params, docName, token, wsUrl }`.
 */
export function setUpPage() {
  const params = new URLSearchParams(location.search);
  let docName = params.get('doc');
  if (docName && new TextEncoder().encode(docName).length > DOC_NAME_BYTES_MAX) docName = null;
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
  const share = new URL(location.href);
  share.searchParams.delete('token');
  share.searchParams.delete('name');
  $('share-link').href = share.href;
  $('share-link').textContent = share.href;
  const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  return { params, docName, token, wsUrl };
}

/**
 * Who we are: a name per tab (from `?name=`, the tab's storage, or made up), editable in the
 * header, and a grey colour until `followReplica` gives it ours.
 */
export function identity(params) {
  const me = {
    name: params.get('name') || sessionStorage.getItem('collab-name') || `${pick(ADJECTIVES)} ${pick(ANIMALS)}`,
    color: '#888888',
  };
  sessionStorage.setItem('collab-name', me.name);
  $('me-name').value = me.name;
  $('me-swatch').style.setProperty('--c', me.color);
  return me;
}

/**
 * Keeps `me` current and published through `binding.setPresence`: the colour follows from our
 * replica id once the server gave us one (replicas are handed out in sequence, so people rarely
 * share one), and the name from the header's field.
 */
export function followReplica(client, binding, me) {
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
}

const STATUS_TEXT = {
  connecting: () => 'connecting…',
  online: (n) => `online · saving ${n} edit${n === 1 ? '' : 's'}…`,
  saved: () => 'online · all changes saved',
  offline: (n) => (n ? `offline · ${n} edit${n === 1 ? '' : 's'} not saved yet, reconnecting…` : 'offline · reconnecting…'),
  denied: (_n, client) => `access denied: ${client.deniedReason}`,
};

/**
 * Shows the connection and saved state, and access: the `denied` banner, read-only, and who
 * the server says we are; re-rendered on every status and token change.
 */
export function showStatus(client) {
  function render() {
    const s = client.status;
    const readOnly = client.ready && client.role === 'read';
    $('status').dataset.status = s;
    $('status-text').textContent = STATUS_TEXT[s](client.pending, client) + (readOnly && s !== 'denied' ? ' · read-only' : '');
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
  client.on('status', render);
  client.on('auth', render);
  client.on('error', (e) => console.warn('collab error', e.code, e.message));
  render();
}

/** Whether `a` is a well-formed item id (`[lamport, replica]`), as presence carets are. */
export const isAnchor = (a) => Array.isArray(a) && a.length === 2 && Number.isSafeInteger(a[0]) && Number.isSafeInteger(a[1]);

/**
 * The people present, by replica: the name the server verified from their token when there is
 * one, else the one they chose; a colour only when it is a colour; their caret (`head`) and
 * selection end (`anchor`) as sent (check them with `isAnchor`: presence is any JSON).
 */
export function peerList(client) {
  const out = [];
  for (const [replica, st] of client.peers) {
    if (!st || typeof st !== 'object') continue;
    const verified = client.peerUsers.get(replica);
    const chosen = typeof st.name === 'string' && st.name ? st.name.slice(0, 32) : `replica ${replica}`;
    const name = verified && verified.name ? verified.name.slice(0, 32) : chosen;
    const color = typeof st.color === 'string' && /^#[0-9a-fA-F]{3,8}$/.test(st.color) ? st.color : '#888';
    out.push({ replica, name, color, head: st.head ?? null, anchor: st.anchor ?? null, user: verified ? verified.user : null });
  }
  return out.sort((a, b) => a.replica - b.replica);
}

/** Fills the sidebar's list of people (with where their caret is) and the stats line. */
export function renderPeople(client) {
  const ul = $('people');
  ul.replaceChildren();
  const doc = client.doc;
  const peers = peerList(client);
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
    // Presence can overtake the edit it points into: no position until that edit arrives.
    if (client.ready && isAnchor(p.head) && doc.has(p.head)) where.textContent = `@${doc.positionOfAnchor(p.head)}`;
    li.append(sw, nm, where);
    ul.append(li);
  }
  $('alone').hidden = peers.length > 0;
  $('stats').textContent = `${doc.length} characters · replica ${client.replica ?? '…'}`;
}
