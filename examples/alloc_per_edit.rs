//! Counts heap allocations per accepted edit on a shard's message path: `RoomHost` (session
//! routing, the group commit and its storage worker's requests) and `Room` (integration, the
//! echo, effects), without sockets.
//!
//! A counting global allocator wraps the system one. Each turn hands the host one `op`
//! message from each of two joined connections (so each edit fans out to both), then ends
//! the turn. Storage is a no-op, so only the room and host (plus parsing, measured apart)
//! are counted; frames to connections the `Net` does not hold are dropped there for free.
//!
//! Run: `cargo run --release --example alloc_per_edit [turns]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use collab_engine::ids::ConnToken;
use collab_engine::metrics::MetricsRegistry;
use collab_engine::room::RoomConfig;
use collab_engine::shard::{Handler, Net, NetLimits, OpenInfo, RoomHost};
use collab_engine::storage::worker::{StorageAvailable, StorageWorker};
use collab_engine::storage::{LogRecord, Storage, StorageError, StoredDoc, StoredSnapshot};
use tungstenite::Message;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counts() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        REALLOCS.load(Ordering::Relaxed),
    )
}

/// Keeps nothing: the storage's own allocations are not the room's.
struct NoStorage;

impl Storage for NoStorage {
    fn load(&mut self, _doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        Ok(None)
    }
    fn append(
        &mut self,
        _doc: &str,
        _epoch: &str,
        _record: &LogRecord,
    ) -> Result<(), StorageError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
    fn write_snapshot(
        &mut self,
        _doc: &str,
        _snapshot: &StoredSnapshot,
    ) -> Result<(), StorageError> {
        Ok(())
    }
    fn release(&mut self, _doc: &str) {}
}

fn op_text(client_seq: u64, replica: u64, counter: u64, after: Option<u64>) -> String {
    let after = after.map_or("null".to_owned(), |c| format!("[{c},{replica}]"));
    format!(
        r#"{{"type":"op","client_seq":{client_seq},"ops":[{{"kind":"ins","id":[{counter},{replica}],"after":{after},"text":"x"}}]}}"#
    )
}

fn main() -> std::io::Result<()> {
    let turns: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let config = collab_engine::config::Config::for_tests("127.0.0.1:0".parse().expect("addr"));
    let poll = mio::Poll::new()?;
    let limits = NetLimits {
        reads_per_turn_max: 64,
        outbound_bytes_max: 1 << 20,
        conns_max: 16,
        idle_timeout: Duration::from_secs(60),
        close_linger: Duration::from_secs(1),
    };
    let mut net = Net::new(
        poll.registry().try_clone()?,
        limits,
        MetricsRegistry::new(1).shard(0),
    );
    let waker = std::sync::Arc::new(mio::Waker::new(
        poll.registry(),
        collab_engine::shard::WAKER_TOKEN,
    )?);
    let worker = StorageWorker::spawn(
        "storage-0".to_owned(),
        Box::new(NoStorage),
        waker,
        StorageAvailable::new(),
    )?;
    let mut host = RoomHost::new(
        worker,
        RoomConfig::from_config(&config),
        Duration::from_secs(3600),
    );
    for (conn, replica) in [(0usize, 1u64), (1, 2)] {
        host.on_open(
            &mut net,
            ConnToken(conn),
            OpenInfo {
                doc: Some("doc".to_owned()),
                hello: None,
                admitted: None,
            },
        );
        let hello = format!(r#"{{"type":"hello","replica":{replica}}}"#);
        host.on_message(&mut net, ConnToken(conn), Message::text(hello));
    }
    host.end_turn(&mut net);
    // The hellos wait for their document's load on the storage worker.
    host.wait_for_storage(&mut net, Duration::from_secs(10));
    // Texts built up front: building them is the client's cost.
    let texts: Vec<[Message; 2]> = (0..turns)
        .map(|i| {
            let after = i.checked_sub(1).map(|c| c + 1);
            [
                Message::text(op_text(i, 1, i + 1, after)),
                Message::text(op_text(i, 2, i + 1, None)),
            ]
        })
        .collect();
    let parse_texts: Vec<Message> = texts.iter().flat_map(|t| t.iter().cloned()).collect();
    let (a0, r0) = counts();
    for message in &parse_texts {
        if let Message::Text(text) = message {
            let parsed = collab_engine::protocol::parse_client_message(text);
            std::hint::black_box(&parsed);
        }
    }
    let (a1, r1) = counts();
    for [m1, m2] in texts {
        host.on_message(&mut net, ConnToken(0), m1);
        host.on_message(&mut net, ConnToken(1), m2);
        host.end_turn(&mut net);
        // The shard never waits; this example does, to count one whole turn per edit pair.
        host.wait_for_storage(&mut net, Duration::from_secs(10));
    }
    let (a2, r2) = counts();
    let edits = (2 * turns) as f64;
    let parse = (a1 - a0) as f64 / edits;
    let parse_re = (r1 - r0) as f64 / edits;
    let total = (a2 - a1) as f64 / edits;
    let total_re = (r2 - r1) as f64 / edits;
    println!("edits: {edits} ({turns} turns of 2 edits, each fanned out to 2 connections)");
    println!("parse only:               {parse:.2} allocs + {parse_re:.2} reallocs per edit");
    println!("host+room+parse per edit: {total:.2} allocs + {total_re:.2} reallocs");
    println!(
        "host+room per edit:       {:.2} allocs + {:.2} reallocs",
        total - parse,
        total_re - parse_re
    );
    Ok(())
}
