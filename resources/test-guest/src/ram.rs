//! Guest RAM from the PVH memory map, and a bump allocator over the free RAM after the guest
//! image (the test modes' "page cache" and bookkeeping live there).
//!
//! Only RAM below the MMIO gap (0xc000_0000) is used: the start-up code identity-maps 0-4 GiB,
//! so RAM from 4 GiB on (`--mem` above 3 GiB) is not addressable here.

use crate::virtio::Error;

/// Offsets in `struct hvm_start_info` version 1 (xen/include/public/arch-x86/hvm/start_info.h).
const VERSION_OFFSET: u64 = 4;
const MEMMAP_PADDR_OFFSET: u64 = 40;
const MEMMAP_ENTRIES_OFFSET: u64 = 48;
/// `struct hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_BYTES: u64 = 24;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// Most memory-map entries read.
const MAX_RANGES: usize = 16;
/// Start of the MMIO gap (docs/guest-interface.md): the end of identity-mapped RAM here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Page size.
pub const PAGE: u64 = 4096;

extern "C" {
    /// End of the loaded image, its .bss and stacks (link.ld).
    static __image_end: u8;
}

/// RAM ranges `[start, end)` of the PVH memory map.
pub struct RamMap {
    ranges: [(u64, u64); MAX_RANGES],
    count: usize,
}

impl RamMap {
    /// Reads the memory map `hvm_start_info` (version 1 or later) points at.
    pub fn read(start_info: u64) -> Result<RamMap, Error> {
        // SAFETY: hvm_start_info and its memory map are identity-mapped RAM the loader wrote
        // (the command-line parser has already checked the magic).
        let (version, paddr, entries) = unsafe {
            (
                ((start_info + VERSION_OFFSET) as *const u32).read_volatile(),
                ((start_info + MEMMAP_PADDR_OFFSET) as *const u64).read_volatile(),
                ((start_info + MEMMAP_ENTRIES_OFFSET) as *const u32).read_volatile(),
            )
        };
        if version < 1 || paddr == 0 || entries == 0 {
            return Err("no PVH memory map (hvm_start_info version 0 or empty)");
        }
        let mut map = RamMap { ranges: [(0, 0); MAX_RANGES], count: 0 };
        for i in 0..entries as u64 {
            let e = paddr + i * MEMMAP_ENTRY_BYTES;
            // SAFETY: as above; `entries` entries follow `paddr`.
            let (addr, size, kind) = unsafe {
                (
                    (e as *const u64).read_volatile(),
                    ((e + 8) as *const u64).read_volatile(),
                    ((e + 16) as *const u32).read_volatile(),
                )
            };
            if kind == E820_RAM && size > 0 && map.count < MAX_RANGES {
                map.ranges[map.count] = (addr, addr.saturating_add(size));
                map.count += 1;
            }
        }
        Ok(map)
    }

    /// The RAM ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.count]
    }

    /// The end of the highest RAM range.
    pub fn end(&self) -> u64 {
        self.ranges().iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// The free RAM after the guest image: from the image end (page-aligned) to the end of the
    /// RAM range holding it, below the MMIO gap.
    pub fn arena(&self) -> Result<Arena, Error> {
        let image_end = &raw const __image_end as u64;
        let start = image_end.next_multiple_of(PAGE);
        let &(_, end) = self
            .ranges()
            .iter()
            .find(|r| r.0 <= start && start <= r.1)
            .ok_or("the guest image is not in a RAM range of the memory map")?;
        let end = end.min(MMIO_GAP_START) & !(PAGE - 1);
        Ok(Arena { start, next: start, end: end.max(start) })
    }
}

/// Bump allocator of page-aligned, identity-mapped free RAM. Nothing is ever freed.
pub struct Arena {
    pub start: u64,
    next: u64,
    pub end: u64,
}

impl Arena {
    /// Bytes still free.
    pub fn free(&self) -> u64 {
        self.end - self.next
    }

    /// `bytes` (rounded up to pages) of free RAM, or None.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let len = bytes.checked_next_multiple_of(PAGE)?;
        if len > self.free() {
            return None;
        }
        let at = self.next;
        self.next += len;
        Some(at)
    }

    /// `n` pages of free RAM, or None.
    pub fn alloc_pages(&mut self, n: u64) -> Option<u64> {
        self.alloc(n.checked_mul(PAGE)?)
    }
}

/// Page `i` of a region starting at `base`, as a mutable slice.
///
/// # Safety
/// The page is allocated from an [`Arena`] and no other reference to it is live.
pub unsafe fn page<'a>(base: u64, i: u64) -> &'a mut [u8; PAGE as usize] {
    // SAFETY: the caller's contract; identity-mapped RAM.
    unsafe { &mut *((base + i * PAGE) as *mut [u8; PAGE as usize]) }
}
