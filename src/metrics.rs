//! Per-shard counters and latency histograms, summed on scrape.
//!
//! A shard owns its [`ShardMetrics`] outright and records into it without synchronisation.
//! Every [`PUBLISH_INTERVAL`] it copies its figures into a slot of the shared
//! [`MetricsRegistry`]; that one short lock per interval is the only cross-thread traffic,
//! and it is off the per-message path. The acceptor renders the registry for `/metrics` and
//! `/health`.
//!
//! `/metrics` is the Prometheus text exposition format (version 0.0.4). Every shard-side series
//! carries a `shard` label and nothing else is exported beside them, so `sum()` over shards is the
//! server's total. Latencies are Prometheus histograms with fixed buckets
//! ([`LATENCY_BUCKETS_NS`]): cumulative `_bucket{le=...}` counts, `_sum` and `_count`, which add
//! across shards and servers (quantiles of a summary would not). The scrape also reports the
//! process (`process_*`, read from `/proc/self`) and the build (`collab_build_info`).
//!
//! Another module's figures are added as one more row of the tables in
//! [`MetricsRegistry::render_prometheus`] or as a `render` method writing through [`Exposition`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::acceptor::door::DoorRefusal;

/// How often a shard copies its figures into the registry.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Upper bounds (inclusive, nanoseconds) of the latency histogram buckets, from 1 µs to 10 s in
/// 1-2.5-5 steps; a last `+Inf` bucket takes everything above. Fixed so that every shard's and
/// every server's buckets line up and can be summed.
pub const LATENCY_BUCKETS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const _: () = {
    let mut i = 1;
    while i < LATENCY_BUCKETS_NS.len() {
        assert!(LATENCY_BUCKETS_NS[i - 1] < LATENCY_BUCKETS_NS[i]);
        i += 1;
    }
};

/// Buckets of a [`LatencyHistogram`]: one per bound plus `+Inf`.
const N_LATENCY_BUCKETS: usize = LATENCY_BUCKETS_NS.len() + 1;

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
    fn(&ShardHistograms) -> &LatencyHistogram,
);

/// A fixed-bucket latency histogram ([`LATENCY_BUCKETS_NS`]), exact in count and sum.
///
/// Recording is a binary search over 22 bounds and two additions; copying it is 24 words, so a
/// shard publishes it under the slot lock without allocating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Samples per bucket (not cumulative); the last one is above every bound.
    counts: [u64; N_LATENCY_BUCKETS],
    /// Sum of every sample, nanoseconds (saturating; 584 years of latency before it would).
    sum_ns: u64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&mut self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_NS.partition_point(|&bound| bound < ns);
        self.counts[bucket] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the samples, nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// Cumulative counts: entry `i` is the number of samples at or below
    /// `LATENCY_BUCKETS_NS[i]`; the last entry (`+Inf`) is [`LatencyHistogram::count`].
    pub fn cumulative(&self) -> [u64; N_LATENCY_BUCKETS] {
        let mut running = 0;
        self.counts.map(|n| {
            running += n;
            running
        })
    }
}

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
    /// Bytes of echoes in the rooms' replay windows (gauge, set on the shard's tick).
    pub replay_window_bytes: u64,
}

/// The latency histograms of one shard (the `_us` suffixes are historical: the histograms hold
/// durations, exported in seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardHistograms {
    /// One event-loop turn, from wake-up to the end of the flush.
    pub turn_us: LatencyHistogram,
    /// Validating and integrating one op message into the CRDT.
    pub integrate_us: LatencyHistogram,
    /// One group-commit sync of the storage (appends and sync, on the storage worker
    /// thread, carrying every turn queued since the previous one).
    pub fsync_us: LatencyHistogram,
    /// Queuing one echo for every client of its document.
    pub fanout_us: LatencyHistogram,
}

/// What a shard last published.
#[derive(Clone, Debug, Default)]
pub struct ShardFigures {
    /// Counters and gauges.
    pub counters: ShardCounters,
    /// Latency histograms since start.
    pub histograms: ShardHistograms,
}

/// Writes the Prometheus text exposition format: one `# HELP` and `# TYPE` per family, then
/// its samples, label values escaped.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: `kind` is `counter`, `gauge` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// The `_bucket`, `_sum` and `_count` lines of one histogram series (after a
    /// `histogram` [`Exposition::family`] line for `name`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &LatencyHistogram) {
        let cumulative = h.cumulative();
        let mut le = String::new();
        for (idx, count) in cumulative.iter().enumerate() {
            le.clear();
            match LATENCY_BUCKETS_NS.get(idx) {
                Some(&bound_ns) => write_seconds(&mut le, bound_ns),
                None => le.push_str("+Inf"),
            }
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {count}");
        }
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        self.out.push(' ');
        write_seconds(&mut self.out, h.sum_ns());
        self.out.push('\n');
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", h.count());
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        let le = le.map(|le| ("le", le));
        let mut all = labels.iter().copied().chain(le).peekable();
        if all.peek().is_none() {
            return;
        }
        self.out.push('{');
        for (idx, (key, value)) in all.enumerate() {
            if idx > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{key}=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }
}

/// Writes `ns` nanoseconds as exact decimal seconds (`0.0000025`, `1`, `12.5`).
fn write_seconds(out: &mut String, ns: u64) {
    let (whole, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    let _ = write!(out, "{whole}");
    if frac != 0 {
        let digits = format!("{frac:09}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
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

    fn render(&self, out: &mut Exposition) {
        let name = "collab_door_refusals_total";
        out.family(
            name,
            "counter",
            "Connections refused by the acceptor before the handshake, by reason.",
        );
        for refusal in DoorRefusal::ALL {
            out.sample(name, &[("reason", refusal.label())], self.refusals(refusal));
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
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
    }
}

/// The shared slots the shards publish into; cheap to clone (an `Arc`).
#[derive(Clone, Debug)]
pub struct MetricsRegistry {
    slots: Arc<[Mutex<ShardFigures>]>,
    door: Arc<DoorCounters>,
    /// The webhook delivery figures, set once at start when webhooks are configured.
    webhooks: Arc<std::sync::OnceLock<Arc<crate::webhooks::WebhookCounters>>>,
    /// Cluster mode: the node's router, for `/cluster` and the cluster's metrics (set once,
    /// right after the server started).
    cluster: Arc<std::sync::OnceLock<crate::cluster::ClusterRouter>>,
    /// The relay's counters (`cluster::relay`), written by the relay thread.
    relay: Arc<crate::cluster::relay::RelayCounters>,
}

impl MetricsRegistry {
    /// A registry with one empty slot per shard.
    pub fn new(n_shards: usize) -> MetricsRegistry {
        MetricsRegistry {
            slots: (0..n_shards)
                .map(|_| Mutex::new(ShardFigures::default()))
                .collect(),
            door: Arc::new(DoorCounters::default()),
            webhooks: Arc::new(std::sync::OnceLock::new()),
            cluster: Arc::new(std::sync::OnceLock::new()),
            relay: Arc::default(),
        }
    }

    /// Adds the webhook figures to the scrape (once; a second call is ignored).
    pub fn set_webhooks(&self, counters: Arc<crate::webhooks::WebhookCounters>) {
        let _ = self.webhooks.set(counters);
    }

    /// The door's counters, for the acceptor to write.
    pub fn door(&self) -> Arc<DoorCounters> {
        self.door.clone()
    }

    /// The relay's counters: what this node relays to owners (`/cluster`'s `relayed` is
    /// [`RelayCounters::active`](crate::cluster::relay::RelayCounters::active)).
    pub fn relay(&self) -> Arc<crate::cluster::relay::RelayCounters> {
        self.relay.clone()
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
            total.replay_window_bytes += c.replay_window_bytes;
        }
        total
    }

    /// Number of shards.
    pub fn n_shards(&self) -> usize {
        self.slots.len()
    }

    /// Makes `/cluster`, `/cluster/owner` and the cluster's metrics answer from `router`
    /// (once; later calls are ignored).
    pub fn attach_cluster(&self, router: crate::cluster::ClusterRouter) {
        let _ = self.cluster.set(router);
    }

    /// The cluster's router, in cluster mode.
    pub fn cluster(&self) -> Option<&crate::cluster::ClusterRouter> {
        self.cluster.get()
    }

    /// Renders every figure in the Prometheus text exposition format (version 0.0.4): the
    /// shards' counters and histograms (label `shard`), the door's counters, the process's
    /// figures from `/proc/self` (absent where `/proc` is not) `collab_build_info`, and
    /// the cluster's counters in cluster mode.
    pub fn render_prometheus(&self) -> String {
        let shards: Vec<ShardFigures> = self.slots.iter().map(|slot| slot.lock().clone()).collect();
        let shard_labels: Vec<String> = (0..shards.len()).map(|idx| idx.to_string()).collect();
        let mut out = Exposition {
            out: String::with_capacity(16 * 1024),
        };
        let counters: [CounterRow; 12] = [
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
            (
                "collab_replay_window_bytes",
                "gauge",
                "Bytes of echoes kept in memory for replay (--replay-window-shard-bytes).",
                |c| c.replay_window_bytes,
            ),
        ];
        for (name, kind, help, get) in counters {
            out.family(name, kind, help);
            for (figures, shard) in shards.iter().zip(&shard_labels) {
                out.sample(name, &[("shard", shard)], get(&figures.counters));
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
            out.family(name, "histogram", help);
            for (figures, shard) in shards.iter().zip(&shard_labels) {
                out.histogram(name, &[("shard", shard)], get(&figures.histograms));
            }
        }
        self.door.render(&mut out);
        if let Some(webhooks) = self.webhooks.get() {
            webhooks.render(&mut out);
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.render_prometheus(&mut out.out);
        }
        self.relay.render(&mut out);
        if let Some(process) = ProcessFigures::read() {
            process.render(&mut out);
        }
        render_build_info(&mut out);
        out.finish()
    }
}

/// The server process's own figures, read from `/proc/self` at scrape time.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    /// Open descriptors; `None` when `/proc/self/fd` cannot be listed.
    open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`; `None` when unlimited or unknown.
    max_fds: Option<u64>,
}

impl ProcessFigures {
    fn read() -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = if page > 0 { page as u64 } else { 4096 };
        let mut figures = parse_proc_stat(&stat, &boot, ticks, page)?;
        figures.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a local struct; the result is checked.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        figures.max_fds = (got && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur);
        Some(figures)
    }

    fn render(&self, out: &mut Exposition) {
        let rows: [(&str, &str, &str, Option<f64>); 6] = [
            (
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, seconds.",
                Some(self.cpu_seconds),
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size, bytes.",
                Some(self.resident_bytes as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size, bytes.",
                Some(self.virtual_bytes as f64),
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, seconds.",
                Some(self.start_time_seconds),
            ),
            (
                "process_open_fds",
                "gauge",
                "Open file descriptors.",
                self.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "gauge",
                "Limit on open file descriptors (soft RLIMIT_NOFILE).",
                self.max_fds.map(|n| n as f64),
            ),
        ];
        for (name, kind, help, value) in rows {
            if let Some(value) = value {
                out.family(name, kind, help);
                out.sample(name, &[], value);
            }
        }
    }
}

/// Parses `/proc/self/stat` (CPU ticks, start ticks since boot, sizes) and `/proc/stat`
/// (`btime`, the boot time).
fn parse_proc_stat(stat: &str, boot: &str, ticks: f64, page_bytes: u64) -> Option<ProcessFigures> {
    // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let boot_seconds: u64 = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessFigures {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_seconds as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_bytes),
        open_fds: None,
        max_fds: None,
    })
}

/// `collab_build_info`: the crate version, the git commit it was built from (`build.rs`;
/// `unknown` without a git checkout) and the compiler.
fn render_build_info(out: &mut Exposition) {
    let name = "collab_build_info";
    out.family(
        name,
        "gauge",
        "Always 1; the labels say which build is running.",
    );
    out.sample(
        name,
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("git_commit", env!("COLLAB_GIT_COMMIT")),
            ("rustc", env!("COLLAB_RUSTC_VERSION")),
        ],
        1,
    );
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

    /// Records a duration into one of the histograms.
    pub fn record(histogram: &mut LatencyHistogram, elapsed: Duration) {
        histogram.record(elapsed);
    }

    /// Copies the figures into the registry if [`PUBLISH_INTERVAL`] has passed since the last
    /// time (or always, with `force`). Called once per loop turn; the copy is a few hundred
    /// bytes and allocates nothing.
    pub fn maybe_publish(&mut self, now: Instant, force: bool) {
        if !force && now.duration_since(self.published_at) < PUBLISH_INTERVAL {
            return;
        }
        self.published_at = now;
        let mut slot = self.registry.slots[self.shard_idx].lock();
        slot.counters.clone_from(&self.figures.counters);
        slot.histograms = self.figures.histograms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let mut h = LatencyHistogram::default();
        for ns in [
            0,
            1_000,
            1_001,
            2_500,
            9_999_999_999,
            10_000_000_000,
            10_000_000_001,
        ] {
            h.record(Duration::from_nanos(ns));
        }
        h.record(Duration::MAX);
        let cumulative = h.cumulative();
        assert_eq!(cumulative[0], 2, "0 and 1 µs are at or below 1 µs");
        assert_eq!(cumulative[1], 4, "1.001 and 2.5 µs are at or below 2.5 µs");
        assert_eq!(
            cumulative[LATENCY_BUCKETS_NS.len() - 1],
            6,
            "10 s is inclusive"
        );
        assert_eq!(cumulative[LATENCY_BUCKETS_NS.len()], 8, "+Inf holds all");
        assert_eq!(h.count(), 8);
        assert_eq!(h.sum_ns(), u64::MAX, "a saturated sum stays saturated");
    }

    #[test]
    fn seconds_are_written_exactly() {
        for (ns, text) in [
            (0, "0"),
            (1_000, "0.000001"),
            (2_500, "0.0000025"),
            (1_000_000_000, "1"),
            (12_500_000_000, "12.5"),
            (1, "0.000000001"),
        ] {
            let mut out = String::new();
            write_seconds(&mut out, ns);
            assert_eq!(out, text, "{ns} ns");
        }
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = Exposition::default();
        out.family("x", "gauge", "a \\ b\nc");
        out.sample("x", &[("k", "q\"\\\n")], 1);
        assert_eq!(
            out.finish(),
            "# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{k=\"q\\\"\\\\\\n\"} 1\n"
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
        for line in [
            "collab_ops_accepted_total{shard=\"1\"} 7",
            "collab_connections{shard=\"1\"} 3",
            "# TYPE collab_fsync_seconds histogram",
            "collab_fsync_seconds_bucket{shard=\"1\",le=\"0.001\"} 0",
            "collab_fsync_seconds_bucket{shard=\"1\",le=\"0.0025\"} 1",
            "collab_fsync_seconds_bucket{shard=\"1\",le=\"+Inf\"} 1",
            "collab_fsync_seconds_sum{shard=\"1\"} 0.0015",
            "collab_fsync_seconds_count{shard=\"1\"} 1",
            "collab_fsync_seconds_count{shard=\"0\"} 0",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE collab_build_info gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("shard=\"all\""), "{text}");
        assert!(!text.contains("quantile"), "{text}");
    }

    #[test]
    fn publishing_replaces_never_adds() {
        let registry = MetricsRegistry::new(1);
        let mut shard = registry.shard(0);
        ShardMetrics::record(
            &mut shard.figures.histograms.turn_us,
            Duration::from_micros(3),
        );
        shard.maybe_publish(Instant::now(), true);
        shard.maybe_publish(Instant::now(), true);
        assert_eq!(registry.slots[0].lock().histograms.turn_us.count(), 1);
    }

    #[test]
    fn parses_proc_stat() {
        let stat = "1234 (odd (name) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 500 8192 3";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let figures = parse_proc_stat(stat, boot, 100.0, 4096).expect("parses");
        assert!((figures.cpu_seconds - 3.0).abs() < 1e-9, "{figures:?}");
        assert!((figures.start_time_seconds - 1_700_000_005.0).abs() < 1e-6);
        assert_eq!(
            (figures.virtual_bytes, figures.resident_bytes),
            (8192, 3 * 4096)
        );
        assert_eq!(parse_proc_stat("garbage", boot, 100.0, 4096), None);
        assert_eq!(parse_proc_stat(stat, "cpu 1\n", 100.0, 4096), None);
        let me = ProcessFigures::read().expect("/proc/self is readable on Linux");
        assert!(
            me.resident_bytes > 0 && me.open_fds.is_some_and(|n| n > 0),
            "{me:?}"
        );
    }
}
