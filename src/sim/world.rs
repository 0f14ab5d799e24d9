//! One simulated run: a shard (the real [`Shard`] phases, [`Net`] and [`RoomHost`]), its
//! storage worker stepped in the same thread over the real `DiskStorage` on a [`SimDisk`],
//! and client [`Replica`]s over simulated sockets, all driven by one [`SimRng`].
//!
//! Every step advances the simulated clock, lets some clients act (edit, send presence or
//! garbage, read, stall, disconnect, reconnect with `since`), runs one shard turn, and lets the
//! storage worker serve some of its queue; now and then storage faults are armed, and the shard
//! crashes (its process state is dropped) or the machine loses power (unsynced writes are
//! lost), and a new shard starts from the same files. Invariants are checked as frames arrive,
//! after every turn, at every restart, and at the end (see docs/simulation.md).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::acceptor::handoff::ShardAlive;
use crate::client::{Event, Replica};
use crate::ids::ConnToken;
use crate::metrics::MetricsRegistry;
use crate::protocol::messages::{parse_server_message, HelloAckStrategy, ServerMessage};
use crate::room::RoomConfig;
use crate::shard::{Net, NetLimits, OpenInfo, RoomHost, Shard};
use crate::storage::worker::{StorageAvailable, StorageWorker, WorkerSteps};
use crate::storage::{LogRecord, Storage};

use super::rng::SimRng;
use super::socket::{LinkShape, SimPoll, SimSocket};
use super::{Backend, Lease, Violation};

/// The shape of one run, drawn from its seed.
#[derive(Clone, Debug)]
struct Shape {
    n_docs: usize,
    n_clients: usize,
    steps: usize,
    limits: NetLimits,
    room: RoomConfig,
    idle_unload: Duration,
    /// Per mille, per step.
    crash_rate: u64,
    power_cut_rate: u64,
    death_rate: u64,
    storage_fault_rate: u64,
    garbage_rate: u64,
    disconnect_rate: u64,
}

impl Shape {
    fn draw(rng: &mut SimRng) -> Shape {
        let n_docs = rng.range(1, 3) as usize;
        let n_clients = rng.range(2, 6) as usize;
        Shape {
            n_docs,
            n_clients,
            steps: rng.range(150, 350) as usize,
            limits: NetLimits {
                reads_per_turn_max: rng.range(1, 64) as usize,
                outbound_bytes_max: [2_048, 8_192, 65_536][rng.below(3) as usize],
                // Room for every client and the end's observers, plus a few closing ones: a
                // connection refused as "full" is tried again, but a shard kept full by live
                // clients never settles.
                conns_max: (n_clients + n_docs) + rng.range(0, 8) as usize,
                idle_timeout: Duration::from_secs(rng.range(2, 10)),
                close_linger: Duration::from_secs(rng.range(1, 5)),
            },
            room: RoomConfig {
                snapshot_every_ops: rng.range(2, 40),
                snapshot_every_bytes: rng.range(256, 1 << 16),
                replay_window_ops: rng.range(1, 64) as usize,
                doc_chars_max: 1 << 20,
            },
            idle_unload: Duration::from_secs(rng.range(1, 60)),
            crash_rate: rng.range(0, 8),
            power_cut_rate: rng.range(0, 8),
            death_rate: rng.range(0, 8),
            storage_fault_rate: rng.range(0, 10),
            garbage_rate: rng.range(0, 30),
            disconnect_rate: rng.range(0, 40),
        }
    }
}

/// How a client treats its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behavior {
    /// Reads everything, every step.
    Normal,
    /// Reads a few frames now and then.
    Slow,
    /// Reads nothing for a while (a client that stopped reading).
    Deaf,
}

/// One client connection.
struct ClientConn {
    ws: WebSocket<SimSocket>,
    /// The shard's token for it, if the shard took it.
    token: Option<ConnToken>,
    /// The `server_seq` the next `op_echo` must carry (set by `hello_ack`).
    expect_seq: Option<u64>,
    /// Raw garbage was written: the stream is broken, only read until it closes.
    poisoned: bool,
    /// The document's epoch, from its `hello_ack`.
    epoch: Option<String>,
}

/// One client: a replica, its connection, its habits.
struct Client {
    doc: usize,
    replica: Replica,
    conn: Option<ClientConn>,
    /// Earlier connections taken over by a newer one of the same replica: read (and checked)
    /// until the shard closes them.
    zombies: Vec<ClientConn>,
    behavior: Behavior,
    /// Do not reconnect before this step.
    offline_until: usize,
    /// Acknowledged op messages: `client_seq` -> `server_seq`.
    acked: BTreeMap<u64, u64>,
}

/// What every client together saw of one document.
#[derive(Default)]
struct DocTruth {
    name: String,
    /// The epoch of the first `server_seq` seen.
    epoch: Option<String>,
    /// Every op message seen, by `server_seq`: `(replica, client_seq)`.
    by_seq: BTreeMap<u64, (u64, u64)>,
    /// The same, by `(replica, client_seq)`.
    by_id: HashMap<(u64, u64), u64>,
    /// Which client each replica id was given to.
    replica_owner: HashMap<u64, usize>,
}

impl DocTruth {
    fn max_seen(&self) -> u64 {
        self.by_seq.keys().next_back().copied().unwrap_or(0)
    }

    /// Records op message `(replica, client_seq)` at `seq`; each `server_seq` names one op
    /// message, and each op message has one `server_seq` (applied exactly once).
    fn see(&mut self, seq: u64, id: (u64, u64), epoch: &str) -> Result<(), String> {
        if let Some(known) = &self.epoch {
            if known != epoch {
                return Err(format!(
                    "doc {}: server_seq {seq} seen in epoch {epoch} after epoch {known}",
                    self.name
                ));
            }
        } else {
            self.epoch = Some(epoch.to_owned());
        }
        if let Some(&other) = self.by_seq.get(&seq) {
            if other != id {
                return Err(format!(
                    "doc {}: server_seq {seq} carried {other:?} and later {id:?}",
                    self.name
                ));
            }
        }
        if let Some(&other_seq) = self.by_id.get(&id) {
            if other_seq != seq {
                return Err(format!(
                    "doc {}: op message {id:?} applied twice, at server_seq {other_seq} and {seq}",
                    self.name
                ));
            }
        }
        self.by_seq.insert(seq, id);
        self.by_id.insert(id, seq);
        Ok(())
    }
}

/// The shard of the current process incarnation.
struct Server {
    shard: Shard<RoomHost>,
    steps: WorkerSteps,
    poll: SimPoll,
    /// Keeps the registry `Net` holds valid (simulated sockets never use it).
    _mio: mio::Poll,
}

/// Counts for the run's summary.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Op messages acknowledged to their senders.
    pub acked: u64,
    /// Shard crashes (process state lost, files kept).
    pub crashes: u64,
    /// Power cuts (unsynced writes lost).
    pub power_cuts: u64,
    /// Client connections opened.
    pub connects: u64,
    /// Storage faults armed.
    pub storage_faults: u64,
    /// Closes with 1013 seen by clients (slow consumers, storage failures, full shard).
    pub closes_1013: u64,
    /// Garbage sent (text frames and raw bytes).
    pub garbage: u64,
    /// A digest (FNV-1a) of every event of the run: equal for two runs of one seed.
    pub digest: u64,
}

/// One simulated run.
pub(super) struct World {
    seed: u64,
    rng: SimRng,
    shape: Shape,
    /// The simulated clock: `base + elapsed`.
    base: Instant,
    elapsed: Duration,
    step: usize,
    backend: Box<dyn Backend>,
    server: Option<Server>,
    /// The step at which a crashed shard comes back.
    restart_at: usize,
    /// A step at which the clock jumps by up to a minute.
    jump_at: Option<usize>,
    clients: Vec<Client>,
    docs: Vec<DocTruth>,
    lease: Box<dyn Lease>,
    /// The last events, for the failure report.
    trace: Vec<String>,
    trace_kept: usize,
    pub(super) counts: Counts,
}

/// Events kept for a failure report (`SIM_TRACE=N` keeps N).
fn trace_kept() -> usize {
    std::env::var("SIM_TRACE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40)
}

impl World {
    pub(super) fn new(
        seed: u64,
        backend: Box<dyn Backend>,
        lease: Box<dyn Lease>,
    ) -> Result<World, Violation> {
        let mut rng = SimRng::new(seed);
        let shape = Shape::draw(&mut rng);
        let docs = (0..shape.n_docs)
            .map(|d| DocTruth {
                name: format!("doc-{d}"),
                ..DocTruth::default()
            })
            .collect();
        let clients = (0..shape.n_clients)
            .map(|i| Client {
                doc: i % shape.n_docs,
                replica: Replica::new(&format!("doc-{}", i % shape.n_docs), None, None),
                conn: None,
                zombies: Vec::new(),
                behavior: Behavior::Normal,
                offline_until: 0,
                acked: BTreeMap::new(),
            })
            .collect();
        let mut world = World {
            seed,
            rng,
            shape,
            base: Instant::now(),
            elapsed: Duration::ZERO,
            step: 0,
            backend,
            server: None,
            restart_at: 0,
            jump_at: None,
            clients,
            docs,
            lease,
            trace: Vec::new(),
            trace_kept: trace_kept(),
            counts: Counts::default(),
        };
        world.start_server()?;
        Ok(world)
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn note(&mut self, event: impl FnOnce() -> String) {
        if self.trace.len() >= self.trace_kept {
            self.trace.remove(0);
        }
        let line = format!("step {} +{:?}: {}", self.step, self.elapsed, event());
        let mut digest = if self.counts.digest == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.counts.digest
        };
        for byte in line.bytes() {
            digest = (digest ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.counts.digest = digest;
        self.trace.push(line);
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what,
            trace: self.trace.clone(),
        }
    }

    fn check(&self, result: Result<(), String>) -> Result<(), Violation> {
        result.map_err(|what| self.violation(what))
    }

    /// Runs the whole scenario, then converges and checks the end state.
    pub(super) fn run(&mut self) -> Result<(), Violation> {
        for step in 0..self.shape.steps {
            self.step = step;
            self.one_step(true)?;
        }
        self.settle()
    }

    /// One step of the world; `chaos` enables faults, crashes and misbehaving clients.
    fn one_step(&mut self, chaos: bool) -> Result<(), Violation> {
        let dt = if chaos && self.rng.chance(15) {
            Duration::from_millis(self.rng.range(1_000, 20_000))
        } else {
            Duration::from_millis(self.rng.range(0, 40))
        };
        self.elapsed += dt;
        if self.jump_at == Some(self.step) {
            self.jump_at = None;
            self.elapsed += Duration::from_millis(self.rng.range(0, 60_000));
        }
        if self.server.is_none() && self.step >= self.restart_at {
            self.start_server()?;
        }
        if chaos {
            self.chaos()?;
        }
        let order = self.shuffled(self.clients.len());
        for i in order {
            self.client_step(i, chaos)?;
        }
        self.server_turn(chaos)
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }

    /// Crashes, power cuts, storage faults and lease expiry.
    fn chaos(&mut self) -> Result<(), Violation> {
        if self.server.is_none() {
            return Ok(());
        }
        let now = self.now();
        if self.lease.expired(now, &mut self.rng) {
            self.note(|| "the lease expired: the shard stops and a new one takes over".into());
            return self.crash(false);
        }
        if self.rng.chance(self.shape.power_cut_rate) {
            return self.crash(true);
        }
        if self.rng.chance(self.shape.crash_rate) {
            return self.crash(false);
        }
        if self.rng.chance(self.shape.disconnect_rate / 4) {
            // Every client of a document leaves for a while: the document goes idle, and may be
            // unloaded (and loaded again when they are back).
            let d = self.rng.below(self.docs.len() as u64) as usize;
            let back = self.step + self.rng.range(5, 30) as usize;
            for client in self.clients.iter_mut().filter(|c| c.doc == d) {
                client.conn = None;
                client.zombies.clear();
                client.offline_until = back;
            }
            // Time passes once the shard has seen them go.
            self.jump_at = Some(self.step + 2);
            self.note(|| format!("every client of doc {d} leaves until step {back}"));
        }
        if self.rng.chance(self.shape.death_rate) {
            if let Some(what) = self.backend.arm_death(&mut self.rng) {
                self.note(|| what);
            }
        }
        if self.rng.chance(self.shape.storage_fault_rate) {
            let fault = self.backend.arm_fault(&mut self.rng);
            self.counts.storage_faults += 1;
            self.note(|| format!("storage: {fault}"));
        }
        Ok(())
    }

    /// Starts a shard over the files on the disk, after checking what they hold against what
    /// the clients saw.
    fn start_server(&mut self) -> Result<(), Violation> {
        let mut storage = self.backend.open(&mut self.rng).map_err(|e| {
            self.violation(format!("the storage does not open after a restart: {e}"))
        })?;
        for d in 0..self.docs.len() {
            let result = self.check_stored(&mut *storage, d);
            self.check(result)?;
        }
        let (worker, steps) = StorageWorker::stepped(storage, StorageAvailable::new());
        let host = RoomHost::new(worker, self.shape.room.clone(), self.shape.idle_unload)
            .with_docs_max(self.shape.n_docs);
        let mio = mio::Poll::new().map_err(|e| self.violation(format!("mio: {e}")))?;
        let registry = mio
            .registry()
            .try_clone()
            .map_err(|e| self.violation(format!("mio: {e}")))?;
        let net = Net::new(
            registry,
            self.shape.limits,
            MetricsRegistry::new(1).shard(0),
        );
        let shard = Shard::new(net, host, ShardAlive::new(), self.now());
        self.server = Some(Server {
            shard,
            steps,
            poll: SimPoll::new(),
            _mio: mio,
        });
        self.note(|| "shard started".into());
        Ok(())
    }

    /// After a restart: everything a client saw of document `d` is in storage, once.
    fn check_stored(&self, storage: &mut dyn Storage, d: usize) -> Result<(), String> {
        let truth = &self.docs[d];
        let max_seen = truth.max_seen();
        let stored = match storage.load(&truth.name) {
            Ok(Some(stored)) => stored,
            Ok(None) if max_seen == 0 => return Ok(()),
            Ok(None) => {
                return Err(format!(
                    "doc {}: gone after a restart, but clients saw server_seq up to {max_seen}",
                    truth.name
                ))
            }
            Err(e) => {
                return Err(format!(
                    "doc {}: does not load after a restart: {e}",
                    truth.name
                ))
            }
        };
        if max_seen > 0 && truth.epoch.as_deref() != Some(stored.epoch.as_str()) {
            return Err(format!(
                "doc {}: epoch {} after a restart, clients saw {:?}",
                truth.name, stored.epoch, truth.epoch
            ));
        }
        let mut head = stored.snapshot.as_ref().map_or(0, |s| s.head);
        let mut ids = HashMap::new();
        for record in &stored.tail {
            let LogRecord::Ops { server_seq, echo } = record else {
                continue;
            };
            let Ok(ServerMessage::OpEcho(op)) = parse_server_message(echo) else {
                return Err(format!(
                    "doc {}: stored record {server_seq} is not an op_echo",
                    truth.name
                ));
            };
            if *server_seq != head + 1 || op.server_seq != *server_seq {
                return Err(format!(
                    "doc {}: stored log jumps from {head} to {server_seq}",
                    truth.name
                ));
            }
            head = *server_seq;
            let id = (op.replica, op.client_seq);
            if let Some(first) = ids.insert(id, head) {
                return Err(format!(
                    "doc {}: op message {id:?} stored twice, at {first} and {head}",
                    truth.name
                ));
            }
            if let Some(&seen) = truth.by_seq.get(&head) {
                if seen != id {
                    return Err(format!(
                        "doc {}: clients saw {seen:?} at server_seq {head}, storage holds {id:?}",
                        truth.name
                    ));
                }
            }
            if let Some(&seen_seq) = truth.by_id.get(&id) {
                if seen_seq != head {
                    return Err(format!(
                        "doc {}: clients saw {id:?} at server_seq {seen_seq}, storage holds it at {head}",
                        truth.name
                    ));
                }
            }
        }
        if head < max_seen {
            return Err(format!(
                "doc {}: clients saw server_seq {max_seen}, storage holds only {head} after a restart \
                 (a frame left before its record was durable)",
                truth.name
            ));
        }
        for client in self.clients.iter().filter(|c| c.doc == d) {
            if let Some((client_seq, seq)) = client.acked.iter().next_back() {
                if *seq > head {
                    return Err(format!(
                        "doc {}: op message {client_seq} acknowledged at {seq}, storage holds only {head}",
                        truth.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The shard's process ends (a crash, or a power cut that also loses unsynced writes);
    /// every client connection breaks; a new shard starts a few steps later.
    fn crash(&mut self, power_cut: bool) -> Result<(), Violation> {
        // The backend first: the dying process's storage must not reach the files while it is
        // dropped (a final checkpoint).
        self.backend.crash(power_cut);
        if power_cut {
            self.counts.power_cuts += 1;
        } else {
            self.counts.crashes += 1;
        }
        self.note(|| {
            if power_cut {
                "power cut".into()
            } else {
                "shard crashed".into()
            }
        });
        self.server = None;
        for client in &mut self.clients {
            client.conn = None;
            client.zombies.clear();
        }
        self.restart_at = self.step + self.rng.range(0, 5) as usize;
        if self.restart_at == self.step {
            self.start_server()?;
        }
        Ok(())
    }

    fn client_step(&mut self, i: usize, chaos: bool) -> Result<(), Violation> {
        if self.clients[i].conn.is_none() {
            if self.server.is_some() && self.step >= self.clients[i].offline_until {
                self.connect(i)?;
            }
            return Ok(());
        }
        if chaos {
            self.client_mischief(i)?;
            if self.clients[i].conn.is_none() {
                return Ok(());
            }
            if self.clients[i].replica.is_joined() && !self.conn_poisoned(i) {
                self.client_edit(i)?;
            }
        }
        self.read_zombies(i)?;
        let (reads, budget) = match self.clients[i].behavior {
            Behavior::Normal => (true, 256),
            Behavior::Slow => (self.rng.chance(150), 3),
            Behavior::Deaf => (false, 0),
        };
        if reads {
            self.client_read(i, budget)?;
        }
        if let Some(conn) = &mut self.clients[i].conn {
            // Pongs, close replies and anything a full socket held back.
            let _ = conn.ws.flush();
        }
        Ok(())
    }

    fn conn_poisoned(&self, i: usize) -> bool {
        self.clients[i].conn.as_ref().is_some_and(|c| c.poisoned)
    }

    /// Misbehaviour: habits change, garbage, disconnects.
    fn client_mischief(&mut self, i: usize) -> Result<(), Violation> {
        if self.rng.chance(20) {
            let behavior = match self.rng.below(10) {
                0 | 1 => Behavior::Slow,
                2 => Behavior::Deaf,
                _ => Behavior::Normal,
            };
            self.clients[i].behavior = behavior;
            self.note(|| format!("client {i} becomes {behavior:?}"));
        }
        if self.rng.chance(self.shape.disconnect_rate) {
            let how = self.rng.below(3);
            self.note(|| {
                format!(
                    "client {i} disconnects ({})",
                    ["close", "drop", "reset"][how as usize]
                )
            });
            if let Some(mut conn) = self.clients[i].conn.take() {
                match how {
                    0 => {
                        let _ = conn.ws.close(None);
                        let _ = conn.ws.flush();
                    }
                    1 => {}
                    _ => conn.ws.get_mut().reset(),
                }
            }
            self.clients[i].offline_until = self.step + self.rng.range(0, 8) as usize;
            return Ok(());
        }
        let joined = self.clients[i]
            .conn
            .as_ref()
            .is_some_and(|c| c.expect_seq.is_some());
        if joined && !self.conn_poisoned(i) && self.rng.chance(self.shape.disconnect_rate / 3) {
            // The same replica connects again while its connection is open: a takeover.
            if let Some(old) = self.clients[i].conn.take() {
                self.clients[i].zombies.push(old);
            }
            self.note(|| format!("client {i} connects again without closing (takeover)"));
            return self.connect(i);
        }
        if self.rng.chance(self.shape.garbage_rate) && !self.conn_poisoned(i) {
            self.counts.garbage += 1;
            let raw = self.rng.chance(200);
            let garbage = [
                "not json",
                "{\"type\":\"op\"}",
                "{\"type\":\"nope\"}",
                "{\"type\":\"presence\",\"state\":",
                "[1,2,3]",
                "{\"type\":\"hello\",\"doc\":\"elsewhere\"}",
                "{\"type\":\"op\",\"client_seq\":\"x\",\"ops\":[]}",
            ];
            let text = garbage[self.rng.below(garbage.len() as u64) as usize];
            self.note(|| {
                if raw {
                    format!("client {i} writes raw garbage")
                } else {
                    format!("client {i} sends {text}")
                }
            });
            let bytes: Vec<u8> = (0..self.rng.range(1, 40))
                .map(|_| self.rng.next_u64() as u8)
                .collect();
            if let Some(conn) = &mut self.clients[i].conn {
                if raw {
                    if conn.ws.flush().is_ok() {
                        let _ = std::io::Write::write(conn.ws.get_mut(), &bytes);
                        conn.poisoned = true;
                    }
                } else if self.rng.chance(100) {
                    let _ = conn.ws.send(Message::binary(bytes));
                } else {
                    let _ = conn.ws.send(Message::text(text));
                }
            }
        }
        Ok(())
    }

    /// A local edit or a presence update.
    fn client_edit(&mut self, i: usize) -> Result<(), Violation> {
        if !self.rng.chance(300) {
            return Ok(());
        }
        let len = self.clients[i].replica.len();
        let message = if self.rng.chance(100) {
            Some(Replica::presence_message(&format!(
                "{{\"cursor\":{}}}",
                self.rng.below(len as u64 + 1)
            )))
        } else if len > 0 && self.rng.chance(300) {
            let pos = self.rng.below(len as u64) as usize;
            let n = self.rng.range(1, (len - pos).min(5) as u64) as usize;
            match self.clients[i].replica.delete(pos, n) {
                Ok(message) => message,
                Err(e) => {
                    return Err(self.violation(format!("client {i}: delete({pos}, {n}): {e}")))
                }
            }
        } else {
            let pos = self.rng.below(len as u64 + 1) as usize;
            let n = self.rng.range(1, 6) as usize;
            let text: String = (0..n)
                .map(|_| char::from(b'a' + self.rng.below(26) as u8))
                .collect();
            match self.clients[i].replica.insert(pos, &text) {
                Ok(message) => Some(message),
                Err(e) => return Err(self.violation(format!("client {i}: insert({pos}): {e}"))),
            }
        };
        if let Some(message) = message {
            self.send(i, message);
        }
        Ok(())
    }

    fn send(&mut self, i: usize, text: String) {
        if let Some(conn) = &mut self.clients[i].conn {
            // A full socket keeps the frame in tungstenite's buffer (flushed later).
            let _ = conn.ws.send(Message::text(text));
        }
    }

    /// Opens a connection for client `i` and sends its `hello` (with `since` once joined).
    fn connect(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.now();
        let shape = LinkShape {
            buffer_bytes: [256, 2_048, 16_384, 262_144][self.rng.below(4) as usize],
            chunk_max: [1, 7, 100, 4_096, 1 << 20][self.rng.below(5) as usize],
        };
        let seed = self.rng.next_u64();
        let by_path = self.rng.chance(700);
        let Some(server) = &mut self.server else {
            return Ok(());
        };
        let (server_end, client_end) = SimSocket::pair(server.poll.clone(), shape, seed);
        let server_ws = WebSocket::from_raw_socket(server_end, Role::Server, None);
        let peer = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
        let token = server.shard.net_mut().insert_sim(server_ws, peer, now);
        let doc = self.docs[self.clients[i].doc].name.clone();
        if let Some(conn) = token {
            server.shard.open(
                conn,
                OpenInfo {
                    doc: by_path.then_some(doc),
                    hello: None,
                    admitted: None,
                },
            );
        }
        let mut ws = WebSocket::from_raw_socket(client_end, Role::Client, None);
        let hello = self.clients[i].replica.hello();
        let _ = ws.send(Message::text(hello));
        self.clients[i].conn = Some(ClientConn {
            ws,
            token,
            expect_seq: None,
            poisoned: false,
            epoch: None,
        });
        self.counts.connects += 1;
        self.note(|| format!("client {i} connects as {token:?} ({shape:?})"));
        Ok(())
    }

    /// Reads up to `budget` frames for client `i`, checking each.
    fn client_read(&mut self, i: usize, budget: usize) -> Result<(), Violation> {
        for _ in 0..budget {
            let Some(conn) = &mut self.clients[i].conn else {
                return Ok(());
            };
            match conn.ws.read() {
                Ok(Message::Text(text)) => {
                    if conn.poisoned {
                        continue;
                    }
                    self.on_frame(i, text.as_str())?;
                }
                Ok(Message::Binary(_)) => {
                    return Err(
                        self.violation(format!("client {i}: the server sent a binary frame"))
                    )
                }
                Ok(Message::Close(frame)) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code));
                    if code == Some(1013) {
                        self.counts.closes_1013 += 1;
                    }
                    self.note(|| format!("client {i}: close {frame:?}"));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(())
                }
                Err(e) => {
                    self.note(|| format!("client {i}: connection ended: {e}"));
                    self.clients[i].conn = None;
                    self.clients[i].offline_until = self.step + self.rng.range(0, 6) as usize;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Reads what the shard still sends to client `i`'s taken-over connections, checking it.
    fn read_zombies(&mut self, i: usize) -> Result<(), Violation> {
        let mut z = 0;
        while z < self.clients[i].zombies.len() {
            let mut ended = false;
            for _ in 0..64 {
                let zombie = &mut self.clients[i].zombies[z];
                match zombie.ws.read() {
                    Ok(Message::Text(text)) => {
                        let message = parse_server_message(&text).map_err(|e| {
                            self.violation(format!("client {i}: unparseable frame {text:?}: {e:?}"))
                        })?;
                        self.check_frame(i, Some(z), &message, &text)?;
                    }
                    Ok(Message::Close(frame)) => {
                        self.note(|| format!("client {i}: old connection closed {frame:?}"));
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        let _ = zombie.ws.flush();
                        break;
                    }
                    Err(_) => {
                        ended = true;
                        break;
                    }
                }
            }
            if ended {
                self.clients[i].zombies.remove(z);
            } else {
                z += 1;
            }
        }
        Ok(())
    }

    fn conn_mut(&mut self, i: usize, zombie: Option<usize>) -> Option<&mut ClientConn> {
        match zombie {
            Some(z) => self.clients[i].zombies.get_mut(z),
            None => self.clients[i].conn.as_mut(),
        }
    }

    /// The checks of one frame on one of client `i`'s connections (`zombie`: a taken-over
    /// one, else the current one).
    fn check_frame(
        &mut self,
        i: usize,
        zombie: Option<usize>,
        message: &ServerMessage,
        text: &str,
    ) -> Result<(), Violation> {
        let d = self.clients[i].doc;
        let (expect, epoch) = match self.conn_mut(i, zombie) {
            Some(conn) => (conn.expect_seq, conn.epoch.clone()),
            None => return Ok(()),
        };
        match message {
            ServerMessage::HelloAck(ack) => {
                if expect.is_some() {
                    return Err(self.violation(format!("client {i}: a second hello_ack")));
                }
                if let Some(&owner) = self.docs[d].replica_owner.get(&ack.replica) {
                    if owner != i {
                        return Err(self.violation(format!(
                            "client {i}: given replica {} of client {owner}",
                            ack.replica
                        )));
                    }
                }
                self.docs[d].replica_owner.insert(ack.replica, i);
                if let HelloAckStrategy::Replay(echoes) = &ack.strategy {
                    let first = ack.head + 1 - echoes.len() as u64;
                    for (k, echo) in echoes.iter().enumerate() {
                        if echo.server_seq != first + k as u64 {
                            return Err(self.violation(format!(
                                "client {i}: replay of {} entries up to head {} has server_seq {} at {k}",
                                echoes.len(),
                                ack.head,
                                echo.server_seq
                            )));
                        }
                        let seen = self.docs[d].see(
                            echo.server_seq,
                            (echo.replica, echo.client_seq),
                            &ack.epoch,
                        );
                        self.check(seen)?;
                    }
                }
                if self.docs[d].max_seen() > 0
                    && self.docs[d].epoch.as_deref() != Some(ack.epoch.as_str())
                {
                    return Err(self.violation(format!(
                        "client {i}: hello_ack in epoch {} after clients saw server_seq {} in {:?}",
                        ack.epoch,
                        self.docs[d].max_seen(),
                        self.docs[d].epoch
                    )));
                }
                if let Some(conn) = self.conn_mut(i, zombie) {
                    conn.expect_seq = Some(ack.head + 1);
                    conn.epoch = Some(ack.epoch.clone());
                }
            }
            ServerMessage::OpEcho(echo) => {
                let Some(expect) = expect else {
                    return Err(self.violation(format!(
                        "client {i}: op_echo {} before hello_ack",
                        echo.server_seq
                    )));
                };
                if echo.server_seq != expect {
                    return Err(self.violation(format!(
                        "client {i}: op_echo {} where {expect} was due (a gap or a repeat)",
                        echo.server_seq
                    )));
                }
                let epoch = epoch.unwrap_or_default();
                let seen =
                    self.docs[d].see(echo.server_seq, (echo.replica, echo.client_seq), &epoch);
                self.check(seen)?;
                if let Some(conn) = self.conn_mut(i, zombie) {
                    conn.expect_seq = Some(expect + 1);
                }
            }
            ServerMessage::Ack { .. } | ServerMessage::Presence { .. } => {
                if expect.is_none() {
                    return Err(self.violation(format!("client {i}: {text} before hello_ack")));
                }
            }
            ServerMessage::Error { .. } => {}
        }
        Ok(())
    }

    /// One text frame for client `i`'s current connection: checked against every client's
    /// view, then handed to its replica.
    fn on_frame(&mut self, i: usize, text: &str) -> Result<(), Violation> {
        let message = parse_server_message(text).map_err(|e| {
            self.violation(format!("client {i}: unparseable frame {text:?}: {e:?}"))
        })?;
        self.check_frame(i, None, &message, text)?;
        let event = self.clients[i]
            .replica
            .handle_message(message)
            .map_err(|e| self.violation(format!("client {i}: replica refused {text:?}: {e}")))?;
        match event {
            Event::Joined {
                resend,
                history_lost,
                head,
                ..
            } => {
                if history_lost {
                    return Err(self.violation(format!(
                        "client {i}: the server lost history it had seen (joined at head {head})"
                    )));
                }
                self.note(|| format!("client {i} joined at {head}, resends {}", resend.len()));
                for message in resend {
                    self.send(i, message);
                }
            }
            Event::Acked {
                client_seq,
                server_seq,
            } => {
                self.counts.acked += 1;
                self.clients[i].acked.insert(client_seq, server_seq);
            }
            Event::Error { code, message, .. } => {
                self.note(|| format!("client {i}: error {code}: {message}"));
            }
            Event::Remote { .. } | Event::Presence { .. } => {}
        }
        Ok(())
    }

    /// One shard turn (and some of the storage worker's work), then the per-turn checks.
    fn server_turn(&mut self, chaos: bool) -> Result<(), Violation> {
        let now = self.now();
        let worker_runs = !chaos || self.rng.chance(700);
        let max_requests = self.rng.range(1, 8) as usize;
        let Some(server) = &mut self.server else {
            return Ok(());
        };
        server.shard.begin_turn(now);
        for (key, readable, writable) in server.poll.take() {
            server.shard.net_mut().on_ready(key, readable, writable);
        }
        server.shard.read_phase();
        server.shard.end_turn_phase();
        server.shard.flush_phase();
        server.shard.timer_phase();
        if worker_runs {
            let n = if chaos { max_requests } else { usize::MAX };
            server.steps.step(n);
        }
        if let Some(message) = server.shard.panic_message() {
            let what = format!("the shard's handler panicked: {message}");
            return Err(self.violation(what));
        }
        let limit = self.shape.limits.outbound_bytes_max;
        let mut over = None;
        for (i, client) in self.clients.iter().enumerate() {
            let Some(token) = client.conn.as_ref().and_then(|c| c.token) else {
                continue;
            };
            if let Some(backlog) = server.shard.net().backlog_bytes(token) {
                if backlog > limit {
                    over = Some(format!(
                        "client {i}: {backlog} bytes queued behind its front frame after a flush (limit {limit})"
                    ));
                }
            }
        }
        if let Some(what) = over {
            return Err(self.violation(what));
        }
        if chaos && self.rng.chance(30) {
            // What a power cut now would leave must hold everything a client saw.
            if let Some(view) = self.backend.durable_view(&mut self.rng) {
                let mut view = view
                    .map_err(|e| self.violation(format!("the durable state does not open: {e}")))?;
                for d in 0..self.docs.len() {
                    if let Err(what) = self.check_stored(&mut *view, d) {
                        return Err(self.violation(format!("if the power failed now: {what}")));
                    }
                }
            }
        }
        if self.backend.died() {
            let power_cut = self.rng.chance(500);
            self.note(|| "the storage's process died mid-call".into());
            self.crash(power_cut)?;
        }
        Ok(())
    }

    /// The end: no more chaos; every client reconnects and reads; once nothing moves, every
    /// client of a document has the same text; then a power cut, a restart (checked), and a
    /// fresh client per document must see that text too.
    fn settle(&mut self) -> Result<(), Violation> {
        self.step = self.shape.steps;
        self.crash(false)?;
        if self.server.is_none() {
            self.start_server()?;
        }
        for client in &mut self.clients {
            client.behavior = Behavior::Normal;
            client.offline_until = 0;
        }
        self.quiesce()?;
        let texts = self.converged()?;
        self.crash(true)?;
        if self.server.is_none() {
            self.start_server()?;
        }
        for (d, _) in texts.iter().enumerate() {
            let name = self.docs[d].name.clone();
            self.clients.push(Client {
                doc: d,
                replica: Replica::new(&name, None, None),
                conn: None,
                zombies: Vec::new(),
                behavior: Behavior::Normal,
                offline_until: 0,
                acked: BTreeMap::new(),
            });
        }
        self.quiesce()?;
        let after = self.converged()?;
        if after != texts {
            return Err(self.violation(format!(
                "after a power cut and a restart the documents read {after:?}, before {texts:?}"
            )));
        }
        Ok(())
    }

    /// Steps without chaos until every client is joined with nothing pending and nothing is in
    /// flight anywhere.
    fn quiesce(&mut self) -> Result<(), Violation> {
        let mut calm_steps = 0;
        for _ in 0..5_000 {
            self.step += 1;
            self.one_step(false)?;
            if self.is_quiet() {
                calm_steps += 1;
                if calm_steps == 3 {
                    return Ok(());
                }
            } else {
                calm_steps = 0;
            }
        }
        let mut state = String::new();
        for (i, c) in self.clients.iter().enumerate() {
            let _ = write!(
                state,
                "[client {i}: conn {} joined {} pending {}] ",
                c.conn.is_some(),
                c.replica.is_joined(),
                c.replica.n_pending()
            );
        }
        Err(self.violation(format!("the world never settled: {state}")))
    }

    fn is_quiet(&self) -> bool {
        let Some(server) = &self.server else {
            return false;
        };
        if server.steps.queued() > 0 || server.shard.handler().storage_pending() {
            return false;
        }
        self.clients.iter().all(|c| {
            c.replica.is_joined()
                && c.zombies.is_empty()
                && c.replica.n_pending() == 0
                && c.conn.as_ref().is_some_and(|conn| {
                    !conn.poisoned
                        && conn.ws.get_ref().unread_by_peer() == 0
                        && conn.ws.get_ref().unread_here() == 0
                })
        })
    }

    /// Every client of each document has the same text; returns the texts by document.
    fn converged(&self) -> Result<Vec<String>, Violation> {
        let mut texts = Vec::new();
        for d in 0..self.docs.len() {
            let mut of_doc = self.clients.iter().enumerate().filter(|(_, c)| c.doc == d);
            let Some((_, first)) = of_doc.next() else {
                texts.push(String::new());
                continue;
            };
            let text = first.replica.text();
            for (i, other) in of_doc {
                let other_text = other.replica.text();
                if other_text != text {
                    return Err(self.violation(format!(
                        "doc {d}: client {i} reads {other_text:?}, another {text:?}"
                    )));
                }
            }
            texts.push(text);
        }
        Ok(texts)
    }
}
