//! collab-engine: a thread-per-core real-time collaboration server.
#![warn(missing_docs)]
