//! Replays the editing traces in `tests/data` through `Doc`: as local edits, as remote ops on a fresh replica, and
//! through a snapshot round trip; then checks that the original and the rebuilt replica integrate later concurrent ops alike.
//! The whole traces take a few seconds in a debug build.

use collab_engine::crdt::{Applied, Doc, Op, OpBuf};
use collab_engine::trace::{EditingTrace, Patch};

fn load(name: &str) -> EditingTrace {
    EditingTrace::bundled(name).unwrap_or_else(|e| panic!("{e}"))
}

fn replay_local(trace: &EditingTrace, n: usize) -> (Doc, Vec<Op>) {
    let mut doc = Doc::new();
    let mut ops = Vec::new();
    for Patch {
        pos,
        delete: del,
        insert: ins,
    } in &trace.patches[..n]
    {
        if *del > 0 {
            ops.extend(doc.delete_local(*pos, *del));
        }
        if !ins.is_empty() {
            ops.push(doc.insert_local(1, *pos, ins));
        }
    }
    (doc, ops)
}

fn check_trace(name: &str) {
    let trace = load(name);
    let n = trace.patches.len();
    let expected = trace.end_content.clone();

    let (local, ops) = replay_local(&trace, n);
    assert_eq!(local.text(), expected, "{name}: local replay");
    assert_eq!(local.len(), expected.chars().count());
    local.dbg_check();

    // The buffer API writes exactly the same ops, patch by patch, into one reused buffer, and builds the same doc.
    let mut buffered = Doc::new();
    let mut buf = OpBuf::new();
    let mut from_buf = Vec::with_capacity(ops.len());
    for Patch {
        pos,
        delete: del,
        insert: ins,
    } in &trace.patches
    {
        buf.clear();
        if *del > 0 {
            buffered.delete_local_into(*pos, *del, &mut buf);
        }
        if !ins.is_empty() {
            buffered.insert_local_into(1, *pos, ins, &mut buf);
        }
        buf.extend_ops(&mut from_buf);
    }
    assert!(
        from_buf == ops,
        "{name}: OpBuf ops differ from insert_local/delete_local ops"
    );
    assert_eq!(
        buffered.snapshot(),
        local.snapshot(),
        "{name}: OpBuf replay"
    );
    buffered.dbg_check();
    drop(buffered);

    let mut remote = Doc::new();
    for (i, op) in ops.iter().enumerate() {
        let applied = remote.apply_remote(Some(1), std::slice::from_ref(op));
        assert_eq!(applied, Ok(Applied::Changed), "{name}: remote op {i}");
    }
    assert_eq!(remote.text(), expected, "{name}: remote replay");
    assert_eq!(
        remote.snapshot(),
        local.snapshot(),
        "{name}: remote snapshot"
    );
    remote.dbg_check();
    // Every op again: all already integrated.
    for op in ops.iter().step_by(97) {
        assert_eq!(
            remote.apply_remote(Some(1), std::slice::from_ref(op)),
            Ok(Applied::Unchanged)
        );
    }

    let snap = local.snapshot();
    let mut rebuilt = Doc::from_snapshot(&snap).expect("snapshot rebuilds");
    rebuilt.dbg_check();
    assert_eq!(rebuilt.text(), expected, "{name}: rebuilt text");
    assert_eq!(rebuilt.snapshot(), snap, "{name}: rebuilt snapshot");
    assert_eq!(rebuilt.max_lamport(), local.max_lamport());

    // Later concurrent edits: a third replica forked from the snapshot, and the original replica, edit concurrently;
    // the original and the rebuilt replica integrate both and must agree.
    let mut original = local;
    let mut fork = Doc::from_snapshot(&snap).expect("fork");
    let len = fork.len();
    let mut fork_ops = vec![
        fork.insert_local(7, len / 3, "fork text"),
        fork.insert_local(7, 0, "start"),
    ];
    fork_ops.extend(fork.delete_local(len / 2, 25.min(len / 2)));
    let mut own_ops = vec![original.insert_local(1, len / 3, "own text")];
    own_ops.extend(original.delete_local(len / 2 + 10, 30.min(len / 2 - 10)));
    for op in &own_ops {
        rebuilt
            .apply_remote(Some(1), std::slice::from_ref(op))
            .expect("own op on rebuilt");
    }
    for doc in [&mut original, &mut rebuilt] {
        doc.apply_remote(Some(7), &fork_ops).expect("fork ops");
        doc.dbg_check();
    }
    fork.apply_remote(Some(1), &own_ops)
        .expect("own ops on fork");
    assert_eq!(
        original.text(),
        rebuilt.text(),
        "{name}: original vs rebuilt after concurrent ops"
    );
    assert_eq!(original.snapshot(), rebuilt.snapshot());
    assert_eq!(original.text(), fork.text(), "{name}: fork converges");
}

#[test]
fn automerge_paper() {
    check_trace("automerge-paper");
}

#[test]
fn seph_blog1() {
    check_trace("seph-blog1");
}
