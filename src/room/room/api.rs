//! The document API's view of a room (`crate::api`): reads, blame, history from the replay
//! window, and edits applied by a server-side replica as one op message.
//!
//! Pure like the rest of the room: answers are JSON text, edits become effects (records,
//! echoes) exactly as a client's op message would.

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::api::{ApiEffect, Edit};
use crate::crdt::{Op, OpId, RunContent};
use crate::protocol::codec::{encode_op_echo, write_json_str, write_ops};
use crate::protocol::messages::parse_op_echo;
use crate::storage::LogRecord;

use super::{inserted_chars, Room};

/// How far behind its head a room writes its snapshots (the history it keeps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Op messages kept behind the head.
    pub ops: u64,
    /// Also keep those accepted within this many milliseconds of the newest one.
    pub ms: u64,
}

/// Why an edit request changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EditError {
    /// A position out of range, or `base` ahead of head (400).
    BadRequest(String),
    /// `base` is older than the history this room retains; `oldest` is the oldest usable (409).
    BaseGone {
        /// The oldest `base` accepted now.
        oldest: u64,
    },
    /// The document would exceed `--doc-chars-max` (413).
    TooLarge,
    /// No replica id is left in the document (503).
    NoReplica,
}

impl Room {
    /// Whether the document exists in storage (or will once this turn's records are
    /// durable): any record at all was written for it.
    pub fn exists(&self) -> bool {
        self.head > 0 || self.replicas_reserved > 0 || !self.owners.is_empty()
    }

    /// Notes which items `ops` delete that are visible now, before they are applied: the
    /// entry the next accepted op message gets in the window's deletions (one lookup per
    /// span, and only for ops that delete).
    pub(super) fn note_deletes(&mut self, ops: &[Op]) {
        self.pending_deleted.clear();
        for op in ops {
            if let Op::Delete { id, len } = op {
                self.crdt
                    .visible_ranges(*id, *len, &mut self.pending_deleted);
            }
        }
    }

    /// The items inserted and the items deleted (that were visible) by the last
    /// `n_behind` op messages, all in the window.
    fn changes_since(&self, n_behind: usize) -> (HashSet<OpId>, HashSet<OpId>) {
        let mut inserted: HashSet<OpId> = HashSet::new();
        let mut deleted: HashSet<OpId> = HashSet::new();
        let from = self.window.len() - n_behind;
        for echo in self.window.range(from..) {
            let Ok(parsed) = parse_op_echo(echo) else {
                continue;
            };
            for op in parsed.ops {
                if let Op::Insert { id, text, .. } = op {
                    let n = text.chars().count() as u64;
                    inserted.extend((0..n).map(|k| OpId::new(id.lamport + k, id.replica)));
                }
            }
        }
        for ranges in self.window_deleted.range(from..) {
            for &(first, n) in ranges.iter() {
                deleted.extend((0..n).map(|k| OpId::new(first.lamport + k, first.replica)));
            }
        }
        (inserted, deleted)
    }

    /// `{"doc","epoch","head","length","text"}` as of `at` (right after that op message):
    /// `Err(oldest)` when `at` is older than the window (or ahead of the head: `Err` with
    /// the head).
    pub fn read_at_json(&self, at: u64) -> Result<String, u64> {
        if at >= self.head {
            return if at == self.head {
                Ok(self.read_json())
            } else {
                Err(self.head)
            };
        }
        let n_behind = usize::try_from(self.head - at).unwrap_or(usize::MAX);
        if n_behind > self.window.len() {
            return Err(self.window_oldest() - 1);
        }
        let (inserted, deleted) = self.changes_since(n_behind);
        // Items deleted since `at` were visible when the room deleted them: their text is
        // in the CRDT's arena.
        let text = self.crdt.text_where(|id, visible| {
            !inserted.contains(&id) && (visible || deleted.contains(&id))
        });
        let mut out = String::with_capacity(text.len() + 128);
        out.push_str("{\"doc\":");
        write_json_str(&mut out, &self.doc_name);
        out.push_str(",\"epoch\":");
        write_json_str(&mut out, &self.epoch);
        let _ = write!(
            out,
            ",\"head\":{at},\"length\":{},\"text\":",
            text.chars().count()
        );
        write_json_str(&mut out, &text);
        out.push('}');
        Ok(out)
    }

    /// Takes the event streams this turn was about to start (their room is failing).
    pub fn take_api_subscribes(&mut self) -> Vec<crate::api::CountedStream> {
        let mut streams = Vec::new();
        for effect in std::mem::take(&mut self.effects.api) {
            match effect {
                ApiEffect::Subscribe(stream, ..) => streams.push(stream),
                other => self.effects.api.push(other),
            }
        }
        streams
    }

    /// Whether each accepted op message is also an [`ApiEffect::Echo`] (the document has
    /// event streams).
    pub fn set_watched(&mut self, watched: bool) {
        self.watched = watched;
    }

    /// The echo of the op message just accepted, for event streams when watched.
    pub(super) fn watched_echo(&mut self, echo: &tungstenite::Utf8Bytes) {
        if self.watched {
            self.effects
                .api
                .push(ApiEffect::Echo(self.head, echo.clone()));
        }
    }

    /// Keeps `retention` of history behind the head (see [`Retention`]); the default
    /// keeps none (snapshots at the head).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// Where the next stored snapshot goes: `retention` behind the head, never before the
    /// oldest version the window can rebuild.
    pub(super) fn snapshot_point(&self) -> u64 {
        let mut at = self.head.saturating_sub(self.retention.ops);
        if self.retention.ms > 0 {
            // An op not timed yet (accepted this turn) or from an older log counts as new.
            let newest = self.window_times.iter().copied().max().unwrap_or(0);
            let oldest = self.window_oldest();
            let young = self
                .window_times
                .iter()
                .position(|&t| t == 0 || t.saturating_add(self.retention.ms) > newest)
                .map_or(self.head, |idx| oldest + idx as u64 - 1);
            at = at.min(young);
        }
        at.max(self.window_oldest() - 1)
    }

    /// The snapshot runs of the version right after `at` (in the window).
    pub(super) fn runs_at(&self, at: u64) -> Vec<crate::crdt::Run> {
        let n_behind = usize::try_from(self.head - at).unwrap_or(usize::MAX);
        let (inserted, deleted) = self.changes_since(n_behind);
        self.crdt.snapshot_where(|id, visible| {
            if inserted.contains(&id) {
                None
            } else {
                Some(visible || deleted.contains(&id))
            }
        })
    }

    /// The document's length in code points.
    pub fn length(&self) -> usize {
        self.crdt.len()
    }

    /// Queues a document API effect behind this turn's other effects.
    pub fn push_api(&mut self, effect: ApiEffect) {
        self.effects.api.push(effect);
    }

    /// `{"doc","epoch","head","length","text"}` at the head.
    pub fn read_json(&self) -> String {
        let text = self.crdt.text();
        let mut out = String::with_capacity(text.len() + 128);
        out.push_str("{\"doc\":");
        write_json_str(&mut out, &self.doc_name);
        out.push_str(",\"epoch\":");
        write_json_str(&mut out, &self.epoch);
        let _ = write!(
            out,
            ",\"head\":{},\"length\":{},\"text\":",
            self.head,
            self.crdt.len()
        );
        write_json_str(&mut out, &text);
        out.push('}');
        out
    }

    /// `{"epoch","head","runs":[...]}` at the head, in the contract's run format.
    pub fn snapshot_answer_json(&mut self) -> String {
        let runs = self.snapshot_json();
        let mut out = String::with_capacity(runs.len() + 64);
        out.push_str("{\"epoch\":");
        write_json_str(&mut out, &self.epoch);
        let _ = write!(out, ",\"head\":{},", self.head);
        // `runs` is `{"runs":[...]}`: its members follow.
        out.push_str(&runs.as_str()[1..]);
        out
    }

    /// The user of replica `replica` (its owner binding), `None` when unbound.
    fn user_of(&self, replica: u64) -> Option<&str> {
        self.owners.get(&replica).map(String::as_str)
    }

    /// `{"head","runs":[{"text","user"}]}`: the visible text in spans of one user each
    /// (`user` is null for replicas bound to no user: access control off, or older edits).
    pub fn blame_json(&self) -> String {
        let mut spans: Vec<(Option<&str>, String)> = Vec::new();
        for run in self.crdt.snapshot() {
            let RunContent::Text(text) = run.content else {
                continue;
            };
            let user = self.user_of(run.id.replica);
            match spans.last_mut() {
                Some((last, buf)) if *last == user => buf.push_str(&text),
                _ => spans.push((user, text)),
            }
        }
        let mut out = String::new();
        let _ = write!(out, "{{\"head\":{},\"runs\":[", self.head);
        for (i, (user, text)) in spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"text\":");
            write_json_str(&mut out, text);
            out.push_str(",\"user\":");
            match user {
                Some(user) => write_json_str(&mut out, user),
                None => out.push_str("null"),
            }
            out.push('}');
        }
        out.push_str("]}");
        out
    }

    /// The oldest `server_seq` whose echo the replay window still holds (`head + 1` when
    /// it holds none).
    pub fn window_oldest(&self) -> u64 {
        self.head + 1 - self.window.len() as u64
    }

    /// The echoes of `from..` (at most `limit`), from the replay window: `Err(oldest)` when
    /// `from` is older than the window.
    pub fn echoes_from(&self, from: u64, limit: usize) -> Result<Vec<&str>, u64> {
        let oldest = self.window_oldest();
        if from < oldest && from <= self.head {
            return Err(oldest);
        }
        let skip = usize::try_from(from.saturating_sub(oldest)).unwrap_or(usize::MAX);
        Ok(self
            .window
            .iter()
            .skip(skip)
            .take(limit)
            .map(|echo| echo.as_str())
            .collect())
    }

    /// One `/history` entry for an echo: `{"server_seq","replica","user","time","ops"}`
    /// (`null` for an echo that does not parse, which the room never produces).
    pub fn history_entry(&self, echo: &str, time_ms: Option<u64>, out: &mut String) {
        let Ok(parsed) = parse_op_echo(echo) else {
            out.push_str("null");
            return;
        };
        let _ = write!(
            out,
            "{{\"server_seq\":{},\"replica\":{},\"user\":",
            parsed.server_seq, parsed.replica
        );
        match self.user_of(parsed.replica) {
            Some(user) => write_json_str(out, user),
            None => out.push_str("null"),
        }
        match time_ms {
            Some(ms) => {
                let _ = write!(out, ",\"time\":{ms},\"ops\":");
            }
            None => out.push_str(",\"time\":null,\"ops\":"),
        }
        write_ops(out, &parsed.ops);
        out.push('}');
    }

    /// Records when the op messages accepted since the last call were accepted: their
    /// `Accepted` records go with this turn's records (the host calls it once per turn with
    /// the turn's clock, before taking the effects).
    pub fn stamp_accepted(&mut self, time_ms: u64) {
        let n = std::mem::take(&mut self.n_unstamped);
        if n == 0 {
            return;
        }
        for k in (0..n as u64).rev() {
            let server_seq = self.head - k;
            self.effects.records.push(LogRecord::Accepted {
                server_seq,
                time_ms,
            });
        }
        let len = self.window_times.len();
        for time in self.window_times.range_mut(len.saturating_sub(n)..) {
            *time = time_ms;
        }
    }

    /// A loaded `Accepted` record: the time of echo `server_seq` if the window holds it.
    pub(super) fn set_accepted_time(&mut self, server_seq: u64, time_ms: u64) {
        let oldest = self.window_oldest();
        if server_seq < oldest || server_seq > self.head {
            return;
        }
        if let Some(time) = self.window_times.get_mut((server_seq - oldest) as usize) {
            *time = time_ms;
        }
    }

    /// When echo `server_seq` of the window was accepted, if known.
    pub fn accepted_time(&self, server_seq: u64) -> Option<u64> {
        let oldest = self.window_oldest();
        let idx = usize::try_from(server_seq.checked_sub(oldest)?).ok()?;
        self.window_times.get(idx).copied().filter(|&t| t > 0)
    }

    /// The server-side replica of `user` in this room, assigned (and bound to `user` with
    /// access control on) on first use.
    fn api_replica(&mut self, user: Option<&str>) -> Option<u64> {
        let key = user.unwrap_or_default();
        if let Some(&replica) = self.api_replicas.get(key) {
            return Some(replica);
        }
        let replica = self.assign_replica()?;
        if let Some(user) = user {
            self.owners.insert(replica, user.to_owned());
            self.effects.records.push(LogRecord::ReplicaOwner {
                replica,
                user: user.to_owned(),
            });
        }
        self.api_replicas.insert(key.to_owned(), replica);
        Some(replica)
    }

    /// Applies `edits` (code-point positions, each against the result of the previous
    /// ones, the first against version `base`, default the head) as one op message of the
    /// server-side replica of `user`: echoed to every client and logged like a client's.
    /// Returns the new head (the old one when nothing changed). Nothing changes on `Err`.
    ///
    /// # Errors
    /// See [`EditError`].
    pub fn apply_edits(
        &mut self,
        user: Option<&str>,
        edits: &[Edit],
        base: Option<u64>,
    ) -> Result<u64, EditError> {
        let base = base.unwrap_or(self.head);
        if base > self.head {
            return Err(EditError::BadRequest(format!(
                "base {base} is ahead of head {}",
                self.head
            )));
        }
        let n_behind = usize::try_from(self.head - base).unwrap_or(usize::MAX);
        if n_behind > self.window.len() {
            return Err(EditError::BaseGone {
                oldest: self.window_oldest() - 1,
            });
        }
        // The view at `base`: visible ids then, in document order (only when behind).
        let mut view = if n_behind > 0 {
            Some(self.view_at(n_behind))
        } else {
            None
        };
        let mut len = view.as_ref().map_or(self.crdt.len(), Vec::len);
        let mut n_inserted = 0usize;
        for (i, edit) in edits.iter().enumerate() {
            let pos = usize::try_from(edit.pos).map_err(|_| {
                EditError::BadRequest(format!("edit {i}: pos {} is negative", edit.pos))
            })?;
            let delete = usize::try_from(edit.delete).unwrap_or(usize::MAX);
            if pos > len || pos.checked_add(delete).map_or(true, |end| end > len) {
                return Err(EditError::BadRequest(format!(
                    "edit {i}: pos {pos} + delete {delete} is past the end ({len} code points)"
                )));
            }
            let n = edit.insert.chars().count();
            n_inserted += n;
            len = len - delete + n;
        }
        if self.n_chars.saturating_add(n_inserted) > self.config.doc_chars_max {
            return Err(EditError::TooLarge);
        }
        if edits
            .iter()
            .all(|edit| edit.delete == 0 && edit.insert.is_empty())
        {
            return Ok(self.head);
        }
        let replica = self.api_replica(user).ok_or(EditError::NoReplica)?;
        let mut ops: Vec<Op> = Vec::new();
        match view.as_mut() {
            None => {
                // At the head: local edits on the room's own replica of the document.
                self.pending_deleted.clear();
                for edit in edits {
                    let pos = edit.pos as usize;
                    if edit.delete > 0 {
                        let deletes = self.crdt.delete_local(pos, edit.delete as usize);
                        // Every item a local delete hides was visible.
                        for op in &deletes {
                            if let Op::Delete { id, len } = op {
                                self.pending_deleted.push((*id, *len));
                            }
                        }
                        ops.extend(deletes);
                    }
                    if !edit.insert.is_empty() {
                        ops.push(self.crdt.insert_local(replica, pos, &edit.insert));
                    }
                }
            }
            Some(view) => {
                // Behind: the ops a replica at `base` would have sent, integrated as remote.
                let mut lamport = self.crdt.max_lamport().map_or(0, |m| m + 1);
                for edit in edits {
                    let pos = edit.pos as usize;
                    let end = pos + edit.delete as usize;
                    for id in view.drain(pos..end) {
                        match ops.last_mut() {
                            Some(Op::Delete { id: first, len })
                                if first.replica == id.replica
                                    && first.lamport + *len == id.lamport =>
                            {
                                *len += 1
                            }
                            _ => ops.push(Op::Delete { id, len: 1 }),
                        }
                    }
                    if !edit.insert.is_empty() {
                        let after = pos.checked_sub(1).map(|p| view[p]);
                        let id = OpId::new(lamport, replica);
                        let n = edit.insert.chars().count() as u64;
                        view.splice(pos..pos, (0..n).map(|k| OpId::new(lamport + k, replica)));
                        lamport += n;
                        ops.push(Op::Insert {
                            id,
                            after,
                            text: edit.insert.clone(),
                        });
                    }
                }
                self.note_deletes(&ops);
                if let Err(e) = self.crdt.apply_remote(Some(replica), &ops) {
                    return Err(EditError::BadRequest(format!("edits refused: {e}")));
                }
            }
        }
        let client_seq = self.head + 1;
        let echo = encode_op_echo(self.head + 1, replica, client_seq, &ops);
        self.n_chars += inserted_chars(&ops);
        self.accepted(echo.clone());
        self.watched_echo(&echo);
        for other in self.clients.keys() {
            self.effects.frames.push((*other, echo.clone()));
        }
        self.effects.records.push(LogRecord::Ops {
            server_seq: self.head,
            echo,
        });
        self.maybe_snapshot();
        Ok(self.head)
    }

    /// The ids visible `n_behind` op messages ago (all in the replay window), in document
    /// order: items inserted since are left out, items deleted since are put back.
    fn view_at(&self, n_behind: usize) -> Vec<OpId> {
        let (inserted, deleted) = self.changes_since(n_behind);
        let mut view = Vec::new();
        for run in self.crdt.snapshot() {
            let (n, visible) = match &run.content {
                RunContent::Text(text) => (text.chars().count() as u64, true),
                RunContent::Deleted(n) => (*n, false),
            };
            for k in 0..n {
                let id = OpId::new(run.id.lamport + k, run.id.replica);
                if inserted.contains(&id) {
                    continue;
                }
                if visible || deleted.contains(&id) {
                    view.push(id);
                }
            }
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnToken;
    use crate::protocol::{parse_client_message, ClientMessage};
    use crate::room::RoomConfig;

    fn room(window: usize) -> Room {
        let config = RoomConfig {
            snapshot_every_ops: 3,
            snapshot_every_bytes: 1 << 30,
            replay_window_ops: window,
            doc_chars_max: 1_000,
        };
        Room::open("doc".into(), None, config).expect("new room")
    }

    fn send(room: &mut Room, conn: usize, text: &str) {
        match parse_client_message(text) {
            Ok(ClientMessage::Hello(hello)) => room.join(ConnToken(conn), &hello),
            Ok(ClientMessage::Op(op)) => room.handle_op(ConnToken(conn), op),
            other => panic!("not a hello or op: {other:?}"),
        }
        room.stamp_accepted(1_000 + room.head());
    }

    fn text_at(room: &Room, at: u64) -> String {
        let json: serde_json::Value =
            serde_json::from_str(&room.read_at_json(at).expect("retained")).expect("JSON");
        json["text"].as_str().expect("text").to_owned()
    }

    fn edit(pos: i64, delete: u64, insert: &str) -> Edit {
        Edit {
            pos,
            delete,
            insert: insert.to_owned(),
        }
    }

    #[test]
    fn every_version_in_the_window_is_exact_even_after_a_repeated_delete() {
        let mut room = room(100);
        send(&mut room, 1, r#"{"type":"hello","replica":1}"#);
        send(&mut room, 2, r#"{"type":"hello","replica":2}"#);
        // 1: "abc" by replica 1.
        send(
            &mut room,
            1,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[1,1],"after":null,"text":"abc"}]}"#,
        );
        // 2: replica 1 deletes "b".
        send(
            &mut room,
            1,
            r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[2,1],"len":1}]}"#,
        );
        // 3: replica 2 deletes "b" too (a tombstone already) and inserts "X" after "c".
        send(
            &mut room,
            2,
            r#"{"type":"op","client_seq":1,"ops":[{"kind":"del","id":[2,1],"len":1},{"kind":"ins","id":[4,2],"after":[3,1],"text":"X"}]}"#,
        );
        assert_eq!(room.head(), 3);
        let expected = ["", "abc", "ac", "acX"];
        for (at, text) in expected.iter().enumerate() {
            assert_eq!(text_at(&room, at as u64), *text, "at {at}");
        }
        // The server-side replica edits against version 1 ("abc"): "Y" goes after "b".
        let head = room
            .apply_edits(Some("api"), &[edit(2, 0, "Y")], Some(1))
            .expect("applies");
        assert_eq!((head, room.text().as_str()), (4, "aYcX"));
        assert_eq!(text_at(&room, 3), "acX");
        // The lagging snapshot rebuilds exactly the version it names.
        let runs = room.runs_at(2);
        let doc = crate::crdt::Doc::from_snapshot(&runs).expect("a valid snapshot");
        assert_eq!(doc.text(), "ac");
    }

    #[test]
    fn edits_are_validated_before_anything_changes() {
        let mut room = room(2);
        assert_eq!(room.apply_edits(None, &[edit(0, 0, "hello")], None), Ok(1));
        let refused = [
            vec![edit(-1, 0, "x")],
            vec![edit(6, 0, "x")],
            vec![edit(3, 3, "")],
            vec![edit(0, 0, "x"), edit(7, 0, "y")],
        ];
        for edits in refused {
            assert!(matches!(
                room.apply_edits(None, &edits, None),
                Err(EditError::BadRequest(_))
            ));
        }
        assert_eq!(
            room.apply_edits(None, &[edit(0, 0, "x")], Some(2))
                .map_err(|_| ()),
            Err(())
        );
        assert_eq!((room.head(), room.text().as_str()), (1, "hello"));
        // Nothing to do: no op message.
        assert_eq!(room.apply_edits(None, &[edit(1, 0, "")], None), Ok(1));
        for _ in 0..3 {
            room.apply_edits(None, &[edit(0, 0, "z")], None)
                .expect("applies");
        }
        assert_eq!(
            room.apply_edits(None, &[edit(0, 0, "q")], Some(1)),
            Err(EditError::BaseGone { oldest: 2 })
        );
        assert_eq!(room.read_at_json(1), Err(2));
    }
}
