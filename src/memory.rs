//! Guest RAM: anonymous private host memory where the VM's layout puts RAM (around the 32-bit
//! MMIO gap), and its registration with KVM as memory slots; [`create_guest_ram`] does it all.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

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
/// page is its own, anonymous memory). The snapshot's check made sure the file holds exactly
/// this layout's RAM.
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
        let file = memory.try_clone().map_err(|e| allocate(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(allocate)?;
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

/// The guest RAM regions as the dedup engine sees them.
pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().raw_value(),
            host_addr: r.as_ptr() as usize,
            len: r.len() as usize,
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

    #[test]
    fn the_largest_ram_needs_41_address_bits() {
        let max = VmLayout::new(crate::config::MAX_MEM_BYTES, 0);
        assert_eq!(max.ram_end(), max.mem_bytes() + (MMIO_GAP_END - MMIO_GAP_START));
        assert!(check_addressable(&max, 41).is_ok());
        assert!(matches!(check_addressable(&max, 40), Err(MemoryError::Unaddressable { bits: 40, .. })));
        assert!(check_addressable(&VmLayout::new(256 << 20, 0), 32).is_ok());
    }
}
