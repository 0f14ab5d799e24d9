//! `Doc` through its public API: hand-written RGA cases, validation errors (the doc unchanged after each), snapshots,
//! and proptests against a plain `Vec<char>` model and a per-char reference RGA with several replicas.

use collab_engine::crdt::{
    Applied, CrdtError, Doc, InvalidOpReason, Op, OpId, Run, RunContent, MAX_ID_COMPONENT,
};
use proptest::prelude::*;

fn id(lamport: u64, replica: u64) -> OpId {
    OpId::new(lamport, replica)
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

/// Applies each message (sender, ops) in order, then checks the text and the invariants; returns the doc.
fn check(messages: &[(u64, Vec<Op>)], expected: &str) -> Doc {
    let mut doc = Doc::new();
    for (i, (sender, ops)) in messages.iter().enumerate() {
        doc.apply_remote(Some(*sender), ops)
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        doc.dbg_check();
    }
    assert_eq!(doc.text(), expected);
    let rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("snapshot rebuilds");
    rebuilt.dbg_check();
    assert_eq!(rebuilt.text(), expected);
    assert_eq!(rebuilt.snapshot(), doc.snapshot());
    doc
}

/// Applies `ops` expecting `err`, and checks that nothing changed.
fn check_err(doc: &mut Doc, sender: Option<u64>, ops: &[Op], err: CrdtError) {
    let (text, snap, max_lamport, max_replica) = (
        doc.text(),
        doc.snapshot(),
        doc.max_lamport(),
        doc.max_replica(),
    );
    assert_eq!(doc.apply_remote(sender, ops), Err(err));
    assert_eq!(doc.text(), text);
    assert_eq!(doc.snapshot(), snap);
    assert_eq!(
        (doc.max_lamport(), doc.max_replica()),
        (max_lamport, max_replica)
    );
    doc.dbg_check();
}

#[test]
fn concurrent_inserts_after_same_parent_greatest_first() {
    let base = (1, vec![ins(0, 1, None, "a")]);
    let x = (2, vec![ins(1, 2, Some((0, 1)), "X")]);
    let y = (3, vec![ins(1, 3, Some((0, 1)), "Y")]);
    let z = (2, vec![ins(2, 2, Some((0, 1)), "Z")]);
    check(&[base.clone(), x.clone(), y.clone(), z.clone()], "aZYX");
    check(&[base.clone(), z.clone(), y.clone(), x.clone()], "aZYX");
    check(&[base, y, z, x], "aZYX");
}

#[test]
fn concurrent_inserts_at_start() {
    let a = (1, vec![ins(0, 1, None, "a")]);
    let b = (2, vec![ins(0, 2, None, "b")]);
    check(&[a.clone(), b.clone()], "ba");
    check(&[b, a], "ba");
}

#[test]
fn concurrent_runs_do_not_interleave() {
    let base = (1, vec![ins(0, 1, None, "<>")]);
    let abc = (2, vec![ins(5, 2, Some((0, 1)), "abc")]);
    let xyz = (3, vec![ins(5, 3, Some((0, 1)), "xyz")]);
    check(&[base.clone(), abc.clone(), xyz.clone()], "<xyzabc>");
    check(&[base, xyz, abc], "<xyzabc>");
}

#[test]
fn insert_after_tombstone() {
    let base = (1, vec![ins(0, 1, None, "abc")]);
    let d = (1, vec![del(1, 1, 1)]);
    let x = (2, vec![ins(5, 2, Some((1, 1)), "X")]);
    let doc = check(&[base.clone(), d.clone(), x.clone()], "aXc");
    assert_eq!(
        doc.position_of(id(1, 1)),
        Some(1),
        "a tombstone anchors a position"
    );
    check(&[base, x, d], "aXc");
}

#[test]
fn remote_insert_inside_a_run_splits_it() {
    let base = (1, vec![ins(0, 1, None, "abcdef")]);
    let x = (2, vec![ins(10, 2, Some((2, 1)), "XY")]);
    let doc = check(&[base, x], "abcXYdef");
    let runs = doc.snapshot();
    assert_eq!(
        runs,
        vec![
            Run {
                id: id(0, 1),
                content: RunContent::Text("abc".into())
            },
            Run {
                id: id(10, 2),
                content: RunContent::Text("XY".into())
            },
            Run {
                id: id(3, 1),
                content: RunContent::Text("def".into())
            },
        ]
    );
    assert_eq!(doc.id_at(3), Some(id(10, 2)));
    assert_eq!(doc.id_at(5), Some(id(3, 1)));
    assert_eq!(doc.position_of(id(4, 1)), Some(6));
}

#[test]
fn insert_skips_greater_items_then_stops_at_a_smaller_one() {
    // "a" then, concurrently after "a": "B" with a greater id and "c" with a smaller one.
    let base = (1, vec![ins(0, 1, None, "a")]);
    let big = (3, vec![ins(9, 3, Some((0, 1)), "B")]);
    let small = (2, vec![ins(1, 2, Some((0, 1)), "c")]);
    // A child of "B" sits between B and c; the new item skips B and its child.
    let child = (3, vec![ins(10, 3, Some((9, 3)), "b")]);
    let mid = (4, vec![ins(5, 4, Some((0, 1)), "M")]);
    check(
        &[
            base.clone(),
            big.clone(),
            small.clone(),
            child.clone(),
            mid.clone(),
        ],
        "aBbMc",
    );
    check(&[base, mid, small, big, child], "aBbMc");
}

#[test]
fn deletes_and_tombstone_runs() {
    let base = (1, vec![ins(0, 1, None, "hello world")]);
    let d1 = (2, vec![del(5, 1, 6)]);
    let d2 = (3, vec![del(4, 1, 3)]);
    let doc = check(&[base, d1, d2], "hell");
    assert_eq!(
        doc.snapshot(),
        vec![
            Run {
                id: id(0, 1),
                content: RunContent::Text("hell".into())
            },
            Run {
                id: id(4, 1),
                content: RunContent::Deleted(7)
            }
        ]
    );
}

#[test]
fn lamport_zero_and_ops_referencing_earlier_ops_of_the_message() {
    let msg = (
        1,
        vec![
            ins(0, 1, None, "ab"),
            ins(2, 1, Some((1, 1)), "cd"),
            del(1, 1, 2),
            ins(4, 1, Some((3, 1)), "e"),
        ],
    );
    let doc = check(&[msg], "ade");
    assert_eq!(doc.max_lamport(), Some(4));
    assert_eq!(doc.max_replica(), 1);
}

#[test]
fn resend_is_unchanged() {
    let mut doc = Doc::new();
    let msg = vec![
        ins(0, 1, None, "abc"),
        ins(3, 1, Some((1, 1)), "X"),
        del(2, 1, 1),
    ];
    assert_eq!(doc.apply_remote(Some(1), &msg), Ok(Applied::Changed));
    let snap = doc.snapshot();
    assert_eq!(doc.apply_remote(Some(1), &msg), Ok(Applied::Unchanged));
    // Parts of earlier inserts, each with its own `after`, are the same ids used the same way.
    assert_eq!(
        doc.apply_remote(Some(1), &[ins(1, 1, Some((0, 1)), "bc")]),
        Ok(Applied::Unchanged)
    );
    assert_eq!(
        doc.apply_remote(Some(1), &[ins(2, 1, Some((1, 1)), "c")]),
        Ok(Applied::Unchanged)
    );
    // Deleting a tombstone is a no-op.
    assert_eq!(
        doc.apply_remote(Some(2), &[del(2, 1, 1)]),
        Ok(Applied::Unchanged)
    );
    // Unchanged ops in a message that changes something are fine.
    assert_eq!(
        doc.apply_remote(Some(1), &[del(2, 1, 1), del(0, 1, 1)]),
        Ok(Applied::Changed)
    );
    assert_ne!(doc.snapshot(), snap);
    doc.dbg_check();
    // A rebuilt replica answers resends the same way (tombstone text is not compared).
    let mut rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("rebuild");
    assert_eq!(rebuilt.apply_remote(Some(1), &msg), Ok(Applied::Unchanged));
    assert_eq!(
        doc.apply_remote(Some(1), &[ins(0, 1, None, "zbc")]),
        Ok(Applied::Unchanged)
    );
    assert_eq!(
        rebuilt.apply_remote(Some(1), &[ins(0, 1, None, "zbc")]),
        Ok(Applied::Unchanged)
    );
}

#[test]
fn validation_errors_leave_the_doc_unchanged() {
    let mut doc = Doc::new();
    doc.apply_remote(Some(1), &[ins(0, 1, None, "abcdef"), del(4, 1, 1)])
        .expect("base");
    doc.apply_remote(Some(2), &[ins(10, 2, Some((2, 1)), "XY")])
        .expect("base");
    let unknown = |op_index, l, r| CrdtError::UnknownId {
        op_index,
        id: id(l, r),
    };
    let conflict = |op_index| CrdtError::IdConflict { op_index };
    let bad = |op_index, reason| CrdtError::InvalidOp { op_index, reason };
    use InvalidOpReason::*;

    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, Some((7, 1)), "x")],
        unknown(0, 7, 1),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, Some((5, 9)), "x")],
        unknown(0, 5, 9),
    );
    check_err(&mut doc, Some(3), &[del(9, 1, 1)], unknown(0, 9, 1));
    check_err(&mut doc, Some(3), &[del(4, 1, 3)], unknown(0, 6, 1));
    check_err(&mut doc, Some(3), &[del(11, 2, 2)], unknown(0, 12, 2));
    // Atomic: a valid op followed by an invalid one applies nothing.
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, None, "ok"), del(0, 1, 1), del(30, 3, 1)],
        unknown(2, 30, 3),
    );
    check_err(
        &mut doc,
        Some(3),
        &[del(0, 1, 1), ins(20, 3, Some((19, 3)), "x")],
        unknown(1, 19, 3),
    );

    check_err(&mut doc, Some(1), &[ins(0, 1, None, "abz")], conflict(0));
    check_err(
        &mut doc,
        Some(1),
        &[ins(0, 1, Some((11, 2)), "abc")],
        bad(0, LamportNotAboveParent),
    );
    check_err(&mut doc, Some(1), &[ins(1, 1, None, "bc")], conflict(0));
    check_err(
        &mut doc,
        Some(1),
        &[ins(3, 1, Some((2, 1)), "D")],
        conflict(0),
    );
    check_err(
        &mut doc,
        Some(1),
        &[ins(3, 1, Some((11, 2)), "d")],
        bad(0, LamportNotAboveParent),
    );
    check_err(
        &mut doc,
        Some(1),
        &[ins(3, 1, Some((1, 1)), "d")],
        conflict(0),
    );
    // (3,1) was inserted after (2,1) even though X and Y now sit between them: the same use, a no-op.
    assert_eq!(
        doc.apply_remote(Some(1), &[ins(3, 1, Some((2, 1)), "d")]),
        Ok(Applied::Unchanged)
    );
    check_err(
        &mut doc,
        Some(1),
        &[ins(5, 1, Some((4, 1)), "fg")],
        conflict(0),
    );
    check_err(
        &mut doc,
        Some(2),
        &[ins(11, 2, Some((10, 2)), "YZ")],
        conflict(0),
    );
    check_err(
        &mut doc,
        Some(2),
        &[ins(9, 2, Some((2, 1)), "WXY")],
        conflict(0),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, None, "ab"), ins(21, 3, None, "q")],
        conflict(1),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, None, "ab"), ins(20, 3, None, "ac")],
        conflict(1),
    );

    check_err(
        &mut doc,
        Some(3),
        &[ins(2, 3, Some((2, 1)), "x")],
        bad(0, LamportNotAboveParent),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(1, 3, Some((2, 1)), "x")],
        bad(0, LamportNotAboveParent),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 4, None, "x")],
        bad(0, ForeignReplica),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, None, "")],
        bad(0, EmptyText),
    );
    check_err(&mut doc, Some(3), &[del(0, 1, 0)], bad(0, ZeroLength));
    check_err(
        &mut doc,
        Some(3),
        &[ins(MAX_ID_COMPONENT, 3, None, "xy")],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(MAX_ID_COMPONENT + 1, 3, None, "x")],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        None,
        &[ins(20, MAX_ID_COMPONENT + 1, None, "x")],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        Some(3),
        &[del(0, 1, MAX_ID_COMPONENT + 1)],
        unknown(0, 6, 1),
    );
    check_err(
        &mut doc,
        Some(3),
        &[del(1, 1, MAX_ID_COMPONENT + 1)],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        Some(3),
        &[del(MAX_ID_COMPONENT, 1, 2)],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        Some(3),
        &[del(0, 1, u64::MAX)],
        bad(0, IdOverflow),
    );
    check_err(
        &mut doc,
        Some(3),
        &[ins(20, 3, None, "ok"), ins(30, 3, None, "")],
        bad(1, EmptyText),
    );

    assert_eq!(unknown(0, 1, 1).code(), "unknown_id");
    assert_eq!(conflict(0).code(), "id_conflict");
    assert_eq!(bad(0, EmptyText).code(), "invalid_op");
    // Lamport 0 and the largest ids are valid; sender None skips the replica check.
    assert_eq!(
        doc.apply_remote(None, &[ins(MAX_ID_COMPONENT, MAX_ID_COMPONENT, None, "!")]),
        Ok(Applied::Changed)
    );
    assert_eq!(doc.max_replica(), MAX_ID_COMPONENT);
    assert_eq!(doc.text(), "!abcXYdf");
    doc.dbg_check();
}

#[test]
fn from_snapshot_rejects_bad_runs() {
    let text = |l, r, t: &str| Run {
        id: id(l, r),
        content: RunContent::Text(t.into()),
    };
    let gone = |l, r, n| Run {
        id: id(l, r),
        content: RunContent::Deleted(n),
    };
    use InvalidOpReason::*;
    assert_eq!(
        Doc::from_snapshot(&[text(0, 1, "")]).unwrap_err(),
        CrdtError::InvalidOp {
            op_index: 0,
            reason: EmptyText
        }
    );
    assert_eq!(
        Doc::from_snapshot(&[text(0, 1, "a"), gone(5, 1, 0)]).unwrap_err(),
        CrdtError::InvalidOp {
            op_index: 1,
            reason: ZeroLength
        }
    );
    assert_eq!(
        Doc::from_snapshot(&[text(0, 1, "abc"), gone(2, 1, 2)]).unwrap_err(),
        CrdtError::IdConflict { op_index: 1 }
    );
    assert_eq!(
        Doc::from_snapshot(&[gone(MAX_ID_COMPONENT, 1, 2)]).unwrap_err(),
        CrdtError::InvalidOp {
            op_index: 0,
            reason: IdOverflow
        }
    );
    // (1,2) after (1,1): its nearest earlier smaller id has the same lamport, which no valid history produces.
    assert_eq!(
        Doc::from_snapshot(&[text(1, 1, "a"), text(1, 2, "b")]).unwrap_err(),
        CrdtError::InvalidOp {
            op_index: 1,
            reason: LamportNotAboveParent
        }
    );
    let doc = Doc::from_snapshot(&[
        text(0, 1, "ab"),
        gone(2, 1, 3),
        text(7, 2, "x"),
        text(5, 1, "c"),
    ])
    .expect("valid");
    doc.dbg_check();
    assert_eq!(doc.text(), "abxc");
    assert_eq!(doc.max_lamport(), Some(7));
    assert_eq!(Doc::from_snapshot(&[]).expect("empty").text(), "");
}

#[test]
fn local_edits_produce_the_contract_ops() {
    let mut doc = Doc::new();
    assert!(doc.is_empty());
    assert_eq!(doc.insert_local(5, 0, "hello"), ins(0, 5, None, "hello"));
    assert_eq!(
        doc.insert_local(5, 5, " wörld"),
        ins(5, 5, Some((4, 5)), " wörld")
    );
    assert_eq!(doc.insert_local(5, 2, "XY"), ins(11, 5, Some((1, 5)), "XY"));
    assert_eq!(doc.text(), "heXYllo wörld");
    // One delete per run of consecutive ids.
    assert_eq!(
        doc.delete_local(1, 4),
        vec![del(1, 5, 1), del(11, 5, 2), del(2, 5, 1)]
    );
    assert_eq!(doc.delete_local(0, 0), vec![]);
    assert_eq!(doc.text(), "hlo wörld");
    assert_eq!(doc.delete_local(1, 2), vec![del(3, 5, 2)]);
    assert_eq!(doc.position_of(id(12, 5)), Some(1));
    assert_eq!(doc.position_of(id(99, 5)), None);
    assert_eq!(doc.id_at(1), Some(id(5, 5)));
    assert_eq!(doc.id_at(7), None);
    doc.dbg_check();
    let mut other = Doc::new();
    other
        .apply_remote(Some(9), &[ins(20, 9, None, "z")])
        .expect("z");
    assert_eq!(
        other.insert_local(9, 1, "!"),
        ins(21, 9, Some((20, 9)), "!")
    );
}

#[test]
#[should_panic]
fn insert_local_past_the_end_panics() {
    Doc::new().insert_local(1, 1, "x");
}

#[test]
#[should_panic]
fn delete_local_past_the_end_panics() {
    let mut doc = Doc::new();
    doc.insert_local(1, 0, "ab");
    doc.delete_local(1, 2);
}

/// A plain per-char RGA: the differential oracle.
#[derive(Default)]
struct RefRga {
    items: Vec<(OpId, char, bool)>,
}

impl RefRga {
    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Insert { id, after, text } => {
                    if self.items.iter().any(|it| it.0 == *id) {
                        continue;
                    }
                    let mut prev = *after;
                    for (k, c) in text.chars().enumerate() {
                        let me = OpId::new(id.lamport + k as u64, id.replica);
                        let mut i = match prev {
                            None => 0,
                            Some(p) => {
                                self.items
                                    .iter()
                                    .position(|it| it.0 == p)
                                    .expect("known after")
                                    + 1
                            }
                        };
                        while i < self.items.len() && self.items[i].0 > me {
                            i += 1;
                        }
                        self.items.insert(i, (me, c, false));
                        prev = Some(me);
                    }
                }
                Op::Delete { id, len } => {
                    for it in self.items.iter_mut() {
                        if it.0.replica == id.replica
                            && it.0.lamport >= id.lamport
                            && it.0.lamport < id.lamport + len
                        {
                            it.2 = true;
                        }
                    }
                }
            }
        }
    }

    fn text(&self) -> String {
        self.items
            .iter()
            .filter(|it| !it.2)
            .map(|it| it.1)
            .collect()
    }
}

#[derive(Clone, Debug)]
enum Action {
    /// Replica edits: insert `text` at a fraction of its length, or delete a range.
    Insert {
        replica: usize,
        at: f64,
        text: String,
    },
    Delete {
        replica: usize,
        at: f64,
        len: usize,
    },
    /// Replica receives a message (by a fraction of the log, so old ones are resent too).
    Deliver {
        replica: usize,
        pick: f64,
    },
    /// Replica sends what it has edited since its last send, as one message.
    Flush {
        replica: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..5usize, 0.0..=1.0f64, "[a-cé😀]{1,4}").prop_map(|(replica, at, text)| Action::Insert { replica, at, text }),
        1 => (0..5usize, 0.0..=1.0f64, 1..6usize).prop_map(|(replica, at, len)| Action::Delete { replica, at, len }),
        3 => (0..5usize, 0.0..1.0f64).prop_map(|(replica, pick)| Action::Deliver { replica, pick }),
        2 => (0..5usize).prop_map(|replica| Action::Flush { replica }),
    ]
}

fn run_replicas(n_replicas: usize, actions: &[Action]) {
    let mut docs: Vec<Doc> = (0..n_replicas).map(|_| Doc::new()).collect();
    let mut unsent: Vec<Vec<Op>> = vec![Vec::new(); n_replicas];
    // (sender replica id, ops), in the order sent: a causal order.
    let mut log: Vec<(u64, Vec<Op>)> = Vec::new();
    let mut delivered: Vec<Vec<bool>> = vec![Vec::new(); n_replicas];
    let replica_id = |i: usize| i as u64 + 1;
    let flush = |i: usize,
                 unsent: &mut Vec<Vec<Op>>,
                 log: &mut Vec<(u64, Vec<Op>)>,
                 delivered: &mut Vec<Vec<bool>>| {
        if !unsent[i].is_empty() {
            log.push((replica_id(i), std::mem::take(&mut unsent[i])));
            for (j, d) in delivered.iter_mut().enumerate() {
                d.push(j == i);
            }
        }
    };
    for a in actions {
        match a.clone() {
            Action::Insert { replica, at, text } => {
                let i = replica % n_replicas;
                let pos = ((at * docs[i].len() as f64) as usize).min(docs[i].len());
                let op = docs[i].insert_local(replica_id(i), pos, &text);
                unsent[i].push(op);
            }
            Action::Delete { replica, at, len } => {
                let i = replica % n_replicas;
                let n = docs[i].len();
                let pos = ((at * n as f64) as usize).min(n);
                let ops = docs[i].delete_local(pos, len.min(n - pos));
                unsent[i].extend(ops);
            }
            Action::Flush { replica } => {
                flush(replica % n_replicas, &mut unsent, &mut log, &mut delivered)
            }
            Action::Deliver { replica, pick } => {
                let i = replica % n_replicas;
                if log.is_empty() {
                    continue;
                }
                let m = ((pick * log.len() as f64) as usize).min(log.len() - 1);
                let before = (docs[i].text(), docs[i].snapshot());
                match docs[i].apply_remote(Some(log[m].0), &log[m].1) {
                    Ok(applied) => {
                        if delivered[i][m] {
                            assert_eq!(
                                applied,
                                Applied::Unchanged,
                                "resend of message {m} to replica {i}"
                            );
                        }
                        delivered[i][m] = true;
                    }
                    Err(CrdtError::UnknownId { .. }) => {
                        assert!(!delivered[i][m]);
                        assert_eq!(
                            (docs[i].text(), docs[i].snapshot()),
                            before,
                            "refused message changed the doc"
                        );
                    }
                    Err(e) => panic!("message {m} to replica {i}: {e}"),
                }
            }
        }
    }
    for i in 0..n_replicas {
        flush(i, &mut unsent, &mut log, &mut delivered);
    }
    let rebuilt_first = Doc::from_snapshot(&docs[0].snapshot()).expect("rebuild");
    let mut all: Vec<Doc> = docs;
    all.push(rebuilt_first);
    let mut oracle = RefRga::default();
    for (sender, ops) in &log {
        oracle.apply(ops);
        for doc in all.iter_mut() {
            doc.apply_remote(Some(*sender), ops)
                .expect("causal delivery succeeds");
        }
    }
    let expected = oracle.text();
    let snap = all[0].snapshot();
    for (i, doc) in all.iter().enumerate() {
        doc.dbg_check();
        assert_eq!(doc.text(), expected, "replica {i} vs reference RGA");
        assert_eq!(doc.snapshot(), snap, "replica {i} snapshot");
    }
}

/// `PROPTEST_CASES` from the environment when set (for long runs), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(20)))]

    /// Long histories: enough spans for leaf and node splits and index churn.
    #[test]
    fn replicas_converge_long(n_replicas in 2..=5usize, actions in prop::collection::vec(action(), 500..1500)) {
        run_replicas(n_replicas, &actions);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    #[test]
    fn replicas_converge(n_replicas in 2..=5usize, actions in prop::collection::vec(action(), 1..120)) {
        run_replicas(n_replicas, &actions);
    }

    #[test]
    fn single_replica_matches_vec_model(
        edits in prop::collection::vec((any::<bool>(), 0.0..=1.0f64, 1..8usize, "[a-zß]{1,6}"), 1..400)
    ) {
        let mut doc = Doc::new();
        let mut model: Vec<char> = Vec::new();
        for (is_insert, at, len, text) in edits {
            let pos = ((at * model.len() as f64) as usize).min(model.len());
            if is_insert || model.is_empty() {
                doc.insert_local(1, pos, &text);
                model.splice(pos..pos, text.chars());
            } else {
                let len = len.min(model.len() - pos);
                doc.delete_local(pos, len);
                model.drain(pos..pos + len);
            }
            prop_assert_eq!(doc.len(), model.len());
        }
        prop_assert_eq!(doc.text(), model.iter().collect::<String>());
        doc.dbg_check();
        for pos in (0..model.len()).step_by(7) {
            let id = doc.id_at(pos).expect("id");
            prop_assert_eq!(doc.position_of(id), Some(pos));
        }
        let rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("rebuild");
        rebuilt.dbg_check();
        prop_assert_eq!(rebuilt.text(), doc.text());
    }
}

#[test]
fn doc_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone + Default + std::fmt::Debug>() {}
    assert_traits::<Doc>();
    let mut doc = Doc::default();
    doc.insert_local(1, 0, "abc");
    let copy = doc.clone();
    doc.delete_local(0, 1);
    assert_eq!(
        (doc.text(), copy.text()),
        ("bc".to_owned(), "abc".to_owned())
    );
    assert!(format!("{doc:?}").contains("len"));
}

fn arbitrary_op() -> impl Strategy<Value = Op> {
    let small_id = (0..40u64, 1..4u64).prop_map(|(l, r)| OpId::new(l, r));
    prop_oneof![
        (
            small_id.clone(),
            prop::option::weighted(0.8, small_id.clone()),
            "[xyé]{0,4}"
        )
            .prop_map(|(id, after, text)| Op::Insert { id, after, text }),
        (small_id, 0..6u64).prop_map(|(id, len)| Op::Delete { id, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// Hostile op messages: never a panic; an error leaves the doc as it was; an accepted message is then a no-op.
    #[test]
    fn arbitrary_messages_are_atomic_and_idempotent(
        messages in prop::collection::vec((prop::option::of(1..4u64), prop::collection::vec(arbitrary_op(), 1..4)), 1..60)
    ) {
        let mut doc = Doc::new();
        for (sender, ops) in &messages {
            let before = doc.snapshot();
            match doc.apply_remote(*sender, ops) {
                Ok(_) => {
                    prop_assert_eq!(doc.apply_remote(*sender, ops), Ok(Applied::Unchanged));
                    doc.dbg_check();
                }
                Err(_) => prop_assert_eq!(doc.snapshot(), before),
            }
        }
        let rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("rebuild");
        prop_assert_eq!(rebuilt.text(), doc.text());
    }
}

#[test]
fn a_message_may_repeat_its_own_insert() {
    let mut doc = Doc::new();
    let msg = [
        ins(0, 1, None, "ab"),
        ins(0, 1, None, "ab"),
        ins(1, 1, Some((0, 1)), "b"),
    ];
    assert_eq!(doc.apply_remote(Some(1), &msg), Ok(Applied::Changed));
    assert_eq!(doc.text(), "ab");
    assert_eq!(doc.apply_remote(Some(1), &msg), Ok(Applied::Unchanged));
    doc.dbg_check();
}

#[test]
#[should_panic(expected = "lamport past 2^53-1")]
fn insert_local_without_a_lamport_left_panics() {
    let mut doc = Doc::new();
    doc.apply_remote(None, &[ins(MAX_ID_COMPONENT, 1, None, "z")])
        .expect("max id");
    doc.insert_local(2, 0, "x");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// Long messages (repeated and overlapping deletes, inserts after ids of the same message, resends inside the
    /// message): one message does exactly what its ops do one by one, and fails at the same op with the same error.
    #[test]
    fn a_message_equals_its_ops_one_by_one(
        prefix in prop::collection::vec(arbitrary_op(), 0..20),
        ops in prop::collection::vec(arbitrary_op(), 1..40),
    ) {
        let mut base = Doc::new();
        for op in &prefix {
            let _ = base.apply_remote(None, std::slice::from_ref(op));
        }
        let mut whole = base.clone();
        let mut each = base.clone();
        match whole.apply_remote(None, &ops) {
            Ok(_) => {
                for op in &ops {
                    prop_assert!(each.apply_remote(None, std::slice::from_ref(op)).is_ok());
                }
                prop_assert_eq!(whole.snapshot(), each.snapshot());
                whole.dbg_check();
            }
            Err(e) => {
                prop_assert_eq!(whole.snapshot(), base.snapshot());
                for (i, op) in ops.iter().enumerate() {
                    match each.apply_remote(None, std::slice::from_ref(op)) {
                        Ok(_) => prop_assert!(i < e.op_index()),
                        Err(f) => {
                            prop_assert_eq!(i, e.op_index());
                            prop_assert_eq!(f.code(), e.code());
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// The message shapes of `benches/crdt_hostile.rs`, scaled down, against a backwards-typed document (one span per
/// char, several tree levels): the result matches the reference RGA, and the tree invariants hold.
#[test]
fn hostile_message_shapes_match_the_reference() {
    const N: usize = 3000;
    const K: u64 = 400;
    let mut author = Doc::new();
    let mut history = Vec::new();
    for _ in 0..N {
        history.push(author.insert_local(1, 0, "a"));
    }
    let base_lamport = author.max_lamport().expect("typed") + 1;
    let mut messages: Vec<(u64, Vec<Op>)> = Vec::new();
    // Resend of the first keystrokes: their origin is the start, behind every later one.
    messages.push((1, history[..K as usize].to_vec()));
    // New inserts at the start with low lamports: each skips most of the document.
    messages.push((2, (0..K).map(|i| ins(i + 1, 2, None, "x")).collect()));
    // A fan of inserts after the first insert of the same message, plus resends of it.
    let mut fan = vec![ins(base_lamport, 3, Some((5, 1)), "yé")];
    for i in 2..K {
        fan.push(ins(base_lamport + i, 3, Some((base_lamport, 3)), "z"));
    }
    fan.push(ins(base_lamport + 1, 3, Some((base_lamport, 3)), "é"));
    messages.push((3, fan));
    // Repeated, overlapping deletes of most of the document, and of the fan just inserted.
    let mut dels: Vec<Op> = (0..K).map(|i| del(i % 7, 1, N as u64 - 10)).collect();
    dels.push(del(base_lamport, 3, K));
    dels.push(del(base_lamport + 1, 3, 5));
    messages.push((0, dels));
    let mut doc = Doc::new();
    let mut oracle = RefRga::default();
    for op in &history {
        doc.apply_remote(Some(1), std::slice::from_ref(op))
            .expect("history");
    }
    oracle.apply(&history);
    for (sender, ops) in &messages {
        let sender = (*sender > 0).then_some(*sender);
        doc.apply_remote(sender, ops).expect("hostile but valid");
        oracle.apply(ops);
        doc.dbg_check();
        assert_eq!(doc.text(), oracle.text());
        assert_eq!(doc.apply_remote(sender, ops), Ok(Applied::Unchanged));
    }
    let rebuilt = Doc::from_snapshot(&doc.snapshot()).expect("rebuild");
    rebuilt.dbg_check();
    assert_eq!(rebuilt.text(), doc.text());
}

/// One local edit for the buffer-API proptest: insert or delete by replica `replica` at a fraction of the length,
/// then maybe clear the buffer (so deletes of consecutive ids in separate edits meet in one buffer too).
#[derive(Clone, Debug)]
enum BufEdit {
    Insert {
        replica: u64,
        at: f64,
        text: String,
    },
    Delete {
        at: f64,
        len: usize,
    },
    /// A remote insert from another replica, applied to both docs, so that local edits land in mixed spans.
    Remote {
        at: f64,
        text: String,
    },
    Clear,
}

fn buf_edit() -> impl Strategy<Value = BufEdit> {
    prop_oneof![
        4 => (1..3u64, 0.0..=1.0f64, "[a-cé😀]{1,5}").prop_map(|(replica, at, text)| BufEdit::Insert { replica, at, text }),
        3 => (0.0..=1.0f64, 0..6usize).prop_map(|(at, len)| BufEdit::Delete { at, len }),
        1 => (0.0..=1.0f64, "[xy]{1,3}").prop_map(|(at, text)| BufEdit::Remote { at, text }),
        1 => Just(BufEdit::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// `insert_local_into` / `delete_local_into` write exactly the ops `insert_local` / `delete_local` return, in order,
    /// and leave the document exactly as they do; a reused buffer never merges ops of separate edits.
    #[test]
    fn buffer_api_writes_the_same_ops(edits in prop::collection::vec(buf_edit(), 1..200)) {
        let mut old = Doc::new();
        let mut new = Doc::new();
        let mut buf = collab_engine::crdt::OpBuf::new();
        // Ops of the old API since the last clear, to compare with the buffer's.
        let mut expected: Vec<Op> = Vec::new();
        for e in edits {
            match e {
                BufEdit::Insert { replica, at, text } => {
                    let pos = ((at * old.len() as f64) as usize).min(old.len());
                    expected.push(old.insert_local(replica, pos, &text));
                    new.insert_local_into(replica, pos, &text, &mut buf);
                }
                BufEdit::Delete { at, len } => {
                    let n = old.len();
                    let pos = ((at * n as f64) as usize).min(n);
                    let len = len.min(n - pos);
                    expected.extend(old.delete_local(pos, len));
                    new.delete_local_into(pos, len, &mut buf);
                }
                BufEdit::Remote { at, text } => {
                    // `remote` mirrors `old` through its ops, then types as replica 9.
                    let mut remote = Doc::from_snapshot(&old.snapshot()).expect("rebuild");
                    let pos = ((at * remote.len() as f64) as usize).min(remote.len());
                    let op = remote.insert_local(9, pos, &text);
                    prop_assert_eq!(old.apply_remote(Some(9), std::slice::from_ref(&op)), Ok(Applied::Changed));
                    prop_assert_eq!(new.apply_remote(Some(9), std::slice::from_ref(&op)), Ok(Applied::Changed));
                }
                BufEdit::Clear => {
                    prop_assert_eq!(buf.to_ops(), std::mem::take(&mut expected));
                    buf.clear();
                    prop_assert!(buf.is_empty());
                }
            }
            prop_assert_eq!(buf.len(), expected.len());
            prop_assert_eq!(new.len(), old.len());
        }
        prop_assert_eq!(buf.to_ops(), expected.clone());
        let mut extended = Vec::new();
        buf.extend_ops(&mut extended);
        prop_assert_eq!(&extended, &expected);
        for (i, op) in buf.iter().enumerate() {
            prop_assert_eq!(buf.get(i), Some(op));
            prop_assert_eq!(&op.to_op(), &expected[i]);
        }
        prop_assert_eq!(buf.get(expected.len()), None);
        prop_assert_eq!(new.snapshot(), old.snapshot());
        prop_assert_eq!(new.text(), old.text());
        new.dbg_check();
    }
}

#[test]
fn buffer_api_keeps_separate_edits_separate() {
    let mut doc = Doc::new();
    let mut buf = collab_engine::crdt::OpBuf::new();
    doc.insert_local_into(1, 0, "abcd", &mut buf);
    // Two backspaces at the same place delete consecutive ids: two edits, two ops, as `delete_local` gives.
    doc.delete_local_into(1, 1, &mut buf);
    doc.delete_local_into(1, 1, &mut buf);
    doc.delete_local_into(0, 0, &mut buf);
    assert_eq!(
        buf.to_ops(),
        vec![ins(0, 1, None, "abcd"), del(1, 1, 1), del(2, 1, 1)]
    );
    assert_eq!(doc.text(), "ad");
    let cap = buf.heap_bytes();
    buf.clear();
    assert!(buf.is_empty());
    assert_eq!(buf.heap_bytes(), cap, "clear keeps the allocations");
}
