//! Shared helpers: a watchdog, servers in-process, blocking WebSocket clients with timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use collab_engine::config::Config;
use collab_engine::server::{start, ServerHandle};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long any single client read may wait before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Aborts the whole test process if the test is still running after `seconds`: a hang must
/// fail CI, never stall it.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(name: &'static str, seconds: u64) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            for _ in 0..seconds * 10 {
                std::thread::sleep(Duration::from_millis(100));
                if flag.load(Ordering::Relaxed) {
                    return;
                }
            }
            eprintln!("watchdog: test {name} still running after {seconds}s; aborting");
            std::process::abort();
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The test configuration: memory storage, 2 shards, port 0.
pub fn test_config() -> Config {
    Config::for_tests("127.0.0.1:0".parse().expect("valid address"))
}

/// Starts a server with `config`.
pub fn server(config: Config) -> ServerHandle {
    let _ = env_logger::builder().is_test(true).try_init();
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
