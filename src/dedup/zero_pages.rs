//! Guest pages that hold only zeros, given back to the host (`docs/fphash.md`, "Pages of
//! zeros").
//!
//! A guest holds pages of zeros that no report covers: a Linux kernel's BSS cleared at boot,
//! page tables emptied, pages zeroed for a process that exited. KSM merges them by scanning all
//! guest memory again and again; samepage *sweeps* for them, a slice of the VM's RAM per
//! refresh, and cheaply:
//! - the page table (`/proc/self/pagemap`) says which pages the VM wrote (present, private,
//!   mapped once); only those are read, and only up to their first word that is not zero;
//! - pages that map a store slot or an image page (copied on write or not) and all of a
//!   restored VM's RAM (it maps its snapshot's memory file) are left alone: dropped, they would
//!   read the file's bytes again, not zeros;
//! - a page found all zeros waits, and is given back only with the VM's vCPUs paused and its
//!   device I/O quiesced, after a second, whole read: `MADV_DONTNEED` makes it read zeros (the
//!   host's zero page) until the guest writes it again, when the kernel gives it a new page.
//!   No write can fall between that read and the drop, so nothing the guest wrote is lost;
//! - sweeps are spaced ([`super::zero_sweep`]): a guest that makes no new pages of zeros costs
//!   one sweep every few minutes.

use std::time::Instant;

use super::domain::{Domain, VmState};
use super::error::DedupError;
use super::words::{VmId, PAGE_SIZE};
use super::zero_sweep::{MOST_WAITING, SWEEP_SLICE_PAGES};
use crate::pagemap_entry::is_written_here;

/// Whether the page at `host` reads zeros, read a word at a time up to the first that is not
/// (volatile: vCPUs may be writing it; a page that changes while it is read is read again, whole,
/// with them paused, before anything is done to it).
///
/// # Safety
/// `host` is the page-aligned address of a page of a region registered with
/// [`Domain::register_vm`] (mapped and readable).
unsafe fn reads_zeros(host: usize) -> bool {
    let words = host as *const u64;
    // SAFETY: the caller's contract: the page's 512 words are mapped and readable.
    (0..PAGE_SIZE / 8).all(|i| unsafe { std::ptr::read_volatile(words.add(i)) } == 0)
}

impl Domain {
    /// Sweeps the next slice of `id`'s RAM for pages of zeros if a sweep is due (see the
    /// module's contract); returns how many pages of zeros wait for
    /// [`Domain::give_back_zero_pages`]. Needs no pause: nothing is changed.
    pub fn sweep_zero_pages(&mut self, id: VmId) -> Result<usize, DedupError> {
        self.sweep_zero_pages_at(id, Instant::now())
    }

    /// [`Domain::sweep_zero_pages`] as if it were `now`.
    pub(crate) fn sweep_zero_pages_at(&mut self, id: VmId, now: Instant) -> Result<usize, DedupError> {
        let Some(mut vm) = self.take_vm(id) else { return Ok(0) };
        let swept = self.sweep_slice(&mut vm, now);
        let waiting = vm.zero_sweep.waiting.len();
        self.put_vm(id, vm);
        swept.map(|()| waiting)
    }

    fn sweep_slice(&mut self, vm: &mut VmState, now: Instant) -> Result<(), DedupError> {
        if !vm.zero_sweep.in_progress(now) {
            return Ok(());
        }
        let mut budget = SWEEP_SLICE_PAGES;
        while let Some((r, page)) = vm.zero_sweep.cursor {
            let Some(region) = vm.regions.get(r) else {
                vm.zero_sweep.finish(now);
                self.counters.zero_sweeps += 1;
                break;
            };
            let pages = region.len / PAGE_SIZE;
            if region.maps_snapshot || page >= pages {
                vm.zero_sweep.cursor = Some((r + 1, 0));
                continue;
            }
            if budget == 0 {
                break;
            }
            let n = budget.min(pages - page);
            let first_host = region.host_addr + page * PAGE_SIZE;
            let entries = match self.pagemap.entries(first_host, n) {
                Ok(entries) => entries,
                Err(e) => {
                    // Nothing is given back on a guess: this sweep ends here.
                    vm.zero_sweep.finish(now);
                    return Err(e);
                }
            };
            for (i, &entry) in entries.iter().enumerate() {
                if !is_written_here(entry) || vm.vmas[r].maps_files_in(page + i, 1) {
                    continue;
                }
                // Enough waits: the rest of this slice is looked at in the next sweep.
                if vm.zero_sweep.waiting.len() >= MOST_WAITING {
                    break;
                }
                self.counters.zero_pages_checked += 1;
                // SAFETY: page `page + i` of registered region `r`.
                let zeros = unsafe { reads_zeros(first_host + i * PAGE_SIZE) };
                if zeros {
                    vm.zero_sweep.waiting.push(region.gpa + ((page + i) * PAGE_SIZE) as u64);
                    vm.zero_sweep.found += 1;
                }
            }
            budget -= n;
            vm.zero_sweep.cursor = Some((r, page + n));
        }
        Ok(())
    }

    /// Gives back the pages of zeros [`Domain::sweep_zero_pages`] found that still read zeros
    /// and still are the VM's own anonymous memory: each reads zeros until the guest writes it.
    /// Returns how many were given back. The VM's vCPUs must be paused and its device I/O
    /// quiesced (as for a merge: a write between the read and the drop would be lost).
    pub fn give_back_zero_pages(&mut self, id: VmId) -> Result<usize, DedupError> {
        let Some(mut vm) = self.take_vm(id) else { return Ok(0) };
        let mut waiting = std::mem::take(&mut vm.zero_sweep.waiting);
        waiting.sort_unstable();
        waiting.dedup();
        let mut given_back = 0;
        let mut result = Ok(());
        // Consecutive pages of one region go back in one call.
        let mut run: Option<PageRun> = None;
        for gpa in waiting {
            let Some(at) = vm.locate(gpa) else { continue };
            // Merged or mapped from an image since it was found: not the VM's anonymous memory.
            // SAFETY: `locate` found the page in a registered region.
            let zeros = !vm.regions[at.region].maps_snapshot
                && !vm.vmas[at.region].maps_files_in(at.page, 1)
                && unsafe { reads_zeros(at.host) };
            if !zeros {
                continue;
            }
            match run.as_mut() {
                Some(r) if r.host + r.pages * PAGE_SIZE == at.host => r.pages += 1,
                _ => {
                    if let Some(done) = run.replace(PageRun { host: at.host, gpa, pages: 1 }) {
                        given_back += drop_pages(done, &mut result);
                    }
                }
            }
        }
        if let Some(done) = run {
            given_back += drop_pages(done, &mut result);
        }
        self.counters.zero_pages_given_back += given_back as u64;
        self.put_vm(id, vm);
        result.map(|()| given_back)
    }
}

/// Consecutive pages of guest RAM, consecutive in host memory too.
struct PageRun {
    host: usize,
    gpa: u64,
    pages: usize,
}

/// Drops the pages of zeros of `run`; returns how many were dropped (the first failure is kept
/// in `result`).
fn drop_pages(PageRun { host, gpa, pages }: PageRun, result: &mut Result<(), DedupError>) -> usize {
    // SAFETY: whole pages of a VM's registered RAM, its private anonymous memory (no store slot
    // or image is mapped there and the region maps no snapshot), that read zeros with the VM
    // paused: dropped, they read zeros again.
    let rc = unsafe { libc::madvise(host as *mut libc::c_void, pages * PAGE_SIZE, libc::MADV_DONTNEED) };
    if rc == 0 {
        return pages;
    }
    if result.is_ok() {
        *result = Err(DedupError::GiveBackZeros { gpa, pages, source: std::io::Error::last_os_error() });
    }
    0
}
