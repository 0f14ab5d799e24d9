//! Replays the traces in `tests/data` with `collab_engine::crdt::Doc` and with `diamond_types::list::ListCRDT`, alternating
//! runs so both see the same machine load, and prints one table: local replay, full-history merge into a fresh replica,
//! and the live heap of the finished document (counting allocator).
//! Besides the whole traces it replays their first 20,000 patches (small documents).
//! Local replay is timed twice for us: through `OpBuf` (`insert_local_into`/`delete_local_into`, one buffer cleared per
//! patch, as a client that sends each edit) and through the `Op`-returning API (one `Op` allocated per edit).
//! Times are wall clock and CPU time of this thread (which leaves out waiting for a CPU on a shared machine).
//!
//! `only <part> <trace> [prefix]` runs one part once and prints nothing, for `valgrind --tool=callgrind
//! --toggle-collect='*<part>*'`; parts: `ours_buf`, `ours_ops`, `dt_local`, `ours_remote`, `dt_remote`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use collab_engine::crdt::{Doc, Op, OpBuf};
use diamond_types::list::{Branch, ListCRDT};

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
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Patches = Vec<(usize, usize, String)>;

fn load(name: &str) -> (String, Patches) {
    let path = format!("{}/../../../tests/data/{name}.json.gz", env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut json = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut json).expect("gunzip");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let mut patches = Vec::new();
    for txn in v["txns"].as_array().expect("txns") {
        for p in txn["patches"].as_array().expect("patches") {
            patches.push((p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize, p[2].as_str().unwrap().to_owned()));
        }
    }
    (v["endContent"].as_str().expect("endContent").to_owned(), patches)
}

/// Local replay through the `Op`-returning API; keeps the ops when asked.
#[inline(never)]
fn ours_ops(patches: &Patches, mut ops: Option<&mut Vec<Op>>) -> Doc {
    let mut doc = Doc::new();
    for (pos, del, ins) in patches {
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
#[inline(never)]
fn ours_buf(patches: &Patches) -> Doc {
    let mut doc = Doc::new();
    let mut buf = OpBuf::new();
    for (pos, del, ins) in patches {
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

#[inline(never)]
fn ours_remote(ops: &[Op]) -> Doc {
    let mut doc = Doc::new();
    for op in ops {
        doc.apply_remote(Some(1), std::slice::from_ref(op)).expect("op");
    }
    doc
}

#[inline(never)]
fn dt_local(patches: &Patches) -> ListCRDT {
    let mut doc = ListCRDT::new();
    let agent = doc.get_or_create_agent_id("trace");
    for (pos, del, ins) in patches {
        if *del > 0 {
            doc.delete_without_content(agent, *pos..*pos + *del);
        }
        if !ins.is_empty() {
            doc.insert(agent, *pos, ins);
        }
    }
    doc
}

#[inline(never)]
fn dt_remote(reference: &ListCRDT) -> Branch {
    let mut branch = Branch::new();
    branch.merge(&reference.oplog, reference.oplog.local_version_ref());
    branch
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of each run of one part.
#[derive(Default)]
struct Times {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Times {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (w, c) = (Instant::now(), thread_cpu());
        let out = f();
        self.cpu.push(thread_cpu() - c);
        self.wall.push(w.elapsed());
        out
    }

    /// "median (min-max)" of wall and of CPU time, in ms.
    fn cell(&self) -> String {
        format!("{} / {}", stat(&self.wall), stat(&self.cpu))
    }

    fn median_cpu(&self) -> f64 {
        let mut v = self.cpu.clone();
        v.sort_unstable();
        v[v.len() / 2].as_secs_f64()
    }
}

fn stat(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!("{:.1} ({:.1}-{:.1})", ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("only") {
        let (part, name) = (args[2].as_str(), args[3].as_str());
        let (_, mut patches) = load(name);
        patches.truncate(args.get(4).and_then(|s| s.parse().ok()).unwrap_or(usize::MAX));
        // Only what the part needs is built first, so that `--toggle-collect='*<part>*'` counts exactly one run.
        let mut ops = Vec::new();
        if part == "ours_remote" {
            ours_ops(&patches, Some(&mut ops));
        }
        let dt_reference = (part == "dt_remote").then(|| dt_local(&patches));
        // `CRDT_ONLY_RUNS`: repeat the part (for `perf record`).
        let runs: usize = std::env::var("CRDT_ONLY_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        for _ in 0..runs {
            match part {
                "ours_buf" => drop(std::hint::black_box(ours_buf(&patches))),
                "ours_ops" => drop(std::hint::black_box(ours_ops(&patches, None))),
                "dt_local" => drop(std::hint::black_box(dt_local(&patches))),
                "ours_remote" => drop(std::hint::black_box(ours_remote(&ops))),
                "dt_remote" => drop(std::hint::black_box(dt_remote(dt_reference.as_ref().expect("built")))),
                other => panic!("unknown part {other}"),
            }
        }
        return;
    }
    let runs: usize = std::env::var("CRDT_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    println!("| trace | patches | implementation | local replay, ms: wall / CPU | merge whole history into a fresh replica, ms: wall / CPU | live heap |");
    println!("|---|---:|---|---:|---:|---:|");
    let mut ratios = Vec::new();
    for name in ["automerge-paper", "seph-blog1"] {
        let (end, all_patches) = load(name);
        for prefix in [20_000, all_patches.len()] {
            let patches: Patches = all_patches[..prefix].to_vec();
            let mut ops = Vec::new();
            let reference = ours_ops(&patches, Some(&mut ops));
            let dt_reference = dt_local(&patches);
            if prefix == all_patches.len() {
                assert_eq!(reference.text(), end);
            }
            assert_eq!(dt_reference.branch.content().to_string(), reference.text());

            let (mut ours_l, mut ours_o, mut ours_r, mut dt_l, mut dt_r) =
                (Times::default(), Times::default(), Times::default(), Times::default(), Times::default());
            for _ in 0..runs {
                let doc = ours_l.time(|| ours_buf(&patches));
                assert_eq!(doc.len(), reference.len());
                drop(doc);
                let doc = dt_l.time(|| dt_local(&patches));
                assert_eq!(doc.len(), reference.len());
                drop(doc);
                let doc = ours_o.time(|| ours_ops(&patches, None));
                assert_eq!(doc.len(), reference.len());
                drop(doc);
                let doc = ours_r.time(|| ours_remote(&ops));
                assert_eq!(doc.len(), reference.len());
                drop(doc);
                let branch = dt_r.time(|| dt_remote(&dt_reference));
                assert_eq!(branch.len(), reference.len());
                drop(branch);
            }
            drop(reference);
            drop(dt_reference);

            let before = LIVE_BYTES.load(Ordering::Relaxed);
            let doc = ours_buf(&patches);
            let ours_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
            drop(doc);
            let before = LIVE_BYTES.load(Ordering::Relaxed);
            let doc = dt_local(&patches);
            let dt_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
            drop(doc);
            let mb = |b: isize| b as f64 / 1e6;
            println!("| {name} | {prefix} | collab-engine `Doc`, `OpBuf` | {} | {} | {:.2} MB |", ours_l.cell(), ours_r.cell(), mb(ours_heap));
            println!("| {name} | {prefix} | collab-engine `Doc`, `Op` per edit | {} | | |", ours_o.cell());
            println!("| {name} | {prefix} | diamond-types 1.0.0 `ListCRDT` | {} | {} | {:.2} MB |", dt_l.cell(), dt_r.cell(), mb(dt_heap));
            ratios.push(format!("{name}/{prefix}: local {:.2}x", ours_l.median_cpu() / dt_l.median_cpu()));
        }
    }
    println!("\ntimes: median (min-max) of {runs} alternating runs, wall clock / CPU time of the thread; merge = ours: apply_remote per op; diamond-types: Branch::merge of the whole oplog.");
    println!("ours / diamond-types, median CPU time: {}", ratios.join(", "));
}
