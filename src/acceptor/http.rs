//! Plain HTTP/1.1 for the acceptor: parsing a request head (httparse, bounded), routing it,
//! and the bytes of every non-WebSocket answer (`/health`, `/metrics`, static pages, errors).
//!
//! Owns no socket and never blocks: the acceptor peeks the request bytes and hands them here.

use crate::config::DOC_NAME_BYTES_MAX;
use crate::metrics::MetricsRegistry;

use super::static_pages;

/// Largest request head (request line plus headers) the acceptor reads; longer ones get 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most headers in one request; more get 431.
pub const REQUEST_HEADERS_MAX: usize = 32;

// A request line naming the longest document, fully percent-encoded, must fit.
const _: () = assert!(REQUEST_HEAD_BYTES_MAX > 3 * DOC_NAME_BYTES_MAX + 1024);

/// What a request asks for, decided from its head alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket upgrade; `doc` is the decoded name from `/ws/<doc>`, `None` for plain `/ws`.
    Upgrade {
        /// The document named by the path, if any.
        doc: Option<String>,
    },
    /// A plain HTTP answer: the complete response bytes.
    Answer(Vec<u8>),
}

/// Result of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet; wait for more bytes.
    Partial,
    /// The head is complete and `head_bytes` long.
    Complete {
        /// Length of the request head in bytes (what to consume for a plain answer).
        head_bytes: usize,
        /// What to do.
        route: Route,
    },
}

/// Parses and routes the request head at the start of `buf`.
///
/// A head that cannot be complete within [`REQUEST_HEAD_BYTES_MAX`] or is malformed gets
/// an error answer (`head_bytes` is then everything seen; the connection closes after it).
pub fn parse_request(buf: &[u8], metrics: &MetricsRegistry) -> Parsed {
    parse_request_with_health(buf, metrics, ShardsHealth::default())
}

/// What `/health` reports beyond the metrics: shards that are not fully serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardsHealth {
    /// Shards whose handler panicked.
    pub dead: usize,
    /// Shards whose storage did not answer its last attempt.
    pub storage_unavailable: usize,
}

/// [`parse_request`] on a server where some shards died (their handler panicked) or cannot
/// reach their storage: `/health` then answers 503 with `"status":"degraded"` and the counts.
pub fn parse_request_with_health(
    buf: &[u8],
    metrics: &MetricsRegistry,
    health: ShardsHealth,
) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_bytes = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= REQUEST_HEAD_BYTES_MAX => {
            return error_answer(buf.len(), 431, "request head too large");
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return error_answer(buf.len(), 431, "too many headers")
        }
        Err(_) => return error_answer(buf.len(), 400, "malformed request"),
    };
    let route = route(&request, metrics, health);
    Parsed::Complete { head_bytes, route }
}

fn error_answer(head_bytes: usize, status: u16, text: &str) -> Parsed {
    Parsed::Complete {
        head_bytes,
        route: Route::Answer(text_response(status, text)),
    }
}

fn route(
    request: &httparse::Request<'_, '_>,
    metrics: &MetricsRegistry,
    health: ShardsHealth,
) -> Route {
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Route::Answer(text_response(400, "malformed request"));
    };
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    let is_ws = path == "/ws" || path.starts_with("/ws/");
    if method != "GET" {
        let known = is_ws
            || path == "/health"
            || path == "/metrics"
            || static_pages::lookup(path).is_some();
        return Route::Answer(if known {
            response(
                405,
                "text/plain; charset=utf-8",
                b"method not allowed\n",
                &["Allow: GET"],
            )
        } else {
            text_response(404, "not found")
        });
    }
    if is_ws {
        let name = path.strip_prefix("/ws/").unwrap_or("");
        let doc = match decode_doc_name(name) {
            Ok(doc) => doc,
            Err(why) => return Route::Answer(text_response(400, why)),
        };
        if !is_upgrade(request) {
            return Route::Answer(text_response(400, "expected a WebSocket upgrade"));
        }
        return Route::Upgrade { doc };
    }
    match path {
        "/health" => {
            let totals = metrics.totals();
            let mut extra = String::new();
            if health.dead > 0 {
                extra.push_str(&format!(",\"dead_shards\":{}", health.dead));
            }
            if health.storage_unavailable > 0 {
                extra.push_str(&format!(
                    ",\"storage_unavailable_shards\":{}",
                    health.storage_unavailable
                ));
            }
            let (status, state) = if extra.is_empty() {
                (200, "ok")
            } else {
                (503, "degraded")
            };
            let dead = extra;
            let body = format!(
                "{{\"status\":\"{state}\",\"shards\":{}{dead},\"connections\":{},\"documents\":{}}}",
                metrics.n_shards(),
                totals.conns,
                totals.docs_loaded
            );
            Route::Answer(response(status, "application/json", body.as_bytes(), &[]))
        }
        "/metrics" => {
            let body = metrics.render_prometheus();
            Route::Answer(response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
                &[],
            ))
        }
        _ => match static_pages::lookup(path) {
            Some(page) => Route::Answer(response(200, page.content_type, page.body, &[])),
            None => Route::Answer(text_response(404, "not found")),
        },
    }
}

/// Whether the head asks for a WebSocket (version 13) upgrade with a key; tungstenite checks
/// the details again, this only decides between an upgrade and a 400.
fn is_upgrade(request: &httparse::Request<'_, '_>) -> bool {
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |value: Option<&str>, token: &str| {
        value.is_some_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    };
    has_token(header("upgrade"), "websocket")
        && has_token(header("connection"), "upgrade")
        && header("sec-websocket-key").is_some()
        && header("sec-websocket-version").map(str::trim) == Some("13")
}

/// Decodes the `<doc>` of `/ws/<doc>`: percent-decoding, UTF-8, at most 512 bytes.
/// An empty name means plain `/ws` (`Ok(None)`).
///
/// # Errors
/// A static reason when the encoding is invalid or the name too long (the caller answers 400).
pub fn decode_doc_name(raw: &str) -> Result<Option<String>, &'static str> {
    if raw.is_empty() {
        return Ok(None);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) else {
                return Err("invalid percent-encoding in document name");
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
        if out.len() > DOC_NAME_BYTES_MAX {
            return Err("document name longer than 512 bytes");
        }
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|_| "document name is not UTF-8")
}

/// A short `text/plain` response.
pub fn text_response(status: u16, text: &str) -> Vec<u8> {
    let mut body = String::with_capacity(text.len() + 1);
    body.push_str(text);
    body.push('\n');
    response(status, "text/plain; charset=utf-8", body.as_bytes(), &[])
}

/// A complete `Connection: close` response.
pub fn response(status: u16, content_type: &str, body: &[u8], extra_headers: &[&str]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    for header in extra_headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(request: &str, expected_status: Option<u16>, expected_doc: Option<Option<&str>>) {
        let metrics = MetricsRegistry::new(3);
        match parse_request(request.as_bytes(), &metrics) {
            Parsed::Partial => panic!("partial: {request:?}"),
            Parsed::Complete {
                route: Route::Answer(bytes),
                ..
            } => {
                let text = String::from_utf8_lossy(&bytes);
                let status =
                    expected_status.unwrap_or_else(|| panic!("expected an upgrade, got {text}"));
                assert!(
                    text.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{request:?} -> {text}"
                );
            }
            Parsed::Complete {
                route: Route::Upgrade { doc },
                ..
            } => {
                assert_eq!(expected_status, None, "{request:?} upgraded");
                assert_eq!(
                    doc.as_deref(),
                    expected_doc.expect("doc expectation"),
                    "{request:?}"
                );
            }
        }
    }

    const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn routes() {
        check("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", Some(200), None);
        check("GET /metrics HTTP/1.1\r\n\r\n", Some(200), None);
        check("GET /nope HTTP/1.1\r\n\r\n", Some(404), None);
        check("POST /health HTTP/1.1\r\n\r\n", Some(405), None);
        check("GET /ws HTTP/1.1\r\n\r\n", Some(400), None);
        check("GARBAGE\r\n\r\n", Some(400), None);
        check(&format!("GET /ws HTTP/1.1\r\n{UPGRADE}"), None, Some(None));
        check(&format!("GET /ws/ HTTP/1.1\r\n{UPGRADE}"), None, Some(None));
        check(
            &format!("GET /ws/a%2Fb/c?x=1 HTTP/1.1\r\n{UPGRADE}"),
            None,
            Some(Some("a/b/c")),
        );
        check(
            &format!("GET /ws/%C3%BC HTTP/1.1\r\n{UPGRADE}"),
            None,
            Some(Some("ü")),
        );
        check(
            &format!("GET /ws/%ZZ HTTP/1.1\r\n{UPGRADE}"),
            Some(400),
            None,
        );
        check(
            &format!("GET /ws/%C3 HTTP/1.1\r\n{UPGRADE}"),
            Some(400),
            None,
        );
        check(
            &format!("GET /ws/{} HTTP/1.1\r\n{UPGRADE}", "a".repeat(513)),
            Some(400),
            None,
        );
        check(
            &format!("GET /ws/{} HTTP/1.1\r\n{UPGRADE}", "a".repeat(512)),
            None,
            Some(Some(&"a".repeat(512))),
        );
    }

    #[test]
    fn longest_doc_name_fully_encoded_fits() {
        let name = "%61".repeat(DOC_NAME_BYTES_MAX);
        check(
            &format!("GET /ws/{name} HTTP/1.1\r\n{UPGRADE}"),
            None,
            Some(Some(&"a".repeat(DOC_NAME_BYTES_MAX))),
        );
        let name = "%61".repeat(DOC_NAME_BYTES_MAX + 1);
        check(
            &format!("GET /ws/{name} HTTP/1.1\r\n{UPGRADE}"),
            Some(400),
            None,
        );
        check(
            &format!("GET /ws/a+b%20c HTTP/1.1\r\n{UPGRADE}"),
            None,
            Some(Some("a+b c")),
        );
    }

    #[test]
    fn health_reports_shards() {
        let metrics = MetricsRegistry::new(3);
        let Parsed::Complete {
            route: Route::Answer(bytes),
            ..
        } = parse_request(b"GET /health HTTP/1.1\r\n\r\n", &metrics)
        else {
            panic!("no answer")
        };
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.ends_with("{\"status\":\"ok\",\"shards\":3,\"connections\":0,\"documents\":0}"),
            "{text}"
        );
    }

    #[test]
    fn health_is_503_with_a_dead_shard() {
        let metrics = MetricsRegistry::new(3);
        let Parsed::Complete {
            route: Route::Answer(bytes),
            ..
        } = parse_request_with_health(
            b"GET /health HTTP/1.1\r\n\r\n",
            &metrics,
            ShardsHealth {
                dead: 1,
                storage_unavailable: 0,
            },
        )
        else {
            panic!("no answer")
        };
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(
            text.ends_with("{\"status\":\"degraded\",\"shards\":3,\"dead_shards\":1,\"connections\":0,\"documents\":0}"),
            "{text}"
        );
    }

    #[test]
    fn partial_and_oversized_heads() {
        let metrics = MetricsRegistry::new(1);
        assert_eq!(
            parse_request(b"GET /health HTTP/1.1\r\nHost:", &metrics),
            Parsed::Partial
        );
        let long = format!(
            "GET /health HTTP/1.1\r\nX: {}",
            "a".repeat(REQUEST_HEAD_BYTES_MAX)
        );
        assert!(matches!(
            parse_request(long.as_bytes(), &metrics),
            Parsed::Complete {
                route: Route::Answer(_),
                ..
            }
        ));
    }
}
