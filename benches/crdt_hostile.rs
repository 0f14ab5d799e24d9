//! `cargo bench --bench crdt_hostile`: the worst op messages a client can send, timed through `Doc::apply_remote`.
//! Each scenario is one message at the 10,000-op limit (or as many ops as fit in 1 MiB) against a 100,000-char
//! document; the table shows the time to validate and integrate that one message, which is how long it holds its shard.
//! `CRDT_BENCH_RUNS` (default 5) sets the runs per scenario; `CRDT_BENCH_ONLY=<scenario>` runs one.

use std::time::{Duration, Instant};

use collab_engine::crdt::{Applied, Doc, Op, OpId};

/// Chars in the target document.
const DOC_CHARS: usize = 100_000;
/// Ops per message (the contract's limit).
const K: usize = 10_000;
/// The attacker's replica; the document's author is replica 1.
const ATTACKER: u64 = 2;

/// `DOC_CHARS` chars typed forward by replica 1, one keystroke each (a few long spans).
fn typed_forward() -> Doc {
    let mut doc = Doc::new();
    for i in 0..DOC_CHARS {
        doc.insert_local(1, i, "a");
    }
    doc
}

/// `DOC_CHARS` chars typed backwards by replica 1 (each keystroke at position 0): one span per char, and the
/// ids fall along the document, so every early item sits behind a long run of greater ones.
fn typed_backwards() -> Doc {
    let mut doc = Doc::new();
    for _ in 0..DOC_CHARS {
        doc.insert_local(1, 0, "a");
    }
    doc
}

fn ins(lamport: u64, replica: u64, after: Option<OpId>, text: &str) -> Op {
    Op::Insert {
        id: OpId::new(lamport, replica),
        after,
        text: text.to_owned(),
    }
}

/// A scenario: the document it targets, the message, what it costs before the fix, and the sender.
struct Scenario {
    name: &'static str,
    what: &'static str,
    doc: Doc,
    ops: Vec<Op>,
}

/// 10,000 one-char inserts, the first after the document's last char, every other one after the first:
/// each op looks up an id inserted earlier in the same message.
fn fan(fwd: &Doc) -> Scenario {
    let base = fwd.max_lamport().map_or(0, |m| m + 1);
    let last = fwd.id_at(fwd.len() - 1);
    let first = OpId::new(base, ATTACKER);
    let mut ops = vec![ins(base, ATTACKER, last, "x")];
    for i in 1..K as u64 {
        ops.push(ins(base + i, ATTACKER, Some(first), "x"));
    }
    Scenario {
        name: "fan",
        what: "10k inserts after an id of the same message (forward-typed doc)",
        doc: fwd.clone(),
        ops,
    }
}

/// A resend (reconnect) of the first 10,000 keystrokes of a backwards-typed document: each is known, and its
/// origin (the document start) lies behind about 100,000 greater items.
fn resend(bwd: &Doc) -> Scenario {
    let ops = (0..K as u64).map(|i| ins(i, 1, None, "a")).collect();
    Scenario {
        name: "resend",
        what: "10k resent inserts whose origin is the start (backwards-typed doc)",
        doc: bwd.clone(),
        ops,
    }
}

/// 10,000 new inserts at the document start with small lamports: each passes every greater item in the skip scan.
fn skip(bwd: &Doc) -> Scenario {
    let ops = (0..K as u64)
        .map(|i| ins(i + 1, ATTACKER, None, "x"))
        .collect();
    Scenario {
        name: "skip",
        what: "10k new inserts at the start, low lamports (backwards-typed doc)",
        doc: bwd.clone(),
        ops,
    }
}

/// One 200,000-char insert (400 KB of 2-byte chars) and then 7,000 resends of its last char in the same
/// message (about 1 MiB of JSON in all): each resend compares against the text of an insert not yet applied.
fn pending_text(fwd: &Doc) -> Scenario {
    const LONG: u64 = 200_000;
    let base = fwd.max_lamport().map_or(0, |m| m + 1);
    let text: String = "é".repeat(LONG as usize);
    let mut ops = vec![ins(base, ATTACKER, None, &text)];
    let last = base + LONG - 1;
    for _ in 0..7_000 {
        ops.push(ins(
            last,
            ATTACKER,
            Some(OpId::new(last - 1, ATTACKER)),
            "é",
        ));
    }
    Scenario {
        name: "pending_text",
        what: "a 200k-char insert, then 7k resends of its last char (forward-typed doc)",
        doc: fwd.clone(),
        ops,
    }
}

/// 10,000 deletes of the whole backwards-typed document (100,000 spans each; all but the first hit tombstones).
fn delete_all(bwd: &Doc) -> Scenario {
    let ops = (0..K)
        .map(|_| Op::Delete {
            id: OpId::new(0, 1),
            len: DOC_CHARS as u64,
        })
        .collect();
    Scenario {
        name: "delete_all",
        what: "10k deletes of every item (backwards-typed doc, 100k spans)",
        doc: bwd.clone(),
        ops,
    }
}

fn fmt_ms(v: &mut [Duration]) -> String {
    v.sort_unstable();
    format!(
        "{:.2} ms ({:.2})",
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[0].as_secs_f64() * 1e3
    )
}

fn main() {
    let runs: usize = std::env::var("CRDT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only = std::env::var("CRDT_BENCH_ONLY").ok();
    let fwd = typed_forward();
    let bwd = typed_backwards();
    let scenarios = [
        fan(&fwd),
        resend(&bwd),
        skip(&bwd),
        pending_text(&fwd),
        delete_all(&bwd),
    ];
    println!("| scenario | message | ops | one message: median (min) |");
    println!("|---|---|---:|---:|");
    for s in scenarios {
        if only.as_deref().is_some_and(|o| o != s.name) {
            continue;
        }
        let mut times = Vec::new();
        for _ in 0..runs {
            let mut doc = s.doc.clone();
            let sender = s.ops.iter().find_map(|op| match op {
                Op::Insert { id, .. } => Some(id.replica),
                Op::Delete { .. } => None,
            });
            let start = Instant::now();
            let r = doc.apply_remote(sender, &s.ops);
            times.push(start.elapsed());
            assert!(
                matches!(r, Ok(Applied::Changed) | Ok(Applied::Unchanged)),
                "{}: {r:?}",
                s.name
            );
        }
        println!(
            "| {} | {} | {} | {} |",
            s.name,
            s.what,
            s.ops.len(),
            fmt_ms(&mut times)
        );
    }
    println!("\ntimes: median (min) of {runs} runs; each run applies the message to a fresh clone of a {DOC_CHARS}-char document.");
}
