//! The acceptor's stages on a cluster node (see `acceptor::routing` for the decisions): the
//! forwarded-for check of a relayed request, the handover of a connection to the relay, the
//! refusals of a connection no node can serve, and plain `/ws`'s raw reading up to the `hello`,
//! which keeps every byte the client sent for the owner (or for a local tungstenite WebSocket).
//!
//! Never blocks: every read and write is non-blocking and each stage returns a [`Next`].

use super::*;
use crate::acceptor::routing::ClientFrame;

/// A plain `/ws` connection on a cluster node, before its `hello` is routed.
pub(super) struct PlainHello {
    stream: TcpStream,
    /// The client's request head as it came (relayed to the owner, who answers it again).
    head: Vec<u8>,
    /// Bytes owed to the client: the `101`, pongs, refusals.
    out: Vec<u8>,
    out_written: usize,
    /// Raw bytes read after the head, from the first frame not handled yet; once the `hello` is
    /// read, from the `hello`'s frame on.
    buf: Vec<u8>,
    n_refused: u32,
    tokens: DoorTokens,
    /// The `hello`'s document, once read (the connection then waits for its route).
    doc: Option<String>,
    /// Relayed here by a peer (never relayed again).
    from_peer: bool,
}

/// The client a peer vouches for in a complete request head (`cluster::forwarded`).
pub(super) fn head_vouch(head: &[u8], secret: &ClusterSecret) -> Option<SocketAddr> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {
            forwarded::vouched_client(request.headers, secret, now_unix())
        }
        _ => None,
    }
}

/// Whether a complete request head carries `X-Collab-Forwarded-For` at all, genuine or not:
/// such a request came through a relay (or pretends to), so it is never relayed again. A client
/// that sends the header itself only gets `unavailable` from nodes that do not own its
/// document; its address is still not trusted without a valid mac.
pub(super) fn head_relayed(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => forwarded::claims_forwarded(request.headers),
        _ => false,
    }
}

/// The `X-Collab-Forwarded-For` value this node sends for `peer`: signed with the cluster
/// secret, or the bare address without one (which owners do not trust, but which still marks
/// the request as relayed, so that two nodes never bounce it between them).
fn forwarded_value(peer: SocketAddr, options: &AcceptorOptions) -> String {
    match &options.cluster_secret {
        Some(secret) => secret.stamp(peer, now_unix()),
        None => peer.to_string(),
    }
}

/// [`head_vouch`] on the head waiting in a socket (peeked, not consumed).
pub(super) fn peeked_vouch(stream: &TcpStream, options: &AcceptorOptions) -> Option<SocketAddr> {
    let secret = options.cluster_secret.as_ref()?;
    let mut buf = [0u8; REQUEST_HEAD_BYTES_MAX];
    let n = stream.peek(&mut buf).ok()?;
    head_vouch(&buf[..n], secret)
}

/// Consumes the request head and hands the connection to the relay: the owner gets the head
/// (with this node's forwarded-for header) and then every byte the client sends.
pub(super) fn relay_request(
    mut stream: TcpStream,
    head: &[u8],
    doc: &str,
    owner: SocketAddr,
    kind: RelayKind,
    peer: SocketAddr,
    options: &AcceptorOptions,
) -> Next {
    if !consume_head(&mut stream, head.len()) {
        return Next::Drop;
    }
    let stamp = forwarded_value(peer, options);
    let close = kind == RelayKind::Http;
    let Some(to_upstream) = forwarded::rewrite_head(head, Some(&stamp), close) else {
        return Next::Drop;
    };
    Next::Relay(Box::new(RelayJob {
        client: stream,
        peer,
        upstream: owner,
        to_upstream,
        frames: Vec::new(),
        kind,
        release: None,
        doc: Some(doc.to_owned()),
    }))
}

/// The `unavailable` refusal of a cluster node: the error, then close 1013 (try again later).
pub(super) fn refuse_unavailable(ws: WebSocket<TcpStream>) -> Next {
    let err = ProtocolError::new(
        ErrorCode::Unavailable,
        "the document's owner is unavailable; try again",
    );
    refuse_with(ws, &err, CloseCode::Again, relay::RELAY_CLOSE_REASON)
}

/// Answers an upgrade whose head is consumed with the acceptor's own `101`, then refuses it
/// `unavailable` with 1013.
pub(super) fn upgrade_and_refuse(
    mut stream: TcpStream,
    key: &str,
    options: &AcceptorOptions,
) -> Next {
    // A fresh connection's send buffer takes the short answer in one write.
    match stream.write(&relay::switching_protocols(key)) {
        Ok(n) if n == relay::switching_protocols(key).len() => {}
        _ => return Next::Drop,
    }
    let ws = WebSocket::from_raw_socket(stream, Role::Server, Some(options.ws_config));
    refuse_unavailable(ws)
}

/// Plain `/ws` on a cluster node: consume the head, answer the handshake (the same `101` the
/// owner will answer, which the relay drops), then read the raw frames up to the `hello`.
pub(super) fn plain_ws_start(
    mut stream: TcpStream,
    head: &[u8],
    key: String,
    tokens: DoorTokens,
    from_peer: bool,
    peer: SocketAddr,
    ctx: &Ctx<'_>,
) -> Next {
    if !consume_head(&mut stream, head.len()) {
        return Next::Drop;
    }
    debug!("acceptor: {peer} upgrades on plain /ws (cluster)");
    let plain = PlainHello {
        stream,
        head: head.to_vec(),
        out: relay::switching_protocols(&key),
        out_written: 0,
        buf: Vec::new(),
        n_refused: 0,
        tokens,
        doc: None,
        from_peer,
    };
    plain_hello(Box::new(plain), peer, ctx)
}

/// Reads raw frames up to the `hello` (answering pings and refusing other messages as the
/// shard would), then routes it.
pub(super) fn plain_hello(mut plain: Box<PlainHello>, peer: SocketAddr, ctx: &Ctx<'_>) -> Next {
    let options = ctx.options;
    let payload_max = options.ws_config.max_message_size.unwrap_or(usize::MAX);
    for _ in 0..FRAMES_PER_DRIVE_MAX {
        while plain.out_written < plain.out.len() {
            match plain.stream.write(&plain.out[plain.out_written..]) {
                Ok(0) => return Next::Drop,
                Ok(n) => plain.out_written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A connection waiting for its route keeps waiting while it flushes.
                    return match plain.doc {
                        Some(_) => Next::Route(Stage::PlainHello(plain)),
                        None => Next::Stay(Stage::PlainHello(plain)),
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Drop,
            }
        }
        plain.out.clear();
        plain.out_written = 0;
        if let Some(doc) = plain.doc.clone() {
            return route_plain(plain, &doc, peer, ctx);
        }
        let (len, refusal) = match routing::client_frame(&plain.buf, payload_max) {
            ClientFrame::Incomplete => {
                let mut chunk = [0u8; 4096];
                match plain.stream.read(&mut chunk) {
                    Ok(0) => return Next::Drop,
                    Ok(n) => plain.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Next::Stay(Stage::PlainHello(plain))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Drop,
                }
                continue;
            }
            ClientFrame::Other => return plain_fallback(plain, peer, ctx),
            ClientFrame::Complete {
                len,
                fin,
                opcode,
                payload,
            } => match (opcode, fin) {
                (0x9, _) => {
                    plain.out = relay::server_frame(0xA, &payload);
                    plain.buf.drain(..len);
                    continue;
                }
                (0xA, _) => {
                    plain.buf.drain(..len);
                    continue;
                }
                (0x1, true) => match std::str::from_utf8(&payload) {
                    Ok(text) => match hello_or_refusal(text) {
                        Ok(hello) => {
                            // The hello's frame stays in `buf`: it is the first thing relayed.
                            plain.doc = hello.doc;
                            continue;
                        }
                        Err(refusal) => (len, refusal),
                    },
                    Err(_) => return plain_fallback(plain, peer, ctx),
                },
                (0x2, true) => (len, ProtocolError::bad("binary frames are not allowed")),
                // A close, a fragmented message: tungstenite's to read.
                _ => return plain_fallback(plain, peer, ctx),
            },
        };
        plain.buf.drain(..len);
        plain.n_refused += 1;
        if plain.n_refused >= REFUSALS_BEFORE_CLOSE {
            let PlainHello { stream, buf, .. } = *plain;
            let ws =
                WebSocket::from_partially_read(stream, buf, Role::Server, Some(options.ws_config));
            return refuse_start(ws, &refusal, "too many refused messages");
        }
        plain.out = relay::server_frame(0x1, protocol::encode_error(&refusal).as_bytes());
    }
    Next::Again(Stage::PlainHello(plain))
}

/// A plain `/ws` connection the raw reader leaves to tungstenite, with every byte it read.
// Boxed as the stage holds it.
#[allow(clippy::boxed_local)]
fn plain_fallback(plain: Box<PlainHello>, peer: SocketAddr, ctx: &Ctx<'_>) -> Next {
    let PlainHello {
        stream,
        buf,
        n_refused,
        tokens,
        ..
    } = *plain;
    let ws = WebSocket::from_partially_read(stream, buf, Role::Server, Some(ctx.options.ws_config));
    await_hello(ws, n_refused, tokens, true, peer, ctx)
}

/// Routes a plain `/ws` connection whose `hello` (at the start of `buf`) names `doc`.
fn route_plain(plain: Box<PlainHello>, doc: &str, peer: SocketAddr, ctx: &Ctx<'_>) -> Next {
    let options = ctx.options;
    let Some(cluster) = &options.cluster else {
        return plain_fallback(plain, peer, ctx);
    };
    match cluster.decide(doc, plain.from_peer, ctx.route_expired) {
        Decision::Local => {
            // tungstenite reads the hello again from the same bytes; nothing is lost.
            let PlainHello {
                stream,
                buf,
                n_refused,
                tokens,
                ..
            } = *plain;
            let ws =
                WebSocket::from_partially_read(stream, buf, Role::Server, Some(options.ws_config));
            await_hello(ws, n_refused, tokens, false, peer, ctx)
        }
        Decision::Relay(owner) => {
            let stamp = forwarded_value(peer, options);
            let PlainHello {
                stream, head, buf, ..
            } = *plain;
            let Some(to_upstream) = forwarded::rewrite_head(&head, Some(&stamp), false) else {
                return Next::Drop;
            };
            Next::Relay(Box::new(RelayJob {
                client: stream,
                peer,
                upstream: owner,
                to_upstream,
                frames: buf,
                kind: RelayKind::WsUpgraded,
                release: None,
                doc: Some(doc.to_owned()),
            }))
        }
        Decision::Wait => Next::Route(Stage::PlainHello(plain)),
        Decision::Unavailable => {
            let PlainHello { stream, buf, .. } = *plain;
            let ws =
                WebSocket::from_partially_read(stream, buf, Role::Server, Some(options.ws_config));
            refuse_unavailable(ws)
        }
    }
}
