//! How much of something is resident in host memory: ranges of this process's address space,
//! page by page from `/proc/self/pagemap` (exact for any range, also one that shares a VMA
//! with other memory), and files in the host's page cache.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::pagemap_entry::{PM_FILE, PM_PFN, PM_PRESENT};

/// Resident memory of some address ranges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// Pages present (shared pages count once per mapping).
    pub rss_bytes: u64,
    /// Private anonymous pages present (never merged, or copied on write), but not the
    /// host's shared zero page, which a read of never-written memory maps (a snapshot reads
    /// all of guest RAM) and which holds no memory of its own.
    pub anonymous_bytes: u64,
}

/// Entries read with one `pread`.
const CHUNK: usize = 4096;

/// Counts the present and the private anonymous pages of `ranges` (start, length; page
/// aligned) of this process.
pub fn resident_in(ranges: &[(usize, usize)]) -> std::io::Result<Resident> {
    let pagemap = File::open(crate::pagemap_entry::PATH)?;
    let zero_page = zero_page_pfn(&pagemap);
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
                    if e & PM_FILE == 0 && zero_page.is_none_or(|pfn| e & PM_PFN != pfn) {
                        total.anonymous_bytes += 4096;
                    }
                }
            }
            done += n;
        }
    }
    Ok(total)
}

/// The page frame of the host's shared zero page, as `pagemap` shows it in a page of this
/// process that was read and never written; `None` when `pagemap` hides page frames (they are
/// shown to `CAP_SYS_ADMIN` only), and then zero-page mappings count as anonymous.
fn zero_page_pfn(pagemap: &File) -> Option<u64> {
    // SAFETY: a new private anonymous page, unmapped below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: a read of the page mapped above: the kernel maps its zero page there.
    unsafe { (page as *const u8).read_volatile() };
    let mut entry = [0u8; 8];
    let read = pagemap.read_exact_at(&mut entry, (page as u64 / 4096) * 8);
    // SAFETY: unmapping the page mapped above.
    unsafe { libc::munmap(page, 4096) };
    let e = u64::from_ne_bytes(entry);
    (read.is_ok() && e & PM_PRESENT != 0 && e & PM_PFN != 0).then_some(e & PM_PFN)
}

/// `cachestat(2)` (Linux 6.5; x86_64 `syscall_64.tbl` entry 451, not in the libc crate).
pub(crate) const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` (`include/uapi/linux/mman.h`); length 0 means to the end.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` (`include/uapi/linux/mman.h`).
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of a file in the host's page cache: the one copy of a shared read-only image that
/// the VMs map. `cachestat` asks the kernel with one call and no mapping. It refuses (EPERM) a
/// caller that neither owns the file nor may write it, and kernels before 6.5 lack it: then
/// `mincore` over a read-only mapping of the file, which for such a caller reports every page
/// cached (an upper bound, so a saving computed from it is never overstated).
pub fn file_cache_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    let range = CachestatRange { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `stat`, both live locals of the layouts
    // the syscall takes; `file` is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0,
        )
    };
    if rc == 0 {
        return Ok(stat.nr_cache * 4096);
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
        return Err(err);
    }
    mincore_bytes(&file)
}

/// [`file_cache_bytes`] by `mincore` over a read-only mapping of `file`.
fn mincore_bytes(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
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

    #[test]
    fn pages_only_read_map_the_zero_page_and_hold_no_memory() {
        let len = 32 * 4096;
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
        for page in 0..32 {
            // SAFETY: inside the mapping; pages 0-7 written, the rest only read.
            unsafe {
                let p = (addr as *mut u8).add(page * 4096);
                if page < 8 {
                    p.write_volatile(1);
                } else {
                    p.read_volatile();
                }
            }
        }
        let resident = resident_in(&[(addr as usize, len)]).expect("pagemap");
        let privileged = zero_page_pfn(&File::open(crate::pagemap_entry::PATH).expect("pagemap")).is_some();
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(resident.rss_bytes, 32 * 4096);
        if privileged {
            assert_eq!(resident.anonymous_bytes, 8 * 4096, "zero-page mappings counted as memory");
        } else {
            println!("skipped: pagemap hides page frames from this user, zero pages count as anonymous");
        }
    }

    #[test]
    fn page_cache_of_a_file_read_whole_is_its_size_by_either_measure() {
        let dir = std::env::temp_dir().join(format!("samepage-residency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cached");
        std::fs::write(&path, vec![7u8; 40 * 4096]).unwrap();
        // Written through the page cache and read back: every page is cached.
        assert_eq!(std::fs::read(&path).unwrap().len(), 40 * 4096);
        let by_cachestat = file_cache_bytes(&path).unwrap();
        let by_mincore = mincore_bytes(&File::open(&path).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(by_cachestat, 40 * 4096);
        assert_eq!(by_mincore, by_cachestat);
    }
}
