#!/usr/bin/env node
// Interop client for collab-engine using the standard Node WebSocket client (`ws`).
//
// Usage: node node_client.js ADDR DOC N_OPS TOTAL_OPS NAME
//
// Joins DOC through plain `/ws` (the hello names the document), sets its presence, sends N_OPS
// op messages (each after the echo of the previous one, concurrently with the other interop
// clients), keeps a replica of the document with the contract's RGA rule (text counted in code
// points, not UTF-16 units), waits until the head reaches TOTAL_OPS, checks that a resend is
// answered with `ack`, and prints one JSON line:
// {"text": ..., "head": ..., "replica": ..., "saw_presence": [...]}.
// Exits non-zero (with a message on stderr) on any contract violation or after 60 seconds.
"use strict";

const WebSocket = require("ws");

const TIMEOUT_MS = 60_000;

function fail(message) {
  process.stderr.write(`node interop client: ${message}\n`);
  process.exit(1);
}

// Ids are [lamport, replica]; compared lexicographically.
function cmp(a, b) {
  return a[0] !== b[0] ? a[0] - b[0] : a[1] - b[1];
}
const key = (id) => `${id[0]},${id[1]}`;

class Replica {
  constructor() {
    this.items = []; // {id, ch, deleted}
    this.index = new Map();
    this.maxLamport = -1;
  }
  position(id) {
    const i = this.items.findIndex((item) => cmp(item.id, id) === 0);
    if (i < 0) fail(`unknown id ${id}`);
    return i;
  }
  insert([lamport, replica], after, text) {
    let parent = after;
    // Array.from splits by code point: "😀" is one character with one id.
    Array.from(text).forEach((ch, k) => {
      const id = [lamport + k, replica];
      this.maxLamport = Math.max(this.maxLamport, id[0]);
      if (this.index.has(key(id))) {
        parent = id;
        return;
      }
      let i = parent === null ? 0 : this.position(parent) + 1;
      // Skip every following item whose id is greater; stop before the first smaller one.
      while (i < this.items.length && cmp(this.items[i].id, id) > 0) i += 1;
      const item = { id, ch, deleted: false };
      this.items.splice(i, 0, item);
      this.index.set(key(id), item);
      parent = id;
    });
  }
  remove([lamport, replica], n) {
    for (let k = 0; k < n; k += 1) {
      const item = this.index.get(key([lamport + k, replica]));
      if (!item) fail(`delete of unknown id ${[lamport + k, replica]}`);
      item.deleted = true;
    }
  }
  apply(ops) {
    for (const op of ops) {
      if (op.kind === "ins") this.insert(op.id, op.after, op.text);
      else if (op.kind === "del") this.remove(op.id, op.len);
      else fail(`unknown op kind in ${JSON.stringify(op)}`);
    }
  }
  loadSnapshot(runs) {
    for (const run of runs) {
      const [lamport, replica] = run.id;
      const chars = "text" in run ? Array.from(run.text) : new Array(run.deleted).fill(null);
      chars.forEach((ch, k) => {
        const item = { id: [lamport + k, replica], ch, deleted: ch === null };
        this.items.push(item);
        this.index.set(key(item.id), item);
        this.maxLamport = Math.max(this.maxLamport, lamport + k);
      });
    }
  }
  text() {
    return this.items
      .filter((item) => !item.deleted)
      .map((item) => item.ch)
      .join("");
  }
}

// A small seeded generator, so a run can be repeated.
function rng(seedText) {
  let state = 2166136261;
  for (const ch of seedText) state = Math.imul(state ^ ch.codePointAt(0), 16777619) >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 4294967296;
  };
}

function main() {
  const [addr, doc, nOpsText, totalOpsText, name] = process.argv.slice(2);
  const nOps = Number(nOpsText);
  const totalOps = Number(totalOpsText);
  const random = rng(name);
  setTimeout(() => fail(`no result after ${TIMEOUT_MS / 1000}s`), TIMEOUT_MS).unref();

  const ws = new WebSocket(`ws://${addr}/ws`);
  const state = new Replica();
  const sawPresence = new Map();
  const mine = [];
  let replica = null;
  let head = 0;
  let sent = 0;
  let pending = null;
  let firstMessage = null;
  let resendChecked = false;

  function sendNext() {
    sent += 1;
    const lamport = state.maxLamport + 1;
    let ops;
    if (mine.length > 0 && sent % 4 === 0) {
      const target = mine.splice(Math.floor(random() * mine.length), 1)[0];
      ops = [{ kind: "del", id: target, len: 1 }];
    } else {
      const visible = state.items.filter((item) => !item.deleted).map((item) => item.id);
      const after =
        visible.length > 0 && random() < 0.8 ? visible[Math.floor(random() * visible.length)] : null;
      const choices = ["js", "é", "😀y", "\n", "c\\d"];
      const text = choices[Math.floor(random() * choices.length)];
      ops = [{ kind: "ins", id: [lamport, replica], after, text }];
      Array.from(text).forEach((_, k) => mine.push([lamport + k, replica]));
    }
    const message = JSON.stringify({ type: "op", client_seq: sent, ops });
    if (firstMessage === null) firstMessage = message;
    pending = sent;
    ws.send(message);
  }

  function maybeFinish() {
    if (head < totalOps || pending !== null) return;
    if (!resendChecked) {
      pending = "resend";
      ws.send(firstMessage); // a resend: already integrated
      return;
    }
    const names = [...sawPresence.values()]
      .filter((s) => s !== null && typeof s === "object")
      .map((s) => s.name)
      .sort();
    process.stdout.write(
      `${JSON.stringify({ text: state.text(), head, replica, saw_presence: names })}\n`,
      () => {
        ws.close(1000);
        process.exit(0);
      },
    );
  }

  ws.on("open", () => {
    ws.send(JSON.stringify({ type: "hello", doc, extra: { ignored: true } }));
  });
  ws.on("error", (err) => fail(`socket error: ${err.message}`));
  ws.on("close", (code) => fail(`closed early with ${code}`));
  ws.on("message", (data, isBinary) => {
    if (isBinary) fail("the server sent a binary frame");
    const msg = JSON.parse(data.toString("utf8"));
    switch (msg.type) {
      case "hello_ack":
        if (msg.doc !== doc) fail(`hello_ack for ${msg.doc}`);
        if (!Array.isArray(msg.presence)) fail("hello_ack.presence must be a list");
        if (msg.strategy !== "snapshot") fail("a hello without since must get a snapshot");
        replica = msg.replica;
        head = msg.head;
        state.loadSnapshot(msg.snapshot.runs);
        for (const p of msg.presence) sawPresence.set(p.replica, p.state);
        ws.send(JSON.stringify({ type: "presence", state: { name, cursor: 0 } }));
        sendNext();
        break;
      case "op_echo":
        if (msg.server_seq !== head + 1) fail(`server_seq ${msg.server_seq} after head ${head}`);
        head = msg.server_seq;
        state.apply(msg.ops);
        if (msg.replica === replica && msg.client_seq === pending) {
          pending = null;
          if (sent < nOps) sendNext();
        }
        maybeFinish();
        break;
      case "ack":
        if (pending !== "resend" || msg.client_seq !== 1 || typeof msg.server_seq !== "number") {
          fail(`unexpected ack ${JSON.stringify(msg)}`);
        }
        pending = null;
        resendChecked = true;
        maybeFinish();
        break;
      case "presence":
        if (msg.replica === replica) fail("my own presence came back");
        sawPresence.set(msg.replica, msg.state);
        break;
      default:
        fail(`unexpected message ${JSON.stringify(msg)}`);
    }
  });
}

main();
