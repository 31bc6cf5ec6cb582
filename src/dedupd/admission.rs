//! Fair shares of the broker's work for STATUS and CHECK (`docs/dedupd.md`, "`status` and
//! `check`"). A STATUS answer can be hundreds of KiB and a CHECK hashes a whole store, so
//! without a bound one user's connections asking again and again would slow every client's
//! merges (and a client that never reads its answers would make the broker keep them). Per
//! user: a token bucket of queries, a bound on answer bytes waiting to be sent, and on queries
//! under way (each is answered in steps, one per turn of the loop). A query beyond them waits
//! (its connection is not read meanwhile); other requests are never held back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Queries a user may make per second, on average.
pub const QUERIES_PER_SEC: f64 = 8.0;
/// Queries a user may make at once, after a quiet while.
pub const QUERY_BURST: f64 = 16.0;
/// Answer bytes of one user's queries that may wait to be sent.
pub const QUERY_BYTES_WAITING: usize = 8 << 20;
/// Queries of one user under way at once.
pub const QUERIES_AT_ONCE: usize = 2;

#[derive(Debug)]
struct Budget {
    tokens: f64,
    refilled: Instant,
    waiting_bytes: usize,
}

/// Every user's budget.
#[derive(Debug, Default)]
pub struct Admission {
    users: HashMap<u32, Budget>,
}

impl Admission {
    /// Whether `uid` may have a query started now (it then spends a token); `under_way` is
    /// how many of its queries are being answered.
    pub fn admit(&mut self, uid: u32, under_way: usize, now: Instant) -> bool {
        let budget =
            self.users.entry(uid).or_insert(Budget { tokens: QUERY_BURST, refilled: now, waiting_bytes: 0 });
        let elapsed = now.saturating_duration_since(budget.refilled).as_secs_f64();
        budget.tokens = (budget.tokens + elapsed * QUERIES_PER_SEC).min(QUERY_BURST);
        budget.refilled = now;
        let ok =
            budget.tokens >= 1.0 && budget.waiting_bytes < QUERY_BYTES_WAITING && under_way < QUERIES_AT_ONCE;
        if ok {
            budget.tokens -= 1.0;
        }
        ok
    }

    /// An answer of `bytes` for `uid` waits to be sent.
    pub fn queued(&mut self, uid: u32, bytes: usize) {
        if let Some(b) = self.users.get_mut(&uid) {
            b.waiting_bytes += bytes;
        }
    }

    /// `bytes` of `uid`'s answers were sent (or dropped with their connection).
    pub fn sent(&mut self, uid: u32, bytes: usize) {
        if let Some(b) = self.users.get_mut(&uid) {
            b.waiting_bytes = b.waiting_bytes.saturating_sub(bytes);
        }
    }

    /// How long until a waiting query may be looked at again.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs_f64(1.0 / QUERIES_PER_SEC)
    }

    /// Forgets users with a full bucket and nothing waiting (they cost nothing to recreate).
    pub fn forget_idle(&mut self, now: Instant) {
        self.users.retain(|_, b| {
            let full = b.tokens + now.saturating_duration_since(b.refilled).as_secs_f64() * QUERIES_PER_SEC;
            full < QUERY_BURST || b.waiting_bytes > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_a_burst_then_its_rate_and_waits_for_its_answers_to_go_out() {
        let mut a = Admission::default();
        let t = Instant::now();
        let burst = (0..100).filter(|_| a.admit(7, 0, t)).count();
        assert_eq!(burst, QUERY_BURST as usize);
        assert!(a.admit(8, 0, t), "another user has its own budget");
        let later = t + Duration::from_secs(1);
        let refilled = (0..100).filter(|_| a.admit(7, 0, later)).count();
        assert_eq!(refilled, QUERIES_PER_SEC as usize);
        let much_later = t + Duration::from_secs(60);
        a.queued(7, QUERY_BYTES_WAITING);
        assert!(!a.admit(7, 0, much_later), "its answers wait to be read");
        a.sent(7, QUERY_BYTES_WAITING);
        assert!(a.admit(7, 0, much_later));
        assert!(!a.admit(7, QUERIES_AT_ONCE, much_later), "as many queries under way as it may have");
    }
}
