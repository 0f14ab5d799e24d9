//! Reports of a run: the JSON summary, a text table, `.hgrm` percentile distributions and an
//! SVG latency-by-percentile plot.
//!
//! Owns formatting only; the numbers come from `stats` and `procfs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::prom;
use super::stats::{Convergence, Counters, LatencyHistograms};

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Percentiles of a microsecond histogram, converted to milliseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e3,
        }
    }
}

/// Percentiles of one of the server's Prometheus histograms, interpolated within its buckets as
/// PromQL's `histogram_quantile` does (so only as fine as the buckets), in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ServerPercentiles {
    /// Samples (the `+Inf` bucket).
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean (`_sum` / `_count`).
    pub mean: f64,
}

/// CPU and memory of a process over the measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessFigures {
    /// CPU seconds (user + system) spent during the measured window.
    pub cpu_seconds: f64,
    /// `cpu_seconds` over the window length: 1.0 is one core busy.
    pub cores_busy: f64,
    /// RSS before any client connected, bytes.
    pub rss_bytes_start: u64,
    /// RSS at the end of the measured window, bytes.
    pub rss_bytes_end: u64,
    /// `(rss_bytes_end - rss_bytes_start) / connections open`, bytes.
    pub rss_bytes_per_conn: f64,
    /// Seconds its threads waited on a run queue during the window (CPU contention).
    pub run_queue_wait_seconds: f64,
}

/// What `collab-load` reports (written as `summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The run's `--label`.
    pub label: String,
    /// The workload, as given.
    pub workload: BTreeMap<String, serde_json::Value>,
    /// Connections the workload asked for.
    pub conns_target: u64,
    /// Counters summed over threads.
    pub counters: Counters,
    /// From the start of the join phase until every client joined (or failed), ms.
    pub join_all_ms: f64,
    /// Server CPU seconds spent during the join phase (with `--server-pid`).
    pub join_server_cpu_seconds: Option<f64>,
    /// Length of the measured window, seconds.
    pub measured_seconds: f64,
    /// Edits sent per second during the window.
    pub offered_edits_per_s: f64,
    /// `op_echo` messages integrated per second by all clients together during the window.
    pub delivered_messages_per_s: f64,
    /// Latency percentiles by histogram name, ms.
    pub latency_ms: BTreeMap<String, Percentiles>,
    /// The server's own latency histograms from its `GET /metrics` at the end of the run
    /// (buckets summed over shards; since the server started, so warm-up and joins included),
    /// by family name, ms.
    pub server_latency_ms: BTreeMap<String, ServerPercentiles>,
    /// End-of-run convergence check.
    pub convergence: Convergence,
    /// The server (with `--server-pid`).
    pub server: Option<ProcessFigures>,
    /// Server CPU time over the measured window divided by the `op_echo` messages the clients
    /// integrated in it, microseconds (with `--server-pid` and at least one delivery): what one
    /// delivery costs the server, whatever the offered load.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The generator itself.
    pub generator: ProcessFigures,
    /// The host's 1-minute load average when the measured window started (other work on a
    /// shared machine shows here).
    pub host_load_1m: Option<f64>,
}

impl Summary {
    /// Fills the latency table from `histograms`.
    pub fn set_latencies(&mut self, histograms: &LatencyHistograms) {
        self.latency_ms = histograms
            .named()
            .iter()
            .map(|(name, h)| ((*name).to_owned(), Percentiles::of(h)))
            .collect();
    }

    /// Fills [`Summary::server_latency_ms`] from a parsed `/metrics`: every histogram family
    /// named `*_seconds`.
    pub fn set_server_latencies(&mut self, families: &[prom::Family]) {
        self.server_latency_ms = families
            .iter()
            .filter(|f| f.kind == prom::Kind::Histogram && f.name.ends_with("_seconds"))
            .map(|f| {
                let total = |suffix: &str| -> f64 {
                    f.samples
                        .iter()
                        .filter(|s| s.name.strip_suffix(suffix) == Some(f.name.as_str()))
                        .map(|s| s.value)
                        .sum()
                };
                let (count, sum) = (total("_count"), total("_sum"));
                let ms =
                    |q: f64| prom::histogram_quantile(families, &f.name, q).unwrap_or(0.0) * 1e3;
                let figures = ServerPercentiles {
                    count: count as u64,
                    p50: ms(0.5),
                    p99: ms(0.99),
                    mean: if count > 0.0 { sum / count * 1e3 } else { 0.0 },
                };
                (f.name.clone(), figures)
            })
            .collect();
    }

    /// Whether every room converged and no joined client was lost.
    pub fn is_clean(&self) -> bool {
        self.convergence.rooms_converged == self.convergence.rooms_checked
            && self.counters.conns_lost == 0
            && self.counters.conns_failed == 0
    }

    /// The header of the table [`Summary::markdown_row`] fills.
    pub fn markdown_header() -> &'static str {
        "| scenario | conns joined/failed/lost | edits/s offered | msgs/s delivered | delivery p50 / p99 / p99.9 / max (ms) | echo p99 (ms) | join all (ms) | server CPU cores / run-queue wait | server CPU µs/delivery | server RSS/conn | host load | converged |\n\
         |---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    }

    /// One row of the scenario table in docs/benchmarks.md.
    pub fn markdown_row(&self) -> String {
        let c = &self.counters;
        let d = self.latency_ms.get("delivery").cloned().unwrap_or_default();
        let e = self.latency_ms.get("echo").cloned().unwrap_or_default();
        let (cpu, rss) = match &self.server {
            Some(s) => (
                format!("{:.2} / {:.1} s", s.cores_busy, s.run_queue_wait_seconds),
                format!("{:.0} B", s.rss_bytes_per_conn),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let latency = if d.count == 0 {
            "-".to_owned()
        } else {
            format!("{:.2} / {:.2} / {:.2} / {:.2}", d.p50, d.p99, d.p999, d.max)
        };
        let echo = if e.count == 0 {
            "-".to_owned()
        } else {
            format!("{:.2}", e.p99)
        };
        format!(
            "| {} | {}/{}/{} | {:.0} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {} | {}/{}{} |",
            self.label,
            c.conns_joined,
            c.conns_failed,
            c.conns_lost,
            self.offered_edits_per_s,
            self.delivered_messages_per_s,
            latency,
            echo,
            self.join_all_ms,
            cpu,
            self.server_cpu_us_per_delivery
                .map_or("-".to_owned(), |us| format!("{us:.2}")),
            rss,
            self.host_load_1m
                .map_or("-".to_owned(), |l| format!("{l:.1}")),
            self.convergence.rooms_converged,
            self.convergence.rooms_checked,
            if c.edits_undelivered > 0 {
                format!(", {} undelivered", c.edits_undelivered)
            } else {
                String::new()
            }
        )
    }

    /// A human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.counters;
        let _ = writeln!(out, "== collab-load: {}", self.label);
        let _ = writeln!(
            out,
            "connections: {} joined, {} failed, {} lost (of {}); all joined in {:.1} ms{}",
            c.conns_joined,
            c.conns_failed,
            c.conns_lost,
            self.conns_target,
            self.join_all_ms,
            self.join_server_cpu_seconds
                .map_or(String::new(), |s| format!(" ({s:.2} server CPU s)"))
        );
        let _ = writeln!(
            out,
            "window {:.1} s: {} edits sent ({:.0}/s offered), {} echoes integrated ({:.0}/s delivered), {} unchanged, {} refused, {} undelivered",
            self.measured_seconds,
            c.edits_sent,
            self.offered_edits_per_s,
            c.echoes_received,
            self.delivered_messages_per_s,
            c.edits_unchanged,
            c.edits_refused,
            c.edits_undelivered
        );
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, p) in &self.latency_ms {
            let _ = writeln!(
                out,
                "{:<14} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        for (name, p) in &self.server_latency_ms {
            let _ = writeln!(
                out,
                "server {name} (ms, whole run, from buckets): {} samples, p50 {:.3}, p99 {:.3}, mean {:.3}",
                p.count, p.p50, p.p99, p.mean
            );
        }
        if !c.errors.is_empty() {
            let _ = writeln!(out, "errors: {:?}", c.errors);
        }
        if let Some(load) = self.host_load_1m {
            let _ = writeln!(out, "host load average (1 min) at window start: {load:.2}");
        }
        let _ = writeln!(
            out,
            "convergence: {}/{} rooms converged (longest document {} chars){}",
            self.convergence.rooms_converged,
            self.convergence.rooms_checked,
            self.convergence.doc_chars_max,
            if self.convergence.failures.is_empty() {
                String::new()
            } else {
                format!(" {:?}", self.convergence.failures)
            }
        );
        for (who, figures) in [
            ("server", self.server.as_ref()),
            ("generator", Some(&self.generator)),
        ] {
            if let Some(f) = figures {
                let _ = writeln!(
                    out,
                    "{who}: {:.2} CPU s ({:.2} cores), {:.2} s waiting for a CPU, RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes/conn",
                    f.cpu_seconds,
                    f.cores_busy,
                    f.run_queue_wait_seconds,
                    f.rss_bytes_start as f64 / 1048576.0,
                    f.rss_bytes_end as f64 / 1048576.0,
                    f.rss_bytes_per_conn
                );
            }
        }
        if let Some(us) = self.server_cpu_us_per_delivery {
            let _ = writeln!(out, "server CPU per delivery: {us:.2} µs");
        }
        out
    }

    /// Writes `summary.json`, one `.hgrm` per non-empty histogram and `latency.svg` into `dir`.
    ///
    /// # Errors
    /// The folder or a file cannot be written.
    pub fn write_files(&self, dir: &Path, histograms: &LatencyHistograms) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        std::fs::write(dir.join("summary.json"), json + "\n")?;
        std::fs::write(dir.join("row.md"), self.markdown_row() + "\n")?;
        for (name, h) in histograms.named() {
            if !h.is_empty() {
                std::fs::write(dir.join(format!("{name}.hgrm")), hgrm(h))?;
            }
        }
        let curves: Vec<(&str, &Histogram<u64>)> = histograms
            .named()
            .into_iter()
            .filter(|(name, h)| {
                !h.is_empty() && matches!(*name, "delivery" | "delivery_all" | "echo")
            })
            .collect();
        let title = format!("collab-load {}: latency by percentile", self.label);
        std::fs::write(dir.join("latency.svg"), svg_plot(&title, &curves))?;
        Ok(())
    }
}

/// The percentile distribution of a microsecond histogram in HdrHistogram's `.hgrm` text format
/// (values in milliseconds), readable by the HdrHistogram plotter.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total: u64 = 0;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let value_ms = v.value_iterated_to() as f64 / 1e3;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value_ms:>12.3} {q:>14.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value_ms:>12.3} {q:>14.12} {total:>10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1e3,
        h.stdev() / 1e3
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1e3,
        h.len()
    );
    // Sub-buckets per bucket: the power of two that holds 2 * 10^sigfig distinct values.
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

/// Hand-written SVG: latency (ms, linear) against percentile on a log scale of `1/(1-p)`,
/// from 0 to 99.999, one polyline per histogram. A few dozen lines instead of a plotting crate.
pub fn svg_plot(title: &str, curves: &[(&str, &Histogram<u64>)]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 450.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    const DECADES: f64 = 5.0; // 1/(1-p) up to 10^5, p = 99.999%
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let y_max_ms = curves
        .iter()
        .map(|(_, h)| h.max() as f64 / 1e3)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let y_top = nice_ceiling(y_max_ms);
    let x_of = |q: f64| {
        LEFT + (W - LEFT - RIGHT) * ((1.0 / (1.0 - q).max(1e-5)).log10().min(DECADES) / DECADES)
    };
    let y_of = |ms: f64| H - BOTTOM - (H - TOP - BOTTOM) * (ms / y_top);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = LEFT + (W - LEFT - RIGHT) * (i as f64 / DECADES);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##,
            H - BOTTOM
        );
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=5 {
        let ms = y_top * f64::from(i) / 5.0;
        let y = y_of(ms);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##,
            W - RIGHT
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            trim_float(ms)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">latency (ms)</text>"#,
        H / 2.0,
        H / 2.0
    );
    for (i, (name, h)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut points = String::new();
        for v in h.iter_quantiles(5) {
            let _ = write!(
                points,
                "{:.1},{:.1} ",
                x_of(v.quantile_iterated_to()),
                y_of(v.value_iterated_to() as f64 / 1e3)
            );
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.trim_end()
        );
        let y = TOP + 16.0 * i as f64 + 8.0;
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"/>"#,
            LEFT + 10.0,
            LEFT + 30.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{}</text>"#,
            LEFT + 36.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `x`.
fn nice_ceiling(x: f64) -> f64 {
    let power = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * power)
}

fn trim_float(x: f64) -> String {
    let text = format!("{x:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::stats::{new_histogram, record};
    use std::time::Duration;

    fn sample_histogram() -> Histogram<u64> {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us * 10));
        }
        h
    }

    #[test]
    fn percentiles_are_in_ms() {
        let p = Percentiles::of(&sample_histogram());
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn hgrm_has_header_rows_and_footer() {
        let text = hgrm(&sample_histogram());
        assert!(
            text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"),
            "{text}"
        );
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
        let last_row = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.is_empty())
            .expect("rows");
        assert!(last_row.contains("1.000000000000       1000"), "{last_row}");
    }

    #[test]
    fn table_row_matches_header() {
        let summary = Summary {
            label: "s".into(),
            workload: BTreeMap::new(),
            conns_target: 2,
            counters: Counters::default(),
            join_all_ms: 1.0,
            join_server_cpu_seconds: None,
            measured_seconds: 1.0,
            offered_edits_per_s: 0.0,
            delivered_messages_per_s: 0.0,
            latency_ms: BTreeMap::new(),
            server_latency_ms: BTreeMap::new(),
            convergence: Convergence::default(),
            server: None,
            server_cpu_us_per_delivery: Some(2.5),
            generator: ProcessFigures::default(),
            host_load_1m: Some(0.5),
        };
        let columns = |line: &str| line.matches('|').count();
        let header = Summary::markdown_header();
        let row = summary.markdown_row();
        assert!(
            header.lines().all(|line| columns(line) == columns(&row)),
            "{header}\n{row}"
        );
        assert!(row.contains("| 2.50 |"), "{row}");
        let text = summary.to_text();
        assert!(text.contains("host load average (1 min) at window start: 0.50"));
        assert!(text.contains("server CPU per delivery: 2.50 µs"), "{text}");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let h = sample_histogram();
        let svg = svg_plot("t <1>", &[("delivery", &h), ("echo", &h)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(0.21), 0.25);
    }
}
