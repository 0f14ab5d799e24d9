//! One simulated client's protocol state: a thin adapter over [`crate::client::Replica`] (the
//! project's sans-IO client) that also tells the generator which op each server frame was.
//!
//! The adapter parses each frame once with [`crate::protocol::parse_server_message`], notes the
//! echo's `(replica, client_seq)` (which `client::Event::Remote` does not carry), then hands the
//! parsed message to the replica. It never touches a socket or a clock.

use crate::client::{Event, Replica, ReplicaError};
use crate::protocol::{parse_server_message, ServerMessage};

/// A message the server sent, as the load generator cares about it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `hello_ack` applied: the replica now holds the document.
    Joined {
        /// The connection's replica.
        replica: u64,
    },
    /// `op_echo` integrated (own or remote).
    Echo {
        /// Replica that sent the op.
        replica: u64,
        /// Its client_seq.
        client_seq: u64,
    },
    /// `ack` for one of our messages that changed nothing.
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
    /// Presence, which the generator ignores.
    Other,
}

/// A frame or call the replica refused: a bug in the server, the client library or here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Not a contract server message.
    #[error("undecodable server message")]
    Decode,
    /// The replica refused the message or the edit.
    #[error("replica: {0}")]
    Replica(ReplicaError),
    /// The client library produced an op message without a `client_seq`.
    #[error("op message without client_seq")]
    NoClientSeq,
}

/// One client's replica of its document.
#[derive(Debug)]
pub struct Session {
    replica: Replica,
}

/// Reads `client_seq` back from an op message the replica encoded (`"client_seq":K`).
fn client_seq_of(frame: &str) -> Option<u64> {
    let rest = &frame[frame.find("\"client_seq\":")? + "\"client_seq\":".len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Session {
    /// A replica of `doc` that asks for replica id `replica_id` (so the generator knows which
    /// client every echo came from) and keeps no acknowledged history (flat memory).
    pub fn new(doc: &str, replica_id: u64) -> Session {
        Session::with_token(doc, replica_id, None)
    }

    /// [`Session::new`] sending `token` in its `hello`.
    pub fn with_token(doc: &str, replica_id: u64, token: Option<String>) -> Session {
        let mut replica = Replica::new(doc, Some(replica_id), token);
        replica.set_keep_history(false);
        Session { replica }
    }

    /// The `hello` frame.
    pub fn hello(&mut self) -> String {
        self.replica.hello()
    }

    /// The replica id, once joined.
    pub fn replica(&self) -> Option<u64> {
        self.replica.replica()
    }

    /// Last server_seq integrated.
    pub fn head(&self) -> u64 {
        self.replica.head()
    }

    /// Visible characters.
    pub fn len(&self) -> usize {
        self.replica.len()
    }

    /// Whether the document is empty.
    pub fn is_empty(&self) -> bool {
        self.replica.is_empty()
    }

    /// The visible text.
    pub fn text(&self) -> String {
        self.replica.text()
    }

    /// Inserts `text` at visible position `pos`; returns the op message's client_seq and text.
    ///
    /// # Errors
    /// Before `hello_ack`, or `pos` past the end.
    pub fn insert(&mut self, pos: usize, text: &str) -> Result<(u64, String), SessionError> {
        let frame = self
            .replica
            .insert(pos, text)
            .map_err(SessionError::Replica)?;
        Ok((
            client_seq_of(&frame).ok_or(SessionError::NoClientSeq)?,
            frame,
        ))
    }

    /// Deletes `len` visible characters from `pos`; `None` when `len` is 0.
    ///
    /// # Errors
    /// Before `hello_ack`, or a range past the end.
    pub fn delete(
        &mut self,
        pos: usize,
        len: usize,
    ) -> Result<Option<(u64, String)>, SessionError> {
        match self
            .replica
            .delete(pos, len)
            .map_err(SessionError::Replica)?
        {
            Some(frame) => Ok(Some((
                client_seq_of(&frame).ok_or(SessionError::NoClientSeq)?,
                frame,
            ))),
            None => Ok(None),
        }
    }

    /// Applies one server frame.
    ///
    /// # Errors
    /// The frame is not a contract message, or the replica refused it (divergence).
    pub fn receive(&mut self, text: &str) -> Result<Incoming, SessionError> {
        let message = parse_server_message(text).map_err(|_| SessionError::Decode)?;
        let echo = match &message {
            ServerMessage::OpEcho(echo) => Some((echo.replica, echo.client_seq)),
            _ => None,
        };
        let event = self
            .replica
            .handle_message(message)
            .map_err(SessionError::Replica)?;
        Ok(match (event, echo) {
            (Event::Remote { .. } | Event::Acked { .. }, Some((replica, client_seq))) => {
                Incoming::Echo {
                    replica,
                    client_seq,
                }
            }
            (Event::Joined { replica, .. }, _) => Incoming::Joined { replica },
            (Event::Acked { client_seq, .. }, None) => Incoming::Ack { client_seq },
            (
                Event::Error {
                    code, client_seq, ..
                },
                _,
            ) => Incoming::Refused { code, client_seq },
            (Event::Remote { .. } | Event::Presence { .. }, _) => Incoming::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the server: echoes op `frame` from `replica` with `server_seq`.
    fn echo(frame: &str, replica: u64, server_seq: u64) -> String {
        let value: serde_json::Value = serde_json::from_str(frame).expect("op frame is json");
        serde_json::json!({"type": "op_echo", "server_seq": server_seq, "replica": replica,
            "client_seq": value["client_seq"], "ops": value["ops"]})
        .to_string()
    }

    fn hello_ack(replica: u64) -> String {
        format!(
            r#"{{"type":"hello_ack","doc":"d","replica":{replica},"head":0,"epoch":"e","strategy":"snapshot","snapshot":{{"runs":[]}},"presence":[]}}"#
        )
    }

    #[test]
    fn two_sessions_converge_through_echoes() {
        let mut a = Session::new("d", 1);
        let mut b = Session::new("d", 2);
        assert!(a.hello().contains("\"replica\":1"));
        assert_eq!(
            a.receive(&hello_ack(1)),
            Ok(Incoming::Joined { replica: 1 })
        );
        assert_eq!(
            b.receive(&hello_ack(2)),
            Ok(Incoming::Joined { replica: 2 })
        );
        let (seq_a, frame_a) = a.insert(0, "hello").expect("joined");
        let (seq_b, frame_b) = b.insert(0, "world").expect("joined");
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
        let (seq_del, del) = a
            .delete(2, 3)
            .expect("joined")
            .expect("something to delete");
        assert_eq!(seq_del, seq_a + 1);
        a.receive(&echo(&del, 1, 3)).expect("own delete");
        b.receive(&echo(&del, 1, 3)).expect("remote delete");
        assert_eq!(a.text(), b.text());
        assert_eq!(b.len(), 7);
        assert_eq!(b.head(), 3);
    }

    #[test]
    fn acks_refusals_and_garbage() {
        let mut s = Session::new("d", 1);
        assert_eq!(s.receive("{"), Err(SessionError::Decode));
        s.receive(&hello_ack(1)).expect("joins");
        let (seq, _) = s.insert(0, "x").expect("joined");
        assert_eq!(
            s.receive(&format!(
                r#"{{"type":"ack","client_seq":{seq},"server_seq":0}}"#
            )),
            Ok(Incoming::Ack { client_seq: seq })
        );
        assert_eq!(
            s.receive(r#"{"type":"error","code":"invalid_op","message":"x","client_seq":9}"#),
            Ok(Incoming::Refused {
                code: "invalid_op".into(),
                client_seq: Some(9)
            })
        );
        assert_eq!(
            client_seq_of(r#"{"type":"op","client_seq":42,"ops":[]}"#),
            Some(42)
        );
        assert_eq!(client_seq_of(r#"{"type":"op"}"#), None);
    }
}
