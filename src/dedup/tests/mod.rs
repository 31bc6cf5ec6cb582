//! Merge-engine tests on real memory: "guest RAM" is private anonymous mappings of this
//! process, the store a real memfd; no KVM.

use std::sync::{Mutex, Once};
use std::time::Instant;

use super::pagemap::{PageState, Pagemap};
use super::*;

mod adversary;
mod discard;
mod images;
mod zero_pages;

/// A fake guest RAM region: a private anonymous mapping.
struct FakeRam {
    addr: usize,
    pages: usize,
}

impl FakeRam {
    fn new(pages: usize) -> FakeRam {
        // SAFETY: a new anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        FakeRam { addr: p as usize, pages }
    }

    /// RAM whose page `i` holds `content(i)`.
    fn filled(pages: usize, content: impl Fn(usize) -> [u8; PAGE_SIZE]) -> FakeRam {
        let ram = FakeRam::new(pages);
        for i in 0..pages {
            ram.write_page(i, &content(i));
        }
        ram
    }

    fn host(&self, page: usize) -> usize {
        assert!(page < self.pages);
        self.addr + page * PAGE_SIZE
    }

    fn read_page(&self, page: usize) -> [u8; PAGE_SIZE] {
        let mut buf = [0u8; PAGE_SIZE];
        // SAFETY: the page lies in our mapping; only raw pointers touch it.
        unsafe { std::ptr::copy_nonoverlapping(self.host(page) as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
        buf
    }

    fn write_page(&self, page: usize, data: &[u8; PAGE_SIZE]) {
        // SAFETY: as in `read_page`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host(page) as *mut u8, PAGE_SIZE) };
    }

    fn region(&self, gpa: u64) -> RamRegion {
        RamRegion { gpa, host_addr: self.addr, len: self.pages * PAGE_SIZE, maps_snapshot: false }
    }

    fn state(&self, page: usize) -> PageState {
        Pagemap::open().unwrap().state(self.host(page)).unwrap()
    }
}

impl Drop for FakeRam {
    fn drop(&mut self) {
        // SAFETY: our own mapping (store pages mapped over parts of it included).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.pages * PAGE_SIZE) };
    }
}

/// File-like content: page `i` of "file" `seed`.
fn file_page(seed: u64, i: usize) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes()).update(&(i as u64).to_le_bytes());
    h.finalize_xof().fill(&mut page);
    page
}

fn hash(page: &[u8; PAGE_SIZE]) -> [u8; 32] {
    *blake3::hash(page).as_bytes()
}

/// Reports for pages `pages` of `ram` registered at gpa `base`.
fn reports(ram: &FakeRam, base: u64, pages: impl IntoIterator<Item = usize>) -> Vec<(u64, [u8; 32])> {
    pages.into_iter().map(|i| (base + (i * PAGE_SIZE) as u64, hash(&ram.read_page(i)))).collect()
}

fn merge(d: &mut Domain, vm: VmId, reports: &[(u64, [u8; 32])]) -> Vec<MergeStatus> {
    let reports: Vec<Report> = reports.iter().map(|&(gpa, hash)| Report { gpa, hash: Some(hash) }).collect();
    let mut st = vec![MergeStatus::NoRoom; reports.len()];
    d.merge(vm, &reports, &mut st);
    st
}

/// Reports of pages the host is to hash (HOST_HASH).
fn unhashed(gpas: &[u64]) -> Vec<Report> {
    gpas.iter().map(|&gpa| Report { gpa, hash: None }).collect()
}

fn register(d: &mut Domain, label: &str, ram: &FakeRam) -> VmId {
    // SAFETY: `ram` is a private anonymous mapping that outlives the domain's use of it (each
    // test unregisters or drops the domain first), touched only through raw pointers.
    unsafe { d.register_vm(label, vec![ram.region(0)]) }
}

fn big_limits() -> Limits {
    Limits { max_store_pages: 1 << 16, vma_budget: 60_000 }
}

fn store_blocks(d: &Domain) -> u64 {
    d.stats().store_bytes_allocated
}

/// Captures log records so that tests can count warnings.
struct Capture;
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LOGS.lock().unwrap().push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}
fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Warn);
    });
}

#[test]
fn duplicates_of_two_vms_share_one_store_copy() {
    const PAGES: usize = 256;
    let mut d = Domain::new("two-vms", big_limits()).unwrap();
    let rams: Vec<FakeRam> = (0..3).map(|_| FakeRam::filled(PAGES, |i| file_page(1, i))).collect();
    let vms: Vec<VmId> =
        rams.iter().enumerate().map(|(n, r)| register(&mut d, &format!("vm{n}"), r)).collect();

    for (n, (ram, vm)) in rams.iter().zip(&vms).enumerate() {
        let reps = reports(ram, 0, 0..PAGES);
        let t = Instant::now();
        let st = merge(&mut d, *vm, &reps);
        let dt = t.elapsed();
        eprintln!(
            "merge of {PAGES} pages, vm {n} ({}): {:.0} pages/s",
            if n == 0 { "first copies" } else { "duplicates" },
            PAGES as f64 / dt.as_secs_f64()
        );
        assert!(st.iter().all(|s| *s == MergeStatus::Merged), "{st:?}");
    }
    let s = d.stats();
    assert_eq!((s.merged, s.verified, s.store_pages, s.mapped_pages), (768, 768, 256, 768));
    assert_eq!(s.bytes_saved, 2 * PAGES as u64 * PAGE_SIZE as u64);
    assert_eq!(store_blocks(&d), (PAGES * PAGE_SIZE) as u64, "the store holds one copy");
    // Contents unchanged everywhere; the pages now map the store file.
    for ram in &rams {
        for i in 0..PAGES {
            assert_eq!(ram.read_page(i), file_page(1, i));
        }
        let states = Pagemap::open().unwrap().states(ram.addr, PAGES).unwrap();
        assert!(states.iter().all(|s| *s == PageState::Store), "{states:?}");
    }
    // Consecutive first copies got consecutive slots: each VM's RAM is one VMA.
    for vm in &vms {
        assert_eq!(d.vmas(*vm), 1);
        assert_eq!(d.measured_vmas(*vm).unwrap(), 1);
    }
    assert_eq!(d.verify_store().unwrap(), PAGES);
    eprintln!("{}", d.stats());
    for vm in vms {
        d.unregister_vm(vm);
    }
    assert_eq!((d.stats().store_pages, store_blocks(&d)), (0, 0));
}

#[test]
fn copy_on_write_isolates_vms_and_frees_unused_slots() {
    let mut d = Domain::new("cow", big_limits()).unwrap();
    let a = FakeRam::filled(16, |i| file_page(2, i));
    let b = FakeRam::filled(16, |i| file_page(2, i));
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    merge(&mut d, va, &reports(&a, 0, 0..16));
    merge(&mut d, vb, &reports(&b, 0, 0..16));
    assert_eq!(store_blocks(&d), 16 * PAGE_SIZE as u64);

    let old = file_page(2, 3);
    let new = file_page(99, 3);
    a.write_page(3, &new);
    assert_eq!(a.read_page(3), new);
    assert_eq!(b.read_page(3), old, "the other VM keeps the shared page");
    assert_eq!(a.state(3), PageState::Copied);
    d.verify_store().unwrap();
    // One look makes a suspect; the second, later, drops the reference.
    assert_eq!(d.refresh().unwrap(), RefreshReport { suspects: 1, ..Default::default() });
    assert_eq!(d.stats().cow_breaks, 0);
    std::thread::sleep(SECOND_LOOK_AFTER);
    assert_eq!(d.refresh().unwrap(), RefreshReport { cow_breaks: 1, ..Default::default() });
    assert_eq!(d.stats().cow_breaks, 1);
    assert_eq!(store_blocks(&d), 16 * PAGE_SIZE as u64, "b still maps the slot");

    b.write_page(3, &new);
    assert_eq!(d.settle().unwrap(), RefreshReport { cow_breaks: 1, slots_freed: 1, ..Default::default() });
    assert_eq!(store_blocks(&d), 15 * PAGE_SIZE as u64, "nobody maps slot 3: punched");
    assert_eq!((a.read_page(3), b.read_page(3)), (new, new));
    assert_eq!(a.read_page(4), file_page(2, 4));
    // Copy-on-write does not change the VMAs.
    assert_eq!(d.vmas(va), d.measured_vmas(va).unwrap());
    assert_eq!(d.settle().unwrap(), RefreshReport::default());
    d.verify_store().unwrap();

    // The written page can be merged again, with its new content.
    assert_eq!(merge(&mut d, va, &reports(&a, 0, [3])), [MergeStatus::Merged]);
    assert_eq!(merge(&mut d, vb, &reports(&b, 0, [3])), [MergeStatus::Merged]);
    assert_eq!(d.stats().store_pages, 16);
    // Slot 3 back between slots 2 and 4: the kernel may join all three (one anon_vma), the
    // count assumes it may not; it never says less than the kernel, and reconciles to it.
    assert!(d.vmas(va) >= d.measured_vmas(va).unwrap());
    d.reconcile_vmas();
    assert_eq!(d.vmas(va), d.measured_vmas(va).unwrap());

    d.unregister_vm(va);
    assert_eq!(store_blocks(&d), 16 * PAGE_SIZE as u64, "b still maps everything");
    d.unregister_vm(vb);
    assert_eq!(store_blocks(&d), 0);
    d.verify_store().unwrap();
}

#[test]
fn periodic_refreshes_look_at_every_page_now_and_then_and_at_suspects_each_time() {
    use crate::dedup::refresh::LOOK_AT_ALL_EVERY;
    let mut d = Domain::new("periodic", big_limits()).unwrap();
    let a = FakeRam::filled(64, |i| file_page(3, i));
    let b = FakeRam::filled(64, |i| file_page(3, i));
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    merge(&mut d, va, &reports(&a, 0, 0..64));
    merge(&mut d, vb, &reports(&b, 0, 0..64));
    // The first periodic refresh looks at every page: none copied.
    assert_eq!(d.refresh_vm_periodically(va).unwrap(), RefreshReport::default());
    a.write_page(5, &file_page(98, 5));
    // The refreshes between the looks at every page do not see the copy...
    for _ in 1..LOOK_AT_ALL_EVERY {
        assert_eq!(d.refresh_vm_periodically(va).unwrap(), RefreshReport::default());
    }
    // ...the next look at every page does,
    assert_eq!(d.refresh_vm_periodically(va).unwrap(), RefreshReport { suspects: 1, ..Default::default() });
    // and the refresh after it looks at the suspect again, which confirms it.
    std::thread::sleep(SECOND_LOOK_AFTER);
    assert_eq!(d.refresh_vm_periodically(va).unwrap(), RefreshReport { cow_breaks: 1, ..Default::default() });
    assert_eq!(d.stats().cow_breaks, 1);
    // A page that looks copied at a REMOVED hint is a suspect at once, confirmed by the next
    // periodic refresh though it is not a look at every page; the other VM's slot stays.
    b.write_page(9, &file_page(97, 9));
    d.page_removed(vb, (9 * PAGE_SIZE) as u64);
    d.refresh_vm_periodically(vb).unwrap();
    std::thread::sleep(SECOND_LOOK_AFTER);
    assert_eq!(d.refresh_vm_periodically(vb).unwrap(), RefreshReport { cow_breaks: 1, ..Default::default() });
    assert_eq!((a.read_page(5), b.read_page(9)), (file_page(98, 5), file_page(97, 9)));
    assert_eq!(a.read_page(9), file_page(3, 9));
    assert_eq!(d.stats().store_pages, 64);
    d.verify_store().unwrap();
}

#[test]
fn bad_hash_and_bad_gpa_are_rejected() {
    let mut d = Domain::new("reject", big_limits()).unwrap();
    let low = FakeRam::filled(8, |i| file_page(3, i));
    let high = FakeRam::filled(8, |i| file_page(3, i + 8));
    // SAFETY: as in `register`.
    let vm = unsafe { d.register_vm("vm", vec![high.region(1 << 32), low.region(0)]) };

    let mut wrong = reports(&low, 0, [1]);
    wrong[0].1[0] ^= 1;
    let gpa = |g: u64| (g, [0u8; 32]);
    let st = merge(&mut d, vm, &[wrong[0], gpa(8 * PAGE_SIZE as u64), gpa(0x10), gpa((1 << 32) + 0x8000)]);
    assert_eq!(st, [MergeStatus::Mismatch, MergeStatus::BadGpa, MergeStatus::BadGpa, MergeStatus::BadGpa]);
    assert_eq!(low.state(1), PageState::Copied, "nothing mapped");
    let s = d.stats();
    assert_eq!((s.rejected_mismatch, s.rejected_bad_gpa, s.merged, s.store_pages), (1, 3, 0, 0));
    // Unknown VM.
    d.unregister_vm(vm);
    assert_eq!(merge(&mut d, vm, &reports(&low, 0, [0])), [MergeStatus::BadGpa]);

    // SAFETY: as in `register`.
    let vm = unsafe { d.register_vm("vm2", vec![high.region(1 << 32), low.region(0)]) };
    assert_eq!(merge(&mut d, vm, &reports(&high, 1 << 32, [7])), [MergeStatus::Merged]);
    assert_eq!(high.read_page(7), file_page(3, 15));
}

#[test]
fn bytes_differing_from_the_store_copy_are_not_merged() {
    let mut d = Domain::new("corrupt", big_limits()).unwrap();
    let a = FakeRam::filled(4, |i| file_page(4, i));
    let b = FakeRam::filled(4, |i| file_page(4, i));
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    let rep = reports(&a, 0, [0]);
    assert_eq!(merge(&mut d, va, &rep), [MergeStatus::Merged]);
    assert!(d.corrupt_store_page(&rep[0].1));
    assert_eq!(merge(&mut d, vb, &rep), [MergeStatus::Mismatch]);
    assert_eq!(b.state(0), PageState::Copied, "b's page left alone");
    assert_eq!(b.read_page(0), file_page(4, 0));
    assert!(matches!(d.verify_store(), Err(DedupError::Corrupt { slot: 0 })));
}

#[test]
fn reporting_a_page_twice_is_already() {
    let mut d = Domain::new("twice", big_limits()).unwrap();
    let a = FakeRam::filled(4, |i| file_page(5, i));
    let va = register(&mut d, "a", &a);
    let rep = reports(&a, 0, [2, 2]);
    assert_eq!(merge(&mut d, va, &rep), [MergeStatus::Merged, MergeStatus::Already]);
    a.read_page(2); // fault it in: still the store page
    assert_eq!(merge(&mut d, va, &rep[..1]), [MergeStatus::Already]);
    // Written with the same bytes: a private copy now, so it merges again.
    a.write_page(2, &file_page(5, 2));
    assert_eq!(merge(&mut d, va, &rep[..1]), [MergeStatus::Merged]);
    let s = d.stats();
    assert_eq!((s.merged, s.already, s.cow_breaks, s.store_pages), (2, 2, 1, 1));
    // A removal hint keeps a page that still reads the store.
    d.page_removed(va, 2 * PAGE_SIZE as u64);
    assert_eq!(d.stats().mapped_pages, 1);
    assert_eq!(d.verify_store().unwrap(), 1);
}

#[test]
fn vma_count_matches_proc_maps() {
    let mut d = Domain::new("vmas", big_limits()).unwrap();
    let pages = 64;
    // Scattered: every other page of fresh content, then the rest.
    let a = FakeRam::filled(pages, |i| file_page(6, i));
    let va = register(&mut d, "scattered", &a);
    merge(&mut d, va, &reports(&a, 0, (0..pages).step_by(2)));
    assert_eq!(d.vmas(va), 64, "32 lone store pages split the RAM into 64 VMAs");
    assert_eq!(d.measured_vmas(va).unwrap(), 64);
    merge(&mut d, va, &reports(&a, 0, (1..pages).step_by(2)));
    assert_eq!(d.vmas(va), d.measured_vmas(va).unwrap());

    // Contiguous: one run of fresh content is one VMA, however it is batched.
    let b = FakeRam::filled(pages, |i| file_page(7, i));
    let vb = register(&mut d, "contiguous", &b);
    merge(&mut d, vb, &reports(&b, 0, 0..16));
    assert_eq!((d.vmas(vb), d.measured_vmas(vb).unwrap()), (2, 2));
    merge(&mut d, vb, &reports(&b, 0, 16..48));
    merge(&mut d, vb, &reports(&b, 0, 48..64));
    assert_eq!((d.vmas(vb), d.measured_vmas(vb).unwrap()), (1, 1));
    // A run merged backwards gets ascending slots for descending pages: no VMA joins.
    let e = FakeRam::filled(8, |i| file_page(12, i));
    let ve = register(&mut d, "backwards", &e);
    merge(&mut d, ve, &reports(&e, 0, (0..8).rev()));
    assert_eq!((d.vmas(ve), d.measured_vmas(ve).unwrap()), (8, 8));

    // Shuffled order, repeated contents, a duplicate of another VM: the model still agrees.
    let c = FakeRam::filled(pages, |i| if i % 5 == 0 { file_page(8, 0) } else { file_page(6, i) });
    let vc = register(&mut d, "mixed", &c);
    let mut order: Vec<usize> = (0..pages).collect();
    let mut x = 12345u64;
    for i in (1..pages).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    for chunk in order.chunks(7) {
        merge(&mut d, vc, &reports(&c, 0, chunk.iter().copied()));
        assert_eq!(d.vmas(vc), d.measured_vmas(vc).unwrap());
    }
    assert_eq!(d.stats().vmas as usize, d.vmas(va) + d.vmas(vb) + d.vmas(vc) + d.vmas(ve));
    d.verify_store().unwrap();
}

#[test]
fn vma_budget_refuses_merges_and_warns_once() {
    capture_logs();
    let limits = Limits { max_store_pages: 1 << 16, vma_budget: 10 };
    let mut d = Domain::new("tight-budget", limits).unwrap();
    let a = FakeRam::filled(64, |i| file_page(9, i));
    let va = register(&mut d, "a", &a);
    // Lone pages cost 2 VMAs each: 1 + 4 * 2 = 9, the fifth would make 11.
    let st = merge(&mut d, va, &reports(&a, 0, (0..40).step_by(4).map(|i| i + 1)));
    assert_eq!(&st[..4], [MergeStatus::Merged; 4]);
    assert!(st[4..].iter().all(|s| *s == MergeStatus::NoRoom), "{st:?}");
    assert_eq!(d.vmas(va), 9);
    assert_eq!(d.measured_vmas(va).unwrap(), 9);
    // Extending a run needs no new VMA: still merged at the limit.
    assert_eq!(merge(&mut d, va, &reports(&a, 0, [14, 15, 16])), [MergeStatus::Merged; 3]);
    assert_eq!((d.vmas(va), d.measured_vmas(va).unwrap()), (9, 9));
    assert_eq!(d.stats().rejected_no_room, 6);
    let warnings: Vec<String> = LOGS
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("dedup tight-budget") && l.contains("vm.max_map_count"))
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("WARN") && warnings[0].contains(&max_map_count().to_string()));
}

#[test]
fn store_limit_is_no_room() {
    let mut d = Domain::new("full", Limits { max_store_pages: 2, vma_budget: 100 }).unwrap();
    let a = FakeRam::filled(4, |i| file_page(10, i));
    let va = register(&mut d, "a", &a);
    let st = merge(&mut d, va, &reports(&a, 0, 0..4));
    assert_eq!(st, [MergeStatus::Merged, MergeStatus::Merged, MergeStatus::NoRoom, MergeStatus::NoRoom]);
}
