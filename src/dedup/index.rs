//! The index: which store slot holds the page with a given BLAKE3 hash, and, per VM, which
//! guest pages map which slot.

use std::collections::{BTreeMap, HashMap};

use super::words::{PageHash, Slot};

/// Hash → slot, and its inverse for the live slots.
#[derive(Default)]
pub(crate) struct Index {
    by_hash: HashMap<PageHash, Slot>,
    by_slot: HashMap<Slot, PageHash>,
}

impl Index {
    /// The slot holding the page with this hash.
    pub(crate) fn lookup(&self, hash: &PageHash) -> Option<Slot> {
        self.by_hash.get(hash).copied()
    }

    /// The hash a live slot is indexed under.
    pub(crate) fn hash_of(&self, slot: Slot) -> Option<&PageHash> {
        self.by_slot.get(&slot)
    }

    /// Records that `slot` now holds the page hashing to `hash`.
    pub(crate) fn insert(&mut self, hash: PageHash, slot: Slot) {
        self.by_hash.insert(hash, slot);
        self.by_slot.insert(slot, hash);
    }

    /// Forgets a slot that is being freed.
    pub(crate) fn remove_slot(&mut self, slot: Slot) {
        if let Some(hash) = self.by_slot.remove(&slot) {
            self.by_hash.remove(&hash);
        }
    }

    /// Number of indexed slots.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }
}

/// One VM's merged guest pages: gpa → the slot it maps, each holding one slot reference.
#[derive(Default)]
pub(crate) struct MergedPages {
    by_gpa: BTreeMap<u64, Slot>,
}

impl MergedPages {
    /// The slot a merged gpa maps.
    pub(crate) fn get(&self, gpa: u64) -> Option<Slot> {
        self.by_gpa.get(&gpa).copied()
    }

    /// Records a merge; returns the slot the gpa mapped before, whose reference the caller
    /// must drop.
    pub(crate) fn insert(&mut self, gpa: u64, slot: Slot) -> Option<Slot> {
        self.by_gpa.insert(gpa, slot)
    }

    /// Forgets a gpa (its reference is the caller's to drop).
    pub(crate) fn remove(&mut self, gpa: u64) -> Option<Slot> {
        self.by_gpa.remove(&gpa)
    }

    /// Number of merged pages.
    pub(crate) fn len(&self) -> usize {
        self.by_gpa.len()
    }

    /// Every (gpa, slot), in gpa order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, Slot)> + '_ {
        self.by_gpa.iter().map(|(g, s)| (*g, *s))
    }

    /// Takes every entry out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, Slot)> {
        std::mem::take(&mut self.by_gpa).into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_forgets_freed_slots_both_ways() {
        let mut index = Index::default();
        index.insert([1; 32], 7);
        assert_eq!(index.lookup(&[1; 32]), Some(7));
        assert_eq!(index.hash_of(7), Some(&[1; 32]));
        index.remove_slot(7);
        assert_eq!(index.lookup(&[1; 32]), None);
        assert_eq!(index.len(), 0);
    }
}
