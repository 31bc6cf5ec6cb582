//! A dedup domain's shared pages: the store (one memfd), the index (hash → slot) and who holds
//! references to which slot. The same code serves VMs merging within one process and the
//! broker (`samepage dedupd`) serving VMM processes; a *holder* is a VM of this process or a
//! client connection.
//!
//! Rules (`docs/dedupd.md`, "Store pages"):
//! - a page enters the store only from bytes given here, hashed here (BLAKE3); the caller's
//!   hash is a lookup key;
//! - a page whose hash is already indexed is proven equal by a byte compare with the stored
//!   page, which costs no hash;
//! - a holder's claims change only its own references; a slot is punched when no holder has
//!   a reference, and a punched slot is used again only when no *pinning* holder released it
//!   recently (a punched-then-refilled offset shows its new bytes in every private mapping
//!   that had not copied it). A pinning holder pins at most as many released slots as its
//!   pin limit (its declared guest pages): its oldest pins lapse first, so what a holder makes
//!   the store keep is bounded by what it declared, however it churns;
//! - a holder that leaves drops its references in steps ([`SharedPages::step_leaving`]), so
//!   that a holder of millions of references stalls nobody.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::RawFd;

use super::error::DedupError;
use super::index::Index;
use super::store::Store;
use super::words::{HolderId, Offered, PageCounters, PageHash, PageOffer, Slot, PAGE_SIZE};

struct Holder {
    /// References per slot, ordered by slot (so that leaving and checking go in steps). A
    /// pinning holder keeps entries at 0 for the slots it released most recently.
    refs: BTreeMap<Slot, u32>,
    /// Most released slots it pins (0: it pins none).
    pin_limit: usize,
    /// Slots it released to 0, oldest first (a slot may appear more than once: only an entry
    /// still at 0 when it comes out of the queue is a pin to drop).
    released: VecDeque<Slot>,
    /// Sum of `refs`.
    total: u64,
    /// Entries of `refs` at 0: the slots it pins.
    pinned: usize,
    /// It left: its entries are being dropped, a step at a time.
    leaving: bool,
}

impl Holder {
    fn new(pin_limit: usize) -> Holder {
        Holder {
            refs: BTreeMap::new(),
            pin_limit,
            released: VecDeque::new(),
            total: 0,
            pinned: 0,
            leaving: false,
        }
    }
}

/// The store, index and references of one dedup domain.
pub struct SharedPages {
    name: String,
    store: Store,
    index: Index,
    holders: HashMap<HolderId, Holder>,
    next_holder: HolderId,
    /// Per slot: holders with an entry for it.
    pinned_by: Vec<u32>,
    counters: PageCounters,
    warned_full: bool,
}

impl SharedPages {
    /// An empty store of at most `max_pages` pages (memfd `samepage-store-<name>`).
    pub fn new(name: &str, max_pages: usize) -> Result<SharedPages, DedupError> {
        Ok(SharedPages {
            name: name.to_string(),
            store: Store::new(name, max_pages)?,
            index: Index::default(),
            holders: HashMap::new(),
            next_holder: 1,
            pinned_by: Vec::new(),
            counters: PageCounters::default(),
            warned_full: false,
        })
    }

    /// A new holder. A pinning holder (`pin_limit` > 0: a client whose mappings the store
    /// cannot see) keeps the last `pin_limit` slots it released from being used again while it
    /// is here; a VM of this process, whose references drop only on proof that its page was
    /// copied, need not pin (0).
    pub fn join(&mut self, pin_limit: usize) -> HolderId {
        let id = self.next_holder;
        self.next_holder += 1;
        self.holders.insert(id, Holder::new(pin_limit));
        id
    }

    /// A holder leaves (a VM stops, a client disconnects or dies): all its references drop,
    /// at once.
    pub fn leave(&mut self, holder: HolderId) {
        self.begin_leave(holder);
        while self.step_leaving(usize::MAX) > 0 {}
    }

    /// A holder leaves: from now on it takes no references, and [`SharedPages::step_leaving`]
    /// drops the ones it has, a step at a time. Its slots stay live (or pinned) until then.
    pub fn begin_leave(&mut self, holder: HolderId) {
        if let Some(h) = self.holders.get_mut(&holder) {
            h.leaving = true;
            h.released = VecDeque::new();
        }
    }

    /// Drops at most `budget` entries (slots) of leaving holders; returns how many it dropped.
    /// A leaving holder with no entry left is gone.
    pub fn step_leaving(&mut self, budget: usize) -> usize {
        let mut done = 0;
        let leaving: Vec<HolderId> =
            self.holders.iter().filter(|(_, h)| h.leaving).map(|(id, _)| *id).collect();
        for id in leaving {
            while done < budget {
                let Some(h) = self.holders.get_mut(&id) else { break };
                let Some((slot, count)) = h.refs.pop_first() else {
                    self.holders.remove(&id);
                    break;
                };
                h.total -= u64::from(count);
                if count == 0 {
                    h.pinned -= 1;
                } else {
                    self.drop_refs(slot, count);
                }
                self.unpin(slot);
                done += 1;
            }
            if done >= budget {
                break;
            }
        }
        done
    }

    /// Whether some holder is leaving (its entries are not all dropped yet).
    pub fn has_leaving(&self) -> bool {
        self.holders.values().any(|h| h.leaving)
    }

    /// Whether `holder` is here (and not leaving).
    pub fn has_holder(&self, holder: HolderId) -> bool {
        self.holders.get(&holder).is_some_and(|h| !h.leaving)
    }

    /// Holders now, leaving ones included (the store lives while there is one).
    pub fn holders(&self) -> usize {
        self.holders.len()
    }

    /// Holders that are leaving.
    pub fn leaving_holders(&self) -> usize {
        self.holders.values().filter(|h| h.leaving).count()
    }

    /// References `holder` has.
    pub fn holder_refs(&self, holder: HolderId) -> u64 {
        self.holders.get(&holder).map_or(0, |h| h.total)
    }

    /// The lowest slot `holder` holds a reference on (or pins).
    pub fn first_slot_of(&self, holder: HolderId) -> Option<Slot> {
        self.holders.get(&holder).and_then(|h| h.refs.keys().next().copied())
    }

    /// Released slots `holder` pins (entries at 0 references).
    pub fn holder_pins(&self, holder: HolderId) -> usize {
        self.holders.get(&holder).map_or(0, |h| h.pinned)
    }

    /// Entries (slots referenced or pinned) `holder` makes the store keep.
    pub fn holder_entries(&self, holder: HolderId) -> usize {
        self.holders.get(&holder).map_or(0, |h| h.refs.len())
    }

    /// The slot indexed under `hash`, with a new reference for `holder`; `None` if the hash
    /// is not indexed (or the holder is unknown).
    pub fn lookup(&mut self, holder: HolderId, hash: &PageHash) -> Option<Slot> {
        self.counters.lookups += 1;
        if !self.has_holder(holder) {
            return None;
        }
        let slot = self.index.lookup(hash)?;
        self.add_ref(holder, slot);
        self.counters.hits += 1;
        Some(slot)
    }

    /// Offers a page: a reference on the slot that holds it, proven by a byte compare (hash
    /// indexed) or by hashing it here (a new page, copied into a new slot). `previous` is the
    /// slot the previous request of the same call got, for [`PageOffer::follows_previous`].
    pub fn offer(&mut self, holder: HolderId, req: &PageOffer<'_>, previous: Option<Slot>) -> Offered {
        if !self.has_holder(holder) {
            return Offered::Mismatch;
        }
        if let Some(slot) = self.index.lookup(&req.hash) {
            self.counters.compares += 1;
            if self.store.page(slot) != req.page.as_slice() {
                self.counters.mismatches += 1;
                return Offered::Mismatch;
            }
            self.add_ref(holder, slot);
            return Offered::Slot { slot, fresh: false };
        }
        if !req.hashed_here {
            self.counters.hashes += 1;
            if blake3::hash(req.page).as_bytes() != &req.hash {
                self.counters.mismatches += 1;
                return Offered::Mismatch;
            }
        }
        let after = previous.filter(|_| req.follows_previous).and_then(|s| s.checked_add(1));
        let Some(slot) = self.store.pick(&[after, req.hints[0], req.hints[1]]) else {
            return self.full();
        };
        if let Err(e) = self.store.take(slot) {
            log::error!("dedup {}: {e}", self.name);
            return self.full();
        }
        self.store.write(slot, req.page);
        self.index.insert(req.hash, slot);
        if self.pinned_by.len() <= slot as usize {
            self.pinned_by.resize(slot as usize + 1, 0);
        }
        // `take` gave the slot its first reference: account it to the holder.
        self.note_ref(holder, slot);
        self.counters.stored += 1;
        Offered::Slot { slot, fresh: true }
    }

    fn full(&mut self) -> Offered {
        self.counters.full += 1;
        if !self.warned_full {
            self.warned_full = true;
            log::warn!(
                "dedup {}: the store is full ({} pages); new pages are no longer merged",
                self.name,
                self.store.max_pages()
            );
        }
        Offered::Full
    }

    /// Drops one of `holder`'s references on `slot`; false (and nothing changes) if it has
    /// none.
    pub fn release(&mut self, holder: HolderId, slot: Slot) -> bool {
        let Some(h) = self.holders.get_mut(&holder).filter(|h| !h.leaving) else {
            self.counters.bad_releases += 1;
            return false;
        };
        let Some(count) = h.refs.get_mut(&slot).filter(|c| **c > 0) else {
            self.counters.bad_releases += 1;
            return false;
        };
        *count -= 1;
        h.total -= 1;
        let mut unpin = Vec::new();
        if *count == 0 {
            if h.pin_limit == 0 {
                h.refs.remove(&slot);
                unpin.push(slot);
            } else {
                // Pinned now; the oldest pins beyond the limit lapse.
                h.pinned += 1;
                h.released.push_back(slot);
                while h.released.len() > h.pin_limit {
                    let Some(old) = h.released.pop_front() else { break };
                    if h.refs.get(&old) == Some(&0) {
                        h.refs.remove(&old);
                        h.pinned -= 1;
                        unpin.push(old);
                    }
                }
            }
        }
        self.counters.releases += 1;
        self.drop_ref(slot);
        for s in unpin {
            self.unpin(s);
        }
        true
    }

    fn add_ref(&mut self, holder: HolderId, slot: Slot) {
        self.store.add_ref(slot);
        self.note_ref(holder, slot);
    }

    /// Books a reference the store already counts to `holder` (a pin of `slot` it had becomes
    /// a reference again; its place in the queue of releases is left to lapse harmlessly).
    fn note_ref(&mut self, holder: HolderId, slot: Slot) {
        let Some(h) = self.holders.get_mut(&holder) else { return };
        h.total += 1;
        match h.refs.entry(slot) {
            Entry::Occupied(mut count) => {
                if *count.get() == 0 {
                    h.pinned -= 1;
                }
                *count.get_mut() += 1;
            }
            Entry::Vacant(entry) => {
                entry.insert(1);
                if let Some(p) = self.pinned_by.get_mut(slot as usize) {
                    *p += 1;
                }
            }
        }
    }

    fn drop_ref(&mut self, slot: Slot) {
        self.drop_refs(slot, 1);
    }

    /// Drops `count` references at once (a holder that leaves may hold many on one slot);
    /// frees the slot when none is left.
    fn drop_refs(&mut self, slot: Slot, count: u32) {
        if !self.store.drop_refs(slot, count) {
            return;
        }
        self.index.remove_slot(slot);
        self.counters.freed += 1;
        if let Err(e) = self.store.free(slot) {
            log::error!("dedup {}: {e}", self.name);
        }
        if self.pinned_by.get(slot as usize).copied().unwrap_or(0) == 0 {
            self.store.make_reusable(slot);
        }
    }

    /// One holder's entry for `slot` is gone.
    fn unpin(&mut self, slot: Slot) {
        let Some(p) = self.pinned_by.get_mut(slot as usize) else { return };
        *p = p.saturating_sub(1);
        if *p == 0 && self.store.refs(slot) == 0 {
            self.store.make_reusable(slot);
        }
    }

    /// The bytes of a live slot.
    pub fn page(&self, slot: Slot) -> Option<&[u8]> {
        (self.store.refs(slot) > 0).then(|| self.store.page(slot))
    }

    /// The hash a live slot is indexed under.
    pub fn hash_of(&self, slot: Slot) -> Option<&PageHash> {
        self.index.hash_of(slot)
    }

    /// The memfd (read-write), for mapping slots in this process.
    pub fn fd(&self) -> RawFd {
        self.store.fd()
    }

    /// A read-only descriptor of the memfd for a client (see `Store::client_fd`).
    pub fn client_fd(&self) -> Result<File, DedupError> {
        self.store.client_fd()
    }

    /// The most slots the store may hold.
    pub fn max_pages(&self) -> usize {
        self.store.max_pages()
    }

    /// Slots with at least one reference.
    pub fn live_pages(&self) -> usize {
        self.store.live_pages()
    }

    /// Memory the memfd really holds (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64, DedupError> {
        self.store.allocated_bytes()
    }

    /// Released slots pinned by all holders.
    pub fn total_pins(&self) -> usize {
        self.holders.keys().map(|h| self.holder_pins(*h)).sum()
    }

    /// References held in all.
    pub fn total_refs(&self) -> u64 {
        self.holders.values().map(|h| h.total).sum()
    }

    /// The counters.
    pub fn counters(&self) -> PageCounters {
        self.counters
    }

    /// Test hook: flips a byte of the stored page indexed under `hash`.
    #[cfg(test)]
    pub(crate) fn corrupt(&mut self, hash: &PageHash) -> bool {
        let Some(slot) = self.index.lookup(hash) else { return false };
        let mut page = [0u8; PAGE_SIZE];
        page.copy_from_slice(self.store.page(slot));
        page[100] ^= 0xff;
        self.store.write(slot, &page);
        true
    }

    /// Checks every live page against its hash and every slot's reference count against the
    /// holders' references; returns how many pages were checked.
    pub fn verify(&self) -> Result<usize, DedupError> {
        let (checked, _) = self.verify_pages(0, usize::MAX)?;
        let mut from = Some(0);
        while let Some(slot) = from {
            from = self.verify_refs(slot, usize::MAX)?;
        }
        Ok(checked)
    }

    /// Slots ever handed out (the store's high-water mark): every new slot goes through
    /// [`SharedPages::store`], which sizes `pinned_by` to cover it.
    pub fn slots_used(&self) -> usize {
        self.pinned_by.len()
    }

    /// Checks slots from `from` on, one at a time, so that a large store can be checked in
    /// steps between other work: a live slot must hold bytes that hash to its index key, a
    /// free one must be in no index. Stops after `max_hashed` live pages (or 64 times as many
    /// slots). Returns the live pages checked and the slot to go on from (`None`: done). Each
    /// slot's check holds whenever it runs, so steps may come between changes to the store.
    pub fn verify_pages(&self, from: Slot, max_hashed: usize) -> Result<(usize, Option<Slot>), DedupError> {
        let end = self.slots_used();
        let max_visited = max_hashed.saturating_mul(64);
        let (mut hashed, mut visited) = (0usize, 0usize);
        let mut slot = from as usize;
        while slot < end {
            if hashed >= max_hashed || visited >= max_visited {
                return Ok((hashed, Some(slot as Slot)));
            }
            let s = slot as Slot;
            match (self.store.refs(s) > 0, self.index.hash_of(s)) {
                (true, Some(hash)) => {
                    if blake3::hash(self.store.page(s)).as_bytes() != hash {
                        return Err(DedupError::Corrupt { slot: s });
                    }
                    hashed += 1;
                }
                (false, None) => {}
                _ => return Err(DedupError::Corrupt { slot: s }),
            }
            visited += 1;
            slot += 1;
        }
        Ok((hashed, None))
    }

    /// Checks the reference count of at most `max_slots` slots from `from` on against the sum
    /// of the holders' references (and, at the end, the index's size against the live slots
    /// and that no holder names a slot beyond the store's). Each step holds whenever it runs,
    /// so steps may come between changes to the store; returns the slot to go on from (`None`:
    /// done). A step costs a range lookup per holder and the entries in the range.
    pub fn verify_refs(&self, from: Slot, max_slots: usize) -> Result<Option<Slot>, DedupError> {
        let used = self.slots_used();
        let start = from as usize;
        let end = start.saturating_add(max_slots).min(used);
        if start < end {
            let mut sums = vec![0u64; end - start];
            for h in self.holders.values() {
                for (&slot, &count) in h.refs.range(start as Slot..=(end - 1) as Slot) {
                    sums[slot as usize - start] += u64::from(count);
                }
            }
            if let Some(k) = sums
                .iter()
                .enumerate()
                .position(|(k, sum)| *sum != u64::from(self.store.refs((start + k) as Slot)))
            {
                return Err(DedupError::Refs { slot: (start + k) as Slot });
            }
        }
        if end < used {
            return Ok(Some(end as Slot));
        }
        if self.index.len() != self.store.live_pages() {
            let slot = self.store.live_slots().find(|s| self.index.hash_of(*s).is_none()).unwrap_or(0);
            return Err(DedupError::Corrupt { slot });
        }
        if let Some(slot) = self
            .holders
            .values()
            .filter_map(|h| h.refs.last_key_value())
            .map(|(s, _)| *s)
            .find(|s| *s as usize >= used)
        {
            return Err(DedupError::Refs { slot });
        }
        Ok(None)
    }

    /// Punches every slot without references again, up to the file's size: a stale private
    /// mapping that faults a punched (or never used) page fills it with zeros, which take
    /// memory (`docs/dedupd.md`, "Store pages"). Returns the pages of the ranges punched.
    pub fn punch_free(&mut self) -> Result<u64, DedupError> {
        let size = self.store_file_pages()?;
        let mut punched = 0u64;
        let mut slot = 0usize;
        while slot < size {
            if self.store.refs(slot as Slot) > 0 {
                slot += 1;
                continue;
            }
            let start = slot;
            while slot < size && self.store.refs(slot as Slot) == 0 {
                slot += 1;
            }
            let pages = slot - start;
            // SAFETY: plain syscall on the store's memfd; the range lies inside the file and
            // holds no live slot.
            let rc = unsafe {
                libc::fallocate(
                    self.store.fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    Store::offset(start as Slot),
                    (pages * PAGE_SIZE) as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(DedupError::PunchHole {
                    slot: start as Slot,
                    source: std::io::Error::last_os_error(),
                });
            }
            punched += pages as u64;
        }
        Ok(punched)
    }

    /// The memfd's size in pages.
    fn store_file_pages(&self) -> Result<usize, DedupError> {
        // SAFETY: stat is plain data; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on the store's memfd into our buffer.
        if unsafe { libc::fstat(self.store.fd(), &mut st) } != 0 {
            return Err(DedupError::Stat(std::io::Error::last_os_error()));
        }
        Ok(st.st_size as usize / PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests;
