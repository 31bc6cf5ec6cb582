//! The host side of the fphash device: hands a VM's checked report batches to its dedup
//! domain. The event loop pauses every vCPU of the VM *before* it takes the device's lock
//! (`virtio_mmio.rs`), so no guest write can land between the engine's verification of a page
//! and the mapping of the shared copy over it, and no vCPU can block on the device while the
//! device waits for it to park.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use samepage_virtio::fphash::{Hashing, PageMerger, PageReport, RecordStatus, ReportKind};

use crate::bus::lock;
use crate::config::DedupMode;
use crate::dedup::{Domain, MergeStatus, Report, VmId};
use crate::devices::virtio_mmio::ServeNoSooner;
use crate::pause::PauseControl;

/// A batch of fewer records than this lets the next gather ([`GATHER_FOR`]).
pub const SMALL_BATCH: usize = 64;
/// How long the device lets reports gather in the driver's ring after a small batch before it
/// serves the next: a batch costs a pause of every vCPU and, with a broker, a round trip,
/// whatever its size, and a driver that reports a few pages at a time would pay them for every
/// few pages. A Linux guest reading files where its kernel is emulated, served at once, sent
/// about 5 records a batch, 29 batches a second; after a wait of 200 ms, 39; with waits of a
/// second its batches carried 130 on average (`docs/bench-linux-density.md`). A driver with
/// more to say sends batches of [`SMALL_BATCH`] or more, served at once, so a wait never holds
/// more than that back.
pub const GATHER_FOR: Duration = Duration::from_secs(1);
/// How long the device serves small batches at once after [`FUTILE_WAITS`] waits in a row did
/// not make them bigger (a driver that sends its next report only once the last is answered
/// gains nothing from a wait but would be slowed by it).
pub const GATHER_OFF_FOR: Duration = Duration::from_secs(10);
/// Waits in a row that gathered no more than the smallest batch served without one, before the
/// device stops waiting: one alone proves little (a guest's reports come in bursts).
pub const FUTILE_WAITS: u32 = 2;

/// Whether the device lets the next batch gather, from the sizes of the batches so far.
#[derive(Debug, Default)]
pub struct Gathering {
    /// Whether the batch served next was made to wait for (the last call returned a time).
    waited: bool,
    /// The size of the smallest small batch that came without a wait since the device last
    /// stopped waiting: what a wait must beat. The smallest, not the last: the batch that
    /// follows a full one is the backlog a full batch left, not what the driver sends unwaited.
    unwaited: Option<usize>,
    /// Waits in a row that did not beat it.
    futile: u32,
    /// Until when small batches are served at once.
    off_until: Option<Instant>,
}

impl Gathering {
    /// A batch of `records` was served at `now`: when the next may be, if not at once.
    pub fn after_batch(&mut self, records: usize, now: Instant) -> Option<Instant> {
        if records >= SMALL_BATCH {
            (self.waited, self.futile) = (false, 0);
            return None;
        }
        if self.waited {
            let beaten = self.unwaited.is_none_or(|unwaited| records > unwaited);
            self.futile = if beaten { 0 } else { self.futile + 1 };
            if self.futile >= FUTILE_WAITS {
                (self.waited, self.futile, self.unwaited) = (false, 0, None);
                self.off_until = Some(now + GATHER_OFF_FOR);
                return None;
            }
        }
        if self.off_until.is_some_and(|t| now < t) {
            return None;
        }
        if !self.waited {
            self.unwaited = Some(self.unwaited.map_or(records, |u| u.min(records)));
        }
        self.waited = true;
        Some(now + GATHER_FOR)
    }
}

/// One VM's merger.
pub struct VmMerger {
    domain: Arc<Mutex<Domain>>,
    vm: VmId,
    pause: Arc<PauseControl>,
    mode: DedupMode,
    /// When the event loop may serve the device's next batch.
    gather: Arc<ServeNoSooner>,
    gathering: Gathering,
    reports: Vec<Report>,
    outcomes: Vec<MergeStatus>,
}

impl VmMerger {
    /// A merger for VM `vm` of `domain`, whose vCPUs `pause` controls (the caller of
    /// [`PageMerger::merge_batch`] must hold a pause of them for ADDED batches). After a small
    /// batch it sets `gather`, which the event loop obeys.
    pub fn new(
        domain: Arc<Mutex<Domain>>,
        vm: VmId,
        pause: Arc<PauseControl>,
        mode: DedupMode,
        gather: Arc<ServeNoSooner>,
    ) -> Self {
        VmMerger {
            domain,
            vm,
            pause,
            mode,
            gather,
            gathering: Gathering::default(),
            reports: Vec::new(),
            outcomes: Vec::new(),
        }
    }
}

fn wire_status(status: MergeStatus) -> RecordStatus {
    match status {
        MergeStatus::Merged => RecordStatus::Merged,
        MergeStatus::Already => RecordStatus::Already,
        MergeStatus::Mismatch => RecordStatus::Mismatch,
        MergeStatus::BadGpa => RecordStatus::BadGpa,
        MergeStatus::NoRoom => RecordStatus::NoRoom,
    }
}

impl PageMerger for VmMerger {
    fn merge_batch(
        &mut self,
        kind: ReportKind,
        hashing: Hashing,
        reports: &[PageReport],
        statuses: &mut [RecordStatus],
    ) {
        self.gather.set(self.gathering.after_batch(reports.len(), Instant::now()));
        match kind {
            ReportKind::Removed => {
                let mut domain = lock(&self.domain);
                for report in reports {
                    domain.page_removed(self.vm, report.gpa);
                }
                statuses.fill(RecordStatus::Done);
            }
            ReportKind::Added if self.mode != DedupMode::Hinted => statuses.fill(RecordStatus::Off),
            ReportKind::Added if !self.pause.all_parked() => {
                // A wiring bug, not a guest's doing: merging now could lose a guest write.
                log::error!("fphash: a batch arrived without the VM's vCPUs paused; not merged");
                statuses.fill(RecordStatus::NoRoom);
            }
            ReportKind::Added => {
                self.outcomes.clear();
                self.outcomes.resize(reports.len(), MergeStatus::NoRoom);
                // The one shape the engine takes a batch in: a hash when the guest gave one.
                self.reports.clear();
                self.reports.extend(
                    reports
                        .iter()
                        .map(|r| Report { gpa: r.gpa, hash: (hashing == Hashing::Guest).then_some(r.hash) }),
                );
                // Counted as merge CPU by the event loop, with the pause (`virtio_mmio.rs`).
                lock(&self.domain).merge(self.vm, &self.reports, &mut self.outcomes);
                for (status, outcome) in statuses.iter_mut().zip(&self.outcomes) {
                    *status = wire_status(*outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_batches_gather_while_waiting_makes_them_bigger() {
        let t0 = Instant::now();
        let mut g = Gathering::default();
        // A Linux guest: 6 records at once, 30 after most waits, a few after one now and then.
        assert_eq!(g.after_batch(6, t0), Some(t0 + GATHER_FOR));
        for k in 1..10 {
            let now = t0 + GATHER_FOR * k;
            let records = if k % 3 == 0 { 4 } else { 30 };
            assert_eq!(g.after_batch(records, now), Some(now + GATHER_FOR), "batch {k}");
        }
        // A full batch is followed at once.
        let now = t0 + Duration::from_secs(3);
        assert_eq!(g.after_batch(256, now), None);
        assert_eq!(g.after_batch(5, now), Some(now + GATHER_FOR));
    }

    #[test]
    fn the_backlog_after_a_full_batch_does_not_stop_the_gathering() {
        // Seen from a Linux guest: 4 records unwaited, then waits gathering 8, 39, 27 and a full
        // batch; the backlog it left (46) comes unwaited, and the next waits gather 2, 53, 16,
        // 12, 20: one futile wait, then each beats the 4 the driver sent without a wait.
        let t0 = Instant::now();
        let mut g = Gathering::default();
        let mut now = t0;
        assert!(g.after_batch(4, now).is_some());
        for records in [8, 39, 27] {
            now += GATHER_FOR;
            assert!(g.after_batch(records, now).is_some(), "{records}");
        }
        now += GATHER_FOR;
        assert_eq!(g.after_batch(70, now), None);
        assert!(g.after_batch(46, now).is_some());
        for records in [2, 53, 16, 12, 20] {
            now += GATHER_FOR;
            assert_eq!(g.after_batch(records, now), Some(now + GATHER_FOR), "{records}");
        }
    }

    #[test]
    fn a_driver_that_waits_for_each_answer_is_not_slowed() {
        let t0 = Instant::now();
        let mut g = Gathering::default();
        // One record a batch, however long the device waits: two waits, then none.
        assert_eq!(g.after_batch(1, t0), Some(t0 + GATHER_FOR));
        let mut now = t0 + GATHER_FOR;
        assert_eq!(g.after_batch(1, now), Some(now + GATHER_FOR));
        now += GATHER_FOR;
        assert_eq!(g.after_batch(1, now), None);
        for _ in 0..1000 {
            now += Duration::from_millis(5);
            assert_eq!(g.after_batch(1, now), None);
        }
        // Tried again once the pause is over.
        now = t0 + GATHER_FOR * 2 + GATHER_OFF_FOR;
        assert_eq!(g.after_batch(1, now), Some(now + GATHER_FOR));
    }
}
