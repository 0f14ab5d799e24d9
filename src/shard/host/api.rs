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
use crate::auth::Rule;
use crate::ids::ConnToken;
use crate::room::{EditError, Retention};
use crate::storage::worker::StorageRequest;

use super::super::conn::Net;
use super::{events, RoomHost};

/// The document API's state on a shard.
#[derive(Debug, Default)]
pub(super) struct ApiState {
    /// Requests waiting for their document's load, by document.
    waiting: HashMap<String, Vec<ApiRequest>>,
    /// The event streams (`GET /events`).
    streams: events::EventStreams,
    /// The history every room keeps (`--history-retain-ops`, `--history-retain`).
    retention: Retention,
}

impl RoomHost {
    /// Keeps `retention` of history in every document (none by default: snapshots at the
    /// head, as without the document API).
    pub fn with_history_retention(mut self, retention: Retention) -> RoomHost {
        self.api.retention = retention;
        self
    }

    /// The history every room keeps.
    pub(super) fn api_retention(&self) -> Retention {
        self.api.retention
    }

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
            return self.api_on_room(net, idx, request);
        }
        if self.loading.contains_key(&doc) {
            self.api.waiting.entry(doc).or_default().push(request);
            return;
        }
        if !self.worker.available() {
            let answer = json_error(503, "storage unavailable; try again later");
            return answer_request(request, answer);
        }
        if self.rooms.len() + self.loading.len() >= self.docs_max && !self.unload_one_empty(net) {
            let answer = json_error(
                503,
                "too many documents open on this server; try again later",
            );
            return answer_request(request, answer);
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
        let idx = self.room_by_doc.get(doc).copied();
        if let Some(idx) = idx {
            // Event streams outlive the room's stays in memory.
            if self.api.streams.watching(doc) {
                self.rooms[idx].room.set_watched(true);
            }
        }
        for request in waiting {
            match idx {
                Some(idx) => self.api_on_room(net, idx, request),
                None => {
                    let answer = json_error(503, "the document could not be loaded");
                    answer_request(request, answer);
                }
            }
        }
    }

    /// Serves one request against the loaded room `idx`.
    fn api_on_room(&mut self, net: &mut Net, idx: usize, request: ApiRequest) {
        let storage_available = self.worker.available();
        let Some(slot) = self.rooms.get_mut(idx) else {
            return answer_request(request, json_error(503, "the document left memory; retry"));
        };
        let ApiRequest {
            call,
            grant,
            reply,
            stream,
            ..
        } = request;
        let room = &mut slot.room;
        let missing = !room.exists() && !matches!(call, ApiCall::Edits(_));
        if missing {
            let answer = json_error(404, "no such document");
            match stream {
                Some(stream) => answer_stream(stream, &answer),
                None => reply.answer(answer),
            }
            if slot.is_unloadable() {
                // Loaded only to find it does not exist: never kept, never created.
                self.unload(net, idx);
            }
            return;
        }
        let effect = match call {
            ApiCall::Read { at: Some(at) } => match room.read_at_json(at) {
                Ok(json) => ApiEffect::Answer(reply, json_answer(200, &json)),
                Err(_) if at > room.head() => {
                    let why = format!("at {at} is ahead of head {}", room.head());
                    return reply.answer(json_error(400, &why));
                }
                Err(oldest) => {
                    return reply.answer(gone("that version is no longer retained", oldest))
                }
            },
            ApiCall::Read { at: None } => {
                ApiEffect::Answer(reply, json_answer(200, &room.read_json()))
            }
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
                    let time = room.accepted_time(from + i as u64);
                    room.history_entry(echo, time, &mut body);
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
            ApiCall::Events { since } => {
                let Some(stream) = stream else {
                    return reply.answer(json_error(500, "event stream without its socket"));
                };
                let mut head = events::stream_head();
                if let Some(since) = since {
                    if since > room.head() {
                        let why = format!("since {since} is ahead of head {}", room.head());
                        return answer_stream(stream, &json_error(400, &why));
                    }
                    match room.echoes_from(since + 1, usize::MAX) {
                        Ok(echoes) => {
                            for (i, echo) in echoes.iter().enumerate() {
                                head.extend_from_slice(&events::echo_event(
                                    since + 1 + i as u64,
                                    echo,
                                ));
                            }
                        }
                        Err(oldest) => {
                            let answer = gone("history before this is not retained", oldest - 1);
                            return answer_stream(stream, &answer);
                        }
                    }
                }
                // From now on every op message of the room is also an event (in order,
                // after this stream starts with the replay up to the current head).
                room.set_watched(true);
                ApiEffect::Subscribe(stream, head, grant.map(Box::new))
            }
            ApiCall::List(_) => return reply.answer(json_error(404, "not found")),
        };
        room.push_api(effect);
        self.mark_dirty(idx);
    }

    /// Ends the event streams whose token expired (every tick) or that `revoked` matches;
    /// returns how many.
    pub(super) fn api_close_denied(&mut self, net: &mut Net, revoked: Option<&Rule>) -> usize {
        let now = crate::auth::now_unix();
        self.api.streams.close_denied(net.registry(), now, revoked)
    }

    /// Storage failed for room `room_idx` (`fail_room`): its event streams end (their
    /// readers reconnect with `since`, as WebSocket clients do after their 1013), since the
    /// op messages they would have missed may or may not be durable.
    /// Streams that were about to start get 503.
    pub(super) fn api_room_failed(&mut self, net: &mut Net, room_idx: usize) {
        let Some(slot) = self.rooms.get_mut(room_idx) else {
            return;
        };
        let doc = slot.room.doc_name().to_owned();
        self.api.streams.end_doc(net.registry(), &doc);
        let mut starting = slot.room.take_api_subscribes();
        for held in &mut slot.held {
            for effect in std::mem::take(&mut held.effects.api) {
                match effect {
                    ApiEffect::Subscribe(stream, ..) => starting.push(stream),
                    other => held.effects.api.push(other),
                }
            }
        }
        let answer = json_error(503, "storage failed; reconnect with since");
        for stream in starting {
            answer_stream(stream, &answer);
        }
    }

    /// A readiness event of an event stream.
    pub(super) fn api_stream_event(&mut self, net: &mut Net, token: mio::Token) {
        let limit = net.limits().outbound_bytes_max;
        self.api.streams.on_event(net.registry(), token, limit);
    }

    /// Carries out a room's released API effects (their records are durable).
    pub(super) fn api_release(&mut self, net: &mut Net, room_idx: usize, effects: Vec<ApiEffect>) {
        let limit = net.limits().outbound_bytes_max;
        for effect in effects {
            match effect {
                ApiEffect::Answer(reply, bytes) => reply.answer(bytes),
                ApiEffect::Delete(reply) => self.api_delete(net, room_idx, reply),
                ApiEffect::Echo(server_seq, echo) => {
                    let Some(slot) = self.rooms.get_mut(room_idx) else {
                        continue;
                    };
                    let doc = slot.room.doc_name();
                    if !self.api.streams.watching(doc) {
                        slot.room.set_watched(false);
                        continue;
                    }
                    let event = events::echo_event(server_seq, &echo);
                    self.api
                        .streams
                        .broadcast(net.registry(), doc, &event, limit);
                }
                ApiEffect::Subscribe(stream, head, grant) => {
                    let Some(slot) = self.rooms.get(room_idx) else {
                        continue;
                    };
                    let doc = slot.room.doc_name();
                    let grant = grant.map(|g| *g);
                    if !self
                        .api
                        .streams
                        .open(net.registry(), stream, doc, head, grant, limit)
                    {
                        log::warn!("shard: an event stream could not be registered");
                    }
                }
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
            match effect {
                ApiEffect::Answer(reply, _) | ApiEffect::Delete(reply) => {
                    reply.answer(json_error(409, "the document was deleted meanwhile"))
                }
                ApiEffect::Echo(..) => {}
                ApiEffect::Subscribe(stream, ..) => {
                    answer_stream(stream, &json_error(404, "the document was deleted"));
                }
            }
        }
        let mut deleted = String::from("event: deleted\ndata: {\"doc\":");
        crate::protocol::codec::write_json_str(&mut deleted, &doc);
        deleted.push_str("}\n\n");
        let deleted: std::sync::Arc<[u8]> = std::sync::Arc::from(deleted.into_bytes());
        self.api.streams.finish_doc(net.registry(), &doc, &deleted);
        for (key, session) in self.sessions.iter_mut().enumerate() {
            let Some(session) = session else { continue };
            if session.room_idx == Some(room_idx) {
                session.room_idx = None;
                net.close(ConnToken(key), 1008, "deleted");
            }
        }
        net.metrics.figures.counters.docs_loaded = self.rooms.len() as u64;
        self.request(StorageRequest::Release { doc: doc.clone() });
        let webhooks = self.feed.before_delete(&doc);
        self.request(StorageRequest::Delete {
            doc,
            epoch,
            reply,
            webhooks,
        });
    }
}

/// Answers `request` with `answer`: on its socket for an event stream, else to the acceptor.
fn answer_request(request: ApiRequest, answer: Vec<u8>) {
    match request.stream {
        Some(stream) => answer_stream(stream, &answer),
        None => request.reply.answer(answer),
    }
}

/// Writes `answer` on a fresh socket the shard owns (an event stream refused before it
/// started) and closes it; a socket that cannot take a short answer at once is just closed.
fn answer_stream(mut stream: crate::api::CountedStream, answer: &[u8]) {
    use std::io::Write as _;
    let _ = stream.stream.write_all(answer);
    let _ = stream.stream.shutdown(std::net::Shutdown::Write);
}

/// The wall clock in unix milliseconds, read at most once per turn (`cache`).
pub(super) fn turn_time_ms(cache: &mut Option<u64>) -> u64 {
    *cache.get_or_insert_with(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

/// 410 with the oldest version still available.
fn gone(message: &str, oldest: u64) -> Vec<u8> {
    let mut body = String::from("{\"error\":");
    crate::protocol::codec::write_json_str(&mut body, message);
    let _ = write!(body, ",\"oldest\":{oldest}}}");
    json_answer(410, &body)
}
