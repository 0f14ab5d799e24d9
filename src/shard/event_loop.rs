//! One shard's event loop: a mio `Poll`, the handoff inbox, the connection layer ([`Net`])
//! and a message [`Handler`] (the room host, or the echo example).
//!
//! A turn: wait for readiness -> take new connections -> read each ready connection within
//! its budget, handing messages to the handler -> `Handler::end_turn` (the room host takes its
//! storage worker's completions, releases the frames they made durable and hands this turn's
//! records to the worker) -> one write + flush per connection with output -> timers.
//! The waker token means the inbox or the storage worker has something; `end_turn` runs
//! every turn, so a completion is acted on in the turn it wakes.
//! The loop never blocks on a socket and takes no lock.
//!
//! The phases are methods of [`Shard`], which [`run`] drives from a mio `Poll` and the system
//! [`Clock`], and the simulator ([`crate::sim`]) from simulated sockets and a simulated clock:
//! the same code either way. Every phase ends by telling the handler which connections stopped
//! being open in it, so a connection's slab key is never reused before the handler forgot it.
//!
//! A panic in the handler is a bug, but it must not take the shard's clients down silently:
//! every handler call runs under `catch_unwind`; after a panic the handler is never called
//! again (its state may be half-updated, and the frames it still holds for the turn are never
//! released), every connection is closed with 1011 after what was already queued for it, the
//! shard is marked dead so the acceptor stops routing to it, and the thread exits once its
//! clients are gone (or after [`SHUTDOWN_LINGER`]).

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, error, warn};
use mio::{Events, Poll, Token};
use tungstenite::Message;

use crate::acceptor::handoff::{Handoff, ShardAlive, ShardMsg};
use crate::auth::Rule;
use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;

use super::conn::{Net, NetLimits, ReadOutcome};

/// The token of the shard's `mio::Waker` (connections use their slab keys).
pub const WAKER_TOKEN: Token = Token(usize::MAX);

/// Tokens at or above this belong to the handler's own sockets (the document API's event
/// streams), not to the connection layer.
pub const STREAM_TOKEN_BASE: usize = usize::MAX / 2;

/// How often timers run (idle pings, close deadlines, document unloading).
const TICK: Duration = Duration::from_millis(250);

/// Longest a shutdown waits for clients to finish their close handshakes.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(3);

/// A turn longer than this is logged.
const TURN_BUDGET: Duration = Duration::from_millis(50);

/// What a shard does with messages; the connection layer does everything else.
pub trait Handler {
    /// A connection arrived from the acceptor (it is registered and will be read at once).
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, handoff: OpenInfo);
    /// A text or binary message from an open connection.
    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message);
    /// The connection stopped being open (closed by either side, broken, or dropped);
    /// nothing more may be sent to it. Called once per connection.
    fn on_closed(&mut self, net: &mut Net, conn: ConnToken);
    /// Every message of the turn was handled: release what is ready (after the group commit).
    fn end_turn(&mut self, net: &mut Net);
    /// Runs about every 250 ms.
    fn on_tick(&mut self, _net: &mut Net, _now: Instant) {}
    /// A document API request (`crate::api`); the default answers 503 (a handler without
    /// documents, the echo example).
    fn on_api(&mut self, _net: &mut Net, request: Box<crate::api::ApiRequest>) {
        let answer = crate::api::json_error(503, "this server has no document API");
        request.reply.answer(answer);
    }
    /// A readiness event for one of the handler's own sockets (token at or above
    /// [`STREAM_TOKEN_BASE`]).
    fn on_stream(&mut self, _net: &mut Net, _token: Token) {}
    /// A revocation is in force: close the live connections it matches; returns how many.
    fn on_revoke(&mut self, _net: &mut Net, _rule: &Rule) -> usize {
        0
    }
    /// Cluster mode: the leases of `docs` (`None`: of every document) are lost; drop those
    /// documents and close their clients with 1013.
    fn on_leases_lost(&mut self, _net: &mut Net, _docs: Option<&[String]>) {}
    /// The server is shutting down: release what can still be released (the room host waits,
    /// a bounded time, for its storage worker's last answers); every connection is closed
    /// with 1001 right after.
    fn on_shutdown(&mut self, net: &mut Net) {
        self.end_turn(net);
    }
}

/// A borrowed handler is a handler ([`run`] borrows the caller's).
impl<H: Handler + ?Sized> Handler for &mut H {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, handoff: OpenInfo) {
        (**self).on_open(net, conn, handoff);
    }
    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
        (**self).on_message(net, conn, message);
    }
    fn on_closed(&mut self, net: &mut Net, conn: ConnToken) {
        (**self).on_closed(net, conn);
    }
    fn end_turn(&mut self, net: &mut Net) {
        (**self).end_turn(net);
    }
    fn on_tick(&mut self, net: &mut Net, now: Instant) {
        (**self).on_tick(net, now);
    }
    fn on_revoke(&mut self, net: &mut Net, rule: &Rule) -> usize {
        (**self).on_revoke(net, rule)
    }
    fn on_shutdown(&mut self, net: &mut Net) {
        (**self).on_shutdown(net);
    }
    fn on_api(&mut self, net: &mut Net, request: Box<crate::api::ApiRequest>) {
        (**self).on_api(net, request);
    }
    fn on_stream(&mut self, net: &mut Net, token: Token) {
        (**self).on_stream(net, token);
    }
    fn on_leases_lost(&mut self, net: &mut Net, docs: Option<&[String]>) {
        (**self).on_leases_lost(net, docs);
    }
}

/// What the acceptor learned about a connection besides its socket.
#[derive(Debug)]
pub struct OpenInfo {
    /// The document, from the path or the first hello.
    pub doc: Option<String>,
    /// The first hello, read by the acceptor on plain `/ws`.
    pub hello: Option<crate::protocol::Hello>,
    /// The token the acceptor verified, with access control on.
    pub admitted: Option<Box<crate::acceptor::handoff::Admitted>>,
}

/// The close code and reason every client of a shard gets when its handler panicked.
const PANIC_CLOSE: (u16, &str) = (1011, "internal error");

/// The handler behind `catch_unwind`: after its first panic it is never called again.
struct Guarded<H> {
    handler: H,
    alive: ShardAlive,
    /// The message of the panic, once there was one.
    panic: Option<String>,
}

impl<H: Handler> Guarded<H> {
    /// Runs one handler call. On a panic: logs it, marks the shard dead (the acceptor stops
    /// routing to it) and closes every connection with 1011 after what is already queued.
    fn call(&mut self, net: &mut Net, f: impl FnOnce(&mut H, &mut Net)) {
        if self.panic.is_some() {
            return;
        }
        let handler = &mut self.handler;
        let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(handler, &mut *net))) else {
            return;
        };
        let message = panic_message(payload.as_ref());
        self.alive.mark_dead();
        error!(
            "shard: the handler panicked ({message}); closing its {} connections with 1011 and serving no new ones",
            net.len()
        );
        net.close_all(PANIC_CLOSE.0, PANIC_CLOSE.1);
        self.panic = Some(message);
    }

    fn panicked(&self) -> bool {
        self.panic.is_some()
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string payload".to_owned()
    }
}

/// Where a clock-driven caller gets the time of each turn: the system clock for the server,
/// a simulated one for [`crate::sim`]. The shard reads it once per turn ([`Net::set_now`]).
pub trait Clock {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// One shard between two polls: its connections, its handler behind `catch_unwind`, and its
/// timers. A turn is a fixed sequence of named phases, each ending with the handler told of
/// every connection that stopped being open in it (so no slab key is reused before the
/// handler forgot it): [`Shard::begin_turn`] (the turn's time), [`Shard::inbox_phase`] (new
/// connections and messages of the acceptor; or [`Shard::open`] for one connection),
/// [`Shard::read_phase`], [`Shard::end_turn_phase`], [`Shard::flush_phase`] and
/// [`Shard::timer_phase`]. [`run`] drives it from a mio `Poll` and the system clock; the
/// simulator drives the same phases from simulated sockets and a simulated clock.
pub struct Shard<H> {
    net: Net,
    handler: Guarded<H>,
    next_tick: Instant,
    read_list: Vec<usize>,
    /// Set once a shutdown started (or the handler panicked): the shard exits at this instant
    /// or once its connections are gone.
    shutdown_deadline: Option<Instant>,
}

impl<H: Handler> Shard<H> {
    /// A shard serving `net`'s connections with `handler`; `alive` is cleared if it panics.
    /// `now` starts the timers.
    pub fn new(mut net: Net, handler: H, alive: ShardAlive, now: Instant) -> Shard<H> {
        net.set_now(now);
        Shard {
            net,
            handler: Guarded {
                handler,
                alive,
                panic: None,
            },
            next_tick: now + TICK,
            read_list: Vec::new(),
            shutdown_deadline: None,
        }
    }

    /// The connection layer.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The connection layer, to insert connections and report readiness.
    pub fn net_mut(&mut self) -> &mut Net {
        &mut self.net
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler.handler
    }

    /// The message of the handler's panic, once it panicked.
    pub fn panic_message(&self) -> Option<&str> {
        self.handler.panic.as_deref()
    }

    /// When the next timer phase is due.
    pub fn next_tick(&self) -> Instant {
        self.next_tick
    }

    /// Phase 0: the turn's time, for every deadline and timestamp of the turn.
    pub fn begin_turn(&mut self, now: Instant) {
        self.net.set_now(now);
    }

    /// Tells the handler about a connection just inserted into the net.
    pub fn open(&mut self, conn: ConnToken, info: OpenInfo) {
        self.handler
            .call(&mut self.net, |h, net| h.on_open(net, conn, info));
        // Before the next insert can reuse a slab key.
        self.tell_gone();
    }

    /// Phase 1 (when woken): every message of the acceptor queued in `inbox`.
    pub fn inbox_phase(&mut self, inbox: &Receiver<ShardMsg>) {
        self.tell_gone();
        let turn_start = self.net.now();
        loop {
            match inbox.try_recv() {
                Ok(ShardMsg::Conn(handoff)) => {
                    let Handoff {
                        ws,
                        doc,
                        hello,
                        peer,
                        admitted,
                    } = *handoff;
                    if self.handler.panicked() {
                        // Routed here before the acceptor saw the shard die.
                        if let Some(conn) = self.net.insert(ws, peer, turn_start) {
                            self.net.close(conn, PANIC_CLOSE.0, PANIC_CLOSE.1);
                            self.tell_gone();
                        }
                        continue;
                    }
                    if self.shutdown_deadline.is_some() {
                        self.net.release_unserved(peer);
                        continue; // Dropped: the server is going away.
                    }
                    if let Some(conn) = self.net.insert(ws, peer, turn_start) {
                        debug!("shard: {peer} joins as {conn:?} for {doc:?}");
                        self.open(
                            conn,
                            OpenInfo {
                                doc,
                                hello,
                                admitted,
                            },
                        );
                    }
                }
                Ok(ShardMsg::Door(release)) => self.net.set_door(release),
                Ok(ShardMsg::LeasesLost { docs }) => {
                    self.handler.call(&mut self.net, |h, net| {
                        h.on_leases_lost(net, docs.as_deref())
                    });
                    self.tell_gone();
                }
                // Dropped unanswered after a panic or during shutdown: the reply says 503.
                Ok(ShardMsg::Api(request)) if self.shutdown_deadline.is_none() => {
                    self.handler
                        .call(&mut self.net, |h, net| h.on_api(net, request));
                    self.tell_gone();
                }
                Ok(ShardMsg::Api(_)) => {}
                Ok(ShardMsg::Revoke { rule, reply }) => {
                    let mut n_closed = 0;
                    self.handler
                        .call(&mut self.net, |h, net| n_closed = h.on_revoke(net, &rule));
                    self.tell_gone();
                    // The admin worker may have given up waiting; nothing to do then.
                    let _ = reply.send(n_closed);
                }
                Ok(ShardMsg::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.shutdown(turn_start + SHUTDOWN_LINGER);
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
    }

    /// Starts a shutdown (once): the handler releases what the last turns produced, then every
    /// connection is closed with 1001; the shard exits at `deadline` or once they are gone.
    pub fn shutdown(&mut self, deadline: Instant) {
        if self.shutdown_deadline.is_none() {
            debug!("shard: shutting down with {} connections", self.net.len());
            self.shutdown_deadline = Some(deadline);
            self.handler
                .call(&mut self.net, |h, net| h.on_shutdown(net));
            self.net.close_all(1001, "server shutting down");
            self.tell_gone();
        }
    }

    /// Phase 2: reads each listed connection within its budget, handing messages to the
    /// handler; a connection whose budget ran out stays listed for the next turn.
    pub fn read_phase(&mut self) {
        self.net.take_read_list(&mut self.read_list);
        let budget = self.net.limits().reads_per_turn_max;
        let mut list = std::mem::take(&mut self.read_list);
        for key in list.drain(..) {
            let mut n_read = 0;
            loop {
                if n_read == budget {
                    self.net.requeue_read(key);
                    break;
                }
                match self.net.read_one(key) {
                    ReadOutcome::Message(message) => {
                        n_read += 1;
                        self.handler.call(&mut self.net, |h, net| {
                            h.on_message(net, ConnToken(key), message)
                        });
                    }
                    ReadOutcome::Done => break,
                }
            }
        }
        self.read_list = list;
        self.tell_gone();
    }

    /// Phase 3: the handler's end of turn (completions, group commit, releases).
    pub fn end_turn_phase(&mut self) {
        self.handler.call(&mut self.net, |h, net| h.end_turn(net));
        self.tell_gone();
    }

    /// Phase 4: one write and flush per connection with output.
    pub fn flush_phase(&mut self) {
        self.net.flush_all();
        self.tell_gone();
    }

    /// Phase 5: when a tick is due, idle pings, close deadlines and the handler's timers, then
    /// a flush of what they queued. Returns whether a tick ran.
    pub fn timer_phase(&mut self) -> bool {
        let now = self.net.now();
        if now < self.next_tick {
            return false;
        }
        self.next_tick = now + TICK;
        self.net.check_timers(now);
        self.handler
            .call(&mut self.net, |h, net| h.on_tick(net, now));
        self.tell_gone();
        self.flush_phase();
        true
    }

    /// Phases 2 to 5, the part of a turn after the inbox.
    pub fn turn(&mut self) {
        self.read_phase();
        self.end_turn_phase();
        self.flush_phase();
        self.timer_phase();
    }

    /// Tells the handler about every connection that stopped being open.
    fn tell_gone(&mut self) {
        loop {
            let gone = self.net.take_gone();
            if gone.is_empty() {
                return;
            }
            for conn in gone {
                self.handler
                    .call(&mut self.net, |h, net| h.on_closed(net, conn));
            }
        }
    }
}

/// Runs a shard until a [`ShardMsg::Shutdown`] arrives and every client closed (or
/// [`SHUTDOWN_LINGER`] passed). `alive` is cleared if the handler panics.
///
/// # Errors
/// When the `Poll` fails or the registry cannot be cloned, or after the handler panicked
/// (once the shard's clients are closed).
pub fn run<H: Handler>(
    mut poll: Poll,
    inbox: Receiver<ShardMsg>,
    handler: &mut H,
    alive: ShardAlive,
    limits: NetLimits,
    metrics: ShardMetrics,
) -> io::Result<()> {
    let clock = SystemClock;
    let net = Net::new(poll.registry().try_clone()?, limits, metrics);
    let mut shard = Shard::new(net, handler, alive, clock.now());
    let mut events = Events::with_capacity(1024);
    let mut slow_turn_warned_at = clock
        .now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(|| clock.now());
    let mut n_slow_turns = 0u64;
    loop {
        let timeout = if shard.net.has_pending_reads() {
            Duration::ZERO
        } else {
            shard.next_tick.saturating_duration_since(clock.now())
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let turn_start = clock.now();
        shard.begin_turn(turn_start);
        let mut woken = false;
        for event in events.iter() {
            match event.token() {
                WAKER_TOKEN => woken = true,
                token @ Token(key) if key >= STREAM_TOKEN_BASE => {
                    shard
                        .handler
                        .call(&mut shard.net, |h, net| h.on_stream(net, token));
                }
                Token(key) => shard.net.on_event(key, event),
            }
        }
        if woken {
            shard.inbox_phase(&inbox);
        }
        shard.read_phase();
        shard.end_turn_phase();
        shard.flush_phase();
        let now = clock.now();
        shard.begin_turn(now);
        shard.timer_phase();
        let elapsed = now.saturating_duration_since(turn_start);
        ShardMetrics::record(&mut shard.net.metrics.figures.histograms.turn_us, elapsed);
        if elapsed > TURN_BUDGET {
            n_slow_turns += 1;
            // At most one line a second, however overloaded the machine is.
            if now.saturating_duration_since(slow_turn_warned_at) >= Duration::from_secs(1) {
                let shard_idx = shard.net.metrics.shard_idx();
                let turns = if n_slow_turns == 1 { "turn" } else { "turns" };
                warn!("shard {shard_idx}: {n_slow_turns} loop {turns} over {TURN_BUDGET:?}, the last took {elapsed:?}");
                slow_turn_warned_at = now;
                n_slow_turns = 0;
            }
        }
        if shard.handler.panicked() && shard.shutdown_deadline.is_none() {
            // Linger for the 1011 close handshakes, then exit; new handoffs get 1011 meanwhile.
            shard.shutdown_deadline = Some(now + SHUTDOWN_LINGER);
        }
        if let Some(deadline) = shard.shutdown_deadline {
            if shard.net.is_empty() || now >= deadline {
                // Connections handed over after the last look at the inbox are never served;
                // the acceptor's door must not count them forever.
                while let Ok(msg) = inbox.try_recv() {
                    if let ShardMsg::Conn(handoff) = msg {
                        shard.net.release_unserved(handoff.peer);
                    }
                }
                shard.net.metrics.maybe_publish(now, true);
                debug!("shard: stopped ({} connections left)", shard.net.len());
                if let Some(message) = shard.handler.panic.take() {
                    return Err(io::Error::other(format!("the handler panicked: {message}")));
                }
                return Ok(());
            }
        }
        shard.net.metrics.maybe_publish(now, false);
    }
}
