//! What one generator thread measured: latency histograms (HDR, microseconds) and counters,
//! merged across threads at the end of a run.
//!
//! Owns recording and merging; never reads a socket or writes a file.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency recorded, in microseconds (two minutes); larger values saturate.
pub const LATENCY_US_MAX: u64 = 120_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Records `elapsed` into `histogram` (at least 1 us, saturating).
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let us = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, LATENCY_US_MAX);
    histogram.saturating_record(us);
}

/// The histograms of a run.
#[derive(Clone, Debug)]
pub struct LatencyHistograms {
    /// Op sent by a writer -> integrated by one other client of the room (one sample per receiver).
    pub delivery_us: Histogram<u64>,
    /// Op sent -> integrated by every other client of the room (one sample per op).
    pub delivery_all_us: Histogram<u64>,
    /// Op sent -> its own `op_echo` integrated by the sender.
    pub echo_us: Histogram<u64>,
    /// TCP connect started -> `hello_ack` applied.
    pub join_us: Histogram<u64>,
    /// How late an edit left against its schedule (generator overload shows here).
    pub send_lag_us: Histogram<u64>,
}

impl Default for LatencyHistograms {
    fn default() -> Self {
        LatencyHistograms {
            delivery_us: new_histogram(),
            delivery_all_us: new_histogram(),
            echo_us: new_histogram(),
            join_us: new_histogram(),
            send_lag_us: new_histogram(),
        }
    }
}

impl LatencyHistograms {
    /// Adds `other`'s samples to these (same bounds, cannot fail).
    pub fn merge(&mut self, other: &LatencyHistograms) {
        let _ = self.delivery_us.add(&other.delivery_us);
        let _ = self.delivery_all_us.add(&other.delivery_all_us);
        let _ = self.echo_us.add(&other.echo_us);
        let _ = self.join_us.add(&other.join_us);
        let _ = self.send_lag_us.add(&other.send_lag_us);
    }

    /// Forgets the editing samples (end of warm-up); join times are kept.
    pub fn reset_editing(&mut self) {
        self.delivery_us.reset();
        self.delivery_all_us.reset();
        self.echo_us.reset();
        self.send_lag_us.reset();
    }

    /// Name and histogram pairs, for reports.
    pub fn named(&self) -> [(&'static str, &Histogram<u64>); 5] {
        [
            ("delivery", &self.delivery_us),
            ("delivery_all", &self.delivery_all_us),
            ("echo", &self.echo_us),
            ("join", &self.join_us),
            ("send_lag", &self.send_lag_us),
        ]
    }
}

/// Counters of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    /// Connections that reached `hello_ack`.
    pub conns_joined: u64,
    /// Connections that failed before joining.
    pub conns_failed: u64,
    /// Joined connections that ended before the run did.
    pub conns_lost: u64,
    /// Edits sent during the measured window.
    pub edits_sent: u64,
    /// `op_echo` messages integrated by any client during the measured window.
    pub echoes_received: u64,
    /// Edits the server answered with `ack` (changed nothing: a delete that raced another).
    pub edits_unchanged: u64,
    /// Edits the server refused with an `error`.
    pub edits_refused: u64,
    /// Edits sent during the measured window that some live client never integrated.
    pub edits_undelivered: u64,
    /// WebSocket payload bytes received during the measured window.
    pub bytes_received: u64,
    /// Errors by kind (connection failures, server errors, adapter errors).
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Counts one error of `kind`.
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_insert(0) += 1;
    }

    /// Adds `other` to these.
    pub fn merge(&mut self, other: &Counters) {
        self.conns_joined += other.conns_joined;
        self.conns_failed += other.conns_failed;
        self.conns_lost += other.conns_lost;
        self.edits_sent += other.edits_sent;
        self.echoes_received += other.echoes_received;
        self.edits_unchanged += other.edits_unchanged;
        self.edits_refused += other.edits_refused;
        self.edits_undelivered += other.edits_undelivered;
        self.bytes_received += other.bytes_received;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_insert(0) += n;
        }
    }
}

/// The end-of-run convergence verdict of some rooms.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Convergence {
    /// Rooms checked.
    pub rooms_checked: u64,
    /// Rooms whose live clients all hold the same text and head, having integrated every edit.
    pub rooms_converged: u64,
    /// A few failures, described.
    pub failures: Vec<String>,
    /// Longest final document (visible characters) of any room.
    pub doc_chars_max: u64,
}

impl Convergence {
    /// Adds `other` to this verdict.
    pub fn merge(&mut self, other: Convergence) {
        self.rooms_checked += other.rooms_checked;
        self.rooms_converged += other.rooms_converged;
        self.doc_chars_max = self.doc_chars_max.max(other.doc_chars_max);
        for failure in other.failures {
            if self.failures.len() < 10 {
                self.failures.push(failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_samples_and_counts() {
        let mut a = LatencyHistograms::default();
        let mut b = LatencyHistograms::default();
        record(&mut a.delivery_us, Duration::from_micros(100));
        record(&mut b.delivery_us, Duration::from_micros(300));
        record(&mut b.join_us, Duration::ZERO);
        a.merge(&b);
        assert_eq!(a.delivery_us.len(), 2);
        assert_eq!(a.join_us.min(), 1, "zero saturates to 1 us");
        a.reset_editing();
        assert_eq!(a.delivery_us.len(), 0);
        assert_eq!(a.join_us.len(), 1, "join samples survive the warm-up reset");

        let mut c = Counters::default();
        c.error("x");
        let mut d = Counters {
            edits_sent: 3,
            ..Counters::default()
        };
        d.error("x");
        c.merge(&d);
        assert_eq!(c.errors.get("x"), Some(&2));
        assert_eq!(c.edits_sent, 3);
    }
}
