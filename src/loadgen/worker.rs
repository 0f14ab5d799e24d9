//! One generator thread: a mio event loop that owns some rooms and every client of them, runs
//! their connections, fires writers' edits on schedule and measures every delivery.
//!
//! All clients of a room live on the same thread, so the send time of an op and each receiver's
//! integration time are read from the same clock without any sharing; the thread never blocks
//! and never takes a lock (phase changes arrive through atomics plus a `Waker`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tungstenite::Utf8Bytes;

use super::arrival::{Arrivals, Rng};
use super::config::{LoadConfig, Target};
use super::net::{self, ConnError, Progress, WsConn};
use super::session::{Incoming, Session};
use super::stats::{record, Convergence, Counters, LatencyHistograms};

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
    /// Per worker: ops still awaiting some delivery.
    pub inflight: Vec<AtomicU64>,
}

impl Shared {
    /// State for `n_workers` workers.
    pub fn new(n_workers: usize) -> Shared {
        Shared {
            phase: AtomicU8::new(Phase::Idle as u8),
            base: Instant::now(),
            window_start_us: AtomicU64::new(u64::MAX),
            window_end_us: AtomicU64::new(u64::MAX),
            joined: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            preloaded: AtomicU64::new(0),
            inflight: (0..n_workers).map(|_| AtomicU64::new(0)).collect(),
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

    fn in_window(&self, now: Instant) -> bool {
        let us = now.saturating_duration_since(self.base).as_micros() as u64;
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
    /// Its rooms' convergence.
    pub convergence: Convergence,
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
    room: usize,
    /// Index over the whole run, to spread source addresses.
    global_idx: usize,
    writer: bool,
    state: ClientState,
    conn: WsConn,
    session: Session,
    started: Instant,
}

/// Bookkeeping for an op until every client of its room integrated it.
struct InFlight {
    sent: Instant,
    others_remaining: u32,
    own_pending: bool,
    measured: bool,
}

struct RoomState {
    doc: String,
    url: String,
    clients: Vec<usize>,
    n_joined: u32,
    /// Keyed by (replica, client_seq): filled when a writer sends, drained by echoes.
    inflight: HashMap<(u64, u64), InFlight>,
    /// The preload op of this room until its echo arrives.
    preload: Option<(u64, u64)>,
}

/// One generator thread.
pub struct Worker {
    idx: usize,
    poll: Poll,
    config: Arc<LoadConfig>,
    target: Target,
    shared: Arc<Shared>,
    preload_text: Option<Arc<str>>,
    clients: Vec<Client>,
    rooms: Vec<RoomState>,
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
    /// A worker for the rooms `room_ids` (global indices); `poll` is the one its waker was made from.
    pub fn new(
        idx: usize,
        poll: Poll,
        config: Arc<LoadConfig>,
        target: Target,
        shared: Arc<Shared>,
        preload_text: Option<Arc<str>>,
        room_ids: &[usize],
    ) -> Worker {
        let mut clients = Vec::new();
        let mut rooms = Vec::new();
        let writers = config.writers();
        let now = Instant::now();
        for &room_id in room_ids {
            let doc = config.doc_name(room_id);
            let url = format!("{}/ws/{doc}", target.base_url);
            let mut room = RoomState {
                doc,
                url,
                clients: Vec::new(),
                n_joined: 0,
                inflight: HashMap::new(),
                preload: None,
            };
            for i in 0..config.clients_per_room {
                room.clients.push(clients.len());
                clients.push(Client {
                    room: rooms.len(),
                    global_idx: room_id * config.clients_per_room + i,
                    writer: i < writers,
                    state: ClientState::Idle,
                    conn: WsConn::Closed,
                    session: Session::new(),
                    started: now,
                });
            }
            rooms.push(room);
        }
        let arrivals = Arrivals::new(config.arrivals, config.edit_interval);
        let rng = Rng::new(config.seed ^ (idx as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Worker {
            idx,
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
            let inflight: usize = self.rooms.iter().map(|r| r.inflight.len()).sum();
            self.shared.inflight[self.idx].store(inflight as u64, Ordering::Release);
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
            let now = Instant::now();
            for event in events.iter() {
                if event.token() == WAKER_TOKEN {
                    continue;
                }
                self.on_event(event.token().0, event.is_writable(), now);
            }
        }
        self.finish()
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase_seen = phase;
        match phase {
            Phase::Preload => {
                for room in &self.rooms {
                    if let Some(&first) = room.clients.first() {
                        self.to_connect.push_back(first);
                    }
                }
            }
            Phase::Join => {
                for (idx, client) in self.clients.iter().enumerate() {
                    if client.state == ClientState::Idle && !self.to_connect.contains(&idx) {
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
                    let url = self.rooms[client.room].url.clone();
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
        let Some(replica) = client.session.replica() else {
            return;
        };
        if let Err(e) = client.conn.send(frame) {
            self.lose(idx, e);
            return;
        }
        let measured = self.shared.in_window(now);
        let room = &mut self.rooms[client.room];
        let others = room.n_joined.saturating_sub(1);
        room.inflight.insert(
            (replica, client_seq),
            InFlight {
                sent: now,
                others_remaining: others,
                own_pending: true,
                measured,
            },
        );
        if measured {
            self.counters.edits_sent += 1;
            record(
                &mut self.histograms.send_lag_us,
                now.saturating_duration_since(scheduled),
            );
        }
    }

    fn on_event(&mut self, idx: usize, writable: bool, now: Instant) {
        let Some(client) = self.clients.get_mut(idx) else {
            return;
        };
        match client.state {
            ClientState::Connecting => match client.conn.advance() {
                Ok(Progress::Opened) => {
                    let hello = Session::hello(&self.rooms[client.room].doc);
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
            self.on_text(idx, text.as_str(), now);
        }
        self.inbox = inbox;
        if let Err(e) = read {
            self.lose(idx, e);
        }
    }

    fn on_text(&mut self, idx: usize, text: &str, now: Instant) {
        let in_window = self.shared.in_window(now);
        if in_window {
            self.counters.bytes_received += text.len() as u64;
        }
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
                let room = &mut self.rooms[room_idx];
                room.n_joined += 1;
                let is_first = room.clients.first() == Some(&idx);
                if self.phase_seen == Phase::Preload && is_first {
                    if let Some(text) = self.preload_text.clone() {
                        match client.session.insert(0, &text) {
                            Ok((client_seq, frame)) => {
                                room.preload = own_replica.map(|r| (r, client_seq));
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
                let room = &mut self.rooms[room_idx];
                let own = own_replica == Some(replica);
                let key = (replica, client_seq);
                if let Some(flight) = room.inflight.get_mut(&key) {
                    let elapsed = now.saturating_duration_since(flight.sent);
                    if own {
                        flight.own_pending = false;
                        if flight.measured {
                            record(&mut self.histograms.echo_us, elapsed);
                        }
                    } else {
                        flight.others_remaining = flight.others_remaining.saturating_sub(1);
                        if flight.measured {
                            record(&mut self.histograms.delivery_us, elapsed);
                            if flight.others_remaining == 0 {
                                record(&mut self.histograms.delivery_all_us, elapsed);
                            }
                        }
                    }
                    if flight.others_remaining == 0 && !flight.own_pending {
                        room.inflight.remove(&key);
                    }
                } else if own && room.preload == Some(key) {
                    room.preload = None;
                    self.shared.preloaded.fetch_add(1, Ordering::AcqRel);
                }
            }
            Incoming::Ack { client_seq } => {
                if let Some(replica) = own_replica {
                    if self.rooms[room_idx]
                        .inflight
                        .remove(&(replica, client_seq))
                        .is_some_and(|f| f.measured)
                    {
                        self.counters.edits_unchanged += 1;
                    }
                }
            }
            Incoming::Refused { code, client_seq } => {
                self.counters.error(format!("server_{code}"));
                if let (Some(replica), Some(client_seq)) = (own_replica, client_seq) {
                    if self.rooms[room_idx]
                        .inflight
                        .remove(&(replica, client_seq))
                        .is_some_and(|f| f.measured)
                    {
                        self.counters.edits_refused += 1;
                    }
                }
            }
            Incoming::Other => {}
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
                self.rooms[client.room].n_joined -= 1;
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
        let mut convergence = Convergence::default();
        for room in &self.rooms {
            convergence.rooms_checked += 1;
            let undelivered = room.inflight.values().filter(|f| f.measured).count() as u64;
            self.counters.edits_undelivered += undelivered;
            if self.config.no_check {
                continue;
            }
            let live: Vec<&Client> = room
                .clients
                .iter()
                .map(|&i| &self.clients[i])
                .filter(|c| c.state == ClientState::Joined)
                .collect();
            let Some(first) = live.first() else {
                convergence
                    .failures
                    .push(format!("{}: no live client", room.doc));
                continue;
            };
            let head = first.session.head();
            let text = first.session.text();
            let mut problem = None;
            if !room.inflight.is_empty() {
                problem = Some(format!(
                    "{} ops not integrated everywhere",
                    room.inflight.len()
                ));
            } else if let Some(c) = live.iter().find(|c| c.session.head() != head) {
                problem = Some(format!("heads differ: {head} vs {}", c.session.head()));
            } else if live.iter().any(|c| c.session.text() != text) {
                problem = Some("texts differ".to_owned());
            }
            match problem {
                None => convergence.rooms_converged += 1,
                Some(p) if convergence.failures.len() < 10 => {
                    convergence.failures.push(format!("{}: {p}", room.doc))
                }
                Some(_) => {}
            }
        }
        for client in &mut self.clients {
            client.conn.close();
        }
        WorkerResult {
            histograms: self.histograms,
            counters: self.counters,
            convergence,
        }
    }
}
