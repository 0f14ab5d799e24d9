"""Replays the editing traces of tests/data/ through the Python replica and prints timings.

Usage: python clients/python/benches/traces.py [RUNS]  (default 3)

Times are CPU seconds of this process (time.process_time), which a busy machine inflates less
than wall-clock time; the wall-clock total of each run is printed too.

Per trace and run: the local replay (every patch as local_delete/local_insert, timed by quarter
of the patches, so a cost that grows with the document shows as slower later quarters), the
remote integration of the ops it produced into a second replica (apply_ops, in batches of 100
ops as echoes would carry them), and a snapshot load. Each replay is checked against endContent.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collab_engine_client import RgaDoc  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for name in ("automerge-paper", "seph-blog1"):
        with gzip.open(REPO / "tests/data" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
            trace = json.load(f)
        patches = [p for txn in trace["txns"] for p in txn["patches"]]
        for run in range(runs):
            wall = time.perf_counter()
            doc = RgaDoc(1)
            ops: List[dict] = []
            quarters: List[float] = []
            q = (len(patches) + 3) // 4
            t0 = time.process_time()
            for i in range(0, len(patches), q):
                tq = time.process_time()
                for pos, n_del, ins in patches[i : i + q]:
                    if n_del:
                        ops.extend(doc.local_delete(pos, n_del))
                    if ins:
                        op = doc.local_insert(pos, ins)
                        if op is not None:
                            ops.append(op)
                quarters.append(time.process_time() - tq)
            local = time.process_time() - t0
            assert doc.text() == trace["endContent"]
            remote_doc = RgaDoc(2)
            t1 = time.process_time()
            for i in range(0, len(ops), 100):
                remote_doc.apply_ops(ops[i : i + 100])
            remote = time.process_time() - t1
            assert remote_doc.text() == trace["endContent"]
            snap = remote_doc.to_snapshot()
            t2 = time.process_time()
            RgaDoc(3).load_snapshot(snap)
            load = time.process_time() - t2
            print(
                f"{name} run {run + 1}: {len(patches)} patches local {local:.2f} s "
                f"({local / len(patches) * 1e6:.1f} us/patch; quarters "
                + " ".join(f"{x:.2f}" for x in quarters)
                + f"), {len(ops)} ops remote {remote:.2f} s "
                f"({remote / len(ops) * 1e6:.1f} us/op), snapshot of {len(snap)} runs "
                f"loaded in {load * 1e3:.0f} ms, {doc.n_runs} runs; "
                f"wall clock {time.perf_counter() - wall:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
