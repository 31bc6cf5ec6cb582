//! VMA accounting for guest RAM: a count that never falls below the kernel's.
//!
//! Guest RAM starts as one anonymous VMA per region. Mapping a store page over a guest page
//! (`mmap(MAP_PRIVATE | MAP_FIXED)` of the memfd) splits it. A region costs one VMA plus one per
//! *boundary* between two neighbouring pages that sit in different VMAs. Between pages whose
//! mappings could share a VMA (anonymous next to anonymous; store slot `s` next to `s + 1`),
//! there is a boundary only if the kernel declined to join them, and it declines when the
//! joined VMA would need two different `anon_vma`s: two store VMAs that both took
//! copy-on-write faults separately cannot become one. So the count assumes, conservatively:
//! - a new mapping joins its left neighbour when the file offsets continue (the kernel always
//!   can: the new mapping has no `anon_vma` yet);
//! - it joins its right neighbour too only when it does not join the left one (joining both
//!   needs the two neighbours' `anon_vma`s to agree, which nothing here can know).
//!
//! The count is kept per region as the layout's boundaries plus those the kernel may have kept
//! ("sticky"), and is reconciled with `/proc/self/maps` from time to time ([`maps_overlapping`]):
//! a count that is high only stops merging early, one that is low lets a guest drive the
//! process past `vm.max_map_count` (after which its own allocations and threads fail).
//!
//! A mapping outlives copy-on-write (the written page becomes anonymous *inside* the file VMA),
//! so this map tracks what is mapped, not which references are live. Regions are counted
//! separately: when two regions touch in host memory the kernel may join across them, so the
//! count errs high there too.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

/// What a store page mapping is keyed by: the store's generation (a new broker is a new
/// store) in the high 32 bits and the slot in the low: keys continue each other only within
/// one store.
pub(crate) type MapKey = u64;

/// A run of consecutive guest pages mapping consecutive store slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    pages: usize,
    slot: MapKey,
}

/// What one guest page is mapped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageMap {
    /// The region's own anonymous memory.
    Anon,
    /// A store slot, privately.
    Store(MapKey),
}

/// Whether the layout lets two neighbouring pages share a VMA.
fn joinable(left: PageMap, right: PageMap) -> bool {
    match (left, right) {
        (PageMap::Anon, PageMap::Anon) => true,
        (PageMap::Store(a), PageMap::Store(b)) => a.checked_add(1) == Some(b),
        _ => false,
    }
}

/// What one page mapped before it was booked, and how the count changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Booking {
    /// What the page mapped before.
    pub(crate) before: PageMap,
    /// The change of the VMA count.
    pub(crate) delta: isize,
}

/// The merged runs of one RAM region, ordered by page index, and its VMA count.
#[derive(Debug)]
pub(crate) struct RegionVmas {
    pages: usize,
    /// First page index → run; runs never overlap.
    runs: BTreeMap<usize, Run>,
    /// VMAs by the conservative count (never below the kernel's, see the module doc).
    count: usize,
}

impl RegionVmas {
    /// A region of `pages` anonymous pages: one VMA.
    pub(crate) fn new(pages: usize) -> RegionVmas {
        RegionVmas { pages, runs: BTreeMap::new(), count: 1 }
    }

    /// VMAs the region costs now, by the conservative count.
    pub(crate) fn vmas(&self) -> usize {
        self.count
    }

    /// Number of merged runs (store-mapped stretches).
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }

    fn run_at(&self, page: usize) -> Option<(usize, Run)> {
        let (&start, &run) = self.runs.range(..=page).next_back()?;
        (page < start + run.pages).then_some((start, run))
    }

    fn map_of(&self, page: usize) -> PageMap {
        match self.run_at(page) {
            Some((start, run)) => PageMap::Store(run.slot + (page - start) as MapKey),
            None => PageMap::Anon,
        }
    }

    /// Whether some page of `first..first + pages` maps a file (a store slot or an image page),
    /// copied on write or not.
    pub(crate) fn maps_files_in(&self, first: usize, pages: usize) -> bool {
        self.run_at(first).is_some() || self.runs.range(first..first.saturating_add(pages)).next().is_some()
    }

    /// The store slot mapped at `page`, if any.
    pub(crate) fn slot_at(&self, page: usize) -> Option<MapKey> {
        match self.map_of(page) {
            PageMap::Store(s) => Some(s),
            PageMap::Anon => None,
        }
    }

    fn neighbours(&self, page: usize) -> (Option<PageMap>, Option<PageMap>) {
        let left = page.checked_sub(1).map(|p| self.map_of(p));
        let right = (page + 1 < self.pages).then(|| self.map_of(page + 1));
        (left, right)
    }

    /// How the count would change if `page` mapped `slot` now.
    pub(crate) fn delta(&self, page: usize, slot: MapKey) -> isize {
        let (left, right) = self.neighbours(page);
        let old = self.map_of(page);
        let new = PageMap::Store(slot);
        // Boundaries the layout has around the page now: the kernel has them too.
        let before = left.is_some_and(|l| !joinable(l, old)) as isize
            + right.is_some_and(|r| !joinable(old, r)) as isize;
        let join_left = left.is_some_and(|l| joinable(l, new));
        // Joining both sides needs both neighbours' anon_vmas to agree: assume they do not.
        let join_right = right.is_some_and(|r| joinable(new, r)) && !join_left;
        let after = (left.is_some() && !join_left) as isize + (right.is_some() && !join_right) as isize;
        after - before
    }

    /// Records that `page` now maps `slot`; returns what takes it back ([`RegionVmas::unbook_failed`]).
    pub(crate) fn map(&mut self, page: usize, slot: MapKey) -> Booking {
        debug_assert!(page < self.pages);
        let booking = Booking { before: self.map_of(page), delta: self.delta(page, slot) };
        self.set_layout(page, PageMap::Store(slot));
        self.count = self.count.saturating_add_signed(booking.delta);
        booking
    }

    /// Takes back a [`RegionVmas::map`] of `page` whose mmap failed: the kernel kept the old
    /// mapping there. Pages booked after it assumed it mapped, so the count cannot simply be
    /// rolled back; the page can add at most its two edges to what was counted, so the count
    /// grows by two until [`RegionVmas::reconcile`] sets it right.
    pub(crate) fn unbook_failed(&mut self, page: usize, booking: Booking) {
        self.set_layout(page, booking.before);
        self.count = self.count.saturating_add(2);
    }

    /// The stretches of pages whose mapping's key satisfies `wanted`, as (first page, pages).
    pub(crate) fn pages_where(&self, wanted: impl Fn(MapKey) -> bool) -> Vec<(usize, usize)> {
        let mut found: Vec<(usize, usize)> = Vec::new();
        for (&start, run) in &self.runs {
            for k in 0..run.pages {
                if !wanted(run.slot + k as MapKey) {
                    continue;
                }
                match found.last_mut() {
                    Some((first, pages)) if *first + *pages == start + k => *pages += 1,
                    _ => found.push((start + k, 1)),
                }
            }
        }
        found
    }

    /// Records that `pages` pages from `first` are the region's own anonymous memory again, in
    /// a mapping of their own that may join its neighbours or not: the count grows by two (the
    /// mapping's edges; the boundaries inside it are gone) until [`RegionVmas::reconcile`].
    pub(crate) fn unmap_run(&mut self, first: usize, pages: usize) {
        for page in first..(first + pages).min(self.pages) {
            self.set_layout(page, PageMap::Anon);
        }
        self.count = self.count.saturating_add(2);
    }

    /// Sets the count to what the kernel reports (`/proc/self/maps`).
    pub(crate) fn reconcile(&mut self, measured: usize) {
        self.count = measured.max(1);
    }

    /// Puts `map` at `page` in the run map, joining runs that continue each other.
    fn set_layout(&mut self, page: usize, map: PageMap) {
        // Cut the page out of the run that holds it.
        if let Some((start, run)) = self.run_at(page) {
            self.runs.remove(&start);
            if page > start {
                self.runs.insert(start, Run { pages: page - start, slot: run.slot });
            }
            let end = start + run.pages;
            if page + 1 < end {
                let offset = (page + 1 - start) as MapKey;
                self.runs.insert(page + 1, Run { pages: end - page - 1, slot: run.slot + offset });
            }
        }
        let PageMap::Store(slot) = map else { return };
        // Insert it, joined with a left run that ends just before it with slot - 1 and a right
        // run that starts just after it with slot + 1.
        let mut start = page;
        let mut run = Run { pages: 1, slot };
        if let Some((ls, lr)) = page.checked_sub(1).and_then(|p| self.run_at(p)) {
            if lr.slot.checked_add(lr.pages as MapKey) == Some(slot) {
                self.runs.remove(&ls);
                start = ls;
                run = Run { pages: lr.pages + 1, slot: lr.slot };
            }
        }
        if let Some(&rr) = self.runs.get(&(page + 1)) {
            if slot.checked_add(1) == Some(rr.slot) {
                self.runs.remove(&(page + 1));
                run.pages += rr.pages;
            }
        }
        self.runs.insert(start, run);
    }

    /// VMAs the layout alone implies (every joinable pair joined): the count's lower bound.
    #[cfg(test)]
    pub(crate) fn layout_vmas(&self) -> usize {
        1 + (1..self.pages).filter(|&p| !joinable(self.map_of(p - 1), self.map_of(p))).count()
    }
}

/// Counts, for each `[start, start + len)`, the lines of `/proc/self/maps` (VMAs) that overlap
/// it; also returns the process's total.
pub(crate) fn maps_overlapping(ranges: &[(usize, usize)]) -> io::Result<(Vec<usize>, usize)> {
    let file = std::fs::File::open("/proc/self/maps")?;
    let mut counts = vec![0; ranges.len()];
    let mut total = 0;
    for line in io::BufReader::new(file).lines() {
        let line = line?;
        total += 1;
        let range = line.split_whitespace().next().unwrap_or("");
        let Some((lo, hi)) = range.split_once('-') else { continue };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else {
            continue;
        };
        for (n, &(start, len)) in counts.iter_mut().zip(ranges) {
            if lo < start + len && hi > start {
                *n += 1;
            }
        }
    }
    Ok((counts, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_runs_cost_one_vma_scattered_pages_two_each() {
        let mut r = RegionVmas::new(16);
        assert_eq!(r.vmas(), 1);
        // Contiguous slots in the middle: anon | run | anon.
        for p in 4..8 {
            r.map(p, 100 + p as MapKey);
        }
        assert_eq!((r.vmas(), r.runs()), (3, 1));
        // Scattered: each lone page adds a VMA and splits an anonymous one.
        r.map(10, 7);
        r.map(12, 3);
        assert_eq!(r.vmas(), 7);
        // Filling the gap 11 with a slot that continues neither side: 10|11|12 all distinct.
        assert_eq!(r.delta(11, 50), 0);
        // Continuing the left one joins it.
        r.map(11, 8);
        assert_eq!(r.vmas(), 6);
        // Replacing a page inside a run with a foreign slot splits the run in three.
        r.map(5, 999);
        assert_eq!(r.vmas(), 8);
        // Mapping the old slot back joins the left piece; the right one may stay apart.
        r.map(5, 105);
        assert_eq!((r.vmas(), r.layout_vmas()), (7, 6));
        // The whole region one run from slot 0, mapped from the right: one VMA.
        let mut all = RegionVmas::new(8);
        for p in (0..8).rev() {
            all.map(p, p as MapKey);
        }
        assert_eq!((all.vmas(), all.runs(), all.layout_vmas()), (1, 1, 1));
    }

    #[test]
    fn filling_a_gap_between_two_runs_never_counts_a_three_way_join() {
        // L | gap | R with L = slot 10 and R = slot 12: slot 11 in the gap continues both.
        let mut r = RegionVmas::new(5);
        r.map(1, 10);
        r.map(3, 12);
        assert_eq!(r.vmas(), 5);
        let booking = r.map(2, 11);
        // The layout says one store VMA (3 in all); the kernel keeps two if L and R were
        // written separately, so the count says 4.
        assert_eq!((r.layout_vmas(), r.vmas()), (3, 4));
        // An mmap that failed leaves the old mapping; the count errs high until reconciled.
        r.unbook_failed(2, booking);
        assert_eq!((r.vmas(), r.slot_at(2), r.layout_vmas()), (6, None, 5));
        r.reconcile(5);
        assert_eq!(r.vmas(), 5);
    }

    #[test]
    fn runs_given_back_to_anonymous_memory_leave_the_count_above_the_layout() {
        let mut r = RegionVmas::new(16);
        // Keys 100.. in pages 2..6, key 7 in page 8, keys 104.. again in pages 10..12.
        for p in 2..6 {
            r.map(p, 98 + p as MapKey);
        }
        r.map(8, 7);
        for p in 10..12 {
            r.map(p, 94 + p as MapKey);
        }
        let wanted = |key: MapKey| key >= 100;
        assert_eq!(r.pages_where(wanted), [(2, 4), (10, 2)]);
        assert_eq!(r.pages_where(|key| key == 103 || key == 104), [(5, 1), (10, 1)]);
        for (first, pages) in r.pages_where(wanted) {
            r.unmap_run(first, pages);
            assert!(r.vmas() >= r.layout_vmas(), "count {} below layout {}", r.vmas(), r.layout_vmas());
        }
        assert_eq!((r.pages_where(wanted), r.slot_at(8), r.layout_vmas()), (vec![], Some(7), 3));
    }

    #[test]
    fn the_count_never_falls_below_the_layout() {
        let mut r = RegionVmas::new(64);
        let mut x = 7u64;
        for _ in 0..5000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let page = (x >> 33) as usize % 64;
            let slot = (x >> 20) % 80;
            r.map(page, slot);
            assert!(r.vmas() >= r.layout_vmas(), "count {} below layout {}", r.vmas(), r.layout_vmas());
        }
    }
}
