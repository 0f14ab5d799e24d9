//! The deterministic simulator of whole shards (docs/simulation.md).
//!
//! - [`rng`]: the seeded generator every random choice comes from.
//! - [`socket`]: simulated sockets and a simulated shard's readiness queue.
pub mod disk;
pub mod rng;
pub mod socket;
