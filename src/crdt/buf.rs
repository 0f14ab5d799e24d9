//! `OpBuf`: a caller-owned buffer that local edits write their ops into, so that typing allocates nothing per edit.
//! The ops are exactly those `Doc::insert_local` and `Doc::delete_local` return, stored flat: ids and lengths in one
//! vector, every insert's text in one shared string. `clear` keeps both allocations for the next edits.

use super::id::{Op, OpId};

/// One op as stored: an insert's text is a byte range of `OpBuf::text`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rec {
    Insert {
        id: OpId,
        after: Option<OpId>,
        start: usize,
        end: usize,
    },
    Delete {
        id: OpId,
        len: u64,
    },
}

/// A borrowed op from an `OpBuf`: the same fields as `Op`, the text borrowed from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpRef<'a> {
    /// See `Op::Insert`.
    Insert {
        /// Id of the first char.
        id: OpId,
        /// The item the first char goes after; `None` is the document start.
        after: Option<OpId>,
        /// Non-empty text.
        text: &'a str,
    },
    /// See `Op::Delete`.
    Delete {
        /// Id of the first deleted item.
        id: OpId,
        /// Number of items, at least 1.
        len: u64,
    },
}

impl OpRef<'_> {
    /// The op as an owned `Op` (allocates the text of an insert).
    pub fn to_op(&self) -> Op {
        match *self {
            OpRef::Insert { id, after, text } => Op::Insert {
                id,
                after,
                text: text.to_owned(),
            },
            OpRef::Delete { id, len } => Op::Delete { id, len },
        }
    }
}

/// Ops written by `Doc::insert_local_into` and `Doc::delete_local_into`, in the order the edits were made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpBuf {
    recs: Vec<Rec>,
    text: String,
}

impl OpBuf {
    /// An empty buffer; it allocates on the first op.
    pub fn new() -> OpBuf {
        OpBuf::default()
    }

    /// Number of ops held.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether no op is held.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Drops every op and keeps the allocations, so the next edits write into the same memory.
    pub fn clear(&mut self) {
        self.recs.clear();
        self.text.clear();
    }

    /// Op `i` (in edit order), `None` past the end.
    pub fn get(&self, i: usize) -> Option<OpRef<'_>> {
        self.recs.get(i).map(|r| self.view(r))
    }

    /// The ops in edit order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = OpRef<'_>> + '_ {
        self.recs.iter().map(|r| self.view(r))
    }

    /// The ops as owned `Op`s, in edit order.
    pub fn to_ops(&self) -> Vec<Op> {
        self.iter().map(|o| o.to_op()).collect()
    }

    /// Appends the ops as owned `Op`s to `out`.
    pub fn extend_ops(&self, out: &mut Vec<Op>) {
        out.extend(self.iter().map(|o| o.to_op()));
    }

    /// Heap bytes held (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        self.recs.capacity() * std::mem::size_of::<Rec>() + self.text.capacity()
    }

    fn view<'a>(&'a self, r: &Rec) -> OpRef<'a> {
        match *r {
            Rec::Insert {
                id,
                after,
                start,
                end,
            } => OpRef::Insert {
                id,
                after,
                text: &self.text[start..end],
            },
            Rec::Delete { id, len } => OpRef::Delete { id, len },
        }
    }

    #[inline]
    pub(crate) fn push_insert(&mut self, id: OpId, after: Option<OpId>, text: &str) {
        let start = self.text.len();
        self.text.push_str(text);
        self.recs.push(Rec::Insert {
            id,
            after,
            start,
            end: self.text.len(),
        });
    }

    /// Appends a delete, extending the last op instead when it is a delete ending right before `id` (this is how
    /// `delete_local` merges the runs of one edit, and only the ops of the current edit are ever merged: see `mark`).
    pub(crate) fn push_delete(&mut self, id: OpId, len: u64, mark: usize) {
        if self.recs.len() > mark {
            if let Some(Rec::Delete {
                id: last,
                len: last_len,
            }) = self.recs.last_mut()
            {
                if last.replica == id.replica && last.lamport + *last_len == id.lamport {
                    *last_len += len;
                    return;
                }
            }
        }
        self.recs.push(Rec::Delete { id, len });
    }
}
