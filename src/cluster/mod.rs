//! The cluster: several nodes over one PostgreSQL, one owner per document.
//!
//! - [`route`]: the one question the acceptor asks (`Router`, `Route`).
//! - [`relay`]: the data plane of any-node entry, a byte relay to the owner on its own thread.
//! - [`forwarded`]: the client's real address passed to the owner, authenticated between peers.

pub mod forwarded;
pub mod relay;
pub mod route;

pub use route::{Route, Router};
