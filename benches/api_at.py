#!/usr/bin/env python3
"""Cost of GET /api/docs/{doc}?at=SEQ against the distance head - SEQ.

Usage: api_at.py HOST:PORT
Builds a document of 1000 op messages (10 characters each, every tenth also deleting 5),
then times 50 reads at each distance. Prints one line: p50 in milliseconds per distance.
Standard library only.
"""
import http.client
import json
import sys
import time

DOC = "bench-at"


def call(addr, method, path, body=None):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = None if body is None else json.dumps(body).encode()
    start = time.perf_counter()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    elapsed = time.perf_counter() - start
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{method} {path}: {resp.status} {payload[:200]!r}")
    return elapsed, json.loads(payload)


def main():
    addr = sys.argv[1]
    path = "/api/docs/" + DOC
    for i in range(1000):
        edits = [{"pos": 0, "insert": "abcdefghij"}]
        if i % 10 == 9:
            edits.append({"pos": 3, "delete": 5})
        call(addr, "POST", path + "/edits", {"edits": edits})
    _, doc = call(addr, "GET", path)
    head = doc["head"]
    out = []
    for distance in (0, 10, 100, 999):
        times = sorted(call(addr, "GET", f"{path}?at={head - distance}")[0] for _ in range(50))
        out.append(f"d={distance}: {times[len(times) // 2] * 1000:.2f} ms")
    print(f"length {doc['length']}, head {head}; p50 of 50 reads: " + ", ".join(out))


main()
