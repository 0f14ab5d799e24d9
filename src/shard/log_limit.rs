//! [`LogLimit`]: at most one warning line a second for an event an attacker can repeat at
//! will (connections refused at the limit, slow consumers closed), each line carrying how
//! many events it stands for. The per-event detail belongs at debug level.
//!
//! Pure bookkeeping: it never logs by itself and never reads the clock.

use std::time::{Duration, Instant};

/// Counts events and says when the next warning line is due.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    /// Events since the last line.
    count: u64,
    /// When the last line was due (`None`: never).
    last: Option<Instant>,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub const fn every(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            count: 0,
            last: None,
        }
    }

    /// At most one line a second.
    pub const fn per_second() -> LogLimit {
        LogLimit::every(Duration::from_secs(1))
    }

    /// Counts one event at `now`. When a line is due, returns how many events it covers (this
    /// one included, and every one swallowed since the last line) and starts counting afresh.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        let quiet = self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.interval);
        if quiet {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count() {
        let start = Instant::now();
        let mut limit = LogLimit::per_second();
        assert_eq!(limit.hit(start), Some(1), "the first event is logged");
        for i in 0..999 {
            assert_eq!(limit.hit(start + Duration::from_micros(i)), None);
        }
        assert_eq!(
            limit.hit(start + Duration::from_secs(1)),
            Some(1000),
            "the next line counts every swallowed event"
        );
        assert_eq!(limit.hit(start + Duration::from_millis(1500)), None);
        assert_eq!(limit.hit(start + Duration::from_secs(3)), Some(2));
    }
}
