//! A dedup domain: the VMs whose identical pages may be merged with each other, where their
//! shared pages live (`backend`), and the bookkeeping of each VM's RAM. Pages are never shared
//! across domains. The merge, the refresh, image sharing and the VMA budget are in files of
//! their own; this one holds the domain and its VMs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::backend::Backend;
use super::broker_client::{BrokerClient, BrokerConfig};
use super::error::DedupError;
use super::image_ids::{ImageId, Images};
use super::index::MergedPages;
use super::pagemap::Pagemap;
use super::shared_pages::SharedPages;
use super::stats::DedupStats;
use super::vma::{self, MapKey, RegionVmas};
use super::words::{HolderId, RamRegion, Slot, VmId, PAGE_SIZE};
use super::zero_sweep::ZeroSweep;
use crate::broker_wire::proto::GuestStats;

const MAX_MAP_COUNT_PATH: &str = "/proc/sys/vm/max_map_count";
/// The kernel's default `vm.max_map_count`, used when the sysctl cannot be read.
const DEFAULT_MAX_MAP_COUNT: usize = 65_530;
/// VMAs always left for the rest of the process (thread stacks, allocator arenas, libraries),
/// whatever the budget says.
pub const VMA_RESERVE: usize = 1024;

/// How far a domain may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most pages the store may hold.
    pub max_store_pages: usize,
    /// Most VMAs the domain's guest RAM may cost; merges that would need more are refused.
    pub vma_budget: usize,
}

impl Limits {
    /// Limits for a host with this `vm.max_map_count`: the VMA budget leaves a margin of
    /// 1/16 of it (at least [`VMA_RESERVE`]) for everything else the process maps; the store
    /// may hold as many pages as the host has RAM.
    pub fn for_max_map_count(max_map_count: usize) -> Limits {
        let margin = (max_map_count / 16).max(VMA_RESERVE);
        // SAFETY: sysconf only reads a system value.
        let phys = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
        let max_store_pages = if phys > 0 { phys as usize } else { 1 << 20 };
        Limits {
            max_store_pages: max_store_pages.min(Slot::MAX as usize),
            vma_budget: max_map_count.saturating_sub(margin).max(1),
        }
    }
}

impl Default for Limits {
    /// Limits derived from this host's `/proc/sys/vm/max_map_count`.
    fn default() -> Limits {
        Limits::for_max_map_count(max_map_count())
    }
}

/// This host's `vm.max_map_count` (the kernel default when it cannot be read).
pub fn max_map_count() -> usize {
    std::fs::read_to_string(MAX_MAP_COUNT_PATH)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_MAP_COUNT)
}

/// VMAs this process maps now (lines of `/proc/self/maps`).
pub fn process_vmas() -> Result<usize, DedupError> {
    vma::maps_overlapping(&[])
        .map(|(_, total)| total)
        .map_err(|source| DedupError::Proc { path: "/proc/self/maps", source })
}

/// Where a page-aligned gpa lies in a VM's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    /// Index of its RAM region.
    pub(crate) region: usize,
    /// Its page index in the region.
    pub(crate) page: usize,
    /// Its host address.
    pub(crate) host: usize,
}

/// One VM's RAM and merge state.
pub(crate) struct VmState {
    pub(crate) label: String,
    /// Its references' holder in the shared pages.
    pub(crate) holder: HolderId,
    pub(crate) regions: Vec<RamRegion>,
    /// Per region (same order), the VMA count.
    pub(crate) vmas: Vec<RegionVmas>,
    pub(crate) merged: MergedPages,
    /// Pages that map a page of a shared read-only image (gpa → the VMA model's key).
    pub(crate) image_pages: BTreeMap<u64, MapKey>,
    /// Merged (or image) pages that looked copied on the last look, and when: their
    /// bookings drop only if a second look, `SECOND_LOOK_AFTER` later or more, agrees.
    pub(crate) suspects: BTreeMap<u64, Instant>,
    /// The guest-physical range the kernel file was mapped over (first, end), if it was: the
    /// kernel's pages are counted there, not among all image pages.
    pub(crate) kernel_span: Option<(u64, u64)>,
    /// Kernel pages found written since they were last merged (`Domain::merge_unreported_pages`):
    /// at most the kernel's read-only pages.
    pub(crate) kernel_written: Vec<u64>,
    /// Page-cache blocks of images (image, [`super::image_ids::folio_block`]) in which pages of
    /// this VM merged by content since the last refresh, their cache given back.
    pub(crate) blocks_given_back: BTreeSet<(ImageId, u64)>,
    /// Those of the refresh before: a block that stayed quiet since (no merge in it) is looked
    /// at for pages left in it, so that pages the guest is still reporting are not taken for
    /// pages it leaves.
    pub(crate) blocks_settling: BTreeSet<(ImageId, u64)>,
    /// Pages of this VM that still map an image in such a block, found by the refresh and
    /// waiting for `Domain::merge_unreported_pages`: left mapped, one of them keeps the whole
    /// folio around it in the page cache (up to 2 MiB) after the rest was merged.
    pub(crate) image_stragglers: Vec<u64>,
    /// Its sweeps for pages of zeros (`zero_pages.rs`).
    pub(crate) zero_sweep: ZeroSweep,
    /// Periodic refreshes so far (`Domain::refresh_vm_periodically`).
    pub(crate) refreshes: u64,
}

impl VmState {
    /// Guest pages that map the kernel file now (within [`VmState::kernel_span`]).
    pub(crate) fn kernel_pages(&self, images: &Images) -> u64 {
        let Some((first, end)) = self.kernel_span else { return 0 };
        self.image_pages.range(first..end).filter(|(_, key)| images.is_kernel_key(**key)).count() as u64
    }

    /// Where a page-aligned gpa lies in the VM's RAM.
    pub(crate) fn locate(&self, gpa: u64) -> Option<Place> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        let (region, r) = self.regions.iter().enumerate().find(|(_, r)| r.contains(gpa))?;
        let offset = (gpa - r.gpa) as usize;
        Some(Place { region, page: offset / PAGE_SIZE, host: r.host_addr + offset })
    }

    /// VMAs the VM's RAM costs, by the count.
    pub(crate) fn vmas(&self) -> usize {
        self.vmas.iter().map(RegionVmas::vmas).sum()
    }
}

/// A dedup domain: the VMs whose identical pages may be merged with each other, and where
/// their shared pages live. Pages are never shared across domains.
pub struct Domain {
    pub(crate) name: String,
    pub(crate) limits: Limits,
    pub(crate) max_map_count: usize,
    pub(crate) backend: Backend,
    /// The store generation the VMs' bookkeeping refers to (a new broker is a new store).
    pub(crate) generation: u32,
    /// Read-only images whose pages VMs map.
    pub(crate) images: Images,
    pub(crate) pagemap: Pagemap,
    pub(crate) vms: BTreeMap<VmId, VmState>,
    next_vm: u32,
    /// Sum of the VMs' VMA counts.
    pub(crate) vmas: usize,
    /// VMAs of the process outside guest RAM, at the last reconciliation.
    pub(crate) other_vmas: usize,
    pub(crate) last_reconcile: Option<Instant>,
    /// Event counters (the gauges of [`DedupStats`] are filled in by [`Domain::stats`]).
    pub(crate) counters: DedupStats,
    pub(crate) warned_vmas: bool,
    warned_unknown_vm: bool,
}

impl Domain {
    /// Creates a domain of this process's VMs with an empty store (`memfd` named
    /// `samepage-store-<name>`).
    pub fn new(name: &str, limits: Limits) -> Result<Domain, DedupError> {
        let pages = SharedPages::new(name, limits.max_store_pages)?;
        Self::with_backend(name, limits, Backend::Local(pages))
    }

    /// Creates a domain whose shared pages are the broker's (`docs/dedupd.md`): it connects
    /// now, and again whenever the broker is back.
    pub fn with_broker(name: &str, limits: Limits, config: BrokerConfig) -> Result<Domain, DedupError> {
        let client = BrokerClient::new(config).map_err(|e| DedupError::Broker(Box::new(e)))?;
        Self::with_backend(name, limits, Backend::Broker(client))
    }

    fn with_backend(name: &str, limits: Limits, backend: Backend) -> Result<Domain, DedupError> {
        let mut domain = Domain {
            name: name.to_string(),
            backend,
            generation: 0,
            images: Images::default(),
            limits,
            max_map_count: max_map_count(),
            pagemap: Pagemap::open()?,
            vms: BTreeMap::new(),
            next_vm: 0,
            vmas: 0,
            other_vmas: 0,
            last_reconcile: None,
            counters: DedupStats::default(),
            warned_vmas: false,
            warned_unknown_vm: false,
        };
        domain.generation = domain.backend.generation();
        Ok(domain)
    }

    /// Follows the store to a new generation (a new broker): references into the old one are
    /// gone, so the VMs' merged pages are no longer booked (their mappings stay: the old
    /// memfd lives on as long as a guest page maps it).
    pub(crate) fn sync_generation(&mut self) {
        let now = self.backend.generation();
        if now == self.generation {
            return;
        }
        log::info!("dedup {}: the store changed (generation {} → {now})", self.name, self.generation);
        self.generation = now;
        for vm in self.vms.values_mut() {
            vm.merged.drain().for_each(drop);
            vm.suspects.clear();
        }
    }

    /// Takes a VM out of the domain for one operation on it ([`Domain::put_vm`] gives it
    /// back): the VM is looked up once, and its state borrowed beside the domain's. An unknown
    /// VM is a caller's bug: said once.
    pub(crate) fn take_vm(&mut self, id: VmId) -> Option<VmState> {
        let vm = self.vms.remove(&id);
        if vm.is_none() && !self.warned_unknown_vm {
            self.warned_unknown_vm = true;
            log::error!("dedup {}: asked about {id}, which is not registered", self.name);
        }
        vm
    }

    /// Gives back a VM taken out with [`Domain::take_vm`].
    pub(crate) fn put_vm(&mut self, id: VmId, vm: VmState) {
        self.vms.insert(id, vm);
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The broker's domain joined, when the shared pages are the broker's and it is connected.
    pub fn broker_domain(&self) -> Option<&str> {
        self.backend.broker_domain()
    }

    /// Registers a VM's guest RAM. Regions that are empty or not page aligned are ignored
    /// (and logged).
    ///
    /// # Safety
    /// Every region must be a private anonymous (or already store-mapped) mapping of this
    /// process that stays mapped until [`Domain::unregister_vm`], and that the caller accesses
    /// only through raw or volatile pointers (no Rust references): the domain reads the pages
    /// and replaces them with `mmap(MAP_FIXED)` mappings of identical content.
    pub unsafe fn register_vm(&mut self, label: &str, ram: Vec<RamRegion>) -> VmId {
        let mut regions: Vec<RamRegion> = ram
            .into_iter()
            .filter(|r| {
                let ok = r.is_valid();
                if !ok {
                    log::warn!("dedup {}: {label}: ignoring unaligned or empty RAM region {r:x?}", self.name);
                }
                ok
            })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        let vmas: Vec<RegionVmas> = regions.iter().map(|r| RegionVmas::new(r.len / PAGE_SIZE)).collect();
        let id = VmId(self.next_vm);
        self.next_vm += 1;
        let state = VmState {
            label: label.to_string(),
            holder: self.backend.join(),
            regions,
            vmas,
            merged: MergedPages::default(),
            image_pages: BTreeMap::new(),
            suspects: BTreeMap::new(),
            kernel_span: None,
            kernel_written: Vec::new(),
            blocks_given_back: BTreeSet::new(),
            blocks_settling: BTreeSet::new(),
            image_stragglers: Vec::new(),
            zero_sweep: ZeroSweep::new(Instant::now()),
            refreshes: 0,
        };
        self.vmas += state.vmas();
        self.vms.insert(id, state);
        id
    }

    /// Forgets a VM whose RAM is being unmapped: its references drop and slots nobody else
    /// maps are freed. The VM must not run any more (its unfaulted merged pages would read
    /// freed store pages).
    pub fn unregister_vm(&mut self, vm: VmId) {
        self.sync_generation();
        let Some(mut state) = self.vms.remove(&vm) else { return };
        self.images.close_vm(vm);
        self.vmas -= state.vmas();
        let slots: Vec<Slot> = state.merged.drain().map(|(_, slot)| slot).collect();
        self.backend.release(state.holder, &slots);
        self.backend.leave(state.holder);
    }

    /// VMAs the VM's guest RAM costs, by the count (never below the kernel's).
    pub fn vmas(&self, vm: VmId) -> usize {
        self.vms.get(&vm).map_or(0, VmState::vmas)
    }

    /// VMAs the VM's guest RAM costs, counted in `/proc/self/maps` (it reads the whole file).
    pub fn measured_vmas(&self, vm: VmId) -> Result<usize, DedupError> {
        let Some(state) = self.vms.get(&vm) else { return Ok(0) };
        let ranges: Vec<(usize, usize)> = state.regions.iter().map(|r| (r.host_addr, r.len)).collect();
        let (counts, _) = vma::maps_overlapping(&ranges)
            .map_err(|source| DedupError::Proc { path: "/proc/self/maps", source })?;
        Ok(counts.iter().sum())
    }

    /// Guest pages that map an image page now (disks' and kernels').
    fn image_pages_count(&self) -> u64 {
        self.vms.values().map(|v| v.image_pages.len() as u64).sum()
    }

    /// The guest's latest balloon statistics (checked by the balloon), for the broker's
    /// `status`: a domain with a broker serves one VM. Nothing happens without a broker.
    pub fn push_guest_stats(&mut self, stats: GuestStats) {
        self.backend.push_guest_stats(stats);
    }

    /// The domain's counters and current figures.
    pub fn stats(&self) -> DedupStats {
        let mapped: u64 = self.vms.values().map(|v| v.merged.len() as u64).sum();
        let live = self.backend.live_pages();
        let kernel_pages: u64 = self.vms.values().map(|v| v.kernel_pages(&self.images)).sum();
        DedupStats {
            image_pages: self.image_pages_count() - kernel_pages,
            kernel_pages,
            host_hashes: self.backend.counters().hashes,
            broker_unavailable: self.backend.unavailable_count(),
            broker_overdue: self.backend.overdue_count(),
            store_pages: live,
            store_bytes_allocated: self.backend.allocated_bytes().unwrap_or_else(|e| {
                log::warn!("dedup {}: {e}", self.name);
                0
            }),
            mapped_pages: mapped,
            bytes_saved: mapped.saturating_sub(live) * PAGE_SIZE as u64,
            vmas: self.vmas as u64,
            ..self.counters
        }
    }

    /// Checks that every store page still hashes to its index key and that each VM's
    /// references agree with its merged pages; returns how many pages were checked.
    pub fn verify_store(&self) -> Result<usize, DedupError> {
        let held: Vec<(HolderId, u64)> =
            self.vms.values().map(|v| (v.holder, v.merged.len() as u64)).collect();
        self.backend.verify(&held)
    }

    /// Test hook: flips a byte of the store copy of the page hashing to `hash`.
    #[cfg(test)]
    pub(crate) fn corrupt_store_page(&mut self, hash: &super::words::PageHash) -> bool {
        self.backend.corrupt(hash)
    }
}
