//! Limits of the contract and the hand-written JSON encoders of every message.
//!
//! Encoders write straight into a `String` (no intermediate values), so a frame costs one
//! allocation; the result is a `tungstenite::Utf8Bytes`, cheap to clone for every recipient.
//! Never parses; never fails: every value it is given was validated already.

use std::fmt::Write as _;

use tungstenite::Utf8Bytes;

use super::ProtocolError;
use crate::crdt::{Op, OpId, Run, RunContent};

pub use crate::config::{OPS_PER_MESSAGE_MAX, PRESENCE_BYTES_MAX};

/// Appends `text` as a JSON string literal (quotes included), escaping only what JSON requires.
pub fn write_json_str(out: &mut String, text: &str) {
    out.push('"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: &str = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

fn write_id(out: &mut String, id: OpId) {
    let _ = write!(out, "[{},{}]", id.lamport, id.replica);
}

/// Appends one op in the contract's canonical form.
pub fn write_op(out: &mut String, op: &Op) {
    match op {
        Op::Insert { id, after, text } => {
            out.push_str("{\"kind\":\"ins\",\"id\":");
            write_id(out, *id);
            out.push_str(",\"after\":");
            match after {
                Some(after) => write_id(out, *after),
                None => out.push_str("null"),
            }
            out.push_str(",\"text\":");
            write_json_str(out, text);
            out.push('}');
        }
        Op::Delete { id, len } => {
            out.push_str("{\"kind\":\"del\",\"id\":");
            write_id(out, *id);
            let _ = write!(out, ",\"len\":{len}}}");
        }
    }
}

/// Appends a JSON array of ops.
pub fn write_ops(out: &mut String, ops: &[Op]) {
    out.push('[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_op(out, op);
    }
    out.push(']');
}

fn ops_capacity(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Insert { text, .. } => 96 + text.len(),
            Op::Delete { .. } => 64,
        })
        .sum()
}

/// `{"type":"error","code":..,"message":..,"client_seq":K?}`.
pub fn encode_error(err: &ProtocolError) -> Utf8Bytes {
    let mut out = String::with_capacity(64 + err.message.len());
    out.push_str("{\"type\":\"error\",\"code\":\"");
    out.push_str(err.code.as_str());
    out.push_str("\",\"message\":");
    write_json_str(&mut out, err.message);
    if let Some(client_seq) = err.client_seq {
        let _ = write!(out, ",\"client_seq\":{client_seq}");
    }
    out.push('}');
    Utf8Bytes::from(out)
}

/// `{"type":"op_echo","server_seq":S,"replica":R,"client_seq":K,"ops":[...]}`, encoded once and
/// shared by every recipient (and the op log).
pub fn encode_op_echo(server_seq: u64, replica: u64, client_seq: u64, ops: &[Op]) -> Utf8Bytes {
    let mut out = String::with_capacity(96 + ops_capacity(ops));
    let _ = write!(
        out,
        "{{\"type\":\"op_echo\",\"server_seq\":{server_seq},\"replica\":{replica},\"client_seq\":{client_seq},\"ops\":"
    );
    write_ops(&mut out, ops);
    out.push('}');
    Utf8Bytes::from(out)
}

/// `{"type":"ack","client_seq":K,"server_seq":S}`.
pub fn encode_ack(client_seq: u64, server_seq: u64) -> Utf8Bytes {
    Utf8Bytes::from(format!(
        "{{\"type\":\"ack\",\"client_seq\":{client_seq},\"server_seq\":{server_seq}}}"
    ))
}

/// `{"type":"presence","replica":R,"state":STATE}`; `state_json` is compact JSON (`null` allowed).
pub fn encode_presence(replica: u64, state_json: &str) -> Utf8Bytes {
    encode_presence_of(replica, None, state_json)
}

/// Who a presence entry belongs to when access control is on: the token's `sub` and `name`.
#[derive(Clone, Copy, Debug)]
pub struct PresenceUser<'a> {
    /// The token's `sub`.
    pub user: &'a str,
    /// The token's `name`, if it had one.
    pub name: Option<&'a str>,
}

fn write_presence_user(out: &mut String, who: Option<PresenceUser<'_>>) {
    if let Some(who) = who {
        out.push_str(",\"user\":");
        write_json_str(out, who.user);
        if let Some(name) = who.name {
            out.push_str(",\"name\":");
            write_json_str(out, name);
        }
    }
}

/// `{"type":"presence","replica":R,"user":..,"name":..,"state":STATE}`: [`encode_presence`]
/// with the sender's identity from its token (access control on).
pub fn encode_presence_of(
    replica: u64,
    who: Option<PresenceUser<'_>>,
    state_json: &str,
) -> Utf8Bytes {
    let mut out = String::with_capacity(48 + state_json.len());
    let _ = write!(out, "{{\"type\":\"presence\",\"replica\":{replica}");
    write_presence_user(&mut out, who);
    out.push_str(",\"state\":");
    out.push_str(state_json);
    out.push('}');
    Utf8Bytes::from(out)
}

/// `{"type":"auth_ack","exp":N,"role":"read"|"write"|"admin"}`: a token refresh was accepted;
/// `role` is the new token's (a refresh may lower or raise it).
pub fn encode_auth_ack(exp: u64, role: &str) -> Utf8Bytes {
    Utf8Bytes::from(format!(
        "{{\"type\":\"auth_ack\",\"exp\":{exp},\"role\":\"{role}\"}}"
    ))
}

/// What `hello_ack` says about the joiner's token (access control on).
#[derive(Clone, Copy, Debug)]
pub struct AckAuth<'a> {
    /// `read`, `write` or `admin`.
    pub role: &'a str,
    /// The token's `sub`.
    pub user: &'a str,
    /// The token's `exp`.
    pub exp: u64,
}

/// What a `hello_ack` brings the client up to date with.
#[derive(Clone, Copy, Debug)]
pub enum HelloAckBody<'a> {
    /// The snapshot object `{"runs":[...]}` as JSON text.
    Snapshot(&'a str),
    /// Complete `op_echo` objects, in `server_seq` order.
    Replay(&'a [Utf8Bytes]),
}

/// `{"type":"hello_ack",...}` with the strategy of `body` and the others' presence
/// (`(replica, compact state JSON)`, non-null states only).
pub fn encode_hello_ack(
    doc: &str,
    replica: u64,
    head: u64,
    epoch: &str,
    body: HelloAckBody<'_>,
    presence: &[(u64, &str)],
) -> Utf8Bytes {
    let presence: Vec<(u64, Option<PresenceUser<'_>>, &str)> = presence
        .iter()
        .map(|(replica, state)| (*replica, None, *state))
        .collect();
    encode_hello_ack_as(doc, replica, head, epoch, body, &presence, None)
}

/// [`encode_hello_ack`] with access control on: `role`, `user` and `exp` of the joiner's
/// token, and each presence entry's `user` and `name`.
pub fn encode_hello_ack_as(
    doc: &str,
    replica: u64,
    head: u64,
    epoch: &str,
    body: HelloAckBody<'_>,
    presence: &[(u64, Option<PresenceUser<'_>>, &str)],
    auth: Option<AckAuth<'_>>,
) -> Utf8Bytes {
    let body_len = match body {
        HelloAckBody::Snapshot(json) => json.len(),
        HelloAckBody::Replay(entries) => entries.iter().map(|echo| echo.len() + 1).sum(),
    };
    let presence_len: usize = presence
        .iter()
        .map(|(_, who, state)| 32 + state.len() + who.map_or(0, |w| 20 + w.user.len()))
        .sum();
    let mut out = String::with_capacity(128 + doc.len() + epoch.len() + body_len + presence_len);
    out.push_str("{\"type\":\"hello_ack\",\"doc\":");
    write_json_str(&mut out, doc);
    let _ = write!(out, ",\"replica\":{replica},\"head\":{head},\"epoch\":");
    write_json_str(&mut out, epoch);
    if let Some(auth) = auth {
        out.push_str(",\"role\":");
        write_json_str(&mut out, auth.role);
        out.push_str(",\"user\":");
        write_json_str(&mut out, auth.user);
        let _ = write!(out, ",\"exp\":{}", auth.exp);
    }
    match body {
        HelloAckBody::Snapshot(json) => {
            out.push_str(",\"strategy\":\"snapshot\",\"snapshot\":");
            out.push_str(json);
        }
        HelloAckBody::Replay(entries) => {
            out.push_str(",\"strategy\":\"replay\",\"ops\":[");
            for (i, echo) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(echo);
            }
            out.push(']');
        }
    }
    out.push_str(",\"presence\":[");
    for (i, (other, who, state)) in presence.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"replica\":{other}");
        write_presence_user(&mut out, *who);
        let _ = write!(out, ",\"state\":{state}}}");
    }
    out.push_str("]}");
    Utf8Bytes::from(out)
}

/// The contract's snapshot object `{"runs":[...]}` for `runs` (empty runs are skipped).
pub fn encode_snapshot_runs(runs: &[Run]) -> String {
    let capacity: usize = runs
        .iter()
        .map(|run| match &run.content {
            RunContent::Text(text) => 40 + text.len(),
            RunContent::Deleted(_) => 48,
        })
        .sum();
    let mut out = String::with_capacity(12 + capacity);
    out.push_str("{\"runs\":[");
    let mut first = true;
    for run in runs {
        match &run.content {
            RunContent::Text(text) if text.is_empty() => continue,
            RunContent::Deleted(0) => continue,
            _ => {}
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str("{\"id\":");
        write_id(&mut out, run.id);
        match &run.content {
            RunContent::Text(text) => {
                out.push_str(",\"text\":");
                write_json_str(&mut out, text);
            }
            RunContent::Deleted(n) => {
                let _ = write!(out, ",\"deleted\":{n}");
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// Client side: `{"type":"hello",...}` with the optional fields that are `Some`.
pub fn encode_hello(
    doc: Option<&str>,
    replica: Option<u64>,
    since: Option<u64>,
    epoch: Option<&str>,
    token: Option<&str>,
) -> String {
    let mut out = String::with_capacity(96 + doc.map_or(0, str::len));
    out.push_str("{\"type\":\"hello\"");
    if let Some(doc) = doc {
        out.push_str(",\"doc\":");
        write_json_str(&mut out, doc);
    }
    if let Some(replica) = replica {
        let _ = write!(out, ",\"replica\":{replica}");
    }
    if let Some(since) = since {
        let _ = write!(out, ",\"since\":{since}");
    }
    if let Some(epoch) = epoch {
        out.push_str(",\"epoch\":");
        write_json_str(&mut out, epoch);
    }
    if let Some(token) = token {
        out.push_str(",\"token\":");
        write_json_str(&mut out, token);
    }
    out.push('}');
    out
}

/// Client side: `{"type":"op","client_seq":K,"ops":[...]}`.
pub fn encode_op(client_seq: u64, ops: &[Op]) -> String {
    let mut out = String::with_capacity(48 + ops_capacity(ops));
    let _ = write!(
        out,
        "{{\"type\":\"op\",\"client_seq\":{client_seq},\"ops\":"
    );
    write_ops(&mut out, ops);
    out.push('}');
    out
}

/// Client side: `{"type":"presence","state":STATE}`; `state_json` must be valid JSON.
pub fn encode_presence_update(state_json: &str) -> String {
    let mut out = String::with_capacity(32 + state_json.len());
    out.push_str("{\"type\":\"presence\",\"state\":");
    out.push_str(state_json);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn strings_escape_like_serde_json() {
        for text in [
            "",
            "abc",
            "a\"b\\c",
            "line\nbreak\ttab\r",
            "\u{0}\u{1f}\u{7f}",
            "ünï 😀",
            "\u{2028}",
        ] {
            let mut out = String::new();
            write_json_str(&mut out, text);
            let back: String = serde_json::from_str(&out).expect("valid JSON string");
            assert_eq!(back, text);
        }
    }

    #[test]
    fn frames_are_exact() {
        let err =
            ProtocolError::new(ErrorCode::UnknownId, "no such \"id\"").with_client_seq(Some(7));
        assert_eq!(
            encode_error(&err).as_str(),
            r#"{"type":"error","code":"unknown_id","message":"no such \"id\"","client_seq":7}"#
        );
        let ops = [
            Op::Insert {
                id: OpId {
                    lamport: 3,
                    replica: 2,
                },
                after: None,
                text: "hi".into(),
            },
            Op::Insert {
                id: OpId {
                    lamport: 5,
                    replica: 2,
                },
                after: Some(OpId {
                    lamport: 4,
                    replica: 2,
                }),
                text: "\n".into(),
            },
            Op::Delete {
                id: OpId {
                    lamport: 0,
                    replica: 1,
                },
                len: 2,
            },
        ];
        assert_eq!(
            encode_op_echo(9, 2, 4, &ops).as_str(),
            concat!(
                r#"{"type":"op_echo","server_seq":9,"replica":2,"client_seq":4,"ops":["#,
                r#"{"kind":"ins","id":[3,2],"after":null,"text":"hi"},"#,
                r#"{"kind":"ins","id":[5,2],"after":[4,2],"text":"\n"},"#,
                r#"{"kind":"del","id":[0,1],"len":2}]}"#
            )
        );
        assert_eq!(
            encode_ack(4, 9).as_str(),
            r#"{"type":"ack","client_seq":4,"server_seq":9}"#
        );
        assert_eq!(
            encode_presence(3, "null").as_str(),
            r#"{"type":"presence","replica":3,"state":null}"#
        );
        let runs = [
            Run {
                id: OpId {
                    lamport: 1,
                    replica: 1,
                },
                content: RunContent::Text("ab".into()),
            },
            Run {
                id: OpId {
                    lamport: 3,
                    replica: 1,
                },
                content: RunContent::Deleted(2),
            },
        ];
        assert_eq!(
            encode_snapshot_runs(&runs),
            r#"{"runs":[{"id":[1,1],"text":"ab"},{"id":[3,1],"deleted":2}]}"#
        );
        assert_eq!(
            encode_hello(Some("d"), Some(2), Some(5), Some("e"), None),
            r#"{"type":"hello","doc":"d","replica":2,"since":5,"epoch":"e"}"#
        );
        assert_eq!(
            encode_op(1, &ops[2..]),
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"del","id":[0,1],"len":2}]}"#
        );
        assert_eq!(
            encode_presence_update("{\"x\":1}"),
            r#"{"type":"presence","state":{"x":1}}"#
        );
    }
}
