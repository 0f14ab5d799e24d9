//! [`RoomHost`]: the shard's message handler. Routes each connection's messages to its
//! document's [`Room`], hands each turn's records to the shard's storage worker, releases
//! frames when their records are durable, and unloads idle documents.
//!
//! Owns the shard's rooms outright, at most `--docs-per-shard-max` of them loaded or loading
//! (a document without clients makes room for a new one; otherwise the `hello` gets
//! `overloaded` and a close 1013), and the shard's end of its [`StorageWorker`]; it never
//! calls a [`crate::storage::Storage`] itself, so the shard never waits on storage.
//!
//! The pipeline, per turn: rooms produce [`Effects`]; the records of every room go to the
//! worker as one [`StorageRequest::Commit`] (the worker syncs every commit queued while its
//! previous sync ran, together); each room's effects wait in its `held` queue, in order,
//! until the sync carrying them is reported durable (`StorageCompletion::Synced`); then
//! they are released, in turn order, so frames leave in `server_seq` order per document and
//! no client ever sees a `server_seq` a crash could take back. A room with nothing held
//! releases record-less effects (presence, refusals) at once.
//! A failed sync drops every room it carried: each op origin gets `unavailable` with its
//! `client_seq` (for that batch and every later one of the room, which the worker fenced and
//! never wrote), every client `unavailable` and a close 1013. A sync whose outcome is
//! unknown drops them the same way without any per-op answer; the document is reloaded from
//! storage before it serves again.
//! While storage is unavailable ([`StorageWorker::available`]) ops are refused with
//! `unavailable` before anything is applied, and a hello for a document not in memory gets
//! `unavailable` and a close 1013.
//! Each connection's `op` and `presence` messages draw on a token bucket
//! ([`super::rate_limit`], on the turn's clock); one over the budget gets `rate_limited`, is
//! not applied, and counts as a refusal.
//! With access control on (`src/auth`), a `hello` is admitted before its document is looked
//! up or loaded (the acceptor's verdict is checked once more, or `hello.token` verified), a
//! `read` connection's ops get `forbidden`, an `auth` message refreshes the token in place,
//! a timer closes connections whose token expired (1008 `token expired`, within a tick of
//! `exp`), and a revocation closes every connection it matches (1008 `revoked`).
//! Never touches a socket directly (the [`Net`] does) and never blocks on one.
//! The completion path (releasing held effects, failing rooms, opening loaded documents)
//! lives in `host/completions.rs`; it also tells the change feed ([`ShardFeed`], webhooks)
//! each room's durable head as its held effects are released, and `end_turn` flushes the
//! feed once per turn (a map and a `try_send` per document; never a wait).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use slab::Slab;
use tungstenite::{Message, Utf8Bytes};

use crate::acceptor::handoff::Admitted;
use crate::auth::{now_unix, Auth, AuthError, Grant, Rule};
use crate::config::{
    DOCS_PER_SHARD_MAX_DEFAULT, REFUSALS_BEFORE_CLOSE, REPLAY_WINDOW_SHARD_BYTES_DEFAULT,
};
use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, AuthRefresh, ClientMessage, ErrorCode, Hello, ProtocolError};
use crate::room::{Effects, JoinAuth, Room, RoomConfig};
use crate::storage::worker::{BatchId, DocAppend, StorageRequest, StorageWorker, WorkerGone};
use crate::storage::LogRecord;
use crate::webhooks::{ShardFeed, WebhookSink};

use super::conn::Net;
use super::event_loop::{Handler, OpenInfo};
use super::log_limit::LogLimit;
use super::rate_limit::{op_message_cost, RateLimit, TokenBucket};

mod api;
mod completions;
mod events;

/// Messages a connection may send between its `hello` and the end of its document's load;
/// they are handled after the join, in order. One more closes it with 1013.
pub const DEFERRED_MESSAGES_MAX: usize = 256;

/// Spent vectors of each kind the host keeps for the next turns' commits.
const SPENT_VECS_KEPT_MAX: usize = 64;

/// Longest a shutdown waits for the storage worker to report what is in flight.
const SHUTDOWN_STORAGE_WAIT: Duration = Duration::from_secs(5);

/// What the shard knows about one connection.
#[derive(Debug)]
struct Session {
    /// The document named by `/ws/<doc>`, which a hello must match.
    path_doc: Option<String>,
    /// The room (key in `RoomHost::rooms`) once joined.
    room_idx: Option<usize>,
    /// The document whose load this connection's hello waits for; set by `hello`, taken
    /// when the load completes.
    awaiting_load: Option<String>,
    /// Messages that arrived while `awaiting_load`; handled after the join (at most
    /// [`DEFERRED_MESSAGES_MAX`]).
    deferred: Vec<Message>,
    /// Messages refused so far; at [`REFUSALS_BEFORE_CLOSE`] the connection is closed 1008.
    n_refused: u32,
    /// Its budget of `op` and `presence` messages (`RoomHost::rate_limit`).
    bucket: TokenBucket,
    /// Whether its ops may be applied: `false` for a token with role `read` (kept here so the
    /// op path reads one flag, not the grant).
    can_write: bool,
    /// Its token, with access control on (boxed: 8 bytes per connection when off).
    access: Option<Box<Access>>,
    /// An op of it was refused because storage was unreachable, and the connection is being
    /// closed with 1013: nothing it sends after is applied (a later op may depend on the
    /// refused one), the client resends all of it, in order, after reconnecting.
    resync: bool,
}

/// A connection's token with access control on.
#[derive(Debug)]
struct Access {
    /// What the acceptor verified, until the `hello` is admitted.
    door: Option<Admitted>,
    /// The token in force once joined (replaced by an `auth` refresh).
    grant: Option<Grant>,
    /// Unique per session: tells this session's entries in `RoomHost::expiries` from those of
    /// an earlier session with the same slab key.
    serial: u64,
}

/// One room's effects drained at the end of a turn and not released yet.
#[derive(Debug)]
struct Held {
    /// The batch carrying its records (`None`: it had none, and goes with what precedes it).
    batch: Option<BatchId>,
    effects: Effects,
    /// The last `server_seq` its records carry (0 for none): the head the change feed reports
    /// once they are durable.
    head: u64,
}

/// One loaded document.
struct RoomSlot {
    room: Room,
    /// The room's document and epoch (fixed for its life), shared with each commit.
    doc: Arc<str>,
    epoch: Arc<str>,
    /// Tells this room apart from a later one at the same slab key.
    generation: u64,
    /// Whether the room is on `RoomHost::dirty` (has effects to drain this turn).
    in_dirty: bool,
    /// Effects waiting for their batch (or an earlier one) to be durable, oldest first.
    /// Filled by `end_turn`, drained in order by `release_held` or dropped by `fail_room`.
    held: VecDeque<Held>,
    /// When the last client left (`None` while it has clients).
    empty_since: Option<Instant>,
    /// Whether the room had effects since the last tick; a room without any for a whole tick
    /// frees the vectors it keeps for reuse (so idle rooms hold none).
    busy_this_tick: bool,
}

impl RoomSlot {
    /// Whether the room can leave memory: no client, nothing to drain or release.
    fn is_unloadable(&self) -> bool {
        !self.in_dirty && self.held.is_empty() && self.room.n_clients() == 0
    }
}

/// A batch handed to the worker whose sync has not been reported yet.
#[derive(Debug)]
struct InFlight {
    batch: BatchId,
    /// Rooms (slab key, generation) with records in it.
    rooms: Vec<(usize, u64)>,
}

/// Why the rooms of a batch are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Nothing of the batch is durable: its ops' senders get `unavailable` with `client_seq`.
    Failed,
    /// The batch may or may not be durable: its ops' senders get no answer.
    OutcomeUnknown,
    /// Cluster mode: the lease's fence refused the batch (nothing of the room's was written):
    /// its ops' senders get `unavailable` with `client_seq`, as for `Failed`.
    Fenced,
    /// Cluster mode: the lease is lost or could not be renewed in time; what is in flight may
    /// or may not commit (while the fence still holds): no per-op answer, as for
    /// `OutcomeUnknown`.
    LeaseLost,
}

/// The real shard handler: documents, sessions and the storage pipeline.
pub struct RoomHost {
    /// The shard's storage, on its own thread.
    worker: StorageWorker,
    room_config: RoomConfig,
    idle_unload: Duration,
    /// Documents kept loaded (or loading) at most.
    docs_max: usize,
    /// Bytes of replay-window echoes over all rooms kept at most (checked on every tick).
    window_bytes_max: usize,
    /// Every connection's budget of `op` and `presence` messages.
    rate_limit: RateLimit,
    /// The time of this turn, [`Net::now`], taken at every entry from the event loop (no
    /// clock read per message, and the simulator's clock drives it).
    turn_now: Instant,
    /// Warnings for hellos refused at `docs_max`: one line a second.
    docs_full_log: LogLimit,
    rooms: Slab<RoomSlot>,
    room_by_doc: HashMap<String, usize>,
    /// Documents whose load was sent to the worker, with the connections waiting for it.
    loading: HashMap<String, Vec<(ConnToken, Hello)>>,
    /// Cluster mode: documents being loaded when their lease was lost (`on_leases_lost`);
    /// their load is not used when it completes (a subset of `loading`'s keys).
    lost_while_loading: std::collections::HashSet<String>,
    /// Batches sent and not yet reported, oldest first (completions come in this order).
    in_flight: VecDeque<InFlight>,
    /// The next batch's id.
    next_batch: u64,
    /// The next room's generation.
    next_generation: u64,
    /// Empty vectors handed back by the worker (`Synced::spent`) and by finished batches,
    /// reused by the next commits (at most [`SPENT_VECS_KEPT_MAX`] of each kind).
    spent_appends: Vec<Vec<DocAppend>>,
    spent_records: Vec<Vec<LogRecord>>,
    spent_rooms: Vec<Vec<(usize, u64)>>,
    /// Indexed by connection slab key.
    sessions: Vec<Option<Session>>,
    /// Rooms with effects to drain at the end of this turn.
    dirty: Vec<usize>,
    /// Empty; swapped with `dirty` at the end of a turn so that neither allocates once grown.
    dirty_spare: Vec<usize>,
    /// Closes decided by the host (too many refusals) that must follow the frames released
    /// this turn.
    closes_after_turn: Vec<(ConnToken, u16, &'static str)>,
    /// Access control; `None` runs open.
    auth: Option<Arc<Auth>>,
    /// `(exp, connection key, session serial)` of every token in force, soonest first; the
    /// tick closes the connections whose token expired. An entry whose session is gone or
    /// whose token was refreshed is skipped when it comes up. One entry per join or refresh.
    expiries: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// The next session serial.
    next_serial: u64,
    /// The change feed (webhooks): told each document's durable head, flushed once per turn.
    feed: ShardFeed,
    /// The document API's requests waiting for loads (`host/api.rs`).
    api: api::ApiState,
}

impl RoomHost {
    /// A host with no documents loaded, keeping them through `worker`, at most
    /// [`DOCS_PER_SHARD_MAX_DEFAULT`] loaded at once (see [`RoomHost::with_docs_max`]).
    pub fn new(worker: StorageWorker, room_config: RoomConfig, idle_unload: Duration) -> RoomHost {
        RoomHost {
            worker,
            room_config,
            idle_unload,
            docs_max: DOCS_PER_SHARD_MAX_DEFAULT,
            window_bytes_max: REPLAY_WINDOW_SHARD_BYTES_DEFAULT,
            rate_limit: RateLimit::disabled(),
            turn_now: Instant::now(),
            docs_full_log: LogLimit::per_second(),
            rooms: Slab::new(),
            room_by_doc: HashMap::new(),
            loading: HashMap::new(),
            lost_while_loading: Default::default(),
            in_flight: VecDeque::new(),
            next_batch: 1,
            next_generation: 1,
            spent_appends: Vec::new(),
            spent_records: Vec::new(),
            spent_rooms: Vec::new(),
            sessions: Vec::new(),
            dirty: Vec::new(),
            dirty_spare: Vec::new(),
            closes_after_turn: Vec::new(),
            auth: None,
            expiries: BinaryHeap::new(),
            next_serial: 0,
            feed: ShardFeed::default(),
            api: api::ApiState::default(),
        }
    }

    /// Reports durable changes to `sink` (the change feed; a disabled sink by default).
    pub fn with_webhooks(mut self, sink: WebhookSink) -> RoomHost {
        self.feed = ShardFeed::new(sink);
        self
    }

    /// Admits connections by token (`None`: open, the default).
    pub fn with_auth(mut self, auth: Option<Arc<Auth>>) -> RoomHost {
        self.auth = auth;
        self
    }

    /// Decides whether `conn`'s `hello` for `doc` is admitted: `Ok(None)` with access control
    /// off, the grant when on. The acceptor's verdict is checked once more (time, scope,
    /// revocation; `hello.token` must equal the token it verified), or `hello.token` is
    /// verified here when the upgrade carried none.
    fn admit(
        &mut self,
        conn: ConnToken,
        hello: &Hello,
        doc: &str,
    ) -> Result<Option<Grant>, AuthError> {
        let Some(auth) = self.auth.clone() else {
            return Ok(None);
        };
        let now = now_unix();
        let door = self
            .session_mut(conn)
            .and_then(|s| s.access.as_mut())
            .and_then(|a| a.door.take());
        match door {
            Some(admitted) => {
                if hello
                    .token
                    .as_deref()
                    .is_some_and(|token| token != admitted.token)
                {
                    return Err(AuthError::Conflict);
                }
                auth.recheck(&admitted.grant, doc, now)?;
                Ok(Some(admitted.grant))
            }
            None => auth.authorize(hello.token.as_deref(), doc, now).map(Some),
        }
    }

    /// Keeps `grant` as `conn`'s token in force and schedules its expiry.
    fn keep_grant(&mut self, conn: ConnToken, grant: Grant) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let exp = grant.exp;
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.can_write = grant.role.can_write();
        session.access = Some(Box::new(Access {
            door: None,
            grant: Some(grant),
            serial,
        }));
        self.expiries.push(Reverse((exp, conn.0, serial)));
    }

    /// `{"type":"auth"}`: a new token for the same user covering the connection's document
    /// replaces the old one (`auth_ack`); anything else is `unauthorized` and a close 1008.
    fn refresh(
        &mut self,
        net: &mut Net,
        conn: ConnToken,
        room_idx: Option<usize>,
        refresh: AuthRefresh,
    ) {
        let Some(auth) = self.auth.clone() else {
            return self.refuse(
                net,
                conn,
                &ProtocolError::bad("this server does not use tokens"),
            );
        };
        let Some(idx) = room_idx.filter(|idx| self.rooms.contains(*idx)) else {
            let err = ProtocolError::new(ErrorCode::NotJoined, "send hello first");
            return self.refuse(net, conn, &err);
        };
        if !self.within_rate(conn, 1) {
            let err = ProtocolError::new(ErrorCode::RateLimited, RATE_LIMITED);
            return self.refuse(net, conn, &err);
        }
        let now = now_unix();
        let user = self
            .session_mut(conn)
            .and_then(|s| s.access.as_ref())
            .and_then(|a| a.grant.as_ref())
            .map(|g| g.user.clone());
        let doc = self.rooms[idx].room.doc_name();
        let verdict = auth.verify(&refresh.token, now).and_then(|grant| {
            if user.as_deref() != Some(grant.user.as_str()) {
                return Err(AuthError::OtherUser);
            }
            auth.recheck(&grant, doc, now)?;
            Ok(grant)
        });
        match verdict {
            Ok(grant) => {
                let (exp, role) = (grant.exp, grant.role.as_str());
                self.keep_grant(conn, grant);
                self.rooms[idx].room.auth_ack(conn, exp, role);
            }
            Err(e) => {
                let err = ProtocolError::new(ErrorCode::Unauthorized, e.message());
                self.rooms[idx].room.refuse(conn, &err);
                self.closes_after_turn.push((conn, 1008, e.close_reason()));
            }
        }
        self.mark_dirty(idx);
    }

    /// Closes `conn` for a token problem: `unauthorized` with the reason, then 1008.
    fn close_unauthorized(net: &mut Net, conn: ConnToken, e: AuthError) {
        net.metrics.figures.counters.msgs_refused += 1;
        let err = ProtocolError::new(ErrorCode::Unauthorized, e.message());
        net.send(conn, protocol::encode_error(&err));
        net.close(conn, 1008, e.close_reason());
    }

    /// Keeps at most `bytes_max` bytes of replay-window echoes over all rooms (see
    /// `Config::replay_window_shard_bytes`; default [`REPLAY_WINDOW_SHARD_BYTES_DEFAULT`]).
    pub fn with_replay_window_bytes_max(mut self, bytes_max: usize) -> RoomHost {
        self.window_bytes_max = bytes_max;
        self
    }

    /// Cuts every room's replay window in proportion to its size so that together they hold
    /// at most three quarters of the budget (the slack keeps the next ticks from cutting again
    /// at once). The oldest echoes go first; a room's window only ever loses its oldest end, so
    /// what remains is still every echo after some `server_seq`.
    fn shed_windows(&mut self, window_bytes: usize) -> usize {
        let target = self.window_bytes_max / 4 * 3;
        let mut kept = 0;
        for (_, slot) in self.rooms.iter_mut() {
            let bytes = slot.room.window_bytes();
            let keep = (bytes as u128 * target as u128 / window_bytes.max(1) as u128) as usize;
            slot.room.shrink_window(keep);
            kept += slot.room.window_bytes();
        }
        kept
    }

    /// Keeps at most `docs_max` documents loaded (at least one): a `hello` for another one
    /// first unloads a document without clients, or is refused with `overloaded` and a close
    /// 1013.
    pub fn with_docs_max(mut self, docs_max: usize) -> RoomHost {
        self.docs_max = docs_max.max(1);
        self
    }

    /// Limits every connection's `op` and `presence` messages to `rate_limit` (none by
    /// default); a message over it gets `rate_limited` and is not applied.
    pub fn with_rate_limit(mut self, rate_limit: RateLimit) -> RoomHost {
        self.rate_limit = rate_limit;
        self
    }

    /// Whether anything sent to the storage worker is still unanswered.
    pub fn storage_pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.loading.is_empty()
    }

    /// Waits up to `timeout` for the storage worker's answers to everything in flight and
    /// carries them out (shutdown, tools and benchmarks; the shard loop never waits).
    pub fn wait_for_storage(&mut self, net: &mut Net, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.storage_pending() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!("shard: storage did not answer within {timeout:?}; its batches stay unacknowledged");
                return;
            }
            match self.worker.recv_timeout(left) {
                Ok(Some(completion)) => self.complete(net, completion),
                Ok(None) => {}
                Err(WorkerGone) => worker_gone(),
            }
        }
        self.end_turn(net);
    }

    /// The time of this turn.
    fn turn_now(&self) -> Instant {
        self.turn_now
    }

    /// Takes `cost` tokens from `conn`'s bucket; `false` means the message is over the budget
    /// and must be refused with `rate_limited`.
    fn within_rate(&mut self, conn: ConnToken, cost: u64) -> bool {
        if !self.rate_limit.enabled() {
            return true;
        }
        let now = self.turn_now();
        let limit = self.rate_limit;
        match self.session_mut(conn) {
            Some(session) => session.bucket.try_take(&limit, cost, now),
            None => true,
        }
    }

    /// Queues a request for the storage worker.
    fn request(&self, request: StorageRequest) {
        if self.worker.send(request).is_err() {
            worker_gone();
        }
    }

    /// Makes room for one more document: unloads the document without clients that has been
    /// empty the longest. A room with effects not yet released is not unloadable (its
    /// records may not be durable yet). `false` when every loaded document has clients.
    fn unload_one_empty(&mut self, net: &mut Net) -> bool {
        let victim = self
            .rooms
            .iter()
            .filter(|(_, slot)| slot.is_unloadable())
            .min_by_key(|(_, slot)| slot.empty_since)
            .map(|(idx, _)| idx);
        match victim {
            Some(idx) => {
                self.unload(net, idx);
                true
            }
            None => false,
        }
    }

    fn session_mut(&mut self, conn: ConnToken) -> Option<&mut Session> {
        self.sessions.get_mut(conn.0).and_then(Option::as_mut)
    }

    fn mark_dirty(&mut self, room_idx: usize) {
        if let Some(slot) = self.rooms.get_mut(room_idx) {
            if !slot.in_dirty {
                slot.in_dirty = true;
                self.dirty.push(room_idx);
            }
        }
    }

    /// A refused message: an `error` in order with the connection's other frames, and a close
    /// 1008 once it has been refused [`REFUSALS_BEFORE_CLOSE`] times.
    fn refuse(&mut self, net: &mut Net, conn: ConnToken, err: &ProtocolError) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        let room_idx = session.room_idx;
        // Debug, not warn: a hostile client must not be able to flood the log (the
        // msgs_refused counter is what operators watch).
        debug!(
            "shard: refused a message from {:?}: {} ({})",
            net.peer(conn),
            err.code,
            err.message
        );
        match room_idx.and_then(|idx| self.rooms.get_mut(idx).map(|slot| (idx, slot))) {
            Some((idx, slot)) => {
                // Counted when the room's frames are released (with the room's own refusals).
                slot.room.refuse(conn, err);
                self.mark_dirty(idx);
            }
            None => {
                // Not joined: no room frame can be pending for it, so order holds.
                net.metrics.figures.counters.msgs_refused += 1;
                net.send(conn, protocol::encode_error(err));
                if counts_as_refusal(err.code) {
                    self.count_refusal(conn);
                }
            }
        }
    }

    /// Counts one refusal sent to `conn`; the [`REFUSALS_BEFORE_CLOSE`]th schedules a close
    /// 1008 after this turn's frames.
    fn count_refusal(&mut self, conn: ConnToken) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.n_refused += 1;
        if session.n_refused == REFUSALS_BEFORE_CLOSE {
            self.closes_after_turn
                .push((conn, 1008, "too many refused messages"));
        }
    }

    fn hello(&mut self, net: &mut Net, conn: ConnToken, hello: Hello) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if session.room_idx.is_some() {
            return self.refuse(net, conn, &ProtocolError::bad("already joined"));
        }
        let doc = match (&session.path_doc, &hello.doc) {
            (Some(path_doc), Some(doc)) if path_doc != doc => {
                net.metrics.figures.counters.msgs_refused += 1;
                net.send(
                    conn,
                    protocol::encode_error(&ProtocolError::bad("hello.doc differs from the path")),
                );
                net.close(conn, 1008, "doc mismatch");
                return;
            }
            (Some(doc), _) | (None, Some(doc)) => doc.clone(),
            (None, None) => {
                return self.refuse(net, conn, &ProtocolError::bad("hello must name a doc"))
            }
        };
        // Decided before the document is looked up or loaded: a refused token costs the
        // shard no document. The grant is kept at once, so its expiry also covers the wait
        // for a load.
        match self.admit(conn, &hello, &doc) {
            Ok(Some(grant)) => self.keep_grant(conn, grant),
            Ok(None) => {}
            Err(e) => {
                debug!("shard: {:?} refused: {}", net.peer(conn), e.message());
                return RoomHost::close_unauthorized(net, conn, e);
            }
        }
        if let Some(room_idx) = self.room_by_doc.get(&doc).copied() {
            return self.join(conn, room_idx, &hello);
        }
        if let Some(waiters) = self.loading.get_mut(&doc) {
            waiters.push((conn, hello));
            if let Some(session) = self.session_mut(conn) {
                session.awaiting_load = Some(doc);
            }
            return;
        }
        if !self.worker.available() {
            return refuse_storage_unavailable(net, conn);
        }
        if self.rooms.len() + self.loading.len() >= self.docs_max && !self.unload_one_empty(net) {
            debug!(
                "shard: {} documents loaded, refusing {:?}",
                self.docs_max,
                net.peer(conn)
            );
            if let Some(n) = self.docs_full_log.hit(self.turn_now) {
                warn!(
                    "shard: {} documents loaded, all with clients; refused {n} hello(s) for another one with overloaded",
                    self.docs_max
                );
            }
            net.metrics.figures.counters.msgs_refused += 1;
            let err = ProtocolError::new(
                ErrorCode::Overloaded,
                "too many documents open on this server; try again later",
            );
            net.send(conn, protocol::encode_error(&err));
            net.close(conn, 1013, "too many documents open, try again later");
            return;
        }
        // Lazy load, through the worker: this hello is answered when it completes.
        self.request(StorageRequest::Load { doc: doc.clone() });
        self.loading.insert(doc.clone(), vec![(conn, hello)]);
        if let Some(session) = self.session_mut(conn) {
            session.awaiting_load = Some(doc);
        }
    }

    /// `conn` joins the loaded room `room_idx`.
    fn join(&mut self, conn: ConnToken, room_idx: usize, hello: &Hello) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.room_idx = Some(room_idx);
        // Who joins, with access control on (the grant `hello` admitted).
        let grant = session.access.as_ref().and_then(|a| a.grant.clone());
        let Some(slot) = self.rooms.get_mut(room_idx) else {
            return;
        };
        slot.empty_since = None;
        let join_auth = grant.as_ref().map(|grant| JoinAuth {
            user: &grant.user,
            name: grant.name.as_deref(),
            role: grant.role.as_str(),
            exp: grant.exp,
        });
        slot.room.join_as(conn, hello, join_auth);
        self.mark_dirty(room_idx);
    }

    fn unload(&mut self, net: &mut Net, room_idx: usize) {
        if let Some(slot) = self.rooms.try_remove(room_idx) {
            debug_assert!(slot.held.is_empty(), "unloaded with effects held");
            let doc = slot.room.doc_name().to_owned();
            self.room_by_doc.remove(&doc);
            if slot.in_dirty {
                self.dirty.retain(|&idx| idx != room_idx);
            }
            self.request(StorageRequest::Release { doc });
            net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
            debug!("shard: unloaded a document ({} loaded)", self.rooms.len());
        }
    }
}

/// The `server_seq` of the last op record among `records` (0 for none).
fn last_server_seq(records: &[LogRecord]) -> u64 {
    records
        .iter()
        .rev()
        .find_map(|record| match record {
            LogRecord::Ops { server_seq, .. } => Some(*server_seq),
            LogRecord::ReplicasReserved { .. }
            | LogRecord::ReplicaOwner { .. }
            | LogRecord::Accepted { .. } => None,
        })
        .unwrap_or(0)
}

/// The message of a `rate_limited` error.
const RATE_LIMITED: &str = "too many messages; slow down and resend this one later";

/// How every `unavailable` error frame starts (the encoder puts `type` and `code` first).
const UNAVAILABLE_PREFIX: &str = "{\"type\":\"error\",\"code\":\"unavailable\"";

/// Whether a refusal with `code` counts towards [`REFUSALS_BEFORE_CLOSE`]: the server's own
/// unavailability is not the client's fault.
fn counts_as_refusal(code: ErrorCode) -> bool {
    code != ErrorCode::Unavailable
}

/// Whether a released frame is of `type` (the encoders always put `type` first).
fn frame_is(frame: &Utf8Bytes, type_prefix: &str) -> bool {
    frame.as_str().starts_with(type_prefix)
}

/// A hello for a document not in memory while storage is unavailable: `unavailable` and a
/// close 1013 (the client reconnects later).
fn refuse_storage_unavailable(net: &mut Net, conn: ConnToken) {
    net.metrics.figures.counters.msgs_refused += 1;
    let err = ProtocolError::new(
        ErrorCode::Unavailable,
        "storage unavailable; try again later",
    );
    net.send(conn, protocol::encode_error(&err));
    net.close(conn, 1013, "storage unavailable, try again later");
}

/// Cluster mode: a hello for a document whose lease this node does not hold (another node
/// owns it, or this node is draining): `unavailable` and a close 1013 (the client reconnects,
/// and the routing stage sends it to the owner).
fn refuse_not_owner(net: &mut Net, conn: ConnToken) {
    net.metrics.figures.counters.msgs_refused += 1;
    let err = ProtocolError::new(
        ErrorCode::Unavailable,
        "another node serves this document; reconnect",
    );
    net.send(conn, protocol::encode_error(&err));
    net.close(conn, 1013, "document served elsewhere, reconnect");
}

/// The storage worker exited while the shard still runs: a bug in a storage backend (it
/// panicked). The shard dies with it (its handler panics), loudly, as any handler bug does.
fn worker_gone() -> ! {
    panic!("the shard's storage worker is gone (it panicked); its acknowledgements cannot continue")
}

impl Handler for RoomHost {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, info: OpenInfo) {
        self.turn_now = net.now();
        if self.sessions.len() <= conn.0 {
            self.sessions.resize_with(conn.0 + 1, || None);
        }
        let now = self.turn_now();
        let bucket = self.rate_limit.full_bucket(now);
        let access = info.admitted.map(|admitted| {
            self.next_serial += 1;
            Box::new(Access {
                door: Some(*admitted),
                grant: None,
                serial: self.next_serial,
            })
        });
        self.sessions[conn.0] = Some(Session {
            path_doc: info.doc,
            room_idx: None,
            awaiting_load: None,
            deferred: Vec::new(),
            n_refused: 0,
            bucket,
            can_write: true,
            access,
            resync: false,
        });
        if let Some(hello) = info.hello {
            self.hello(net, conn, hello);
        }
    }

    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
        self.turn_now = net.now();
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if session.resync {
            // Closing for a resend (see `Session::resync`): not applied, not answered.
            return;
        }
        if session.awaiting_load.is_some() {
            // Its hello is not answered yet: keep the order, handle it after the join.
            if session.deferred.len() < DEFERRED_MESSAGES_MAX {
                session.deferred.push(message);
            } else {
                net.close(conn, 1013, "too many messages before hello_ack");
            }
            return;
        }
        let text = match message {
            Message::Text(text) => text,
            _ => {
                return self.refuse(
                    net,
                    conn,
                    &ProtocolError::bad("binary frames are not allowed"),
                )
            }
        };
        let parsed = protocol::parse_client_message(&text);
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        let (room_idx, can_write) = (session.room_idx, session.can_write);
        match (parsed, room_idx) {
            (Err(err), _) => self.refuse(net, conn, &err),
            (Ok(ClientMessage::Hello(hello)), _) => self.hello(net, conn, hello),
            (Ok(ClientMessage::Auth(refresh)), _) => self.refresh(net, conn, room_idx, refresh),
            (Ok(ClientMessage::Op(op)), Some(_)) if !can_write => {
                let err = ProtocolError::new(
                    ErrorCode::Forbidden,
                    "read-only token: ops are not allowed",
                )
                .with_client_seq(Some(op.client_seq));
                self.refuse(net, conn, &err);
            }
            (Ok(ClientMessage::Op(op)), Some(idx)) if !self.worker.available() => {
                // Before anything is applied: nothing of it reaches the room or the log. The
                // connection is closed with 1013 after the error, and nothing it sends after
                // is applied: its next ops may build on this one (they would be refused with
                // `unknown_id`, and a client that drops them diverges), and clients resend
                // what is pending after a reconnect, in order (found by the simulator).
                let err = ProtocolError::new(
                    ErrorCode::Unavailable,
                    "storage unavailable; reconnect and resend this op",
                )
                .with_client_seq(Some(op.client_seq));
                self.refuse(net, conn, &err);
                if let Some(session) = self.session_mut(conn) {
                    session.resync = true;
                }
                if let Some(slot) = self.rooms.get_mut(idx) {
                    slot.room
                        .close_after_frames(conn, 1013, "storage unavailable, reconnect");
                }
            }
            (Ok(ClientMessage::Op(op)), Some(_))
                if !self.within_rate(conn, op_message_cost(&op.ops)) =>
            {
                let err = ProtocolError::new(ErrorCode::RateLimited, RATE_LIMITED)
                    .with_client_seq(Some(op.client_seq));
                self.refuse(net, conn, &err);
            }
            (Ok(ClientMessage::Presence(_)), Some(_)) if !self.within_rate(conn, 1) => {
                let err = ProtocolError::new(ErrorCode::RateLimited, RATE_LIMITED);
                self.refuse(net, conn, &err);
            }
            (Ok(ClientMessage::Op(op)), Some(idx)) => {
                let started = Instant::now();
                if let Some(slot) = self.rooms.get_mut(idx) {
                    slot.room.handle_op(conn, op);
                }
                ShardMetrics::record(
                    &mut net.metrics.figures.histograms.integrate_us,
                    started.elapsed(),
                );
                self.mark_dirty(idx);
            }
            (Ok(ClientMessage::Presence(update)), Some(idx)) => {
                if let Some(slot) = self.rooms.get_mut(idx) {
                    slot.room.handle_presence(conn, update);
                }
                self.mark_dirty(idx);
            }
            (Ok(ClientMessage::Op(op)), None) => {
                let err = ProtocolError::new(ErrorCode::NotJoined, "send hello first")
                    .with_client_seq(Some(op.client_seq));
                self.refuse(net, conn, &err);
            }
            (Ok(ClientMessage::Presence(_)), None) => {
                self.refuse(
                    net,
                    conn,
                    &ProtocolError::new(ErrorCode::NotJoined, "send hello first"),
                );
            }
        }
    }

    fn on_closed(&mut self, net: &mut Net, conn: ConnToken) {
        self.turn_now = net.now();
        let Some(session) = self.sessions.get_mut(conn.0).and_then(Option::take) else {
            return;
        };
        if let Some(doc) = &session.awaiting_load {
            // A later connection at the same slab key must not be answered with this hello.
            if let Some(waiters) = self.loading.get_mut(doc) {
                waiters.retain(|(waiter, _)| *waiter != conn);
            }
        }
        if let Some(idx) = session.room_idx {
            if let Some(slot) = self.rooms.get_mut(idx) {
                // Its slab key may be reused before the held effects are released: nothing
                // meant for it may reach the next connection.
                for held in &mut slot.held {
                    held.effects.frames.retain(|(to, _)| *to != conn);
                    held.effects.closes.retain(|(to, _, _)| *to != conn);
                    held.effects.op_origins.retain(|(from, _)| *from != conn);
                }
                // Nor what the room queued for it earlier in this turn (not drained yet).
                slot.room.forget(conn);
                slot.room.leave(conn);
                if slot.room.n_clients() == 0 {
                    slot.empty_since = Some(self.turn_now);
                }
                self.mark_dirty(idx);
            }
        }
    }

    fn end_turn(&mut self, net: &mut Net) {
        self.turn_now = net.now();
        self.take_completions(net);
        self.feed.flush();
        net.metrics.figures.counters.storage_batches_in_flight = self.in_flight.len() as u64;
        if self.dirty.is_empty() && self.closes_after_turn.is_empty() {
            return;
        }
        let batch = BatchId(self.next_batch);
        let mut appends = self.spent_appends.pop().unwrap_or_default();
        let mut batch_rooms = self.spent_rooms.pop().unwrap_or_default();
        let mut dirty = std::mem::take(&mut self.dirty_spare);
        std::mem::swap(&mut dirty, &mut self.dirty);
        let mut turn_ms = None;
        for room_idx in dirty.drain(..) {
            let Some(slot) = self.rooms.get_mut(room_idx) else {
                continue;
            };
            slot.in_dirty = false;
            slot.room.stamp_accepted(api::turn_time_ms(&mut turn_ms));
            let mut effects = slot.room.take_effects();
            if effects.is_empty() {
                continue;
            }
            if !effects.records.is_empty() {
                let head = last_server_seq(&effects.records);
                appends.push(DocAppend {
                    doc: slot.doc.clone(),
                    epoch: slot.epoch.clone(),
                    records: std::mem::replace(
                        &mut effects.records,
                        self.spent_records.pop().unwrap_or_default(),
                    ),
                });
                slot.held.push_back(Held {
                    batch: Some(batch),
                    effects,
                    head,
                });
                batch_rooms.push((room_idx, slot.generation));
            } else if slot.held.is_empty() {
                // Nothing of this room waits for storage: released now, in order.
                self.release(net, room_idx, effects);
            } else {
                slot.held.push_back(Held {
                    batch: None,
                    effects,
                    head: 0,
                });
            }
        }
        self.dirty_spare = dirty;
        if appends.is_empty() {
            self.spent_appends.push(appends);
            self.spent_rooms.push(batch_rooms);
        } else {
            self.next_batch += 1;
            self.request(StorageRequest::Commit { batch, appends });
            self.in_flight.push_back(InFlight {
                batch,
                rooms: batch_rooms,
            });
        }
        net.metrics.figures.counters.storage_batches_in_flight = self.in_flight.len() as u64;
        for (conn, code, reason) in std::mem::take(&mut self.closes_after_turn) {
            net.close(conn, code, reason);
        }
    }

    fn on_api(&mut self, net: &mut Net, request: Box<crate::api::ApiRequest>) {
        self.api_request(net, *request);
    }

    fn on_stream(&mut self, net: &mut Net, token: mio::Token) {
        self.api_stream_event(net, token);
    }

    fn on_revoke(&mut self, net: &mut Net, rule: &Rule) -> usize {
        let mut matched = Vec::new();
        for (key, session) in self.sessions.iter().enumerate() {
            let Some(session) = session else { continue };
            let Some(access) = &session.access else {
                continue;
            };
            let Some(grant) = access
                .grant
                .as_ref()
                .or(access.door.as_ref().map(|door| &door.grant))
            else {
                continue;
            };
            let doc = match session.room_idx.and_then(|idx| self.rooms.get(idx)) {
                Some(slot) => slot.room.doc_name(),
                None => session.path_doc.as_deref().unwrap_or_default(),
            };
            if rule.closes(grant, doc) {
                matched.push(ConnToken(key));
            }
        }
        for &conn in &matched {
            RoomHost::close_unauthorized(net, conn, AuthError::Revoked);
            if let Some(session) = self.session_mut(conn) {
                session.access = None;
                session.can_write = false;
            }
        }
        matched.len() + self.api_close_denied(net, Some(rule))
    }

    fn on_tick(&mut self, net: &mut Net, now: Instant) {
        self.turn_now = now;
        if !self.expiries.is_empty() {
            let now_secs = now_unix();
            while let Some(&Reverse((exp, key, serial))) = self.expiries.peek() {
                if exp > now_secs {
                    break;
                }
                self.expiries.pop();
                let current = self
                    .sessions
                    .get(key)
                    .and_then(Option::as_ref)
                    .and_then(|s| s.access.as_ref())
                    .is_some_and(|a| {
                        a.serial == serial && a.grant.as_ref().is_some_and(|g| g.exp == exp)
                    });
                if current {
                    RoomHost::close_unauthorized(net, ConnToken(key), AuthError::Expired);
                    if let Some(session) = self.session_mut(ConnToken(key)) {
                        session.access = None;
                        session.can_write = false;
                    }
                }
            }
        }
        self.api_close_denied(net, None);
        let mut idle = Vec::new();
        let mut window_bytes = 0;
        for (idx, slot) in self.rooms.iter_mut() {
            window_bytes += slot.room.window_bytes();
            if !std::mem::take(&mut slot.busy_this_tick) {
                slot.room.free_effects_buffers();
            }
            if !slot.is_unloadable() {
                slot.empty_since = None;
                continue;
            }
            // A room can be empty without anyone having left (a refused hello).
            let since = *slot.empty_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= self.idle_unload {
                idle.push(idx);
            }
        }
        for room_idx in idle {
            self.unload(net, room_idx);
        }
        if window_bytes > self.window_bytes_max {
            window_bytes = self.shed_windows(window_bytes);
        }
        net.metrics.figures.counters.replay_window_bytes = window_bytes as u64;
    }

    fn on_leases_lost(&mut self, net: &mut Net, docs: Option<&[String]>) {
        let lost: Vec<usize> = match docs {
            Some(docs) => docs
                .iter()
                .filter_map(|doc| self.room_by_doc.get(doc).copied())
                .collect(),
            None => self.rooms.iter().map(|(idx, _)| idx).collect(),
        };
        // A load in flight may have acquired the lease just before it was lost: its result
        // must not open a room.
        match docs {
            Some(docs) => self.lost_while_loading.extend(
                docs.iter()
                    .filter(|doc| self.loading.contains_key(*doc))
                    .cloned(),
            ),
            None => self.lost_while_loading.extend(self.loading.keys().cloned()),
        }
        if !lost.is_empty() {
            warn!(
                "shard: lease lost for {} document(s); dropping them",
                lost.len()
            );
        }
        for room_idx in lost {
            self.fail_room(net, room_idx, Failure::LeaseLost);
        }
    }

    fn on_shutdown(&mut self, net: &mut Net) {
        self.end_turn(net);
        self.wait_for_storage(net, SHUTDOWN_STORAGE_WAIT);
    }
}

#[cfg(test)]
impl RoomHost {
    /// FOR TESTS: the text and head of `doc`, when it is loaded.
    pub(crate) fn doc_state(&self, doc: &str) -> Option<(String, u64)> {
        let idx = *self.room_by_doc.get(doc)?;
        let room = &self.rooms.get(idx)?.room;
        Some((room.text(), room.head()))
    }
}
