//! How much host memory ranges of this process's address space hold, page by page from
//! `/proc/self/pagemap` (exact for any range, also one that shares a VMA with other memory).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Resident memory of some address ranges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// Pages present (shared pages count once per mapping).
    pub rss_bytes: u64,
    /// Private anonymous pages present (never merged, or copied on write).
    pub anonymous_bytes: u64,
}

/// Bit 63 of a pagemap entry: present; bit 61: a file page or shared anonymous
/// (`Documentation/admin-guide/mm/pagemap.rst`).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
/// Entries read with one `pread`.
const CHUNK: usize = 4096;

/// Counts the present and the private anonymous pages of `ranges` (start, length; page
/// aligned) of this process.
pub fn resident_in(ranges: &[(usize, usize)]) -> std::io::Result<Resident> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut total = Resident::default();
    let mut buf = vec![0u8; CHUNK * 8];
    for &(start, len) in ranges {
        let (first, pages) = (start / 4096, len / 4096);
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK);
            pagemap.read_exact_at(&mut buf[..n * 8], ((first + done) * 8) as u64)?;
            for entry in buf[..n * 8].chunks_exact(8) {
                let mut e = [0u8; 8];
                e.copy_from_slice(entry);
                let e = u64::from_ne_bytes(e);
                if e & PM_PRESENT != 0 {
                    total.rss_bytes += 4096;
                    if e & PM_FILE == 0 {
                        total.anonymous_bytes += 4096;
                    }
                }
            }
            done += n;
        }
    }
    Ok(total)
}

/// Bytes of a file in the host's page cache (`mincore` over a read-only mapping of it): the
/// one copy of a shared read-only image that the VMs map.
pub fn file_cache_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a new read-only shared mapping of the file, unmapped below; only mincore reads
    // its page table.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0)
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut residency = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `addr` and `len` are the mapping above; `residency` has a byte per page.
    let rc = unsafe { libc::mincore(addr, len, residency.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above, used by nothing else.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok(residency.iter().filter(|&&r| r & 1 != 0).count() as u64 * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_touched_anonymous_pages() {
        let len = 64 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        for page in 0..16 {
            // SAFETY: inside the mapping.
            unsafe { (addr as *mut u8).add(page * 4096).write_volatile(1) };
        }
        let resident = resident_in(&[(addr as usize, len)]).expect("pagemap");
        // A part of the mapping counts exactly its own pages.
        let part = resident_in(&[(addr as usize + 8 * 4096, 16 * 4096)]).expect("pagemap");
        assert_eq!(part.anonymous_bytes, 8 * 4096);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(resident.anonymous_bytes, 16 * 4096);
        assert_eq!(resident.rss_bytes, 16 * 4096);
    }
}
