//! [`RoomHost`]: the shard's message handler. Routes each connection's messages to its
//! document's [`Room`], runs the turn-level group commit, and unloads idle documents.
//!
//! Owns the shard's rooms and its [`Storage`] outright, at most `--docs-per-shard-max` of
//! them loaded (a document without clients makes room for a new one; otherwise the `hello`
//! gets `overloaded` and a close 1013). Per turn: rooms produce
//! [`Effects`]; every record is appended, storage syncs once, and only then are the frames
//! released to the connections (no client ever sees a `server_seq` a crash could take back).
//! Each connection's `op` and `presence` messages draw on a token bucket
//! ([`super::rate_limit`], on the turn's clock); one over the budget gets `rate_limited`, is
//! not applied, and counts as a refusal.
//! Never touches a socket directly (the [`Net`] does) and never blocks on one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use log::{debug, warn};
use slab::Slab;
use tungstenite::{Message, Utf8Bytes};

use crate::config::{
    DOCS_PER_SHARD_MAX_DEFAULT, REFUSALS_BEFORE_CLOSE, REPLAY_WINDOW_SHARD_BYTES_DEFAULT,
};
use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ClientMessage, ErrorCode, Hello, ProtocolError};
use crate::room::{Effects, Room, RoomConfig};
use crate::storage::Storage;

use super::conn::Net;
use super::event_loop::{Handler, OpenInfo};
use super::log_limit::LogLimit;
use super::rate_limit::{op_message_cost, RateLimit, TokenBucket};

/// What the shard knows about one connection.
#[derive(Debug)]
struct Session {
    /// The document named by `/ws/<doc>`, which a hello must match.
    path_doc: Option<String>,
    /// The room (key in `RoomHost::rooms`) once joined.
    room_idx: Option<usize>,
    /// Messages refused so far; at [`REFUSALS_BEFORE_CLOSE`] the connection is closed 1008.
    n_refused: u32,
    /// Its budget of `op` and `presence` messages (`RoomHost::rate_limit`).
    bucket: TokenBucket,
}

/// One loaded document.
struct RoomSlot {
    room: Room,
    /// Whether the room is on `RoomHost::dirty` (has effects to drain this turn).
    in_dirty: bool,
    /// When the last client left (`None` while it has clients).
    empty_since: Option<Instant>,
    /// Whether the room had effects since the last tick; a room without any for a whole tick
    /// frees the vectors it keeps for reuse (so idle rooms hold none).
    busy_this_tick: bool,
}

/// The real shard handler: documents, sessions and the group commit.
pub struct RoomHost {
    storage: Box<dyn Storage>,
    room_config: RoomConfig,
    idle_unload: Duration,
    /// Documents kept loaded at most.
    docs_max: usize,
    /// Bytes of replay-window echoes over all rooms kept at most (checked on every tick).
    window_bytes_max: usize,
    /// Every connection's budget of `op` and `presence` messages.
    rate_limit: RateLimit,
    /// The shard's clock for this turn: read once, at the first message of a turn that needs
    /// it, and forgotten at the end of the turn (no clock read per message).
    turn_now: Option<Instant>,
    /// Warnings for hellos refused at `docs_max`: one line a second.
    docs_full_log: LogLimit,
    rooms: Slab<RoomSlot>,
    room_by_doc: HashMap<String, usize>,
    /// Indexed by connection slab key.
    sessions: Vec<Option<Session>>,
    /// Rooms with effects to drain at the end of this turn.
    dirty: Vec<usize>,
    /// Empty; swapped with `dirty` at the end of a turn so that neither allocates once grown.
    dirty_spare: Vec<usize>,
    /// Empty between turns; the turn's drained effects, kept for its allocation.
    batch: Vec<(usize, Effects)>,
    /// Closes decided by the host (too many refusals) that must follow the frames the rooms
    /// queued this turn.
    closes_after_turn: Vec<(ConnToken, u16, &'static str)>,
}

impl RoomHost {
    /// A host with no documents loaded, keeping them in `storage`, at most
    /// [`DOCS_PER_SHARD_MAX_DEFAULT`] loaded at once (see [`RoomHost::with_docs_max`]).
    pub fn new(
        storage: Box<dyn Storage>,
        room_config: RoomConfig,
        idle_unload: Duration,
    ) -> RoomHost {
        RoomHost {
            storage,
            room_config,
            idle_unload,
            docs_max: DOCS_PER_SHARD_MAX_DEFAULT,
            window_bytes_max: REPLAY_WINDOW_SHARD_BYTES_DEFAULT,
            rate_limit: RateLimit::disabled(),
            turn_now: None,
            docs_full_log: LogLimit::per_second(),
            rooms: Slab::new(),
            room_by_doc: HashMap::new(),
            sessions: Vec::new(),
            dirty: Vec::new(),
            dirty_spare: Vec::new(),
            batch: Vec::new(),
            closes_after_turn: Vec::new(),
        }
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

    /// The time of this turn (read at most once per turn).
    fn turn_now(&mut self) -> Instant {
        *self.turn_now.get_or_insert_with(Instant::now)
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

    /// Makes room for one more document: unloads the document without clients that has been
    /// empty the longest. A room still holding effects of this turn is not unloadable (its
    /// records are not durable yet). `false` when every loaded document has clients.
    fn unload_one_empty(&mut self, net: &mut Net) -> bool {
        let victim = self
            .rooms
            .iter()
            .filter(|(_, slot)| !slot.in_dirty && slot.room.n_clients() == 0)
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
                self.count_refusal(conn);
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
        let room_idx = match self.room_by_doc.get(&doc).copied() {
            Some(idx) => idx,
            None if self.rooms.len() >= self.docs_max && !self.unload_one_empty(net) => {
                debug!(
                    "shard: {} documents loaded, refusing {:?}",
                    self.docs_max,
                    net.peer(conn)
                );
                if let Some(n) = self.docs_full_log.hit(Instant::now()) {
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
            None => match self.open_room(net, &doc) {
                Some(idx) => idx,
                None => {
                    let err =
                        ProtocolError::new(ErrorCode::Unavailable, "document could not be loaded");
                    return self.refuse(net, conn, &err);
                }
            },
        };
        if let Some(session) = self.session_mut(conn) {
            session.room_idx = Some(room_idx);
        }
        let slot = &mut self.rooms[room_idx];
        slot.empty_since = None;
        slot.room.join(conn, &hello);
        self.mark_dirty(room_idx);
    }

    fn open_room(&mut self, net: &mut Net, doc: &str) -> Option<usize> {
        let stored = match self.storage.load(doc) {
            Ok(stored) => stored,
            Err(e) => {
                net.metrics.figures.counters.storage_errors += 1;
                warn!("shard: loading a document failed: {e}");
                return None;
            }
        };
        match Room::open(doc.to_owned(), stored, self.room_config.clone()) {
            Ok(room) => {
                let idx = self.rooms.insert(RoomSlot {
                    room,
                    in_dirty: false,
                    empty_since: None,
                    busy_this_tick: false,
                });
                self.room_by_doc.insert(doc.to_owned(), idx);
                net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
                debug!("shard: opened a document ({} loaded)", self.rooms.len());
                Some(idx)
            }
            Err(e) => {
                warn!("shard: opening a document failed: {e}");
                self.storage.release(doc);
                None
            }
        }
    }

    fn unload(&mut self, net: &mut Net, room_idx: usize) {
        if let Some(slot) = self.rooms.try_remove(room_idx) {
            let doc = slot.room.doc_name().to_owned();
            self.room_by_doc.remove(&doc);
            self.storage.release(&doc);
            net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
            debug!("shard: unloaded a document ({} loaded)", self.rooms.len());
        }
    }

    /// Storage failed for these rooms: their frames are discarded, every op origin gets
    /// `unavailable` with its `client_seq`, every client gets `unavailable` and a close 1013,
    /// and the room leaves memory without its state being used again (disk is the truth).
    fn fail_rooms(&mut self, net: &mut Net, failed: Vec<(usize, Effects)>) {
        for (room_idx, effects) in failed {
            for (conn, client_seq) in effects.op_origins {
                let err = ProtocolError::new(
                    ErrorCode::Unavailable,
                    "storage failed; reconnect with since and resend",
                )
                .with_client_seq(Some(client_seq));
                net.send(conn, protocol::encode_error(&err));
            }
            let members: Vec<usize> = self
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| s.as_ref().is_some_and(|s| s.room_idx == Some(room_idx)))
                .map(|(key, _)| key)
                .collect();
            let err = protocol::encode_error(&ProtocolError::new(
                ErrorCode::Unavailable,
                "storage failed",
            ));
            for key in members {
                if let Some(Some(session)) = self.sessions.get_mut(key) {
                    session.room_idx = None;
                }
                net.send(ConnToken(key), err.clone());
                net.close(ConnToken(key), 1013, "storage failed, reconnect");
            }
            self.unload(net, room_idx);
        }
    }
}

/// The message of a `rate_limited` error.
const RATE_LIMITED: &str = "too many messages; slow down and resend this one later";

/// Whether a released frame is of `type` (the encoders always put `type` first).
fn frame_is(frame: &Utf8Bytes, type_prefix: &str) -> bool {
    frame.as_str().starts_with(type_prefix)
}

impl Handler for RoomHost {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, info: OpenInfo) {
        if self.sessions.len() <= conn.0 {
            self.sessions.resize_with(conn.0 + 1, || None);
        }
        let now = self.turn_now();
        let bucket = self.rate_limit.full_bucket(now);
        self.sessions[conn.0] = Some(Session {
            path_doc: info.doc,
            room_idx: None,
            n_refused: 0,
            bucket,
        });
        if let Some(hello) = info.hello {
            self.hello(net, conn, hello);
        }
    }

    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
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
        let room_idx = session.room_idx;
        match (parsed, room_idx) {
            (Err(err), _) => self.refuse(net, conn, &err),
            (Ok(ClientMessage::Hello(hello)), _) => self.hello(net, conn, hello),
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

    fn on_closed(&mut self, _net: &mut Net, conn: ConnToken) {
        let Some(session) = self.sessions.get_mut(conn.0).and_then(Option::take) else {
            return;
        };
        if let Some(idx) = session.room_idx {
            if let Some(slot) = self.rooms.get_mut(idx) {
                slot.room.leave(conn);
                if slot.room.n_clients() == 0 {
                    slot.empty_since = Some(Instant::now());
                }
                self.mark_dirty(idx);
            }
        }
    }

    fn end_turn(&mut self, net: &mut Net) {
        self.turn_now = None;
        if self.dirty.is_empty() && self.closes_after_turn.is_empty() {
            return;
        }
        // Both lists keep their allocations from turn to turn.
        let mut batch = std::mem::take(&mut self.batch);
        let mut dirty = std::mem::take(&mut self.dirty_spare);
        std::mem::swap(&mut dirty, &mut self.dirty);
        for room_idx in dirty.drain(..) {
            if let Some(slot) = self.rooms.get_mut(room_idx) {
                slot.in_dirty = false;
                batch.push((room_idx, slot.room.take_effects()));
            }
        }
        self.dirty_spare = dirty;
        // Group commit: every record of the turn, then one sync.
        let mut storage_ok = true;
        let mut any_records = false;
        'append: for (room_idx, effects) in &batch {
            if effects.records.is_empty() {
                continue;
            }
            any_records = true;
            let room = &self.rooms[*room_idx].room;
            for record in &effects.records {
                if let Err(e) = self.storage.append(room.doc_name(), room.epoch(), record) {
                    warn!("shard: storage append failed: {e}");
                    storage_ok = false;
                    break 'append;
                }
            }
        }
        if any_records {
            // Even after a failed append, sync: the storage settles (durable or rolled back)
            // before any room is reloaded from it.
            let started = Instant::now();
            let synced = self.storage.sync();
            ShardMetrics::record(
                &mut net.metrics.figures.histograms.fsync_us,
                started.elapsed(),
            );
            if let Err(e) = synced {
                warn!("shard: storage sync failed: {e}");
                storage_ok = false;
            }
            if !storage_ok {
                net.metrics.figures.counters.storage_errors += 1;
            }
        }
        let mut failed = Vec::new();
        for (room_idx, mut effects) in batch.drain(..) {
            if !storage_ok && !effects.records.is_empty() {
                failed.push((room_idx, effects));
                continue;
            }
            let started = Instant::now();
            let counters = &mut net.metrics.figures.counters;
            counters.ops_accepted += effects.op_origins.len() as u64;
            for (conn, frame) in effects.frames.drain(..) {
                if frame_is(&frame, "{\"type\":\"ack\"") {
                    net.metrics.figures.counters.ops_unchanged += 1;
                } else if frame_is(&frame, "{\"type\":\"error\"") {
                    net.metrics.figures.counters.msgs_refused += 1;
                    self.count_refusal(conn);
                }
                net.send(conn, frame);
            }
            if !effects.op_origins.is_empty() {
                ShardMetrics::record(
                    &mut net.metrics.figures.histograms.fanout_us,
                    started.elapsed(),
                );
            }
            if let Some(snapshot) = effects.snapshot.take() {
                let doc = self.rooms[room_idx].room.doc_name();
                if let Err(e) = self.storage.write_snapshot(doc, &snapshot) {
                    net.metrics.figures.counters.storage_errors += 1;
                    warn!("shard: snapshot write failed (the log still covers it): {e}");
                }
            }
            for (conn, code, reason) in effects.closes.drain(..) {
                net.close(conn, code, reason);
            }
            // Everything is released: the room may keep the vectors for its next turn.
            if let Some(slot) = self.rooms.get_mut(room_idx) {
                slot.room.recycle_effects(effects);
                slot.busy_this_tick = true;
            }
        }
        self.batch = batch;
        if !failed.is_empty() {
            self.fail_rooms(net, failed);
        }
        for (conn, code, reason) in std::mem::take(&mut self.closes_after_turn) {
            net.close(conn, code, reason);
        }
    }

    fn on_tick(&mut self, net: &mut Net, now: Instant) {
        let mut idle = Vec::new();
        let mut window_bytes = 0;
        for (idx, slot) in self.rooms.iter_mut() {
            window_bytes += slot.room.window_bytes();
            if !std::mem::take(&mut slot.busy_this_tick) {
                slot.room.free_effects_buffers();
            }
            if slot.in_dirty || slot.room.n_clients() > 0 {
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
}
