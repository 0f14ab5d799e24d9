"""The contract's RGA sequence CRDT: one replica of a document, with no I/O.

The rules are the ones of the Rust ``crdt::Doc`` and the JavaScript ``RgaDoc``
(``docs/protocol.md``, "The document: an RGA sequence CRDT"): every character has an id
``(lamport, replica)``, deleted characters stay as tombstones, and an insert after ``p`` goes
right after ``p``, past every following item whose id is greater than its own.

Positions count Unicode code points, which is what a Python ``str`` indexes, so ``len(text)``
of an insert is its number of ids.

Data structure (costs for a document of ``n`` runs):

- A *run* holds consecutive ids of one replica that sit next to each other in document order,
  all visible (``text`` holds their characters, at most ``RUN_TEXT_MAX`` of them) or all
  tombstones (``text`` is ``None``).
- Runs live in *chunks* of at most ``CHUNK_MAX`` runs; each chunk caches its visible length, and
  a Fenwick tree over the chunks finds the chunk of a position in ``O(log n)``.
- Per replica, the runs sorted by lamport (two parallel lists searched with ``bisect``) find the
  run of an id in ``O(log n)``.

So a local edit or a remote op costs ``O(log n + CHUNK_MAX + RUN_TEXT_MAX)``; only a chunk split
(every ``CHUNK_MAX / 2`` new runs) costs ``O(n / CHUNK_MAX)``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "MAX_ID_COMPONENT",
    "Change",
    "Id",
    "Op",
    "OpError",
    "RgaDoc",
    "coalesce_op",
]

#: Greatest lamport or replica the contract allows (2^53 - 1).
MAX_ID_COMPONENT = (1 << 53) - 1

#: An item id ``(lamport, replica)``; ids are ordered as tuples.
Id = Tuple[int, int]

#: An op as it travels on the wire (a JSON object): ``{"kind": "ins", "id": [l, r],
#: "after": [l, r] | None, "text": str}`` or ``{"kind": "del", "id": [l, r], "len": n}``.
Op = Dict[str, Any]

#: Runs per chunk before the chunk splits in two.
CHUNK_MAX = 64

#: Characters a run holds at most before typing starts a new run: keeps every string copy
#: (extending, splitting) bounded, so a long run never makes an edit cost its whole length.
RUN_TEXT_MAX = 512


class OpError(ValueError):
    """An op that cannot be integrated: an unknown target or a malformed op.

    ``code`` is the contract's error code for it: ``unknown_id``, ``invalid_op`` or
    ``bad_message``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        #: The contract's error code.
        self.code = code


@dataclass(frozen=True)
class Change:
    """A visible change of the text: remove ``length`` code points at ``index``, then insert
    ``text`` there.

    A list of changes applies one after another to the text as it was before the first.
    """

    #: Code point position where the change happens.
    index: int
    #: Code points removed at ``index``.
    length: int
    #: Text inserted at ``index`` (after the removal).
    text: str


class _Run:
    """Consecutive ids ``lamport .. lamport+n-1`` of ``replica``, adjacent in the document."""

    __slots__ = ("lamport", "replica", "n", "text", "chunk")

    def __init__(self, lamport: int, replica: int, n: int, text: Optional[str]) -> None:
        self.lamport = lamport
        self.replica = replica
        self.n = n
        #: The characters when visible (``len(text) == n``), ``None`` for tombstones.
        self.text = text
        self.chunk: _Chunk = _NO_CHUNK


class _Chunk:
    """A slice of the document's runs with the number of visible characters they hold."""

    __slots__ = ("runs", "vis", "idx")

    def __init__(self) -> None:
        self.runs: List[_Run] = []
        self.vis = 0
        #: Position of this chunk in ``RgaDoc._chunks``.
        self.idx = 0


_NO_CHUNK = _Chunk()


class _RunIndex:
    """One replica's runs sorted by lamport: ``starts[i]`` is ``runs[i].lamport``."""

    __slots__ = ("starts", "runs")

    def __init__(self) -> None:
        self.starts: List[int] = []
        self.runs: List[_Run] = []

    def find(self, lamport: int) -> Optional[_Run]:
        i = bisect_right(self.starts, lamport) - 1
        if i < 0:
            return None
        run = self.runs[i]
        return run if lamport < run.lamport + run.n else None

    def add(self, run: _Run) -> None:
        i = bisect_right(self.starts, run.lamport)
        self.starts.insert(i, run.lamport)
        self.runs.insert(i, run)

    def remove(self, run: _Run) -> None:
        i = bisect_left(self.starts, run.lamport)
        if i >= len(self.runs) or self.runs[i] is not run:
            raise AssertionError("rga: id index out of sync")
        del self.starts[i]
        del self.runs[i]


class _Fenwick:
    """Prefix sums of the chunks' visible lengths."""

    __slots__ = ("tree",)

    def __init__(self, values: Sequence[int]) -> None:
        tree = list(values)
        n = len(tree)
        for i in range(n):
            j = i | (i + 1)
            if j < n:
                tree[j] += tree[i]
        self.tree = tree

    def add(self, i: int, delta: int) -> None:
        tree = self.tree
        n = len(tree)
        while i < n:
            tree[i] += delta
            i |= i + 1

    def prefix(self, i: int) -> int:
        """Sum of the first ``i`` values."""
        tree = self.tree
        total = 0
        i -= 1
        while i >= 0:
            total += tree[i]
            i = (i & (i + 1)) - 1
        return total

    def search(self, pos: int) -> Tuple[int, int]:
        """The index ``i`` of the value holding ``pos`` (the smallest ``i`` whose prefix sum
        through ``i`` exceeds ``pos``) and ``pos`` minus the sum before it."""
        tree = self.tree
        n = len(tree)
        idx = -1
        step = 1 << max(n.bit_length() - 1, 0)
        while step:
            nxt = idx + step
            if nxt < n and tree[nxt] <= pos:
                idx = nxt
                pos -= tree[nxt]
            step >>= 1
        return idx + 1, pos


def _check_id(value: Any, what: str) -> Id:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(
            type(c) is int and 0 <= c <= MAX_ID_COMPONENT  # noqa: E721 (bool is not an id)
            for c in value
        )
    ):
        return (value[0], value[1])
    raise OpError("bad_message", f"bad {what}: {value!r}")


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise OpError("bad_message", "text holds a lone surrogate") from err


def coalesce_op(ops: List[Op], op: Op) -> None:
    """Appends ``op`` to ``ops``, merging it into the last op when it continues it.

    An insert that starts right after the previous insert's last id (typing) extends it; a
    delete adjacent to the previous delete of the same replica widens it.
    """
    if ops:
        last = ops[-1]
        if last["kind"] == "ins" and op["kind"] == "ins":
            lid, oid, after = last["id"], op["id"], op["after"]
            n = len(last["text"])
            if (
                after is not None
                and lid[1] == oid[1]
                and lid[0] + n == oid[0]
                and after[0] == oid[0] - 1
                and after[1] == oid[1]
                and n + len(op["text"]) <= _INS_TEXT_MAX
            ):
                last["text"] += op["text"]
                return
        if last["kind"] == "del" and op["kind"] == "del" and last["id"][1] == op["id"][1]:
            if last["id"][0] + last["len"] == op["id"][0]:
                last["len"] += op["len"]
                return
            if op["id"][0] + op["len"] == last["id"][0]:
                last["id"] = [op["id"][0], op["id"][1]]
                last["len"] += op["len"]
                return
    ops.append(op)


#: Code points per coalesced ``ins`` op (the client splits longer ones when it sends them).
_INS_TEXT_MAX = 8192


class RgaDoc:
    """A replica of the contract's RGA sequence.

    Local edits (:meth:`local_insert`, :meth:`local_delete`) take code point positions and
    return the ops to send; :meth:`apply_ops` integrates ops from anywhere (remote echoes,
    replays, resends) idempotently and returns the visible :class:`Change` list.
    """

    def __init__(self, replica: Optional[int] = None) -> None:
        """``replica`` names local inserts; it may be set later, before the first local edit."""
        #: The replica id of local inserts (``None`` until known).
        self.replica = replica
        self._reset()

    def _reset(self) -> None:
        first = _Chunk()
        self._chunks: List[_Chunk] = [first]
        self._sums = _Fenwick([0])
        self._by_replica: Dict[int, _RunIndex] = {}
        #: Greatest lamport seen (-1 for none); local inserts use greater ones.
        self.max_lamport = -1
        #: Items held, tombstones included.
        self.n_items = 0
        self._len = 0

    # --- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Visible length in code points."""
        return self._len

    @property
    def length(self) -> int:
        """Visible length in code points."""
        return self._len

    def text(self) -> str:
        """The visible text (``O(length)``)."""
        return "".join(r.text for c in self._chunks for r in c.runs if r.text is not None)

    @property
    def n_runs(self) -> int:
        """Number of runs (for tests and statistics)."""
        return sum(len(c.runs) for c in self._chunks)

    def _find(self, lamport: int, replica: int) -> Optional[_Run]:
        idx = self._by_replica.get(replica)
        return idx.find(lamport) if idx is not None else None

    def has(self, item: Id) -> bool:
        """Whether the document holds item ``item`` (visible or tombstone)."""
        return self._find(item[0], item[1]) is not None

    def is_visible(self, item: Id) -> bool:
        """Whether item ``item`` is visible (``False`` for tombstones and unknown ids)."""
        run = self._find(item[0], item[1])
        return run is not None and run.text is not None

    def id_at(self, pos: int) -> Id:
        """Id of the visible character at code point ``pos``.

        Raises :class:`IndexError` unless ``0 <= pos < len(self)``.
        """
        run, off = self._locate(pos)
        return (run.lamport + off, run.replica)

    def position_of(self, item: Id) -> Optional[int]:
        """Code point position of item ``item``: its index when visible, else the number of
        visible characters before it; ``None`` for an unknown id."""
        run = self._find(item[0], item[1])
        if run is None:
            return None
        before = self._before(run)
        return before if run.text is None else before + item[0] - run.lamport

    def anchor_at(self, pos: int) -> Optional[Id]:
        """An anchor for the gap at code point ``pos``: the id of the character before it, or
        ``None`` at the start. Anchors survive remote edits (see :meth:`position_of_anchor`)."""
        if pos <= 0:
            return None
        return self.id_at(min(pos, self._len) - 1)

    def position_of_anchor(self, anchor: Optional[Id]) -> int:
        """The gap position ``anchor`` names now (0 for ``None`` or an unknown id)."""
        if anchor is None:
            return 0
        run = self._find(anchor[0], anchor[1])
        if run is None:
            return 0
        before = self._before(run)
        return before if run.text is None else before + anchor[0] - run.lamport + 1

    # --- structure maintenance ------------------------------------------------------------

    def _vis_add(self, chunk: _Chunk, delta: int) -> None:
        chunk.vis += delta
        self._len += delta
        self._sums.add(chunk.idx, delta)

    def _index_add(self, run: _Run) -> None:
        idx = self._by_replica.get(run.replica)
        if idx is None:
            idx = self._by_replica[run.replica] = _RunIndex()
        idx.add(run)

    def _chunk_insert(self, chunk: _Chunk, pos: int, run: _Run) -> None:
        chunk.runs.insert(pos, run)
        run.chunk = chunk
        if run.text is not None:
            self._vis_add(chunk, run.n)
        if len(chunk.runs) > CHUNK_MAX:
            self._split_chunk(chunk)

    def _split_chunk(self, chunk: _Chunk) -> None:
        half = len(chunk.runs) >> 1
        right = _Chunk()
        right.runs = chunk.runs[half:]
        del chunk.runs[half:]
        for run in right.runs:
            run.chunk = right
            if run.text is not None:
                right.vis += run.n
        chunk.vis -= right.vis
        chunks = self._chunks
        chunks.insert(chunk.idx + 1, right)
        for i in range(chunk.idx + 1, len(chunks)):
            chunks[i].idx = i
        self._sums = _Fenwick([c.vis for c in chunks])

    def _split_run(self, run: _Run, off: int) -> _Run:
        """Splits ``run`` at ``off`` (``0 < off < run.n``); returns the new right part."""
        text = run.text
        right = _Run(
            run.lamport + off, run.replica, run.n - off, None if text is None else text[off:]
        )
        run.n = off
        chunk = run.chunk
        if text is not None:
            run.text = text[:off]
            # The right part is counted again when it is inserted into the chunk.
            self._vis_add(chunk, -right.n)
        self._index_add(right)
        self._chunk_insert(chunk, chunk.runs.index(run) + 1, right)
        return right

    def _before(self, run: _Run) -> int:
        """Visible code points before ``run``."""
        chunk = run.chunk
        n = self._sums.prefix(chunk.idx)
        for r in chunk.runs:
            if r is run:
                break
            if r.text is not None:
                n += r.n
        return n

    def _next(self, run: _Run) -> Optional[_Run]:
        """The run after ``run`` in document order, or ``None``."""
        chunk = run.chunk
        i = chunk.runs.index(run)
        if i + 1 < len(chunk.runs):
            return chunk.runs[i + 1]
        for c in self._chunks[chunk.idx + 1 :]:
            if c.runs:
                return c.runs[0]
        return None

    def _try_merge(self, a: Optional[_Run], b: Optional[_Run]) -> None:
        """Merges tombstone ``b`` into tombstone ``a`` when ``a`` directly precedes it with the
        ids just before it."""
        if a is None or b is None or a.chunk is not b.chunk:
            return
        if a.replica != b.replica or a.lamport + a.n != b.lamport:
            return
        if a.text is not None or b.text is not None:
            return
        runs = a.chunk.runs
        i = runs.index(b)
        if i < 1 or runs[i - 1] is not a:
            return
        del runs[i]
        self._by_replica[b.replica].remove(b)
        a.n += b.n

    def _locate(self, pos: int) -> Tuple[_Run, int]:
        """The visible run and offset holding code point ``pos``."""
        if not 0 <= pos < self._len:
            raise IndexError(f"position {pos} out of range 0..{self._len}")
        ci, p = self._sums.search(pos)
        for run in self._chunks[ci].runs:
            if run.text is None:
                continue
            if p < run.n:
                return run, p
            p -= run.n
        raise AssertionError("rga: chunk sums out of sync")

    # --- integration ----------------------------------------------------------------------

    def _integrate_ins(
        self,
        lamport: int,
        replica: int,
        after: Optional[Id],
        text: str,
        changes: Optional[List[Change]],
    ) -> None:
        n = len(text)
        if n == 0:
            raise OpError("invalid_op", "empty insert")
        if lamport + n - 1 > MAX_ID_COMPONENT:
            raise OpError("invalid_op", "ids run past 2^53-1")
        # Skip the prefix that is already integrated (a resend, or our own echo).
        skipped = 0
        while skipped < n:
            known = self._find(lamport + skipped, replica)
            if known is None:
                break
            skipped = min(n, known.lamport + known.n - lamport)
        if skipped == n:
            return
        if skipped:
            after = (lamport + skipped - 1, replica)
            text = text[skipped:]
            lamport += skipped
            n -= skipped
        # Where the scan starts: right after `after`, or at the document start.
        if after is None:
            chunk = self._chunks[0]
            i = 0
        else:
            parent = self._find(after[0], after[1])
            if parent is None:
                raise OpError("unknown_id", f"unknown after id {list(after)}")
            if lamport <= after[0]:
                raise OpError("invalid_op", "lamport not above its parent")
            off = after[0] - parent.lamport
            if off + 1 < parent.n:
                self._split_run(parent, off + 1)
            chunk = parent.chunk
            i = chunk.runs.index(parent) + 1
        # Skip every following item with a greater id. Ids grow along a run, so a run's first
        # id decides for the whole run.
        chunks = self._chunks
        new_id = (lamport, replica)
        while True:
            runs = chunk.runs
            if i >= len(runs):
                if chunk.idx + 1 < len(chunks):
                    chunk = chunks[chunk.idx + 1]
                    i = 0
                    continue
                break
            r = runs[i]
            if (r.lamport, r.replica) > new_id:
                i += 1
                continue
            break
        # Prefer the end of the previous chunk to the start of the next: typing at the end of a
        # run then extends it.
        if i == 0 and chunk.idx > 0:
            chunk = chunks[chunk.idx - 1]
            i = len(chunk.runs)
        # Extend the previous run while it has room (typing), then add runs of at most
        # RUN_TEXT_MAX characters, each right after the one before.
        first: Optional[_Run] = None
        first_start = 0
        offset = 0
        while offset < n:
            prev = chunk.runs[i - 1] if i > 0 else None
            room = 0
            if (
                prev is not None
                and prev.text is not None
                and prev.replica == replica
                and prev.lamport + prev.n == lamport + offset
            ):
                room = RUN_TEXT_MAX - prev.n
            if room > 0:
                assert prev is not None and prev.text is not None
                take = min(room, n - offset)
                start = prev.n
                prev.text += text[offset : offset + take]
                prev.n += take
                self._vis_add(chunk, take)
                run = prev
            else:
                take = min(RUN_TEXT_MAX, n - offset)
                start = 0
                run = _Run(lamport + offset, replica, take, text[offset : offset + take])
                self._index_add(run)
                self._chunk_insert(chunk, i, run)
            if first is None:
                first, first_start = run, start
            offset += take
            chunk = run.chunk
            i = chunk.runs.index(run) + 1
        self.n_items += n
        if lamport + n - 1 > self.max_lamport:
            self.max_lamport = lamport + n - 1
        if changes is not None and first is not None:
            changes.append(Change(self._before(first) + first_start, 0, text))

    def _integrate_del(
        self, lamport: int, replica: int, n: int, changes: Optional[List[Change]]
    ) -> None:
        if n < 1:
            raise OpError("invalid_op", "delete of len < 1")
        if lamport + n - 1 > MAX_ID_COMPONENT:
            raise OpError("invalid_op", "ids run past 2^53-1")
        k = 0
        while k < n:
            run = self._find(lamport + k, replica)
            if run is None:
                raise OpError("unknown_id", f"unknown delete target {[lamport + k, replica]}")
            off = lamport + k - run.lamport
            m = min(run.n - off, n - k)
            k += m
            if run.text is None:
                continue
            if off > 0:
                run = self._split_run(run, off)
            if m < run.n:
                self._split_run(run, m)
            if changes is not None:
                changes.append(Change(self._before(run), m, ""))
            run.text = None
            chunk = run.chunk
            self._vis_add(chunk, -m)
            # Keep runs long: join neighbouring tombstones with consecutive ids.
            runs = chunk.runs
            i = runs.index(run)
            if i + 1 < len(runs):
                self._try_merge(run, runs[i + 1])
            if i > 0:
                self._try_merge(runs[i - 1], run)

    @staticmethod
    def validate_op(op: Any) -> None:
        """Checks one op's shape; raises :class:`OpError` (``bad_message``) when malformed."""
        if not isinstance(op, Mapping):
            raise OpError("bad_message", "op is not an object")
        _check_id(op.get("id"), "id")
        kind = op.get("kind")
        if kind == "ins":
            text = op.get("text")
            if not isinstance(text, str):
                raise OpError("bad_message", "bad text")
            if op.get("after") is not None:
                _check_id(op["after"], "after")
        elif kind == "del":
            n = op.get("len")
            if type(n) is not int:  # noqa: E721 (bool is not a length)
                raise OpError("bad_message", "bad len")
        else:
            raise OpError("bad_message", f"unknown op kind {kind!r}")

    def apply_ops(self, ops: Sequence[Op]) -> List[Change]:
        """Applies ops (remote, replayed or re-applied local ones) in order; known inserts are
        skipped and deleting a tombstone is a no-op, so applying twice changes nothing.

        Returns the visible changes, to apply one after another to the old text.
        Raises :class:`OpError` for an op that cannot apply; the ops before it stay applied.
        """
        changes: List[Change] = []
        for op in ops:
            self.validate_op(op)
            lamport, replica = op["id"]
            if op["kind"] == "ins":
                after = op.get("after")
                self._integrate_ins(
                    lamport,
                    replica,
                    None if after is None else (after[0], after[1]),
                    op["text"],
                    changes,
                )
            else:
                self._integrate_del(lamport, replica, op["len"], changes)
        return changes

    # --- local edits ----------------------------------------------------------------------

    def local_insert(self, pos: int, text: str) -> Optional[Op]:
        """Inserts ``text`` at code point ``pos``; returns the op to send (``None`` for ``""``).

        Every character gets a lamport above any seen so far.
        Raises :class:`IndexError` for a position outside ``0 ..= len(self)``,
        :class:`OpError` for a lone surrogate, :class:`RuntimeError` before the replica is set.
        """
        if self.replica is None:
            raise RuntimeError("rga: replica not set yet")
        if not 0 <= pos <= self._len:
            raise IndexError(f"insert position {pos} out of range 0..={self._len}")
        if not text:
            return None
        _check_text(text)
        after = None if pos == 0 else self.id_at(pos - 1)
        lamport = self.max_lamport + 1
        if lamport + len(text) - 1 > MAX_ID_COMPONENT:
            raise OpError("invalid_op", "ids run past 2^53-1")
        self._integrate_ins(lamport, self.replica, after, text, None)
        return {
            "kind": "ins",
            "id": [lamport, self.replica],
            "after": None if after is None else list(after),
            "text": text,
        }

    def local_delete(self, pos: int, length: int) -> List[Op]:
        """Deletes ``length`` code points at ``pos``; returns the ``del`` ops to send (one per
        range of consecutive ids, ``[]`` for ``length == 0``).

        Raises :class:`IndexError` for a range outside the document.
        """
        if pos < 0 or length < 0 or pos + length > self._len:
            raise IndexError(f"delete {pos}+{length} out of range 0..{self._len}")
        ops: List[Op] = []
        left = length
        if left:
            run: Optional[_Run]
            run, off = self._locate(pos)
            while left > 0 and run is not None:
                if run.text is not None:
                    m = min(run.n - off, left)
                    last = ops[-1] if ops else None
                    if (
                        last is not None
                        and last["id"][1] == run.replica
                        and last["id"][0] + last["len"] == run.lamport + off
                    ):
                        last["len"] += m
                    else:
                        ops.append(
                            {"kind": "del", "id": [run.lamport + off, run.replica], "len": m}
                        )
                    left -= m
                off = 0
                run = self._next(run)
        for op in ops:
            self._integrate_del(op["id"][0], op["id"][1], op["len"], None)
        return ops

    # --- snapshots ------------------------------------------------------------------------

    def load_snapshot(self, runs: Sequence[Mapping[str, Any]]) -> None:
        """Replaces the content with a snapshot's runs (``hello_ack.snapshot.runs``).

        Raises :class:`OpError` (``bad_message``) for a malformed run; the document is then
        empty.
        """
        self._reset()
        try:
            self._load_runs(runs)
        except OpError:
            self._reset()
            raise

    def _load_runs(self, snapshot_runs: Sequence[Mapping[str, Any]]) -> None:
        chunk = self._chunks[0]
        chunks = self._chunks
        last: Optional[_Run] = None
        for s in snapshot_runs:
            if not isinstance(s, Mapping):
                raise OpError("bad_message", "bad snapshot run")
            lamport, replica = _check_id(s.get("id"), "snapshot run id")
            text = s.get("text")
            if isinstance(text, str):
                if not text:
                    raise OpError("bad_message", "empty snapshot run")
                pieces: List[Optional[str]] = [
                    text[i : i + RUN_TEXT_MAX] for i in range(0, len(text), RUN_TEXT_MAX)
                ]
            else:
                deleted = s.get("deleted")
                if type(deleted) is not int or deleted < 1:  # noqa: E721
                    raise OpError("bad_message", "bad snapshot run")
                pieces = [None]
            for piece in pieces:
                n = len(piece) if piece is not None else int(s["deleted"])
                if lamport + n - 1 > MAX_ID_COMPONENT:
                    raise OpError("bad_message", "snapshot ids run past 2^53-1")
                self.n_items += n
                if lamport + n - 1 > self.max_lamport:
                    self.max_lamport = lamport + n - 1
                if (
                    piece is None
                    and last is not None
                    and last.text is None
                    and last.replica == replica
                    and last.lamport + last.n == lamport
                ):
                    last.n += n
                    continue
                if len(chunk.runs) >= CHUNK_MAX // 2:
                    chunk = _Chunk()
                    chunk.idx = len(chunks)
                    chunks.append(chunk)
                run = _Run(lamport, replica, n, piece)
                self._index_add(run)
                chunk.runs.append(run)
                run.chunk = chunk
                if piece is not None:
                    chunk.vis += n
                    self._len += n
                last = run
                lamport += n
        self._sums = _Fenwick([c.vis for c in chunks])

    def to_snapshot(self) -> List[Dict[str, Any]]:
        """The content as snapshot runs in document order, tombstones included (adjacent runs
        of consecutive ids and the same state merged)."""
        out: List[Dict[str, Any]] = []
        prev: Optional[_Run] = None
        for run in self._runs():
            if (
                prev is not None
                and prev.replica == run.replica
                and prev.lamport + prev.n == run.lamport
                and (prev.text is None) == (run.text is None)
            ):
                last = out[-1]
                if run.text is None:
                    last["deleted"] += run.n
                else:
                    last["text"] += run.text
            elif run.text is None:
                out.append({"id": [run.lamport, run.replica], "deleted": run.n})
            else:
                out.append({"id": [run.lamport, run.replica], "text": run.text})
            prev = run
        return out

    def _runs(self) -> Iterator[_Run]:
        for chunk in self._chunks:
            yield from chunk.runs

    def check(self) -> None:
        """Walks the whole structure and raises :class:`AssertionError` on a broken invariant
        (for tests: ``O(n)``)."""
        items = 0
        total = 0
        for ci, chunk in enumerate(self._chunks):
            if chunk.idx != ci:
                raise AssertionError("check: chunk idx")
            vis = 0
            for run in chunk.runs:
                if run.chunk is not chunk:
                    raise AssertionError("check: run chunk")
                if run.n < 1:
                    raise AssertionError("check: empty run")
                if run.text is not None:
                    if len(run.text) != run.n:
                        raise AssertionError("check: run text length")
                    vis += run.n
                found = (
                    self._find(run.lamport, run.replica),
                    self._find(run.lamport + run.n - 1, run.replica),
                )
                if found[0] is not run or found[1] is not run:
                    raise AssertionError("check: id index")
                items += run.n
            if vis != chunk.vis:
                raise AssertionError("check: chunk cache")
            if self._sums.prefix(ci + 1) - self._sums.prefix(ci) != vis:
                raise AssertionError("check: chunk sums")
            total += vis
        if total != self._len:
            raise AssertionError("check: length")
        indexed = 0
        for idx in self._by_replica.values():
            for i, run in enumerate(idx.runs):
                if idx.starts[i] != run.lamport:
                    raise AssertionError("check: index start")
                if i and idx.runs[i - 1].lamport + idx.runs[i - 1].n > run.lamport:
                    raise AssertionError("check: index order")
                indexed += run.n
        if items != self.n_items or indexed != items:
            raise AssertionError("check: item count")
