//! The door (acceptor limits before any handshake work) over real sockets: `--allowed-origin`,
//! the per-address concurrent limit and its release after a close (by the client, or by the
//! shard), the connect-rate limit and its recovery, their `/metrics` counters, and the settings
//! taking effect from the environment and a `--config` file in the real binary.
//!
//! Scrapes of `/metrics` come from 127.0.0.2, another client address, so that they do not count
//! against the limits of 127.0.0.1 that the tests fill.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::HeaderValue;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

use crate::util::{
    recv_json, recv_until_close, send, server, spawn_command, test_config, Watchdog, Ws,
};

/// The address the scrapes come from.
const SCRAPER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A TCP connection to `addr` from the local address `source` (any port).
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("tests listen on IPv4 loopback");
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns until `from_raw_fd` hands
    // it to the TcpStream; every pointer passed points at a live local of the right size.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let local = sockaddr(source, 0);
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind {source}");
        let remote = sockaddr(*v4.ip(), v4.port());
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "connect");
        TcpStream::from_raw_fd(fd)
    };
    stream
        .set_read_timeout(Some(crate::util::READ_TIMEOUT))
        .expect("timeout");
    stream
}

/// Sends `request` from `source` and returns the whole response.
fn http_from(source: Ipv4Addr, addr: SocketAddr, request: &str) -> String {
    let mut stream = connect_from(source, addr);
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// The value of the metric line that starts with `series` (e.g. `name{label="x"}`), from
/// a scrape made from [`SCRAPER`].
fn metric(addr: SocketAddr, series: &str) -> u64 {
    let text = http_from(SCRAPER, addr, &get("/metrics"));
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in {text}"));
    line[series.len()..].trim().parse().expect("a number")
}

/// Scrapes until `series` reads `value` (the acceptor updates its gauges on its tick); the
/// watchdog bounds the wait.
fn wait_metric(addr: SocketAddr, series: &str, value: u64) {
    while metric(addr, series) != value {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What an upgrade of `/ws/<doc>` with an optional `Origin` header got: the socket, or the
/// HTTP status of the refusal.
fn upgrade(addr: SocketAddr, doc: &str, origin: Option<&str>) -> Result<Ws, u16> {
    let stream = connect_from(Ipv4Addr::LOCALHOST, addr);
    let mut request = format!("ws://{addr}/ws/{doc}")
        .into_client_request()
        .expect("request");
    if let Some(origin) = origin {
        request.headers_mut().insert(
            "Origin",
            HeaderValue::from_str(origin).expect("header value"),
        );
    }
    match tungstenite::client::client(request, MaybeTlsStream::Plain(stream)) {
        Ok((ws, _response)) => Ok(ws),
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

/// Joins `doc` over a fresh upgrade and returns the joined socket.
fn join(addr: SocketAddr, doc: &str) -> Ws {
    let mut ws = upgrade(addr, doc, None).expect("admitted");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    ws
}

#[test]
fn door_origin_allowed_refused_and_absent() {
    let _w = Watchdog::new("door_origin_allowed_refused_and_absent", 60);
    let mut config = test_config();
    config.allowed_origins = vec!["https://docs.example.com".to_owned()];
    let server = server(config);
    let addr = server.local_addr();

    let mut ws = upgrade(addr, "o", Some("https://docs.example.com")).expect("listed origin");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    // The default port and the case of the host do not matter.
    assert!(upgrade(addr, "o", Some("HTTPS://Docs.Example.com:443")).is_ok());
    // Clients without Origin (not browsers) are unaffected.
    let mut ws = upgrade(addr, "o", None).expect("no origin");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    for bad in [
        "https://evil.example",
        "http://docs.example.com",
        "https://docs.example.com.evil.example",
        "null",
    ] {
        assert_eq!(upgrade(addr, "o", Some(bad)).err(), Some(403), "{bad}");
    }
    let raw = http_from(
        Ipv4Addr::LOCALHOST,
        addr,
        "GET /ws/o HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://evil.example\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{raw}");
    assert!(raw.ends_with("origin not allowed\n"), "{raw}");
    assert_eq!(
        metric(addr, "collab_door_refusals_total{reason=\"origin\"}"),
        5
    );
    // Plain HTTP never carries a WebSocket, so Origin is not checked there.
    let health = http_from(
        Ipv4Addr::LOCALHOST,
        addr,
        "GET /health HTTP/1.1\r\nOrigin: https://evil.example\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    drop(ws);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn door_concurrent_limit_per_address_released_after_any_close() {
    let _w = Watchdog::new(
        "door_concurrent_limit_per_address_released_after_any_close",
        60,
    );
    let mut config = test_config();
    config.conns_per_ip_max = 2;
    config.message_bytes_max = 64 * 1024;
    let server = server(config);
    let addr = server.local_addr();
    let counted = "collab_door_connections";

    // Two joined connections, on whichever shards own their documents.
    let mut first = join(addr, "a");
    let second = join(addr, "b");
    assert_eq!(upgrade(addr, "c", None).err(), Some(429));
    let refused = http_from(Ipv4Addr::LOCALHOST, addr, &get("/health"));
    assert!(
        refused.starts_with("HTTP/1.1 429 Too Many Requests\r\n")
            && refused.contains("\r\nRetry-After: 1\r\n"),
        "{refused}"
    );
    // Another address is not limited by this one's connections.
    wait_metric(addr, counted, 2);
    assert_eq!(
        metric(addr, "collab_door_refusals_total{reason=\"conns_per_ip\"}"),
        2
    );

    // The client closes: its shard reports the end to the acceptor.
    first.close(None).expect("close");
    // Waits for the server's answering close (tungstenite then reports the socket closed).
    let _ = recv_until_close(&mut first);
    drop(first);
    wait_metric(addr, counted, 1);
    let mut third = join(addr, "c");
    assert_eq!(upgrade(addr, "d", None).err(), Some(429));

    // The shard closes (a message over --message-bytes-max gets 1009): released too.
    let big = format!(
        r#"{{"type":"presence","state":{{"pad":"{}"}}}}"#,
        "x".repeat(70_000)
    );
    third.send(Message::text(big)).expect("send");
    let (code, _) = recv_until_close(&mut third);
    assert_eq!(
        code,
        Some(tungstenite::protocol::frame::coding::CloseCode::Size)
    );
    drop(third);
    wait_metric(addr, counted, 1);
    let fourth = join(addr, "d");

    // A connection that ends in the acceptor (a plain HTTP answer) is released as well.
    drop(fourth);
    wait_metric(addr, counted, 1);
    let health = http_from(Ipv4Addr::LOCALHOST, addr, &get("/health"));
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    wait_metric(addr, counted, 1);
    drop(second);
    wait_metric(addr, counted, 0);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn door_count_released_when_a_full_shard_refuses_the_connection() {
    let _w = Watchdog::new(
        "door_count_released_when_a_full_shard_refuses_the_connection",
        60,
    );
    let mut config = test_config();
    config.shards = 1;
    config.conns_per_shard_max = 1;
    config.conns_per_ip_max = 3;
    let server = server(config);
    let addr = server.local_addr();
    let held = join(addr, "a");
    // Admitted at the door, upgraded, then closed by the full shard with 1013.
    for _ in 0..5 {
        let mut ws = upgrade(addr, "b", None).expect("admitted at the door");
        let (code, _) = recv_until_close(&mut ws);
        assert_eq!(
            code,
            Some(tungstenite::protocol::frame::coding::CloseCode::Again)
        );
        drop(ws);
        wait_metric(addr, "collab_door_connections", 1);
    }
    assert_eq!(
        metric(addr, "collab_door_refusals_total{reason=\"conns_per_ip\"}"),
        0
    );
    drop(held);
    wait_metric(addr, "collab_door_connections", 0);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn door_connect_rate_refuses_with_429_then_recovers() {
    let _w = Watchdog::new("door_connect_rate_refuses_with_429_then_recovers", 60);
    let mut config = test_config();
    config.conns_per_ip_max = 0;
    config.connects_per_ip_per_second = 1;
    config.connects_per_ip_burst = 2;
    let server = server(config);
    let addr = server.local_addr();

    // Seven connections at once: at most the burst plus one a second get through, so unless
    // this loop takes five seconds some are refused; each answer is one or the other.
    let mut n_refused = 0;
    for _ in 0..7 {
        let answer = http_from(Ipv4Addr::LOCALHOST, addr, &get("/health"));
        if answer.starts_with("HTTP/1.1 429 ") {
            assert!(answer.contains("slow down"), "{answer}");
            n_refused += 1;
        } else {
            assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        }
    }
    assert!(n_refused >= 1, "no connection refused");
    // WebSocket upgrades are refused the same way, before the handshake.
    let mut n_ws_refused = 0;
    for _ in 0..4 {
        if upgrade(addr, "r", None).err() == Some(429) {
            n_ws_refused += 1;
        }
    }
    assert!(n_ws_refused >= 1);
    assert_eq!(
        metric(addr, "collab_door_refusals_total{reason=\"connect_rate\"}"),
        n_refused + n_ws_refused
    );
    // After a second at least one token is back.
    std::thread::sleep(Duration::from_millis(1_100));
    let mut ws = upgrade(addr, "r", None).expect("recovered");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    server.shutdown().expect("clean shutdown");
}

/// Starts the real binary with `args` and `envs`; returns it and the address it printed.
fn spawn_binary(args: &[&str], envs: &[(&str, &str)]) -> (std::process::Child, SocketAddr) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"));
    command.args(args).envs(envs.iter().copied());
    spawn_command(command)
}

#[test]
fn door_settings_from_environment_and_config_file_in_the_binary() {
    let _w = Watchdog::new(
        "door_settings_from_environment_and_config_file_in_the_binary",
        60,
    );
    let path = std::env::temp_dir().join(format!("collab-door-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "# the door of a test server\nconns-per-ip-max = 1\nstorage = \"memory\"\nshards = 1\n\
         connects-per-ip-per-second = 10\nallowed-origin = [\"https://file.example\"]\n",
    )
    .expect("write the settings file");
    let config = path.display().to_string();
    let (mut child, addr) = spawn_binary(
        &[
            "--config",
            &config,
            "--listen",
            "127.0.0.1:0",
            "--connects-per-ip-per-second",
            "0",
        ],
        &[
            (
                "COLLAB_ALLOWED_ORIGIN",
                "https://docs.example.com,https://b.example",
            ),
            ("COLLAB_NO_PIN_CORES", "true"),
            // The flag wins over the variable, which wins over the file.
            ("COLLAB_CONNECTS_PER_IP_PER_SECOND", "5"),
        ],
    );
    // From the environment, over the file's list: two origins, and the others refused.
    assert_eq!(
        upgrade(addr, "e", Some("https://evil.example")).err(),
        Some(403)
    );
    assert_eq!(
        upgrade(addr, "e", Some("https://file.example")).err(),
        Some(403)
    );
    let mut ws = upgrade(addr, "e", Some("https://b.example")).expect("listed in the env");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    // From the file: one connection per address.
    assert_eq!(upgrade(addr, "e", None).err(), Some(429));
    let text = http_from(SCRAPER, addr, &get("/metrics"));
    assert!(text.contains("collab_connections{shard=\"0\"}"), "{text}");
    assert!(
        !text.contains("collab_connections{shard=\"1\"}"),
        "one shard, from the file"
    );
    // From the flag: no connect-rate limit, so only the concurrent one ever refused.
    assert!(
        text.contains("collab_door_refusals_total{reason=\"connect_rate\"} 0"),
        "{text}"
    );
    drop(ws);
    let _ = child.kill();
    let _ = child.wait();

    // Bad values stop the binary with a message naming the setting, before it listens.
    let bad = |args: &[&str], envs: &[(&str, &str)], expected: &str| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"));
        // Were the value accepted, the server would start here, not on port 8000.
        command
            .args(["--listen", "127.0.0.1:0", "--storage", "memory"])
            .args(args);
        for (key, value) in envs {
            command.env(key, value);
        }
        let output = command.output().expect("run the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
        assert!(output.stdout.is_empty(), "it must not start");
    };
    bad(
        &[],
        &[("COLLAB_IDLE_TIMEOUT", "30")],
        "COLLAB_IDLE_TIMEOUT=\"30\": invalid value",
    );
    bad(&[], &[("COLLAB_IDLE_TIMEOUT", "30")], "\"30\" has no unit");
    bad(
        &[],
        &[("COLLAB_MESSAGE_BYTES_MAX", "12 parsecs")],
        "is not a size",
    );
    bad(
        &["--allowed-origin", "docs.example.com"],
        &[],
        "is not an origin",
    );
    std::fs::write(&path, "conns-per-ip = 1\n").expect("rewrite");
    bad(
        &[],
        &[("COLLAB_CONFIG", &config)],
        "unknown setting `conns-per-ip`",
    );
    let _ = std::fs::remove_file(&path);
}
