//! Writes the fixture that checks the JavaScript replica against the Rust CRDT module.
//!
//! Run `cargo run --release --example js_fixture > tests/browser/fixtures/rust-rga.json`.
//! Each case is a list of ops in the wire format plus the text the Rust `crdt::Doc` ends with;
//! random cases also list the order in which each simulated replica applied the ops (every
//! one a valid causal order). `tests/browser/test/fixture.test.js` replays them in JavaScript.

use collab_engine::crdt::{Doc, Op, OpId};
use serde_json::{json, Value};

fn id(lamport: u64, replica: u64) -> OpId {
    OpId { lamport, replica }
}

fn ins(lamport: u64, replica: u64, after: Option<(u64, u64)>, text: &str) -> Op {
    Op::Insert {
        id: id(lamport, replica),
        after: after.map(|(l, r)| id(l, r)),
        text: text.to_owned(),
    }
}

fn del(lamport: u64, replica: u64, len: u64) -> Op {
    Op::Delete {
        id: id(lamport, replica),
        len,
    }
}

fn wire(op: &Op) -> Value {
    match op {
        Op::Insert { id, after, text } => json!({
            "kind": "ins",
            "id": [id.lamport, id.replica],
            "after": after.map(|a| json!([a.lamport, a.replica])),
            "text": text,
        }),
        Op::Delete { id, len } => {
            json!({"kind": "del", "id": [id.lamport, id.replica], "len": len})
        }
    }
}

/// Applies `ops` one message each, as a server would, and returns the text.
fn replay(ops: &[Op]) -> String {
    let mut doc = Doc::new();
    for op in ops {
        doc.apply_remote(None, std::slice::from_ref(op))
            .expect("fixture ops are valid");
    }
    doc.dbg_check();
    doc.text()
}

fn ordering_cases() -> Vec<(&'static str, Vec<Op>)> {
    vec![
        (
            "siblings after one parent: greatest id first",
            vec![
                ins(1, 1, None, "a"),
                ins(2, 1, Some((1, 1)), "b"),
                ins(2, 2, Some((1, 1)), "c"),
                ins(3, 1, Some((1, 1)), "d"),
                ins(2, 3, Some((1, 1)), "e"),
            ],
        ),
        (
            "an insert skips the subtree of a greater sibling",
            vec![
                ins(1, 1, None, "a"),
                ins(5, 2, Some((1, 1)), "b"),
                ins(6, 2, Some((5, 2)), "c"),
                ins(7, 1, Some((6, 2)), "d"),
                ins(3, 3, Some((1, 1)), "x"),
                ins(4, 4, Some((3, 3)), "y"),
            ],
        ),
        (
            "concurrent inserts at the start",
            vec![
                ins(0, 1, None, "x"),
                ins(0, 2, None, "y"),
                ins(5, 1, None, "z"),
                ins(1, 3, None, "w"),
            ],
        ),
        (
            "insert into the middle of a run, delete across runs",
            vec![
                ins(1, 1, None, "hello"),
                ins(10, 2, Some((3, 1)), "XY"),
                del(2, 1, 2),
                ins(3, 3, Some((2, 1)), "q"),
                del(10, 2, 1),
                ins(20, 1, Some((5, 1)), " world"),
                del(4, 1, 1),
            ],
        ),
        (
            "deleting a tombstone again changes nothing",
            vec![
                ins(0, 7, None, "abc"),
                del(1, 7, 1),
                del(1, 7, 1),
                del(0, 7, 3),
                ins(9, 8, Some((2, 7)), "z"),
            ],
        ),
        (
            "code points outside the BMP",
            vec![
                ins(1, 1, None, "a😀b"),
                ins(9, 2, Some((2, 1)), "é🎉"),
                del(1, 1, 1),
                ins(12, 3, Some((10, 2)), "𝄞"),
                del(9, 2, 1),
            ],
        ),
        (
            "equal lamports, different replicas",
            vec![
                ins(1, 5, None, "p"),
                ins(2, 9, Some((1, 5)), "A"),
                ins(2, 3, Some((1, 5)), "B"),
                ins(2, 6, Some((1, 5)), "C"),
                ins(3, 3, Some((2, 3)), "D"),
                ins(3, 9, Some((2, 9)), "E"),
            ],
        ),
        (
            "multi-character inserts after each other's middles",
            vec![
                ins(0, 1, None, "0123456789"),
                ins(11, 2, Some((4, 1)), "abcdef"),
                ins(11, 3, Some((4, 1)), "ABCDEF"),
                ins(20, 1, Some((13, 2)), "__"),
                del(3, 1, 5),
                del(12, 3, 3),
            ],
        ),
    ]
}

/// xorshift64: a seeded generator so the fixture is reproducible without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Replicas edit concurrently and catch up with a shared log at random moments.
fn random_case(seed: u64, n_replicas: usize, n_steps: usize) -> Value {
    const ALPHABET: &[&str] = &["a", "b", "c", "d", " ", "\n", "é", "😀", "xyz", "Hello"];
    let mut rng = Rng(seed);
    let mut docs: Vec<Doc> = (0..n_replicas).map(|_| Doc::new()).collect();
    let mut log: Vec<Op> = Vec::new();
    let mut seen: Vec<usize> = vec![0; n_replicas];
    let mut orders: Vec<Vec<usize>> = vec![Vec::new(); n_replicas];
    for _ in 0..n_steps {
        let r = rng.below(n_replicas as u64) as usize;
        if rng.below(4) == 0 {
            // Catch up with a random part of the log.
            let upto = seen[r] + rng.below((log.len() - seen[r]) as u64 + 1) as usize;
            for (i, op) in log.iter().enumerate().take(upto).skip(seen[r]) {
                if !orders[r].contains(&i) {
                    docs[r]
                        .apply_remote(None, std::slice::from_ref(op))
                        .expect("log ops apply");
                    orders[r].push(i);
                }
            }
            seen[r] = upto;
            continue;
        }
        let doc = &mut docs[r];
        let len = doc.len();
        let ops = if len > 0 && rng.below(3) == 0 {
            let pos = rng.below(len as u64) as usize;
            let n = 1 + rng.below(((len - pos) as u64).min(4)) as usize;
            doc.delete_local(pos, n)
        } else {
            let text = ALPHABET[rng.below(ALPHABET.len() as u64) as usize];
            vec![doc.insert_local(r as u64 + 1, rng.below(len as u64 + 1) as usize, text)]
        };
        for op in ops {
            orders[r].push(log.len());
            log.push(op);
        }
    }
    for (r, doc) in docs.iter_mut().enumerate() {
        for (i, op) in log.iter().enumerate() {
            if !orders[r].contains(&i) {
                doc.apply_remote(None, std::slice::from_ref(op))
                    .expect("log ops apply");
                orders[r].push(i);
            }
        }
    }
    let text = replay(&log);
    for doc in &docs {
        assert_eq!(doc.text(), text, "replicas converge in Rust");
    }
    json!({
        "name": format!("random concurrent edits, seed {seed}"),
        "ops": log.iter().map(wire).collect::<Vec<_>>(),
        "orders": orders,
        "text": text,
    })
}

fn main() {
    let mut cases: Vec<Value> = ordering_cases()
        .into_iter()
        .map(|(name, ops)| json!({"name": name, "ops": ops.iter().map(wire).collect::<Vec<_>>(), "text": replay(&ops)}))
        .collect();
    for seed in 1..=6 {
        cases.push(random_case(seed * 0x9e37_79b9_7f4a_7c15, 3, 150));
    }
    // One case per line keeps diffs of a regenerated fixture readable.
    let about = "Ops and the text the Rust crdt::Doc ends with. Generated by examples/js_fixture.rs; do not edit.";
    println!("{{\"about\": {},\n\"cases\": [", json!(about));
    for (i, case) in cases.iter().enumerate() {
        let sep = if i + 1 < cases.len() { "," } else { "" };
        println!("{case}{sep}");
    }
    println!("]}}");
}
