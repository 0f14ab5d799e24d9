//! Shared helpers: the watchdog (tests/support/watchdog.rs), servers in-process, blocking WebSocket clients with timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use collab_engine::config::Config;
use collab_engine::server::{start, ServerHandle};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long any single client read may wait before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::watchdog::Watchdog;

/// Whether this run keeps documents in PostgreSQL: `COLLAB_IT_POSTGRES=1` (scripts/test.sh
/// runs the suite a second time so), each server with a fresh database of its own on the test
/// PostgreSQL (tests/support/pg.rs).
pub fn on_postgres() -> bool {
    std::env::var("COLLAB_IT_POSTGRES").is_ok_and(|v| v == "1")
}

/// The test configuration: memory storage (a fresh PostgreSQL database when [`on_postgres`]),
/// 2 shards, port 0.
pub fn test_config() -> Config {
    let mut config = Config::for_tests("127.0.0.1:0".parse().expect("valid address"));
    if on_postgres() {
        let (url, data_dir) = postgres_store("it");
        config.storage = collab_engine::config::StorageKind::Disk;
        config.database_url = Some(url);
        config.data_dir = data_dir;
    }
    config
}

/// A fresh database and a data directory of its own (the server keeps its LOCK there).
fn postgres_store(tag: &str) -> (String, std::path::PathBuf) {
    let url = crate::pg::fresh_database(tag);
    let db = url.rsplit('/').next().unwrap_or(tag);
    let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("it-{db}"));
    let _ = std::fs::remove_dir_all(&data_dir);
    (url, data_dir)
}

/// The test binary's logger: env_logger (`RUST_LOG`) for people, plus every warning and error
/// kept in memory so that tests can count log lines (log floods).
struct CaptureLogger {
    inner: env_logger::Logger,
    warnings: Mutex<Vec<String>>,
}

impl log::Log for CaptureLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn || self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            if let Ok(mut warnings) = self.warnings.lock() {
                warnings.push(record.args().to_string());
            }
        }
        if self.inner.enabled(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

static LOGGER: OnceLock<CaptureLogger> = OnceLock::new();

/// Installs the test logger (idempotent).
pub fn init_logging() {
    let logger = LOGGER.get_or_init(|| CaptureLogger {
        inner: env_logger::builder().is_test(true).build(),
        warnings: Mutex::new(Vec::new()),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.inner.filter().max(log::LevelFilter::Warn));
    }
}

/// Warning and error lines logged so far (by any test of this binary) that contain `needle`.
pub fn warnings_containing(needle: &str) -> Vec<String> {
    LOGGER
        .get()
        .and_then(|logger| logger.warnings.lock().ok())
        .map(|warnings| {
            warnings
                .iter()
                .filter(|line| line.contains(needle))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a server with `config`.
pub fn server(config: Config) -> ServerHandle {
    init_logging();
    start(config).expect("server starts")
}

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client to `path` (e.g. `/ws/doc`).
pub fn connect(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let url = format!("ws://{addr}{path}");
    let (ws, _response) =
        tungstenite::client::client(url, MaybeTlsStream::Plain(stream)).expect("handshake");
    ws
}

/// Like [`connect`], with a 4 KiB receive buffer set before connecting, so that the server's
/// writes to this client stop on `WouldBlock` long before loopback's megabytes of buffering.
pub fn connect_with_small_rcvbuf(addr: SocketAddr, path: &str) -> Ws {
    let stream = tcp_with_small_rcvbuf(addr);
    let url = format!("ws://{addr}{path}");
    let (ws, _response) =
        tungstenite::client::client(url, MaybeTlsStream::Plain(stream)).expect("handshake");
    ws
}

/// A TCP connection to `addr` with a 4 KiB receive buffer set before connecting (and the
/// read timeout of the tests).
pub fn tcp_with_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("tests listen on IPv4 loopback");
    };
    // SAFETY: plain socket calls on a descriptor this function owns until `from_raw_fd`
    // hands it to the TcpStream; every pointer passed points at a live local of the right size.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let size: libc::c_int = 4096;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF");
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect");
        TcpStream::from_raw_fd(fd)
    };
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    stream
}

/// Sends one text frame.
pub fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// Reads the next text frame as JSON (pings are answered by tungstenite).
pub fn recv_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Reads until the server closes; returns the close code and every text frame seen before.
pub fn recv_until_close(ws: &mut Ws) -> (Option<CloseCode>, Vec<serde_json::Value>) {
    let mut seen = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => seen.push(serde_json::from_str(&text).expect("JSON")),
            Ok(Message::Close(frame)) => return (frame.map(|f| f.code), seen),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return (None, seen)
            }
            Err(e) => panic!("read while waiting for close: {e}"),
        }
    }
}

/// Sends a raw HTTP request and returns the whole response text.
pub fn http_get(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

use collab_engine::crdt::{Doc, Op};
use collab_engine::protocol::{self as proto, HelloAckStrategy, ServerMessage};

/// A test client with its own replica of the document: sends valid edits, applies echoes,
/// and checks the contract's ordering guarantees on everything it receives.
pub struct Editor {
    pub ws: Ws,
    pub doc: Doc,
    pub replica: u64,
    pub head: u64,
    pub epoch: String,
    pub next_client_seq: u64,
    /// client_seq -> the op message text, until its echo or ack arrives.
    pub unacked: std::collections::BTreeMap<u64, String>,
    /// Every server_seq received, in order.
    pub seqs: Vec<u64>,
    /// Presence messages received: (replica, state JSON).
    pub presence: Vec<(u64, String)>,
}

impl Editor {
    /// Connects to `path` and joins with `hello` (JSON text); panics unless `hello_ack` comes.
    pub fn join(addr: SocketAddr, path: &str, hello: &str) -> Editor {
        let mut ws = connect(addr, path);
        send(&mut ws, hello);
        let mut editor = Editor {
            ws,
            doc: Doc::new(),
            replica: 0,
            head: 0,
            epoch: String::new(),
            next_client_seq: 1,
            unacked: Default::default(),
            seqs: Vec::new(),
            presence: Vec::new(),
        };
        match editor.recv() {
            ServerMessage::HelloAck(_) => {}
            other => panic!("expected hello_ack, got {other:?}"),
        }
        editor
    }

    /// Reads and applies one server message, checking order; returns it.
    pub fn recv(&mut self) -> ServerMessage {
        let text = loop {
            match self.ws.read().expect("read") {
                Message::Text(text) => break text,
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => {}
            }
        };
        let message = proto::parse_server_message(&text)
            .unwrap_or_else(|e| panic!("bad server frame {text}: {e}"));
        match &message {
            ServerMessage::HelloAck(ack) => {
                self.replica = ack.replica;
                self.epoch = ack.epoch.clone();
                match &ack.strategy {
                    HelloAckStrategy::Snapshot(runs) => {
                        self.doc = Doc::from_snapshot(runs).expect("snapshot decodes");
                        self.head = ack.head;
                    }
                    HelloAckStrategy::Replay(echoes) => {
                        for echo in echoes {
                            self.apply_echo(
                                echo.server_seq,
                                echo.client_seq,
                                echo.replica,
                                &echo.ops,
                            );
                        }
                        assert_eq!(self.head, ack.head, "replay ends at head");
                    }
                }
                for entry in &ack.presence {
                    self.presence
                        .push((entry.replica, entry.state_json.clone()));
                }
            }
            ServerMessage::OpEcho(echo) => {
                self.apply_echo(echo.server_seq, echo.client_seq, echo.replica, &echo.ops)
            }
            ServerMessage::Ack {
                client_seq,
                server_seq,
            } => {
                assert!(*server_seq <= self.head.max(*server_seq));
                self.unacked.remove(client_seq);
            }
            ServerMessage::Presence {
                replica,
                state_json,
            } => self.presence.push((*replica, state_json.clone())),
            ServerMessage::Error { .. } => {}
        }
        message
    }

    fn apply_echo(&mut self, server_seq: u64, client_seq: u64, replica: u64, ops: &[Op]) {
        assert_eq!(
            server_seq,
            self.head + 1,
            "server_seq is gap-free and ordered"
        );
        self.head = server_seq;
        self.seqs.push(server_seq);
        self.doc
            .apply_remote(None, ops)
            .expect("an echo always applies");
        if replica == self.replica {
            self.unacked.remove(&client_seq);
        }
    }

    /// Sends an op message of `ops` (already applied locally); returns its client_seq.
    pub fn send_ops(&mut self, ops: &[Op]) -> u64 {
        let client_seq = self.next_client_seq;
        self.next_client_seq += 1;
        let text = proto::encode_op(client_seq, ops);
        send(&mut self.ws, &text);
        self.unacked.insert(client_seq, text);
        client_seq
    }

    /// Applies one trace-like patch locally (clamped to the current length) and sends it.
    pub fn edit(&mut self, pos: usize, del: usize, ins: &str) {
        let len = self.doc.len();
        let pos = pos.min(len);
        let del = del.min(len - pos);
        let mut ops = Vec::new();
        if del > 0 {
            ops.extend(self.doc.delete_local(pos, del));
        }
        if !ins.is_empty() {
            ops.push(self.doc.insert_local(self.replica, pos, ins));
        }
        if !ops.is_empty() {
            self.send_ops(&ops);
        }
    }

    /// Reads until every sent op message got its echo or ack.
    pub fn settle(&mut self) {
        while !self.unacked.is_empty() {
            self.recv();
        }
    }

    /// Reads until `head` reaches `target`.
    pub fn catch_up(&mut self, target: u64) {
        while self.head < target {
            self.recv();
        }
    }
}

/// The real binary on an ephemeral port (memory storage, or a fresh PostgreSQL database when
/// [`on_postgres`]; 2 shards) and the address it printed
/// (`listening on http://ADDR`).
pub fn spawn_server() -> (std::process::Child, SocketAddr) {
    spawn_server_with(&[])
}

/// [`spawn_server`] with more flags.
pub fn spawn_server_with(extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"));
    command.args(["--listen", "127.0.0.1:0", "--shards", "2", "--no-pin-cores"]);
    if on_postgres() {
        let (url, data_dir) = postgres_store("it-binary");
        command
            .args(["--database-url", &url])
            .arg("--data-dir")
            .arg(data_dir);
    } else {
        command.args(["--storage", "memory"]);
    }
    command.env_remove("COLLAB_DATABASE_URL");
    command.args(extra);
    spawn_command(command)
}

/// Spawns `command` (the real binary with its flags) with stdout piped and returns it with the
/// address it printed first (`listening on http://ADDR`).
pub fn spawn_command(mut command: std::process::Command) -> (std::process::Child, SocketAddr) {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the server");
    crate::watchdog::kill_on_abort(child.id());
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("first line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .expect("an address");
    (child, addr)
}

/// `n` masked client frames with the first header byte `head` (FIN and opcode) and an empty
/// payload.
pub fn empty_frames(head: u8, n: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(6 * n);
    for _ in 0..n {
        bytes.extend_from_slice(&[head, 0x80, 1, 2, 3, 4]);
    }
    bytes
}

/// Streams unsolicited pongs, then pings whose pongs are never read, from one connection to
/// `addr` (up to 15 s each), and calls `serve` with `"pongs"` or `"pings"` while each flood runs.
/// Returns, per flood, whether the flood was still running when `serve` returned (`true`:
/// served during it, not after it).
pub fn during_control_floods(
    addr: SocketAddr,
    mut serve: impl FnMut(&'static str),
) -> Vec<(&'static str, bool)> {
    let mut outcomes = Vec::new();
    for (what, head) in [("pongs", 0x8a), ("pings", 0x89)] {
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let flooder = flood(
            addr,
            empty_frames(head, 1 << 16),
            started_tx,
            stop.clone(),
            Duration::from_secs(15),
        );
        started_rx.recv().expect("the flood started");
        serve(what);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        outcomes.push((what, flooder.join().expect("flooder")));
    }
    outcomes
}

/// Sends `frames` over and over on one connection until `stop` is set or `bound` passes;
/// returns whether it was stopped (true) or ran out of time (false). A server that stops
/// reading (backpressure) only slows it down: each frame stays whole across partial writes.
pub fn flood(
    addr: SocketAddr,
    frames: Vec<u8>,
    started: std::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    bound: Duration,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let stream = TcpStream::connect(addr).expect("connect");
        let (ws, _) =
            tungstenite::client::client(format!("ws://{addr}/ws"), stream).expect("handshake");
        let mut stream = ws.into_inner();
        stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .expect("write timeout");
        let deadline = std::time::Instant::now() + bound;
        let mut offset = 0;
        let mut told = false;
        while std::time::Instant::now() < deadline {
            if stop.load(Ordering::Relaxed) {
                return true;
            }
            match stream.write(&frames[offset..]) {
                Ok(n) => {
                    offset = (offset + n) % frames.len();
                    if !told {
                        told = true;
                        let _ = started.send(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("the server broke the flooding connection: {e}"),
            }
        }
        false
    })
}
