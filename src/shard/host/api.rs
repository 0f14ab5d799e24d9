//! The document API on the shard (`crate::api`, `docs/api.md`): each request runs on the
//! shard that owns its document, against its room, loaded through the storage worker like a
//! `hello`'s (never created by a read).
//!
//! Answers that name a `server_seq` wait in the room's effects behind every record they
//! reflect, so an answer (like an echo) never shows what a crash could take back; an edit is
//! answered once its op message is durable. A deletion closes the document's clients (1008
//! `deleted`), takes the room out of memory and has the storage worker delete its data
//! durably and answer. Listings go straight to the storage worker.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::api::{json_answer, json_error, ApiCall, ApiEffect, ApiReply, ApiRequest};
use crate::auth::Grant;
use crate::ids::ConnToken;
use crate::room::EditError;
use crate::storage::worker::StorageRequest;

use super::super::conn::Net;
use super::RoomHost;

/// API requests waiting for their document's load, by document.
#[derive(Debug, Default)]
pub(super) struct ApiState {
    waiting: HashMap<String, Vec<ApiRequest>>,
}

impl RoomHost {
    /// A request from the acceptor: served at once, or after its document's load.
    pub(super) fn api_request(&mut self, net: &mut Net, request: ApiRequest) {
        let Some(doc) = request.doc.clone() else {
            let ApiRequest { call, reply, .. } = request;
            match call {
                ApiCall::List(query) => self.request(StorageRequest::List {
                    query,
                    shard_idx: net.metrics.shard_idx(),
                    reply,
                }),
                _ => reply.answer(json_error(404, "not found")),
            }
            return;
        };
        if let Some(&idx) = self.room_by_doc.get(&doc) {
            let ApiRequest {
                call, grant, reply, ..
            } = request;
            return self.api_on_room(net, idx, call, grant, reply);
        }
        if self.loading.contains_key(&doc) {
            self.api.waiting.entry(doc).or_default().push(request);
            return;
        }
        if !self.worker.available() {
            let answer = json_error(503, "storage unavailable; try again later");
            return request.reply.answer(answer);
        }
        if self.rooms.len() + self.loading.len() >= self.docs_max && !self.unload_one_empty(net) {
            let answer = json_error(
                503,
                "too many documents open on this server; try again later",
            );
            return request.reply.answer(answer);
        }
        self.request(StorageRequest::Load { doc: doc.clone() });
        self.loading.insert(doc.clone(), Vec::new());
        self.api.waiting.insert(doc, vec![request]);
    }

    /// `doc`'s load completed (opened or failed): serve the requests waiting for it.
    pub(super) fn api_loaded(&mut self, net: &mut Net, doc: &str) {
        let Some(waiting) = self.api.waiting.remove(doc) else {
            return;
        };
        for request in waiting {
            match self.room_by_doc.get(doc).copied() {
                Some(idx) => {
                    let ApiRequest {
                        call, grant, reply, ..
                    } = request;
                    self.api_on_room(net, idx, call, grant, reply);
                }
                None => {
                    let answer = json_error(503, "the document could not be loaded");
                    request.reply.answer(answer);
                }
            }
        }
    }

    /// Serves one request against the loaded room `idx`.
    fn api_on_room(
        &mut self,
        net: &mut Net,
        idx: usize,
        call: ApiCall,
        grant: Option<Grant>,
        reply: ApiReply,
    ) {
        let storage_available = self.worker.available();
        let Some(slot) = self.rooms.get_mut(idx) else {
            return reply.answer(json_error(503, "the document left memory; retry"));
        };
        let room = &mut slot.room;
        let missing = !room.exists() && !matches!(call, ApiCall::Edits(_));
        if missing {
            reply.answer(json_error(404, "no such document"));
            if slot.is_unloadable() {
                // Loaded only to find it does not exist: never kept, never created.
                self.unload(net, idx);
            }
            return;
        }
        let effect = match call {
            ApiCall::Read { at } => match at {
                Some(at) if at > room.head() => {
                    let why = format!("at {at} is ahead of head {}", room.head());
                    return reply.answer(json_error(400, &why));
                }
                Some(at) if at < room.head() => {
                    return reply.answer(gone(
                        "no version older than the head is retained",
                        room.head(),
                    ));
                }
                _ => ApiEffect::Answer(reply, json_answer(200, &room.read_json())),
            },
            ApiCall::Snapshot => {
                ApiEffect::Answer(reply, json_answer(200, &room.snapshot_answer_json()))
            }
            ApiCall::Blame => ApiEffect::Answer(reply, json_answer(200, &room.blame_json())),
            ApiCall::History { from, limit } => {
                let from = from.unwrap_or_else(|| room.window_oldest());
                let echoes = match room.echoes_from(from, limit) {
                    Ok(echoes) => echoes,
                    Err(oldest) => {
                        return reply.answer(gone("history before this is not retained", oldest))
                    }
                };
                let mut body = String::from("{\"entries\":[");
                for (i, echo) in echoes.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    room.history_entry(echo, None, &mut body);
                }
                let next = from + echoes.len() as u64;
                if echoes.len() == limit && next <= room.head() {
                    let _ = write!(body, "],\"next\":{next}}}");
                } else {
                    body.push_str("],\"next\":null}");
                }
                ApiEffect::Answer(reply, json_answer(200, &body))
            }
            ApiCall::Edits(request) => {
                if !storage_available {
                    let answer = json_error(503, "storage unavailable; resend these edits later");
                    return reply.answer(answer);
                }
                let user = grant.as_ref().map(|g| g.user.as_str());
                match room.apply_edits(user, &request.edits, request.base) {
                    Ok(head) => {
                        let body = format!("{{\"server_seq\":{head},\"head\":{head}}}");
                        ApiEffect::Answer(reply, json_answer(200, &body))
                    }
                    Err(EditError::BadRequest(why)) => return reply.answer(json_error(400, &why)),
                    Err(EditError::BaseGone { oldest }) => {
                        let mut body =
                            String::from("{\"error\":\"base is older than the retained history\"");
                        let _ = write!(body, ",\"oldest\":{oldest}}}");
                        return reply.answer(json_answer(409, &body));
                    }
                    Err(EditError::TooLarge) => {
                        return reply.answer(json_error(413, "document size limit reached"))
                    }
                    Err(EditError::NoReplica) => {
                        return reply.answer(json_error(503, "no replica id left in this document"))
                    }
                }
            }
            ApiCall::Delete => ApiEffect::Delete(reply),
            ApiCall::List(_) => return reply.answer(json_error(404, "not found")),
        };
        room.push_api(effect);
        self.mark_dirty(idx);
    }

    /// Carries out a room's released API effects (their records are durable).
    pub(super) fn api_release(&mut self, net: &mut Net, room_idx: usize, effects: Vec<ApiEffect>) {
        for effect in effects {
            match effect {
                ApiEffect::Answer(reply, bytes) => reply.answer(bytes),
                ApiEffect::Delete(reply) => self.api_delete(net, room_idx, reply),
            }
        }
    }

    /// Deletes the document of room `room_idx`: its clients are closed 1008 `deleted`, the
    /// room leaves memory (what it still held is answered 409), and the storage worker
    /// deletes its data durably and answers.
    fn api_delete(&mut self, net: &mut Net, room_idx: usize, reply: ApiReply) {
        let Some(mut slot) = self.rooms.try_remove(room_idx) else {
            return reply.answer(json_error(404, "no such document"));
        };
        let doc = slot.room.doc_name().to_owned();
        let epoch = slot.room.epoch().to_owned();
        self.room_by_doc.remove(&doc);
        if slot.in_dirty {
            self.dirty.retain(|&idx| idx != room_idx);
        }
        let mut later: Vec<ApiEffect> = slot
            .held
            .drain(..)
            .flat_map(|held| held.effects.api)
            .collect();
        later.extend(slot.room.take_effects().api);
        for effect in later {
            let (ApiEffect::Answer(reply, _) | ApiEffect::Delete(reply)) = effect;
            reply.answer(json_error(409, "the document was deleted meanwhile"));
        }
        for (key, session) in self.sessions.iter_mut().enumerate() {
            let Some(session) = session else { continue };
            if session.room_idx == Some(room_idx) {
                session.room_idx = None;
                net.close(ConnToken(key), 1008, "deleted");
            }
        }
        net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
        self.request(StorageRequest::Release { doc: doc.clone() });
        self.request(StorageRequest::Delete { doc, epoch, reply });
    }
}

/// 410 with the oldest version still available.
fn gone(message: &str, oldest: u64) -> Vec<u8> {
    let mut body = String::from("{\"error\":");
    crate::protocol::codec::write_json_str(&mut body, message);
    let _ = write!(body, ",\"oldest\":{oldest}}}");
    json_answer(410, &body)
}
