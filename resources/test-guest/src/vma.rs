//! `testguest.mode=fphash-vma`: the guest side of the VMA-count attack. Each round uses three
//! consecutive pages L, M, R and a spare page X elsewhere:
//! 1. report L, X, R with fresh content in one batch (the host gives them consecutive store
//!    slots);
//! 2. write L, R and X (each becomes a private copy inside its store mapping);
//! 3. report X REMOVED (the host frees X's slot once it has looked twice);
//! then, a block of rounds later (`testguest.hold_ms` after the block's removals, so that the
//! host has freed the slots),
//! 4. report M with fresh content: it takes X's old slot, which continues both L's and R's.
//! The host cannot join L, M and R into one VMA (L and R were copied on write separately), so
//! a host that counted on it would undercount by one VMA a round, and a guest could drive it
//! past `vm.max_map_count`. Rounds go on until the host refuses a whole block of middle pages
//! (its budget is spent) or `testguest.rounds` are done; then every page must hold what the
//! guest last wrote.

use crate::cmdline::Cmdline;
use crate::fphash::{kind, status, Record, Tally};
use crate::ram::{page, PAGE};
use crate::{arena, clock, io, open_fphash, option};

/// Fills a page with content unique to `tag`.
fn fill(p: &mut [u8; PAGE as usize], tag: u64) {
    for (i, word) in p.chunks_exact_mut(8).enumerate() {
        let v = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
        word.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn run(cmdline: &Cmdline) -> ! {
    let rounds = option(cmdline, "testguest.rounds", 4096);
    let block = option(cmdline, "testguest.block", 4096).max(1);
    let hold_ms = option(cmdline, "testguest.hold_ms", 1500);
    let mut dev = open_fphash(cmdline, false);
    let (_, mut arena) = arena(cmdline);
    let free = arena.free();
    let (Some(main), Some(spare), Some(tags_at)) =
        (arena.alloc_pages(3 * rounds), arena.alloc_pages(rounds), arena.alloc(4 * rounds * 8))
    else {
        fail!("fphash-vma: {} rounds do not fit in free guest RAM ({} bytes free)", rounds, free)
    };
    // SAFETY: freshly allocated, used only through this slice: the last tag written to each
    // page, main pages first (3 per round), then spare pages.
    let tags = unsafe { core::slice::from_raw_parts_mut(tags_at as *mut u64, 4 * rounds as usize) };
    let per_ms = match clock::tsc_per_ms() {
        Ok(t) => t,
        Err(e) => fail!("fphash-vma: {}", e),
    };
    println!(
        "fphash-vma: up to {} rounds in blocks of {}, main pages at {:#x}, spare at {:#x}",
        rounds, block, main, spare
    );

    let mut next_tag = 1u64;
    let mut write = |base: u64, index: u64, slot: usize, tags: &mut [u64]| {
        // SAFETY: a page allocated above; no other live reference.
        fill(unsafe { page(base, index) }, next_tag);
        tags[slot] = next_tag;
        next_tag += 1;
    };
    let (mut outer, mut middle) = (Tally::default(), Tally::default());
    let mut done = 0;
    while done < rounds {
        let start = done;
        let end = (done + block).min(rounds);
        for k in done..end {
            let (l, r) = (3 * k, 3 * k + 2);
            write(main, l, l as usize, tags);
            write(spare, k, (3 * rounds + k) as usize, tags);
            write(main, r, r as usize, tags);
            let recs = dev.records();
            // SAFETY (all three): pages allocated above, no other live reference.
            recs[0] = Record::file_page(main + l * PAGE, unsafe { page(main, l) });
            recs[1] = Record::file_page(spare + k * PAGE, unsafe { page(spare, k) });
            recs[2] = Record::file_page(main + r * PAGE, unsafe { page(main, r) });
            send(&mut dev, kind::ADDED, 3, &mut outer);
            write(main, l, l as usize, tags);
            write(main, r, r as usize, tags);
            write(spare, k, (3 * rounds + k) as usize, tags);
            dev.records()[0] = Record { gpa: spare + k * PAGE, hash: [0; 32], flags: 0, reserved: 0 };
            send(&mut dev, kind::REMOVED, 1, &mut Tally::default());
        }
        clock::spin_ms(hold_ms, per_ms);
        let refused_before = middle.total() - middle.0[status::MERGED as usize];
        for k in done..end {
            let m = 3 * k + 1;
            write(main, m, m as usize, tags);
            // SAFETY: as above.
            dev.records()[0] = Record::file_page(main + m * PAGE, unsafe { page(main, m) });
            send(&mut dev, kind::ADDED, 1, &mut middle);
        }
        let refused = middle.total() - middle.0[status::MERGED as usize] - refused_before;
        done = end;
        if refused >= end - start {
            break;
        }
    }
    println!("fphash-vma: {} rounds: outer pages {}", done, outer);
    println!("fphash-vma: {} rounds: middle pages {}", done, middle);
    for (index, &tag) in tags.iter().enumerate() {
        if tag == 0 {
            continue;
        }
        let index = index as u64;
        let (base, i) = if index < 3 * rounds { (main, index) } else { (spare, index - 3 * rounds) };
        let mut want = [0u8; PAGE as usize];
        fill(&mut want, tag);
        // SAFETY: as above.
        if unsafe { page(base, i) }[..] != want[..] {
            fail!("fphash-vma: page {:#x} does not hold what the guest wrote", base + i * PAGE);
        }
    }
    println!("fphash-vma: data intact");
    io::exit(io::EXIT_OK)
}

fn send(dev: &mut crate::fphash::Fphash, what: u32, n: usize, tally: &mut Tally) {
    if let Err(e) = dev.report(what, n, &mut || {}) {
        fail!("fphash-vma: {}", e);
    }
    tally.add(&dev.statuses()[..n]);
}
