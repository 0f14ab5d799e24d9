//! One URL's delivery thread: takes events in from the sink, lets the [`Queue`] decide,
//! persists the queue after each change, and performs one attempt at a time.
//!
//! It never blocks a shard: the shards only `try_send` to its channel. An attempt blocks this
//! thread alone, for at most `--webhook-timeout`; events arriving meanwhile wait in the
//! channel (then the sink's overflow) and are coalesced after the attempt.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::http::{self, WebhookUrl};
use super::queue::{Delivery, Failed, Offered, Policy, Queue};
use super::sign::Secret;
use super::state::StateFile;
use super::{Event, SinkInner};
use crate::shard::log_limit::LogLimit;

/// Deliveries sealed (and persisted) together before their attempts.
const DELIVERY_BATCH_MAX: usize = 32;
/// How often documents with nothing pending are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for an event before the stop flag is looked at again.
const STOP_POLL: Duration = Duration::from_millis(100);

/// What a delivery thread is given.
pub(super) struct UrlSetup {
    pub url_idx: usize,
    pub url: WebhookUrl,
    pub secret: Secret,
    pub policy: Policy,
    pub timeout: Duration,
    /// For `https://` URLs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub state_dir: Option<PathBuf>,
    pub events: Receiver<Event>,
    pub sink: Arc<SinkInner>,
    pub stop: Arc<AtomicBool>,
}

/// One URL's delivery thread state.
pub(super) struct UrlWorker {
    setup: UrlSetup,
    queue: Queue,
    /// `<data-dir>/webhooks/<hash>.jsonl`, when persisted.
    state: Option<StateFile>,
    /// The last write of the state failed: write it whole at the next chance.
    state_failed: bool,
    rng: Rng,
    /// Failures to persist or deliver: one log line a second.
    log: LogLimit,
    /// The channel's senders are gone (every sink dropped).
    disconnected: bool,
    /// Attempts in a row that failed, over every document.
    failures_in_a_row: u32,
    /// After two failures in a row the whole URL waits (the receiver is down, not one
    /// delivery bad): no attempt before this, so a dead receiver costs one attempt per
    /// backoff delay, not one per document.
    paused_until: Option<Instant>,
}

impl UrlWorker {
    /// Loads what a previous process left pending for this URL.
    pub(super) fn new(setup: UrlSetup) -> anyhow::Result<UrlWorker> {
        let mut queue = Queue::new(setup.policy);
        let state = setup
            .state_dir
            .as_ref()
            .map(|dir| StateFile::new(dir, &setup.url.text));
        if let Some(file) = &state {
            let n = queue
                .restore(file.load()?, Instant::now())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.path().display()))?;
            if n > 0 {
                log::info!("webhooks: {n} deliveries pending for {}", setup.url.text);
            }
        }
        setup
            .sink
            .counters
            .set_pending(setup.url_idx, queue.pending());
        Ok(UrlWorker {
            setup,
            queue,
            state,
            state_failed: false,
            rng: Rng::new(),
            log: LogLimit::per_second(),
            disconnected: false,
            failures_in_a_row: 0,
            paused_until: None,
        })
    }

    /// Runs until the stop flag is set.
    pub(super) fn run(&mut self) {
        let mut last_prune = Instant::now();
        while !self.setup.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let next = match self.paused_until {
                Some(until) if until > now => Some(until),
                _ => self.queue.next_due(),
            };
            let wait = next
                .map_or(STOP_POLL, |due| due.saturating_duration_since(now))
                .min(STOP_POLL);
            self.wait_for_events(wait);
            self.take_events();
            self.persist();
            self.deliver_due();
            if last_prune.elapsed() >= PRUNE_INTERVAL {
                self.queue.prune(Instant::now());
                last_prune = Instant::now();
            }
        }
        self.take_events();
        self.persist();
    }

    fn wait_for_events(&mut self, wait: Duration) {
        if self.disconnected {
            std::thread::sleep(wait);
            return;
        }
        match self.setup.events.recv_timeout(wait) {
            Ok(event) => self.offer(event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.disconnected = true,
        }
    }

    /// Everything in the channel, then the overflow.
    fn take_events(&mut self) {
        while let Ok(event) = self.setup.events.try_recv() {
            self.offer(event);
        }
        let overflow =
            std::mem::take(&mut *self.setup.sink.lanes[self.setup.url_idx].overflow.lock());
        for event in overflow {
            self.offer(event);
        }
    }

    fn offer(&mut self, mut event: Event) {
        event.queued_at = Instant::now();
        if self.queue.offer(event, Instant::now()) == Offered::Dropped {
            self.setup.sink.counters.drop_n(1);
            if self.log.hit(Instant::now()).is_some() {
                log::warn!(
                    "webhooks: {}: an event was dropped (more than {} documents pending, or a \
                     document's queue full); the receiver is behind",
                    self.setup.url.text,
                    self.setup.policy.docs_max
                );
            }
        }
    }

    /// Attempts every delivery that is due, one at a time, sealing up to
    /// [`DELIVERY_BATCH_MAX`] of them (persisted together) before the first attempt.
    fn deliver_due(&mut self) {
        loop {
            if self.paused() {
                return;
            }
            let mut batch = Vec::new();
            while batch.len() < DELIVERY_BATCH_MAX {
                let rng = &mut self.rng;
                let mut new_id = || rng.hex128();
                match self.queue.take_due(Instant::now(), &mut new_id) {
                    Some(due) => batch.push(due),
                    None => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            // Sealed (ids and bodies fixed) before the first attempt leaves.
            self.persist();
            for (doc, delivery) in batch {
                if self.setup.stop.load(Ordering::Acquire) {
                    // Unattempted: still sealed in the state, due at the next start.
                    return;
                }
                if self.paused() {
                    // The receiver is down: back in the queue, due when the pause ends.
                    self.queue.unclaim(&doc, &delivery.id);
                    continue;
                }
                self.attempt(&doc, &delivery);
                self.take_events();
            }
            self.persist();
        }
    }

    /// Whether the URL is in a pause after failures in a row.
    fn paused(&self) -> bool {
        self.paused_until
            .is_some_and(|until| until > Instant::now())
    }

    /// One attempt of `delivery`, and its outcome reported to the queue.
    fn attempt(&mut self, doc: &Arc<str>, delivery: &Delivery) {
        let request = http::Request {
            body: delivery.body.as_bytes(),
            signature: &self.setup.secret.signature(delivery.body.as_bytes()),
            delivery_id: &delivery.id,
            event: delivery.event,
        };
        let counters = &self.setup.sink.counters;
        let tls = self.setup.tls.as_ref();
        match http::post(&self.setup.url, tls, request, self.setup.timeout) {
            Ok(_) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
                self.queue.delivered(doc, &delivery.id);
                self.failures_in_a_row = 0;
                self.paused_until = None;
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let jitter = self.rng.unit();
                let now = Instant::now();
                let outcome = self.queue.failed(doc, &delivery.id, now, jitter);
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                if self.failures_in_a_row >= 2 {
                    let pause = super::queue::backoff(
                        &self.setup.policy,
                        self.failures_in_a_row - 1,
                        jitter,
                    );
                    self.paused_until = Some(now + pause);
                }
                if outcome == Failed::GaveUp {
                    counters.drop_n(1);
                    log::warn!(
                        "webhooks: {}: delivery {} given up after {} attempts: {e}",
                        self.setup.url.text,
                        delivery.id,
                        delivery.attempts + 1
                    );
                } else if self.log.hit(Instant::now()).is_some() {
                    log::warn!(
                        "webhooks: {}: delivery {} failed (attempt {}): {e}",
                        self.setup.url.text,
                        delivery.id,
                        delivery.attempts + 1
                    );
                }
            }
        }
    }

    /// Writes what changed in the queue; a failure is logged, and the next call writes the
    /// whole state.
    fn persist(&mut self) {
        let changes = self.queue.take_changes();
        if changes.is_empty() && !self.state_failed {
            return;
        }
        self.setup
            .sink
            .counters
            .set_pending(self.setup.url_idx, self.queue.pending());
        let Some(file) = &mut self.state else {
            return;
        };
        let queue = &self.queue;
        match file.write(&changes, || queue.state()) {
            Ok(()) => self.state_failed = false,
            Err(e) => {
                self.state_failed = true;
                if self.log.hit(Instant::now()).is_some() {
                    log::error!("webhooks: cannot persist the pending deliveries: {e:#}");
                }
            }
        }
    }
}

/// Delivery ids and jitter: xorshift64* seeded from std's randomly keyed hasher (unique ids,
/// not secrets: the signature is what a receiver trusts).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Rng(hasher.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// 32 hex digits.
    fn hex128(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }

    /// In `0.0..1.0`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_jitter_in_range() {
        let mut rng = Rng::new();
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| rng.hex128()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 32));
        assert!((0..1000)
            .map(|_| rng.unit())
            .all(|u| (0.0..1.0).contains(&u)));
    }
}
