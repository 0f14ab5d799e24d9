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
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::auth::{now_unix, pick_token, AdminRefusal, Auth, AuthError, RevokeRequest};
use crate::cluster::forwarded::{self, ClusterSecret};
use crate::cluster::relay::{self, RelayJob, RelayKind};
use crate::config::REFUSALS_BEFORE_CLOSE;
use crate::ids::shard_for_doc;
use crate::metrics::MetricsRegistry;
use crate::protocol::{self, ClientMessage, ErrorCode, Hello, ProtocolError};

use crate::api::{
    self, ApiAnswer, ApiCall, ApiDone, ApiHead, ApiId, ApiReply, ApiRequest, ApiTarget,
};

use super::admin::{json_error, AdminDone, AdminJob, JobId};
use super::door::{self, Door, DoorLimits, DoorRefusal, HeadRead};
use super::handoff::{Admitted, Handoff, ShardInbox, ShardMsg};
use super::http::{
    self, AdminPath, AdminRequest, DoorTokens, HttpGate, Parsed, Route, REQUEST_HEADERS_MAX,
    REQUEST_HEAD_BYTES_MAX,
};
use super::routing::{self, ClusterRouting, Decision};

mod cluster;
use cluster::{
    head_relayed, head_vouch, peeked_vouch, plain_hello, plain_ws_start, refuse_unavailable,
    relay_request, upgrade_and_refuse, PlainHello,
};

/// Connections in the HTTP/handshake stage at once; past it new ones are dropped at once,
/// so a connection flood cannot exhaust memory in the acceptor.
pub const PENDING_CONNS_MAX: usize = 16_384;

/// Frames one readiness event may read from a pending WebSocket without moving it on (pings,
/// pongs, messages discarded while refusing). Past it the connection is driven again on the
/// next loop iteration, after the other events: without a bound, a client streaming pings or
/// pongs before its `hello` held the acceptor, and with it every new connection, until it
/// stopped.
const FRAMES_PER_DRIVE_MAX: usize = 64;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// `--admin-listen`'s listener, when there is one.
const ADMIN_LISTENER: Token = Token(2);
const FIRST_CONN: usize = 3;

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
    /// Origin and per-address limits, applied before any handshake work.
    pub door: DoorLimits,
    /// Access control; `None` runs open.
    pub auth: Option<Arc<Auth>>,
    /// `--metrics-public`.
    pub metrics_public: bool,
    /// `--admin-listen`: `/metrics` and `/admin/*` move to this address.
    pub admin_listen: Option<SocketAddr>,
    /// Cluster routing (any-node entry): `None` on a single node, where every document is
    /// served here.
    pub cluster: Option<ClusterRouting>,
    /// `--cluster-secret-file`: signs the client address this node relays and checks the one a
    /// peer relays here (`cluster::forwarded`).
    pub cluster_secret: Option<ClusterSecret>,
}

impl AcceptorOptions {
    /// What the client listener (`admin_port: false`) or the admin listener serves.
    fn gate(&self, admin_port: bool) -> HttpGate {
        let split = self.admin_listen.is_some();
        HttpGate {
            guarded: self.auth.is_some(),
            metrics_public: self.metrics_public,
            admin_here: admin_port || !split,
            clients_here: !admin_port,
        }
    }
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
        tokens: DoorTokens,
    },
    /// Upgraded on plain `/ws`; waiting for a `hello` naming a document. Other messages are
    /// refused as they would be in a shard (`not_joined`, `bad_message`, ...) and the wait goes
    /// on, until [`REFUSALS_BEFORE_CLOSE`] refusals or the deadline.
    AwaitHello {
        ws: WebSocket<TcpStream>,
        n_refused: u32,
        tokens: DoorTokens,
        /// Cluster node whose raw reader left this connection to tungstenite (a fragmented or
        /// unusual first message): its `hello` is served only when the document is local.
        check_route: bool,
    },
    /// An authenticated `POST /admin/revoke`: reading its body (the head is consumed).
    AdminBody {
        stream: TcpStream,
        body: Vec<u8>,
        body_bytes: usize,
    },
    /// Waiting for the admin worker's answer (`AdminDone`), then `Answer`.
    AdminWait(TcpStream),
    /// An admitted `/api/...` request: reading its body (the head is consumed).
    ApiBody {
        stream: TcpStream,
        call: ApiCallParts,
        body: Vec<u8>,
    },
    /// Waiting for the shard's answer (`ApiDone`), then `Answer`.
    ApiWait(TcpStream),
    /// A listing: waiting for every shard's part, then `Answer`.
    ApiGather {
        stream: TcpStream,
        parts: Vec<crate::api::ListPart>,
        expected: usize,
        limit: usize,
    },
    /// Refused after the upgrade: flushing an error and a close frame, then waiting for the
    /// client's close (or the deadline).
    Refuse(WebSocket<TcpStream>),
    /// Refused at the door on accept: reading the request head, then answering 429.
    Deny {
        stream: TcpStream,
        refusal: DoorRefusal,
    },
    /// Cluster node: the router has no answer yet for the document the request head names
    /// (`/ws/<doc>`, `/api/docs/<doc>`); the head is still in the socket, peeked, not consumed.
    Routing(TcpStream),
    /// Cluster node, plain `/ws`: the acceptor answered the handshake itself and reads the raw
    /// frames up to the `hello`, keeping their bytes for the owner.
    PlainHello(Box<PlainHello>),
}

struct Pending {
    /// `None` only while [`Acceptor::drive`] moves the stage through [`advance`].
    stage: Option<Stage>,
    peer: SocketAddr,
    deadline: Instant,
    /// Whether the connection counts against its address in the [`Door`] (admitted, not yet
    /// handed to a shard, which then owns the count).
    counted: bool,
    /// Accepted on the `--admin-listen` listener.
    admin_port: bool,
    /// Unique per accepted connection (slab keys are reused): names its admin job.
    serial: u64,
    /// Cluster node: the connection waits for its route; `deadline` is then the route's.
    routing: bool,
    /// The route's deadline passed: the next drive refuses it `unavailable`.
    route_expired: bool,
}

/// What one step of a pending connection may use besides its stage.
struct Ctx<'a> {
    metrics: &'a MetricsRegistry,
    options: &'a AcceptorOptions,
    health: http::ShardsHealth,
    admin_port: bool,
    /// Where a revocation goes, with this connection's job id.
    admin_jobs: Option<(&'a crossbeam_channel::Sender<AdminJob>, JobId)>,
    /// The connection's route wait is over (cluster nodes).
    route_expired: bool,
}

/// What a pending connection does next.
// Returned once per event and moved straight back into the slab: boxing would only add an
// allocation per event.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Wait for the next readiness event.
    Stay(Stage),
    /// [`FRAMES_PER_DRIVE_MAX`] frames read and input may be left: drive it again soon (an
    /// edge-triggered event will not come for bytes already there).
    Again(Stage),
    Drop,
    HandOff(Box<Handoff>),
    /// Wait for the router (cluster nodes); the first time, the route's deadline replaces the
    /// handshake's.
    Route(Stage),
    /// Relay the connection to its document's owner.
    Relay(Box<RelayJob>),
    /// A peer vouched that the request comes from `client` (`cluster::forwarded`): count it
    /// against that address instead of the peer's, then read the request again.
    Reattribute {
        stream: TcpStream,
        client: SocketAddr,
    },
    /// An API request for the shards; the connection waits for the answer.
    Api(TcpStream, Box<ApiPending>),
}

/// What an admitted API request carries until its body is read.
struct ApiCallParts {
    head: ApiHead,
    grant: Option<crate::auth::Grant>,
}

/// An API request ready for its shard (or, a listing, for every shard).
struct ApiPending {
    doc: Option<String>,
    call: ApiCall,
    grant: Option<crate::auth::Grant>,
}

/// Longest an API request waits for its shard's answer (a write waits for its sync) before
/// the acceptor answers 504.
const API_WAIT_MAX: Duration = Duration::from_secs(30);

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
    /// Per-address counts and buckets; see [`Door`].
    door: Door,
    /// `--admin-listen`'s listener.
    admin_listener: Option<TcpListener>,
    /// The admin worker's job queue and answers (`acceptor::admin`), once attached.
    admin: Option<(
        crossbeam_channel::Sender<AdminJob>,
        crossbeam_channel::Receiver<AdminDone>,
    )>,
    /// The next pending connection's serial.
    next_serial: u64,
    /// Pending connections that spent their frame budget ([`Next::Again`]): driven again right
    /// after this loop iteration's events, and the poll does not sleep while any is listed.
    again: Vec<usize>,
    /// Answers of the shards (and their storage workers) to API requests.
    api_done: (
        crossbeam_channel::Sender<ApiDone>,
        crossbeam_channel::Receiver<ApiDone>,
    ),
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
        let mut options = options;
        if let Some(cluster) = options.cluster.as_mut() {
            cluster.self_addr = Some(local_addr);
        }
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let door = Door::new(options.door.clone(), metrics.door());
        if let Some(release) = door.release_handle() {
            // Before any connection: each shard reports the connections it ends from now on.
            for shard in &shards {
                let _ = shard.send(ShardMsg::Door(release.clone()));
            }
        }
        let admin_listener = match options.admin_listen {
            Some(admin_addr) => {
                let mut admin_listener = TcpListener::bind(admin_addr)?;
                poll.registry().register(
                    &mut admin_listener,
                    ADMIN_LISTENER,
                    Interest::READABLE,
                )?;
                Some(admin_listener)
            }
            None => None,
        };
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
            door,
            admin_listener,
            admin: None,
            next_serial: 0,
            again: Vec::new(),
            api_done: crossbeam_channel::unbounded(),
        })
    }

    /// The bound address of `--admin-listen`, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The acceptor's waker, for the admin worker's answers.
    pub fn waker(&self) -> Arc<mio::Waker> {
        self.waker.clone()
    }

    /// Attaches the admin worker (`acceptor::admin::spawn_admin_worker`).
    pub fn attach_admin(
        &mut self,
        jobs: crossbeam_channel::Sender<AdminJob>,
        done: crossbeam_channel::Receiver<AdminDone>,
    ) {
        self.admin = Some((jobs, done));
    }

    /// Hands each finished admin job's answer to its connection.
    fn collect_admin_answers(&mut self) {
        let Some((_, done)) = &self.admin else {
            return;
        };
        let answers: Vec<AdminDone> = done.try_iter().collect();
        for AdminDone { id, answer } in answers {
            let Some(pending) = self.pending.get_mut(id.key) else {
                continue; // Gone (deadline, peer closed).
            };
            if pending.serial != id.serial {
                continue;
            }
            let Some(Stage::AdminWait(stream)) = pending.stage.take() else {
                continue;
            };
            match write_answer(stream, answer, 0) {
                Next::Stay(stage) => pending.stage = Some(stage),
                _ => {
                    self.pending.remove(id.key);
                }
            }
        }
    }

    /// Hands each API answer to its connection (a listing waits for every shard's part).
    fn collect_api_answers(&mut self) {
        let answers: Vec<ApiDone> = self.api_done.1.try_iter().collect();
        for ApiDone { id, answer } in answers {
            let Some(pending) = self.pending.get_mut(id.key) else {
                continue; // Gone (deadline, peer closed).
            };
            if pending.serial != id.serial {
                continue;
            }
            let stage = pending.stage.take();
            let next = match (stage, answer) {
                (Some(Stage::ApiWait(stream)), ApiAnswer::Bytes(bytes)) => {
                    write_answer(stream, bytes, 0)
                }
                (
                    Some(Stage::ApiGather {
                        stream,
                        mut parts,
                        expected,
                        limit,
                    }),
                    ApiAnswer::List(part),
                ) => match part {
                    Err(why) => {
                        let answer = api::json_error(503, &format!("listing failed: {why}"));
                        write_answer(stream, answer, 0)
                    }
                    Ok(part) => {
                        parts.push(part);
                        if parts.len() == expected {
                            write_answer(stream, api::merge_list(parts, limit), 0)
                        } else {
                            Next::Stay(Stage::ApiGather {
                                stream,
                                parts,
                                expected,
                                limit,
                            })
                        }
                    }
                },
                // A shard that could not list (its reply was dropped: 503): the answer.
                (Some(Stage::ApiGather { stream, .. }), ApiAnswer::Bytes(bytes)) => {
                    write_answer(stream, bytes, 0)
                }
                (stage, _) => {
                    pending.stage = stage;
                    continue;
                }
            };
            match next {
                Next::Stay(stage) => {
                    if let Some(pending) = self.pending.get_mut(id.key) {
                        pending.stage = Some(stage);
                    }
                }
                _ => {
                    let pending = self.pending.remove(id.key);
                    self.forget(&pending);
                }
            }
        }
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
            let timeout = if self.again.is_empty() {
                next_scan.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
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
                    LISTENER => self.accept_all(false),
                    ADMIN_LISTENER => self.accept_all(true),
                    WAKER => {
                        self.collect_admin_answers();
                        self.reroute();
                        self.collect_api_answers();
                    }
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            // A key may have been dropped (or even reused) since it was listed: driving it is
            // then a spurious wake-up, which every stage handles.
            for key in std::mem::take(&mut self.again) {
                self.drive(key);
            }
            let now = Instant::now();
            if now >= next_scan {
                next_scan = now + tick;
                self.expire(now);
                self.reroute();
                self.door.on_tick(now);
                if self.accept_retry {
                    self.accept_all(false);
                    self.accept_all(true);
                }
            }
        }
    }

    fn accept_all(&mut self, admin_port: bool) {
        if !admin_port {
            self.accept_retry = false;
        }
        // Decide on what the shards have released so far.
        self.door.drain_released();
        loop {
            let accepted = match (&self.admin_listener, admin_port) {
                (_, false) => self.listener.accept(),
                (Some(admin_listener), true) => admin_listener.accept(),
                (None, true) => return,
            };
            match accepted {
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
                    let now = Instant::now();
                    let (stage, deadline, counted) = match self.door.admit(peer, now) {
                        Ok(()) => (
                            Stage::Request(stream),
                            now + self.options.handshake_timeout,
                            self.door.limits().counts_conns(),
                        ),
                        Err(refusal) => {
                            debug!("acceptor: {peer} refused at the door: {refusal:?}");
                            let linger = self.options.handshake_timeout.min(door::REFUSED_DEADLINE);
                            (Stage::Deny { stream, refusal }, now + linger, false)
                        }
                    };
                    self.next_serial += 1;
                    entry.insert(Pending {
                        stage: Some(stage),
                        peer,
                        deadline,
                        counted,
                        admin_port,
                        serial: self.next_serial,
                        routing: false,
                        route_expired: false,
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
            let Some(pending) = self.pending.get_mut(key) else {
                continue;
            };
            if pending.routing && !pending.route_expired {
                // No route in time: the client gets `unavailable` and 1013 (or a 503), with a
                // handshake deadline to take it.
                pending.route_expired = true;
                pending.deadline = now + self.options.handshake_timeout;
                self.drive(key);
                continue;
            }
            let waiting = self
                .pending
                .get_mut(key)
                .and_then(|p| match p.stage.take() {
                    Some(Stage::ApiWait(stream) | Stage::ApiGather { stream, .. }) => Some(stream),
                    other => {
                        p.stage = other;
                        None
                    }
                });
            if let Some(stream) = waiting {
                debug!("acceptor: an API request got no answer within {API_WAIT_MAX:?}");
                let answer = api::json_error(504, "no answer from the document's shard in time");
                if let Next::Stay(stage) = write_answer(stream, answer, 0) {
                    if let Some(pending) = self.pending.get_mut(key) {
                        pending.stage = Some(stage);
                        pending.deadline = now + self.options.handshake_timeout;
                        continue;
                    }
                }
            }
            let pending = self.pending.remove(key);
            debug!("acceptor: {} missed the handshake deadline", pending.peer);
            self.forget(&pending);
        }
    }

    /// Asks the router again for every connection that waits for a route (on the router's
    /// wake-up and on every tick).
    fn reroute(&mut self) {
        if self.options.cluster.is_none() {
            return;
        }
        let waiting: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.routing && !p.route_expired)
            .map(|(key, _)| key)
            .collect();
        for key in waiting {
            self.drive(key);
        }
    }

    /// A pending connection ended in the acceptor: its address may open another.
    fn forget(&mut self, pending: &Pending) {
        if pending.counted {
            self.door.release(pending.peer);
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(pending) = self.pending.get_mut(key) else {
            return; // An event for a connection already gone.
        };
        let peer = pending.peer;
        let (admin_port, serial) = (pending.admin_port, pending.serial);
        let route_expired = pending.route_expired;
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
        let ctx = Ctx {
            metrics: &self.metrics,
            options: &self.options,
            health,
            admin_port,
            admin_jobs: self
                .admin
                .as_ref()
                .map(|(jobs, _)| (jobs, JobId { key, serial })),
            route_expired,
        };
        let next = advance(stage, peer, &ctx);
        if !matches!(next, Next::Route(_)) {
            // Routed (or refused): back to a handshake's deadline, and no more re-asking.
            if let Some(pending) = self.pending.get_mut(key).filter(|p| p.routing) {
                pending.routing = false;
                pending.deadline = Instant::now() + self.options.handshake_timeout;
            }
        }
        match next {
            Next::Stay(stage) => {
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.stage = Some(stage);
                }
            }
            Next::Again(stage) => {
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.stage = Some(stage);
                    self.again.push(key);
                }
            }
            Next::Drop => {
                let pending = self.pending.remove(key);
                self.forget(&pending);
            }
            Next::Route(stage) => {
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.stage = Some(stage);
                    if !pending.routing {
                        pending.routing = true;
                        self.metrics.relay().route_wait_started();
                        let wait = self.options.cluster.as_ref().map(|c| c.route_wait);
                        pending.deadline = Instant::now() + wait.unwrap_or_default();
                    }
                }
            }
            Next::Reattribute { stream, client } => self.reattribute(key, stream, client),
            Next::Relay(job) => self.relay(key, job),
            Next::Api(stream, request) => self.send_api(key, serial, stream, *request),
            Next::HandOff(mut handoff) => {
                let pending = self.pending.remove(key);
                if let Err(e) = self.poll.registry().deregister(handoff.ws.get_mut()) {
                    warn!("acceptor: deregister {peer}: {e}");
                    self.forget(&pending);
                    return;
                }
                // From here the count travels with the connection: the shard releases it
                // (or refuse_dead_shard keeps it in a new pending entry).
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

    /// A peer vouched for the connection's real client: the door counts it against that
    /// address (and may refuse it), then the request is read again.
    fn reattribute(&mut self, key: usize, stream: TcpStream, client: SocketAddr) {
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        let (was_counted, relay_addr) = (pending.counted, pending.peer);
        pending.peer = client;
        if was_counted {
            self.door.release(relay_addr);
        }
        let stage = match self.door.admit(client, Instant::now()) {
            Ok(()) => {
                debug!("acceptor: {relay_addr} relays {client}");
                Stage::Request(stream)
            }
            Err(refusal) => {
                debug!(
                    "acceptor: {client} (relayed by {relay_addr}) refused at the door: {refusal:?}"
                );
                Stage::Deny { stream, refusal }
            }
        };
        let counted = matches!(stage, Stage::Request(_)) && self.door.limits().counts_conns();
        if let Some(pending) = self.pending.get_mut(key) {
            pending.counted = counted;
            pending.stage = Some(stage);
            self.again.push(key);
        }
    }

    /// Hands a connection to the relay thread; its door count travels with it.
    // The job stays boxed: it came boxed in `Next` and goes on to the relay's channel.
    #[allow(clippy::boxed_local)]
    fn relay(&mut self, key: usize, mut job: Box<RelayJob>) {
        let pending = self.pending.remove(key);
        if let Err(e) = self.poll.registry().deregister(&mut job.client) {
            warn!("acceptor: deregister {}: {e}", pending.peer);
            self.forget(&pending);
            return;
        }
        job.peer = pending.peer;
        job.release = if pending.counted {
            self.door.release_handle()
        } else {
            None
        };
        let Some(cluster) = &self.options.cluster else {
            self.forget(&pending);
            return;
        };
        debug!("acceptor: relaying {} to {}", job.peer, job.upstream);
        if let Err(refused) = cluster.relay.submit(*job) {
            self.refuse_relay(refused.into_job(), pending);
        }
    }

    /// The relay is full (or gone): the client gets `unavailable` and 1013 (HTTP: 503) from the
    /// acceptor, in a new pending entry that keeps the connection's door count.
    // The job comes boxed from the relay's refusal.
    #[allow(clippy::boxed_local)]
    fn refuse_relay(&mut self, job: Box<RelayJob>, pending: Pending) {
        let RelayJob {
            mut client,
            peer,
            kind,
            ..
        } = *job;
        debug!("acceptor: the relay refused {peer}");
        let entry = self.pending.vacant_entry();
        let token = Token(entry.key() + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(
            &mut client,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("acceptor: register {peer}: {e}");
            self.forget(&pending);
            return;
        }
        let next = match kind {
            RelayKind::WsUpgrade { key } => upgrade_and_refuse(client, &key, &self.options),
            RelayKind::WsUpgraded => refuse_unavailable(WebSocket::from_raw_socket(
                client,
                Role::Server,
                Some(self.options.ws_config),
            )),
            RelayKind::Http => write_answer(client, routing::unavailable_http(), 0),
        };
        match next {
            Next::Stay(stage) | Next::Again(stage) => {
                self.next_serial += 1;
                entry.insert(Pending {
                    stage: Some(stage),
                    peer,
                    deadline: Instant::now() + self.options.handshake_timeout,
                    counted: pending.counted,
                    admin_port: false,
                    serial: self.next_serial,
                    routing: false,
                    route_expired: false,
                });
            }
            _ => self.forget(&pending),
        }
    }

    /// Sends an API request to its document's shard (a listing to every shard); the
    /// connection waits for the answer at most [`API_WAIT_MAX`].
    fn send_api(&mut self, key: usize, serial: u64, stream: TcpStream, request: ApiPending) {
        let id = ApiId { key, serial };
        let (done, waker) = (self.api_done.0.clone(), self.waker.clone());
        let reply = || ApiReply::new(id, done.clone(), waker.clone());
        let ApiPending { doc, call, grant } = request;
        let stage = match (doc, call) {
            (None, ApiCall::List(mut list)) => {
                list.n_shards = self.shards.len();
                if self.shards.iter().any(|s| !s.is_alive()) {
                    let answer = api::json_error(503, "a shard is down; listing unavailable");
                    return self.answer_now(key, stream, answer);
                }
                let limit = list.limit;
                for shard in &self.shards {
                    // A refused send drops the request, whose reply then answers 503.
                    let _ = shard.send(ShardMsg::Api(Box::new(ApiRequest {
                        doc: None,
                        call: ApiCall::List(list.clone()),
                        grant: grant.clone(),
                        reply: reply(),
                        stream: None,
                    })));
                }
                Stage::ApiGather {
                    stream,
                    parts: Vec::new(),
                    expected: self.shards.len(),
                    limit,
                }
            }
            (Some(doc), call) => {
                let shard_idx = shard_for_doc(&doc, self.shards.len()).0;
                if !self.shards[shard_idx].is_alive() {
                    let answer = api::json_error(503, "internal error; try again later");
                    return self.answer_now(key, stream, answer);
                }
                if let ApiCall::Events { .. } = call {
                    // An event stream: the shard keeps the socket (and answers on it).
                    let mut stream = stream;
                    let pending = self.pending.remove(key);
                    if let Err(e) = self.poll.registry().deregister(&mut stream) {
                        warn!("acceptor: deregister {}: {e}", pending.peer);
                        self.forget(&pending);
                        return;
                    }
                    // The door's count travels with the socket, released when it is dropped.
                    let release = match self.door.release_handle() {
                        Some(door) if pending.counted => Some((door, pending.peer)),
                        _ => None,
                    };
                    let stream = api::CountedStream::new(stream, release);
                    let _ = self.shards[shard_idx].send(ShardMsg::Api(Box::new(ApiRequest {
                        doc: Some(doc),
                        call,
                        grant,
                        reply: reply(),
                        stream: Some(stream),
                    })));
                    return;
                }
                let _ = self.shards[shard_idx].send(ShardMsg::Api(Box::new(ApiRequest {
                    doc: Some(doc),
                    call,
                    grant,
                    reply: reply(),
                    stream: None,
                })));
                Stage::ApiWait(stream)
            }
            (None, _) => return self.answer_now(key, stream, api::json_error(404, "not found")),
        };
        if let Some(pending) = self.pending.get_mut(key) {
            pending.stage = Some(stage);
            pending.deadline = Instant::now() + API_WAIT_MAX;
        }
    }

    /// Answers pending connection `key` at once.
    fn answer_now(&mut self, key: usize, stream: TcpStream, answer: Vec<u8>) {
        match write_answer(stream, answer, 0) {
            Next::Stay(stage) => {
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.stage = Some(stage);
                }
            }
            _ => {
                let pending = self.pending.remove(key);
                self.forget(&pending);
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
            self.release_counted(peer);
            return;
        }
        match refuse(ws) {
            Next::Stay(stage) => {
                self.next_serial += 1;
                entry.insert(Pending {
                    stage: Some(stage),
                    peer,
                    deadline: Instant::now() + self.options.handshake_timeout,
                    counted: self.door.limits().counts_conns(),
                    admin_port: false,
                    serial: self.next_serial,
                    routing: false,
                    route_expired: false,
                });
            }
            _ => self.release_counted(peer),
        }
    }

    /// A handed-off connection (which the door counted) ended in the acceptor.
    fn release_counted(&mut self, peer: SocketAddr) {
        if self.door.limits().counts_conns() {
            self.door.release(peer);
        }
    }
}

/// One step of a pending connection's state machine.
fn advance(stage: Stage, peer: SocketAddr, ctx: &Ctx<'_>) -> Next {
    let options = ctx.options;
    match stage {
        Stage::Request(stream) => read_request(stream, peer, ctx),
        Stage::Answer {
            stream,
            bytes,
            written,
        } => write_answer(stream, bytes, written),
        Stage::Handshake { mid, doc, tokens } => handshake_resume(mid, doc, tokens, peer, ctx),
        Stage::AwaitHello {
            ws,
            n_refused,
            tokens,
            check_route,
        } => await_hello(ws, n_refused, tokens, check_route, peer, ctx),
        Stage::Refuse(ws) => refuse(ws),
        Stage::Deny {
            mut stream,
            refusal,
        } => {
            // A peer's relayed request counts against its real client, not the peer.
            if let Some(client) = peeked_vouch(&stream, options).filter(|&c| c != peer) {
                return Next::Reattribute { stream, client };
            }
            match door::consume_request_head(&mut stream) {
                HeadRead::More => Next::Stay(Stage::Deny { stream, refusal }),
                HeadRead::Complete => write_answer(stream, refusal.answer(), 0),
                HeadRead::Gone => Next::Drop,
            }
        }
        // Asked again on every wake-up and tick (and on the deadline, then refused).
        Stage::Routing(stream) => read_request(stream, peer, ctx),
        Stage::PlainHello(plain) => plain_hello(plain, peer, ctx),
        Stage::AdminBody {
            stream,
            body,
            body_bytes,
        } => admin_body(stream, body, body_bytes, ctx),
        // Only the admin worker's answer moves it on (`Acceptor::collect_admin_answers`).
        Stage::AdminWait(stream) => Next::Stay(Stage::AdminWait(stream)),
        Stage::ApiBody { stream, call, body } => api_body(stream, call, body),
        // Only the shards' answers move these on (`Acceptor::collect_api_answers`).
        stage @ (Stage::ApiWait(_) | Stage::ApiGather { .. }) => Next::Stay(stage),
    }
}

/// An admin request whose head is consumed: authenticate, then answer `/metrics` at once or
/// read the revocation's body.
fn admin_start(stream: TcpStream, request: AdminRequest, ctx: &Ctx<'_>) -> Next {
    let Some(auth) = &ctx.options.auth else {
        return write_answer(stream, http::text_response(404, "not found"), 0);
    };
    match auth.authorize_admin(request.bearer.as_deref(), now_unix()) {
        Ok(_) => {}
        Err(AdminRefusal::Unauthorized(e)) => {
            let answer = json_error(401, e.message(), &["WWW-Authenticate: Bearer"]);
            return write_answer(stream, answer, 0);
        }
        Err(AdminRefusal::Forbidden) => {
            let answer = json_error(403, "an admin token covering * is required", &[]);
            return write_answer(stream, answer, 0);
        }
    }
    match request.path {
        AdminPath::Metrics => write_answer(stream, http::metrics_answer(ctx.metrics), 0),
        AdminPath::Cluster => write_answer(
            stream,
            http::cluster_answer(ctx.metrics, &request.target),
            0,
        ),
        AdminPath::Revoke => admin_body(
            stream,
            Vec::with_capacity(request.body_bytes),
            request.body_bytes,
            ctx,
        ),
    }
}

/// Reads the body of `POST /admin/revoke`, then hands the revocation to the admin worker.
fn admin_body(mut stream: TcpStream, mut body: Vec<u8>, body_bytes: usize, ctx: &Ctx<'_>) -> Next {
    match read_body(&mut stream, &mut body, body_bytes) {
        BodyRead::Complete => {}
        BodyRead::More => {
            return Next::Stay(Stage::AdminBody {
                stream,
                body,
                body_bytes,
            })
        }
        BodyRead::Gone => return Next::Drop,
    }
    let request: RevokeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(_) => {
            let why = "expected {\"jti\":...}, {\"sub\":...} or {\"sub\":...,\"doc\":...}";
            return write_answer(stream, json_error(400, why, &[]), 0);
        }
    };
    let Some((jobs, id)) = ctx.admin_jobs else {
        return write_answer(stream, json_error(503, "admin worker not running", &[]), 0);
    };
    if jobs.send(AdminJob { id, request }).is_err() {
        return write_answer(stream, json_error(503, "admin worker not running", &[]), 0);
    }
    Next::Stay(Stage::AdminWait(stream))
}

/// Admits a connection whose document is known, with access control on: the tokens of the
/// upgrade and of the first `hello` (if read) must agree and grant `doc`. Without any token
/// and without a `hello` yet, the shard decides on `hello.token`.
fn admit_at_door(
    ws: WebSocket<TcpStream>,
    doc: String,
    tokens: DoorTokens,
    hello: Option<crate::protocol::Hello>,
    peer: SocketAddr,
    options: &AcceptorOptions,
) -> Next {
    let handoff = |ws, hello, admitted| {
        Next::HandOff(Box::new(Handoff {
            ws,
            doc: Some(doc.clone()),
            hello,
            peer,
            admitted,
        }))
    };
    let Some(auth) = &options.auth else {
        return handoff(ws, hello, None);
    };
    let hello_token = hello.as_ref().and_then(|h| h.token.as_deref());
    let token = match pick_token(&[
        tokens.query.as_deref(),
        tokens.bearer.as_deref(),
        hello_token,
    ]) {
        Ok(token) => token,
        Err(e) => return refuse_auth(ws, e, peer),
    };
    if token.is_none() && hello.is_none() {
        return handoff(ws, None, None);
    }
    match auth.authorize(token, &doc, now_unix()) {
        Ok(grant) => {
            let admitted = token.map(|token| {
                Box::new(Admitted {
                    token: token.to_owned(),
                    grant,
                })
            });
            handoff(ws, hello, admitted)
        }
        Err(e) => refuse_auth(ws, e, peer),
    }
}

/// A refused token: `unauthorized` with the reason, then a close 1008.
fn refuse_auth(ws: WebSocket<TcpStream>, e: AuthError, peer: SocketAddr) -> Next {
    debug!("acceptor: {peer} refused: {}", e.message());
    let err = ProtocolError::new(ErrorCode::Unauthorized, e.message());
    refuse_start(ws, &err, e.close_reason())
}

fn read_request(mut stream: TcpStream, peer: SocketAddr, ctx: &Ctx<'_>) -> Next {
    let (metrics, options) = (ctx.metrics, ctx.options);
    let mut buf = [0u8; REQUEST_HEAD_BYTES_MAX];
    // Peek, so that an upgrade leaves the request in the socket for tungstenite's handshake
    // (or, on a cluster node, for the owner).
    let n = match stream.peek(&mut buf) {
        Ok(0) => return Next::Drop,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Next::Stay(Stage::Request(stream))
        }
        Err(_) => return Next::Drop,
    };
    let (head_bytes, route) = match http::parse_request_gated(
        &buf[..n],
        metrics,
        ctx.health,
        options.gate(ctx.admin_port),
    ) {
        Parsed::Partial => return Next::Stay(Stage::Request(stream)),
        Parsed::Complete { head_bytes, route } => (head_bytes, route),
    };
    let head = &buf[..head_bytes];
    // Cluster: a request a peer relayed counts against its real client, and is never relayed on.
    let mut from_peer = options.cluster.is_some() && head_relayed(head);
    if let Some(client) = options
        .cluster_secret
        .as_ref()
        .and_then(|secret| head_vouch(head, secret))
    {
        if client != peer {
            return Next::Reattribute { stream, client };
        }
        from_peer = true;
    }
    if let (Some(cluster), false) = (&options.cluster, matches!(route, Route::Upgrade { .. })) {
        if let Some(doc) = routing::api_doc(head) {
            match cluster.decide(&doc, from_peer, ctx.route_expired) {
                Decision::Local => {}
                Decision::Relay(owner) => {
                    let kind = RelayKind::Http;
                    return relay_request(stream, head, &doc, owner, kind, peer, options);
                }
                Decision::Wait => return Next::Route(Stage::Routing(stream)),
                Decision::Unavailable => {
                    if !consume_head(&mut stream, head_bytes) {
                        return Next::Drop;
                    }
                    return write_answer(stream, routing::unavailable_http(), 0);
                }
            }
        }
    }
    match route {
        Route::Answer(bytes) => {
            // Consume the head so closing after the answer does not reset the connection.
            if !consume_head(&mut stream, head_bytes) {
                return Next::Drop;
            }
            write_answer(stream, bytes, 0)
        }
        Route::Api(api_head) => {
            if !consume_head(&mut stream, head_bytes) {
                return Next::Drop;
            }
            api_start(stream, api_head, options)
        }
        Route::Admin(request) => {
            if !consume_head(&mut stream, head_bytes) {
                return Next::Drop;
            }
            admin_start(stream, request, ctx)
        }
        Route::Upgrade { doc, tokens } => {
            if let Err(refusal) = options.door.check_origin(head) {
                debug!("acceptor: {peer} refused at the door: {refusal:?}");
                metrics.door().refused(refusal);
                if !consume_head(&mut stream, head_bytes) {
                    return Next::Drop;
                }
                return write_answer(stream, refusal.answer(), 0);
            }
            if let Some(cluster) = &options.cluster {
                let Some(key) = routing::upgrade_key(head) else {
                    return Next::Drop; // The router checked the key is there.
                };
                match &doc {
                    None => return plain_ws_start(stream, head, key, tokens, from_peer, peer, ctx),
                    Some(name) => match cluster.decide(name, from_peer, ctx.route_expired) {
                        Decision::Local => {}
                        Decision::Relay(owner) => {
                            let kind = RelayKind::WsUpgrade { key };
                            return relay_request(stream, head, name, owner, kind, peer, options);
                        }
                        Decision::Wait => return Next::Route(Stage::Routing(stream)),
                        Decision::Unavailable => {
                            if !consume_head(&mut stream, head_bytes) {
                                return Next::Drop;
                            }
                            return upgrade_and_refuse(stream, &key, options);
                        }
                    },
                }
            }
            debug!("acceptor: {peer} upgrades for {doc:?}");
            let mid = ServerHandshake::start(stream, NoCallback, Some(options.ws_config));
            // Run the first round at once: the request is already in the socket.
            handshake_resume(mid, doc, tokens, peer, ctx)
        }
    }
}

/// Reads (consumes) the `n` bytes of a request head that were peeked.
fn consume_head(stream: &mut TcpStream, n: usize) -> bool {
    let mut scratch = [0u8; 1024];
    let mut left = n;
    while left > 0 {
        let want = left.min(scratch.len());
        match stream.read(&mut scratch[..want]) {
            Ok(0) => return false,
            Ok(got) => left -= got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// An `/api/...` request whose head is consumed: its body size and token are checked (401
/// without a valid token, 403 when it does not cover the document or its role is too low),
/// then its body is read or it goes to the shards.
fn api_start(stream: TcpStream, head: ApiHead, options: &AcceptorOptions) -> Next {
    let body_max = options.ws_config.max_message_size.unwrap_or(usize::MAX);
    if head.body_bytes > body_max {
        let why = format!("request body over {body_max} bytes (--message-bytes-max)");
        return write_answer(stream, api::json_error(413, &why), 0);
    }
    let grant = match &options.auth {
        None => None,
        Some(auth) => match api_grant(auth, &head) {
            Ok(grant) => Some(grant),
            Err(answer) => return write_answer(stream, answer, 0),
        },
    };
    let call = ApiCallParts { head, grant };
    api_body(stream, call, Vec::new())
}

/// The grant of an API request's bearer token, or the 401/403 answer.
fn api_grant(auth: &Auth, head: &ApiHead) -> Result<crate::auth::Grant, Vec<u8>> {
    let now = now_unix();
    let unauthorized = |e: AuthError| api::json_error(401, e.message());
    let token = head
        .bearer
        .as_deref()
        .ok_or_else(|| unauthorized(AuthError::Missing))?;
    let grant = auth.verify(token, now).map_err(unauthorized)?;
    match (&head.doc, &head.target) {
        (None, ApiTarget::Call(ApiCall::List(list))) => {
            if auth.revocations().check(&grant, &list.prefix).is_err() {
                return Err(unauthorized(AuthError::Revoked));
            }
            if !api::list_allowed(&grant, &list.prefix) && !grant.is_server_admin() {
                return Err(api::json_error(
                    403,
                    "listing beyond the token's prefix needs an admin token covering *",
                ));
            }
        }
        (Some(doc), target) => {
            match auth.recheck(&grant, doc, now) {
                Ok(()) => {}
                Err(AuthError::WrongDoc) => {
                    return Err(api::json_error(403, AuthError::WrongDoc.message()))
                }
                Err(e) => return Err(unauthorized(e)),
            }
            let need = match target {
                ApiTarget::Edits => api::Need::Write,
                ApiTarget::Call(call) => call.needs(),
            };
            if !api::role_allows(&grant, need) {
                let why = match need {
                    api::Need::Admin => "deleting a document needs role admin",
                    _ => "editing a document needs role write",
                };
                return Err(api::json_error(403, why));
            }
        }
        (None, _) => return Err(api::json_error(404, "not found")),
    }
    Ok(grant)
}

/// Reads an API request's body (`POST /edits`; any other body is read and ignored), then
/// hands it on.
fn api_body(mut stream: TcpStream, call: ApiCallParts, mut body: Vec<u8>) -> Next {
    match read_body(&mut stream, &mut body, call.head.body_bytes) {
        BodyRead::Complete => {}
        BodyRead::More => return Next::Stay(Stage::ApiBody { stream, call, body }),
        BodyRead::Gone => return Next::Drop,
    }
    let ApiCallParts { head, grant } = call;
    let call = match head.target {
        ApiTarget::Call(call) => call,
        ApiTarget::Edits => match api::parse_edits(&body) {
            Ok(edits) => ApiCall::Edits(edits),
            Err(answer) => return write_answer(stream, answer, 0),
        },
    };
    Next::Api(
        stream,
        Box::new(ApiPending {
            doc: head.doc,
            call,
            grant,
        }),
    )
}

/// Where reading a request body stands.
enum BodyRead {
    /// `body` holds all `body_bytes`.
    Complete,
    /// The socket has no more for now: read on at the next readiness event.
    More,
    /// The client closed or the socket failed.
    Gone,
}

/// Reads what the socket has of a request body of `body_bytes` into `body` (the admin
/// revocation and the document API's edits).
fn read_body(stream: &mut TcpStream, body: &mut Vec<u8>, body_bytes: usize) -> BodyRead {
    let mut buf = [0u8; 4096];
    while body.len() < body_bytes {
        let want = (body_bytes - body.len()).min(buf.len());
        match stream.read(&mut buf[..want]) {
            Ok(0) => return BodyRead::Gone,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return BodyRead::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return BodyRead::Gone,
        }
    }
    BodyRead::Complete
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
    tokens: DoorTokens,
    peer: SocketAddr,
    ctx: &Ctx<'_>,
) -> Next {
    let options = ctx.options;
    match mid.handshake() {
        Ok(ws) => match doc {
            Some(doc) => admit_at_door(ws, doc, tokens, None, peer, options),
            None if options.plain_ws == PlainWs::RoundRobin => Next::HandOff(Box::new(Handoff {
                ws,
                doc: None,
                hello: None,
                peer,
                admitted: None,
            })),
            None => await_hello(ws, 0, tokens, false, peer, ctx),
        },
        Err(HandshakeError::Interrupted(mid)) => Next::Stay(Stage::Handshake { mid, doc, tokens }),
        Err(HandshakeError::Failure(e)) => {
            debug!("acceptor: handshake with {peer} failed: {e}");
            Next::Drop
        }
    }
}

/// The `hello` a plain `/ws` connection must send first, or the refusal of what it sent (the
/// same rules in the raw reader of a cluster node and in tungstenite's).
fn hello_or_refusal(text: &str) -> Result<Hello, ProtocolError> {
    match protocol::parse_client_message(text) {
        Ok(ClientMessage::Hello(hello)) if hello.doc.is_some() => Ok(hello),
        Ok(ClientMessage::Hello(_)) => {
            Err(ProtocolError::bad("hello on plain /ws must name a doc"))
        }
        Ok(ClientMessage::Op(op)) => {
            Err(ProtocolError::new(ErrorCode::NotJoined, "send hello first")
                .with_client_seq(Some(op.client_seq)))
        }
        Ok(ClientMessage::Presence(_) | ClientMessage::Auth(_)) => {
            Err(ProtocolError::new(ErrorCode::NotJoined, "send hello first"))
        }
        Err(err) => Err(err),
    }
}

fn await_hello(
    mut ws: WebSocket<TcpStream>,
    mut n_refused: u32,
    tokens: DoorTokens,
    check_route: bool,
    peer: SocketAddr,
    ctx: &Ctx<'_>,
) -> Next {
    let options = ctx.options;
    // Push out earlier refusals (read() alone only flushes control replies); what does not
    // fit now stays in tungstenite's buffer for the next writable event, or the shard.
    if let Err(e) = ws.flush() {
        if !matches!(&e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
            return Next::Drop;
        }
    }
    for _ in 0..FRAMES_PER_DRIVE_MAX {
        let refusal = match ws.read() {
            Ok(Message::Text(text)) => match hello_or_refusal(&text) {
                Ok(hello) => {
                    let doc = hello.doc.clone().unwrap_or_default();
                    let local = match (&options.cluster, check_route) {
                        (Some(cluster), true) => {
                            cluster.decide(&doc, false, true) == Decision::Local
                        }
                        _ => true,
                    };
                    if !local {
                        // The raw reader could not keep this hello's bytes for the owner.
                        return refuse_unavailable(ws);
                    }
                    return admit_at_door(ws, doc, tokens, Some(hello), peer, options);
                }
                Err(err) => err,
            },
            Ok(Message::Binary(_)) => ProtocolError::bad("binary frames are not allowed"),
            Ok(Message::Close(_)) => return refuse(ws),
            Ok(_) => continue, // Ping (answered by tungstenite), pong.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return Next::Stay(Stage::AwaitHello {
                    ws,
                    n_refused,
                    tokens,
                    check_route,
                });
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
    Next::Again(Stage::AwaitHello {
        ws,
        n_refused,
        tokens,
        check_route,
    })
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

fn refuse_start(ws: WebSocket<TcpStream>, err: &ProtocolError, reason: &'static str) -> Next {
    refuse_with(ws, err, CloseCode::Policy, reason)
}

/// Sends `err`, then a close with `code` and `reason`, then waits for the client's close.
fn refuse_with(
    mut ws: WebSocket<TcpStream>,
    err: &ProtocolError,
    code: CloseCode,
    reason: &'static str,
) -> Next {
    // WouldBlock still queues the frame in tungstenite's buffer; refuse() flushes it.
    let _ = ws.write(Message::Text(protocol::encode_error(err)));
    let _ = ws.close(Some(CloseFrame {
        code,
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
    for _ in 0..FRAMES_PER_DRIVE_MAX {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return Next::Stay(Stage::Refuse(ws));
            }
            Err(_) => return Next::Drop,
        }
    }
    Next::Again(Stage::Refuse(ws))
}
