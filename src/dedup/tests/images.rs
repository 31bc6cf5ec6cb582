//! Read-only images shared page by page: mapped over guest pages, counted like merged pages,
//! merged by their content when reported (the store's copy then backs every copy of the
//! content, whichever file it came from), and given up on two looks once written.

use std::io::Write;
use std::os::fd::AsRawFd;

use super::*;

/// An image file whose page `i` is `file_page(seed, i)`.
pub(super) fn image_file(pages: usize, seed: u64) -> vmm_sys_util::tempfile::TempFile {
    let tf = vmm_sys_util::tempfile::TempFile::new().unwrap();
    for i in 0..pages {
        tf.as_file().write_all(&file_page(seed, i)).unwrap();
    }
    tf
}

#[test]
fn image_pages_map_count_like_merged_pages_and_merge_by_content_when_reported() {
    const PAGES: usize = 16;
    let mut d = Domain::new("images", big_limits()).unwrap();
    let img = image_file(PAGES, 40);
    let rams: Vec<FakeRam> = (0..2).map(|_| FakeRam::new(PAGES)).collect();
    let vms: Vec<VmId> =
        rams.iter().enumerate().map(|(n, r)| register(&mut d, &format!("vm{n}"), r)).collect();
    let images: Vec<ImageId> = vms.iter().map(|vm| d.open_image(*vm, img.as_file()).unwrap()).collect();
    assert_ne!(images[0], images[1], "one id per open file");
    for (vm, image) in vms.iter().zip(&images) {
        // As a read of the whole image into the guest's pages would.
        assert_eq!(d.map_image(*vm, *image, img.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    }
    for (ram, vm) in rams.iter().zip(&vms) {
        assert!((0..PAGES).all(|i| ram.read_page(i) == file_page(40, i)));
        assert!((0..PAGES).all(|i| ram.state(i) == PageState::Store), "pages map the image's page cache");
        // One VMA for the run of image pages: the count agrees with the kernel.
        assert_eq!((d.vmas(*vm), d.measured_vmas(*vm).unwrap()), (1, 1));
    }
    let s = d.stats();
    assert_eq!((s.image_pages, s.image_mapped, s.store_pages), (2 * PAGES as u64, 2 * PAGES as u64, 0));

    // vm0 writes page 3 while it maps the image: its own copy; two looks later the page is no
    // longer booked to the image.
    rams[0].write_page(3, &file_page(41, 3));
    d.settle().unwrap();
    assert_eq!(d.stats().image_cow_breaks, 1);
    assert_eq!(rams[1].read_page(3), file_page(40, 3), "the other VM keeps the image's bytes");
    // The guests report their pages: merged by content into one store copy each.
    for (ram, vm) in rams.iter().zip(&vms) {
        assert!(merge(&mut d, *vm, &reports(ram, 0, 0..PAGES)).iter().all(|s| *s == MergeStatus::Merged));
    }
    let s = d.stats();
    // 16 pages of the image and vm0's own page 3; the first VM's pages hashed by the store,
    // the second's proven by a byte compare.
    assert_eq!((s.store_pages, s.image_pages, s.image_merged, s.host_hashes), (17, 0, 31, 17));
    assert!((0..PAGES).all(|i| rams[1].read_page(i) == file_page(40, i)));
    assert_eq!(rams[0].read_page(3), file_page(41, 3));
    assert!(d.vmas(vms[0]) >= d.measured_vmas(vms[0]).unwrap());
    // Reported again: settled without a hash.
    assert!(merge(&mut d, vms[1], &reports(&rams[1], 0, 0..PAGES))
        .iter()
        .all(|s| *s == MergeStatus::Already));
    d.verify_store().unwrap();
}

#[test]
fn separate_copies_of_one_image_end_up_in_one_host_copy() {
    const PAGES: usize = 16;
    let mut d = Domain::new("images-copies", big_limits()).unwrap();
    // Three VMs: two read their own copy of the image, the third the first one's file.
    let copies = [image_file(PAGES, 48), image_file(PAGES, 48)];
    let rams: Vec<FakeRam> = (0..3).map(|_| FakeRam::new(PAGES)).collect();
    let vms: Vec<VmId> =
        rams.iter().enumerate().map(|(n, r)| register(&mut d, &format!("vm{n}"), r)).collect();
    let files = [&copies[0], &copies[1], &copies[0]];
    for (vm, file) in vms.iter().zip(files) {
        let image = d.open_image(*vm, file.as_file()).unwrap();
        assert_eq!(d.map_image(*vm, image, file.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    }
    // Reported without a hash (the host hashes): each page of each file is hashed once.
    let gpas: Vec<u64> = (0..PAGES).map(|i| (i * PAGE_SIZE) as u64).collect();
    for vm in &vms {
        let mut st = vec![MergeStatus::NoRoom; PAGES];
        d.merge(*vm, &unhashed(&gpas), &mut st);
        assert!(st.iter().all(|s| *s == MergeStatus::Merged), "{st:?}");
    }
    let s = d.stats();
    println!(
        "3 VMs, 2 copies of a {PAGES}-page image: store {} pages, {} merged from images, {} hashed, {} hashes \
         of the same file's pages not computed again",
        s.store_pages, s.image_merged, s.host_hashes_for_guests, s.image_hashes_remembered
    );
    assert_eq!((s.store_pages, s.image_merged, s.image_pages), (PAGES as u64, 3 * PAGES as u64, 0));
    assert_eq!((s.host_hashes_for_guests, s.image_hashes_remembered), (2 * PAGES as u64, PAGES as u64));
    for ram in &rams {
        assert!((0..PAGES).all(|i| ram.read_page(i) == file_page(48, i)));
        assert!((0..PAGES).all(|i| ram.state(i) == PageState::Store), "pages map the store");
    }
    d.verify_store().unwrap();
}

#[test]
fn an_image_page_read_over_a_merged_page_releases_its_slot() {
    let mut d = Domain::new("images-over-merged", big_limits()).unwrap();
    let img = image_file(4, 42);
    let ram = FakeRam::filled(4, |i| file_page(43, i));
    let vm = register(&mut d, "vm", &ram);
    let image = d.open_image(vm, img.as_file()).unwrap();
    merge(&mut d, vm, &reports(&ram, 0, 0..4));
    assert_eq!(d.stats().store_pages, 4);
    // The guest reads the image into pages 1 and 2 (their old bytes are gone, as on real I/O).
    assert_eq!(d.map_image(vm, image, img.as_file().as_raw_fd(), PAGE_SIZE as u64, PAGE_SIZE as u64, 2), 2);
    let s = d.stats();
    assert_eq!((s.store_pages, s.mapped_pages, s.image_pages), (2, 2, 2));
    assert_eq!(ram.read_page(1), file_page(42, 1));
    assert_eq!(ram.read_page(0), file_page(43, 0));
    d.verify_store().unwrap();
}

#[test]
fn image_pages_respect_the_vma_budget_and_alignment() {
    let limits = Limits { max_store_pages: 64, vma_budget: 3 };
    let mut d = Domain::new("images-budget", limits).unwrap();
    let img = image_file(8, 44);
    let ram = FakeRam::new(16);
    let vm = register(&mut d, "vm", &ram);
    let image = d.open_image(vm, img.as_file()).unwrap();
    let fd = img.as_file().as_raw_fd();
    // Unaligned image offset or guest address: nothing mapped (the device copies).
    assert_eq!(d.map_image(vm, image, fd, 0, 100, 1), 0);
    assert_eq!(d.map_image(vm, image, fd, 100, 0, 1), 0);
    // A run in the middle of the RAM costs 2 VMAs (3 in all): fits.
    assert_eq!(d.map_image(vm, image, fd, 4 * PAGE_SIZE as u64, 0, 2), 2);
    // Another, apart from it, would cost 2 more: refused.
    assert_eq!(d.map_image(vm, image, fd, 10 * PAGE_SIZE as u64, 0, 1), 0);
    assert_eq!(d.stats().image_no_room, 1);
    // Continuing the first run costs nothing more: mapped.
    assert_eq!(d.map_image(vm, image, fd, 6 * PAGE_SIZE as u64, 2 * PAGE_SIZE as u64, 1), 1);
    assert_eq!((d.vmas(vm), d.measured_vmas(vm).unwrap()), (3, 3));
}

#[test]
fn one_image_file_opened_twice_and_read_alternately_costs_a_vma_per_page() {
    const PAGES: usize = 8;
    let mut d = Domain::new("images-twice", big_limits()).unwrap();
    let img = image_file(PAGES, 45);
    // Two descriptors of one file, as `--disk img,ro --disk img,ro` opens it: two images.
    let files = [std::fs::File::open(img.as_path()).unwrap(), std::fs::File::open(img.as_path()).unwrap()];
    let ram = FakeRam::new(PAGES + 2);
    let vm = register(&mut d, "vm", &ram);
    let ids = [d.open_image(vm, &files[0]).unwrap(), d.open_image(vm, &files[1]).unwrap()];
    // Guest page 1 + i gets page i of the file, from the two descriptors in turn.
    for i in 0..PAGES {
        let (id, fd) = (ids[i % 2], files[i % 2].as_raw_fd());
        let at = (PAGE_SIZE * (1 + i)) as u64;
        assert_eq!(d.map_image(vm, id, fd, at, (PAGE_SIZE * i) as u64, 1), 1);
    }
    assert!((0..PAGES).all(|i| ram.read_page(1 + i) == file_page(45, i)));
    // A VMA per page (the kernel never joins two open files), an anonymous one on each side.
    let (counted, kernel) = (d.vmas(vm), d.measured_vmas(vm).unwrap());
    assert_eq!(kernel, PAGES + 2);
    assert!(counted >= kernel, "counted {counted}, the kernel has {kernel}");
}

#[test]
fn an_unshared_image_leaves_its_pages_in_guest_memory_and_is_copied_since() {
    const PAGES: usize = 8;
    let mut d = Domain::new("images-unshare", big_limits()).unwrap();
    let img = image_file(PAGES, 46);
    let fd = img.as_file().as_raw_fd();
    let ram = FakeRam::new(PAGES + 4);
    let vm = register(&mut d, "vm", &ram);
    let image = d.open_image(vm, img.as_file()).unwrap();
    // Guest pages 1..7 read image pages 0..6; page 10 reads page 7 (two runs).
    assert_eq!(d.map_image(vm, image, fd, PAGE_SIZE as u64, 0, PAGES - 1), PAGES - 1);
    assert_eq!(d.map_image(vm, image, fd, 10 * PAGE_SIZE as u64, (PAGE_SIZE * (PAGES - 1)) as u64, 1), 1);
    // The guest writes page 3: its own copy, inside the file's mapping (booked as such after
    // two looks, but still moved: truncating the file would take the copy away too).
    ram.write_page(3, &file_page(47, 3));
    d.settle().unwrap();
    assert_eq!(d.stats().image_pages, PAGES as u64 - 1);

    assert_eq!(d.unshare_image(vm, image).unwrap(), PAGES);
    // The file changes: the guest sees none of it, and the pages are anonymous memory.
    img.as_file().set_len(0).unwrap();
    let expected = |page: usize| match page {
        3 => file_page(47, 3),
        1..=7 => file_page(46, page - 1),
        10 => file_page(46, PAGES - 1),
        _ => [0; PAGE_SIZE],
    };
    assert!((0..PAGES + 4).all(|p| ram.read_page(p) == expected(p)));
    assert!([1, 2, 3, 4, 5, 6, 7, 10].iter().all(|&p| ram.state(p) == PageState::Copied), "anonymous pages");
    let s = d.stats();
    assert_eq!(
        (s.image_pages, s.images_unshared, s.image_unshared_pages, s.vma_undercount_max),
        (0, 1, 8, 0)
    );
    assert_eq!((d.vmas(vm), d.measured_vmas(vm).unwrap()), (1, 1), "one anonymous VMA again");
    // Later reads of the image are copied.
    assert_eq!(d.map_image(vm, image, fd, 0, 0, 1), 0);
}

#[test]
fn a_kernel_files_pages_count_apart_from_disk_images_and_their_copies_too() {
    const PAGES: usize = 8;
    let mut d = Domain::new("kernel", big_limits()).unwrap();
    let (kernel, disk) = (image_file(PAGES, 60), image_file(PAGES, 61));
    let ram = FakeRam::new(2 * PAGES);
    let vm = register(&mut d, "vm0", &ram);
    let k = d.open_kernel_image(vm, kernel.as_file()).unwrap();
    let i = d.open_image(vm, disk.as_file()).unwrap();
    assert_eq!(d.map_image(vm, k, kernel.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    let second_half = (PAGES * PAGE_SIZE) as u64;
    assert_eq!(d.map_image(vm, i, disk.as_file().as_raw_fd(), second_half, 0, PAGES), PAGES);
    assert!((0..PAGES).all(|p| ram.read_page(p) == file_page(60, p)));
    let s = d.stats();
    assert_eq!((s.kernel_pages, s.kernel_mapped, s.image_pages, s.image_mapped), (8, 8, 8, 8));
    // Two VMAs, one per file: the count agrees with the kernel's.
    assert_eq!((d.vmas(vm), d.measured_vmas(vm).unwrap()), (2, 2));
    // The guest patches one kernel page and writes one disk page: each a copy of its own,
    // counted where it came from.
    ram.write_page(2, &file_page(62, 2));
    ram.write_page(PAGES + 5, &file_page(63, 5));
    d.settle().unwrap();
    let s = d.stats();
    assert_eq!((s.kernel_cow_breaks, s.image_cow_breaks), (1, 1));
    assert_eq!((s.kernel_pages, s.image_pages), (7, 7));
    // The kernel file changes: the pages of its VMA (the patched copy too, which a truncation
    // would take away) move into the guest's own memory, which keeps their bytes.
    assert_eq!(d.unshare_image(vm, k).unwrap(), PAGES);
    let s = d.stats();
    assert_eq!((s.kernel_pages, s.image_pages, s.image_unshared_pages), (0, 7, 8));
    assert!((0..PAGES).filter(|&p| p != 2).all(|p| ram.read_page(p) == file_page(60, p)));
    assert_eq!(ram.read_page(2), file_page(62, 2));
    assert!(d.vmas(vm) >= d.measured_vmas(vm).unwrap());
}

#[test]
fn kernel_pages_patched_alike_in_two_vms_merge_into_one_store_page() {
    const PAGES: usize = 4;
    let mut d = Domain::new("kernel-patched", big_limits()).unwrap();
    let kernel = image_file(PAGES, 70);
    let rams: Vec<FakeRam> = (0..2).map(|_| FakeRam::new(PAGES)).collect();
    let vms: Vec<VmId> =
        rams.iter().enumerate().map(|(n, r)| register(&mut d, &format!("vm{n}"), r)).collect();
    for vm in &vms {
        let k = d.open_kernel_image(*vm, kernel.as_file()).unwrap();
        assert_eq!(d.map_image(*vm, k, kernel.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    }
    // Both guests patch page 1 the same way; vm1 also writes page 3 its own way.
    for ram in &rams {
        ram.write_page(1, &file_page(71, 1));
    }
    rams[1].write_page(3, &file_page(72, 3));
    d.settle().unwrap();
    assert_eq!((d.unreported_pages_waiting(vms[0]), d.unreported_pages_waiting(vms[1])), (1, 2));
    assert_eq!(d.merge_unreported_pages(vms[0]), 1);
    assert_eq!(d.merge_unreported_pages(vms[1]), 2);
    assert_eq!(d.unreported_pages_waiting(vms[1]), 0, "each written page is merged once");
    let s = d.stats();
    // The patched page once for both VMs, vm1's own page 3 once; the rest still the file's.
    assert_eq!((s.store_pages, s.mapped_pages, s.kernel_copies_merged, s.kernel_pages), (2, 3, 3, 5));
    assert_eq!((s.bytes_saved, s.kernel_cow_breaks), (PAGE_SIZE as u64, 3));
    for ram in &rams {
        assert_eq!(ram.read_page(1), file_page(71, 1));
        assert_eq!(ram.state(1), PageState::Store);
        assert_eq!(ram.read_page(0), file_page(70, 0));
    }
    assert_eq!(rams[1].read_page(3), file_page(72, 3));
    assert_eq!(rams[0].read_page(3), file_page(70, 3));
    for vm in &vms {
        assert!(d.vmas(*vm) >= d.measured_vmas(*vm).unwrap());
    }
    d.verify_store().unwrap();
}

#[test]
fn image_pages_left_alone_in_a_block_merged_by_content_merge_too() {
    // Two page-cache blocks of 2 MiB: the guest reports block 0 but two pages, none of block 1.
    const BLOCK: usize = 512;
    const PAGES: usize = 2 * BLOCK;
    let mut d = Domain::new("stragglers", big_limits()).unwrap();
    let img = image_file(PAGES, 80);
    let ram = FakeRam::new(PAGES);
    let vm = register(&mut d, "vm0", &ram);
    let image = d.open_image(vm, img.as_file()).unwrap();
    assert_eq!(d.map_image(vm, image, img.as_file().as_raw_fd(), 0, 0, PAGES), PAGES);
    let left = [7usize, 300];
    let gpas: Vec<u64> = (0..BLOCK).filter(|p| !left.contains(p)).map(|p| (p * PAGE_SIZE) as u64).collect();
    let mut st = vec![MergeStatus::NoRoom; gpas.len()];
    d.merge(vm, &unhashed(&gpas), &mut st);
    assert!(st.iter().all(|s| *s == MergeStatus::Merged), "{st:?}");
    assert_eq!(d.unreported_pages_waiting(vm), 0, "found by the refresh, not by the merge");
    d.refresh_vm(vm).unwrap();
    assert_eq!(d.unreported_pages_waiting(vm), 0, "the guest may still be reporting block 0");
    d.refresh_vm(vm).unwrap();
    assert_eq!(d.unreported_pages_waiting(vm), 2, "the two pages left in block 0, quiet since");
    // The guest writes one of them before they merge: its own page now, not merged unreported.
    ram.write_page(300, &file_page(81, 300));
    assert_eq!(d.merge_unreported_pages(vm), 1);
    let s = d.stats();
    assert_eq!((s.image_stragglers_merged, s.image_pages, s.image_cow_breaks), (1, BLOCK as u64, 1));
    assert_eq!((ram.read_page(7), ram.state(7)), (file_page(80, 7), PageState::Store));
    assert_eq!(ram.read_page(300), file_page(81, 300));
    assert!((BLOCK..PAGES).all(|p| ram.read_page(p) == file_page(80, p)), "block 1 still maps the image");
    d.refresh_vm(vm).unwrap();
    assert_eq!(d.unreported_pages_waiting(vm), 0, "nothing merged since: nothing more to find");
    assert!(d.vmas(vm) >= d.measured_vmas(vm).unwrap());
    d.verify_store().unwrap();
}
