//! The host side of the fphash device: hands a VM's checked report batches to its dedup
//! domain. The event loop pauses every vCPU of the VM *before* it takes the device's lock
//! (`virtio_mmio.rs`), so no guest write can land between the engine's verification of a page
//! and the mapping of the shared copy over it, and no vCPU can block on the device while the
//! device waits for it to park.

use std::sync::{Arc, Mutex};

use samepage_virtio::fphash::{Hashing, PageMerger, PageReport, RecordStatus, ReportKind};

use crate::bus::lock;
use crate::config::DedupMode;
use crate::dedup::{Domain, MergeStatus, Report, VmId};
use crate::pause::PauseControl;

/// One VM's merger.
pub struct VmMerger {
    domain: Arc<Mutex<Domain>>,
    vm: VmId,
    pause: Arc<PauseControl>,
    mode: DedupMode,
    reports: Vec<Report>,
    outcomes: Vec<MergeStatus>,
}

impl VmMerger {
    /// A merger for VM `vm` of `domain`, whose vCPUs `pause` controls (the caller of
    /// [`PageMerger::merge_batch`] must hold a pause of them for ADDED batches).
    pub fn new(domain: Arc<Mutex<Domain>>, vm: VmId, pause: Arc<PauseControl>, mode: DedupMode) -> Self {
        VmMerger { domain, vm, pause, mode, reports: Vec::new(), outcomes: Vec::new() }
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
