//! What a hostile guest can make the engine do: claim stored hashes for other bytes, and
//! drive the process towards `vm.max_map_count` with the layout the VMA count found hardest
//! (two copy-on-written neighbours of one freed slot).

use std::process::Command;
use std::time::Instant;

use super::*;

#[test]
fn hits_cost_no_host_hash_and_a_stored_hash_for_other_bytes_is_a_mismatch() {
    const PAGES: usize = 64;
    let mut d = Domain::new("hits", big_limits()).unwrap();
    let rams: Vec<FakeRam> = (0..3).map(|_| FakeRam::filled(PAGES, |i| file_page(20, i))).collect();
    let vms: Vec<VmId> =
        rams.iter().enumerate().map(|(n, r)| register(&mut d, &format!("vm{n}"), r)).collect();
    for (ram, vm) in rams.iter().zip(&vms) {
        assert!(merge(&mut d, *vm, &reports(ram, 0, 0..PAGES)).iter().all(|s| *s == MergeStatus::Merged));
    }
    let s = d.stats();
    // Only the first copies were hashed; the duplicates were proven by a byte compare.
    assert_eq!((s.verified, s.host_hashes, s.merged), (3 * PAGES as u64, PAGES as u64, 3 * PAGES as u64));

    // A liar names a stored hash for a page with other bytes: the compare refuses it.
    let liar = FakeRam::filled(1, |_| file_page(21, 0));
    let vl = register(&mut d, "liar", &liar);
    let stolen = hash(&file_page(20, 5));
    assert_eq!(merge(&mut d, vl, &[(0, stolen)]), [MergeStatus::Mismatch]);
    assert_eq!(liar.state(0), PageState::Copied, "nothing mapped");
    assert_eq!(liar.read_page(0), file_page(21, 0));
    assert_eq!(d.stats().host_hashes, PAGES as u64, "a refused hit costs no hash either");
    d.verify_store().unwrap();
}

#[test]
fn pages_reported_without_a_hash_are_hashed_by_the_host_and_merge_alike() {
    const PAGES: usize = 32;
    let mut d = Domain::new("host-hash", big_limits()).unwrap();
    let a = FakeRam::filled(PAGES, |i| file_page(30, i));
    let b = FakeRam::filled(PAGES, |i| file_page(30, i));
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    let gpas: Vec<u64> = (0..PAGES).map(|i| (i * PAGE_SIZE) as u64).collect();
    let mut st = vec![MergeStatus::NoRoom; PAGES];
    d.merge(va, &unhashed(&gpas), &mut st);
    assert!(st.iter().all(|s| *s == MergeStatus::Merged), "{st:?}");
    d.merge(vb, &unhashed(&gpas), &mut st);
    assert!(st.iter().all(|s| *s == MergeStatus::Merged), "{st:?}");
    // Reported again: the unchanged page still reads its slot, which settles it unhashed.
    d.merge(vb, &unhashed(&gpas[..1]), &mut st[..1]);
    assert_eq!(st[0], MergeStatus::Already);
    let s = d.stats();
    // Every first report was hashed once, by the VMM; the in-process store trusts those hashes.
    assert_eq!((s.host_hashes_for_guests, s.host_hashes, s.store_pages), (2 * PAGES as u64, 0, PAGES as u64));
    // A page written since (its own copy now) is hashed again and merges with its new bytes.
    b.write_page(1, &file_page(31, 1));
    d.merge(vb, &unhashed(&gpas[1..2]), &mut st[..1]);
    assert_eq!(st[0], MergeStatus::Merged);
    let s = d.stats();
    assert_eq!(
        (s.host_hashes_for_guests, s.store_pages, s.cow_breaks),
        (2 * PAGES as u64 + 1, PAGES as u64 + 1, 1)
    );
    assert_eq!(b.read_page(1), file_page(31, 1));
    assert_eq!(a.read_page(1), file_page(30, 1));
    assert_eq!(b.read_page(3), file_page(30, 3));
    d.verify_store().unwrap();
}

#[test]
fn a_page_copied_on_write_keeps_its_slot_until_a_second_look() {
    let mut d = Domain::new("two-looks", big_limits()).unwrap();
    let a = FakeRam::filled(4, |i| file_page(22, i));
    let va = register(&mut d, "a", &a);
    merge(&mut d, va, &reports(&a, 0, 0..4));
    a.write_page(1, &file_page(23, 1));
    // A first look, then a look too soon: the reference stays.
    assert_eq!(d.refresh().unwrap(), RefreshReport { suspects: 1, ..Default::default() });
    assert_eq!(d.refresh().unwrap(), RefreshReport::default());
    assert_eq!(d.stats().store_pages, 4);
    // The guest reports the page again (new bytes) before the second look: it merges again,
    // and the old slot goes at once, since the page's bytes prove it a copy.
    assert_eq!(merge(&mut d, va, &reports(&a, 0, [1])), [MergeStatus::Merged]);
    std::thread::sleep(SECOND_LOOK_AFTER);
    assert_eq!(d.refresh().unwrap(), RefreshReport::default());
    let s = d.stats();
    assert_eq!((s.store_pages, s.cow_breaks, s.mapped_pages), (4, 1, 4));
    assert_eq!(a.read_page(1), file_page(23, 1));
    d.verify_store().unwrap();
    // A removal hint for a copied page is a first look; a refresh later confirms it.
    a.write_page(2, &file_page(24, 2));
    d.page_removed(va, 2 * PAGE_SIZE as u64);
    std::thread::sleep(SECOND_LOOK_AFTER);
    assert_eq!(d.refresh().unwrap(), RefreshReport { cow_breaks: 1, slots_freed: 1, ..Default::default() });
    d.verify_store().unwrap();
}

/// Set in the child process that runs the VMA adversary (it maps tens of thousands of VMAs,
/// which other tests in the same process must not feel).
const ADVERSARY_CHILD: &str = "SAMEPAGE_VMA_ADVERSARY_CHILD";

#[test]
fn a_guest_cannot_drive_the_process_past_max_map_count() {
    if std::env::var_os(ADVERSARY_CHILD).is_none() {
        let exe = std::env::current_exe().expect("test binary");
        let out = Command::new(exe)
            .args(["--exact", "dedup::tests::adversary::a_guest_cannot_drive_the_process_past_max_map_count"])
            .args(["--nocapture", "--test-threads=1"])
            .env(ADVERSARY_CHILD, "1")
            .output()
            .expect("run the adversary in a child process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the adversary's process failed");
        assert!(stdout.contains("vma adversary: ok"), "the child ran no adversary");
        return;
    }
    vma_adversary();
}

/// One round, as a guest can play it: report pages L, X, R (X a spare page elsewhere; they
/// get consecutive slots), write all three, say X left the page cache; once X's slot is
/// freed, report the page M between L and R: it takes X's slot, which continues both L's and
/// R's. The kernel cannot join L, M and R (L and R were copied on write separately); a count
/// that assumed it would fall one VMA short per round.
fn vma_adversary() {
    const BLOCK: usize = 4096;
    let limits = Limits::default();
    let max = max_map_count();
    let mut d = Domain::new("vma-adversary", limits).unwrap();
    // Enough rounds to exhaust any budget below 2 VMAs a round of this RAM.
    let rounds = limits.vma_budget.div_ceil(2) + 2 * BLOCK;
    let main = FakeRam::new(3 * rounds);
    let spare = FakeRam::new(rounds);
    let (vm_main, vm_spare) = (0u64, (1u64 << 40));
    // SAFETY: as in `register`: both mappings outlive the domain's use of them.
    let vm = unsafe { d.register_vm("adversary", vec![main.region(vm_main), spare.region(vm_spare)]) };
    let gpa = |base: u64, page: usize| base + (page * PAGE_SIZE) as u64;
    let start = Instant::now();
    let (mut merged_m, mut refused_m) = (0usize, 0usize);
    let mut seed = 1000u64;
    let mut l_seeds = vec![0u64; rounds];
    for block in (0..rounds).collect::<Vec<_>>().chunks(BLOCK) {
        for &k in block {
            let (l, r) = (3 * k, 3 * k + 2);
            seed += 1;
            l_seeds[k] = seed;
            main.write_page(l, &file_page(seed, 0));
            main.write_page(r, &file_page(seed, 2));
            spare.write_page(k, &file_page(seed, 1));
            let batch = [
                (gpa(vm_main, l), hash(&main.read_page(l))),
                (gpa(vm_spare, k), hash(&spare.read_page(k))),
                (gpa(vm_main, r), hash(&main.read_page(r))),
            ];
            merge(&mut d, vm, &batch);
            for (ram, page) in [(&main, l), (&main, r), (&spare, k)] {
                ram.write_page(page, &file_page(seed, 7));
            }
            d.page_removed(vm, gpa(vm_spare, k));
        }
        std::thread::sleep(SECOND_LOOK_AFTER);
        d.refresh().unwrap();
        for &k in block {
            let m = 3 * k + 1;
            seed += 1;
            main.write_page(m, &file_page(seed, 1));
            match merge(&mut d, vm, &[(gpa(vm_main, m), hash(&main.read_page(m)))])[0] {
                MergeStatus::Merged => merged_m += 1,
                _ => refused_m += 1,
            }
        }
        let (counts, total) = vma::maps_overlapping(&[]).expect("maps");
        debug_assert!(counts.is_empty());
        assert!(total + VMA_RESERVE <= max, "process at {total} VMAs of vm.max_map_count {max}");
        if refused_m >= BLOCK {
            break;
        }
    }
    let counted = d.stats().vmas;
    let kernel = d.measured_vmas(vm).unwrap();
    let (_, total) = vma::maps_overlapping(&[]).expect("maps");
    d.reconcile_vmas();
    let s = d.stats();
    println!(
        "vma adversary: {} middle pages merged, {refused_m} refused at the budget, in {:.1} s; VMAs \
         counted {counted}, kernel {kernel} (guest RAM), process {total} of vm.max_map_count {max}; \
         undercount {}",
        merged_m,
        start.elapsed().as_secs_f64(),
        s.vma_undercount_max
    );
    assert!(refused_m > 0, "the adversary never reached the budget");
    assert!(counted as usize >= kernel, "the count fell below the kernel's");
    assert_eq!(s.vma_undercount_max, 0);
    assert!(total + VMA_RESERVE <= max);
    // The process can still start a thread and map memory.
    let t = std::thread::spawn(|| vec![1u8; 64 << 20].iter().map(|b| *b as u64).sum::<u64>());
    assert_eq!(t.join().expect("a thread after the adversary"), 64 << 20);
    for k in (0..rounds).step_by(997) {
        if l_seeds[k] != 0 {
            assert_eq!(main.read_page(3 * k), file_page(l_seeds[k], 7), "a page changed");
        }
    }
    d.unregister_vm(vm);
    println!("vma adversary: ok");
}
