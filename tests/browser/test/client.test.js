// The client's connection logic against an in-memory server that follows the contract:
// coalescing, echoes and acks, reconnect with replay or snapshot, resends, lost history,
// presence.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { CollabClient, diffAroundCaret } from '../../../clients/js/collab.js';
import { startFakeServer, loseHistory, truncateHistory } from '../lib/fake-server.js';
import { rng, sleep } from '../lib/harness.js';


async function until(what, pred, timeoutMs = 10000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

function client(url, doc, extra = {}) {
  return new CollabClient({ url, doc, WebSocket, backoffMinMs: 20, backoffMaxMs: 200, ...extra });
}

function randomEdit(c, rand, alphabet = 'abcdefghij \n😀é') {
  const chars = Array.from(alphabet);
  const len = c.doc.length;
  if (len > 0 && rand() < 0.35) {
    const pos = Math.floor(rand() * len);
    c.delete(pos, Math.min(len - pos, 1 + Math.floor(rand() * 3)));
  } else {
    let s = '';
    const n = 1 + Math.floor(rand() * 4);
    for (let i = 0; i < n; i++) s += chars[Math.floor(rand() * chars.length)];
    c.insert(Math.floor(rand() * (len + 1)), s);
  }
}

test('diffAroundCaret finds the edit at the caret', () => {
  assert.deepEqual(diffAroundCaret('aa', 'aaa', 1), [0, 0, 'a']);
  assert.deepEqual(diffAroundCaret('aa', 'aaa', 3), [2, 0, 'a']);
  assert.deepEqual(diffAroundCaret('abc', 'ac', 1), [1, 1, '']);
  assert.deepEqual(diffAroundCaret('hello world', 'hello brave world', 12), [6, 0, 'brave ']);
  assert.deepEqual(diffAroundCaret('x😀y', 'x😁y', 3), [1, 2, '😁']);
  assert.deepEqual(diffAroundCaret('abc', 'xyz', 3), [0, 3, 'xyz']);
});

test('two clients edit concurrently and converge; keystrokes coalesce', async () => {
  const srv = await startFakeServer();
  const a = client(srv.url, 'conv');
  const b = client(srv.url, 'conv');
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    assert.notEqual(a.replica, b.replica);
    // Typing 50 characters within one flush window gives one op message with one op.
    const before = srv.stats.opMessages;
    for (const ch of 'The quick brown fox jumps over the lazy dog, again!') a.insert(a.doc.length, ch);
    await a.whenSaved();
    assert.equal(srv.stats.opMessages - before, 1);
    const last = srv.stats.received.filter((m) => m.type === 'op').at(-1);
    assert.equal(last.ops.length, 1);
    await until('b sees a', () => b.text() === a.text());
    // Random concurrent edits.
    const rand = rng(42);
    for (let round = 0; round < 30; round++) {
      for (let k = 0; k < 5; k++) { randomEdit(a, rand); randomEdit(b, rand); }
      if (round % 3 === 0) await sleep(rand() * 20);
    }
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    await until('convergence', () => a.text() === b.text() && a.since === b.since);
    assert.equal(a.text(), srv.rooms.get('conv').rga.text());
    a.doc.check();
    b.doc.check();
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('change events rebuild the remote text', async () => {
  const srv = await startFakeServer();
  const a = client(srv.url, 'events');
  const b = client(srv.url, 'events');
  let mirror = '';
  b.on('change', (c) => { mirror = mirror.slice(0, c.index16) + c.text + mirror.slice(c.index16 + c.length16); });
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    const rand = rng(7);
    for (let i = 0; i < 200; i++) { randomEdit(a, rand); if (i % 10 === 0) await sleep(1); }
    await a.whenSaved();
    await until('b caught up', () => b.text() === a.text());
    assert.equal(mirror, a.text());
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('server restart: clients reconnect, resend unacknowledged edits once, converge', async () => {
  let srv = await startFakeServer();
  const port = srv.port;
  const rooms = srv.rooms;
  const a = client(srv.url, 'restart');
  const b = client(srv.url, 'restart');
  const statuses = [];
  a.on('status', (s) => statuses.push(s.status));
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    a.insert(0, 'hello');
    await a.whenSaved();
    await until('b', () => b.text() === 'hello');
    await srv.stop({ abrupt: true });
    await until('a offline', () => a.status === 'offline');
    // Edits while offline are kept and sent after the reconnect.
    a.insert(5, ' world');
    b.insert(0, '>> ');
    assert.ok(a.pending > 0);
    srv = await startFakeServer({ port, rooms });
    await until('reconnect', () => a.status === 'saved' && b.status === 'saved' && a.text() === b.text());
    assert.equal(a.text(), '>> hello world');
    assert.ok(statuses.includes('offline') && statuses.includes('connecting'));
    // The replay path was used: each client said since/epoch.
    const rehellos = srv.stats.hellos;
    assert.ok(rehellos.every((h) => Number.isSafeInteger(h.since) && typeof h.epoch === 'string'));
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('a resend that the server already integrated is answered by ack and applied once', async () => {
  const srv = await startFakeServer();
  const a = client(srv.url, 'resend');
  try {
    await a.whenSaved();
    // Drop the echo of the next op message: the server applies it, the client never hears.
    const room = () => srv.rooms.get('resend');
    a.insert(0, 'abc');
    a.flush();
    const sock = [...room().conns.values()][0].ws;
    const origSend = sock.send.bind(sock);
    sock.send = () => {};
    await until('applied on server', () => room().rga.text() === 'abc');
    await sleep(20);
    assert.equal(a.pending, 1);
    sock.send = origSend;
    // Force a snapshot on reconnect (as after an op log truncation): pending ops are kept,
    // re-applied and resent with their client_seq, and the server acks them.
    srv.knobs.snapshotOnly = true;
    sock.terminate();
    await until('saved', () => a.status === 'saved');
    assert.equal(a.text(), 'abc');
    assert.equal(room().rga.text(), 'abc');
    assert.equal(room().head, 1);
  } finally {
    a.close(); await srv.stop();
  }
});

test('lost history (new epoch): edits the server lost are sent again', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'lost');
  try {
    await a.whenSaved();
    a.insert(0, 'kept?');
    await a.whenSaved();
    await srv.stop({ abrupt: true });
    await until('offline', () => a.status === 'offline');
    a.insert(5, ' yes');
    a.delete(0, 1);
    loseHistory(rooms, 'lost');
    srv = await startFakeServer({ port, rooms });
    await until('saved', () => a.status === 'saved');
    // The server lost "kept?" although it had acknowledged it: the client sends it again and
    // the edits made on top of it, with their original ids.
    assert.equal(a.text(), 'ept? yes');
    assert.equal(rooms.get('lost').rga.text(), 'ept? yes');
    a.insert(0, 'new ');
    await a.whenSaved();
    assert.equal(rooms.get('lost').rga.text(), a.text());
    assert.ok(a.text().startsWith('new '));
  } finally {
    a.close(); await srv.stop();
  }
});

test('lost history keeps edits that still have their anchor', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'lost2');
  try {
    await a.whenSaved();
    await srv.stop({ abrupt: true });
    await until('offline', () => a.status === 'offline');
    a.insert(0, 'typed offline');
    a.delete(0, 6);
    loseHistory(rooms, 'lost2');
    // The client had seen an epoch; the server comes back with another.
    srv = await startFakeServer({ port, rooms });
    await until('saved', () => a.status === 'saved');
    assert.equal(a.text(), 'offline');
    assert.equal(rooms.get('lost2').rga.text(), 'offline');
  } finally {
    a.close(); await srv.stop();
  }
});

/** The op messages a server received, as `{client_seq, ops}`. */
function opMessages(srv) {
  return srv.stats.received.filter((m) => m.type === 'op').map((m) => ({ client_seq: m.client_seq, ops: m.ops }));
}

/** Stops the server abruptly and waits until every client saw it. */
async function crash(srv, ...clients) {
  await srv.stop({ abrupt: true });
  await until('offline', () => clients.every((c) => c.status === 'offline'));
}

test('lost history (new epoch): only the ops that still apply are sent again, with their ids and client_seq', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'rule');
  const b = client(srv.url, 'rule');
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    a.insert(0, 'hello');
    await a.whenSaved();
    await until('b has hello', () => b.text() === 'hello');
    b.insert(5, ' world');
    await b.whenSaved();
    await until('a has world', () => a.text() === 'hello world');
    // One message with two ops: a delete of our own "h" and an insert after Bob's "d".
    a.delete(0, 1);
    a.insert(a.doc.length, '!');
    await a.whenSaved();
    const sent = opMessages(srv).filter((m) => m.ops.every((op) => op.id[1] === a.replica));
    assert.equal(sent.length, 2);
    assert.deepEqual(sent[1].ops.map((op) => op.kind), ['del', 'ins']);
    // Anchors taken before the loss (what the editor bindings keep for the selection).
    const anchorE = a.doc.anchorAt(1); // after "e" of hello
    b.close();
    await crash(srv, a);
    // Made offline: pending when the server comes back.
    a.insert(0, '>');
    const offline = a._outbox.map((op) => structuredClone(op));
    loseHistory(rooms, 'rule');
    srv = await startFakeServer({ port, rooms });
    await until('a saved', () => a.status === 'saved');
    // Bob's " world" is gone, so the insert after it cannot apply: of the second message only
    // the delete is sent again. Both keep their client_seq and ids; the offline edit follows.
    const resent = opMessages(srv);
    assert.deepEqual(resent.slice(0, 2), [sent[0], { client_seq: sent[1].client_seq, ops: [sent[1].ops[0]] }]);
    assert.equal(resent.length, 3);
    assert.deepEqual(resent[2].ops, offline);
    assert.ok(resent[2].client_seq > sent[1].client_seq);
    assert.equal(a.text(), '>ello');
    assert.equal(rooms.get('rule').rga.text(), '>ello');
    // Same ids, so anchors resolve as they are.
    assert.equal(a.resolveId(anchorE), anchorE);
    assert.equal(a.doc.positionOfAnchor(a.resolveId(anchorE)), 2);
    // Newer edits go after the resends, and nothing is sent twice.
    a.insert(a.doc.length, '.');
    await a.whenSaved();
    assert.equal(opMessages(srv).length, 4);
    assert.equal(rooms.get('rule').rga.text(), '>ello.');
    a.doc.check();
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('lost history (head < since, same epoch): the ops past the server head are sent again', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'tail');
  try {
    await a.whenSaved();
    for (const word of ['one', ' two', ' three']) {
      a.insert(a.doc.length, word);
      await a.whenSaved();
    }
    const sent = opMessages(srv);
    assert.equal(sent.length, 3);
    const epoch = a.epoch;
    await crash(srv, a);
    a.delete(0, 1); // "one" -> "ne": targets an op the server keeps
    truncateHistory(rooms, 'tail', 1);
    srv = await startFakeServer({ port, rooms });
    await until('saved', () => a.status === 'saved');
    assert.equal(srv.stats.hellos[0].since, 3);
    assert.equal(a.epoch, epoch);
    // Message 1 ("one") is still on the server: it changes nothing and is not sent again.
    const resent = opMessages(srv);
    assert.deepEqual(resent.slice(0, 2), sent.slice(1));
    assert.equal(resent.length, 3);
    assert.deepEqual(resent[2].ops, [{ kind: 'del', id: sent[0].ops[0].id, len: 1 }]);
    assert.equal(a.text(), 'ne two three');
    assert.equal(rooms.get('tail').rga.text(), 'ne two three');
    assert.equal(rooms.get('tail').head, 4); // 1 kept, 2 sent again, 1 made offline
  } finally {
    a.close(); await srv.stop();
  }
});

test('lost history: two clients that both lost edits converge', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'both');
  const b = client(srv.url, 'both');
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    a.insert(0, 'hello');
    await a.whenSaved();
    await until('b', () => b.text() === 'hello');
    b.insert(5, ' world');
    await b.whenSaved();
    await until('a', () => a.text() === 'hello world');
    a.insert(11, '!'); // after Bob's "d": lost for good if Alice resends before Bob
    await a.whenSaved();
    await until('b', () => b.text() === 'hello world!');
    await crash(srv, a, b);
    a.delete(0, 1);
    b.insert(11, '?'); // after his own "d", before Alice's "!"
    b.close();
    loseHistory(rooms, 'both');
    srv = await startFakeServer({ port, rooms });
    // Alice first: her "hello" and the delete apply; her "!" names Bob's lost text and is dropped.
    await until('a saved', () => a.status === 'saved');
    assert.equal(a.text(), 'ello');
    // Bob then: " world" names Alice's "o", which her resend brought back; "?" follows it.
    b.connect();
    await until('b saved', () => b.status === 'saved');
    await until('converged', () => a.text() === b.text() && a.since === b.since);
    assert.equal(a.text(), 'ello world?');
    assert.equal(rooms.get('both').rga.text(), 'ello world?');
    // Every resend kept its original client_seq: Bob's are his two messages, seq 0 and 1.
    const bobs = opMessages(srv).filter((m) => m.ops[0].id[1] === b.replica);
    assert.deepEqual(bobs.map((m) => m.client_seq), [0, 1]);
    a.doc.check();
    b.doc.check();
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('lost history: acknowledged messages past historyMax are forgotten', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'bound', { historyMax: 3 });
  try {
    await a.whenSaved();
    for (const ch of 'abcde') {
      a.insert(0, ch);
      await a.whenSaved();
    }
    assert.equal(a.text(), 'edcba');
    await crash(srv, a);
    loseHistory(rooms, 'bound');
    srv = await startFakeServer({ port, rooms });
    await until('saved', () => a.status === 'saved');
    // Only the last three acknowledged messages were kept, so only they come back.
    assert.deepEqual(opMessages(srv).map((m) => m.client_seq), [2, 3, 4]);
    assert.equal(a.text(), 'edc');
    assert.equal(rooms.get('bound').rga.text(), 'edc');
  } finally {
    a.close(); await srv.stop();
  }
});

/** Makes `n` acknowledged messages on `c`, each one character typed at the start. */
async function typeMessages(c, n) {
  for (let i = 0; i < n; i++) {
    c.insert(0, String.fromCharCode(0x61 + (i % 26)));
    await c.whenSaved();
  }
}

test('lost history: a resend of many messages is paced under the server rate limit', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  const a = client(srv.url, 'paced', { sendBurst: 20, sendRate: 100 });
  const errors = [];
  a.on('error', (e) => errors.push(e.code));
  try {
    await a.whenSaved();
    await typeMessages(a, 120);
    const text = a.text();
    await crash(srv, a);
    loseHistory(rooms, 'paced');
    srv = await startFakeServer({ port, rooms });
    srv.knobs.rateLimit = { perSecond: 200, burst: 40 };
    await until('saved', () => a.status === 'saved');
    assert.equal(srv.stats.rateLimited, 0);
    assert.deepEqual(errors, []);
    assert.deepEqual(opMessages(srv).map((m) => m.client_seq), [...Array(120).keys()]);
    assert.equal(rooms.get('paced').rga.text(), text);
    assert.equal(a.text(), text);
  } finally {
    a.close(); await srv.stop();
  }
});

test('a rate_limited message stays pending and is sent again after a reconnect', async () => {
  let srv = await startFakeServer();
  const { port, rooms } = srv;
  // No pacing to speak of on the client: the server refuses most of the resend.
  const a = client(srv.url, 'limited', { sendBurst: 1e6, sendRate: 1e6 });
  const errors = [];
  a.on('error', (e) => errors.push(e.code));
  try {
    await a.whenSaved();
    await typeMessages(a, 120);
    const text = a.text();
    await crash(srv, a);
    loseHistory(rooms, 'limited');
    srv = await startFakeServer({ port, rooms });
    srv.knobs.rateLimit = { perSecond: 200, burst: 40 };
    await until('saved', () => a.status === 'saved' && a.pending === 0, 30000);
    assert.ok(srv.stats.rateLimited > 0 && errors.includes('rate_limited'));
    // Nothing was dropped and each message applied once. (Not always in client_seq order: a
    // message after a refused one passes once the bucket has refilled, and the refused one
    // comes with the resend; these inserts do not depend on each other, so the text is the same.)
    const room = rooms.get('limited');
    assert.equal(room.rga.text(), text);
    assert.equal(a.text(), text);
    assert.deepEqual(room.log.map((e) => e.client_seq).sort((x, y) => x - y), [...Array(120).keys()]);
  } finally {
    a.close(); await srv.stop();
  }
});

test('presence reaches the others and is cleared when a client leaves', async () => {
  const srv = await startFakeServer();
  const a = client(srv.url, 'pres', { presence: { name: 'Ada' } });
  const b = client(srv.url, 'pres');
  try {
    await Promise.all([a.whenSaved(), b.whenSaved()]);
    await until('b sees Ada', () => [...b.peers.values()].some((s) => s.name === 'Ada'));
    b.setPresence({ name: 'Bob', head: null });
    await until('a sees Bob', () => a.peers.get(b.replica)?.name === 'Bob');
    const left = new Promise((resolve) => b.on('presence', (p) => { if (p.replica === a.replica && p.state === null) resolve(); }));
    a.close();
    await left;
    assert.equal(b.peers.size, 0);
  } finally {
    a.close(); b.close(); await srv.stop();
  }
});

test('a refused op is dropped and the client resyncs from a snapshot', async () => {
  const srv = await startFakeServer();
  const a = client(srv.url, 'refused');
  const errors = [];
  a.on('error', (e) => errors.push(e.code));
  try {
    await a.whenSaved();
    a.insert(0, 'ok');
    await a.whenSaved();
    // Forge an edit the server must refuse (an id of another replica).
    a.doc.applyOps([{ kind: 'ins', id: [100, a.replica + 1], after: null, text: 'bad' }]);
    a._queue([{ kind: 'ins', id: [100, a.replica + 1], after: null, text: 'bad' }]);
    await until('error', () => errors.includes('invalid_op'));
    await until('resynced', () => a.status === 'saved' && a.text() === 'ok');
  } finally {
    a.close(); await srv.stop();
  }
});
