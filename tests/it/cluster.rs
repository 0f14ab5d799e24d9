//! The cluster (issue 11): real node processes (the release binary's sibling, built by cargo
//! for the tests) on 127.0.0.1 sharing one real PostgreSQL database, real clients.
//!
//! Clients connect to any node (a node that does not own the document relays the connection
//! to its owner), or to the node that serves their document: its owner when the owner is
//! alive, else the node placement would choose (`GET /cluster/owner` answers both). A node
//! that cannot serve a document now (failover in progress, draining) answers `unavailable`
//! and closes with 1013, and the client retries, as real clients do.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use collab_engine::client::{Client, ClientOptions};
use collab_engine::storage::postgres::{Incarnation, LeaseBook, PgOptions, PgStorage};
use collab_engine::storage::{LogRecord, Storage, StorageError, StoredSnapshot};
use tungstenite::Utf8Bytes;

use crate::pg;
use crate::util::{self, Watchdog};

/// Lease TTL of the test nodes: short, so failovers take seconds.
const TTL: &str = "2s";
/// How long a client keeps trying to reach a document's server before the test fails.
const REACH_DEADLINE: Duration = Duration::from_secs(20);

/// One node process.
struct Node {
    name: String,
    port: u16,
    db: String,
    data_dir: PathBuf,
    child: Option<Child>,
    /// More flags for every start.
    extra: Vec<String>,
    /// An admin token for `/cluster` and `/metrics` when access control is on.
    bearer: Option<String>,
}

/// A port free right now (the node binds it a moment later; --advertise must name it first).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Node {
    fn start(db: &str, name: &str) -> Node {
        Node::start_with(db, name, Vec::new(), None)
    }

    fn start_with(db: &str, name: &str, extra: Vec<String>, bearer: Option<String>) -> Node {
        let data_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "cluster-{}-{name}",
            db.rsplit('/').next().unwrap_or("db")
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut node = Node {
            name: name.to_owned(),
            port: free_port(),
            db: db.to_owned(),
            data_dir,
            child: None,
            extra,
            bearer,
        };
        node.restart();
        node
    }

    /// Starts the process (again: a new incarnation under the same name and port).
    fn restart(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::File::create(self.data_dir.with_extension("log")).expect("log file");
        let advertise = format!("127.0.0.1:{}", self.port);
        let mut child = Command::new(env!("CARGO_BIN_EXE_collab-engine"))
            .args(["--listen", &advertise, "--advertise", &advertise])
            .args(["--cluster-node", &self.name, "--lease-ttl", TTL])
            .args([
                "--database-url",
                &self.db,
                "--shards",
                "2",
                "--no-pin-cores",
            ])
            .args(["--idle-unload", "60s"])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("COLLAB_DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn a node");
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("first line");
        assert!(
            line.starts_with("listening on http://"),
            "node {} printed {line:?} (log: {})",
            self.name,
            self.data_dir.with_extension("log").display()
        );
        self.child = Some(child);
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self, doc: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/{doc}", self.port)
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {signal}");
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// SIGTERM, and waits for the drain to finish and the process to exit.
    fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("reap");
        assert!(status.success(), "{} exited with {status}", self.name);
    }

    fn get(&self, target: &str) -> serde_json::Value {
        let response = util::http_get(
            self.addr(),
            &format!(
                "GET {target} HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
                self.authorization()
            ),
        );
        let (head, body) = response.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {response}");
        serde_json::from_str(body).expect("JSON")
    }

    fn authorization(&self) -> String {
        self.bearer
            .as_ref()
            .map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"))
    }

    fn metric(&self, name: &str) -> u64 {
        let response = util::http_get(
            self.addr(),
            &format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
                self.authorization()
            ),
        );
        response
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process must be continued before it can die of SIGKILL's reaping.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The node a client of `doc` should use now: the owner when it is alive and not draining,
/// else the node placement chooses (as seen by the first running node). `None` while no
/// running node knows one.
fn server_of(nodes: &[Node], doc: &str) -> Option<usize> {
    let probe = nodes.iter().find(|n| n.running())?;
    let members = probe.get("/cluster");
    let serving: Vec<&str> = members["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["alive"] == true && n["draining"] == false)
        .filter_map(|n| n["name"].as_str())
        .collect();
    let owner = probe.get(&format!("/cluster/owner?doc={doc}"));
    let name = owner["owner"]
        .as_str()
        .filter(|o| serving.contains(o))
        .or(owner["placed"].as_str())?;
    nodes.iter().position(|n| n.name == name && n.running())
}

/// Joins `doc` through the node that serves it, retrying (wrong node, failover in progress,
/// node restarting) until [`REACH_DEADLINE`].
fn reach(nodes: &[Node], doc: &str) -> Client {
    reach_as(nodes, doc, options())
}

/// [`reach`] with these client options (a token).
fn reach_as(nodes: &[Node], doc: &str, options: ClientOptions) -> Client {
    let deadline = Instant::now() + REACH_DEADLINE;
    loop {
        if let Some(idx) = server_of(nodes, doc) {
            match Client::connect(&nodes[idx].url(doc), doc, options.clone()) {
                Ok(client) => return client,
                Err(e) => assert!(Instant::now() < deadline, "{doc}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "{doc}: no node serves it");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node a client of `doc` enters through: the one that serves it, or with `relayed` a
/// running node that does not (any-node entry, relayed to the owner).
fn entry_of(nodes: &[Node], doc: &str, relayed: bool) -> Option<usize> {
    let server = server_of(nodes, doc)?;
    if !relayed {
        return Some(server);
    }
    (0..nodes.len()).find(|&idx| idx != server && nodes[idx].running())
}

/// [`reach`] for a client that was connected before: joins again with `since`, resending
/// what was not acknowledged (through another node than the owner with `relayed`).
fn reach_again(nodes: &[Node], doc: &str, client: &mut Client, relayed: bool) {
    let deadline = Instant::now() + REACH_DEADLINE;
    loop {
        if let Some(idx) = entry_of(nodes, doc, relayed) {
            match client.reconnect_to(&nodes[idx].url(doc)) {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "{doc}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "{doc}: no node serves it");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// Every token appears exactly once in `text`.
fn assert_each_once(text: &str, tokens: &[String]) {
    for token in tokens {
        assert_eq!(
            text.matches(token.as_str()).count(),
            1,
            "{token} in {text:?}"
        );
    }
}

/// `server_seq`s of `doc` in the database: 1..=n without a gap or repeat.
fn assert_log_gap_free(db: &str, doc: &str) -> i64 {
    let mut client = pg::client(db);
    let rows = client
        .query(
            "SELECT o.server_seq FROM collab_ops o JOIN collab_docs d ON d.id = o.doc_id \
             WHERE d.name = $1 ORDER BY o.server_seq",
            &[&doc.as_bytes()],
        )
        .expect("ops");
    let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "{doc}'s log");
    seqs.len() as i64
}

/// Waits until every running node sees `n` live nodes.
fn wait_members(nodes: &[Node], n: usize) {
    let deadline = Instant::now() + REACH_DEADLINE;
    for node in nodes.iter().filter(|n| n.running()) {
        loop {
            let members = node.get("/cluster");
            let alive = members["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .filter(|n| n["alive"] == true && n["draining"] == false)
                .count();
            if alive == n {
                break;
            }
            assert!(Instant::now() < deadline, "{} sees {members}", node.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn three_nodes(tag: &str) -> (String, Vec<Node>) {
    let db = pg::fresh_database(tag);
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| Node::start(&db, name))
        .collect();
    wait_members(&nodes, 3);
    (db, nodes)
}

#[test]
fn three_nodes_serve_each_document_from_its_one_owner_and_converge() {
    let _watchdog = Watchdog::new("cluster_converge", 90);
    let (db, nodes) = three_nodes("cluster_converge");
    let docs: Vec<String> = (0..6).map(|i| format!("shared-{i}")).collect();
    let mut tokens: HashMap<&str, Vec<String>> = HashMap::new();
    let mut owners = Vec::new();
    for doc in &docs {
        // Any-node entry: one client through each node.
        let mut clients: Vec<Client> = nodes
            .iter()
            .map(|node| Client::connect(&node.url(doc), doc, options()).expect("join"))
            .collect();
        for round in 0..5 {
            for (c, client) in clients.iter_mut().enumerate() {
                let token = format!("<{c}.{round}>");
                let end = client.text().chars().count();
                client.insert(end, &token).expect("insert");
                tokens.entry(doc).or_default().push(token);
            }
        }
        for client in &mut clients {
            client.wait_until_acked(util::READ_TIMEOUT).expect("acked");
        }
        let head = clients.iter().map(Client::head).max().expect("clients");
        for client in &mut clients {
            client
                .wait_for_head(head, util::READ_TIMEOUT)
                .expect("head");
        }
        let text = clients[0].text();
        assert!(clients.iter().all(|c| c.text() == text), "{doc} diverged");
        assert_each_once(&text, &tokens[doc.as_str()]);
        // A late joiner through any node sees the same text.
        for node in &nodes {
            let late = Client::connect(&node.url(doc), doc, options()).expect("join");
            assert_eq!(
                late.text(),
                text,
                "{doc}: late joiner through {}",
                node.name
            );
        }
        assert_eq!(assert_log_gap_free(&db, doc), head as i64);
        wait_owner(&nodes[0], doc);
        let owner = nodes[0].get(&format!("/cluster/owner?doc={doc}"));
        assert!(owner["fence"].as_i64().is_some_and(|f| f >= 1), "{owner}");
        // The owner is where placement put it (no node was missing at any point).
        assert_eq!(owner["owner"], owner["placed"], "{owner}");
        owners.push(owner["owner"].as_str().expect("owner").to_owned());
    }
    // Every node agrees on every owner.
    for (doc, owner) in docs.iter().zip(&owners) {
        for node in &nodes {
            let seen = node.get(&format!("/cluster/owner?doc={doc}"));
            let deadline = Instant::now() + REACH_DEADLINE;
            let mut seen = seen;
            while seen["owner"].as_str() != Some(owner) {
                assert!(Instant::now() < deadline, "{}: {seen}", node.name);
                std::thread::sleep(Duration::from_millis(50));
                seen = node.get(&format!("/cluster/owner?doc={doc}"));
            }
        }
    }
    // `documents` counts each node's leases as of its last round.
    let deadline = Instant::now() + REACH_DEADLINE;
    loop {
        let members = nodes[0].get("/cluster");
        let documents: i64 = members["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["documents"].as_i64().expect("documents"))
            .sum();
        if documents == docs.len() as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{members}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let acquisitions: u64 = nodes
        .iter()
        .map(|n| n.metric("collab_cluster_lease_acquisitions_total"))
        .sum();
    assert!(acquisitions >= docs.len() as u64);
}

/// A writer thread: inserts tokens into `doc` until `stop`, following the document from node
/// to node (reconnecting with `since` and resending on every close), and returns every token
/// it sent; all of them are acknowledged before it returns.
fn writer(
    nodes: Arc<parking_lot::Mutex<Vec<Node>>>,
    doc: String,
    tag: String,
    stop: Arc<AtomicBool>,
    relayed: bool,
) -> std::thread::JoinHandle<(Vec<String>, String)> {
    std::thread::spawn(move || {
        let mut client = {
            let nodes = nodes.lock();
            let entry = entry_of(&nodes, &doc, relayed).expect("an entry node");
            Client::connect(&nodes[entry].url(&doc), &doc, options()).expect("join")
        };
        let epoch = client.epoch().to_owned();
        let mut sent = Vec::new();
        let mut n = 0;
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let result = if stopping {
                client.wait_until_acked(Duration::from_secs(2))
            } else {
                let token = format!("<{tag}.{n}>");
                n += 1;
                let end = client.text().chars().count();
                let sent_ok = client.insert(end, &token);
                sent.push(token);
                sent_ok.and_then(|()| client.poll(Duration::from_millis(20)).map(drop))
            };
            match result {
                Ok(()) if stopping => break,
                Ok(()) => {}
                Err(_) => {
                    // Closed (1013 failover, 1001 drain) or refused: follow the document.
                    let nodes = nodes.lock();
                    reach_again(&nodes, &doc, &mut client, relayed);
                }
            }
            if !stopping {
                std::thread::sleep(Duration::from_millis(15));
            }
        }
        assert_eq!(
            client.epoch(),
            epoch,
            "{doc}: the epoch survives every move"
        );
        (sent, client.text())
    })
}

#[test]
fn kill_9_of_an_owner_mid_load_loses_no_acknowledged_op() {
    let _watchdog = Watchdog::new("cluster_kill9", 90);
    let (db, nodes) = three_nodes("cluster_kill9");
    let docs: Vec<String> = (0..4).map(|i| format!("busy-{i}")).collect();
    let nodes = Arc::new(parking_lot::Mutex::new(nodes));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = docs
        .iter()
        .flat_map(|doc| {
            // One writer on the owner, one relayed through another node.
            (0..2).map(|w| {
                writer(
                    nodes.clone(),
                    doc.clone(),
                    format!("{w}"),
                    stop.clone(),
                    w == 1,
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // The owner of the first document dies mid-load, with the leases of its documents.
    let victim = {
        let guard = nodes.lock();
        server_of(&guard, &docs[0]).expect("an owner")
    };
    nodes.lock()[victim].kill9();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let mut results: HashMap<String, Vec<(Vec<String>, String)>> = HashMap::new();
    for (idx, writer) in writers.into_iter().enumerate() {
        let result = writer.join().expect("writer");
        results
            .entry(docs[idx / 2].clone())
            .or_default()
            .push(result);
    }
    let guard = nodes.lock();
    for doc in &docs {
        let seen = &results[doc];
        let mut final_client = reach(&guard, doc);
        final_client
            .wait_for_head(0, util::READ_TIMEOUT)
            .expect("joined");
        let text = final_client.text();
        for (sent, _) in seen {
            assert!(!sent.is_empty());
            assert_each_once(&text, sent);
        }
        let head = assert_log_gap_free(&db, doc);
        assert_eq!(final_client.head() as i64, head, "{doc}");
    }
    // The documents moved: each is now owned by a live node with a higher fence.
    let owner = guard[(victim + 1) % 3].get(&format!("/cluster/owner?doc={}", docs[0]));
    assert_ne!(
        owner["owner"].as_str(),
        Some(guard[victim].name.as_str()),
        "{owner}"
    );
    assert!(owner["fence"].as_i64().is_some_and(|f| f >= 2), "{owner}");
}

#[test]
fn a_paused_owner_never_commits_after_its_lease_is_taken_over() {
    let _watchdog = Watchdog::new("cluster_sigstop", 90);
    let (db, mut nodes) = three_nodes("cluster_sigstop");
    let doc = "paused-doc";
    let mut before = reach(&nodes, doc);
    before.insert(0, "<before>").expect("insert");
    before.wait_until_acked(util::READ_TIMEOUT).expect("acked");
    let epoch = before.epoch().to_owned();
    let old = server_of(&nodes, doc).expect("owner");
    // A second client of the old owner, which will write while the owner is paused.
    let mut stale = Client::connect(&nodes[old].url(doc), doc, options()).expect("join");
    nodes[old].signal(libc::SIGSTOP);
    // Buffered in the paused process's socket: applied only once it runs again.
    let end = stale.text().chars().count();
    stale.insert(end, "<stale-buffered>").expect("insert");
    // Past the TTL: the others see it dead and its lease expired.
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let deadline = Instant::now() + REACH_DEADLINE;
    let mut after = loop {
        let probe = &nodes[others[0]];
        let owner = probe.get(&format!("/cluster/owner?doc={doc}"));
        let placed = owner["placed"].as_str().unwrap_or_default().to_owned();
        let idx = nodes.iter().position(|n| n.name == placed);
        if let Some(idx) = idx.filter(|&i| i != old) {
            if let Ok(client) = Client::connect(&nodes[idx].url(doc), doc, options()) {
                break client;
            }
        }
        assert!(Instant::now() < deadline, "no node took the document over");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(after.epoch(), epoch, "the epoch is kept");
    assert!(after.text().contains("<before>"), "{}", after.text());
    let end = after.text().chars().count();
    after.insert(end, "<after>").expect("insert");
    after.wait_until_acked(util::READ_TIMEOUT).expect("acked");
    let head_after = after.head();
    // The old owner runs again: whatever it had buffered, or tries now, must not commit.
    nodes[old].signal(libc::SIGCONT);
    let end = stale.text().chars().count();
    let _ = stale.insert(end, "<stale-late>");
    let closed = loop {
        match stale.poll(util::READ_TIMEOUT) {
            Ok(events) => {
                for event in events {
                    assert!(
                        !matches!(event, collab_engine::client::Event::Acked { .. }),
                        "the paused owner acknowledged a write: {event:?}"
                    );
                }
            }
            Err(e) => break e,
        }
    };
    assert!(
        stale
            .close_reason()
            .is_some_and(|(code, _)| code == Some(1013)),
        "{closed}: {:?}",
        stale.close_reason()
    );
    // The database holds one history: before, after; nothing of the stale writes.
    std::thread::sleep(Duration::from_millis(500));
    let head = assert_log_gap_free(&db, doc);
    assert_eq!(
        head as u64, head_after,
        "nothing was appended by the old owner"
    );
    let check = Client::connect(&after_url(&nodes, doc, old), doc, options()).expect("join");
    let text = check.text();
    assert!(
        text.contains("<before>") && text.contains("<after>"),
        "{text}"
    );
    assert!(!text.contains("stale"), "mixed histories: {text}");
    // It noticed by one of three paths: the fence refused its commit, its renewal was overdue
    // and it gave its documents up, or a commit in flight across the pause timed out (its
    // outcome unknown, the document dropped and reloaded before serving again).
    let noticed = nodes[old].metric("collab_cluster_fencing_refusals_total")
        + nodes[old].metric("collab_cluster_lease_losses_total")
        + nodes[old].metric("collab_storage_errors_total{shard=\"0\"}")
        + nodes[old].metric("collab_storage_errors_total{shard=\"1\"}");
    assert!(noticed >= 1, "the old owner noticed nothing");
    nodes[old].kill9();
}

/// The URL of the document's current owner (not `old`).
fn after_url(nodes: &[Node], doc: &str, old: usize) -> String {
    let owner = nodes[(old + 1) % nodes.len()].get(&format!("/cluster/owner?doc={doc}"));
    let name = owner["owner"].as_str().expect("owned");
    let node = nodes.iter().find(|n| n.name == name).expect("a node");
    node.url(doc)
}

#[test]
fn rolling_restart_drains_one_node_at_a_time_and_loses_nothing() {
    let _watchdog = Watchdog::new("cluster_drain", 120);
    let (db, nodes) = three_nodes("cluster_drain");
    let docs: Vec<String> = (0..3).map(|i| format!("rolling-{i}")).collect();
    let nodes = Arc::new(parking_lot::Mutex::new(nodes));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            writer(
                nodes.clone(),
                doc.clone(),
                "w".to_owned(),
                stop.clone(),
                i % 2 == 1,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    for idx in 0..3 {
        {
            let mut guard = nodes.lock();
            guard[idx].terminate();
            // Drained: marked so in the membership, its leases released at once.
            let draining: bool = pg::client(&db)
                .query_one(
                    "SELECT draining FROM collab_nodes WHERE name = $1",
                    &[&guard[idx].name],
                )
                .expect("node row")
                .get(0);
            assert!(draining, "{} left without draining", guard[idx].name);
        }
        // Nothing of it is left in the lease table: the others acquire without the TTL.
        let mut pg_client = pg::client(&db);
        let held: i64 = pg_client
            .query_one(
                "SELECT count(*) FROM collab_leases l JOIN collab_nodes n \
                 ON n.incarnation = l.holder WHERE n.name = $1",
                &[&format!("n{}", idx + 1)],
            )
            .expect("count")
            .get(0);
        assert_eq!(held, 0, "n{} still holds leases after its drain", idx + 1);
        std::thread::sleep(Duration::from_millis(600));
        let mut guard = nodes.lock();
        guard[idx].restart();
        wait_members(&guard, 3);
        drop(guard);
        std::thread::sleep(Duration::from_millis(600));
    }
    stop.store(true, Ordering::Relaxed);
    let guard_results: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let guard = nodes.lock();
    for (doc, (sent, _)) in docs.iter().zip(&guard_results) {
        let client = reach(&guard, doc);
        assert_each_once(&client.text(), sent);
        assert_eq!(assert_log_gap_free(&db, doc) as u64, client.head());
    }
}

#[test]
fn a_joining_node_takes_only_its_share_of_new_placements() {
    let _watchdog = Watchdog::new("cluster_join", 90);
    let db = pg::fresh_database("cluster_join");
    let mut nodes = vec![Node::start(&db, "n1"), Node::start(&db, "n2")];
    wait_members(&nodes, 2);
    let old_docs: Vec<String> = (0..12).map(|i| format!("old-{i}")).collect();
    let mut owners_before = HashMap::new();
    for doc in &old_docs {
        let client = reach(&nodes, doc);
        client.close();
        let owner = nodes[0].get(&format!("/cluster/owner?doc={doc}"));
        owners_before.insert(
            doc.clone(),
            owner["placed"].as_str().expect("placed").to_owned(),
        );
    }
    nodes.push(Node::start(&db, "n3"));
    wait_members(&nodes, 3);
    // Already owned documents stay where they are.
    for doc in &old_docs {
        let owner = wait_owner(&nodes[2], doc);
        assert_eq!(owner, owners_before[doc], "{doc} moved when n3 joined");
    }
    // New documents spread over all three, n3 taking the ones it wins.
    let new_docs: Vec<String> = (0..30).map(|i| format!("new-{i}")).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for doc in &new_docs {
        let placed = nodes[0].get(&format!("/cluster/owner?doc={doc}"))["placed"]
            .as_str()
            .expect("placed")
            .to_owned();
        let expected =
            collab_engine::cluster::placement::winner(doc, ["n1", "n2", "n3"]).expect("winner");
        assert_eq!(placed, expected, "{doc}");
        let client = reach(&nodes, doc);
        client.close();
        assert_eq!(wait_owner(&nodes[1], doc), expected, "{doc}");
        *counts.entry(expected.to_owned()).or_default() += 1;
    }
    assert_eq!(
        counts.len(),
        3,
        "every node takes new documents: {counts:?}"
    );
    assert!(
        counts["n3"] < new_docs.len() / 2,
        "n3 took more than its share: {counts:?}"
    );
}

/// The owner of `doc` as `node` publishes it, waiting for a round to show it.
fn wait_owner(node: &Node, doc: &str) -> String {
    let deadline = Instant::now() + REACH_DEADLINE;
    loop {
        let owner = node.get(&format!("/cluster/owner?doc={doc}"));
        if let Some(name) = owner["owner"].as_str() {
            return name.to_owned();
        }
        assert!(Instant::now() < deadline, "{doc}: {owner}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Registers a node row as the directory thread would, returning its incarnation.
fn register(db: &str, name: &str) -> Incarnation {
    let mut client = pg::client(db);
    let row = client
        .query_one(
            "INSERT INTO collab_nodes (name, incarnation, advertise, heartbeat, lease_ttl_ms) \
             VALUES ($1, nextval('collab_incarnations'), '127.0.0.1:1', now(), 60000) \
             RETURNING incarnation",
            &[&name],
        )
        .expect("register");
    Incarnation(row.get(0))
}

fn fenced_storage(db: &str, incarnation: Incarnation, book: &LeaseBook) -> PgStorage {
    PgStorage::open(&PgOptions {
        url: db.to_owned(),
        timeout: Duration::from_secs(5),
        synchronous_commit: true,
        ca_file: None,
    })
    .expect("open")
    .with_leases(incarnation, book.clone())
}

fn op(seq: u64, text: &str) -> LogRecord {
    LogRecord::Ops {
        server_seq: seq,
        echo: Utf8Bytes::from(format!(
            "{{\"type\":\"op_echo\",\"server_seq\":{seq},\"t\":\"{text}\"}}"
        )),
    }
}

#[test]
fn a_stale_fence_commit_is_refused_and_changes_nothing() {
    let _watchdog = Watchdog::new("cluster_fence", 60);
    let db = pg::fresh_database("cluster_fence");
    // The schema, by a first open.
    drop(
        PgStorage::open(&PgOptions {
            url: db.clone(),
            timeout: Duration::from_secs(5),
            synchronous_commit: true,
            ca_file: None,
        })
        .expect("open"),
    );
    let (a, b) = (register(&db, "a"), register(&db, "b"));
    let (book_a, book_b) = (LeaseBook::new(), LeaseBook::new());
    let mut old = fenced_storage(&db, a, &book_a);
    let mut new = fenced_storage(&db, b, &book_b);
    assert_eq!(old.load("d").expect("load"), None);
    assert_eq!(book_a.fence("d"), Some(1));
    old.append("d", "e1", &op(1, "old")).expect("append");
    old.sync().expect("sync");
    assert!(old.take_fenced().is_empty());
    // While a holds it, b cannot load it.
    assert!(matches!(new.load("d"), Err(StorageError::Fenced { .. })));
    // a's lease runs out (a paused process); b takes it over with a higher fence.
    pg::client(&db)
        .execute(
            "UPDATE collab_leases SET expires_at = now() - interval '1 second'",
            &[],
        )
        .expect("expire");
    let loaded = new.load("d").expect("load").expect("stored");
    assert_eq!(loaded.epoch, "e1");
    assert_eq!(loaded.tail, vec![op(1, "old")]);
    assert_eq!(book_b.fence("d"), Some(2));
    new.append("d", "e1", &op(2, "new")).expect("append");
    new.sync().expect("sync");
    // a wakes up and commits with its stale fence: refused, nothing written, and another
    // document of the same group commit is unaffected.
    assert_eq!(old.load("other").expect("load"), None);
    old.append("d", "e1", &op(2, "stale")).expect("append");
    old.append("other", "e9", &op(1, "fine")).expect("append");
    old.sync().expect("the rest of the group commits");
    assert_eq!(old.take_fenced(), vec!["d".to_owned()]);
    assert_eq!(book_a.fence("d"), None);
    assert_eq!(
        book_a.counters().fencing_refusals.load(Ordering::Relaxed),
        1
    );
    let snapshot = StoredSnapshot {
        epoch: "e1".to_owned(),
        head: 1,
        replicas_reserved: 0,
        owners: Vec::new(),
        runs_json: Utf8Bytes::from_static("{\"runs\":[]}"),
    };
    assert!(matches!(
        old.write_snapshot("d", &snapshot),
        Err(StorageError::Fenced { .. })
    ));
    let mut reader = fenced_storage(&db, b, &LeaseBook::new());
    let seen = reader.load("d").expect("load").expect("stored");
    assert_eq!(seen.snapshot, None, "the stale snapshot was not written");
    assert_eq!(seen.tail, vec![op(1, "old"), op(2, "new")]);
    drop(reader);
    let mut other = fenced_storage(&db, a, &LeaseBook::new());
    let fine = other.load("other").expect("load").expect("stored");
    assert_eq!(fine.tail, vec![op(1, "fine")]);
}

#[test]
fn a_fenced_commit_keeps_the_ops_acceptance_times() {
    let _watchdog = Watchdog::new("cluster_fence_times", 60);
    let db = pg::fresh_database("cluster_fence_times");
    drop(
        PgStorage::open(&PgOptions {
            url: db.clone(),
            timeout: Duration::from_secs(5),
            synchronous_commit: true,
            ca_file: None,
        })
        .expect("open"),
    );
    let node = register(&db, "a");
    let book = LeaseBook::new();
    let mut storage = fenced_storage(&db, node, &book);
    assert_eq!(storage.load("d").expect("load"), None);
    let accepted = LogRecord::Accepted {
        server_seq: 1,
        time_ms: 1_234,
    };
    storage.append("d", "e1", &op(1, "timed")).expect("append");
    storage.append("d", "e1", &accepted).expect("append");
    storage.sync().expect("sync");
    assert!(storage.take_fenced().is_empty());
    drop(storage);
    let mut reader = fenced_storage(&db, node, &LeaseBook::new());
    let stored = reader.load("d").expect("load").expect("stored");
    assert!(stored.tail.contains(&op(1, "timed")), "{:?}", stored.tail);
    assert!(stored.tail.contains(&accepted), "{:?}", stored.tail);
}

#[test]
fn a_revocation_on_one_node_closes_connections_on_another() {
    use collab_engine::auth::mint::{MintClaims, MintKey};
    use collab_engine::auth::{now_unix, Role};
    let _watchdog = Watchdog::new("cluster_revoke", 60);
    let db = pg::fresh_database("cluster_revoke");
    let secret = b"cluster revocation test secret, 32+ bytes";
    let key_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-revoke-hs.key");
    std::fs::write(&key_file, secret).expect("key file");
    let key = MintKey::hs256(secret).expect("key");
    let token = |sub: &str, role: Role| {
        key.sign(&MintClaims::new(sub, "*", role, now_unix(), 3600), None)
            .expect("sign")
    };
    let admin = token("root", Role::Admin);
    let flags = vec!["--auth-key-file".to_owned(), key_file.display().to_string()];
    let nodes = vec![
        Node::start_with(&db, "n1", flags.clone(), Some(admin.clone())),
        Node::start_with(&db, "n2", flags, Some(admin.clone())),
    ];
    wait_members(&nodes, 2);
    let doc = "guarded";
    let mallory = ClientOptions {
        token: Some(token("mallory", Role::Write)),
        ..options()
    };
    let mut client = reach_as(&nodes, doc, mallory.clone());
    let owner = server_of(&nodes, doc).expect("owner");
    let other = 1 - owner;
    let body = r#"{"sub":"mallory"}"#;
    let response = util::http_get(
        nodes[other].addr(),
        &format!(
            "POST /admin/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // The owner learns it through the database and closes the connection.
    let closed = loop {
        if let Err(e) = client.poll(util::READ_TIMEOUT) {
            break e;
        }
    };
    assert_eq!(
        client.close_reason(),
        Some((Some(1008), "revoked")),
        "{closed}"
    );
    let refused = Client::connect(&nodes[owner].url(doc), doc, mallory)
        .expect_err("revoked on the owner too");
    assert!(refused.to_string().contains("unauthorized"), "{refused}");
    // Without the admin token, /cluster is refused.
    let response = util::http_get(
        nodes[0].addr(),
        "GET /cluster HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
}
