//! [`Room`]: one document's state and the contract's per-document rules.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};

use tungstenite::Utf8Bytes;

use crate::crdt::{Applied, Doc, Op, Run, RunContent, MAX_ID_COMPONENT};
use crate::ids::ConnToken;
use crate::protocol::codec::{encode_ack, encode_error, encode_op_echo, encode_snapshot_runs};
use crate::protocol::codec::{
    encode_auth_ack, encode_hello_ack_as, encode_presence_of, AckAuth, HelloAckBody, PresenceUser,
};
use crate::protocol::messages::{parse_op_echo, parse_snapshot_runs};
use crate::protocol::{crdt_error, ErrorCode, Hello, OpMessage, PresenceUpdate, ProtocolError};
use crate::storage::{LogRecord, StoredDoc, StoredSnapshot};

mod api;

pub use api::{EditError, Retention};

/// Replica ids reserved per `ReplicasReserved` record: one durable record serves this many
/// assignments, and a restart skips at most this many ids.
const REPLICAS_PER_RESERVATION: u64 = 16;

/// A replay up to this size is always fine; above it the room sends the snapshot if smaller.
const REPLAY_BYTES_ALWAYS_OK: usize = 64 * 1024;

/// Snapshots at least this big may be reused a little behind head for joiners
/// (see `Room::snapshot_for_join`); smaller ones are cheap enough to encode for every head.
const STALE_SNAPSHOT_BYTES_MIN: usize = 256 * 1024;

/// Bytes of echoes the replay window holds at most, whatever `replay_window_ops` says: a client
/// sending big messages (up to 1 MiB each, one real change plus no-op deletes) must not make one
/// room hold `replay_window_ops` MiB. A joiner further behind gets a snapshot, as it would
/// anyway once a replay is bigger than the snapshot.
const REPLAY_WINDOW_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Explicit replicas at or above this do not move the assignment counter, so one client naming
/// `2^53-1` cannot exhaust a document's replica space.
const EXPLICIT_REPLICA_BUMP_MAX: u64 = 1 << 52;

/// Limits a room enforces, from `Config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomConfig {
    /// A snapshot is due after this many accepted op messages since the last one.
    pub snapshot_every_ops: u64,
    /// A snapshot is due after this many bytes of echoes since the last one.
    pub snapshot_every_bytes: u64,
    /// Echoes kept in memory to answer `since` with a replay.
    pub replay_window_ops: usize,
    /// Largest document in characters, tombstones included.
    pub doc_chars_max: usize,
}

impl RoomConfig {
    /// The room limits of a server configuration.
    pub fn from_config(config: &crate::config::Config) -> RoomConfig {
        RoomConfig {
            snapshot_every_ops: config.snapshot_every_ops,
            snapshot_every_bytes: config.snapshot_every_bytes,
            replay_window_ops: config.replay_window_ops,
            doc_chars_max: config.doc_chars_max,
        }
    }
}

/// Largest vector (in entries) of spent [`Effects`] a room keeps for reuse
/// ([`Room::recycle_effects`]); a room keeps at most a few hundred bytes this way.
pub const EFFECTS_RECYCLE_CAPACITY_MAX: usize = 16;

/// What a room wants done; the shard drains it ([`Room::take_effects`]) at the end of each loop turn.
#[derive(Debug, Default)]
pub struct Effects {
    /// Text frames in order per connection. The shard holds ALL of them until `records` are
    /// durable (append each record, then one sync for the whole turn), then queues them.
    pub frames: Vec<(ConnToken, Utf8Bytes)>,
    /// Connections to close after their frames are flushed: (conn, close code, reason).
    pub closes: Vec<(ConnToken, u16, &'static str)>,
    /// Log records to append, in order, before any frame of this turn is released.
    pub records: Vec<LogRecord>,
    /// (origin conn, client_seq) of every op message covered by `records`: if the sync fails the
    /// shard answers each origin `unavailable` (with its client_seq) instead of the echo.
    pub op_origins: Vec<(ConnToken, u64)>,
    /// A snapshot the room wants written, after this turn's records are durable.
    pub snapshot: Option<StoredSnapshot>,
    /// Document API answers (and deletions) that must wait for this turn's records.
    pub api: Vec<crate::api::ApiEffect>,
}

impl Effects {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
            && self.closes.is_empty()
            && self.records.is_empty()
            && self.op_origins.is_empty()
            && self.snapshot.is_none()
            && self.api.is_empty()
    }
}

/// Why a room could not be opened from storage.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// Stored data did not decode or integrate; the shard answers `unavailable`.
    #[error("stored document is corrupt: {0}")]
    Corrupt(&'static str),
}

/// Who joins, from a verified token (access control on): the room binds replicas to `user`,
/// shows `user` and `name` in presence, and tells the joiner its `role` and `exp`.
#[derive(Clone, Copy, Debug)]
pub struct JoinAuth<'a> {
    /// The token's `sub`.
    pub user: &'a str,
    /// The token's `name`.
    pub name: Option<&'a str>,
    /// `read`, `write` or `admin`.
    pub role: &'static str,
    /// The token's `exp`.
    pub exp: u64,
}

/// A joined client's identity, as presence shows it.
#[derive(Debug)]
struct Member {
    user: String,
    name: Option<String>,
}

impl Member {
    fn presence_user(&self) -> PresenceUser<'_> {
        PresenceUser {
            user: &self.user,
            name: self.name.as_deref(),
        }
    }
}

/// One connected client of the room.
#[derive(Debug)]
struct Client {
    replica: u64,
    /// Its identity when access control is on (boxed: 8 bytes when off).
    who: Option<Box<Member>>,
    /// Compact JSON of its last non-null presence state; `None` when unset or cleared.
    presence: Option<String>,
}

/// One document in memory: CRDT, clients, `server_seq`, replay window, snapshot cadence.
///
/// Every method takes input and queues output in [`Effects`]; nothing here blocks or fails.
#[derive(Debug)]
pub struct Room {
    doc_name: String,
    epoch: String,
    config: RoomConfig,
    crdt: Doc,
    /// `server_seq` of the last accepted op message.
    head: u64,
    clients: HashMap<ConnToken, Client>,
    /// The connection holding each connected replica (at most one: a second one takes over).
    by_replica: HashMap<u64, ConnToken>,
    /// Echoes of `server_seq` `head - len + 1 ..= head`, at most `replay_window_ops` of them.
    window: VecDeque<Utf8Bytes>,
    /// Bytes of the echoes in `window`, at most [`REPLAY_WINDOW_BYTES_MAX`] (or one echo).
    window_bytes: usize,
    /// Highest replica id durably reserved (or reserved by a record of this turn).
    replicas_reserved: u64,
    /// The user owning each replica a token holder used (`LogRecord::ReplicaOwner`), durable
    /// like `replicas_reserved`. Grows by one entry per replica, never shrinks.
    owners: HashMap<u64, String>,
    /// Lowest replica id the next assignment may hand out.
    replica_next: u64,
    /// Characters in the document, tombstones included: exact after open and after each
    /// snapshot, an upper bound in between (a partly repeated message counts its inserts again).
    n_chars: usize,
    ops_since_snapshot: u64,
    bytes_since_snapshot: u64,
    /// The snapshot object `{"runs":[...]}` at `.0 == head`, shared by joiners until head moves.
    snapshot_cache: Option<(u64, Utf8Bytes)>,
    effects: Effects,
    /// The document API's server-side replica of each user (`""` with access control off),
    /// assigned like a client's on its first edit in this room's life.
    api_replicas: HashMap<String, u64>,
    /// When each echo of `window` was accepted (unix ms; 0 unknown), in step with `window`.
    window_times: VecDeque<u64>,
    /// Op messages accepted since the last [`Room::stamp_accepted`] (not yet timed).
    n_unstamped: usize,
    /// The document has event streams: each accepted op message is also an
    /// `ApiEffect::Echo`.
    watched: bool,
    /// The items each echo of `window` deleted that were visible before it, in step with
    /// `window`: the document as of any `server_seq` in the window is exact from them.
    window_deleted: VecDeque<Box<[(crate::crdt::OpId, u64)]>>,
    /// The next accepted op message's entry of `window_deleted` (filled before it applies).
    pending_deleted: Vec<(crate::crdt::OpId, u64)>,
    /// How far behind the head snapshots are written (`--history-retain-ops`,
    /// `--history-retain`): the log after them is kept.
    retention: api::Retention,
    /// `head` of the newest snapshot in storage (or sent to it): later ones never go back.
    stored_head: u64,
}

/// A fresh random epoch: 32 hex digits from std's randomly keyed hasher (no clock, no crate).
fn fresh_epoch() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut epoch = String::with_capacity(32);
    for _ in 0..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let _ = write!(epoch, "{:016x}", hasher.finish());
    }
    epoch
}

fn run_len(run: &Run) -> usize {
    match &run.content {
        RunContent::Text(text) => text.chars().count(),
        RunContent::Deleted(n) => usize::try_from(*n).unwrap_or(usize::MAX),
    }
}

fn inserted_chars(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Insert { text, .. } => text.chars().count(),
            Op::Delete { .. } => 0,
        })
        .sum()
}

impl Room {
    /// Opens a document from what storage loaded (`None`: a new document with a fresh epoch).
    /// Replays the snapshot and the log tail into the CRDT and the replay window.
    ///
    /// # Errors
    /// `Corrupt` when stored data does not decode or integrate, or the log has a gap.
    pub fn open(
        doc: String,
        stored: Option<StoredDoc>,
        config: RoomConfig,
    ) -> Result<Room, RoomError> {
        let mut room = Room {
            doc_name: doc,
            epoch: String::new(),
            config,
            crdt: Doc::new(),
            head: 0,
            clients: HashMap::new(),
            by_replica: HashMap::new(),
            window: VecDeque::new(),
            window_bytes: 0,
            replicas_reserved: 0,
            owners: HashMap::new(),
            replica_next: 1,
            n_chars: 0,
            ops_since_snapshot: 0,
            bytes_since_snapshot: 0,
            snapshot_cache: None,
            effects: Effects::default(),
            api_replicas: HashMap::new(),
            window_times: VecDeque::new(),
            n_unstamped: 0,
            watched: false,
            window_deleted: VecDeque::new(),
            pending_deleted: Vec::new(),
            retention: api::Retention::default(),
            stored_head: 0,
        };
        let Some(stored) = stored else {
            room.epoch = fresh_epoch();
            return Ok(room);
        };
        if stored.epoch.is_empty() {
            return Err(RoomError::Corrupt("empty epoch"));
        }
        room.epoch = stored.epoch;
        if let Some(snapshot) = stored.snapshot {
            let runs = parse_snapshot_runs(&snapshot.runs_json)
                .map_err(|_| RoomError::Corrupt("snapshot JSON"))?;
            room.crdt =
                Doc::from_snapshot(&runs).map_err(|_| RoomError::Corrupt("snapshot runs"))?;
            room.n_chars = runs.iter().map(run_len).sum();
            room.head = snapshot.head;
            room.stored_head = snapshot.head;
            room.replicas_reserved = snapshot.replicas_reserved;
            room.owners.extend(snapshot.owners);
            room.snapshot_cache = Some((snapshot.head, snapshot.runs_json));
        }
        for record in stored.tail {
            match record {
                LogRecord::ReplicasReserved { last } => {
                    room.replicas_reserved = room.replicas_reserved.max(last)
                }
                LogRecord::ReplicaOwner { replica, user } => {
                    room.owners.entry(replica).or_insert(user);
                }
                LogRecord::Accepted {
                    server_seq,
                    time_ms,
                } => room.set_accepted_time(server_seq, time_ms),
                LogRecord::Ops { server_seq, echo } => {
                    if server_seq <= room.head {
                        continue;
                    }
                    if server_seq != room.head + 1 {
                        return Err(RoomError::Corrupt("gap in the op log"));
                    }
                    let parsed = parse_op_echo(&echo)
                        .map_err(|_| RoomError::Corrupt("op log record JSON"))?;
                    if parsed.server_seq != server_seq {
                        return Err(RoomError::Corrupt("op log record server_seq"));
                    }
                    room.note_deletes(&parsed.ops);
                    room.crdt
                        .apply_remote(None, &parsed.ops)
                        .map_err(|_| RoomError::Corrupt("op log record ops"))?;
                    room.n_chars += inserted_chars(&parsed.ops);
                    room.accepted(echo);
                }
            }
        }
        room.replica_next = room.replicas_reserved.saturating_add(1);
        // Loaded ops were timed when they were accepted (or never, in older logs).
        room.n_unstamped = 0;
        Ok(room)
    }

    /// Book-keeping for an accepted op message whose echo is `echo`: head, window, cadence.
    fn accepted(&mut self, echo: Utf8Bytes) {
        self.head += 1;
        self.ops_since_snapshot += 1;
        self.bytes_since_snapshot += echo.len() as u64;
        self.window_bytes += echo.len();
        self.window.push_back(echo);
        self.window_times.push_back(0);
        self.window_deleted
            .push_back(std::mem::take(&mut self.pending_deleted).into_boxed_slice());
        self.n_unstamped += 1;
        while self.window.len() > self.config.replay_window_ops
            || (self.window_bytes > REPLAY_WINDOW_BYTES_MAX && self.window.len() > 1)
        {
            if let Some(old) = self.window.pop_front() {
                self.window_bytes -= old.len();
                self.window_times.pop_front();
                self.window_deleted.pop_front();
            }
        }
    }

    /// Bytes of echoes in the replay window.
    pub fn window_bytes(&self) -> usize {
        self.window_bytes
    }

    /// Drops the oldest echoes of the replay window until it holds at most `bytes_max` bytes
    /// (the shard's memory budget, `RoomHost`); joiners whose `since` is older then get a
    /// snapshot. Returns the bytes dropped.
    pub fn shrink_window(&mut self, bytes_max: usize) -> usize {
        let before = self.window_bytes;
        while self.window_bytes > bytes_max {
            let Some(old) = self.window.pop_front() else {
                break;
            };
            self.window_times.pop_front();
            self.window_deleted.pop_front();
            self.window_bytes -= old.len();
        }
        before - self.window_bytes
    }

    /// A connection joins with a validated hello (doc already matched by the shard): token check,
    /// replica assignment or takeover, then `hello_ack` with replay or snapshot and presence.
    pub fn join(&mut self, conn: ConnToken, hello: &Hello) {
        self.join_as(conn, hello, None);
    }

    /// [`Room::join`] for a connection admitted with a token (`auth`; `None` with access
    /// control off): a replica owned by another user is refused with `forbidden` and a close
    /// 1008, an unowned one becomes `auth.user`'s (durably, before the `hello_ack` is
    /// released), and the `hello_ack` carries role, user and exp.
    pub fn join_as(&mut self, conn: ConnToken, hello: &Hello, auth: Option<JoinAuth<'_>>) {
        if self.clients.contains_key(&conn) {
            self.refuse(conn, &ProtocolError::bad("already joined"));
            return;
        }
        if let (Some(auth), Some(replica)) = (auth, hello.replica) {
            if self
                .owners
                .get(&replica)
                .is_some_and(|owner| owner != auth.user)
            {
                let err = ProtocolError::new(
                    ErrorCode::Forbidden,
                    "this replica belongs to another user; join without replica",
                );
                self.effects.frames.push((conn, encode_error(&err)));
                self.effects
                    .closes
                    .push((conn, 1008, "replica of another user"));
                return;
            }
        }
        let replica = match hello.replica {
            Some(replica) => {
                if let Some(&old) = self.by_replica.get(&replica) {
                    self.effects.closes.push((old, 1008, "replaced"));
                    self.leave(old);
                }
                if replica < EXPLICIT_REPLICA_BUMP_MAX {
                    // Used now, so never to be assigned, after a restart too.
                    self.replica_next = self.replica_next.max(replica + 1);
                    self.reserve_through(replica);
                }
                replica
            }
            None => match self.assign_replica() {
                Some(replica) => replica,
                None => {
                    let err = ProtocolError::new(
                        ErrorCode::Unavailable,
                        "no replica id left in this document",
                    );
                    self.effects.frames.push((conn, encode_error(&err)));
                    self.effects.closes.push((conn, 1008, "no replica id left"));
                    return;
                }
            },
        };
        if let Some(auth) = auth {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.owners.entry(replica) {
                entry.insert(auth.user.to_owned());
                self.effects.records.push(LogRecord::ReplicaOwner {
                    replica,
                    user: auth.user.to_owned(),
                });
            }
        }
        let (frame, catch_up) = self.encode_hello_ack(conn, replica, hello, auth);
        self.clients.insert(
            conn,
            Client {
                replica,
                who: auth.map(|auth| {
                    Box::new(Member {
                        user: auth.user.to_owned(),
                        name: auth.name.map(str::to_owned),
                    })
                }),
                presence: None,
            },
        );
        self.by_replica.insert(replica, conn);
        self.effects.frames.push((conn, frame));
        self.effects
            .frames
            .extend(catch_up.into_iter().map(|echo| (conn, echo)));
    }

    /// Hands out a replica never handed out or used in this document, reserving a block durably
    /// when the reserved range is used up.
    ///
    /// Assignments stay below [`EXPLICIT_REPLICA_BUMP_MAX`]: every replica below it that was
    /// ever used is durably reserved (an explicit one when it joined), and the ones above it
    /// are never handed out, so one client naming `2^53-1` and editing cannot exhaust the
    /// document's replica space (the CRDT's `max_replica` would then be `2^53-1`).
    fn assign_replica(&mut self) -> Option<u64> {
        let mut replica = self.replica_next;
        let used_max = self.crdt.max_replica();
        if used_max < EXPLICIT_REPLICA_BUMP_MAX {
            replica = replica.max(used_max + 1);
        }
        while self.by_replica.contains_key(&replica) {
            replica += 1;
        }
        if replica >= EXPLICIT_REPLICA_BUMP_MAX {
            return None;
        }
        self.replica_next = replica + 1;
        self.reserve_through(replica);
        Some(replica)
    }

    /// Makes sure `replica` is durably reserved, reserving a block from it when it is not.
    fn reserve_through(&mut self, replica: u64) {
        if replica > self.replicas_reserved {
            self.replicas_reserved = (replica + REPLICAS_PER_RESERVATION - 1).min(MAX_ID_COMPONENT);
            self.effects.records.push(LogRecord::ReplicasReserved {
                last: self.replicas_reserved,
            });
        }
    }

    /// The snapshot object at the current head, encoded once per head.
    fn snapshot_json(&mut self) -> Utf8Bytes {
        match &self.snapshot_cache {
            Some((head, json)) if *head == self.head => json.clone(),
            _ => {
                let json = Utf8Bytes::from(encode_snapshot_runs(&self.crdt.snapshot()));
                self.snapshot_cache = Some((self.head, json.clone()));
                json
            }
        }
    }

    /// The replay entries a joiner with `since`/`epoch` gets, or `None` for a snapshot: when it
    /// sent no `since`, another epoch, a `since` past head or older than the replay window, or
    /// when the replay would be bigger than both [`REPLAY_BYTES_ALWAYS_OK`] and the snapshot (a
    /// client far behind on a small document then gets the smaller answer, which also keeps the
    /// `hello_ack` under the shard's outbound limit).
    fn replay_for(&mut self, hello: &Hello) -> Option<Vec<Utf8Bytes>> {
        let since = hello.since?;
        if hello
            .epoch
            .as_deref()
            .is_some_and(|epoch| epoch != self.epoch)
            || since > self.head
        {
            return None;
        }
        let n_missed = usize::try_from(self.head - since).ok()?;
        if n_missed > self.window.len() {
            return None;
        }
        let entries: Vec<Utf8Bytes> = self
            .window
            .range(self.window.len() - n_missed..)
            .cloned()
            .collect();
        let replay_bytes: usize = entries.iter().map(|echo| echo.len() + 1).sum();
        if replay_bytes > REPLAY_BYTES_ALWAYS_OK && replay_bytes > self.snapshot_json().len() {
            return None;
        }
        Some(entries)
    }

    /// A snapshot for a joiner: `(its head, the snapshot object, the echoes after it)`.
    ///
    /// Normally the snapshot at the current head (encoded once per head). For a big document
    /// whose cached snapshot is only a little behind, that snapshot is reused and the echoes
    /// since follow the `hello_ack` as ordinary `op_echo` frames, exactly as if the client had
    /// joined then: joiners of a busy, big document do not each pay a full encode.
    fn snapshot_for_join(&mut self) -> (u64, Utf8Bytes, Vec<Utf8Bytes>) {
        if let Some((cached_head, json)) = &self.snapshot_cache {
            let n_behind = usize::try_from(self.head - cached_head).unwrap_or(usize::MAX);
            if n_behind > 0
                && json.len() >= STALE_SNAPSHOT_BYTES_MIN
                && n_behind <= self.window.len()
            {
                let catch_up: Vec<Utf8Bytes> = self
                    .window
                    .range(self.window.len() - n_behind..)
                    .cloned()
                    .collect();
                let catch_up_bytes: usize = catch_up.iter().map(|echo| echo.len()).sum();
                if catch_up_bytes <= json.len() / 4 {
                    return (*cached_head, json.clone(), catch_up);
                }
            }
        }
        (self.head, self.snapshot_json(), Vec::new())
    }

    /// The `hello_ack` for `conn`, plus any echoes that must follow it.
    fn encode_hello_ack(
        &mut self,
        conn: ConnToken,
        replica: u64,
        hello: &Hello,
        auth: Option<JoinAuth<'_>>,
    ) -> (Utf8Bytes, Vec<Utf8Bytes>) {
        let replay = self.replay_for(hello);
        let (ack_head, snapshot, catch_up) = match replay {
            Some(_) => (self.head, None, Vec::new()),
            None => {
                let (head, json, catch_up) = self.snapshot_for_join();
                (head, Some(json), catch_up)
            }
        };
        let body = match (&snapshot, &replay) {
            (Some(snapshot), _) => HelloAckBody::Snapshot(snapshot),
            (None, Some(entries)) => HelloAckBody::Replay(entries),
            (None, None) => HelloAckBody::Replay(&[]),
        };
        let mut others: Vec<(u64, Option<PresenceUser<'_>>, &str)> = self
            .clients
            .iter()
            .filter(|(other, _)| **other != conn)
            .filter_map(|(_, client)| {
                client.presence.as_deref().map(|state| {
                    let who = client.who.as_deref().map(Member::presence_user);
                    (client.replica, who, state)
                })
            })
            .collect();
        others.sort_unstable_by_key(|(replica, _, _)| *replica);
        let ack = encode_hello_ack_as(
            &self.doc_name,
            replica,
            ack_head,
            &self.epoch,
            body,
            &others,
            auth.map(|auth| AckAuth {
                role: auth.role,
                user: auth.user,
                exp: auth.exp,
            }),
        );
        (ack, catch_up)
    }

    /// An op message from a joined connection: integrated, then echoed to every client (a change),
    /// acked to its sender (no change) or refused (error to its sender with `client_seq`).
    /// Messages from connections not in the room (replaced, never joined) are dropped.
    pub fn handle_op(&mut self, conn: ConnToken, msg: OpMessage) {
        let Some(client) = self.clients.get(&conn) else {
            return;
        };
        let replica = client.replica;
        let refuse = |room: &mut Room, err: ProtocolError| {
            let frame = encode_error(&err.with_client_seq(Some(msg.client_seq)));
            room.effects.frames.push((conn, frame));
        };
        let mut n_new = inserted_chars(&msg.ops);
        if self.n_chars.saturating_add(n_new) > self.config.doc_chars_max {
            // Near the limit only: inserts the document already holds add nothing, so a
            // resend is still answered with `ack` (or its echo) rather than `too_large`.
            n_new = msg
                .ops
                .iter()
                .map(|op| match op {
                    Op::Insert { id, text, .. } if self.crdt.position_of(*id).is_none() => {
                        text.chars().count()
                    }
                    _ => 0,
                })
                .sum();
        }
        if self.n_chars.saturating_add(n_new) > self.config.doc_chars_max {
            refuse(
                self,
                ProtocolError::new(ErrorCode::TooLarge, "document size limit reached"),
            );
            return;
        }
        // A resend of inserts the room only knows from a snapshot is still `Unchanged`: the CRDT
        // derives each run's `after` from document order (tested in the restart test below).
        self.note_deletes(&msg.ops);
        match self.crdt.apply_remote(Some(replica), &msg.ops) {
            Ok(Applied::Changed) => {
                let echo = encode_op_echo(self.head + 1, replica, msg.client_seq, &msg.ops);
                self.n_chars += n_new;
                self.accepted(echo.clone());
                self.watched_echo(&echo);
                for other in self.clients.keys() {
                    self.effects.frames.push((*other, echo.clone()));
                }
                self.effects.records.push(LogRecord::Ops {
                    server_seq: self.head,
                    echo,
                });
                self.effects.op_origins.push((conn, msg.client_seq));
                self.maybe_snapshot();
            }
            Ok(Applied::Unchanged) => {
                self.effects
                    .frames
                    .push((conn, encode_ack(msg.client_seq, self.head)));
            }
            Err(err) => refuse(self, crdt_error(&err)),
        }
    }

    /// Emits a snapshot when the cadence says one is due.
    fn maybe_snapshot(&mut self) {
        if self.ops_since_snapshot < self.config.snapshot_every_ops
            && self.bytes_since_snapshot < self.config.snapshot_every_bytes
        {
            return;
        }
        let runs = self.crdt.snapshot();
        // The exact size, so the upper bound kept between snapshots never drifts far.
        self.n_chars = runs.iter().map(run_len).sum();
        let runs_json = Utf8Bytes::from(encode_snapshot_runs(&runs));
        self.snapshot_cache = Some((self.head, runs_json.clone()));
        self.ops_since_snapshot = 0;
        self.bytes_since_snapshot = 0;
        // The stored snapshot lags behind the head by the history retention, so the log
        // after it is kept (and replayed into the window by a load).
        let head = self.snapshot_point();
        if head <= self.stored_head && head < self.head {
            return; // Nothing older than what storage has may be reclaimed yet.
        }
        let runs_json = if head == self.head {
            runs_json
        } else {
            Utf8Bytes::from(encode_snapshot_runs(&self.runs_at(head)))
        };
        self.stored_head = head;
        self.effects.snapshot = Some(StoredSnapshot {
            epoch: self.epoch.clone(),
            head,
            replicas_reserved: self.replicas_reserved,
            owners: {
                let mut owners: Vec<(u64, String)> = self
                    .owners
                    .iter()
                    .map(|(replica, user)| (*replica, user.clone()))
                    .collect();
                owners.sort_unstable();
                owners
            },
            runs_json,
        });
    }

    /// A presence update: relayed to the others (not the sender); remembered for `hello_ack` lists.
    pub fn handle_presence(&mut self, conn: ConnToken, update: PresenceUpdate) {
        let Some(client) = self.clients.get_mut(&conn) else {
            return;
        };
        let replica = client.replica;
        let who = client.who.as_deref().map(Member::presence_user);
        let frame = encode_presence_of(replica, who, &update.state_json);
        client.presence = if update.state_json == "null" {
            None
        } else {
            Some(update.state_json)
        };
        for other in self.clients.keys() {
            if *other != conn {
                self.effects.frames.push((*other, frame.clone()));
            }
        }
    }

    /// A refused message from a joined connection (parse error or second hello): error frame to
    /// it, in order with its other frames.
    pub fn refuse(&mut self, conn: ConnToken, err: &ProtocolError) {
        self.effects.frames.push((conn, encode_error(err)));
    }

    /// The connection left (closed, dropped, replaced): the others get `state: null` if it had
    /// set a state. Idempotent.
    pub fn leave(&mut self, conn: ConnToken) {
        let Some(client) = self.clients.remove(&conn) else {
            return;
        };
        if self.by_replica.get(&client.replica) == Some(&conn) {
            self.by_replica.remove(&client.replica);
        }
        if client.presence.is_some() {
            let who = client.who.as_deref().map(Member::presence_user);
            let frame = encode_presence_of(client.replica, who, "null");
            for other in self.clients.keys() {
                self.effects.frames.push((*other, frame.clone()));
            }
        }
    }

    /// The connection is gone for good and its token may be reused by the shard: drops every
    /// frame, close and op origin still queued for it in this turn's effects (a later
    /// connection with the same token must never get them). Call before [`Room::leave`].
    pub fn forget(&mut self, conn: ConnToken) {
        self.effects.frames.retain(|(to, _)| *to != conn);
        self.effects.closes.retain(|(to, _, _)| *to != conn);
        self.effects.op_origins.retain(|(from, _)| *from != conn);
    }

    /// Closes `conn` with `code` after every frame queued for it so far (a close the shard
    /// decides, in order with the room's frames).
    pub fn close_after_frames(&mut self, conn: ConnToken, code: u16, reason: &'static str) {
        self.effects.closes.push((conn, code, reason));
    }

    /// Answers an accepted `auth` refresh, in order with the connection's other frames.
    pub fn auth_ack(&mut self, conn: ConnToken, exp: u64, role: &str) {
        self.effects.frames.push((conn, encode_auth_ack(exp, role)));
    }

    /// Drains what this room wants done since the last call.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// Gives back effects the shard has fully carried out, so that the next turn's effects
    /// reuse their vectors instead of allocating (a busy room takes effects every turn). Their
    /// contents are dropped. Vectors that grew past [`EFFECTS_RECYCLE_CAPACITY_MAX`] entries
    /// are freed instead, so a burst (a join storm, a large fan-out) does not stay resident.
    /// Only used while the room has queued nothing new since [`Room::take_effects`].
    pub fn recycle_effects(&mut self, mut spent: Effects) {
        fn reuse<T>(mine: &mut Vec<T>, mut spent: Vec<T>) {
            if mine.capacity() == 0 && spent.capacity() <= EFFECTS_RECYCLE_CAPACITY_MAX {
                spent.clear();
                *mine = spent;
            }
        }
        if !self.effects.is_empty() {
            return;
        }
        reuse(&mut self.effects.frames, std::mem::take(&mut spent.frames));
        reuse(&mut self.effects.closes, std::mem::take(&mut spent.closes));
        reuse(
            &mut self.effects.records,
            std::mem::take(&mut spent.records),
        );
        reuse(
            &mut self.effects.op_origins,
            std::mem::take(&mut spent.op_origins),
        );
    }

    /// Frees the vectors kept by [`Room::recycle_effects`] when they hold nothing (a room idle
    /// for a while need not keep them).
    pub fn free_effects_buffers(&mut self) {
        if self.effects.is_empty() {
            self.effects = Effects::default();
        }
    }

    /// Whether [`Room::take_effects`] would return something.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// Connected clients.
    pub fn n_clients(&self) -> usize {
        self.clients.len()
    }

    /// `server_seq` of the last accepted op message (0 for none).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The document's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The document's name.
    pub fn doc_name(&self) -> &str {
        &self.doc_name
    }

    /// The document's visible text (for tests and diagnostics; O(length)).
    pub fn text(&self) -> String {
        self.crdt.text()
    }

    /// The replica connected as `conn`, if it is in the room.
    pub fn replica_of(&self, conn: ConnToken) -> Option<u64> {
        self.clients.get(&conn).map(|client| client.replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_client_message, ClientMessage};
    use crate::storage::{MemoryStorage, Storage};

    fn config() -> RoomConfig {
        RoomConfig {
            snapshot_every_ops: 1_000,
            snapshot_every_bytes: 1 << 30,
            replay_window_ops: 100,
            doc_chars_max: 1_000,
        }
    }

    /// Feeds client frames to one room and checks the frames it answers, exactly.
    struct Harness {
        room: Room,
    }

    impl Harness {
        fn new(config: RoomConfig) -> Harness {
            Harness {
                room: Room::open("doc".into(), None, config).expect("new room"),
            }
        }

        /// Dispatches one client frame as the shard would.
        fn send(&mut self, conn: usize, text: &str) {
            let conn = ConnToken(conn);
            match parse_client_message(text) {
                Ok(ClientMessage::Hello(hello)) => self.room.join(conn, &hello),
                Ok(ClientMessage::Op(msg)) => self.room.handle_op(conn, msg),
                Ok(ClientMessage::Presence(update)) => self.room.handle_presence(conn, update),
                Ok(ClientMessage::Auth(_)) => {}
                Err(err) => self.room.refuse(conn, &err),
            }
        }

        /// Takes the effects and checks the frames (per connection, in order; `E` stands for the
        /// epoch), returning the effects for further checks.
        fn check(&mut self, expected: &[(usize, &str)]) -> Effects {
            let effects = self.room.take_effects();
            let epoch = self.room.epoch().to_owned();
            let mut got: Vec<(usize, String)> = effects
                .frames
                .iter()
                .map(|(conn, frame)| {
                    (
                        conn.0,
                        frame.as_str().replace(&format!("\"{epoch}\""), "\"E\""),
                    )
                })
                .collect();
            got.sort_by_key(|(conn, _)| *conn);
            let mut want: Vec<(usize, String)> =
                expected.iter().map(|(c, f)| (*c, f.to_string())).collect();
            want.sort_by_key(|(conn, _)| *conn);
            assert_eq!(got, want);
            effects
        }

        /// Sends `text` from `conn` and checks the answer.
        fn check_send(&mut self, conn: usize, text: &str, expected: &[(usize, &str)]) -> Effects {
            self.send(conn, text);
            self.check(expected)
        }
    }

    const EMPTY_ACK_1: &str = r#"{"type":"hello_ack","doc":"doc","replica":1,"head":0,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[]},"presence":[]}"#;
    const INS_A: &str = r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"ab"}]}"#;
    const ECHO_A: &str = r#"{"type":"op_echo","server_seq":1,"replica":1,"client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"ab"}]}"#;

    #[test]
    fn recycled_effects_are_reused_empty_and_bursts_are_freed() {
        let mut h = Harness::new(config());
        h.check_send(1, r#"{"type":"hello","doc":"doc"}"#, &[(1, EMPTY_ACK_1)]);
        let effects = h.check_send(1, INS_A, &[(1, ECHO_A)]);
        let frames_ptr = effects.frames.as_ptr();
        h.room.recycle_effects(effects);
        h.send(1, r#"{"type":"presence","state":{"x":1}}"#);
        h.send(1, r#"{"type":"op","client_seq":9,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"ab"}]}"#);
        let effects = h.room.take_effects();
        assert_eq!(
            effects.frames.len(),
            1,
            "only the ack: nothing old survives"
        );
        assert_eq!(effects.frames.as_ptr(), frames_ptr, "the same allocation");
        let mut burst = Effects::default();
        burst.frames.reserve(EFFECTS_RECYCLE_CAPACITY_MAX + 1);
        h.room.recycle_effects(burst);
        assert_eq!(h.room.effects.frames.capacity(), 0, "a burst is freed");
        h.room.recycle_effects(effects);
        assert!(h.room.effects.frames.capacity() > 0);
        h.room.free_effects_buffers();
        assert_eq!(h.room.effects.frames.capacity(), 0, "freed when idle");
    }

    #[test]
    fn join_assigns_fresh_replicas_and_reserves_them() {
        let mut h = Harness::new(config());
        let effects = h.check_send(1, r#"{"type":"hello","doc":"doc"}"#, &[(1, EMPTY_ACK_1)]);
        assert_eq!(
            effects.records,
            vec![LogRecord::ReplicasReserved { last: 16 }]
        );
        let effects = h.check_send(
            2,
            r#"{"type":"hello"}"#,
            &[(2, r#"{"type":"hello_ack","doc":"doc","replica":2,"head":0,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[]},"presence":[]}"#)],
        );
        assert!(
            effects.records.is_empty(),
            "replica 2 is inside the reserved block"
        );
        // An explicit replica moves the counter past it, durably.
        h.send(3, r#"{"type":"hello","replica":40}"#);
        let effects = h.room.take_effects();
        assert_eq!(
            effects.records,
            vec![LogRecord::ReplicasReserved { last: 55 }]
        );
        h.send(4, r#"{"type":"hello"}"#);
        assert_eq!(h.room.replica_of(ConnToken(4)), Some(41));
        assert!(h.room.take_effects().records.is_empty());
        // An explicit replica inside the reserved range needs no record.
        h.send(5, r#"{"type":"hello","replica":7}"#);
        assert!(h.room.take_effects().records.is_empty());
        h.send(6, r#"{"type":"hello","replica":56}"#);
        h.room.take_effects();
        h.send(7, r#"{"type":"hello"}"#);
        assert_eq!(h.room.replica_of(ConnToken(7)), Some(57));
        assert!(
            h.room.take_effects().records.is_empty(),
            "56 reserved through 71"
        );
        assert_eq!(h.room.n_clients(), 7);
        assert!(!h.room.epoch().is_empty());
    }

    #[test]
    fn the_replay_window_is_bounded_in_bytes() {
        let mut config = config();
        config.doc_chars_max = 1 << 30;
        config.replay_window_ops = 1_000;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        h.send(1, INS_A);
        h.send(
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[0,1],"len":1}]}"#,
        );
        // 40 echoes of half a MiB each: more bytes than the window may hold.
        let text = "x".repeat(512 * 1024);
        for k in 0..40u64 {
            let lamport = 2 + k * 512 * 1024;
            h.send(
                1,
                &format!(r#"{{"type":"op","client_seq":{},"ops":[{{"kind":"ins","id":[{lamport},1],"after":null,"text":"{text}"}}]}}"#, k + 3),
            );
            h.room.take_effects();
        }
        assert_eq!(h.room.head(), 42);
        assert!(
            h.room.window_bytes <= REPLAY_WINDOW_BYTES_MAX,
            "{}",
            h.room.window_bytes
        );
        assert!(h.room.window.len() < 42);
        let in_window: usize = h.room.window.iter().map(|echo| echo.len()).sum();
        assert_eq!(in_window, h.room.window_bytes);
        // A joiner from before the window gets a snapshot; one inside it a replay.
        h.send(2, r#"{"type":"hello","since":1}"#);
        let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
        assert!(frame.contains(r#""strategy":"snapshot""#));
        h.room.leave(ConnToken(2));
        h.send(2, r#"{"type":"hello","since":41}"#);
        let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
        assert!(frame.contains(r#""strategy":"replay""#));
    }

    #[test]
    fn shrinking_the_window_drops_the_oldest_echoes_only() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello"}"#);
        for k in 0..10u64 {
            h.send(
                1,
                &format!(r#"{{"type":"op","client_seq":{},"ops":[{{"kind":"ins","id":[{},1],"after":null,"text":"abc"}}]}}"#, k + 1, 3 * k + 1),
            );
            h.room.take_effects();
        }
        assert_eq!((h.room.head(), h.room.window.len()), (10, 10));
        let one = h.room.window_bytes() / 10;
        let before = h.room.window_bytes();
        let cap = before - one - 1;
        let dropped = h.room.shrink_window(cap);
        assert_eq!(
            h.room.window.len(),
            8,
            "whole echoes, oldest first, until under the cap"
        );
        assert_eq!(before - dropped, h.room.window_bytes());
        assert!(h.room.window_bytes() <= cap);
        assert_eq!(h.room.shrink_window(usize::MAX), 0, "nothing to drop");
        // The window still holds every echo after server_seq 2: replay after it, snapshot before.
        h.send(2, r#"{"type":"hello","since":2}"#);
        let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
        assert!(frame.contains(r#""strategy":"replay""#), "{frame}");
        h.room.leave(ConnToken(2));
        h.send(2, r#"{"type":"hello","since":1}"#);
        let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
        assert!(frame.contains(r#""strategy":"snapshot""#), "{frame}");
        h.room.leave(ConnToken(2));
        let left = h.room.window_bytes();
        assert_eq!(h.room.shrink_window(0), left);
        assert_eq!((h.room.window_bytes(), h.room.window.len()), (0, 0));
        h.send(2, r#"{"type":"hello","since":9}"#);
        let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
        assert!(frame.contains(r#""strategy":"snapshot""#), "{frame}");
    }

    #[test]
    fn a_resend_at_the_size_limit_is_acked_not_refused() {
        let mut config = config();
        config.doc_chars_max = 2;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        h.send(1, INS_A);
        h.room.take_effects();
        h.check_send(
            1,
            INS_A,
            &[(1, r#"{"type":"ack","client_seq":1,"server_seq":1}"#)],
        );
        h.check_send(
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"ins","id":[2,1],"after":[1,1],"text":"c"}]}"#,
            &[(1, r#"{"type":"error","code":"too_large","message":"document size limit reached","client_seq":2}"#)],
        );
    }

    #[test]
    fn an_edit_by_the_top_replica_does_not_exhaust_assignment() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello","replica":9007199254740991}"#);
        h.send(
            1,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,9007199254740991],"after":null,"text":"a"}]}"#,
        );
        h.send(2, r#"{"type":"hello","replica":4503599627370496}"#);
        h.room.take_effects();
        assert_eq!(h.room.head(), 1);
        h.send(3, r#"{"type":"hello"}"#);
        let effects = h.room.take_effects();
        assert!(effects.closes.is_empty(), "{effects:?}");
        assert_eq!(h.room.replica_of(ConnToken(3)), Some(1));
    }

    #[test]
    fn ops_echo_to_everyone_ack_resends_and_refuse_bad_ones() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello","doc":"doc"}"#);
        h.send(2, r#"{"type":"hello","doc":"doc"}"#);
        h.room.take_effects();
        let effects = h.check_send(1, INS_A, &[(1, ECHO_A), (2, ECHO_A)]);
        assert_eq!(
            effects.records,
            vec![LogRecord::Ops {
                server_seq: 1,
                echo: ECHO_A.into()
            }]
        );
        assert_eq!(effects.op_origins, vec![(ConnToken(1), 1)]);
        // The same message again changes nothing: ack with the head, to the sender alone.
        let effects = h.check_send(
            1,
            INS_A,
            &[(1, r#"{"type":"ack","client_seq":1,"server_seq":1}"#)],
        );
        assert!(effects.records.is_empty() && effects.op_origins.is_empty());
        // Unknown fields are not echoed; the echo is canonical.
        h.check_send(
            2,
            r#"{"type":"op", "client_seq":9, "x":1, "ops":[{"kind":"del","id":[1,1],"len":1,"junk":true}]}"#,
            &[
                (1, r#"{"type":"op_echo","server_seq":2,"replica":2,"client_seq":9,"ops":[{"kind":"del","id":[1,1],"len":1}]}"#),
                (2, r#"{"type":"op_echo","server_seq":2,"replica":2,"client_seq":9,"ops":[{"kind":"del","id":[1,1],"len":1}]}"#),
            ],
        );
        // Deleting a tombstone again changes nothing.
        h.check_send(
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[1,1],"len":1}]}"#,
            &[(1, r#"{"type":"ack","client_seq":2,"server_seq":2}"#)],
        );
        let cases: [(usize, &str, &str); 8] = [
            (1, r#"{"kind":"del","id":[7,1],"len":1}"#, "unknown_id"),
            (
                1,
                r#"{"kind":"ins","id":[5,1],"after":[4,4],"text":"x"}"#,
                "unknown_id",
            ),
            (
                1,
                r#"{"kind":"ins","id":[0,1],"after":null,"text":"zz"}"#,
                "id_conflict",
            ),
            (
                1,
                r#"{"kind":"ins","id":[1,1],"after":null,"text":"bc"}"#,
                "id_conflict",
            ),
            (
                1,
                r#"{"kind":"ins","id":[5,2],"after":null,"text":"x"}"#,
                "invalid_op",
            ),
            (
                2,
                r#"{"kind":"ins","id":[1,2],"after":[1,1],"text":"x"}"#,
                "invalid_op",
            ),
            (
                1,
                r#"{"kind":"ins","id":[5,1],"after":null,"text":""}"#,
                "invalid_op",
            ),
            (1, r#"{"kind":"del","id":[0,1],"len":0}"#, "invalid_op"),
        ];
        for (conn, op, code) in cases {
            let msg = format!(r#"{{"type":"op","client_seq":5,"ops":[{op}]}}"#);
            h.send(conn, &msg);
            let effects = h.room.take_effects();
            assert_eq!(effects.frames.len(), 1, "{op}");
            let frame = effects.frames[0].1.as_str();
            assert!(
                frame.starts_with(&format!(r#"{{"type":"error","code":"{code}","#)),
                "{op}: {frame}"
            );
            assert!(frame.ends_with(r#","client_seq":5}"#), "{frame}");
            assert!(effects.records.is_empty());
        }
        // Atomic: a valid op followed by an invalid one applies nothing.
        h.send(
            1,
            r#"{"type":"op","client_seq":6,"ops":[{"kind":"ins","id":[10,1],"after":null,"text":"q"},{"kind":"del","id":[99,1],"len":1}]}"#,
        );
        assert!(h.room.take_effects().frames[0]
            .1
            .as_str()
            .contains("unknown_id"));
        assert_eq!((h.room.text().as_str(), h.room.head()), ("a", 2));
        // Lamport 0 is valid; ids may run up to 2^53-1 but not past it.
        h.check_send(
            1,
            r#"{"type":"op","client_seq":7,"ops":[{"kind":"ins","id":[9007199254740990,1],"after":null,"text":"xyz"}]}"#,
            &[(1, r#"{"type":"error","code":"invalid_op","message":"ids run past 2^53-1","client_seq":7}"#)],
        );
        // A parse refusal goes to its sender only.
        h.check_send(
            2,
            r#"{"type":"op","client_seq":8,"ops":[]}"#,
            &[(
                2,
                r#"{"type":"error","code":"bad_message","message":"ops is empty","client_seq":8}"#,
            )],
        );
    }

    #[test]
    fn second_hello_is_refused_and_changes_nothing() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello"}"#);
        h.room.take_effects();
        h.check_send(
            1,
            r#"{"type":"hello","replica":9}"#,
            &[(1, r#"{"type":"error","code":"bad_message","message":"already joined","client_seq":null}"#.replace(r#","client_seq":null"#, "").as_str())],
        );
        assert_eq!(h.room.replica_of(ConnToken(1)), Some(1));
    }

    #[test]
    fn presence_relays_lists_and_clears() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello"}"#);
        h.send(2, r#"{"type":"hello"}"#);
        h.room.take_effects();
        let effects = h.check_send(
            1,
            r#"{"type":"presence","state": {"cursor": 3}}"#,
            &[(2, r#"{"type":"presence","replica":1,"state":{"cursor":3}}"#)],
        );
        assert!(effects.records.is_empty());
        h.check_send(
            3,
            r#"{"type":"hello"}"#,
            &[(3, r#"{"type":"hello_ack","doc":"doc","replica":3,"head":0,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[]},"presence":[{"replica":1,"state":{"cursor":3}}]}"#)],
        );
        // Client 2 never set a state: leaving says nothing.
        h.room.leave(ConnToken(2));
        h.check(&[]);
        h.room.leave(ConnToken(1));
        h.check(&[(3, r#"{"type":"presence","replica":1,"state":null}"#)]);
        h.room.leave(ConnToken(1));
        h.check(&[]);
        // A null state is relayed and then no longer listed.
        h.send(4, r#"{"type":"hello"}"#);
        h.room.take_effects();
        h.check_send(
            3,
            r#"{"type":"presence","state":"x"}"#,
            &[(4, r#"{"type":"presence","replica":3,"state":"x"}"#)],
        );
        h.check_send(
            3,
            r#"{"type":"presence","state":null}"#,
            &[(4, r#"{"type":"presence","replica":3,"state":null}"#)],
        );
        h.room.leave(ConnToken(3));
        h.check(&[]);
        assert_eq!(h.room.n_clients(), 1);
    }

    #[test]
    fn takeover_closes_the_old_connection_and_ignores_it() {
        let mut h = Harness::new(config());
        h.send(1, r#"{"type":"hello","replica":5}"#);
        h.send(2, r#"{"type":"hello","replica":6}"#);
        h.send(1, r#"{"type":"presence","state":1}"#);
        h.room.take_effects();
        let effects = h.check_send(
            3,
            r#"{"type":"hello","replica":5}"#,
            &[
                (2, r#"{"type":"presence","replica":5,"state":null}"#),
                (3, r#"{"type":"hello_ack","doc":"doc","replica":5,"head":0,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[]},"presence":[]}"#),
            ],
        );
        assert_eq!(effects.closes, vec![(ConnToken(1), 1008, "replaced")]);
        // The old connection is gone: its ops and presence do nothing, its leave is a no-op.
        h.check_send(1, r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,5],"after":null,"text":"x"}]}"#, &[]);
        h.check_send(1, r#"{"type":"presence","state":2}"#, &[]);
        h.room.leave(ConnToken(1));
        h.check(&[]);
        assert_eq!(h.room.replica_of(ConnToken(3)), Some(5));
        assert_eq!((h.room.head(), h.room.n_clients()), (0, 2));
        // The new one works.
        let echo = r#"{"type":"op_echo","server_seq":1,"replica":5,"client_seq":1,"ops":[{"kind":"ins","id":[0,5],"after":null,"text":"x"}]}"#;
        h.check_send(
            3,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,5],"after":null,"text":"x"}]}"#,
            &[(2, echo), (3, echo)],
        );
    }

    fn three_ops(h: &mut Harness) {
        h.send(1, r#"{"type":"hello"}"#);
        for (seq, lamport) in [(1, 0), (2, 1), (3, 2)] {
            let after = if lamport == 0 {
                "null".to_string()
            } else {
                format!("[{},1]", lamport - 1)
            };
            h.send(
                1,
                &format!(r#"{{"type":"op","client_seq":{seq},"ops":[{{"kind":"ins","id":[{lamport},1],"after":{after},"text":"x"}}]}}"#),
            );
        }
        h.room.take_effects();
    }

    fn echo_n(n: u64) -> String {
        let after = if n == 1 {
            "null".to_string()
        } else {
            format!("[{},1]", n - 2)
        };
        format!(
            r#"{{"type":"op_echo","server_seq":{n},"replica":1,"client_seq":{n},"ops":[{{"kind":"ins","id":[{},1],"after":{after},"text":"x"}}]}}"#,
            n - 1
        )
    }

    #[test]
    fn replay_or_snapshot() {
        let mut config = config();
        config.replay_window_ops = 2;
        let mut h = Harness::new(config);
        three_ops(&mut h);
        let epoch = h.room.epoch().to_owned();
        let replay = |ops: &str| {
            format!(
                r#"{{"type":"hello_ack","doc":"doc","replica":2,"head":3,"epoch":"E","strategy":"replay","ops":[{ops}],"presence":[]}}"#
            )
        };
        let snapshot = r#"{"type":"hello_ack","doc":"doc","replica":2,"head":3,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[{"id":[0,1],"text":"xxx"}]},"presence":[]}"#;
        let cases: Vec<(String, String)> = vec![
            (
                format!(r#""since":1,"epoch":"{epoch}""#),
                replay(&format!("{},{}", echo_n(2), echo_n(3))),
            ),
            (r#""since":2"#.to_string(), replay(&echo_n(3))),
            (format!(r#""since":3,"epoch":"{epoch}""#), replay("")),
            // Older than the window, ahead of head, or another epoch: snapshot.
            (r#""since":0"#.to_string(), snapshot.to_string()),
            (r#""since":4"#.to_string(), snapshot.to_string()),
            (
                r#""since":2,"epoch":"other""#.to_string(),
                snapshot.to_string(),
            ),
            (r#""epoch":"other""#.to_string(), snapshot.to_string()),
        ];
        for (fields, want) in cases {
            h.check_send(
                2,
                &format!(r#"{{"type":"hello","replica":2,{fields}}}"#),
                &[(2, &want)],
            );
            h.room.leave(ConnToken(2));
        }
    }

    #[test]
    fn a_big_replay_of_a_small_document_becomes_a_snapshot() {
        let mut config = config();
        config.doc_chars_max = 1 << 20;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        let text = "x".repeat(1_000);
        for k in 0..40u64 {
            let lamport = k * 1_000;
            h.send(
                1,
                &format!(r#"{{"type":"op","client_seq":{k},"ops":[{{"kind":"ins","id":[{lamport},1],"after":null,"text":"{text}"}},{{"kind":"del","id":[{lamport},1],"len":1000}}]}}"#),
            );
        }
        h.room.take_effects();
        let strategy = |h: &mut Harness, since: u64| {
            h.send(
                2,
                &format!(r#"{{"type":"hello","replica":2,"since":{since}}}"#),
            );
            let frame = h.room.take_effects().frames.pop().expect("hello_ack").1;
            h.room.leave(ConnToken(2));
            h.room.take_effects();
            if frame.contains(r#""strategy":"replay""#) {
                "replay"
            } else {
                "snapshot"
            }
        };
        // 40 echoes of about 1 KB: 40 KB is always fine.
        assert_eq!(strategy(&mut h, 0), "replay");
        for k in 40..80u64 {
            let lamport = k * 1_000;
            h.send(
                1,
                &format!(r#"{{"type":"op","client_seq":{k},"ops":[{{"kind":"ins","id":[{lamport},1],"after":null,"text":"{text}"}},{{"kind":"del","id":[{lamport},1],"len":1000}}]}}"#),
            );
        }
        h.room.take_effects();
        // 80 KB of replay against a snapshot of 80 tombstone runs: the snapshot wins.
        assert_eq!(strategy(&mut h, 0), "snapshot");
        assert_eq!(strategy(&mut h, 70), "replay");
    }

    #[test]
    fn joiners_of_a_big_busy_document_reuse_a_recent_snapshot() {
        let mut config = config();
        config.doc_chars_max = 1 << 24;
        config.snapshot_every_ops = u64::MAX;
        config.replay_window_ops = 10_000;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        let big = "x".repeat(300_000);
        h.send(1, &format!(r#"{{"type":"op","client_seq":0,"ops":[{{"kind":"ins","id":[0,1],"after":null,"text":"{big}"}}]}}"#));
        h.send(2, r#"{"type":"hello"}"#);
        h.room.take_effects();
        let typing = |h: &mut Harness, from: u64, to: u64| {
            for lamport in from..to {
                h.send(
                    1,
                    &format!(r#"{{"type":"op","client_seq":{lamport},"ops":[{{"kind":"ins","id":[{lamport},1],"after":[{},1],"text":"y"}}]}}"#, lamport - 1),
                );
            }
            h.room.take_effects();
        };
        typing(&mut h, 300_000, 300_003);
        // The snapshot at head 1 is reused: hello_ack at head 1, then echoes 2..=4.
        h.send(3, r#"{"type":"hello"}"#);
        let frames: Vec<Utf8Bytes> = h
            .room
            .take_effects()
            .frames
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        assert_eq!(frames.len(), 4);
        assert!(frames[0].contains(r#""head":1,"#));
        let mut replica = crate::client::Replica::new("doc", None, None);
        for frame in &frames {
            replica.handle_frame(frame).expect("frame integrates");
        }
        assert_eq!((replica.head(), replica.text()), (4, h.room.text()));
        // Far behind (echo bytes over a quarter of the snapshot): a fresh snapshot.
        typing(&mut h, 300_003, 301_000);
        h.send(4, r#"{"type":"hello"}"#);
        let frames = h.room.take_effects().frames;
        assert_eq!(frames.len(), 1);
        assert!(frames[0].1.contains(r#""head":1001,"#));
    }

    #[test]
    fn document_size_limit() {
        let mut config = config();
        config.doc_chars_max = 3;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        h.send(1, r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"abc"}]}"#);
        h.room.take_effects();
        h.check_send(
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"ins","id":[3,1],"after":[2,1],"text":"d"}]}"#,
            &[(1, r#"{"type":"error","code":"too_large","message":"document size limit reached","client_seq":2}"#)],
        );
        assert_eq!(h.room.text(), "abc");
    }

    #[test]
    fn snapshots_follow_the_cadence() {
        let mut config = config();
        config.snapshot_every_ops = 2;
        let mut h = Harness::new(config);
        h.send(1, r#"{"type":"hello"}"#);
        h.send(1, r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"ab"}]}"#);
        assert!(h.room.take_effects().snapshot.is_none());
        h.send(
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[1,1],"len":1}]}"#,
        );
        let snapshot = h.room.take_effects().snapshot.expect("due after 2 ops");
        assert_eq!(snapshot.head, 2);
        assert_eq!(snapshot.epoch, h.room.epoch());
        assert_eq!(snapshot.replicas_reserved, 16);
        assert_eq!(
            snapshot.runs_json.as_str(),
            r#"{"runs":[{"id":[0,1],"text":"a"},{"id":[1,1],"deleted":1}]}"#
        );
        h.send(
            1,
            r#"{"type":"op","client_seq":3,"ops":[{"kind":"del","id":[0,1],"len":1}]}"#,
        );
        assert!(h.room.take_effects().snapshot.is_none());
    }

    /// Runs a room against MemoryStorage as the shard would: append every record, write snapshots.
    fn persist(room: &mut Room, storage: &mut MemoryStorage) {
        let effects = room.take_effects();
        for record in &effects.records {
            storage
                .append(room.doc_name(), room.epoch(), record)
                .expect("memory append");
        }
        storage.sync().expect("memory sync");
        if let Some(snapshot) = &effects.snapshot {
            storage
                .write_snapshot(room.doc_name(), snapshot)
                .expect("memory snapshot");
        }
    }

    fn reopen(storage: &mut MemoryStorage, config: RoomConfig) -> Room {
        let stored = storage.load("doc").expect("memory load");
        Room::open("doc".into(), stored, config).expect("reopen")
    }

    fn hello_of(text: &str) -> Hello {
        match parse_client_message(text) {
            Ok(ClientMessage::Hello(hello)) => hello,
            other => panic!("not a hello: {other:?}"),
        }
    }

    fn as_user(user: &str) -> JoinAuth<'_> {
        JoinAuth {
            user,
            name: Some("Display"),
            role: "write",
            exp: 99,
        }
    }

    #[test]
    fn replica_owners_survive_snapshots_and_the_log() {
        // Owners from the log tail only (no snapshot), and from a snapshot plus a tail.
        for snapshot_every_ops in [1_000, 1] {
            let mut config = config();
            config.snapshot_every_ops = snapshot_every_ops;
            let mut storage = MemoryStorage::new();
            let mut room = Room::open("doc".into(), None, config.clone()).expect("new");
            room.join_as(
                ConnToken(1),
                &hello_of(r#"{"type":"hello","replica":5}"#),
                Some(as_user("alice")),
            );
            let effects = room.take_effects();
            assert!(effects.records.contains(&LogRecord::ReplicaOwner {
                replica: 5,
                user: "alice".into()
            }));
            let ack: serde_json::Value =
                serde_json::from_str(effects.frames[0].1.as_str()).expect("json");
            assert_eq!(
                (&ack["role"], &ack["user"], &ack["exp"]),
                (&"write".into(), &"alice".into(), &99.into())
            );
            for record in &effects.records {
                storage.append("doc", room.epoch(), record).expect("append");
            }
            let op = r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[1,5],"after":null,"text":"a"}]}"#;
            let Ok(ClientMessage::Op(op)) = parse_client_message(op) else {
                panic!("op")
            };
            room.handle_op(ConnToken(1), op);
            // An assigned replica is bound too (after the snapshot, in the tail).
            room.join_as(
                ConnToken(2),
                &hello_of(r#"{"type":"hello"}"#),
                Some(as_user("bob")),
            );
            persist(&mut room, &mut storage);
            let bob_replica = room.replica_of(ConnToken(2)).expect("bob joined");
            let stored = storage.load("doc").expect("load").expect("stored");
            let snapshot_owners = stored.snapshot.map(|s| s.owners);
            match snapshot_every_ops {
                1 => assert_eq!(snapshot_owners, Some(vec![(5, "alice".to_owned())])),
                _ => assert_eq!(snapshot_owners, None),
            }
            let mut again = reopen(&mut storage, config.clone());
            for (user, replica, allowed) in [
                ("bob", 5, false),
                ("alice", bob_replica, false),
                ("alice", 5, true),
            ] {
                let hello = hello_of(&format!(r#"{{"type":"hello","replica":{replica}}}"#));
                again.join_as(ConnToken(9), &hello, Some(as_user(user)));
                let effects = again.take_effects();
                assert_eq!(
                    effects.closes.is_empty(),
                    allowed,
                    "{user} on {replica} (snapshot every {snapshot_every_ops})"
                );
                again.leave(ConnToken(9));
                let _ = again.take_effects();
            }
            // Without access control nothing is checked or recorded.
            again.join_as(
                ConnToken(10),
                &hello_of(r#"{"type":"hello","replica":5}"#),
                None,
            );
            let effects = again.take_effects();
            assert!(effects.closes.is_empty() && effects.records.is_empty());
        }
    }

    #[test]
    fn presence_carries_the_token_identity() {
        let mut room = Room::open("doc".into(), None, config()).expect("new");
        room.join_as(
            ConnToken(1),
            &hello_of(r#"{"type":"hello"}"#),
            Some(as_user("alice")),
        );
        room.join_as(
            ConnToken(2),
            &hello_of(r#"{"type":"hello"}"#),
            Some(as_user("bob")),
        );
        let _ = room.take_effects();
        room.handle_presence(
            ConnToken(1),
            PresenceUpdate {
                state_json: r#"{"cursor":1}"#.into(),
            },
        );
        let effects = room.take_effects();
        assert_eq!(
            effects.frames[0].1.as_str(),
            r#"{"type":"presence","replica":1,"user":"alice","name":"Display","state":{"cursor":1}}"#
        );
        room.join_as(
            ConnToken(3),
            &hello_of(r#"{"type":"hello"}"#),
            Some(as_user("carol")),
        );
        let effects = room.take_effects();
        let ack: serde_json::Value =
            serde_json::from_str(effects.frames[0].1.as_str()).expect("json");
        assert_eq!(ack["presence"][0]["user"], "alice");
        assert_eq!(ack["presence"][0]["name"], "Display");
    }

    #[test]
    fn restart_restores_text_head_epoch_replay_and_replicas() {
        for snapshot_every_ops in [1_000, 2] {
            let mut config = config();
            config.snapshot_every_ops = snapshot_every_ops;
            let mut storage = MemoryStorage::new();
            let mut room = Room::open("doc".into(), None, config.clone()).expect("new");
            let ops = [
                (1, r#"{"type":"hello"}"#),
                (2, r#"{"type":"hello"}"#),
                (
                    1,
                    r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"hello"}]}"#,
                ),
                (
                    2,
                    r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[1,2],"after":null,"text":"A"}]}"#,
                ),
                (
                    1,
                    r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[1,1],"len":2}]}"#,
                ),
            ];
            for (conn, text) in ops {
                let mut h = Harness { room };
                h.send(conn, text);
                room = h.room;
                persist(&mut room, &mut storage);
            }
            let text = room.text();
            assert_eq!(text, "Ahlo");
            let epoch = room.epoch().to_owned();
            let mut again = reopen(&mut storage, config.clone());
            assert_eq!(
                (again.text(), again.head(), again.epoch()),
                (text.clone(), 3, epoch.as_str())
            );
            // Replay from since=1 serves the same echoes as before the restart (the snapshot at
            // head 2 leaves only op 3 in the tail, so since=1 then needs a snapshot).
            let hello = Hello {
                since: Some(2),
                epoch: Some(epoch.clone()),
                ..Hello::default()
            };
            again.join(ConnToken(9), &hello);
            let ack = again.take_effects();
            let frame = ack.frames.last().expect("hello_ack").1.as_str().to_owned();
            assert!(frame.contains(r#""strategy":"replay""#), "{frame}");
            assert!(
                frame.contains(
                    r#""ops":[{"type":"op_echo","server_seq":3,"replica":1,"client_seq":2"#
                ),
                "{frame}"
            );
            // Replicas 1 and 2 were handed out: a new one is above every reserved id.
            assert!(again.replica_of(ConnToken(9)).expect("joined") > 16);
            // Resends of ops acknowledged before the restart are acked, not conflicts.
            let mut h = Harness { room: again };
            h.send(5, r#"{"type":"hello","replica":1}"#);
            h.send(6, r#"{"type":"hello","replica":2}"#);
            h.room.take_effects();
            h.check_send(
                5,
                ops[2].1,
                &[(5, r#"{"type":"ack","client_seq":1,"server_seq":3}"#)],
            );
            h.check_send(
                6,
                ops[3].1,
                &[(6, r#"{"type":"ack","client_seq":1,"server_seq":3}"#)],
            );
            h.check_send(
                5,
                ops[4].1,
                &[(5, r#"{"type":"ack","client_seq":2,"server_seq":3}"#)],
            );
            // A real conflict is still one.
            h.send(6, r#"{"type":"op","client_seq":2,"ops":[{"kind":"ins","id":[1,2],"after":null,"text":"B"}]}"#);
            assert!(h.room.take_effects().frames[0]
                .1
                .as_str()
                .contains("id_conflict"));
            assert_eq!(h.room.text(), text);
        }
    }

    /// The full session of docs/protocol.md, frame by frame.
    #[test]
    fn documented_session() {
        let mut h = Harness::new(config());
        let (alice, bob, alice2) = (1, 2, 3);
        h.check_send(
            alice,
            r#"{"type":"hello","doc":"doc"}"#,
            &[(alice, EMPTY_ACK_1)],
        );
        let echo1 = r#"{"type":"op_echo","server_seq":1,"replica":1,"client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"Hi"}]}"#;
        h.check_send(
            alice,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,1],"after":null,"text":"Hi"}]}"#,
            &[(alice, echo1)],
        );
        h.check_send(
            bob,
            r#"{"type":"hello","doc":"doc"}"#,
            &[(bob, r#"{"type":"hello_ack","doc":"doc","replica":2,"head":1,"epoch":"E","strategy":"snapshot","snapshot":{"runs":[{"id":[0,1],"text":"Hi"}]},"presence":[]}"#)],
        );
        h.check_send(
            alice,
            r#"{"type":"presence","state":{"cursor":2}}"#,
            &[(
                bob,
                r#"{"type":"presence","replica":1,"state":{"cursor":2}}"#,
            )],
        );
        let echo2 = r#"{"type":"op_echo","server_seq":2,"replica":2,"client_seq":1,"ops":[{"kind":"ins","id":[2,2],"after":[1,1],"text":"!"}]}"#;
        h.check_send(
            bob,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[2,2],"after":[1,1],"text":"!"}]}"#,
            &[(alice, echo2), (bob, echo2)],
        );
        h.room.leave(ConnToken(alice));
        h.check(&[(bob, r#"{"type":"presence","replica":1,"state":null}"#)]);
        let echo3 = r#"{"type":"op_echo","server_seq":3,"replica":2,"client_seq":2,"ops":[{"kind":"del","id":[0,1],"len":1}]}"#;
        h.check_send(
            bob,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[0,1],"len":1}]}"#,
            &[(bob, echo3)],
        );
        let epoch = h.room.epoch().to_owned();
        h.check_send(
            alice2,
            &format!(r#"{{"type":"hello","doc":"doc","replica":1,"since":2,"epoch":"{epoch}"}}"#),
            &[(alice2, &format!(r#"{{"type":"hello_ack","doc":"doc","replica":1,"head":3,"epoch":"E","strategy":"replay","ops":[{echo3}],"presence":[]}}"#))],
        );
        let echo4 = r#"{"type":"op_echo","server_seq":4,"replica":1,"client_seq":2,"ops":[{"kind":"ins","id":[3,1],"after":[2,2],"text":" there"}]}"#;
        let resend = r#"{"type":"op","client_seq":2,"ops":[{"kind":"ins","id":[3,1],"after":[2,2],"text":" there"}]}"#;
        h.check_send(alice2, resend, &[(alice2, echo4), (bob, echo4)]);
        assert_eq!(h.room.text(), "i! there");
        h.check_send(
            alice2,
            resend,
            &[(alice2, r#"{"type":"ack","client_seq":2,"server_seq":4}"#)],
        );
    }

    #[test]
    fn corrupt_storage_is_refused() {
        let stored = |tail: Vec<LogRecord>| StoredDoc {
            epoch: "e".into(),
            snapshot: None,
            tail,
        };
        let bad = [
            vec![LogRecord::Ops {
                server_seq: 2,
                echo: ECHO_A.replace(":1,\"replica", ":2,\"replica").into(),
            }],
            vec![LogRecord::Ops {
                server_seq: 1,
                echo: "{".into(),
            }],
            vec![LogRecord::Ops {
                server_seq: 1,
                echo: ECHO_A.replace("null", "[5,5]").into(),
            }],
        ];
        for tail in bad {
            assert!(Room::open("doc".into(), Some(stored(tail)), config()).is_err());
        }
        let room = Room::open(
            "doc".into(),
            Some(stored(vec![LogRecord::Ops {
                server_seq: 1,
                echo: ECHO_A.into(),
            }])),
            config(),
        );
        assert_eq!(
            room.map(|r| (r.text(), r.head())),
            Ok(("ab".to_string(), 1))
        );
        let snapshot = StoredSnapshot {
            epoch: "e".into(),
            head: 1,
            replicas_reserved: 0,
            owners: Vec::new(),
            runs_json: "{\"runs\":[{}]}".into(),
        };
        let doc = StoredDoc {
            epoch: "e".into(),
            snapshot: Some(snapshot),
            tail: vec![],
        };
        assert!(Room::open("doc".into(), Some(doc), config()).is_err());
    }

    mod soup {
        use super::*;
        use crate::protocol::{parse_server_message, ServerMessage};
        use proptest::prelude::*;

        /// Client frames with small ids, so they often hit existing items.
        fn frame() -> impl Strategy<Value = String> {
            let id = (0u64..6, 0u64..4);
            let op = prop_oneof![
                (id.clone(), prop::option::of(id.clone()), "[ab]{0,3}").prop_map(
                    |((l, r), after, text)| {
                        let after = after.map_or("null".to_string(), |(a, b)| format!("[{a},{b}]"));
                        format!(
                            r#"{{"kind":"ins","id":[{l},{r}],"after":{after},"text":"{text}"}}"#
                        )
                    }
                ),
                (id, 0u64..3).prop_map(|((l, r), n)| format!(
                    r#"{{"kind":"del","id":[{l},{r}],"len":{n}}}"#
                )),
            ];
            prop_oneof![
                6 => (0u64..9, prop::collection::vec(op, 1..4))
                    .prop_map(|(seq, ops)| format!(r#"{{"type":"op","client_seq":{seq},"ops":[{}]}}"#, ops.join(","))),
                1 => prop::option::of(1u64..4).prop_map(|replica| match replica {
                    Some(r) => format!(r#"{{"type":"hello","replica":{r}}}"#),
                    None => r#"{"type":"hello"}"#.to_string(),
                }),
                1 => (0u8..3).prop_map(|n| format!(r#"{{"type":"presence","state":{n}}}"#)),
                1 => Just(r#"{"type":"presence","state":null}"#.to_string()),
                1 => Just("{".to_string()),
            ]
        }

        proptest! {
            /// Whatever clients send, the room never panics, its CRDT stays consistent, every
            /// frame is a contract message, and head counts exactly the echoed messages.
            #[test]
            fn rooms_survive_any_client_frames(
                steps in prop::collection::vec((0usize..4, frame(), any::<bool>()), 1..80)
            ) {
                let mut config = config();
                config.snapshot_every_ops = 5;
                config.replay_window_ops = 3;
                let mut h = Harness::new(config);
                let mut n_echoed = 0;
                for (conn, text, leave) in steps {
                    if leave {
                        h.room.leave(ConnToken(conn));
                    } else {
                        h.send(conn, &text);
                    }
                    let effects = h.room.take_effects();
                    for (_, frame) in &effects.frames {
                        prop_assert!(parse_server_message(frame).is_ok(), "{}", frame);
                    }
                    n_echoed += effects.records.iter().filter(|r| matches!(r, LogRecord::Ops { .. })).count() as u64;
                    for (_, frame) in &effects.frames {
                        if let Ok(ServerMessage::HelloAck(ack)) = parse_server_message(frame) {
                            prop_assert_eq!(ack.head, h.room.head());
                        }
                    }
                }
                prop_assert_eq!(h.room.head(), n_echoed);
                h.room.crdt.dbg_check();
            }
        }
    }
}
