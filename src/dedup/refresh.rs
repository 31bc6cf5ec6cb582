//! Finding merged pages that were copied on write, and freeing store slots nobody maps.
//!
//! A reference drops only on two looks at the page table ([`super::pagemap`]), at least
//! [`SECOND_LOOK_AFTER`] apart, that both show a private anonymous page: a page the kernel is
//! moving (compaction, NUMA balancing) is not a copy, and a slot punched while a guest page
//! still maps it would read zeros (or, once reused, another page's bytes).

use std::time::{Duration, Instant};

use super::domain::{Domain, VmState};
use super::error::DedupError;
use super::pagemap::PageState;
use super::stats::RefreshReport;
use super::words::{Slot, VmId, PAGE_SIZE};
use crate::broker_wire::proto::ClientStats;

/// Least time between the first and the confirming look at a page that looks copied.
pub const SECOND_LOOK_AFTER: Duration = Duration::from_millis(100);

/// How full the VMA budget must be before a refresh also reconciles the count with the
/// kernel's (it reads `/proc/self/maps`), and how often it then may.
const RECONCILE_ABOVE_FRACTION: usize = 2;
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// Watched pages this close in host memory (in pages) are read with one `pread` of the page
/// table, the pages between them included: a call costs about as much as 64 entries
/// (`docs/fphash.md`, "What the refresh costs").
const READ_ACROSS: usize = 64;

/// A stretch of a VM's RAM whose page table entries one read brings: its watched pages.
struct Span {
    host: usize,
    pages: usize,
    /// (gpa, index of its page in the span).
    watched: Vec<(u64, usize)>,
}

/// Periodic refreshes come this many to one look at every merged page: the look reads the
/// page table of all of them (`docs/fphash.md`, "What the refresh costs"); the refreshes
/// between look at the pages that looked copied, for the second look that confirms them.
pub const LOOK_AT_ALL_EVERY: u64 = 4;

/// The VM's pages `gpas` (ascending), in spans of host memory with gaps of less than
/// [`READ_ACROSS`] pages.
fn spans_of(vm: &VmState, gpas: impl Iterator<Item = u64>) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut last_region = usize::MAX;
    for gpa in gpas {
        let Some(place) = vm.locate(gpa) else { continue };
        match spans.last_mut() {
            Some(span)
                if place.region == last_region
                    && place.host < span.host + (span.pages + READ_ACROSS) * PAGE_SIZE =>
            {
                let index = (place.host - span.host) / PAGE_SIZE;
                span.pages = index + 1;
                span.watched.push((gpa, index));
            }
            _ => spans.push(Span { host: place.host, pages: 1, watched: vec![(gpa, 0)] }),
        }
        last_region = place.region;
    }
    spans
}

/// Two ascending sequences as one, each value once.
fn merge_sorted(a: impl Iterator<Item = u64>, b: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek().copied(), b.peek().copied()) {
        (Some(x), Some(y)) if x < y => a.next(),
        (Some(x), Some(y)) if y < x => b.next(),
        (Some(_), Some(_)) => {
            b.next();
            a.next()
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

impl Domain {
    /// Refreshes every VM of the domain ([`Domain::refresh_vm`]).
    pub fn refresh(&mut self) -> Result<RefreshReport, DedupError> {
        let ids: Vec<VmId> = self.vms.keys().copied().collect();
        let mut total = RefreshReport::default();
        for id in ids {
            let r = self.refresh_vm(id)?;
            total.cow_breaks += r.cow_breaks;
            total.slots_freed += r.slots_freed;
            total.suspects += r.suspects;
            total.kept += r.kept;
            total.moving += r.moving;
        }
        Ok(total)
    }

    /// Looks at the page table of every merged page of `vm`: a page that looks copied on
    /// write becomes a suspect; a suspect that still does on a later look loses its reference,
    /// and its store slot is freed (punched) when nobody else holds one.
    pub fn refresh_vm(&mut self, id: VmId) -> Result<RefreshReport, DedupError> {
        self.refresh_vm_looking_at(id, true)
    }

    /// The periodic refresh of `vm` (its VMM's `--dedup-scan-every`): as
    /// [`Domain::refresh_vm`], but the look at every merged page comes only every
    /// [`LOOK_AT_ALL_EVERY`] calls; the others look at the suspects alone.
    pub fn refresh_vm_periodically(&mut self, id: VmId) -> Result<RefreshReport, DedupError> {
        let Some(vm) = self.vms.get_mut(&id) else { return Ok(RefreshReport::default()) };
        vm.refreshes = vm.refreshes.wrapping_add(1);
        let all = vm.refreshes % LOOK_AT_ALL_EVERY == 1;
        self.refresh_vm_looking_at(id, all)
    }

    fn refresh_vm_looking_at(&mut self, id: VmId, all: bool) -> Result<RefreshReport, DedupError> {
        self.sync_generation();
        self.images.drop_given_back();
        let Some(mut vm) = self.take_vm(id) else { return Ok(RefreshReport::default()) };
        let report = self.refresh_held(&mut vm, all);
        self.find_image_stragglers(&mut vm);
        if report.is_ok()
            && self.vmas > self.vma_allowance() / RECONCILE_ABOVE_FRACTION
            && self.last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_EVERY)
        {
            self.reconcile_vmas_with(Some(&mut vm));
        }
        self.put_vm(id, vm);
        self.push_stats();
        report
    }

    /// Looks at every merged and image page of `vm` (`all`), or at its suspects alone.
    fn refresh_held(&mut self, vm: &mut VmState, all: bool) -> Result<RefreshReport, DedupError> {
        let mut report = RefreshReport::default();
        let now = Instant::now();
        let mut confirmed = Vec::new();
        let spans = if all {
            spans_of(vm, merge_sorted(vm.merged.iter().map(|(g, _)| g), vm.image_pages.keys().copied()))
        } else {
            spans_of(vm, vm.suspects.keys().copied())
        };
        for span in spans {
            let states = self.pagemap.states(span.host, span.pages)?;
            for (gpa, index) in span.watched {
                let state = states.get(index).copied().unwrap_or(PageState::Unfaulted);
                if state == PageState::Elsewhere {
                    report.moving += 1;
                }
                if !state.is_copied() {
                    if vm.suspects.remove(&gpa).is_some() {
                        report.kept += 1;
                    }
                    continue;
                }
                match vm.suspects.get(&gpa) {
                    Some(first) if now.duration_since(*first) >= SECOND_LOOK_AFTER => confirmed.push(gpa),
                    Some(_) => {}
                    None => {
                        vm.suspects.insert(gpa, now);
                        report.suspects += 1;
                    }
                }
            }
        }
        vm.suspects.retain(|gpa, _| vm.merged.get(*gpa).is_some() || vm.image_pages.contains_key(gpa));
        let mut slots: Vec<Slot> = Vec::with_capacity(confirmed.len());
        for gpa in confirmed {
            vm.suspects.remove(&gpa);
            if let Some(slot) = vm.merged.remove(gpa) {
                slots.push(slot);
            } else if let Some(key) = vm.image_pages.remove(&gpa) {
                // An image page the guest wrote: its own copy now; nothing to free. A kernel
                // page is written alike in every VM booting the kernel: merged later.
                if self.images.is_kernel_key(key) {
                    vm.kernel_written.push(gpa);
                }
                self.count_image_cow_break(key);
            }
        }
        report.cow_breaks = slots.len();
        report.slots_freed = self.backend.release(vm.holder, &slots);
        self.counters.cow_breaks += report.cow_breaks as u64;
        self.counters.second_look_kept += report.kept as u64;
        self.counters.seen_moving += report.moving as u64;
        Ok(report)
    }

    /// Tells the broker this process's figures (for `samepage dedupd status`).
    fn push_stats(&mut self) {
        let s = self.stats();
        self.backend.push_stats(ClientStats {
            reported: s.reported,
            merged: s.merged,
            already: s.already,
            mismatch: s.rejected_mismatch,
            no_room: s.rejected_no_room,
            cow_breaks: s.cow_breaks,
            mapped_pages: s.mapped_pages,
            vmas: s.vmas,
        });
    }

    /// Refreshes every VM twice, [`SECOND_LOOK_AFTER`] apart, so that every page copied by now
    /// is found (for figures at the end of a run).
    pub fn settle(&mut self) -> Result<RefreshReport, DedupError> {
        let first = self.refresh()?;
        std::thread::sleep(SECOND_LOOK_AFTER);
        let second = self.refresh()?;
        Ok(RefreshReport {
            cow_breaks: first.cow_breaks + second.cow_breaks,
            slots_freed: first.slots_freed + second.slots_freed,
            suspects: second.suspects,
            kept: first.kept + second.kept,
            moving: first.moving + second.moving,
        })
    }

    /// Notes that the guest says the page at `gpa` left its page cache. The page stays mapped
    /// copy-on-write: while it still reads the store its reference is kept (freeing the slot
    /// would change what the guest reads); if it looks copied already, it becomes a suspect
    /// that the next refresh confirms or clears.
    pub fn page_removed(&mut self, id: VmId, gpa: u64) {
        self.counters.removed_hints += 1;
        let Some(vm) = self.vms.get_mut(&id) else { return };
        let watched = vm.merged.get(gpa).is_some() || vm.image_pages.contains_key(&gpa);
        let (true, Some(place)) = (watched, vm.locate(gpa)) else { return };
        match self.pagemap.state(place.host) {
            Ok(s) if s.is_copied() => {
                vm.suspects.entry(gpa).or_insert_with(Instant::now);
            }
            Ok(_) => {}
            Err(e) => log::warn!("dedup {}: {e}", self.name),
        }
    }
}
