"""Shared test helpers: the real server binary on 127.0.0.1 with a temporary data dir.

The binary is ``$COLLAB_SERVER_BIN``, else ``target/release/collab-engine`` of this repository
(``cargo build --release``). A server that cannot start fails the test; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, Optional

import pytest

#: The repository root.
REPO = Path(__file__).resolve().parents[3]
#: Where cargo puts build output.
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """The tests run against the installed package (``pip install ./clients/python``); refuse
    to test a stale copy of it."""
    import collab_engine_client

    installed = Path(collab_engine_client.__file__).resolve().parent
    source = REPO / "clients/python/collab_engine_client"
    if installed == source.resolve():
        return
    stale = [
        f.name
        for f in sorted(source.glob("*.py"))
        if not (installed / f.name).is_file() or (installed / f.name).read_bytes() != f.read_bytes()
    ]
    if stale:
        pytest.exit(
            f"the installed collab_engine_client ({installed}) differs from clients/python "
            f"({', '.join(stale)}): run scripts/python-venv.sh",
            returncode=3,
        )


def server_bin() -> Path:
    """Path of the release server binary; fails the test when it is missing."""
    path = Path(os.environ.get("COLLAB_SERVER_BIN", TARGET / "release" / "collab-engine"))
    if not path.is_file():
        pytest.fail(f"no server binary at {path}: run `cargo build --release` first")
    return path


class Server:
    """One server process; ``addr`` is ``HOST:PORT`` once :meth:`start` returned."""

    def __init__(self, data_dir: Path, extra_args: Optional[List[str]] = None) -> None:
        self.data_dir = data_dir
        self.extra_args = list(extra_args or [])
        self.proc: Optional[subprocess.Popen[str]] = None
        self.addr = ""
        self.stderr_tail: List[str] = []

    @property
    def ws(self) -> str:
        """Base WebSocket URL, ``ws://HOST:PORT``."""
        return f"ws://{self.addr}"

    def start(self, listen: str = "127.0.0.1:0", timeout: float = 20.0) -> "Server":
        """Spawns the binary and waits for ``listening on http://ADDR`` on its stdout."""
        args = [
            str(server_bin()),
            "--listen",
            listen,
            "--data-dir",
            str(self.data_dir),
            "--shards",
            "2",
            *self.extra_args,
        ]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.proc = proc
        assert proc.stderr is not None and proc.stdout is not None
        stderr = proc.stderr
        tail = self.stderr_tail = []

        def drain() -> None:
            for line in stderr:
                tail.append(line)
                del tail[:-50]

        threading.Thread(target=drain, daemon=True).start()
        found: List[str] = []
        listening = threading.Event()
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                if line.startswith("listening on http://"):
                    found.append(line.strip()[len("listening on http://") :])
                    break
            listening.set()  # found, or the process closed its stdout
            for _ in stdout:  # keep the pipe drained
                pass

        threading.Thread(target=read, daemon=True).start()
        listening.wait(timeout)
        if not found:
            self.kill()
            raise RuntimeError(
                f"server did not print its address within {timeout}s "
                f"(exit {proc.poll()}): {''.join(tail)}"
            )
        self.addr = found[0]
        return self

    def restart_same_port(self, attempts: int = 50) -> "Server":
        """Starts again on the same address (after :meth:`kill`); retries while the port is
        still in use."""
        addr = self.addr
        last: Optional[Exception] = None
        for _ in range(attempts):
            try:
                return self.start(listen=addr)
            except RuntimeError as err:
                last = err
                time.sleep(0.1)
        raise RuntimeError(f"could not restart on {addr}: {last}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stops the process (SIGKILL: a crash) and waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Makes started servers (``factory(data_dir=None, extra_args=None)``), all killed at the
    end of the test."""
    servers: List[Server] = []

    def make(data_dir: Optional[Path] = None, extra_args: Optional[List[str]] = None) -> Server:
        d = data_dir or tmp_path / f"data{len(servers)}"
        d.mkdir(parents=True, exist_ok=True)
        s = Server(d, extra_args).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.kill()


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    """One started server with its own temporary data dir."""
    return server_factory()


def run(coro: Awaitable[Any], timeout: float = 120.0) -> Any:
    """Runs ``coro`` on a fresh event loop with an overall watchdog."""

    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())
