//! Ids and the value types of the contract: `OpId` (ordered by lamport, then replica), `Op`, `Run`.
//! This module holds plain data only; it never touches the document structure.

/// Largest id component allowed by the wire contract (2^53 - 1).
pub const MAX_ID_COMPONENT: u64 = (1 << 53) - 1;

/// Item id; `Ord` is lexicographic `(lamport, replica)`, the order of the RGA skip rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId {
    /// Lamport timestamp: greater than the lamport of the item this one was inserted after.
    pub lamport: u64,
    /// The editing replica that created the item.
    pub replica: u64,
}

impl OpId {
    /// Builds an id from its two components.
    pub const fn new(lamport: u64, replica: u64) -> OpId {
        OpId { lamport, replica }
    }
}

/// One op of the contract (CRDT-side type, no serde; the protocol layer converts at the edge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Chars of `text` get ids `id`, `id+1` (lamport + 1, same replica), ...; the first goes after
    /// `after` (`None` = the document start), each following one after the previous.
    Insert {
        /// Id of the first char.
        id: OpId,
        /// The item the first char goes after; `None` is the document start.
        after: Option<OpId>,
        /// Non-empty text, counted in Unicode scalar values.
        text: String,
    },
    /// Deletes the items `id .. id+len-1` (same replica, consecutive lamports).
    Delete {
        /// Id of the first deleted item.
        id: OpId,
        /// Number of items, at least 1.
        len: u64,
    },
}

/// A snapshot run, in document order (contract: `{"id":[L,R],"text":"abc"}` or `{"id":[L,R],"deleted":n}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Id of the first item; the others follow with consecutive lamports.
    pub id: OpId,
    /// Visible text or a count of tombstones.
    pub content: RunContent,
}

/// What a snapshot run holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunContent {
    /// Visible characters, non-empty.
    Text(String),
    /// This many tombstones, at least 1.
    Deleted(u64),
}

/// What `apply_remote` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// At least one op inserted new items or deleted a visible item.
    Changed,
    /// Every op was already integrated (a resend) or deleted only tombstones.
    Unchanged,
}
