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
struct Guarded<'h, H> {
    handler: &'h mut H,
    alive: ShardAlive,
    /// The message of the panic, once there was one.
    panic: Option<String>,
}

impl<H: Handler> Guarded<'_, H> {
    /// Runs one handler call. On a panic: logs it, marks the shard dead (the acceptor stops
    /// routing to it) and closes every connection with 1011 after what is already queued.
    fn call(&mut self, net: &mut Net, f: impl FnOnce(&mut H, &mut Net)) {
        if self.panic.is_some() {
            return;
        }
        let handler = &mut *self.handler;
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
    let mut handler = Guarded {
        handler,
        alive,
        panic: None,
    };
    let handler = &mut handler;
    let mut net = Net::new(poll.registry().try_clone()?, limits, metrics);
    let mut events = Events::with_capacity(1024);
    let mut next_tick = Instant::now() + TICK;
    let mut shutdown_deadline: Option<Instant> = None;
    let mut slow_turn_warned_at = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let mut n_slow_turns = 0u64;
    let mut read_list = Vec::new();
    loop {
        let timeout = if net.has_pending_reads() {
            Duration::ZERO
        } else {
            next_tick.saturating_duration_since(Instant::now())
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let turn_start = Instant::now();
        let mut woken = false;
        for event in events.iter() {
            match event.token() {
                WAKER_TOKEN => woken = true,
                token @ Token(key) if key >= STREAM_TOKEN_BASE => {
                    handler.call(&mut net, |h, net| h.on_stream(net, token));
                }
                Token(key) => net.on_event(key, event),
            }
        }
        if woken {
            tell_gone(handler, &mut net);
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
                        if handler.panicked() {
                            // Routed here before the acceptor saw the shard die.
                            if let Some(conn) = net.insert(ws, peer, turn_start) {
                                net.close(conn, PANIC_CLOSE.0, PANIC_CLOSE.1);
                                tell_gone(handler, &mut net);
                            }
                            continue;
                        }
                        if shutdown_deadline.is_some() {
                            net.release_unserved(peer);
                            continue; // Dropped: the server is going away.
                        }
                        if let Some(conn) = net.insert(ws, peer, turn_start) {
                            debug!("shard: {peer} joins as {conn:?} for {doc:?}");
                            handler.call(&mut net, |h, net| {
                                h.on_open(
                                    net,
                                    conn,
                                    OpenInfo {
                                        doc,
                                        hello,
                                        admitted,
                                    },
                                )
                            });
                            // Before the next insert can reuse a slab key.
                            tell_gone(handler, &mut net);
                        }
                    }
                    Ok(ShardMsg::Door(release)) => net.set_door(release),
                    Ok(ShardMsg::LeasesLost { docs }) => {
                        handler.call(&mut net, |h, net| h.on_leases_lost(net, docs.as_deref()));
                        tell_gone(handler, &mut net);
                    }
                    // Dropped unanswered after a panic or during shutdown: the reply says 503.
                    Ok(ShardMsg::Api(request)) if shutdown_deadline.is_none() => {
                        handler.call(&mut net, |h, net| h.on_api(net, request));
                        tell_gone(handler, &mut net);
                    }
                    Ok(ShardMsg::Api(_)) => {}
                    Ok(ShardMsg::Revoke { rule, reply }) => {
                        let mut n_closed = 0;
                        handler.call(&mut net, |h, net| n_closed = h.on_revoke(net, &rule));
                        tell_gone(handler, &mut net);
                        // The admin worker may have given up waiting; nothing to do then.
                        let _ = reply.send(n_closed);
                    }
                    Ok(ShardMsg::Shutdown) | Err(TryRecvError::Disconnected) => {
                        if shutdown_deadline.is_none() {
                            debug!("shard: shutting down with {} connections", net.len());
                            shutdown_deadline = Some(turn_start + SHUTDOWN_LINGER);
                            // Release what the last turns produced, then say goodbye.
                            handler.call(&mut net, |h, net| h.on_shutdown(net));
                            net.close_all(1001, "server shutting down");
                        }
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
        }
        net.take_read_list(&mut read_list);
        let budget = net.limits().reads_per_turn_max;
        for key in read_list.drain(..) {
            let mut n_read = 0;
            loop {
                if n_read == budget {
                    net.requeue_read(key);
                    break;
                }
                match net.read_one(key) {
                    ReadOutcome::Message(message) => {
                        n_read += 1;
                        handler.call(&mut net, |h, net| {
                            h.on_message(net, ConnToken(key), message)
                        });
                    }
                    ReadOutcome::Done => break,
                }
            }
        }
        tell_gone(handler, &mut net);
        handler.call(&mut net, |h, net| h.end_turn(net));
        tell_gone(handler, &mut net);
        net.flush_all();
        tell_gone(handler, &mut net);
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + TICK;
            net.check_timers(now);
            handler.call(&mut net, |h, net| h.on_tick(net, now));
            tell_gone(handler, &mut net);
            net.flush_all();
            tell_gone(handler, &mut net);
        }
        let elapsed = now.saturating_duration_since(turn_start);
        ShardMetrics::record(&mut net.metrics.figures.histograms.turn_us, elapsed);
        if elapsed > TURN_BUDGET {
            n_slow_turns += 1;
            // At most one line a second, however overloaded the machine is.
            if now.saturating_duration_since(slow_turn_warned_at) >= Duration::from_secs(1) {
                let shard_idx = net.metrics.shard_idx();
                let turns = if n_slow_turns == 1 { "turn" } else { "turns" };
                warn!("shard {shard_idx}: {n_slow_turns} loop {turns} over {TURN_BUDGET:?}, the last took {elapsed:?}");
                slow_turn_warned_at = now;
                n_slow_turns = 0;
            }
        }
        if handler.panicked() && shutdown_deadline.is_none() {
            // Linger for the 1011 close handshakes, then exit; new handoffs get 1011 meanwhile.
            shutdown_deadline = Some(now + SHUTDOWN_LINGER);
        }
        if let Some(deadline) = shutdown_deadline {
            if net.is_empty() || now >= deadline {
                // Connections handed over after the last look at the inbox are never served;
                // the acceptor's door must not count them forever.
                while let Ok(msg) = inbox.try_recv() {
                    if let ShardMsg::Conn(handoff) = msg {
                        net.release_unserved(handoff.peer);
                    }
                }
                net.metrics.maybe_publish(now, true);
                debug!("shard: stopped ({} connections left)", net.len());
                if let Some(message) = handler.panic.take() {
                    return Err(io::Error::other(format!("the handler panicked: {message}")));
                }
                return Ok(());
            }
        }
        net.metrics.maybe_publish(now, false);
    }
}

fn tell_gone<H: Handler>(handler: &mut Guarded<'_, H>, net: &mut Net) {
    loop {
        let gone = net.take_gone();
        if gone.is_empty() {
            return;
        }
        for conn in gone {
            handler.call(net, |h, net| h.on_closed(net, conn));
        }
    }
}
