//! Counters and figures of a dedup domain.

use std::fmt;

/// What a dedup domain has done and what it saves, since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DedupStats {
    /// Page records handed to `Domain::merge`.
    pub reported: u64,
    /// Records whose page was proven to hold the reported content: equal byte for byte to the
    /// store page indexed under the hash, or hashed on the host to it.
    pub verified: u64,
    /// Pages the store hashed (reports whose hash was not in the index yet).
    pub host_hashes: u64,
    /// Pages the VMM hashed because the guest reported them without a hash (HOST_HASH).
    pub host_hashes_for_guests: u64,
    /// Reports not merged because the broker could not be reached (or its answer to an
    /// earlier request was overdue).
    pub broker_unavailable: u64,
    /// Requests the broker did not answer within 2 s: the connection was kept and the answer
    /// awaited, so merged pages stayed as they were.
    pub broker_overdue: u64,
    /// Records rejected: hash or bytes differ.
    pub rejected_mismatch: u64,
    /// Records rejected: gpa unaligned or outside the VM's RAM.
    pub rejected_bad_gpa: u64,
    /// Records not merged: VMA budget or store limit reached.
    pub rejected_no_room: u64,
    /// Pages mapped from the store (first copies and duplicates).
    pub merged: u64,
    /// Records for pages that already mapped the right store page.
    pub already: u64,
    /// Merged pages found copied on write on two looks (their reference dropped).
    pub cow_breaks: u64,
    /// Merged pages that looked copied once but not on the second look (e.g. the kernel was
    /// migrating them): their references were kept.
    pub second_look_kept: u64,
    /// Looks at merged pages that found them away from their page table (a migration entry
    /// while the kernel moves them, or swapped out): references kept.
    pub seen_moving: u64,
    /// Guest pages mapped from shared read-only images instead of copied (events).
    pub image_mapped: u64,
    /// Image pages not mapped for want of VMA room (they were copied).
    pub image_no_room: u64,
    /// Image pages found written by the guest (two looks): its own copies now.
    pub image_cow_breaks: u64,
    /// Guest pages that map an image page now.
    pub image_pages: u64,
    /// Reported image pages merged by content: they map the store's copy now, and the image's
    /// page cache page is given back when no process maps it (`docs/fphash.md`).
    pub image_merged: u64,
    /// Host-hashed reports of image pages whose hash this process had computed before (the
    /// same file's page, reported by another VM or again): not hashed a second time.
    pub image_hashes_remembered: u64,
    /// Reports of pages a restored VM still maps from its snapshot's memory file (shared with
    /// every clone of the snapshot through its page cache): answered `Already`, neither hashed
    /// nor copied into the store.
    pub snapshot_pages: u64,
    /// Images given up because their file was about to change (a read lease broke): their
    /// pages were copied into the guests' own memory, their reads are copied since.
    pub images_unshared: u64,
    /// Guest pages copied out of images given up (see `images_unshared`).
    pub image_unshared_pages: u64,
    /// Guest pages mapped from the kernel file's read-only segments instead of copied
    /// (events): the guest kernel's text and read-only data held once on the host.
    pub kernel_mapped: u64,
    /// Kernel pages found written by the guest (two looks; e.g. patched at boot): its own
    /// copies now.
    pub kernel_cow_breaks: u64,
    /// Guest pages that map the kernel file now.
    pub kernel_pages: u64,
    /// Kernel pages the guests wrote (boot-time patching) that were merged since: the same
    /// patched bytes in every VM, held once in the store.
    pub kernel_copies_merged: u64,
    /// Image pages a guest did not report, merged by content because the rest of their
    /// page-cache block was: one mapped page would keep the whole folio (up to 2 MiB) cached.
    pub image_stragglers_merged: u64,
    /// Guest pages given back to the host (a balloon's inflated or reported pages): they read
    /// zeros when the guest takes them again.
    pub discarded: u64,
    /// Of those, pages that mapped a store slot or an image page and got fresh anonymous memory
    /// (their references dropped).
    pub discarded_remapped: u64,
    /// Pages the sweeps for pages of zeros read (pages the VMs wrote, neither merged nor
    /// mapped from an image), each up to its first word that is not zero.
    pub zero_pages_checked: u64,
    /// Pages of zeros given back to the host (`MADV_DONTNEED`): they read the host's zero page
    /// until the guest writes them again.
    pub zero_pages_given_back: u64,
    /// Sweeps for pages of zeros finished (every VM's RAM once each).
    pub zero_sweeps: u64,
    /// Times the VMA count was set from `/proc/self/maps`.
    pub vma_reconciles: u64,
    /// The most VMAs the kernel had above the count at a reconciliation (0 unless the count's
    /// model of the kernel is wrong).
    pub vma_undercount_max: u64,
    /// `page_removed` hints received.
    pub removed_hints: u64,
    /// Live store pages (slots with at least one reference).
    pub store_pages: u64,
    /// Memory the store memfd really holds (`st_blocks * 512`).
    pub store_bytes_allocated: u64,
    /// Guest pages currently mapping the store.
    pub mapped_pages: u64,
    /// `(mapped_pages - store_pages) * 4096`: host memory merging saves now.
    pub bytes_saved: u64,
    /// VMAs the domain's guest RAM costs (model; see `vma.rs`).
    pub vmas: u64,
}

impl DedupStats {
    /// Adds the figures of another VM's domain (another process's): every counter and gauge
    /// sums, but the largest VMA undercount is kept. Summed across processes, the store's
    /// gauges (`store_pages`, `store_bytes_allocated`, `bytes_saved`) count what each process
    /// holds of one store: the caller sets them from the broker's figures.
    pub fn add(&mut self, other: &DedupStats) {
        // Every field named, so that a new one cannot be left out of the sum.
        let DedupStats {
            reported,
            verified,
            host_hashes,
            host_hashes_for_guests,
            broker_unavailable,
            broker_overdue,
            rejected_mismatch,
            rejected_bad_gpa,
            rejected_no_room,
            merged,
            already,
            cow_breaks,
            second_look_kept,
            seen_moving,
            image_mapped,
            image_no_room,
            image_cow_breaks,
            image_pages,
            image_merged,
            image_hashes_remembered,
            snapshot_pages,
            images_unshared,
            image_unshared_pages,
            kernel_mapped,
            kernel_cow_breaks,
            kernel_pages,
            kernel_copies_merged,
            image_stragglers_merged,
            discarded,
            discarded_remapped,
            zero_pages_checked,
            zero_pages_given_back,
            zero_sweeps,
            vma_reconciles,
            vma_undercount_max,
            removed_hints,
            store_pages,
            store_bytes_allocated,
            mapped_pages,
            bytes_saved,
            vmas,
        } = *other;
        self.reported += reported;
        self.verified += verified;
        self.host_hashes += host_hashes;
        self.host_hashes_for_guests += host_hashes_for_guests;
        self.broker_unavailable += broker_unavailable;
        self.broker_overdue += broker_overdue;
        self.rejected_mismatch += rejected_mismatch;
        self.rejected_bad_gpa += rejected_bad_gpa;
        self.rejected_no_room += rejected_no_room;
        self.merged += merged;
        self.already += already;
        self.cow_breaks += cow_breaks;
        self.second_look_kept += second_look_kept;
        self.seen_moving += seen_moving;
        self.image_mapped += image_mapped;
        self.image_no_room += image_no_room;
        self.image_cow_breaks += image_cow_breaks;
        self.image_pages += image_pages;
        self.image_merged += image_merged;
        self.image_hashes_remembered += image_hashes_remembered;
        self.snapshot_pages += snapshot_pages;
        self.images_unshared += images_unshared;
        self.image_unshared_pages += image_unshared_pages;
        self.kernel_mapped += kernel_mapped;
        self.kernel_cow_breaks += kernel_cow_breaks;
        self.kernel_pages += kernel_pages;
        self.kernel_copies_merged += kernel_copies_merged;
        self.image_stragglers_merged += image_stragglers_merged;
        self.discarded += discarded;
        self.discarded_remapped += discarded_remapped;
        self.zero_pages_checked += zero_pages_checked;
        self.zero_pages_given_back += zero_pages_given_back;
        self.zero_sweeps += zero_sweeps;
        self.vma_reconciles += vma_reconciles;
        self.removed_hints += removed_hints;
        self.store_pages += store_pages;
        self.store_bytes_allocated += store_bytes_allocated;
        self.mapped_pages += mapped_pages;
        self.bytes_saved += bytes_saved;
        self.vmas += vmas;
        self.vma_undercount_max = self.vma_undercount_max.max(vma_undercount_max);
    }
}

const MIB: f64 = (1 << 20) as f64;

impl fmt::Display for DedupStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reported {} verified {} (host hashes {}) merged {} already {} rejected mismatch/bad-gpa/no-room {}/{}/{} \
             cow-breaks {} zeros given back {} | store {} pages ({:.1} MiB held), {} guest pages mapped, saved {:.1} MiB | {} VMAs",
            self.reported,
            self.verified,
            self.host_hashes,
            self.merged,
            self.already,
            self.rejected_mismatch,
            self.rejected_bad_gpa,
            self.rejected_no_room,
            self.cow_breaks,
            self.zero_pages_given_back,
            self.store_pages,
            self.store_bytes_allocated as f64 / MIB,
            self.mapped_pages,
            self.bytes_saved as f64 / MIB,
            self.vmas,
        )
    }
}

/// What one refresh ([`super::Domain::refresh_vm`]) changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshReport {
    /// Merged pages found copied on write on a second look; their references were dropped.
    pub cow_breaks: usize,
    /// Store slots freed (punched) because nobody maps them any more.
    pub slots_freed: usize,
    /// Merged pages that look copied for the first time (a second look decides).
    pub suspects: usize,
    /// Earlier suspects that no longer look copied: kept.
    pub kept: usize,
    /// Merged pages seen away from their page table (the kernel was moving or swapping them):
    /// nothing definitive, references kept.
    pub moving: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line() {
        let s = DedupStats { merged: 3, bytes_saved: 2 << 20, ..Default::default() }.to_string();
        assert!(!s.contains('\n'));
        assert!(s.contains("merged 3") && s.contains("saved 2.0 MiB"), "{s}");
    }
}
