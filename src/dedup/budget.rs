//! The VMA budget of a domain's guest RAM (`vma.rs` keeps each region's count): how many VMAs
//! merges and image pages may still cost, the warning when they may not, and setting the count
//! from the kernel's (`/proc/self/maps`), which it never falls below.

use std::time::Instant;

use super::domain::{Domain, VmState, VMA_RESERVE};
use super::vma;

impl Domain {
    /// VMAs the domain's guest RAM may cost now: the budget, less what the rest of the process
    /// maps beyond the reserve it always keeps.
    pub(crate) fn vma_allowance(&self) -> usize {
        let process_cap = self.max_map_count.saturating_sub(VMA_RESERVE + self.other_vmas);
        self.limits.vma_budget.min(process_cap)
    }

    /// Whether `delta` more VMAs fit the allowance; if not, says so once (naming `vm`).
    pub(crate) fn fits_vma_budget(&mut self, vm: &VmState, delta: isize) -> bool {
        if delta <= 0 || self.vmas + delta as usize <= self.vma_allowance() {
            return true;
        }
        if !self.warned_vmas {
            self.warned_vmas = true;
            log::warn!(
                "dedup {}: VMA budget reached at {}: guest RAM costs {} VMAs of an allowance of {} \
                 (vm.max_map_count = {}); pages that need a new VMA are no longer merged, nor mapped \
                 from shared images (those are copied). Raise vm.max_map_count to merge more (as root: \
                 sysctl -w vm.max_map_count=N).",
                self.name,
                vm.label,
                self.vmas,
                self.vma_allowance(),
                self.max_map_count
            );
        }
        false
    }

    /// Sets every region's VMA count from `/proc/self/maps`, and what the rest of the process
    /// maps. Counts the kernel's excess over the count, which must stay 0.
    pub fn reconcile_vmas(&mut self) {
        self.reconcile_vmas_with(None);
    }

    /// As [`Domain::reconcile_vmas`], with `held` (a VM taken out for an operation) counted too.
    pub(crate) fn reconcile_vmas_with(&mut self, held: Option<&mut VmState>) {
        self.last_reconcile = Some(Instant::now());
        let ranges: Vec<(usize, usize)> = self
            .vms
            .values()
            .chain(held.as_deref())
            .flat_map(|vm| vm.regions.iter().map(|r| (r.host_addr, r.len)))
            .collect();
        let (counts, total) = match vma::maps_overlapping(&ranges) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("dedup {}: cannot read /proc/self/maps: {e}", self.name);
                return;
            }
        };
        self.counters.vma_reconciles += 1;
        let mut measured = counts.into_iter();
        let mut guest = 0;
        let regions = self.vms.values_mut().chain(held).flat_map(|vm| vm.vmas.iter_mut());
        for rv in regions {
            let kernel = measured.next().unwrap_or(0);
            if kernel > rv.vmas() {
                let excess = (kernel - rv.vmas()) as u64;
                self.counters.vma_undercount_max = self.counters.vma_undercount_max.max(excess);
                log::warn!(
                    "dedup {}: the kernel has {kernel} VMAs where the count said {}",
                    self.name,
                    rv.vmas()
                );
            }
            rv.reconcile(kernel);
            guest += rv.vmas();
        }
        self.vmas = guest;
        self.other_vmas = total.saturating_sub(guest);
    }
}
