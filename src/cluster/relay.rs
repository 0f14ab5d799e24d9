//! The relay: carries a client's connection to the node that owns its document, byte for
//! byte, in both directions, on a thread of its own (never the acceptor's or a shard's).
//!
//! Rules it keeps:
//! - No parsing of the payload. The only bytes it looks at are the owner's response head (to
//!   know whether the owner upgraded, and on plain `/ws` to drop the owner's `101`, which the
//!   acceptor already sent) and the headers of the owner's WebSocket frames (never their
//!   payload), so that a close frame it injects never lands in the middle of a frame.
//! - Bounded: at most `conns_max` relayed connections, and [`RELAY_BUFFER_BYTES`] per direction
//!   per connection. A full buffer stops reading the side that fills it until the other side
//!   drains it, so a slow reader pushes back on the writer through TCP instead of growing
//!   memory here.
//! - When the owner closes, fails or cannot be reached, the client learns it at once: a
//!   WebSocket close 1013 when the relay is at a frame boundary (or an HTTP 503 / the
//!   handshake plus `unavailable` and 1013 when the owner never answered), else a TCP close.
//!   A half-close or an error on either side ends both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::acceptor::door::DoorRelease;
use crate::acceptor::http::REQUEST_HEAD_BYTES_MAX;
use crate::cluster::{Route, Router};
use crate::metrics::Exposition;

/// Bytes buffered per direction per relayed connection. A full buffer stops reading the side
/// that fills it, so a relayed connection never holds more than twice this (plus a close
/// frame or an error answer of under 1 KiB).
pub const RELAY_BUFFER_BYTES: usize = 16 * 1024;

/// Default of `--relay-conns-max`: connections one node relays at once. At
/// 2 x [`RELAY_BUFFER_BYTES`] each, 8,192 relayed connections hold at most 256 MiB.
pub const RELAY_CONNS_MAX_DEFAULT: usize = 8_192;

/// Time the owner has to accept the relay's TCP connection.
pub const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Time a side that is being closed has to take the last bytes and close its end, after which
/// its socket is dropped.
pub const RELAY_CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The close reason the relay sends with 1013.
pub const RELAY_CLOSE_REASON: &str = "owner unavailable";

/// Largest owner response head the relay reads before it gives up on the owner.
const RESPONSE_HEAD_BYTES_MAX: usize = REQUEST_HEAD_BYTES_MAX;

// An owner's response head must fit in one buffer, since the relay holds it until complete.
const _: () = assert!(RESPONSE_HEAD_BYTES_MAX <= RELAY_BUFFER_BYTES);

const WAKER: Token = Token(0);

mod wire;
pub use wire::{close_frame, server_frame, switching_protocols, unavailable_frames};
use wire::{Buf, FrameTracker};

/// What the client's connection is when the relay takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayKind {
    /// A WebSocket upgrade (`/ws/<doc>`) the client has not been answered yet: the owner does
    /// the handshake and its `101` passes through. `key` is the client's `Sec-WebSocket-Key`,
    /// so that the relay can answer the handshake itself with `unavailable` and 1013 when the
    /// owner cannot be reached before it answered.
    WsUpgrade {
        /// The client's `Sec-WebSocket-Key`.
        key: String,
    },
    /// A WebSocket (plain `/ws`) the acceptor already upgraded: the owner's own `101` (to the
    /// same request) is read and dropped; the client never sees it.
    WsUpgraded,
    /// A plain HTTP request: the owner's answer passes through; a 503 when the owner cannot
    /// be reached before it answered.
    Http,
}

/// One connection to relay.
#[derive(Debug)]
pub struct RelayJob {
    /// The client's socket, deregistered from the acceptor's `Poll`, with nothing of it buffered
    /// elsewhere (whatever the acceptor consumed is in `to_upstream`).
    pub client: TcpStream,
    /// The client's address, for logs and the door.
    pub peer: SocketAddr,
    /// The owner.
    pub upstream: SocketAddr,
    /// What the owner gets first: the request head (rewritten with the forwarded-for header).
    pub to_upstream: Vec<u8>,
    /// On plain `/ws`: the raw frames from the `hello` on that the acceptor consumed, sent once
    /// the owner answered the upgrade. Empty otherwise.
    pub frames: Vec<u8>,
    /// How to read the owner's answer.
    pub kind: RelayKind,
    /// Where the connection is released from the door's per-address count when it ends
    /// (`Some` when the door counted it).
    pub release: Option<DoorRelease>,
    /// The document, to ask the router again when the owner cannot be reached (its lease may
    /// be moving to another node): until the route's wait is over the relay keeps the client
    /// and dials whatever owner the router names next. `None`: no second attempt.
    pub doc: Option<String>,
}

/// The relay's figures, shared by its thread (writer) and `/metrics`, `/cluster` (readers).
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Relayed connections open now (taken by [`RelaySender::submit`], given back when done).
    active: AtomicU64,
    /// Relayed connections started.
    started: AtomicU64,
    /// Connections refused because `conns_max` were relayed already.
    refused_full: AtomicU64,
    /// Connections that waited for a route (`Route::Pending`), counted by the acceptor.
    route_waits: AtomicU64,
    /// Dials of an owner that failed while the relay could still ask the router again.
    owner_retries: AtomicU64,
    /// Relayed connections closed because the router named another owner for their document.
    owner_moves: AtomicU64,
    /// Relayed connections whose owner failed, closed first or could not be reached.
    upstream_failures: AtomicU64,
    /// Bytes written to owners.
    bytes_to_upstream: AtomicU64,
    /// Bytes written to clients.
    bytes_to_client: AtomicU64,
    /// Bytes held in relay buffers now (gauge, refreshed on the relay's tick).
    buffered_bytes: AtomicU64,
    /// The most bytes one relayed connection ever held in its buffers.
    conn_buffered_bytes_peak: AtomicU64,
}

impl RelayCounters {
    /// Relayed connections open now (what `/cluster` reports as `relayed`).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Relayed connections started since the process started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Counts a connection that starts waiting for its route (the acceptor calls it).
    pub fn route_wait_started(&self) {
        self.route_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections that waited for a route so far.
    pub fn route_waits(&self) -> u64 {
        self.route_waits.load(Ordering::Relaxed)
    }

    /// Failed dials of an owner after which the relay asked the router again.
    pub fn owner_retries(&self) -> u64 {
        self.owner_retries.load(Ordering::Relaxed)
    }

    /// Relayed connections closed because their document moved to another owner.
    pub fn owner_moves(&self) -> u64 {
        self.owner_moves.load(Ordering::Relaxed)
    }

    /// Connections refused because the relay was full.
    pub fn refused_full(&self) -> u64 {
        self.refused_full.load(Ordering::Relaxed)
    }

    /// Relayed connections ended by their owner's failure or absence.
    pub fn upstream_failures(&self) -> u64 {
        self.upstream_failures.load(Ordering::Relaxed)
    }

    /// Bytes relayed from clients to owners.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.bytes_to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes relayed (or sent by the relay itself) to clients.
    pub fn bytes_to_client(&self) -> u64 {
        self.bytes_to_client.load(Ordering::Relaxed)
    }

    /// Bytes held in relay buffers at the last tick.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered_bytes.load(Ordering::Relaxed)
    }

    /// The most bytes one relayed connection ever held in its buffers.
    pub fn conn_buffered_bytes_peak(&self) -> u64 {
        self.conn_buffered_bytes_peak.load(Ordering::Relaxed)
    }

    /// The `collab_relay_*` families of `/metrics`.
    pub fn render(&self, out: &mut Exposition) {
        let rows: [(&str, &str, &str, u64); 11] = [
            (
                "collab_relay_connections",
                "gauge",
                "Connections this node relays to their documents' owners now.",
                self.active(),
            ),
            (
                "collab_relay_connections_total",
                "counter",
                "Connections this node relayed to their documents' owners.",
                self.started(),
            ),
            (
                "collab_relay_route_waits_total",
                "counter",
                "Connections that waited for the router to find their document's owner.",
                self.route_waits(),
            ),
            (
                "collab_relay_owner_retries_total",
                "counter",
                "Failed dials of an owner after which the relay asked the router again.",
                self.owner_retries(),
            ),
            (
                "collab_relay_owner_moves_total",
                "counter",
                "Relayed connections closed with 1013 because the router named another owner.",
                self.owner_moves(),
            ),
            (
                "collab_relay_refused_total",
                "counter",
                "Connections refused because --relay-conns-max were relayed already.",
                self.refused_full(),
            ),
            (
                "collab_relay_upstream_failures_total",
                "counter",
                "Relayed connections ended because the owner failed, closed or was unreachable.",
                self.upstream_failures(),
            ),
            (
                "collab_relay_bytes_to_owner_total",
                "counter",
                "Bytes relayed from clients to owners.",
                self.bytes_to_upstream(),
            ),
            (
                "collab_relay_bytes_to_client_total",
                "counter",
                "Bytes relayed from owners to clients.",
                self.bytes_to_client(),
            ),
            (
                "collab_relay_buffered_bytes",
                "gauge",
                "Bytes held in relay buffers.",
                self.buffered_bytes(),
            ),
            (
                "collab_relay_conn_buffered_bytes_peak",
                "gauge",
                "The most bytes one relayed connection held in its buffers.",
                self.conn_buffered_bytes_peak(),
            ),
        ];
        for (name, kind, help, value) in rows {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
    }
}

/// The acceptor's side of a running relay: submits connections. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RelaySender {
    jobs: Sender<RelayJob>,
    waker: Arc<mio::Waker>,
    counters: Arc<RelayCounters>,
    conns_max: usize,
}

/// The relay thread, to be stopped at shutdown.
#[derive(Debug)]
pub struct RelayThread {
    waker: Arc<mio::Waker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Why [`RelaySender::submit`] gave a job back.
#[derive(Debug)]
pub enum RelayRefused {
    /// `conns_max` connections are relayed already.
    Full(Box<RelayJob>),
    /// The relay thread is gone.
    Gone(Box<RelayJob>),
}

impl RelayRefused {
    /// The job, to be answered by the caller.
    pub fn into_job(self) -> Box<RelayJob> {
        match self {
            RelayRefused::Full(job) | RelayRefused::Gone(job) => job,
        }
    }
}

/// Starts the relay thread: at most `conns_max` relayed connections, figures in `counters`.
/// When an owner cannot be reached, the relay asks `router` again (every 100 ms) for up to
/// `route_wait` from the connection's start.
///
/// # Errors
/// When its `Poll` or the thread cannot be created.
pub fn spawn_relay(
    conns_max: usize,
    counters: Arc<RelayCounters>,
    router: Arc<dyn Router>,
    route_wait: Duration,
) -> io::Result<(RelaySender, RelayThread)> {
    let poll = Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    let (jobs, receiver) = crossbeam_channel::unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let relay = RelayLoop {
        poll,
        jobs: receiver,
        links: Slab::new(),
        counters: counters.clone(),
        stop: stop.clone(),
        again: Vec::new(),
        router,
        route_wait,
    };
    let thread = std::thread::Builder::new()
        .name("relay".to_owned())
        .spawn(move || relay.run())?;
    let sender = RelaySender {
        jobs,
        waker: waker.clone(),
        counters,
        conns_max,
    };
    let thread = RelayThread {
        waker,
        stop,
        thread: Some(thread),
    };
    Ok((sender, thread))
}

impl RelaySender {
    /// The relay's counters.
    pub fn counters(&self) -> &Arc<RelayCounters> {
        &self.counters
    }

    /// Hands a connection to the relay thread; never blocks.
    ///
    /// # Errors
    /// The job back, when the relay is full or gone (the caller answers the client).
    pub fn submit(&self, job: RelayJob) -> Result<(), RelayRefused> {
        let active = self.counters.active.fetch_add(1, Ordering::AcqRel);
        if active as usize >= self.conns_max {
            self.counters.active.fetch_sub(1, Ordering::AcqRel);
            self.counters.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(RelayRefused::Full(Box::new(job)));
        }
        if let Err(e) = self.jobs.send(job) {
            self.counters.active.fetch_sub(1, Ordering::AcqRel);
            return Err(RelayRefused::Gone(Box::new(e.into_inner())));
        }
        // A failed wake means the relay's Poll is gone: the job waits in a channel nobody
        // reads, as at shutdown.
        let _ = self.waker.wake();
        Ok(())
    }
}

impl RelayThread {
    /// Stops the relay thread (its connections are closed, WebSocket clients with 1001 where
    /// the relay is at a frame boundary) and waits for it.
    ///
    /// # Errors
    /// When the thread failed or panicked.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RelayThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// What the relay knows of the owner-to-client stream.
enum Downstream {
    /// The owner's response head is not complete yet (held, not written to the client).
    Head,
    /// WebSocket frames (the owner upgraded).
    Frames(FrameTracker),
    /// Anything else: an HTTP answer, or a refused upgrade's answer.
    Opaque,
}

/// One relayed connection.
struct Link {
    client: TcpStream,
    /// `None` when the owner could not even be dialled.
    upstream: Option<TcpStream>,
    peer: SocketAddr,
    upstream_addr: SocketAddr,
    kind: RelayKind,
    release: Option<DoorRelease>,
    /// The owner accepted the TCP connection.
    connected: bool,
    /// Until the owner accepts.
    connect_deadline: Instant,
    /// Client to owner: first the job's request head (`preamble`), then, on a WebSocket once
    /// the owner answered the upgrade (its handshake refuses bytes pipelined after the
    /// request), the job's frames (`after_head`) and what the client sends (`c2u`).
    c2u: Buf,
    preamble: Vec<u8>,
    preamble_written: usize,
    after_head: Vec<u8>,
    after_head_written: usize,
    /// Owner to client.
    u2c: Buf,
    down: Downstream,
    /// Bytes the relay itself owes the client after `u2c` (a close frame, an error answer).
    tail: Vec<u8>,
    tail_written: usize,
    client_reading: bool,
    /// The owner's side is over (ended, failed or unreachable): nothing more is read from it or
    /// written to it.
    upstream_over: bool,
    upstream_write_shut: bool,
    client_write_shut: bool,
    /// Set once either side ended: the link is dropped then, whatever is left.
    linger_deadline: Option<Instant>,
    /// Client bytes read and dropped since the owner's side ended.
    discarded_bytes: usize,
    /// The document, while the router may still be asked for another owner.
    doc: Option<String>,
    /// Until when a failed dial sends the link back to the router.
    retry_deadline: Instant,
    /// The last dial failed: the link waits for the router to name an owner (on the tick).
    waiting_route: bool,
    /// When the router is next asked whether the document still lives on `upstream_addr`.
    next_route_check: Instant,
}

/// How one drive of a link ended.
#[derive(Debug, PartialEq, Eq)]
enum LinkState {
    /// Waiting for readiness.
    Open,
    /// Spent its budget with bytes still moving: drive it again after the other links.
    Again,
    Done,
}

/// Rounds one drive of a link may take (each moves up to a buffer per direction) before the
/// other links get their turn: a fast pair of peers cannot hold the relay thread.
const ROUNDS_PER_DRIVE_MAX: usize = 16;

/// How often the relay asks the router whether a relayed session's document still lives on
/// the owner it relays to (an owner that is paused or cut off sends no close of its own).
pub const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes a client may send after its owner is gone (read and dropped while the relay waits for
/// its close) before the relay stops waiting.
const DISCARD_BYTES_MAX: usize = 64 * 1024;

impl Link {
    fn held_bytes(&self) -> usize {
        self.c2u.len() + self.u2c.len() + (self.tail.len() - self.tail_written)
    }

    /// The owner ended its side (`failed`: an error, not an orderly EOF) or cannot be reached:
    /// stop reading it and tell the client in the way its stage allows.
    fn upstream_ended(&mut self, failed: bool, counters: &RelayCounters, now: Instant) {
        if self.upstream_over {
            return;
        }
        self.upstream_over = true;
        let orderly = match &self.down {
            Downstream::Frames(tracker) => tracker.close_seen && !failed,
            Downstream::Opaque => !failed,
            Downstream::Head => false,
        };
        if !orderly {
            counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
            debug!(
                "relay: owner {} of {} ended (failed: {failed})",
                self.upstream_addr, self.peer
            );
            self.tail = match (&self.down, &self.kind) {
                (Downstream::Frames(tracker), _) if tracker.at_boundary() => {
                    close_frame(1013, RELAY_CLOSE_REASON)
                }
                (Downstream::Head, RelayKind::WsUpgrade { key }) => {
                    self.u2c.consume(self.u2c.len());
                    let mut out = switching_protocols(key);
                    out.extend_from_slice(&unavailable_frames(
                        "the document's owner is unreachable; try again",
                    ));
                    out
                }
                (Downstream::Head, RelayKind::WsUpgraded) => {
                    self.u2c.consume(self.u2c.len());
                    unavailable_frames("the document's owner is unreachable; try again")
                }
                (Downstream::Head, RelayKind::Http) => {
                    self.u2c.consume(self.u2c.len());
                    crate::acceptor::http::response(
                        503,
                        "application/json",
                        br#"{"error":"unavailable","message":"the document's owner is unreachable; try again"}"#,
                        &["Retry-After: 1"],
                    )
                }
                // Mid-frame or mid-answer: nothing can be added; the TCP close tells.
                _ => Vec::new(),
            };
            // What is held toward the owner no longer has anywhere to go.
            self.c2u.consume(self.c2u.len());
            if matches!(self.down, Downstream::Head) {
                // The owner's partial head was dropped; the relay's own answer replaces it.
                self.down = Downstream::Opaque;
            }
        }
        self.linger_deadline.get_or_insert(now + RELAY_CLOSE_LINGER);
    }

    /// Dialling the owner failed (refused, reset, timed out) before it accepted: ask the router
    /// again if the link may still wait, else tell the client.
    fn connect_failed(&mut self, counters: &RelayCounters, now: Instant) {
        if self.doc.is_some() && now < self.retry_deadline && !self.upstream_over {
            debug!(
                "relay: owner {} of {} unreachable; asking the router again",
                self.upstream_addr, self.peer
            );
            counters.owner_retries.fetch_add(1, Ordering::Relaxed);
            self.upstream = None;
            self.waiting_route = true;
        } else {
            self.upstream_ended(true, counters, now);
        }
    }

    /// The owner's response head is complete at `head_bytes`: decide how to pass it on.
    fn head_complete(&mut self, head_bytes: usize, counters: &RelayCounters, now: Instant) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let status = match response.parse(&self.u2c.bytes()[..head_bytes]) {
            Ok(httparse::Status::Complete(_)) => response.code,
            _ => None,
        };
        let upgraded = status == Some(101);
        match (&self.kind, upgraded) {
            (RelayKind::WsUpgraded, true) => {
                // The acceptor sent the client its own 101 already.
                self.u2c.consume(head_bytes);
                let mut tracker = FrameTracker::default();
                tracker.feed(self.u2c.bytes());
                self.down = Downstream::Frames(tracker);
            }
            (RelayKind::WsUpgraded, false) => {
                debug!(
                    "relay: owner {} refused the upgrade of {} ({status:?})",
                    self.upstream_addr, self.peer
                );
                self.upstream_ended(true, counters, now);
            }
            (RelayKind::WsUpgrade { .. }, true) => {
                let mut tracker = FrameTracker::default();
                tracker.feed(&self.u2c.bytes()[head_bytes..]);
                self.down = Downstream::Frames(tracker);
            }
            _ => self.down = Downstream::Opaque,
        }
    }

    /// Bytes just read from the owner (the last `n` of `u2c`).
    fn read_from_upstream(&mut self, n: usize, counters: &RelayCounters, now: Instant) {
        match &mut self.down {
            Downstream::Frames(tracker) => {
                let bytes = self.u2c.bytes();
                tracker.feed(&bytes[bytes.len() - n..]);
            }
            Downstream::Opaque => {}
            Downstream::Head => {
                let held = self.u2c.bytes();
                match held.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(at) => self.head_complete(at + 4, counters, now),
                    None if held.len() >= RESPONSE_HEAD_BYTES_MAX => {
                        self.upstream_ended(true, counters, now)
                    }
                    None => {}
                }
            }
        }
    }

    /// Moves bytes both ways until nothing more can move now.
    fn pump(&mut self, counters: &RelayCounters, now: Instant) -> LinkState {
        if let (false, false, Some(upstream)) = (self.connected, self.upstream_over, &self.upstream)
        {
            // mio's connect is non-blocking: writable, no pending error and a peer address
            // mean connected.
            let dialled = match upstream.take_error() {
                Ok(None) => match upstream.peer_addr() {
                    Ok(_) => Some(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                    Err(_) => Some(false),
                },
                Ok(Some(_)) | Err(_) => Some(false),
            };
            match dialled {
                Some(true) => {
                    let _ = upstream.set_nodelay(true);
                    self.connected = true;
                }
                Some(false) => self.connect_failed(counters, now),
                None => {}
            }
        }
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > ROUNDS_PER_DRIVE_MAX {
                return LinkState::Again;
            }
            let mut progress = false;
            // Client to relay. Once the owner is gone the client's bytes are read and dropped
            // (to see its close) instead of buffered.
            if self.client_reading {
                let upstream_live = !self.upstream_over;
                let mut scratch = [0u8; 1024];
                let target: &mut [u8] = if upstream_live {
                    self.c2u.spare()
                } else {
                    &mut scratch[..]
                };
                if !target.is_empty() {
                    match self.client.read(target) {
                        Ok(0) => {
                            self.client_reading = false;
                            self.linger_deadline.get_or_insert(now + RELAY_CLOSE_LINGER);
                            progress = true;
                        }
                        Ok(n) => {
                            if upstream_live {
                                self.c2u.filled(n);
                            } else {
                                self.discarded_bytes += n;
                                if self.discarded_bytes > DISCARD_BYTES_MAX {
                                    return LinkState::Done;
                                }
                            }
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                        Err(_) => return LinkState::Done,
                    }
                }
            }
            // Relay to owner: the preamble, then the client's bytes.
            if let (true, false, false, Some(upstream)) = (
                self.connected,
                self.upstream_over,
                self.upstream_write_shut,
                &mut self.upstream,
            ) {
                let holding = matches!(self.down, Downstream::Head) && self.kind != RelayKind::Http;
                let (source, pending): (u8, &[u8]) = if self.preamble_written < self.preamble.len()
                {
                    (0, &self.preamble[self.preamble_written..])
                } else if holding {
                    (3, &[])
                } else if self.after_head_written < self.after_head.len() {
                    (1, &self.after_head[self.after_head_written..])
                } else {
                    (2, self.c2u.bytes())
                };
                if !pending.is_empty() {
                    match upstream.write(pending) {
                        Ok(n) => {
                            match source {
                                0 => self.preamble_written += n,
                                1 => {
                                    self.after_head_written += n;
                                    if self.after_head_written == self.after_head.len() {
                                        self.after_head = Vec::new();
                                        self.after_head_written = 0;
                                    }
                                }
                                _ => self.c2u.consume(n),
                            }
                            counters
                                .bytes_to_upstream
                                .fetch_add(n as u64, Ordering::Relaxed);
                            progress |= n > 0;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                        Err(_) => {
                            self.upstream_write_shut = true;
                            self.upstream_ended(true, counters, now);
                            progress = true;
                        }
                    }
                } else if !self.client_reading && !holding {
                    // The client ended and everything it sent is delivered: pass the end on.
                    let _ = upstream.shutdown(Shutdown::Write);
                    self.upstream_write_shut = true;
                    progress = true;
                }
            }
            // Owner to relay.
            if let (true, false, true, Some(upstream)) = (
                self.connected,
                self.upstream_over,
                self.tail.is_empty(),
                &mut self.upstream,
            ) {
                let spare = self.u2c.spare();
                if !spare.is_empty() {
                    match upstream.read(spare) {
                        Ok(0) => {
                            self.upstream_ended(false, counters, now);
                            progress = true;
                        }
                        Ok(n) => {
                            self.u2c.filled(n);
                            self.read_from_upstream(n, counters, now);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                        Err(_) => {
                            self.upstream_ended(true, counters, now);
                            progress = true;
                        }
                    }
                }
            }
            // Relay to client: the owner's bytes (once past the head), then the relay's own.
            if !self.client_write_shut {
                let pending: &[u8] = if matches!(self.down, Downstream::Head) {
                    &[]
                } else if !self.u2c.is_empty() {
                    self.u2c.bytes()
                } else {
                    &self.tail[self.tail_written..]
                };
                if !pending.is_empty() {
                    match self.client.write(pending) {
                        Ok(n) => {
                            if !matches!(self.down, Downstream::Head) && !self.u2c.is_empty() {
                                self.u2c.consume(n);
                            } else {
                                self.tail_written += n;
                            }
                            counters
                                .bytes_to_client
                                .fetch_add(n as u64, Ordering::Relaxed);
                            progress |= n > 0;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                        Err(_) => return LinkState::Done,
                    }
                } else if self.upstream_over {
                    // The owner's side is over and everything for the client is written.
                    let _ = self.client.shutdown(Shutdown::Write);
                    self.client_write_shut = true;
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        let peak = self.held_bytes() as u64;
        counters
            .conn_buffered_bytes_peak
            .fetch_max(peak, Ordering::Relaxed);
        // Over when the client's side is closed both ways, or the client ended and the owner's
        // answer (if any) is through.
        if self.client_write_shut && !self.client_reading {
            return LinkState::Done;
        }
        LinkState::Open
    }

    /// Deadlines: the owner's accept and the linger of a closing link.
    fn on_tick(&mut self, counters: &RelayCounters, now: Instant) -> LinkState {
        if self.linger_deadline.is_some_and(|at| at <= now) {
            return LinkState::Done;
        }
        if !self.connected
            && !self.upstream_over
            && !self.waiting_route
            && self.connect_deadline <= now
        {
            debug!(
                "relay: owner {} did not accept within {RELAY_CONNECT_TIMEOUT:?}",
                self.upstream_addr
            );
            self.connect_failed(counters, now);
            return self.pump(counters, now);
        }
        LinkState::Open
    }

    /// Shutdown of the node: a WebSocket client at a frame boundary gets a close 1001.
    fn going_away(&mut self) {
        if let Downstream::Frames(tracker) = &self.down {
            if tracker.at_boundary() && self.u2c.is_empty() && self.tail.is_empty() {
                let _ = self
                    .client
                    .write(&close_frame(1001, "server shutting down"));
            }
        }
    }
}

/// The relay thread's state.
struct RelayLoop {
    poll: Poll,
    jobs: Receiver<RelayJob>,
    links: Slab<Link>,
    counters: Arc<RelayCounters>,
    stop: Arc<AtomicBool>,
    /// Links that spent their budget ([`LinkState::Again`]): driven again after this round's
    /// events, and the poll does not sleep while any is listed.
    again: Vec<usize>,
    /// Asked again when an owner cannot be reached.
    router: Arc<dyn Router>,
    /// How long after its start a link may wait for a reachable owner.
    route_wait: Duration,
}

/// Tokens: the waker, then two per link (client, owner).
fn link_token(key: usize, upstream: bool) -> Token {
    Token(1 + key * 2 + usize::from(upstream))
}

impl RelayLoop {
    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let tick = Duration::from_millis(100);
        let mut next_tick = Instant::now() + tick;
        loop {
            let timeout = if self.again.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.stop.load(Ordering::Acquire) {
                for (_, link) in self.links.iter_mut() {
                    link.going_away();
                }
                let keys: Vec<usize> = self.links.iter().map(|(key, _)| key).collect();
                for key in keys {
                    self.finish(key);
                }
                return Ok(());
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER => self.take_jobs(now),
                    Token(t) => {
                        let key = (t - 1) / 2;
                        self.drive(key, now);
                    }
                }
            }
            // A key may have been finished (or reused) since: then a spurious drive, harmless.
            for key in std::mem::take(&mut self.again) {
                self.drive(key, now);
            }
            if now >= next_tick {
                next_tick = now + tick;
                let keys: Vec<usize> = self.links.iter().map(|(key, _)| key).collect();
                let mut held = 0u64;
                for key in keys {
                    let state = match self.links.get_mut(key) {
                        Some(link) => link.on_tick(&self.counters, now),
                        None => continue,
                    };
                    if state != LinkState::Done
                        && self.links.get(key).is_some_and(|l| l.waiting_route)
                    {
                        self.retry(key, now);
                        continue;
                    }
                    if state == LinkState::Open {
                        self.check_route(key, now);
                    }
                    match state {
                        LinkState::Done => self.finish(key),
                        LinkState::Again => self.again.push(key),
                        LinkState::Open => {
                            held += self.links.get(key).map_or(0, |l| l.held_bytes() as u64)
                        }
                    }
                }
                self.counters.buffered_bytes.store(held, Ordering::Relaxed);
            }
        }
    }

    fn take_jobs(&mut self, now: Instant) {
        while let Ok(job) = self.jobs.try_recv() {
            self.start(job, now);
        }
    }

    fn start(&mut self, job: RelayJob, now: Instant) {
        let RelayJob {
            mut client,
            peer,
            upstream: upstream_addr,
            to_upstream,
            frames,
            kind,
            release,
            doc,
        } = job;
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        let entry = self.links.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut client,
            link_token(key, false),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("relay: register {peer}: {e}");
            self.counters.active.fetch_sub(1, Ordering::AcqRel);
            if let Some(release) = release {
                release.release(peer);
            }
            return;
        }
        let upstream = match TcpStream::connect(upstream_addr) {
            Ok(mut upstream) => {
                match self.poll.registry().register(
                    &mut upstream,
                    link_token(key, true),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => Some(upstream),
                    Err(e) => {
                        warn!("relay: register owner {upstream_addr}: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                debug!("relay: connect to owner {upstream_addr}: {e}");
                None
            }
        };
        let connect_failed = upstream.is_none();
        let mut link = Link {
            client,
            upstream,
            peer,
            upstream_addr,
            kind,
            release,
            connected: false,
            connect_deadline: now + RELAY_CONNECT_TIMEOUT,
            c2u: Buf::new(),
            preamble: to_upstream,
            preamble_written: 0,
            after_head: frames,
            after_head_written: 0,
            u2c: Buf::new(),
            down: Downstream::Head,
            tail: Vec::new(),
            tail_written: 0,
            client_reading: true,
            upstream_over: false,
            upstream_write_shut: false,
            client_write_shut: false,
            linger_deadline: None,
            discarded_bytes: 0,
            doc,
            retry_deadline: now + self.route_wait,
            waiting_route: false,
            next_route_check: now + ROUTE_CHECK_INTERVAL,
        };
        if connect_failed {
            link.connect_failed(&self.counters, now);
        }
        entry.insert(link);
        self.drive(key, now);
    }

    /// A link whose owner could not be reached: dial the owner the router names now, wait
    /// while it has none, or give up (its wait is over, or the document became local).
    fn retry(&mut self, key: usize, now: Instant) {
        let Some(link) = self.links.get_mut(key) else {
            return;
        };
        let route = match (&link.doc, now < link.retry_deadline) {
            (Some(doc), true) => self.router.route(doc),
            _ => Route::Unavailable("no reachable owner before the deadline".to_owned()),
        };
        match route {
            Route::Pending => return,
            Route::Relay(owner) => {
                let dialled = TcpStream::connect(owner).and_then(|mut upstream| {
                    self.poll
                        .registry()
                        .register(
                            &mut upstream,
                            link_token(key, true),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .map(|()| upstream)
                });
                match dialled {
                    Ok(upstream) => {
                        link.upstream = Some(upstream);
                        link.upstream_addr = owner;
                        link.connect_deadline = now + RELAY_CONNECT_TIMEOUT;
                        link.waiting_route = false;
                    }
                    Err(e) => {
                        debug!("relay: connect to owner {owner}: {e}");
                        return;
                    }
                }
            }
            // Served here now (the client reconnects to this node and is served locally), or
            // by nobody: the client is told.
            Route::Local | Route::Unavailable(_) => {
                link.waiting_route = false;
                link.upstream_ended(true, &self.counters, now);
            }
        }
        self.drive(key, now);
    }

    /// Asks the router whether a relayed session's document still lives on its owner; when
    /// the router names another node (or this one), the session is over: the client gets 1013
    /// (at a frame boundary) and comes back through the new route.
    fn check_route(&mut self, key: usize, now: Instant) {
        let Some(link) = self.links.get_mut(key) else {
            return;
        };
        if now < link.next_route_check || !link.connected || link.upstream_over {
            return;
        }
        link.next_route_check = now + ROUTE_CHECK_INTERVAL;
        let Some(doc) = &link.doc else {
            return;
        };
        let moved = match self.router.route(doc) {
            Route::Relay(owner) => owner != link.upstream_addr,
            Route::Local => true,
            // In transition, or nobody: the owner itself decides (it closes 1013 when it loses
            // the lease).
            Route::Pending | Route::Unavailable(_) => false,
        };
        if moved {
            debug!(
                "relay: {doc:?} moved away from {}; closing {} with 1013",
                link.upstream_addr, link.peer
            );
            self.counters.owner_moves.fetch_add(1, Ordering::Relaxed);
            link.upstream_ended(true, &self.counters, now);
            // The old owner learns it from the closed socket.
            if let Some(mut upstream) = link.upstream.take() {
                let _ = self.poll.registry().deregister(&mut upstream);
            }
            self.drive(key, now);
        }
    }

    fn drive(&mut self, key: usize, now: Instant) {
        let Some(link) = self.links.get_mut(key) else {
            return; // An event for a link already gone.
        };
        match link.pump(&self.counters, now) {
            LinkState::Done => self.finish(key),
            LinkState::Again => self.again.push(key),
            LinkState::Open => {}
        }
    }

    fn finish(&mut self, key: usize) {
        let mut link = self.links.remove(key);
        let _ = self.poll.registry().deregister(&mut link.client);
        if let Some(upstream) = &mut link.upstream {
            let _ = self.poll.registry().deregister(upstream);
        }
        self.counters.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(release) = &link.release {
            release.release(link.peer);
        }
        debug!("relay: {} to {} done", link.peer, link.upstream_addr);
    }
}
