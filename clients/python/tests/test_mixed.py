"""A Python client beside the JavaScript client (clients/js/collab.js on Node's `ws`) and the
Rust client (examples/mixed_client.rs, collab_engine::client::Client), editing one document at
the same time against the real server: all three converge."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from pathlib import Path
from typing import List

import pytest

from collab_engine_client import CollabClient

from conftest import REPO, TARGET, Server, run

HERE = Path(__file__).resolve().parent


class Peer:
    """A participant process speaking the `joined` / `acked` / `sync HEAD` / `text` lines."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @classmethod
    async def spawn(cls, name: str, *argv: str) -> "Peer":
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(REPO),
        )
        return cls(name, proc)

    async def line(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = b""
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            await self.proc.wait()
            raise AssertionError(
                f"{self.name} exited ({self.proc.returncode}): {err.decode(errors='replace')}"
            )
        return raw.decode().rstrip("\n")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def tools() -> "tuple[str, Path]":
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH (the JavaScript participant needs it)")
    if not (REPO / "tests/interop/node_modules/ws").is_dir():
        pytest.fail("the `ws` package is missing: run tests/interop/setup.sh")
    rust = Path(os.environ.get("MIXED_CLIENT_BIN", TARGET / "release/examples/mixed_client"))
    if not rust.is_file():
        pytest.fail(f"no {rust}: run cargo build --release --example mixed_client")
    return node, rust


def test_python_js_and_rust_clients_edit_one_document_and_converge(server: Server) -> None:
    node, rust_bin = tools()

    async def main() -> None:
        doc = "mixed py+js+rust/ü"
        peers: List[Peer] = []
        async with CollabClient(server.ws, doc) as py:
            py.insert(0, "start: ")
            await py.wait_saved(10)
            try:
                peers.append(
                    await Peer.spawn("rust", str(rust_bin), f"{server.ws}/ws", doc, "200", "7")
                )
                peers.append(
                    await Peer.spawn(
                        "js", node, str(HERE / "js_peer.mjs"), server.ws, doc, "200", "5"
                    )
                )
                for p in peers:
                    assert (await p.line()).startswith("joined "), p.name
                rng = random.Random(3)
                words = ["py ", "ü", "😀", "\n", "xy"]
                for i in range(200):
                    n = len(py)
                    if n and rng.random() < 0.25:
                        pos = rng.randrange(n)
                        py.delete(pos, min(n - pos, rng.randint(1, 3)))
                    else:
                        py.insert(rng.randint(0, n), rng.choice(words))
                    if i % 3 == 0:
                        await asyncio.sleep(0.002)
                await py.wait_saved(30)
                for p in peers:
                    assert (await p.line()).startswith("acked "), p.name
                # Everyone's edits are acknowledged: a fresh joiner's head covers them all.
                async with CollabClient(server.ws, doc) as probe:
                    head, text = probe.head, probe.text()
                await py.wait_for_head(head, 20)
                assert py.text() == text
                for p in peers:
                    p.send(f"sync {head}")
                    line = await p.line()
                    assert line.startswith("text "), (p.name, line)
                    assert json.loads(line[5:]) == text, p.name
                assert any(w in text for w in ("🦀", "ferris", "rust")), "rust edits present"
                assert any(w in text for w in ("✓", "js ")), "js edits present"
                assert any(w in text for w in ("ü", "py ", "xy")), "python edits present"
                py.doc.check()
            finally:
                for p in peers:
                    await p.stop()

    run(main(), timeout=180)
