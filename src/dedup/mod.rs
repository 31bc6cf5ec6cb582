//! The host-side merge engine: verifies guests' page reports and maps one shared copy of
//! identical pages into every VM of a dedup domain, copy-on-write.
//!
//! A [`Domain`] owns a *store* (one memfd of canonical pages, [`store`]), an *index* (hash →
//! store slot, and per VM gpa → slot, [`index`]) and the VMA accounting of its VMs' RAM
//! ([`vma`]). Merging a guest page (`docs/fphash.md`, "What the host does"; [`merge`]):
//! 1. read the page; the reported hash is only a lookup key;
//! 2. if the index has the hash, compare the page byte for byte with that store page (whose
//!    hash the host computed itself): equal is a hit, and costs no hash; else hash the page
//!    on the host (BLAKE3) and, if it matches the report, copy it into a new store slot;
//! 3. check that the new mapping fits the VMA budget (`vm.max_map_count`);
//! 4. `mmap(MAP_PRIVATE | MAP_FIXED)` the store slot over the guest page. The anonymous page
//!    is freed; a later guest write copies the page and leaves the store alone.
//!
//! [`Domain::refresh_vm`] ([`refresh`]) finds pages copied on write through
//! `/proc/self/pagemap`, on two looks, and frees (punches) store slots that nobody maps any
//! more.

mod backend;
mod error;
mod image;
mod index;
mod merge;
mod pagemap;
pub mod proto;
mod refresh;
mod remap;
pub mod remote;
pub mod shared;
mod stats;
mod store;
mod unshare;
mod vma;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

pub use error::DedupError;
pub use image::ImageId;
pub use index::PageHash;
pub use refresh::SECOND_LOOK_AFTER;
pub use stats::{DedupStats, RefreshReport};
pub use store::Slot;

use backend::Backend;
use index::MergedPages;
use pagemap::Pagemap;
use remote::{RemoteConfig, RemoteError, RemoteStore};
use shared::{HolderId, SharedStore};
use vma::RegionVmas;

/// Size of a guest page and a store slot.
pub const PAGE_SIZE: usize = 4096;

const MAX_MAP_COUNT_PATH: &str = "/proc/sys/vm/max_map_count";
/// The kernel's default `vm.max_map_count`, used when the sysctl cannot be read.
const DEFAULT_MAX_MAP_COUNT: usize = 65_530;
/// VMAs always left for the rest of the process (thread stacks, allocator arenas, libraries),
/// whatever the budget says.
pub const VMA_RESERVE: usize = 1024;

/// One range of a VM's guest RAM and where it lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Host virtual start of the private anonymous mapping, page aligned.
    pub host_addr: usize,
    /// Length in bytes, a multiple of the page size.
    pub len: usize,
}

impl RamRegion {
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len as u64
    }

    fn is_valid(&self) -> bool {
        self.len > 0
            && self.gpa.is_multiple_of(PAGE_SIZE as u64)
            && self.host_addr.is_multiple_of(PAGE_SIZE)
            && self.len.is_multiple_of(PAGE_SIZE)
    }
}

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

/// A VM registered with a [`Domain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(u32);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm{}", self.0)
    }
}

/// The outcome of one page report (the VMM maps it to the wire status of `docs/fphash.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStatus {
    /// The page now maps a store page (first copy or duplicate).
    Merged,
    /// The page already mapped the store page with this content.
    Already,
    /// The page does not hash to the reported hash, or differs from the store copy.
    Mismatch,
    /// Unaligned gpa, or not inside one of the VM's RAM regions.
    BadGpa,
    /// Not merged: the VMA budget or the store limit was reached.
    NoRoom,
}

/// One VM's RAM and merge state.
struct VmState {
    label: String,
    /// Its references' holder in the store.
    holder: HolderId,
    regions: Vec<RamRegion>,
    /// Per region (same order), the VMA count.
    vmas: Vec<RegionVmas>,
    merged: MergedPages,
    /// Pages that map a page of a shared read-only image (gpa → the VMA model's key).
    image_pages: BTreeMap<u64, vma::MapKey>,
    /// Merged (or image) pages that looked copied on the last look, and when: their
    /// bookings drop only if a second look, [`SECOND_LOOK_AFTER`] later or more, agrees.
    suspects: BTreeMap<u64, Instant>,
}

impl VmState {
    /// Region index, page index in the region and host address of a page-aligned gpa.
    fn locate(&self, gpa: u64) -> Option<(usize, usize, usize)> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        let (i, r) = self.regions.iter().enumerate().find(|(_, r)| r.contains(gpa))?;
        let offset = (gpa - r.gpa) as usize;
        Some((i, offset / PAGE_SIZE, r.host_addr + offset))
    }

    fn vmas(&self) -> usize {
        self.vmas.iter().map(RegionVmas::vmas).sum()
    }
}

/// A dedup domain: the VMs whose identical pages may be merged with each other, their store
/// and index. Pages are never shared across domains.
pub struct Domain {
    name: String,
    limits: Limits,
    max_map_count: usize,
    backend: Backend,
    /// The store generation the VMs' bookkeeping refers to (a new broker is a new store).
    generation: u32,
    /// Read-only images whose pages VMs map.
    images: image::Images,
    pagemap: Pagemap,
    vms: BTreeMap<VmId, VmState>,
    next_vm: u32,
    /// Sum of the VMs' VMA counts.
    vmas: usize,
    /// VMAs of the process outside guest RAM, at the last reconciliation.
    other_vmas: usize,
    last_reconcile: Option<Instant>,
    /// Event counters (the gauges of [`DedupStats`] are filled in by [`Domain::stats`]).
    counters: DedupStats,
    warned_vmas: bool,
}

impl Domain {
    /// Creates a domain of this process's VMs with an empty store (`memfd` named
    /// `samepage-store-<name>`).
    pub fn new(name: &str, limits: Limits) -> Result<Domain, DedupError> {
        let store = SharedStore::new(name, limits.max_store_pages)?;
        Self::with_backend(name, limits, Backend::Local(store))
    }

    /// Creates a domain whose store is the broker's (`docs/dedupd.md`): it connects now, and
    /// again whenever the broker is back.
    pub fn remote(name: &str, limits: Limits, config: RemoteConfig) -> Result<Domain, DedupError> {
        let remote = RemoteStore::new(config).map_err(|e: RemoteError| DedupError::Remote(Box::new(e)))?;
        Self::with_backend(name, limits, Backend::Remote(remote))
    }

    fn with_backend(name: &str, limits: Limits, backend: Backend) -> Result<Domain, DedupError> {
        let mut domain = Domain {
            name: name.to_string(),
            backend,
            generation: 0,
            images: image::Images::default(),
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
        };
        domain.generation = domain.backend.generation();
        Ok(domain)
    }

    /// Follows the store to a new generation (a new broker): references into the old one are
    /// gone, so the VMs' merged pages are no longer booked (their mappings stay: the old
    /// memfd lives on as long as a guest page maps it).
    fn sync_generation(&mut self) {
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

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The broker's domain joined, when the store is the broker's and it is connected.
    pub fn broker_domain(&self) -> Option<&str> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Remote(r) => r.domain(),
        }
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
        self.vmas -= state.vmas();
        let slots: Vec<Slot> = state.merged.drain().map(|(_, slot)| slot).collect();
        self.backend.release(state.holder, &slots);
        self.backend.leave(state.holder);
    }

    /// Drops one reference of `vm` per slot; returns how many slots were freed (as far as
    /// this process knows).
    fn release(&mut self, vm: VmId, slots: &[Slot]) -> usize {
        let holder = self.vms.get(&vm).map_or(0, |v| v.holder);
        self.backend.release(holder, slots)
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

    /// The domain's counters and current figures.
    pub fn stats(&self) -> DedupStats {
        let mapped: u64 = self.vms.values().map(|v| v.merged.len() as u64).sum();
        let live = self.backend.live_pages();
        DedupStats {
            image_pages: self.vms.values().map(|v| v.image_pages.len() as u64).sum(),
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
        let checked = self.backend.verify()?;
        if let Backend::Local(_) = self.backend {
            for vm in self.vms.values() {
                if self.backend.holder_refs(vm.holder) != vm.merged.len() as u64 {
                    let slot = vm.merged.iter().next().map_or(0, |(_, s)| s);
                    return Err(DedupError::Refs { slot });
                }
            }
        } else if self.backend.holder_refs(0) != self.vms.values().map(|v| v.merged.len() as u64).sum::<u64>()
        {
            return Err(DedupError::Refs { slot: 0 });
        }
        Ok(checked)
    }

    /// Test hook: flips a byte of the store copy of the page hashing to `hash`.
    #[cfg(test)]
    pub(crate) fn corrupt_store_page(&mut self, hash: &index::PageHash) -> bool {
        match &mut self.backend {
            Backend::Local(s) => s.corrupt(hash),
            Backend::Remote(_) => false,
        }
    }
}
