//! The door: limits the acceptor applies before any handshake work. A browser upgrade from an
//! origin not listed in `--allowed-origin` gets 403; a client address over
//! `--conns-per-ip-max` concurrent connections or `--connects-per-ip-per-second` (a token
//! bucket of `--connects-per-ip-burst`) gets 429.
//!
//! [`Door`] is owned by the acceptor thread alone. A connection counts against its address from
//! accept until it ends, in the acceptor or after the handoff: a shard reports each connection
//! it ends through its [`DoorRelease`], a channel the acceptor drains (a lock-free send per
//! closed connection, no lock and no shared table on the shard's path). The table of addresses
//! is bounded: an address without connections whose bucket has refilled holds no information
//! and is swept, and past [`ADDRS_IDLE_MAX`] entries the idle ones are evicted at once.
//! Nothing here touches a socket except [`consume_request_head`], which reads a refused
//! client's request so that the refusal reaches it before the close.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::warn;
use mio::net::TcpStream;

use crate::config::Config;
use crate::metrics::DoorCounters;
use crate::shard::rate_limit::{RateLimit, TokenBucket};

use super::http::{self, REQUEST_HEADERS_MAX, REQUEST_HEAD_BYTES_MAX};

/// Addresses without connections the table keeps before it evicts them all at once (losing
/// their connect-rate history): about 64 bytes each, so at most a few MiB whatever the number
/// of addresses a flood comes from. Addresses with live connections are never evicted; their
/// number is bounded by the connections the shards accept.
pub const ADDRS_IDLE_MAX: usize = 65_536;

/// How often idle addresses are swept from the table.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Time a refused client has to send its request head before it is dropped without an answer
/// (at most `--handshake-timeout`): refusals must not hold pending slots for long.
pub const REFUSED_DEADLINE: Duration = Duration::from_secs(1);

/// Why the door refused a connection; each reason is counted in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorRefusal {
    /// A browser upgrade from an origin not in `--allowed-origin` (HTTP 403).
    Origin,
    /// The client address holds `--conns-per-ip-max` connections already (HTTP 429).
    ConnsPerIp,
    /// The client address opened connections faster than `--connects-per-ip-per-second`
    /// allows (HTTP 429).
    ConnectRate,
}

impl DoorRefusal {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [DoorRefusal; 3] = [
        DoorRefusal::Origin,
        DoorRefusal::ConnsPerIp,
        DoorRefusal::ConnectRate,
    ];

    /// The `reason` label of `collab_door_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            DoorRefusal::Origin => "origin",
            DoorRefusal::ConnsPerIp => "conns_per_ip",
            DoorRefusal::ConnectRate => "connect_rate",
        }
    }

    /// The complete HTTP answer.
    pub fn answer(self) -> Vec<u8> {
        match self {
            DoorRefusal::Origin => http::text_response(403, "origin not allowed"),
            DoorRefusal::ConnsPerIp => http::response(
                429,
                "text/plain; charset=utf-8",
                b"too many connections from your address\n",
                &["Retry-After: 1"],
            ),
            DoorRefusal::ConnectRate => http::response(
                429,
                "text/plain; charset=utf-8",
                b"too many new connections from your address; slow down\n",
                &["Retry-After: 1"],
            ),
        }
    }
}

/// The door's settings, from `Config`.
#[derive(Clone, Debug)]
pub struct DoorLimits {
    /// Normalised origins (see [`normalize_origin`]); empty means every origin.
    allowed_origins: Vec<String>,
    /// Concurrent connections per address; 0 means no limit (and no counting).
    conns_per_ip_max: u32,
    /// New connections per address.
    connect_rate: RateLimit,
}

impl DoorLimits {
    /// A door with the given limits; `origins` are normalised, and one that is not an origin is
    /// an error.
    ///
    /// # Errors
    /// The first entry of `origins` that is not `scheme://host[:port]`.
    pub fn new(
        origins: &[String],
        conns_per_ip_max: u32,
        connects_per_second: u32,
        connects_burst: u32,
    ) -> Result<DoorLimits, String> {
        let allowed_origins = origins
            .iter()
            .map(|o| normalize_origin(o).ok_or_else(|| format!("not an origin: {o:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DoorLimits {
            allowed_origins,
            conns_per_ip_max,
            connect_rate: RateLimit::new(connects_per_second, connects_burst),
        })
    }

    /// No limit at all (the echo example, tests of other layers).
    pub fn open() -> DoorLimits {
        DoorLimits {
            allowed_origins: Vec::new(),
            conns_per_ip_max: 0,
            connect_rate: RateLimit::disabled(),
        }
    }

    /// The door of a server configuration (whose origins `Config` parsing already checked).
    ///
    /// # Errors
    /// As [`DoorLimits::new`].
    pub fn from_config(config: &Config) -> Result<DoorLimits, String> {
        DoorLimits::new(
            &config.allowed_origins,
            config.conns_per_ip_max,
            config.connects_per_ip_per_second,
            config.connects_per_ip_burst,
        )
    }

    /// Whether connections are counted per address (and shards report the ones they end).
    pub fn counts_conns(&self) -> bool {
        self.conns_per_ip_max > 0
    }

    /// Whether any per-address limit applies.
    fn limits_addrs(&self) -> bool {
        self.counts_conns() || self.connect_rate.enabled()
    }

    /// Checks the `Origin` of an upgrade request whose complete head is `head`: refused when
    /// origins are configured and the header is present but not listed. A request without
    /// `Origin` (not from a browser) passes: the check protects browsers' users from pages of
    /// other sites, it is no authentication.
    ///
    /// # Errors
    /// [`DoorRefusal::Origin`].
    pub fn check_origin(&self, head: &[u8]) -> Result<(), DoorRefusal> {
        if self.allowed_origins.is_empty() {
            return Ok(());
        }
        let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
        let mut request = httparse::Request::new(&mut headers);
        if request.parse(head).is_err() {
            // The router accepted this head already; a head it did not is refused anyway.
            return Err(DoorRefusal::Origin);
        }
        let mut origins = request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("origin"));
        let Some(origin) = origins.next() else {
            return Ok(());
        };
        if origins.next().is_some() {
            return Err(DoorRefusal::Origin); // Two Origin headers: which one would a check trust?
        }
        let allowed = std::str::from_utf8(origin.value)
            .ok()
            .and_then(|v| normalize_origin(v.trim()))
            .is_some_and(|o| self.allowed_origins.contains(&o));
        if allowed {
            Ok(())
        } else {
            Err(DoorRefusal::Origin)
        }
    }
}

/// Normalises an origin: `scheme://host[:port]` with scheme `http` or `https`, lower case,
/// without the scheme's default port; one trailing `/` is tolerated. `None` for anything else
/// (a path, a query, user info, `null`, another scheme).
pub fn normalize_origin(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    let default_port = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@' | b'\\') || b.is_ascii_whitespace())
    {
        return None;
    }
    // Split off the port: after `]` for an IPv6 literal, else after the only `:`.
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        addr.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&authority[..addr.len() + 2], port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return None;
    }
    match port {
        None => Some(format!("{scheme}://{host}")),
        Some(port) => {
            let n: u16 = port.parse().ok().filter(|&n| n > 0)?;
            if port.starts_with('+') {
                return None;
            }
            if n.to_string() == default_port {
                Some(format!("{scheme}://{host}"))
            } else {
                Some(format!("{scheme}://{host}:{n}"))
            }
        }
    }
}

/// The key an address is counted under: an IPv4 address (also when IPv4-mapped in IPv6), or the
/// /64 prefix of an IPv6 address, since one host usually holds a whole /64.
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0xFFFF_FFFF_FFFF_FFFF_u128)),
        },
    }
}

/// A shard's way to tell the acceptor that a connection it was handed has ended.
#[derive(Clone, Debug)]
pub struct DoorRelease(Sender<IpAddr>);

impl DoorRelease {
    /// The connection from `peer` ended. Never blocks; if the acceptor is gone, nothing to do.
    pub fn release(&self, peer: SocketAddr) {
        let _ = self.0.send(peer.ip());
    }
}

/// One client address in the table.
#[derive(Debug)]
struct AddrState {
    /// Connections counted (when the door counts them): pending in the acceptor or held by
    /// a shard.
    conns: u32,
    bucket: TokenBucket,
}

/// The acceptor's per-address state and counters.
#[derive(Debug)]
pub struct Door {
    limits: DoorLimits,
    /// Filled by [`Door::admit`], emptied of idle entries by the sweeps.
    addrs: HashMap<IpAddr, AddrState>,
    /// Connections counted in `addrs`, over every address.
    n_conns: u64,
    released_tx: Sender<IpAddr>,
    released_rx: Receiver<IpAddr>,
    counters: Arc<DoorCounters>,
    /// Table size at which an admission first sweeps; raised after a sweep that freed little,
    /// so that a table of live addresses is not swept on every accept.
    sweep_at_len: usize,
    next_sweep: Instant,
    /// When the eviction warning was last logged (one line a second at most).
    evict_warned_at: Option<Instant>,
}

impl Door {
    /// A door with `limits`, counting into `counters` (the registry's, for `/metrics`).
    pub fn new(limits: DoorLimits, counters: Arc<DoorCounters>) -> Door {
        let (released_tx, released_rx) = crossbeam_channel::unbounded();
        Door {
            limits,
            addrs: HashMap::new(),
            n_conns: 0,
            released_tx,
            released_rx,
            counters,
            sweep_at_len: ADDRS_IDLE_MAX,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            evict_warned_at: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &DoorLimits {
        &self.limits
    }

    /// The handle a shard reports ended connections through, when the door counts them.
    pub fn release_handle(&self) -> Option<DoorRelease> {
        self.limits
            .counts_conns()
            .then(|| DoorRelease(self.released_tx.clone()))
    }

    /// Decides on a connection just accepted from `peer`; when admitted it counts against the
    /// address until [`Door::release`] (or a shard's [`DoorRelease`]).
    ///
    /// # Errors
    /// The refusal, counted in the metrics; nothing is counted against the address then.
    pub fn admit(&mut self, peer: SocketAddr, now: Instant) -> Result<(), DoorRefusal> {
        if !self.limits.limits_addrs() {
            return Ok(());
        }
        let key = addr_key(peer.ip());
        if self.addrs.len() >= self.sweep_at_len && !self.addrs.contains_key(&key) {
            self.sweep(now, true);
        }
        let limits = &self.limits;
        let state = self.addrs.entry(key).or_insert_with(|| AddrState {
            conns: 0,
            bucket: limits.connect_rate.full_bucket(now),
        });
        let verdict = if limits.counts_conns() && state.conns >= limits.conns_per_ip_max {
            Err(DoorRefusal::ConnsPerIp)
        } else if !state.bucket.try_take(&limits.connect_rate, 1, now) {
            Err(DoorRefusal::ConnectRate)
        } else {
            if limits.counts_conns() {
                state.conns += 1;
                self.n_conns += 1;
            }
            Ok(())
        };
        if let Err(refusal) = verdict {
            self.counters.refused(refusal);
        }
        verdict
    }

    /// A connection admitted from `peer` has ended (in the acceptor).
    pub fn release(&mut self, peer: SocketAddr) {
        self.release_key(addr_key(peer.ip()));
    }

    fn release_key(&mut self, key: IpAddr) {
        if !self.limits.counts_conns() {
            return;
        }
        match self.addrs.get_mut(&key) {
            Some(state) if state.conns > 0 => {
                state.conns -= 1;
                self.n_conns -= 1;
            }
            // Entries with connections are never evicted, so this is a bug; do not go negative.
            _ => debug_assert!(false, "release of {key} which holds no connection"),
        }
    }

    /// Takes the connections the shards ended since the last call.
    pub fn drain_released(&mut self) {
        while let Ok(ip) = self.released_rx.try_recv() {
            self.release_key(addr_key(ip));
        }
    }

    /// The periodic work: releases from the shards, the sweep of idle addresses, the gauges.
    pub fn on_tick(&mut self, now: Instant) {
        self.drain_released();
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.sweep(now, false);
        }
        self.counters
            .set_gauges(self.addrs.len() as u64, self.n_conns);
    }

    /// Drops addresses that hold nothing worth keeping: no connection and a full bucket. When
    /// `forced` and that is not enough, drops every address without connections.
    fn sweep(&mut self, now: Instant, forced: bool) {
        let rate = self.limits.connect_rate;
        self.addrs
            .retain(|_, s| s.conns > 0 || !s.bucket.is_full(&rate, now));
        if forced && self.addrs.len() >= ADDRS_IDLE_MAX {
            let before = self.addrs.len();
            self.addrs.retain(|_, s| s.conns > 0);
            let evicted = (before - self.addrs.len()) as u64;
            self.counters.evicted(evicted);
            let quiet = self
                .evict_warned_at
                .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1));
            if !quiet && evicted > 0 {
                warn!(
                    "door: more than {ADDRS_IDLE_MAX} client addresses; forgot the connect rate of {evicted} idle ones"
                );
                self.evict_warned_at = Some(now);
            }
        }
        self.sweep_at_len = ADDRS_IDLE_MAX.max(self.addrs.len().saturating_mul(2));
    }

    /// Addresses in the table (for tests and the gauge).
    pub fn n_addrs(&self) -> usize {
        self.addrs.len()
    }

    /// Connections counted over every address.
    pub fn n_conns(&self) -> u64 {
        self.n_conns
    }
}

/// What reading a refused client's request head gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadRead {
    /// Not complete yet: wait for readiness.
    More,
    /// Consumed (or too long to wait for): answer now.
    Complete,
    /// The client left or the socket failed: drop it.
    Gone,
}

/// Consumes a refused client's request head, so that closing after the answer sends a FIN
/// rather than a reset that could discard the answer before the client reads it.
pub fn consume_request_head(stream: &mut TcpStream) -> HeadRead {
    let mut buf = [0u8; REQUEST_HEAD_BYTES_MAX];
    let n = match stream.peek(&mut buf) {
        Ok(0) => return HeadRead::Gone,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeadRead::More,
        Err(_) => return HeadRead::Gone,
    };
    let end = match buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => i + 4,
        None if n == buf.len() => n,
        None => return HeadRead::More,
    };
    // The bytes were peeked, so they are there to read at once.
    match stream.read_exact(&mut buf[..end]) {
        Ok(()) => HeadRead::Complete,
        Err(_) => HeadRead::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40_000)
    }

    fn door(conns: u32, per_second: u32, burst: u32) -> Door {
        let limits = DoorLimits::new(&[], conns, per_second, burst).expect("limits");
        Door::new(limits, Arc::new(DoorCounters::default()))
    }

    #[test]
    fn origins_normalise() {
        let check = |text: &str, expected: Option<&str>| {
            assert_eq!(normalize_origin(text).as_deref(), expected, "{text}");
        };
        check("https://Docs.Example.com", Some("https://docs.example.com"));
        check(
            "https://docs.example.com/",
            Some("https://docs.example.com"),
        );
        check(
            "https://docs.example.com:443",
            Some("https://docs.example.com"),
        );
        check(
            "http://docs.example.com:80",
            Some("http://docs.example.com"),
        );
        check("http://127.0.0.1:8000", Some("http://127.0.0.1:8000"));
        check(
            "https://docs.example.com:8443",
            Some("https://docs.example.com:8443"),
        );
        check("http://[::1]:8000", Some("http://[::1]:8000"));
        check("http://[::1]", Some("http://[::1]"));
        for bad in [
            "null",
            "docs.example.com",
            "ftp://docs.example.com",
            "https://",
            "https://docs.example.com/app",
            "https://user@docs.example.com",
            "https://docs.example.com:0",
            "https://docs.example.com:99999",
            "https://docs.example.com:+80",
            "https://a:b:c",
            "http://[nonsense]:80",
            "https://docs.example.com?x",
        ] {
            check(bad, None);
        }
    }

    fn head(origin: Option<&str>) -> Vec<u8> {
        let mut text = "GET /ws/d HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n".to_owned();
        if let Some(origin) = origin {
            text.push_str(&format!("Origin: {origin}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    #[test]
    fn origin_check_refuses_only_listed_mismatches() {
        let open = DoorLimits::open();
        assert_eq!(
            open.check_origin(&head(Some("https://evil.example"))),
            Ok(())
        );
        let limits =
            DoorLimits::new(&["https://docs.example.com".to_owned()], 0, 0, 0).expect("limits");
        assert_eq!(limits.check_origin(&head(None)), Ok(()));
        assert_eq!(
            limits.check_origin(&head(Some("https://docs.example.com"))),
            Ok(())
        );
        assert_eq!(
            limits.check_origin(&head(Some("https://DOCS.example.com:443"))),
            Ok(())
        );
        for bad in ["https://evil.example", "null", "http://docs.example.com"] {
            assert_eq!(
                limits.check_origin(&head(Some(bad))),
                Err(DoorRefusal::Origin),
                "{bad}"
            );
        }
        let twice = b"GET /ws HTTP/1.1\r\nOrigin: https://docs.example.com\r\nOrigin: https://evil.example\r\n\r\n";
        assert_eq!(limits.check_origin(twice), Err(DoorRefusal::Origin));
        assert!(DoorLimits::new(&["docs.example.com".to_owned()], 0, 0, 0).is_err());
    }

    #[test]
    fn concurrent_limit_counts_until_release() {
        let mut door = door(2, 0, 0);
        let now = Instant::now();
        let a = peer("10.0.0.1");
        assert_eq!(door.admit(a, now), Ok(()));
        assert_eq!(door.admit(a, now), Ok(()));
        assert_eq!(door.admit(a, now), Err(DoorRefusal::ConnsPerIp));
        assert_eq!(door.admit(peer("10.0.0.2"), now), Ok(()), "per address");
        door.release(a);
        assert_eq!(door.admit(a, now), Ok(()));
        // A shard's release arrives through the channel.
        let handle = door.release_handle().expect("counting");
        handle.release(a);
        assert_eq!(
            door.admit(a, now),
            Err(DoorRefusal::ConnsPerIp),
            "not drained"
        );
        door.drain_released();
        assert_eq!(door.admit(a, now), Ok(()));
        assert_eq!(door.n_conns(), 3);
        assert_eq!(door.counters.refusals(DoorRefusal::ConnsPerIp), 2);
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_v4_as_v4() {
        let mut door = door(1, 0, 0);
        let now = Instant::now();
        assert_eq!(door.admit(peer("2001:db8::1"), now), Ok(()));
        assert_eq!(
            door.admit(peer("2001:db8::2"), now),
            Err(DoorRefusal::ConnsPerIp),
            "same /64"
        );
        assert_eq!(door.admit(peer("2001:db8:0:1::1"), now), Ok(()));
        assert_eq!(door.admit(peer("10.0.0.1"), now), Ok(()));
        assert_eq!(
            door.admit(peer("::ffff:10.0.0.1"), now),
            Err(DoorRefusal::ConnsPerIp)
        );
    }

    #[test]
    fn connect_rate_refuses_past_the_burst_and_recovers() {
        let mut door = door(0, 10, 3);
        let start = Instant::now();
        let a = peer("10.0.0.1");
        for _ in 0..3 {
            assert_eq!(door.admit(a, start), Ok(()));
        }
        assert_eq!(door.admit(a, start), Err(DoorRefusal::ConnectRate));
        assert_eq!(door.admit(peer("10.0.0.2"), start), Ok(()));
        // 10 a second: one more after 100 ms.
        let later = start + Duration::from_millis(100);
        assert_eq!(door.admit(a, later), Ok(()));
        assert_eq!(door.admit(a, later), Err(DoorRefusal::ConnectRate));
        assert!(
            door.release_handle().is_none(),
            "no counting without a limit"
        );
    }

    #[test]
    fn idle_addresses_are_swept_and_the_table_is_bounded() {
        let mut door = door(5, 10, 2);
        let start = Instant::now();
        let busy = peer("10.0.0.1");
        assert_eq!(door.admit(busy, start), Ok(()));
        assert_eq!(door.admit(peer("10.0.0.2"), start), Ok(()));
        door.release(peer("10.0.0.2"));
        assert_eq!(door.n_addrs(), 2);
        // Refilled and without connections: forgotten; the busy one stays.
        door.on_tick(start + SWEEP_INTERVAL + Duration::from_secs(1));
        assert_eq!(door.n_addrs(), 1);
        // A flood of addresses, each leaving: the table never grows past the bound.
        for i in 0..(ADDRS_IDLE_MAX as u32 + 1_000) {
            let ip = IpAddr::V4((0x0B00_0000 + i).into());
            let p = SocketAddr::new(ip, 1);
            assert_eq!(door.admit(p, start), Ok(()));
            door.release(p);
            assert!(door.n_addrs() <= ADDRS_IDLE_MAX + 1);
        }
        assert!(door.counters.evictions() > 0);
        assert_eq!(door.n_conns(), 1, "the busy address is still counted");
        assert_eq!(door.admit(busy, start), Ok(()));
    }
}
