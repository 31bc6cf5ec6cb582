//! The host-side merge engine: verifies guests' page reports and maps one shared copy of
//! identical pages into every VM of a dedup domain, copy-on-write.
//!
//! A [`Domain`] owns a *store* (one memfd of canonical pages, [`store`]), an *index* (hash →
//! store slot, and per VM gpa → slot, [`index`]) and the VMA accounting of its VMs' RAM
//! ([`vma`]). Merging a guest page (see `docs/fphash.md` and the brief's "How a merge must
//! work"):
//! 1. hash the page on the host (BLAKE3) and compare with the reported hash;
//! 2. look the hash up: if absent, copy the page into a new store slot; if present, compare the
//!    page byte for byte with the store page;
//! 3. check that the new mapping fits the VMA budget (`vm.max_map_count`);
//! 4. `mmap(MAP_PRIVATE | MAP_FIXED)` the store slot over the guest page. The anonymous page
//!    is freed; a later guest write copies the page and leaves the store alone.
//!
//! [`Domain::refresh`] finds pages copied on write through `/proc/self/pagemap` and frees
//! (punches) store slots that nobody maps any more.

mod error;
mod index;
mod pagemap;
mod remap;
mod stats;
mod store;
mod vma;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

pub use error::DedupError;
pub use stats::{DedupStats, RefreshReport};

use index::{Index, MergedPages, PageHash};
use pagemap::Pagemap;
use remap::PendingRun;
use stats::Counters;
use store::{Slot, Store};
use vma::RegionVmas;

/// Size of a guest page and a store slot.
pub const PAGE_SIZE: usize = 4096;

const MAX_MAP_COUNT_PATH: &str = "/proc/sys/vm/max_map_count";
/// The kernel's default `vm.max_map_count`, used when the sysctl cannot be read.
const DEFAULT_MAX_MAP_COUNT: usize = 65_530;

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
    /// 1/16 of it (at least 1024) for everything else the process maps; the store may hold as
    /// many pages as the host has RAM.
    pub fn for_max_map_count(max_map_count: usize) -> Limits {
        let margin = (max_map_count / 16).max(1024);
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
    regions: Vec<RamRegion>,
    /// Per region (same order), the VMA model.
    vmas: Vec<RegionVmas>,
    merged: MergedPages,
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
    store: Store,
    index: Index,
    pagemap: Pagemap,
    vms: BTreeMap<VmId, VmState>,
    next_vm: u32,
    /// Sum of the VMs' VMA counts.
    vmas: usize,
    counters: Counters,
    warned_vmas: bool,
    warned_store: bool,
}

impl Domain {
    /// Creates a domain with an empty store (`memfd` named `samepage-store-<name>`).
    pub fn new(name: &str, limits: Limits) -> Result<Domain, DedupError> {
        Ok(Domain {
            name: name.to_string(),
            store: Store::new(name, limits.max_store_pages)?,
            limits,
            max_map_count: max_map_count(),
            index: Index::default(),
            pagemap: Pagemap::open()?,
            vms: BTreeMap::new(),
            next_vm: 0,
            vmas: 0,
            counters: Counters::default(),
            warned_vmas: false,
            warned_store: false,
        })
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
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
        let state = VmState { label: label.to_string(), regions, vmas, merged: MergedPages::default() };
        self.vmas += state.vmas();
        self.vms.insert(id, state);
        id
    }

    /// Verifies and merges the reported pages `(gpa, BLAKE3)` of `vm`, writing one status per
    /// report into `statuses` (only `min(reports.len(), statuses.len())` reports are handled).
    /// An unknown `vm` gets `BadGpa` for every report.
    ///
    /// The caller guarantees that nothing writes these guest pages during the call (vCPUs
    /// paused, device I/O quiesced).
    pub fn merge_batch(&mut self, vm: VmId, reports: &[(u64, [u8; 32])], statuses: &mut [MergeStatus]) {
        let mut run = PendingRun::default();
        for (i, (gpa, hash)) in reports.iter().enumerate().take(statuses.len()) {
            self.counters.reported += 1;
            // The checks of a page merged before read its page table: map what waits first.
            if !run.is_empty() && self.vms.get(&vm).is_some_and(|v| v.merged.get(*gpa).is_some()) {
                self.flush(&mut run, statuses);
            }
            let status = match self.merge_one(vm, *gpa, hash) {
                Ok((host, slot)) => {
                    if !run.try_extend(host, slot, i) {
                        self.flush(&mut run, statuses);
                        run.try_extend(host, slot, i);
                    }
                    MergeStatus::Merged
                }
                Err(status) => status,
            };
            statuses[i] = status;
            match status {
                MergeStatus::Merged => self.counters.merged += 1,
                MergeStatus::Already => self.counters.already += 1,
                MergeStatus::Mismatch => self.counters.rejected_mismatch += 1,
                MergeStatus::BadGpa => self.counters.rejected_bad_gpa += 1,
                MergeStatus::NoRoom => self.counters.rejected_no_room += 1,
            }
        }
        self.flush(&mut run, statuses);
    }

    /// Maps the pages `run` holds (bookkept as merged already). When the run cannot be
    /// mapped at once, its pages are mapped one by one; a page that cannot be mapped at all
    /// stays a private page with the same bytes and gets `NoRoom`: its bookkeeping shows it as
    /// copied on write, which the next check of that page or [`Domain::refresh`] undoes.
    fn flush(&mut self, run: &mut PendingRun, statuses: &mut [MergeStatus]) {
        if run.is_empty() {
            return;
        }
        let (host, slot, records) = run.take();
        let fd = self.store.fd();
        // SAFETY: every page of the run was verified in this batch to hold exactly the bytes of
        // its store slot, lies in registered guest RAM (the caller's contract of
        // `register_vm`), and nothing wrote it since (the caller's contract of `merge_batch`).
        let Err(err) = (unsafe { remap::map_store(host, records.len(), fd, slot) }) else { return };
        log::warn!(
            "dedup {}: mmap of {} store pages failed ({err}); mapping them one by one",
            self.name,
            records.len()
        );
        for (n, record) in records.into_iter().enumerate() {
            let page_host = host + n * PAGE_SIZE;
            // SAFETY: one page of the run above.
            if let Err(err) = unsafe { remap::map_store(page_host, 1, fd, slot + n as Slot) } {
                log::error!(
                    "dedup {}: mmap of store slot {} at {page_host:#x} failed: {err}",
                    self.name,
                    slot + n as Slot
                );
                statuses[record] = MergeStatus::NoRoom;
                self.counters.merged -= 1;
                self.counters.rejected_no_room += 1;
            }
        }
    }

    /// Verifies one report and books the merge: `Ok((host address, slot))` of a page to map, or
    /// the status of a report that maps nothing.
    fn merge_one(&mut self, id: VmId, gpa: u64, reported: &PageHash) -> Result<(usize, Slot), MergeStatus> {
        let Some(vm) = self.vms.get_mut(&id) else { return Err(MergeStatus::BadGpa) };
        let Some((region, page, host)) = vm.locate(gpa) else { return Err(MergeStatus::BadGpa) };

        // 1. Hash the page ourselves; never trust the guest's hash.
        let mut buf = [0u8; PAGE_SIZE];
        // SAFETY: `host` is a page inside a region registered with `register_vm`, whose
        // contract keeps it mapped and readable; the caller of `merge_batch` guarantees that
        // nothing writes it during the call, and `buf` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
        let hash = *blake3::hash(&buf).as_bytes();
        if hash != *reported {
            return Err(MergeStatus::Mismatch);
        }
        self.counters.verified += 1;

        // Already mapped from the store slot with this content, and not copied since?
        if let Some(old) = vm.merged.get(gpa) {
            let state = self.pagemap.state(host).unwrap_or_else(|e| {
                log::warn!("dedup {}: {e}", self.name);
                pagemap::PageState::Unfaulted
            });
            if !state.still_merged() {
                // Copied on write since: the page no longer needs the old slot.
                vm.merged.remove(gpa);
                self.counters.cow_breaks += 1;
                release(&mut self.store, &mut self.index, old, &self.name);
            } else if self.index.hash_of(old) == Some(&hash) {
                return Err(MergeStatus::Already);
            } else {
                // The page reads its store slot, yet hashes to another key: the store is corrupt.
                log::error!("dedup {}: store slot {old} does not match its hash", self.name);
                return Err(MergeStatus::Mismatch);
            }
        }

        // 2. Find or make the store copy.
        let (slot, fresh) = match self.index.lookup(&hash) {
            Some(slot) => {
                if self.store.page(slot) != buf.as_slice() {
                    return Err(MergeStatus::Mismatch);
                }
                (slot, false)
            }
            None => {
                let rv = &vm.vmas[region];
                let left = page.checked_sub(1).and_then(|p| rv.slot_at(p)).and_then(|s| s.checked_add(1));
                let right = rv.slot_at(page + 1).and_then(|s| s.checked_sub(1));
                match self.store.pick(&[left, right]) {
                    Some(slot) => (slot, true),
                    None => {
                        if !self.warned_store {
                            self.warned_store = true;
                            log::warn!(
                                "dedup {}: the store is full ({} pages); new pages are no longer merged",
                                self.name,
                                self.store.max_pages()
                            );
                        }
                        return Err(MergeStatus::NoRoom);
                    }
                }
            }
        };

        // 3. VMA budget.
        let delta = vm.vmas[region].delta(page, slot);
        if delta > 0 && self.vmas + delta as usize > self.limits.vma_budget {
            if !self.warned_vmas {
                self.warned_vmas = true;
                log::warn!(
                    "dedup {}: VMA budget reached at {}: guest RAM costs {} VMAs of a budget of {} \
                     (vm.max_map_count = {}); pages that need a new VMA are no longer merged. \
                     Raise vm.max_map_count to merge more.",
                    self.name,
                    vm.label,
                    self.vmas,
                    self.limits.vma_budget,
                    self.max_map_count
                );
            }
            return Err(MergeStatus::NoRoom);
        }

        if fresh {
            if let Err(e) = self.store.take(slot) {
                log::error!("dedup {}: {e}", self.name);
                return Err(MergeStatus::NoRoom);
            }
            self.store.write(slot, &buf);
        } else {
            self.store.add_ref(slot);
        }

        // 4. Book it; `merge_batch` maps the store page over the guest page.
        if fresh {
            self.index.insert(hash, slot);
        }
        vm.vmas[region].set(page, slot);
        self.vmas = (self.vmas as isize + delta) as usize;
        let old = vm.merged.insert(gpa, slot);
        debug_assert!(old.is_none(), "gpa {gpa:#x} was still booked as merged");
        Ok((host, slot))
    }

    /// Notes that the guest says the page at `gpa` left its page cache. The page stays mapped
    /// copy-on-write: while it still reads the store its reference is kept (freeing the slot
    /// would change what the guest reads); if it was already copied, the reference is dropped
    /// now instead of at the next [`Domain::refresh`].
    pub fn page_removed(&mut self, vm: VmId, gpa: u64) {
        self.counters.removed_hints += 1;
        let Some(state) = self.vms.get_mut(&vm) else { return };
        let (Some(slot), Some((_, _, host))) = (state.merged.get(gpa), state.locate(gpa)) else { return };
        match self.pagemap.state(host) {
            Ok(s) if !s.still_merged() => {
                state.merged.remove(gpa);
                self.counters.cow_breaks += 1;
                release(&mut self.store, &mut self.index, slot, &self.name);
            }
            Ok(_) => {}
            Err(e) => log::warn!("dedup {}: {e}", self.name),
        }
    }

    /// Finds merged pages that were copied on write (`/proc/self/pagemap`), drops their
    /// references and frees (punches) the store slots nobody maps any more.
    pub fn refresh(&mut self) -> Result<RefreshReport, DedupError> {
        let mut report = RefreshReport::default();
        for vm in self.vms.values_mut() {
            // Group merged pages into runs that are consecutive in host memory: one pread each.
            let mut groups: Vec<(usize, Vec<u64>)> = Vec::new();
            for (gpa, _) in vm.merged.iter() {
                let Some((_, _, host)) = vm.locate(gpa) else { continue };
                match groups.last_mut() {
                    Some((start, gpas))
                        if *start + gpas.len() * PAGE_SIZE == host
                            && gpas.last().is_some_and(|g| g + PAGE_SIZE as u64 == gpa) =>
                    {
                        gpas.push(gpa)
                    }
                    _ => groups.push((host, vec![gpa])),
                }
            }
            for (host, gpas) in groups {
                let states = self.pagemap.states(host, gpas.len())?;
                for (gpa, state) in gpas.into_iter().zip(states) {
                    if state.still_merged() {
                        continue;
                    }
                    if let Some(slot) = vm.merged.remove(gpa) {
                        report.cow_breaks += 1;
                        if release(&mut self.store, &mut self.index, slot, &self.name) {
                            report.slots_freed += 1;
                        }
                    }
                }
            }
        }
        self.counters.cow_breaks += report.cow_breaks as u64;
        Ok(report)
    }

    /// Forgets a VM whose RAM is being unmapped: its references drop and slots nobody else
    /// maps are freed. The VM must not run any more (its unfaulted merged pages would read
    /// freed store pages).
    pub fn unregister_vm(&mut self, vm: VmId) {
        let Some(mut state) = self.vms.remove(&vm) else { return };
        self.vmas -= state.vmas();
        for (_, slot) in state.merged.drain() {
            release(&mut self.store, &mut self.index, slot, &self.name);
        }
    }

    /// VMAs the VM's guest RAM costs, by the model.
    pub fn vmas(&self, vm: VmId) -> usize {
        self.vms.get(&vm).map_or(0, VmState::vmas)
    }

    /// VMAs the VM's guest RAM costs, counted in `/proc/self/maps` (a cross-check of
    /// [`Domain::vmas`]; it reads the whole file).
    pub fn measured_vmas(&self, vm: VmId) -> Result<usize, DedupError> {
        let Some(state) = self.vms.get(&vm) else { return Ok(0) };
        let mut n = 0;
        for r in &state.regions {
            n += vma::maps_overlapping(r.host_addr, r.len)
                .map_err(|source| DedupError::Proc { path: "/proc/self/maps", source })?;
        }
        Ok(n)
    }

    /// The domain's counters and current figures.
    pub fn stats(&self) -> DedupStats {
        let c = &self.counters;
        let mapped: u64 = self.vms.values().map(|v| v.merged.len() as u64).sum();
        let live = self.store.live_pages() as u64;
        DedupStats {
            reported: c.reported,
            verified: c.verified,
            rejected_mismatch: c.rejected_mismatch,
            rejected_bad_gpa: c.rejected_bad_gpa,
            rejected_no_room: c.rejected_no_room,
            merged: c.merged,
            already: c.already,
            cow_breaks: c.cow_breaks,
            removed_hints: c.removed_hints,
            store_pages: live,
            store_bytes_allocated: self.store.allocated_bytes().unwrap_or_else(|e| {
                log::warn!("dedup {}: {e}", self.name);
                0
            }),
            mapped_pages: mapped,
            bytes_saved: mapped.saturating_sub(live) * PAGE_SIZE as u64,
            vmas: self.vmas as u64,
        }
    }

    /// Checks that every live store page still hashes to its index key; returns how many
    /// pages were checked.
    pub fn verify_store(&self) -> Result<usize, DedupError> {
        let mut checked = 0;
        for (slot, hash) in self.index.entries() {
            if blake3::hash(self.store.page(slot)).as_bytes() != hash || self.store.refs(slot) == 0 {
                return Err(DedupError::Corrupt { slot });
            }
            checked += 1;
        }
        if self.index.len() != self.store.live_pages() {
            let slot = self.store.live_slots().find(|s| self.index.hash_of(*s).is_none()).unwrap_or(0);
            return Err(DedupError::Corrupt { slot });
        }
        Ok(checked)
    }

    /// Test hook: flips a byte of the store copy of the page hashing to `hash`.
    #[cfg(test)]
    pub(crate) fn corrupt_store_page(&mut self, hash: &PageHash) -> bool {
        let Some(slot) = self.index.lookup(hash) else { return false };
        let mut page = [0u8; PAGE_SIZE];
        page.copy_from_slice(self.store.page(slot));
        page[100] ^= 0xff;
        self.store.write(slot, &page);
        true
    }
}

/// Drops one reference on `slot`; frees it (forgets its hash, punches it) when none is left.
/// Returns whether it was freed.
fn release(store: &mut Store, index: &mut Index, slot: Slot, domain: &str) -> bool {
    if !store.drop_ref(slot) {
        return false;
    }
    index.remove_slot(slot);
    if let Err(e) = store.free(slot) {
        log::error!("dedup {domain}: {e}");
    }
    true
}
