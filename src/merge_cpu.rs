//! CPU time this process spends merging (verifying, hashing, copying and mapping reported
//! pages and pausing the vCPUs for it; the periodic refresh that finds pages copied on write
//! and gives image page cache back; merging pages found without a report, sweeping for pages
//! of zeros and giving them back), summed over its VMs for the benchmarks' "merge CPU".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static MERGE_CPU_NS: AtomicU64 = AtomicU64::new(0);
/// The part of it that the periodic refreshes spent.
static REFRESH_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// CPU time spent merging so far, by all VMs of this process.
pub fn total() -> Duration {
    Duration::from_nanos(MERGE_CPU_NS.load(Ordering::Relaxed))
}

/// The part of [`total`] the periodic refreshes spent (what keeping pages merged costs
/// while guests report nothing).
pub fn refresh_total() -> Duration {
    Duration::from_nanos(REFRESH_CPU_NS.load(Ordering::Relaxed))
}

/// Runs `work` and counts the CPU time the calling thread spent in it as merging.
pub fn measure<T>(work: impl FnOnce() -> T) -> T {
    let before = thread_cpu_ns();
    let out = work();
    MERGE_CPU_NS.fetch_add(thread_cpu_ns().saturating_sub(before), Ordering::Relaxed);
    out
}

/// As [`measure`], for a periodic refresh (counted in [`refresh_total`] too).
pub fn measure_refresh<T>(work: impl FnOnce() -> T) -> T {
    let before = thread_cpu_ns();
    let out = work();
    let spent = thread_cpu_ns().saturating_sub(before);
    MERGE_CPU_NS.fetch_add(spent, Ordering::Relaxed);
    REFRESH_CPU_NS.fetch_add(spent, Ordering::Relaxed);
    out
}

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
