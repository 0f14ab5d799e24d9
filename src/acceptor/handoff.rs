//! What the acceptor gives a shard: an upgraded WebSocket and what is already known about it.
//!
//! The only cross-thread traffic of the server: a crossbeam channel per shard plus that
//! shard's `mio::Waker`, and back the door's channel of ended connections
//! (`door::DoorRelease`). Owns no socket I/O itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpStream;
use tungstenite::WebSocket;

use crate::auth::{Grant, Rule};
use crate::protocol::Hello;
use crate::storage::worker::StorageAvailable;

use super::door::DoorRelease;

/// An upgraded connection on its way to the shard that owns its document.
///
/// The WebSocket carries every byte the acceptor already read from the socket in its
/// own buffer, so nothing the client sent is lost in the move.
#[derive(Debug)]
pub struct Handoff {
    /// The upgraded connection, deregistered from the acceptor's `Poll`.
    pub ws: WebSocket<TcpStream>,
    /// The document: from the `/ws/<doc>` path or the first `hello`. `None` only for servers
    /// that route plain `/ws` without a hello (the echo example).
    pub doc: Option<String>,
    /// The first message when it was a `hello` read by the acceptor on plain `/ws`
    /// (already validated, `doc` filled in); the shard joins the connection with it.
    pub hello: Option<Hello>,
    /// The client's address, for logs.
    pub peer: SocketAddr,
    /// With access control on: the token the acceptor verified (from the query, the
    /// `Authorization` header or the first `hello`) and what it grants. `None` when access
    /// control is off, or when the upgrade carried no token (the shard then checks
    /// `hello.token`).
    pub admitted: Option<Box<Admitted>>,
}

/// A token the acceptor verified for the connection's document.
#[derive(Debug)]
pub struct Admitted {
    /// The token, which a later `hello.token` must equal.
    pub token: String,
    /// What it grants.
    pub grant: Grant,
}

/// A message to a shard thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// A new connection to serve.
    Conn(Box<Handoff>),
    /// Sent once, before any connection, when the door counts connections per address: the
    /// shard reports through it every connection it was handed once that connection ends.
    Door(DoorRelease),
    /// Stop: close every client with 1001, finish pending writes, return.
    Shutdown,
    /// Cluster mode: this node no longer holds these documents' leases (`None`: any, because
    /// renewal failed for too long): drop them from memory without acknowledging anything
    /// still held, and close their clients with 1013 so they come back through the owner.
    LeasesLost {
        /// The documents, or `None` for every document of the shard.
        docs: Option<Vec<String>>,
    },
    /// A document API request (`crate::api`), answered through its `reply`.
    Api(Box<crate::api::ApiRequest>),
    /// A revocation is in force: close every live connection it matches with 1008 `revoked`,
    /// then send the number closed on `reply`.
    Revoke {
        /// The rule.
        rule: Arc<Rule>,
        /// Where the count goes (the admin worker waits for every shard, with a deadline).
        reply: Sender<usize>,
    },
}

/// The sending half the acceptor and the server keep for one shard.
#[derive(Clone, Debug)]
pub struct ShardInbox {
    sender: Sender<ShardMsg>,
    waker: Arc<mio::Waker>,
    alive: ShardAlive,
    /// Whether the shard's storage answered its last attempt (set by its storage worker).
    storage_available: StorageAvailable,
}

/// Whether a shard still serves connections: cleared, once and for good, by a shard whose
/// handler panicked, so that the acceptor stops routing new connections into it.
#[derive(Clone, Debug)]
pub struct ShardAlive(Arc<AtomicBool>);

impl ShardAlive {
    /// A shard that is alive.
    pub fn new() -> ShardAlive {
        ShardAlive(Arc::new(AtomicBool::new(true)))
    }

    /// Whether the shard still serves connections.
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// The shard stops serving: the acceptor refuses its documents from now on.
    pub fn mark_dead(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Default for ShardAlive {
    fn default() -> ShardAlive {
        ShardAlive::new()
    }
}

impl ShardInbox {
    /// An inbox that delivers to `sender` and wakes the shard's `Poll` through `waker`.
    pub fn new(sender: Sender<ShardMsg>, waker: Arc<mio::Waker>, alive: ShardAlive) -> ShardInbox {
        ShardInbox {
            sender,
            waker,
            alive,
            storage_available: StorageAvailable::new(),
        }
    }

    /// Whether the shard's storage answered its last attempt (`/health` reads it).
    pub fn storage_available(&self) -> StorageAvailable {
        self.storage_available.clone()
    }

    /// The shard's waker, for its storage worker.
    pub fn waker(&self) -> Arc<mio::Waker> {
        self.waker.clone()
    }

    /// Whether the shard still serves connections (see [`ShardAlive`]).
    pub fn is_alive(&self) -> bool {
        self.alive.is_alive()
    }

    /// The shard's liveness flag, for the shard itself.
    pub fn alive(&self) -> ShardAlive {
        self.alive.clone()
    }

    /// Delivers `msg` and wakes the shard; gives it back when the shard is gone.
    ///
    /// # Errors
    /// The message, when the shard thread has exited.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.sender.try_send(msg) {
            Ok(()) => {
                // A failed wake means the shard's Poll is gone too; the message then waits
                // in a channel nobody reads, which is harmless at shutdown.
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => Err(msg),
        }
    }
}

/// A channel for one shard: the inbox to hand out and the receiver the shard drains.
pub fn shard_channel(waker: Arc<mio::Waker>) -> (ShardInbox, Receiver<ShardMsg>) {
    let (sender, receiver) = crossbeam_channel::unbounded();
    (ShardInbox::new(sender, waker, ShardAlive::new()), receiver)
}
