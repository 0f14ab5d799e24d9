//! The client's real address, passed from a relaying node to the owner in the
//! `X-Collab-Forwarded-For` request header, so that the owner's per-address limits count the
//! client and not the relaying node.
//!
//! A header anybody can write is trusted only when it proves it comes from a cluster peer:
//! `X-Collab-Forwarded-For: <addr>; ts=<unix seconds>; mac=<hex>`, where `mac` is
//! HMAC-SHA256, keyed with the secret every node reads from `--cluster-secret-file`, of
//! `collab-forwarded-for\n<addr>\n<ts>`. The owner accepts it within [`FORWARDED_SKEW`] of its
//! own clock; anything else (no secret, a bad or stale mac, two such headers) is ignored and
//! the connection counts against its socket's address. Pure: no sockets, no clock of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The request header carrying a relayed client's address.
pub const FORWARDED_HEADER: &str = "X-Collab-Forwarded-For";

/// How far a header's timestamp may be from the owner's clock. It bounds the replay of a
/// header captured on the cluster's network (which only lets its replayer claim the same
/// client address for that long), while allowing for clock skew between nodes.
pub const FORWARDED_SKEW: Duration = Duration::from_secs(60);

/// Shortest secret accepted: 16 bytes (128 bits) of key.
pub const CLUSTER_SECRET_BYTES_MIN: usize = 16;

/// The shared secret of the cluster's nodes.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Fewer than [`CLUSTER_SECRET_BYTES_MIN`] bytes (after trimming whitespace).
    #[error(
        "{path} holds {len} bytes; a cluster secret needs at least {CLUSTER_SECRET_BYTES_MIN}"
    )]
    Short {
        /// The file.
        path: String,
        /// Its length after trimming.
        len: usize,
    },
}

impl ClusterSecret {
    /// A secret from its bytes.
    ///
    /// # Errors
    /// When shorter than [`CLUSTER_SECRET_BYTES_MIN`].
    pub fn new(bytes: &[u8]) -> Result<ClusterSecret, SecretError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < CLUSTER_SECRET_BYTES_MIN {
            return Err(SecretError::Short {
                path: "secret".to_owned(),
                len: trimmed.len(),
            });
        }
        Ok(ClusterSecret(trimmed.to_vec()))
    }

    /// Reads the secret from `path` (surrounding whitespace, such as a final newline, is not
    /// part of it).
    ///
    /// # Errors
    /// When the file cannot be read or is too short.
    pub fn from_file(path: &Path) -> Result<ClusterSecret, SecretError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: shown.clone(),
            source,
        })?;
        ClusterSecret::new(&bytes).map_err(|e| match e {
            SecretError::Short { len, .. } => SecretError::Short { path: shown, len },
            other => other,
        })
    }

    fn mac(&self, addr: &str, ts: u64) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(b"collab-forwarded-for\n");
        mac.update(addr.as_bytes());
        mac.update(b"\n");
        mac.update(ts.to_string().as_bytes());
        mac
    }

    /// The header value vouching for `client` at `now_unix`.
    pub fn stamp(&self, client: SocketAddr, now_unix: u64) -> String {
        let addr = client.to_string();
        let tag = self.mac(&addr, now_unix).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("{addr}; ts={now_unix}; mac={hex}")
    }

    /// The client address a header value vouches for, if it is genuine and fresh.
    pub fn verify(&self, value: &[u8], now_unix: u64) -> Option<SocketAddr> {
        let value = std::str::from_utf8(value).ok()?;
        let mut parts = value.split(';').map(str::trim);
        let addr_text = parts.next()?;
        let ts_text = parts.next()?.strip_prefix("ts=")?;
        let mac_hex = parts.next()?.strip_prefix("mac=")?;
        if parts.next().is_some() || mac_hex.len() != 64 {
            return None;
        }
        let addr: SocketAddr = addr_text.parse().ok()?;
        let ts: u64 = ts_text.parse().ok()?;
        if ts.abs_diff(now_unix) > FORWARDED_SKEW.as_secs() {
            return None;
        }
        let mut tag = [0u8; 32];
        for (idx, byte) in tag.iter_mut().enumerate() {
            *byte = u8::from_str_radix(mac_hex.get(idx * 2..idx * 2 + 2)?, 16).ok()?;
        }
        // Constant-time comparison (Mac::verify_slice).
        self.mac(addr_text, ts).verify_slice(&tag).ok()?;
        Some(addr)
    }
}

/// Rewrites a complete request head for the owner: drops every `X-Collab-Forwarded-For` the
/// client sent, adds the relay's own (when it has a secret) and, with `close`, replaces any
/// `Connection` header with `Connection: close` (a relayed HTTP exchange serves one request,
/// since the next one on a kept-alive connection could name another document).
/// `None` when `head` is not a complete request head.
pub fn rewrite_head(head: &[u8], forwarded: Option<&str>, close: bool) -> Option<Vec<u8>> {
    let text = head.strip_suffix(b"\r\n\r\n")?;
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next()?;
    let mut out = Vec::with_capacity(head.len() + 160);
    out.extend_from_slice(request_line);
    out.extend_from_slice(b"\r\n");
    for line in lines {
        let name = line.split(|&b| b == b':').next().unwrap_or(line);
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(FORWARDED_HEADER.as_bytes())
            || (close && name.eq_ignore_ascii_case(b"connection"))
        {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(value) = forwarded {
        out.extend_from_slice(FORWARDED_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// The vouched-for client address of a parsed request, when exactly one
/// `X-Collab-Forwarded-For` is present and genuine.
pub fn vouched_client(
    headers: &[httparse::Header<'_>],
    secret: &ClusterSecret,
    now_unix: u64,
) -> Option<SocketAddr> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(FORWARDED_HEADER))
        .map(|h| h.value);
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    secret.verify(value, now_unix)
}

/// Whether the request carries any `X-Collab-Forwarded-For`, genuine or not.
pub fn claims_forwarded(headers: &[httparse::Header<'_>]) -> bool {
    headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case(FORWARDED_HEADER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> ClusterSecret {
        ClusterSecret::new(text.as_bytes()).expect("long enough")
    }

    #[test]
    fn a_stamp_verifies_with_the_same_secret_only_and_while_fresh() {
        let s = secret("0123456789abcdef-cluster");
        let client: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let value = s.stamp(client, 1_000_000);
        assert_eq!(s.verify(value.as_bytes(), 1_000_000), Some(client));
        assert_eq!(s.verify(value.as_bytes(), 1_000_060), Some(client));
        assert_eq!(s.verify(value.as_bytes(), 1_000_061), None, "stale");
        assert_eq!(s.verify(value.as_bytes(), 999_939), None, "from the future");
        let other = secret("another-secret-of-16+");
        assert_eq!(other.verify(value.as_bytes(), 1_000_000), None);
        // Any change to the address, the time or the mac breaks it.
        let forged = value.replace("203.0.113.7", "203.0.113.8");
        assert_eq!(s.verify(forged.as_bytes(), 1_000_000), None);
        let forged = value.replace("ts=1000000", "ts=1000001");
        assert_eq!(s.verify(forged.as_bytes(), 1_000_000), None);
        for bad in [
            "",
            "1.2.3.4:5",
            "1.2.3.4:5; ts=1; mac=zz",
            "x; ts=1000000; mac=",
        ] {
            assert_eq!(s.verify(bad.as_bytes(), 1_000_000), None, "{bad}");
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(ClusterSecret::new(b"  short\n").is_err());
        assert!(ClusterSecret::new(b"sixteen-bytes-ok\n").is_ok());
    }

    #[test]
    fn rewrite_head_replaces_the_clients_forwarded_headers() {
        let head = b"GET /ws/d HTTP/1.1\r\nHost: x\r\nx-collab-forwarded-for: 6.6.6.6:1; ts=1; mac=00\r\nConnection: Upgrade\r\n\r\n";
        let out = rewrite_head(head, Some("1.2.3.4:5; ts=9; mac=ab"), false).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "GET /ws/d HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nX-Collab-Forwarded-For: 1.2.3.4:5; ts=9; mac=ab\r\n\r\n"
        );
        let out = rewrite_head(head, None, true).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "GET /ws/d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(rewrite_head(b"GET / HTTP/1.1\r\n", None, false), None);
    }
}
