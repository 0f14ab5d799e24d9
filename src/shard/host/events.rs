//! `GET /api/docs/{doc}/events`: Server-Sent Events streams on the shard that owns the
//! document. Each stream is a plain TCP socket handed over by the acceptor, registered in
//! the shard's `Poll` under a token at or above [`STREAM_TOKEN_BASE`], with its own outbound
//! queue bounded like a WebSocket client's (`--outbound-bytes-max`): a reader that falls
//! further behind is closed, never buffered without bound.
//!
//! Events: `op_echo` (`id:` the `server_seq`, `data:` the echo exactly as WebSocket clients
//! get it), released like echoes (once durable), and `deleted` before the stream ends.
//! Never blocks: writes stop at `WouldBlock` and resume on the next writable event.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::api::CountedStream;
use crate::auth::{Grant, Rule};

use super::super::event_loop::STREAM_TOKEN_BASE;

/// One event stream.
struct Stream {
    stream: CountedStream,
    doc: String,
    /// Chunks not yet written; the first is written from `offset`.
    queue: VecDeque<Arc<[u8]>>,
    offset: usize,
    queued_bytes: usize,
    /// Close once the queue is written (after `deleted`).
    closing: bool,
    /// The token it was opened with (access control on): the stream ends when it expires
    /// or is revoked, like a WebSocket connection.
    grant: Option<Grant>,
}

/// Every event stream of a shard.
#[derive(Default)]
pub(super) struct EventStreams {
    streams: Slab<Stream>,
    by_doc: HashMap<String, Vec<usize>>,
}

impl std::fmt::Debug for EventStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStreams")
            .field("streams", &self.streams.len())
            .finish()
    }
}

/// What a write attempt left.
enum Flushed {
    /// Everything written, or waiting for writable.
    Open,
    /// The stream is finished or broken: remove it.
    Done,
}

impl EventStreams {
    /// Whether `doc` has streams.
    pub(super) fn watching(&self, doc: &str) -> bool {
        self.by_doc.contains_key(doc)
    }

    /// Starts a stream for `doc`: registers it, queues `head` (the HTTP response head and
    /// the replayed events) and writes what it can. `false` when it could not be registered.
    pub(super) fn open(
        &mut self,
        registry: &Registry,
        mut stream: CountedStream,
        doc: &str,
        head: Vec<u8>,
        grant: Option<Grant>,
        limit: usize,
    ) -> bool {
        let entry = self.streams.vacant_entry();
        let key = entry.key();
        if registry
            .register(
                &mut stream.stream,
                Token(STREAM_TOKEN_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return false;
        }
        let queued_bytes = head.len();
        entry.insert(Stream {
            stream,
            doc: doc.to_owned(),
            queue: VecDeque::from([Arc::from(head)]),
            offset: 0,
            queued_bytes,
            closing: false,
            grant,
        });
        self.by_doc.entry(doc.to_owned()).or_default().push(key);
        self.flush(registry, key, limit);
        true
    }

    /// Queues `event` on every stream of `doc`; closes the ones over `limit` bytes queued.
    pub(super) fn broadcast(
        &mut self,
        registry: &Registry,
        doc: &str,
        event: &Arc<[u8]>,
        limit: usize,
    ) {
        let Some(keys) = self.by_doc.get(doc).cloned() else {
            return;
        };
        for key in keys {
            if let Some(s) = self.streams.get_mut(key) {
                s.queued_bytes += event.len();
                s.queue.push_back(event.clone());
            }
            self.flush(registry, key, limit);
        }
    }

    /// Sends `event` (the `deleted` event) to every stream of `doc`, then ends them.
    pub(super) fn finish_doc(&mut self, registry: &Registry, doc: &str, event: &Arc<[u8]>) {
        let Some(keys) = self.by_doc.get(doc).cloned() else {
            return;
        };
        for key in keys {
            if let Some(s) = self.streams.get_mut(key) {
                s.queued_bytes += event.len();
                s.queue.push_back(event.clone());
                s.closing = true;
            }
            self.flush(registry, key, usize::MAX);
        }
    }

    /// Ends the streams whose token expired by `now` (unix seconds) or that `revoked`
    /// matches; returns how many.
    pub(super) fn close_denied(
        &mut self,
        registry: &Registry,
        now: u64,
        revoked: Option<&Rule>,
    ) -> usize {
        let denied: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.grant.as_ref().is_some_and(|grant| {
                    grant.exp <= now || revoked.is_some_and(|rule| rule.closes(grant, &s.doc))
                })
            })
            .map(|(key, _)| key)
            .collect();
        for &key in &denied {
            self.remove(registry, key);
        }
        denied.len()
    }

    /// Ends every stream of `doc` at once, without a last event.
    pub(super) fn end_doc(&mut self, registry: &Registry, doc: &str) {
        for key in self.by_doc.get(doc).cloned().unwrap_or_default() {
            self.remove(registry, key);
        }
    }

    /// A readiness event for `token`: a hang-up ends the stream, writable resumes writing.
    pub(super) fn on_event(&mut self, registry: &Registry, token: Token, limit: usize) {
        let Some(key) = token.0.checked_sub(STREAM_TOKEN_BASE) else {
            return;
        };
        let Some(s) = self.streams.get_mut(key) else {
            return;
        };
        // The client sends nothing on an event stream; reading tells a hang-up apart.
        let mut buf = [0u8; 512];
        loop {
            match s.stream.stream.read(&mut buf) {
                Ok(0) => return self.remove(registry, key),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(registry, key),
            }
        }
        self.flush(registry, key, limit);
    }

    /// Writes stream `key`'s queue until `WouldBlock`; closes it when over `limit` queued
    /// bytes (a slow reader), broken, or finished.
    fn flush(&mut self, registry: &Registry, key: usize, limit: usize) {
        let Some(s) = self.streams.get_mut(key) else {
            return;
        };
        let outcome = write_queue(s);
        let slow = s.queued_bytes > limit;
        if slow {
            log::debug!(
                "shard: an event stream of a document fell {} bytes behind; closed",
                s.queued_bytes
            );
        }
        if matches!(outcome, Flushed::Done) || slow {
            self.remove(registry, key);
        }
    }

    fn remove(&mut self, registry: &Registry, key: usize) {
        let Some(mut s) = self.streams.try_remove(key) else {
            return;
        };
        let _ = registry.deregister(&mut s.stream.stream);
        let _ = s.stream.stream.shutdown(Shutdown::Both);
        if let Some(keys) = self.by_doc.get_mut(&s.doc) {
            keys.retain(|&k| k != key);
            if keys.is_empty() {
                self.by_doc.remove(&s.doc);
            }
        }
    }
}

fn write_queue(s: &mut Stream) -> Flushed {
    while let Some(chunk) = s.queue.front() {
        match s.stream.stream.write(&chunk[s.offset..]) {
            Ok(0) => return Flushed::Done,
            Ok(n) => {
                s.offset += n;
                s.queued_bytes -= n;
                if s.offset == chunk.len() {
                    s.queue.pop_front();
                    s.offset = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Flushed::Done,
        }
    }
    if s.closing {
        Flushed::Done
    } else {
        Flushed::Open
    }
}

/// The `op_echo` event of `echo`.
pub(super) fn echo_event(server_seq: u64, echo: &str) -> Arc<[u8]> {
    Arc::from(format!("id: {server_seq}\nevent: op_echo\ndata: {echo}\n\n").into_bytes())
}

/// The response head of an event stream.
pub(super) fn stream_head() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\n".to_vec()
}
