//! The balloon's backend: the pages a guest inflates or reports free go to the VM's dedup
//! domain (`Domain::discard`), which gives their host memory back and makes them read zeros
//! whatever they mapped. `MADV_DONTNEED` alone would not do: on a page that maps a store slot
//! (merged with other VMs) or a page of a shared image it brings back the slot's or the
//! file's bytes, so a guest reusing the page would read another VM's or the image's data, and
//! the store would keep a reference nobody holds.
//!
//! Contract: called on the VM's event loop with the transport's lock held, before the chain
//! that named the pages goes back to the guest, which does not touch them meanwhile. Nothing
//! here fails towards the guest: a failed discard costs host memory only, and is logged
//! (sparsely) and counted.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use samepage_virtio::balloon::{BalloonBackend, Discard, GuestRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::HostCounters;
use crate::bus::lock;
use crate::dedup::{Domain, VmId};

/// Gives a VM's discarded pages back through its dedup domain.
pub struct DomainBackend {
    domain: Arc<Mutex<Domain>>,
    vm: VmId,
    /// Guest RAM, with `--dedup ksm`: pages that get fresh memory are opened to KSM again.
    ksm: Option<GuestMemoryMmap>,
    host: Arc<HostCounters>,
    /// The ranges as the domain takes them, allocated once.
    ranges: Vec<(u64, u64)>,
}

impl DomainBackend {
    /// A backend for VM `vm` of `domain`, counting into `host`. With `ksm_ram` (the VM's
    /// RAM under `--dedup ksm`), pages the domain remapped are marked mergeable again: fresh
    /// memory is not, and KSM would stop scanning them.
    pub fn new(
        domain: Arc<Mutex<Domain>>,
        vm: VmId,
        ksm_ram: Option<GuestMemoryMmap>,
        host: Arc<HostCounters>,
    ) -> DomainBackend {
        DomainBackend { domain, vm, ksm: ksm_ram, host, ranges: Vec::new() }
    }

    /// `MADV_MERGEABLE` on `ranges` again (KSM mode).
    fn mark_mergeable(mem: &GuestMemoryMmap, ranges: &[(u64, u64)]) {
        for &(gpa, len) in ranges {
            let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else { continue };
            // SAFETY: whole pages of the VM's guest RAM mapping (the device checked each range
            // lies in one region); MADV_MERGEABLE changes no content.
            let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_MERGEABLE) };
            if rc != 0 {
                log::warn!(
                    "balloon: cannot mark {len} bytes at {gpa:#x} mergeable again for KSM: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl BalloonBackend for DomainBackend {
    fn discard(&mut self, ranges: &[GuestRange], why: Discard) {
        let started = Instant::now();
        self.ranges.clear();
        self.ranges.extend(ranges.iter().map(|r| (r.gpa, r.len)));
        let result = lock(&self.domain).discard(self.vm, &self.ranges);
        let h = &self.host;
        HostCounters::add(&h.discards, 1);
        match result {
            Ok(pages) => {
                HostCounters::add(&h.discarded_pages, pages as u64);
            }
            Err(e) => {
                let n = HostCounters::add(&h.discard_failures, 1);
                if n.is_power_of_two() {
                    log::warn!("balloon: {why:?} pages not given back: {e} ({n} failures)");
                }
            }
        }
        if let Some(mem) = &self.ksm {
            Self::mark_mergeable(mem, &self.ranges);
        }
        HostCounters::add(&h.discard_us, started.elapsed().as_micros() as u64);
    }

    fn reclaim(&mut self, ranges: &[GuestRange]) {
        // Discarded on inflation: they fault in as zeros, there is nothing to do.
        HostCounters::add(&self.host.reclaimed_pages, ranges.iter().map(GuestRange::pages).sum());
    }
}
