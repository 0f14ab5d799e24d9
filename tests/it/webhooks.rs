//! The change feed over real sockets: a test receiver (a std `TcpListener` on 127.0.0.1) gets
//! signed webhooks after WebSocket edits; bursts are debounced to the latest head; a failing
//! receiver (500, then a closed port) gets retries with the same delivery id; pending
//! deliveries survive `kill -9` of the real binary; bad flags stop the server at startup.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use collab_engine::loadgen::prom::{self, Kind};
use collab_engine::webhooks::{WebhookUrl, Webhooks};
use hmac::{Hmac, KeyInit, Mac};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use sha2::Sha256;

use crate::util::{server, spawn_command, test_config, Editor, Watchdog};

/// The secret every test signs with (a trailing newline is part of it, byte for byte).
const SECRET: &[u8] = b"test-webhook-secret-0123456789abcdef\n";

/// How long a test waits for one delivery before failing.
const DELIVERY_WAIT: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// The status it answered.
    status: u16,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    fn id(&self) -> String {
        self.header("x-collab-delivery").to_owned()
    }

    /// Checks the signature against the secret, as a receiver would.
    fn assert_signed(&self) {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
        mac.update(&self.body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            self.header("x-collab-signature"),
            format!("sha256={hex}"),
            "signature of {:?}",
            String::from_utf8_lossy(&self.body)
        );
    }
}

/// A webhook receiver on 127.0.0.1 answering every request with `status`.
struct Receiver {
    addr: SocketAddr,
    got: mpsc::Receiver<Got>,
    status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(port: u16, status: u16) -> Receiver {
        Receiver::start_with(port, status, None)
    }

    /// A receiver speaking TLS with `tls`'s certificate.
    fn start_with(port: u16, status: u16, tls: Option<Arc<ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (tx, got) = mpsc::channel();
        let status = Arc::new(AtomicU16::new(status));
        let stop = Arc::new(AtomicBool::new(false));
        let (answer, done) = (status.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let status = answer.load(Ordering::Relaxed);
                        if stream.set_nonblocking(false).is_err()
                            || stream
                                .set_read_timeout(Some(Duration::from_secs(10)))
                                .is_err()
                        {
                            continue;
                        }
                        let got = match &tls {
                            None => serve(stream, status),
                            Some(config) => match ServerConnection::new(config.clone()) {
                                Ok(session) => serve(StreamOwned::new(session, stream), status),
                                Err(_) => None,
                            },
                        };
                        if let Some(got) = got {
                            let _ = tx.send(got);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("receiver accept: {e}"),
                }
            }
        });
        Receiver {
            addr,
            got,
            status,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/collab?src=test", self.addr)
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// The next request, or a failed test.
    fn next(&self) -> Got {
        self.got
            .recv_timeout(DELIVERY_WAIT)
            .expect("a webhook delivery within the wait")
    }

    /// Closes the listening socket (connections are then refused); returns its port.
    fn close(mut self) -> u16 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("receiver thread");
        }
        self.addr.port()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request and answers `status`.
fn serve(mut stream: impl Read + Write, status: u16) -> Option<Got> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, headers) = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut slots);
        if let Ok(httparse::Status::Complete(len)) = request.parse(&buf) {
            assert_eq!(request.method, Some("POST"));
            assert_eq!(request.path, Some("/hooks/collab?src=test"));
            let headers: HashMap<String, String> = request
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            break (len, headers);
        }
    };
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    while buf.len() < head_len + length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
    Some(Got {
        headers,
        body: buf[head_len..head_len + length].to_vec(),
        status,
    })
}

/// A fresh folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("webhooks-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("webhook.secret");
    std::fs::write(&path, SECRET).expect("write the secret");
    path
}

/// The server's test configuration delivering to `url`.
fn hooked_config(url: &str, dir: &Path, debounce: Duration) -> collab_engine::config::Config {
    let mut config = test_config();
    config.webhooks.webhook_urls = vec![WebhookUrl::parse(url).expect("url")];
    config.webhooks.webhook_secret_file = Some(secret_file(dir));
    config.webhooks.webhook_debounce = debounce;
    config.webhooks.webhook_retry_initial = Duration::from_millis(100);
    config.webhooks.webhook_retry_max = Duration::from_millis(400);
    config.webhooks.webhook_timeout = Duration::from_secs(5);
    config
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn webhooks_are_signed_and_a_burst_is_debounced_to_the_latest_head() {
    let _watchdog = Watchdog::new("webhooks_signed_debounced", 120);
    let dir = temp_dir("debounce");
    let receiver = Receiver::start(0, 204);
    let debounce = Duration::from_millis(700);
    let server = server(hooked_config(&receiver.url(), &dir, debounce));
    let addr = server.local_addr();
    let mut editor = Editor::join(addr, "/ws/hooked%2Fdoc", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "h");
    editor.settle();

    // The first change after a quiet window goes out at once.
    let first = receiver.next();
    first.assert_signed();
    assert_eq!(first.header("content-type"), "application/json");
    assert_eq!(first.header("x-collab-event"), "changed");
    assert_eq!(first.id().len(), 32, "{first:?}");
    let body = first.json();
    assert_eq!(body["event"], "changed");
    assert_eq!(body["doc"], "hooked/doc");
    assert_eq!(body["epoch"], editor.epoch.as_str());
    assert_eq!(body["head"], 1);
    let time = body["time"].as_str().expect("time");
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    let keys: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 5, "{keys:?}");

    // A burst of op messages: few deliveries, each later than the one before, the last one
    // naming the final head.
    let n_edits = 40;
    let started = Instant::now();
    for i in 0..n_edits {
        editor.edit(i + 1, 0, "x");
    }
    editor.settle();
    let burst = started.elapsed();
    let head = editor.head;
    assert_eq!(head, n_edits as u64 + 1);
    let mut deliveries = Vec::new();
    loop {
        let got = receiver.next();
        got.assert_signed();
        let seen = got.json()["head"].as_u64().expect("head");
        deliveries.push(got);
        if seen == head {
            break;
        }
        assert!(seen < head, "a head past the document's");
    }
    let heads: Vec<u64> = deliveries
        .iter()
        .map(|g| g.json()["head"].as_u64().unwrap_or(0))
        .collect();
    assert!(heads.windows(2).all(|w| w[0] < w[1]), "{heads:?}");
    // At most one per window over the burst (plus the window it ends in).
    let windows = (burst.as_millis() / debounce.as_millis()) as usize + 2;
    assert!(
        deliveries.len() <= windows && deliveries.len() < n_edits,
        "{} deliveries for {n_edits} op messages over {burst:?}: {heads:?}",
        deliveries.len()
    );
    let mut ids: Vec<String> = deliveries.iter().map(Got::id).collect();
    ids.push(first.id());
    let n_ids = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n_ids, "a new delivery id for each delivery");
    assert!(
        receiver.got.try_recv().is_err(),
        "nothing after the latest head"
    );

    // The receiver answered before the server counted: wait for the count.
    let text = loop {
        let text = server.metrics().render_prometheus();
        let sent = metric(&text, "collab_webhook_sent_total");
        assert!(sent <= deliveries.len() as u64 + 1, "{text}");
        if sent == deliveries.len() as u64 + 1 {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(metric(&text, "collab_webhook_failed_total"), 0);
    assert_eq!(metric(&text, "collab_webhook_dropped_total"), 0);
    assert!(text.contains("collab_webhook_pending{url=\"0\"}"), "{text}");
    // The scrape stays a valid exposition with the webhook families in it.
    let families = prom::parse(&text).unwrap_or_else(|e| panic!("invalid exposition: {e}"));
    for (name, kind) in [
        ("collab_webhook_sent_total", Kind::Counter),
        ("collab_webhook_failed_total", Kind::Counter),
        ("collab_webhook_dropped_total", Kind::Counter),
        ("collab_webhook_pending", Kind::Gauge),
    ] {
        let family = families.iter().find(|f| f.name == name).expect(name);
        assert_eq!(family.kind, kind, "{name}");
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_failing_receiver_gets_retries_with_the_same_delivery_id() {
    let _watchdog = Watchdog::new("webhooks_retry", 120);
    let dir = temp_dir("retry");
    let receiver = Receiver::start(0, 500);
    let server = server(hooked_config(
        &receiver.url(),
        &dir,
        Duration::from_millis(200),
    ));
    let mut editor = Editor::join(server.local_addr(), "/ws/retried", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "abc");
    editor.settle();
    let first = receiver.next();
    let second = receiver.next();
    assert_eq!((first.status, second.status), (500, 500));
    assert_eq!(first.id(), second.id(), "a retry keeps its delivery id");
    assert_eq!(first.body, second.body, "and its exact body");
    second.assert_signed();

    // Then nobody listens: connection refused, retried with backoff.
    let port = receiver.close();
    let failed_before = metric(
        &server.metrics().render_prometheus(),
        "collab_webhook_failed_total",
    );
    assert!(
        failed_before >= 1,
        "the first 500 was counted before its retry"
    );
    loop {
        let text = server.metrics().render_prometheus();
        if metric(&text, "collab_webhook_failed_total") >= failed_before + 2 {
            assert_eq!(
                metric(&text, "collab_webhook_pending{url=\"0\"}"),
                1,
                "{text}"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The receiver comes back on the same port and answers 200: the same delivery arrives.
    let receiver = Receiver::start(port, 200);
    let third = receiver.next();
    assert_eq!(third.id(), first.id());
    assert_eq!(third.body, first.body);
    third.assert_signed();
    assert_eq!(third.json()["head"], 1);
    loop {
        let text = server.metrics().render_prometheus();
        if metric(&text, "collab_webhook_sent_total") == 1 {
            assert_eq!(
                metric(&text, "collab_webhook_pending{url=\"0\"}"),
                0,
                "{text}"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.shutdown().expect("clean shutdown");
}

/// The real binary with disk storage in `data_dir`, delivering to `url`.
fn spawn_hooked(data_dir: &Path, url: &str, secret: &Path) -> (std::process::Child, SocketAddr) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"));
    command
        .args(["--listen", "127.0.0.1:0", "--shards", "2", "--no-pin-cores"])
        .args(["--storage", "disk", "--data-dir"])
        .arg(data_dir)
        .args(["--webhook-url", url, "--webhook-secret-file"])
        .arg(secret)
        .args([
            "--webhook-retry-initial",
            "200ms",
            "--webhook-retry-max",
            "500ms",
        ])
        .env_remove("COLLAB_DATABASE_URL");
    spawn_command(command)
}

#[test]
fn pending_deliveries_survive_kill_9_with_their_delivery_id() {
    let _watchdog = Watchdog::new("webhooks_kill_9", 120);
    let dir = temp_dir("kill9");
    let data_dir = dir.join("data");
    let secret = secret_file(&dir);
    let receiver = Receiver::start(0, 503);
    let (mut child, addr) = spawn_hooked(&data_dir, &receiver.url(), &secret);
    let mut editor = Editor::join(addr, "/ws/survivor", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "kept");
    editor.settle();
    let epoch = editor.epoch.clone();
    let refused = receiver.next();
    assert_eq!(refused.status, 503);
    drop(editor);
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    // From now on the receiver accepts: only the restarted server can deliver.
    receiver.answer(200);
    while receiver.got.try_recv().is_ok() {}
    let (mut child, _addr) = spawn_hooked(&data_dir, &receiver.url(), &secret);
    let delivered = loop {
        let got = receiver.next();
        if got.status == 200 {
            break got;
        }
    };
    assert_eq!(
        delivered.id(),
        refused.id(),
        "the same delivery after the restart"
    );
    assert_eq!(delivered.body, refused.body);
    delivered.assert_signed();
    let body = delivered.json();
    assert_eq!(
        (body["doc"].as_str(), body["head"].as_u64()),
        (Some("survivor"), Some(1))
    );
    assert_eq!(body["epoch"], epoch.as_str());
    child.kill().expect("kill");
    child.wait().expect("reaped");
}

#[test]
fn the_sink_delivers_deleted_events() {
    let _watchdog = Watchdog::new("webhooks_deleted", 60);
    let dir = temp_dir("deleted");
    let receiver = Receiver::start(0, 200);
    let config = hooked_config(&receiver.url(), &dir, Duration::from_secs(1));
    let webhooks = Webhooks::start(&config.webhooks, Some(dir.join("state"))).expect("start");
    let sink = webhooks.sink();
    sink.changed("gone", "E1", 3);
    sink.deleted("gone", "E1");
    let mut got = receiver.next();
    if got.json()["event"] == "changed" {
        // The change was sealed before the delete arrived: it goes first, then the delete.
        got = receiver.next();
    }
    got.assert_signed();
    assert_eq!(got.header("x-collab-event"), "deleted");
    let body = got.json();
    assert_eq!(body["event"], "deleted");
    assert_eq!(
        (body["doc"].as_str(), body["epoch"].as_str()),
        (Some("gone"), Some("E1"))
    );
    assert!(body.get("head").is_none(), "{body}");
    assert!(body["time"].is_string());
    webhooks.shutdown();
}

#[test]
fn an_http_delete_is_delivered_after_the_documents_last_change() {
    let _watchdog = Watchdog::new("webhooks_http_delete", 60);
    let dir = temp_dir("http-delete");
    let receiver = Receiver::start(0, 200);
    let server = server(hooked_config(&receiver.url(), &dir, Duration::from_secs(1)));
    let addr = server.local_addr();
    let mut editor = Editor::join(addr, "/ws/doomed", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "bye");
    editor.settle();
    let epoch = editor.epoch.clone();
    let (status, body) = crate::api::api(addr, "DELETE", "/api/docs/doomed", None, "");
    assert_eq!(status, 200, "{body}");
    // Every event of the document, in order: its changes, then exactly one `deleted`.
    let mut events = Vec::new();
    loop {
        let got = receiver.next();
        got.assert_signed();
        let json = got.json();
        assert_eq!(json["doc"], "doomed");
        assert_eq!(json["epoch"], epoch.as_str());
        let done = json["event"] == "deleted";
        events.push(json["event"].as_str().unwrap_or_default().to_owned());
        if done {
            break;
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("deleted"));
    assert!(
        events[..events.len() - 1].iter().all(|e| e == "changed"),
        "{events:?}"
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn bad_webhook_flags_stop_the_server_at_startup() {
    let _watchdog = Watchdog::new("webhooks_bad_flags", 60);
    let dir = temp_dir("flags");
    let empty = dir.join("empty.secret");
    std::fs::write(&empty, b"").expect("write");
    let good = secret_file(&dir);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--storage",
                "memory",
                "--no-pin-cores",
            ])
            .args(args)
            .env_remove("COLLAB_DATABASE_URL")
            .output()
            .expect("run the server");
        assert!(!out.status.success(), "{args:?} must not start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let good = good.to_str().expect("utf-8");
    let empty = empty.to_str().expect("utf-8");
    let err = run(&[
        "--webhook-url",
        "https://example.com/h",
        "--webhook-secret-file",
        good,
    ]);
    assert!(err.contains("needs --webhook-ca-file"), "{err}");
    let err = run(&[
        "--webhook-url",
        "https://example.com/h",
        "--webhook-secret-file",
        good,
        "--webhook-ca-file",
        good,
    ]);
    assert!(err.contains("no CERTIFICATE block"), "{err}");
    let err = run(&["--webhook-url", "ftp://example.com/h"]);
    assert!(err.contains("not an http:// or https:// URL"), "{err}");
    let err = run(&["--webhook-url", "http://127.0.0.1:9/h"]);
    assert!(err.contains("needs --webhook-secret-file"), "{err}");
    let err = run(&[
        "--webhook-url",
        "http://127.0.0.1:9/h",
        "--webhook-secret-file",
        empty,
    ]);
    assert!(err.contains("holds 0 bytes"), "{err}");
    let err = run(&[
        "--webhook-url",
        "http://127.0.0.1:9/h",
        "--webhook-url",
        "http://127.0.0.1:9/h",
        "--webhook-secret-file",
        good,
    ]);
    assert!(err.contains("given twice"), "{err}");
}

/// The Python receiver of docs/webhooks.md, taken from the page.
fn documented_receiver() -> String {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/webhooks.md"))
        .expect("docs/webhooks.md");
    let start = page.find("```python\n").expect("a python block") + "```python\n".len();
    let len = page[start..].find("```").expect("the block's end");
    page[start..start + len].to_owned()
}

#[test]
fn the_documented_python_receiver_verifies_deliveries() {
    let _watchdog = Watchdog::new("webhooks_python_receiver", 120);
    let dir = temp_dir("python");
    let script = dir.join("receiver.py");
    std::fs::write(&script, documented_receiver()).expect("write the script");
    let secret = secret_file(&dir);
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut python = std::process::Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .arg(&secret)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs the documented receiver");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        python.stdout.take().expect("stdout"),
    ));
    let mut line = || lines.next().expect("a line").expect("readable");
    assert_eq!(line(), "ready");

    // A request signed with another secret is refused with 401.
    let mut forged = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let body = r#"{"event":"changed","doc":"x","epoch":"e","head":1,"time":"t"}"#;
    write!(
        forged,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Collab-Delivery: forged\r\nX-Collab-Signature: sha256={}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        "0".repeat(64)
    )
    .expect("send");
    let mut answer = String::new();
    forged.read_to_string(&mut answer).expect("answer");
    assert!(
        answer.starts_with("HTTP/1.0 401") || answer.starts_with("HTTP/1.1 401"),
        "{answer}"
    );

    let url = format!("http://127.0.0.1:{port}/collab");
    let server = server(hooked_config(&url, &dir, Duration::from_millis(200)));
    let mut editor = Editor::join(server.local_addr(), "/ws/py-doc", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "hi");
    editor.settle();
    assert_eq!(
        line(),
        format!("changed py-doc epoch={} head=1", editor.epoch)
    );
    let text = server.metrics().render_prometheus();
    server.shutdown().expect("clean shutdown");
    assert_eq!(metric(&text, "collab_webhook_failed_total"), 0, "{text}");
    python.kill().expect("stop python");
    python.wait().expect("reaped");
}

/// A throw-away CA in `dir` and a certificate it signs for 127.0.0.1, made with the openssl
/// command (as `scripts/pg-local.sh --tls` does); returns the CA file and the receiver's TLS
/// settings.
fn make_certs(dir: &Path) -> (PathBuf, Arc<ServerConfig>) {
    std::fs::create_dir_all(dir).expect("cert dir");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (apt-get install openssl) makes the test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-new"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=webhook test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .expect("server.crt")
        .collect::<Result<_, _>>()
        .expect("PEM");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the receiver's certificate");
    (dir.join("ca.pem"), Arc::new(config))
}

#[test]
fn https_receivers_are_verified_against_the_ca_file() {
    let _watchdog = Watchdog::new("webhooks_https", 120);
    let dir = temp_dir("https");
    let (ca, tls) = make_certs(&dir.join("a"));
    let (other_ca, _) = make_certs(&dir.join("b"));
    let receiver = Receiver::start_with(0, 200, Some(tls));
    let url = format!(
        "https://127.0.0.1:{}/hooks/collab?src=test",
        receiver.addr.port()
    );
    let mut config = hooked_config(&url, &dir, Duration::from_millis(200));
    config.webhooks.webhook_ca_file = Some(ca);
    let server = server(config.clone());
    let mut editor = Editor::join(server.local_addr(), "/ws/tls-doc", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "secure");
    editor.settle();
    let got = receiver.next();
    got.assert_signed();
    assert_eq!(got.json()["head"], 1);
    assert_eq!(
        got.header("host"),
        format!("127.0.0.1:{}", receiver.addr.port())
    );
    server.shutdown().expect("clean shutdown");

    // A certificate from another CA does not verify: attempts fail, nothing is delivered.
    config.webhooks.webhook_ca_file = Some(other_ca);
    let server = crate::util::server(config);
    let mut editor = Editor::join(server.local_addr(), "/ws/tls-doc-2", r#"{"type":"hello"}"#);
    editor.edit(0, 0, "x");
    editor.settle();
    while metric(
        &server.metrics().render_prometheus(),
        "collab_webhook_failed_total",
    ) < 2
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = server.metrics().render_prometheus();
    assert_eq!(metric(&text, "collab_webhook_sent_total"), 0, "{text}");
    assert!(
        receiver.got.try_recv().is_err(),
        "nothing reached the receiver"
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_stalled_receiver_never_blocks_the_shards_and_the_queue_stays_bounded() {
    let _watchdog = Watchdog::new("webhooks_stalled_receiver", 120);
    let dir = temp_dir("stalled");
    // Accepts connections and never answers: every attempt runs into the deadline.
    let stall = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = stall.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let held = {
        let stop = stop.clone();
        stall.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let mut open = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match stall.accept() {
                    Ok((stream, _)) => open.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            open.len()
        })
    };
    let url = format!("http://127.0.0.1:{port}/hooks/collab?src=test");
    let mut config = hooked_config(&url, &dir, Duration::from_millis(100));
    config.webhooks.webhook_timeout = Duration::from_millis(500);
    config.webhooks.webhook_pending_max = 5;
    let server = server(config);
    // Every document's edits are acknowledged while the receiver hangs.
    let n_docs = 20;
    for n in 0..n_docs {
        let mut editor = Editor::join(
            server.local_addr(),
            &format!("/ws/stalled-{n}"),
            r#"{"type":"hello"}"#,
        );
        // One op message per document: one event each, so the counts below are exact.
        editor.edit(0, 0, "zz");
        editor.settle();
        assert_eq!(editor.head, 1);
    }
    // Five documents are queued; the events of the fifteen others are dropped and counted.
    let text = loop {
        let text = server.metrics().render_prometheus();
        if metric(&text, "collab_webhook_dropped_total") >= n_docs - 5 {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        metric(&text, "collab_webhook_dropped_total"),
        n_docs - 5,
        "{text}"
    );
    assert_eq!(
        metric(&text, "collab_webhook_pending{url=\"0\"}"),
        5,
        "{text}"
    );
    assert_eq!(metric(&text, "collab_webhook_sent_total"), 0);
    server
        .shutdown()
        .expect("a clean shutdown despite the hanging receiver");
    stop.store(true, Ordering::Relaxed);
    assert!(
        held.join().expect("stall thread") >= 1,
        "attempts reached the receiver"
    );
}
