//! VMA accounting for guest RAM.
//!
//! Guest RAM starts as one anonymous VMA per region. Mapping a store page over a guest page
//! (`mmap(MAP_PRIVATE | MAP_FIXED)` of the memfd) splits it; the kernel merges neighbouring
//! mappings of the same file whose offsets are consecutive, and neighbouring anonymous pieces
//! are one VMA already. So, page by page, the region costs one VMA plus one per *boundary*
//! between two neighbouring pages that cannot share a VMA:
//! - anonymous next to anonymous: same VMA;
//! - store slot `s` next to store slot `s + 1` (in address order): same VMA;
//! - anything else: a boundary.
//!
//! A mapping outlives copy-on-write (the written page becomes anonymous *inside* the file
//! VMA), so this map tracks what is mapped, not which references are live. The model counts
//! regions separately: when two regions happen to touch in host memory the kernel may merge
//! across them, so the count errs high, never low. It also ignores the kernel's refusal to
//! merge a new mapping between two VMAs that both went through copy-on-write with different
//! `anon_vma`s (rare; the budget margin covers it).

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use super::store::Slot;

/// A run of consecutive guest pages mapping consecutive store slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    pages: usize,
    slot: Slot,
}

/// What one guest page is mapped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageMap {
    Anon,
    Store(Slot),
}

fn same_vma(left: PageMap, right: PageMap) -> bool {
    match (left, right) {
        (PageMap::Anon, PageMap::Anon) => true,
        (PageMap::Store(a), PageMap::Store(b)) => a.checked_add(1) == Some(b),
        _ => false,
    }
}

/// The merged runs of one RAM region, ordered by page index, and its VMA count.
#[derive(Debug)]
pub(crate) struct RegionVmas {
    pages: usize,
    /// First page index → run; runs never overlap.
    runs: BTreeMap<usize, Run>,
    boundaries: usize,
}

impl RegionVmas {
    /// A region of `pages` anonymous pages: one VMA.
    pub(crate) fn new(pages: usize) -> RegionVmas {
        RegionVmas { pages, runs: BTreeMap::new(), boundaries: 0 }
    }

    /// VMAs the region costs now.
    pub(crate) fn vmas(&self) -> usize {
        1 + self.boundaries
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
            Some((start, run)) => PageMap::Store(run.slot + (page - start) as Slot),
            None => PageMap::Anon,
        }
    }

    /// The store slot mapped at `page`, if any.
    pub(crate) fn slot_at(&self, page: usize) -> Option<Slot> {
        match self.map_of(page) {
            PageMap::Store(s) => Some(s),
            PageMap::Anon => None,
        }
    }

    fn local_boundaries(&self, page: usize, at_page: PageMap) -> usize {
        let mut n = 0;
        if page > 0 && !same_vma(self.map_of(page - 1), at_page) {
            n += 1;
        }
        if page + 1 < self.pages && !same_vma(at_page, self.map_of(page + 1)) {
            n += 1;
        }
        n
    }

    /// How the VMA count would change if `page` mapped `slot`.
    pub(crate) fn delta(&self, page: usize, slot: Slot) -> isize {
        let before = self.local_boundaries(page, self.map_of(page));
        let after = self.local_boundaries(page, PageMap::Store(slot));
        after as isize - before as isize
    }

    /// Records that `page` now maps `slot`.
    pub(crate) fn set(&mut self, page: usize, slot: Slot) {
        debug_assert!(page < self.pages);
        let delta = self.delta(page, slot);
        // Cut the page out of the run that holds it.
        if let Some((start, run)) = self.run_at(page) {
            self.runs.remove(&start);
            if page > start {
                self.runs.insert(start, Run { pages: page - start, slot: run.slot });
            }
            let end = start + run.pages;
            if page + 1 < end {
                let offset = (page + 1 - start) as Slot;
                self.runs.insert(page + 1, Run { pages: end - page - 1, slot: run.slot + offset });
            }
        }
        // Insert it, joined with a left run that ends just before it with slot - 1 and a right
        // run that starts just after it with slot + 1.
        let mut start = page;
        let mut run = Run { pages: 1, slot };
        if let Some((ls, lr)) = page.checked_sub(1).and_then(|p| self.run_at(p)) {
            if lr.slot.checked_add(lr.pages as Slot) == Some(slot) {
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
        self.boundaries = (self.boundaries as isize + delta) as usize;
    }

    /// Counts the VMAs from scratch, page by page (to check the incremental count).
    #[cfg(test)]
    pub(crate) fn recount(&self) -> usize {
        1 + (1..self.pages).filter(|&p| !same_vma(self.map_of(p - 1), self.map_of(p))).count()
    }
}

/// Counts the lines of `/proc/self/maps` (VMAs) that overlap `[start, start + len)`.
pub(crate) fn maps_overlapping(start: usize, len: usize) -> io::Result<usize> {
    let file = std::fs::File::open("/proc/self/maps")?;
    let end = start + len;
    let mut n = 0;
    for line in io::BufReader::new(file).lines() {
        let line = line?;
        let range = line.split_whitespace().next().unwrap_or("");
        let Some((lo, hi)) = range.split_once('-') else { continue };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else {
            continue;
        };
        if lo < end && hi > start {
            n += 1;
        }
    }
    Ok(n)
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
            r.set(p, 100 + p as Slot);
        }
        assert_eq!((r.vmas(), r.runs()), (3, 1));
        // Scattered: each lone page adds a VMA and splits an anonymous one.
        r.set(10, 7);
        r.set(12, 3);
        assert_eq!(r.vmas(), 7);
        // Filling the gap 11 with a slot that continues neither side: 10|11|12 all distinct.
        assert_eq!(r.delta(11, 50), 0);
        // Continuing both sides is impossible here (7+1 != 3-1); continuing the left one joins.
        r.set(11, 8);
        assert_eq!(r.vmas(), 6);
        // Replacing a page inside a run with a foreign slot splits the run in three.
        r.set(5, 999);
        assert_eq!(r.vmas(), 8);
        r.set(5, 105);
        assert_eq!(r.vmas(), 6);
        // The whole region one run from slot 0: one VMA.
        let mut all = RegionVmas::new(8);
        for p in (0..8).rev() {
            all.set(p, p as Slot);
        }
        assert_eq!((all.vmas(), all.runs()), (1, 1));
        assert_eq!(all.recount(), 1);
        assert_eq!(r.recount(), r.vmas());
    }
}
