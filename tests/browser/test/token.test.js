// The JS client's token handling (issue 9's wire extensions): a token function asked before
// every connection and again before `exp` (refresh in place with `auth`), `unauthorized` and
// the 1008 closes after it as a terminal `denied` status, the `read` role. The server side is
// a scripted WebSocket server on 127.0.0.1 that answers exactly as docs/protocol.md says;
// the same client against the real binary with `--auth-key-file` is at the end.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';
import { CollabClient } from '../../../clients/js/collab.js';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, tempDir, serverBin } from '../lib/harness.js';
import { mintHs256, supportsAuthKeys } from '../lib/jwt.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, pred, timeoutMs = 10000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/**
 * A WebSocket server whose answer to each message is `script(msg, ws, conn)`; it records
 * every connection and message. `hello_ack`s are built by `ack(extra)`.
 */
async function scripted(script) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const seen = { conns: 0, messages: [] };
  wss.on('connection', (ws) => {
    const conn = ++seen.conns;
    ws.on('message', (data) => {
      const msg = JSON.parse(String(data));
      seen.messages.push({ conn, msg });
      script(msg, ws, conn);
    });
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}`,
    seen,
    hellos: () => seen.messages.filter((m) => m.msg.type === 'hello').map((m) => m.msg),
    close: () => new Promise((r) => { for (const c of wss.clients) c.terminate(); wss.close(r); }),
  };
}

const ack = (extra = {}) => JSON.stringify({
  type: 'hello_ack', version: 1, replica: 7, epoch: 'e1', head: 0, strategy: 'snapshot',
  snapshot: { runs: [] }, presence: [], ...extra,
});

function client(url, extra = {}) {
  return new CollabClient({ url, doc: 'd', WebSocket, backoffMinMs: 20, backoffMaxMs: 40, ...extra });
}

test('a token function is asked before each connection and again before exp (auth refresh)', async () => {
  let exp = Math.floor(Date.now() / 1000) + 3;
  const srv = await scripted((msg, ws) => {
    if (msg.type === 'hello') ws.send(ack({ role: 'write', user: 'alice', exp }));
    if (msg.type === 'auth') { exp += 3600; ws.send(JSON.stringify({ type: 'auth_ack', exp, role: 'read' })); }
  });
  let n = 0;
  const c = client(srv.url, { token: async () => `tok-${++n}`, refreshBeforeMs: 2000 });
  const refreshed = new Promise((r) => c.on('auth', r));
  await until('join', () => c.status === 'saved');
  assert.equal(srv.hellos()[0].token, 'tok-1');
  assert.equal(c.user, 'alice');
  assert.equal(c.role, 'write');
  assert.equal(c.readOnly, false);
  // The token lives 3 s and refreshes at most half its lifetime early: the refresh comes
  // on the same connection, with a fresh token from the function.
  const ev = await refreshed;
  assert.equal(ev.exp, exp);
  assert.equal(c.exp, exp);
  // The refreshed token allows reading only (this server says so in auth_ack).
  assert.equal(ev.role, 'read');
  assert.equal(c.readOnly, true);
  const auths = srv.seen.messages.filter((m) => m.msg.type === 'auth');
  assert.deepEqual(auths.map((m) => [m.conn, m.msg.token]), [[1, 'tok-2']]);
  assert.equal(srv.seen.conns, 1);
  c.close();
  await srv.close();
});

test('unauthorized is terminal: status denied with the reason, no reconnect loop', async () => {
  const srv = await scripted((msg, ws) => {
    if (msg.type !== 'hello') return;
    ws.send(JSON.stringify({ type: 'error', code: 'unauthorized', message: 'token expired at 1700000000' }));
    ws.close(1008, 'token expired');
  });
  const statuses = [];
  const c = client(srv.url, { token: 'garbage' });
  c.on('status', (s) => statuses.push(s));
  await until('denied', () => c.status === 'denied');
  assert.equal(c.deniedReason, 'token expired at 1700000000');
  assert.equal(statuses.at(-1).reason, 'token expired at 1700000000');
  assert.equal(c.readOnly, true);
  assert.equal(c.ready, false);
  // With a 20 ms backoff a reconnect loop would have made many connections by now.
  await sleep(400);
  assert.equal(srv.seen.conns, 1);
  assert.equal(c.status, 'denied');
  // The application may try again with another token.
  c.setToken('another');
  c.connect();
  await until('second refusal', () => srv.seen.conns === 2 && c.status === 'denied');
  assert.equal(srv.hellos()[1].token, 'another');
  c.close();
  assert.equal(c.status, 'denied');
  await srv.close();
});

test('a 1008 close for a revoked token is terminal; an expired one asks the function again', async () => {
  const revoker = await scripted((msg, ws) => {
    if (msg.type === 'hello') { ws.send(ack({ role: 'write', user: 'bob', exp: 4102444800 })); setTimeout(() => ws.close(1008, 'revoked'), 50); }
  });
  const a = client(revoker.url, { token: 't' });
  await until('denied', () => a.status === 'denied');
  assert.equal(a.deniedReason, 'revoked');
  await sleep(300);
  assert.equal(revoker.seen.conns, 1);
  await revoker.close();

  // A connection closed because its token expired reconnects when a token function can
  // supply a fresh token (here the server closes only the first connection).
  const expirer = await scripted((msg, ws, conn) => {
    if (msg.type !== 'hello') return;
    ws.send(ack({ role: 'write', user: 'bob', exp: 4102444800 }));
    if (conn === 1) setTimeout(() => ws.close(1008, 'token expired'), 50);
  });
  let n = 0;
  const b = client(expirer.url, { token: () => `fresh-${++n}` });
  await until('rejoin', () => expirer.seen.conns === 2 && b.status === 'saved');
  assert.deepEqual(expirer.hellos().map((h) => h.token), ['fresh-1', 'fresh-2']);
  b.close();
  await expirer.close();

  // With a plain string there is no fresher token: the same close is final.
  const always = await scripted((msg, ws) => {
    if (msg.type === 'hello') { ws.send(ack({ role: 'write', user: 'bob', exp: 4102444800 })); setTimeout(() => ws.close(1008, 'token expired'), 50); }
  });
  const c = client(always.url, { token: 'fixed' });
  await until('denied', () => c.status === 'denied');
  assert.equal(c.deniedReason, 'token expired');
  await sleep(300);
  assert.equal(always.seen.conns, 1);
  await always.close();
});

test('a read role makes the client read-only; a failing token function is retried', async () => {
  const srv = await scripted((msg, ws) => {
    if (msg.type === 'hello') ws.send(ack({ role: 'read', user: 'carol', exp: 4102444800 }));
  });
  let calls = 0;
  const errors = [];
  const c = client(srv.url, {
    token: () => {
      calls++;
      if (calls < 3) return Promise.reject(new Error('auth service down'));
      return 'ok';
    },
  });
  c.on('error', (e) => errors.push(e));
  await until('join', () => c.status === 'saved');
  assert.equal(calls, 3);
  assert.deepEqual(errors.map((e) => e.code), ['token', 'token']);
  assert.match(errors[0].message, /auth service down/);
  assert.equal(srv.seen.conns, 1);
  assert.equal(c.role, 'read');
  assert.equal(c.readOnly, true);
  assert.throws(() => c.insert(0, 'x'), /read-only/);
  assert.equal(srv.seen.messages.filter((m) => m.msg.type === 'op').length, 0);
  c.close();
  await srv.close();
});

// The real binary with access control (`--auth-key-file`): a refused token, a refresh in place
// before `exp` and a read token.
test('against the real server: a refused token is denied once; a good one joins and refreshes', { timeout: 60000 }, async () => {
  const data = tempDir('collab-token-');
  assert.ok(supportsAuthKeys(serverBin()), `${serverBin()} has no --auth-key-file`);
  const secret = randomBytes(40);
  const keyFile = join(data.dir, 'k1.key');
  writeFileSync(keyFile, secret);
  const now = () => Math.floor(Date.now() / 1000);
  const mint = (claims) => mintHs256(secret, { sub: 'alice', doc: 'd', role: 'write', iat: now(), exp: now() + 3600, ...claims }, 'k1');
  const args = ['--auth-key-file', keyFile];
  const server = await startServer({ dataDir: join(data.dir, 'data'), extraArgs: args });
  try {
    const bad = client(server.ws, { token: mint({ doc: 'another-doc' }) });
    await until('denied', () => bad.status === 'denied');
    assert.ok(bad.deniedReason.length > 0, 'a reason');
    let calls = 0;
    // A token that lives 4 s, refreshed 3 s early (so after about 2 s, half its life).
    const good = client(server.ws, {
      token: async () => { calls++; return mint({ exp: now() + 4 }); },
      refreshBeforeMs: 3000,
    });
    await until('joined', () => good.status === 'saved');
    const statuses = [];
    good.on('status', (st) => statuses.push(st.status));
    good.insert(0, 'hello');
    await good.whenSaved();
    assert.equal(good.user, 'alice');
    assert.equal(good.role, 'write');
    const firstExp = good.exp;
    await new Promise((r) => good.on('auth', r));
    assert.ok(good.exp > firstExp, 'auth_ack gave a later exp');
    // Past the first token's exp the same connection still works.
    await until('first token expired', () => now() > firstExp + 1);
    good.insert(5, ' again');
    await good.whenSaved();
    // Refreshed in place (at least once), never reconnected.
    assert.ok(calls >= 2, `token function called ${calls} times`);
    assert.deepEqual(statuses.filter((st) => st !== 'online' && st !== 'saved'), []);
    // A read token joins read-only and sees the text.
    const reader = client(server.ws, { token: mint({ sub: 'rita', role: 'read' }) });
    await until('reader joined', () => reader.status === 'saved');
    assert.equal(reader.role, 'read');
    assert.equal(reader.text(), 'hello again');
    assert.throws(() => reader.insert(0, 'x'), /read-only/);
    reader.close();
    assert.equal(bad.status, 'denied');
    good.close();
  } finally {
    await server.stop();
    data.cleanup();
  }
});
