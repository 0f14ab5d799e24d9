//! The webhook URL and the small HTTP/1.1 client that POSTs one delivery.
//!
//! One request per connection (`Connection: close`), every step under one deadline
//! (`--webhook-timeout`): name resolution aside, connect, write and reading the status line
//! cannot take longer. Only the status matters: 2xx is delivered, anything else (or no
//! answer) is a failure to retry. The response body is never read past the headers.
//! `http://` only: `https://` is refused when the flag is parsed (put a TLS-terminating proxy
//! on the receiver's side, or on this host, in front of an https receiver).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Longest response head read (status line and headers); a bigger one is a failure.
pub const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;

/// A parsed `http://host[:port][/path][?query]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The URL as given (for logs and the persisted state's name).
    pub text: String,
    /// The host as written (a name, an IPv4 address or `[v6]`), for the `Host` header.
    pub host: String,
    /// The port (80 by default).
    pub port: u16,
    /// Path and query, at least `/`.
    pub target: String,
}

impl WebhookUrl {
    /// Parses and checks a `--webhook-url`.
    ///
    /// # Errors
    /// A message saying what is wrong: another scheme (`https` included), no host, user info,
    /// a bad port, spaces or control characters.
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "{text:?}: https:// webhook URLs are not supported; use http:// (to the receiver \
                 on a private network, or to a TLS-terminating proxy such as a local nginx or \
                 stunnel in front of an https receiver)"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!("{text:?} is not an http:// URL"));
        }
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{text:?}: spaces and control characters are not allowed"
            ));
        }
        let rest = &text["http://".len()..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, mut target) = rest.split_at(end);
        if let Some(hash) = target.find('#') {
            target = &target[..hash];
        }
        if authority.contains('@') {
            return Err(format!("{text:?}: user info in the URL is not supported"));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| format!("{text:?}: expected http://host[:port]/path"))?;
        let target = if target.is_empty() {
            "/".to_owned()
        } else if target.starts_with('?') {
            format!("/{target}")
        } else {
            target.to_owned()
        };
        Ok(WebhookUrl {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// The `Host` header's value.
    fn host_header(&self) -> String {
        if self.port == 80 {
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

fn split_host_port(authority: &str) -> Option<(&str, u16)> {
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
        None => 80,
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
    /// The receiver answered with a status other than 2xx.
    #[error("HTTP {0}")]
    Status(u16),
}

/// POSTs `request` to `url`, all within `timeout` once the name is resolved; returns the
/// 2xx status.
///
/// # Errors
/// See [`PostError`].
pub fn post(url: &WebhookUrl, request: Request<'_>, timeout: Duration) -> Result<u16, PostError> {
    let addrs: Vec<SocketAddr> = (url.bare_host(), url.port)
        .to_socket_addrs()
        .map_err(|e| PostError::Resolve {
            host: url.host.clone(),
            detail: e.to_string(),
        })?
        .collect();
    let deadline = Instant::now() + timeout;
    let mut stream = connect(&addrs, deadline)?;
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
    set_timeouts(&stream, deadline, "writing the request")?;
    stream.write_all(&bytes).map_err(|source| PostError::Io {
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
fn read_status(stream: &mut TcpStream, deadline: Instant) -> Result<u16, PostError> {
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        set_timeouts(stream, deadline, "reading the response")?;
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
        for bad in [
            "https://example.com/hook",
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
        assert!(WebhookUrl::parse("https://h/")
            .expect_err("https")
            .contains("not supported"));
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
