//! The merge engine under host memory compaction: a page the kernel migrates shows in
//! `/proc/self/pagemap` as a non-present entry for a moment, which is not a copy-on-write
//! break. No merged page may lose its store slot while it still maps it.
//!
//! Needs root (writes `/proc/sys/vm/compact_memory`), as the README's test command runs.

use crate::common;

use std::time::{Duration, Instant};

use common::compaction::{churn_while, pages_migrated, Fragments};
use common::stress_factor;
use samepage::dedup::{Domain, Limits, MergeStatus, RamRegion, Report};

const PAGE: usize = 4096;

/// Guest-RAM-like memory of this process: a private anonymous mapping.
struct Ram {
    addr: usize,
    pages: usize,
}

impl Ram {
    fn new(pages: usize) -> Ram {
        // SAFETY: a new private anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Ram { addr: p as usize, pages }
    }

    fn page(&self, i: usize) -> *mut u8 {
        assert!(i < self.pages);
        (self.addr + i * PAGE) as *mut u8
    }

    fn read(&self, i: usize) -> [u8; PAGE] {
        let mut buf = [0u8; PAGE];
        // SAFETY: a page of our mapping, touched only through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(self.page(i), buf.as_mut_ptr(), PAGE) };
        buf
    }

    fn write(&self, i: usize, data: &[u8; PAGE]) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.page(i), PAGE) };
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our own mapping (with store pages mapped over parts of it).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.pages * PAGE) };
    }
}

/// Page `i` of a file: distinct, reproducible content.
fn file_page(i: usize) -> [u8; PAGE] {
    let mut page = [0u8; PAGE];
    blake3::Hasher::new().update(b"compaction").update(&i.to_le_bytes()).finalize_xof().fill(&mut page);
    page
}

/// What one attempt saw.
#[derive(Default)]
struct Attempt {
    refreshes: u64,
    compactions: u64,
    migrated: u64,
    seen_moving: usize,
    false_breaks: usize,
    freed: usize,
    changed: usize,
}

/// Fragments host memory, fills and merges fresh guest-like RAM into a new domain, frees the
/// fragments (so that compaction moves the RAM's and the store's pages), then refreshes the
/// domain in a loop while the host compacts memory; finally checks every page.
fn attempt(pages: usize, seed: usize, churn: Duration) -> Attempt {
    let fragments = Fragments::new(2048);
    let ram = Ram::new(pages);
    let content = |i: usize| file_page(seed * pages + i);
    for i in 0..pages {
        ram.write(i, &content(i));
    }
    let mut domain = Domain::new("compaction", Limits::default()).expect("domain");
    // SAFETY: `ram` is a private anonymous mapping that outlives the domain's use of it (the
    // VM is unregistered before `ram` drops) and is touched only through raw pointers.
    let vm = unsafe {
        domain.register_vm(
            "vm",
            vec![RamRegion { gpa: 0, host_addr: ram.addr, len: pages * PAGE, maps_snapshot: false }],
        )
    };
    for chunk in (0..pages).collect::<Vec<_>>().chunks(256) {
        let reports: Vec<Report> = chunk
            .iter()
            .map(|&i| Report { gpa: (i * PAGE) as u64, hash: Some(*blake3::hash(&ram.read(i)).as_bytes()) })
            .collect();
        let mut statuses = vec![MergeStatus::NoRoom; reports.len()];
        domain.merge(vm, &reports, &mut statuses);
        assert!(statuses.iter().all(|s| *s == MergeStatus::Merged), "{statuses:?}");
    }
    // The guest reads its pages: they are faulted in from the store (an unfaulted page has no
    // page table entry for the kernel to migrate).
    assert!((0..pages).all(|i| ram.read(i) == content(i)));
    drop(fragments);

    let mut seen = Attempt::default();
    let migrated_before = pages_migrated();
    let (refreshes, compactions) = churn_while(churn, || {
        let report = domain.refresh().expect("refresh");
        seen.false_breaks += report.cow_breaks;
        seen.freed += report.slots_freed;
        seen.seen_moving += report.moving;
    });
    (seen.refreshes, seen.compactions) = (refreshes, compactions);
    seen.migrated = pages_migrated() - migrated_before;
    // Two more looks after the churn, as the engine's schedule would take.
    let last = domain.settle().expect("refresh");
    seen.false_breaks += last.cow_breaks;
    seen.freed += last.slots_freed;
    seen.changed = (0..pages).filter(|&i| ram.read(i) != content(i)).count();
    let stats = domain.stats();
    assert_eq!(stats.store_pages as usize + seen.freed, pages);
    assert_eq!(domain.verify_store().expect("store"), stats.store_pages as usize);
    domain.unregister_vm(vm);
    seen
}

#[test]
fn merged_pages_keep_their_store_slots_while_the_host_compacts_memory() {
    const PAGES: usize = 64 * 1024;
    // Under scripts/stress.sh every attempt runs, each longer. Otherwise attempts stop at the
    // first that saw a merged page moving; whether compaction picks the test's pages is luck
    // (a fresh host with most memory free moved none of them in 4 attempts once), so up to 8.
    let factor = stress_factor();
    let attempts = if factor == 1 { 8 } else { 4 * factor as usize };
    let churn = Duration::from_secs(5 * factor);
    let start = Instant::now();
    let mut total = Attempt::default();
    for n in 0..attempts {
        let a = attempt(PAGES, n, churn);
        println!(
            "compaction attempt {n}: {PAGES} merged pages, {} refreshes and {} compactions, {} pages \
             migrated host-wide, merged pages seen moving {}; false copy-on-write breaks {}, slots \
             freed {}, changed pages {}",
            a.refreshes, a.compactions, a.migrated, a.seen_moving, a.false_breaks, a.freed, a.changed
        );
        total.seen_moving += a.seen_moving;
        total.false_breaks += a.false_breaks;
        total.freed += a.freed;
        total.changed += a.changed;
        // Enough evidence once the engine has looked at pages the kernel was moving.
        if total.seen_moving > 0 && factor == 1 {
            break;
        }
    }
    println!(
        "compaction: in {:.1} s, pages checked per attempt {PAGES}, merged pages seen moving {}, false \
         copy-on-write breaks {}, slots freed {}, changed pages {}",
        start.elapsed().as_secs_f64(),
        total.seen_moving,
        total.false_breaks,
        total.freed,
        total.changed
    );
    assert_eq!((total.false_breaks, total.freed, total.changed), (0, 0, 0), "nobody wrote a page");
    assert!(
        total.seen_moving > 0,
        "in {attempts} attempts no merged page was seen moving: the test proved nothing"
    );
}
