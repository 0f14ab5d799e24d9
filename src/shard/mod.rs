//! Worker shards: each one a thread with its own mio `Poll`, its connections in a slab and its
//! documents ([`crate::room::Room`]) owned outright.
//!
//! - [`conn`]: the connection layer ([`Net`]): sockets, outbound queues, readiness, closes;
//!   its sockets are TCP or simulated ([`crate::sim`]) behind the private `transport` module.
//! - [`event_loop`]: the turn, split into named phases ([`Shard`]), the [`Clock`] it reads once
//!   per turn, and the [`Handler`] trait it drives.
//! - [`host`]: the real handler ([`RoomHost`]): hello routing, rooms, group commit.
//! - [`log_limit`]: one warning line a second for events a client can repeat at will.
//! - [`rate_limit`]: the per-connection token bucket on `op` and `presence` messages.
//!
//! A shard takes no lock on its hot path; the only cross-thread traffic is its handoff inbox
//! plus its `mio::Waker`, and a metrics publish every 250 ms.

pub mod conn;
pub mod event_loop;
pub mod host;
pub mod log_limit;
pub mod rate_limit;
mod transport;

pub use conn::{Net, NetLimits};
pub use event_loop::{run, Clock, Handler, OpenInfo, Shard, SystemClock, WAKER_TOKEN};
pub use host::RoomHost;
