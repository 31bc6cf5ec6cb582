//! When a VM's RAM is swept for pages of zeros, and where the sweep in progress is
//! (`zero_pages.rs` does the sweeping): the first sweep [`FIRST_SWEEP_AFTER`] the VM joins;
//! the next [`SWEEP_EVERY_MIN`] after one that found [`WORTH_SWEEPING_SOON`] pages of zeros or
//! more, or twice as long as the last wait (at most [`SWEEP_EVERY_MAX`]) after one that found
//! fewer; and one [`QUIET_FOR`] after the guest's reports stop, if it reported since the last
//! sweep began (a workload that ends leaves pages of zeros behind: memory its processes had
//! zeroed, page tables emptied). A sweep covers [`SWEEP_SLICE_PAGES`] pages a refresh.

use std::time::{Duration, Instant};

/// Pages of a VM's RAM one refresh sweeps (64 MiB: a 256 MiB guest is swept in 4 refreshes).
pub const SWEEP_SLICE_PAGES: usize = 16_384;
/// When a VM's first sweep starts, after it joined its domain.
pub const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(5);
/// Least time from the end of one sweep to the start of the next.
pub const SWEEP_EVERY_MIN: Duration = Duration::from_secs(5);
/// Most time from the end of one sweep to the start of the next.
pub const SWEEP_EVERY_MAX: Duration = Duration::from_secs(320);
/// Pages of zeros a sweep must find for the next to come soon (at [`SWEEP_EVERY_MIN`]).
pub const WORTH_SWEEPING_SOON: usize = 64;
/// Most pages of zeros found and waiting to be given back, per VM (a bound on memory).
pub(crate) const MOST_WAITING: usize = 65_536;
/// How long a guest's reports must have stopped for the sweep that follows them.
pub const QUIET_FOR: Duration = Duration::from_secs(5);

/// Where a VM's sweeps are.
pub(crate) struct ZeroSweep {
    /// The sweep in progress: the next page to look at (region, page); `None` between sweeps.
    pub(crate) cursor: Option<(usize, usize)>,
    /// When the next sweep starts.
    next_at: Instant,
    /// The wait from the end of the last sweep to the start of the next.
    every: Duration,
    /// Pages of zeros the sweep in progress found.
    pub(crate) found: usize,
    /// Pages of zeros found (gpas), to be given back with the vCPUs paused.
    pub(crate) waiting: Vec<u64>,
    /// When the guest last reported pages, if it did since the last sweep began.
    reported_at: Option<Instant>,
}

impl ZeroSweep {
    /// A VM that joined at `joined`: its first sweep is [`FIRST_SWEEP_AFTER`] later.
    pub(crate) fn new(joined: Instant) -> ZeroSweep {
        ZeroSweep {
            cursor: None,
            next_at: joined + FIRST_SWEEP_AFTER,
            every: SWEEP_EVERY_MIN,
            found: 0,
            waiting: Vec::new(),
            reported_at: None,
        }
    }

    /// The guest reported pages at `now`.
    pub(crate) fn note_reports(&mut self, now: Instant) {
        self.reported_at = Some(now);
    }

    /// Whether a sweep is in progress at `now`: one that is due starts.
    pub(crate) fn in_progress(&mut self, now: Instant) -> bool {
        let quiet_since_reports =
            self.reported_at.is_some_and(|t| now.saturating_duration_since(t) >= QUIET_FOR);
        if self.cursor.is_none() && (now >= self.next_at || quiet_since_reports) {
            self.cursor = Some((0, 0));
            self.found = 0;
            self.reported_at = None;
        }
        self.cursor.is_some()
    }

    /// Ends the sweep in progress at `now` and sets when the next one starts.
    pub(crate) fn finish(&mut self, now: Instant) {
        self.every = if self.found >= WORTH_SWEEPING_SOON {
            SWEEP_EVERY_MIN
        } else {
            (self.every * 2).min(SWEEP_EVERY_MAX)
        };
        self.next_at = now + self.every;
        self.cursor = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_come_soon_while_they_find_pages_of_zeros_and_ever_later_while_they_do_not() {
        let t0 = Instant::now();
        let mut s = ZeroSweep::new(t0);
        assert!(!s.in_progress(t0));
        let mut now = t0 + FIRST_SWEEP_AFTER;
        let mut waits = Vec::new();
        for found in [0, 0, 0, 500, 0, 0, 0, 0, 0, 0, 0, 0] {
            assert!(s.in_progress(now));
            s.found = found;
            s.finish(now);
            assert!(!s.in_progress(now + s.every - Duration::from_millis(1)));
            waits.push(s.every.as_secs());
            now += s.every;
        }
        assert_eq!(waits, [10, 20, 40, 5, 10, 20, 40, 80, 160, 320, 320, 320]);
    }

    #[test]
    fn reports_that_stop_bring_a_sweep_forward_once() {
        let t0 = Instant::now();
        let mut s = ZeroSweep::new(t0);
        let mut now = t0 + FIRST_SWEEP_AFTER;
        for _ in 0..8 {
            assert!(s.in_progress(now));
            s.finish(now);
            now += s.every;
        }
        // The last sweep ended at `finished`; the next is due minutes later.
        let (finished, due) = (now - s.every, s.next_at);
        assert!(due - finished >= Duration::from_secs(300), "backed off to {:?}", s.every);
        // Reports after it: no sweep starts while they come.
        now = finished + Duration::from_secs(10);
        let last_report = now + Duration::from_secs(2);
        s.note_reports(now);
        s.note_reports(last_report);
        assert!(!s.in_progress(last_report + QUIET_FOR - Duration::from_millis(1)));
        // Once they stopped for QUIET_FOR, one sweep starts, long before it was due.
        let quiet = last_report + QUIET_FOR;
        assert!(quiet < due);
        assert!(s.in_progress(quiet));
        s.finish(quiet);
        // No report since: the next waits for its time again.
        assert!(!s.in_progress(quiet + QUIET_FOR * 2));
        assert!(s.in_progress(s.next_at));
    }
}
