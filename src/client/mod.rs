//! The Rust client of the contract: [`Replica`], a transport-free state machine, and [`Client`],
//! a blocking WebSocket transport over it for tests and tools.
//!
//! Never used by the server itself; never sends traffic anywhere but the URL it is given.

mod blocking;
mod replica;

pub use blocking::{Client, ClientError, ClientOptions};
pub use replica::{Event, Replica, ReplicaError};
