//! One generator thread: a mio event loop that owns some rooms and every client of them, runs
//! their connections, fires writers' edits on schedule and measures every delivery.
//!
//! Clients are spread over threads by index, so one big room uses every thread. An op's send time
//! goes into the shared [`SendLog`] slot named by its `client_seq` (writer index in the high bits)
//! before the frame leaves; every receiver, on any thread, reads it with the same monotonic clock.
//! The thread never blocks and never takes a lock (phase changes arrive through atomics plus a `Waker`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tungstenite::Utf8Bytes;

use super::arrival::{Arrivals, Rng};
use super::config::{LoadConfig, Target};
use super::net::{self, ConnError, Progress, WsConn};
use super::session::{Incoming, Session};
use super::stats::{record, Convergence, Counters, LatencyHistograms};

fn text_hash(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The token of each worker's waker.
pub const WAKER_TOKEN: Token = Token(usize::MAX);

/// Steps of a run, in order; the coordinator moves every worker forward together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Nothing yet.
    Idle = 0,
    /// The first client of each room joins and inserts the preload text.
    Preload = 1,
    /// Every client joins.
    Join = 2,
    /// Writers edit (warm-up, then the measured window).
    Edit = 3,
    /// No new edits; in-flight ones arrive.
    Drain = 4,
    /// Check convergence, close and report.
    Finish = 5,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            1 => Phase::Preload,
            2 => Phase::Join,
            3 => Phase::Edit,
            4 => Phase::Drain,
            5 => Phase::Finish,
            _ => Phase::Idle,
        }
    }
}

/// What the coordinator and the workers share: the phase, the measured window and progress
/// counters. Written by one side, read by the other; no locks.
#[derive(Debug)]
pub struct Shared {
    phase: AtomicU8,
    /// Origin of the window offsets.
    pub base: Instant,
    /// Measured window start, microseconds after `base` (`u64::MAX` until set).
    pub window_start_us: AtomicU64,
    /// Measured window end, microseconds after `base`.
    pub window_end_us: AtomicU64,
    /// Clients that reached `hello_ack`.
    pub joined: AtomicU64,
    /// Clients that failed before joining.
    pub failed: AtomicU64,
    /// Rooms whose preload op was echoed.
    pub preloaded: AtomicU64,
    /// Deliveries (own echoes included) still expected for every op sent; drain waits for 0.
    pub outstanding: AtomicI64,
    /// Per room: clients joined and not lost.
    pub room_joined: Vec<AtomicU32>,
    /// Send times of every writer's ops.
    pub send_log: SendLog,
}

/// One op's bookkeeping, written by its writer before the frame leaves.
#[derive(Debug, Default)]
pub struct Slot {
    /// Send time in microseconds after [`Shared::base`], plus one (0: nothing sent).
    sent_us: AtomicU64,
    /// Other clients that have not integrated it yet.
    others_remaining: AtomicU32,
    /// Sent inside the measured window.
    measured: AtomicBool,
}

/// Per writer (`room * writers_per_room + replica - 1`: client `i` of a room asks for replica
/// `i + 1`, and writers come first), a fixed array of slots indexed by `client_seq`.
#[derive(Debug, Default)]
pub struct SendLog {
    writers: Vec<Box<[Slot]>>,
}

impl SendLog {
    /// Room for `slots_per_writer` ops of each of `n_writers` writers.
    pub fn new(n_writers: usize, slots_per_writer: usize) -> SendLog {
        SendLog {
            writers: (0..n_writers)
                .map(|_| (0..slots_per_writer).map(|_| Slot::default()).collect())
                .collect(),
        }
    }

    /// The slot of op `client_seq` of replica `replica` in room `room`, if it is tracked.
    pub fn slot(
        &self,
        room: usize,
        writers_per_room: usize,
        replica: u64,
        client_seq: u64,
    ) -> Option<&Slot> {
        let writer_in_room = usize::try_from(replica.checked_sub(1)?).ok()?;
        if writer_in_room >= writers_per_room {
            return None;
        }
        let seq = usize::try_from(client_seq).ok()?;
        self.writers
            .get(room * writers_per_room + writer_in_room)?
            .get(seq)
    }

    /// Ops sent in the measured window that some client never integrated.
    pub fn undelivered(&self) -> u64 {
        let mut n = 0;
        for slots in &self.writers {
            for slot in slots.iter() {
                if slot.sent_us.load(Ordering::Acquire) != 0
                    && slot.measured.load(Ordering::Acquire)
                    && slot.others_remaining.load(Ordering::Acquire) > 0
                {
                    n += 1;
                }
            }
        }
        n
    }
}

impl Shared {
    /// State for `n_rooms` rooms whose writers send at most `slots_per_writer` ops each.
    pub fn new(n_rooms: usize, n_writers: usize, slots_per_writer: usize) -> Shared {
        Shared {
            phase: AtomicU8::new(Phase::Idle as u8),
            base: Instant::now(),
            window_start_us: AtomicU64::new(u64::MAX),
            window_end_us: AtomicU64::new(u64::MAX),
            joined: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            preloaded: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            room_joined: (0..n_rooms).map(|_| AtomicU32::new(0)).collect(),
            send_log: SendLog::new(n_writers, slots_per_writer),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Moves to `phase` (workers notice on their next turn; wake them).
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Sets the measured window.
    pub fn set_window(&self, start: Instant, end: Instant) {
        let us = |t: Instant| t.saturating_duration_since(self.base).as_micros() as u64;
        self.window_start_us.store(us(start), Ordering::Release);
        self.window_end_us.store(us(end), Ordering::Release);
    }

    fn us_since_base(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }

    fn in_window(&self, now: Instant) -> bool {
        let us = self.us_since_base(now);
        us >= self.window_start_us.load(Ordering::Acquire)
            && us < self.window_end_us.load(Ordering::Acquire)
    }
}

/// What a worker hands back when it finishes.
#[derive(Debug, Default)]
pub struct WorkerResult {
    /// Its histograms.
    pub histograms: LatencyHistograms,
    /// Its counters.
    pub counters: Counters,
    /// Per room it had live clients of: what they hold.
    pub rooms: Vec<RoomPart>,
}

/// What one worker's live clients of a room hold at the end.
#[derive(Debug, Clone)]
pub struct RoomPart {
    /// Global room index.
    pub room: usize,
    /// Live clients seen.
    pub n_live: usize,
    /// Head and text hash of the first live client.
    pub head: u64,
    /// Hash of the first live client's text.
    pub text_hash: u64,
    /// Whether every live client here had that same head and text.
    pub uniform: bool,
    /// Visible characters of the first live client's text.
    pub chars: u64,
}

/// Merges the workers' room parts into a verdict: a room converged when it has live clients that
/// all hold the same head and text, and no op of the run is missing anywhere (`undelivered_total`).
pub fn convergence(parts: &[RoomPart], n_rooms: usize, outstanding: i64) -> Convergence {
    let mut verdict = Convergence {
        rooms_checked: n_rooms as u64,
        ..Convergence::default()
    };
    let mut by_room: Vec<Vec<&RoomPart>> = vec![Vec::new(); n_rooms];
    for part in parts {
        verdict.doc_chars_max = verdict.doc_chars_max.max(part.chars);
        if let Some(list) = by_room.get_mut(part.room) {
            list.push(part);
        }
    }
    for (room, list) in by_room.iter().enumerate() {
        let problem = match list.first() {
            None => Some("no live client".to_owned()),
            Some(first) => {
                if list.iter().any(|p| !p.uniform) {
                    Some("clients on one thread differ".to_owned())
                } else if list.iter().any(|p| p.head != first.head) {
                    Some(format!("heads differ ({} vs others)", first.head))
                } else if list.iter().any(|p| p.text_hash != first.text_hash) {
                    Some("texts differ".to_owned())
                } else {
                    None
                }
            }
        };
        match problem {
            None => verdict.rooms_converged += 1,
            Some(p) if verdict.failures.len() < 10 => {
                verdict.failures.push(format!("room {room}: {p}"))
            }
            Some(_) => {}
        }
    }
    if outstanding != 0 && verdict.failures.len() < 10 {
        verdict
            .failures
            .push(format!("{outstanding} deliveries never arrived"));
        verdict.rooms_converged = 0;
    }
    verdict
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Idle,
    Connecting,
    Joined,
    Failed,
    Lost,
}

struct Client {
    /// Global room index.
    room: usize,
    /// Index over the whole run, to spread source addresses.
    global_idx: usize,
    writer: bool,
    /// Whether it inserts the preload text when it joins.
    preloader: bool,
    /// The replica id it asks for: its index in the room plus one.
    replica_id: u64,
    state: ClientState,
    conn: WsConn,
    session: Session,
    started: Instant,
}

/// What a worker keeps about a room it has clients of.
struct RoomLocal {
    url: String,
    /// The preload op (replica, client_seq) until its echo arrives.
    preload: Option<(u64, u64)>,
}

/// One generator thread.
pub struct Worker {
    poll: Poll,
    config: Arc<LoadConfig>,
    target: Target,
    shared: Arc<Shared>,
    preload_text: Option<Arc<str>>,
    clients: Vec<Client>,
    /// Writers per room (the send log's stride).
    writers: usize,
    rooms: std::collections::HashMap<usize, RoomLocal>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    to_connect: VecDeque<usize>,
    n_connecting: usize,
    rng: Rng,
    arrivals: Arrivals,
    histograms: LatencyHistograms,
    counters: Counters,
    phase_seen: Phase,
    inbox: Vec<Utf8Bytes>,
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ";

impl Worker {
    /// Worker `idx` of `n_workers`: it runs every client whose global index is `idx` modulo
    /// `n_workers`; `poll` is the one its waker was made from.
    pub fn new(
        idx: usize,
        n_workers: usize,
        poll: Poll,
        config: Arc<LoadConfig>,
        target: Target,
        shared: Arc<Shared>,
        preload_text: Option<Arc<str>>,
    ) -> Worker {
        let mut clients = Vec::new();
        let mut rooms = std::collections::HashMap::new();
        let writers = config.writers();
        // Checked by `loadgen::run` before any worker starts; a key file that vanished since
        // costs the tokens (the server then refuses the clients, loudly).
        let tokens = config.client_tokens().unwrap_or_else(|e| {
            log::warn!("collab-load: no tokens: {e}");
            super::config::ClientTokens::None
        });
        let now = Instant::now();
        for global_idx in (idx..config.total_clients()).step_by(n_workers) {
            let room = global_idx / config.clients_per_room;
            let i = global_idx % config.clients_per_room;
            rooms.entry(room).or_insert_with(|| {
                let doc = config.doc_name(room);
                let url = format!("{}/ws/{doc}", target.base_url);
                RoomLocal { url, preload: None }
            });
            let writer = i < writers;
            clients.push(Client {
                room,
                global_idx,
                writer,
                preloader: i == 0,
                replica_id: i as u64 + 1,
                state: ClientState::Idle,
                conn: WsConn::Closed,
                session: Session::with_token(
                    &config.doc_name(room),
                    i as u64 + 1,
                    tokens.for_client(global_idx, &config.doc_name(room)),
                ),
                started: now,
            });
        }
        let arrivals = Arrivals::new(config.arrivals, config.edit_interval);
        let rng = Rng::new(config.seed ^ (idx as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Worker {
            writers,
            poll,
            config,
            target,
            shared,
            preload_text,
            clients,
            rooms,
            timers: BinaryHeap::new(),
            to_connect: VecDeque::new(),
            n_connecting: 0,
            rng,
            arrivals,
            histograms: LatencyHistograms::default(),
            counters: Counters::default(),
            phase_seen: Phase::Idle,
            inbox: Vec::new(),
        }
    }

    /// Runs until the coordinator says [`Phase::Finish`], then checks convergence and closes.
    pub fn run(mut self) -> WorkerResult {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let phase = self.shared.phase();
            if phase != self.phase_seen {
                self.enter(phase, now);
            }
            if phase == Phase::Finish {
                break;
            }
            self.start_connects(now);
            let next_timer = self.fire_timers(now);
            let mut timeout = Duration::from_millis(50);
            if let Some(at) = next_timer {
                timeout = timeout.min(at.saturating_duration_since(Instant::now()));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.counters
                        .error(format!("poll_{:?}", e.kind()).to_lowercase());
                }
                continue;
            }
            for event in events.iter() {
                if event.token() == WAKER_TOKEN {
                    continue;
                }
                self.on_event(event.token().0, event.is_writable());
            }
        }
        self.finish()
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase_seen = phase;
        match phase {
            Phase::Preload => {
                for (idx, client) in self.clients.iter().enumerate() {
                    if client.preloader {
                        self.to_connect.push_back(idx);
                    }
                }
            }
            Phase::Join => {
                // A preloader still queued may be queued twice: `start_connects` skips any
                // client that is no longer idle, so that is harmless (and O(n), unlike a search).
                for (idx, client) in self.clients.iter().enumerate() {
                    if client.state == ClientState::Idle {
                        self.to_connect.push_back(idx);
                    }
                }
            }
            Phase::Edit => {
                for idx in 0..self.clients.len() {
                    if self.clients[idx].writer {
                        let at = now + self.arrivals.first_offset(&mut self.rng);
                        self.timers.push(Reverse((at, idx)));
                    }
                }
            }
            Phase::Idle | Phase::Drain | Phase::Finish => {}
        }
    }

    fn start_connects(&mut self, now: Instant) {
        while self.n_connecting < self.config.connect_concurrency {
            let Some(idx) = self.to_connect.pop_front() else {
                break;
            };
            let client = &mut self.clients[idx];
            if client.state != ClientState::Idle {
                continue;
            }
            let source = match self.config.bind.len() {
                0 => None,
                n => Some(self.config.bind[client.global_idx % n]),
            };
            client.started = now;
            match net::connect(self.target.addr, source) {
                Ok(mut stream) => {
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        self.fail(idx, ConnError::Connect(e));
                        continue;
                    }
                    let url = self
                        .rooms
                        .get(&client.room)
                        .map(|r| r.url.clone())
                        .unwrap_or_default();
                    client.conn = WsConn::new(stream, url);
                    client.state = ClientState::Connecting;
                    self.n_connecting += 1;
                }
                Err(e) => {
                    client.state = ClientState::Connecting;
                    self.n_connecting += 1;
                    self.fail(idx, ConnError::Connect(e));
                }
            }
        }
    }

    /// Fires due edits; returns when the next one is due.
    fn fire_timers(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((at, idx))) = self.timers.peek().copied() {
            if at > now {
                return Some(at);
            }
            self.timers.pop();
            if self.phase_seen != Phase::Edit || self.clients[idx].state != ClientState::Joined {
                continue;
            }
            self.edit(idx, at, now);
            let gap = self.arrivals.next_gap(&mut self.rng);
            // Keep the schedule (and so the offered rate) unless hopelessly behind.
            let next = if at + gap + Duration::from_secs(1) < now {
                now + gap
            } else {
                at + gap
            };
            self.timers.push(Reverse((next, idx)));
        }
        None
    }

    fn edit(&mut self, idx: usize, scheduled: Instant, now: Instant) {
        let size = self.config.edit_size;
        let client = &mut self.clients[idx];
        let len = client.session.len();
        let delete = len >= size && self.rng.below(100) < u64::from(self.config.delete_percent);
        let made = if delete {
            let pos = self.rng.below((len - size + 1) as u64) as usize;
            client.session.delete(pos, size)
        } else {
            let pos = self.rng.below(len as u64 + 1) as usize;
            let text: String = (0..size)
                .map(|_| ALPHABET[self.rng.below(ALPHABET.len() as u64) as usize] as char)
                .collect();
            client.session.insert(pos, &text).map(Some)
        };
        let (client_seq, frame) = match made {
            Ok(Some(made)) => made,
            Ok(None) => return,
            Err(e) => {
                self.counters.error(format!("session_{e}"));
                return;
            }
        };
        let measured = self.shared.in_window(now);
        let others = self.shared.room_joined[client.room]
            .load(Ordering::Acquire)
            .saturating_sub(1);
        // The slot is complete before the frame leaves, so no receiver can see the echo first.
        let slot =
            self.shared
                .send_log
                .slot(client.room, self.writers, client.replica_id, client_seq);
        if let Some(slot) = slot {
            slot.others_remaining.store(others, Ordering::Relaxed);
            slot.measured.store(measured, Ordering::Relaxed);
            slot.sent_us
                .store(self.shared.us_since_base(now) + 1, Ordering::Release);
            self.shared
                .outstanding
                .fetch_add(i64::from(others) + 1, Ordering::AcqRel);
        } else {
            self.counters.error("untracked_edit");
        }
        if let Err(e) = client.conn.send(frame) {
            self.lose(idx, e);
            return;
        }
        if measured {
            self.counters.edits_sent += 1;
            record(
                &mut self.histograms.send_lag_us,
                now.saturating_duration_since(scheduled),
            );
        }
    }

    fn on_event(&mut self, idx: usize, writable: bool) {
        let Some(client) = self.clients.get_mut(idx) else {
            return;
        };
        match client.state {
            ClientState::Connecting => match client.conn.advance() {
                Ok(Progress::Opened) => {
                    let hello = client.session.hello();
                    if let Err(e) = client.conn.send(hello) {
                        self.fail(idx, e);
                        return;
                    }
                }
                Ok(Progress::Pending) => {}
                Err(e) => {
                    self.fail(idx, e);
                    return;
                }
            },
            ClientState::Joined => {
                if writable {
                    if let Err(e) = client.conn.flush() {
                        self.lose(idx, e);
                        return;
                    }
                }
            }
            ClientState::Idle | ClientState::Failed | ClientState::Lost => return,
        }
        if !self.clients[idx].conn.is_open() {
            return;
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        let read = self.clients[idx].conn.read_texts(|text| inbox.push(text));
        for text in inbox.drain(..) {
            self.on_text(idx, text.as_str());
        }
        self.inbox = inbox;
        if let Err(e) = read {
            self.lose(idx, e);
        }
    }

    fn on_text(&mut self, idx: usize, text: &str) {
        let client = &mut self.clients[idx];
        if matches!(client.state, ClientState::Failed | ClientState::Lost) {
            return;
        }
        let incoming = match client.session.receive(text) {
            Ok(incoming) => incoming,
            Err(e) => {
                log::debug!("client {idx}: {e}: {text}");
                let kind = format!(
                    "client_{}",
                    e.to_string()
                        .split(':')
                        .next()
                        .unwrap_or("error")
                        .replace(' ', "_")
                );
                self.counters.error(kind);
                return;
            }
        };
        // Read the clock after integrating: the sample ends when this client holds the op, and
        // a long batch of events must not make later samples look faster than they were.
        let now = Instant::now();
        let in_window = self.shared.in_window(now);
        if in_window {
            self.counters.bytes_received += text.len() as u64;
        }
        let own_replica = client.session.replica();
        let room_idx = client.room;
        match incoming {
            Incoming::Joined { .. } => {
                if client.state != ClientState::Connecting {
                    return;
                }
                client.state = ClientState::Joined;
                record(
                    &mut self.histograms.join_us,
                    now.saturating_duration_since(client.started),
                );
                self.n_connecting -= 1;
                self.counters.conns_joined += 1;
                self.shared.joined.fetch_add(1, Ordering::AcqRel);
                self.shared.room_joined[room_idx].fetch_add(1, Ordering::AcqRel);
                if self.phase_seen == Phase::Preload && client.preloader {
                    if let Some(text) = self.preload_text.clone() {
                        match client.session.insert(0, &text) {
                            Ok((client_seq, frame)) => {
                                if let Some(room) = self.rooms.get_mut(&room_idx) {
                                    room.preload = own_replica.map(|r| (r, client_seq));
                                }
                                if let Err(e) = client.conn.send(frame) {
                                    self.lose(idx, e);
                                }
                            }
                            Err(e) => self.counters.error(format!("session_{e}")),
                        }
                    }
                }
            }
            Incoming::Echo {
                replica,
                client_seq,
            } => {
                if in_window {
                    self.counters.echoes_received += 1;
                }
                let own = own_replica == Some(replica);
                if let Some(room) = self.rooms.get_mut(&room_idx) {
                    if own && room.preload == Some((replica, client_seq)) {
                        room.preload = None;
                        self.shared.preloaded.fetch_add(1, Ordering::AcqRel);
                        return;
                    }
                }
                let slot = self
                    .shared
                    .send_log
                    .slot(room_idx, self.writers, replica, client_seq);
                let Some(slot) = slot else { return };
                let sent_us = slot.sent_us.load(Ordering::Acquire);
                if sent_us == 0 {
                    return;
                }
                let elapsed = Duration::from_micros(
                    self.shared.us_since_base(now).saturating_sub(sent_us - 1),
                );
                let measured = slot.measured.load(Ordering::Relaxed);
                if own {
                    if measured {
                        record(&mut self.histograms.echo_us, elapsed);
                    }
                } else {
                    let before = slot.others_remaining.fetch_sub(1, Ordering::AcqRel);
                    if measured {
                        record(&mut self.histograms.delivery_us, elapsed);
                        if before == 1 {
                            record(&mut self.histograms.delivery_all_us, elapsed);
                        }
                    }
                }
                self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
            Incoming::Ack { client_seq } => self.settle_unechoed(idx, client_seq, false),
            Incoming::Refused { code, client_seq } => {
                self.counters.error(format!("server_{code}"));
                if let Some(client_seq) = client_seq {
                    self.settle_unechoed(idx, client_seq, true);
                }
            }
            Incoming::Other => {}
        }
    }

    /// An op of ours that will get no echo (answered by `ack` or refused): nobody waits for it.
    fn settle_unechoed(&mut self, idx: usize, client_seq: u64, refused: bool) {
        let (room, replica) = (self.clients[idx].room, self.clients[idx].replica_id);
        let Some(slot) = self
            .shared
            .send_log
            .slot(room, self.writers, replica, client_seq)
        else {
            return;
        };
        let others = slot.others_remaining.swap(0, Ordering::AcqRel);
        self.shared
            .outstanding
            .fetch_sub(i64::from(others) + 1, Ordering::AcqRel);
        if slot.measured.load(Ordering::Relaxed) {
            if refused {
                self.counters.edits_refused += 1;
            } else {
                self.counters.edits_unchanged += 1;
            }
        }
    }

    fn fail(&mut self, idx: usize, err: ConnError) {
        log::debug!("client {idx} failed: {err}");
        let client = &mut self.clients[idx];
        if client.state == ClientState::Connecting {
            self.n_connecting -= 1;
        }
        client.state = ClientState::Failed;
        client.conn.close();
        self.counters.conns_failed += 1;
        self.counters.error(err.kind());
        self.shared.failed.fetch_add(1, Ordering::AcqRel);
    }

    fn lose(&mut self, idx: usize, err: ConnError) {
        log::debug!("client {idx} lost: {err}");
        let client = &mut self.clients[idx];
        match client.state {
            ClientState::Connecting => self.fail(idx, err),
            ClientState::Joined => {
                client.state = ClientState::Lost;
                client.conn.close();
                self.shared.room_joined[client.room].fetch_sub(1, Ordering::AcqRel);
                self.counters.conns_lost += 1;
                self.counters.error(err.kind());
            }
            ClientState::Idle | ClientState::Failed | ClientState::Lost => {}
        }
    }

    fn finish(mut self) -> WorkerResult {
        for idx in 0..self.clients.len() {
            if self.clients[idx].state == ClientState::Connecting {
                self.fail(
                    idx,
                    ConnError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "join timeout",
                    )),
                );
            }
        }
        let mut parts: Vec<RoomPart> = Vec::new();
        if !self.config.no_check {
            let mut by_room: std::collections::BTreeMap<usize, RoomPart> =
                std::collections::BTreeMap::new();
            for client in self
                .clients
                .iter()
                .filter(|c| c.state == ClientState::Joined)
            {
                let head = client.session.head();
                let hash = text_hash(&client.session.text());
                let part = by_room.entry(client.room).or_insert(RoomPart {
                    room: client.room,
                    n_live: 0,
                    head,
                    text_hash: hash,
                    uniform: true,
                    chars: client.session.len() as u64,
                });
                part.n_live += 1;
                part.uniform &= part.head == head && part.text_hash == hash;
            }
            parts.extend(by_room.into_values());
        }
        for client in &mut self.clients {
            client.conn.close();
        }
        WorkerResult {
            histograms: self.histograms,
            counters: self.counters,
            rooms: parts,
        }
    }
}
