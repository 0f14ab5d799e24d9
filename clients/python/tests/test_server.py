"""Python clients against the real server: convergence, presence, restart, lost history."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Callable, List

from collab_engine_client import ChangeEvent, CollabClient, PresenceEvent, StatusEvent

from conftest import Server, run

WORDS = ["py ", "ü", "😀", "\n", "ab", 'a"b']


async def random_edits(client: CollabClient, rng: random.Random, n: int) -> None:
    """``n`` random inserts and deletes, yielding to the loop now and then."""
    for i in range(n):
        length = len(client)
        if length and rng.random() < 0.3:
            pos = rng.randrange(length)
            client.delete(pos, min(length - pos, rng.randint(1, 3)))
        else:
            client.insert(rng.randint(0, length), rng.choice(WORDS))
        if i % 4 == 0:
            await asyncio.sleep(rng.random() * 0.004)


async def head_of(server: Server, doc: str) -> "tuple[int, str]":
    """The document's head and text as a fresh joiner sees them."""
    async with CollabClient(server.ws, doc) as probe:
        return probe.head, probe.text()


def test_two_python_clients_converge_and_see_each_others_presence(server: Server) -> None:
    async def main() -> None:
        doc = "py/two clients"
        a = CollabClient(server.ws, doc, presence={"name": "a"})
        b = CollabClient(server.ws, doc, presence={"name": "b"})
        mirror: List[str] = [""]

        def follow(ev: ChangeEvent) -> None:
            t = mirror[0]
            mirror[0] = t[: ev.index] + ev.text + t[ev.index + ev.length :]

        b.on("change", follow)
        statuses: List[str] = []
        a.on("status", lambda ev: statuses.append(ev.status))
        async with a, b:
            await asyncio.gather(
                random_edits(a, random.Random(1), 300), random_edits(b, random.Random(2), 300)
            )
            await asyncio.gather(a.wait_saved(30), b.wait_saved(30))
            head, text = await head_of(server, doc)
            await asyncio.gather(a.wait_for_head(head, 30), b.wait_for_head(head, 30))
            assert a.text() == b.text() == text
            assert text, "the clients inserted more than they deleted"
            # B's change events, applied in order, rebuild its text (local and remote alike).
            assert mirror[0] == b.text()
            # Each sees the other's presence, never its own.
            await asyncio.wait_for(
                _until(lambda: b.replica in a.peers and a.replica in b.peers), 10
            )
            assert a.peers[b.replica].state == {"name": "b"}
            assert b.peers[a.replica].state == {"name": "a"}
            a.doc.check()
            b.doc.check()
        assert "saved" in statuses and statuses[-1] == "closed"

    run(main())


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_offline_edits_survive_a_server_crash_and_apply_once(
    server_factory: Callable[..., Server],
) -> None:
    async def main() -> None:
        server = server_factory()
        doc = "py/restart"
        a = CollabClient(server.ws, doc, backoff_min=0.05, backoff_max=0.3)
        b = CollabClient(server.ws, doc, backoff_min=0.05, backoff_max=0.3)
        async with a, b:
            a.insert(0, "hello")
            await a.wait_saved(10)
            epoch, replica_a = a.epoch, a.replica
            server.kill()  # SIGKILL: a crash
            await asyncio.wait_for(_until(lambda: a.status == "offline"), 10)
            # Offline: edits stay pending, the local text shows them at once.
            a.insert(5, " world")
            a.flush()  # two messages, one of them an insert and one a delete
            a.delete(0, 1)
            a.flush()
            b.insert(0, "[b]")
            assert a.text() == "ello world" and a.pending > 0
            server.restart_same_port()
            await asyncio.wait_for(_until(lambda: a.joined and b.joined), 30)
            await asyncio.gather(a.wait_saved(30), b.wait_saved(30))
            assert (a.epoch, a.replica) == (epoch, replica_a), "same history, same replica"
            head, text = await head_of(server, doc)
            await asyncio.gather(a.wait_for_head(head, 10), b.wait_for_head(head, 10))
            assert a.text() == b.text() == text
            assert text.count("world") == 1 and text.count("[b]") == 1 and "h" not in text
            # 1 message before the crash, then a's and b's offline messages, each exactly once.
            assert head == 1 + 2 + 1, head

            # A message the server applied but whose echo the client never saw (lost with the
            # connection) is resent with its client_seq and answered with `ack`: nothing changes.
            echoed = a._acked[-1]
            a._acked.pop()
            a._unacked.append(echoed)
            acks: List[str] = []
            a.on("status", lambda ev: acks.append(ev.status))
            a.reconnect_now()
            await asyncio.wait_for(_until(lambda: a.pending == 0 and a.joined), 10)
            head2, text2 = await head_of(server, doc)
            assert (head2, text2) == (head, text), "a resend takes no server_seq"

    run(main())


def test_lost_history_resends_own_edits_with_their_ids(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """The rule of docs/protocol.md "Lost history", on a server that restarts without its data."""

    async def main() -> None:
        server = server_factory()
        doc = "py/lost history"
        a = CollabClient(server.ws, doc, backoff_min=0.05, backoff_max=0.3)
        b = CollabClient(server.ws, doc, backoff_min=0.05, backoff_max=0.3)
        async with a, b:
            a.insert(0, "alpha ")
            await a.wait_saved(10)
            await b.wait_for_head(1, 10)
            b.insert(len(b), "beta")  # after a's last character
            b.insert(0, "0")  # needs nothing of a's
            await b.wait_saved(10)
            await a.wait_for_head(b.since or 0, 10)
            a.delete(0, 1)  # a deletes b's "0"
            await a.wait_saved(10)
            old_epoch = a.epoch
            assert a.text() == "alpha beta"
            # B stays away until A has rejoined, so the order of the resends is known.
            url_b = b.url
            b.url = "ws://127.0.0.1:9/ws/closed"
            server.kill()
            # The same address, an empty data dir: a new epoch, head 0.
            server.data_dir = tmp_path / "empty"
            server.data_dir.mkdir()
            server.restart_same_port()
            await asyncio.wait_for(_until(lambda: a.joined and a.epoch != old_epoch), 30)
            await a.wait_saved(30)
            # The server has A's own edits: "alpha " with its ids. A's delete of B's "0" is
            # dropped (its target is not in the new history), and a never re-creates B's text.
            assert a.text() == "alpha "
            b.url = url_b
            b.reconnect_now()
            await b.wait_saved(30)
            head, text = await head_of(server, doc)
            await asyncio.gather(a.wait_for_head(head, 10), b.wait_for_head(head, 10))
            # B's "beta" went after A's original ids, which the server has again.
            assert a.text() == b.text() == text == "0alpha beta"
            assert head == 2, "one message from each client"
            a.doc.check()
            b.doc.check()

    run(main())


def test_rate_limited_edits_stay_pending_and_apply_once(
    server_factory: Callable[..., Server],
) -> None:
    async def main() -> None:
        server = server_factory(extra_args=["--msgs-per-second-max", "20", "--msgs-burst-max", "3"])
        doc = "py/rate"
        errors: List[str] = []
        async with CollabClient(server.ws, doc, backoff_min=0.1, backoff_max=0.5) as a:
            a.on("error", lambda ev: errors.append(ev.code))
            for i in range(12):
                a.insert(len(a), str(i % 10))
                a.flush()  # one message each
            await a.wait_saved(30)
            head, text = await head_of(server, doc)
            assert text == a.text() == "012345678901"
            assert head == 12
        assert "rate_limited" in errors

    run(main())


def test_local_edit_api_refuses_bad_input(server: Server) -> None:
    async def main() -> None:
        from collab_engine_client import NotJoinedError

        c = CollabClient(server.ws, "py/api")
        try:
            c.insert(0, "x")
        except NotJoinedError:
            pass
        else:
            raise AssertionError("an edit before joining must fail")
        events: List[object] = []
        c.on("presence", lambda ev: events.append(ev))
        async with c:
            for bad in [(-1, 0, "x"), (1, 0, "x"), (0, 1, "")]:
                try:
                    c.replace(*bad)
                except IndexError:
                    pass
                else:
                    raise AssertionError(f"replace{bad} must fail")
            c.insert(0, "ok")
            await c.wait_saved(10)
            assert c.text() == "ok" and c.status == "saved"
        assert any(isinstance(e, PresenceEvent) and e.reset for e in events)
        _ = StatusEvent

    run(main())


def test_a_refused_edit_is_dropped_and_the_replica_resynchronised(
    server_factory: Callable[..., Server],
) -> None:
    async def main() -> None:
        server = server_factory(extra_args=["--doc-chars-max", "10"])
        doc = "py/refused"
        errors: List[str] = []
        resets: List[ChangeEvent] = []
        async with CollabClient(server.ws, doc) as a:
            a.on("error", lambda ev: errors.append(ev.code))
            a.on("change", lambda ev: resets.append(ev) if ev.reset else None)
            a.insert(0, "short")
            a.flush()
            a.insert(5, " and far too long")  # past --doc-chars-max: refused with too_large
            a.flush()
            a.insert(0, ">")  # after the refused one: resent once the replica reloaded
            await asyncio.wait_for(_until(lambda: "too_large" in errors), 10)
            await a.wait_saved(10)
            head, text = await head_of(server, doc)
            await a.wait_for_head(head, 10)
            assert text == a.text() == ">short", text
            assert resets, "the replica was reloaded from a snapshot"
            a.doc.check()

    run(main())


def test_token_provider_is_called_for_every_connection(server: Server) -> None:
    async def main() -> None:
        calls: List[int] = []

        async def provider() -> str:
            calls.append(1)
            return f"token-{len(calls)}"  # ignored by a server without auth

        async with CollabClient(server.ws, "py/token", token=provider) as a:
            assert (a.role, a.user, a.exp) == ("write", None, None)
            a.insert(0, "x")
            await a.wait_saved(10)
            a.reconnect_now()
            await asyncio.wait_for(_until(lambda: len(calls) == 2 and a.joined), 10)
            a.insert(1, "y")
            await a.wait_saved(10)
            assert a.text() == "xy"

    run(main())


def test_random_reconnects_apply_every_edit_exactly_once(server: Server) -> None:
    """Three clients type unique characters while connections drop at random moments (echoes
    in flight lost, messages resent): each character ends up in the document exactly once."""

    async def main() -> None:
        doc = "py/chaos"
        rng = random.Random(99)
        clients = [
            CollabClient(server.ws, doc, backoff_min=0.01, backoff_max=0.05) for _ in range(3)
        ]
        joins: List[int] = []
        for c in clients:
            c.on("status", lambda ev: joins.append(1) if ev.status == "connecting" else None)
            await c.start()
        await asyncio.gather(*(c.wait_joined(10) for c in clients))
        typed: List[str] = []
        for i in range(600):
            k = rng.randrange(3)
            c = clients[k]
            ch = chr(0xE000 + k * 1000 + i)  # private use: unique per edit
            c.insert(rng.randint(0, len(c)), ch)
            typed.append(ch)
            if rng.random() < 0.3:
                c.flush()
            if rng.random() < 0.03:
                clients[rng.randrange(3)].reconnect_now()
            if i % 5 == 0:
                await asyncio.sleep(rng.random() * 0.005)
        await asyncio.gather(*(c.wait_saved(30) for c in clients))
        head, text = await head_of(server, doc)
        await asyncio.gather(*(c.wait_for_head(head, 30) for c in clients))
        assert sorted(text) == sorted(typed), "every edit once, none lost"
        assert len(joins) > 3 + 5, f"connections dropped: {len(joins) - 3}"
        for c in clients:
            assert c.text() == text
            c.doc.check()
        for c in clients:
            await c.close()

    run(main())


def test_no_server_fails_the_join_and_stops_the_client(tmp_path: Path) -> None:
    async def main() -> None:
        import socket

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = CollabClient(f"ws://127.0.0.1:{port}", "py/nothing", open_timeout=0.5)
        errors: List[str] = []
        client.on("error", lambda ev: errors.append(ev.code))
        try:
            async with client:
                raise AssertionError("joined a server that does not exist")
        except asyncio.TimeoutError:
            pass
        assert client.status == "closed" and "connect" in errors

    run(main())


def test_a_failing_token_provider_is_retried(server: Server) -> None:
    async def main() -> None:
        calls: List[int] = []

        def provider() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise RuntimeError("identity service down")
            return "token"

        errors: List[str] = []
        client = CollabClient(server.ws, "py/token-retry", token=provider, backoff_min=0.01)
        client.on("error", lambda ev: errors.append(ev.code))
        async with client:
            assert client.joined and len(calls) == 3
        assert errors.count("auth") == 2

    run(main())


def test_a_large_paste_and_a_late_joiner_of_a_big_document(server: Server) -> None:
    async def main() -> None:
        doc = "py/big"
        async with CollabClient(server.ws, doc) as a:
            big = "".join(chr(0x61 + i % 26) for i in range(300_000)) + "😀"
            a.insert(0, big)  # split into chained inserts, batched into messages under 48 KiB
            await a.wait_saved(60)
            assert a.head == 0 and a.since is not None and a.since > 5, a.since
            # B joins (a snapshot of about 300 KiB) while A keeps typing.
            b = CollabClient(server.ws, doc)
            await b.start()
            for i in range(50):
                a.insert(i * 7, "<>")
                if i % 10 == 0:
                    await asyncio.sleep(0.001)
            await b.wait_joined(30)
            await a.wait_saved(30)
            await b.wait_for_head(a.since or 0, 30)
            assert b.text() == a.text()
            assert len(b) == 300_001 + 100
            b.doc.check()
            await b.close()

    run(main())
