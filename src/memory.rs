//! Guest RAM: anonymous private host memory where the VM's layout puts RAM (around the 32-bit
//! MMIO gap), and its registration with KVM as memory slots; [`create_guest_ram`] does it all.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
#[cfg(test)]
use vm_memory::{Bytes, GuestAddress};

use crate::config::size_text;
use crate::dedup::RamRegion;
use crate::x86_64::vm_layout::VmLayout;

/// Errors while creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {bytes} bytes of guest RAM")]
    Allocate {
        /// Requested size.
        bytes: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A snapshot's memory file could not be mapped as guest RAM.
    #[error("cannot map {bytes} bytes of guest RAM from the snapshot's memory file")]
    Map {
        /// Guest RAM size.
        bytes: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// RAM would reach past the guest-physical addresses the vCPUs can use.
    #[error("guest RAM of {} would end at {end:#x}, past the {bits}-bit guest-physical addresses of this host's KVM", size_text(*.bytes))]
    Unaddressable {
        /// Requested size.
        bytes: u64,
        /// Where RAM would end (exclusive).
        end: u64,
        /// The vCPUs' guest-physical address width.
        bits: u8,
    },
    /// madvise(MADV_MERGEABLE) failed (KSM missing from the host kernel?).
    #[error("cannot mark guest RAM at {gpa:#x} mergeable for KSM")]
    Mergeable {
        /// Start of the region.
        gpa: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest RAM slot {slot} at {gpa:#x}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Start of the slot.
        gpa: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM's guest RAM, as `layout` puts it: checked to be within reach of vCPUs with
/// `phys_bits` of guest-physical address (when KVM says), allocated, registered with KVM, and
/// open to KSM's scans with `ksm` (`--dedup ksm`).
pub fn create_guest_ram(
    vm: &VmFd,
    layout: &VmLayout,
    phys_bits: Option<u8>,
    ksm: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(bits) = phys_bits {
        check_addressable(layout, bits)?;
    }
    let mem = create_guest_memory(layout)?;
    register_with_kvm(vm, &mem)?;
    if ksm {
        mark_mergeable(&mem)?;
        warn_if_ksm_stopped();
    }
    Ok(mem)
}

/// A restored VM's guest RAM (docs/snapshot.md, "Restoring"): each region of `layout` maps
/// the snapshot's memory file `memory` privately at the region's place in it, so every VM
/// restored from one snapshot shares the file's page cache until it writes a page (then the
/// page is its own, anonymous memory). The file's holes (the zero pages the snapshot did not
/// write) are mapped anonymous instead: a guest reading one then reads the host's zero page,
/// where reading a hole of the file would put a page of zeros into the page cache. The
/// snapshot's check made sure the file holds exactly this layout's RAM.
pub fn restore_guest_ram(
    vm: &VmFd,
    layout: &VmLayout,
    phys_bits: Option<u8>,
    memory: &std::fs::File,
    ksm: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(bits) = phys_bits {
        check_addressable(layout, bits)?;
    }
    let allocate = |source| MemoryError::Map { bytes: layout.mem_bytes(), source };
    let mut regions = Vec::with_capacity(layout.ram_ranges().len());
    let mut offset = 0u64;
    for &(gpa, len) in layout.ram_ranges() {
        let mapping = map_snapshot_region(memory, offset, len).map_err(allocate)?;
        regions.push(
            GuestRegionMmap::new(mapping, gpa)
                .ok_or_else(|| allocate(vm_memory::mmap::MmapRegionError::InvalidPointer))?,
        );
        offset += len as u64;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|_| allocate(vm_memory::mmap::MmapRegionError::InvalidPointer))?;
    register_with_kvm(vm, &mem)?;
    if ksm {
        // KSM scans the pages a clone wrote (anonymous by then), not the file's.
        mark_mergeable(&mem)?;
        warn_if_ksm_stopped();
    }
    Ok(mem)
}

/// Maps `len` bytes of the snapshot memory file `file` from `offset` privately, without
/// readahead, its holes anonymous ([`map_holes_anonymous`]).
fn map_snapshot_region(
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    use vm_memory::mmap::MmapRegionError;
    let mapping = MmapRegion::build(
        Some(FileOffset::new(file.try_clone().map_err(MmapRegionError::Mmap)?, offset)),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )?;
    // No readahead on the clones' faults: it would read the file's holes around each page
    // into the page cache (20.3 MiB of zeros under 4 Linux clones), pages no clone maps (they
    // read the holes from anonymous memory).
    // SAFETY: advice on the mapping just made; MADV_RANDOM changes no contents.
    if unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_RANDOM) } != 0 {
        return Err(MmapRegionError::Mmap(std::io::Error::last_os_error()));
    }
    map_holes_anonymous(&mapping, file, offset).map_err(MmapRegionError::Mmap)?;
    Ok(mapping)
}

/// Most holes of a snapshot's memory file mapped anonymous per RAM region: each is a VMA or
/// two, counted against `vm.max_map_count` with the merge engine's. A snapshot writes its
/// zero pages as holes that the file system merges into extents (128 holes in a Linux guest of
/// 256 MiB, docs/snapshot.md); holes past this many stay file pages.
const MAX_HOLE_MAPPINGS: usize = 1024;

/// Maps the whole pages of `file`'s holes within `mapping` (which maps `file` from `offset`)
/// as private anonymous memory in place; returns how many holes it mapped. A file system that
/// cannot say where its holes are (`SEEK_HOLE` refused) leaves the mapping as it is.
fn map_holes_anonymous(mapping: &MmapRegion, file: &std::fs::File, offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let page = samepage_virtio::PAGE_SIZE as u64;
    let (fd, len) = (file.as_raw_fd(), mapping.size() as u64);
    let seek = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a descriptor the caller's `File` owns; it moves only the offset.
        let got = unsafe { libc::lseek(fd, at, whence) };
        if got >= 0 {
            return Ok(Some(got as u64));
        }
        match std::io::Error::last_os_error() {
            // Past the last data (SEEK_DATA) or the file's end.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let (mut at, end, mut mapped) = (offset, offset + len, 0);
    while at < end && mapped < MAX_HOLE_MAPPINGS {
        let hole = match seek(at, libc::SEEK_HOLE) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        };
        if hole >= end {
            break;
        }
        let data = seek(hole, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        let (first, last) = (hole.next_multiple_of(page), data / page * page);
        if first < last {
            let host = mapping.as_ptr() as usize + (first - offset) as usize;
            // SAFETY: [host, host + last - first) lies inside `mapping`, which maps the file
            // privately and which no vCPU runs on yet (RAM is registered with KVM after this);
            // the file reads zeros there, as the new anonymous pages do, so nothing the guest
            // will read changes.
            let got = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    (last - first) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            mapped += 1;
        }
        at = data;
    }
    Ok(mapped)
}

/// Makes every guest page of `mem` that still maps `file` (a snapshot's memory file that
/// another process is about to write or truncate) the VM's own anonymous memory with the same
/// bytes: each mapping of the file in guest RAM is copied aside and the copy moved over it
/// (`mremap`), so pages the guest wrote keep what it wrote and the rest keep the file's bytes
/// as they are now. Returns the bytes copied. The caller keeps the vCPUs paused and the
/// devices quiet (nothing may write guest RAM meanwhile).
pub fn copy_file_pages_to_anonymous(mem: &GuestMemoryMmap, file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let ram: Vec<(usize, usize)> =
        mem.iter().map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize)).collect();
    let mut copied = 0u64;
    for (start, end) in maps.lines().filter_map(|line| file_mapping(line, dev, ino)) {
        if !ram.iter().any(|&(a, b)| a <= start && end <= b) {
            continue;
        }
        let len = end - start;
        // SAFETY: a fresh private anonymous mapping of `len` bytes, ours alone.
        let copy = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if copy == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: [start, end) is a readable mapping inside guest RAM (from /proc/self/maps,
        // within a region `mem` keeps mapped) that nothing writes meanwhile (the caller's
        // contract); `copy` is a distinct fresh mapping of the same length.
        unsafe { std::ptr::copy_nonoverlapping(start as *const u8, copy.cast::<u8>(), len) };
        // SAFETY: moves the copy's pages over [start, end), replacing the file mapping there
        // with memory holding the same bytes; KVM's MMU notifier drops its view of the old
        // pages. On failure both mappings stay as they were.
        let moved = unsafe {
            libc::mremap(
                copy,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                start as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: `copy` is still ours and unused.
            unsafe { libc::munmap(copy, len) };
            return Err(e);
        }
        copied += len as u64;
    }
    Ok(copied)
}

/// The address range of a `/proc/self/maps` line that maps the file `(dev, ino)`.
fn file_mapping(line: &str, dev: u64, ino: u64) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let (range, _perms, _offset, device, inode) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let (major, minor) = device.split_once(':')?;
    let (major, minor) = (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
    if inode.parse::<u64>().ok()? != ino || libc::makedev(major, minor) != dev {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some((usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?))
}

/// Checks that vCPUs with `phys_bits` of guest-physical address reach all of guest RAM.
fn check_addressable(layout: &VmLayout, phys_bits: u8) -> Result<(), MemoryError> {
    let end = layout.ram_end();
    if u32::from(phys_bits) < u64::BITS && end > 1u64 << phys_bits {
        return Err(MemoryError::Unaddressable { bytes: layout.mem_bytes(), end, bits: phys_bits });
    }
    Ok(())
}

/// Allocates guest RAM as private anonymous memory (the merge engine later maps shared store
/// pages over parts of it).
pub fn create_guest_memory(layout: &VmLayout) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(layout.ram_ranges())
        .map_err(|source| MemoryError::Allocate { bytes: layout.mem_bytes(), source })
}

/// Registers every RAM region with KVM, one slot each.
fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let gpa = region.start_addr().raw_value();
        let host = region.as_ptr() as u64;
        let size = region.len();
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM keeps alive for as
        // long as the VM fd exists (both live in `Vm`), and slots do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| MemoryError::Register {
            slot,
            gpa,
            source,
        })?;
    }
    Ok(())
}

/// Gives back the pages of guest RAM from `start` to `end` (page aligned; what lies outside
/// RAM is skipped) that hold only zeros, before the VM first runs: a loader that copied them
/// from a file (an ELF kernel's data segment holds zeroed, page-aligned arrays) made each a
/// private page of zeros, which `MADV_DONTNEED` turns back into nothing (anonymous RAM reads
/// zeros again). Pages never written are left alone. Returns how many pages were given back.
/// Only for anonymous RAM that no vCPU runs on yet.
pub fn drop_zero_pages(mem: &GuestMemoryMmap, start: u64, end: u64) -> usize {
    const PAGE: usize = 4096;
    static ZERO: [u8; PAGE] = [0; PAGE];
    let mut dropped = 0;
    for region in mem.iter() {
        let (first, last) = (region.start_addr().raw_value(), region.last_addr().raw_value());
        let from = start.max(first).next_multiple_of(PAGE as u64);
        let to = end.min(last.saturating_add(1)) / PAGE as u64 * PAGE as u64;
        if from >= to || region.file_offset().is_some() {
            continue;
        }
        let base = region.as_ptr() as usize + (from - first) as usize;
        let pages = ((to - from) / PAGE as u64) as usize;
        // Only pages the loader wrote hold memory: a page never touched is not read (which
        // would map the host's zero page for nothing).
        let written = written_pages(base, pages);
        let mut run: Option<usize> = None;
        for page in 0..=pages {
            // SAFETY: page `page` of the region's live mapping (below `pages`); nothing writes
            // guest RAM before the VM runs.
            let zero = page < pages
                && written.get(page).copied().unwrap_or(false)
                && unsafe { std::slice::from_raw_parts((base + page * PAGE) as *const u8, PAGE) } == ZERO;
            match (zero, run) {
                (true, None) => run = Some(page),
                (false, Some(first_zero)) => {
                    let bytes = (page - first_zero) * PAGE;
                    // SAFETY: whole pages of the region's private anonymous mapping that hold
                    // zeros; dropped, they read zeros again.
                    let rc = unsafe {
                        libc::madvise(
                            (base + first_zero * PAGE) as *mut libc::c_void,
                            bytes,
                            libc::MADV_DONTNEED,
                        )
                    };
                    if rc == 0 {
                        dropped += page - first_zero;
                    }
                    run = None;
                }
                _ => {}
            }
        }
    }
    dropped
}

/// Per page from `base`, whether this process wrote it (a private anonymous page present in
/// memory, by `/proc/self/pagemap`); none when the file cannot be read.
fn written_pages(base: usize, pages: usize) -> Vec<bool> {
    use crate::pagemap_entry::{is_written_here, PATH};
    use std::os::unix::fs::FileExt;
    let Ok(pagemap) = std::fs::File::open(PATH) else { return Vec::new() };
    let mut entries = vec![0u8; pages * 8];
    if pagemap.read_exact_at(&mut entries, (base / 4096 * 8) as u64).is_err() {
        return Vec::new();
    }
    entries
        .chunks_exact(8)
        .map(|e| is_written_here(u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])))
        .collect()
}

/// The guest RAM regions as the dedup engine sees them.
pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().raw_value(),
            host_addr: r.as_ptr() as usize,
            len: r.len() as usize,
            // Only a restored VM's RAM maps a file (`restore_guest_ram`).
            maps_snapshot: r.file_offset().is_some(),
        })
        .collect()
}

/// Where Linux says whether KSM runs.
const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Says once per process, clearly, when KSM is not running: `--dedup ksm` then merges
/// nothing, silently otherwise.
fn warn_if_ksm_stopped() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let state = std::fs::read_to_string(KSM_RUN).map(|s| s.trim().to_string());
    if matches!(state.as_deref(), Ok("1")) {
        return;
    }
    WARNED.call_once(|| {
        let why = match &state {
            Ok(v) => format!("{KSM_RUN} is {v}"),
            Err(e) => format!("{KSM_RUN}: {e}"),
        };
        log::warn!(
            "KSM is not running ({why}): --dedup ksm merges nothing until it is started \
             (as root: echo 1 > {KSM_RUN})"
        );
    });
}

/// Lets Linux KSM scan guest RAM (`--dedup ksm`, like cloud-hypervisor's `mergeable=on`).
fn mark_mergeable(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for region in mem.iter() {
        // SAFETY: advice on a mapping `mem` owns; MADV_MERGEABLE changes no contents.
        let rc =
            unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_MERGEABLE) };
        if rc != 0 {
            return Err(MemoryError::Mergeable {
                gpa: region.start_addr().raw_value(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

    /// The pagemap entry of this process's page at `addr`.
    fn pagemap_entry(addr: usize) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut entry = [0u8; 8];
        let pagemap = std::fs::File::open(crate::pagemap_entry::PATH).unwrap();
        pagemap.read_exact_at(&mut entry, (addr / samepage_virtio::PAGE_SIZE * 8) as u64).unwrap();
        u64::from_ne_bytes(entry)
    }

    #[test]
    fn zero_pages_a_loader_wrote_are_given_back_and_the_rest_stays() {
        const PAGE: usize = samepage_virtio::PAGE_SIZE;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        // Written as a loader writes: data pages, and pages of zeros copied from a file.
        for page in 0..16u64 {
            let byte = if page % 3 == 0 { page as u8 + 1 } else { 0 };
            mem.write_slice(&[byte; PAGE], GuestAddress(page * PAGE as u64)).unwrap();
        }
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let resident =
            || crate::residency::resident_in(&[(host, 16 * PAGE)]).unwrap().anonymous_bytes / PAGE as u64;
        assert_eq!(resident(), 16);
        // From page 1 to page 14: pages 0, 14 and 15 are outside, whatever they hold.
        let dropped = drop_zero_pages(&mem, PAGE as u64, 14 * PAGE as u64);
        assert_eq!(dropped, 13 - 4, "pages 1-13 but 3, 6, 9 and 12");
        // Pages never written are neither counted nor read (no zero page gets mapped).
        let untouched = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 * PAGE)]).unwrap();
        assert_eq!(drop_zero_pages(&untouched, 0, 8 * PAGE as u64), 0);
        let untouched_host = untouched.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert!(
            (0..8).all(|p| pagemap_entry(untouched_host + p * PAGE) & crate::pagemap_entry::PM_PRESENT == 0)
        );
        assert_eq!(resident(), 16 - dropped as u64);
        for page in 0..16u64 {
            let mut back = [0xffu8; PAGE];
            mem.read_slice(&mut back, GuestAddress(page * PAGE as u64)).unwrap();
            let byte = if page % 3 == 0 { page as u8 + 1 } else { 0 };
            assert!(back.iter().all(|&b| b == byte), "page {page}");
        }
    }

    #[test]
    fn holes_of_a_snapshot_file_read_zeros_from_anonymous_memory_and_data_from_the_file() {
        use crate::pagemap_entry::{PM_FILE, PM_PRESENT};
        use std::os::unix::fs::FileExt;
        const PAGE: usize = samepage_virtio::PAGE_SIZE;
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(16 * PAGE as u64).unwrap();
        let data_pages = [0usize, 5, 15];
        for &p in &data_pages {
            file.write_all_at(&[p as u8 + 1; PAGE], (p * PAGE) as u64).unwrap();
        }
        // The whole file, and a region mapping it from page 4 (as a second RAM region does).
        for (from, pages, holes) in [(0usize, 16usize, 2usize), (4, 8, 2)] {
            let mapping = MmapRegion::build(
                Some(FileOffset::new(file.try_clone().unwrap(), (from * PAGE) as u64)),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .unwrap();
            assert_eq!(map_holes_anonymous(&mapping, &file, (from * PAGE) as u64).unwrap(), holes);
            for page in 0..pages {
                let host = mapping.as_ptr() as usize + page * PAGE;
                // SAFETY: a page of `mapping`, readable, which nothing else writes.
                let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE) };
                let in_file = from + page;
                let want = if data_pages.contains(&in_file) { in_file as u8 + 1 } else { 0 };
                assert!(bytes.iter().all(|&b| b == want), "page {in_file} of the file");
                let entry = pagemap_entry(host);
                assert_ne!(entry & PM_PRESENT, 0, "page {in_file} was read");
                assert_eq!(
                    entry & PM_FILE != 0,
                    data_pages.contains(&in_file),
                    "page {in_file}: a file page?"
                );
            }
        }
    }

    /// Pages of `file` in the page cache (`mincore` over a fresh shared mapping).
    fn cached_pages(file: &std::fs::File, pages: usize) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        const PAGE: usize = samepage_virtio::PAGE_SIZE;
        // SAFETY: a new read-only shared mapping of the file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        // SAFETY: `vec` has one byte per page of the mapping.
        assert_eq!(unsafe { libc::mincore(addr, pages * PAGE, vec.as_mut_ptr()) }, 0);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(addr, pages * PAGE) };
        vec.iter().map(|v| v & 1 != 0).collect()
    }

    #[test]
    fn a_clone_reading_its_snapshot_reads_no_hole_into_the_page_cache() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        const PAGE: usize = samepage_virtio::PAGE_SIZE;
        const PAGES: usize = 64;
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len((PAGES * PAGE) as u64).unwrap();
        for p in [0usize, 1, 40] {
            file.write_all_at(&[p as u8 + 1; PAGE], (p * PAGE) as u64).unwrap();
        }
        file.sync_all().unwrap();
        // SAFETY: advice on a descriptor we own; it only drops clean page cache.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if cached_pages(&file, PAGES).iter().any(|&c| c) {
            eprintln!("skipped: the file system kept the file's pages cached after POSIX_FADV_DONTNEED");
            return;
        }
        let mapping = map_snapshot_region(&file, 0, PAGES * PAGE).unwrap();
        for p in 0..PAGES {
            // SAFETY: a page of `mapping`, readable, which nothing else writes.
            let first =
                unsafe { std::ptr::read_volatile((mapping.as_ptr() as usize + p * PAGE) as *const u8) };
            assert_eq!(first, if [0, 1, 40].contains(&p) { p as u8 + 1 } else { 0 }, "page {p}");
        }
        let cached = cached_pages(&file, PAGES);
        let holes_cached: Vec<usize> =
            (0..PAGES).filter(|&p| cached[p] && ![0, 1, 40].contains(&p)).collect();
        assert!(holes_cached.is_empty(), "holes read into the page cache: {holes_cached:?}");
        assert!(cached[0] && cached[1] && cached[40], "the data pages are the file's: {cached:?}");
    }

    #[test]
    fn guest_pages_mapping_a_file_become_anonymous_with_the_same_bytes_and_the_file_can_go() {
        use crate::pagemap_entry::PM_FILE;
        use std::os::unix::fs::FileExt;
        const PAGE: usize = samepage_virtio::PAGE_SIZE;
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        for p in 0..8u8 {
            file.write_all_at(&[p + 1; PAGE], u64::from(p) * PAGE as u64).unwrap();
        }
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            8 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap()])
                .unwrap();
        // The guest wrote page 3; the rest read the file.
        mem.write_slice(&[0xee; 16], GuestAddress(3 * PAGE as u64)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let mut first = [0u8; 1];
        mem.read_slice(&mut first, GuestAddress(0)).unwrap();
        assert_ne!(pagemap_entry(host) & PM_FILE, 0, "page 0 reads the file");
        assert_eq!(copy_file_pages_to_anonymous(&mem, &file).unwrap(), 8 * PAGE as u64);
        file.set_len(0).unwrap();
        for p in 0..8usize {
            let mut page = [0u8; PAGE];
            mem.read_slice(&mut page, GuestAddress((p * PAGE) as u64)).unwrap();
            let want = if p == 3 { 0xee } else { p as u8 + 1 };
            assert_eq!(page[0], want, "page {p}");
            assert_eq!(page[PAGE - 1], p as u8 + 1, "page {p}'s end");
            assert_eq!(pagemap_entry(host + p * PAGE) & PM_FILE, 0, "page {p} is anonymous");
        }
        assert_eq!(copy_file_pages_to_anonymous(&mem, &file).unwrap(), 0, "nothing maps the file now");
    }

    #[test]
    fn the_largest_ram_needs_41_address_bits() {
        let max = VmLayout::new(crate::config::MAX_MEM_BYTES, 0);
        assert_eq!(max.ram_end(), max.mem_bytes() + (MMIO_GAP_END - MMIO_GAP_START));
        assert!(check_addressable(&max, 41).is_ok());
        assert!(matches!(check_addressable(&max, 40), Err(MemoryError::Unaddressable { bits: 40, .. })));
        assert!(check_addressable(&VmLayout::new(256 << 20, 0), 32).is_ok());
    }
}
