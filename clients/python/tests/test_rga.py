"""The Python replica against the Rust CRDT and the editing traces (no server needed)."""

from __future__ import annotations

import gzip
import json
import random
from typing import Dict, List, Sequence

import pytest

from collab_engine_client import OpError, RgaDoc
from collab_engine_client.rga import RUN_TEXT_MAX

from conftest import REPO

FIXTURE = json.loads((REPO / "tests/browser/fixtures/rust-rga.json").read_text("utf-8"))
TRACES = ["automerge-paper", "seph-blog1"]


def replay(
    ops: Sequence[dict], order: Sequence[int], *, batch: bool = False, duplicates: bool = False
) -> RgaDoc:
    doc = RgaDoc(1000)
    seq = [ops[i] for i in order]
    if batch:
        doc.apply_ops(seq)
    else:
        for op in seq:
            doc.apply_ops([op])
            if duplicates:
                doc.apply_ops([op])
    doc.check()
    return doc


def test_the_fixture_has_ordering_and_random_cases() -> None:
    assert len(FIXTURE["cases"]) >= 10
    assert any("orders" in c for c in FIXTURE["cases"])


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: c["name"])
def test_same_text_as_rust_in_every_delivery_order(case: dict) -> None:
    ops = case["ops"]
    natural = list(range(len(ops)))
    assert replay(ops, natural).text() == case["text"]
    assert replay(ops, natural, batch=True).text() == case["text"]
    assert replay(ops, natural, duplicates=True).text() == case["text"]
    for order in case.get("orders", []):
        assert sorted(order) == natural
        assert replay(ops, order).text() == case["text"], order
    doc = replay(ops, natural)
    copy = RgaDoc(1)
    copy.load_snapshot(doc.to_snapshot())
    copy.check()
    assert copy.text() == case["text"]
    assert copy.to_snapshot() == doc.to_snapshot()


def load_trace(name: str) -> dict:
    with gzip.open(REPO / "tests/data" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", TRACES)
def test_trace_replays_to_end_content(name: str) -> None:
    trace = load_trace(name)
    doc = RgaDoc(1)
    ops: List[dict] = []
    for txn in trace["txns"]:
        for pos, n_del, ins in txn["patches"]:
            ops.extend(doc.local_delete(pos, n_del))
            op = doc.local_insert(pos, ins)
            if op is not None:
                ops.append(op)
    assert doc.text() == trace["endContent"]
    doc.check()
    # The ops a local replica produced integrate remotely to the same text...
    remote = RgaDoc(2)
    remote.apply_ops(ops)
    remote.check()
    assert remote.text() == trace["endContent"]
    # ...and a snapshot of it loads back to the same items.
    copy = RgaDoc(3)
    copy.load_snapshot(remote.to_snapshot())
    copy.check()
    assert copy.text() == trace["endContent"]
    assert copy.to_snapshot() == doc.to_snapshot()


def test_remote_changes_describe_the_text_change() -> None:
    rng = random.Random(5)
    a, b = RgaDoc(1), RgaDoc(2)
    mirror = ""
    alphabet = "ab😀é\n"
    for _ in range(2000):
        if len(a) and rng.random() < 0.3:
            pos = rng.randrange(len(a))
            ops = a.local_delete(pos, min(len(a) - pos, rng.randint(1, 5)))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            op = a.local_insert(rng.randint(0, len(a)), text)
            ops = [op] if op else []
        for change in b.apply_ops(ops):
            mirror = mirror[: change.index] + change.text + mirror[change.index + change.length :]
        assert mirror == a.text()
    b.check()


def test_concurrent_replicas_converge_in_any_causal_order() -> None:
    rng = random.Random(42)
    for _round in range(20):
        replicas = [RgaDoc(r) for r in (1, 2, 3)]
        log: List[dict] = []
        delivered: Dict[int, int] = {1: 0, 2: 0, 3: 0}
        for _ in range(150):
            doc = rng.choice(replicas)
            # Catch up on a random prefix of the shared log (causal: a prefix is).
            upto = rng.randint(delivered[doc.replica], len(log))
            doc.apply_ops(log[delivered[doc.replica] : upto])
            delivered[doc.replica] = upto
            if len(doc) and rng.random() < 0.3:
                pos = rng.randrange(len(doc))
                new = doc.local_delete(pos, min(len(doc) - pos, rng.randint(1, 3)))
            else:
                op = doc.local_insert(rng.randint(0, len(doc)), rng.choice(["x", "yz", "😀", "\n"]))
                new = [op] if op else []
            # Own ops join the shared log after everything this replica depends on, so every
            # prefix of the log is a causal delivery order; re-applying own ops is a no-op.
            log.extend(new)
        for doc in replicas:
            doc.apply_ops(log)  # idempotent for what it has seen
            doc.check()
        assert len({d.text() for d in replicas}) == 1


def test_bad_ops_are_refused_and_change_nothing() -> None:
    doc = RgaDoc(1)
    doc.apply_ops([{"kind": "ins", "id": [0, 1], "after": None, "text": "ab"}])
    before = doc.to_snapshot()
    for op, code in [
        ({"kind": "ins", "id": [5, 2], "after": [9, 9], "text": "x"}, "unknown_id"),
        ({"kind": "ins", "id": [1, 2], "after": [1, 1], "text": "x"}, "invalid_op"),
        ({"kind": "ins", "id": [5, 2], "after": None, "text": ""}, "invalid_op"),
        ({"kind": "del", "id": [7, 1], "len": 1}, "unknown_id"),
        ({"kind": "del", "id": [0, 1], "len": 0}, "invalid_op"),
        ({"kind": "del", "id": [0, True], "len": 1}, "bad_message"),
        ({"kind": "mv", "id": [0, 1]}, "bad_message"),
        ({"kind": "ins", "id": [0, 1, 2], "after": None, "text": "x"}, "bad_message"),
    ]:
        with pytest.raises(OpError) as err:
            doc.apply_ops([op])
        assert err.value.code == code, op
        assert doc.to_snapshot() == before
    with pytest.raises(IndexError):
        doc.local_insert(3, "x")
    with pytest.raises(IndexError):
        doc.local_delete(1, 2)
    with pytest.raises(OpError):
        doc.local_insert(0, "\ud800")
    assert doc.to_snapshot() == before
    with pytest.raises(OpError):
        doc.load_snapshot([{"id": [0, 1], "text": ""}])
    assert doc.text() == "" and doc.n_items == 0


def test_long_runs_stay_bounded() -> None:
    doc = RgaDoc(1)
    for i in range(3 * RUN_TEXT_MAX):
        doc.local_insert(i, "a")
    doc.check()
    assert doc.n_runs == 3
    copy = RgaDoc(2)
    copy.load_snapshot(doc.to_snapshot())  # one merged run of 1536 characters on the wire
    assert copy.n_runs == 3 and copy.text() == doc.text()
    # A long insert, local or remote, is stored in runs of at most RUN_TEXT_MAX characters.
    op = copy.local_insert(1, "b" * (2 * RUN_TEXT_MAX + 1))
    assert op is not None
    copy.check()
    assert "b" * (2 * RUN_TEXT_MAX + 1) in [r.get("text") for r in copy.to_snapshot()]
    assert copy.n_runs == 1 + 3 + 1 + 2  # the first run of a split around 3 runs of b
    remote = RgaDoc(3)
    remote.load_snapshot(doc.to_snapshot())
    changes = remote.apply_ops([op])
    assert [(c.index, c.length, len(c.text)) for c in changes] == [(1, 0, 2 * RUN_TEXT_MAX + 1)]
    assert remote.text() == copy.text()
    remote.check()
