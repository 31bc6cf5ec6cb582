//! Reading `/proc/self/pagemap` to tell whether a merged guest page still maps the store or
//! was copied on write (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::error::DedupError;
use super::words::PAGE_SIZE;
use crate::pagemap_entry::{PATH, PM_FILE, PM_PRESENT, PM_SWAPPED};

/// Most entries read with one `pread` (32 KiB of buffer on the stack).
const CHUNK: usize = 4096;

/// What a store-mapped guest page is now, as far as its page table entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageState {
    /// Not faulted in since the store page was mapped: still reads the store.
    Unfaulted,
    /// Maps the store page (a page of the memfd's page cache).
    Store,
    /// A private anonymous page: the guest wrote it (copy-on-write broke the merge).
    Copied,
    /// Not present but not empty: a migration entry while the kernel moves the page
    /// (compaction, NUMA balancing) shows as "swapped", with "file page" set for a store page;
    /// a private copy that was swapped out looks alike. Nothing definitive: look again later.
    Elsewhere,
}

impl PageState {
    fn from_entry(entry: u64) -> PageState {
        if entry & PM_PRESENT != 0 {
            if entry & PM_FILE != 0 {
                PageState::Store
            } else {
                PageState::Copied
            }
        } else if entry & PM_SWAPPED != 0 {
            PageState::Elsewhere
        } else {
            PageState::Unfaulted
        }
    }

    /// Whether this is definitive evidence that the page no longer reads its store slot.
    pub(crate) fn is_copied(self) -> bool {
        self == PageState::Copied
    }
}

/// An open `/proc/self/pagemap`.
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub(crate) fn open() -> Result<Pagemap, DedupError> {
        let file = File::open(PATH).map_err(|source| DedupError::Proc { path: PATH, source })?;
        Ok(Pagemap { file })
    }

    /// The state of `pages` consecutive pages from host address `addr` (page aligned).
    pub(crate) fn states(&self, addr: usize, pages: usize) -> Result<Vec<PageState>, DedupError> {
        Ok(self.entries(addr, pages)?.into_iter().map(PageState::from_entry).collect())
    }

    /// The pagemap entries of `pages` consecutive pages from host address `addr` (page
    /// aligned), as the kernel gives them (`crate::pagemap_entry` names their bits).
    pub(crate) fn entries(&self, addr: usize, pages: usize) -> Result<Vec<u64>, DedupError> {
        let mut out = Vec::with_capacity(pages);
        let mut buf = [0u8; CHUNK * 8];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK);
            let offset = ((addr / PAGE_SIZE + done) * 8) as u64;
            self.file
                .read_exact_at(&mut buf[..n * 8], offset)
                .map_err(|source| DedupError::Proc { path: PATH, source })?;
            for entry in buf[..n * 8].chunks_exact(8) {
                let mut e = [0u8; 8];
                e.copy_from_slice(entry);
                out.push(u64::from_ne_bytes(e));
            }
            done += n;
        }
        Ok(out)
    }

    /// The state of the page at host address `addr`.
    pub(crate) fn state(&self, addr: usize) -> Result<PageState, DedupError> {
        Ok(self.states(addr, 1)?.first().copied().unwrap_or(PageState::Unfaulted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entries() {
        assert_eq!(PageState::from_entry(0), PageState::Unfaulted);
        assert_eq!(PageState::from_entry(PM_PRESENT | PM_FILE), PageState::Store);
        assert_eq!(PageState::from_entry(PM_PRESENT | 1234), PageState::Copied);
        // Migration entries (and swapped-out copies) prove nothing either way.
        assert_eq!(PageState::from_entry(PM_SWAPPED | PM_FILE), PageState::Elsewhere);
        assert_eq!(PageState::from_entry(PM_SWAPPED), PageState::Elsewhere);
    }

    #[test]
    fn sees_a_written_anonymous_page() {
        let v = vec![1u8; 3 * PAGE_SIZE];
        let addr = (v.as_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let pm = Pagemap::open().unwrap();
        assert_eq!(pm.state(addr).unwrap(), PageState::Copied);
    }
}
