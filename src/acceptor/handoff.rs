//! What the acceptor gives a shard: an upgraded WebSocket and what is already known about it.
//!
//! The only cross-thread traffic of the server: a crossbeam channel per shard plus that
//! shard's `mio::Waker`. Owns no socket I/O itself.

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpStream;
use tungstenite::WebSocket;

use crate::protocol::Hello;

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
}

/// A message to a shard thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// A new connection to serve.
    Conn(Box<Handoff>),
    /// Stop: close every client with 1001, finish pending writes, return.
    Shutdown,
}

/// The sending half the acceptor and the server keep for one shard.
#[derive(Clone, Debug)]
pub struct ShardInbox {
    sender: Sender<ShardMsg>,
    waker: Arc<mio::Waker>,
}

impl ShardInbox {
    /// An inbox that delivers to `sender` and wakes the shard's `Poll` through `waker`.
    pub fn new(sender: Sender<ShardMsg>, waker: Arc<mio::Waker>) -> ShardInbox {
        ShardInbox { sender, waker }
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
    (ShardInbox::new(sender, waker), receiver)
}
