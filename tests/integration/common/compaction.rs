//! Host memory churn for the compaction stress tests: fragment free memory, then make the
//! kernel migrate pages (`/proc/sys/vm/compact_memory`) while the code under test runs.
//!
//! Migration shows in `/proc/<pid>/pagemap` as a non-present "swap" entry for a moment; the
//! merge engine must not take it for a copy-on-write break.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";

/// Memory that holds every other page of a range, so that free memory is fragmented.
pub struct Fragments {
    addr: usize,
    len: usize,
}

impl Fragments {
    /// Touches `mib` MiB page by page, then frees every other page: later allocations land in
    /// the holes, interleaved with pages compaction will want to move.
    pub fn new(mib: usize) -> Fragments {
        let len = mib << 20;
        // SAFETY: a new private anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {mib} MiB for fragmentation");
        let addr = p as usize;
        // No transparent huge pages: the point is 4 KiB holes.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        for off in (0..len).step_by(PAGE) {
            // SAFETY: inside our mapping.
            unsafe { ((addr + off) as *mut u8).write_volatile(1) };
        }
        for off in (0..len).step_by(2 * PAGE) {
            // SAFETY: one page of our mapping; its contents are not needed.
            unsafe { libc::madvise((addr + off) as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) };
        }
        Fragments { addr, len }
    }
}

impl Drop for Fragments {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no references into it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Asks the kernel to compact all zones, once. Needs root; the tests that call it say so.
pub fn compact_once() {
    if let Err(e) = std::fs::write(COMPACT_MEMORY, "1") {
        panic!(
            "cannot write {COMPACT_MEMORY} ({e}): the compaction stress tests need root, as the \
             README's test command runs"
        );
    }
}

/// A thread that compacts host memory in a loop until dropped; counts its rounds.
pub struct Compactor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Compactor {
    /// Starts compacting now, pausing `gap` between rounds.
    pub fn start(gap: Duration) -> Compactor {
        compact_once();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 1;
            while !flag.load(Ordering::Relaxed) {
                compact_once();
                rounds += 1;
                std::thread::sleep(gap);
            }
            rounds
        });
        Compactor { stop, thread: Some(thread) }
    }

    /// Stops and returns how many compaction rounds ran.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().expect("compactor thread"))
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How many pages the kernel migrated since boot, system-wide (`pgmigrate_success`).
pub fn pages_migrated() -> u64 {
    let vmstat = std::fs::read_to_string("/proc/vmstat").expect("read /proc/vmstat");
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("pgmigrate_success "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `f` for `limit` at most, repeatedly, while memory is compacted; returns the rounds of
/// `f` and of compaction.
pub fn churn_while(limit: Duration, mut f: impl FnMut()) -> (u64, u64) {
    let compactor = Compactor::start(Duration::from_millis(5));
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < limit {
        f();
        rounds += 1;
    }
    (rounds, compactor.finish())
}
