//! The HTTP document API (`/api/docs...`, `docs/api.md`): what a request asks for, the JSON
//! shapes of its answers, and the handle through which the shard (or its storage worker)
//! answers the acceptor.
//!
//! Pure: parses targets and bodies, encodes answers; owns no socket and touches no document.
//! The acceptor parses the request ([`parse_target`], [`parse_edits`]), checks its token and
//! hands an [`ApiRequest`] to the shard that owns the document (`ShardMsg::Api`); the shard
//! answers through the request's [`ApiReply`], which wakes the acceptor, which writes the
//! bytes. A reply dropped unanswered (a failed sync, a shard going away) answers 503 itself.

use std::fmt::Write as _;
use std::sync::Arc;

use crossbeam_channel::Sender;
use serde::Deserialize;

use crate::acceptor::http::{percent_decode, response};
use crate::auth::Grant;
use crate::protocol::codec::write_json_str;

/// Most documents one listing returns (`limit`'s ceiling; its default is
/// [`LIST_LIMIT_DEFAULT`]).
pub const LIST_LIMIT_MAX: usize = 1000;
/// Documents a listing returns without `limit`.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// Most history entries one `/history` answer holds.
pub const HISTORY_LIMIT_MAX: usize = 1000;
/// History entries without `limit`.
pub const HISTORY_LIMIT_DEFAULT: usize = 100;
/// Most edits in one `POST /edits`.
pub const EDITS_MAX: usize = 1000;

/// One `/api/...` request, parsed from its target (the body comes later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiCall {
    /// `GET /api/docs/{doc}`, optionally `?at=SEQ`.
    Read {
        /// The version asked for; `None` is the head.
        at: Option<u64>,
    },
    /// `GET /api/docs/{doc}/snapshot`.
    Snapshot,
    /// `POST /api/docs/{doc}/edits` (the body is [`EditRequest`]).
    Edits(EditRequest),
    /// `DELETE /api/docs/{doc}`.
    Delete,
    /// `GET /api/docs/{doc}/history?from=SEQ&limit=N`.
    History {
        /// First `server_seq` (inclusive); `None` is the oldest retained.
        from: Option<u64>,
        /// Most entries.
        limit: usize,
    },
    /// `GET /api/docs/{doc}/blame`.
    Blame,
    /// `GET /api/docs/{doc}/events?since=SEQ`: Server-Sent Events.
    Events {
        /// Replay the echoes after this `server_seq` first; `None`: live events only.
        since: Option<u64>,
    },
    /// `GET /api/docs?prefix=P&after=CURSOR&limit=N`.
    List(ListQuery),
}

impl ApiCall {
    /// What a token needs to make this call.
    pub fn needs(&self) -> Need {
        match self {
            ApiCall::Edits(_) => Need::Write,
            ApiCall::Delete => Need::Admin,
            _ => Need::Read,
        }
    }
}

/// The role a call needs (listing has its own rule, see [`list_allowed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `read` or more.
    Read,
    /// `write` or `admin`.
    Write,
    /// `admin`.
    Admin,
}

/// A listing's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    /// Only names starting with this.
    pub prefix: String,
    /// Only names after this one (the previous page's `next`).
    pub after: Option<String>,
    /// Most documents.
    pub limit: usize,
    /// Shards of the server: each shard lists the documents it owns.
    pub n_shards: usize,
}

/// The body of `POST /edits`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// Applied in order, each against the result of the previous ones.
    pub edits: Vec<Edit>,
    /// The version the first edit's positions refer to; `None` is the head.
    #[serde(default)]
    pub base: Option<u64>,
}

/// One edit: delete `delete` code points at `pos`, then insert `insert` there.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// Position in code points (signed so that a negative one gets a precise 400).
    pub pos: i64,
    /// Code points to delete.
    #[serde(default)]
    pub delete: u64,
    /// Text to insert.
    #[serde(default)]
    pub insert: String,
}

/// The parsed head of an `/api/...` request, before its body and its token are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiHead {
    /// The decoded document name (`None` for the listing): the routing stage of a cluster asks
    /// its router with it.
    pub doc: Option<String>,
    /// What is asked, without the body of `POST /edits`.
    pub target: ApiTarget,
    /// The `Authorization: Bearer` token.
    pub bearer: Option<String>,
    /// `Content-Length` (0 without a body).
    pub body_bytes: usize,
}

/// An API target before its body: everything but `POST /edits` is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTarget {
    /// A call needing no body.
    Call(ApiCall),
    /// `POST /edits`: the body follows.
    Edits,
}

/// A JSON error answer `{"error":"..."}`.
pub fn json_error(status: u16, message: &str) -> Vec<u8> {
    let mut body = String::with_capacity(message.len() + 16);
    body.push_str("{\"error\":");
    write_json_str(&mut body, message);
    body.push('}');
    json_answer(status, &body)
}

/// A JSON answer with `status`.
pub fn json_answer(status: u16, body: &str) -> Vec<u8> {
    let extra: &[&str] = if status == 401 {
        &["WWW-Authenticate: Bearer"]
    } else {
        &[]
    };
    response(status, "application/json", body.as_bytes(), extra)
}

/// Parses `/api/docs...` with `method` and `query` into the document and the target.
///
/// # Errors
/// The complete error answer (400, 404, 405).
pub fn parse_target(
    method: &str,
    path: &str,
    query: &str,
) -> Result<(Option<String>, ApiTarget), Vec<u8>> {
    let Some(rest) = path.strip_prefix("/api/docs") else {
        return Err(json_error(404, "not found"));
    };
    let params = Params::parse(query)?;
    if rest.is_empty() || rest == "/" {
        expect_method(method, "GET")?;
        let limit = params
            .number("limit")?
            .map_or(Ok(LIST_LIMIT_DEFAULT), |n| {
                usize::try_from(n)
                    .ok()
                    .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
                    .ok_or_else(|| json_error(400, "limit must be 1..=1000"))
            })?;
        let list = ListQuery {
            prefix: params.text("prefix").unwrap_or_default(),
            after: params.text("after").filter(|a| !a.is_empty()),
            limit,
            n_shards: 0,
        };
        return Ok((None, ApiTarget::Call(ApiCall::List(list))));
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(json_error(404, "not found"));
    };
    let (raw_doc, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let doc = match crate::acceptor::http::decode_doc_name(raw_doc) {
        Ok(Some(doc)) => doc,
        Ok(None) => return Err(json_error(400, "empty document name")),
        Err(why) => return Err(json_error(400, why)),
    };
    let target = match tail {
        "" => match method {
            "GET" => ApiTarget::Call(ApiCall::Read {
                at: params.number("at")?,
            }),
            "DELETE" => ApiTarget::Call(ApiCall::Delete),
            _ => return Err(not_allowed("GET, DELETE")),
        },
        "snapshot" => {
            expect_method(method, "GET")?;
            ApiTarget::Call(ApiCall::Snapshot)
        }
        "edits" => {
            expect_method(method, "POST")?;
            ApiTarget::Edits
        }
        "history" => {
            expect_method(method, "GET")?;
            let limit = params
                .number("limit")?
                .map_or(Ok(HISTORY_LIMIT_DEFAULT), |n| {
                    usize::try_from(n)
                        .ok()
                        .filter(|n| (1..=HISTORY_LIMIT_MAX).contains(n))
                        .ok_or_else(|| json_error(400, "limit must be 1..=1000"))
                })?;
            ApiTarget::Call(ApiCall::History {
                from: params.number("from")?,
                limit,
            })
        }
        "blame" => {
            expect_method(method, "GET")?;
            ApiTarget::Call(ApiCall::Blame)
        }
        "events" => {
            expect_method(method, "GET")?;
            ApiTarget::Call(ApiCall::Events {
                since: params.number("since")?,
            })
        }
        _ => return Err(json_error(404, "not found")),
    };
    Ok((Some(doc), target))
}

fn expect_method(method: &str, allowed: &str) -> Result<(), Vec<u8>> {
    if method == allowed {
        Ok(())
    } else {
        Err(not_allowed(allowed))
    }
}

fn not_allowed(allowed: &str) -> Vec<u8> {
    let allow = format!("Allow: {allowed}");
    response(
        405,
        "application/json",
        b"{\"error\":\"method not allowed\"}",
        &[allow.as_str()],
    )
}

/// A query string's parameters, each given at most once.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Result<Params, Vec<u8>> {
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| json_error(400, "invalid percent-encoding"))?;
            if params.iter().any(|(k, _)| k == key) {
                return Err(json_error(400, &format!("{key} given twice")));
            }
            params.push((key.to_owned(), value));
        }
        Ok(Params(params))
    }

    fn text(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn number(&self, key: &str) -> Result<Option<u64>, Vec<u8>> {
        match self.text(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| json_error(400, &format!("{key} must be a non-negative integer"))),
        }
    }
}

/// Parses the body of `POST /edits`.
///
/// # Errors
/// The 400 answer: not JSON of that shape, or more than [`EDITS_MAX`] edits.
pub fn parse_edits(body: &[u8]) -> Result<EditRequest, Vec<u8>> {
    let request: EditRequest = serde_json::from_slice(body).map_err(|e| {
        json_error(
            400,
            &format!("expected {{\"edits\":[{{\"pos\",\"delete\",\"insert\"}}],\"base\"?}}: {e}"),
        )
    })?;
    if request.edits.len() > EDITS_MAX {
        return Err(json_error(400, "at most 1000 edits per request"));
    }
    Ok(request)
}

/// Whether `grant` may list names starting with `prefix`: within the token's own prefix (or
/// `*`) with any role; beyond it only as an admin of `*`.
pub fn list_allowed(grant: &Grant, prefix: &str) -> bool {
    use crate::auth::DocScope;
    match &grant.scope {
        DocScope::All => true,
        DocScope::Prefix(own) => prefix.starts_with(own.as_str()),
        DocScope::Exact(_) => false,
    }
}

/// Whether `grant`'s role allows `need`.
pub fn role_allows(grant: &Grant, need: Need) -> bool {
    use crate::auth::Role;
    match need {
        Need::Read => true,
        Need::Write => grant.role.can_write(),
        Need::Admin => grant.role == Role::Admin,
    }
}

/// Which pending connection of the acceptor asked (slab key and accept serial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiId {
    /// The pending connection's slab key.
    pub key: usize,
    /// Its accept serial (keys are reused, serials are not).
    pub serial: u64,
}

/// One shard's part of a listing: the first documents it owns after the cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPart {
    /// In name order, at most the listing's `limit`.
    pub docs: Vec<DocSummary>,
    /// Whether the shard owns more after the last one.
    pub more: bool,
}

/// One document in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocSummary {
    /// Its name.
    pub doc: String,
    /// Its durable head.
    pub head: u64,
    /// Its length in code points.
    pub length: usize,
    /// Unix milliseconds of its last accepted op message, when recorded.
    pub updated_at: Option<u64>,
}

/// What comes back to the acceptor.
#[derive(Debug)]
pub enum ApiAnswer {
    /// The complete HTTP response.
    Bytes(Vec<u8>),
    /// One shard's part of a listing (`Err`: its storage failed, with the reason).
    List(Result<ListPart, String>),
}

/// An answer for the acceptor's pending connection `id`.
#[derive(Debug)]
pub struct ApiDone {
    /// Who asked.
    pub id: ApiId,
    /// The answer.
    pub answer: ApiAnswer,
}

/// Where an API request's answer goes: the acceptor's channel and waker. Answer it once with
/// [`ApiReply::answer`] or [`ApiReply::list`]; dropped unanswered, it answers 503.
#[derive(Debug)]
pub struct ApiReply {
    id: ApiId,
    to: Sender<ApiDone>,
    waker: Arc<mio::Waker>,
    answered: bool,
}

impl ApiReply {
    /// A reply to the acceptor's connection `id` through `to`, waking `waker`.
    pub fn new(id: ApiId, to: Sender<ApiDone>, waker: Arc<mio::Waker>) -> ApiReply {
        ApiReply {
            id,
            to,
            waker,
            answered: false,
        }
    }

    fn send(&mut self, answer: ApiAnswer) {
        self.answered = true;
        // The acceptor may have given up (deadline, peer gone): nothing to do then.
        if self
            .to
            .send(ApiDone {
                id: self.id,
                answer,
            })
            .is_ok()
        {
            let _ = self.waker.wake();
        }
    }

    /// Answers with the complete HTTP response `bytes`.
    pub fn answer(mut self, bytes: Vec<u8>) {
        self.send(ApiAnswer::Bytes(bytes));
    }

    /// Answers with one shard's part of a listing.
    pub fn list(mut self, part: Result<ListPart, String>) {
        self.send(ApiAnswer::List(part));
    }
}

impl Drop for ApiReply {
    fn drop(&mut self) {
        if !self.answered {
            self.send(ApiAnswer::Bytes(json_error(
                503,
                "the request could not be completed (storage failed or the server is stopping); retry",
            )));
        }
    }
}

/// What a room's turn leaves for the document API, carried out once the turn's records are
/// durable (in order with the room's other effects).
#[derive(Debug)]
pub enum ApiEffect {
    /// Send this answer.
    Answer(ApiReply, Vec<u8>),
    /// Delete the document (its clients closed 1008 `deleted`, its data removed durably),
    /// then answer.
    Delete(ApiReply),
    /// An op message (`server_seq`, its echo) for the document's event streams.
    Echo(u64, tungstenite::Utf8Bytes),
    /// Start an event stream: the socket, what it gets first (the response head and the
    /// replayed events), and the token it was admitted with (access control on).
    Subscribe(CountedStream, Vec<u8>, Option<Box<Grant>>),
}

/// An event stream's socket on its way to (or kept by) the shard: it still counts against its
/// client's address in the acceptor's door, until it is dropped, however that happens.
#[derive(Debug)]
pub struct CountedStream {
    /// The socket (deregistered from the acceptor's `Poll`).
    pub stream: mio::net::TcpStream,
    /// Where the end is reported, when the door counts connections.
    release: Option<(crate::acceptor::door::DoorRelease, std::net::SocketAddr)>,
}

impl CountedStream {
    /// `stream` from `peer`, released through `release` when dropped (`None`: not counted).
    pub fn new(
        stream: mio::net::TcpStream,
        release: Option<(crate::acceptor::door::DoorRelease, std::net::SocketAddr)>,
    ) -> CountedStream {
        CountedStream { stream, release }
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        if let Some((door, peer)) = self.release.take() {
            door.release(peer);
        }
    }
}

/// A request on its way to the shard that owns its document.
#[derive(Debug)]
pub struct ApiRequest {
    /// The document (`None`: a listing, which every shard answers for its own documents).
    pub doc: Option<String>,
    /// What is asked.
    pub call: ApiCall,
    /// The verified token, with access control on.
    pub grant: Option<Grant>,
    /// Where the answer goes.
    pub reply: ApiReply,
    /// The client's socket, for an event stream (`ApiCall::Events`), which the shard keeps.
    pub stream: Option<CountedStream>,
}

/// Merges the shards' listing parts into the answer `{"docs":[...],"next":...}`.
pub fn merge_list(parts: Vec<ListPart>, limit: usize) -> Vec<u8> {
    let mut more = parts.iter().any(|p| p.more);
    let mut docs: Vec<DocSummary> = parts.into_iter().flat_map(|p| p.docs).collect();
    docs.sort_by(|a, b| a.doc.cmp(&b.doc));
    if docs.len() > limit {
        docs.truncate(limit);
        more = true;
    }
    let mut body = String::from("{\"docs\":[");
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"doc\":");
        write_json_str(&mut body, &d.doc);
        let _ = write!(body, ",\"head\":{},\"length\":{}", d.head, d.length);
        match d.updated_at {
            Some(ms) => {
                let _ = write!(body, ",\"updated_at\":{ms}}}");
            }
            None => body.push_str(",\"updated_at\":null}"),
        }
    }
    body.push_str("],\"next\":");
    match docs.last().filter(|_| more) {
        Some(last) => write_json_str(&mut body, &last.doc),
        None => body.push_str("null"),
    }
    body.push('}');
    json_answer(200, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(answer: &[u8]) -> u16 {
        let text = String::from_utf8_lossy(answer);
        text[9..12].parse().unwrap_or(0)
    }

    #[test]
    fn targets() {
        let (doc, target) = parse_target("GET", "/api/docs/a%2Fb", "at=3").unwrap();
        assert_eq!(doc.as_deref(), Some("a/b"));
        assert_eq!(target, ApiTarget::Call(ApiCall::Read { at: Some(3) }));
        let (doc, target) = parse_target("POST", "/api/docs/x/edits", "").unwrap();
        assert_eq!((doc.as_deref(), target), (Some("x"), ApiTarget::Edits));
        let (doc, target) = parse_target("GET", "/api/docs", "prefix=t%2F&limit=2").unwrap();
        assert_eq!(doc, None);
        let ApiTarget::Call(ApiCall::List(list)) = target else {
            panic!("not a listing")
        };
        assert_eq!((list.prefix.as_str(), list.limit), ("t/", 2));
        assert_eq!(
            status(&parse_target("PUT", "/api/docs/x", "").unwrap_err()),
            405
        );
        assert_eq!(
            status(&parse_target("GET", "/api/docs/x/nope", "").unwrap_err()),
            404
        );
        assert_eq!(
            status(&parse_target("GET", "/api/docs/%zz", "").unwrap_err()),
            400
        );
        assert_eq!(
            status(&parse_target("GET", "/api/docs/x", "at=-1").unwrap_err()),
            400
        );
        assert_eq!(
            status(&parse_target("GET", "/api/docs/x", "at=1&at=2").unwrap_err()),
            400
        );
        assert_eq!(
            status(&parse_target("GET", "/api/docs", "limit=0").unwrap_err()),
            400
        );
    }

    #[test]
    fn edits_bodies() {
        let request = parse_edits(br#"{"edits":[{"pos":0,"insert":"hi"}],"base":2}"#).unwrap();
        assert_eq!(request.base, Some(2));
        assert_eq!(request.edits[0].delete, 0);
        assert_eq!(
            status(&parse_edits(b"{\"edits\":[{\"p\":1}]}").unwrap_err()),
            400
        );
        assert_eq!(status(&parse_edits(b"[]").unwrap_err()), 400);
    }

    #[test]
    fn merged_listing_pages() {
        let summary = |doc: &str| DocSummary {
            doc: doc.to_owned(),
            head: 1,
            length: 2,
            updated_at: None,
        };
        let parts = vec![
            ListPart {
                docs: vec![summary("a"), summary("c")],
                more: false,
            },
            ListPart {
                docs: vec![summary("b")],
                more: false,
            },
        ];
        let answer = String::from_utf8(merge_list(parts, 2)).unwrap();
        assert!(answer.ends_with(r#"{"docs":[{"doc":"a","head":1,"length":2,"updated_at":null},{"doc":"b","head":1,"length":2,"updated_at":null}],"next":"b"}"#), "{answer}");
    }
}
