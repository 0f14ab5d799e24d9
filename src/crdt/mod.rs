//! The sequence CRDT (RGA) of the contract. TEMPORARY naive implementation (one entry per
//! character, linear scans) that fixes the API while the run-length version is built on
//! branch `crdt`; it will be replaced wholesale.
#![allow(missing_docs)]

use std::collections::HashMap;

pub const MAX_ID_COMPONENT: u64 = (1 << 53) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId {
    pub lamport: u64,
    pub replica: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Insert { id: OpId, after: Option<OpId>, text: String },
    Delete { id: OpId, len: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub id: OpId,
    pub content: RunContent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunContent {
    Text(String),
    Deleted(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Unchanged,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidOpReason {
    LamportNotAboveParent,
    ForeignReplica,
    EmptyText,
    ZeroLength,
    IdOverflow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    #[error("op {op_index}: unknown id {id:?}")]
    UnknownId { op_index: usize, id: OpId },
    #[error("op {op_index}: ids already used with other content")]
    IdConflict { op_index: usize },
    #[error("op {op_index}: invalid op: {reason:?}")]
    InvalidOp { op_index: usize, reason: InvalidOpReason },
}

impl CrdtError {
    pub fn code(&self) -> &'static str {
        match self {
            CrdtError::UnknownId { .. } => "unknown_id",
            CrdtError::IdConflict { .. } => "id_conflict",
            CrdtError::InvalidOp { .. } => "invalid_op",
        }
    }
}

#[derive(Clone, Debug)]
struct Item {
    id: OpId,
    after: Option<OpId>,
    ch: char,
    deleted: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Doc {
    items: Vec<Item>,
    index: HashMap<OpId, ()>,
    max_lamport: Option<u64>,
    max_replica: u64,
}

fn nth(id: OpId, k: u64) -> OpId {
    OpId { lamport: id.lamport + k, replica: id.replica }
}

impl Doc {
    pub fn new() -> Doc {
        Doc::default()
    }

    fn find(&self, id: OpId) -> Option<usize> {
        if !self.index.contains_key(&id) {
            return None;
        }
        self.items.iter().position(|item| item.id == id)
    }

    pub fn apply_remote(&mut self, sender: Option<u64>, ops: &[Op]) -> Result<Applied, CrdtError> {
        let mut trial = self.clone();
        let mut changed = false;
        for (op_index, op) in ops.iter().enumerate() {
            changed |= trial.apply_one(sender, op_index, op)?;
        }
        if changed {
            *self = trial;
            Ok(Applied::Changed)
        } else {
            Ok(Applied::Unchanged)
        }
    }

    fn apply_one(&mut self, sender: Option<u64>, op_index: usize, op: &Op) -> Result<bool, CrdtError> {
        let invalid = |reason| CrdtError::InvalidOp { op_index, reason };
        match op {
            Op::Insert { id, after, text } => {
                let n = text.chars().count() as u64;
                if n == 0 {
                    return Err(invalid(InvalidOpReason::EmptyText));
                }
                if sender.is_some_and(|r| r != id.replica) {
                    return Err(invalid(InvalidOpReason::ForeignReplica));
                }
                if id.lamport + n - 1 > MAX_ID_COMPONENT || id.replica > MAX_ID_COMPONENT {
                    return Err(invalid(InvalidOpReason::IdOverflow));
                }
                let known: Vec<Option<usize>> = (0..n).map(|k| self.find(nth(*id, k))).collect();
                if known.iter().all(Option::is_some) {
                    let same = text.chars().enumerate().all(|(k, ch)| {
                        let item = &self.items[known[k].unwrap_or_default()];
                        let want_after = if k == 0 { *after } else { Some(nth(*id, k as u64 - 1)) };
                        item.ch == ch && item.after == want_after
                    });
                    return if same { Ok(false) } else { Err(CrdtError::IdConflict { op_index }) };
                }
                if known.iter().any(Option::is_some) {
                    return Err(CrdtError::IdConflict { op_index });
                }
                if let Some(parent) = after {
                    if self.find(*parent).is_none() {
                        return Err(CrdtError::UnknownId { op_index, id: *parent });
                    }
                    if id.lamport <= parent.lamport {
                        return Err(invalid(InvalidOpReason::LamportNotAboveParent));
                    }
                }
                let mut prev = *after;
                for (k, ch) in text.chars().enumerate() {
                    let item_id = nth(*id, k as u64);
                    self.integrate(Item { id: item_id, after: prev, ch, deleted: false });
                    prev = Some(item_id);
                }
                Ok(true)
            }
            Op::Delete { id, len } => {
                if *len == 0 {
                    return Err(invalid(InvalidOpReason::ZeroLength));
                }
                if id.lamport.checked_add(*len - 1).is_none_or(|last| last > MAX_ID_COMPONENT) {
                    return Err(invalid(InvalidOpReason::IdOverflow));
                }
                let mut positions = Vec::new();
                for k in 0..*len {
                    match self.find(nth(*id, k)) {
                        Some(p) => positions.push(p),
                        None => return Err(CrdtError::UnknownId { op_index, id: nth(*id, k) }),
                    }
                }
                let mut changed = false;
                for p in positions {
                    changed |= !self.items[p].deleted;
                    self.items[p].deleted = true;
                }
                Ok(changed)
            }
        }
    }

    fn integrate(&mut self, item: Item) {
        let mut pos = match item.after {
            Some(parent) => self.find(parent).map_or(0, |p| p + 1),
            None => 0,
        };
        while pos < self.items.len() && self.items[pos].id > item.id {
            pos += 1;
        }
        self.max_lamport = Some(self.max_lamport.map_or(item.id.lamport, |m| m.max(item.id.lamport)));
        self.max_replica = self.max_replica.max(item.id.replica);
        self.index.insert(item.id, ());
        self.items.insert(pos, item);
    }

    fn visible_index(&self, pos: usize) -> usize {
        self.items.iter().enumerate().filter(|(_, item)| !item.deleted).nth(pos).map(|(i, _)| i).expect("position in range")
    }

    pub fn insert_local(&mut self, replica: u64, pos: usize, text: &str) -> Op {
        assert!(!text.is_empty() && pos <= self.len(), "insert out of range");
        let after = if pos == 0 { None } else { Some(self.items[self.visible_index(pos - 1)].id) };
        let id = OpId { lamport: self.max_lamport.map_or(0, |m| m + 1), replica };
        let op = Op::Insert { id, after, text: text.to_owned() };
        self.apply_remote(None, std::slice::from_ref(&op)).expect("local insert is valid");
        op
    }

    pub fn delete_local(&mut self, pos: usize, len: usize) -> Vec<Op> {
        assert!(pos + len <= self.len(), "delete out of range");
        let ids: Vec<OpId> = (pos..pos + len).map(|p| self.items[self.visible_index(p)].id).collect();
        let mut ops: Vec<Op> = Vec::new();
        for id in ids {
            if let Some(Op::Delete { id: start, len }) = ops.last_mut() {
                if start.replica == id.replica && start.lamport + *len == id.lamport {
                    *len += 1;
                    continue;
                }
            }
            ops.push(Op::Delete { id, len: 1 });
        }
        self.apply_remote(None, &ops).expect("local delete is valid");
        ops
    }

    pub fn snapshot(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for item in &self.items {
            if let Some(last) = runs.last_mut() {
                match &mut last.content {
                    RunContent::Text(text) if !item.deleted => {
                        let n = text.chars().count() as u64;
                        if nth(last.id, n) == item.id && item.after == Some(nth(last.id, n - 1)) {
                            text.push(item.ch);
                            continue;
                        }
                    }
                    RunContent::Deleted(n) if item.deleted => {
                        if nth(last.id, *n) == item.id && item.after == Some(nth(last.id, *n - 1)) {
                            *n += 1;
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            let content = if item.deleted { RunContent::Deleted(1) } else { RunContent::Text(item.ch.to_string()) };
            runs.push(Run { id: item.id, content });
        }
        runs
    }

    pub fn from_snapshot(runs: &[Run]) -> Result<Doc, CrdtError> {
        // The naive version keeps no parent information in snapshots: each run's first item
        // goes after the previous item in document order, which reproduces the order.
        let mut doc = Doc::new();
        let mut prev: Option<OpId> = None;
        for run in runs {
            let n = match &run.content {
                RunContent::Text(text) => text.chars().count() as u64,
                RunContent::Deleted(n) => *n,
            };
            let chars: Vec<char> = match &run.content {
                RunContent::Text(text) => text.chars().collect(),
                RunContent::Deleted(_) => vec!['\u{fffd}'; n as usize],
            };
            for (k, ch) in chars.into_iter().enumerate() {
                let id = nth(run.id, k as u64);
                let after = if k == 0 { prev } else { Some(nth(run.id, k as u64 - 1)) };
                doc.max_lamport = Some(doc.max_lamport.map_or(id.lamport, |m| m.max(id.lamport)));
                doc.max_replica = doc.max_replica.max(id.replica);
                doc.index.insert(id, ());
                doc.items.push(Item { id, after, ch, deleted: matches!(run.content, RunContent::Deleted(_)) });
                prev = Some(id);
            }
        }
        Ok(doc)
    }

    pub fn text(&self) -> String {
        self.items.iter().filter(|item| !item.deleted).map(|item| item.ch).collect()
    }

    pub fn len(&self) -> usize {
        self.items.iter().filter(|item| !item.deleted).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn id_at(&self, pos: usize) -> Option<OpId> {
        self.items.iter().filter(|item| !item.deleted).nth(pos).map(|item| item.id)
    }

    pub fn position_of(&self, id: OpId) -> Option<usize> {
        let p = self.find(id)?;
        Some(self.items[..p].iter().filter(|item| !item.deleted).count())
    }

    pub fn max_lamport(&self) -> Option<u64> {
        self.max_lamport
    }

    pub fn max_replica(&self) -> u64 {
        self.max_replica
    }

    pub fn dbg_check(&self) {}
}
