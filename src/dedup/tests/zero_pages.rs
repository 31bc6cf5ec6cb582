//! Sweeps for pages of zeros: only the VM's own written pages of zeros are given back (never a
//! merged or image page, nor a copy of zeros the guest wrote over one, a page never written or a
//! restored VM's RAM), they read zeros
//! afterwards, a page written between the sweep and the give-back keeps its bytes, and a sweep
//! goes a slice at a time.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::*;
use crate::dedup::zero_sweep::{FIRST_SWEEP_AFTER, SWEEP_SLICE_PAGES};

/// A time at which a VM registered now is due its first sweep.
fn due() -> Instant {
    Instant::now() + FIRST_SWEEP_AFTER + Duration::from_millis(1)
}

#[test]
fn the_vms_own_pages_of_zeros_are_given_back_and_read_zeros_and_nothing_else_is_touched() {
    const PAGES: usize = 48;
    let mut d = Domain::new("zeros", big_limits()).unwrap();
    let image = super::images::image_file(4, 90);
    let zeros = [0u8; PAGE_SIZE];
    let mut last_word = [0u8; PAGE_SIZE];
    last_word[PAGE_SIZE - 1] = 1;
    // Pages 0..8 hold data (merged below); 8..24 zeros the guest wrote; 24 zeros but for its
    // last byte; 25..32 never written; 32..34 zeros, merged (a store slot of zeros); 34..38 map
    // an image; 38..48 data.
    let a = FakeRam::new(PAGES);
    let b = FakeRam::new(PAGES);
    for ram in [&a, &b] {
        for i in (0..8).chain(38..PAGES) {
            ram.write_page(i, &file_page(91, i));
        }
        for i in (8..24).chain(32..34) {
            ram.write_page(i, &zeros);
        }
        ram.write_page(24, &last_word);
    }
    let (va, vb) = (register(&mut d, "a", &a), register(&mut d, "b", &b));
    let merged = merge(&mut d, va, &reports(&a, 0, (0..8).chain(32..34)));
    assert!(merged.iter().all(|s| *s == MergeStatus::Merged), "{merged:?}");
    let img = d.open_image(va, image.as_file()).unwrap();
    assert_eq!(d.map_image(va, img, image.as_file().as_raw_fd(), 34 * PAGE_SIZE as u64, 0, 4), 4);
    // The guest writes zeros over merged page 33 and image page 35: private copies of zeros, but
    // inside mappings of the store and the image; dropped, they would read those files again.
    a.write_page(33, &zeros);
    a.write_page(35, &zeros);
    assert_eq!((a.state(33), a.state(35)), (PageState::Copied, PageState::Copied));

    // Not due yet: nothing read.
    assert_eq!(d.sweep_zero_pages(va).unwrap(), 0);
    assert_eq!(d.stats().zero_pages_checked, 0);
    // Due: one slice sweeps the whole VM. Read: the written pages neither merged nor image
    // pages (8..25 and 38..48); found: 8..24.
    assert_eq!(d.sweep_zero_pages_at(va, due()).unwrap(), 16);
    let s = d.stats();
    assert_eq!((s.zero_pages_checked, s.zero_sweeps, s.zero_pages_given_back), (17 + 10, 1, 0), "{s:?}");

    // The guest writes page 10 before the give-back: it keeps its bytes.
    a.write_page(10, &file_page(92, 10));
    assert_eq!(d.give_back_zero_pages(va).unwrap(), 15);
    assert_eq!(d.stats().zero_pages_given_back, 15);
    for i in 0..PAGES {
        let want = match i {
            10 => file_page(92, 10),
            0..8 | 38..PAGES => file_page(91, i),
            24 => last_word,
            34 | 36 | 37 => image_page_bytes(&image, i - 34),
            _ => zeros,
        };
        assert!(a.read_page(i) == want, "page {i}");
    }
    // Given back: no memory until written (reading maps the host's zero page).
    let pm = Pagemap::open().unwrap();
    for i in (8..24).filter(|&i| i != 10) {
        let entry = pm.entries(a.host(i), 1).unwrap()[0];
        assert_eq!(entry & crate::pagemap_entry::PM_EXCLUSIVE, 0, "page {i} holds no page of its own");
    }
    // Merged and image pages still map their files (33 and 35 keep their copies); the other VM
    // was not swept (not due).
    assert!((0..8).chain([32, 34, 36, 37]).all(|i| a.state(i) == PageState::Store));
    assert_eq!((a.state(33), a.state(35)), (PageState::Copied, PageState::Copied));
    assert_eq!(d.stats().mapped_pages, 10);
    assert!((8..24).all(|i| b.read_page(i) == zeros) && b.state(8) == PageState::Copied);
    // Written again, a page given back is the guest's own page, with its bytes.
    a.write_page(12, &file_page(93, 12));
    assert_eq!(a.read_page(12), file_page(93, 12));
    assert_eq!(a.state(12), PageState::Copied);
    // Nothing waits now; the next sweep is not due yet.
    assert_eq!(d.give_back_zero_pages(va).unwrap(), 0);
    assert_eq!(d.sweep_zero_pages_at(va, due()).unwrap(), 0);
    d.verify_store().unwrap();
    let _ = vb;
}

fn image_page_bytes(image: &vmm_sys_util::tempfile::TempFile, page: usize) -> [u8; PAGE_SIZE] {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; PAGE_SIZE];
    image.as_file().read_exact_at(&mut buf, (page * PAGE_SIZE) as u64).unwrap();
    buf
}

#[test]
fn a_sweep_goes_a_slice_at_a_time_and_finds_pages_in_every_slice() {
    let pages = 2 * SWEEP_SLICE_PAGES + 100;
    let mut d = Domain::new("zeros-slices", big_limits()).unwrap();
    let ram = FakeRam::new(pages);
    let written = [5, SWEEP_SLICE_PAGES + 7, 2 * SWEEP_SLICE_PAGES + 99];
    for &i in &written {
        ram.write_page(i, &[0u8; PAGE_SIZE]);
    }
    ram.write_page(6, &file_page(94, 6));
    let vm = register(&mut d, "vm", &ram);
    let at = due();
    let waiting: Vec<usize> = (0..4).map(|_| d.sweep_zero_pages_at(vm, at).unwrap()).collect();
    assert_eq!(waiting, [1, 2, 3, 3], "one found per slice, then the sweep is over");
    let s = d.stats();
    assert_eq!((s.zero_pages_checked, s.zero_sweeps), (4, 1), "{s:?}");
    assert_eq!(d.give_back_zero_pages(vm).unwrap(), 3);
    assert!(written.iter().all(|&i| ram.read_page(i) == [0u8; PAGE_SIZE]));
    assert_eq!(ram.read_page(6), file_page(94, 6));
}

#[test]
fn a_restored_vms_ram_is_not_swept() {
    let mut d = Domain::new("zeros-snapshot", big_limits()).unwrap();
    let ram = FakeRam::new(8);
    ram.write_page(1, &[0u8; PAGE_SIZE]);
    let region = RamRegion { maps_snapshot: true, ..ram.region(0) };
    // SAFETY: as in `register`.
    let vm = unsafe { d.register_vm("restored", vec![region]) };
    assert_eq!(d.sweep_zero_pages_at(vm, due()).unwrap(), 0);
    let s = d.stats();
    assert_eq!((s.zero_pages_checked, s.zero_sweeps), (0, 1), "{s:?}");
    assert_eq!(ram.state(1), PageState::Copied);
}
