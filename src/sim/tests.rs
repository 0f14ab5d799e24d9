//! Hand-written scenarios on the simulator's parts: the regressions its runs found, each as a
//! fixed script (a seed's meaning changes whenever the scenario generator does; these do not).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::acceptor::handoff::ShardAlive;
use crate::client::Replica;
use crate::ids::ConnToken;
use crate::metrics::MetricsRegistry;
use crate::protocol::messages::{parse_server_message, ServerMessage};
use crate::room::RoomConfig;
use crate::shard::{Net, NetLimits, OpenInfo, RoomHost, Shard};
use crate::storage::worker::{StorageAvailable, StorageWorker, WorkerSteps};
use crate::storage::{MemoryStorage, Storage};

use super::db::DbBackend;
use super::rng::SimRng;
use super::socket::{LinkShape, SimPoll, SimSocket};
use super::Backend;

/// One shard over memory storage, driven turn by turn.
struct Harness {
    shard: Shard<RoomHost>,
    steps: WorkerSteps,
    poll: SimPoll,
    now: Instant,
    _mio: mio::Poll,
}

const SHAPE: LinkShape = LinkShape {
    buffer_bytes: 1 << 20,
    chunk_max: 1 << 20,
};

impl Harness {
    fn new() -> Harness {
        Harness::over(Box::new(MemoryStorage::new()))
    }

    fn over(storage: Box<dyn Storage>) -> Harness {
        let (worker, steps) = StorageWorker::stepped(storage, StorageAvailable::new());
        let room = RoomConfig {
            snapshot_every_ops: 1_000,
            snapshot_every_bytes: 1 << 30,
            replay_window_ops: 100,
            doc_chars_max: 1 << 20,
        };
        let host = RoomHost::new(worker, room, Duration::from_secs(60));
        let mio = mio::Poll::new().expect("a mio Poll");
        let limits = NetLimits {
            reads_per_turn_max: 64,
            outbound_bytes_max: 1 << 20,
            conns_max: 16,
            idle_timeout: Duration::from_secs(30),
            close_linger: Duration::from_secs(5),
        };
        let registry = mio.registry().try_clone().expect("a registry");
        let net = Net::new(registry, limits, MetricsRegistry::new(1).shard(0));
        let now = Instant::now();
        Harness {
            shard: Shard::new(net, host, ShardAlive::new(), now),
            steps,
            poll: SimPoll::new(),
            now,
            _mio: mio,
        }
    }

    /// A connection for `/ws/<doc>`: the shard's token and the client's end.
    fn connect(&mut self, doc: &str) -> (ConnToken, WebSocket<SimSocket>) {
        let (server, client) = SimSocket::pair(self.poll.clone(), SHAPE, 1);
        let ws = WebSocket::from_raw_socket(server, Role::Server, None);
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let conn = self
            .shard
            .net_mut()
            .insert_sim(ws, peer, self.now)
            .expect("room for it");
        self.shard.open(
            conn,
            OpenInfo {
                doc: Some(doc.to_owned()),
                hello: None,
                admitted: None,
            },
        );
        (conn, WebSocket::from_raw_socket(client, Role::Client, None))
    }

    /// One shard turn (no timers).
    fn turn(&mut self) {
        self.now += Duration::from_millis(1);
        self.shard.begin_turn(self.now);
        for (key, readable, writable) in self.poll.take() {
            self.shard.net_mut().on_ready(key, readable, writable);
        }
        self.shard.read_phase();
        self.shard.end_turn_phase();
        self.shard.flush_phase();
        assert_eq!(self.shard.panic_message(), None);
    }

    /// The storage worker serves everything queued.
    fn sync(&mut self) {
        self.steps.step(usize::MAX);
    }

    /// Turns and syncs until nothing is pending.
    fn settle(&mut self) {
        for _ in 0..4 {
            self.turn();
            self.sync();
        }
        self.turn();
    }
}

/// Every text frame waiting for `ws`.
fn frames(ws: &mut WebSocket<SimSocket>) -> Vec<ServerMessage> {
    let (got, close) = frames_and_close(ws);
    assert_eq!(close, None, "the connection was closed after {got:?}");
    got
}

/// Every text frame waiting for `ws`, and the close code if the shard closed it.
fn frames_and_close(ws: &mut WebSocket<SimSocket>) -> (Vec<ServerMessage>, Option<u16>) {
    let mut got = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                got.push(parse_server_message(&text).expect("a server frame"));
            }
            Ok(Message::Close(frame)) => {
                return (got, Some(frame.map_or(1005, |f| u16::from(f.code))));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return (got, None)
            }
            Err(e) => panic!("the connection ended: {e}"),
        }
    }
}

/// Joins `replica` over `ws` and returns its frames.
fn join(h: &mut Harness, replica: &mut Replica, ws: &mut WebSocket<SimSocket>) {
    ws.send(Message::text(replica.hello())).expect("hello");
    h.settle();
    for frame in frames(ws) {
        replica.handle_message(frame).expect("a valid frame");
    }
    assert!(replica.is_joined());
}

/// Found by the simulator (seed 1 of its first version): a connection that closed in the turn
/// in which an op was fanned out to it left that op's echo in the room's effects; the echo
/// was released with its batch to whichever connection got the slab key next, before that
/// connection's `hello_ack` (and it could have been another document's client).
#[test]
fn frames_for_a_closed_connection_never_reach_the_next_one_on_its_key() {
    let mut h = Harness::new();
    let (a_conn, mut a_ws) = h.connect("d");
    let (_, mut b_ws) = h.connect("d");
    let mut a = Replica::new("d", None, None);
    let mut b = Replica::new("d", None, None);
    join(&mut h, &mut a, &mut a_ws);
    join(&mut h, &mut b, &mut b_ws);
    frames(&mut a_ws);
    // In one turn: b's op (echoed to a too), then a's close.
    let op = b.insert(0, "x").expect("an insert");
    b_ws.send(Message::text(op)).expect("op");
    a_ws.close(None).expect("close");
    a_ws.flush().expect("flush");
    drop(a_ws);
    h.turn();
    h.turn();
    // The next connection takes a's slab key while the op's batch is not durable yet.
    let (c_conn, mut c_ws) = h.connect("d");
    assert_eq!(c_conn, a_conn, "the slab key is reused");
    let mut c = Replica::new("d", None, None);
    c_ws.send(Message::text(c.hello())).expect("hello");
    h.settle();
    let got = frames(&mut c_ws);
    assert!(
        matches!(got.first(), Some(ServerMessage::HelloAck(_))),
        "the first frame of the new connection is its hello_ack: {got:?}"
    );
    for frame in got {
        c.handle_message(frame).expect("a valid frame");
    }
    assert_eq!(c.text(), "x");
}

/// Found by the simulator on the database backend (seed 8 of its first version): while storage
/// was unreachable, an op of a connected client was refused with `unavailable` and the
/// connection stayed open; the client's next op, built on the refused one, was refused with
/// `unknown_id`, which a client drops while keeping the edit: the client diverged for good
/// (and the refused op waited for a reconnect that never came). Now the refusal closes the
/// connection with 1013 and nothing it sent after is applied; the client resends both, in
/// order, after reconnecting.
#[test]
fn an_op_refused_while_storage_is_down_closes_its_connection_and_nothing_after_it_applies() {
    let mut backend = DbBackend::new(1);
    let storage = backend.open(&mut SimRng::new(1)).expect("a connection");
    let mut h = Harness::over(storage);
    let (_, mut a_ws) = h.connect("d");
    let (_, mut b_ws) = h.connect("e");
    let mut a = Replica::new("d", None, None);
    let mut b = Replica::new("e", None, None);
    join(&mut h, &mut a, &mut a_ws);
    join(&mut h, &mut b, &mut b_ws);
    // Another document's commit finds the database down: storage is unreachable.
    backend.go_down_at_next_commit();
    let op = b.insert(0, "e").expect("an insert");
    b_ws.send(Message::text(op)).expect("op");
    h.turn();
    h.sync();
    // Two ops of a, the second after the first's text, in one turn.
    let first = a.insert(0, "1").expect("an insert");
    let second = a.insert(1, "2").expect("an insert");
    a_ws.send(Message::text(first)).expect("op");
    a_ws.send(Message::text(second)).expect("op");
    h.turn();
    h.turn();
    let (got, close) = frames_and_close(&mut a_ws);
    assert_eq!(close, Some(1013), "{got:?}");
    assert!(
        matches!(
            got.as_slice(),
            [ServerMessage::Error { code, client_seq: Some(1), .. }] if code == "unavailable"
        ),
        "one refusal, for the first op only: {got:?}"
    );
    for frame in got {
        a.handle_message(frame).expect("a valid frame");
    }
    assert_eq!(a.n_pending(), 2, "both stay pending");
    drop(a_ws);
    // The database answers again; a reconnects and resends both, in order.
    for _ in 0..4 {
        h.sync();
        h.turn();
    }
    let (_, mut a_ws) = h.connect("d");
    a_ws.send(Message::text(a.hello())).expect("hello");
    h.settle();
    for frame in frames(&mut a_ws) {
        if let crate::client::Event::Joined { resend, .. } =
            a.handle_message(frame).expect("a valid frame")
        {
            for message in resend {
                a_ws.send(Message::text(message)).expect("resend");
            }
        }
    }
    h.settle();
    for frame in frames(&mut a_ws) {
        a.handle_message(frame).expect("a valid frame");
    }
    assert_eq!((a.text().as_str(), a.n_pending()), ("12", 0));
    let (_, mut c_ws) = h.connect("d");
    let mut c = Replica::new("d", None, None);
    join(&mut h, &mut c, &mut c_ws);
    assert_eq!(c.text(), "12", "the shard applied both");
}
