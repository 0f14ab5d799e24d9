//! The acceptor thread: TCP accept, plain HTTP (`/health`, `/metrics`, static pages), the
//! resumable WebSocket handshake, and the handoff of each upgraded socket to its shard.
//!
//! Never blocks on one client (every connection is a resumable state machine with a
//! deadline) and never touches a document.

pub mod admin;
pub mod door;
pub mod handoff;
pub mod http;
pub mod listener;
pub mod routing;
pub mod static_pages;

pub use door::{DoorLimits, DoorRelease};
pub use handoff::{shard_channel, Admitted, Handoff, ShardAlive, ShardInbox, ShardMsg};
pub use listener::{Acceptor, AcceptorOptions, AcceptorStop, PlainWs};
