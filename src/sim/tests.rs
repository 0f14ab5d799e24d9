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
use crate::storage::MemoryStorage;

use super::socket::{LinkShape, SimPoll, SimSocket};

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
        let (worker, steps) =
            StorageWorker::stepped(Box::new(MemoryStorage::new()), StorageAvailable::new());
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
    let mut got = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                got.push(parse_server_message(&text).expect("a server frame"));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return got
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
