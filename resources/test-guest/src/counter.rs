//! `testguest.mode=fphash-counter`: reports pages of file-like content while incrementing a
//! u64 counter at the start of each reported page, so that reports race with writes. Whatever
//! the host does (MISMATCH, or merge followed by a copy-on-write on the next increment), no
//! increment may be lost and nothing else in the page may change.
//!
//! Per batch of `max_records` pages, in each of `testguest.rounds` rounds:
//! 1. hash every page of the batch into its record;
//! 2. increment every 4th page's counter (rotating with the round) after hashing: those
//!    records must come back MISMATCH;
//! 3. send the batch and, while polling the used ring, keep incrementing the counters of the
//!    pages *outside* the batch round-robin: most were merged by earlier batches, so these
//!    writes copy-on-write shared pages while the host pauses the vCPUs and maps other pages
//!    (the race the host must get right); the batch's own untouched pages must come back
//!    honest (MERGED, ALREADY, NO_ROOM, OFF);
//! 4. increment every page of the batch once (writes to just-merged pages).

use crate::cmdline::Cmdline;
use crate::fphash::{kind, status, Record, Tally, CAP_RECORDS};
use crate::ram::{page, PAGE};
use crate::{arena, io, open_fphash, option};

/// Pages `i` and `i + CLASSES` start with the same file content (so they can merge).
const CLASSES: u64 = 64;
/// Bytes of the counter at the start of each page.
const COUNTER: usize = 8;

pub fn run(cmdline: &Cmdline) -> ! {
    let pages = option(cmdline, "testguest.pages", 1024);
    let rounds = option(cmdline, "testguest.rounds", 4);
    if pages == 0 {
        fail!("fphash-counter: testguest.pages=0");
    }
    let mut dev = open_fphash(cmdline, false);
    let (_, mut arena) = arena(cmdline);
    let free = arena.free();
    let (Some(base), Some(counts_at)) = (arena.alloc_pages(pages), arena.alloc(pages * 8)) else {
        fail!("fphash-counter: {} pages do not fit in free guest RAM ({} bytes free)", pages, free)
    };
    // SAFETY: freshly allocated, used only through this slice.
    let counts = unsafe { core::slice::from_raw_parts_mut(counts_at as *mut u64, pages as usize) };
    counts.fill(0);
    for i in 0..pages {
        // SAFETY: allocated above; no other live reference.
        file_content(i % CLASSES, unsafe { page(base, i) });
    }
    println!("fphash-counter: {} pages at {:#x}, {} rounds", pages, base, rounds);

    let mut tally = Tally::default();
    let mut increments = 0u64;
    for round in 0..rounds {
        let mut first = 0u64;
        while first < pages {
            let n = (dev.batch as u64).min(pages - first) as usize;
            // 1. Hash.
            for (j, r) in dev.records()[..n].iter_mut().enumerate() {
                let i = first + j as u64;
                // SAFETY: allocated above; no other live reference.
                *r = Record::file_page(base + i * PAGE, unsafe { page(base, i) });
            }
            // 2. Change some pages after hashing.
            let mut pre = [false; CAP_RECORDS + 1];
            for (j, p) in pre[..n].iter_mut().enumerate() {
                let i = first + j as u64;
                if (i + round).is_multiple_of(4) {
                    bump(base, counts, i);
                    increments += 1;
                    *p = true;
                }
            }
            // 3. Send, writing the other pages while waiting.
            let raced = [false; CAP_RECORDS + 1];
            let mut during = 0u64;
            let others = pages - n as u64;
            let sent = dev.report(kind::ADDED, n, &mut || {
                if others > 0 {
                    let i = (first + n as u64 + during % others) % pages;
                    bump(base, counts, i);
                    during += 1;
                }
            });
            if let Err(e) = sent {
                fail!("fphash-counter: batch at page {}: {}", first, e);
            }
            increments += during;
            let statuses = &dev.statuses()[..n];
            for (j, &s) in statuses.iter().enumerate() {
                let i = first + j as u64;
                let ok = if pre[j] {
                    s == status::MISMATCH
                } else if raced[j] {
                    status::honest_added(s) || s == status::MISMATCH
                } else {
                    status::honest_added(s)
                };
                if !ok {
                    fail!(
                        "fphash-counter: page {} (changed after hashing: {}, during the report: {}) got status {}",
                        i,
                        pre[j],
                        raced[j],
                        s
                    );
                }
            }
            tally.add(statuses);
            // 4. Write every page just reported.
            for j in 0..n as u64 {
                bump(base, counts, first + j);
                increments += 1;
            }
            first += n as u64;
        }
    }
    println!("fphash-counter: reported {} pages: {}", tally.total(), tally);

    let mut want = [0u8; PAGE as usize];
    for i in 0..pages {
        // SAFETY: allocated above; no other live reference.
        let p = unsafe { page(base, i) };
        let counter = u64::from_le_bytes(p[..COUNTER].try_into().unwrap_or_default());
        if counter != counts[i as usize] {
            fail!(
                "fphash-counter: page {} counter is {}, the guest incremented it {} times",
                i,
                counter,
                counts[i as usize]
            );
        }
        file_content(i % CLASSES, &mut want);
        if p[COUNTER..] != want[COUNTER..] {
            fail!("fphash-counter: page {} changed outside its counter", i);
        }
    }
    println!("fphash-counter: {} pages, {} increments, none lost", pages, increments);
    io::exit(io::EXIT_OK)
}

/// Increments page `i`'s counter in memory and in the guest's own count.
fn bump(base: u64, counts: &mut [u64], i: u64) {
    let p = (base + i * PAGE) as *mut u64;
    // SAFETY: the first 8 bytes of an allocated page; volatile so that every increment is a
    // real write the host can race with.
    unsafe { p.write_volatile(p.read_volatile() + 1) };
    counts[i as usize] += 1;
}

/// Text-like page content for content class `class` (64-character lines of letters and
/// spaces), with a zero counter in the first 8 bytes.
fn file_content(class: u64, page: &mut [u8; PAGE as usize]) {
    const ALPHABET: &[u8; 32] = b"etaoinshrdlucmfwypvbgkqjxz      ";
    let mut x = (class + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (j, b) in page.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = if j % 64 == 63 { b'\n' } else { ALPHABET[(x >> 59) as usize] };
    }
    page[..COUNTER].fill(0);
}
