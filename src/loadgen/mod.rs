//! The load generator behind `collab-load`: thousands of real WebSocket clients on a few mio
//! event loops, each a CRDT replica that really edits and really integrates, measured end to end.
//!
//! Codemap:
//! - [`config`]: the command line (`LoadConfig`).
//! - [`run`] (here): the coordinator: spawns workers, moves them through the phases
//!   (preload, join, edit with warm-up then the measured window, drain, finish), samples `/proc`.
//! - [`worker`]: one thread's event loop, its rooms and clients, the latency bookkeeping.
//! - [`net`]: one client's socket and WebSocket; [`session`]: its protocol state and replica.
//! - [`arrival`]: edit spacing and the seeded RNG; [`stats`]: histograms and counters;
//!   [`report`]: JSON, text, `.hgrm`, SVG; [`procfs`]: CPU and RSS of a process.
//!
//! It only ever talks to the server named by `--url`; it never changes the server.

pub mod arrival;
pub mod config;
pub mod net;
pub mod procfs;
pub mod prom;
pub mod report;
pub mod session;
pub mod stats;
pub mod worker;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::LoadConfig;
use report::{ProcessFigures, Summary};
use stats::{Convergence, Counters, LatencyHistograms};
use worker::{Phase, Shared, Worker, WAKER_TOKEN};

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Flags that do not fit together.
    #[error("invalid arguments: {0}")]
    Config(String),
    /// The `--preload` trace could not be read.
    #[error("cannot read preload trace {path}: {reason}")]
    Preload {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Creating a poll or thread failed.
    #[error("cannot start workers: {0}")]
    Spawn(std::io::Error),
    /// A worker thread panicked (a bug).
    #[error("a worker thread panicked")]
    WorkerPanicked,
}

/// What a run produced: the summary plus the merged histograms (for `.hgrm` and the plot).
#[derive(Debug)]
pub struct RunOutput {
    /// Figures and verdicts.
    pub summary: Summary,
    /// Merged histograms of every worker.
    pub histograms: LatencyHistograms,
    /// The server's `GET /metrics` text at the end of the run (`None` if it did not answer).
    pub server_metrics: Option<String>,
}

/// Reads a trace (`.json.gz` or `.json`) and returns its `endContent`.
///
/// # Errors
/// The file is missing, not gzip (when named `.gz`) or has no string `endContent`.
pub fn read_trace_final_text(path: &Path) -> Result<String, LoadError> {
    crate::trace::EditingTrace::read_end_content(path).map_err(|e| LoadError::Preload {
        path: e.path.display().to_string(),
        reason: e.reason,
    })
}

/// Raises this process's open-file soft limit to its hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct; results checked.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// Fetches `GET /metrics` from the server (plain HTTP/1.1 on the `--url` address), best effort.
pub fn scrape_metrics(addr: std::net::SocketAddr) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

fn workload(config: &LoadConfig) -> BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    let mut w = BTreeMap::new();
    w.insert("url".into(), json!(config.url));
    w.insert("rooms".into(), json!(config.rooms));
    w.insert("clients_per_room".into(), json!(config.clients_per_room));
    w.insert("writers_per_room".into(), json!(config.writers()));
    w.insert(
        "edit_interval_ms".into(),
        json!(config.edit_interval.as_secs_f64() * 1e3),
    );
    w.insert("arrivals".into(), json!(config.arrivals));
    w.insert("edit_size".into(), json!(config.edit_size));
    w.insert("delete_percent".into(), json!(config.delete_percent));
    w.insert("warmup_s".into(), json!(config.warmup.as_secs_f64()));
    w.insert("duration_s".into(), json!(config.duration.as_secs_f64()));
    w.insert(
        "preload".into(),
        json!(config.preload.as_ref().map(|p| p.display().to_string())),
    );
    w.insert("threads".into(), json!(config.thread_count()));
    w.insert(
        "bind".into(),
        json!(config
            .bind
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()),
    );
    w
}

/// Slots per writer in the send log: twice the edits the run can send, plus slack for Poisson bursts.
fn slots_per_writer(config: &LoadConfig) -> usize {
    let editing = config.warmup + config.duration + Duration::from_secs(1);
    let expected = editing.as_secs_f64() / config.edit_interval.as_secs_f64();
    (2.0 * expected) as usize + 64
}

fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
    }
}

/// Runs the workload of `config` to the end and returns its figures.
///
/// # Errors
/// Bad flags, an unreadable preload trace, or workers that could not start.
pub fn run(config: LoadConfig) -> Result<RunOutput, LoadError> {
    config.validate().map_err(LoadError::Config)?;
    config.client_tokens().map_err(LoadError::Config)?;
    let target = config.target().map_err(LoadError::Config)?;
    let preload_text: Option<Arc<str>> = match &config.preload {
        Some(path) => Some(Arc::from(read_trace_final_text(path)?)),
        None => None,
    };
    let n_threads = config.thread_count();
    let config = Arc::new(config);
    let n_writers = config.rooms * config.writers();
    let shared = Arc::new(Shared::new(
        config.rooms,
        n_writers,
        slots_per_writer(&config),
    ));
    // Only with --server-pid: `procfs::sample(None)` reads this process, which is not the server.
    let sample_server = || config.server_pid.and_then(|pid| procfs::sample(Some(pid)));
    let server_start = sample_server();
    let generator_start = procfs::sample(None);

    let mut wakers = Vec::new();
    let mut handles = Vec::new();
    for idx in 0..n_threads {
        let poll = mio::Poll::new().map_err(LoadError::Spawn)?;
        let waker = mio::Waker::new(poll.registry(), WAKER_TOKEN).map_err(LoadError::Spawn)?;
        wakers.push(waker);
        let worker = Worker::new(
            idx,
            n_threads,
            poll,
            config.clone(),
            target.clone(),
            shared.clone(),
            preload_text.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("load-{idx}"))
            .spawn(move || worker.run())
            .map_err(LoadError::Spawn)?;
        handles.push(handle);
    }
    let set_phase = |phase: Phase| {
        shared.set_phase(phase);
        for waker in &wakers {
            let _ = waker.wake();
        }
    };
    let settled = |target: u64| {
        shared.joined.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) >= target
    };

    if preload_text.is_some() {
        set_phase(Phase::Preload);
        let rooms = config.rooms as u64;
        wait_until(Instant::now() + config.join_timeout, || {
            shared.preloaded.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
                >= rooms
        });
    }
    let server_join_start = sample_server();
    let join_start = Instant::now();
    set_phase(Phase::Join);
    let total = config.total_clients() as u64;
    wait_until(join_start + config.join_timeout, || settled(total));
    let join_all = join_start.elapsed();
    let server_join_end = sample_server();

    let window_start = Instant::now() + config.warmup;
    let window_end = window_start + config.duration;
    shared.set_window(window_start, window_end);
    set_phase(Phase::Edit);
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    let host_load_1m = procfs::load_average_1m();
    let server_window_start = sample_server();
    let generator_window_start = procfs::sample(None);
    std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    let server_window_end = sample_server();
    let generator_window_end = procfs::sample(None);

    set_phase(Phase::Drain);
    wait_until(Instant::now() + config.drain_timeout, || {
        shared.outstanding.load(Ordering::Acquire) <= 0
    });
    set_phase(Phase::Finish);

    let mut histograms = LatencyHistograms::default();
    let mut counters = Counters::default();
    let mut parts = Vec::new();
    for handle in handles {
        let result = handle.join().map_err(|_| LoadError::WorkerPanicked)?;
        histograms.merge(&result.histograms);
        counters.merge(&result.counters);
        parts.extend(result.rooms);
    }
    counters.edits_undelivered = shared.send_log.undelivered();
    let convergence = if config.no_check {
        Convergence::default()
    } else {
        worker::convergence(
            &parts,
            config.rooms,
            shared.outstanding.load(Ordering::Acquire),
        )
    };

    let measured_seconds = config.duration.as_secs_f64();
    let conns_open = counters
        .conns_joined
        .saturating_sub(counters.conns_lost)
        .max(1) as f64;
    let figures = |start: Option<procfs::ProcSample>,
                   window_start: Option<procfs::ProcSample>,
                   window_end: Option<procfs::ProcSample>| {
        let (start, window_start, window_end) = (start?, window_start?, window_end?);
        let cpu_seconds = window_end.cpu_seconds - window_start.cpu_seconds;
        Some(ProcessFigures {
            cpu_seconds,
            cores_busy: cpu_seconds / measured_seconds,
            rss_bytes_start: start.rss_bytes,
            rss_bytes_end: window_end.rss_bytes,
            rss_bytes_per_conn: (window_end.rss_bytes as f64 - start.rss_bytes as f64) / conns_open,
            run_queue_wait_seconds: window_end.run_queue_wait_seconds
                - window_start.run_queue_wait_seconds,
        })
    };
    let server = figures(server_start, server_window_start, server_window_end);
    let server_cpu_us_per_delivery = server
        .as_ref()
        .filter(|_| counters.echoes_received > 0)
        .map(|s| s.cpu_seconds * 1e6 / counters.echoes_received as f64);
    let generator = figures(
        generator_start,
        generator_window_start,
        generator_window_end,
    )
    .unwrap_or_default();
    let mut summary = Summary {
        label: config.label.clone(),
        workload: workload(&config),
        conns_target: total,
        join_all_ms: join_all.as_secs_f64() * 1e3,
        join_server_cpu_seconds: match (server_join_start, server_join_end) {
            (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
            _ => None,
        },
        measured_seconds,
        offered_edits_per_s: counters.edits_sent as f64 / measured_seconds,
        delivered_messages_per_s: counters.echoes_received as f64 / measured_seconds,
        counters,
        latency_ms: BTreeMap::new(),
        server_latency_ms: BTreeMap::new(),
        convergence,
        server,
        server_cpu_us_per_delivery,
        generator,
        host_load_1m,
    };
    summary.set_latencies(&histograms);
    let server_metrics = scrape_metrics(target.addr);
    if let Some(text) = &server_metrics {
        match prom::parse(text) {
            Ok(families) => summary.set_server_latencies(&families),
            Err(e) => log::warn!("the server's /metrics is not a valid exposition: {e}"),
        }
    }
    Ok(RunOutput {
        summary,
        histograms,
        server_metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_reads_end_content_of_plain_and_gzip_traces() {
        let dir = std::env::temp_dir().join(format!("collab-load-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let json = r#"{"startContent":"","endContent":"héllo","txns":[{"time":"t","patches":[[0,0,"héllo"]]}]}"#;
        let plain = dir.join("t.json");
        std::fs::write(&plain, json).expect("write");
        assert_eq!(read_trace_final_text(&plain).expect("plain trace"), "héllo");
        let gz = dir.join("t.json.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(json.as_bytes()).expect("gzip");
        std::fs::write(&gz, encoder.finish().expect("gzip")).expect("write");
        assert_eq!(read_trace_final_text(&gz).expect("gz trace"), "héllo");
        assert!(read_trace_final_text(&dir.join("missing.json")).is_err());
        std::fs::write(&plain, "{}").expect("write");
        assert!(read_trace_final_text(&plain).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
