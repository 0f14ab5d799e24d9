//! The Rust client of the contract: [`Replica`], a transport-free state machine, and a blocking
//! WebSocket `Client` built on it (added next).
//!
//! Never used by the server itself.
