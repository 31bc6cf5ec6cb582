//! The store: one memfd holding the canonical copy of every merged page of a dedup domain.
//!
//! The memfd is mapped once, shared and read-write, over a reservation as large as the store
//! may ever grow (`max_pages`), so slot addresses never move; its size grows with `ftruncate`
//! in [`GROW_CHUNK_PAGES`] steps and only pages actually written take memory. Guest pages map
//! slots privately (copy-on-write) at `slot * PAGE_SIZE`. A slot nobody references any more is
//! freed with `fallocate(PUNCH_HOLE | KEEP_SIZE)`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;

use super::error::DedupError;
use super::words::{Slot, PAGE_SIZE};

/// How many slots the memfd grows by at a time (8 MiB of file size; no memory until written).
pub(crate) const GROW_CHUNK_PAGES: usize = 2048;

/// The memfd, its shared mapping, slot allocation and per-slot reference counts.
pub(crate) struct Store {
    file: File,
    base: *mut u8,
    max_pages: usize,
    /// Current file size, in pages.
    size_pages: usize,
    /// Slots at or above the cursor have never been used.
    cursor: usize,
    /// Freed (punched) slots below the cursor that may be used again. A freed slot that some
    /// holder may still map ([`super::shared_pages`]) is not here until it may.
    free: BTreeSet<Slot>,
    /// References (guest pages mapping the slot) per slot below the cursor; 0 = free.
    refs: Vec<u32>,
    /// Slots with at least one reference.
    live: usize,
}

// SAFETY: `base` points to a mapping owned exclusively by this `Store` (nothing else in the
// process holds it); moving the `Store` to another thread moves that ownership with it.
unsafe impl Send for Store {}

impl Store {
    /// Creates the memfd `samepage-store-<domain>` and reserves its shared mapping.
    pub(crate) fn new(domain: &str, max_pages: usize) -> Result<Store, DedupError> {
        let name = format!("samepage-store-{domain}");
        let cname = CString::new(name.clone()).map_err(|_| DedupError::InvalidName(domain.to_string()))?;
        let max_pages = max_pages.clamp(1, Slot::MAX as usize);
        // SAFETY: `cname` is a valid NUL-terminated string; the call only creates a new fd.
        let mut fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_NOEXEC_SEAL) };
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
            // SAFETY: as above.
            fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        }
        if fd < 0 {
            return Err(DedupError::MemfdCreate { name, source: io::Error::last_os_error() });
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        lock_down(&file, &name)?;
        let bytes = max_pages * PAGE_SIZE;
        // SAFETY: a new shared mapping at an address the kernel chooses; it overlaps nothing we
        // own. Pages beyond the file size are never touched (slots are below `size_pages`).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DedupError::MapStore { bytes, source: io::Error::last_os_error() });
        }
        Ok(Store {
            file,
            base: base.cast(),
            max_pages,
            size_pages: 0,
            cursor: 0,
            free: BTreeSet::new(),
            refs: Vec::new(),
            live: 0,
        })
    }

    /// The memfd, for mapping slots over guest pages.
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A new read-only descriptor of the memfd, for a client that maps slots copy-on-write:
    /// with it (and the file's mode 0444, see [`lock_down`]) a client that is not root and not
    /// the store's owner cannot write, grow, seal or punch the store, or reopen it writable.
    pub(crate) fn client_fd(&self) -> Result<File, DedupError> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        File::open(&path).map_err(DedupError::ClientFd)
    }

    /// Byte offset of `slot` in the memfd.
    pub(crate) fn offset(slot: Slot) -> libc::off_t {
        slot as libc::off_t * PAGE_SIZE as libc::off_t
    }

    /// The most slots the store may hold.
    pub(crate) fn max_pages(&self) -> usize {
        self.max_pages
    }

    /// Slots with at least one reference.
    pub(crate) fn live_pages(&self) -> usize {
        self.live
    }

    /// References held on `slot` (0 when free or never used).
    pub(crate) fn refs(&self, slot: Slot) -> u32 {
        self.refs.get(slot as usize).copied().unwrap_or(0)
    }

    /// Bytes of memory the memfd really holds (`st_blocks * 512`).
    pub(crate) fn allocated_bytes(&self) -> Result<u64, DedupError> {
        Ok(self.file.metadata().map_err(DedupError::Stat)?.blocks() * 512)
    }

    /// The contents of a live slot.
    pub(crate) fn page(&self, slot: Slot) -> &[u8] {
        assert!((slot as usize) < self.size_pages, "store slot {slot} beyond the file");
        // SAFETY: the slot lies inside the mapping and below the file size, so the memory is
        // readable; only `write` (through `&mut self`) writes the store and guest mappings are
        // private, so nothing writes it while this borrow of `self` lives.
        unsafe { std::slice::from_raw_parts(self.base.add(slot as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    /// Overwrites the contents of an allocated slot.
    pub(crate) fn write(&mut self, slot: Slot, data: &[u8; PAGE_SIZE]) {
        assert!((slot as usize) < self.size_pages, "store slot {slot} beyond the file");
        // SAFETY: the slot lies inside the mapping and below the file size; `&mut self` means no
        // borrow from `page` is alive, and `data` is a separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(slot as usize * PAGE_SIZE), PAGE_SIZE)
        };
    }

    /// The slot a new page would get, without taking it: the first of `hints` that is free
    /// (so that a guest run continues a contiguous slot run), else the lowest freed slot, else
    /// the next never-used slot. Freed slots go first so that the store (and what the broker
    /// keeps per slot) grows only with the pages it holds, not with how often pages come and
    /// go. `None` when the store is full.
    pub(crate) fn pick(&self, hints: &[Option<Slot>]) -> Option<Slot> {
        let usable = |h: Slot| {
            // A hint beyond the cursor would leave never-used slots behind: only the cursor.
            (h as usize) < self.max_pages && (h as usize == self.cursor || self.free.contains(&h))
        };
        if let Some(h) = hints.iter().flatten().copied().find(|&h| usable(h)) {
            return Some(h);
        }
        if let Some(&f) = self.free.first() {
            return Some(f);
        }
        (self.cursor < self.max_pages).then_some(self.cursor as Slot)
    }

    /// Takes a slot returned by [`Store::pick`] with one reference, growing the file if needed.
    pub(crate) fn take(&mut self, slot: Slot) -> Result<(), DedupError> {
        let s = slot as usize;
        if s == self.cursor {
            if s >= self.size_pages {
                let new_pages = (self.size_pages + GROW_CHUNK_PAGES).min(self.max_pages);
                let bytes = (new_pages * PAGE_SIZE) as u64;
                self.file.set_len(bytes).map_err(|source| DedupError::Grow { bytes, source })?;
                self.size_pages = new_pages;
            }
            self.cursor += 1;
            self.refs.push(0);
        } else {
            let was_free = self.free.remove(&slot);
            debug_assert!(was_free, "store slot {slot} taken while in use");
        }
        self.refs[s] = 1;
        self.live += 1;
        Ok(())
    }

    /// Adds a reference to a live slot.
    pub(crate) fn add_ref(&mut self, slot: Slot) {
        self.refs[slot as usize] += 1;
    }

    /// Drops `count` references; returns true when the slot has none left (the caller then
    /// forgets its hash and calls [`Store::free`]).
    pub(crate) fn drop_refs(&mut self, slot: Slot, count: u32) -> bool {
        let r = &mut self.refs[slot as usize];
        debug_assert!(*r >= count, "store slot {slot} dropped below zero references");
        *r = r.saturating_sub(count);
        *r == 0
    }

    /// Lets a freed slot be used again.
    pub(crate) fn make_reusable(&mut self, slot: Slot) {
        debug_assert_eq!(self.refs(slot), 0);
        if (slot as usize) < self.cursor {
            self.free.insert(slot);
        }
    }

    /// Frees a slot without references: punches its page out of the memfd. It is used again
    /// only after [`Store::make_reusable`].
    pub(crate) fn free(&mut self, slot: Slot) -> Result<(), DedupError> {
        debug_assert_eq!(self.refs(slot), 0);
        self.live -= 1;
        // SAFETY: plain syscall on our own fd; the range is one page inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                Self::offset(slot),
                PAGE_SIZE as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(DedupError::PunchHole { slot, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Live slots (at least one reference), in order.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.refs.iter().enumerate().filter(|(_, r)| **r > 0).map(|(s, _)| s as Slot)
    }
}

/// Makes the memfd read-only for everyone but its open writable descriptors (mode 0444: a
/// client's read-only descriptor cannot be reopened writable through /proc), and forbids new
/// seals (a write seal would also forbid punching freed pages, for good).
fn lock_down(file: &File, name: &str) -> Result<(), DedupError> {
    let fail = |what: &'static str| DedupError::LockDown {
        name: name.to_string(),
        what,
        source: io::Error::last_os_error(),
    };
    // SAFETY: plain syscalls on our own descriptor.
    if unsafe { libc::fchmod(file.as_raw_fd(), 0o444) } != 0 {
        return Err(fail("fchmod 0444"));
    }
    // SAFETY: as above. EPERM means the memfd allows no sealing at all, which is as good.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SEAL) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return Err(fail("F_SEAL_SEAL"));
    }
    Ok(())
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are those of the mapping made in `new`, which nothing
        // else uses. Guest mappings of the memfd hold their own reference to the file.
        unsafe { libc::munmap(self.base.cast(), self.max_pages * PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_contiguously_and_reuses_freed_slots_when_full() {
        let mut store = Store::new("store-unit", 4).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..4u32 {
            let s = store.pick(&[i.checked_sub(1).map(|p| p + 1)]).unwrap();
            assert_eq!(s, i);
            store.take(s).unwrap();
            page[0] = i as u8 + 1;
            store.write(s, &page);
        }
        assert_eq!(store.allocated_bytes().unwrap(), 4 * PAGE_SIZE as u64);
        assert_eq!(store.pick(&[None]), None);
        assert!(store.drop_refs(2, 1));
        store.free(2).unwrap();
        assert_eq!(store.pick(&[Some(2)]), None, "punched but not yet reusable");
        store.make_reusable(2);
        assert_eq!(store.allocated_bytes().unwrap(), 3 * PAGE_SIZE as u64);
        assert_eq!(store.live_pages(), 3);
        assert_eq!(store.pick(&[Some(9)]), Some(2));
        assert_eq!(store.pick(&[None]), Some(2), "a freed slot goes before a new one");
        assert_eq!(store.pick(&[Some(3), Some(2)]), Some(2));
        assert_eq!(store.page(3)[0], 4);
        assert_eq!(store.live_slots().collect::<Vec<_>>(), vec![0, 1, 3]);
    }
}
