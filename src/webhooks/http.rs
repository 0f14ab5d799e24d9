//! The webhook URL and the small HTTP/1.1 client that POSTs one delivery.
//!
//! One request per connection (`Connection: close`), every step under one deadline
//! (`--webhook-timeout`): name resolution aside, connect, the TLS handshake, write and reading
//! the status line cannot take longer. Only the status matters: 2xx is delivered, anything
//! else (or no answer) is a failure to retry. The response body is never read past the status
//! line. `https://` goes over rustls (`crate::tls`), the receiver's certificate verified
//! against `--webhook-ca-file` (chain and host name).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// Longest response head read (status line and headers); a bigger one is a failure.
pub const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;

/// A parsed `http[s]://host[:port][/path][?query]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The URL as given (for logs and the persisted state's name).
    pub text: String,
    /// `https://`: TLS, verified against `--webhook-ca-file`.
    pub tls: bool,
    /// The host as written (a name, an IPv4 address or `[v6]`), for the `Host` header.
    pub host: String,
    /// The port (80, or 443 for `https://`, by default).
    pub port: u16,
    /// Path and query, at least `/`.
    pub target: String,
}

impl WebhookUrl {
    /// Parses and checks a `--webhook-url`.
    ///
    /// # Errors
    /// A message saying what is wrong: another scheme, no host, user info, a bad port, spaces
    /// or control characters.
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        let lower = text.to_ascii_lowercase();
        let (tls, scheme_len) = if lower.starts_with("https://") {
            (true, "https://".len())
        } else if lower.starts_with("http://") {
            (false, "http://".len())
        } else {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        };
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{text:?}: spaces and control characters are not allowed"
            ));
        }
        let rest = &text[scheme_len..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, mut target) = rest.split_at(end);
        if let Some(hash) = target.find('#') {
            target = &target[..hash];
        }
        if authority.contains('@') {
            return Err(format!("{text:?}: user info in the URL is not supported"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port)
            .ok_or_else(|| format!("{text:?}: expected http[s]://host[:port]/path"))?;
        let target = if target.is_empty() {
            "/".to_owned()
        } else if target.starts_with('?') {
            format!("/{target}")
        } else {
            target.to_owned()
        };
        Ok(WebhookUrl {
            text: text.to_owned(),
            tls,
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// The `Host` header's value.
    fn host_header(&self) -> String {
        if self.port == if self.tls { 443 } else { 80 } {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The host without IPv6 brackets, for resolution.
    fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = if authority.starts_with('[') {
        let v6_end = authority.find(']')?;
        let host = &authority[..=v6_end];
        match &authority[v6_end + 1..] {
            "" => (host, None),
            rest => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    let port = match port {
        None => default_port,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return None,
            Ok(port) => port,
        },
    };
    Some((host, port))
}

/// One request to send.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The JSON body, exactly as signed.
    pub body: &'a [u8],
    /// `X-Collab-Signature`.
    pub signature: &'a str,
    /// `X-Collab-Delivery`.
    pub delivery_id: &'a str,
    /// `X-Collab-Event` (`changed`, `deleted`).
    pub event: &'a str,
}

/// Why a delivery attempt failed (each is retried).
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The host name did not resolve.
    #[error("resolving {host}: {detail}")]
    Resolve {
        /// The host.
        host: String,
        /// What failed.
        detail: String,
    },
    /// Connecting, writing or reading failed or ran out of time.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The operating system's error (`TimedOut` at the deadline).
        source: std::io::Error,
    },
    /// The receiver answered with something other than an HTTP/1.x response.
    #[error("the receiver's answer is not an HTTP response")]
    BadResponse,
    /// The TLS session could not be set up (a certificate that does not verify, a host name
    /// that cannot be one, a failed handshake).
    #[error("TLS: {0}")]
    Tls(String),
    /// The receiver answered with a status other than 2xx.
    #[error("HTTP {0}")]
    Status(u16),
}

/// One connection to a receiver, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(stream) => stream,
            Conn::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(stream) => stream.read(buf),
            Conn::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(stream) => stream.write(buf),
            Conn::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(stream) => stream.flush(),
            Conn::Tls(tls) => tls.flush(),
        }
    }
}

/// Sets up TLS over `stream` and completes the handshake before `deadline`.
fn start_tls(
    url: &WebhookUrl,
    config: &Arc<ClientConfig>,
    stream: TcpStream,
    deadline: Instant,
) -> Result<Conn, PostError> {
    let name = ServerName::try_from(url.bare_host().to_owned())
        .map_err(|e| PostError::Tls(format!("{:?} is not a server name: {e}", url.host)))?;
    let session =
        ClientConnection::new(config.clone(), name).map_err(|e| PostError::Tls(e.to_string()))?;
    let mut tls = StreamOwned::new(session, stream);
    while tls.conn.is_handshaking() {
        set_timeouts(&tls.sock, deadline, "the TLS handshake")?;
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return Err(match e.kind() {
                std::io::ErrorKind::InvalidData => PostError::Tls(e.to_string()),
                _ => PostError::Io {
                    step: "the TLS handshake",
                    source: e,
                },
            });
        }
    }
    Ok(Conn::Tls(Box::new(tls)))
}

/// POSTs `request` to `url` (over TLS with `tls` for `https://`), all within `timeout` once
/// the name is resolved; returns the 2xx status.
///
/// # Errors
/// See [`PostError`]; an `https://` URL without `tls` is a `Tls` error.
pub fn post(
    url: &WebhookUrl,
    tls: Option<&Arc<ClientConfig>>,
    request: Request<'_>,
    timeout: Duration,
) -> Result<u16, PostError> {
    let addrs: Vec<SocketAddr> = (url.bare_host(), url.port)
        .to_socket_addrs()
        .map_err(|e| PostError::Resolve {
            host: url.host.clone(),
            detail: e.to_string(),
        })?
        .collect();
    let deadline = Instant::now() + timeout;
    let stream = connect(&addrs, deadline)?;
    let mut stream = match (url.tls, tls) {
        (false, _) => Conn::Plain(stream),
        (true, Some(config)) => start_tls(url, config, stream, deadline)?,
        (true, None) => return Err(PostError::Tls("no --webhook-ca-file".to_owned())),
    };
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: collab-engine/{version}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\
         X-Collab-Event: {event}\r\nX-Collab-Delivery: {id}\r\nX-Collab-Signature: {sig}\r\n\
         Connection: close\r\n\r\n",
        target = url.target,
        host = url.host_header(),
        version = env!("CARGO_PKG_VERSION"),
        len = request.body.len(),
        event = request.event,
        id = request.delivery_id,
        sig = request.signature,
    );
    let mut bytes = Vec::with_capacity(head.len() + request.body.len());
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(request.body);
    set_timeouts(stream.tcp(), deadline, "writing the request")?;
    stream
        .write_all(&bytes)
        .and_then(|()| stream.flush())
        .map_err(|source| PostError::Io {
            step: "writing the request",
            source,
        })?;
    let status = read_status(&mut stream, deadline)?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(PostError::Status(status))
    }
}

fn left(deadline: Instant, step: &'static str) -> Result<Duration, PostError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(PostError::Io {
            step,
            source: std::io::ErrorKind::TimedOut.into(),
        });
    }
    Ok(left)
}

fn set_timeouts(
    stream: &TcpStream,
    deadline: Instant,
    step: &'static str,
) -> Result<(), PostError> {
    let left = left(deadline, step)?;
    let io = |source| PostError::Io { step, source };
    stream.set_write_timeout(Some(left)).map_err(io)?;
    stream.set_read_timeout(Some(left)).map_err(io)
}

fn connect(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, PostError> {
    let mut last = None;
    for addr in addrs {
        let left = left(deadline, "connecting")?;
        match TcpStream::connect_timeout(addr, left) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(PostError::Io {
        step: "connecting",
        source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
    })
}

/// Reads the response head and returns its status.
fn read_status(stream: &mut Conn, deadline: Instant) -> Result<u16, PostError> {
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        set_timeouts(stream.tcp(), deadline, "reading the response")?;
        if len == buf.len() {
            if buf.len() >= RESPONSE_HEAD_BYTES_MAX {
                return Err(PostError::BadResponse);
            }
            buf.resize((buf.len() * 2).min(RESPONSE_HEAD_BYTES_MAX), 0);
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(PostError::Io {
                    step: "reading the response",
                    source,
                })
            }
        };
        if n == 0 {
            // Closed before a full head: a status line alone still counts.
            return parse_status(&buf[..len], true);
        }
        len += n;
        match parse_status(&buf[..len], false) {
            Err(PostError::BadResponse) if !head_complete(&buf[..len]) => continue,
            other => return other,
        }
    }
}

fn head_complete(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n")
}

fn parse_status(bytes: &[u8], closed: bool) -> Result<u16, PostError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(_) if response.code.is_some() => response.code.ok_or(PostError::BadResponse),
        Ok(_) => Err(PostError::BadResponse),
        // Too many headers: the status line was still read.
        Err(httparse::Error::TooManyHeaders) => {
            parse_status_line(bytes).ok_or(PostError::BadResponse)
        }
        Err(_) if closed => parse_status_line(bytes).ok_or(PostError::BadResponse),
        Err(_) => Err(PostError::BadResponse),
    }
}

/// `HTTP/1.x NNN ...` at the start of `bytes`.
fn parse_status_line(bytes: &[u8]) -> Option<u16> {
    let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&bytes[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |text: &str, host: &str, port: u16, target: &str| {
            let url = WebhookUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (url.host.as_str(), url.port, url.target.as_str()),
                (host, port, target),
                "{text}"
            );
        };
        ok("http://example.com", "example.com", 80, "/");
        ok("http://127.0.0.1:9000/hook", "127.0.0.1", 9000, "/hook");
        ok("HTTP://h:1/a/b?x=1&y=2", "h", 1, "/a/b?x=1&y=2");
        ok("http://h?x=1", "h", 80, "/?x=1");
        ok("http://h/p#frag", "h", 80, "/p");
        ok("http://[::1]:8080/x", "[::1]", 8080, "/x");
        ok("http://[::1]", "[::1]", 80, "/");
        ok(
            "https://hooks.example.com/x",
            "hooks.example.com",
            443,
            "/x",
        );
        ok("https://127.0.0.1:8443", "127.0.0.1", 8443, "/");
        assert!(WebhookUrl::parse("https://h/").expect("https").tls);
        assert!(!WebhookUrl::parse("http://h/").expect("http").tls);
        for bad in [
            "https://",
            "ftp://h/",
            "example.com",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://h:x/",
            "http://u:p@h/",
            "http://h/a b",
            "http://[::1/",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\r\n\r\n", false).ok(),
            Some(204)
        );
        assert_eq!(parse_status(b"HTTP/1.0 500 Oops\r\n", true).ok(), Some(500));
        // The status line is enough: the headers are never needed.
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n", false).ok(), Some(200));
        assert!(parse_status(b"HTTP/1.1 2", false).is_err(), "incomplete");
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
        assert!(parse_status(b"", true).is_err());
    }
}
