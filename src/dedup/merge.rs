//! Merging a batch of reported pages: verify each page, find or make its store copy, book it,
//! then map store runs over the guest pages (`docs/fphash.md`, "What the host does").

use std::time::{Duration, Instant};

use super::index::PageHash;
use super::remap::{self, Booked, PendingRun};
use super::store::Slot;
use super::{vma, Domain, MergeStatus, VmId, PAGE_SIZE, VMA_RESERVE};

/// Least time between two reconciliations of the VMA count that a full budget asks for (a
/// guest must not make every report read `/proc/self/maps`).
const RECONCILE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Where a verified page's store copy comes from.
struct Copy {
    slot: Slot,
    /// A new slot that gets the page's bytes (else a hit on an existing one).
    fresh: bool,
    /// The page's hash (the index key).
    hash: PageHash,
}

impl Domain {
    /// Verifies and merges the reported pages `(gpa, hash)` of `vm`, writing one status per
    /// report into `statuses` (only `min(reports.len(), statuses.len())` reports are handled).
    /// An unknown `vm` gets `BadGpa` for every report.
    ///
    /// The caller guarantees that nothing writes these guest pages during the call (vCPUs
    /// paused, device I/O quiesced).
    pub fn merge_batch(&mut self, vm: VmId, reports: &[(u64, PageHash)], statuses: &mut [MergeStatus]) {
        let mut run = PendingRun::default();
        for (i, (gpa, hash)) in reports.iter().enumerate().take(statuses.len()) {
            self.counters.reported += 1;
            // The checks of a page merged before read its mapping: map what waits first.
            if !run.is_empty() && self.vms.get(&vm).is_some_and(|v| v.merged.get(*gpa).is_some()) {
                self.flush(vm, &mut run, statuses);
            }
            // A page costs at most two VMAs. Near the budget, ask the kernel whether the count
            // errs high; with nothing waiting to be mapped, or the kernel's count would miss it.
            if self.vmas + 2 > self.vma_allowance()
                && self.last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_AT_MOST_EVERY)
            {
                self.flush(vm, &mut run, statuses);
                self.reconcile_vmas();
            }
            let status = match self.merge_one(vm, i, *gpa, hash) {
                Ok((host, slot, booked)) => {
                    if !run.try_extend(host, slot, booked) {
                        self.flush(vm, &mut run, statuses);
                        run.try_extend(host, slot, booked);
                    }
                    MergeStatus::Merged
                }
                Err(status) => status,
            };
            statuses[i] = status;
            self.count_status(status);
        }
        self.flush(vm, &mut run, statuses);
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

    /// Verifies one report and books the merge: `Ok` with the host address and slot of a page
    /// to map, or the status of a report that maps nothing.
    fn merge_one(
        &mut self,
        id: VmId,
        record: usize,
        gpa: u64,
        reported: &PageHash,
    ) -> Result<(usize, Slot, Booked), MergeStatus> {
        let (region, page, host) =
            self.vms.get(&id).and_then(|vm| vm.locate(gpa)).ok_or(MergeStatus::BadGpa)?;
        let mut buf = [0u8; PAGE_SIZE];
        // SAFETY: `host` is a page inside a region registered with `register_vm`, whose
        // contract keeps it mapped and readable; the caller of `merge_batch` guarantees that
        // nothing writes it during the call, and `buf` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };

        let replaces = self.check_merged_before(id, gpa, host, &buf, reported)?;
        let booked = self.find_or_make_copy(id, region, page, &buf, reported).and_then(|copy| {
            self.check_vma_budget(id, region, page, copy.slot)?;
            let booking = self.book(id, gpa, region, page, &copy, &buf)?;
            Ok((host, copy.slot, Booked { record, gpa, region, page, booking, replaces }))
        });
        if booked.is_err() {
            if let Some(old) = replaces {
                // Not merged again: the page keeps its old booking (its copy still lies in the
                // old slot's mapping; a refresh drops it on two looks).
                self.rebook(id, gpa, old);
            }
        }
        booked
    }

    /// Books `gpa` as mapping `old` again (its reference was never dropped).
    fn rebook(&mut self, id: VmId, gpa: u64, old: Slot) {
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.merged.insert(gpa, old);
        }
    }

    /// A page merged before: `Already` if it still reads its store slot with the reported
    /// content. If it is a private copy now (its bytes differ from the slot's, or its page
    /// table says so), it may merge again: returns the old slot, whose reference the page
    /// keeps until its new mapping is in place.
    fn check_merged_before(
        &mut self,
        id: VmId,
        gpa: u64,
        host: usize,
        buf: &[u8; PAGE_SIZE],
        reported: &PageHash,
    ) -> Result<Option<Slot>, MergeStatus> {
        let Some(vm) = self.vms.get(&id) else { return Err(MergeStatus::BadGpa) };
        let Some(old) = vm.merged.get(gpa) else { return Ok(None) };
        // A page that reads its slot reads the slot's bytes: other bytes prove a copy. Equal
        // bytes are a copy only if the page table says so; anything less keeps the reference.
        let copied = self.store.page(old) != buf.as_slice()
            || self.pagemap.state(host).map(|s| s.is_copied()).unwrap_or_else(|e| {
                log::warn!("dedup {}: {e}", self.name);
                false
            });
        if !copied {
            return if self.index.hash_of(old) == Some(reported) {
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

    /// Step 2: a hit (the page equals the store page indexed under the reported hash, byte
    /// for byte, so it has that hash: the host computed it when it stored the page), or a new
    /// slot for a page the host hashed itself.
    fn find_or_make_copy(
        &mut self,
        id: VmId,
        region: usize,
        page: usize,
        buf: &[u8; PAGE_SIZE],
        reported: &PageHash,
    ) -> Result<Copy, MergeStatus> {
        if let Some(slot) = self.index.lookup(reported) {
            if self.store.page(slot) != buf.as_slice() {
                return Err(MergeStatus::Mismatch);
            }
            self.counters.verified += 1;
            return Ok(Copy { slot, fresh: false, hash: *reported });
        }
        self.counters.host_hashes += 1;
        let hash = *blake3::hash(buf).as_bytes();
        if hash != *reported {
            return Err(MergeStatus::Mismatch);
        }
        self.counters.verified += 1;
        // Continue a neighbour's slot run where possible: contiguous guest pages on
        // contiguous slots cost one VMA.
        let rv = self.vms.get(&id).and_then(|vm| vm.vmas.get(region)).ok_or(MergeStatus::BadGpa)?;
        let left = page.checked_sub(1).and_then(|p| rv.slot_at(p)).and_then(|s| s.checked_add(1));
        let right = rv.slot_at(page + 1).and_then(|s| s.checked_sub(1));
        match self.store.pick(&[left, right]) {
            Some(slot) => Ok(Copy { slot, fresh: true, hash }),
            None => {
                if !self.warned_store {
                    self.warned_store = true;
                    log::warn!(
                        "dedup {}: the store is full ({} pages); new pages are no longer merged",
                        self.name,
                        self.store.max_pages()
                    );
                }
                Err(MergeStatus::NoRoom)
            }
        }
    }

    /// VMAs the domain's guest RAM may cost now: the budget, less what the rest of the process
    /// maps beyond the reserve it always keeps.
    pub(super) fn vma_allowance(&self) -> usize {
        let process_cap = self.max_map_count.saturating_sub(VMA_RESERVE + self.other_vmas);
        self.limits.vma_budget.min(process_cap)
    }

    /// Step 3: whether mapping `slot` at `page` fits the VMA budget.
    fn check_vma_budget(
        &mut self,
        id: VmId,
        region: usize,
        page: usize,
        slot: Slot,
    ) -> Result<(), MergeStatus> {
        let delta = self.vms.get(&id).and_then(|vm| vm.vmas.get(region)).map_or(0, |rv| rv.delta(page, slot));
        if delta <= 0 || self.vmas + delta as usize <= self.vma_allowance() {
            return Ok(());
        }
        if !self.warned_vmas {
            self.warned_vmas = true;
            let label = self.vms.get(&id).map_or("?", |vm| vm.label.as_str());
            log::warn!(
                "dedup {}: VMA budget reached at {label}: guest RAM costs {} VMAs of an allowance of {} \
                 (vm.max_map_count = {}); pages that need a new VMA are no longer merged. \
                 Raise vm.max_map_count to merge more.",
                self.name,
                self.vmas,
                self.vma_allowance(),
                self.max_map_count
            );
        }
        Err(MergeStatus::NoRoom)
    }

    /// Step 4: takes the slot (or a reference on it), fills a new one, and books the page as
    /// merged; `merge_batch` maps it.
    fn book(
        &mut self,
        id: VmId,
        gpa: u64,
        region: usize,
        page: usize,
        copy: &Copy,
        buf: &[u8; PAGE_SIZE],
    ) -> Result<vma::Booking, MergeStatus> {
        if copy.fresh {
            if let Err(e) = self.store.take(copy.slot) {
                log::error!("dedup {}: {e}", self.name);
                return Err(MergeStatus::NoRoom);
            }
            self.store.write(copy.slot, buf);
            self.index.insert(copy.hash, copy.slot);
        } else {
            self.store.add_ref(copy.slot);
        }
        let Some(vm) = self.vms.get_mut(&id) else { return Err(MergeStatus::BadGpa) };
        let Some(rv) = vm.vmas.get_mut(region) else { return Err(MergeStatus::BadGpa) };
        let booking = rv.map(page, copy.slot);
        self.vmas = self.vmas.saturating_add_signed(booking.delta);
        let old = vm.merged.insert(gpa, copy.slot);
        vm.suspects.remove(&gpa);
        debug_assert!(old.is_none(), "gpa {gpa:#x} was still booked as merged");
        Ok(booking)
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
        let fd = self.store.fd();
        // SAFETY: every page of the run was verified in this batch to hold exactly the bytes of
        // its store slot, lies in registered guest RAM (the caller's contract of
        // `register_vm`), and nothing wrote it since (the caller's contract of `merge_batch`).
        let mapped = unsafe { remap::map_store(host, pages.len(), fd, slot) };
        let Err(err) = mapped else {
            pages.iter().filter_map(|b| b.replaces).for_each(|old| self.release_replaced(old));
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
                    self.release_replaced(old);
                }
                continue;
            };
            log::error!(
                "dedup {}: mmap of store slot {page_slot} at {page_host:#x} failed: {err}",
                self.name
            );
            failed += 1;
            self.unbook(id, &booked, page_slot);
            if let Some(status) = statuses.get_mut(booked.record) {
                *status = MergeStatus::NoRoom;
            }
            self.counters.merged -= 1;
            self.counters.rejected_no_room += 1;
        }
        if failed > 0 {
            self.reconcile_vmas();
        }
    }

    /// The reference of a slot a re-merged page no longer maps: the page was a copy (that is
    /// why it merged again), and now maps its new slot.
    fn release_replaced(&mut self, old: Slot) {
        self.counters.cow_breaks += 1;
        self.release(old);
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
        self.release(slot);
        if let Some(old) = booked.replaces {
            self.rebook(id, booked.gpa, old);
        }
    }

    /// Sets every region's VMA count from `/proc/self/maps`, and what the rest of the process
    /// maps. Counts the kernel's excess over the count, which must stay 0.
    pub fn reconcile_vmas(&mut self) {
        self.last_reconcile = Some(Instant::now());
        let ranges: Vec<(usize, usize)> =
            self.vms.values().flat_map(|vm| vm.regions.iter().map(|r| (r.host_addr, r.len))).collect();
        let (counts, total) = match vma::maps_overlapping(&ranges) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("dedup {}: cannot read /proc/self/maps: {e}", self.name);
                return;
            }
        };
        self.counters.vma_reconciles += 1;
        let mut measured = counts.into_iter();
        let mut guest = 0;
        for rv in self.vms.values_mut().flat_map(|vm| vm.vmas.iter_mut()) {
            let kernel = measured.next().unwrap_or(0);
            if kernel > rv.vmas() {
                let excess = (kernel - rv.vmas()) as u64;
                self.counters.vma_undercount_max = self.counters.vma_undercount_max.max(excess);
                log::warn!(
                    "dedup {}: the kernel has {kernel} VMAs where the count said {}",
                    self.name,
                    rv.vmas()
                );
            }
            rv.reconcile(kernel);
            guest += rv.vmas();
        }
        self.vmas = guest;
        self.other_vmas = total.saturating_sub(guest);
    }
}
