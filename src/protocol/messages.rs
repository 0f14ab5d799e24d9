//! Wire types of the contract and their parsers, for both directions.
//!
//! Parsing is two-step: serde borrows each known field of the object as raw JSON (unknown fields
//! are skipped and never kept), then the message's `type` decides how each field is typed. So a
//! field that one message type ignores can never make another type's message fail, and every
//! refusal gets exactly the code the contract's "Which code" rules name.
//! Never panics on input; allocates only what the parsed message holds.

use std::borrow::Cow;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::codec::{OPS_PER_MESSAGE_MAX, PRESENCE_BYTES_MAX};
use super::{ErrorCode, ProtocolError};
use crate::config::DOC_NAME_BYTES_MAX;
use crate::crdt::{Op, OpId, Run, RunContent, MAX_ID_COMPONENT};

/// A client's `hello`, validated field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The document; `None` when omitted (allowed with `/ws/<doc>`). Non-empty, at most 512 bytes.
    pub doc: Option<String>,
    /// The replica the client asks for, `1 ..= 2^53-1`; `None`: the server assigns one.
    pub replica: Option<u64>,
    /// Last `server_seq` the client has seen, for a reconnect.
    pub since: Option<u64>,
    /// The epoch `since` was seen in.
    pub epoch: Option<String>,
    /// Shared secret, when the server requires one.
    pub token: Option<String>,
}

/// A client's `op` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpMessage {
    /// Chosen by the client, echoed verbatim.
    pub client_seq: u64,
    /// `1 ..= 10,000` ops, applied in order, atomically.
    pub ops: Vec<Op>,
}

/// A client's `presence` update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceUpdate {
    /// The state re-encoded compactly (whitespace outside strings removed); `"null"` clears it.
    pub state_json: String,
}

/// One parsed client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// `{"type":"hello",...}`.
    Hello(Hello),
    /// `{"type":"op",...}`.
    Op(OpMessage),
    /// `{"type":"presence",...}`.
    Presence(PresenceUpdate),
    /// `{"type":"auth","token":"..."}`: a token refresh (docs/protocol.md, access control).
    Auth(AuthRefresh),
}

/// A token refresh in place: `{"type":"auth","token":"..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRefresh {
    /// The new token.
    pub token: String,
}

/// An accepted op message as broadcast: `{"type":"op_echo",...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpEcho {
    /// Its position in the document's history.
    pub server_seq: u64,
    /// The replica that sent it.
    pub replica: u64,
    /// The sender's `client_seq`.
    pub client_seq: u64,
    /// The ops, as sent.
    pub ops: Vec<Op>,
}

/// How a `hello_ack` brings the client up to date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloAckStrategy {
    /// The whole document, tombstones included, in document order.
    Snapshot(Vec<Run>),
    /// The echoes after the client's `since`, in order.
    Replay(Vec<OpEcho>),
}

/// One entry of `hello_ack.presence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    /// The other replica.
    pub replica: u64,
    /// Its state as compact JSON text.
    pub state_json: String,
}

/// `{"type":"hello_ack",...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// The document joined.
    pub doc: String,
    /// The connection's replica.
    pub replica: u64,
    /// The document's current `server_seq`.
    pub head: u64,
    /// The document's epoch.
    pub epoch: String,
    /// Snapshot or replay.
    pub strategy: HelloAckStrategy,
    /// The other replicas' non-null states.
    pub presence: Vec<PresenceEntry>,
}

/// One parsed server frame (client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// The answer to `hello`.
    HelloAck(HelloAck),
    /// An accepted op message.
    OpEcho(OpEcho),
    /// An op message that changed nothing.
    Ack {
        /// The sender's `client_seq`.
        client_seq: u64,
        /// The document's head when it was processed.
        server_seq: u64,
    },
    /// Another replica's state (`"null"`: it left or cleared it).
    Presence {
        /// The other replica.
        replica: u64,
        /// Its state as compact JSON text.
        state_json: String,
    },
    /// A refusal.
    Error {
        /// The code as sent (see [`ErrorCode::from_wire`]).
        code: String,
        /// Human-readable detail.
        message: String,
        /// The refused op message's `client_seq`, if any.
        client_seq: Option<u64>,
    },
}

/// Every field any message type knows, as raw JSON; `Some` even for an explicit `null`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    doc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    replica: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    epoch: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    client_seq: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ops: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    state: Option<&'a RawValue>,
    // Server messages only.
    #[serde(borrow, default, deserialize_with = "present")]
    head: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    strategy: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    snapshot: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    server_seq: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    code: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
}

/// The fields of one op (or snapshot run), as raw JSON.
#[derive(Deserialize)]
struct OpEnvelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    after: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    text: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    len: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    deleted: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    replica: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    state: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(deserializer).map(Some)
}

/// Up to `OPS_PER_MESSAGE_MAX` elements of an array as raw JSON, plus the total count; the
/// elements past the limit are only counted, never kept.
struct BoundedArray<'a> {
    items: Vec<&'a RawValue>,
    n_items: usize,
}

impl<'de> Deserialize<'de> for BoundedArray<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor;
        impl<'de> Visitor<'de> for BoundedVisitor {
            type Value = BoundedArray<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                let mut n_items = 0;
                while n_items < OPS_PER_MESSAGE_MAX {
                    match seq.next_element::<&'de RawValue>()? {
                        Some(item) => items.push(item),
                        None => return Ok(BoundedArray { items, n_items }),
                    }
                    n_items += 1;
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n_items += 1;
                }
                Ok(BoundedArray { items, n_items })
            }
        }
        deserializer.deserialize_seq(BoundedVisitor)
    }
}

const BAD_JSON: ProtocolError = ProtocolError::bad("malformed JSON or not an object");

/// Whether `text` starts (after whitespace) with `{`: serde would also read a struct from an array.
fn is_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

fn raw_is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A present, non-null field, or `None`.
fn non_null(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|raw| !raw_is_null(raw))
}

fn json_int(raw: &RawValue) -> Option<u64> {
    serde_json::from_str::<u64>(raw.get()).ok()
}

/// A `del.len`: any JSON integer. One below 1 becomes 0 and one past `u64` becomes
/// `u64::MAX`, so the CRDT refuses them as `invalid_op` (`len < 1`, ids running past
/// `2^53-1`), as the contract says, instead of `bad_message`; a fraction or exponent is ill-typed.
fn json_len(raw: &RawValue) -> Option<u64> {
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if text.starts_with('-') {
        return Some(0);
    }
    Some(digits.parse::<u64>().unwrap_or(u64::MAX))
}

fn json_id_component(raw: &RawValue) -> Option<u64> {
    json_int(raw).filter(|n| *n <= MAX_ID_COMPONENT)
}

/// A JSON string; lone surrogates are refused by serde_json (tested below).
fn json_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<Cow<'_, str>>(raw.get())
        .ok()
        .map(Cow::into_owned)
}

fn json_id(raw: &RawValue) -> Option<OpId> {
    let [lamport, replica] = serde_json::from_str::<[u64; 2]>(raw.get()).ok()?;
    if lamport > MAX_ID_COMPONENT || replica > MAX_ID_COMPONENT {
        return None;
    }
    Some(OpId { lamport, replica })
}

/// A JSON string borrowed from the frame when it has no escapes (the common case for `type`).
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Cow<'_, str>>(raw.get()).ok()
}

fn message_type<'a>(envelope: &Envelope<'a>) -> Option<Cow<'a, str>> {
    envelope.kind.and_then(json_str)
}

/// One op of the fast path, typed in a single pass. Only a JSON object is accepted (serde would
/// also read a struct from an array); escaped keys or `kind`, duplicates and any type mismatch
/// fail, which sends the message to the precise parser.
#[derive(Default)]
struct FastOp<'a> {
    kind: Option<&'a str>,
    id: Option<[u64; 2]>,
    after: Option<Option<[u64; 2]>>,
    text: Option<Option<String>>,
    len: Option<Option<u64>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for FastOp<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<FastOp<'a>, D::Error> {
        struct FastOpVisitor;
        impl<'de> Visitor<'de> for FastOpVisitor {
            type Value = FastOp<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an op object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut op = FastOp::default();
                let mut seen = 0u8;
                while let Some(key) = map.next_key::<&'de str>()? {
                    let bit = match key {
                        "kind" => 1,
                        "id" => 2,
                        "after" => 4,
                        "text" => 8,
                        "len" => 16,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if seen & bit != 0 {
                        return Err(de::Error::custom("duplicate field"));
                    }
                    seen |= bit;
                    match bit {
                        1 => op.kind = Some(map.next_value()?),
                        2 => op.id = Some(map.next_value()?),
                        4 => op.after = Some(map.next_value()?),
                        8 => op.text = Some(map.next_value()?),
                        _ => op.len = Some(map.next_value()?),
                    }
                }
                Ok(op)
            }
        }
        // FastOp<'de> coerces to FastOp<'a>: the borrow only gets shorter.
        let op: FastOp<'de> = deserializer.deserialize_map(FastOpVisitor)?;
        Ok(op)
    }
}

fn fast_id([lamport, replica]: [u64; 2]) -> Option<OpId> {
    (lamport <= MAX_ID_COMPONENT && replica <= MAX_ID_COMPONENT)
        .then_some(OpId { lamport, replica })
}

impl FastOp<'_> {
    /// The op, when this is exactly the canonical shape the precise parser accepts.
    fn into_op(self) -> Option<Op> {
        let id = fast_id(self.id?)?;
        match self.kind? {
            "ins" => {
                let after = match self.after? {
                    None => None,
                    Some(after) => Some(fast_id(after)?),
                };
                Some(Op::Insert {
                    id,
                    after,
                    text: self.text??,
                })
            }
            "del" => Some(Op::Delete {
                id,
                len: self.len??,
            }),
            _ => None,
        }
    }
}

fn fast_ops(ops: Vec<FastOp<'_>>) -> Option<Vec<Op>> {
    if ops.is_empty() || ops.len() > OPS_PER_MESSAGE_MAX {
        return None;
    }
    ops.into_iter().map(FastOp::into_op).collect()
}

/// The fast path of `op` messages: `None` whenever the precise parser must decide.
fn fast_op_message(text: &str) -> Option<OpMessage> {
    #[derive(Deserialize)]
    struct FastOpMessage<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        client_seq: u64,
        #[serde(borrow)]
        ops: Vec<FastOp<'a>>,
    }
    let msg: FastOpMessage<'_> = serde_json::from_str(text).ok()?;
    if msg.kind != "op" {
        return None;
    }
    Some(OpMessage {
        client_seq: msg.client_seq,
        ops: fast_ops(msg.ops)?,
    })
}

/// The fast path of `op_echo` frames: `None` whenever the precise parser must decide.
fn fast_op_echo(text: &str) -> Option<OpEcho> {
    #[derive(Deserialize)]
    struct FastOpEcho<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        server_seq: u64,
        replica: u64,
        client_seq: u64,
        #[serde(borrow)]
        ops: Vec<FastOp<'a>>,
    }
    let msg: FastOpEcho<'_> = serde_json::from_str(text).ok()?;
    if msg.kind != "op_echo" {
        return None;
    }
    Some(OpEcho {
        server_seq: msg.server_seq,
        replica: msg.replica,
        client_seq: msg.client_seq,
        ops: fast_ops(msg.ops)?,
    })
}

/// Parses one text frame from a client, deciding every refusal code as the contract says.
///
/// # Errors
/// `bad_message` for malformed JSON, a non-object, a missing or ill-typed field (an id component
/// outside `0 ..= 2^53-1` included), an unknown `type` or `kind`, a lone surrogate, an empty
/// `ops` or an invalid `hello` field; `too_large` for more than 10,000 ops or a presence state
/// over 4096 bytes of compact JSON. An `op` error carries the `client_seq` once it parsed.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    if !is_object(text) {
        return Err(BAD_JSON);
    }
    // Most frames are well-formed op messages: one typed pass. Everything else, errors included,
    // takes the precise path below (a proptest checks both agree wherever the fast one answers).
    let parsed = match fast_op_message(text) {
        Some(msg) => Ok(ClientMessage::Op(msg)),
        None => parse_client_message_precise(text),
    };
    // Known string fields were decoded (and refused lone surrogates) above; this catches one
    // in an ignored field too, so the whole frame is refused as the contract says.
    match parsed {
        Ok(msg) if has_lone_surrogate(text) => {
            let client_seq = match &msg {
                ClientMessage::Op(op) => Some(op.client_seq),
                _ => None,
            };
            Err(ProtocolError::bad("lone surrogate in the message").with_client_seq(client_seq))
        }
        parsed => parsed,
    }
}

/// Whether syntactically valid JSON `text` has a `\uD800`..`\uDFFF` escape that is not half
/// of a surrogate pair. Backslashes only occur inside strings in valid JSON, so a byte scan
/// suffices; frames without a backslash cost one `memchr` pass.
fn has_lone_surrogate(text: &str) -> bool {
    let bytes = text.as_bytes();
    let hex4 = |at: usize| -> Option<u16> {
        let digits = bytes.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    // `str::find` of an ASCII char is a memchr. Escaped characters are ASCII in valid JSON, so
    // `i` stays on a char boundary (and a stray one only ends the scan).
    while let Some(offset) = text.get(i..).and_then(|rest| rest.find('\\')) {
        i += offset;
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2; // `\"`, `\\`, `\n`, ...: skip the escaped character.
            continue;
        }
        let Some(unit) = hex4(i + 2) else {
            return false; // Not valid JSON; the parser refused it already.
        };
        i += 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = (bytes.get(i..i + 2) == Some(b"\\u".as_slice()))
                    .then(|| hex4(i + 2))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 6;
            }
            0xDC00..=0xDFFF => return true,
            _ => {}
        }
    }
    false
}

/// The two-step parser that decides every case (see the module docs).
fn parse_client_message_precise(text: &str) -> Result<ClientMessage, ProtocolError> {
    if !is_object(text) {
        return Err(BAD_JSON);
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|_| BAD_JSON)?;
    let kind = message_type(&envelope).ok_or(ProtocolError::bad("missing or non-string type"))?;
    match kind.as_ref() {
        "op" => parse_op_message(&envelope).map(ClientMessage::Op),
        "hello" => parse_hello(&envelope).map(ClientMessage::Hello),
        "auth" => {
            let raw = non_null(envelope.token).ok_or(ProtocolError::bad("auth without token"))?;
            let token = json_string(raw).ok_or(ProtocolError::bad("auth.token is not a string"))?;
            Ok(ClientMessage::Auth(AuthRefresh { token }))
        }
        "presence" => {
            let state = envelope
                .state
                .ok_or(ProtocolError::bad("presence without state"))?;
            let state_json = compact_json(state.get());
            if state_json.len() > PRESENCE_BYTES_MAX {
                return Err(ProtocolError::new(
                    ErrorCode::TooLarge,
                    "presence state over 4096 bytes",
                ));
            }
            // Raw JSON is only checked for syntax. Relayed (and listed in every joiner's
            // hello_ack), a lone surrogate or a number out of range (`1e400`) would break every
            // client whose JSON parser refuses them, serde_json's included.
            if !is_relayable_json(&state_json) {
                return Err(ProtocolError::bad(
                    "presence state has a lone surrogate or a number out of range",
                ));
            }
            Ok(ClientMessage::Presence(PresenceUpdate { state_json }))
        }
        _ => Err(ProtocolError::bad("unknown message type")),
    }
}

fn parse_hello(envelope: &Envelope<'_>) -> Result<Hello, ProtocolError> {
    let doc = match non_null(envelope.doc) {
        None => None,
        Some(raw) => {
            let doc = json_string(raw).ok_or(ProtocolError::bad("hello.doc is not a string"))?;
            if doc.is_empty() || doc.len() > DOC_NAME_BYTES_MAX {
                return Err(ProtocolError::bad("hello.doc must be 1 to 512 bytes"));
            }
            Some(doc)
        }
    };
    let replica =
        match non_null(envelope.replica) {
            None => None,
            Some(raw) => Some(json_id_component(raw).filter(|r| *r >= 1).ok_or(
                ProtocolError::bad("hello.replica must be an integer in 1..=2^53-1"),
            )?),
        };
    let since = match non_null(envelope.since) {
        None => None,
        Some(raw) => Some(json_id_component(raw).ok_or(ProtocolError::bad(
            "hello.since must be an integer in 0..=2^53-1",
        ))?),
    };
    let epoch = match non_null(envelope.epoch) {
        None => None,
        Some(raw) => {
            Some(json_string(raw).ok_or(ProtocolError::bad("hello.epoch is not a string"))?)
        }
    };
    let token = match non_null(envelope.token) {
        None => None,
        Some(raw) => {
            Some(json_string(raw).ok_or(ProtocolError::bad("hello.token is not a string"))?)
        }
    };
    Ok(Hello {
        doc,
        replica,
        since,
        epoch,
        token,
    })
}

fn parse_op_message(envelope: &Envelope<'_>) -> Result<OpMessage, ProtocolError> {
    let client_seq = envelope
        .client_seq
        .and_then(json_int)
        .ok_or(ProtocolError::bad("op.client_seq must be an integer >= 0"))?;
    let with_seq = |err: ProtocolError| err.with_client_seq(Some(client_seq));
    let ops_raw = envelope
        .ops
        .ok_or(with_seq(ProtocolError::bad("op without ops")))?;
    let ops = parse_ops(ops_raw).map_err(with_seq)?;
    Ok(OpMessage { client_seq, ops })
}

/// Parses a JSON array of ops: `bad_message` for any shape problem, `too_large` over 10,000.
fn parse_ops(raw: &RawValue) -> Result<Vec<Op>, ProtocolError> {
    let array: BoundedArray<'_> =
        serde_json::from_str(raw.get()).map_err(|_| ProtocolError::bad("ops is not an array"))?;
    if array.n_items > OPS_PER_MESSAGE_MAX {
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            "more than 10000 ops in one message",
        ));
    }
    if array.items.is_empty() {
        return Err(ProtocolError::bad("ops is empty"));
    }
    let mut ops = Vec::with_capacity(array.items.len());
    for item in array.items {
        ops.push(parse_op(item)?);
    }
    Ok(ops)
}

fn parse_op(raw: &RawValue) -> Result<Op, ProtocolError> {
    if !is_object(raw.get()) {
        return Err(ProtocolError::bad("op is not an object"));
    }
    let op: OpEnvelope<'_> =
        serde_json::from_str(raw.get()).map_err(|_| ProtocolError::bad("op is not an object"))?;
    let kind = op
        .kind
        .and_then(json_str)
        .ok_or(ProtocolError::bad("op.kind missing or not a string"))?;
    let id = op.id.and_then(json_id).ok_or(ProtocolError::bad(
        "op.id must be [lamport, replica] in 0..=2^53-1",
    ))?;
    match kind.as_ref() {
        "ins" => {
            let after_raw = op.after.ok_or(ProtocolError::bad("ins without after"))?;
            let after = if raw_is_null(after_raw) {
                None
            } else {
                Some(json_id(after_raw).ok_or(ProtocolError::bad(
                    "ins.after must be null or [lamport, replica]",
                ))?)
            };
            let text = op.text.and_then(json_string).ok_or(ProtocolError::bad(
                "ins.text must be a string without lone surrogates",
            ))?;
            Ok(Op::Insert { id, after, text })
        }
        "del" => {
            let len = op
                .len
                .and_then(json_len)
                .ok_or(ProtocolError::bad("del.len must be an integer"))?;
            Ok(Op::Delete { id, len })
        }
        _ => Err(ProtocolError::bad("unknown op kind")),
    }
}

/// Whether `json` reads as a value with every string valid Unicode and every number in
/// `f64` range: a full typed pass that allocates nothing (strings are borrowed where possible).
fn is_relayable_json(json: &str) -> bool {
    struct Check;
    impl<'de> Deserialize<'de> for Check {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Check, D::Error> {
            deserializer.deserialize_any(CheckVisitor)
        }
    }
    struct CheckVisitor;
    impl<'de> Visitor<'de> for CheckVisitor {
        type Value = Check;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Check, A::Error> {
            while seq.next_element::<Check>()?.is_some() {}
            Ok(Check)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Check, A::Error> {
            while map.next_key::<Check>()?.is_some() {
                map.next_value::<Check>()?;
            }
            Ok(Check)
        }
    }
    serde_json::from_str::<Check>(json).is_ok()
}

/// Re-encodes valid JSON compactly: whitespace outside strings removed, everything else kept.
fn compact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for ch in json.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if !matches!(ch, ' ' | '\t' | '\n' | '\r') {
            if ch == '"' {
                in_string = true;
            }
            out.push(ch);
        }
    }
    out
}

const BAD_SERVER: ProtocolError = ProtocolError::bad("malformed server message");

fn need<T>(value: Option<T>) -> Result<T, ProtocolError> {
    value.ok_or(BAD_SERVER)
}

/// Parses one text frame from the server (for clients and the load generator).
///
/// # Errors
/// `bad_message` when the frame is not one of the contract's server messages.
pub fn parse_server_message(text: &str) -> Result<ServerMessage, ProtocolError> {
    if !is_object(text) {
        return Err(BAD_SERVER);
    }
    if let Some(echo) = fast_op_echo(text) {
        return Ok(ServerMessage::OpEcho(echo));
    }
    parse_server_message_precise(text)
}

fn parse_server_message_precise(text: &str) -> Result<ServerMessage, ProtocolError> {
    if !is_object(text) {
        return Err(BAD_SERVER);
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|_| BAD_SERVER)?;
    let kind = need(message_type(&envelope))?;
    match kind.as_ref() {
        "op_echo" => parse_op_echo_fields(&envelope).map(ServerMessage::OpEcho),
        "ack" => Ok(ServerMessage::Ack {
            client_seq: need(envelope.client_seq.and_then(json_int))?,
            server_seq: need(envelope.server_seq.and_then(json_int))?,
        }),
        "presence" => Ok(ServerMessage::Presence {
            replica: need(envelope.replica.and_then(json_int))?,
            state_json: compact_json(need(envelope.state)?.get()),
        }),
        "error" => Ok(ServerMessage::Error {
            code: need(envelope.code.and_then(json_string))?,
            message: non_null(envelope.message)
                .and_then(json_string)
                .unwrap_or_default(),
            client_seq: non_null(envelope.client_seq).and_then(json_int),
        }),
        "hello_ack" => parse_hello_ack(&envelope).map(ServerMessage::HelloAck),
        _ => Err(BAD_SERVER),
    }
}

fn parse_op_echo_fields(envelope: &Envelope<'_>) -> Result<OpEcho, ProtocolError> {
    Ok(OpEcho {
        server_seq: need(envelope.server_seq.and_then(json_int))?,
        replica: need(envelope.replica.and_then(json_int))?,
        client_seq: need(envelope.client_seq.and_then(json_int))?,
        ops: parse_ops(need(envelope.ops)?).map_err(|_| BAD_SERVER)?,
    })
}

/// Parses one complete `op_echo` object (a replay entry or a log record).
///
/// # Errors
/// `bad_message` when `text` is not an `op_echo`.
pub fn parse_op_echo(text: &str) -> Result<OpEcho, ProtocolError> {
    match parse_server_message(text)? {
        ServerMessage::OpEcho(echo) => Ok(echo),
        _ => Err(BAD_SERVER),
    }
}

fn parse_hello_ack(envelope: &Envelope<'_>) -> Result<HelloAck, ProtocolError> {
    let strategy = match need(envelope.strategy.and_then(json_str))?.as_ref() {
        "snapshot" => {
            HelloAckStrategy::Snapshot(parse_snapshot_runs(need(envelope.snapshot)?.get())?)
        }
        "replay" => {
            let entries: Vec<&RawValue> =
                serde_json::from_str(need(envelope.ops)?.get()).map_err(|_| BAD_SERVER)?;
            let mut echoes = Vec::with_capacity(entries.len());
            for entry in entries {
                echoes.push(parse_op_echo(entry.get())?);
            }
            HelloAckStrategy::Replay(echoes)
        }
        _ => return Err(BAD_SERVER),
    };
    let mut presence = Vec::new();
    if let Some(raw) = non_null(envelope.presence) {
        let entries: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| BAD_SERVER)?;
        for entry in entries {
            let fields: OpEnvelope<'_> =
                serde_json::from_str(entry.get()).map_err(|_| BAD_SERVER)?;
            presence.push(PresenceEntry {
                replica: need(fields.replica.and_then(json_int))?,
                state_json: compact_json(need(fields.state)?.get()),
            });
        }
    }
    Ok(HelloAck {
        doc: need(envelope.doc.and_then(json_string))?,
        replica: need(envelope.replica.and_then(json_int))?,
        head: need(envelope.head.and_then(json_int))?,
        epoch: need(envelope.epoch.and_then(json_string))?,
        strategy,
        presence,
    })
}

/// Parses the contract's snapshot object `{"runs":[...]}` (from a `hello_ack` or storage).
///
/// # Errors
/// `bad_message` when it is not one, or a run is empty.
pub fn parse_snapshot_runs(json: &str) -> Result<Vec<Run>, ProtocolError> {
    #[derive(Deserialize)]
    struct Snapshot<'a> {
        #[serde(borrow)]
        runs: Vec<&'a RawValue>,
    }
    if !is_object(json) {
        return Err(BAD_SERVER);
    }
    let snapshot: Snapshot<'_> = serde_json::from_str(json).map_err(|_| BAD_SERVER)?;
    let mut runs = Vec::with_capacity(snapshot.runs.len());
    for raw in snapshot.runs {
        let fields: OpEnvelope<'_> = serde_json::from_str(raw.get()).map_err(|_| BAD_SERVER)?;
        let id = need(fields.id.and_then(json_id))?;
        let content = match (non_null(fields.text), non_null(fields.deleted)) {
            (Some(text), None) => RunContent::Text(need(json_string(text))?),
            (None, Some(deleted)) => RunContent::Deleted(need(json_int(deleted))?),
            _ => return Err(BAD_SERVER),
        };
        if matches!(&content, RunContent::Text(text) if text.is_empty())
            || content == RunContent::Deleted(0)
        {
            return Err(BAD_SERVER);
        }
        runs.push(Run { id, content });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` and checks the outcome: `Ok` when `expected` is `None`, else the error code.
    fn check(input: &str, expected: Option<ErrorCode>) {
        let result = parse_client_message(input);
        assert_eq!(
            result.as_ref().err().map(|e| e.code),
            expected,
            "input: {input}, got {result:?}"
        );
    }

    const OK: Option<ErrorCode> = None;
    const BAD: Option<ErrorCode> = Some(ErrorCode::BadMessage);
    const BIG: Option<ErrorCode> = Some(ErrorCode::TooLarge);

    #[test]
    fn envelope_cases() {
        check("", BAD);
        check("nul", BAD);
        check("null", BAD);
        check("[]", BAD);
        check(r#"["op",1,[]]"#, BAD);
        check("\"hello\"", BAD);
        check("42", BAD);
        check("{}", BAD);
        check(r#"{"type":null}"#, BAD);
        check(r#"{"type":5}"#, BAD);
        check(r#"{"type":"nope"}"#, BAD);
        check(r#"{"type":"HELLO"}"#, BAD);
        check(r#"{"type":"hello"} x"#, BAD);
        check(r#"{"type":"hello""#, BAD);
        check(r#"{"type":"hello","type":"hello"}"#, BAD);
        check(r#" {"type":"hello"} "#, OK);
        check(r#"{"type":"h\u0065llo"}"#, OK);
    }

    #[test]
    fn hello_cases() {
        check(r#"{"type":"hello"}"#, OK);
        check(r#"{"type":"hello","doc":"d"}"#, OK);
        check(r#"{"type":"hello","doc":""}"#, BAD);
        check(r#"{"type":"hello","doc":5}"#, BAD);
        check(r#"{"type":"hello","doc":["d"]}"#, BAD);
        check(
            &format!(r#"{{"type":"hello","doc":"{}"}}"#, "x".repeat(512)),
            OK,
        );
        check(
            &format!(r#"{{"type":"hello","doc":"{}"}}"#, "x".repeat(513)),
            BAD,
        );
        check(
            &format!(r#"{{"type":"hello","doc":"{}"}}"#, "é".repeat(257)),
            BAD,
        );
        check(r#"{"type":"hello","doc":"d","replica":1}"#, OK);
        check(
            r#"{"type":"hello","doc":"d","replica":9007199254740991}"#,
            OK,
        );
        check(
            r#"{"type":"hello","doc":"d","replica":9007199254740992}"#,
            BAD,
        );
        check(r#"{"type":"hello","doc":"d","replica":0}"#, BAD);
        check(r#"{"type":"hello","doc":"d","replica":-1}"#, BAD);
        check(r#"{"type":"hello","doc":"d","replica":1.5}"#, BAD);
        check(r#"{"type":"hello","doc":"d","replica":1.0}"#, BAD);
        check(r#"{"type":"hello","doc":"d","replica":1e3}"#, BAD);
        check(r#"{"type":"hello","doc":"d","replica":"1"}"#, BAD);
        check(r#"{"type":"hello","doc":"d","since":0}"#, OK);
        check(r#"{"type":"hello","doc":"d","since":-1}"#, BAD);
        check(r#"{"type":"hello","doc":"d","since":"3"}"#, BAD);
        check(
            r#"{"type":"hello","doc":"d","since":99999999999999999999999}"#,
            BAD,
        );
        check(r#"{"type":"hello","doc":"d","epoch":"e"}"#, OK);
        check(r#"{"type":"hello","doc":"d","epoch":7}"#, BAD);
        check(r#"{"type":"hello","doc":"d","token":"t"}"#, OK);
        check(
            r#"{"type":"hello","doc":"d","ops":"ignored","client_seq":-4,"x":{"y":[1]}}"#,
            OK,
        );
        let parsed = parse_client_message(
            r#"{"type":"hello","doc":"d/é","replica":3,"since":4,"epoch":"e","token":"t","z":1}"#,
        );
        assert_eq!(
            parsed,
            Ok(ClientMessage::Hello(Hello {
                doc: Some("d/é".into()),
                replica: Some(3),
                since: Some(4),
                epoch: Some("e".into()),
                token: Some("t".into()),
            }))
        );
    }

    fn op_with(ops: &str) -> String {
        format!(r#"{{"type":"op","client_seq":7,"ops":[{ops}]}}"#)
    }

    #[test]
    fn op_cases() {
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"a"}"#),
            OK,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[0,0],"after":[0,0],"text":"a"}"#),
            OK,
        );
        check(
            &op_with(
                r#"{"kind":"ins","id":[9007199254740991,9007199254740991],"after":null,"text":"a"}"#,
            ),
            OK,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[9007199254740992,1],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,9007199254740992],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":[1,9007199254740992],"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[-1,2],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1.5,2],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1.0,2],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":["1",2],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2,3],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":{"0":1,"1":2},"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":null,"after":null,"text":"a"}"#),
            BAD,
        );
        check(&op_with(r#"{"kind":"ins","after":null,"text":"a"}"#), BAD);
        check(&op_with(r#"{"kind":"ins","id":[1,2],"text":"a"}"#), BAD);
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":5,"text":"a"}"#),
            BAD,
        );
        check(&op_with(r#"{"kind":"ins","id":[1,2],"after":null}"#), BAD);
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":5}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":null}"#),
            BAD,
        );
        // Empty text parses; the CRDT refuses it with invalid_op.
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":""}"#),
            OK,
        );
        // Lone surrogates are bad_message; a proper pair is fine.
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"\ud800"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"a\udc00b"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"\ud800\u0041"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"\ud83d\ude00"}"#),
            OK,
        );
        check(&op_with(r#"{"kind":"del","id":[1,2],"len":1}"#), OK);
        // len 0 parses; the CRDT refuses it with invalid_op.
        check(&op_with(r#"{"kind":"del","id":[1,2],"len":0}"#), OK);
        // An integer `len < 1` parses; the CRDT refuses it as `invalid_op`.
        check(&op_with(r#"{"kind":"del","id":[1,2],"len":-1}"#), OK);
        check(&op_with(r#"{"kind":"del","id":[1,2],"len":1.5}"#), BAD);
        check(&op_with(r#"{"kind":"del","id":[1,2]}"#), BAD);
        check(&op_with(r#"{"kind":"del","id":[1,2],"len":"1"}"#), BAD);
        // Fields of the other kind are unknown fields: ignored.
        check(
            &op_with(r#"{"kind":"del","id":[1,2],"len":1,"text":5,"after":"x"}"#),
            OK,
        );
        check(
            &op_with(r#"{"kind":"ins","id":[1,2],"after":null,"text":"a","len":"x","extra":[1]}"#),
            OK,
        );
        check(&op_with(r#"{"kind":"move","id":[1,2],"len":1}"#), BAD);
        // Shapes the fast path must leave to the precise parser.
        check(&op_with(r#"["ins",[1,2],null,"a"]"#), BAD);
        check(
            &op_with(r#"{"kind":"ins","kind":"ins","id":[1,2],"after":null,"text":"a"}"#),
            BAD,
        );
        check(
            &op_with(r#"{"\u006bind":"ins","id":[1,2],"after":null,"text":"a"}"#),
            OK,
        );
        check(
            &op_with(r#"{"kind":"\u0069ns","id":[1,2],"after":null,"text":"a"}"#),
            OK,
        );
        check(
            r#"{"type":"op","client_seq":1,"client_seq":1,"ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            BAD,
        );
        check(&op_with(r#"{"id":[1,2],"len":1}"#), BAD);
        check(&op_with(r#"{"kind":5,"id":[1,2],"len":1}"#), BAD);
        check(&op_with(r#"5"#), BAD);
        check(&op_with(r#"[]"#), BAD);
        check(&op_with(r#"null"#), BAD);
        check(&op_with(""), BAD);
        check(r#"{"type":"op","client_seq":7}"#, BAD);
        check(r#"{"type":"op","client_seq":7,"ops":null}"#, BAD);
        check(r#"{"type":"op","client_seq":7,"ops":{}}"#, BAD);
        check(
            r#"{"type":"op","ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            BAD,
        );
        check(
            r#"{"type":"op","client_seq":-1,"ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            BAD,
        );
        check(
            r#"{"type":"op","client_seq":1.5,"ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            BAD,
        );
        check(
            r#"{"type":"op","client_seq":"1","ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            BAD,
        );
        check(
            r#"{"type":"op","client_seq":18446744073709551615,"ops":[{"kind":"del","id":[1,2],"len":1}]}"#,
            OK,
        );
        check(
            r#"{"type":"op","client_seq":0,"ops":[{"kind":"del","id":[1,2],"len":1}],"doc":5,"state":1}"#,
            OK,
        );
    }

    #[test]
    fn del_len_out_of_range_is_an_invalid_op_not_a_bad_message() {
        let del = |len: &str| match parse_client_message(&op_with(&format!(
            r#"{{"kind":"del","id":[1,2],"len":{len}}}"#
        ))) {
            Ok(ClientMessage::Op(msg)) => match msg.ops[..] {
                [Op::Delete { len, .. }] => Ok(len),
                _ => panic!("one delete"),
            },
            Ok(other) => panic!("{other:?}"),
            Err(err) => Err(err.code),
        };
        assert_eq!(del("3"), Ok(3));
        assert_eq!(del("0"), Ok(0));
        assert_eq!(del("-1"), Ok(0));
        assert_eq!(del("-18446744073709551617"), Ok(0));
        assert_eq!(del("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(del("18446744073709551616"), Ok(u64::MAX));
        assert_eq!(del(&"9".repeat(400)), Ok(u64::MAX));
        for bad in ["1.5", "1e3", "-", "\"1\"", "null", "[1]", "-0.0"] {
            assert_eq!(del(bad), Err(ErrorCode::BadMessage), "{bad}");
        }
    }

    #[test]
    fn a_lone_surrogate_anywhere_is_refused() {
        let op = r#"{"kind":"del","id":[1,2],"len":1}"#;
        for (text, client_seq) in [
            (format!(r#"{{"type":"op","client_seq":4,"x":"\ud800","ops":[{op}]}}"#), Some(4)),
            (format!(r#"{{"type":"op","client_seq":4,"ops":[{op}],"\udfff":1}}"#), None),
            (r#"{"type":"op","client_seq":4,"ops":[{"kind":"del","id":[1,2],"len":1,"y":"a\uDBFFb"}]}"#.to_string(), Some(4)),
            (r#"{"type":"hello","x":["\ud83d\u0041"]}"#.to_string(), None),
            (r#"{"type":"presence","state":1,"x":"\ude00\ud83d"}"#.to_string(), None),
        ] {
            let err = parse_client_message(&text).expect_err(&text);
            assert_eq!((err.code, err.client_seq), (ErrorCode::BadMessage, client_seq), "{text}");
        }
        for text in [
            r#"{"type":"hello","x":"\ud83d\ude00 \u0041 \\ud800 \"\\"}"#,
            r#"{"type":"hello","x":"\uD83D\uDE00"}"#,
        ] {
            assert!(parse_client_message(text).is_ok(), "{text}");
        }
    }

    /// cargo-fuzz (parse_client_message): a presence state with `36e641` parsed as raw JSON and
    /// would have been relayed to clients whose parsers refuse it.
    #[test]
    fn fuzz_regression_presence_number_out_of_range() {
        let text = r#"{"type":"presence","state":{"cursor":3,"na":"x","ct_seq":36e641,"L":[1]}}"#;
        assert_eq!(
            parse_client_message(text).map_err(|e| e.code),
            Err(ErrorCode::BadMessage)
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for text in [
            format!(r#"{{"type":"presence","state":{deep}}}"#),
            format!(r#"{{"type":"op","client_seq":1,"x":{deep},"ops":[]}}"#),
            format!(r#"{{"type":"op","client_seq":1,"ops":{deep}}}"#),
            format!(r#"{{"type":"hello","doc":{deep}}}"#),
            deep.clone(),
        ] {
            assert!(parse_client_message(&text).is_err());
            assert!(parse_server_message(&text).is_err());
        }
        // Nesting within serde_json's limit is an ordinary state.
        let fine = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        check(&format!(r#"{{"type":"presence","state":{fine}}}"#), OK);
    }

    #[test]
    fn op_count_limit() {
        let del = r#"{"kind":"del","id":[1,2],"len":1}"#;
        let at_limit = vec![del; OPS_PER_MESSAGE_MAX].join(",");
        check(&op_with(&at_limit), OK);
        let over = vec![del; OPS_PER_MESSAGE_MAX + 1].join(",");
        check(&op_with(&over), BIG);
        // Over the count wins even when later elements are not ops.
        let junk = format!("{at_limit},5");
        check(&op_with(&junk), BIG);
    }

    #[test]
    fn op_errors_carry_client_seq() {
        let err = parse_client_message(r#"{"type":"op","client_seq":9,"ops":[]}"#).unwrap_err();
        assert_eq!((err.code, err.client_seq), (ErrorCode::BadMessage, Some(9)));
        let err = parse_client_message(r#"{"type":"op","client_seq":9,"ops":[{"kind":"x"}]}"#)
            .unwrap_err();
        assert_eq!(err.client_seq, Some(9));
        let err = parse_client_message(r#"{"type":"op","client_seq":"9","ops":[]}"#).unwrap_err();
        assert_eq!(err.client_seq, None);
        let parsed = parse_client_message(&op_with(
            r#"{"kind":"ins","id":[4,2],"after":[3,1],"text":"h\u00e9\n"},{"kind":"del","id":[1,1],"len":2}"#,
        ));
        assert_eq!(
            parsed,
            Ok(ClientMessage::Op(OpMessage {
                client_seq: 7,
                ops: vec![
                    Op::Insert {
                        id: OpId {
                            lamport: 4,
                            replica: 2
                        },
                        after: Some(OpId {
                            lamport: 3,
                            replica: 1
                        }),
                        text: "hé\n".into()
                    },
                    Op::Delete {
                        id: OpId {
                            lamport: 1,
                            replica: 1
                        },
                        len: 2
                    },
                ],
            }))
        );
    }

    #[test]
    fn presence_cases() {
        check(r#"{"type":"presence","state":null}"#, OK);
        check(r#"{"type":"presence","state":{"cursor":3}}"#, OK);
        check(r#"{"type":"presence"}"#, BAD);
        check(r#"{"type":"presence","state":{"a":}}"#, BAD);
        check(r#"{"type":"presence","state":{"name":"\ud800"}}"#, BAD);
        check(r#"{"type":"presence","state":{"\udc00":1}}"#, BAD);
        // Found by fuzzing: numbers serde_json (and so many clients) cannot represent.
        check(r#"{"type":"presence","state":{"n":36e641}}"#, BAD);
        check(r#"{"type":"presence","state":[-1E400]}"#, BAD);
        check(
            r#"{"type":"presence","state":[1e-400,1e308,18446744073709551616,-0]}"#,
            OK,
        );
        check(
            r#"{"type":"presence","state":{"name":"\ud83d\ude00 \u0041"}}"#,
            OK,
        );
        let parsed = parse_client_message(
            "{\"type\":\"presence\",\"state\": { \"name\" : \"a b\\\" c\" , \"n\" : [1, 2] }}",
        );
        assert_eq!(
            parsed,
            Ok(ClientMessage::Presence(PresenceUpdate {
                state_json: r#"{"name":"a b\" c","n":[1,2]}"#.into()
            }))
        );
        let parsed = parse_client_message(r#"{"type":"presence","state":null}"#);
        assert_eq!(
            parsed,
            Ok(ClientMessage::Presence(PresenceUpdate {
                state_json: "null".into()
            }))
        );
        // The limit counts the compact re-encoding, not the bytes sent.
        let fits = format!(
            r#"{{"type":"presence","state":"{}"}}"#,
            "x".repeat(PRESENCE_BYTES_MAX - 2)
        );
        check(&fits, OK);
        let over = format!(
            r#"{{"type":"presence","state":"{}"}}"#,
            "x".repeat(PRESENCE_BYTES_MAX - 1)
        );
        check(&over, BIG);
        let padded = format!(r#"{{"type":"presence","state":[{}1]}}"#, " ".repeat(10_000));
        check(&padded, OK);
    }

    #[test]
    fn server_messages_round_trip() {
        use crate::protocol::codec::*;
        let ops = vec![Op::Insert {
            id: OpId {
                lamport: 1,
                replica: 2,
            },
            after: None,
            text: "x\"".into(),
        }];
        let echo = encode_op_echo(3, 2, 5, &ops);
        let expected = OpEcho {
            server_seq: 3,
            replica: 2,
            client_seq: 5,
            ops: ops.clone(),
        };
        assert_eq!(
            parse_server_message(&echo),
            Ok(ServerMessage::OpEcho(expected.clone()))
        );
        assert_eq!(
            parse_server_message(&encode_ack(5, 3)),
            Ok(ServerMessage::Ack {
                client_seq: 5,
                server_seq: 3
            })
        );
        assert_eq!(
            parse_server_message(&encode_presence(4, r#"{"a":1}"#)),
            Ok(ServerMessage::Presence {
                replica: 4,
                state_json: r#"{"a":1}"#.into()
            })
        );
        let err = ProtocolError::new(ErrorCode::IdConflict, "m").with_client_seq(Some(2));
        assert_eq!(
            parse_server_message(&encode_error(&err)),
            Ok(ServerMessage::Error {
                code: "id_conflict".into(),
                message: "m".into(),
                client_seq: Some(2)
            })
        );
        let ack = format!(
            r#"{{"type":"hello_ack","doc":"d","replica":2,"head":3,"epoch":"e","strategy":"replay","ops":[{echo}],"presence":[{{"replica":1,"state":{{"c":1}}}}]}}"#
        );
        assert_eq!(
            parse_server_message(&ack),
            Ok(ServerMessage::HelloAck(HelloAck {
                doc: "d".into(),
                replica: 2,
                head: 3,
                epoch: "e".into(),
                strategy: HelloAckStrategy::Replay(vec![expected]),
                presence: vec![PresenceEntry {
                    replica: 1,
                    state_json: r#"{"c":1}"#.into()
                }],
            }))
        );
        let runs = vec![
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
        assert_eq!(parse_snapshot_runs(&encode_snapshot_runs(&runs)), Ok(runs));
        assert!(parse_snapshot_runs(r#"{"runs":[{"id":[1,1],"text":""}]}"#).is_err());
        assert!(parse_snapshot_runs(r#"{"runs":[{"id":[1,1],"deleted":0}]}"#).is_err());
    }

    mod soup {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                prop_oneof![
                    Just("op".to_string()),
                    Just("hello".to_string()),
                    Just("presence".to_string()),
                    Just("ins".to_string()),
                    Just("del".to_string()),
                    ".{0,8}"
                ]
                .prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::vec(
                        (
                            prop_oneof![
                                Just("type".to_string()),
                                Just("ops".to_string()),
                                Just("kind".to_string()),
                                Just("id".to_string()),
                                Just("after".to_string()),
                                Just("text".to_string()),
                                Just("len".to_string()),
                                Just("client_seq".to_string()),
                                Just("doc".to_string()),
                                Just("replica".to_string()),
                                Just("state".to_string()),
                                ".{0,4}"
                            ],
                            inner
                        ),
                        0..6
                    )
                    .prop_map(|fields| serde_json::Value::Object(fields.into_iter().collect())),
                ]
            })
        }

        fn pool_value() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::json;
            prop::sample::select(vec![
                json!(null),
                json!(true),
                json!(0),
                json!(1),
                json!(7),
                json!(-1),
                json!(1.5),
                json!(9007199254740991u64),
                json!(9007199254740992u64),
                json!(u64::MAX),
                json!("ins"),
                json!("del"),
                json!("op"),
                json!("op_echo"),
                json!("a"),
                json!(""),
                json!([1, 2]),
                json!([0, 0]),
                json!([9007199254740992u64, 1]),
                json!([1]),
                json!([1, 2, 3]),
                json!({}),
                json!([]),
            ])
        }

        fn op_item() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::json;
            let canonical = prop_oneof![
                (0u64..4, 1u64..3, prop::option::of((0u64..4, 1u64..3)), "[a-z]{0,3}").prop_map(
                    |(l, r, after, text)| {
                        json!({"kind":"ins","id":[l,r],"after":after.map(|(a, b)| json!([a, b])),"text":text})
                    }
                ),
                (0u64..4, 1u64..3, 0u64..3).prop_map(|(l, r, n)| json!({"kind":"del","id":[l,r],"len":n})),
            ];
            let key = prop::sample::select(vec!["kind", "id", "after", "text", "len", "x"]);
            let mangled = (
                canonical.clone(),
                prop::collection::vec((key, pool_value()), 0..3),
            )
                .prop_map(|(mut op, edits)| {
                    for (k, v) in edits {
                        op[k] = v;
                    }
                    op
                });
            prop_oneof![
                4 => canonical,
                4 => mangled,
                1 => pool_value(),
                1 => Just(json!(["ins", [1, 2], null, "a"])),
            ]
        }

        fn op_like_message() -> impl Strategy<Value = String> {
            use serde_json::json;
            let kind = prop::sample::select(vec!["op", "op_echo", "hello", "ack"]);
            let key = prop::sample::select(vec![
                "type",
                "client_seq",
                "server_seq",
                "replica",
                "ops",
                "doc",
                "x",
            ]);
            (
                kind,
                prop::collection::vec(op_item(), 0..4),
                prop::collection::vec((key, pool_value()), 0..2),
            )
                .prop_map(|(kind, ops, edits)| {
                    let mut msg =
                        json!({"type":kind,"client_seq":3,"server_seq":4,"replica":2,"ops":ops});
                    for (k, v) in edits {
                        msg[k] = v;
                    }
                    msg.to_string()
                })
        }

        proptest! {
            #[test]
            fn never_panics_on_strings(text in ".{0,200}") {
                let _ = parse_client_message(&text);
                let _ = parse_server_message(&text);
            }

            #[test]
            fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
                let text = String::from_utf8_lossy(&bytes);
                let _ = parse_client_message(&text);
                let _ = parse_server_message(&text);
            }

            #[test]
            fn fast_path_agrees_with_the_precise_parser(text in op_like_message()) {
                prop_assert_eq!(parse_client_message(&text), parse_client_message_precise(&text));
                prop_assert_eq!(parse_server_message(&text), parse_server_message_precise(&text));
            }

            #[test]
            fn fast_path_agrees_on_json(value in json_value()) {
                let text = value.to_string();
                prop_assert_eq!(parse_client_message(&text), parse_client_message_precise(&text));
                prop_assert_eq!(parse_server_message(&text), parse_server_message_precise(&text));
            }

            #[test]
            fn never_panics_on_json(value in json_value()) {
                let text = value.to_string();
                let _ = parse_client_message(&text);
                let _ = parse_server_message(&text);
                // A parsed op message re-encodes canonically and parses back to the same value.
                if let Ok(ClientMessage::Op(msg)) = parse_client_message(&text) {
                    let again = crate::protocol::codec::encode_op(msg.client_seq, &msg.ops);
                    prop_assert_eq!(parse_client_message(&again), Ok(ClientMessage::Op(msg)));
                }
            }
        }
    }
}
