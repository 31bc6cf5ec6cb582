//! Read-only disk images shared page by page (`docs/fphash.md`, "Read-only images"): a read
//! whose buffer covers whole guest pages at 4 KiB-aligned image offsets maps the image file's
//! pages over those guest pages, `MAP_PRIVATE`, instead of copying them, so every VM reading
//! the image shares the host's page cache. The domain books these pages like merged ones: the
//! VMA count and budget cover them, a guest write copies the page (found on two looks, as for
//! store pages), and an fphash report of such a page is answered without hashing or mapping.

use std::collections::HashSet;
use std::os::fd::RawFd;

use super::vma::MapKey;
use super::{DedupError, Domain, MergeStatus, VmId, PAGE_SIZE};

/// A shared image of the domain: one open file of it (one `struct file` in the kernel).
///
/// The kernel joins neighbouring mappings into one VMA only when they map the same open file
/// at continuing offsets, so two descriptors of one image file (the same image attached twice,
/// or by two VMs) are two images here: their pages never continue each other in the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageId(u32);

/// The VMA model's keys of image pages: bit 63 set (store keys never have it), the image in
/// bits 40..63, the page of the file below: keys continue each other only along one open file.
const IMAGE_KEY: MapKey = 1 << 63;
const IMAGE_SHIFT: u32 = 40;
/// Most pages of an image that can be shared (4 PiB).
const MAX_IMAGE_PAGES: u64 = 1 << IMAGE_SHIFT;
/// Most images a domain can tell apart in its keys (bits 40..63).
const MAX_IMAGES: u32 = 1 << (63 - IMAGE_SHIFT);

fn image_key(image: ImageId, file_page: u64) -> MapKey {
    IMAGE_KEY | (MapKey::from(image.0) << IMAGE_SHIFT) | file_page
}

/// Whether the VMA model's `key` is a page of `image`.
pub(super) fn is_image_key(key: MapKey, image: ImageId) -> bool {
    key & IMAGE_KEY != 0 && (key & !IMAGE_KEY) >> IMAGE_SHIFT == MapKey::from(image.0)
}

/// The images a domain shares.
#[derive(Default)]
pub(crate) struct Images {
    /// Ids handed out so far: ids are never reused, so a key never names two files.
    opened: u32,
    /// Images no longer shared ([`Domain::stop_sharing`]): their reads are copied.
    pub(super) unshared: HashSet<ImageId>,
}

impl Domain {
    /// A new id for an open image file: call it once per descriptor whose pages will be
    /// mapped (every descriptor is its own image to the kernel's VMAs).
    pub fn open_image(&mut self) -> Result<ImageId, DedupError> {
        if self.images.opened >= MAX_IMAGES {
            return Err(DedupError::TooManyImages(MAX_IMAGES));
        }
        self.images.opened += 1;
        Ok(ImageId(self.images.opened - 1))
    }

    /// Maps `pages` pages of `image` (descriptor `fd`) from byte `offset` over the guest pages
    /// of `vm` from `gpa`, copy-on-write; returns how many leading pages it mapped: none when
    /// the addresses are unaligned or outside guest RAM or the image is no longer shared, fewer
    /// when the VMA budget is spent or the run leaves its RAM region (the caller copies the rest).
    pub fn map_image(
        &mut self,
        vm: VmId,
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
        let Some((region, first, host)) = self.vms.get(&vm).and_then(|v| v.locate(gpa)) else { return 0 };
        let region_pages = self.vms.get(&vm).map_or(0, |v| v.regions[region].len / PAGE_SIZE);
        let pages = pages.min(region_pages - first);
        // Book page by page while the VMA budget allows.
        let allowance = self.vma_allowance();
        let mut bookings = Vec::with_capacity(pages);
        for k in 0..pages {
            let key = image_key(image, offset / page_size + k as u64);
            let Some(state) = self.vms.get_mut(&vm) else { break };
            let rv = &mut state.vmas[region];
            let delta = rv.delta(first + k, key);
            if delta > 0 && self.vmas + delta as usize > allowance {
                self.counters.image_no_room += 1;
                self.warn_vma_budget(vm);
                break;
            }
            let booking = rv.map(first + k, key);
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
        let mapped = unsafe {
            libc::mmap(
                host as *mut libc::c_void,
                n * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            log::warn!(
                "dedup {}: mmap of {n} image pages at {gpa:#x} failed ({}); copying",
                self.name,
                std::io::Error::last_os_error()
            );
            if let Some(state) = self.vms.get_mut(&vm) {
                for (k, booking) in bookings.into_iter().enumerate().rev() {
                    state.vmas[region].unbook_failed(first + k, booking);
                }
            }
            self.reconcile_vmas();
            return 0;
        }
        // The pages map the image now: a store slot one of them mapped is no longer needed.
        let mut released = Vec::new();
        if let Some(state) = self.vms.get_mut(&vm) {
            for k in 0..n {
                let g = gpa + (k * PAGE_SIZE) as u64;
                if let Some(slot) = state.merged.remove(g) {
                    released.push(slot);
                }
                state.suspects.remove(&g);
                state.image_pages.insert(g, image_key(image, offset / page_size + k as u64));
            }
        }
        self.release(vm, &released);
        self.counters.image_mapped += n as u64;
        n
    }

    /// An fphash report of a page that maps an image page: `Some(Already)` while it still does
    /// (no hash, no mapping); `None` once the guest wrote it (it is a page like any other).
    pub(super) fn check_image_page(&mut self, id: VmId, gpa: u64, host: usize) -> Option<MergeStatus> {
        let vm = self.vms.get(&id)?;
        vm.image_pages.get(&gpa)?;
        let copied = self.pagemap.state(host).map(|s| s.is_copied()).unwrap_or(false);
        let vm = self.vms.get_mut(&id)?;
        if copied {
            vm.image_pages.remove(&gpa);
            vm.suspects.remove(&gpa);
            self.counters.image_cow_breaks += 1;
            return None;
        }
        self.counters.image_already += 1;
        Some(MergeStatus::Already)
    }
}
