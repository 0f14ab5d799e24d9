//! The acceptor's routing stage on a cluster node: what it needs to decide, once a
//! connection's document is known, whether this node serves it, relays it to its owner, or
//! waits for the router (see `cluster::route`).
//!
//! Pure helpers: reading the raw first frames of a plain `/ws` connection (so that the bytes of
//! its `hello` can be relayed untouched), the pieces of a request head the relay needs, and the
//! answers of a connection that cannot be served. Owns no socket; the stages that drive the
//! sockets live in `listener.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::debug;

use crate::cluster::relay::RelaySender;
use crate::cluster::{Route, Router};

use super::http::{self, REQUEST_HEADERS_MAX};

/// What makes an acceptor a cluster node's entry: the router and the relay.
#[derive(Clone)]
pub struct ClusterRouting {
    /// Where each document is served.
    pub router: Arc<dyn Router>,
    /// How long a connection waits on [`Route::Pending`] before `unavailable` and close 1013
    /// (the lease TTL plus 1 s: enough for a failover).
    pub route_wait: Duration,
    /// The relay thread's inbox.
    pub relay: RelaySender,
    /// This node's own listening address (set by the acceptor when it binds): a router that
    /// names it is taken to mean `Local`, never a relay to itself.
    pub self_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for ClusterRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRouting")
            .field("route_wait", &self.route_wait)
            .finish_non_exhaustive()
    }
}

/// What the acceptor does with a connection whose document is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it here, as a single node would.
    Local,
    /// Relay it to the owner.
    Relay(SocketAddr),
    /// Ask again when the router wakes the acceptor, or on the next tick.
    Wait,
    /// Refuse it: `unavailable` (after the upgrade) and close 1013, or HTTP 503.
    Unavailable,
}

impl ClusterRouting {
    /// Asks the router about `doc`. `from_peer`: the connection was relayed here by another
    /// node (a genuine `X-Collab-Forwarded-For`), so it is never relayed again (two nodes with
    /// different views must not bounce it between them); `expired`: its wait is over.
    pub fn decide(&self, doc: &str, from_peer: bool, expired: bool) -> Decision {
        match self.router.route(doc) {
            Route::Local => Decision::Local,
            Route::Relay(owner) if Some(owner) == self.self_addr => {
                debug!("acceptor: the router names this node for {doc:?}; serving it here");
                Decision::Local
            }
            Route::Relay(owner) if from_peer => {
                debug!("acceptor: {doc:?} moved to {owner} while relayed here; refusing");
                Decision::Unavailable
            }
            Route::Relay(owner) => Decision::Relay(owner),
            Route::Pending if expired => {
                debug!("acceptor: no owner for {doc:?} before the deadline");
                Decision::Unavailable
            }
            Route::Pending => Decision::Wait,
            Route::Unavailable(reason) => {
                debug!("acceptor: {doc:?} is unavailable: {reason}");
                Decision::Unavailable
            }
        }
    }
}

/// One frame at the start of a client's byte stream, read without consuming anything.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// More bytes are needed.
    Incomplete,
    /// A complete frame of `len` bytes (header and payload).
    Complete {
        /// Header plus payload.
        len: usize,
        /// The FIN bit.
        fin: bool,
        /// The opcode.
        opcode: u8,
        /// The payload, unmasked.
        payload: Vec<u8>,
    },
    /// A frame this reader does not handle (reserved bits, an unmasked client frame, an
    /// oversized or malformed control frame, a payload over the limit): tungstenite reads it
    /// and closes with the contract's code.
    Other,
}

/// Reads the frame at the start of `buf`; `payload_bytes_max` is the message limit.
pub fn client_frame(buf: &[u8], payload_bytes_max: usize) -> ClientFrame {
    let [b0, b1, ..] = *buf else {
        return ClientFrame::Incomplete;
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    if b0 & 0x70 != 0 || !masked || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        return ClientFrame::Other;
    }
    let (len_bytes, len7) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let header_bytes = 2 + len_bytes + 4;
    if buf.len() < header_bytes {
        return ClientFrame::Incomplete;
    }
    let payload_len = match len7 {
        Some(n) => n,
        None if len_bytes == 2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        None => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(bytes)
        }
    };
    let is_control = opcode >= 8;
    if is_control && (payload_len > 125 || !fin) {
        return ClientFrame::Other;
    }
    if payload_len > payload_bytes_max as u64 {
        return ClientFrame::Other;
    }
    let payload_len = payload_len as usize;
    let len = header_bytes + payload_len;
    if buf.len() < len {
        return ClientFrame::Incomplete;
    }
    let mask = [
        buf[header_bytes - 4],
        buf[header_bytes - 3],
        buf[header_bytes - 2],
        buf[header_bytes - 1],
    ];
    let payload = buf[header_bytes..len]
        .iter()
        .enumerate()
        .map(|(idx, b)| b ^ mask[idx % 4])
        .collect();
    ClientFrame::Complete {
        len,
        fin,
        opcode,
        payload,
    }
}

/// The `Sec-WebSocket-Key` of a complete upgrade request head.
pub fn upgrade_key(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(head).ok()?;
    let value = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))?
        .value;
    std::str::from_utf8(value).ok().map(|v| v.trim().to_owned())
}

/// The document an HTTP API request names: the decoded `{doc}` of `/api/docs/{doc}` or
/// `/api/docs/{doc}/...` (one percent-encoded path segment), for requests routed to the owner.
pub fn api_doc(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(head).ok()?;
    let target = request.path?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let rest = path.strip_prefix("/api/docs/")?;
    let segment = rest.split('/').next().unwrap_or(rest);
    http::decode_doc_name(segment).ok().flatten()
}

/// HTTP 503 for an API request whose document has no reachable owner.
pub fn unavailable_http() -> Vec<u8> {
    http::response(
        503,
        "application/json",
        br#"{"error":"unavailable","message":"the document's owner is unavailable; try again"}"#,
        &["Retry-After: 1"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![b0];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[test]
    fn client_frames_are_read_whole_and_unmasked() {
        let frame = masked(0x81, br#"{"type":"hello","doc":"d"}"#);
        for cut in 0..frame.len() {
            assert_eq!(
                client_frame(&frame[..cut], 1 << 16),
                ClientFrame::Incomplete
            );
        }
        let mut stream = frame.clone();
        stream.extend_from_slice(b"more");
        assert_eq!(
            client_frame(&stream, 1 << 16),
            ClientFrame::Complete {
                len: frame.len(),
                fin: true,
                opcode: 1,
                payload: br#"{"type":"hello","doc":"d"}"#.to_vec()
            }
        );
        let long = vec![b'x'; 300];
        match client_frame(&masked(0x81, &long), 1 << 16) {
            ClientFrame::Complete { payload, .. } => assert_eq!(payload, long),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_tungstenite_must_judge_are_left_to_it() {
        // Unmasked, a reserved bit, a reserved opcode, a long ping, a fragmented close, too big.
        let cases = [
            vec![0x81, 0x01, b'a'],
            masked(0xC1, b"a"),
            masked(0x83, b"a"),
            masked(0x89, &[0u8; 126]),
            masked(0x08, b""),
            masked(0x81, &[b'a'; 200]),
        ];
        for case in cases {
            assert_eq!(client_frame(&case, 100), ClientFrame::Other, "{case:?}");
        }
    }

    #[test]
    fn api_paths_name_their_document() {
        let head = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        assert_eq!(api_doc(&head("/api/docs/a%2Fb")), Some("a/b".to_owned()));
        assert_eq!(
            api_doc(&head("/api/docs/d/history?x=1")),
            Some("d".to_owned())
        );
        assert_eq!(api_doc(&head("/api/docs/")), None);
        assert_eq!(api_doc(&head("/api/other")), None);
        assert_eq!(api_doc(&head("/ws/d")), None);
    }
}
