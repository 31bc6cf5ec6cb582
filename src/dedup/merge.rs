//! Merging a batch of reported pages (`docs/fphash.md`, "What the host guarantees"), in
//! phases so that a broker costs a round trip per phase, not per page:
//! 1. read each page, and settle pages merged before (`Already`, or a copy that may merge
//!    again) and pages that map a shared image;
//! 2. look the reported hashes up; a hit takes a reference and is proven by a byte compare
//!    with the stored page, so it costs no hash (through a broker, only in a batch of 64 pages
//!    or more: a lookup is a round trip of its own, and phase 3 answers a page it holds all
//!    the same);
//! 3. offer the rest to the shared pages, which hash them, answer a page they hold with its
//!    slot (after a byte compare) and copy new pages into new slots;
//! 4. in report order, check the VMA budget, book each page and map store runs over the guest
//!    pages.
//!
//! Every report of the batch is a [`Candidate`] with one [`State`] from start to end; the
//! statuses are written once, from the states, when the batch is done.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::domain::{Domain, Place, VmState};
use super::image_ids::{folio_block, ImageId};
use super::remap::{self, Booked, PendingRun};
use super::vma::{Booking, MapKey};
use super::words::{MergeStatus, Offered, PageHash, PageOffer, Report, Slot, VmId, PAGE_SIZE};

/// Least time between two reconciliations of the VMA count that a full budget asks for (a
/// guest must not make every report read `/proc/self/maps`).
const RECONCILE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// One report of a batch, from phase 1 to the end.
struct Candidate {
    /// Its index in the part of the batch (and in its statuses).
    record: usize,
    gpa: u64,
    /// Where it lies in guest RAM (phase 1 found it, or the report is `Done`).
    at: Place,
    /// The reported hash (a lookup key only), or the host's own when the guest gave none.
    hash: PageHash,
    /// Whether this process computed `hash`.
    host_hashed: bool,
    /// The slot the page was merged with before it was copied on write: its reference is
    /// kept until the page's new mapping is in place.
    replaces: Option<Slot>,
    /// The image page (image, page of the file) it maps, when it maps one: merged by its
    /// content like any other page (`docs/fphash.md`, "Read-only images").
    image: Option<(ImageId, u64)>,
    state: State,
}

/// Where a candidate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Read; no slot yet.
    Looking,
    /// A slot that holds its bytes, with a reference.
    Found(Slot),
    /// Settled.
    Done(MergeStatus),
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
    /// Verifies and merges the reported pages of `vm`, writing one status per report into
    /// `statuses` (only `min(reports.len(), statuses.len())` reports are handled). An unknown
    /// `vm` gets `BadGpa` for every report (and is logged once).
    ///
    /// The caller guarantees that nothing writes these guest pages during the call (vCPUs
    /// paused, device I/O quiesced).
    pub fn merge(&mut self, id: VmId, reports: &[Report], statuses: &mut [MergeStatus]) {
        let n = reports.len().min(statuses.len());
        self.sync_generation();
        self.counters.reported += n as u64;
        let Some(mut vm) = self.take_vm(id) else {
            statuses[..n].fill(MergeStatus::BadGpa);
            self.counters.rejected_bad_gpa += n as u64;
            return;
        };
        vm.zero_sweep.note_reports(Instant::now());
        let mut start = 0;
        while start < n {
            // A gpa repeated in the batch starts a new part, which sees the first merged.
            let mut seen = HashSet::new();
            let end = (start..n).find(|&i| !seen.insert(reports[i].gpa)).unwrap_or(n);
            self.merge_part(&mut vm, &reports[start..end], &mut statuses[start..end]);
            start = end;
        }
        self.images.drop_fresh_given_back();
        self.put_vm(id, vm);
    }

    fn merge_part(&mut self, vm: &mut VmState, reports: &[Report], statuses: &mut [MergeStatus]) {
        let mut candidates: Vec<Candidate> =
            reports.iter().enumerate().map(|(record, r)| self.read_candidate(vm, record, r)).collect();
        let same_store =
            self.find_copies(vm, &mut candidates) && self.backend.current_generation() == self.generation;
        if same_store {
            self.book_and_map(vm, &mut candidates);
        } else {
            // A broker that stopped answering mid-batch still counts the references found
            // before: hand them back (once it answers again). Slots of a store that is gone
            // (the broker was lost) map nothing.
            let found: Vec<Slot> = candidates.iter().filter_map(|c| c.found()).collect();
            if self.backend.current_generation() == self.generation {
                self.backend.release(vm.holder, &found);
            }
            for c in candidates.iter_mut().filter(|c| !c.is_done()) {
                c.state = State::Done(MergeStatus::NoRoom);
            }
        }
        for c in &candidates {
            let status = match c.state {
                State::Done(status) => status,
                // Every candidate ends settled; one that did not is not merged.
                State::Looking | State::Found(_) => MergeStatus::NoRoom,
            };
            // A page that was a copy and did not merge again keeps its old booking (its copy
            // still lies in the old slot's mapping; a refresh drops it on two looks).
            if let (Some(old), false) = (c.replaces, status == MergeStatus::Merged) {
                vm.merged.insert(c.gpa, old);
            }
            statuses[c.record] = status;
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

    /// Phase 1: locates the page, settles a page merged before or mapping an image, and
    /// hashes it when the guest did not.
    fn read_candidate(&mut self, vm: &mut VmState, record: usize, report: &Report) -> Candidate {
        let mut c = Candidate {
            record,
            gpa: report.gpa,
            at: Place { region: 0, page: 0, host: 0 },
            hash: report.hash.unwrap_or_default(),
            host_hashed: report.hash.is_none(),
            replaces: None,
            image: None,
            state: State::Looking,
        };
        let Some(at) = vm.locate(report.gpa) else {
            c.state = State::Done(MergeStatus::BadGpa);
            return c;
        };
        c.at = at;
        // A page that maps a shared image page still is merged by its content (the store's
        // copy then backs it); one the guest wrote is its own copy, a page like any other.
        c.image = self.image_page(vm, report.gpa, at.host);
        // SAFETY: `locate` found `host` in a region registered with `register_vm`, and this
        // read happens in phase 1, before anything is mapped over it.
        let buf = unsafe { guest_page(at.host) };
        // A page that still maps its slot is settled before hashing: it costs no hash.
        match self.check_merged_before(vm, report.gpa, at.host, buf, report.hash.as_ref()) {
            Ok(replaces) => c.replaces = replaces,
            Err(status) => {
                c.state = State::Done(status);
                return c;
            }
        }
        // Neither merged nor an image page by the VMA model: a file page there is the snapshot's.
        let snapshot_ram =
            vm.regions[at.region].maps_snapshot && !vm.vmas[at.region].maps_files_in(at.page, 1);
        if c.image.is_none() && snapshot_ram && self.maps_snapshot_file(at.host) {
            self.counters.snapshot_pages += 1;
            c.state = State::Done(MergeStatus::Already);
            return c;
        }
        if report.hash.is_none() {
            // A page of a file this process hashed before (another VM's disk on the same file)
            // needs no second hash: the file cannot change while it is shared (its lease).
            match c.image.and_then(|(image, page)| self.images.hash_of(image, page)) {
                Some(hash) => {
                    self.counters.image_hashes_remembered += 1;
                    c.hash = hash;
                }
                None => {
                    self.counters.host_hashes_for_guests += 1;
                    c.hash = *blake3::hash(buf).as_bytes();
                    if let Some((image, page)) = c.image {
                        self.images.remember(image, page, c.hash);
                    }
                }
            }
        }
        c
    }

    /// Whether the page at `host`, in a region that maps a snapshot's memory file and neither
    /// merged nor mapping an image, still maps the file: then it is the snapshot's copy in the
    /// page cache, which every clone shares already (the snapshot's copy is the canonical
    /// one: nothing is hashed, nothing copied into the store). A page the VM wrote is its own
    /// anonymous copy (and a hole of the file was anonymous from the start): merged as any.
    fn maps_snapshot_file(&self, host: usize) -> bool {
        // SAFETY: `host` is a guest page `locate` found in a registered region; reading a byte
        // faults a page never touched since the restore in from the file, as the report's
        // read would, so that the page table says what backs it.
        unsafe { std::ptr::read_volatile(host as *const u8) };
        matches!(self.pagemap.state(host), Ok(super::pagemap::PageState::Store))
    }

    /// A page merged before: `Already` if it still reads its store slot with the reported
    /// content (a page reported without a hash reads the slot's own bytes, so its content is
    /// the slot's). If it is a private copy now (its bytes differ from the slot's, or its page
    /// table says so), it may merge again: returns the old slot, whose reference the page
    /// keeps until its new mapping is in place.
    fn check_merged_before(
        &mut self,
        vm: &mut VmState,
        gpa: u64,
        host: usize,
        buf: &[u8; PAGE_SIZE],
        reported: Option<&PageHash>,
    ) -> Result<Option<Slot>, MergeStatus> {
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
        vm.merged.remove(gpa);
        vm.suspects.remove(&gpa);
        Ok(Some(old))
    }

    /// Phases 2 and 3: a slot with a reference for every candidate that can have one; the
    /// others are settled. False when the broker could not be asked.
    fn find_copies(&mut self, vm: &VmState, candidates: &mut [Candidate]) -> bool {
        let looking: Vec<usize> =
            (0..candidates.len()).filter(|&k| candidates[k].state == State::Looking).collect();
        if looking.is_empty() {
            return true;
        }
        if self.backend.looks_up_first(looking.len()) && !self.look_up(vm, &looking, candidates) {
            return false;
        }
        self.offer_misses(vm, candidates)
    }

    /// Phase 2: the candidates `looking` whose hash the store knows and whose bytes its page
    /// holds get that slot. False when the backend could not be asked.
    fn look_up(&mut self, vm: &VmState, looking: &[usize], candidates: &mut [Candidate]) -> bool {
        let hashes: Vec<PageHash> = looking.iter().map(|&k| candidates[k].hash).collect();
        let mut found = Vec::with_capacity(hashes.len());
        if self.backend.lookup(vm.holder, &hashes, &mut found).is_err() {
            return false;
        }
        let mut wrong = Vec::new();
        for (&k, slot) in looking.iter().zip(found) {
            let Some(slot) = slot else { continue };
            let c = &mut candidates[k];
            // SAFETY: `c.at.host` passed `locate` in phase 1; nothing is mapped over it before
            // phase 4.
            let page = unsafe { guest_page(c.at.host) };
            if self.backend.page(slot) == Some(page.as_slice()) {
                c.state = State::Found(slot);
                self.counters.verified += 1;
            } else {
                // Another page under that hash: the report lies (or the page changed).
                wrong.push(slot);
                c.state = State::Done(MergeStatus::Mismatch);
            }
        }
        self.backend.release(vm.holder, &wrong);
        true
    }

    /// Phase 3: the candidates still looking are offered; the store answers each with a slot
    /// (the page it holds already, or a new one with these bytes). False when the backend
    /// could not be asked.
    fn offer_misses(&mut self, vm: &VmState, candidates: &mut [Candidate]) -> bool {
        let misses: Vec<usize> =
            (0..candidates.len()).filter(|&k| candidates[k].state == State::Looking).collect();
        if misses.is_empty() {
            return true;
        }
        let rehash = !self.backend.trusts_our_hashes();
        let offers: Vec<PageOffer<'_>> = misses
            .iter()
            .enumerate()
            .map(|(n, &k)| {
                let c = &candidates[k];
                // A new page continues its neighbours' slot runs where it can, and the page
                // before it in this offer if that is its left neighbour.
                let follows_previous = n > 0 && {
                    let p = &candidates[misses[n - 1]];
                    p.at.region == c.at.region && p.at.page + 1 == c.at.page
                };
                PageOffer {
                    hash: c.hash,
                    // SAFETY: as above; the offer lives only through `offer` below.
                    page: unsafe { guest_page(c.at.host) },
                    hints: self.slot_hints(vm, c.at),
                    follows_previous,
                    // The broker hashes every page it is sent; in this process, a hash this
                    // process computed needs no second look.
                    hashed_here: c.host_hashed && !rehash,
                }
            })
            .collect();
        let mut outcomes = Vec::with_capacity(offers.len());
        if self.backend.offer(vm.holder, &offers, &mut outcomes).is_err() {
            return false;
        }
        for (&k, outcome) in misses.iter().zip(outcomes) {
            let c = &mut candidates[k];
            c.state = match outcome {
                Offered::Slot { slot, .. } => {
                    self.counters.verified += 1;
                    State::Found(slot)
                }
                Offered::Mismatch => State::Done(MergeStatus::Mismatch),
                Offered::Full => State::Done(MergeStatus::NoRoom),
            };
        }
        true
    }

    /// Slots that would continue the neighbours' runs in the store of this generation.
    fn slot_hints(&self, vm: &VmState, at: Place) -> [Option<Slot>; 2] {
        let Some(rv) = vm.vmas.get(at.region) else { return [None, None] };
        let left = at
            .page
            .checked_sub(1)
            .and_then(|p| rv.slot_at(p))
            .and_then(|k| self.slot_of(k))
            .and_then(|s| s.checked_add(1));
        let right = rv.slot_at(at.page + 1).and_then(|k| self.slot_of(k)).and_then(|s| s.checked_sub(1));
        [left, right]
    }

    /// The VMA model's key of a slot of the current store.
    pub(crate) fn key(&self, slot: Slot) -> MapKey {
        // 31 bits of generation: bit 63 marks image pages (`image.rs`).
        (MapKey::from(self.generation & 0x7fff_ffff) << 32) | MapKey::from(slot)
    }

    /// The slot of a key, if it is of the current store.
    fn slot_of(&self, key: MapKey) -> Option<Slot> {
        (key >> 32 == MapKey::from(self.generation & 0x7fff_ffff)).then_some(key as Slot)
    }

    /// Phase 4: in report order, budget, booking and mapping, a run at a time.
    fn book_and_map(&mut self, vm: &mut VmState, candidates: &mut [Candidate]) {
        let mut run = PendingRun::default();
        for k in 0..candidates.len() {
            let State::Found(slot) = candidates[k].state else { continue };
            // A page costs at most two VMAs. Near the budget, ask the kernel whether the count
            // errs high; with nothing waiting to be mapped, or the kernel's count would miss it.
            if self.vmas + 2 > self.vma_allowance()
                && self.last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_AT_MOST_EVERY)
            {
                self.flush(vm, &mut run, candidates);
                self.reconcile_vmas_with(Some(vm));
            }
            let (gpa, at, replaces, image) =
                (candidates[k].gpa, candidates[k].at, candidates[k].replaces, candidates[k].image);
            let key = self.key(slot);
            let delta = vm.vmas.get(at.region).map_or(0, |rv| rv.delta(at.page, key));
            if !self.fits_vma_budget(vm, delta) {
                self.backend.release(vm.holder, &[slot]);
                candidates[k].state = State::Done(MergeStatus::NoRoom);
                continue;
            }
            let Some(booking) = self.book(vm, gpa, at, slot) else {
                self.backend.release(vm.holder, &[slot]);
                candidates[k].state = State::Done(MergeStatus::BadGpa);
                continue;
            };
            let booked = Booked { record: k, gpa, at, booking, replaces, image };
            candidates[k].state = State::Done(MergeStatus::Merged);
            if !run.try_extend(at.host, slot, booked) {
                self.flush(vm, &mut run, candidates);
                run.try_extend(at.host, slot, booked);
            }
        }
        self.flush(vm, &mut run, candidates);
    }

    /// Books the page as merged with `slot` (its reference is held already); `flush` maps it.
    fn book(&mut self, vm: &mut VmState, gpa: u64, at: Place, slot: Slot) -> Option<Booking> {
        let key = self.key(slot);
        let booking = vm.vmas.get_mut(at.region)?.map(at.page, key);
        self.vmas = self.vmas.saturating_add_signed(booking.delta);
        let old = vm.merged.insert(gpa, slot);
        vm.suspects.remove(&gpa);
        debug_assert!(old.is_none(), "gpa {gpa:#x} was still booked as merged");
        Some(booking)
    }

    /// Maps the pages `run` holds (booked as merged already). When the run cannot be mapped at
    /// once, its pages are mapped one by one; a page that cannot be mapped at all keeps its
    /// own bytes (the kernel leaves the old mapping), becomes `NoRoom`, and its booking is
    /// taken back; the VMA count is then set from the kernel's.
    fn flush(&mut self, vm: &mut VmState, run: &mut PendingRun, candidates: &mut [Candidate]) {
        if run.is_empty() {
            return;
        }
        let (host, slot, pages) = run.take();
        let Some(fd) = self.backend.fd() else {
            for (n, booked) in pages.iter().enumerate() {
                self.unbook(vm, booked, slot + n as Slot);
                candidates[booked.record].state = State::Done(MergeStatus::NoRoom);
            }
            return;
        };
        // SAFETY: every page of the run was verified in this batch to hold exactly the bytes of
        // its store slot, lies in registered guest RAM (the caller's contract of
        // `register_vm`), and nothing wrote it since (the caller's contract of `merge`).
        let mapped = unsafe { remap::map_file(host, pages.len(), fd, remap::slot_offset(slot)) };
        let Err(err) = mapped else {
            for booked in &pages {
                self.mapped(vm, booked);
            }
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
            let Err(err) = (unsafe { remap::map_file(page_host, 1, fd, remap::slot_offset(page_slot)) })
            else {
                self.mapped(vm, &booked);
                continue;
            };
            log::error!(
                "dedup {}: mmap of store slot {page_slot} at {page_host:#x} failed: {err}",
                self.name
            );
            failed += 1;
            self.unbook(vm, &booked, page_slot);
            candidates[booked.record].state = State::Done(MergeStatus::NoRoom);
        }
        if failed > 0 {
            self.reconcile_vmas_with(Some(vm));
        }
    }

    /// A booked page maps its slot now: the slot it was a copy of (it merged again) loses its
    /// reference; an image page it mapped is no longer one, and the image's page cache page
    /// goes back to the system if no process maps it any more.
    fn mapped(&mut self, vm: &mut VmState, booked: &Booked) {
        if let Some(old) = booked.replaces {
            self.counters.cow_breaks += 1;
            self.backend.release(vm.holder, &[old]);
        }
        if let Some((image, page)) = booked.image {
            vm.image_pages.remove(&booked.gpa);
            self.counters.image_merged += 1;
            self.images.give_back(image, page);
            vm.blocks_given_back.insert((image, folio_block(page)));
        }
    }

    /// Takes back the booking of a page whose mapping failed: it keeps what it mapped before.
    fn unbook(&mut self, vm: &mut VmState, booked: &Booked, slot: Slot) {
        if let Some(rv) = vm.vmas.get_mut(booked.at.region) {
            let before = rv.vmas();
            rv.unbook_failed(booked.at.page, booked.booking);
            self.vmas = self.vmas + rv.vmas() - before;
        }
        vm.merged.remove(booked.gpa);
        // A page it replaces is booked again by `merge_part`, which sees the status.
        self.backend.release(vm.holder, &[slot]);
    }
}

impl Candidate {
    fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// The slot it holds a reference on, if any.
    fn found(&self) -> Option<Slot> {
        match self.state {
            State::Found(slot) => Some(slot),
            _ => None,
        }
    }
}
