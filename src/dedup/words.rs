//! The merge engine's words, in one leaf that every part of it (and the broker) sits on: the
//! page size, store slots and page hashes, holders of references, a VM and its RAM, a page
//! report and what became of it, a page offered to the shared pages and its outcome, and the
//! shared pages' counters. `docs/glossary.md` defines each word.

/// Size of a guest page and a store slot (defined once, by the devices crate).
pub use samepage_virtio::PAGE_SIZE;

/// A store slot: the page at byte offset `slot * PAGE_SIZE` of a domain's store (memfd).
pub type Slot = u32;

/// A BLAKE3 hash of one page.
pub type PageHash = [u8; 32];

/// Who holds references on slots: a VM of this process, or a client of the broker.
pub type HolderId = u64;

/// A VM registered with a dedup domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub(crate) u32);

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm{}", self.0)
    }
}

/// One range of a VM's guest RAM and where it lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Host virtual start of the private anonymous mapping, page aligned.
    pub host_addr: usize,
    /// Length in bytes, a multiple of the page size.
    pub len: usize,
    /// The region maps a snapshot's memory file copy-on-write (a restored VM): the pages the
    /// VM has not written since are the file's page cache, which every clone of the snapshot
    /// shares.
    pub maps_snapshot: bool,
}

impl RamRegion {
    /// Whether `gpa` lies in the region.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len as u64
    }

    /// Whether the region is not empty and page aligned everywhere.
    pub fn is_valid(&self) -> bool {
        self.len > 0
            && self.gpa.is_multiple_of(PAGE_SIZE as u64)
            && self.host_addr.is_multiple_of(PAGE_SIZE)
            && self.len.is_multiple_of(PAGE_SIZE)
    }
}

/// A guest's report of one page (`docs/fphash.md`): its guest-physical address and the hash
/// the guest computed, or `None` when the host is to hash it (HOST_HASH). The hash is only a
/// lookup key: the host proves every page itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// The guest's BLAKE3 of it, if it gave one.
    pub hash: Option<PageHash>,
}

/// What became of one report (the VMM maps it to the wire status of `docs/fphash.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStatus {
    /// The page now maps a store page (first copy or duplicate).
    Merged,
    /// The page already mapped the store page (or image page) with this content.
    Already,
    /// The page does not hash to the reported hash, or differs from the store copy.
    Mismatch,
    /// Unaligned gpa, or not inside one of the VM's RAM regions (or no such VM).
    BadGpa,
    /// Not merged: the VMA budget or the store limit was reached, or the broker is away.
    NoRoom,
}

/// A page offered to a domain's shared pages.
pub struct PageOffer<'a> {
    /// The hash the offerer claims (only a lookup key).
    pub hash: PageHash,
    /// The page's bytes.
    pub page: &'a [u8; PAGE_SIZE],
    /// Slots to try first for a new page (so that a guest run stays a slot run).
    pub hints: [Option<Slot>; 2],
    /// Try the slot after the previous offer's of the same call first.
    pub follows_previous: bool,
    /// `hash` was computed from `page` by this process (a VM of this process reported the
    /// page without a hash): it needs no second hashing. Never set for a broker client's.
    pub hashed_here: bool,
}

/// What became of a page offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// The holder now has a reference on `slot`, which holds the page: a new slot (`fresh`)
    /// or one that already held these bytes.
    Slot {
        /// The slot.
        slot: Slot,
        /// Whether the page was copied into a new slot.
        fresh: bool,
    },
    /// The bytes do not hash to the claimed hash, or differ from the page indexed under it.
    Mismatch,
    /// No slot is left.
    Full,
}

/// The broker cannot be reached (or its answer is overdue): nothing was merged, nothing
/// more is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Counters of a domain's shared pages (in the broker: of one domain; in a VMM with a broker:
/// of what it asked for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageCounters {
    /// Hashes looked up.
    pub lookups: u64,
    /// Lookups that found a slot (a reference was taken).
    pub hits: u64,
    /// Pages hashed here (offered pages whose hash was not indexed).
    pub hashes: u64,
    /// Offered pages proven by a byte compare with the stored page.
    pub compares: u64,
    /// Pages copied into new slots.
    pub stored: u64,
    /// Offered pages refused: bytes and hash disagree.
    pub mismatches: u64,
    /// Offered pages refused: no slot left.
    pub full: u64,
    /// References released.
    pub releases: u64,
    /// Releases of references the holder did not have (refused).
    pub bad_releases: u64,
    /// Slots punched.
    pub freed: u64,
}
