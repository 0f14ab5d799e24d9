//! Where a document is served: the one question the acceptor asks a cluster.
use std::net::SocketAddr;
/// The answer for one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node serves it (it holds the document's lease).
    Local,
    /// Another node owns it: relay the connection there.
    Relay(SocketAddr),
    /// Not known yet (a lease is being looked up, acquired or waited for): ask again when
    /// woken through the waker given to `Router::set_waker`, or after a short delay.
    Pending,
    /// No node can serve it now (reason for the log and the client's `unavailable` error).
    Unavailable(String),
}
/// Decides routes; never blocks (database work happens on the router's own thread).
pub trait Router: Send + Sync + 'static {
    /// Where `doc` is served now.
    fn route(&self, doc: &str) -> Route;
    /// The acceptor's waker, to be woken whenever a `Pending` answer may have changed.
    fn set_waker(&self, waker: std::sync::Arc<mio::Waker>);
}
