//! `testguest.mode=alternate`: read disks 0 and 1 page by page into one "page cache",
//! alternating between them (page `i` from disk `i % 2`, at image offset `i * 4096`), then
//! check the pages still hold what was read, optionally after waiting (`testguest.hold_ms`).
//! With the same image behind both disks, the page cache holds the image in order; a host that
//! maps image pages over guest pages then maps neighbouring guest pages from two different
//! open files, which the host kernel never joins into one VMA.

use crate::blk::{Blk, SECTOR};
use crate::cmdline::Cmdline;
use crate::fphash;
use crate::ram::{page, PAGE};
use crate::{arena, check_status, clock, io, open_disk, option};

/// Bytes of BLAKE3 output kept per page.
const HASH: usize = 32;

pub fn run(cmdline: &Cmdline) -> ! {
    let hold_ms = option(cmdline, "testguest.hold_ms", 0);
    let mut disks: [Blk; 2] = [open_disk(cmdline, 0), open_disk(cmdline, 1)];
    let (_, mut arena) = arena(cmdline);

    // Whole pages both disks have.
    let capacity = disks[0].capacity.min(disks[1].capacity);
    let pages = capacity * SECTOR / PAGE;
    let need = pages * PAGE + (pages * HASH as u64).next_multiple_of(PAGE);
    if pages == 0 || need > arena.free() {
        fail!("alternate: {} whole pages on both disks; {} bytes needed, {} free", pages, need, arena.free());
    }
    let (Some(cache), Some(hashes_at)) = (arena.alloc_pages(pages), arena.alloc(pages * HASH as u64)) else {
        fail!("alternate: page cache allocation")
    };
    // SAFETY: freshly allocated from the arena, used only through this slice.
    let hashes = unsafe { core::slice::from_raw_parts_mut(hashes_at as *mut [u8; HASH], pages as usize) };

    // One request per page, each from the other disk than the last.
    for i in 0..pages {
        let n = (i % 2) as usize;
        let sector = i * PAGE / SECTOR;
        // SAFETY: a page of the page cache allocated above, which nothing else uses meanwhile.
        let r = unsafe { disks[n].read_into(sector, cache + i * PAGE, PAGE as usize) };
        check_status(n, "read", sector, r);
    }
    let mut whole = blake3::Hasher::new();
    for (i, h) in hashes.iter_mut().enumerate() {
        // SAFETY: allocated above; no other live reference.
        let p = unsafe { page(cache, i as u64) };
        *h = fphash::blake3(p);
        whole.update(p);
    }
    println!(
        "alternate: read {} pages at {:#x}, alternating disks 0 and 1: blake3 {}",
        pages,
        cache,
        whole.finalize().to_hex()
    );
    verify(cache, hashes, "after reading");
    println!("alternate: data intact");
    if hold_ms > 0 {
        let per_ms = match clock::tsc_per_ms() {
            Ok(t) => t,
            Err(e) => fail!("alternate: TSC calibration: {}", e),
        };
        println!("alternate: holding {} ms (TSC {} kHz)", hold_ms, per_ms);
        clock::spin_ms(hold_ms, per_ms);
        verify(cache, hashes, "during the hold");
        println!("alternate: data intact after the hold");
    }
    io::exit(io::EXIT_OK)
}

/// FAIL unless every page hashes to what `hashes` expects.
fn verify(cache: u64, hashes: &[[u8; HASH]], when: &str) {
    for (i, h) in hashes.iter().enumerate() {
        // SAFETY: a page-cache page; no other live reference.
        if fphash::blake3(unsafe { page(cache, i as u64) }) != *h {
            fail!("alternate: page {} at {:#x} changed {}", i, cache + i as u64 * PAGE, when);
        }
    }
}
