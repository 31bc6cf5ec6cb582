//! Merging a batch of reported pages (`docs/fphash.md`, "What the host guarantees"), in
//! phases so that a broker costs a round trip per phase, not per page:
//! 1. read each page, and settle pages merged before (`Already`, or a copy that may merge
//!    again);
//! 2. look the reported hashes up; a hit takes a reference and is proven by a byte compare
//!    with the stored page, so it costs no hash;
//! 3. offer the rest to the store, which hashes them and copies new pages into new slots;
//! 4. in report order, check the VMA budget, book each page and map store runs over the guest
//!    pages.

use std::collections::HashSet;
use std::time::Duration;

use super::backend::{Backend, Unavailable};
use super::index::PageHash;
use super::remap::{self, Booked, PendingRun};
use super::shared::{StoreRequest, Stored};
use super::store::Slot;
use super::vma::MapKey;
use super::{Domain, MergeStatus, VmId, PAGE_SIZE, VMA_RESERVE};

/// Least time between two reconciliations of the VMA count that a full budget asks for (a
/// guest must not make every report read `/proc/self/maps`).
const RECONCILE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// A report that passed phase 1.
struct Candidate {
    /// Its index in the part of the batch.
    index: usize,
    gpa: u64,
    region: usize,
    page: usize,
    host: usize,
    /// The reported hash (a lookup key only), or the host's own when the guest gave none.
    hash: PageHash,
    /// Whether this process computed `hash`.
    host_hashed: bool,
    /// The slot the page was merged with before it was copied on write.
    replaces: Option<Slot>,
    /// The slot found or made for it (with a reference), once known.
    slot: Option<Slot>,
}

/// The bytes of a guest page, read in place: the merge compares, hashes and stores guest pages
/// without copying them first.
///
/// # Safety
/// `host` is the address of a page of a region registered with [`Domain::register_vm`] (so
/// it is mapped and readable), and for `'a` nothing writes it and nothing is mapped over it:
/// the caller of a merge keeps the vCPUs paused and device I/O quiesced, and the merge reads
/// pages only in phases 1 to 3, before phase 4 maps store runs over them.
unsafe fn guest_page<'a>(host: usize) -> &'a [u8; PAGE_SIZE] {
    // SAFETY: the caller's contract above; a page is 4 KiB aligned, so the array is too.
    unsafe { &*(host as *const [u8; PAGE_SIZE]) }
}

impl Domain {
    /// Verifies and merges the reported pages `(gpa, hash)` of `vm`, writing one status per
    /// report into `statuses` (only `min(reports.len(), statuses.len())` reports are handled).
    /// An unknown `vm` gets `BadGpa` for every report.
    ///
    /// The caller guarantees that nothing writes these guest pages during the call (vCPUs
    /// paused, device I/O quiesced).
    pub fn merge_batch(&mut self, vm: VmId, reports: &[(u64, PageHash)], statuses: &mut [MergeStatus]) {
        let reports: Vec<(u64, Option<PageHash>)> = reports.iter().map(|(g, h)| (*g, Some(*h))).collect();
        self.merge_reports(vm, &reports, statuses);
    }

    /// As [`Domain::merge_batch`] for pages reported without a hash (`docs/fphash.md`,
    /// HOST_HASH): the host hashes each page it reads, and uses that as the lookup key.
    pub fn merge_host_hashed(&mut self, vm: VmId, gpas: &[u64], statuses: &mut [MergeStatus]) {
        let reports: Vec<(u64, Option<PageHash>)> = gpas.iter().map(|g| (*g, None)).collect();
        self.merge_reports(vm, &reports, statuses);
    }

    fn merge_reports(&mut self, vm: VmId, reports: &[(u64, Option<PageHash>)], statuses: &mut [MergeStatus]) {
        let n = reports.len().min(statuses.len());
        self.sync_generation();
        let mut start = 0;
        while start < n {
            // A gpa repeated in the batch starts a new part, which sees the first merged.
            let mut seen = HashSet::new();
            let end = (start..n).find(|&i| !seen.insert(reports[i].0)).unwrap_or(n);
            self.merge_part(vm, &reports[start..end], &mut statuses[start..end]);
            start = end;
        }
    }

    fn merge_part(&mut self, vm: VmId, reports: &[(u64, Option<PageHash>)], statuses: &mut [MergeStatus]) {
        self.counters.reported += reports.len() as u64;
        let mut candidates = Vec::with_capacity(reports.len());
        for (index, (gpa, hash)) in reports.iter().enumerate() {
            match self.read_candidate(vm, index, *gpa, hash.as_ref()) {
                Ok(c) => candidates.push(c),
                Err(status) => statuses[index] = status,
            }
        }
        let found = self.find_copies(vm, &mut candidates, statuses);
        let same_store = self.backend.current_generation() == self.generation;
        // Slots of a store that is gone since (the broker was lost mid-batch) map nothing.
        if found.is_ok() && same_store {
            self.book_and_map(vm, &mut candidates, statuses);
        } else {
            // A broker that stopped answering mid-batch still counts the references found
            // before: hand them back (remotely, once it answers again).
            let found: Vec<Slot> = candidates.iter_mut().filter_map(|c| c.slot.take()).collect();
            if same_store {
                let holder = self.vms.get(&vm).map_or(0, |v| v.holder);
                self.backend.release(holder, &found);
            }
            for c in &candidates {
                statuses[c.index] = MergeStatus::NoRoom;
            }
        }
        // Pages that were copies and did not merge again keep their old booking (their copy
        // still lies in the old slot's mapping; a refresh drops it on two looks).
        for c in candidates.iter().filter(|c| statuses[c.index] != MergeStatus::Merged) {
            if let Some(old) = c.replaces {
                self.rebook(vm, c.gpa, old);
            }
        }
        for &status in statuses.iter() {
            self.count_status(status);
        }
    }

    fn count_status(&mut self, status: MergeStatus) {
        let c = &mut self.counters;
        match status {
            MergeStatus::Merged => c.merged += 1,
            MergeStatus::Already => c.already += 1,
            MergeStatus::Mismatch => c.rejected_mismatch += 1,
            MergeStatus::BadGpa => c.rejected_bad_gpa += 1,
            MergeStatus::NoRoom => c.rejected_no_room += 1,
        }
    }

    /// Phase 1: locates the page, hashes it when the guest did not, and settles a page merged
    /// before.
    fn read_candidate(
        &mut self,
        id: VmId,
        index: usize,
        gpa: u64,
        reported: Option<&PageHash>,
    ) -> Result<Candidate, MergeStatus> {
        let (region, page, host) =
            self.vms.get(&id).and_then(|vm| vm.locate(gpa)).ok_or(MergeStatus::BadGpa)?;
        // A page that maps a shared image page still: nothing to hash or map.
        if let Some(status) = self.check_image_page(id, gpa, host) {
            return Err(status);
        }
        // SAFETY: `locate` found `host` in a region registered with `register_vm`, and this
        // read happens in phase 1, before anything is mapped over it.
        let buf = unsafe { guest_page(host) };
        // A page that still maps its slot is settled before hashing: it costs no hash.
        let replaces = self.check_merged_before(id, gpa, host, buf, reported)?;
        let hash = match reported {
            Some(h) => *h,
            None => {
                self.counters.host_hashes_for_guests += 1;
                *blake3::hash(buf).as_bytes()
            }
        };
        Ok(Candidate {
            index,
            gpa,
            region,
            page,
            host,
            hash,
            host_hashed: reported.is_none(),
            replaces,
            slot: None,
        })
    }

    /// Books `gpa` as mapping `old` again (its reference was never dropped).
    fn rebook(&mut self, id: VmId, gpa: u64, old: Slot) {
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.merged.insert(gpa, old);
        }
    }

    /// A page merged before: `Already` if it still reads its store slot with the reported
    /// content (a page reported without a hash reads the slot's own bytes, so its content is
    /// the slot's). If it is a private copy now (its bytes differ from the slot's, or its page
    /// table says so), it may merge again: returns the old slot, whose reference the page
    /// keeps until its new mapping is in place.
    fn check_merged_before(
        &mut self,
        id: VmId,
        gpa: u64,
        host: usize,
        buf: &[u8; PAGE_SIZE],
        reported: Option<&PageHash>,
    ) -> Result<Option<Slot>, MergeStatus> {
        let Some(vm) = self.vms.get(&id) else { return Err(MergeStatus::BadGpa) };
        let Some(old) = vm.merged.get(gpa) else { return Ok(None) };
        // A page that reads its slot reads the slot's bytes: other bytes prove a copy. Equal
        // bytes are a copy only if the page table says so; anything less keeps the reference.
        let copied = self.backend.page(old) != Some(buf.as_slice())
            || self.pagemap.state(host).map(|s| s.is_copied()).unwrap_or_else(|e| {
                log::warn!("dedup {}: {e}", self.name);
                false
            });
        if !copied {
            return if reported.is_none_or(|h| self.backend.hash_of(old).as_ref() == Some(h)) {
                Err(MergeStatus::Already)
            } else {
                Err(MergeStatus::Mismatch)
            };
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.merged.remove(gpa);
            vm.suspects.remove(&gpa);
        }
        Ok(Some(old))
    }

    /// Phases 2 and 3: a slot with a reference for every candidate that can have one; the
    /// others get their status.
    fn find_copies(
        &mut self,
        id: VmId,
        candidates: &mut [Candidate],
        statuses: &mut [MergeStatus],
    ) -> Result<(), Unavailable> {
        let holder = self.vms.get(&id).map_or(0, |vm| vm.holder);
        let hashes: Vec<PageHash> = candidates.iter().map(|c| c.hash).collect();
        let mut found = Vec::with_capacity(hashes.len());
        self.backend.lookup(holder, &hashes, &mut found)?;
        let mut wrong = Vec::new();
        for (c, slot) in candidates.iter_mut().zip(found) {
            let Some(slot) = slot else { continue };
            // SAFETY: `c.host` passed `locate` in phase 1; nothing is mapped over it before
            // phase 4.
            let page = unsafe { guest_page(c.host) };
            if self.backend.page(slot) == Some(page.as_slice()) {
                c.slot = Some(slot);
                self.counters.verified += 1;
            } else {
                // Another page under that hash: the report lies (or the page changed).
                wrong.push(slot);
                statuses[c.index] = MergeStatus::Mismatch;
            }
        }
        self.backend.release(holder, &wrong);

        let misses: Vec<usize> = (0..candidates.len())
            .filter(|&k| {
                candidates[k].slot.is_none() && statuses[candidates[k].index] != MergeStatus::Mismatch
            })
            .collect();
        if misses.is_empty() {
            return Ok(());
        }
        let requests: Vec<StoreRequest<'_>> = misses
            .iter()
            .enumerate()
            .map(|(n, &k)| {
                let c = &candidates[k];
                // A new page continues its neighbours' slot runs where it can, and the page
                // before it in this request if that is its left neighbour.
                let follows_previous = n > 0 && {
                    let p = &candidates[misses[n - 1]];
                    p.region == c.region && p.page + 1 == c.page
                };
                StoreRequest {
                    hash: c.hash,
                    // SAFETY: as above; the request lives only through `store` below.
                    page: unsafe { guest_page(c.host) },
                    hints: self.slot_hints(id, c),
                    follows_previous,
                    // The broker hashes every page it is sent; in this process, a hash this
                    // process computed needs no second look.
                    hashed_here: c.host_hashed && matches!(self.backend, Backend::Local(_)),
                }
            })
            .collect();
        let mut stored = Vec::with_capacity(requests.len());
        self.backend.store(holder, &requests, &mut stored)?;
        for (&k, outcome) in misses.iter().zip(stored) {
            let c = &mut candidates[k];
            match outcome {
                Stored::Slot { slot, .. } => {
                    c.slot = Some(slot);
                    self.counters.verified += 1;
                }
                Stored::Mismatch => statuses[c.index] = MergeStatus::Mismatch,
                Stored::Full => statuses[c.index] = MergeStatus::NoRoom,
            }
        }
        Ok(())
    }

    /// Slots that would continue the neighbours' runs in the store of this generation.
    fn slot_hints(&self, id: VmId, c: &Candidate) -> [Option<Slot>; 2] {
        let Some(rv) = self.vms.get(&id).and_then(|vm| vm.vmas.get(c.region)) else { return [None, None] };
        let left = c
            .page
            .checked_sub(1)
            .and_then(|p| rv.slot_at(p))
            .and_then(|k| self.slot_of(k))
            .and_then(|s| s.checked_add(1));
        let right = rv.slot_at(c.page + 1).and_then(|k| self.slot_of(k)).and_then(|s| s.checked_sub(1));
        [left, right]
    }

    /// The VMA model's key of a slot of the current store.
    pub(super) fn key(&self, slot: Slot) -> MapKey {
        // 31 bits of generation: bit 63 marks image pages (`image.rs`).
        (MapKey::from(self.generation & 0x7fff_ffff) << 32) | MapKey::from(slot)
    }

    /// The slot of a key, if it is of the current store.
    fn slot_of(&self, key: MapKey) -> Option<Slot> {
        (key >> 32 == MapKey::from(self.generation & 0x7fff_ffff)).then_some(key as Slot)
    }

    /// Phase 4: in report order, budget, booking and mapping, a run at a time.
    fn book_and_map(&mut self, id: VmId, candidates: &mut [Candidate], statuses: &mut [MergeStatus]) {
        let holder = self.vms.get(&id).map_or(0, |vm| vm.holder);
        let mut run = PendingRun::default();
        for c in candidates.iter_mut() {
            let Some(slot) = c.slot else { continue };
            // A page costs at most two VMAs. Near the budget, ask the kernel whether the count
            // errs high; with nothing waiting to be mapped, or the kernel's count would miss it.
            if self.vmas + 2 > self.vma_allowance()
                && self.last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_AT_MOST_EVERY)
            {
                self.flush(id, &mut run, statuses);
                self.reconcile_vmas();
            }
            if let Err(status) = self.check_vma_budget(id, c.region, c.page, slot) {
                self.backend.release(holder, &[slot]);
                statuses[c.index] = status;
                continue;
            }
            let Some(booking) = self.book(id, c.gpa, c.region, c.page, slot) else {
                self.backend.release(holder, &[slot]);
                statuses[c.index] = MergeStatus::BadGpa;
                continue;
            };
            statuses[c.index] = MergeStatus::Merged;
            let booked = Booked {
                record: c.index,
                gpa: c.gpa,
                region: c.region,
                page: c.page,
                booking,
                replaces: c.replaces,
            };
            if !run.try_extend(c.host, slot, booked) {
                self.flush(id, &mut run, statuses);
                run.try_extend(c.host, slot, booked);
            }
        }
        self.flush(id, &mut run, statuses);
    }

    /// VMAs the domain's guest RAM may cost now: the budget, less what the rest of the process
    /// maps beyond the reserve it always keeps.
    pub(super) fn vma_allowance(&self) -> usize {
        let process_cap = self.max_map_count.saturating_sub(VMA_RESERVE + self.other_vmas);
        self.limits.vma_budget.min(process_cap)
    }

    /// Whether mapping `slot` at `page` fits the VMA budget.
    fn check_vma_budget(
        &mut self,
        id: VmId,
        region: usize,
        page: usize,
        slot: Slot,
    ) -> Result<(), MergeStatus> {
        let key = self.key(slot);
        let delta = self.vms.get(&id).and_then(|vm| vm.vmas.get(region)).map_or(0, |rv| rv.delta(page, key));
        if delta <= 0 || self.vmas + delta as usize <= self.vma_allowance() {
            return Ok(());
        }
        self.warn_vma_budget(id);
        Err(MergeStatus::NoRoom)
    }

    /// Says once per domain that the VMA budget stops merges (and image sharing) at `id`.
    pub(super) fn warn_vma_budget(&mut self, id: VmId) {
        if self.warned_vmas {
            return;
        }
        self.warned_vmas = true;
        let label = self.vms.get(&id).map_or("?", |vm| vm.label.as_str());
        log::warn!(
            "dedup {}: VMA budget reached at {label}: guest RAM costs {} VMAs of an allowance of {} \
             (vm.max_map_count = {}); pages that need a new VMA are no longer merged, nor mapped from \
             shared images (those are copied). Raise vm.max_map_count to merge more (as root: sysctl \
             -w vm.max_map_count=N).",
            self.name,
            self.vmas,
            self.vma_allowance(),
            self.max_map_count
        );
    }

    /// Books the page as merged with `slot` (its reference is held already); `merge_batch`
    /// maps it.
    fn book(
        &mut self,
        id: VmId,
        gpa: u64,
        region: usize,
        page: usize,
        slot: Slot,
    ) -> Option<super::vma::Booking> {
        let key = self.key(slot);
        let vm = self.vms.get_mut(&id)?;
        let booking = vm.vmas.get_mut(region)?.map(page, key);
        self.vmas = self.vmas.saturating_add_signed(booking.delta);
        let old = vm.merged.insert(gpa, slot);
        vm.suspects.remove(&gpa);
        debug_assert!(old.is_none(), "gpa {gpa:#x} was still booked as merged");
        Some(booking)
    }

    /// Maps the pages `run` holds (booked as merged already). When the run cannot be mapped at
    /// once, its pages are mapped one by one; a page that cannot be mapped at all keeps its
    /// own bytes (the kernel leaves the old mapping), gets `NoRoom`, and its booking is taken
    /// back; the VMA count is then set from the kernel's.
    fn flush(&mut self, id: VmId, run: &mut PendingRun, statuses: &mut [MergeStatus]) {
        if run.is_empty() {
            return;
        }
        let (host, slot, pages) = run.take();
        let Some(fd) = self.backend.fd() else {
            for (n, booked) in pages.iter().enumerate() {
                self.unbook(id, booked, slot + n as Slot);
                statuses[booked.record] = MergeStatus::NoRoom;
            }
            return;
        };
        // SAFETY: every page of the run was verified in this batch to hold exactly the bytes of
        // its store slot, lies in registered guest RAM (the caller's contract of
        // `register_vm`), and nothing wrote it since (the caller's contract of `merge_batch`).
        let mapped = unsafe { remap::map_store(host, pages.len(), fd, slot) };
        let Err(err) = mapped else {
            pages.iter().filter_map(|b| b.replaces).for_each(|old| self.release_replaced(id, old));
            return;
        };
        log::warn!(
            "dedup {}: mmap of {} store pages failed ({err}); mapping them one by one",
            self.name,
            pages.len()
        );
        let mut failed = 0;
        for (n, booked) in pages.into_iter().enumerate() {
            let page_host = host + n * PAGE_SIZE;
            let page_slot = slot + n as Slot;
            // SAFETY: one page of the run above.
            let Err(err) = (unsafe { remap::map_store(page_host, 1, fd, page_slot) }) else {
                if let Some(old) = booked.replaces {
                    self.release_replaced(id, old);
                }
                continue;
            };
            log::error!(
                "dedup {}: mmap of store slot {page_slot} at {page_host:#x} failed: {err}",
                self.name
            );
            failed += 1;
            self.unbook(id, &booked, page_slot);
            statuses[booked.record] = MergeStatus::NoRoom;
        }
        if failed > 0 {
            self.reconcile_vmas();
        }
    }

    /// The reference of a slot a re-merged page no longer maps: the page was a copy (that is
    /// why it merged again), and now maps its new slot.
    fn release_replaced(&mut self, id: VmId, old: Slot) {
        self.counters.cow_breaks += 1;
        self.release(id, &[old]);
    }

    /// Takes back the booking of a page whose mapping failed: it keeps what it mapped before.
    fn unbook(&mut self, id: VmId, booked: &Booked, slot: Slot) {
        if let Some(vm) = self.vms.get_mut(&id) {
            if let Some(rv) = vm.vmas.get_mut(booked.region) {
                let before = rv.vmas();
                rv.unbook_failed(booked.page, booked.booking);
                self.vmas = self.vmas + rv.vmas() - before;
            }
            vm.merged.remove(booked.gpa);
        }
        // A page it replaces is booked again by `merge_part`, which sees the status.
        self.release(id, &[slot]);
    }
}
