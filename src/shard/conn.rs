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
//!   list for the next turn; frames the handler never sees (pings, pongs, messages discarded
//!   while closing, and the raw bytes drained after a protocol error) have a budget of their own
//!   per read, or a peer streaming them would hold the shard in one connection's read forever;
//! - data frames (text, and binary for the echo example) are written by this module, not by
//!   tungstenite: one `sendmsg` per connection per turn takes a header (built on the stack) and
//!   the frame's shared bytes for each queued frame, so a fan-out copies nothing per recipient
//!   and no connection keeps a write buffer; a frame cut short by `WouldBlock` is finished
//!   before anything else touches the socket (tungstenite writes only control frames: pongs,
//!   pings, closes, and only between whole data frames);
//! - a frame given to tungstenite is queued even when `write` reports `WouldBlock`: never resend;
//! - every write is followed by a flush, once per connection per turn;
//! - when a flush hits `WouldBlock`, register WRITABLE, stop reading the connection, and resume
//!   reads when its output drained;
//! - on a protocol error the queued frames go out before the close frame;
//! - a client's Close is answered with a Close.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use crate::acceptor::DoorRelease;
use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;
use crate::sim::socket::SimSocket;

use super::log_limit::LogLimit;
use super::transport::ShardWs;

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
    ws: ShardWs,
    peer: SocketAddr,
    /// Data frames not yet fully written: filled by [`Net::send`] and [`Net::send_binary`],
    /// drained by the flush. They share their bytes with every other recipient. Released after
    /// a timer tick with nothing queued (see `out_used`), so an idle connection holds no queue.
    out: VecDeque<OutFrame>,
    /// Bytes (header and payload) of `out`'s front frame already written to the socket. While
    /// non-zero nothing else may write to the socket: no tungstenite call, no read (a read can
    /// answer a ping).
    front_sent: usize,
    /// Payload bytes in `out`; bounded by [`NetLimits::outbound_bytes_max`].
    out_bytes: usize,
    /// Whether a frame was queued since the last timer tick; a queue unused for a whole tick
    /// gives its memory back.
    out_used: bool,
    /// An idle ping to give tungstenite at the next flush.
    ping_due: bool,
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

// Every connection pays for a `Conn` in the slab, idle or not (docs/benchmarks.md, "Connection
// density and hot path"); 440 bytes today, of which tungstenite's `WebSocket` is 272.
const _: () = assert!(std::mem::size_of::<Conn>() <= 448);

/// A data frame in a connection's queue; its payload is shared with every other recipient.
#[derive(Clone, Debug)]
enum OutFrame {
    /// A text frame (opcode 1): the collaboration protocol's only kind.
    Text(Utf8Bytes),
    /// A binary frame (opcode 2): the echo example's; the room host never sends one.
    Binary(Bytes),
}

impl OutFrame {
    /// The payload bytes.
    fn payload(&self) -> &[u8] {
        match self {
            OutFrame::Text(text) => text.as_bytes(),
            OutFrame::Binary(bytes) => bytes,
        }
    }

    /// Payload length in bytes.
    fn len(&self) -> usize {
        self.payload().len()
    }

    /// The frame's opcode (RFC 6455 section 5.2).
    fn opcode(&self) -> u8 {
        match self {
            OutFrame::Text(_) => 0x1,
            OutFrame::Binary(_) => 0x2,
        }
    }
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
    /// Warnings for connections refused at [`NetLimits::conns_max`]: one line a second.
    full_log: LogLimit,
    /// Warnings for slow consumers closed with 1013: one line a second.
    slow_log: LogLimit,
    /// Where connections that end are reported, when the acceptor's door counts them per
    /// address: every connection inserted is reported once, when it leaves the slab.
    door: Option<DoorRelease>,
    /// The shard's metrics, shared with the handler.
    pub metrics: ShardMetrics,
    /// The time of this turn, set by the loop from its clock ([`Net::set_now`]); every
    /// deadline and timestamp of the connection layer (and of the handler) is taken from it.
    now: Instant,
}

impl Drop for Net {
    /// Connections still held when the shard exits (a shard whose handler panicked lingers at
    /// most `SHUTDOWN_LINGER`) end here: the door must not count them forever.
    fn drop(&mut self) {
        if let Some(door) = &self.door {
            for (_, c) in self.conns.iter() {
                door.release(c.peer);
            }
        }
    }
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
            full_log: LogLimit::per_second(),
            slow_log: LogLimit::per_second(),
            door: None,
            metrics,
            now: Instant::now(),
        }
    }

    /// The time of this turn (see [`Net::set_now`]).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Sets the time of this turn: the loop reads its clock once per turn (the simulator sets
    /// its own), and nothing in the shard reads the system clock for a decision.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// Reports every connection inserted from now on to the acceptor's door when it ends.
    pub fn set_door(&mut self, door: DoorRelease) {
        self.door = Some(door);
    }

    /// A connection handed to this shard that never entered the slab (dropped at shutdown)
    /// ended: tell the door.
    pub fn release_unserved(&self, peer: SocketAddr) {
        if let Some(door) = &self.door {
            door.release(peer);
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &NetLimits {
        &self.limits
    }

    /// The shard's `Poll` registry, for sockets the handler keeps itself (event streams).
    pub fn registry(&self) -> &Registry {
        &self.registry
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

    /// Bytes queued for `conn` behind the frame it is receiving: what
    /// [`NetLimits::outbound_bytes_max`] bounds after every flush. `None` when it is not open.
    pub fn backlog_bytes(&self, conn: ConnToken) -> Option<usize> {
        let c = self.conns.get(conn.0).filter(|c| c.phase == Phase::Open)?;
        let front_bytes = c.out.front().map_or(0, OutFrame::len);
        Some(c.out_bytes.saturating_sub(front_bytes))
    }

    /// Whether some connection has unread input left over from its budget.
    pub fn has_pending_reads(&self) -> bool {
        !self.read_list.is_empty()
    }

    /// Takes a new WebSocket. Past the connection limit it is closed with 1013 at once and
    /// `None` is returned.
    pub fn insert(
        &mut self,
        ws: WebSocket<TcpStream>,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnToken> {
        self.insert_ws(ShardWs::Tcp(ws), peer, now)
    }

    /// Like [`Net::insert`], for a simulated connection ([`crate::sim`]).
    pub fn insert_sim(
        &mut self,
        ws: WebSocket<SimSocket>,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnToken> {
        self.insert_ws(ShardWs::Sim(ws), peer, now)
    }

    fn insert_ws(&mut self, mut ws: ShardWs, peer: SocketAddr, now: Instant) -> Option<ConnToken> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = ws.register(&self.registry, Token(key), Interest::READABLE) {
            warn!("shard: register {peer}: {e}");
            self.release_unserved(peer);
            return None;
        }
        entry.insert(Conn {
            ws,
            peer,
            out: VecDeque::new(),
            front_sent: 0,
            out_bytes: 0,
            out_used: false,
            ping_due: false,
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
            debug!(
                "shard: {} connections, refusing {peer}",
                self.limits.conns_max
            );
            // A connection flood must not flood the log too.
            if let Some(n) = self.full_log.hit(now) {
                warn!(
                    "shard: at the limit of {} connections; refused {n} new one(s) with 1013, the last from {peer}",
                    self.limits.conns_max
                );
            }
            self.close_quietly(conn, 1013, "server full, try again later");
            return None;
        }
        Some(conn)
    }

    /// Queues a text frame for `conn`, to be written at the end of the turn. A connection
    /// left with more than [`NetLimits::outbound_bytes_max`] queued after the turn's flush is
    /// closed with 1013.
    pub fn send(&mut self, conn: ConnToken, frame: Utf8Bytes) {
        self.queue(conn, OutFrame::Text(frame));
    }

    /// Queues a binary frame for `conn`, like [`Net::send`]. The collaboration protocol has no
    /// binary messages; this is the echo example's (and the conformance run's) path.
    pub fn send_binary(&mut self, conn: ConnToken, payload: Bytes) {
        self.queue(conn, OutFrame::Binary(payload));
    }

    fn queue(&mut self, conn: ConnToken, frame: OutFrame) {
        let Some(c) = self.conns.get_mut(conn.0) else {
            return;
        };
        if c.phase != Phase::Open {
            return;
        }
        let len = frame.len();
        c.out_bytes += len;
        c.out_used = true;
        c.out.push_back(frame);
        self.metrics.figures.counters.bytes_out += len as u64;
        self.push_flush(conn.0);
    }

    /// After a flush: a connection that still has more than [`NetLimits::outbound_bytes_max`]
    /// queued behind the frame it is receiving is too slow; it is closed with 1013 and its queue
    /// dropped (it reconnects with `since`). Checked after writing, so one turn's burst to a
    /// reader that keeps up is fine, and the front frame does not count: one frame alone (a
    /// `hello_ack` with a snapshot larger than the limit, which a small send buffer takes in
    /// many turns) never counts as falling behind.
    fn check_backlog(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let front_bytes = c.out.front().map_or(0, |frame| frame.len());
        let behind_bytes = c.out_bytes.saturating_sub(front_bytes);
        if c.phase != Phase::Open || behind_bytes <= self.limits.outbound_bytes_max {
            return;
        }
        self.metrics.figures.counters.slow_consumer_drops += 1;
        debug!(
            "shard: {} fell {} bytes behind; closing 1013",
            c.peer, c.out_bytes
        );
        // Many readers can fall behind at once (a fan-out storm): one line a second.
        if let Some(n) = self.slow_log.hit(self.now) {
            warn!(
                "shard: closed {n} slow consumer(s) with 1013 (over {} bytes queued), the last {} with {} bytes",
                self.limits.outbound_bytes_max, c.peer, c.out_bytes
            );
        }
        c.drop_queue();
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
                deadline: self.now + self.limits.close_linger,
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
            deadline: self.now + self.limits.close_linger,
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
            c.ws.deregister(&self.registry);
            if c.phase == Phase::Open {
                self.gone.push(ConnToken(key));
            }
            self.metrics.figures.counters.conns -= 1;
            self.release_unserved(c.peer);
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
        self.on_ready(
            key,
            event.is_readable() || event.is_read_closed() || event.is_error(),
            event.is_writable() || event.is_write_closed() || event.is_error(),
        );
    }

    /// Records readiness for the connection with slab key `key`: `readable` (input, end of
    /// input or an error) lists it for reading, `writable` for flushing. The simulator reports
    /// its sockets' readiness through this.
    pub fn on_ready(&mut self, key: usize, readable: bool, writable: bool) {
        if readable {
            self.push_read(key);
        }
        if writable {
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

    /// Reads until a message for the handler arrives or nothing more can be read now. At most
    /// [`NetLimits::reads_per_turn_max`] frames the handler does not see (pings, pongs, messages
    /// discarded while closing) are read per call; past that the connection waits for the next
    /// turn on the read list, so a turn reads at most the square of that budget from one
    /// connection (4,096 frames by default).
    pub fn read_one(&mut self, key: usize) -> ReadOutcome {
        let mut n_unseen = 0;
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return ReadOutcome::Done;
            };
            if !c.wants_read {
                return ReadOutcome::Done;
            }
            if c.front_sent > 0 {
                // A data frame is half written: tungstenite must not answer a ping now (it
                // would write into the middle of it). Reads resume once it is out (see `pump`).
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
            if n_unseen == self.limits.reads_per_turn_max {
                // Like messages past the budget, the rest waits for the next turn, so that the
                // other connections (and the timers) get theirs.
                self.push_read(key);
                return ReadOutcome::Done;
            }
            n_unseen += 1;
            match c.ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                    c.last_heard = self.now;
                    if c.phase == Phase::Open {
                        self.metrics.figures.counters.bytes_in += message.len() as u64;
                        return ReadOutcome::Message(message);
                    }
                }
                Ok(Message::Ping(_)) => {
                    // tungstenite queued the pong; make sure it goes out this turn.
                    c.last_heard = self.now;
                    self.push_flush(key);
                }
                Ok(Message::Pong(_)) => {
                    c.last_heard = self.now;
                    c.ping_outstanding = false;
                }
                Ok(Message::Close(_)) => {
                    // tungstenite queued the answering Close; flush it, then the next read
                    // reports the end.
                    let conn = ConnToken(key);
                    if c.phase == Phase::Open {
                        c.phase = Phase::Closing {
                            deadline: self.now + self.limits.close_linger,
                            broken: false,
                        };
                        c.drop_queue();
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
        for _ in 0..self.limits.reads_per_turn_max {
            match c.ws.read_raw(&mut scratch) {
                Ok(0) => {
                    self.drop_conn(key);
                    return ReadOutcome::Done;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.wants_read = false;
                    return ReadOutcome::Done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(key);
                    return ReadOutcome::Done;
                }
            }
        }
        // A peer that keeps sending gets one budget of reads per turn, not the shard.
        self.push_read(key);
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

    /// Writes what the connection has queued (tungstenite's control frames, the data frames, then
    /// a pending close frame), until done or `WouldBlock`.
    fn pump(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let was_blocked = c.write_blocked;
        let (blocked, dead) = match c.write_out() {
            Pumped::Drained => (false, false),
            Pumped::Blocked => (true, false),
            Pumped::Dead => (false, true),
        };
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
            if let Err(e) = c.ws.reregister(&self.registry, Token(key), interest) {
                warn!("shard: reregister {}: {e}", c.peer);
                self.drop_conn(key);
                return;
            }
        }
        if !blocked {
            if let Phase::Closing { broken: true, .. } = c.phase {
                if c.close_sent {
                    c.ws.shutdown_write();
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
                    if !c.out_used && c.out.is_empty() && c.out.capacity() > 0 {
                        // Nothing queued for a whole tick: give the queue's memory back, so
                        // that idle connections hold none while busy ones keep theirs.
                        c.out = VecDeque::new();
                    }
                    c.out_used = false;
                }
            }
        }
        for key in expired {
            self.drop_conn(key);
        }
        for key in to_ping {
            if let Some(c) = self.conns.get_mut(key) {
                c.ping_due = true;
                self.push_flush(key);
            }
        }
    }
}

/// What writing a connection's output came to.
enum Pumped {
    /// Everything queued is written.
    Drained,
    /// The socket would block; WRITABLE readiness resumes it.
    Blocked,
    /// The connection failed or finished its close: drop it.
    Dead,
}

impl Conn {
    /// Writes, in order: the rest of a half-written data frame, what tungstenite holds (pongs,
    /// a close reply), a due ping, the queued data frames, and a pending close frame.
    fn write_out(&mut self) -> Pumped {
        // Nothing may reach the socket before the end of a frame already started.
        if self.front_sent > 0 {
            match self.write_frames() {
                Ok(true) => {}
                Ok(false) => return Pumped::Blocked,
                Err(_) => return Pumped::Dead,
            }
        }
        match self.ws.flush() {
            Ok(()) => {}
            Err(e) if would_block(&e) => return Pumped::Blocked,
            Err(_) => return Pumped::Dead,
        }
        if self.ping_due && self.pending_close.is_none() && !self.close_sent {
            self.ping_due = false;
            // A blocked ping stays in tungstenite's buffer and goes out with the next flush.
            match self.ws.write(Message::Ping(Default::default())) {
                Ok(()) => {}
                Err(e) if would_block(&e) => return Pumped::Blocked,
                Err(_) => return Pumped::Dead,
            }
            match self.ws.flush() {
                Ok(()) => {}
                Err(e) if would_block(&e) => return Pumped::Blocked,
                Err(_) => return Pumped::Dead,
            }
        }
        match self.write_frames() {
            Ok(true) => {}
            Ok(false) => return Pumped::Blocked,
            Err(_) => return Pumped::Dead,
        }
        if let Some(frame) = self.pending_close.take() {
            self.close_sent = true;
            match self.ws.close(Some(frame)) {
                Ok(()) => {}
                Err(e) if would_block(&e) => return Pumped::Blocked,
                // A server's close completes with ConnectionClosed once both closes passed.
                Err(_) => return Pumped::Dead,
            }
        }
        Pumped::Drained
    }

    /// Writes the queued data frames straight to the socket; see [`write_data_frames`].
    fn write_frames(&mut self) -> io::Result<bool> {
        write_data_frames(
            &mut self.ws.raw(),
            &mut self.out,
            &mut self.front_sent,
            &mut self.out_bytes,
        )
    }

    /// Forgets the queued frames, except one already half written (its end must still go out
    /// before a close frame can).
    fn drop_queue(&mut self) {
        let started = if self.front_sent > 0 {
            self.out.pop_front()
        } else {
            None
        };
        self.out.clear();
        self.out_bytes = 0;
        if let Some(frame) = started {
            self.out_bytes = frame.len();
            self.out.push_front(frame);
        }
    }
}

/// Longest header of an unmasked server frame: 2 bytes, plus 8 for a 64-bit length.
const FRAME_HEADER_BYTES_MAX: usize = 10;

/// Frames handed to one `sendmsg` call (two slices each: header and payload).
const FRAMES_PER_WRITE_MAX: usize = 32;
// Linux takes at most IOV_MAX (1024) slices per call.
const _: () = assert!(2 * FRAMES_PER_WRITE_MAX <= 1024);

/// Writes the header of an unmasked, final data frame with `opcode` and a payload of `len`
/// bytes into `header` (RFC 6455 section 5.2) and returns its length.
fn frame_header(opcode: u8, len: usize, header: &mut [u8; FRAME_HEADER_BYTES_MAX]) -> usize {
    debug_assert!(opcode == 0x1 || opcode == 0x2, "a data opcode");
    header[0] = 0x80 | opcode; // FIN
    if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Frame bytes (header and payload) of a data frame with a payload of `len` bytes.
fn frame_bytes(len: usize) -> usize {
    frame_header(0x1, len, &mut [0; FRAME_HEADER_BYTES_MAX]) + len
}

/// Writes `out`'s data frames to `socket` with vectored writes (no copy of any payload) until
/// the queue is empty (`Ok(true)`) or the socket would block (`Ok(false)`). `front_sent` counts
/// the bytes of the front frame already written, across calls; `out_bytes` drops by each
/// frame's payload once it is fully written.
///
/// # Errors
/// A failed or zero-length write: the connection is broken.
fn write_data_frames<W: Write>(
    socket: &mut W,
    out: &mut VecDeque<OutFrame>,
    front_sent: &mut usize,
    out_bytes: &mut usize,
) -> io::Result<bool> {
    loop {
        if out.is_empty() {
            debug_assert_eq!(*front_sent, 0, "no frame is half written");
            return Ok(true);
        }
        let n_frames = out.len().min(FRAMES_PER_WRITE_MAX);
        let mut headers = [[0u8; FRAME_HEADER_BYTES_MAX]; FRAMES_PER_WRITE_MAX];
        let mut header_lens = [0usize; FRAMES_PER_WRITE_MAX];
        for (frame_idx, frame) in out.iter().take(n_frames).enumerate() {
            header_lens[frame_idx] =
                frame_header(frame.opcode(), frame.len(), &mut headers[frame_idx]);
        }
        let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE_MAX];
        let mut n_slices = 0;
        let mut skip = *front_sent;
        for (frame_idx, frame) in out.iter().take(n_frames).enumerate() {
            let header = &headers[frame_idx][..header_lens[frame_idx]];
            for part in [header, frame.payload()] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[n_slices] = IoSlice::new(&part[skip..]);
                n_slices += 1;
                skip = 0;
            }
        }
        let mut n_written = match socket.write_vectored(&slices[..n_slices]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        while n_written > 0 {
            let Some(front) = out.front() else {
                break;
            };
            let left = frame_bytes(front.len()) - *front_sent;
            if n_written < left {
                *front_sent += n_written;
                break;
            }
            n_written -= left;
            *front_sent = 0;
            *out_bytes -= front.len();
            out.pop_front();
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
        let fd =
            c.ws.tcp()
                .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?
                .as_raw_fd();
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;
    use tungstenite::protocol::Role;

    /// A socket that takes at most `grants[i]` bytes on the i-th write, `WouldBlock` on a
    /// zero grant, and everything once the grants run out.
    struct Stingy {
        written: Vec<u8>,
        grants: Vec<usize>,
        n_writes: usize,
    }

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let grant = self
                .grants
                .get(self.n_writes)
                .copied()
                .unwrap_or(usize::MAX);
            self.n_writes += 1;
            if grant == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(grant - n);
                self.written.extend_from_slice(&buf[..take]);
                n += take;
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The data messages a client reads from `bytes`.
    fn client_reads(bytes: Vec<u8>) -> Vec<Message> {
        let mut ws = WebSocket::from_raw_socket(Cursor::new(bytes), Role::Client, None);
        let mut got = Vec::new();
        loop {
            match ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => got.push(message),
                Ok(other) => panic!("unexpected {other:?}"),
                // The end of the bytes, between two frames.
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )) => return got,
                Err(e) => panic!("bad stream: {e}"),
            }
        }
    }

    /// The message a client reads for `frame`.
    fn as_message(frame: &OutFrame) -> Message {
        match frame {
            OutFrame::Text(text) => Message::Text(text.clone()),
            OutFrame::Binary(bytes) => Message::Binary(bytes.clone()),
        }
    }

    /// Writes `frames` through a socket granting `grants`, retrying after each `WouldBlock`
    /// as readiness would, and checks the client reads exactly `frames`, each with its kind.
    fn check(frames: &[OutFrame], grants: Vec<usize>) {
        let mut out: VecDeque<OutFrame> = frames.iter().cloned().collect();
        let mut out_bytes: usize = frames.iter().map(OutFrame::len).sum();
        let mut front_sent = 0;
        let mut socket = Stingy {
            written: Vec::new(),
            grants,
            n_writes: 0,
        };
        let mut n_calls = 0;
        while !write_data_frames(&mut socket, &mut out, &mut front_sent, &mut out_bytes)
            .expect("the socket never fails")
        {
            n_calls += 1;
            assert!(n_calls < 10_000, "no progress");
        }
        assert_eq!(out_bytes, 0);
        assert_eq!(front_sent, 0);
        let expected: Vec<Message> = frames.iter().map(as_message).collect();
        assert_eq!(client_reads(socket.written), expected);
    }

    /// Frame `i` of a test queue: text for even `i`, binary (bytes that are not UTF-8) for odd.
    fn frame(i: usize, len: usize) -> OutFrame {
        if i % 2 == 0 {
            let text = char::from(b'a' + (i % 26) as u8).to_string().repeat(len);
            OutFrame::Text(text.into())
        } else {
            OutFrame::Binary(Bytes::from(vec![0xff - (i % 8) as u8; len]))
        }
    }

    #[test]
    fn header_lengths_at_the_boundaries() {
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            for opcode in [0x1, 0x2] {
                let mut header = [0; FRAME_HEADER_BYTES_MAX];
                assert_eq!(frame_header(opcode, len, &mut header), header_len, "{len}");
                assert_eq!(header[0], 0x80 | opcode, "FIN and the opcode");
            }
        }
    }

    #[test]
    fn frames_of_every_header_size_survive_partial_writes() {
        let frames: Vec<OutFrame> = [0, 1, 125, 126, 65_535, 65_536, 1 << 20]
            .iter()
            .enumerate()
            .flat_map(|(i, &len)| [frame(2 * i, len), frame(2 * i + 1, len)])
            .collect();
        check(&frames, vec![]);
        check(&frames, vec![1, 0, 3, 0, 1, 127, 0, 9, 65_537, 0, 2, 5]);
    }

    #[test]
    fn more_frames_than_one_write_takes() {
        let frames: Vec<OutFrame> = (0..FRAMES_PER_WRITE_MAX * 3 + 1)
            .map(|i| OutFrame::Text(format!("{{\"n\":{i}}}").into()))
            .collect();
        check(&frames, vec![0, 7, 0, 300, 1]);
    }

    proptest! {
        #[test]
        fn any_frames_any_write_sizes(
            lens in proptest::collection::vec(0usize..70_000, 0..12),
            grants in proptest::collection::vec(0usize..200_000, 0..40),
        ) {
            let frames: Vec<OutFrame> =
                lens.iter().enumerate().map(|(i, &len)| frame(i, len)).collect();
            check(&frames, grants);
        }
    }
}
