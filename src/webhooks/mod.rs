//! The change feed: signed webhooks after a document changes or is deleted.
//!
//! The shards only ever call a [`WebhookSink`] (cheap to clone, never blocks: a `try_send` on
//! a bounded channel per URL, a small bounded overflow behind it, a no-op without
//! `--webhook-url`); each URL has its own delivery thread (`worker.rs`) that coalesces,
//! debounces and retries (`queue.rs`), signs each body (`sign.rs`) and POSTs it with a small
//! HTTP/1.1 client (`http.rs`). The shard calls [`ShardFeed::changed`] when a document's
//! records are durable and [`ShardFeed::flush`] once per turn, so each document is offered
//! at most once per shard turn with its latest durable head.
//!
//! Delivery is at least once: each URL's pending deliveries are persisted (appended and
//! fsynced per batch of changes, compacted now and then, `state.rs`) in `<data-dir>/webhooks/`,
//! so a restart (even `kill -9`) delivers what was pending, with the same delivery ids. An
//! event accepted by the sink but not yet persisted when the process dies is lost (a window
//! of one append).
//! With `--storage memory` nothing is persisted. Never on the shard's path: no lock, file or
//! socket is touched there (the overflow's mutex only when the channel is full).

pub mod http;
pub mod queue;
pub mod sign;
mod state;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use crate::metrics::Exposition;
use crate::units::parse_duration;

pub use http::WebhookUrl;
pub use sign::Secret;

/// Events buffered per URL between the shards and its delivery thread (the channel).
pub const CHANNEL_EVENTS_MAX: usize = 16 * 1024;
/// Events kept per URL when the channel is full; past it they are dropped (and counted).
pub const OVERFLOW_EVENTS_MAX: usize = 64 * 1024;
/// Documents a [`ShardFeed`] holds between two flushes at most.
pub const FEED_DOCS_MAX: usize = 64 * 1024;

/// The webhook flags (`--webhook-*`), a section of the server's configuration.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookConfig {
    /// POST a signed JSON event to this `http://` or `https://` URL after a document changes
    /// (at most once per --webhook-debounce per document) or is deleted; repeatable.
    /// `https://` needs --webhook-ca-file.
    #[arg(long = "webhook-url", value_name = "URL", value_parser = parse_webhook_url)]
    pub webhook_urls: Vec<WebhookUrl>,

    /// The HMAC-SHA256 key of `X-Collab-Signature`: the whole file, byte for byte, at least
    /// 32 bytes. Required with --webhook-url.
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// PEM CA certificates an `https://` receiver's certificate must chain to (and name the
    /// URL's host); for public receivers, the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt` on Debian).
    #[arg(long, value_name = "PATH")]
    pub webhook_ca_file: Option<PathBuf>,

    /// Least time between two `changed` events of one document to one URL; the latest head
    /// goes out at the end of the window. 1s keeps a busy document at one request a second.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub webhook_debounce: Duration,

    /// Deadline of one delivery attempt (connect, send, read the status line).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// Attempts of one delivery at most (the first included) before it is dropped (counted in
    /// collab_webhook_dropped_total). With the default backoff, 15 attempts span half an hour to an hour.
    #[arg(long, value_name = "N", default_value_t = 15, value_parser = parse_attempts)]
    pub webhook_attempts_max: u32,

    /// Delay before the first retry, doubled after each failure (the upper half jittered).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub webhook_retry_initial: Duration,

    /// Longest delay between two attempts of one delivery.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub webhook_retry_max: Duration,

    /// Documents with a delivery pending per URL at most; an event for one more is dropped
    /// (counted) until the receiver catches up. Bounds the queue's memory and state file.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub webhook_pending_max: usize,
}

fn parse_webhook_url(text: &str) -> Result<WebhookUrl, String> {
    WebhookUrl::parse(text)
}

fn parse_attempts(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// What happened to a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Its records up to `head` are durable.
    Changed {
        /// The highest durable `server_seq`.
        head: u64,
    },
    /// Its data was removed.
    Deleted,
}

impl EventKind {
    /// The `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Changed { .. } => "changed",
            EventKind::Deleted => "deleted",
        }
    }

    fn parse_name(name: &str) -> Option<&'static str> {
        match name {
            "changed" => Some("changed"),
            "deleted" => Some("deleted"),
            _ => None,
        }
    }
}

/// One event for the delivery threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The document.
    pub doc: Arc<str>,
    /// Its epoch.
    pub epoch: Arc<str>,
    /// What happened.
    pub kind: EventKind,
    /// When, in milliseconds since the Unix epoch (the body's `time`).
    pub time_ms: u64,
    /// When the delivery thread took it in (a first change goes out from then on).
    pub queued_at: Instant,
}

impl Event {
    /// The JSON body: `{"event":"changed","doc","epoch","head","time"}` or
    /// `{"event":"deleted","doc","epoch","time"}`; `time` in RFC 3339 UTC with milliseconds.
    pub fn body(&self) -> String {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            event: &'static str,
            doc: &'a str,
            epoch: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            head: Option<u64>,
            time: String,
        }
        let time = UNIX_EPOCH + Duration::from_millis(self.time_ms);
        let body = Body {
            event: self.kind.name(),
            doc: &self.doc,
            epoch: &self.epoch,
            head: match self.kind {
                EventKind::Changed { head } => Some(head),
                EventKind::Deleted => None,
            },
            time: humantime::format_rfc3339_millis(time).to_string(),
        };
        // Strings and numbers only: serializing cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The figures of `/metrics` (relaxed atomics, written by the sink and the delivery threads).
#[derive(Debug, Default)]
pub struct WebhookCounters {
    /// Deliveries answered 2xx.
    pub sent: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed: AtomicU64,
    /// Events or deliveries given up: attempts used up, or a queue bound reached.
    pub dropped: AtomicU64,
    /// Deliveries and events pending, per URL (gauge).
    pending: Vec<AtomicU64>,
}

impl WebhookCounters {
    fn new(n_urls: usize) -> WebhookCounters {
        WebhookCounters {
            pending: (0..n_urls).map(|_| AtomicU64::new(0)).collect(),
            ..WebhookCounters::default()
        }
    }

    /// Pending deliveries over every URL.
    pub fn pending(&self) -> u64 {
        self.pending.iter().map(|p| p.load(Ordering::Relaxed)).sum()
    }

    fn set_pending(&self, url_idx: usize, n: usize) {
        if let Some(slot) = self.pending.get(url_idx) {
            slot.store(n as u64, Ordering::Relaxed);
        }
    }

    fn drop_n(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Writes the `collab_webhook_*` families.
    pub fn render(&self, out: &mut Exposition) {
        let rows: [(&str, &str, &str, &AtomicU64); 3] = [
            (
                "collab_webhook_sent_total",
                "counter",
                "Webhook deliveries answered 2xx.",
                &self.sent,
            ),
            (
                "collab_webhook_failed_total",
                "counter",
                "Webhook delivery attempts that failed (each retry counts).",
                &self.failed,
            ),
            (
                "collab_webhook_dropped_total",
                "counter",
                "Webhook events or deliveries given up (attempts used up or a queue bound reached).",
                &self.dropped,
            ),
        ];
        for (name, kind, help, value) in rows {
            out.family(name, kind, help);
            out.sample(name, &[], value.load(Ordering::Relaxed));
        }
        let name = "collab_webhook_pending";
        out.family(
            name,
            "gauge",
            "Webhook deliveries pending, by URL (index of --webhook-url).",
        );
        for (idx, pending) in self.pending.iter().enumerate() {
            out.sample(
                name,
                &[("url", &idx.to_string())],
                pending.load(Ordering::Relaxed),
            );
        }
    }
}

/// One URL's end of the sink.
#[derive(Debug)]
struct Lane {
    events: Sender<Event>,
    /// Events that did not fit in the channel, oldest first; drained by the delivery thread
    /// once the channel is empty. At most [`OVERFLOW_EVENTS_MAX`].
    overflow: Mutex<VecDeque<Event>>,
}

#[derive(Debug)]
struct SinkInner {
    lanes: Vec<Lane>,
    counters: Arc<WebhookCounters>,
}

/// Where the shards (and the document API's DELETE) report changes: cheap to clone, never
/// blocks, a no-op when no `--webhook-url` is configured.
#[derive(Clone, Debug, Default)]
pub struct WebhookSink {
    inner: Option<Arc<SinkInner>>,
}

impl WebhookSink {
    /// A sink that delivers nothing (no `--webhook-url`).
    pub fn disabled() -> WebhookSink {
        WebhookSink { inner: None }
    }

    /// Whether events go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `doc` (of `epoch`) has its records up to `head` durable.
    pub fn changed(&self, doc: &str, epoch: &str, head: u64) {
        if self.inner.is_some() {
            self.send(
                Arc::from(doc),
                Arc::from(epoch),
                EventKind::Changed { head },
            );
        }
    }

    /// `doc` (of `epoch`) was deleted.
    pub fn deleted(&self, doc: &str, epoch: &str) {
        if self.inner.is_some() {
            self.send(Arc::from(doc), Arc::from(epoch), EventKind::Deleted);
        }
    }

    fn send(&self, doc: Arc<str>, epoch: Arc<str>, kind: EventKind) {
        let Some(inner) = &self.inner else { return };
        let event = Event {
            doc,
            epoch,
            kind,
            time_ms: now_ms(),
            queued_at: Instant::now(),
        };
        for lane in &inner.lanes {
            match lane.events.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    let mut overflow = lane.overflow.lock();
                    if overflow.len() >= OVERFLOW_EVENTS_MAX {
                        overflow.pop_front();
                        inner.counters.drop_n(1);
                    }
                    overflow.push_back(event);
                }
                // The delivery thread is gone (shutdown): nothing to deliver to.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

/// A shard's coalescing front of the sink: [`ShardFeed::changed`] keeps each document's latest
/// durable head, [`ShardFeed::flush`] (once per turn) offers each to the sink once.
#[derive(Debug, Default)]
pub struct ShardFeed {
    sink: WebhookSink,
    /// Documents changed since the last flush: doc -> (epoch, head). At most
    /// [`FEED_DOCS_MAX`]; past it a change is offered to the sink at once.
    changed: HashMap<Arc<str>, (Arc<str>, u64)>,
}

impl ShardFeed {
    /// A feed in front of `sink`.
    pub fn new(sink: WebhookSink) -> ShardFeed {
        ShardFeed {
            sink,
            changed: HashMap::new(),
        }
    }

    /// `doc`'s records up to `head` are durable.
    pub fn changed(&mut self, doc: &Arc<str>, epoch: &Arc<str>, head: u64) {
        if !self.sink.is_enabled() {
            return;
        }
        if let Some((old_epoch, old_head)) = self.changed.get_mut(doc) {
            if old_epoch != epoch {
                // The document was recreated within one turn: the old epoch's change first.
                self.sink.changed(doc, old_epoch, *old_head);
                *old_epoch = epoch.clone();
            }
            *old_head = (*old_head).max(head);
            return;
        }
        if self.changed.len() >= FEED_DOCS_MAX {
            self.sink.changed(doc, epoch, head);
            return;
        }
        self.changed.insert(doc.clone(), (epoch.clone(), head));
    }

    /// `doc` is about to be deleted off the shard thread (by the storage worker): its change
    /// not flushed yet goes now, and the returned sink reports the `deleted` once the deletion
    /// is durable, so a receiver never sees a change of a deleted epoch after its `deleted`.
    pub fn before_delete(&mut self, doc: &str) -> WebhookSink {
        if let Some((old_epoch, head)) = self.changed.remove(doc) {
            self.sink.changed(doc, &old_epoch, head);
        }
        self.sink.clone()
    }

    /// `doc` (of `epoch`) was deleted: its change not flushed yet goes first, then the delete
    /// (so a receiver never sees a change of a deleted epoch after its `deleted`).
    pub fn deleted(&mut self, doc: &str, epoch: &str) {
        if !self.sink.is_enabled() {
            return;
        }
        if let Some((old_epoch, head)) = self.changed.remove(doc) {
            self.sink.changed(doc, &old_epoch, head);
        }
        self.sink.deleted(doc, epoch);
    }

    /// Offers every document changed since the last flush to the sink.
    pub fn flush(&mut self) {
        if self.changed.is_empty() {
            return;
        }
        for (doc, (epoch, head)) in self.changed.drain() {
            self.sink.changed(&doc, &epoch, head);
        }
    }

    /// The sink behind it.
    pub fn sink(&self) -> &WebhookSink {
        &self.sink
    }
}

/// The running delivery threads: start with [`Webhooks::start`], stop with
/// [`Webhooks::shutdown`] once nothing calls the sink any more.
#[derive(Debug)]
pub struct Webhooks {
    sink: WebhookSink,
    counters: Arc<WebhookCounters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Webhooks {
    /// Starts one delivery thread per `--webhook-url`, each first loading what a previous
    /// process left pending in `state_dir/webhooks/` (`None`: nothing persisted). Without a
    /// URL, nothing runs and the sink is a no-op.
    ///
    /// # Errors
    /// A URL without `--webhook-secret-file`, an unusable secret, or a state directory or
    /// file that cannot be read or created.
    pub fn start(config: &WebhookConfig, state_dir: Option<PathBuf>) -> anyhow::Result<Webhooks> {
        let n_urls = config.webhook_urls.len();
        let counters = Arc::new(WebhookCounters::new(n_urls));
        let stop = Arc::new(AtomicBool::new(false));
        if n_urls == 0 {
            if config.webhook_secret_file.is_some() {
                log::warn!("--webhook-secret-file without --webhook-url: no webhooks are sent");
            }
            return Ok(Webhooks {
                sink: WebhookSink::disabled(),
                counters,
                stop,
                threads: Vec::new(),
            });
        }
        let Some(secret_path) = &config.webhook_secret_file else {
            anyhow::bail!(
                "--webhook-url needs --webhook-secret-file: every delivery is signed \
                 (X-Collab-Signature, docs/webhooks.md)"
            );
        };
        let secret = Secret::from_file(secret_path)?;
        let tls = match (
            &config.webhook_ca_file,
            config.webhook_urls.iter().find(|u| u.tls),
        ) {
            (Some(path), _) => {
                let ca_error = |detail: String| {
                    anyhow::anyhow!("--webhook-ca-file {}: {detail}", path.display())
                };
                let roots = crate::tls::load_roots(path).map_err(ca_error)?;
                Some(crate::tls::client_config(roots).map_err(ca_error)?)
            }
            (None, Some(url)) => anyhow::bail!(
                "--webhook-url {} needs --webhook-ca-file (the PEM CA certificates its \
                 certificate must chain to, e.g. /etc/ssl/certs/ca-certificates.crt)",
                url.text
            ),
            (None, None) => None,
        };
        let state_dir = match state_dir {
            Some(dir) => {
                let dir = dir.join("webhooks");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Some(dir)
            }
            None => {
                log::warn!(
                    "webhooks with --storage memory: pending deliveries do not survive a restart"
                );
                None
            }
        };
        let mut seen = std::collections::HashSet::new();
        for url in &config.webhook_urls {
            anyhow::ensure!(
                seen.insert(url.text.as_str()),
                "--webhook-url {} is given twice",
                url.text
            );
        }
        let policy = queue::Policy {
            debounce: config.webhook_debounce,
            retry_initial: config.webhook_retry_initial,
            retry_max: config.webhook_retry_max.max(config.webhook_retry_initial),
            attempts_max: config.webhook_attempts_max,
            docs_max: config.webhook_pending_max.max(1),
        };
        if let Some(dir) = &state_dir {
            warn_about_other_state_files(dir, &config.webhook_urls);
        }
        let mut lanes = Vec::with_capacity(n_urls);
        let mut receivers: Vec<Receiver<Event>> = Vec::with_capacity(n_urls);
        for _ in 0..n_urls {
            let (tx, rx) = crossbeam_channel::bounded(CHANNEL_EVENTS_MAX);
            lanes.push(Lane {
                events: tx,
                overflow: Mutex::new(VecDeque::new()),
            });
            receivers.push(rx);
        }
        let inner = Arc::new(SinkInner {
            lanes,
            counters: counters.clone(),
        });
        let mut threads = Vec::with_capacity(n_urls);
        for (url_idx, (url, events)) in config.webhook_urls.iter().zip(receivers).enumerate() {
            let mut lane = worker::UrlWorker::new(worker::UrlSetup {
                url_idx,
                url: url.clone(),
                secret: secret.clone(),
                policy,
                timeout: config.webhook_timeout,
                tls: tls.clone(),
                state_dir: state_dir.clone(),
                events,
                sink: inner.clone(),
                stop: stop.clone(),
            })?;
            let thread = std::thread::Builder::new()
                .name(format!("webhook-{url_idx}"))
                .spawn(move || lane.run())
                .context("spawning a webhook delivery thread")?;
            threads.push(thread);
            log::info!("webhooks: delivering to {}", url.text);
        }
        Ok(Webhooks {
            sink: WebhookSink { inner: Some(inner) },
            counters,
            stop,
            threads,
        })
    }

    /// The sink to hand to the shards.
    pub fn sink(&self) -> WebhookSink {
        self.sink.clone()
    }

    /// The figures for `/metrics`.
    pub fn counters(&self) -> Arc<WebhookCounters> {
        self.counters.clone()
    }

    /// Stops the delivery threads once their current attempt ends (within
    /// `--webhook-timeout`); what is still pending stays persisted for the next start.
    /// Call it after the shards stopped, so their last changes are taken in first.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a webhook delivery thread panicked");
            }
        }
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// State files in `dir` of URLs no longer configured: their pending deliveries are not sent
/// (they are kept, for when the URL comes back).
fn warn_about_other_state_files(dir: &std::path::Path, urls: &[WebhookUrl]) {
    let ours: Vec<PathBuf> = urls
        .iter()
        .map(|url| state::StateFile::new(dir, &url.text).path().to_path_buf())
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "jsonl") && !ours.contains(&path) {
            log::warn!(
                "webhooks: {} holds deliveries for a URL no longer given with --webhook-url; \
                 they are kept but not sent (remove the file to drop them)",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_documented_json() {
        let event = Event {
            doc: Arc::from("notes/\"a\""),
            epoch: Arc::from("ab12"),
            kind: EventKind::Changed { head: 42 },
            time_ms: 1_700_000_000_123,
            queued_at: Instant::now(),
        };
        assert_eq!(
            event.body(),
            r#"{"event":"changed","doc":"notes/\"a\"","epoch":"ab12","head":42,"time":"2023-11-14T22:13:20.123Z"}"#
        );
        let deleted = Event {
            kind: EventKind::Deleted,
            ..event
        };
        assert_eq!(
            deleted.body(),
            r#"{"event":"deleted","doc":"notes/\"a\"","epoch":"ab12","time":"2023-11-14T22:13:20.123Z"}"#
        );
    }

    #[test]
    fn a_disabled_sink_and_feed_do_nothing() {
        let sink = WebhookSink::disabled();
        assert!(!sink.is_enabled());
        sink.changed("d", "e", 1);
        sink.deleted("d", "e");
        let mut feed = ShardFeed::new(sink);
        feed.changed(&Arc::from("d"), &Arc::from("e"), 1);
        assert!(feed.changed.is_empty());
        feed.flush();
    }

    /// A sink with one lane whose channel holds `capacity` events, and its receiver.
    fn sink_with(capacity: usize) -> (WebhookSink, Receiver<Event>, Arc<SinkInner>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let inner = Arc::new(SinkInner {
            lanes: vec![Lane {
                events: tx,
                overflow: Mutex::new(VecDeque::new()),
            }],
            counters: Arc::new(WebhookCounters::new(1)),
        });
        (
            WebhookSink {
                inner: Some(inner.clone()),
            },
            rx,
            inner,
        )
    }

    #[test]
    fn the_feed_offers_each_document_once_per_flush_with_its_latest_head() {
        let (sink, rx, _) = sink_with(16);
        let mut feed = ShardFeed::new(sink);
        let (a, b, e) = (Arc::from("a"), Arc::from("b"), Arc::from("e"));
        for head in 1..=5 {
            feed.changed(&a, &e, head);
        }
        feed.changed(&b, &e, 9);
        assert!(rx.try_recv().is_err(), "nothing before the flush");
        feed.flush();
        let mut got: Vec<(String, EventKind)> = rx
            .try_iter()
            .map(|ev| (ev.doc.to_string(), ev.kind))
            .collect();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            [
                ("a".to_owned(), EventKind::Changed { head: 5 }),
                ("b".to_owned(), EventKind::Changed { head: 9 })
            ]
        );
        feed.flush();
        assert!(rx.try_recv().is_err(), "an empty flush sends nothing");
        // A delete sends the document's unflushed change first, then itself.
        feed.changed(&a, &e, 6);
        feed.deleted("a", "e");
        let got: Vec<EventKind> = rx.try_iter().map(|ev| ev.kind).collect();
        assert_eq!(got, [EventKind::Changed { head: 6 }, EventKind::Deleted]);
        feed.flush();
        assert!(
            rx.try_recv().is_err(),
            "nothing left for the deleted document"
        );
    }

    #[test]
    fn a_full_channel_overflows_then_drops_the_oldest_and_never_blocks() {
        let (sink, rx, inner) = sink_with(1);
        sink.changed("a", "e", 1);
        sink.deleted("a", "e");
        assert_eq!(
            rx.try_recv().map(|e| e.kind),
            Ok(EventKind::Changed { head: 1 })
        );
        let overflow: Vec<EventKind> = inner.lanes[0]
            .overflow
            .lock()
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(overflow, [EventKind::Deleted]);
        for head in 0..(OVERFLOW_EVENTS_MAX as u64 + 10) {
            sink.changed("b", "e", head);
        }
        assert_eq!(inner.lanes[0].overflow.lock().len(), OVERFLOW_EVENTS_MAX);
        assert_eq!(inner.counters.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn flags_environment_and_config_file_set_the_webhooks() {
        use crate::config::Config;
        let config = crate::cli::try_parse_from::<Config, _, _>([
            "collab-engine",
            "--webhook-url",
            "http://127.0.0.1:9000/a",
            "--webhook-url",
            "https://hooks.example.com/b",
            "--webhook-debounce",
            "250ms",
        ])
        .expect("flags");
        let urls: Vec<&str> = config
            .webhooks
            .webhook_urls
            .iter()
            .map(|u| u.text.as_str())
            .collect();
        assert_eq!(
            urls,
            ["http://127.0.0.1:9000/a", "https://hooks.example.com/b"]
        );
        assert_eq!(config.webhooks.webhook_debounce, Duration::from_millis(250));
        let defaults = crate::cli::try_parse_from::<Config, _, _>(["collab-engine"]).expect("none");
        assert!(defaults.webhooks.webhook_urls.is_empty());
        assert_eq!(defaults.webhooks.webhook_debounce, Duration::from_secs(1));
        assert_eq!(defaults.webhooks.webhook_attempts_max, 15);
        let dir = std::env::temp_dir().join(format!("collab-hook-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("collab.toml");
        std::fs::write(
            &file,
            "webhook-url = [\"http://a/\", \"http://b/\"]\nwebhook-attempts-max = 3\n",
        )
        .expect("write");
        let path = file.to_str().expect("utf-8");
        let config =
            crate::cli::try_parse_from::<Config, _, _>(["collab-engine", "--config", path])
                .expect("file");
        assert_eq!(config.webhooks.webhook_urls.len(), 2);
        assert_eq!(config.webhooks.webhook_attempts_max, 3);
        std::fs::write(&file, "webhook-url = \"ftp://a/\"\n").expect("write");
        let err = crate::cli::try_parse_from::<Config, _, _>(["collab-engine", "--config", path])
            .expect_err("bad scheme")
            .to_string();
        assert!(err.contains("setting `webhook-url`"), "{err}");
        assert!(crate::cli::try_parse_from::<Config, _, _>([
            "collab-engine",
            "--webhook-attempts-max",
            "0"
        ])
        .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_refuses_a_url_without_a_usable_secret() {
        let url = WebhookUrl::parse("http://127.0.0.1:1/hook").expect("url");
        let mut config = WebhookConfig {
            webhook_urls: vec![url],
            webhook_secret_file: None,
            webhook_ca_file: None,
            webhook_debounce: Duration::from_secs(1),
            webhook_timeout: Duration::from_secs(1),
            webhook_attempts_max: 3,
            webhook_retry_initial: Duration::from_secs(1),
            webhook_retry_max: Duration::from_secs(1),
            webhook_pending_max: 10,
        };
        let err = Webhooks::start(&config, None).expect_err("no secret");
        assert!(
            err.to_string().contains("needs --webhook-secret-file"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("collab-hook-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("short");
        std::fs::write(&path, b"short").expect("write");
        config.webhook_secret_file = Some(path);
        let err = Webhooks::start(&config, None).expect_err("short secret");
        assert!(format!("{err:#}").contains("holds 5 bytes"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
