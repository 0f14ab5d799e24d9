//! One URL's delivery thread: takes events in from the sink, lets the [`Queue`] decide,
//! persists the queue after each change, and performs one attempt at a time.
//!
//! It never blocks a shard: the shards only `try_send` to its channel. An attempt blocks this
//! thread alone, for at most `--webhook-timeout`; events arriving meanwhile wait in the
//! channel (then the sink's overflow) and are coalesced after the attempt.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::http::{self, WebhookUrl};
use super::queue::{Failed, Offered, Policy, Queue, QueueState};
use super::sign::Secret;
use super::{Event, SinkInner};
use crate::shard::log_limit::LogLimit;

/// Longest wait for an event before the stop flag is looked at again.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Largest state file read at start.
const STATE_BYTES_MAX: u64 = 1 << 30;

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
    /// `<data-dir>/webhooks/<hash>.json`, when persisted.
    state_path: Option<PathBuf>,
    rng: Rng,
    /// Failures to persist or deliver: one log line a second.
    log: LogLimit,
    /// The channel's senders are gone (every sink dropped).
    disconnected: bool,
}

impl UrlWorker {
    /// Loads what a previous process left pending for this URL.
    pub(super) fn new(setup: UrlSetup) -> anyhow::Result<UrlWorker> {
        let mut queue = Queue::new(setup.policy);
        let state_path = setup
            .state_dir
            .as_ref()
            .map(|dir| dir.join(format!("{:016x}.json", fnv64(setup.url.text.as_bytes()))));
        if let Some(path) = &state_path {
            if let Some(state) = read_state(path)? {
                anyhow::ensure!(
                    state.url == setup.url.text,
                    "{} belongs to {:?}, not {:?} (a hash collision; move it away)",
                    path.display(),
                    state.url,
                    setup.url.text
                );
                let n = queue
                    .restore(state, Instant::now())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                if n > 0 {
                    log::info!("webhooks: {n} deliveries pending for {}", setup.url.text);
                }
            }
        }
        setup
            .sink
            .counters
            .set_pending(setup.url_idx, queue.pending());
        Ok(UrlWorker {
            setup,
            queue,
            state_path,
            rng: Rng::new(),
            log: LogLimit::per_second(),
            disconnected: false,
        })
    }

    /// Runs until the stop flag is set.
    pub(super) fn run(&mut self) {
        while !self.setup.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let wait = self
                .queue
                .next_due()
                .map_or(STOP_POLL, |due| due.saturating_duration_since(now))
                .min(STOP_POLL);
            self.wait_for_events(wait);
            self.take_events();
            self.persist();
            self.deliver_due();
            self.queue.prune(Instant::now());
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

    /// Attempts every delivery that is due, one at a time.
    fn deliver_due(&mut self) {
        loop {
            if self.setup.stop.load(Ordering::Acquire) {
                return;
            }
            let rng = &mut self.rng;
            let mut new_id = || rng.hex128();
            let Some((doc, delivery)) = self.queue.take_due(Instant::now(), &mut new_id) else {
                return;
            };
            // Sealed (id and body fixed) before the first attempt leaves.
            self.persist();
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
                    self.queue.delivered(&doc, &delivery.id);
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    let jitter = self.rng.unit();
                    let outcome = self
                        .queue
                        .failed(&doc, &delivery.id, Instant::now(), jitter);
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
            self.take_events();
            self.persist();
        }
    }

    /// Writes the queue's state if it changed; a failure is logged and retried next time.
    fn persist(&mut self) {
        if !self.queue.take_dirty() {
            return;
        }
        self.setup
            .sink
            .counters
            .set_pending(self.setup.url_idx, self.queue.pending());
        let Some(path) = &self.state_path else {
            return;
        };
        let state = self.queue.state(&self.setup.url.text);
        if let Err(e) = write_state(path, &state) {
            if self.log.hit(Instant::now()).is_some() {
                log::error!("webhooks: cannot persist the pending deliveries: {e:#}");
            }
            // Stay dirty: tried again after the next event or attempt.
            self.queue.mark_dirty();
        }
    }
}

/// FNV-1a, 64 bits: the state file's name for a URL (the URL never becomes a path).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn read_state(path: &Path) -> anyhow::Result<Option<QueueState>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, STATE_BYTES_MAX), &mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    let state = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a webhook queue state (remove it to drop its pending deliveries)",
            path.display()
        )
    })?;
    Ok(Some(state))
}

/// Replaces `path` atomically: a temporary file, fsynced, renamed over it, the folder fsynced.
fn write_state(path: &Path, state: &QueueState) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(state).context("encoding the webhook queue")?;
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
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

    #[test]
    fn state_files_are_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("collab-hook-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("x.json");
        assert!(read_state(&path).expect("missing is fine").is_none());
        let state = QueueState {
            version: super::super::queue::STATE_VERSION,
            url: "http://h/".to_owned(),
            docs: Vec::new(),
        };
        write_state(&path, &state).expect("write");
        assert_eq!(read_state(&path).expect("read"), Some(state));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, b"{not json").expect("damage");
        let err = read_state(&path).expect_err("damaged");
        assert!(
            format!("{err:#}").contains("not a webhook queue state"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
