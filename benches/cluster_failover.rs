//! Cluster costs (docs/benchmarks.md, "Cluster"): the time to serve a document again after
//! kill -9 of its owner, and the lease traffic of idle nodes on the database.
//!
//! `cargo bench --bench cluster_failover -- [RUNS] [TTL] [DOCS]` (defaults 20, `2s`, 300):
//! three release-binary nodes (`target/release/collab-engine`, or `COLLAB_BIN`) on 127.0.0.1
//! share one PostgreSQL (scripts/pg-local.sh, or `COLLAB_TEST_DATABASE_URL`). Each run joins a
//! document through its owner, writes one op, kills the owner with SIGKILL, and measures until
//! a new client, entering through another node, has its `hello_ack` with that op; the owner is
//! then restarted (a new incarnation) before the next run. Then DOCS documents are opened, the
//! cluster is left idle for 10 s, and the database's committed transactions and the rows of
//! `collab_leases` written in that time are reported per node and per second.

#[path = "../tests/support/pg.rs"]
mod pg;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use collab_engine::client::{Client, ClientOptions};

struct Node {
    name: String,
    port: u16,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    std::env::var_os("COLLAB_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/release/collab-engine"
            ))
        },
        PathBuf::from,
    )
}

fn start(node: &mut Node, db: &str, ttl: &str, data: &std::path::Path) {
    let advertise = format!("127.0.0.1:{}", node.port);
    let mut child = Command::new(binary())
        .args(["--listen", &advertise, "--advertise", &advertise])
        .args(["--cluster-node", &node.name, "--lease-ttl", ttl])
        .args(["--database-url", db, "--shards", "1", "--no-pin-cores"])
        // Every client comes from 127.0.0.1: no per-address limits.
        .args([
            "--conns-per-ip-max",
            "0",
            "--connects-per-ip-per-second",
            "0",
        ])
        .arg("--data-dir")
        .arg(data.join(&node.name))
        .env_remove("COLLAB_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn a node (build it first: cargo build --release)");
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("first line");
    assert!(line.starts_with("listening on"), "{line:?}");
    node.child = Some(child);
}

fn get(port: u16, target: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn wait_alive(nodes: &[Node], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let members = get(nodes[0].port, "/cluster");
        let alive = members["nodes"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|n| n["alive"] == true).count());
        if alive == n {
            return;
        }
        assert!(Instant::now() < deadline, "{members}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let ttl = args.get(1).cloned().unwrap_or_else(|| "2s".to_owned());
    let n_docs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(300);
    let db = pg::fresh_database("bench_cluster");
    let data = std::env::temp_dir().join(format!("collab-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node {
            name: format!("n{i}"),
            port: TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("port")
                .port(),
            child: None,
        })
        .collect();
    for node in &mut nodes {
        start(node, &db, &ttl, &data);
    }
    wait_alive(&nodes, 3);
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let mut times = Vec::with_capacity(runs);
    for run in 0..runs {
        let doc = format!("failover-{run}");
        let placed = get(nodes[0].port, &format!("/cluster/owner?doc={doc}"))["placed"]
            .as_str()
            .expect("placed")
            .to_owned();
        let victim = nodes.iter().position(|n| n.name == placed).expect("node");
        let url = |port: u16| format!("ws://127.0.0.1:{port}/ws/{doc}");
        let mut writer = Client::connect(&url(nodes[victim].port), &doc, options.clone())
            .expect("join the owner");
        writer.insert(0, "acknowledged").expect("insert");
        writer
            .wait_until_acked(Duration::from_secs(10))
            .expect("acked");
        let entry = nodes[(victim + 1) % 3].port;
        let mut child = nodes[victim].child.take().expect("running");
        let killed = Instant::now();
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        loop {
            match Client::connect(&url(entry), &doc, options.clone()) {
                Ok(client) if client.text() == "acknowledged" => break,
                Ok(client) => panic!("after failover: {:?}", client.text()),
                Err(_) => assert!(killed.elapsed() < Duration::from_secs(60), "never served"),
            }
        }
        let took = killed.elapsed().as_secs_f64();
        println!("run {run}: served again {took:.3} s after kill -9 of {placed}");
        times.push(took);
        start(&mut nodes[victim], &db, &ttl, &data);
        wait_alive(&nodes, 3);
    }
    times.sort_by(f64::total_cmp);
    if !times.is_empty() {
        println!(
            "time to serve again after kill -9 (lease TTL {ttl}, {runs} runs): min {:.3} s, p50 {:.3} s, p90 {:.3} s, max {:.3} s",
            times[0],
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            times[times.len() - 1]
        );
    }
    // Lease traffic: open documents spread over the nodes, then idle.
    let mut clients = Vec::new();
    for i in 0..n_docs {
        let doc = format!("idle-{i}");
        let port = nodes[i % 3].port;
        clients.push(
            Client::connect(
                &format!("ws://127.0.0.1:{port}/ws/{doc}"),
                &doc,
                options.clone(),
            )
            .expect("join"),
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut admin = pg::client(&db);
    let sample = |admin: &mut postgres::Client| -> (i64, i64) {
        let row = admin
            .query_one(
                "SELECT xact_commit, tup_updated FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .expect("stats");
        (row.get(0), row.get(1))
    };
    // Statistics are flushed by backends at most every second or so: let them settle.
    let before = sample(&mut admin);
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let after = sample(&mut admin);
    let secs = window.as_secs_f64();
    println!(
        "idle cluster, {n_docs} documents held over 3 nodes, lease TTL {ttl}: {:.1} committed transactions/s and {:.0} rows updated/s on the database, per node {:.1} transactions/s",
        (after.0 - before.0) as f64 / secs,
        (after.1 - before.1) as f64 / secs,
        (after.0 - before.0) as f64 / secs / 3.0
    );
    drop(clients);
    for node in &mut nodes {
        if let Some(mut child) = node.child.take() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&data);
}
