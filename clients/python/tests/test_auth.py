"""The Python client against a server with access control (`--auth-key-file`).

These tests need the server side of the access-control wire extension (the `auth` branch): they
FAIL, not skip, on a binary whose `--help` has no `--auth-key-file`.

Assumed key and token format (the agreed extension names the transport, not the signature):
the key file holds an HMAC secret, tokens are HS256 JWTs with the claims `sub` (the user),
`name`, `role` (`read`, `write` or `admin`) and `exp` (unix seconds).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from collab_engine_client import CollabClient, ReadOnlyError

from conftest import Server, run, server_bin


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: bytes, **claims: Any) -> str:
    """An HS256 JWT with ``claims``."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


@pytest.fixture
def auth_server(server_factory: Callable[..., Server], tmp_path: Path) -> "tuple[Server, bytes]":
    help_text = subprocess.run(
        [str(server_bin()), "--help"], capture_output=True, text=True, check=True
    ).stdout
    if "--auth-key-file" not in help_text:
        pytest.fail(
            "this server binary has no --auth-key-file: the access-control server side "
            "(branch `auth`) is not merged yet, so the token tests cannot run"
        )
    secret = secrets.token_hex(32).encode()
    key_file = tmp_path / "auth.key"
    key_file.write_bytes(secret)
    return server_factory(extra_args=["--auth-key-file", str(key_file)]), secret


def claims(user: str, role: str, ttl: float) -> Dict[str, Any]:
    return {
        "sub": user,
        "name": user.title(),
        "doc": "py/auth/*",
        "role": role,
        "exp": int(time.time() + ttl),
    }


def test_write_token_joins_edits_and_names_the_user(auth_server: "tuple[Server, bytes]") -> None:
    server, secret = auth_server

    async def main() -> None:
        doc = "py/auth/write"
        ada = CollabClient(server.ws, doc, token=mint(secret, **claims("ada", "write", 600)))
        bob = CollabClient(
            server.ws,
            doc,
            token=mint(secret, **claims("bob", "write", 600)),
            presence={"cursor": 0},
        )
        async with ada, bob:
            assert (ada.role, ada.user) == ("write", "ada")
            assert ada.exp is not None and ada.exp > time.time()
            ada.insert(0, "hi")
            await ada.wait_saved(10)
            await bob.wait_for_head(1, 10)
            assert bob.text() == "hi"
            while bob.replica not in ada.peers:
                await asyncio.sleep(0.01)
            peer = ada.peers[bob.replica]
            assert (peer.user, peer.name, peer.state) == ("bob", "Bob", {"cursor": 0})

    run(main(), timeout=60)


def test_read_token_cannot_edit(auth_server: "tuple[Server, bytes]") -> None:
    server, secret = auth_server

    async def main() -> None:
        async with CollabClient(
            server.ws, "py/auth/read", token=mint(secret, **claims("eve", "read", 600))
        ) as reader:
            assert reader.role == "read"
            with pytest.raises(ReadOnlyError):
                reader.insert(0, "x")
            assert reader.text() == "" and reader.pending == 0

    run(main(), timeout=60)


def test_refused_token_is_terminal(auth_server: "tuple[Server, bytes]") -> None:
    server, _ = auth_server

    async def main() -> None:
        forged = mint(b"not the key", **claims("mallory", "admin", 600))
        client = CollabClient(server.ws, "py/auth/denied", token=forged, backoff_min=0.01)
        statuses: List[str] = []
        client.on("status", lambda ev: statuses.append(ev.status))
        await client.start()
        with pytest.raises(ConnectionError):
            await client.wait_joined(10)
        assert client.status == "denied" and client.denied_reason
        await asyncio.sleep(0.5)  # a reconnect loop would show more `connecting` states
        assert statuses.count("connecting") == 1, statuses
        await client.close()

    run(main(), timeout=60)


def test_token_is_refreshed_in_place_before_it_expires(auth_server: "tuple[Server, bytes]") -> None:
    server, secret = auth_server

    async def main() -> None:
        calls: List[int] = []

        async def provider() -> str:
            calls.append(1)
            return mint(secret, **claims("ada", "write", 4))

        statuses: List[str] = []
        client = CollabClient(server.ws, "py/auth/refresh", token=provider, refresh_margin=2)
        client.on("status", lambda ev: statuses.append(ev.status))
        async with client:
            first_exp = client.exp
            assert first_exp is not None
            # Past the first token's expiry: refreshed with `auth`, never closed and rejoined.
            while time.time() < first_exp + 1:
                await asyncio.sleep(0.1)
            assert len(calls) >= 2
            assert client.exp is not None and client.exp > first_exp
            client.insert(0, "still here")
            await client.wait_saved(10)
        assert statuses.count("connecting") == 1, statuses

    run(main(), timeout=60)
