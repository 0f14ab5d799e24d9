//! The wire contract (`docs/protocol.md`): parsing client frames, encoding server frames, and the
//! mirror image for clients.
//!
//! Owns every decision about what a text frame means and which error code a bad one gets.
//! Serde lives here (and in storage) only: CRDT types convert at this edge.
//! Never touches a socket, a file or a clock; never panics on input.

pub mod codec;
pub mod messages;

pub use codec::{
    encode_ack, encode_auth_ack, encode_error, encode_hello, encode_hello_ack, encode_op,
    encode_op_echo, encode_presence, encode_presence_update, encode_snapshot_runs, write_json_str,
    write_op, write_ops, HelloAckBody, OPS_PER_MESSAGE_MAX, PRESENCE_BYTES_MAX,
};
pub use messages::{
    parse_client_message, parse_op_echo, parse_server_message, parse_snapshot_runs, AuthRefresh,
    ClientMessage, Hello, HelloAck, HelloAckStrategy, OpEcho, OpMessage, PresenceEntry,
    PresenceUpdate, ServerMessage,
};

/// The contract's error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed JSON, a non-object, a missing or ill-typed field, an unknown `type` or `kind`,
    /// a binary frame, a lone surrogate in text, an invalid `hello`.
    BadMessage,
    /// `op` or `presence` before `hello`.
    NotJoined,
    /// An `after` or `del` target the document does not know.
    UnknownId,
    /// An `ins` whose ids are already used with other text or another `after`, or only partly used.
    IdConflict,
    /// A lamport not above the parent's, a foreign replica, empty text, `len < 1`, ids past `2^53-1`.
    InvalidOp,
    /// Over a size limit (op count, presence bytes, document size).
    TooLarge,
    /// The connection sends faster than the server allows.
    RateLimited,
    /// The server requires a token and the connection did not present a valid one covering
    /// the document (access control, docs/security.md).
    Unauthorized,
    /// The client may not do this.
    Forbidden,
    /// The server is at capacity; retry later.
    Overloaded,
    /// Storage failed: nothing the request asked for happened; retry after reconnecting.
    Unavailable,
}

impl ErrorCode {
    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadMessage,
        ErrorCode::NotJoined,
        ErrorCode::UnknownId,
        ErrorCode::IdConflict,
        ErrorCode::InvalidOp,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
    ];

    /// The wire spelling, e.g. `"bad_message"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::UnknownId => "unknown_id",
            ErrorCode::IdConflict => "id_conflict",
            ErrorCode::InvalidOp => "invalid_op",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The code with this wire spelling, if it is one of the contract's.
    pub fn from_wire(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == text)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: what to answer. Small and unboxed, so refusing costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    /// The contract code.
    pub code: ErrorCode,
    /// Human-readable detail for the `message` field.
    pub message: &'static str,
    /// The refused `op`'s `client_seq`, when it parsed.
    pub client_seq: Option<u64>,
}

impl ProtocolError {
    /// An error without a `client_seq`.
    pub const fn new(code: ErrorCode, message: &'static str) -> ProtocolError {
        ProtocolError {
            code,
            message,
            client_seq: None,
        }
    }

    /// A `bad_message` error.
    pub const fn bad(message: &'static str) -> ProtocolError {
        ProtocolError::new(ErrorCode::BadMessage, message)
    }

    /// The same error carrying `client_seq`.
    pub const fn with_client_seq(mut self, client_seq: Option<u64>) -> ProtocolError {
        self.client_seq = client_seq;
        self
    }
}

/// Maps a CRDT refusal to its contract code and a fixed message.
pub fn crdt_error(err: &crate::crdt::CrdtError) -> ProtocolError {
    use crate::crdt::{CrdtError, InvalidOpReason};
    match err {
        CrdtError::UnknownId { .. } => {
            ProtocolError::new(ErrorCode::UnknownId, "unknown after or del target")
        }
        CrdtError::IdConflict { .. } => ProtocolError::new(
            ErrorCode::IdConflict,
            "ins ids already used with other text or another after",
        ),
        CrdtError::InvalidOp { reason, .. } => ProtocolError::new(
            ErrorCode::InvalidOp,
            match reason {
                InvalidOpReason::LamportNotAboveParent => "ins lamport not above its parent's",
                InvalidOpReason::ForeignReplica => "ins id of another replica",
                InvalidOpReason::EmptyText => "ins with empty text",
                InvalidOpReason::ZeroLength => "del with len < 1",
                InvalidOpReason::IdOverflow => "ids run past 2^53-1",
            },
        ),
    }
}
