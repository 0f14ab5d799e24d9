#!/usr/bin/env python3
"""Interop client for collab-engine using the standard Python `websockets` library.

Usage: python_client.py ADDR DOC N_OPS TOTAL_OPS NAME

Joins DOC through `/ws/<percent-encoded DOC>`, sets its presence, sends N_OPS op messages (each
after the echo of the previous one, concurrently with the other interop clients), keeps a replica
of the document with the contract's RGA rule, waits until the document's head reaches TOTAL_OPS,
checks a resend is answered with `ack`, and prints one JSON line:
{"text": ..., "head": ..., "replica": ..., "saw_presence": [...]}.
Exits non-zero (with a message on stderr) on any contract violation or after 60 seconds.
"""

import json
import random
import signal
import sys
import urllib.parse

from websockets.sync.client import connect

TIMEOUT_S = 60


def fail(message):
    print(f"python interop client: {message}", file=sys.stderr)
    sys.exit(1)


class Replica:
    """The document as a list of [id, char, deleted], integrated by the contract's RGA rule."""

    def __init__(self):
        self.items = []
        self.index = {}  # (lamport, replica) -> item
        self.max_lamport = -1

    def _position(self, item_id):
        for i, item in enumerate(self.items):
            if item[0] == item_id:
                return i
        fail(f"unknown id {item_id}")

    def insert(self, first_id, after, text):
        lamport, replica = first_id
        parent = tuple(after) if after is not None else None
        for k, char in enumerate(text):
            item_id = (lamport + k, replica)
            self.max_lamport = max(self.max_lamport, item_id[0])
            if item_id in self.index:
                parent = item_id
                continue
            i = 0 if parent is None else self._position(parent) + 1
            # Skip every following item whose id is greater; stop before the first smaller one.
            while i < len(self.items) and self.items[i][0] > item_id:
                i += 1
            item = [item_id, char, False]
            self.items.insert(i, item)
            self.index[item_id] = item
            parent = item_id

    def delete(self, first_id, n):
        lamport, replica = first_id
        for k in range(n):
            item = self.index.get((lamport + k, replica))
            if item is None:
                fail(f"delete of unknown id {(lamport + k, replica)}")
            item[2] = True

    def apply(self, ops):
        for op in ops:
            if op["kind"] == "ins":
                self.insert(op["id"], op["after"], op["text"])
            elif op["kind"] == "del":
                self.delete(op["id"], op["len"])
            else:
                fail(f"unknown op kind in {op}")

    def load_snapshot(self, runs):
        self.items, self.index = [], {}
        for run in runs:
            lamport, replica = run["id"]
            chars = run["text"] if "text" in run else [None] * run["deleted"]
            for k, char in enumerate(chars):
                item = [(lamport + k, replica), char, char is None]
                self.items.append(item)
                self.index[item[0]] = item
                self.max_lamport = max(self.max_lamport, lamport + k)

    def text(self):
        return "".join(item[1] for item in self.items if not item[2])


def main():
    addr, doc, n_ops, total_ops, name = sys.argv[1:6]
    n_ops, total_ops = int(n_ops), int(total_ops)
    rng = random.Random(name)
    signal.signal(signal.SIGALRM, lambda *_: fail(f"no result after {TIMEOUT_S}s"))
    signal.alarm(TIMEOUT_S)
    url = f"ws://{addr}/ws/{urllib.parse.quote(doc, safe='')}?client=python"
    with connect(url, open_timeout=20, max_size=None) as ws:
        ws.send(json.dumps({"type": "hello", "unknown_field": [1, 2]}))
        ack = json.loads(ws.recv(timeout=20))
        if ack.get("type") != "hello_ack" or ack.get("doc") != doc:
            fail(f"expected hello_ack for {doc!r}, got {ack}")
        if not isinstance(ack.get("presence"), list):
            fail(f"hello_ack.presence must be a list: {ack}")
        replica_id, head = ack["replica"], ack["head"]
        doc_state = Replica()
        if ack["strategy"] == "snapshot":
            doc_state.load_snapshot(ack["snapshot"]["runs"])
        else:
            fail(f"a hello without since must get a snapshot: {ack}")
        saw_presence = {str(p["replica"]): p["state"] for p in ack["presence"]}
        ws.send(json.dumps({"type": "presence", "state": {"name": name, "cursor": 0}}))

        mine = []  # ids of my visible characters
        first_message = None
        pending = None  # client_seq awaiting its echo
        sent = 0
        resend_checked = False

        def send_next():
            nonlocal sent, pending, first_message
            sent += 1
            lamport = doc_state.max_lamport + 1
            if mine and sent % 4 == 0:
                target = mine.pop(rng.randrange(len(mine)))
                ops = [{"kind": "del", "id": list(target), "len": 1}]
            else:
                visible = [item[0] for item in doc_state.items if not item[2]]
                after = list(rng.choice(visible)) if visible and rng.random() < 0.8 else None
                text = rng.choice(["py", "ü", "😀x", "\n", "a\"b"])
                ops = [{"kind": "ins", "id": [lamport, replica_id], "after": after, "text": text}]
                mine.extend((lamport + k, replica_id) for k in range(len(text)))
            message = json.dumps({"type": "op", "client_seq": sent, "ops": ops})
            if first_message is None:
                first_message = message
            pending = sent
            ws.send(message)

        send_next()
        while head < total_ops or pending is not None or not resend_checked:
            if pending is None and head >= total_ops and not resend_checked:
                ws.send(first_message)  # a resend: already integrated
                pending = "resend"
            msg = json.loads(ws.recv(timeout=30))
            kind = msg.get("type")
            if kind == "op_echo":
                if msg["server_seq"] != head + 1:
                    fail(f"server_seq {msg['server_seq']} after head {head}")
                head = msg["server_seq"]
                doc_state.apply(msg["ops"])
                if msg["replica"] == replica_id and msg["client_seq"] == pending:
                    pending = None
                    if sent < n_ops:
                        send_next()
            elif kind == "ack":
                if pending != "resend" or msg["client_seq"] != 1:
                    fail(f"unexpected ack {msg}")
                if "server_seq" not in msg:
                    fail(f"ack without server_seq: {msg}")
                pending, resend_checked = None, True
            elif kind == "presence":
                if msg["replica"] == replica_id:
                    fail(f"my own presence came back: {msg}")
                saw_presence[str(msg["replica"])] = msg["state"]
            else:
                fail(f"unexpected message {msg}")
        print(json.dumps({
            "text": doc_state.text(),
            "head": head,
            "replica": replica_id,
            "saw_presence": sorted(
                state["name"] for state in saw_presence.values() if isinstance(state, dict)
            ),
        }), flush=True)


if __name__ == "__main__":
    main()
