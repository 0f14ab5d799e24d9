//! Replays the traces in `tests/data` with `collab_engine::crdt::Doc` and with `diamond_types::list::ListCRDT`, alternating
//! runs so both see the same machine load, and prints one table: local replay, full-history merge into a fresh replica,
//! and the live heap of the finished document (counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use collab_engine::crdt::{Doc, Op};
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

fn ours_local(patches: &Patches, mut ops: Option<&mut Vec<Op>>) -> Doc {
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

fn stat(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    format!("{:.1} ms ({:.1})", v[v.len() / 2].as_secs_f64() * 1e3, v[0].as_secs_f64() * 1e3)
}

fn main() {
    let runs: usize = std::env::var("CRDT_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    println!("| trace | implementation | local replay | merge whole history into a fresh replica | live heap |");
    println!("|---|---|---:|---:|---:|");
    for name in ["automerge-paper", "seph-blog1"] {
        let (end, patches) = load(name);
        let mut ops = Vec::new();
        let reference = ours_local(&patches, Some(&mut ops));
        assert_eq!(reference.text(), end);
        let dt_reference = dt_local(&patches);
        assert_eq!(dt_reference.branch.content().to_string(), end);

        let (mut ours_l, mut ours_r, mut dt_l, mut dt_r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            let doc = ours_local(&patches, None);
            ours_l.push(t.elapsed());
            assert_eq!(doc.len(), reference.len());

            let t = Instant::now();
            let doc = dt_local(&patches);
            dt_l.push(t.elapsed());
            assert_eq!(doc.len(), reference.len());

            let t = Instant::now();
            let mut doc = Doc::new();
            for op in &ops {
                doc.apply_remote(Some(1), std::slice::from_ref(op)).expect("op");
            }
            ours_r.push(t.elapsed());
            assert_eq!(doc.len(), reference.len());

            let t = Instant::now();
            let mut branch = Branch::new();
            branch.merge(&dt_reference.oplog, dt_reference.oplog.local_version_ref());
            dt_r.push(t.elapsed());
            assert_eq!(branch.len(), reference.len());
        }
        drop(reference);
        drop(dt_reference);

        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let doc = ours_local(&patches, None);
        let ours_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
        drop(doc);
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let doc = dt_local(&patches);
        let dt_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
        drop(doc);
        println!("| {name} | collab-engine `Doc` | {} | {} | {:.2} MB |", stat(ours_l), stat(ours_r), ours_heap as f64 / 1e6);
        println!("| {name} | diamond-types 1.0.0 `ListCRDT` | {} | {} | {:.2} MB |", stat(dt_l), stat(dt_r), dt_heap as f64 / 1e6);
    }
    println!("\ntimes: median (min) of {runs} alternating runs; merge = ours: apply_remote per op; diamond-types: Branch::merge of the whole oplog.");
}
