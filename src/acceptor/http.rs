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

/// Largest body of an admin request (`POST /admin/revoke`); larger ones get 413.
pub const ADMIN_BODY_BYTES_MAX: usize = 4096;

/// The tokens an upgrade request carries before any `hello` (access control, `src/auth`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoorTokens {
    /// The `token` query parameter, percent-decoded.
    pub query: Option<String>,
    /// The `Authorization: Bearer` header.
    pub bearer: Option<String>,
}

/// Which admin endpoint a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminPath {
    /// `GET /metrics` behind an admin token.
    Metrics,
    /// `POST /admin/revoke`.
    Revoke,
    /// `GET /cluster` or `GET /cluster/owner?doc=D` behind an admin token (cluster mode).
    Cluster,
}

/// A request for the admin surface, to be authenticated by the acceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRequest {
    /// The endpoint.
    pub path: AdminPath,
    /// The `Authorization: Bearer` token.
    pub bearer: Option<String>,
    /// The body's length (`Content-Length`), at most [`ADMIN_BODY_BYTES_MAX`].
    pub body_bytes: usize,
    /// The request target (path and query), for the endpoints that read it (`/cluster/*`).
    pub target: String,
}

/// What this listener serves and guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpGate {
    /// Access control is on: `/metrics` and `/admin/*` need an admin token.
    pub guarded: bool,
    /// `--metrics-public`: `/metrics` needs no token even when guarded.
    pub metrics_public: bool,
    /// This listener serves `/metrics` and `/admin/*`.
    pub admin_here: bool,
    /// This listener serves clients (`/ws`, the pages).
    pub clients_here: bool,
}

impl Default for HttpGate {
    /// One open listener serving everything (no access control).
    fn default() -> HttpGate {
        HttpGate {
            guarded: false,
            metrics_public: false,
            admin_here: true,
            clients_here: true,
        }
    }
}

/// What a request asks for, decided from its head alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket upgrade; `doc` is the decoded name from `/ws/<doc>`, `None` for plain `/ws`.
    Upgrade {
        /// The document named by the path, if any.
        doc: Option<String>,
        /// Tokens from the query and the `Authorization` header.
        tokens: DoorTokens,
    },
    /// A plain HTTP answer: the complete response bytes.
    Answer(Vec<u8>),
    /// An admin request the acceptor must authenticate (and, for a revocation, read the body
    /// of) before answering.
    Admin(AdminRequest),
    /// A document API request (`/api/docs...`, `crate::api`): its token is checked and its
    /// body read by the acceptor, then it goes to the document's shard.
    Api(crate::api::ApiHead),
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
    parse_request_gated(buf, metrics, health, HttpGate::default())
}

/// [`parse_request_with_health`] on a listener that serves and guards what `gate` says.
pub fn parse_request_gated(
    buf: &[u8],
    metrics: &MetricsRegistry,
    health: ShardsHealth,
    gate: HttpGate,
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
    let route = route(&request, metrics, health, gate);
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
    gate: HttpGate,
) -> Route {
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Route::Answer(text_response(400, "malformed request"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let is_admin = path == "/metrics" || path.starts_with("/admin/") || is_cluster_path(path);
    if is_admin {
        return admin_route(request, method, path, metrics, gate);
    }
    if !gate.clients_here && path != "/health" {
        return Route::Answer(text_response(404, "not found"));
    }
    if path == "/api/docs" || path.starts_with("/api/") {
        return api_route(request, method, path, query);
    }
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
        let tokens = match door_tokens(request, query) {
            Ok(tokens) => tokens,
            Err(why) => return Route::Answer(text_response(400, why)),
        };
        return Route::Upgrade { doc, tokens };
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
        _ => match static_pages::lookup(path) {
            Some(page) => Route::Answer(response(200, page.content_type, page.body, &[])),
            None => Route::Answer(text_response(404, "not found")),
        },
    }
}

/// The Prometheus answer of `/metrics`.
pub fn metrics_answer(metrics: &MetricsRegistry) -> Vec<u8> {
    let body = metrics.render_prometheus();
    response(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        body.as_bytes(),
        &[],
    )
}

fn header<'h>(request: &'h httparse::Request<'_, '_>, name: &str) -> Option<&'h [u8]> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The token of an `Authorization: Bearer` header; `Err` for another scheme or bad bytes.
fn bearer(request: &httparse::Request<'_, '_>) -> Result<Option<String>, &'static str> {
    let Some(value) = header(request, "authorization") else {
        return Ok(None);
    };
    let value = std::str::from_utf8(value).map_err(|_| "Authorization is not UTF-8")?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err("Authorization must be \"Bearer TOKEN\"");
    }
    Ok(Some(token.trim().to_owned()))
}

/// The `token` query parameter and the bearer token of an upgrade request.
fn door_tokens(
    request: &httparse::Request<'_, '_>,
    query: &str,
) -> Result<DoorTokens, &'static str> {
    let mut tokens = DoorTokens {
        query: None,
        bearer: bearer(request)?,
    };
    for pair in query.split('&') {
        if let Some(raw) = pair.strip_prefix("token=") {
            if tokens.query.is_some() {
                return Err("token given twice in the query");
            }
            let token = percent_decode(raw).ok_or("invalid percent-encoding in token")?;
            tokens.query = Some(token);
        }
    }
    Ok(tokens)
}

/// Percent-decodes a query value (`+` is a space, as in forms); `None` when invalid.
pub(crate) fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let hi = bytes.get(i + 1).and_then(|&b| hex(b))?;
                let lo = bytes.get(i + 2).and_then(|&b| hex(b))?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `/metrics` and `/admin/*`: served here or not, public or behind an admin token.
fn admin_route(
    request: &httparse::Request<'_, '_>,
    method: &str,
    path: &str,
    metrics: &MetricsRegistry,
    gate: HttpGate,
) -> Route {
    if !gate.admin_here {
        return Route::Answer(text_response(404, "not found"));
    }
    let (admin_path, allowed) = match path {
        "/metrics" => (AdminPath::Metrics, "GET"),
        _ if is_cluster_path(path) && metrics.cluster().is_some() => (AdminPath::Cluster, "GET"),
        "/admin/revoke" if gate.guarded => (AdminPath::Revoke, "POST"),
        _ => return Route::Answer(text_response(404, "not found")),
    };
    if method != allowed {
        let allow = format!("Allow: {allowed}");
        return Route::Answer(response(
            405,
            "text/plain; charset=utf-8",
            b"method not allowed\n",
            &[allow.as_str()],
        ));
    }
    if admin_path == AdminPath::Metrics && (!gate.guarded || gate.metrics_public) {
        return Route::Answer(metrics_answer(metrics));
    }
    if admin_path == AdminPath::Cluster && !gate.guarded {
        return Route::Answer(cluster_answer(metrics, request.path.unwrap_or(path)));
    }
    let bearer = match bearer(request) {
        Ok(bearer) => bearer,
        Err(why) => return Route::Answer(text_response(400, why)),
    };
    let body_bytes = match header(request, "content-length") {
        None if admin_path == AdminPath::Revoke => {
            return Route::Answer(text_response(411, "Content-Length required"))
        }
        None => 0,
        Some(value) => match std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            Some(n) if n <= ADMIN_BODY_BYTES_MAX => n,
            Some(_) => return Route::Answer(text_response(413, "request body too large")),
            None => return Route::Answer(text_response(400, "bad Content-Length")),
        },
    };
    Route::Admin(AdminRequest {
        path: admin_path,
        bearer,
        body_bytes,
        target: request.path.unwrap_or(path).to_owned(),
    })
}

/// Whether `path` is one of the cluster's status endpoints.
fn is_cluster_path(path: &str) -> bool {
    path == "/cluster" || path == "/cluster/owner"
}

/// `GET /cluster` and `GET /cluster/owner?doc=D` (target = path and query), from what the
/// node's directory thread published (`crate::cluster::ClusterRouter`); 404 when the server
/// is not a cluster node, 400 for `/cluster/owner` without a valid `doc`.
pub fn cluster_answer(metrics: &MetricsRegistry, target: &str) -> Vec<u8> {
    let Some(cluster) = metrics.cluster() else {
        return text_response(404, "not found");
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let body = if path == "/cluster" {
        cluster.nodes_json()
    } else {
        let doc = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("doc="))
            .and_then(percent_decode)
            .filter(|doc| !doc.is_empty() && doc.len() <= 512);
        match doc {
            Some(doc) => cluster.owner_json(&doc),
            None => return text_response(400, "/cluster/owner needs ?doc=NAME (1 to 512 bytes)"),
        }
    };
    response(200, "application/json", body.as_bytes(), &[])
}

/// `/api/docs...`: the target parsed, the bearer token and the body length taken.
fn api_route(request: &httparse::Request<'_, '_>, method: &str, path: &str, query: &str) -> Route {
    use crate::api::{json_error, parse_target, ApiHead};
    let (doc, target) = match parse_target(method, path, query) {
        Ok(parsed) => parsed,
        Err(answer) => return Route::Answer(answer),
    };
    let bearer = match bearer(request) {
        Ok(bearer) => bearer,
        Err(why) => return Route::Answer(json_error(400, why)),
    };
    if header(request, "transfer-encoding").is_some() {
        return Route::Answer(json_error(411, "send the body with Content-Length"));
    }
    let body_bytes = match header(request, "content-length") {
        None if method == "POST" => {
            return Route::Answer(json_error(411, "Content-Length required"))
        }
        None => 0,
        Some(value) => match std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            Some(n) => n,
            None => return Route::Answer(json_error(400, "bad Content-Length")),
        },
    };
    Route::Api(ApiHead {
        doc,
        target,
        bearer,
        body_bytes,
    })
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
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        429 => "Too Many Requests",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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
                route: Route::Admin(_) | Route::Api(_),
                ..
            } => panic!("admin or API route: {request:?}"),
            Parsed::Complete {
                route: Route::Upgrade { doc, .. },
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

    fn gated(request: &str, gate: HttpGate) -> Route {
        let metrics = MetricsRegistry::new(1);
        match parse_request_gated(request.as_bytes(), &metrics, ShardsHealth::default(), gate) {
            Parsed::Complete { route, .. } => route,
            Parsed::Partial => panic!("partial: {request:?}"),
        }
    }

    fn status_of(route: &Route) -> Option<u16> {
        match route {
            Route::Answer(bytes) => String::from_utf8_lossy(bytes)
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok()),
            _ => None,
        }
    }

    #[test]
    fn door_tokens_come_from_the_query_and_the_bearer_header() {
        let route = gated(
            &format!("GET /ws/d?x=1&token=a.b%2Ec HTTP/1.1\r\nAuthorization: Bearer  t.u.v \r\n{UPGRADE}"),
            HttpGate::default(),
        );
        assert_eq!(
            route,
            Route::Upgrade {
                doc: Some("d".to_owned()),
                tokens: DoorTokens {
                    query: Some("a.b.c".to_owned()),
                    bearer: Some("t.u.v".to_owned()),
                },
            }
        );
        for bad in [
            "GET /ws/d?token=a&token=b HTTP/1.1\r\n",
            "GET /ws/d?token=%zz HTTP/1.1\r\n",
            "GET /ws/d HTTP/1.1\r\nAuthorization: Basic dXNlcg==\r\n",
        ] {
            let route = gated(&format!("{bad}{UPGRADE}"), HttpGate::default());
            assert_eq!(status_of(&route), Some(400), "{bad}");
        }
    }

    #[test]
    fn the_admin_surface_is_gated() {
        let guarded = HttpGate {
            guarded: true,
            ..HttpGate::default()
        };
        // Open server: /metrics is public, /admin/* does not exist.
        assert_eq!(
            status_of(&gated("GET /metrics HTTP/1.1\r\n\r\n", HttpGate::default())),
            Some(200)
        );
        assert_eq!(
            status_of(&gated(
                "POST /admin/revoke HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
                HttpGate::default()
            )),
            Some(404)
        );
        // Guarded: the acceptor authenticates.
        assert_eq!(
            gated(
                "GET /metrics HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n",
                guarded
            ),
            Route::Admin(AdminRequest {
                path: AdminPath::Metrics,
                bearer: Some("x".to_owned()),
                body_bytes: 0,
                target: "/metrics".to_owned(),
            })
        );
        assert_eq!(
            gated(
                "POST /admin/revoke HTTP/1.1\r\nContent-Length: 12\r\n\r\n",
                guarded
            ),
            Route::Admin(AdminRequest {
                path: AdminPath::Revoke,
                bearer: None,
                body_bytes: 12,
                target: "/admin/revoke".to_owned(),
            })
        );
        let public = HttpGate {
            metrics_public: true,
            ..guarded
        };
        assert_eq!(
            status_of(&gated("GET /metrics HTTP/1.1\r\n\r\n", public)),
            Some(200)
        );
        for (request, status) in [
            ("GET /admin/revoke HTTP/1.1\r\n\r\n", 405),
            ("POST /metrics HTTP/1.1\r\n\r\n", 405),
            ("POST /admin/revoke HTTP/1.1\r\n\r\n", 411),
            (
                "POST /admin/revoke HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",
                413,
            ),
            ("POST /admin/nope HTTP/1.1\r\n\r\n", 404),
        ] {
            assert_eq!(
                status_of(&gated(request, guarded)),
                Some(status),
                "{request}"
            );
        }
        // --admin-listen: the client port has no admin surface, the admin port no clients.
        let client_port = HttpGate {
            admin_here: false,
            ..guarded
        };
        let admin_port = HttpGate {
            clients_here: false,
            ..guarded
        };
        assert_eq!(
            status_of(&gated("GET /metrics HTTP/1.1\r\n\r\n", client_port)),
            Some(404)
        );
        assert_eq!(
            status_of(&gated(
                &format!("GET /ws/d HTTP/1.1\r\n{UPGRADE}"),
                admin_port
            )),
            Some(404)
        );
        assert_eq!(
            status_of(&gated("GET /health HTTP/1.1\r\n\r\n", admin_port)),
            Some(200)
        );
    }
}
