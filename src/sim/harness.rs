//! FOR TESTS: one shard (the real `Shard` phases, `Net`, `RoomHost`) over a stepped storage
//! worker and simulated sockets, driven turn by turn by a test script; shared by the
//! simulator's regression scripts and the client's tests (`client::replica`).

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

use super::socket::{LinkShape, SimPoll, SimSocket};

/// One shard over memory storage, driven turn by turn.
pub(crate) struct Harness {
    pub(crate) shard: Shard<RoomHost>,
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
    pub(crate) fn new() -> Harness {
        Harness::over(Box::new(MemoryStorage::new()))
    }

    pub(crate) fn over(storage: Box<dyn Storage>) -> Harness {
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
    pub(crate) fn connect(&mut self, doc: &str) -> (ConnToken, WebSocket<SimSocket>) {
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
    pub(crate) fn turn(&mut self) {
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
    pub(crate) fn sync(&mut self) {
        self.steps.step(usize::MAX);
    }

    /// Turns and syncs until nothing is pending.
    pub(crate) fn settle(&mut self) {
        for _ in 0..4 {
            self.turn();
            self.sync();
        }
        self.turn();
    }
}

/// Every text frame waiting for `ws`.
pub(crate) fn frames(ws: &mut WebSocket<SimSocket>) -> Vec<ServerMessage> {
    let (got, close) = frames_and_close(ws);
    assert_eq!(close, None, "the connection was closed after {got:?}");
    got
}

/// Every text frame waiting for `ws`, and the close code if the shard closed it.
pub(crate) fn frames_and_close(ws: &mut WebSocket<SimSocket>) -> (Vec<ServerMessage>, Option<u16>) {
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
pub(crate) fn join(h: &mut Harness, replica: &mut Replica, ws: &mut WebSocket<SimSocket>) {
    ws.send(Message::text(replica.hello())).expect("hello");
    h.settle();
    for frame in frames(ws) {
        replica.handle_message(frame).expect("a valid frame");
    }
    assert!(replica.is_joined());
}
