//! Per-shard counters and latency histograms, merged on scrape.
//!
//! A shard owns its [`ShardMetrics`] outright and records into it without synchronisation.
//! Every [`PUBLISH_INTERVAL`] it copies its figures into a slot of the shared
//! [`MetricsRegistry`]; that one short lock per interval is the only cross-thread traffic,
//! and it is off the per-message path. The acceptor renders the registry for `/metrics`
//! (Prometheus text format) and `/health`; each histogram is exported per shard and merged
//! (`shard="all"`), because quantiles of different shards cannot be added afterwards.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::acceptor::door::DoorRefusal;

/// How often a shard copies its figures into the registry.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Largest value a histogram records, in microseconds (one minute); larger values saturate.
const HISTOGRAM_US_MAX: u64 = 60_000_000;

/// A counter row of the exposition: name, Prometheus type, help text, getter.
type CounterRow = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardCounters) -> u64,
);
/// A histogram row of the exposition: name, help text, getter.
type HistogramRow = (
    &'static str,
    &'static str,
    fn(&ShardHistograms) -> &Histogram<u64>,
);

/// Monotonic counters and gauges of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Open WebSocket connections (gauge).
    pub conns: u64,
    /// Documents loaded in memory (gauge).
    pub docs_loaded: u64,
    /// Op messages accepted (given a `server_seq`).
    pub ops_accepted: u64,
    /// Op messages answered with `ack` because they changed nothing.
    pub ops_unchanged: u64,
    /// Client messages refused with an `error`.
    pub msgs_refused: u64,
    /// WebSocket payload bytes received.
    pub bytes_in: u64,
    /// WebSocket payload bytes queued for sending.
    pub bytes_out: u64,
    /// Connections closed because their outbound queue overflowed (slow consumers).
    pub slow_consumer_drops: u64,
    /// Connections accepted from the acceptor.
    pub conns_accepted: u64,
    /// Storage failures (append or sync).
    pub storage_errors: u64,
    /// Batches handed to the storage worker and not yet reported (gauge).
    pub storage_batches_in_flight: u64,
}

/// The latency histograms of one shard, in microseconds.
#[derive(Clone, Debug)]
pub struct ShardHistograms {
    /// One event-loop turn, from wake-up to the end of the flush.
    pub turn_us: Histogram<u64>,
    /// Validating and integrating one op message into the CRDT.
    pub integrate_us: Histogram<u64>,
    /// One group-commit sync of the storage (appends and sync, on the storage worker
    /// thread, carrying every turn queued since the previous one).
    pub fsync_us: Histogram<u64>,
    /// Queuing one echo for every client of its document.
    pub fanout_us: Histogram<u64>,
}

impl Default for ShardHistograms {
    fn default() -> Self {
        let new =
            || Histogram::new_with_bounds(1, HISTOGRAM_US_MAX, 3).expect("valid histogram bounds");
        ShardHistograms {
            turn_us: new(),
            integrate_us: new(),
            fsync_us: new(),
            fanout_us: new(),
        }
    }
}

/// What a shard last published.
#[derive(Clone, Debug, Default)]
pub struct ShardFigures {
    /// Counters and gauges.
    pub counters: ShardCounters,
    /// Latency histograms since start.
    pub histograms: ShardHistograms,
}

/// The door's figures (`acceptor::door`): written by the acceptor thread alone, read by the
/// `/metrics` scrape (which the acceptor serves too); relaxed atomics, never on a shard's path.
#[derive(Debug, Default)]
pub struct DoorCounters {
    /// Refusals by reason, in the order of [`DoorRefusal::ALL`].
    refusals: [AtomicU64; 3],
    /// Idle addresses evicted from a full table.
    evictions: AtomicU64,
    /// Client addresses in the table (gauge, updated on the acceptor's tick).
    addrs: AtomicU64,
    /// Connections counted against the per-address limit (gauge, same).
    conns: AtomicU64,
}

impl DoorCounters {
    fn slot(refusal: DoorRefusal) -> usize {
        match refusal {
            DoorRefusal::Origin => 0,
            DoorRefusal::ConnsPerIp => 1,
            DoorRefusal::ConnectRate => 2,
        }
    }

    /// Counts one refusal.
    pub fn refused(&self, refusal: DoorRefusal) {
        self.refusals[Self::slot(refusal)].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals for `refusal` so far.
    pub fn refusals(&self, refusal: DoorRefusal) -> u64 {
        self.refusals[Self::slot(refusal)].load(Ordering::Relaxed)
    }

    /// Counts `n` idle addresses evicted from a full table.
    pub fn evicted(&self, n: u64) {
        self.evictions.fetch_add(n, Ordering::Relaxed);
    }

    /// Idle addresses evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Sets the gauges: addresses in the table, connections counted.
    pub fn set_gauges(&self, addrs: u64, conns: u64) {
        self.addrs.store(addrs, Ordering::Relaxed);
        self.conns.store(conns, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let name = "collab_door_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections refused by the acceptor before the handshake, by reason.\n# TYPE {name} counter"
        );
        for refusal in DoorRefusal::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                refusal.label(),
                self.refusals(refusal)
            );
        }
        let rows: [(&str, &str, &str, u64); 3] = [
            (
                "collab_door_addresses",
                "gauge",
                "Client addresses tracked for the per-address limits.",
                self.addrs.load(Ordering::Relaxed),
            ),
            (
                "collab_door_connections",
                "gauge",
                "Connections counted against --conns-per-ip-max.",
                self.conns.load(Ordering::Relaxed),
            ),
            (
                "collab_door_address_evictions_total",
                "counter",
                "Idle client addresses forgotten because the table was full.",
                self.evictions(),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// The shared slots the shards publish into; cheap to clone (an `Arc`).
#[derive(Clone, Debug)]
pub struct MetricsRegistry {
    slots: Arc<[Mutex<ShardFigures>]>,
    door: Arc<DoorCounters>,
}

impl MetricsRegistry {
    /// A registry with one empty slot per shard.
    pub fn new(n_shards: usize) -> MetricsRegistry {
        MetricsRegistry {
            slots: (0..n_shards)
                .map(|_| Mutex::new(ShardFigures::default()))
                .collect(),
            door: Arc::new(DoorCounters::default()),
        }
    }

    /// The door's counters, for the acceptor to write.
    pub fn door(&self) -> Arc<DoorCounters> {
        self.door.clone()
    }

    /// The recorder for shard `shard_idx`, to be moved into that shard's thread.
    ///
    /// # Panics
    /// If `shard_idx` is not below the shard count given to [`MetricsRegistry::new`].
    pub fn shard(&self, shard_idx: usize) -> ShardMetrics {
        assert!(shard_idx < self.slots.len(), "shard index out of range");
        ShardMetrics {
            figures: ShardFigures::default(),
            registry: self.clone(),
            shard_idx,
            published_at: Instant::now(),
        }
    }

    /// Counters summed over all shards.
    pub fn totals(&self) -> ShardCounters {
        let mut total = ShardCounters::default();
        for slot in self.slots.iter() {
            let c = slot.lock().counters.clone();
            total.conns += c.conns;
            total.docs_loaded += c.docs_loaded;
            total.ops_accepted += c.ops_accepted;
            total.ops_unchanged += c.ops_unchanged;
            total.msgs_refused += c.msgs_refused;
            total.bytes_in += c.bytes_in;
            total.bytes_out += c.bytes_out;
            total.slow_consumer_drops += c.slow_consumer_drops;
            total.conns_accepted += c.conns_accepted;
            total.storage_errors += c.storage_errors;
            total.storage_batches_in_flight += c.storage_batches_in_flight;
        }
        total
    }

    /// Number of shards.
    pub fn n_shards(&self) -> usize {
        self.slots.len()
    }

    /// Renders every shard's figures in the Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let shards: Vec<ShardFigures> = self.slots.iter().map(|slot| slot.lock().clone()).collect();
        let mut out = String::with_capacity(4096);
        let counters: [CounterRow; 11] = [
            (
                "collab_connections",
                "gauge",
                "Open WebSocket connections.",
                |c| c.conns,
            ),
            (
                "collab_documents_loaded",
                "gauge",
                "Documents loaded in memory.",
                |c| c.docs_loaded,
            ),
            (
                "collab_ops_accepted_total",
                "counter",
                "Op messages given a server_seq.",
                |c| c.ops_accepted,
            ),
            (
                "collab_ops_unchanged_total",
                "counter",
                "Op messages answered with ack.",
                |c| c.ops_unchanged,
            ),
            (
                "collab_messages_refused_total",
                "counter",
                "Client messages refused with an error.",
                |c| c.msgs_refused,
            ),
            (
                "collab_bytes_in_total",
                "counter",
                "WebSocket payload bytes received.",
                |c| c.bytes_in,
            ),
            (
                "collab_bytes_out_total",
                "counter",
                "WebSocket payload bytes queued.",
                |c| c.bytes_out,
            ),
            (
                "collab_slow_consumer_drops_total",
                "counter",
                "Connections closed for an overflowing outbound queue.",
                |c| c.slow_consumer_drops,
            ),
            (
                "collab_connections_accepted_total",
                "counter",
                "Connections handed to shards.",
                |c| c.conns_accepted,
            ),
            (
                "collab_storage_errors_total",
                "counter",
                "Failed storage appends or syncs.",
                |c| c.storage_errors,
            ),
            (
                "collab_storage_batches_in_flight",
                "gauge",
                "Turns whose records the storage worker has not reported durable yet.",
                |c| c.storage_batches_in_flight,
            ),
        ];
        for (name, kind, help, get) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (shard_idx, figures) in shards.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{shard_idx}\"}} {}",
                    get(&figures.counters)
                );
            }
        }
        let histograms: [HistogramRow; 4] = [
            (
                "collab_loop_turn_seconds",
                "Shard event-loop turn time.",
                |h| &h.turn_us,
            ),
            (
                "collab_op_integrate_seconds",
                "Validating and integrating one op message.",
                |h| &h.integrate_us,
            ),
            (
                "collab_fsync_seconds",
                "One group-commit storage sync (on the shard's storage worker thread).",
                |h| &h.fsync_us,
            ),
            (
                "collab_fanout_seconds",
                "Queuing one echo for every client of a document.",
                |h| &h.fanout_us,
            ),
        ];
        for (name, help, get) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
            // Quantiles do not add up across shards, so the merged histogram gets its own series.
            let mut all = get(&ShardHistograms::default()).clone();
            for figures in &shards {
                let _ = all.add(get(&figures.histograms));
            }
            let labelled = shards
                .iter()
                .enumerate()
                .map(|(idx, f)| (idx.to_string(), get(&f.histograms)));
            for (shard, h) in labelled.chain(std::iter::once(("all".to_owned(), &all))) {
                for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
                    let seconds = h.value_at_quantile(q) as f64 / 1e6;
                    let _ = writeln!(
                        out,
                        "{name}{{shard=\"{shard}\",quantile=\"{q}\"}} {seconds}"
                    );
                }
                let sum_seconds = h.mean() * h.len() as f64 / 1e6;
                let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum_seconds}");
                let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {}", h.len());
            }
        }
        self.door.render(&mut out);
        out
    }
}

/// One shard's recorder: written only by its shard thread, published every interval.
#[derive(Debug)]
pub struct ShardMetrics {
    /// The live figures; the shard updates them directly.
    pub figures: ShardFigures,
    registry: MetricsRegistry,
    shard_idx: usize,
    published_at: Instant,
}

impl ShardMetrics {
    /// The index of the shard this recorder belongs to (for its log lines).
    pub fn shard_idx(&self) -> usize {
        self.shard_idx
    }

    /// Records a duration into one of the histograms (saturating at one minute).
    pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, HISTOGRAM_US_MAX);
        histogram.saturating_record(us);
    }

    /// Copies the figures into the registry if [`PUBLISH_INTERVAL`] has passed since the last
    /// time (or always, with `force`). Called once per loop turn.
    pub fn maybe_publish(&mut self, now: Instant, force: bool) {
        if !force && now.duration_since(self.published_at) < PUBLISH_INTERVAL {
            return;
        }
        self.published_at = now;
        let mut slot = self.registry.slots[self.shard_idx].lock();
        slot.counters.clone_from(&self.figures.counters);
        let live = &self.figures.histograms;
        let published = &mut slot.histograms;
        for (dst, src) in [
            (&mut published.turn_us, &live.turn_us),
            (&mut published.integrate_us, &live.integrate_us),
            (&mut published.fsync_us, &live.fsync_us),
            (&mut published.fanout_us, &live.fanout_us),
        ] {
            copy_histogram(dst, src);
        }
    }
}

/// Copies `src` into `dst` in place: no allocation under the lock (a derived `clone_from` would
/// allocate a fresh ~280 KB counts array per histogram per publish), and nothing at all when no
/// sample arrived since the last copy (a histogram's count only grows).
fn copy_histogram(dst: &mut Histogram<u64>, src: &Histogram<u64>) {
    if dst.len() == src.len() {
        return;
    }
    dst.reset();
    if dst.add(src).is_err() {
        // Only when the bounds differ, which `ShardHistograms::default` rules out.
        dst.clone_from(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_copies_histograms_in_place() {
        let mut src = ShardHistograms::default().turn_us;
        let mut dst = src.clone();
        ShardMetrics::record(&mut src, Duration::from_micros(10));
        copy_histogram(&mut dst, &src);
        assert_eq!((dst.len(), dst.max()), (1, 10));
        ShardMetrics::record(&mut src, Duration::from_micros(20));
        copy_histogram(&mut dst, &src);
        assert_eq!(
            (dst.len(), dst.max()),
            (2, 20),
            "a second copy replaces, never adds twice"
        );
    }

    #[test]
    fn published_figures_reach_the_scrape() {
        let registry = MetricsRegistry::new(2);
        let mut shard = registry.shard(1);
        shard.figures.counters.ops_accepted = 7;
        shard.figures.counters.conns = 3;
        ShardMetrics::record(
            &mut shard.figures.histograms.fsync_us,
            Duration::from_micros(1500),
        );
        assert_eq!(
            registry.totals().ops_accepted,
            0,
            "nothing is visible before publishing"
        );
        shard.maybe_publish(Instant::now(), true);
        assert_eq!(registry.totals().ops_accepted, 7);
        let text = registry.render_prometheus();
        assert!(
            text.contains("collab_ops_accepted_total{shard=\"1\"} 7"),
            "{text}"
        );
        assert!(text.contains("collab_connections{shard=\"1\"} 3"), "{text}");
        assert!(
            text.contains("collab_fsync_seconds_count{shard=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("collab_fsync_seconds_count{shard=\"0\"} 0"),
            "{text}"
        );
        let merged = "collab_fsync_seconds{shard=\"all\",quantile=\"0.5\"} 0.0015";
        assert!(text.contains(merged), "{text}");
        assert!(
            text.contains("collab_fsync_seconds_count{shard=\"all\"} 1"),
            "{text}"
        );
    }
}
