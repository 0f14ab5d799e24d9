//! [`Replica`]: the client side of the contract as a transport-free state machine.
//!
//! Feed it every text frame the server sends ([`Replica::handle_frame`]) and send every string it
//! returns. It keeps the document (a `crdt::Doc`), the replica id, `head` and `epoch`, the op
//! messages sent but not yet acknowledged (resent with their original `client_seq` after a
//! reconnect), and the other replicas' presence. It never touches a socket or a clock, so the
//! blocking [`super::Client`] and the mio-based load generator drive the same code.
//!
//! Cost per message: one parse of the frame, one CRDT integration for a remote echo, and for an
//! own echo a lookup at the front of the pending queue (echoes come back in send order).

use std::collections::{HashMap, VecDeque};

use crate::crdt::{Applied, Doc, Op};
use crate::protocol::codec::{encode_hello, encode_op, encode_presence_update};
use crate::protocol::messages::{
    parse_server_message, HelloAck, HelloAckStrategy, OpEcho, ServerMessage,
};
use crate::protocol::ErrorCode;

/// Why the replica refused a call or a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// A local edit before the first `hello_ack`: the replica id is not known yet.
    #[error("not joined yet: no replica id")]
    NotJoined,
    /// A local edit outside the document (`pos`/`len` in characters).
    #[error("edit out of range: position {pos} + length {len} > document length {doc_len}")]
    OutOfRange {
        /// Requested position.
        pos: usize,
        /// Requested length (0 for inserts).
        len: usize,
        /// Characters in the document.
        doc_len: usize,
    },
    /// An insert of empty text.
    #[error("empty insert")]
    EmptyInsert,
    /// The server sent something that is not a contract message.
    #[error("malformed server frame")]
    BadFrame,
    /// A remote echo did not integrate: the server and this replica disagree (a bug somewhere).
    #[error("server echo {server_seq} did not integrate: {code}")]
    Diverged {
        /// The echo's `server_seq`.
        server_seq: u64,
        /// The CRDT's refusal code.
        code: &'static str,
    },
}

/// What a server frame meant, for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `hello_ack` handled: the document is current. Send every message of `resend`, in order.
    Joined {
        /// The connection's replica.
        replica: u64,
        /// The document's head.
        head: u64,
        /// Whether the server sent a snapshot (else a replay).
        snapshot: bool,
        /// Whether the server lost history this replica had seen (new epoch or `head < since`).
        history_lost: bool,
        /// Op messages to send again, with their original `client_seq`.
        resend: Vec<String>,
    },
    /// Another replica's op message was applied.
    Remote {
        /// Its `server_seq`.
        server_seq: u64,
        /// Its replica.
        replica: u64,
        /// Its sender's `client_seq`.
        client_seq: u64,
    },
    /// One of this replica's op messages is acknowledged (its echo or an `ack`).
    Acked {
        /// The message's `client_seq`.
        client_seq: u64,
        /// Its `server_seq` (for an `ack`, the head when it was processed).
        server_seq: u64,
    },
    /// Another replica's presence (`"null"`: cleared or left).
    Presence {
        /// The other replica.
        replica: u64,
        /// Its state as compact JSON.
        state_json: String,
    },
    /// The server refused something.
    Error {
        /// The contract code as sent.
        code: String,
        /// The server's explanation.
        message: String,
        /// The refused op message, if any. For `unavailable`, `overloaded` and `rate_limited` it
        /// stays pending (resent after a reconnect); for any other code it is dropped, and the
        /// local document keeps an edit the server never applied: reconnect without `since` to
        /// resynchronise.
        client_seq: Option<u64>,
    },
}

/// An op message sent (or to be sent) and not acknowledged yet.
#[derive(Clone, Debug)]
struct Pending {
    client_seq: u64,
    ops: Vec<Op>,
}

/// The client side of one document: see the module docs.
#[derive(Debug)]
pub struct Replica {
    doc_name: String,
    token: Option<String>,
    replica: Option<u64>,
    doc: Doc,
    /// Last `server_seq` seen (0 before any).
    head: u64,
    /// Epoch of `head`; `None` before the first `hello_ack`.
    epoch: Option<String>,
    joined: bool,
    next_client_seq: u64,
    /// Sent, unacknowledged messages in `client_seq` order.
    pending: VecDeque<Pending>,
    /// Acknowledged own messages, kept (when `keep_history`) to resend if the server loses them.
    acked: Vec<Pending>,
    keep_history: bool,
    /// Ops edited locally but not yet wrapped in a message ([`Replica::flush`]).
    staged: Vec<Op>,
    presence: HashMap<u64, String>,
}

impl Replica {
    /// A replica of `doc` that has not joined yet. `replica`: ask for this id (else the server
    /// assigns one); `token`: sent in `hello`.
    pub fn new(doc: &str, replica: Option<u64>, token: Option<String>) -> Replica {
        Replica {
            doc_name: doc.to_owned(),
            token,
            replica,
            doc: Doc::new(),
            head: 0,
            epoch: None,
            joined: false,
            next_client_seq: 1,
            pending: VecDeque::new(),
            acked: Vec::new(),
            keep_history: true,
            staged: Vec::new(),
            presence: HashMap::new(),
        }
    }

    /// Whether acknowledged own messages are kept to be resent if the server loses history
    /// (default true; a load generator that does not care about data loss may turn it off to
    /// keep memory flat).
    pub fn set_keep_history(&mut self, keep: bool) {
        self.keep_history = keep;
        if !keep {
            self.acked = Vec::new();
        }
    }

    /// The `hello` to send on (re)connecting: with `since` and `epoch` once joined before.
    /// Marks the replica as not joined until the `hello_ack`.
    pub fn hello(&mut self) -> String {
        self.joined = false;
        let since = self.epoch.as_ref().map(|_| self.head);
        encode_hello(
            Some(&self.doc_name),
            self.replica,
            since,
            self.epoch.as_deref(),
            self.token.as_deref(),
        )
    }

    /// Inserts `text` at character `pos` locally and stages the op (see [`Replica::flush`]).
    ///
    /// # Errors
    /// `NotJoined` before the replica id is known, `OutOfRange`, `EmptyInsert`.
    pub fn stage_insert(&mut self, pos: usize, text: &str) -> Result<(), ReplicaError> {
        let replica = self.replica.ok_or(ReplicaError::NotJoined)?;
        if text.is_empty() {
            return Err(ReplicaError::EmptyInsert);
        }
        let doc_len = self.doc.len();
        if pos > doc_len {
            return Err(ReplicaError::OutOfRange {
                pos,
                len: 0,
                doc_len,
            });
        }
        let op = self.doc.insert_local(replica, pos, text);
        self.staged.push(op);
        Ok(())
    }

    /// Deletes `len` characters at `pos` locally and stages the ops (see [`Replica::flush`]).
    ///
    /// # Errors
    /// `NotJoined` before the replica id is known, `OutOfRange`.
    pub fn stage_delete(&mut self, pos: usize, len: usize) -> Result<(), ReplicaError> {
        self.replica.ok_or(ReplicaError::NotJoined)?;
        let doc_len = self.doc.len();
        if !pos.checked_add(len).is_some_and(|end| end <= doc_len) {
            return Err(ReplicaError::OutOfRange { pos, len, doc_len });
        }
        if len > 0 {
            let ops = self.doc.delete_local(pos, len);
            self.staged.extend(ops);
        }
        Ok(())
    }

    /// Wraps every staged op into one op message (pending until acknowledged) and returns its
    /// text to send; `None` when nothing is staged. Coalescing edits is the caller's choice:
    /// stage several, flush once.
    pub fn flush(&mut self) -> Option<String> {
        if self.staged.is_empty() {
            return None;
        }
        let ops = std::mem::take(&mut self.staged);
        let client_seq = self.next_client_seq;
        self.next_client_seq += 1;
        let text = encode_op(client_seq, &ops);
        self.pending.push_back(Pending { client_seq, ops });
        Some(text)
    }

    /// [`Replica::stage_insert`] then [`Replica::flush`]: the op message to send.
    ///
    /// # Errors
    /// As `stage_insert`.
    pub fn insert(&mut self, pos: usize, text: &str) -> Result<String, ReplicaError> {
        self.stage_insert(pos, text)?;
        Ok(self.flush().unwrap_or_default())
    }

    /// [`Replica::stage_delete`] then [`Replica::flush`]: the op message to send (`None` for `len == 0`).
    ///
    /// # Errors
    /// As `stage_delete`.
    pub fn delete(&mut self, pos: usize, len: usize) -> Result<Option<String>, ReplicaError> {
        self.stage_delete(pos, len)?;
        Ok(self.flush())
    }

    /// The presence message to send for `state_json` (valid JSON; `"null"` clears).
    pub fn presence_message(state_json: &str) -> String {
        encode_presence_update(state_json)
    }

    /// Handles one text frame from the server.
    ///
    /// # Errors
    /// `BadFrame` for a frame that is not a contract message, `Diverged` when a remote echo does
    /// not integrate.
    pub fn handle_frame(&mut self, text: &str) -> Result<Event, ReplicaError> {
        let msg = parse_server_message(text).map_err(|_| ReplicaError::BadFrame)?;
        self.handle_message(msg)
    }

    /// Handles one parsed server message (see [`Replica::handle_frame`]).
    ///
    /// # Errors
    /// As `handle_frame`.
    pub fn handle_message(&mut self, msg: ServerMessage) -> Result<Event, ReplicaError> {
        match msg {
            ServerMessage::HelloAck(ack) => Ok(self.handle_hello_ack(ack)),
            ServerMessage::OpEcho(echo) => self.handle_echo(echo),
            ServerMessage::Ack {
                client_seq,
                server_seq,
            } => {
                self.acknowledge(client_seq);
                Ok(Event::Acked {
                    client_seq,
                    server_seq,
                })
            }
            ServerMessage::Presence {
                replica,
                state_json,
            } => {
                if state_json == "null" {
                    self.presence.remove(&replica);
                } else {
                    self.presence.insert(replica, state_json.clone());
                }
                Ok(Event::Presence {
                    replica,
                    state_json,
                })
            }
            ServerMessage::Error {
                code,
                message,
                client_seq,
            } => {
                let retry = matches!(
                    ErrorCode::from_wire(&code),
                    Some(ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::RateLimited)
                );
                if let (Some(client_seq), false) = (client_seq, retry) {
                    self.pending.retain(|p| p.client_seq != client_seq);
                }
                Ok(Event::Error {
                    code,
                    message,
                    client_seq,
                })
            }
        }
    }

    /// Moves the pending message `client_seq` to the acknowledged history.
    fn acknowledge(&mut self, client_seq: u64) -> bool {
        let idx = match self.pending.front() {
            Some(front) if front.client_seq == client_seq => 0,
            _ => match self.pending.iter().position(|p| p.client_seq == client_seq) {
                Some(idx) => idx,
                None => return false,
            },
        };
        if let Some(done) = self.pending.remove(idx) {
            if self.keep_history {
                self.acked.push(done);
            }
        }
        true
    }

    fn handle_echo(&mut self, echo: OpEcho) -> Result<Event, ReplicaError> {
        if Some(echo.replica) == self.replica && self.acknowledge(echo.client_seq) {
            self.head = self.head.max(echo.server_seq);
            return Ok(Event::Acked {
                client_seq: echo.client_seq,
                server_seq: echo.server_seq,
            });
        }
        // A remote echo that does not integrate leaves head alone: `since` stays before it.
        self.apply_echo(&echo)?;
        self.head = self.head.max(echo.server_seq);
        Ok(Event::Remote {
            server_seq: echo.server_seq,
            replica: echo.replica,
            client_seq: echo.client_seq,
        })
    }

    fn apply_echo(&mut self, echo: &OpEcho) -> Result<(), ReplicaError> {
        self.doc
            .apply_remote(None, &echo.ops)
            .map(|_| ())
            .map_err(|err| ReplicaError::Diverged {
                server_seq: echo.server_seq,
                code: err.code(),
            })
    }

    fn handle_hello_ack(&mut self, ack: HelloAck) -> Event {
        let history_lost = self
            .epoch
            .as_deref()
            .is_some_and(|epoch| epoch != ack.epoch)
            || (self.epoch.is_some() && ack.head < self.head);
        self.replica = Some(ack.replica);
        self.epoch = Some(ack.epoch);
        self.joined = true;
        self.presence = ack
            .presence
            .into_iter()
            .map(|entry| (entry.replica, entry.state_json))
            .collect();
        // Staged ops not flushed yet become a pending message, so they are resent below.
        let _ = self.flush();
        let snapshot = matches!(ack.strategy, HelloAckStrategy::Snapshot(_));
        match ack.strategy {
            HelloAckStrategy::Replay(echoes) => {
                for echo in echoes {
                    // Best effort: a replay entry that does not integrate would mean divergence,
                    // which the next snapshot repairs; the replay itself carries on.
                    let _ = self.handle_echo(echo);
                }
                self.head = ack.head;
            }
            HelloAckStrategy::Snapshot(runs) => {
                self.head = ack.head;
                self.doc = match Doc::from_snapshot(&runs) {
                    Ok(doc) => doc,
                    Err(_) => Doc::new(),
                };
                if history_lost {
                    // The lost-history rule (docs/protocol.md, "Lost history"): own messages,
                    // acknowledged and pending, in client_seq order, re-applied op by op with
                    // their original ids; only the ops that change the snapshot are resent.
                    let mut own = std::mem::take(&mut self.acked);
                    own.extend(std::mem::take(&mut self.pending));
                    own.sort_by_key(|p| p.client_seq);
                    for msg in own {
                        let kept = self.reapply_changing(&msg.ops);
                        if !kept.is_empty() {
                            self.pending.push_back(Pending {
                                client_seq: msg.client_seq,
                                ops: kept,
                            });
                        } else if self.keep_history {
                            self.acked.push(msg);
                        }
                    }
                } else {
                    let pending = std::mem::take(&mut self.pending);
                    for msg in &pending {
                        self.reapply(&msg.ops);
                    }
                    self.pending = pending;
                }
            }
        }
        let resend = self
            .pending
            .iter()
            .map(|p| encode_op(p.client_seq, &p.ops))
            .collect();
        Event::Joined {
            replica: ack.replica,
            head: ack.head,
            snapshot,
            history_lost,
            resend,
        }
    }

    /// Applies own ops again on a fresh document one by one and returns those that changed it:
    /// an op already there, a delete of a tombstone and an op whose target the document lacks
    /// (another client's edit the server lost) are left out.
    fn reapply_changing(&mut self, ops: &[Op]) -> Vec<Op> {
        ops.iter()
            .filter(|op| {
                matches!(
                    self.doc.apply_remote(None, std::slice::from_ref(*op)),
                    Ok(Applied::Changed)
                )
            })
            .cloned()
            .collect()
    }

    /// Applies own ops again on a fresh document, one by one (some may be in it already);
    /// returns whether any changed it.
    fn reapply(&mut self, ops: &[Op]) -> bool {
        let mut changed = false;
        for op in ops {
            changed |= matches!(
                self.doc.apply_remote(None, std::slice::from_ref(op)),
                Ok(Applied::Changed)
            );
        }
        changed
    }

    /// The document's visible text (O(length)).
    pub fn text(&self) -> String {
        self.doc.text()
    }

    /// Characters in the document.
    pub fn len(&self) -> usize {
        self.doc.len()
    }

    /// Whether the document is empty.
    pub fn is_empty(&self) -> bool {
        self.doc.is_empty()
    }

    /// The CRDT document.
    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    /// Last `server_seq` seen.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The document's epoch, once joined.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// The replica id, once known.
    pub fn replica(&self) -> Option<u64> {
        self.replica
    }

    /// The document's name.
    pub fn doc_name(&self) -> &str {
        &self.doc_name
    }

    /// Whether the last `hello` was answered.
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Op messages sent and not acknowledged.
    pub fn n_pending(&self) -> usize {
        self.pending.len()
    }

    /// `client_seq` the next op message will get.
    pub fn next_client_seq(&self) -> u64 {
        self.next_client_seq
    }

    /// The other replicas' presence states (compact JSON).
    pub fn presence(&self) -> &HashMap<u64, String> {
        &self.presence
    }
}

#[cfg(test)]
mod tests {
    use tungstenite::{Message, WebSocket};

    use super::*;
    use crate::sim::harness::{frames, Harness};
    use crate::sim::socket::SimSocket;

    /// One real shard (`crate::sim::harness`: the real `Net` and `RoomHost` over simulated
    /// sockets and memory storage) and replicas of its document "d", each with its connection.
    struct Net {
        h: Harness,
        replicas: Vec<Replica>,
        /// Each replica's current connection, `None` while disconnected.
        conns: Vec<Option<WebSocket<SimSocket>>>,
        events: Vec<(usize, Event)>,
    }

    impl Net {
        fn new(n: usize) -> Net {
            let mut net = Net {
                h: Harness::new(),
                replicas: (0..n).map(|_| Replica::new("d", None, None)).collect(),
                conns: (0..n).map(|_| None).collect(),
                events: Vec::new(),
            };
            for i in 0..n {
                net.connect(i);
            }
            net
        }

        /// Client `i` sends `text` to the server.
        fn send(&mut self, i: usize, text: &str) {
            if let Some(ws) = &mut self.conns[i] {
                ws.send(Message::text(text)).expect("the socket takes it");
            }
        }

        /// Runs the shard and the storage until nothing moves, delivering every frame; resends
        /// answer `Joined` events at once.
        fn deliver(&mut self) {
            loop {
                self.h.settle();
                let mut any = false;
                for i in 0..self.replicas.len() {
                    let Some(ws) = &mut self.conns[i] else {
                        continue;
                    };
                    for frame in frames(ws) {
                        any = true;
                        let event = self.replicas[i].handle_message(frame).expect("valid frame");
                        if let Event::Joined { resend, .. } = &event {
                            for text in resend.clone() {
                                self.send(i, &text);
                            }
                        }
                        self.events.push((i, event));
                    }
                }
                if !any {
                    return;
                }
            }
        }

        /// Client `i`'s connection drops right after what it sent: the shard handles that, but
        /// nothing more reaches the client.
        fn lose_frames_to(&mut self, i: usize) {
            self.conns[i] = None;
            self.deliver();
        }

        fn connect(&mut self, i: usize) {
            let (_, mut ws) = self.h.connect("d");
            ws.send(Message::text(self.replicas[i].hello()))
                .expect("hello");
            self.conns[i] = Some(ws);
            self.deliver();
        }

        fn disconnect(&mut self, i: usize) {
            self.conns[i] = None;
            self.deliver();
        }

        /// The server loses the document: a new shard over empty storage (every connection
        /// breaks).
        fn lose_document(&mut self) {
            for conn in &mut self.conns {
                *conn = None;
            }
            self.h = Harness::new();
        }

        /// The server's text and head of the document.
        fn room(&self) -> (String, u64) {
            self.h
                .shard
                .handler()
                .doc_state("d")
                .expect("the document is loaded")
        }

        fn insert(&mut self, i: usize, pos: usize, text: &str) {
            let msg = self.replicas[i].insert(pos, text).expect("insert in range");
            self.send(i, &msg);
        }

        fn texts(&self) -> Vec<String> {
            self.replicas.iter().map(Replica::text).collect()
        }
    }

    /// Hand-written server frames, no room involved.
    #[test]
    fn handles_raw_server_frames() {
        let mut r = Replica::new("d", None, None);
        assert_eq!(r.hello(), r#"{"type":"hello","doc":"d"}"#);
        let ack = r#"{"type":"hello_ack","doc":"d","replica":4,"head":7,"epoch":"ep","strategy":"snapshot","snapshot":{"runs":[{"id":[0,1],"text":"ab"},{"id":[2,1],"deleted":1},{"id":[3,2],"text":"c"}]},"presence":[{"replica":1,"state":{"c":2}}]}"#;
        let event = r.handle_frame(ack).expect("hello_ack");
        assert_eq!(
            event,
            Event::Joined {
                replica: 4,
                head: 7,
                snapshot: true,
                history_lost: false,
                resend: vec![]
            }
        );
        assert_eq!(
            (r.text().as_str(), r.head(), r.epoch(), r.replica()),
            ("abc", 7, Some("ep"), Some(4))
        );
        assert_eq!(r.presence().get(&1).map(String::as_str), Some(r#"{"c":2}"#));
        let echo = r#"{"type":"op_echo","server_seq":8,"replica":1,"client_seq":3,"ops":[{"kind":"ins","id":[4,1],"after":[3,2],"text":"!"}]}"#;
        assert_eq!(
            r.handle_frame(echo),
            Ok(Event::Remote {
                server_seq: 8,
                replica: 1,
                client_seq: 3
            })
        );
        assert_eq!(r.text(), "abc!");
        let msg = r.insert(0, ">").expect("joined");
        assert_eq!(
            msg,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[5,4],"after":null,"text":">"}]}"#
        );
        let own = r#"{"type":"op_echo","server_seq":9,"replica":4,"client_seq":1,"ops":[{"kind":"ins","id":[5,4],"after":null,"text":">"}]}"#;
        assert_eq!(
            r.handle_frame(own),
            Ok(Event::Acked {
                client_seq: 1,
                server_seq: 9
            })
        );
        assert_eq!(
            (r.text().as_str(), r.head(), r.n_pending()),
            (">abc!", 9, 0)
        );
        assert_eq!(
            r.handle_frame(r#"{"type":"presence","replica":1,"state":null}"#),
            Ok(Event::Presence {
                replica: 1,
                state_json: "null".into()
            })
        );
        assert!(r.presence().is_empty());
        assert_eq!(
            r.hello(),
            r#"{"type":"hello","doc":"d","replica":4,"since":9,"epoch":"ep"}"#
        );
        // An echo that cannot integrate is reported, not applied.
        let bad = r#"{"type":"op_echo","server_seq":10,"replica":1,"client_seq":4,"ops":[{"kind":"del","id":[99,9],"len":1}]}"#;
        assert_eq!(
            r.handle_frame(bad),
            Err(ReplicaError::Diverged {
                server_seq: 10,
                code: "unknown_id"
            })
        );
    }

    #[test]
    fn concurrent_edits_converge_and_ack() {
        let mut net = Net::new(3);
        assert_eq!(
            net.replicas.iter().map(|r| r.replica()).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
        net.insert(0, 0, "hello");
        net.deliver();
        net.insert(1, 5, " world");
        net.insert(2, 0, ">> ");
        let msg = net.replicas[0]
            .delete(0, 1)
            .expect("in range")
            .expect("non-empty");
        net.send(0, &msg);
        net.deliver();
        let texts = net.texts();
        assert_eq!(texts[0], ">> ello world");
        assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
        assert_eq!(net.room().0, texts[0]);
        assert!(net
            .replicas
            .iter()
            .all(|r| r.n_pending() == 0 && r.head() == 4));
        assert!(net.events.contains(&(
            1,
            Event::Acked {
                client_seq: 1,
                server_seq: 2
            }
        )));
        assert!(net.events.contains(&(
            0,
            Event::Remote {
                server_seq: 2,
                replica: 2,
                client_seq: 1
            }
        )));
    }

    #[test]
    fn staged_edits_coalesce_into_one_message() {
        let mut net = Net::new(2);
        let r = &mut net.replicas[0];
        r.stage_insert(0, "ab").expect("ok");
        r.stage_insert(2, "c").expect("ok");
        r.stage_delete(0, 1).expect("ok");
        let msg = r.flush().expect("staged");
        assert!(r.flush().is_none());
        net.send(0, &msg);
        net.deliver();
        assert_eq!(net.texts(), ["bc", "bc"]);
        assert_eq!(net.room().1, 1);
    }

    #[test]
    fn reconnect_replays_and_resends_exactly_once() {
        let mut net = Net::new(2);
        net.insert(0, 0, "abc");
        net.deliver();
        // Client 0 edits, the server applies it, but the connection drops before the echo.
        net.insert(0, 3, "d");
        net.lose_frames_to(0);
        net.disconnect(0);
        // While 0 is away, 1 edits; 0 edits offline too.
        net.insert(1, 0, "X");
        net.deliver();
        net.insert(0, 0, "Y");
        assert_eq!(net.replicas[0].n_pending(), 2);
        net.connect(0);
        let joined = net.events.iter().rev().find_map(|(i, e)| match (i, e) {
            (
                0,
                Event::Joined {
                    snapshot,
                    history_lost,
                    resend,
                    ..
                },
            ) => Some((*snapshot, *history_lost, resend.len())),
            _ => None,
        });
        // The replay carries the echo of "d", which acknowledges it: only "Y" is resent.
        assert_eq!(joined, Some((false, false, 1)));
        net.deliver();
        let texts = net.texts();
        assert_eq!(texts[0], texts[1]);
        assert_eq!(net.room().0, texts[0]);
        assert_eq!(texts[0].matches('d').count(), 1, "{texts:?}");
        assert_eq!(texts[0].matches('Y').count(), 1, "{texts:?}");
        assert_eq!(net.replicas[0].n_pending(), 0);
        assert_eq!(net.room().1, 4);
        // "d" (client_seq 2) was acknowledged inside the replay; "Y" by its own echo.
        assert!(net.events.contains(&(
            0,
            Event::Acked {
                client_seq: 3,
                server_seq: 4
            }
        )));
    }

    #[test]
    fn resend_of_an_applied_op_is_acked_after_a_snapshot_rejoin() {
        let mut net = Net::new(2);
        net.insert(0, 0, "abc");
        net.deliver();
        // Applied by the server, echo lost; the client rejoins without since: snapshot.
        net.insert(0, 3, "d");
        net.lose_frames_to(0);
        net.disconnect(0);
        net.replicas[0].epoch = None;
        net.connect(0);
        net.deliver();
        assert_eq!(net.texts()[0], "abcd");
        assert!(net.events.contains(&(
            0,
            Event::Acked {
                client_seq: 2,
                server_seq: 2
            }
        )));
        assert_eq!((net.room().1, net.replicas[0].n_pending()), (2, 0));
    }

    #[test]
    fn snapshot_rejoin_reapplies_pending() {
        let mut net = Net::new(2);
        net.insert(0, 0, "abc");
        net.deliver();
        net.disconnect(0);
        net.insert(0, 1, "Z");
        // Forget the epoch: the hello carries no since, so the server sends a snapshot.
        net.replicas[0].epoch = None;
        net.connect(0);
        net.deliver();
        assert_eq!(net.texts(), ["aZbc", "aZbc"]);
        assert_eq!(net.replicas[0].n_pending(), 0);
    }

    #[test]
    fn lost_history_resends_acknowledged_ops() {
        let mut net = Net::new(1);
        net.insert(0, 0, "abc");
        net.deliver();
        assert_eq!(net.replicas[0].n_pending(), 0);
        // The server loses the document: a new room with a new epoch.
        net.disconnect(0);
        net.lose_document();
        net.connect(0);
        let lost = net.events.iter().any(|(_, e)| {
            matches!(
                e,
                Event::Joined {
                    history_lost: true,
                    ..
                }
            )
        });
        assert!(lost);
        net.deliver();
        assert_eq!(net.room().0, "abc");
        assert_eq!(net.replicas[0].text(), "abc");
        assert_eq!(net.replicas[0].n_pending(), 0);
    }

    #[test]
    fn lost_history_resends_only_the_ops_that_still_apply() {
        let mut net = Net::new(2);
        net.insert(0, 0, "alpha ");
        net.deliver();
        // One message of client 1: "0" needs nothing of 0's, "beta" goes after 0's last char.
        net.replicas[1].stage_insert(0, "0").expect("joined");
        net.replicas[1].stage_insert(7, "beta").expect("joined");
        let msg = net.replicas[1].flush().expect("staged ops");
        net.send(1, &msg);
        net.deliver();
        assert_eq!(net.texts(), ["0alpha beta", "0alpha beta"]);
        // The server loses the document; client 1 comes back first.
        net.disconnect(0);
        net.disconnect(1);
        net.lose_document();
        net.connect(1);
        // Only "0" is resent: the whole message would be refused (unknown_id for "beta").
        let resent = net.events.iter().rev().find_map(|(i, e)| match (i, e) {
            (1, Event::Joined { resend, .. }) => Some(resend.clone()),
            _ => None,
        });
        assert_eq!(
            resent,
            Some(vec![
                r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[6,2],"after":null,"text":"0"}]}"#
                    .to_owned()
            ])
        );
        net.deliver();
        assert_eq!((net.room().0.as_str(), net.texts()[1].as_str()), ("0", "0"));
        net.connect(0);
        net.deliver();
        let texts = net.texts();
        assert_eq!(texts[0], texts[1]);
        assert_eq!(net.room().0, texts[0]);
        assert_eq!(texts[0], "0alpha ");
        assert_eq!(
            (net.replicas[0].n_pending(), net.replicas[1].n_pending()),
            (0, 0)
        );
    }

    #[test]
    fn presence_map_follows_the_server() {
        let mut net = Net::new(2);
        let msg = Replica::presence_message(r#"{"cursor":1}"#);
        net.send(0, &msg);
        net.deliver();
        assert_eq!(
            net.replicas[1].presence().get(&1).map(String::as_str),
            Some(r#"{"cursor":1}"#)
        );
        net.replicas.push(Replica::new("d", None, None));
        net.conns.push(None);
        net.connect(2);
        assert_eq!(net.replicas[2].presence().len(), 1);
        net.disconnect(0);
        net.deliver();
        assert!(net.replicas[1].presence().is_empty() && net.replicas[2].presence().is_empty());
    }

    #[test]
    fn local_edit_errors_and_server_errors() {
        let mut fresh = Replica::new("d", None, None);
        assert_eq!(fresh.insert(0, "a"), Err(ReplicaError::NotJoined));
        assert!(fresh.hello().starts_with(r#"{"type":"hello","doc":"d"}"#));
        let mut net = Net::new(1);
        let r = &mut net.replicas[0];
        assert_eq!(
            r.insert(1, "a"),
            Err(ReplicaError::OutOfRange {
                pos: 1,
                len: 0,
                doc_len: 0
            })
        );
        assert_eq!(r.insert(0, ""), Err(ReplicaError::EmptyInsert));
        assert_eq!(
            r.delete(0, 1),
            Err(ReplicaError::OutOfRange {
                pos: 0,
                len: 1,
                doc_len: 0
            })
        );
        assert_eq!(
            r.delete(usize::MAX, 2),
            Err(ReplicaError::OutOfRange {
                pos: usize::MAX,
                len: 2,
                doc_len: 0
            })
        );
        assert_eq!(r.delete(0, 0), Ok(None));
        assert_eq!(r.handle_frame("{"), Err(ReplicaError::BadFrame));
        let msg = r.insert(0, "a").expect("ok");
        assert_eq!(r.n_pending(), 1);
        let event =
            r.handle_frame(r#"{"type":"error","code":"unavailable","message":"m","client_seq":1}"#);
        assert!(matches!(
            event,
            Ok(Event::Error {
                client_seq: Some(1),
                ..
            })
        ));
        assert_eq!(
            r.n_pending(),
            1,
            "unavailable keeps the message for a resend"
        );
        let _ =
            r.handle_frame(r#"{"type":"error","code":"invalid_op","message":"m","client_seq":1}"#);
        assert_eq!(r.n_pending(), 0);
        assert!(msg.starts_with(r#"{"type":"op","client_seq":1,"#));
        // After joining, hello carries since and epoch.
        let hello = net.replicas[0].hello();
        assert!(
            hello.contains(r#""replica":1,"since":0,"epoch":""#),
            "{hello}"
        );
    }
}
