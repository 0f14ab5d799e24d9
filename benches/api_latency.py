#!/usr/bin/env python3
"""Latency of the document API: N reads and N edits of one document, one request at a time.

Usage: api_latency.py HOST:PORT N
Prints one line: p50 and p99 in milliseconds of GET /api/docs/{doc} and of
POST /api/docs/{doc}/edits (answered once durable). Standard library only.
"""
import http.client
import json
import sys
import time

DOC = "bench-api"


def call(addr, method, path, body=None):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    start = time.perf_counter()
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    elapsed = time.perf_counter() - start
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{method} {path}: {resp.status} {payload[:200]!r}")
    return elapsed, json.loads(payload)


def pct(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


def main():
    addr, n = sys.argv[1], int(sys.argv[2])
    path = "/api/docs/" + DOC
    call(addr, "POST", path + "/edits", {"edits": [{"pos": 0, "insert": "x" * 1000}]})
    posts, gets = [], []
    for i in range(n):
        t, _ = call(addr, "POST", path + "/edits", {"edits": [{"pos": 0, "insert": "y"}]})
        posts.append(t)
        t, doc = call(addr, "GET", path)
        gets.append(t)
    print(
        f"GET p50 {pct(gets, 0.5):.2f} ms p99 {pct(gets, 0.99):.2f} ms; "
        f"POST p50 {pct(posts, 0.5):.2f} ms p99 {pct(posts, 0.99):.2f} ms; "
        f"n={n} head={doc['head']}"
    )


main()
