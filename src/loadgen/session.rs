//! One simulated client's protocol state: a CRDT replica of its document that makes every local
//! edit a real op and integrates every message the server sends.
//!
//! Minimal adapter over `crate::crdt::Doc` and the wire format of `protocol.md`, kept here until the
//! client library (`client::Replica`) lands; it never touches a socket or a clock.

use serde::{Deserialize, Serialize};

use crate::crdt::{Applied, Doc, Op, OpId, Run, RunContent};

/// A message the server sent, as the load generator cares about it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `hello_ack` applied: the replica now holds the document.
    Joined {
        /// The replica the server assigned.
        replica: u64,
    },
    /// `op_echo` integrated.
    Echo {
        /// Replica that sent the op.
        replica: u64,
        /// Its client_seq.
        client_seq: u64,
    },
    /// `ack` for a message that changed nothing.
    Ack {
        /// The acknowledged client_seq.
        client_seq: u64,
    },
    /// `error` from the server.
    Refused {
        /// The error code.
        code: String,
        /// The refused op's client_seq, if any.
        client_seq: Option<u64>,
    },
    /// Presence or anything else the generator ignores.
    Other,
}

/// A server message the replica could not accept: a bug in the server or in this adapter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Not JSON of a known server message.
    #[error("undecodable server message: {0}")]
    Decode(String),
    /// An op_echo out of server_seq order.
    #[error("server_seq {got} after head {head}")]
    Gap {
        /// Head before the message.
        head: u64,
        /// The echo's server_seq.
        got: u64,
    },
    /// The CRDT refused an op the server accepted.
    #[error("op does not integrate: {0}")]
    Integrate(String),
    /// A message that needs `hello_ack` first.
    #[error("message before hello_ack")]
    NotJoined,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum WireOp {
    Ins {
        id: [u64; 2],
        after: Option<[u64; 2]>,
        text: String,
    },
    Del {
        id: [u64; 2],
        len: u64,
    },
}

#[derive(Deserialize)]
struct WireRun {
    id: [u64; 2],
    text: Option<String>,
    deleted: Option<u64>,
}

#[derive(Deserialize)]
struct WireSnapshot {
    runs: Vec<WireRun>,
}

#[derive(Deserialize)]
struct WireEcho {
    server_seq: u64,
    replica: u64,
    client_seq: u64,
    ops: Vec<WireOp>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireServer {
    HelloAck {
        replica: u64,
        head: u64,
        snapshot: Option<WireSnapshot>,
        ops: Option<Vec<WireEcho>>,
    },
    OpEcho(WireEcho),
    Ack {
        client_seq: u64,
    },
    Presence {},
    Error {
        code: String,
        client_seq: Option<u64>,
    },
}

fn to_id(id: [u64; 2]) -> OpId {
    OpId {
        lamport: id[0],
        replica: id[1],
    }
}

fn from_id(id: OpId) -> [u64; 2] {
    [id.lamport, id.replica]
}

fn to_op(op: WireOp) -> Op {
    match op {
        WireOp::Ins { id, after, text } => Op::Insert {
            id: to_id(id),
            after: after.map(to_id),
            text,
        },
        WireOp::Del { id, len } => Op::Delete { id: to_id(id), len },
    }
}

fn from_op(op: &Op) -> WireOp {
    match op {
        Op::Insert { id, after, text } => WireOp::Ins {
            id: from_id(*id),
            after: after.map(from_id),
            text: text.clone(),
        },
        Op::Delete { id, len } => WireOp::Del {
            id: from_id(*id),
            len: *len,
        },
    }
}

#[derive(Serialize)]
struct WireOpMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client_seq: u64,
    ops: &'a [WireOp],
}

/// One client's replica of its document.
#[derive(Debug, Default)]
pub struct Session {
    doc: Doc,
    replica: Option<u64>,
    head: u64,
    next_client_seq: u64,
    /// Echoes integrated since joining (own ones included).
    pub n_echoes: u64,
}

impl Session {
    /// A replica that has not joined yet.
    pub fn new() -> Session {
        Session::default()
    }

    /// A replica whose op messages number their `client_seq` from `first_client_seq` (the load
    /// generator puts the writer's index in the high bits; the server echoes it verbatim).
    pub fn with_first_client_seq(first_client_seq: u64) -> Session {
        Session { next_client_seq: first_client_seq, ..Session::default() }
    }

    /// The `hello` frame for `doc`.
    pub fn hello(doc: &str) -> String {
        serde_json::json!({"type": "hello", "doc": doc}).to_string()
    }

    /// The assigned replica, once joined.
    pub fn replica(&self) -> Option<u64> {
        self.replica
    }

    /// Last server_seq integrated.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Visible characters.
    pub fn len(&self) -> usize {
        self.doc.len()
    }

    /// Whether the document is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The visible text.
    pub fn text(&self) -> String {
        self.doc.text()
    }

    fn op_message(&mut self, ops: &[Op]) -> (u64, String) {
        let client_seq = self.next_client_seq;
        self.next_client_seq += 1;
        let wire: Vec<WireOp> = ops.iter().map(from_op).collect();
        let message = WireOpMessage {
            kind: "op",
            client_seq,
            ops: &wire,
        };
        (
            client_seq,
            serde_json::to_string(&message).unwrap_or_default(),
        )
    }

    /// Inserts `text` at visible position `pos` (clamped to the length); returns the op
    /// message's client_seq and frame text.
    ///
    /// # Errors
    /// Before `hello_ack`.
    pub fn insert(&mut self, pos: usize, text: &str) -> Result<(u64, String), SessionError> {
        let replica = self.replica.ok_or(SessionError::NotJoined)?;
        let pos = pos.min(self.doc.len());
        let op = self.doc.insert_local(replica, pos, text);
        Ok(self.op_message(std::slice::from_ref(&op)))
    }

    /// Deletes `len` visible characters from `pos` (clamped); `None` when there is nothing to delete.
    ///
    /// # Errors
    /// Before `hello_ack`.
    pub fn delete(
        &mut self,
        pos: usize,
        len: usize,
    ) -> Result<Option<(u64, String)>, SessionError> {
        if self.replica.is_none() {
            return Err(SessionError::NotJoined);
        }
        let doc_len = self.doc.len();
        let len = len.min(doc_len.saturating_sub(pos.min(doc_len)));
        if len == 0 {
            return Ok(None);
        }
        let ops = self.doc.delete_local(pos.min(doc_len), len);
        Ok(Some(self.op_message(&ops)))
    }

    fn integrate(&mut self, echo: WireEcho) -> Result<(u64, u64), SessionError> {
        if echo.server_seq != self.head + 1 {
            return Err(SessionError::Gap {
                head: self.head,
                got: echo.server_seq,
            });
        }
        let ops: Vec<Op> = echo.ops.into_iter().map(to_op).collect();
        match self.doc.apply_remote(None, &ops) {
            Ok(Applied::Changed | Applied::Unchanged) => {}
            Err(e) => return Err(SessionError::Integrate(e.to_string())),
        }
        self.head = echo.server_seq;
        self.n_echoes += 1;
        Ok((echo.replica, echo.client_seq))
    }

    /// Applies one server frame.
    ///
    /// # Errors
    /// The frame is not a valid server message or does not integrate.
    pub fn receive(&mut self, text: &str) -> Result<Incoming, SessionError> {
        // Fast path for the hot message: an op_echo decodes straight into its struct (unknown
        // fields such as `type` are ignored) instead of through serde's buffered tagged enum.
        if text.starts_with(r#"{"type":"op_echo""#) {
            if self.replica.is_none() {
                return Err(SessionError::NotJoined);
            }
            let echo: WireEcho = serde_json::from_str(text).map_err(|e| SessionError::Decode(e.to_string()))?;
            let (replica, client_seq) = self.integrate(echo)?;
            return Ok(Incoming::Echo { replica, client_seq });
        }
        let message: WireServer =
            serde_json::from_str(text).map_err(|e| SessionError::Decode(e.to_string()))?;
        match message {
            WireServer::HelloAck {
                replica,
                head,
                snapshot,
                ops,
            } => {
                if let Some(snapshot) = snapshot {
                    let runs: Vec<Run> = snapshot
                        .runs
                        .into_iter()
                        .map(|run| Run {
                            id: to_id(run.id),
                            content: match run.text {
                                Some(text) => RunContent::Text(text),
                                None => RunContent::Deleted(run.deleted.unwrap_or(0)),
                            },
                        })
                        .collect();
                    self.doc = Doc::from_snapshot(&runs)
                        .map_err(|e| SessionError::Integrate(e.to_string()))?;
                    self.head = head;
                } else {
                    for echo in ops.unwrap_or_default() {
                        self.integrate(echo)?;
                    }
                }
                self.replica = Some(replica);
                Ok(Incoming::Joined { replica })
            }
            WireServer::OpEcho(echo) => {
                if self.replica.is_none() {
                    return Err(SessionError::NotJoined);
                }
                let (replica, client_seq) = self.integrate(echo)?;
                Ok(Incoming::Echo {
                    replica,
                    client_seq,
                })
            }
            WireServer::Ack { client_seq } => Ok(Incoming::Ack { client_seq }),
            WireServer::Error { code, client_seq } => Ok(Incoming::Refused { code, client_seq }),
            WireServer::Presence {} => Ok(Incoming::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the server for two sessions: echoes `frame` from `from` with the next server_seq.
    fn echo(frame: &str, replica: u64, server_seq: u64) -> String {
        let value: serde_json::Value = serde_json::from_str(frame).expect("op frame is json");
        serde_json::json!({"type": "op_echo", "server_seq": server_seq, "replica": replica,
            "client_seq": value["client_seq"], "ops": value["ops"]})
        .to_string()
    }

    #[test]
    fn two_sessions_converge_through_echoes() {
        let mut a = Session::new();
        let mut b = Session::new();
        let ack = |r: u64| {
            format!(
                r#"{{"type":"hello_ack","doc":"d","replica":{r},"head":0,"epoch":"e","strategy":"snapshot","snapshot":{{"runs":[]}},"presence":[]}}"#
            )
        };
        assert_eq!(a.receive(&ack(1)), Ok(Incoming::Joined { replica: 1 }));
        assert_eq!(b.receive(&ack(2)), Ok(Incoming::Joined { replica: 2 }));
        let (seq_a, frame_a) = a.insert(0, "hello").expect("joined");
        let (seq_b, frame_b) = b.insert(0, "world").expect("joined");
        // The server orders a before b; both see both echoes.
        for s in [&mut a, &mut b] {
            assert_eq!(
                s.receive(&echo(&frame_a, 1, 1)),
                Ok(Incoming::Echo {
                    replica: 1,
                    client_seq: seq_a
                })
            );
            assert_eq!(
                s.receive(&echo(&frame_b, 2, 2)),
                Ok(Incoming::Echo {
                    replica: 2,
                    client_seq: seq_b
                })
            );
        }
        assert_eq!(a.text(), b.text());
        assert_eq!(a.len(), 10);
        let (_, del) = a
            .delete(2, 3)
            .expect("joined")
            .expect("something to delete");
        a.receive(&echo(&del, 1, 3)).expect("own delete");
        b.receive(&echo(&del, 1, 3)).expect("remote delete");
        assert_eq!(a.text(), b.text());
        assert_eq!(b.len(), 7);
        assert_eq!(
            b.receive(&echo(&del, 1, 5)),
            Err(SessionError::Gap { head: 3, got: 5 })
        );
    }

    #[test]
    fn refusals_and_garbage_are_reported() {
        let mut s = Session::new();
        assert!(matches!(s.receive("{"), Err(SessionError::Decode(_))));
        assert_eq!(
            s.receive(r#"{"type":"error","code":"invalid_op","message":"x","client_seq":4}"#),
            Ok(Incoming::Refused {
                code: "invalid_op".into(),
                client_seq: Some(4)
            })
        );
        assert_eq!(s.insert(0, "x"), Err(SessionError::NotJoined));
    }
}
