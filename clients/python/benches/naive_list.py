"""Compares RgaDoc with a per-character list scanned linearly for ids (the Replica of
tests/interop/python_client.py) on the first 10,000, 20,000 and 40,000 ops of automerge-paper.

Usage: python clients/python/benches/naive_list.py  (CPU seconds, one run each)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collab_engine_client import RgaDoc  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    spec = importlib.util.spec_from_file_location(
        "python_client", REPO / "tests/interop/python_client.py"
    )
    assert spec is not None and spec.loader is not None
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    with gzip.open(REPO / "tests/data/automerge-paper.json.gz", "rt", encoding="utf-8") as f:
        trace = json.load(f)
    doc = RgaDoc(1)
    ops = []
    for txn in trace["txns"]:
        for pos, n_del, ins in txn["patches"]:
            ops.extend(doc.local_delete(pos, n_del))
            op = doc.local_insert(pos, ins)
            if op is not None:
                ops.append(op)
    for n in (10_000, 20_000, 40_000):
        listed = naive.Replica()
        t0 = time.process_time()
        listed.apply(ops[:n])
        a = time.process_time() - t0
        fast = RgaDoc(2)
        t0 = time.process_time()
        fast.apply_ops(ops[:n])
        b = time.process_time() - t0
        assert listed.text() == fast.text()
        print(f"{n} ops: per-char list {a:.2f} s, RgaDoc {b:.3f} s", flush=True)


if __name__ == "__main__":
    main()
