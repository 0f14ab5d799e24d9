//! The `collab-engine` binary.
fn main() {}
