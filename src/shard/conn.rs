//! The shard's connection layer: every WebSocket of one shard, their outbound queues, read
//! and write readiness, close handshakes and timers.
//!
//! [`Net`] owns the sockets outright (a slab keyed by [`ConnToken`]); the message handler
//! (a room host, or the echo example) sees only tokens and frames. Nothing here knows about
//! documents, and nothing here ever blocks: `WouldBlock` means "try again on readiness".
//!
//! Transport rules this module keeps (each one was a real bug elsewhere):
//! - read until `WouldBlock` (tungstenite buffers whole frames; readiness is edge-triggered),
//!   within a per-turn message budget; a connection with budget left over stays on the read
//!   list for the next turn;
//! - a frame given to tungstenite is queued even when `write` reports `WouldBlock`: never resend;
//! - every write is followed by a flush, once per connection per turn;
//! - when a flush hits `WouldBlock`, register WRITABLE, stop reading the connection, and resume
//!   reads when its output drained;
//! - on a protocol error the queued frames go out before the close frame;
//! - a client's Close is answered with a Close.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Message, Utf8Bytes, WebSocket};

use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;

/// Limits of the connection layer, from `Config`.
#[derive(Clone, Copy, Debug)]
pub struct NetLimits {
    /// Messages handled per connection per loop turn.
    pub reads_per_turn_max: usize,
    /// Bytes queued for one connection before it is closed with 1013.
    pub outbound_bytes_max: usize,
    /// Connections this shard serves; more are closed with 1013.
    pub conns_max: usize,
    /// Silence after which a connection is pinged; twice this and it is dropped.
    pub idle_timeout: Duration,
    /// How long a closing connection may take to finish its close handshake.
    pub close_linger: Duration,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving messages.
    Open,
    /// Sending what is queued, then a close frame; then waiting for the peer's close.
    /// Messages that still arrive are discarded.
    Closing {
        /// Dropped at this instant whatever happens.
        deadline: Instant,
        /// After a protocol error the read side is unusable: once the close frame is out,
        /// shut down writing and discard the bytes that follow instead of parsing them.
        broken: bool,
    },
}

/// One WebSocket connection of a shard.
struct Conn {
    ws: WebSocket<TcpStream>,
    peer: SocketAddr,
    /// Frames not yet given to tungstenite: filled by [`Net::send`], drained by the flush.
    /// Text frames share their bytes with every other recipient.
    out: VecDeque<Message>,
    /// Payload bytes in `out`; bounded by [`NetLimits::outbound_bytes_max`].
    out_bytes: usize,
    /// A close frame to send after `out` drains.
    pending_close: Option<CloseFrame>,
    /// Whether the close frame was given to tungstenite.
    close_sent: bool,
    phase: Phase,
    /// tungstenite or the socket reported `WouldBlock` on write: WRITABLE is registered and
    /// reads are paused until the output drains.
    write_blocked: bool,
    /// The socket may hold unread bytes (edge-triggered readiness seen, no `WouldBlock` since).
    wants_read: bool,
    in_read_list: bool,
    in_flush_list: bool,
    last_heard: Instant,
    ping_outstanding: bool,
}

/// What one read attempt gave.
pub enum ReadOutcome {
    /// A text or binary message for the handler.
    Message(Message),
    /// Nothing more for now (drained, paused, closing or gone).
    Done,
}

/// Every connection of one shard and the bookkeeping of one loop turn.
pub struct Net {
    conns: Slab<Conn>,
    registry: Registry,
    limits: NetLimits,
    /// Connections to read this turn; refilled from readiness events and leftover budget.
    read_list: Vec<usize>,
    /// Connections with something to write (or a writable event) this turn.
    flush_list: Vec<usize>,
    /// Empty; swapped with `flush_list` by [`Net::flush_all`] to keep both allocations.
    flush_spare: Vec<usize>,
    /// Connections that stopped being open since the handler last heard: the loop tells the
    /// handler ([`Net::take_gone`]) before any slab key can be reused.
    gone: Vec<ConnToken>,
    /// The shard's metrics, shared with the handler.
    pub metrics: ShardMetrics,
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl Net {
    /// An empty connection set registering sockets with `registry`.
    pub fn new(registry: Registry, limits: NetLimits, metrics: ShardMetrics) -> Net {
        Net {
            conns: Slab::new(),
            registry,
            limits,
            read_list: Vec::new(),
            flush_list: Vec::new(),
            flush_spare: Vec::new(),
            gone: Vec::new(),
            metrics,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &NetLimits {
        &self.limits
    }

    /// Connections held, open or closing.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Whether `conn` is open (not closing, not gone).
    pub fn is_open(&self, conn: ConnToken) -> bool {
        self.conns
            .get(conn.0)
            .is_some_and(|c| c.phase == Phase::Open)
    }

    /// The peer address of `conn`, for logs.
    pub fn peer(&self, conn: ConnToken) -> Option<SocketAddr> {
        self.conns.get(conn.0).map(|c| c.peer)
    }

    /// Whether some connection has unread input left over from its budget.
    pub fn has_pending_reads(&self) -> bool {
        !self.read_list.is_empty()
    }

    /// Takes a new WebSocket. Past the connection limit it is closed with 1013 at once and
    /// `None` is returned.
    pub fn insert(
        &mut self,
        mut ws: WebSocket<TcpStream>,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnToken> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .registry
            .register(ws.get_mut(), Token(key), Interest::READABLE)
        {
            warn!("shard: register {peer}: {e}");
            return None;
        }
        entry.insert(Conn {
            ws,
            peer,
            out: VecDeque::new(),
            out_bytes: 0,
            pending_close: None,
            close_sent: false,
            phase: Phase::Open,
            write_blocked: false,
            wants_read: true,
            in_read_list: false,
            in_flush_list: false,
            last_heard: now,
            ping_outstanding: false,
        });
        self.metrics.figures.counters.conns_accepted += 1;
        self.metrics.figures.counters.conns += 1;
        // The acceptor may have buffered bytes already, and edge-triggered readiness will not
        // report them again: read at once.
        self.push_read(key);
        let conn = ConnToken(key);
        if self.conns.len() > self.limits.conns_max {
            warn!(
                "shard: {} connections, refusing {peer}",
                self.limits.conns_max
            );
            self.close_quietly(conn, 1013, "server full, try again later");
            return None;
        }
        Some(conn)
    }

    /// Queues a text frame for `conn`, to be written at the end of the turn. A connection
    /// left with more than [`NetLimits::outbound_bytes_max`] queued after the turn's flush is
    /// closed with 1013.
    pub fn send(&mut self, conn: ConnToken, frame: Utf8Bytes) {
        self.send_message(conn, Message::Text(frame));
    }

    fn send_message(&mut self, conn: ConnToken, message: Message) {
        let Some(c) = self.conns.get_mut(conn.0) else {
            return;
        };
        if c.phase != Phase::Open {
            return;
        }
        let len = message.len();
        c.out_bytes += len;
        c.out.push_back(message);
        self.metrics.figures.counters.bytes_out += len as u64;
        self.push_flush(conn.0);
    }

    /// After a flush: a connection that still has more than [`NetLimits::outbound_bytes_max`]
    /// queued is too slow; it is closed with 1013 and its queue dropped (it reconnects with
    /// `since`). Checked after writing, so one turn's burst to a reader that keeps up is fine.
    fn check_backlog(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.phase != Phase::Open || c.out_bytes <= self.limits.outbound_bytes_max {
            return;
        }
        self.metrics.figures.counters.slow_consumer_drops += 1;
        warn!(
            "shard: {} fell {} bytes behind; closing 1013",
            c.peer, c.out_bytes
        );
        c.out.clear();
        c.out_bytes = 0;
        self.close(ConnToken(key), 1013, "too far behind, reconnect with since");
        self.pump(key);
    }

    /// Closes `conn` with `code` after its queued frames; the handler is told through
    /// [`Net::take_gone`] like for any other close.
    pub fn close(&mut self, conn: ConnToken, code: u16, reason: &'static str) {
        self.start_close(conn, code, reason, false);
    }

    /// Like [`Net::close`], for a connection the handler never heard of.
    fn close_quietly(&mut self, conn: ConnToken, code: u16, reason: &'static str) {
        if let Some(c) = self.conns.get_mut(conn.0) {
            c.phase = Phase::Closing {
                deadline: Instant::now() + self.limits.close_linger,
                broken: false,
            };
            c.pending_close = Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            });
            self.push_flush(conn.0);
        }
    }

    fn start_close(&mut self, conn: ConnToken, code: u16, reason: &'static str, broken: bool) {
        let Some(c) = self.conns.get_mut(conn.0) else {
            return;
        };
        if c.phase != Phase::Open {
            return;
        }
        debug!("shard: closing {} with {code} ({reason})", c.peer);
        c.phase = Phase::Closing {
            deadline: Instant::now() + self.limits.close_linger,
            broken,
        };
        c.pending_close = Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        });
        self.gone.push(conn);
        self.push_flush(conn.0);
    }

    /// Closes every open connection with `code` (shutdown).
    pub fn close_all(&mut self, code: u16, reason: &'static str) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(ConnToken(key), code, reason);
        }
    }

    /// Connections that stopped being open since the last call; the handler forgets them.
    pub fn take_gone(&mut self) -> Vec<ConnToken> {
        std::mem::take(&mut self.gone)
    }

    fn drop_conn(&mut self, key: usize) {
        if let Some(mut c) = self.conns.try_remove(key) {
            let _ = self.registry.deregister(c.ws.get_mut());
            if c.phase == Phase::Open {
                self.gone.push(ConnToken(key));
            }
            self.metrics.figures.counters.conns -= 1;
            debug!("shard: dropped {}", c.peer);
        }
    }

    fn push_read(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            c.wants_read = true;
            if !c.in_read_list {
                c.in_read_list = true;
                self.read_list.push(key);
            }
        }
    }

    fn push_flush(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.in_flush_list {
                c.in_flush_list = true;
                self.flush_list.push(key);
            }
        }
    }

    /// Records a readiness event for the connection with slab key `key`.
    pub fn on_event(&mut self, key: usize, event: &mio::event::Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.push_read(key);
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.push_flush(key);
        }
    }

    /// Takes this turn's read list; the loop reads each with [`Net::read_one`] and gives the
    /// ones with budget exhausted back through [`Net::requeue_read`].
    /// `into` must be empty; it comes back holding the list, and the net keeps `into`'s
    /// capacity, so no turn allocates for its lists.
    pub fn take_read_list(&mut self, into: &mut Vec<usize>) {
        debug_assert!(into.is_empty(), "the previous read list was consumed");
        std::mem::swap(into, &mut self.read_list);
        for &key in into.iter() {
            if let Some(c) = self.conns.get_mut(key) {
                c.in_read_list = false;
            }
        }
    }

    /// Puts a connection whose budget ran out back on the read list for the next turn.
    pub fn requeue_read(&mut self, key: usize) {
        if self.conns.get(key).is_some_and(|c| c.wants_read) {
            self.push_read(key);
        }
    }

    /// Reads until a message for the handler arrives or nothing more can be read now.
    pub fn read_one(&mut self, key: usize) -> ReadOutcome {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return ReadOutcome::Done;
            };
            if !c.wants_read {
                return ReadOutcome::Done;
            }
            if c.phase == Phase::Open
                && (c.write_blocked || c.out_bytes > self.limits.outbound_bytes_max / 2)
            {
                // Backpressure: the client is not reading what we send, so stop taking more
                // work from it; reads resume once its output drained (see `pump`).
                return ReadOutcome::Done;
            }
            if let Phase::Closing { broken: true, .. } = c.phase {
                return self.drain_raw(key);
            }
            match c.ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                    c.last_heard = Instant::now();
                    if c.phase == Phase::Open {
                        self.metrics.figures.counters.bytes_in += message.len() as u64;
                        return ReadOutcome::Message(message);
                    }
                }
                Ok(Message::Ping(_)) => {
                    // tungstenite queued the pong; make sure it goes out this turn.
                    c.last_heard = Instant::now();
                    self.push_flush(key);
                }
                Ok(Message::Pong(_)) => {
                    c.last_heard = Instant::now();
                    c.ping_outstanding = false;
                }
                Ok(Message::Close(_)) => {
                    // tungstenite queued the answering Close; flush it, then the next read
                    // reports the end.
                    let conn = ConnToken(key);
                    if c.phase == Phase::Open {
                        c.phase = Phase::Closing {
                            deadline: Instant::now() + self.limits.close_linger,
                            broken: false,
                        };
                        c.out.clear();
                        c.out_bytes = 0;
                        self.gone.push(conn);
                    }
                    self.push_flush(key);
                }
                Ok(Message::Frame(_)) => {}
                Err(e) if would_block(&e) => {
                    c.wants_read = false;
                    return ReadOutcome::Done;
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.drop_conn(key);
                    return ReadOutcome::Done;
                }
                Err(e) => {
                    let code = match &e {
                        tungstenite::Error::Capacity(_) => Some((1009, "message too big")),
                        tungstenite::Error::Utf8(_) => Some((1007, "invalid UTF-8")),
                        tungstenite::Error::Protocol(_) => Some((1002, "protocol error")),
                        _ => None,
                    };
                    debug!("shard: read from {}: {e}", c.peer);
                    match code {
                        Some((code, reason)) if c.phase == Phase::Open => {
                            self.start_close(ConnToken(key), code, reason, true);
                        }
                        _ => self.drop_conn(key),
                    }
                    return ReadOutcome::Done;
                }
            }
        }
    }

    /// A broken connection after its close frame went out: discard input until EOF.
    fn drain_raw(&mut self, key: usize) -> ReadOutcome {
        let Some(c) = self.conns.get_mut(key) else {
            return ReadOutcome::Done;
        };
        if !c.close_sent || c.write_blocked {
            // Keep the bytes until the close frame is out; reading now could only reset.
            c.wants_read = false;
            return ReadOutcome::Done;
        }
        let mut scratch = [0u8; 4096];
        loop {
            match c.ws.get_mut().read(&mut scratch) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.wants_read = false;
                    return ReadOutcome::Done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.drop_conn(key);
        ReadOutcome::Done
    }

    /// Writes and flushes every connection with output, once each.
    pub fn flush_all(&mut self) {
        // Swap with the spare so that connections listed during the flush wait for the next
        // one, and neither list allocates once grown.
        let mut list = std::mem::take(&mut self.flush_spare);
        std::mem::swap(&mut list, &mut self.flush_list);
        for key in list.drain(..) {
            if let Some(c) = self.conns.get_mut(key) {
                c.in_flush_list = false;
                self.pump(key);
                self.check_backlog(key);
            }
        }
        self.flush_spare = list;
    }

    /// Moves queued frames into tungstenite and flushes, until done or `WouldBlock`.
    fn pump(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let was_blocked = c.write_blocked;
        let mut blocked = false;
        let mut dead = false;
        // Whatever tungstenite already holds goes first.
        match c.ws.flush() {
            Ok(()) => {}
            Err(e) if would_block(&e) => blocked = true,
            Err(_) => dead = true,
        }
        while !blocked && !dead {
            let Some(message) = c.out.pop_front() else {
                break;
            };
            c.out_bytes -= message.len();
            match c.ws.write(message) {
                Ok(()) => {}
                // The frame sits in tungstenite's buffer: it is sent, never resend it.
                Err(e) if would_block(&e) => blocked = true,
                Err(tungstenite::Error::WriteBufferFull(message)) => {
                    c.out_bytes += message.len();
                    c.out.push_front(*message);
                    blocked = true;
                }
                Err(_) => dead = true,
            }
        }
        if !blocked && !dead {
            let result = match c.pending_close.take() {
                Some(frame) => {
                    c.close_sent = true;
                    c.ws.close(Some(frame))
                }
                None => c.ws.flush(),
            };
            match result {
                Ok(()) => {}
                Err(e) if would_block(&e) => blocked = true,
                // A server's close completes with ConnectionClosed once both closes passed.
                Err(_) => dead = true,
            }
        }
        if dead {
            self.drop_conn(key);
            return;
        }
        c.write_blocked = blocked;
        if blocked != was_blocked {
            let interest = if blocked {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if let Err(e) = self
                .registry
                .reregister(c.ws.get_mut(), Token(key), interest)
            {
                warn!("shard: reregister {}: {e}", c.peer);
                self.drop_conn(key);
                return;
            }
        }
        if !blocked {
            if let Phase::Closing { broken: true, .. } = c.phase {
                if c.close_sent {
                    let _ = c.ws.get_mut().shutdown(Shutdown::Write);
                    self.push_read(key);
                    return;
                }
            }
            if c.wants_read && !c.in_read_list {
                // Output drained: resume the reads paused for backpressure.
                self.push_read(key);
            }
        }
    }

    /// Pings silent connections, drops dead ones and closing ones past their deadline.
    pub fn check_timers(&mut self, now: Instant) {
        let idle = self.limits.idle_timeout;
        let mut expired = Vec::new();
        let mut to_ping = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            match c.phase {
                Phase::Closing { deadline, .. } if now >= deadline => expired.push(key),
                Phase::Closing { .. } => {}
                Phase::Open => {
                    let silent = now.saturating_duration_since(c.last_heard);
                    if silent >= idle * 2 {
                        expired.push(key);
                    } else if silent >= idle && !c.ping_outstanding {
                        c.ping_outstanding = true;
                        to_ping.push(key);
                    }
                }
            }
        }
        for key in expired {
            self.drop_conn(key);
        }
        for key in to_ping {
            self.send_message(ConnToken(key), Message::Ping(Default::default()));
        }
    }
}

impl Net {
    /// Sets the kernel send buffer of `conn` (`SO_SNDBUF`); the echo example uses a small one
    /// to force partial writes.
    ///
    /// # Errors
    /// When the connection is gone or `setsockopt` fails.
    pub fn set_send_buffer_bytes(&mut self, conn: ConnToken, bytes: usize) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let c = self
            .conns
            .get_mut(conn.0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let fd = c.ws.get_ref().as_raw_fd();
        let value = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `fd` is an open socket owned by this connection; the option value is a
        // c_int that outlives the call, and its size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
