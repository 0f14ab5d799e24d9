// A small in-memory stand-in for the collab-engine server, written against the wire contract.
// It lets the Node tests drive the client's connection logic (resends, acks, replay,
// snapshots, lost history, presence) precisely and quickly; the browser tests use the real
// server binary.
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { WebSocketServer } from 'ws';
import { RgaDoc, cpLength } from '../../../clients/js/collab.js';

const CLIENTS = new URL('../../../clients/', import.meta.url);
/** The same table as src/acceptor/static_pages.rs, read from the source tree. */
const PAGES = {
  '/': ['text/html; charset=utf-8', 'demo/index.html'],
  '/index.html': ['text/html; charset=utf-8', 'demo/index.html'],
  '/app.css': ['text/css; charset=utf-8', 'demo/app.css'],
  '/app.js': ['text/javascript; charset=utf-8', 'demo/dist/app.js'],
  '/textarea': ['text/html; charset=utf-8', 'demo/textarea.html'],
  '/textarea.js': ['text/javascript; charset=utf-8', 'demo/textarea.js'],
  '/page.js': ['text/javascript; charset=utf-8', 'demo/page.js'],
  '/collab.js': ['text/javascript; charset=utf-8', 'js/collab.js'],
};

class Room {
  constructor(name) {
    this.name = name;
    this.rga = new RgaDoc(0);
    this.log = [];
    this.epoch = `e${Math.random().toString(36).slice(2)}`;
    this.nextReplica = 1;
    /** replica -> {ws, state} */
    this.conns = new Map();
  }
  get head() { return this.log.length; }
}

function changesNothing(rga, ops) {
  for (const op of ops) {
    if (op.kind === 'ins') {
      const n = cpLength(op.text);
      for (let i = 0; i < n; i++) if (!rga.has([op.id[0] + i, op.id[1]])) return false;
    } else {
      for (let i = 0; i < op.len; i++) {
        const id = [op.id[0] + i, op.id[1]];
        if (!rga.has(id) || rga.isVisible(id)) return false;
      }
    }
  }
  return true;
}

/** Starts a fake server on 127.0.0.1 (port 0 = any). */
export async function startFakeServer({ port = 0, rooms = new Map() } = {}) {
  const stats = { opMessages: 0, hellos: [], received: [], rateLimited: 0 };
  /**
   * Test knobs: `snapshotOnly` answers every hello with a snapshot (as after log truncation);
   * `tokens` (a Map token -> {role, user, name}) turns on access control as docs/protocol.md
   * describes it: an unknown token gets `unauthorized` and a close 1008, a `read` role's ops
   * get `forbidden`, and hello_ack and presence carry role, user and name.
   * `rateLimit` ({perSecond, burst}) gives every connection a token bucket for its `op` and
   * `presence` messages, as docs/protocol.md ("Rate limits") says: over it, `rate_limited`.
   */
  const knobs = { snapshotOnly: false, tokens: null, rateLimit: null };
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const path = req.url.split('?')[0];
    if (path === '/health') { res.end('{"status":"ok"}'); return; }
    if (PAGES[path]) {
      res.setHeader('content-type', PAGES[path][0]);
      res.end(readFileSync(new URL(PAGES[path][1], CLIENTS)));
      return;
    }
    res.statusCode = 404;
    res.end();
  });
  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req, socket, head) => {
    const m = /^\/ws(?:\/([^?]*))?/.exec(req.url);
    if (!m) { socket.destroy(); return; }
    const pathDoc = m[1] ? decodeURIComponent(m[1]) : null;
    wss.handleUpgrade(req, socket, head, (ws) => { sockets.add(ws); serve(ws, pathDoc); });
  });

  function room(name) {
    if (!rooms.has(name)) rooms.set(name, new Room(name));
    return rooms.get(name);
  }

  function serve(ws, pathDoc) {
    let r = null;
    let replica = null;
    let grant = null;
    let bucket = null;
    /** Takes `cost` tokens from this connection's bucket (full when it opened). */
    const withinRate = (cost) => {
      const lim = knobs.rateLimit;
      if (!lim) return true;
      const now = Date.now();
      if (!bucket) bucket = { tokens: lim.burst, at: now };
      bucket.tokens = Math.min(lim.burst, bucket.tokens + (now - bucket.at) * lim.perSecond / 1000);
      bucket.at = now;
      const c = Math.min(cost, lim.burst);
      if (bucket.tokens < c) return false;
      bucket.tokens -= c;
      return true;
    };
    const send = (m) => { if (ws.readyState === 1) ws.send(JSON.stringify(m)); };
    const error = (code, message, client_seq) => send({ type: 'error', code, message, ...(client_seq !== undefined ? { client_seq } : {}) });
    ws.on('close', () => {
      sockets.delete(ws);
      if (r && r.conns.get(replica)?.ws === ws) {
        const had = r.conns.get(replica).state !== null;
        r.conns.delete(replica);
        if (had) for (const c of r.conns.values()) c.ws.send(JSON.stringify({ type: 'presence', replica, state: null }));
      }
    });
    ws.on('message', (data, isBinary) => {
      if (isBinary) { error('bad_message', 'binary'); return; }
      let msg;
      try { msg = JSON.parse(String(data)); } catch { error('bad_message', 'json'); return; }
      stats.received.push(msg);
      if (msg.type === 'hello') {
        if (r) { error('bad_message', 'second hello'); return; }
        stats.hellos.push(msg);
        if (knobs.tokens) {
          grant = knobs.tokens.get(msg.token) || null;
          if (!grant) {
            error('unauthorized', msg.token ? 'token signature invalid' : 'token required');
            ws.close(1008, 'unauthorized');
            return;
          }
        }
        r = room(pathDoc ?? msg.doc);
        replica = msg.replica ?? r.nextReplica++;
        if (replica >= r.nextReplica) r.nextReplica = replica + 1;
        const old = r.conns.get(replica);
        if (old) { r.conns.delete(replica); old.ws.close(1008, 'replaced'); }
        r.conns.set(replica, { ws, state: null, grant });
        const ack = { type: 'hello_ack', doc: r.name, replica, head: r.head, epoch: r.epoch };
        if (grant) Object.assign(ack, { role: grant.role, user: grant.user, exp: Math.floor(Date.now() / 1000) + 3600 });
        const canReplay = !knobs.snapshotOnly && Number.isSafeInteger(msg.since) && msg.since <= r.head && (msg.epoch === undefined || msg.epoch === r.epoch);
        if (canReplay) { ack.strategy = 'replay'; ack.ops = r.log.slice(msg.since); } else { ack.strategy = 'snapshot'; ack.snapshot = r.rga.toSnapshot(); }
        const who = (c) => (c.grant ? { user: c.grant.user, name: c.grant.name } : {});
        ack.presence = [...r.conns].filter(([k, c]) => k !== replica && c.state !== null).map(([k, c]) => ({ replica: k, state: c.state, ...who(c) }));
        send(ack);
        return;
      }
      if (!r) { error('not_joined', 'hello first'); return; }
      if (msg.type === 'presence') {
        if (!withinRate(1)) { error('rate_limited', 'too many messages'); return; }
        r.conns.get(replica).state = msg.state ?? null;
        const extra = grant ? { user: grant.user, name: grant.name } : {};
        for (const [k, c] of r.conns) if (k !== replica) c.ws.send(JSON.stringify({ type: 'presence', replica, state: msg.state ?? null, ...extra }));
        return;
      }
      if (msg.type !== 'op') { error('bad_message', 'type'); return; }
      stats.opMessages++;
      const seq = msg.client_seq;
      if (grant && grant.role === 'read') { error('forbidden', 'this token allows reading only', seq); return; }
      if (!Array.isArray(msg.ops) || msg.ops.length === 0) { error('bad_message', 'ops', seq); return; }
      let items = 0;
      for (const op of msg.ops) items += op.kind === 'del' ? 1 + Math.min(op.len, 100000) : 1;
      if (!withinRate(1 + Math.floor(items / 100))) { stats.rateLimited++; error('rate_limited', 'too many messages', seq); return; }
      for (const op of msg.ops) {
        if (op.kind === 'ins' && op.id?.[1] !== replica) { error('invalid_op', 'foreign replica', seq); return; }
      }
      try {
        if (changesNothing(r.rga, msg.ops)) { send({ type: 'ack', client_seq: seq, server_seq: r.head }); return; }
      } catch { /* fall through to the real check */ }
      const trial = new RgaDoc(0);
      trial.loadSnapshot(r.rga.toSnapshot().runs);
      try { trial.applyOps(msg.ops); } catch (e) { error(e.code || 'invalid_op', e.message, seq); return; }
      r.rga = trial;
      const echo = { type: 'op_echo', server_seq: r.head + 1, replica, client_seq: seq, ops: msg.ops };
      r.log.push(echo);
      const frame = JSON.stringify(echo);
      for (const c of r.conns.values()) c.ws.send(frame);
    });
  }

  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const addr = server.address();
  return {
    port: addr.port,
    url: `ws://127.0.0.1:${addr.port}`,
    rooms,
    stats,
    knobs,
    /** Closes every socket with `code` (1001 like a shutdown; 1006-like with terminate). */
    async stop({ abrupt = false } = {}) {
      for (const ws of sockets) { if (abrupt) ws.terminate(); else ws.close(1001, 'shutting down'); }
      await new Promise((resolve) => { wss.close(); server.close(resolve); server.closeAllConnections?.(); });
    },
  };
}

/** Makes the room forget everything (a data loss): new epoch, empty log and text. */
export function loseHistory(rooms, name) {
  rooms.set(name, new Room(name));
}

/**
 * Makes the room forget its last ops (a restore from an older backup): same epoch, the log cut
 * to its first `head` entries and the text rebuilt from them, so `head` drops below what
 * clients saw.
 */
export function truncateHistory(rooms, name, head) {
  const old = rooms.get(name);
  const r = new Room(name);
  r.epoch = old.epoch;
  r.nextReplica = old.nextReplica;
  r.log = old.log.slice(0, head);
  for (const e of r.log) r.rga.applyOps(e.ops);
  rooms.set(name, r);
}
