//! `CrdtError`: why an op message was refused; nothing of it was applied.

use super::id::OpId;

/// Why an op is `invalid_op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidOpReason {
    /// An insert's lamport is not above the lamport of the item it goes after.
    LamportNotAboveParent,
    /// An insert id names another replica than the sender's.
    ForeignReplica,
    /// An insert with empty text.
    EmptyText,
    /// A delete of zero items.
    ZeroLength,
    /// An id component, or the last id of an insert or delete, is past 2^53 - 1.
    IdOverflow,
}

/// Why an op message was refused; the document is exactly as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// An `after` or delete target is not known (code `unknown_id`).
    #[error("op {op_index}: unknown id {id:?}")]
    UnknownId {
        /// Index of the refused op within its message.
        op_index: usize,
        /// The first id that is not known.
        id: OpId,
    },
    /// Insert ids already used with other text or another `after`, or only partly used (code `id_conflict`).
    #[error("op {op_index}: ids already used with other content")]
    IdConflict {
        /// Index of the refused op within its message.
        op_index: usize,
    },
    /// An op that breaks a static rule of the contract (code `invalid_op`).
    #[error("op {op_index}: invalid op: {reason:?}")]
    InvalidOp {
        /// Index of the refused op within its message.
        op_index: usize,
        /// Which rule it breaks.
        reason: InvalidOpReason,
    },
}

impl CrdtError {
    /// The wire error code: `"unknown_id"`, `"id_conflict"` or `"invalid_op"`.
    pub fn code(&self) -> &'static str {
        match self {
            CrdtError::UnknownId { .. } => "unknown_id",
            CrdtError::IdConflict { .. } => "id_conflict",
            CrdtError::InvalidOp { .. } => "invalid_op",
        }
    }

    /// Index of the refused op within its message (for snapshots: of the refused run).
    pub fn op_index(&self) -> usize {
        match *self {
            CrdtError::UnknownId { op_index, .. }
            | CrdtError::IdConflict { op_index }
            | CrdtError::InvalidOp { op_index, .. } => op_index,
        }
    }
}
