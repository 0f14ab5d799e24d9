//! The acceptor thread: accepts TCP, answers plain HTTP, performs the WebSocket handshake
//! and, on plain `/ws`, waits for the `hello`; then hands the socket to its shard.
//!
//! Every connection here is a small state machine driven by readiness events, so one slow or
//! hostile client never blocks the others; each has a deadline (`--handshake-timeout`).
//! The acceptor never reads a document and never touches a room.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::config::REFUSALS_BEFORE_CLOSE;
use crate::ids::shard_for_doc;
use crate::metrics::MetricsRegistry;
use crate::protocol::{self, ClientMessage, ErrorCode, ProtocolError};

use super::handoff::{Handoff, ShardInbox, ShardMsg};
use super::http::{self, Parsed, Route, REQUEST_HEAD_BYTES_MAX};

/// Connections in the HTTP/handshake stage at once; past it new ones are dropped at once,
/// so a connection flood cannot exhaust memory in the acceptor.
pub const PENDING_CONNS_MAX: usize = 16_384;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// How the acceptor routes plain `/ws` (no document in the path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainWs {
    /// Wait for the first text frame, which must be a valid `hello` naming a document.
    AwaitHello,
    /// Hand the connection over at once, spreading over the shards (the echo example).
    RoundRobin,
}

/// What the acceptor needs to know.
#[derive(Clone, Debug)]
pub struct AcceptorOptions {
    /// Time a client has for its request, the handshake and (plain `/ws`) its `hello`.
    pub handshake_timeout: Duration,
    /// The WebSocket limits and buffer sizes every connection gets.
    pub ws_config: WebSocketConfig,
    /// Routing of plain `/ws`.
    pub plain_ws: PlainWs,
}

/// Wakes and stops an [`Acceptor`] from another thread.
#[derive(Clone, Debug)]
pub struct AcceptorStop {
    stop: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
}

impl AcceptorStop {
    /// Asks the acceptor to stop accepting and return.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

type Handshaking = MidHandshake<ServerHandshake<TcpStream, NoCallback>>;

/// Where one pending connection stands.
enum Stage {
    /// Waiting for the complete request head (peeked, not consumed).
    Request(TcpStream),
    /// Writing a plain HTTP answer, then closing.
    Answer {
        stream: TcpStream,
        bytes: Vec<u8>,
        written: usize,
    },
    /// The WebSocket handshake, resumed on every readiness event.
    Handshake {
        mid: Handshaking,
        doc: Option<String>,
    },
    /// Upgraded on plain `/ws`; waiting for a `hello` naming a document. Other messages are
    /// refused as they would be in a shard (`not_joined`, `bad_message`, ...) and the wait goes
    /// on, until [`REFUSALS_BEFORE_CLOSE`] refusals or the deadline.
    AwaitHello {
        ws: WebSocket<TcpStream>,
        n_refused: u32,
    },
    /// Refused after the upgrade: flushing an error and a close frame, then waiting for the
    /// client's close (or the deadline).
    Refuse(WebSocket<TcpStream>),
}

struct Pending {
    /// `None` only while [`Acceptor::drive`] moves the stage through [`advance`].
    stage: Option<Stage>,
    peer: SocketAddr,
    deadline: Instant,
}

/// What a pending connection does next.
// Returned once per event and moved straight back into the slab: boxing would only add an
// allocation per event.
#[allow(clippy::large_enum_variant)]
enum Next {
    Stay(Stage),
    Drop,
    HandOff(Box<Handoff>),
}

/// The acceptor: a listener, its pending connections and the shards' inboxes.
pub struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    pending: Slab<Pending>,
    shards: Vec<ShardInbox>,
    metrics: MetricsRegistry,
    options: AcceptorOptions,
    stop: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
    round_robin: usize,
    /// Set when `accept` failed for lack of resources: retried on the next timer tick, since
    /// the edge-triggered listener will not report the backlog again.
    accept_retry: bool,
    /// Connections dropped at [`PENDING_CONNS_MAX`] since the last warning: a connection
    /// flood gets one log line a second, not one per connection.
    n_dropped_full: u64,
    /// When that warning was last logged.
    dropped_full_warned_at: Option<Instant>,
}

/// Connections the kernel may queue before `accept`. mio (like std) listens with 128, which a
/// join storm of a few hundred clients overflows: every dropped SYN then costs its client a
/// one-second retransmit. The kernel caps it at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: libc::c_int = 4096;

/// Calls `listen` again with [`LISTEN_BACKLOG`]; on Linux a second `listen` on a listening socket
/// only changes its backlog.
fn raise_backlog(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `listen` on a valid, owned socket descriptor has no memory-safety preconditions.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Acceptor {
    /// Binds `addr` and prepares the loop.
    ///
    /// # Errors
    /// When binding or creating the `Poll` fails.
    pub fn bind(
        addr: SocketAddr,
        shards: Vec<ShardInbox>,
        metrics: MetricsRegistry,
        options: AcceptorOptions,
    ) -> io::Result<Acceptor> {
        assert!(!shards.is_empty(), "at least one shard");
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        raise_backlog(&listener)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        Ok(Acceptor {
            poll,
            listener,
            local_addr,
            pending: Slab::new(),
            shards,
            metrics,
            options,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            round_robin: 0,
            accept_retry: false,
            n_dropped_full: 0,
            dropped_full_warned_at: None,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops this acceptor from another thread.
    pub fn stopper(&self) -> AcceptorStop {
        AcceptorStop {
            stop: self.stop.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Runs until stopped; pending connections are dropped on the way out.
    ///
    /// # Errors
    /// When the `Poll` itself fails.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let tick = (self.options.handshake_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut next_scan = Instant::now() + tick;
        loop {
            let timeout = next_scan.saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.stop.load(Ordering::Acquire) {
                debug!(
                    "acceptor stopping with {} pending connections",
                    self.pending.len()
                );
                return Ok(());
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            let now = Instant::now();
            if now >= next_scan {
                next_scan = now + tick;
                self.expire(now);
                if self.accept_retry {
                    self.accept_all();
                }
            }
        }
    }

    fn accept_all(&mut self) {
        self.accept_retry = false;
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.pending.len() >= PENDING_CONNS_MAX {
                        self.n_dropped_full += 1;
                        let now = Instant::now();
                        let quiet = self.dropped_full_warned_at.is_some_and(|at| {
                            now.saturating_duration_since(at) < Duration::from_secs(1)
                        });
                        if !quiet {
                            warn!(
                                "acceptor: {PENDING_CONNS_MAX} connections pending; dropped {} new ones, the last from {peer}",
                                self.n_dropped_full
                            );
                            self.n_dropped_full = 0;
                            self.dropped_full_warned_at = Some(now);
                        }
                        continue;
                    }
                    // Small frames must not wait for Nagle; errors here only cost latency.
                    let _ = stream.set_nodelay(true);
                    let entry = self.pending.vacant_entry();
                    let token = Token(entry.key() + FIRST_CONN);
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("acceptor: register {peer}: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + self.options.handshake_timeout;
                    entry.insert(Pending {
                        stage: Some(Stage::Request(stream)),
                        peer,
                        deadline,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE, ENOBUFS...: try again on the next tick instead of spinning.
                    warn!("acceptor: accept failed: {e}");
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in expired {
            let pending = self.pending.remove(key);
            debug!("acceptor: {} missed the handshake deadline", pending.peer);
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(pending) = self.pending.get_mut(key) else {
            return; // An event for a connection already gone.
        };
        let peer = pending.peer;
        let Some(stage) = pending.stage.take() else {
            return;
        };
        let health = http::ShardsHealth {
            dead: self.shards.iter().filter(|s| !s.is_alive()).count(),
            storage_unavailable: self
                .shards
                .iter()
                .filter(|s| s.is_alive() && !s.storage_available().get())
                .count(),
        };
        let next = advance(stage, peer, &self.metrics, &self.options, health);
        match next {
            Next::Stay(stage) => {
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.stage = Some(stage);
                }
            }
            Next::Drop => {
                self.pending.remove(key);
            }
            Next::HandOff(mut handoff) => {
                self.pending.remove(key);
                if let Err(e) = self.poll.registry().deregister(handoff.ws.get_mut()) {
                    warn!("acceptor: deregister {peer}: {e}");
                    return;
                }
                let shard_idx = match &handoff.doc {
                    Some(doc) => Some(shard_for_doc(doc, self.shards.len()).0),
                    None => self.next_alive_shard(),
                };
                let Some(shard_idx) = shard_idx.filter(|&idx| self.shards[idx].is_alive()) else {
                    return self.refuse_dead_shard(handoff);
                };
                if let Err(ShardMsg::Conn(handoff)) =
                    self.shards[shard_idx].send(ShardMsg::Conn(handoff))
                {
                    self.refuse_dead_shard(handoff);
                }
            }
        }
    }

    /// The next live shard in round-robin order, if any is alive.
    fn next_alive_shard(&mut self) -> Option<usize> {
        for _ in 0..self.shards.len() {
            self.round_robin = (self.round_robin + 1) % self.shards.len();
            if self.shards[self.round_robin].is_alive() {
                return Some(self.round_robin);
            }
        }
        None
    }

    /// The connection's shard died (its handler panicked, see `shard::event_loop`): the client
    /// gets `unavailable` and a close 1011 instead of waiting on a shard that never reads.
    fn refuse_dead_shard(&mut self, handoff: Box<Handoff>) {
        let Handoff { mut ws, peer, .. } = *handoff;
        debug!("acceptor: the shard of {peer} is dead; closing 1011");
        let err = ProtocolError::new(ErrorCode::Unavailable, "internal error; try again later");
        // WouldBlock still queues the frames in tungstenite's buffer; refuse() flushes them.
        let _ = ws.write(Message::Text(protocol::encode_error(&err)));
        let _ = ws.close(Some(CloseFrame {
            code: CloseCode::Error,
            reason: "internal error".into(),
        }));
        let entry = self.pending.vacant_entry();
        let token = Token(entry.key() + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(
            ws.get_mut(),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("acceptor: register {peer}: {e}");
            return;
        }
        if let Next::Stay(stage) = refuse(ws) {
            entry.insert(Pending {
                stage: Some(stage),
                peer,
                deadline: Instant::now() + self.options.handshake_timeout,
            });
        }
    }
}

/// One step of a pending connection's state machine.
fn advance(
    stage: Stage,
    peer: SocketAddr,
    metrics: &MetricsRegistry,
    options: &AcceptorOptions,
    health: http::ShardsHealth,
) -> Next {
    match stage {
        Stage::Request(stream) => read_request(stream, peer, metrics, options, health),
        Stage::Answer {
            stream,
            bytes,
            written,
        } => write_answer(stream, bytes, written),
        Stage::Handshake { mid, doc } => handshake_resume(mid, doc, peer, options),
        Stage::AwaitHello { ws, n_refused } => await_hello(ws, n_refused, peer),
        Stage::Refuse(ws) => refuse(ws),
    }
}

fn read_request(
    mut stream: TcpStream,
    peer: SocketAddr,
    metrics: &MetricsRegistry,
    options: &AcceptorOptions,
    health: http::ShardsHealth,
) -> Next {
    let mut buf = [0u8; REQUEST_HEAD_BYTES_MAX];
    // Peek, so that an upgrade leaves the request in the socket for tungstenite's handshake.
    let n = match stream.peek(&mut buf) {
        Ok(0) => return Next::Drop,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Next::Stay(Stage::Request(stream))
        }
        Err(_) => return Next::Drop,
    };
    match http::parse_request_with_health(&buf[..n], metrics, health) {
        Parsed::Partial => Next::Stay(Stage::Request(stream)),
        Parsed::Complete {
            head_bytes,
            route: Route::Answer(bytes),
        } => {
            // Consume the head so closing after the answer does not reset the connection.
            if stream.read(&mut buf[..head_bytes]).is_err() {
                return Next::Drop;
            }
            write_answer(stream, bytes, 0)
        }
        Parsed::Complete {
            route: Route::Upgrade { doc },
            ..
        } => {
            debug!("acceptor: {peer} upgrades for {doc:?}");
            let mid = ServerHandshake::start(stream, NoCallback, Some(options.ws_config));
            // Run the first round at once: the request is already in the socket.
            handshake_resume(mid, doc, peer, options)
        }
    }
}

fn write_answer(mut stream: TcpStream, bytes: Vec<u8>, mut written: usize) -> Next {
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return Next::Drop,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Next::Stay(Stage::Answer {
                    stream,
                    bytes,
                    written,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Drop,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    Next::Drop
}

fn handshake_resume(
    mid: Handshaking,
    doc: Option<String>,
    peer: SocketAddr,
    options: &AcceptorOptions,
) -> Next {
    match mid.handshake() {
        Ok(ws) => match doc {
            Some(doc) => Next::HandOff(Box::new(Handoff {
                ws,
                doc: Some(doc),
                hello: None,
                peer,
            })),
            None if options.plain_ws == PlainWs::RoundRobin => Next::HandOff(Box::new(Handoff {
                ws,
                doc: None,
                hello: None,
                peer,
            })),
            None => await_hello(ws, 0, peer),
        },
        Err(HandshakeError::Interrupted(mid)) => Next::Stay(Stage::Handshake { mid, doc }),
        Err(HandshakeError::Failure(e)) => {
            debug!("acceptor: handshake with {peer} failed: {e}");
            Next::Drop
        }
    }
}

fn await_hello(mut ws: WebSocket<TcpStream>, mut n_refused: u32, peer: SocketAddr) -> Next {
    // Push out earlier refusals (read() alone only flushes control replies); what does not
    // fit now stays in tungstenite's buffer for the next writable event, or the shard.
    if let Err(e) = ws.flush() {
        if !matches!(&e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
            return Next::Drop;
        }
    }
    loop {
        let refusal = match ws.read() {
            Ok(Message::Text(text)) => match protocol::parse_client_message(&text) {
                Ok(ClientMessage::Hello(hello)) if hello.doc.is_some() => {
                    let doc = hello.doc.clone();
                    return Next::HandOff(Box::new(Handoff {
                        ws,
                        doc,
                        hello: Some(hello),
                        peer,
                    }));
                }
                Ok(ClientMessage::Hello(_)) => {
                    ProtocolError::bad("hello on plain /ws must name a doc")
                }
                Ok(ClientMessage::Op(op)) => {
                    ProtocolError::new(ErrorCode::NotJoined, "send hello first")
                        .with_client_seq(Some(op.client_seq))
                }
                Ok(ClientMessage::Presence(_)) => {
                    ProtocolError::new(ErrorCode::NotJoined, "send hello first")
                }
                Err(err) => err,
            },
            Ok(Message::Binary(_)) => ProtocolError::bad("binary frames are not allowed"),
            Ok(Message::Close(_)) => return refuse(ws),
            Ok(_) => continue, // Ping (answered by tungstenite), pong.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return Next::Stay(Stage::AwaitHello { ws, n_refused });
            }
            Err(e) => {
                debug!("acceptor: {peer} before hello: {e}");
                return close_on_error(ws, &e);
            }
        };
        // The contract's refusal: an error, and the connection stays usable (as in a shard).
        n_refused += 1;
        if n_refused >= REFUSALS_BEFORE_CLOSE {
            return refuse_start(ws, &refusal, "too many refused messages");
        }
        match ws.write(Message::Text(protocol::encode_error(&refusal))) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Next::Drop,
        }
        if let Err(e) = ws.flush() {
            if !matches!(&e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
                return Next::Drop;
            }
        }
    }
}

/// Closes with the code the contract gives a transport error (1009 too big, 1007 bad UTF-8).
fn close_on_error(mut ws: WebSocket<TcpStream>, e: &tungstenite::Error) -> Next {
    let code = match e {
        tungstenite::Error::Capacity(_) => CloseCode::Size,
        tungstenite::Error::Utf8(_) => CloseCode::Invalid,
        tungstenite::Error::Protocol(_) => CloseCode::Protocol,
        _ => return Next::Drop,
    };
    // The stream is unusable for reading after such an error: send the close frame, stop.
    let _ = ws.close(Some(CloseFrame {
        code,
        reason: "".into(),
    }));
    let _ = ws.get_mut().shutdown(Shutdown::Write);
    Next::Drop
}

fn refuse_start(mut ws: WebSocket<TcpStream>, err: &ProtocolError, reason: &'static str) -> Next {
    // WouldBlock still queues the frame in tungstenite's buffer; refuse() flushes it.
    let _ = ws.write(Message::Text(protocol::encode_error(err)));
    let _ = ws.close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    }));
    refuse(ws)
}

fn refuse(mut ws: WebSocket<TcpStream>) -> Next {
    // Push out the error and close frames (read() alone only flushes control replies).
    match ws.flush() {
        Ok(()) => {}
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            return Next::Stay(Stage::Refuse(ws))
        }
        Err(_) => return Next::Drop,
    }
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return Next::Stay(Stage::Refuse(ws));
            }
            Err(_) => return Next::Drop,
        }
    }
}
