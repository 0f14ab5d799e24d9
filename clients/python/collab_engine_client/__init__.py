"""Python asyncio client for collab-engine, a real-time collaboration server.

:class:`CollabClient` keeps a live replica of one document (an RGA sequence CRDT,
:class:`RgaDoc`) in sync with the server over its WebSocket protocol (``docs/protocol.md``):
local edits by code point position, remote integration, reconnect with resend, presence, tokens.
"""

from .client import (
    ChangeEvent,
    CollabClient,
    ErrorEvent,
    NotJoinedError,
    Peer,
    PresenceEvent,
    ReadOnlyError,
    StatusEvent,
    TokenProvider,
    doc_url,
)
from .rga import MAX_ID_COMPONENT, Change, Id, Op, OpError, RgaDoc

__all__ = [
    "MAX_ID_COMPONENT",
    "Change",
    "ChangeEvent",
    "CollabClient",
    "ErrorEvent",
    "Id",
    "NotJoinedError",
    "Op",
    "OpError",
    "Peer",
    "PresenceEvent",
    "ReadOnlyError",
    "RgaDoc",
    "StatusEvent",
    "TokenProvider",
    "doc_url",
]

__version__ = "0.1.0"
