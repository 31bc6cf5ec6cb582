//! virtio-balloon on the wire (virtio 1.2 §5.5): feature bits (§5.5.3), the configuration
//! layout (§5.5.4), memory statistics entries (§5.5.6.3, tags §5.5.6.4), and the
//! guest-physical ranges the device reads from inflateq/deflateq PFN arrays (§5.5.6) and from
//! reporting_vq buffers (§5.5.6.7).
//!
//! Contract: every function here reads guest-controlled descriptors and bytes; none panics on
//! them, none allocates past the limits its caller gave (buffers are passed in), and a
//! [`GuestRange`] that comes out is 4 KiB-aligned, non-empty and lies in a single guest RAM
//! region. Chain-level faults come back as [`ChainError`], range-level ones as
//! [`RangeError`]; counting and logging them is the device's job (`super`).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Virtio device ID of the traditional memory balloon (virtio 1.2 §5.5.1).
pub const DEVICE_ID: u32 = 5;

/// VIRTIO_BALLOON_F_MUST_TELL_HOST (bit 0, §5.5.3): never offered. Without it the driver may
/// reuse deflated pages before the device acknowledges the deflate, which costs this device
/// nothing: it discards pages when they are inflated, not when they come back.
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// VIRTIO_BALLOON_F_STATS_VQ (bit 1, §5.5.3): the statsq exists.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM (bit 2, §5.5.3): the driver may take pages back from the
/// balloon when the guest runs out of memory, below the target.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// VIRTIO_BALLOON_F_FREE_PAGE_HINT (bit 3, §5.5.3): never offered (a migration aid).
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// VIRTIO_BALLOON_F_PAGE_POISON (bit 4, §5.5.3): never offered, so `poison_val` reads as 0.
pub const F_PAGE_POISON: u64 = 1 << 4;
/// VIRTIO_BALLOON_F_PAGE_REPORTING (bit 5, §5.5.3; Linux calls it `VIRTIO_BALLOON_F_REPORTING`):
/// the reporting_vq exists.
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// PFNs count 4 KiB pages whatever the guest's page size (§5.5.6, footnote: "historical").
pub const PFN_SHIFT: u32 = 12;
/// The page a balloon PFN counts: 4 KiB by the spec, which is also the guest page here.
pub const PFN_PAGE: u64 = 1 << PFN_SHIFT;
const _: () = assert!(PFN_PAGE == crate::PAGE_SIZE as u64, "PFNs count guest pages");
/// Bytes of one PFN in an inflateq/deflateq array (le32).
pub const PFN_LEN: usize = 4;

/// Offset of `num_pages` (le32, written by the device: the target) in the configuration
/// space (§5.5.4).
pub const CONFIG_NUM_PAGES: u64 = 0;
/// Offset of `actual` (le32, written by the driver: pages in the balloon).
pub const CONFIG_ACTUAL: u64 = 4;
/// Offset of `free_page_hint_cmd_id` (le32): meaningful only with [`F_FREE_PAGE_HINT`]; reads
/// as 0 here.
pub const CONFIG_FREE_PAGE_HINT_CMD_ID: u64 = 8;
/// Offset of `poison_val` (le32): meaningful only with [`F_PAGE_POISON`]; reads as 0 here.
pub const CONFIG_POISON_VAL: u64 = 12;
/// Length of `struct virtio_balloon_config`.
pub const CONFIG_LEN: usize = 16;

/// The configuration space's bytes for a target of `num_pages` and the driver's `actual`.
pub fn config_bytes(num_pages: u32, actual: u32) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    b[..4].copy_from_slice(&num_pages.to_le_bytes());
    b[4..8].copy_from_slice(&actual.to_le_bytes());
    b
}

/// Length of one `struct virtio_balloon_stat` (`le16 tag; le64 val;`, packed: §5.5.6.3).
pub const STAT_LEN: usize = 10;

/// VIRTIO_BALLOON_S_SWAP_IN (§5.5.6.4): bytes swapped in.
pub const S_SWAP_IN: u16 = 0;
/// VIRTIO_BALLOON_S_SWAP_OUT: bytes swapped out.
pub const S_SWAP_OUT: u16 = 1;
/// VIRTIO_BALLOON_S_MAJFLT: major page faults.
pub const S_MAJFLT: u16 = 2;
/// VIRTIO_BALLOON_S_MINFLT: minor page faults.
pub const S_MINFLT: u16 = 3;
/// VIRTIO_BALLOON_S_MEMFREE: bytes not used for any purpose.
pub const S_MEMFREE: u16 = 4;
/// VIRTIO_BALLOON_S_MEMTOT: total bytes of memory.
pub const S_MEMTOT: u16 = 5;
/// VIRTIO_BALLOON_S_AVAIL: bytes available for new applications without swapping.
pub const S_AVAIL: u16 = 6;
/// VIRTIO_BALLOON_S_CACHES: bytes reclaimable without I/O (mostly the page cache).
pub const S_CACHES: u16 = 7;
/// VIRTIO_BALLOON_S_HTLB_PGALLOC: successful hugetlb page allocations.
pub const S_HTLB_PGALLOC: u16 = 8;
/// VIRTIO_BALLOON_S_HTLB_PGFAIL: failed hugetlb page allocations.
pub const S_HTLB_PGFAIL: u16 = 9;
/// VIRTIO_BALLOON_S_OOM_KILL: OOM killer invocations. Tags 10 to 15 are Linux's (6.12,
/// `include/uapi/linux/virtio_balloon.h`), not virtio 1.2's; Linux sends them.
pub const S_OOM_KILL: u16 = 10;
/// VIRTIO_BALLOON_S_ALLOC_STALL: allocation stalls.
pub const S_ALLOC_STALL: u16 = 11;
/// VIRTIO_BALLOON_S_ASYNC_SCAN: bytes scanned by kswapd.
pub const S_ASYNC_SCAN: u16 = 12;
/// VIRTIO_BALLOON_S_DIRECT_SCAN: bytes scanned by direct reclaim.
pub const S_DIRECT_SCAN: u16 = 13;
/// VIRTIO_BALLOON_S_ASYNC_RECLAIM: bytes reclaimed by kswapd.
pub const S_ASYNC_RECLAIM: u16 = 14;
/// VIRTIO_BALLOON_S_DIRECT_RECLAIM: bytes reclaimed by direct reclaim.
pub const S_DIRECT_RECLAIM: u16 = 15;

/// The guest's latest memory statistics (§5.5.6.4), as the driver reported them: `None` for a
/// statistic the driver does not supply (all are optional). Sizes are in bytes, the others
/// are counts since the guest booted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestMemoryStats {
    /// Bytes swapped in ([`S_SWAP_IN`]).
    pub swap_in: Option<u64>,
    /// Bytes swapped out ([`S_SWAP_OUT`]).
    pub swap_out: Option<u64>,
    /// Major page faults ([`S_MAJFLT`]).
    pub major_faults: Option<u64>,
    /// Minor page faults ([`S_MINFLT`]).
    pub minor_faults: Option<u64>,
    /// Free bytes ([`S_MEMFREE`]).
    pub free_memory: Option<u64>,
    /// Total bytes ([`S_MEMTOT`]).
    pub total_memory: Option<u64>,
    /// Available bytes ([`S_AVAIL`]).
    pub available_memory: Option<u64>,
    /// Disk cache bytes ([`S_CACHES`]).
    pub disk_caches: Option<u64>,
    /// Hugetlb allocations ([`S_HTLB_PGALLOC`]).
    pub hugetlb_allocations: Option<u64>,
    /// Hugetlb allocation failures ([`S_HTLB_PGFAIL`]).
    pub hugetlb_failures: Option<u64>,
    /// OOM kills ([`S_OOM_KILL`]).
    pub oom_kills: Option<u64>,
    /// Allocation stalls ([`S_ALLOC_STALL`]).
    pub alloc_stalls: Option<u64>,
    /// Bytes scanned by kswapd ([`S_ASYNC_SCAN`]).
    pub async_scans: Option<u64>,
    /// Bytes scanned by direct reclaim ([`S_DIRECT_SCAN`]).
    pub direct_scans: Option<u64>,
    /// Bytes reclaimed by kswapd ([`S_ASYNC_RECLAIM`]).
    pub async_reclaims: Option<u64>,
    /// Bytes reclaimed by direct reclaim ([`S_DIRECT_RECLAIM`]).
    pub direct_reclaims: Option<u64>,
}

impl GuestMemoryStats {
    /// Records one entry; false (and no change) for a tag this device does not know, which
    /// §5.5.6.3 requires it to ignore.
    pub fn set(&mut self, tag: u16, val: u64) -> bool {
        match self.field(tag) {
            Some(field) => {
                *field = Some(val);
                true
            }
            None => false,
        }
    }

    /// The statistic of `tag`: `None` if the driver did not supply it or the tag is unknown.
    pub fn get(&self, tag: u16) -> Option<u64> {
        match tag {
            S_SWAP_IN => self.swap_in,
            S_SWAP_OUT => self.swap_out,
            S_MAJFLT => self.major_faults,
            S_MINFLT => self.minor_faults,
            S_MEMFREE => self.free_memory,
            S_MEMTOT => self.total_memory,
            S_AVAIL => self.available_memory,
            S_CACHES => self.disk_caches,
            S_HTLB_PGALLOC => self.hugetlb_allocations,
            S_HTLB_PGFAIL => self.hugetlb_failures,
            S_OOM_KILL => self.oom_kills,
            S_ALLOC_STALL => self.alloc_stalls,
            S_ASYNC_SCAN => self.async_scans,
            S_DIRECT_SCAN => self.direct_scans,
            S_ASYNC_RECLAIM => self.async_reclaims,
            S_DIRECT_RECLAIM => self.direct_reclaims,
            _ => None,
        }
    }

    /// The field of a known tag.
    fn field(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            S_SWAP_IN => &mut self.swap_in,
            S_SWAP_OUT => &mut self.swap_out,
            S_MAJFLT => &mut self.major_faults,
            S_MINFLT => &mut self.minor_faults,
            S_MEMFREE => &mut self.free_memory,
            S_MEMTOT => &mut self.total_memory,
            S_AVAIL => &mut self.available_memory,
            S_CACHES => &mut self.disk_caches,
            S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            S_OOM_KILL => &mut self.oom_kills,
            S_ALLOC_STALL => &mut self.alloc_stalls,
            S_ASYNC_SCAN => &mut self.async_scans,
            S_DIRECT_SCAN => &mut self.direct_scans,
            S_ASYNC_RECLAIM => &mut self.async_reclaims,
            S_DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => return None,
        })
    }
}

/// What [`parse_stats`] found in a buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsParse {
    /// Whole entries with a known tag.
    pub known: usize,
    /// Whole entries with a tag this device does not know (ignored).
    pub unknown: usize,
    /// Bytes after the last whole entry (ignored): the buffer's length is not a multiple of
    /// [`STAT_LEN`].
    pub trailing: usize,
}

/// Reads the entries of a statsq buffer into `stats`, in order (a tag given twice keeps its
/// last value: §5.5.6.3 lets the driver supply entries in any order).
pub fn parse_stats(bytes: &[u8], stats: &mut GuestMemoryStats) -> StatsParse {
    let entries = bytes.chunks_exact(STAT_LEN);
    let mut found = StatsParse { trailing: entries.remainder().len(), ..StatsParse::default() };
    for e in entries {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut val = [0u8; 8];
        val.copy_from_slice(&e[2..]);
        if stats.set(tag, u64::from_le_bytes(val)) {
            found.known += 1;
        } else {
            found.unknown += 1;
        }
    }
    found
}

/// A guest-physical range handed to the backend: 4 KiB-aligned, a non-zero multiple of
/// 4 KiB long, inside one guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestRange {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// One past the last byte (saturating: the device only builds ranges that fit).
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.len)
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.len / PFN_PAGE
    }
}

/// Why a chain was returned to the driver unused (nothing of it reached the backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No descriptor at all: the head index names none that virtio-queue could read.
    #[error("the head index names no readable descriptor")]
    Empty,
    /// A loop, a `next` outside the table or an unreadable descriptor ended the chain early.
    #[error("the chain is broken (a loop, a next index outside the table, or an unreadable descriptor)")]
    Broken,
    /// More descriptors than the device accepts in one chain.
    #[error("more than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A device-writable descriptor in a chain the device only reads (inflateq, deflateq,
    /// statsq).
    #[error("descriptor {0} is device-writable where the device reads")]
    Writable(usize),
    /// A device-readable descriptor in a reporting chain, whose pages the device may change
    /// (§5.5.6.7 has the driver report pages as writable buffers).
    #[error("descriptor {0} is device-readable where the device may change the pages")]
    ReadOnly(usize),
    /// A PFN-array descriptor whose length is not a multiple of 4 bytes.
    #[error("descriptor {index} of {len} bytes is not a whole number of 4-byte PFNs")]
    PartialPfn {
        /// Position in the chain.
        index: usize,
        /// Its length.
        len: u32,
    },
    /// The chain's readable bytes exceed what the device accepts.
    #[error("{bytes} bytes, more than the {max} accepted")]
    TooLong {
        /// Bytes in the chain.
        bytes: u64,
        /// The limit.
        max: usize,
    },
    /// A descriptor whose buffer is not guest RAM.
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is outside guest RAM")]
    OutsideRam {
        /// Position in the chain.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// Why one reported range was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Zero bytes long.
    #[error("empty")]
    Empty,
    /// Address or length not a multiple of 4 KiB.
    #[error("not 4 KiB-aligned")]
    Unaligned,
    /// Not inside one guest RAM region (outside RAM, in a hole, or across a region's end).
    #[error("not inside one guest RAM region")]
    OutsideRam,
}

/// Checks the framing common to every queue: a chain of at least one descriptor, not broken,
/// within the descriptor limit (`too_many` is what `crate::collect_chain` returned), every
/// descriptor in the direction the queue needs (`writable`).
pub(crate) fn check_chain(
    descs: &[Descriptor],
    too_many: bool,
    max: usize,
    writable: bool,
) -> Result<(), ChainError> {
    let Some(last) = descs.last() else {
        return Err(ChainError::Empty);
    };
    if last.has_next() {
        return Err(ChainError::Broken);
    }
    if too_many {
        return Err(ChainError::TooManyDescriptors(max));
    }
    match descs.iter().position(|d| d.is_write_only() != writable) {
        Some(i) if writable => Err(ChainError::ReadOnly(i)),
        Some(i) => Err(ChainError::Writable(i)),
        None => Ok(()),
    }
}

/// Copies the bytes of a checked device-readable chain into `buf`; returns how many. Fails
/// if they do not fit or a descriptor is not guest RAM.
pub(crate) fn read_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > buf.len() as u64 {
        return Err(ChainError::TooLong { bytes: total, max: buf.len() });
    }
    let mut at = 0usize;
    for (index, d) in descs.iter().enumerate() {
        let len = d.len() as usize;
        let outside = ChainError::OutsideRam { index, addr: d.addr().0, len: d.len() };
        // In bounds: the total was checked against the buffer above.
        let dst = buf.get_mut(at..at + len).ok_or(outside)?;
        mem.read_slice(dst, d.addr()).map_err(|_| outside)?;
        at += len;
    }
    Ok(at)
}

/// Reads an inflateq/deflateq chain's PFN array (le32 each, §5.5.6) into `pfns` (cleared
/// first), using `buf` for the bytes; at most `buf.len() / 4` PFNs.
pub(crate) fn read_pfns(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    buf: &mut [u8],
    pfns: &mut Vec<u32>,
) -> Result<(), ChainError> {
    pfns.clear();
    // A PFN split between two descriptors is legal in principle, but no driver does it and
    // a length that is not a multiple of 4 is far more likely a wrong buffer.
    if let Some((index, d)) =
        descs.iter().enumerate().find(|(_, d)| !(d.len() as usize).is_multiple_of(PFN_LEN))
    {
        return Err(ChainError::PartialPfn { index, len: d.len() });
    }
    let n = read_chain(mem, descs, buf)?;
    let bytes = buf.get(..n).unwrap_or_default();
    pfns.extend(bytes.chunks_exact(PFN_LEN).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(())
}

/// The end of the guest RAM region holding `gpa`, if any.
fn region_end(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(gpa))?;
    region.start_addr().0.checked_add(region.len())
}

/// `[gpa, gpa + len)` as a range if it is non-empty, 4 KiB-aligned and inside one guest RAM
/// region.
pub fn checked_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<GuestRange, RangeError> {
    if len == 0 {
        return Err(RangeError::Empty);
    }
    if !gpa.is_multiple_of(PFN_PAGE) || !len.is_multiple_of(PFN_PAGE) {
        return Err(RangeError::Unaligned);
    }
    let end = gpa.checked_add(len).ok_or(RangeError::OutsideRam)?;
    match region_end(mem, gpa) {
        Some(region_end) if end <= region_end => Ok(GuestRange { gpa, len }),
        _ => Err(RangeError::OutsideRam),
    }
}

/// The 4 KiB page of `pfn`, if it is guest RAM. A u32 PFN cannot overflow (the largest is
/// 16 TiB); RAM is what decides.
pub fn pfn_range(mem: &GuestMemoryMmap, pfn: u32) -> Option<GuestRange> {
    checked_range(mem, u64::from(pfn) << PFN_SHIFT, PFN_PAGE).ok()
}

/// Sorts `ranges` (each inside one guest RAM region, as [`checked_range`] makes them) and
/// merges those that overlap or touch within the same region, in place: a guest hands pages
/// in allocation order, often scattered, and one call per contiguous run is far cheaper for
/// the backend (an madvise each). Duplicates vanish. Ranges in two adjacent regions stay
/// apart, so each range the backend gets is one host mapping.
pub fn coalesce(mem: &GuestMemoryMmap, ranges: &mut Vec<GuestRange>) {
    ranges.sort_unstable_by_key(|r| (r.gpa, r.len));
    let mut kept = 0usize;
    let mut region_limit = 0u64;
    for i in 0..ranges.len() {
        let r = ranges[i];
        if kept > 0 {
            let last = &mut ranges[kept - 1];
            // Sorted: r starts at or after `last`, so it shares last's region iff it starts
            // before that region's end.
            if r.gpa <= last.end() && r.gpa < region_limit {
                last.len = last.end().max(r.end()) - last.gpa;
                continue;
            }
        }
        region_limit = region_end(mem, r.gpa).unwrap_or(0);
        ranges[kept] = r;
        kept += 1;
    }
    ranges.truncate(kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        // Two adjacent regions, then a hole, then a third.
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x4000),
            (GuestAddress(0x10000), 0x2000),
        ])
        .unwrap()
    }

    fn r(gpa: u64, pages: u64) -> GuestRange {
        GuestRange { gpa, len: pages * PFN_PAGE }
    }

    #[test]
    fn config_layout_is_little_endian_with_zero_tail() {
        let b = config_bytes(0x0102_0304, 0x0a0b_0c0d);
        assert_eq!(b, [4, 3, 2, 1, 0xd, 0xc, 0xb, 0xa, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((CONFIG_ACTUAL, CONFIG_FREE_PAGE_HINT_CMD_ID, CONFIG_POISON_VAL), (4, 8, 12));
    }

    #[test]
    fn stats_parse_known_unknown_and_trailing() {
        let mut bytes = Vec::new();
        for (tag, val) in [(S_MEMFREE, 7u64), (99, 1), (S_MEMFREE, 8), (S_DIRECT_RECLAIM, u64::MAX)] {
            bytes.extend_from_slice(&tag.to_le_bytes());
            bytes.extend_from_slice(&val.to_le_bytes());
        }
        bytes.extend_from_slice(&[1, 2, 3]);
        let mut s = GuestMemoryStats::default();
        let found = parse_stats(&bytes, &mut s);
        assert_eq!(found, StatsParse { known: 3, unknown: 1, trailing: 3 });
        assert_eq!(s.free_memory, Some(8), "the last of a repeated tag wins");
        assert_eq!(s.direct_reclaims, Some(u64::MAX));
        assert_eq!(s.swap_in, None);
        assert_eq!(parse_stats(&[], &mut s), StatsParse::default());
        // `get` reads what `set` wrote, tag for tag.
        for tag in 0..=S_DIRECT_RECLAIM + 1 {
            let mut one = GuestMemoryStats::default();
            let known = one.set(tag, 1000 + u64::from(tag));
            assert_eq!(one.get(tag), known.then_some(1000 + u64::from(tag)), "tag {tag}");
            assert_eq!((0..=S_DIRECT_RECLAIM).filter(|&t| one.get(t).is_some()).count(), usize::from(known));
        }
    }

    #[test]
    fn checked_range_rules() {
        let mem = mem();
        assert_eq!(checked_range(&mem, 0x1000, 0x2000), Ok(r(0x1000, 2)));
        assert_eq!(checked_range(&mem, 0x1000, 0), Err(RangeError::Empty));
        assert_eq!(checked_range(&mem, 0x1001, 0x1000), Err(RangeError::Unaligned));
        assert_eq!(checked_range(&mem, 0x1000, 0x1800), Err(RangeError::Unaligned));
        // Across the boundary of two adjacent regions: two host mappings, refused.
        assert_eq!(checked_range(&mem, 0x3000, 0x2000), Err(RangeError::OutsideRam));
        assert_eq!(checked_range(&mem, 0x8000, 0x1000), Err(RangeError::OutsideRam), "the hole");
        assert_eq!(checked_range(&mem, 0x11000, 0x2000), Err(RangeError::OutsideRam), "past the end");
        assert_eq!(checked_range(&mem, !0xfffu64, 0x1000), Err(RangeError::OutsideRam));
        assert_eq!(checked_range(&mem, 0xffff_f000, !0xfffu64), Err(RangeError::OutsideRam));
        assert_eq!(pfn_range(&mem, 0x11), Some(r(0x11000, 1)));
        assert_eq!(pfn_range(&mem, 0x12), None);
        assert_eq!(pfn_range(&mem, u32::MAX), None);
    }

    #[test]
    fn coalesce_merges_within_a_region_only() {
        let mem = mem();
        let mut v = vec![r(0x2000, 1), r(0x0, 1), r(0x1000, 1), r(0x1000, 1), r(0x3000, 1), r(0x4000, 2)];
        v.extend([r(0x10000, 1), r(0x11000, 1), r(0x5000, 1), r(0x0, 2)]);
        coalesce(&mem, &mut v);
        // [0, 0x4000) in region 0; [0x4000, 0x6000) in region 1 stays apart; region 2 whole.
        assert_eq!(v, [r(0x0, 4), r(0x4000, 2), r(0x10000, 2)]);
        let mut empty = Vec::new();
        coalesce(&mem, &mut empty);
        assert!(empty.is_empty());
    }
}
