//! Durability with the real binary: clients record every op they saw echoed, the server is
//! killed with SIGKILL at random moments, restarted (with other shard counts), and every
//! echoed op must still be there exactly once, with `server_seq` never reused.
//! Also: an idle document leaves memory and comes back intact.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

#[path = "support/pg.rs"]
mod pg;
#[path = "support/watchdog.rs"]
mod watchdog;

use watchdog::Watchdog;

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The server binary, running.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &Path, shards: usize, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_collab-engine"))
            .args(["--listen", "127.0.0.1:0", "--no-pin-cores", "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn collab-engine");
        watchdog::kill_on_abort(child.id());
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server printed its address");
        Server {
            child,
            addr: addr.parse().expect("address"),
        }
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        watchdog::forget_child(self.child.id());
    }
}

fn connect(addr: SocketAddr, doc: &str) -> Option<Ws> {
    let stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    stream.set_nodelay(true).ok()?;
    // Percent-encode everything but unreserved characters and '/', which names may contain.
    let mut path = String::new();
    for byte in doc.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            path.push(byte as char);
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    // The short read timeout interrupts a slow handshake; resume it until a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = tungstenite::client::client(
        format!("ws://{addr}/ws/{path}"),
        MaybeTlsStream::Plain(stream),
    );
    loop {
        match attempt {
            Ok((ws, _)) => return Some(ws),
            Err(tungstenite::HandshakeError::Interrupted(mid)) if Instant::now() < deadline => {
                attempt = mid.handshake();
            }
            Err(_) => return None,
        }
    }
}

/// Reads one JSON frame; `Ok(None)` on a read timeout; `Err` when the connection is gone.
fn read_json(ws: &mut Ws) -> Result<Option<serde_json::Value>, ()> {
    match ws.read() {
        Ok(Message::Text(text)) => serde_json::from_str(text.as_str())
            .map(Some)
            .map_err(|_| ()),
        Ok(Message::Close(_)) => Err(()),
        Ok(_) => Ok(None),
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(_) => Err(()),
    }
}

/// Waits for the `hello_ack`, up to `timeout`.
fn hello(ws: &mut Ws, doc: &str, timeout: Duration) -> Option<serde_json::Value> {
    let hello = serde_json::json!({"type": "hello", "doc": doc});
    ws.send(Message::text(hello.to_string())).ok()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match read_json(ws) {
            Ok(Some(v)) if v["type"] == "hello_ack" => return Some(v),
            Ok(Some(v)) if v["type"] == "error" => return None,
            Ok(_) => {}
            Err(()) => return None,
        }
    }
    None
}

/// The visible text of a snapshot `hello_ack`.
fn snapshot_text(ack: &serde_json::Value) -> String {
    assert_eq!(ack["strategy"], "snapshot", "{ack}");
    let mut text = String::new();
    for run in ack["snapshot"]["runs"].as_array().expect("runs") {
        if let Some(t) = run["text"].as_str() {
            text.push_str(t);
        }
    }
    text
}

/// Head and text a joiner ends up with: the `hello_ack` snapshot plus the `op_echo` frames
/// that may follow it (a big document's joiner can get a slightly older snapshot and then the
/// echoes since). The inserted texts of those echoes are appended (marker counting ignores
/// order).
fn joined_state(ws: &mut Ws, ack: &serde_json::Value) -> (u64, String) {
    let mut head = ack["head"].as_u64().expect("head");
    let mut text = snapshot_text(ack);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) {
        match read_json(ws) {
            Ok(Some(v)) if v["type"] == "op_echo" => {
                let seq = v["server_seq"].as_u64().expect("server_seq");
                assert_eq!(
                    seq,
                    head + 1,
                    "catch-up echoes follow the snapshot in order"
                );
                head = seq;
                for op in v["ops"].as_array().expect("ops") {
                    if let Some(t) = op["text"].as_str() {
                        text.push_str(t);
                    }
                }
                quiet_since = Instant::now();
            }
            Ok(_) => {}
            Err(()) => break,
        }
    }
    (head, text)
}

fn marker(replica: u64, client_seq: u64) -> String {
    format!("<{replica}.{client_seq}>")
}

/// What one client saw in one round.
#[derive(Default)]
struct Seen {
    /// (doc, epoch, replica) per connection that got a hello_ack.
    joins: Vec<(String, String, u64)>,
    /// Every op_echo received: (doc, server_seq, marker).
    echoes: Vec<(String, u64, String)>,
    /// Markers of every op sent (acknowledged or not).
    sent: Vec<(String, String)>,
}

/// One client: joins `doc`, keeps up to 8 ops in flight until the connection dies or `stop`.
fn client(addr: SocketAddr, doc: String, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let Some(mut ws) = connect(addr, &doc) else {
        return seen;
    };
    let Some(ack) = hello(&mut ws, &doc, Duration::from_secs(10)) else {
        return seen;
    };
    let replica = ack["replica"].as_u64().expect("replica");
    seen.joins.push((
        doc.clone(),
        ack["epoch"].as_str().unwrap_or_default().to_owned(),
        replica,
    ));
    let mut next_seq = 0u64;
    let mut in_flight = HashSet::new();
    let mut lamport = 0u64;
    while !stop.load(Ordering::Relaxed) {
        while in_flight.len() < 8 {
            let text = marker(replica, next_seq);
            let op = serde_json::json!({
                "type": "op", "client_seq": next_seq,
                "ops": [{"kind": "ins", "id": [lamport, replica], "after": null, "text": text}],
            });
            lamport += text.chars().count() as u64;
            if ws.send(Message::text(op.to_string())).is_err() {
                return seen;
            }
            seen.sent.push((doc.clone(), text));
            in_flight.insert(next_seq);
            next_seq += 1;
        }
        match read_json(&mut ws) {
            Ok(Some(v)) if v["type"] == "op_echo" => {
                let seq = v["server_seq"].as_u64().expect("server_seq");
                let echo_replica = v["replica"].as_u64().expect("replica");
                let client_seq = v["client_seq"].as_u64().expect("client_seq");
                seen.echoes
                    .push((doc.clone(), seq, marker(echo_replica, client_seq)));
                if echo_replica == replica {
                    in_flight.remove(&client_seq);
                }
            }
            Ok(Some(v)) if v["type"] == "error" => {
                // `unavailable` after a storage failure: never acknowledged, so not counted.
                if let Some(k) = v["client_seq"].as_u64() {
                    in_flight.remove(&k);
                }
            }
            Ok(_) => {}
            Err(()) => return seen,
        }
    }
    seen
}

/// `CRASH_REPEAT=n` runs the crash test's 12 rounds n times (a longer search for rare losses).
fn crash_repeat() -> usize {
    std::env::var("CRASH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A tiny deterministic generator (no rand crate needed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn acknowledged_ops_survive_sigkill_and_other_shard_counts() {
    let _watchdog = Watchdog::new("crash test", 90 * crash_repeat() as u64);
    sigkill_rounds(&temp_dir("sigkill"), None);
}

/// The same rounds with documents in PostgreSQL; some rounds also restart the database
/// (`-m fast`, `-m immediate`), terminate the server's sessions, or freeze the whole database
/// for longer than `--database-timeout` while the clients write.
#[test]
fn acknowledged_ops_survive_sigkill_and_database_faults_on_postgres() {
    let _watchdog = Watchdog::new("crash test on PostgreSQL", 240 * crash_repeat() as u64);
    let db = pg::OwnServer::start("crash");
    sigkill_rounds(&temp_dir("sigkill-pg"), Some(&db));
}

/// A fault of the database in the middle of a round.
fn database_fault(db: &pg::OwnServer, round: usize) {
    match round % 4 {
        0 => db.ctl(&["restart", "-m", "fast"]),
        1 => {
            db.terminate_sessions();
        }
        2 => db.ctl(&["restart", "-m", "immediate"]),
        _ => db.pause(Duration::from_millis(1500)),
    }
}

/// SIGKILL rounds under client load with `shards` varying; `db`: on PostgreSQL.
fn sigkill_rounds(dir: &Path, db: Option<&pg::OwnServer>) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let docs: Vec<String> = ["alpha", "beta", "gamma/with slash", "delta"]
        .map(String::from)
        .to_vec();
    // Small snapshot cadence so crashes also hit snapshot writes and log compaction.
    let mut extra = vec!["--snapshot-every-ops", "25", "--fsync", "always"];
    if let Some(db) = db {
        extra.extend(["--database-url", &db.url, "--database-timeout", "1s"]);
    }
    let mut all = Seen::default();
    // Journals a kill left behind (with bytes in them), to check the next start redoes them.
    let mut left_journals: Vec<PathBuf> = Vec::new();
    let mut rounds_with_redo = 0;
    let repeat = crash_repeat();
    let pattern = [1usize, 2, 3, 2, 1, 4, 1, 3, 2, 4, 1, 2];
    for (round, shards) in pattern
        .iter()
        .copied()
        .cycle()
        .take(pattern.len() * repeat)
        .enumerate()
    {
        let server = Server::start(dir, shards, &extra);
        // Redo at startup (under another shard count than the one that wrote them) applied and
        // removed every journal the previous process left.
        for journal in left_journals.drain(..) {
            assert!(
                !journal.exists(),
                "{} survived a restart",
                journal.display()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = docs
            .iter()
            .flat_map(|doc| [doc.clone(), doc.clone()])
            .map(|doc| {
                let stop = stop.clone();
                let addr = server.addr;
                std::thread::spawn(move || client(addr, doc, stop))
            })
            .collect();
        // Some kills land during startup and the first hellos, most in full traffic.
        std::thread::sleep(Duration::from_millis(30 + rng.below(700)));
        if let Some(db) = db.filter(|_| round % 3 == 1) {
            // The database fails under the running server, which stays up; the kill comes
            // while it recovers or after.
            database_fault(db, round / 3);
            std::thread::sleep(Duration::from_millis(rng.below(1500)));
        }
        server.kill();
        left_journals = journals_with_entries(dir);
        rounds_with_redo += usize::from(!left_journals.is_empty());
        stop.store(true, Ordering::Relaxed);
        for handle in handles {
            let seen = handle.join().expect("client thread");
            all.joins.extend(seen.joins);
            all.echoes.extend(seen.echoes);
            all.sent.extend(seen.sent);
        }
        eprintln!(
            "round {round} ({shards} shards): {} echoes so far, {} journal(s) left to redo",
            all.echoes.len(),
            left_journals.len()
        );
    }
    assert!(all.echoes.len() > 100, "the clients made progress");
    // Most kills land between a journal fsync and the next checkpoint.
    assert!(
        db.is_some() || rounds_with_redo > 0,
        "no kill left a journal to redo"
    );

    // server_seq is never reused: one marker per (doc, seq), one seq per marker.
    let mut by_seq: HashMap<(String, u64), String> = HashMap::new();
    for (doc, seq, mark) in &all.echoes {
        if let Some(prev) = by_seq.insert((doc.clone(), *seq), mark.clone()) {
            assert_eq!(
                &prev, mark,
                "{doc}: server_seq {seq} given to two different ops"
            );
        }
    }
    // Epochs never change (every document had acknowledged ops), replicas never repeat.
    let mut epochs: HashMap<&str, &str> = HashMap::new();
    let mut replicas = HashSet::new();
    for (doc, epoch, replica) in &all.joins {
        assert_eq!(
            *epochs.entry(doc).or_insert(epoch),
            epoch.as_str(),
            "{doc}: epoch changed"
        );
        assert!(
            replicas.insert((doc.clone(), *replica)),
            "{doc}: replica {replica} handed out twice"
        );
    }

    // Final restart: every echoed op is present exactly once, no op twice.
    let server = Server::start(dir, 3, &extra);
    for doc in &docs {
        let mut ws = connect(server.addr, doc).expect("connect");
        let ack = hello(&mut ws, doc, Duration::from_secs(10)).expect("hello_ack");
        assert_eq!(
            ack["epoch"].as_str(),
            epochs.get(doc.as_str()).copied(),
            "{doc}: epoch"
        );
        let (head, text) = joined_state(&mut ws, &ack);
        // Every insert in this test is one whole marker `<R.k>`, and inserts never split
        // each other, so the text is a sequence of markers.
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for piece in text.split_inclusive('>') {
            *counts.entry(piece).or_default() += 1;
        }
        let count = |mark: &str| counts.get(mark).copied().unwrap_or(0);
        let mut n_checked = 0;
        for ((echo_doc, seq), mark) in &by_seq {
            if echo_doc == doc {
                assert!(
                    *seq <= head,
                    "{doc}: echoed server_seq {seq} above head {head}"
                );
                assert_eq!(count(mark), 1, "{doc}: echoed op {mark} (seq {seq})");
                n_checked += 1;
            }
        }
        for (sent_doc, mark) in &all.sent {
            if sent_doc == doc {
                assert!(count(mark) <= 1, "{doc}: {mark} applied twice");
            }
        }
        eprintln!("{doc}: head {head}, {n_checked} echoed ops verified");
    }
    server.kill();
}

/// The journals under `dir` holding at least one byte.
fn journals_with_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("journal"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.metadata().is_ok_and(|m| m.len() > 0))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// `/metrics` value of `name` (a gauge summed over shards).
fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    std::io::Write::write_all(
        &mut stream,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .ok()?;
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    let mut total = None;
    for line in body.lines() {
        let Some(rest) = line
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
        else {
            continue;
        };
        let value: u64 = rest.rsplit(' ').next()?.trim().parse().ok()?;
        total = Some(total.unwrap_or(0) + value);
    }
    total
}

#[test]
fn idle_document_unloads_and_reloads_intact() {
    let _watchdog = Watchdog::new("idle unload test", 60);
    let dir = temp_dir("idle");
    let server = Server::start(
        &dir,
        2,
        &["--idle-unload", "300ms", "--snapshot-every-ops", "7"],
    );
    let doc = "idle-doc";
    let mut ws = connect(server.addr, doc).expect("connect");
    let ack = hello(&mut ws, doc, Duration::from_secs(10)).expect("hello_ack");
    let replica = ack["replica"].as_u64().expect("replica");
    let epoch = ack["epoch"].as_str().expect("epoch").to_owned();
    let mut expected = String::new();
    for k in 0..20u64 {
        let text = marker(replica, k);
        let op = serde_json::json!({"type": "op", "client_seq": k,
            "ops": [{"kind": "ins", "id": [k * 16, replica], "after": null, "text": text}]});
        ws.send(Message::text(op.to_string())).expect("send");
        expected.insert_str(0, &text);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no echo for op {k}");
            if let Ok(Some(v)) = read_json(&mut ws) {
                if v["type"] == "op_echo" {
                    assert_eq!(v["server_seq"].as_u64(), Some(k + 1));
                    break;
                }
            }
        }
    }
    drop(ws);
    // The document leaves memory once idle.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(server.addr, "collab_documents_loaded") != Some(0) {
        assert!(Instant::now() < deadline, "document never unloaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And comes back from disk with its text, head and epoch.
    for _ in 0..2 {
        let mut ws = connect(server.addr, doc).expect("connect");
        let ack = hello(&mut ws, doc, Duration::from_secs(10)).expect("hello_ack");
        assert_eq!(ack["head"].as_u64(), Some(20));
        assert_eq!(ack["epoch"].as_str(), Some(epoch.as_str()));
        assert_eq!(snapshot_text(&ack), expected);
        assert_ne!(
            ack["replica"].as_u64(),
            Some(replica),
            "fresh replica after reload"
        );
    }
    server.kill();
    let server = Server::start(&dir, 1, &[]);
    let mut ws = connect(server.addr, doc).expect("connect");
    let ack = hello(&mut ws, doc, Duration::from_secs(10)).expect("hello_ack");
    assert_eq!(
        (ack["head"].as_u64(), snapshot_text(&ack)),
        (Some(20), expected)
    );
    server.kill();
}

/// Sends one `ins` op at the start of the document and returns the next frame that answers it.
fn send_op(ws: &mut Ws, replica: u64, client_seq: u64) -> serde_json::Value {
    let text = marker(replica, client_seq);
    let op = serde_json::json!({"type": "op", "client_seq": client_seq,
        "ops": [{"kind": "ins", "id": [client_seq * 16, replica], "after": null, "text": text}]});
    ws.send(Message::text(op.to_string())).expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no answer to op {client_seq}");
        if let Ok(Some(v)) = read_json(ws) {
            if v["type"] == "op_echo" || v["type"] == "error" {
                return v;
            }
        }
    }
}

#[test]
fn disk_errors_are_never_acknowledged() {
    use collab_engine::config::{Config, FsyncMode};
    use collab_engine::storage::fs::FaultyFs;
    use collab_engine::storage::DiskStorage;

    let _watchdog = Watchdog::new("disk error test", 60);
    let dir = temp_dir("disk-errors");
    let faults = FaultyFs::new();
    let mut config = Config::for_tests("127.0.0.1:0".parse().expect("address"));
    config.shards = 1;
    let storage = DiskStorage::with_fs(&dir, FsyncMode::Always, faults.clone()).expect("storage");
    let server = collab_engine::server::start_with_storages(&config, vec![Box::new(storage)])
        .expect("start");
    let addr = server.local_addr();

    let mut b = connect(addr, "b").expect("connect");
    let rb = hello(&mut b, "b", Duration::from_secs(10)).expect("hello_ack")["replica"]
        .as_u64()
        .expect("replica");
    assert_eq!(send_op(&mut b, rb, 0)["server_seq"].as_u64(), Some(1));
    let mut expected = Vec::new();
    for (k, fault) in [(1u64, "write"), (2, "fsync")] {
        let doc = format!("a-{fault}");
        let mut a = connect(addr, &doc).expect("connect");
        let ra = hello(&mut a, &doc, Duration::from_secs(10)).expect("hello_ack")["replica"]
            .as_u64()
            .expect("replica");
        assert_eq!(send_op(&mut a, ra, 0)["server_seq"].as_u64(), Some(1));
        if fault == "write" {
            faults.fail_writes(1);
        } else {
            faults.fail_syncs(1);
        }
        // The op is refused with `unavailable` and no echo.
        let answer = send_op(&mut a, ra, 1);
        assert_eq!(answer["type"].as_str(), Some("error"), "{fault}: {answer}");
        assert_eq!(
            answer["code"].as_str(),
            Some("unavailable"),
            "{fault}: {answer}"
        );
        assert_eq!(answer["client_seq"].as_u64(), Some(1));
        // Another document keeps working.
        assert_eq!(
            send_op(&mut b, rb, k)["server_seq"].as_u64(),
            Some(k + 1),
            "{fault}"
        );
        // Reconnecting finds the document as the disk has it: the refused op is absent, and
        // sending it again (under the newly assigned replica) takes the next server_seq.
        let mut a = connect(addr, &doc).expect("connect");
        let ack = hello(&mut a, &doc, Duration::from_secs(10)).expect("hello_ack");
        assert_eq!(ack["head"].as_u64(), Some(1), "{fault}");
        assert_eq!(snapshot_text(&ack), marker(ra, 0));
        let ra_new = ack["replica"].as_u64().expect("replica");
        assert_ne!(ra_new, ra);
        let echo = send_op(&mut a, ra_new, 1);
        assert_eq!(echo["server_seq"].as_u64(), Some(2), "{fault}: {echo}");
        expected.push((doc, format!("{}{}", marker(ra_new, 1), marker(ra, 0))));
    }
    server.shutdown().expect("shutdown");

    // After a restart the disk holds exactly what was acknowledged.
    let server = Server::start(&dir, 2, &[]);
    for (doc, text) in expected {
        let mut ws = connect(server.addr, &doc).expect("connect");
        let ack = hello(&mut ws, &doc, Duration::from_secs(10)).expect("hello_ack");
        assert_eq!(
            (ack["head"].as_u64(), snapshot_text(&ack)),
            (Some(2), text),
            "{doc}"
        );
    }
    let mut ws = connect(server.addr, "b").expect("connect");
    let ack = hello(&mut ws, "b", Duration::from_secs(10)).expect("hello_ack");
    assert_eq!(ack["head"].as_u64(), Some(3));
    server.kill();
}

#[test]
fn corrupt_document_is_refused_and_others_keep_working() {
    let _watchdog = Watchdog::new("corruption test", 60);
    let dir = temp_dir("corrupt");
    let server = Server::start(&dir, 2, &[]);
    for doc in ["damaged", "healthy"] {
        let mut ws = connect(server.addr, doc).expect("connect");
        let replica = hello(&mut ws, doc, Duration::from_secs(10)).expect("hello_ack")["replica"]
            .as_u64()
            .expect("replica");
        for k in 0..10 {
            assert_eq!(send_op(&mut ws, replica, k)["type"], "op_echo");
        }
    }
    server.kill();
    // A restart redoes the journal into the segments and makes them durable; only then is the
    // damage below outside what the journal covers (bytes the journal still covers are
    // rewritten by the next start's redo, i.e. repaired: tests/storage.rs checks that).
    Server::start(&dir, 1, &[]).kill();
    // Flip one byte in the middle of the damaged document's log.
    let mut segments = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log-"))
            {
                segments.push(path);
            }
        }
    }
    let segment = segments
        .into_iter()
        .find(|p| std::fs::read(p).is_ok_and(|b| b.windows(7).any(|w| w == b"damaged")))
        .expect("segment of the damaged doc");
    let mut bytes = std::fs::read(&segment).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&segment, &bytes).expect("write");

    let server = Server::start(&dir, 3, &[]);
    for _ in 0..2 {
        let mut ws = connect(server.addr, "damaged").expect("connect");
        ws.send(Message::text(r#"{"type":"hello","doc":"damaged"}"#))
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            assert!(Instant::now() < deadline, "no answer to hello");
            match read_json(&mut ws) {
                Ok(Some(v)) => break v,
                Ok(None) => {}
                Err(()) => panic!("closed without an answer"),
            }
        };
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "unavailable");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("log-") && !message.contains("docs/"),
            "internal names leaked: {message}"
        );
        let mut ws = connect(server.addr, "healthy").expect("connect");
        let ack = hello(&mut ws, "healthy", Duration::from_secs(10)).expect("hello_ack");
        assert_eq!(ack["head"].as_u64(), Some(10));
    }
    server.kill();
}

#[test]
fn a_second_server_cannot_use_the_same_data_dir() {
    let _watchdog = Watchdog::new("data dir lock test", 60);
    let dir = temp_dir("lock");
    let server = Server::start(&dir, 2, &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_collab-engine"))
        .args(["--listen", "127.0.0.1:0", "--no-pin-cores", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run a second server");
    assert!(
        !second.success(),
        "a second server started on a data dir in use"
    );
    server.kill();
}

/// Reads frames until the server closes (or fails) the connection; returns the close code
/// and every JSON frame seen.
fn until_closed(ws: &mut Ws, timeout: Duration) -> (Option<u16>, Vec<serde_json::Value>) {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(text)) => {
                if let Ok(v) = serde_json::from_str(&text) {
                    frames.push(v);
                }
            }
            Ok(Message::Close(frame)) => return (frame.map(|f| u16::from(f.code)), frames),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (None, frames),
        }
    }
    panic!("the connection was not closed within {timeout:?}");
}

/// What clients see while PostgreSQL is away: the server stays up; an op is refused with
/// `unavailable` (with its `client_seq`, or its room closed with 1013 when the commit's
/// outcome is unknown) and never echoed; a `hello` for a document not in memory gets
/// `unavailable` and 1013; once the database is back, documents load and ops commit again,
/// and the database holds exactly the echoed ops.
#[test]
fn database_away_refuses_then_recovers_with_the_real_binary() {
    let _watchdog = Watchdog::new("database away test", 120);
    let db = pg::OwnServer::start("away");
    let dir = temp_dir("away");
    let extra = [
        "--database-url",
        db.url.as_str(),
        "--database-timeout",
        "1s",
    ];
    let server = Server::start(&dir, 2, &extra);
    // The data directory still belongs to one process (its LOCK), database or not.
    let second = Command::new(env!("CARGO_BIN_EXE_collab-engine"))
        .args(["--listen", "127.0.0.1:0", "--no-pin-cores", "--data-dir"])
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run a second server");
    assert!(
        !second.success(),
        "a second server shared the data directory"
    );
    let mut a = connect(server.addr, "kept").expect("connect");
    let ra = hello(&mut a, "kept", Duration::from_secs(10)).expect("hello_ack")["replica"]
        .as_u64()
        .expect("replica");
    assert_eq!(send_op(&mut a, ra, 0)["server_seq"].as_u64(), Some(1));

    db.ctl(&["stop", "-m", "fast"]);
    // The op is not acknowledged: refused with its client_seq, or (outcome unknown) the room
    // is closed with 1013 before any echo.
    let answer = send_op(&mut a, ra, 1);
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let (code, frames) = until_closed(&mut a, Duration::from_secs(10));
    assert_eq!(code, Some(1013));
    assert!(frames.iter().all(|f| f["type"] != "op_echo"), "{frames:?}");
    // A document that is not in memory cannot be loaded meanwhile.
    let mut b = connect(server.addr, "new-while-away").expect("connect");
    assert!(hello(&mut b, "new-while-away", Duration::from_secs(10)).is_none());
    let (code, _) = until_closed(&mut b, Duration::from_secs(10));
    assert_eq!(code, Some(1013));
    // The server itself is still up.
    assert!(connect(server.addr, "kept").is_some());

    db.ctl(&["start"]);
    // Back: within a few seconds (the reconnect backoff is at most 2 s) it serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut a, ack) = loop {
        assert!(Instant::now() < deadline, "the database never came back");
        if let Some(mut ws) = connect(server.addr, "kept") {
            if let Some(ack) = hello(&mut ws, "kept", Duration::from_secs(5)) {
                break (ws, ack);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The refused op is absent; the resend takes the next server_seq.
    assert_eq!(ack["head"].as_u64(), Some(1), "{ack}");
    let ra_new = ack["replica"].as_u64().expect("replica");
    assert_ne!(ra_new, ra, "replica ids are never handed out twice");
    assert_eq!(send_op(&mut a, ra_new, 1)["server_seq"].as_u64(), Some(2));
    server.kill();

    let server = Server::start(&dir, 3, &extra);
    let mut ws = connect(server.addr, "kept").expect("connect");
    let ack = hello(&mut ws, "kept", Duration::from_secs(10)).expect("hello_ack");
    assert_eq!(
        (ack["head"].as_u64(), snapshot_text(&ack)),
        (Some(2), format!("{}{}", marker(ra_new, 1), marker(ra, 0)))
    );
    server.kill();
}
