//! `cargo bench --bench crdt_traces`: replays the editing traces in `tests/data` through `Doc` and prints a table:
//! local replay, remote integration of the whole history on a fresh replica, snapshot encode + decode, and the live heap
//! of the finished document (measured by a counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use collab_engine::crdt::{Doc, Op, OpBuf};
use collab_engine::trace::{EditingTrace, Patch};

/// Counts live heap bytes; everything else is the system allocator.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn load(name: &str) -> EditingTrace {
    EditingTrace::bundled(name).unwrap_or_else(|e| panic!("{e}"))
}

fn replay_local(trace: &EditingTrace, mut ops: Option<&mut Vec<Op>>) -> Doc {
    let mut doc = Doc::new();
    for Patch {
        pos,
        delete: del,
        insert: ins,
    } in &trace.patches
    {
        if *del > 0 {
            let d = doc.delete_local(*pos, *del);
            if let Some(ops) = ops.as_deref_mut() {
                ops.extend(d);
            }
        }
        if !ins.is_empty() {
            let op = doc.insert_local(1, *pos, ins);
            if let Some(ops) = ops.as_deref_mut() {
                ops.push(op);
            }
        }
    }
    doc
}

/// Local replay through `OpBuf`: one buffer, cleared per patch (a client sends each edit's ops, then reuses it).
fn replay_buffered(trace: &EditingTrace) -> Doc {
    let mut doc = Doc::new();
    let mut buf = OpBuf::new();
    for Patch {
        pos,
        delete: del,
        insert: ins,
    } in &trace.patches
    {
        buf.clear();
        if *del > 0 {
            doc.delete_local_into(*pos, *del, &mut buf);
        }
        if !ins.is_empty() {
            doc.insert_local_into(1, *pos, ins, &mut buf);
        }
        std::hint::black_box(&buf);
    }
    doc
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// "median (min)" in milliseconds.
fn ms(v: Vec<Duration>) -> String {
    let min = v.iter().min().copied().unwrap_or_default();
    format!(
        "{:.1} ms ({:.1})",
        median(v).as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3
    )
}

fn main() {
    let runs: usize = std::env::var("CRDT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    // For profiling: `CRDT_BENCH_ONLY=local` (or `local-ops`, through the `Op`-returning API, or `remote`) loops that part of one trace (`CRDT_BENCH_TRACE`,
    // default automerge-paper) and prints nothing.
    if let Ok(only) = std::env::var("CRDT_BENCH_ONLY") {
        let name = std::env::var("CRDT_BENCH_TRACE").unwrap_or_else(|_| "automerge-paper".into());
        let trace = load(&name);
        let mut ops = Vec::new();
        replay_local(&trace, Some(&mut ops));
        for _ in 0..runs {
            if only == "local" {
                replay_buffered(&trace);
            } else if only == "local-ops" {
                replay_local(&trace, None);
            } else {
                let mut doc = Doc::new();
                for op in &ops {
                    doc.apply_remote(Some(1), std::slice::from_ref(op))
                        .expect("remote op");
                }
            }
        }
        return;
    }
    println!("| trace | patches | final chars | local replay | remote integrate | snapshot encode+decode | live heap | spans / leaves / index keys |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for name in ["automerge-paper", "seph-blog1"] {
        let trace = load(name);

        let mut local = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let doc = replay_buffered(&trace);
            local.push(start.elapsed());
            assert_eq!(doc.len(), trace.end_content.chars().count());
        }

        let mut ops = Vec::new();
        let reference = replay_local(&trace, Some(&mut ops));
        assert_eq!(reference.text(), trace.end_content);
        let mut remote = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let mut doc = Doc::new();
            for op in &ops {
                doc.apply_remote(Some(1), std::slice::from_ref(op))
                    .expect("remote op");
            }
            remote.push(start.elapsed());
            assert_eq!(doc.len(), reference.len());
        }

        let mut snap = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let runs = reference.snapshot();
            let doc = Doc::from_snapshot(&runs).expect("snapshot");
            snap.push(start.elapsed());
            assert_eq!(doc.len(), reference.len());
        }
        let n_runs = reference.snapshot().len();
        drop(reference);

        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let doc = replay_buffered(&trace);
        let heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
        let stats = doc.stats();
        assert_eq!(doc.text(), trace.end_content);
        println!(
            "| {name} | {} | {} | {} | {} | {} ({n_runs} runs) | {:.2} MB | {} / {} / {} |",
            trace.patches.len(),
            doc.len(),
            ms(local),
            ms(remote),
            ms(snap),
            heap as f64 / 1e6,
            stats.n_spans,
            stats.n_leaves,
            stats.n_index_keys,
        );
    }
    println!("\ntimes: median (min) of {runs} runs each; local replay = delete_local_into/insert_local_into per patch into one reused OpBuf; remote = apply_remote per op on a fresh Doc.");
    fragmented();
}

/// The document shape of the s2 load (`collab-load --clients-per-room 10`): ten replicas inserting single chars at
/// random positions, so every char is a span of its own; prints its heap per char (the server's memory per document).
fn fragmented() {
    println!("\n| fragmented document (10 replicas, 1-char inserts at random positions) | chars | heap_bytes | live heap | bytes per char | spans / leaves / nodes / index keys |");
    println!("|---|---:|---:|---:|---:|---:|");
    for n in [1_000usize, 6_200, 50_000] {
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let doc = fragmented_doc(n);
        let live = LIVE_BYTES.load(Ordering::Relaxed) - before;
        let s = doc.stats();
        println!(
            "| xorshift seed 0x9E3779B97F4A7C15 | {n} | {} | {live} | {:.1} | {} / {} / {} / {} |",
            doc.heap_bytes(),
            doc.heap_bytes() as f64 / n as f64,
            s.n_spans,
            s.n_leaves,
            s.n_nodes,
            s.n_index_keys,
        );
    }
}

/// `n` single-char inserts by replicas 1..=10 in turn at xorshift-random positions.
fn fragmented_doc(n: usize) -> Doc {
    let mut doc = Doc::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pos = (x % (doc.len() as u64 + 1)) as usize;
        doc.insert_local(1 + (i % 10) as u64, pos, "x");
    }
    doc
}
