//! Giving guest pages back to the host: the pages a balloon's guest inflated or reported free
//! (`docs/balloon.md`). A page given back must read zeros when the guest takes it again,
//! whatever it mapped: the guest's own anonymous page is simply dropped (`MADV_DONTNEED`), but
//! a page that maps a store slot or an image page (copied on write or not), or any page of a
//! restored VM's RAM (which maps its snapshot's memory file), would come back with the slot's
//! or the file's bytes, so such a stretch gets fresh anonymous memory instead,
//! its references drop and it stops being a merged or image page (or a patched kernel page
//! waiting to be merged).

use super::domain::{Domain, VmState};
use super::error::DedupError;
use super::words::{Slot, VmId, PAGE_SIZE};

impl Domain {
    /// Gives back every whole page of `ranges` (guest-physical `(start, length)`, page aligned;
    /// anything outside the VM's RAM is skipped): each reads zeros from now on. Returns how
    /// many pages were given back.
    ///
    /// The guest promised not to touch these pages until it takes them again; one that does
    /// meanwhile may see its write dropped, which harms only itself.
    pub fn discard(&mut self, id: VmId, ranges: &[(u64, u64)]) -> Result<usize, DedupError> {
        self.sync_generation();
        let Some(mut vm) = self.take_vm(id) else { return Ok(0) };
        let result = self.discard_held(&mut vm, ranges);
        self.put_vm(id, vm);
        result
    }

    fn discard_held(&mut self, vm: &mut VmState, ranges: &[(u64, u64)]) -> Result<usize, DedupError> {
        let mut done = 0;
        let mut remapped = false;
        let mut released: Vec<Slot> = Vec::new();
        for &(start, len) in ranges {
            for (region, first, pages) in stretches(vm, start, len) {
                let host = vm.regions[region].host_addr + first * PAGE_SIZE;
                let gpa = vm.regions[region].gpa + (first * PAGE_SIZE) as u64;
                let bytes = pages * PAGE_SIZE;
                // A restored VM's RAM maps its snapshot's memory file: dropped, its pages would
                // read the file's bytes again, so they get fresh anonymous memory too.
                if !vm.regions[region].maps_snapshot && !vm.vmas[region].maps_files_in(first, pages) {
                    // SAFETY: whole pages of the VM's registered RAM, a private anonymous
                    // mapping; dropping them makes them read zeros, which the guest asked for.
                    let rc = unsafe { libc::madvise(host as *mut libc::c_void, bytes, libc::MADV_DONTNEED) };
                    if rc != 0 {
                        let source = std::io::Error::last_os_error();
                        return Err(DedupError::Discard { gpa, pages, source });
                    }
                } else {
                    // SAFETY: whole pages of the VM's registered RAM get fresh private anonymous
                    // memory, the kind guest RAM is made of: they read zeros, as given back.
                    let mapped = unsafe {
                        libc::mmap(
                            host as *mut libc::c_void,
                            bytes,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                            -1,
                            0,
                        )
                    };
                    if mapped == libc::MAP_FAILED {
                        let source = std::io::Error::last_os_error();
                        return Err(DedupError::Discard { gpa, pages, source });
                    }
                    vm.vmas[region].unmap_run(first, pages);
                    for k in 0..pages {
                        let page = gpa + (k * PAGE_SIZE) as u64;
                        released.extend(vm.merged.remove(page));
                        vm.image_pages.remove(&page);
                        vm.suspects.remove(&page);
                    }
                    remapped = true;
                    self.counters.discarded_remapped += pages as u64;
                }
                // A patched kernel page or an image page waiting to merge is free guest memory
                // now, not kernel text or the image's.
                let end = gpa + bytes as u64;
                vm.kernel_written.retain(|g| !(gpa..end).contains(g));
                vm.image_stragglers.retain(|g| !(gpa..end).contains(g));
                self.counters.discarded += pages as u64;
                done += pages;
            }
        }
        self.backend.release(vm.holder, &released);
        if remapped {
            self.vmas = self.vms.values().chain(Some(&*vm)).map(VmState::vmas).sum();
            self.reconcile_vmas_with(Some(vm));
        }
        Ok(done)
    }
}

/// The whole pages of `start..start + len` in the VM's RAM, as (region, first page, pages).
fn stretches(vm: &VmState, start: u64, len: u64) -> Vec<(usize, usize, usize)> {
    let page = PAGE_SIZE as u64;
    let Some(end) = start.checked_add(len) else { return Vec::new() };
    let (start, end) = (start.next_multiple_of(page), end - end % page);
    let mut out = Vec::new();
    for (i, r) in vm.regions.iter().enumerate() {
        let (lo, hi) = (start.max(r.gpa), end.min(r.gpa + r.len as u64));
        if lo < hi {
            out.push((i, ((lo - r.gpa) / page) as usize, ((hi - lo) / page) as usize));
        }
    }
    out
}
