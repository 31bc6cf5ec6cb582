//! Mapping file pages over guest pages, copy-on-write: store slots (merging) and image pages
//! (image sharing) alike.
//!
//! `merge` verifies pages one by one but maps them in runs: consecutive guest pages that take
//! consecutive store slots become one `mmap(MAP_PRIVATE | MAP_FIXED)` (one VMA operation
//! instead of one per page).

use std::io;
use std::os::fd::RawFd;

use super::domain::Place;
use super::image_ids::ImageId;
use super::store::Store;
use super::vma::Booking;
use super::words::{Slot, PAGE_SIZE};

/// One verified page booked as merged, waiting for its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Booked {
    /// Index of its record in the batch.
    pub(crate) record: usize,
    /// Its guest-physical address.
    pub(crate) gpa: u64,
    /// Where it lies in guest RAM.
    pub(crate) at: Place,
    /// What its VMA accounting changed.
    pub(crate) booking: Booking,
    /// The slot the page mapped before, when it was merged before and then copied on write:
    /// its reference drops once the new mapping is in place.
    pub(crate) replaces: Option<Slot>,
    /// The image page the page mapped before, when it merges by its content.
    pub(crate) image: Option<(ImageId, u64)>,
}

/// Verified pages waiting to be mapped: host pages `host..` get slots `slot..`.
#[derive(Default)]
pub(crate) struct PendingRun {
    host: usize,
    slot: Slot,
    /// The pages, in page order.
    pages: Vec<Booked>,
}

impl PendingRun {
    /// Whether no page waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Adds the page at `host` with `slot` if it continues the run; false when it does not.
    pub(crate) fn try_extend(&mut self, host: usize, slot: Slot, booked: Booked) -> bool {
        let n = self.pages.len();
        if n == 0 {
            (self.host, self.slot) = (host, slot);
        } else if host != self.host + n * PAGE_SIZE || Some(slot) != self.slot.checked_add(n as Slot) {
            return false;
        }
        self.pages.push(booked);
        true
    }

    /// Empties the run: its first host page, first slot and pages.
    pub(crate) fn take(&mut self) -> (usize, Slot, Vec<Booked>) {
        (self.host, self.slot, std::mem::take(&mut self.pages))
    }
}

/// Byte offset of a store slot in the store.
pub(crate) fn slot_offset(slot: Slot) -> u64 {
    Store::offset(slot) as u64
}

/// Maps `pages` pages of the file `fd` from byte `offset` over the guest pages from `host`,
/// `MAP_PRIVATE | MAP_FIXED`: the guest reads the file's pages until it writes one, which
/// copies it.
///
/// # Safety
/// The host range must lie in guest RAM registered with the domain (the caller's to replace,
/// with no Rust references into it), and the file pages must hold exactly the bytes the guest
/// pages hold (or, for a read the guest asked for, the bytes it asked for), with nothing
/// writing the guest pages since they were compared.
pub(crate) unsafe fn map_file(host: usize, pages: usize, fd: RawFd, offset: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: the caller guarantees the range is ours to replace with identical content.
    let mapped = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps `pages` pages of the image file `fd` from byte `offset` over the guest pages from
/// `host`, as [`map_file`], with the page cache kept to exactly those pages: the kernel is
/// asked to read them (`POSIX_FADV_WILLNEED`, one request for the run, in single-page folios)
/// and the mapping reads nothing around a fault (`MADV_RANDOM`). A fault's usual read-around
/// would cache pages no guest asked for, in folios of up to 2 MiB that one page still mapped
/// keeps whole once the rest merged by content (`docs/fphash.md`, "Read-only images").
///
/// # Safety
/// As [`map_file`].
pub(crate) unsafe fn map_image_file(host: usize, pages: usize, fd: RawFd, offset: u64) -> io::Result<()> {
    let len = pages * PAGE_SIZE;
    if let (Ok(start), Ok(bytes)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        // SAFETY: plain syscall on the image's descriptor; it only starts reading into the
        // page cache. A hint: the fault reads a page it did not bring.
        unsafe { libc::posix_fadvise(fd, start, bytes, libc::POSIX_FADV_WILLNEED) };
    }
    // SAFETY: the caller's contract, which is map_file's.
    unsafe { map_file(host, pages, fd, offset) }?;
    // SAFETY: the range was just mapped from the image; the advice changes no data, only how
    // its faults read. A hint: without it a fault reads around.
    unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_RANDOM) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::vma::PageMap;

    fn booked(record: usize) -> Booked {
        Booked {
            record,
            gpa: 0,
            at: Place { region: 0, page: 0, host: 0 },
            booking: Booking { before: PageMap::Anon, delta: 0 },
            replaces: None,
            image: None,
        }
    }

    #[test]
    fn runs_need_consecutive_hosts_and_slots() {
        let mut run = PendingRun::default();
        assert!(run.try_extend(0x10000, 5, booked(0)));
        assert!(run.try_extend(0x11000, 6, booked(2)));
        assert!(!run.try_extend(0x12000, 9, booked(3)));
        assert!(!run.try_extend(0x13000, 7, booked(3)));
        let (host, slot, pages) = run.take();
        assert_eq!(
            (host, slot, pages.iter().map(|b| b.record).collect::<Vec<_>>()),
            (0x10000, 5, vec![0, 2])
        );
        assert!(run.is_empty());
    }
}
