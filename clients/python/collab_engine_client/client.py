"""``CollabClient``: a live replica of one document on a collab-engine server, over asyncio.

The client keeps an :class:`~collab_engine_client.rga.RgaDoc`, sends local edits as ``op``
messages (coalesced for ``flush_delay`` seconds), integrates every ``op_echo``, and reconnects
with ``since``/``epoch`` after a drop, resending its unacknowledged messages with their original
``client_seq`` (the server answers ``ack`` for those it had applied, so every edit applies once).
When the server lost history the client had seen, it follows the rule of ``docs/protocol.md``
("Lost history"). It publishes presence, sends a token and refreshes it before it expires.

It never blocks the event loop: local edits are plain method calls that return at once; all I/O
happens in one background task started by :meth:`CollabClient.start` (or ``async with``).
All methods must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .rga import Op, OpError, RgaDoc, coalesce_op

__all__ = [
    "ChangeEvent",
    "CollabClient",
    "ErrorEvent",
    "NotJoinedError",
    "Peer",
    "PresenceEvent",
    "ReadOnlyError",
    "StatusEvent",
    "TokenProvider",
    "doc_url",
]

log = logging.getLogger("collab_engine_client")

#: A token, or a function returning one (possibly a coroutine function); a function is called
#: before every connection and before the current token expires.
TokenProvider = Union[str, Callable[[], Union[str, Awaitable[str]]]]

#: Ops per ``op`` message (the contract allows 10,000).
OPS_PER_MESSAGE_MAX = 1000
#: Code points per ``ins`` op; keeps every message far below the 64 KiB minimum limit.
INS_TEXT_MAX = 8192
#: Encoded bytes of ops per message before the next op starts a new message.
MESSAGE_BYTES_MAX = 48 * 1024

_RETRY_CODES = frozenset({"unavailable", "overloaded", "rate_limited"})


class NotJoinedError(RuntimeError):
    """A local edit before the first ``hello_ack``: the replica id is not known yet."""


class ReadOnlyError(PermissionError):
    """A local edit on a connection whose token only allows reading (``role: read``)."""


@dataclass(frozen=True)
class ChangeEvent:
    """A change of the text: remove ``length`` code points at ``index``, insert ``text``.

    ``remote`` is false for edits made through this client's API; ``reset`` is true when a
    snapshot replaced the whole text (then ``index`` is 0 and ``length`` the old length).
    """

    #: Code point position.
    index: int
    #: Code points removed.
    length: int
    #: Text inserted.
    text: str
    #: Whether the change came from the server (another replica, or a snapshot).
    remote: bool
    #: Whether a snapshot replaced everything.
    reset: bool = False


@dataclass(frozen=True)
class Peer:
    """Another replica's presence."""

    #: Its replica id.
    replica: int
    #: Its presence state (any JSON).
    state: Any
    #: The user (token subject) when the server runs with auth, else ``None``.
    user: Optional[str] = None
    #: The user's display name from the token when the server runs with auth, else ``None``.
    name: Optional[str] = None


@dataclass(frozen=True)
class PresenceEvent:
    """A presence update: ``peer`` set its state, or left (``peer is None`` and ``replica``
    set); ``reset`` when the whole table was replaced (``replica`` is then ``None``)."""

    #: The replica concerned (``None`` for a reset).
    replica: Optional[int]
    #: Its new presence, ``None`` when it cleared its state or left.
    peer: Optional[Peer]
    #: Whether every peer was replaced (after a join, or offline).
    reset: bool = False


@dataclass(frozen=True)
class StatusEvent:
    """The connection status changed (see :attr:`CollabClient.status`)."""

    #: ``connecting``, ``online``, ``saved``, ``offline``, ``denied``, ``replaced`` or ``closed``.
    status: str
    #: Local ops not yet acknowledged.
    pending: int
    #: Why, for ``denied`` (the server's reason) and ``replaced``.
    reason: Optional[str] = None


@dataclass(frozen=True)
class ErrorEvent:
    """Something went wrong: a refusal from the server, or a connection problem."""

    #: The contract's error code, or ``connect``, ``closed``, ``bad_message``, ``gap``,
    #: ``diverged``, ``handler``, ``auth``.
    code: str
    #: Human-readable explanation.
    message: str
    #: The refused op message's ``client_seq``, when there is one.
    client_seq: Optional[int] = None


@dataclass
class _Message:
    """An op message sent (or to be sent) and not acknowledged yet, or acknowledged and kept."""

    client_seq: int
    ops: List[Op]


class _Reconnect(Exception):
    """Drop this connection and connect again at once (a gap, a refused edit, a diverged
    replica)."""


class _ReconnectLater(_Reconnect):
    """Drop this connection and reconnect after the usual backoff."""


Handler = Callable[[Any], Any]


def doc_url(base: str, doc: str) -> str:
    """The WebSocket URL of ``doc`` from a base such as ``ws://host:8000`` or ``.../ws``."""
    b = base.rstrip("/")
    if not b.endswith("/ws"):
        b += "/ws"
    return f"{b}/{urllib.parse.quote(doc, safe='')}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _split_long_insert(op: Op) -> List[Op]:
    text: str = op["text"]
    if len(text) <= INS_TEXT_MAX:
        return [op]
    out: List[Op] = []
    after = op["after"]
    lamport, replica = op["id"]
    for i in range(0, len(text), INS_TEXT_MAX):
        piece = text[i : i + INS_TEXT_MAX]
        out.append({"kind": "ins", "id": [lamport + i, replica], "after": after, "text": piece})
        after = [lamport + i + len(piece) - 1, replica]
    return out


def _batch_ops(ops: Sequence[Op]) -> List[List[Op]]:
    """Groups ops into message-sized batches (long inserts split into chains)."""
    batches: List[List[Op]] = []
    cur: List[Op] = []
    size = 0
    for big in ops:
        for op in _split_long_insert(big) if big["kind"] == "ins" else [big]:
            n = len(_dumps(op).encode("utf-8"))
            if cur and (len(cur) >= OPS_PER_MESSAGE_MAX or size + n > MESSAGE_BYTES_MAX):
                batches.append(cur)
                cur, size = [], 0
            cur.append(op)
            size += n
    if cur:
        batches.append(cur)
    return batches


class CollabClient:
    """A live replica of one document.

    Events (:meth:`on`): ``change`` (:class:`ChangeEvent`) for every visible change, remote or
    local; ``presence`` (:class:`PresenceEvent`); ``status`` (:class:`StatusEvent`); ``error``
    (:class:`ErrorEvent`). A handler may be a plain function or a coroutine function (then it
    runs as a task).

    Example::

        async with CollabClient("ws://127.0.0.1:8000", "notes") as client:
            client.insert(0, "hello")
            await client.wait_saved()
    """

    def __init__(
        self,
        url: str,
        doc: str,
        *,
        token: Optional[TokenProvider] = None,
        replica: Optional[int] = None,
        presence: Any = None,
        flush_delay: float = 0.016,
        backoff_min: float = 0.25,
        backoff_max: float = 5.0,
        refresh_margin: float = 60.0,
        open_timeout: float = 10.0,
        history_max: int = 100_000,
    ) -> None:
        """Creates a client for ``doc`` on the server at ``url`` (``ws://host:port``, or a URL
        ending in ``/ws``); it connects on :meth:`start`.

        ``token``: a string, or a function (plain or async) returning one, sent as
        ``hello.token``; a function is called again for each connection and ``refresh_margin``
        seconds (at most half the lifetime) before the token's ``exp`` to refresh it in place.
        ``replica``: reuse this replica id (else the server assigns one). ``presence``: the
        initial presence state. ``flush_delay``: edits made within this many seconds go in one
        message. ``backoff_min``/``backoff_max``: reconnect delays (exponential, jittered).
        ``history_max``: acknowledged messages kept for the lost-history rule.
        """
        if not isinstance(doc, str) or not doc:
            raise ValueError("CollabClient: doc is required")
        if len(doc.encode("utf-8")) > 512:
            raise ValueError("CollabClient: doc names are at most 512 bytes of UTF-8")
        #: The document's WebSocket URL (may be changed while offline, e.g. to another server).
        self.url = doc_url(url, doc)
        #: The document's name.
        self.doc_name = doc
        #: The replica: the text, positions and ids.
        self.doc = RgaDoc(replica)
        self._token_source = token
        self.flush_delay = flush_delay
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.refresh_margin = refresh_margin
        self.open_timeout = open_timeout
        self.history_max = history_max
        #: Last ``server_seq`` applied (``None`` before the first join).
        self.since: Optional[int] = None
        #: The epoch ``since`` belongs to (``None`` before the first join).
        self.epoch: Optional[str] = None
        #: Head announced by the last ``hello_ack``.
        self.head = 0
        #: Role from the last ``hello_ack`` (``write`` when the server runs without auth).
        self.role = "write"
        #: User (token subject) from the last ``hello_ack``, when the server runs with auth.
        self.user: Optional[str] = None
        #: Unix time the current token expires, when the server says.
        self.exp: Optional[int] = None
        #: The other connected replicas' presence.
        self.peers: Dict[int, Peer] = {}
        #: Why the server denied access (status ``denied``), else ``None``.
        self.denied_reason: Optional[str] = None
        self._outbox: List[Op] = []
        self._unacked: List[_Message] = []
        self._acked: Deque[_Message] = deque()
        self._next_seq = 1
        self._handlers: Dict[str, List[Handler]] = {}
        self._status = "offline"
        self._ws: Optional[ClientConnection] = None
        self._queue: Optional["asyncio.Queue[str]"] = None
        self._joined = False
        self._ever_joined = False
        self._resync = False
        self._reconnect_at_once = False
        self._attempt = 0
        self._closing = False
        self._terminal = False
        self._presence_state = presence
        self._presence_dirty = presence is not None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._flush_handle: Optional[asyncio.TimerHandle] = None
        self._presence_handle: Optional[asyncio.TimerHandle] = None
        self._refresh_task: Optional["asyncio.Task[None]"] = None
        self._wake: Optional[asyncio.Event] = None
        self._changed: Optional[asyncio.Event] = None
        self._tasks: "set[asyncio.Task[Any]]" = set()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts connecting in the background (returns at once; see :meth:`wait_joined`)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closing = False
        self._task = self._loop.create_task(self._run())

    async def close(self) -> None:
        """Sends what is queued, closes the connection and stops reconnecting.

        Unacknowledged edits stay in memory (:attr:`pending`); they are lost with the object.
        """
        self._closing = True
        self._flush_now()
        task, self._task = self._task, None
        ws = self._ws
        if ws is not None:
            await self._drain_queue()
            await ws.close()
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for handle in (self._flush_handle, self._presence_handle):
            if handle is not None:
                handle.cancel()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if not self._terminal:
            self._set_status("closed")
        self._notify()

    async def __aenter__(self) -> "CollabClient":
        """Starts the client and waits (``2 * open_timeout`` at most) for the first join; on
        failure the client is closed and the error raised."""
        await self.start()
        try:
            await self.wait_joined(self.open_timeout * 2)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        """Closes the client (see :meth:`close`)."""
        await self.close()

    def reconnect_now(self) -> None:
        """Drops the current connection (if any) and connects again at once."""
        self._attempt = 0
        if self._ws is not None:
            self._reconnect_at_once = True
            self._spawn(self._ws.close(1000))
        elif self._wake is not None:
            self._wake.set()

    # --- reading ----------------------------------------------------------------------------

    @property
    def replica(self) -> Optional[int]:
        """This client's replica id (``None`` until the first ``hello_ack``)."""
        return self.doc.replica

    @property
    def status(self) -> str:
        """``connecting``, ``online`` (joined, edits pending), ``saved`` (joined, nothing
        pending), ``offline``, ``denied`` (terminal: see :attr:`denied_reason`), ``replaced``
        (terminal: another connection took this replica) or ``closed``."""
        return self._status

    @property
    def ready(self) -> bool:
        """Whether the first ``hello_ack`` arrived, so local edits are possible."""
        return self._ever_joined

    @property
    def joined(self) -> bool:
        """Whether the current connection is joined."""
        return self._joined

    @property
    def pending(self) -> int:
        """Local ops not yet acknowledged by the server."""
        return len(self._outbox) + sum(len(m.ops) for m in self._unacked)

    def text(self) -> str:
        """The document's text."""
        return self.doc.text()

    def __len__(self) -> int:
        """The document's length in code points."""
        return len(self.doc)

    # --- events -----------------------------------------------------------------------------

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        """Calls ``handler(ev)`` for every ``event`` (``change``, ``presence``, ``status``,
        ``error``); returns a function that unsubscribes."""
        if event not in ("change", "presence", "status", "error"):
            raise ValueError(f"unknown event {event!r}")
        self._handlers.setdefault(event, []).append(handler)

        def off() -> None:
            handlers = self._handlers.get(event, [])
            if handler in handlers:
                handlers.remove(handler)

        return off

    def _emit(self, event: str, value: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            try:
                result = handler(value)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception as err:  # a handler's bug must not break the connection
                log.exception("collab-engine client: %s handler failed", event)
                if event != "error":
                    self._emit("error", ErrorEvent("handler", repr(err)))

    def _spawn(self, aw: Awaitable[Any]) -> None:
        loop = self._loop or asyncio.get_running_loop()
        task: "asyncio.Task[Any]" = asyncio.ensure_future(aw, loop=loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: Optional[float]) -> None:
        async def wait() -> None:
            while not predicate():
                if self._terminal:
                    raise ConnectionError(f"client is {self._status}: {self.denied_reason}")
                if self._changed is None:
                    raise RuntimeError("CollabClient: call start() first")
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_joined(self, timeout: Optional[float] = None) -> None:
        """Waits until the connection is joined (raises :class:`asyncio.TimeoutError`, or
        :class:`ConnectionError` when access is denied)."""
        await self._wait_until(lambda: self._joined, timeout)

    async def wait_saved(self, timeout: Optional[float] = None) -> None:
        """Waits until the connection is joined and every local edit is acknowledged."""
        self._flush_now()
        await self._wait_until(lambda: self._joined and self.pending == 0, timeout)

    async def wait_for_head(self, head: int, timeout: Optional[float] = None) -> None:
        """Waits until every op message up to ``server_seq`` ``head`` is applied."""
        await self._wait_until(lambda: self.since is not None and self.since >= head, timeout)

    # --- local edits ------------------------------------------------------------------------

    def insert(self, pos: int, text: str) -> None:
        """Inserts ``text`` at code point position ``pos``."""
        self.replace(pos, 0, text)

    def delete(self, pos: int, length: int) -> None:
        """Deletes ``length`` code points at position ``pos``."""
        self.replace(pos, length, "")

    def replace(self, pos: int, length: int, text: str) -> None:
        """Replaces ``length`` code points at ``pos`` with ``text``; emits one ``change``
        event with ``remote=False``.

        Raises :class:`NotJoinedError` before the first join, :class:`ReadOnlyError` with a
        read-only token, :class:`IndexError` for a range outside the text, and
        :class:`~collab_engine_client.rga.OpError` for a lone surrogate in ``text``.
        """
        if not isinstance(text, str):
            raise TypeError("CollabClient: text must be a str")
        if not self._ever_joined:
            raise NotJoinedError("CollabClient: not joined yet (await wait_joined())")
        if self.role == "read":
            raise ReadOnlyError("CollabClient: the token only allows reading")
        doc = self.doc
        if pos < 0 or length < 0 or pos + length > len(doc):
            raise IndexError(f"replace {pos}+{length} out of range 0..{len(doc)}")
        if text:
            text.encode("utf-8")  # a lone surrogate raises before anything changes
        ops = doc.local_delete(pos, length)
        ins = doc.local_insert(pos, text)
        if ins is not None:
            ops.append(ins)
        if not ops:
            return
        for op in ops:
            coalesce_op(self._outbox, op)
        self._emit("change", ChangeEvent(pos, length, text, remote=False))
        self._set_status("online" if self._joined else self._status)
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_later(self.flush_delay, self._flush_timer)

    def flush(self) -> None:
        """Turns the queued edits into op messages now (sending them when joined)."""
        self._flush_now()

    def _flush_timer(self) -> None:
        self._flush_handle = None
        self._flush_now()

    def _flush_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._outbox:
            return
        batches = _batch_ops(self._outbox)
        self._outbox = []
        for ops in batches:
            msg = _Message(self._next_seq, ops)
            self._next_seq += 1
            self._unacked.append(msg)
            if self._joined:
                self._send_op(msg)

    # --- presence ---------------------------------------------------------------------------

    def set_presence(self, state: Any) -> None:
        """Sets this client's presence state (any JSON, at most 4096 bytes; ``None`` clears
        it); sent at most once per ``flush_delay`` (30 ms at least)."""
        _dumps(state)  # not JSON: raises here rather than in the background
        self._presence_state = state
        self._presence_dirty = True
        if self._presence_handle is None and self._loop is not None:
            self._presence_handle = self._loop.call_later(
                max(self.flush_delay, 0.03), self._presence_timer
            )

    def _presence_timer(self) -> None:
        self._presence_handle = None
        self._send_presence()

    def _send_presence(self) -> None:
        if not self._joined or not self._presence_dirty:
            return
        # Edits first, so that ids named in the presence state are known to the peers.
        self._flush_now()
        self._presence_dirty = False
        self._send({"type": "presence", "state": self._presence_state})

    # --- connection -------------------------------------------------------------------------

    def _set_status(self, status: str, reason: Optional[str] = None) -> None:
        if status in ("online", "saved") and self._joined:
            status = "online" if self.pending else "saved"
        if status == self._status:
            return
        self._status = status
        self._emit("status", StatusEvent(status, self.pending, reason))
        self._notify()

    def _send(self, msg: Dict[str, Any]) -> None:
        if self._queue is not None:
            self._queue.put_nowait(_dumps(msg))

    def _send_op(self, msg: _Message) -> None:
        self._send({"type": "op", "client_seq": msg.client_seq, "ops": msg.ops})

    async def _drain_queue(self) -> None:
        # The writer task sends what is queued; give it a moment (bounded) before closing.
        for _ in range(200):
            queue = self._queue
            if queue is None or queue.empty():
                return
            await asyncio.sleep(0.005)

    async def _token_now(self) -> Optional[str]:
        source = self._token_source
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise TypeError("CollabClient: the token provider must return a string")
        return value

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closing and not self._terminal:
            self._set_status("connecting")
            delay: Optional[float] = None
            try:
                await self._connect_once()
                if self._resync or self._reconnect_at_once:
                    delay = 0.0
            except asyncio.CancelledError:
                raise
            except _ReconnectLater:
                pass
            except _Reconnect:
                delay = 0.0
            except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidURI) as err:
                self._emit("error", ErrorEvent("connect", f"{type(err).__name__}: {err}"))
            except ConnectionClosed as err:
                self._emit("error", ErrorEvent("closed", str(err)))
            except Exception as err:  # a bug in this module: report, back off, retry
                log.exception("collab-engine client: connection failed")
                self._emit("error", ErrorEvent("client", repr(err)))
            finally:
                self._detach()
                self._reconnect_at_once = False
            if self._closing or self._terminal:
                break
            self._set_status("offline")
            if delay is None:
                cap = min(self.backoff_max, self.backoff_min * 2 ** min(self._attempt, 16))
                delay = cap / 2 + random.random() * cap / 2
            self._attempt += 1
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _connect_once(self) -> None:
        try:
            token = await self._token_now()
        except Exception as err:  # the provider failed: try again after the backoff
            self._emit("error", ErrorEvent("auth", f"token provider failed: {err!r}"))
            raise _ReconnectLater() from err
        hello: Dict[str, Any] = {"type": "hello", "doc": self.doc_name}
        if self.doc.replica is not None:
            hello["replica"] = self.doc.replica
        if token is not None:
            hello["token"] = token
        if self.since is not None and not self._resync:
            hello["since"] = self.since
            hello["epoch"] = self.epoch
        async with connect(
            self.url,
            open_timeout=self.open_timeout,
            max_size=None,
            compression=None,
            close_timeout=2,
        ) as ws:
            self._ws = ws
            self._queue = asyncio.Queue()
            writer = asyncio.get_running_loop().create_task(self._writer(ws, self._queue))
            try:
                await ws.send(_dumps(hello))
                async for raw in ws:
                    if not isinstance(raw, str):
                        self._emit("error", ErrorEvent("bad_message", "binary frame from server"))
                        continue
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        self._emit("error", ErrorEvent("bad_message", "unparsable server frame"))
                        continue
                    if isinstance(msg, dict):
                        self._on_message(msg)
            except ConnectionClosed:
                pass  # the close code and reason say why, below
            finally:
                writer.cancel()
            self._on_close(ws.close_code, ws.close_reason or "")

    async def _writer(self, ws: ClientConnection, queue: "asyncio.Queue[str]") -> None:
        try:
            while True:
                await ws.send(await queue.get())
        except ConnectionClosed:
            pass

    def _on_close(self, code: Optional[int], reason: str) -> None:
        if self._terminal or self._closing:
            return
        if code not in (1000, 1001) and not self._reconnect_at_once:
            self._emit("error", ErrorEvent("closed", f"connection closed: {code} {reason}".strip()))
        if code == 1008 and "replaced" in reason:
            # Another connection took over our replica: reconnecting would steal it back.
            self._terminal = True
            self._emit("error", ErrorEvent("replaced", "another connection took over this replica"))
            self._set_status("replaced", reason)
        elif code == 1008 and ("revoked" in reason or "unauthorized" in reason):
            self._deny(reason)
        elif code == 1008 and "expired" in reason and isinstance(self._token_source, str):
            # A fixed token cannot be renewed; a provider gets a new one on the next connect.
            self._deny(reason)

    def _deny(self, reason: str) -> None:
        self.denied_reason = reason
        self._terminal = True
        self._set_status("denied", reason)

    def _detach(self) -> None:
        self._ws = None
        self._queue = None
        self._joined = False
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        # Offline we do not know who is there; the next hello_ack says.
        if self.peers:
            self.peers.clear()
            self._emit("presence", PresenceEvent(None, None, reset=True))
        self._notify()

    # --- server messages --------------------------------------------------------------------

    def _on_message(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("type")
        try:
            if kind == "hello_ack":
                self._on_hello_ack(msg)
            elif kind == "op_echo":
                self._on_echo(msg)
                self._set_status("online")
            elif kind == "ack":
                self._ack_seq(msg.get("client_seq"))
                self._set_status("online")
            elif kind == "presence":
                self._on_presence(msg)
            elif kind == "error":
                self._on_error(msg)
            elif kind == "auth_ack":
                exp = msg.get("exp")
                self.exp = exp if isinstance(exp, int) else None
                self._schedule_refresh()
            # Unknown types are additions a newer server may send.
        except OpError as err:
            # The server accepted what our replica cannot integrate: start over from a snapshot.
            self._emit("error", ErrorEvent("diverged", f"{err.code}: {err}"))
            self._resync = True
            raise _Reconnect() from err
        except (KeyError, TypeError, ValueError) as err:
            self._emit("error", ErrorEvent("bad_message", f"malformed {kind}: {err!r}"))
            self._resync = True
            raise _Reconnect() from err
        self._notify()

    def _ack_seq(self, seq: Any) -> None:
        for i, m in enumerate(self._unacked):
            if m.client_seq == seq:
                del self._unacked[i]
                self._acked.append(m)
                while len(self._acked) > self.history_max:
                    self._acked.popleft()
                return

    def _on_echo(self, e: Dict[str, Any]) -> None:
        if e["replica"] == self.doc.replica:
            self._ack_seq(e["client_seq"])
        seq = e["server_seq"]
        if self.since is not None and seq <= self.since:
            return
        if self.since is not None and seq > self.since + 1:
            # We missed echoes: reconnect, the server replays from `since`.
            self._emit("error", ErrorEvent("gap", f"echo {seq} after {self.since}"))
            raise _Reconnect()
        changes = self.doc.apply_ops(e["ops"])
        self.since = seq
        for c in changes:
            self._emit("change", ChangeEvent(c.index, c.length, c.text, remote=True))

    def _peer(self, entry: Dict[str, Any]) -> Peer:
        user, name = entry.get("user"), entry.get("name")
        return Peer(
            entry["replica"],
            entry.get("state"),
            user if isinstance(user, str) else None,
            name if isinstance(name, str) else None,
        )

    def _on_presence(self, msg: Dict[str, Any]) -> None:
        replica = msg["replica"]
        if replica == self.doc.replica:
            return
        if msg.get("state") is None:
            self.peers.pop(replica, None)
            self._emit("presence", PresenceEvent(replica, None))
        else:
            peer = self._peer(msg)
            self.peers[replica] = peer
            self._emit("presence", PresenceEvent(replica, peer))

    def _on_error(self, msg: Dict[str, Any]) -> None:
        code = str(msg.get("code"))
        text = str(msg.get("message", ""))
        seq = msg.get("client_seq")
        self._emit("error", ErrorEvent(code, text, seq if isinstance(seq, int) else None))
        if code == "unauthorized":
            # Terminal: the server closes with 1008 next; reconnecting would be refused again.
            self._deny(text or "unauthorized")
            raise _Reconnect()
        if not isinstance(seq, int) or not any(m.client_seq == seq for m in self._unacked):
            return
        if code in _RETRY_CODES:
            # Kept pending; resent after a reconnect (with backoff, so not at once).
            self._attempt = max(self._attempt, 1)
            raise _ReconnectLater()
        # The server refused one of our edits, so our replica holds text nobody else has:
        # forget that edit and reload the document; the other pending edits are resent.
        self._unacked = [m for m in self._unacked if m.client_seq != seq]
        self._resync = True
        raise _Reconnect()

    def _on_hello_ack(self, ack: Dict[str, Any]) -> None:
        first_join = not self._ever_joined
        replica = ack["replica"]
        changed_replica = self.doc.replica is not None and replica != self.doc.replica
        self.doc.replica = replica
        lost = self.epoch is not None and (
            ack["epoch"] != self.epoch or (self.since is not None and ack["head"] < self.since)
        )
        role = ack.get("role")
        self.role = role if role in ("read", "write", "admin") else "write"
        user, exp = ack.get("user"), ack.get("exp")
        self.user = user if isinstance(user, str) else None
        self.exp = exp if isinstance(exp, int) else None
        self._flush_now()  # queued edits become pending messages, sent below
        if ack["strategy"] == "replay":
            for e in ack.get("ops") or []:
                self._on_echo(e)
        else:
            old_len = len(self.doc)
            self.doc.load_snapshot((ack.get("snapshot") or {}).get("runs") or [])
            if changed_replica:
                # Our pending ops carry the old replica's ids: re-create them with new ones.
                self._reissue_fresh(self._unacked)
            elif lost:
                self._resend_lost()
            else:
                # Re-apply pending edits; the server integrates their resends idempotently.
                for m in self._unacked:
                    try:
                        self.doc.apply_ops(m.ops)
                    except OpError:
                        pass  # the server refuses it too; its error makes us resync
            self.since = ack["head"]
            if not first_join or len(self.doc):
                self._emit("change", ChangeEvent(0, old_len, self.doc.text(), True, True))
        self._resync = False
        self.epoch = ack["epoch"]
        self.head = ack["head"]
        self._joined = True
        self._ever_joined = True
        self._attempt = 0
        self.peers = {}
        for entry in ack.get("presence") or []:
            if entry.get("replica") != replica and entry.get("state") is not None:
                peer = self._peer(entry)
                self.peers[peer.replica] = peer
        self._emit("presence", PresenceEvent(None, None, reset=True))
        for m in self._unacked:
            self._send_op(m)
        self._flush_now()
        if self._presence_state is not None:
            self._presence_dirty = True
            self._send_presence()
        self._schedule_refresh()
        self._set_status("online")

    def _resend_lost(self) -> None:
        """The lost-history rule (docs/protocol.md, "Lost history"): every own message, the
        acknowledged ones we keep and the pending ones, in ``client_seq`` order, is re-applied
        op by op to the snapshot with its original ids; the ops that change it stay, the others
        (already there, or whose target the snapshot lacks) are dropped; each message that still
        has ops is sent again with its original ``client_seq``."""
        messages = sorted(list(self._acked) + self._unacked, key=lambda m: m.client_seq)
        self._acked.clear()
        kept: List[_Message] = []
        for m in messages:
            ops: List[Op] = []
            for op in m.ops:
                try:
                    changed = self.doc.apply_ops([op])
                except OpError:
                    continue  # its target is gone from the server's history
                if changed:
                    ops.append(op)
            if ops:
                kept.append(_Message(m.client_seq, ops))
        self._unacked = kept

    def _reissue_fresh(self, messages: List[_Message]) -> None:
        """Re-creates ``messages`` as new edits with fresh ids of the current replica (the
        server gave us another replica, so the old ids cannot be sent)."""
        remap: Dict[Tuple[int, int], List[int]] = {}
        out: List[Op] = []
        for m in messages:
            for op in m.ops:
                lamport, old = op["id"]
                if op["kind"] == "ins":
                    if self.doc.has((lamport, old)):
                        continue
                    after: Optional[List[int]] = op["after"]
                    if after is not None:
                        after = remap.get((after[0], after[1]), after)
                        if not self.doc.has((after[0], after[1])):
                            continue
                    replica = self.doc.replica
                    assert replica is not None, "set from the hello_ack before this runs"
                    nid = [self.doc.max_lamport + 1, replica]
                    nop: Op = {"kind": "ins", "id": nid, "after": after, "text": op["text"]}
                    self.doc.apply_ops([nop])
                    for i in range(len(op["text"])):
                        remap[(lamport + i, old)] = [nid[0] + i, nid[1]]
                    coalesce_op(out, nop)
                else:
                    for i in range(op["len"]):
                        target = remap.get((lamport + i, old), [lamport + i, old])
                        if self.doc.is_visible((target[0], target[1])):
                            d: Op = {"kind": "del", "id": list(target), "len": 1}
                            self.doc.apply_ops([d])
                            coalesce_op(out, d)
        self._unacked = []
        for op in out:
            coalesce_op(self._outbox, op)

    # --- token refresh ----------------------------------------------------------------------

    def _schedule_refresh(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if self.exp is None or self._token_source is None or isinstance(self._token_source, str):
            return
        left = self.exp - time.time()
        delay = max(0.0, left - min(self.refresh_margin, left / 2))
        loop = self._loop or asyncio.get_running_loop()
        self._refresh_task = loop.create_task(self._refresh_after(delay))

    async def _refresh_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            token = await self._token_now()
        except Exception as err:  # the provider failed: the server closes us at exp
            self._emit("error", ErrorEvent("auth", f"token provider failed: {err!r}"))
            return
        if token is not None and self._joined:
            self._send({"type": "auth", "token": token})
