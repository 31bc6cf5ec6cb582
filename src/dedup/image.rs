//! Read-only disk images shared page by page (`docs/fphash.md`, "Read-only images"): a read
//! whose buffer covers whole guest pages at 4 KiB-aligned image offsets maps the image file's
//! pages over those guest pages, `MAP_PRIVATE`, instead of copying them, so every VM reading
//! the image shares the host's page cache. The domain books these pages like merged ones: the
//! VMA count and budget cover them, a guest write copies the page (found on two looks, as for
//! store pages), and an fphash report of such a page merges it by its content (`merge.rs`).
//! The pages of a VM left mapping an image in a page-cache block whose other pages merged are
//! merged too, unreported, so that none keeps the block's cache (`docs/fphash.md`).

use std::collections::BTreeSet;
use std::os::fd::RawFd;

use super::domain::{Domain, VmState};
use super::error::DedupError;
use super::image_ids::{folio_block, image_key, image_page_of_key, ImageId, MAX_IMAGE_PAGES};
use super::remap;
use super::words::{MergeStatus, Report, VmId, PAGE_SIZE};

impl Domain {
    /// A new id for an open image file that `vm`'s disk reads: call it once per descriptor
    /// whose pages will be mapped (every descriptor is its own image to the kernel's VMAs).
    /// The descriptor must stay open while `vm` is registered.
    pub fn open_image(&mut self, vm: VmId, file: &std::fs::File) -> Result<ImageId, DedupError> {
        self.images.open(vm, file)
    }

    /// A new id for the kernel file that `vm` boots, whose read-only segments will map it: its
    /// pages are booked as image pages but counted apart (`kernel_pages`), as the guest kernel
    /// held once (`docs/boot.md`). The descriptor must stay open while `vm` is registered.
    pub fn open_kernel_image(&mut self, vm: VmId, file: &std::fs::File) -> Result<ImageId, DedupError> {
        let id = self.images.open(vm, file)?;
        self.images.kernels.insert(id);
        Ok(id)
    }

    /// Maps `pages` pages of `image` (descriptor `fd`) from byte `offset` over the guest pages
    /// of `vm` from `gpa`, copy-on-write; returns how many leading pages it mapped: none when
    /// the addresses are unaligned or outside guest RAM or the image is no longer shared, fewer
    /// when the VMA budget is spent or the run leaves its RAM region (the caller copies the rest).
    pub fn map_image(
        &mut self,
        id: VmId,
        image: ImageId,
        fd: RawFd,
        gpa: u64,
        offset: u64,
        pages: usize,
    ) -> usize {
        self.sync_generation();
        let page_size = PAGE_SIZE as u64;
        if self.images.unshared.contains(&image) {
            return 0;
        }
        if !offset.is_multiple_of(page_size) || offset / page_size + pages as u64 > MAX_IMAGE_PAGES {
            return 0;
        }
        let Some(mut vm) = self.take_vm(id) else { return 0 };
        let mapped = self.map_image_into(&mut vm, image, fd, gpa, offset, pages);
        self.put_vm(id, vm);
        mapped
    }

    fn map_image_into(
        &mut self,
        vm: &mut VmState,
        image: ImageId,
        fd: RawFd,
        gpa: u64,
        offset: u64,
        pages: usize,
    ) -> usize {
        let Some(at) = vm.locate(gpa) else { return 0 };
        let region_pages = vm.regions[at.region].len / PAGE_SIZE;
        let pages = pages.min(region_pages - at.page);
        let first_file_page = offset / PAGE_SIZE as u64;
        // Book page by page while the VMA budget allows.
        let mut bookings = Vec::with_capacity(pages);
        for k in 0..pages {
            let key = image_key(image, first_file_page + k as u64);
            let delta = vm.vmas[at.region].delta(at.page + k, key);
            if !self.fits_vma_budget(vm, delta) {
                self.counters.image_no_room += 1;
                break;
            }
            let booking = vm.vmas[at.region].map(at.page + k, key);
            self.vmas = self.vmas.saturating_add_signed(booking.delta);
            bookings.push(booking);
        }
        let n = bookings.len();
        if n == 0 {
            return 0;
        }
        // SAFETY: whole pages of registered guest RAM (the contract of `register_vm`), which
        // the guest's read hands to the device to fill: they get exactly the image's bytes it
        // asked for. `fd` is the image, open for reading.
        if let Err(e) = unsafe { remap::map_image_file(at.host, n, fd, offset) } {
            log::warn!("dedup {}: mmap of {n} image pages at {gpa:#x} failed ({e}); copying", self.name);
            for (k, booking) in bookings.into_iter().enumerate().rev() {
                vm.vmas[at.region].unbook_failed(at.page + k, booking);
            }
            self.reconcile_vmas_with(Some(vm));
            return 0;
        }
        // The pages map the image now: a store slot one of them mapped is no longer needed.
        let mut released = Vec::new();
        for k in 0..n {
            let g = gpa + (k * PAGE_SIZE) as u64;
            if let Some(slot) = vm.merged.remove(g) {
                released.push(slot);
            }
            vm.suspects.remove(&g);
            vm.image_pages.insert(g, image_key(image, first_file_page + k as u64));
        }
        self.backend.release(vm.holder, &released);
        if self.images.kernels.contains(&image) {
            let end = gpa + (n * PAGE_SIZE) as u64;
            vm.kernel_span = Some(vm.kernel_span.map_or((gpa, end), |(f, e)| (f.min(gpa), e.max(end))));
            self.counters.kernel_mapped += n as u64;
        } else {
            self.counters.image_mapped += n as u64;
        }
        n
    }

    /// The image page a reported page maps, if it still maps one; a page the guest wrote is
    /// its own copy now (it stops being an image page here).
    pub(crate) fn image_page(&mut self, vm: &mut VmState, gpa: u64, host: usize) -> Option<(ImageId, u64)> {
        let key = *vm.image_pages.get(&gpa)?;
        let copied = self.pagemap.state(host).map(|s| s.is_copied()).unwrap_or(false);
        if copied {
            vm.image_pages.remove(&gpa);
            vm.suspects.remove(&gpa);
            self.count_image_cow_break(key);
            return None;
        }
        image_page_of_key(key)
    }

    /// How many pages of `vm` the host found to merge without a report, waiting for
    /// [`Domain::merge_unreported_pages`]: kernel pages the guest wrote, and image pages left
    /// in page-cache blocks given back.
    pub fn unreported_pages_waiting(&self, vm: VmId) -> usize {
        self.vms.get(&vm).map_or(0, |v| v.kernel_written.len() + v.image_stragglers.len())
    }

    /// Merges what [`Domain::unreported_pages_waiting`] counts, as reports the host hashes.
    /// Boot-time patching writes the same bytes in every VM that boots the kernel, so those
    /// copies end up as one store page. An image page left in a block whose other pages merged
    /// by content keeps the page cache's folio around it (up to 2 MiB) while it maps it: merged
    /// too, it holds one store page instead (`docs/fphash.md`, "Read-only images"). Returns
    /// how many merged. The VM's vCPUs must be paused (as for any merge: a write between the
    /// compare and the mapping would be lost).
    pub fn merge_unreported_pages(&mut self, vm: VmId) -> usize {
        let Some(mut state) = self.take_vm(vm) else { return 0 };
        let kernel: Vec<Report> = std::mem::take(&mut state.kernel_written)
            .into_iter()
            .map(|gpa| Report { gpa, hash: None })
            .collect();
        let mut stragglers = std::mem::take(&mut state.image_stragglers);
        stragglers.sort_unstable();
        stragglers.dedup();
        // One the guest wrote since it was found is its own page now, not the image's: it is
        // not merged without a report.
        stragglers.retain(|&gpa| {
            state.locate(gpa).is_some_and(|at| self.image_page(&mut state, gpa, at.host).is_some())
        });
        self.put_vm(vm, state);
        let stragglers: Vec<Report> = stragglers.into_iter().map(|gpa| Report { gpa, hash: None }).collect();
        let kernel_merged = self.merge_counted(vm, &kernel);
        let stragglers_merged = self.merge_counted(vm, &stragglers);
        self.counters.kernel_copies_merged += kernel_merged as u64;
        self.counters.image_stragglers_merged += stragglers_merged as u64;
        kernel_merged + stragglers_merged
    }

    /// Merges `reports` of `vm`; returns how many merged.
    fn merge_counted(&mut self, vm: VmId, reports: &[Report]) -> usize {
        if reports.is_empty() {
            return 0;
        }
        let mut outcomes = vec![MergeStatus::NoRoom; reports.len()];
        self.merge(vm, reports, &mut outcomes);
        outcomes.iter().filter(|o| **o == MergeStatus::Merged).count()
    }

    /// Finds the pages of `vm` that still map an image in a page-cache block where others
    /// merged by content before the last refresh and none since (`VmState::blocks_settling`),
    /// for [`Domain::merge_unreported_pages`]. The kernel file's pages stay: every VM maps them.
    pub(crate) fn find_image_stragglers(&self, vm: &mut VmState) {
        let recent = std::mem::take(&mut vm.blocks_given_back);
        let blocks: BTreeSet<(ImageId, u64)> = std::mem::replace(&mut vm.blocks_settling, recent)
            .difference(&vm.blocks_settling)
            .copied()
            .collect();
        if blocks.is_empty() {
            return;
        }
        for (&gpa, &key) in &vm.image_pages {
            let Some((image, page)) = image_page_of_key(key) else { continue };
            if blocks.contains(&(image, folio_block(page))) && !self.images.is_kernel_key(key) {
                vm.image_stragglers.push(gpa);
            }
        }
    }

    /// Counts a page of image `key` that the guest wrote: a disk image's or the kernel's.
    pub(crate) fn count_image_cow_break(&mut self, key: super::vma::MapKey) {
        if self.images.is_kernel_key(key) {
            self.counters.kernel_cow_breaks += 1;
        } else {
            self.counters.image_cow_breaks += 1;
        }
    }
}
