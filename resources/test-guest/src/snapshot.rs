//! `testguest.mode=snapshot`: work that a snapshot interrupts and a restore continues, and
//! clones of one snapshot that must not see each other's writes.
//!
//! 1. Fills `testguest.pages` pages (default 512) with a pattern and runs rounds that rewrite
//!    one word per page and print a checksum of all pages (and of a sector of disk 0 when
//!    `testguest.disk=1`, read through virtio-blk each round).
//! 2. After round `testguest.snapshot_round` (default 8) prints `snapshot-here` (the VMM's
//!    `--snapshot-at` marker) and waits for one byte on COM1: the snapshot is taken while it
//!    polls the UART, so a restore resumes inside an I/O instruction.
//! 3. Given the byte (a clone's name), writes it into every page, runs the remaining rounds of
//!    `testguest.rounds` (default 24), checks every page still holds its own byte, and prints
//!    `snapshot: done <byte> checksum <sum>`. Two VMs given the same byte print the same lines;
//!    clones given different bytes print different checksums, each from its own pages.
//! 4. With `testguest.report=N` (at most 256), N more pages are filled before the snapshot with
//!    a pattern every VM shares and never written again; once named, the guest reports them
//!    to the fphash device (FILE_PAGE, its own hashes, or none with `testguest.hash=host`) and
//!    prints `snapshot: reported N pages: <statuses>`. A clone still maps them from the
//!    snapshot's memory file.
//! 5. With `testguest.balloon_pages=M` as well (at most N; the VM needs `--balloon`), the
//!    balloon's driver starts before the snapshot, and once the pages are reported the guest
//!    inflates the first M of them, deflates them and checks each reads zeros (a page given
//!    back reads zeros, never the snapshot file's bytes), then prints
//!    `snapshot: balloon gave back M pages, they read zeros` and the balloon's `actual`.

use crate::blk::{req, SECTOR};
use crate::cmdline::Cmdline;
use crate::io::{self, EXIT_OK};
use crate::ram::{page, PAGE};
use crate::fphash::{blake3, Record, Tally};
use crate::{arena, open_balloon, open_disk0, open_fphash, option};

/// Most pages `testguest.report` takes.
const MAX_REPORTED: u64 = 256;

const WORDS: u64 = PAGE / 8;

/// A 64-bit mixer (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn words<'a>(base: u64, i: u64) -> &'a mut [u64] {
    // SAFETY: page `i` of the pages this mode allocated, used only through this slice at a time.
    let bytes = unsafe { page(base, i) };
    // SAFETY: a page is 4 KiB, 8-byte aligned.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<u64>(), WORDS as usize) }
}

pub fn run(cmdline: &Cmdline) -> ! {
    let pages = option(cmdline, "testguest.pages", 512);
    let rounds = option(cmdline, "testguest.rounds", 24);
    let at = option(cmdline, "testguest.snapshot_round", 8);
    if pages == 0 || at >= rounds {
        fail!("snapshot: need pages > 0 and snapshot_round < rounds");
    }
    let report = option(cmdline, "testguest.report", 0);
    if report > MAX_REPORTED {
        fail!("snapshot: testguest.report={} is over {}", report, MAX_REPORTED);
    }
    let mut disk = (option(cmdline, "testguest.disk", 0) == 1).then(|| open_disk0(cmdline));
    // Opened before the snapshot: a clone goes on with the device as its driver left it.
    let mut fphash = (report > 0).then(|| open_fphash(cmdline, true));
    let balloon_pages = option(cmdline, "testguest.balloon_pages", 0);
    if balloon_pages > report {
        fail!("snapshot: testguest.balloon_pages={} is over testguest.report={}", balloon_pages, report);
    }
    let (_, mut arena) = arena(cmdline);
    let mut balloon = match balloon_pages {
        0 => None,
        _ => match open_balloon(cmdline, &mut arena) {
            Some(b) => Some(b),
            None => fail!("snapshot: testguest.balloon_pages needs a balloon device (--balloon)"),
        },
    };
    let free = arena.free();
    let Some(base) = arena.alloc_pages(pages) else {
        fail!("snapshot: {} pages do not fit in free guest RAM ({} bytes free)", pages, free)
    };
    for i in 0..pages {
        for (j, w) in words(base, i).iter_mut().enumerate() {
            *w = mix(i * WORDS + j as u64);
        }
    }
    let shared = match report {
        0 => 0,
        n => match arena.alloc_pages(n) {
            Some(shared) => shared,
            None => fail!("snapshot: {} pages to report do not fit in free guest RAM", n),
        },
    };
    for i in 0..report {
        for (j, w) in words(shared, i).iter_mut().enumerate() {
            *w = mix(!(i * WORDS + j as u64));
        }
    }
    println!("snapshot: {} pages filled, {} rounds, marker after round {}", pages, rounds, at);
    let mut sum = 0u64;
    let mut name = 0u8;
    for round in 0..rounds {
        for i in 0..pages {
            let w = words(base, i);
            // Word 0 is left for the name.
            let j = (1 + (round + i) % (WORDS - 1)) as usize;
            w[j] = mix(w[j] ^ round);
        }
        sum = mix(sum ^ round);
        for i in 0..pages {
            sum = words(base, i).iter().fold(sum, |s, &w| mix(s ^ w));
        }
        if let Some(blk) = disk.as_mut() {
            let sector = round % blk.capacity.max(1);
            match blk.request(req::IN, sector, SECTOR as usize, true) {
                Ok(0) => sum = blk.data()[..SECTOR as usize].iter().fold(sum, |s, &b| mix(s ^ u64::from(b))),
                Ok(status) => fail!("snapshot: disk read of sector {} failed with status {}", sector, status),
                Err(e) => fail!("snapshot: disk read of sector {}: {}", sector, e),
            }
        }
        println!("snapshot: round {} checksum {:#018x}", round, sum);
        if round == at {
            println!("snapshot-here");
            name = io::serial_getc();
            println!("snapshot: named {}", name as char);
            for i in 0..pages {
                words(base, i)[0] = u64::from(name);
            }
            if let Some(dev) = fphash.as_mut() {
                let tally = report_shared(dev, shared, report);
                println!("snapshot: reported {} pages: {}", report, tally);
            }
            if let Some(b) = balloon.as_mut() {
                give_back_and_check(b, shared, balloon_pages);
            }
        }
    }
    for i in 0..pages {
        let first = words(base, i)[0];
        if first != u64::from(name) {
            fail!("snapshot: page {} holds {:#x}, not this VM's {:#x}", i, first, name);
        }
    }
    println!("snapshot: done {} checksum {:#018x}", name as char, sum);
    io::exit(EXIT_OK)
}

/// Reports the `n` pages from `shared` as ADDED file pages, in batches; the statuses' tally.
fn report_shared(dev: &mut crate::fphash::Fphash, shared: u64, n: u64) -> Tally {
    let mut tally = Tally::default();
    let mut next = 0u64;
    while next < n {
        let batch = (dev.batch as u64).min(n - next) as usize;
        for k in 0..batch {
            let i = next + k as u64;
            // SAFETY: page `i` of the pages this mode allocated for reporting, only read here.
            let page = unsafe { crate::ram::page(shared, i) };
            let hash = if dev.host_hash { [0; 32] } else { blake3(page) };
            dev.records()[k] = Record::added(shared + i * PAGE, hash);
        }
        if let Err(e) = dev.report(crate::fphash::kind::ADDED, batch, &mut || {}) {
            fail!("snapshot: fphash report: {}", e);
        }
        tally.add(&dev.statuses()[..batch]);
        next += batch as u64;
    }
    tally
}

/// Inflates the `n` pages from `shared`, deflates them and checks each reads zeros.
fn give_back_and_check(b: &mut crate::balloon::Balloon, shared: u64, n: u64) {
    crate::reuse::move_pages(b, true, shared, 0, n);
    b.set_actual(n as u32);
    crate::reuse::move_pages(b, false, shared, 0, n);
    b.set_actual(0);
    for i in 0..n {
        for (j, w) in words(shared, i).iter().enumerate() {
            // SAFETY: a word of page `i`, which the host changed behind the compiler's back.
            let value = unsafe { core::ptr::read_volatile(w) };
            if value != 0 {
                fail!("snapshot: page {} given back reads {:#x} at word {}, not zero", i, value, j);
            }
        }
    }
    println!("snapshot: balloon gave back {} pages, they read zeros", n);
}
