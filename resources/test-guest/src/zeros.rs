//! `testguest.mode=zeros`: a guest that holds pages of zeros it wrote, for the host's sweeps
//! (`docs/fphash.md`, "Pages of zeros"). It writes `testguest.pages` pages (default 1024) with
//! data, then zeros every even one, and holds for `testguest.hold_ms` (default 12000) while the
//! host may give the pages of zeros back; it writes one odd page again in the middle of the
//! hold (a page with data, which must not be given back). Then it checks that the pages of
//! zeros read zeros and the others their data, writes new data into the pages of zeros and
//! checks every page again: nothing it wrote is lost, before or after a page goes back.

use crate::cmdline::Cmdline;
use crate::pagecache::tsc_per_ms;
use crate::ram::PAGE;
use crate::{arena, clock, io, option};

pub fn run(cmdline: &Cmdline) -> ! {
    let pages = option(cmdline, "testguest.pages", 1024);
    let hold_ms = option(cmdline, "testguest.hold_ms", 12_000);
    let (_, mut arena) = arena(cmdline);
    let Some(base) = arena.alloc_pages(pages) else { fail!("zeros: no room for {} pages", pages) };
    for i in 0..pages {
        fill(base, i, 1);
    }
    for i in (0..pages).step_by(2) {
        fill(base, i, 0);
    }
    println!("zeros: wrote {} pages, then zeros into {} of them", pages, pages.div_ceil(2));
    let per_ms = tsc_per_ms();
    clock::spin_ms(hold_ms / 2, per_ms);
    if pages > 1 {
        fill(base, 1, 2);
    }
    clock::spin_ms(hold_ms - hold_ms / 2, per_ms);
    check_all(base, pages, 0, "after the hold");
    for i in (0..pages).step_by(2) {
        fill(base, i, 3);
    }
    check_all(base, pages, 3, "written again");
    println!("zeros: data intact");
    io::exit(io::EXIT_OK)
}

/// The word at `word` of page `i` in generation `generation` (0: zero; never zero otherwise).
fn word(i: u64, word: u64, generation: u64) -> u64 {
    match generation {
        0 => 0,
        g => (i << 32 | word << 8 | g) | 1 << 63,
    }
}

fn fill(base: u64, i: u64, generation: u64) {
    let words = (base + i * PAGE) as *mut u64;
    for w in 0..PAGE / 8 {
        // SAFETY: word `w` of page `i` of the allocation in `run` (identity-mapped RAM);
        // volatile, so that every write reaches guest memory when it is made.
        unsafe { core::ptr::write_volatile(words.add(w as usize), word(i, w, generation)) };
    }
}

/// FAILs unless every page holds what `run` left there: the even ones generation `even`, page 1
/// generation 2 (written during the hold), the other odd ones generation 1.
fn check_all(base: u64, pages: u64, even: u64, when: &str) {
    for i in 0..pages {
        let generation = match i {
            _ if i % 2 == 0 => even,
            1 => 2,
            _ => 1,
        };
        check(base, i, generation, when);
    }
}

/// FAILs unless page `i` holds generation `generation` (0: zeros).
fn check(base: u64, i: u64, generation: u64, when: &str) {
    let words = (base + i * PAGE) as *const u64;
    for w in 0..PAGE / 8 {
        let want = word(i, w, generation);
        // SAFETY: as in `fill`; volatile, so that every word is read from guest memory.
        let got = unsafe { core::ptr::read_volatile(words.add(w as usize)) };
        if got != want {
            fail!("zeros: {}: page {} word {} reads {:#x}, not {:#x}", when, i, w, got, want);
        }
    }
}
