//! A document in memory: its CRDT, its connected clients, its `server_seq`, its replay window.
//!
//! Owns every rule of the contract that concerns one document (joining, takeover, replay or
//! snapshot, ops, presence, replica assignment, snapshot cadence). Takes parsed messages in and
//! hands frames, closes and log records out through [`Effects`]; never sees a socket, a file or
//! a clock, and never counts refused messages (the shard does).

// STYLE.md's layout names the file room.rs; the module is private, so the repeat never shows.
#[allow(clippy::module_inception)]
mod room;

pub use room::{
    EditError, Effects, JoinAuth, Retention, Room, RoomConfig, RoomError,
    EFFECTS_RECYCLE_CAPACITY_MAX,
};
