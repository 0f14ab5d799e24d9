//! [`RateLimit`] and [`TokenBucket`]: a per-connection budget on client messages (`op` and
//! `presence`), so that one client sending as fast as its socket allows cannot take its
//! shard's CPU from everyone else's documents.
//!
//! Pure bookkeeping on a caller-supplied clock (the shard passes the time of its current
//! turn): it never reads the clock, never allocates and never touches a socket. What a refused
//! message gets (`rate_limited`) is the host's business.

use std::time::Instant;

use crate::crdt::Op;

/// Op items that cost one more token than a bare message (see [`op_message_cost`]).
pub const ITEMS_PER_TOKEN: u64 = 100;
/// A delete's `len` counts up to this many items (see [`op_message_cost`]).
pub const DEL_ITEMS_COUNTED_MAX: u64 = 100_000;

/// The budget every connection of a shard gets: `per_second` tokens refill continuously, at
/// most `burst` are banked. Disabled when either is 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
}

impl RateLimit {
    /// `per_second` tokens a second sustained, `burst` at most at once; 0 in either disables
    /// the limit.
    pub fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
        }
    }

    /// No limit at all.
    pub fn disabled() -> RateLimit {
        RateLimit::new(0, 0)
    }

    /// Whether messages are limited at all.
    pub fn enabled(&self) -> bool {
        self.per_second > 0.0 && self.burst > 0.0
    }

    /// A full bucket at `now` (what a new connection starts with).
    pub fn full_bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: self.burst,
            last: now,
        }
    }
}

/// The cost in tokens of an `op` message: `1 + items / ITEMS_PER_TOKEN`, where `items` counts
/// one per op plus, for each delete, its `len` (at most [`DEL_ITEMS_COUNTED_MAX`]).
///
/// Why: a message's fixed cost (parsing, a log record, one `op_echo` to every client of the
/// document, its share of the turn's fsync) dominates for the messages editors really send
/// (one keystroke, one paste), so those cost 1. What grows with the message is integration:
/// an insert costs about one tree walk, a delete up to one per span it covers (a message
/// deleting a whole 100,000-span document costs ~19 ms even when every span is a tombstone
/// already, docs/crdt.md), and `len` is the only bound on spans a message declares. So a
/// select-all delete of a 100,000-character document costs 1,001 tokens: at the defaults a
/// client can still do that, but only twice a second sustained, not thousands of times.
/// A `len` counts up to 100,000 items, so one absurd `len` (which the room refuses as
/// `invalid_op` or `unknown_id`) does not cost a client its whole burst, and the refusal it
/// deserves is the one it gets; a client repeating such deletes is still held to ~2 a second.
/// Insert text is not counted: its cost is bounded by the message size like the parse is.
pub fn op_message_cost(ops: &[Op]) -> u64 {
    let items = ops.iter().fold(0u64, |sum, op| {
        let weight = match op {
            Op::Insert { .. } => 1,
            Op::Delete { len, .. } => 1 + (*len).min(DEL_ITEMS_COUNTED_MAX),
        };
        sum.saturating_add(weight)
    });
    1 + items / ITEMS_PER_TOKEN
}

/// One connection's tokens. 16 bytes, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// Whether the bucket would be full at `now` (so it remembers nothing of past use and can
    /// be forgotten). Always `true` when `limit` is disabled.
    pub fn is_full(&self, limit: &RateLimit, now: Instant) -> bool {
        if !limit.enabled() {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * limit.per_second >= limit.burst
    }

    /// Refills up to `now`, then takes `cost` tokens if there are that many. A cost above the
    /// burst counts as the whole burst, so even the largest legal message passes on a full
    /// bucket. `false` (nothing taken) means the message is over the budget. Always `true`
    /// when `limit` is disabled.
    pub fn try_take(&mut self, limit: &RateLimit, cost: u64, now: Instant) -> bool {
        if !limit.enabled() {
            return true;
        }
        // A clock that went backwards (it cannot with `Instant`, but be safe) refills nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        if now > self.last {
            self.last = now;
        }
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        let cost = (cost as f64).min(limit.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crdt::OpId;

    #[test]
    fn burst_then_the_sustained_rate() {
        let start = Instant::now();
        let limit = RateLimit::new(10, 5);
        let mut bucket = limit.full_bucket(start);
        for _ in 0..5 {
            assert!(bucket.try_take(&limit, 1, start));
        }
        assert!(!bucket.try_take(&limit, 1, start), "the burst is spent");
        // 10 a second: one token every 100 ms.
        assert!(!bucket.try_take(&limit, 1, start + Duration::from_millis(50)));
        assert!(bucket.try_take(&limit, 1, start + Duration::from_millis(110)));
        assert!(!bucket.try_take(&limit, 1, start + Duration::from_millis(110)));
        // A long pause banks at most the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(bucket.try_take(&limit, 1, later));
        }
        assert!(!bucket.try_take(&limit, 1, later));
    }

    #[test]
    fn a_cost_above_the_burst_needs_a_full_bucket() {
        let start = Instant::now();
        let limit = RateLimit::new(1, 5);
        let mut bucket = limit.full_bucket(start);
        assert!(bucket.try_take(&limit, 1_000, start));
        assert!(!bucket.try_take(&limit, 1, start));
        assert!(bucket.try_take(&limit, 1, start + Duration::from_secs(1)));
    }

    #[test]
    fn zero_disables() {
        let start = Instant::now();
        for limit in [
            RateLimit::disabled(),
            RateLimit::new(0, 5),
            RateLimit::new(5, 0),
        ] {
            let mut bucket = limit.full_bucket(start);
            for _ in 0..10_000 {
                assert!(bucket.try_take(&limit, u64::MAX, start));
            }
        }
    }

    #[test]
    fn op_cost_counts_ops_and_deleted_items() {
        let id = OpId {
            lamport: 1,
            replica: 1,
        };
        let ins = Op::Insert {
            id,
            after: None,
            text: "hello".to_owned(),
        };
        assert_eq!(op_message_cost(std::slice::from_ref(&ins)), 1);
        assert_eq!(op_message_cost(&vec![ins; 250]), 3);
        let del = |len| Op::Delete { id, len };
        assert_eq!(op_message_cost(&[del(1)]), 1);
        assert_eq!(op_message_cost(&[del(99_999)]), 1_001);
        assert_eq!(op_message_cost(&[del(u64::MAX)]), 1_001);
        assert_eq!(
            op_message_cost(&vec![del(u64::MAX); 10_000]),
            1 + 1_000_010_000 / 100
        );
    }
}
