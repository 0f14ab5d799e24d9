//! The storage worker's answers, carried out on the shard: [`RoomHost`]'s completion path.
//!
//! `Synced` releases each room's held effects in turn order (the one place that performs a
//! room's effects, [`RoomHost::release`]) or drops the rooms of a failed batch
//! ([`RoomHost::fail_room`]); `Loaded` opens a room and answers the hellos waiting for it.
//! Nothing here waits on storage: completions are values taken in `end_turn`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};

use crate::ids::ConnToken;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode, ProtocolError};
use crate::room::{Effects, Room, EFFECTS_RECYCLE_CAPACITY_MAX};
use crate::storage::worker::{BatchId, DocAppend, StorageCompletion, StorageRequest, WorkerGone};
use crate::storage::{StorageError, StoredDoc};

use super::super::conn::Net;
use super::super::event_loop::Handler;
use super::{
    frame_is, refuse_not_owner, refuse_storage_unavailable, worker_gone, Failure, RoomHost,
    RoomSlot, SPENT_VECS_KEPT_MAX, UNAVAILABLE_PREFIX,
};

impl RoomHost {
    /// A load the worker answered: open the room and answer every hello waiting for it.
    pub(super) fn on_loaded(
        &mut self,
        net: &mut Net,
        doc: String,
        result: Result<Option<StoredDoc>, StorageError>,
    ) {
        let Some(waiters) = self.loading.remove(&doc) else {
            warn!("shard: a load completed that was not asked for");
            return;
        };
        let result = if self.lost_while_loading.remove(&doc) {
            if result.is_ok() {
                // Its lease went while it loaded: the storage releases what it acquired.
                self.request(StorageRequest::Release { doc: doc.clone() });
            }
            Err(StorageError::Fenced {
                reason: "the lease was lost while the document loaded".to_owned(),
            })
        } else {
            result
        };
        let unreachable = matches!(
            result,
            Err(StorageError::Unavailable { .. } | StorageError::OutcomeUnknown { .. })
        );
        let fenced = matches!(result, Err(StorageError::Fenced { .. }));
        let room_idx = match result {
            Ok(stored) => match Room::open(doc.clone(), stored, self.room_config.clone()) {
                Ok(mut room) => {
                    room.set_retention(self.api_retention());
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    let idx = self.rooms.insert(RoomSlot {
                        doc: Arc::from(room.doc_name()),
                        epoch: Arc::from(room.epoch()),
                        room,
                        generation,
                        in_dirty: false,
                        held: VecDeque::new(),
                        empty_since: None,
                        busy_this_tick: false,
                    });
                    self.room_by_doc.insert(doc.clone(), idx);
                    net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
                    debug!("shard: opened a document ({} loaded)", self.rooms.len());
                    Some(idx)
                }
                Err(e) => {
                    warn!("shard: opening a document failed: {e}");
                    self.request(StorageRequest::Release { doc: doc.clone() });
                    None
                }
            },
            Err(e) => {
                net.metrics.figures.counters.storage_errors += 1;
                warn!("shard: loading a document failed: {e}");
                None
            }
        };
        for (conn, hello) in waiters {
            let Some(session) = self.session_mut(conn) else {
                continue;
            };
            if session.awaiting_load.as_deref() != Some(doc.as_str()) {
                continue; // Gone, and its slab key reused by another connection.
            }
            session.awaiting_load = None;
            let deferred = std::mem::take(&mut session.deferred);
            match room_idx {
                Some(idx) => self.join(conn, idx, &hello),
                None if unreachable => refuse_storage_unavailable(net, conn),
                None if fenced => refuse_not_owner(net, conn),
                None => {
                    let err =
                        ProtocolError::new(ErrorCode::Unavailable, "document could not be loaded");
                    self.refuse(net, conn, &err);
                }
            }
            for message in deferred {
                self.on_message(net, conn, message);
            }
        }
        self.api_loaded(net, &doc);
    }

    /// Every answer the worker has ready, in order.
    pub(super) fn take_completions(&mut self, net: &mut Net) {
        loop {
            match self.worker.try_recv() {
                Ok(Some(completion)) => self.complete(net, completion),
                Ok(None) => return,
                Err(WorkerGone) => worker_gone(),
            }
        }
    }

    /// Carries out one answer of the worker.
    pub(super) fn complete(&mut self, net: &mut Net, completion: StorageCompletion) {
        match completion {
            StorageCompletion::Synced {
                first,
                last,
                result,
                sync_time,
                spent,
            } => {
                self.keep_spent(spent);
                ShardMetrics::record(&mut net.metrics.figures.histograms.fsync_us, sync_time);
                let failure = match &result {
                    Ok(()) => None,
                    Err(StorageError::OutcomeUnknown { .. }) => Some(Failure::OutcomeUnknown),
                    Err(_) => Some(Failure::Failed),
                };
                if let Err(e) = &result {
                    net.metrics.figures.counters.storage_errors += 1;
                    warn!("shard: storage sync failed: {e}");
                }
                while self.in_flight.front().is_some_and(|f| f.batch <= last) {
                    let Some(done) = self.in_flight.pop_front() else {
                        break;
                    };
                    debug_assert!(done.batch >= first, "a completion skipped a batch");
                    for &(room_idx, generation) in &done.rooms {
                        if self
                            .rooms
                            .get(room_idx)
                            .map_or(true, |slot| slot.generation != generation)
                        {
                            continue; // Dropped by an earlier failure.
                        }
                        match failure {
                            None => self.release_held(net, room_idx, done.batch),
                            Some(failure) => self.fail_room(net, room_idx, failure),
                        }
                    }
                    let mut rooms = done.rooms;
                    if self.spent_rooms.len() < SPENT_VECS_KEPT_MAX {
                        rooms.clear();
                        self.spent_rooms.push(rooms);
                    }
                }
            }
            StorageCompletion::Fenced { docs } => {
                for doc in docs {
                    if let Some(room_idx) = self.room_by_doc.get(&doc).copied() {
                        self.fail_room(net, room_idx, Failure::Fenced);
                    }
                }
            }
            StorageCompletion::Loaded { doc, result } => self.on_loaded(net, doc, result),
            StorageCompletion::SnapshotWritten { result, .. } => {
                if let Err(e) = result {
                    net.metrics.figures.counters.storage_errors += 1;
                    warn!("shard: snapshot write failed (the log still covers it): {e}");
                }
            }
        }
    }

    /// Keeps the worker's spent commit vectors for reuse, within bounds (a burst's large
    /// vectors are freed, like a room's spent effects).
    pub(super) fn keep_spent(&mut self, spent: Vec<Vec<DocAppend>>) {
        for mut appends in spent {
            for append in appends.drain(..) {
                let mut records = append.records;
                if self.spent_records.len() < SPENT_VECS_KEPT_MAX
                    && records.capacity() <= EFFECTS_RECYCLE_CAPACITY_MAX
                {
                    records.clear();
                    self.spent_records.push(records);
                }
            }
            if self.spent_appends.len() < SPENT_VECS_KEPT_MAX
                && appends.capacity() <= SPENT_VECS_KEPT_MAX
            {
                self.spent_appends.push(appends);
            }
        }
    }

    /// `durable` is durable: releases the room's held effects up to it, in order.
    pub(super) fn release_held(&mut self, net: &mut Net, room_idx: usize, durable: BatchId) {
        loop {
            let Some(slot) = self.rooms.get_mut(room_idx) else {
                return;
            };
            if !slot
                .held
                .front()
                .is_some_and(|held| held.batch.map_or(true, |batch| batch <= durable))
            {
                return;
            }
            let Some(held) = slot.held.pop_front() else {
                return;
            };
            if held.head > 0 {
                self.feed.changed(&slot.doc, &slot.epoch, held.head);
            }
            self.release(net, room_idx, held.effects);
        }
    }

    /// The one place that carries out a room's effects, once their records are durable:
    /// frames queued in order, the snapshot handed to the worker, closes after the frames.
    pub(super) fn release(&mut self, net: &mut Net, room_idx: usize, mut effects: Effects) {
        let started = Instant::now();
        net.metrics.figures.counters.ops_accepted += effects.op_origins.len() as u64;
        for (conn, frame) in effects.frames.drain(..) {
            if frame_is(&frame, "{\"type\":\"ack\"") {
                net.metrics.figures.counters.ops_unchanged += 1;
            } else if frame_is(&frame, "{\"type\":\"error\"") {
                net.metrics.figures.counters.msgs_refused += 1;
                if !frame_is(&frame, UNAVAILABLE_PREFIX) {
                    self.count_refusal(conn);
                }
            }
            net.send(conn, frame);
        }
        if !effects.op_origins.is_empty() {
            ShardMetrics::record(
                &mut net.metrics.figures.histograms.fanout_us,
                started.elapsed(),
            );
        }
        if let Some(snapshot) = effects.snapshot.take() {
            // Every record it covers is durable: it went in this batch or an earlier one.
            let doc = self.rooms[room_idx].room.doc_name().to_owned();
            self.request(StorageRequest::Snapshot { doc, snapshot });
        }
        for (conn, code, reason) in effects.closes.drain(..) {
            net.close(conn, code, reason);
        }
        let api_effects = std::mem::take(&mut effects.api);
        // Everything is released: the room may keep the vectors for its next turn.
        if let Some(slot) = self.rooms.get_mut(room_idx) {
            slot.room.recycle_effects(effects);
            slot.busy_this_tick = true;
        }
        if !api_effects.is_empty() {
            self.api_release(net, room_idx, api_effects);
        }
    }

    /// Storage failed for this room: its held frames are discarded; on a plain failure
    /// every held op's origin gets `unavailable` with its `client_seq` (none of them was
    /// written); every client gets `unavailable` and a close 1013, and the room leaves memory
    /// without its state being used again (storage is the truth; the next hello reloads it).
    pub(super) fn fail_room(&mut self, net: &mut Net, room_idx: usize, failure: Failure) {
        self.api_room_failed(net, room_idx);
        let Some(slot) = self.rooms.get_mut(room_idx) else {
            return;
        };
        let mut dropped: Vec<Effects> = std::mem::take(&mut slot.held)
            .into_iter()
            .map(|held| held.effects)
            .collect();
        // This turn's effects, if any, go too: they follow the failed batch.
        dropped.push(slot.room.take_effects());
        if matches!(failure, Failure::Failed | Failure::Fenced) {
            for effects in dropped {
                for (conn, client_seq) in effects.op_origins {
                    let err = ProtocolError::new(
                        ErrorCode::Unavailable,
                        "storage failed; reconnect with since and resend",
                    )
                    .with_client_seq(Some(client_seq));
                    net.send(conn, protocol::encode_error(&err));
                }
            }
        }
        let members: Vec<usize> = self
            .sessions
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.room_idx == Some(room_idx)))
            .map(|(key, _)| key)
            .collect();
        let (message, reason) = match failure {
            Failure::Failed => ("storage failed", "storage failed, reconnect"),
            Failure::OutcomeUnknown => (
                "storage outcome unknown; reconnect with since",
                "storage outcome unknown, reconnect",
            ),
            Failure::Fenced | Failure::LeaseLost => (
                "this node no longer owns the document; reconnect with since",
                "document moved, reconnect",
            ),
        };
        let err = protocol::encode_error(&ProtocolError::new(ErrorCode::Unavailable, message));
        for key in members {
            if let Some(Some(session)) = self.sessions.get_mut(key) {
                session.room_idx = None;
            }
            net.send(ConnToken(key), err.clone());
            net.close(ConnToken(key), 1013, reason);
        }
        self.unload(net, room_idx);
    }
}
