//! Pages given back (a balloon's): they read zeros afterwards whatever they mapped, their
//! references drop, and what other VMs map stays.

use std::io::Write;
use std::os::fd::AsRawFd;

use super::*;

#[test]
fn pages_given_back_read_zeros_whatever_they_mapped_and_others_keep_theirs() {
    const PAGES: usize = 16;
    let mut d = Domain::new("discard", big_limits()).unwrap();
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    for i in 0..4 {
        image.as_file().write_all(&file_page(52, i)).unwrap();
    }
    let a = FakeRam::filled(PAGES, |i| file_page(50, i));
    let b = FakeRam::filled(PAGES, |i| file_page(50, i));
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    // Pages 0..8 merged in both VMs; a's page 2 then written (its own copy inside the store's
    // mapping); a's pages 10..14 map an image; the rest are a's own anonymous pages.
    for (ram, vm) in [(&a, va), (&b, vb)] {
        assert!(merge(&mut d, vm, &reports(ram, 0, 0..8)).iter().all(|s| *s == MergeStatus::Merged));
    }
    a.write_page(2, &file_page(51, 2));
    let img = d.open_image(va, image.as_file()).unwrap();
    assert_eq!(d.map_image(va, img, image.as_file().as_raw_fd(), 10 * PAGE_SIZE as u64, 0, 4), 4);
    assert_eq!(d.stats().store_pages, 8);

    // a gives back every page but page 15 (and a range past its RAM, ignored).
    let given = d.discard(va, &[(0, 15 * PAGE_SIZE as u64), (1 << 40, PAGE_SIZE as u64)]).unwrap();
    assert_eq!(given, 15);
    assert!((0..15).all(|i| a.read_page(i) == [0u8; PAGE_SIZE]), "given-back pages read zeros");
    assert_eq!(a.read_page(15), file_page(50, 15), "the page not given back keeps its bytes");
    assert!((0..PAGES).all(|i| b.read_page(i) == file_page(50, i)), "the other VM keeps its pages");
    let s = d.stats();
    assert_eq!((s.discarded, s.image_pages, s.mapped_pages), (15, 0, 8), "{s:?}");
    assert!(s.discarded_remapped >= 12, "{s:?}");
    // The slots are b's alone now; a's RAM is anonymous again, and the count agrees.
    d.verify_store().unwrap();
    assert!(d.vmas(va) >= d.measured_vmas(va).unwrap());
    // a writes a given-back page: its own memory, nobody else's.
    a.write_page(3, &file_page(53, 3));
    assert_eq!(b.read_page(3), file_page(50, 3));
    d.settle().unwrap();
    assert_eq!(d.stats().store_pages, 8);
}

/// A kernel page the guest patched waits to be merged with the other VMs' copies
/// (`merge_unreported_pages`); given back before that, it is the guest's free memory, not
/// kernel text: it must not be merged, nor counted as a kernel copy, later.
#[test]
fn a_written_kernel_page_given_back_is_not_merged_as_a_kernel_copy_later() {
    const PAGES: usize = 4;
    let mut d = Domain::new("discard-kernel", big_limits()).unwrap();
    let kernel = super::images::image_file(PAGES, 80);
    let ram = FakeRam::new(PAGES);
    let vm = register(&mut d, "vm0", &ram);
    let k = d.open_kernel_image(vm, kernel.as_file()).unwrap();
    assert_eq!(d.map_image(vm, k, kernel.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    // The guest patches pages 1 and 3; then gives page 1 back (free page reporting).
    ram.write_page(1, &file_page(81, 1));
    ram.write_page(3, &file_page(81, 3));
    d.settle().unwrap();
    assert_eq!(d.unreported_pages_waiting(vm), 2);
    assert_eq!(d.discard(vm, &[(PAGE_SIZE as u64, PAGE_SIZE as u64)]).unwrap(), 1);
    assert_eq!(ram.read_page(1), [0u8; PAGE_SIZE]);
    assert_eq!(d.unreported_pages_waiting(vm), 1, "the page given back is no written kernel page");
    assert_eq!(d.merge_unreported_pages(vm), 1);
    let s = d.stats();
    assert_eq!((s.kernel_copies_merged, s.store_pages, s.mapped_pages), (1, 1, 1), "{s:?}");
    assert_eq!(ram.read_page(1), [0u8; PAGE_SIZE]);
    assert_eq!(ram.read_page(3), file_page(81, 3));
    d.verify_store().unwrap();
}
