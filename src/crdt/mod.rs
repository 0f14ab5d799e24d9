//! The sequence CRDT of the contract (RGA): ids, ops, snapshots, and `Doc`, which integrates ops and maps positions to ids.
//! It never sees a socket, file or clock: callers pass ops in and get ops, runs and text out.
//! See `docs/crdt.md` for the rules, the glossary and the data structures.
//!
//! - `id.rs`: `OpId` and its order, the op and run value types.
//! - `error.rs`: `CrdtError`, why an op message was refused.
//! - `doc.rs`: `Doc`: validation, integration (the skip rule), local edits, snapshots.
//! - `buf.rs`: `OpBuf`, the caller's buffer that local edits write their ops into.
//! - `tree.rs`: the B-tree of spans counted by visible length, and the id index.
//! - `index.rs`: `IdIndex`, the id index: per replica, sorted chunks of (lamport, leaf) keys.
//! - `text.rs`: the append-only text arena the spans point into.
//! - `check.rs`: `Doc::dbg_check`, the deep invariant walk.

mod buf;
mod check;
mod doc;
mod error;
mod id;
mod index;
mod text;
mod tree;

pub use buf::{OpBuf, OpRef};
pub use doc::{Doc, DocStats};
pub use error::{CrdtError, InvalidOpReason};
pub use id::{Applied, Op, OpId, Run, RunContent, MAX_ID_COMPONENT};
