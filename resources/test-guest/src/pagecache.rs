//! `testguest.mode=fphash`: read disk 0 whole into a "page cache" in free guest RAM, report
//! every page to the page-hash device as clean file content, then check that the guest still
//! reads exactly what it read from the disk, optionally after waiting (`testguest.hold_ms`)
//! and after writing to some pages (`testguest.write_every`), which must give the guest its
//! own copies whatever the host merged.

use core::fmt::Write;

use crate::blk::SECTOR;
use crate::cmdline::Cmdline;
use crate::fphash;
use crate::fphash::{kind, status, Record, Tally};
use crate::ram::{page, PAGE};
use crate::{arena, check_status, clock, io, open_disk0, open_fphash, option, virtio};

/// Bytes of BLAKE3 output kept per page.
const HASH: usize = 32;

pub fn run(cmdline: &Cmdline) -> ! {
    let write_every = option(cmdline, "testguest.write_every", 0);
    let hold_ms = option(cmdline, "testguest.hold_ms", 0);
    let poll_regs = option(cmdline, "testguest.poll_regs", 0) != 0;
    let hold_after_ms = option(cmdline, "testguest.hold_after_ms", 0);
    let rounds = option(cmdline, "testguest.rounds", 1);
    let round_ms = option(cmdline, "testguest.round_ms", 1000);
    // Leave every K-th page unreported, as a guest leaves pages that are not file data (a
    // file system's metadata read into its buffer cache).
    let unreported_every = option(cmdline, "testguest.unreported_every", 0);
    // Start reading this many sectors into the disk: image offsets then never fall on page
    // boundaries of the page cache (a host that maps image pages must copy these reads).
    let skew = option(cmdline, "testguest.skew_sectors", 0);
    let mut dev = open_fphash(cmdline, true);
    let mut disk = open_disk0(cmdline);
    let (_, mut arena) = arena(cmdline);

    // Room: the pages, then one hash per page.
    if skew >= disk.capacity {
        fail!("fphash: testguest.skew_sectors={} is past the disk's {} sectors", skew, disk.capacity);
    }
    let bytes = (disk.capacity - skew) * SECTOR;
    let pages = bytes.div_ceil(PAGE);
    let hash_bytes = pages * HASH as u64;
    let need = pages * PAGE + hash_bytes.next_multiple_of(PAGE);
    if need > arena.free() {
        fail!(
            "disk 0 ({} bytes) does not fit in free guest RAM: {} bytes needed (pages + 32-byte \
             hashes), {} free at {:#x}..{:#x}",
            bytes,
            need,
            arena.free(),
            arena.start,
            arena.end
        );
    }
    let (Some(cache), Some(hashes_at)) = (arena.alloc_pages(pages), arena.alloc(hash_bytes)) else {
        fail!("page cache allocation")
    };
    println!(
        "fphash: page cache at {:#x}..{:#x}: disk 0, {} bytes, {} pages",
        cache,
        cache + pages * PAGE,
        bytes,
        pages
    );
    // SAFETY: freshly allocated from the arena, used only through this slice.
    let hashes = unsafe { core::slice::from_raw_parts_mut(hashes_at as *mut [u8; HASH], pages as usize) };

    // Read the disk straight into the page cache; a partial last page is zero-filled.
    if pages > 0 {
        // SAFETY: allocated above; no other reference.
        unsafe { page(cache, pages - 1) }.fill(0);
    }
    let chunk = disk.max_request as u64 / SECTOR;
    let mut sector = skew;
    while sector < disk.capacity {
        let count = chunk.min(disk.capacity - sector);
        let at = cache + (sector - skew) * SECTOR;
        // SAFETY: inside the page cache allocated above, which nothing else uses meanwhile.
        let r = unsafe { disk.read_into(sector, at, (count * SECTOR) as usize) };
        check_status(0, "read", sector, r);
        sector += count;
    }
    for (i, h) in hashes.iter_mut().enumerate() {
        // SAFETY: allocated above; no other live reference.
        *h = fphash::blake3(unsafe { page(cache, i as u64) });
    }

    // Report every page as ADDED | FILE_PAGE, in batches.
    // With `poll_regs`, read the device's registers while each batch is merged, as an
    // interrupt handler on another vCPU would.
    let base = dev.base;
    let mut register_reads = 0u64;
    let mut poll = || {
        if poll_regs {
            core::hint::black_box(virtio::read_status_registers(base));
            register_reads += 1;
        }
    };
    if dev.host_hash {
        println!("fphash: records carry no hash: zeros on even pages, the next page's hash on odd pages");
    }
    let (tally, reported) = report_some(&mut dev, cache, hashes, unreported_every, &mut poll);
    if unreported_every > 0 {
        println!("fphash: left {} pages unreported (every {})", pages - reported, unreported_every);
    }
    println!("fphash: reported {} pages: {}", reported, tally);
    if poll_regs {
        println!("fphash: read the device's registers {} times while it merged", register_reads);
    }
    check_honest(&tally, reported);

    // Read every page once: the merged pages are faulted in from the store, so the host has
    // page table entries that it may move (compaction) during the hold.
    verify(cache, hashes, "after reporting");
    println!("fphash: data intact");
    if hold_ms > 0 {
        let per_ms = tsc_per_ms();
        println!("fphash: holding {} ms (TSC {} kHz)", hold_ms, per_ms);
        clock::spin_ms(hold_ms, per_ms);
        verify(cache, hashes, "during the hold");
        println!("fphash: data intact after the hold");
    }

    // Later rounds report every page again (to a host that may have lost or changed its
    // store meanwhile), each after `round_ms`.
    for round in 2..=rounds {
        clock::spin_ms(round_ms, tsc_per_ms());
        let tally = report_all(&mut dev, cache, hashes, &mut || {});
        println!("fphash: round {}: reported {} pages: {}", round, pages, tally);
        check_honest(&tally, pages);
        verify(cache, hashes, "after a round");
        println!("fphash: round {}: data intact", round);
    }

    if write_every > 0 {
        let mut written = 0;
        let mut i = 0;
        while i < pages {
            write_marker(cache, hashes, i);
            written += 1;
            i += write_every;
        }
        verify(cache, hashes, "after the writes");
        println!("fphash: wrote {} pages, own copies changed ok", written);
    }
    if hold_after_ms > 0 {
        let per_ms = tsc_per_ms();
        println!("fphash: holding {} ms after the writes", hold_after_ms);
        clock::spin_ms(hold_after_ms, per_ms);
        verify(cache, hashes, "during the hold after the writes");
        println!("fphash: data intact after the second hold");
    }
    io::exit(io::EXIT_OK)
}

/// Reports every page as ADDED | FILE_PAGE, in batches; the statuses' tally. When the host
/// hashes (`dev.host_hash`), the hash fields hold what a host that read them would take for
/// other pages: zeros, or the next page's hash (a real key of another page it stored).
pub fn report_all(
    dev: &mut fphash::Fphash,
    cache: u64,
    hashes: &[[u8; HASH]],
    poll: &mut dyn FnMut(),
) -> Tally {
    report_some(dev, cache, hashes, 0, poll).0
}

/// As [`report_all`], but leaves out every page whose index is a multiple of `unreported_every`
/// (none when 0); the tally and how many pages were reported.
fn report_some(
    dev: &mut fphash::Fphash,
    cache: u64,
    hashes: &[[u8; HASH]],
    unreported_every: u64,
    poll: &mut dyn FnMut(),
) -> (Tally, u64) {
    let pages = hashes.len() as u64;
    let mut tally = Tally::default();
    let host_hash = dev.host_hash;
    let mut next = 0u64;
    let mut reported = 0u64;
    loop {
        let mut n = 0usize;
        let batch = dev.batch.min(dev.records().len());
        while n < batch && next < pages {
            let i = next as usize;
            next += 1;
            if unreported_every > 0 && (i as u64).is_multiple_of(unreported_every) {
                continue;
            }
            let hash = match (host_hash, i % 2) {
                (false, _) => hashes[i],
                (true, 0) => [0; HASH],
                (true, _) => hashes[(i + 1) % hashes.len()],
            };
            dev.records()[n] = Record::added(cache + i as u64 * PAGE, hash);
            n += 1;
        }
        if n == 0 {
            return (tally, reported);
        }
        if let Err(e) = dev.report(kind::ADDED, n, poll) {
            fail!("fphash: batch ending before page {}: {}", next, e);
        }
        tally.add(&dev.statuses()[..n]);
        reported += n as u64;
    }
}

/// FAIL unless every honest report of an unchanged page got an honest status.
pub fn check_honest(tally: &Tally, pages: u64) {
    let honest: u64 = [status::MERGED, status::ALREADY, status::NO_ROOM, status::OFF]
        .iter()
        .map(|&s| tally.0[s as usize])
        .sum();
    if honest != pages {
        fail!("fphash: {} honest reports of unchanged pages got another status", pages - honest);
    }
}

/// The TSC rate, calibrated once; FAIL if it cannot be.
pub fn tsc_per_ms() -> u64 {
    match clock::tsc_per_ms() {
        Ok(t) => t,
        Err(e) => fail!("fphash: TSC calibration: {}", e),
    }
}

/// FAIL unless every page hashes to what `hashes` expects.
pub fn verify(cache: u64, hashes: &[[u8; HASH]], when: &str) {
    for (i, h) in hashes.iter().enumerate() {
        // SAFETY: a page-cache page; no other live reference.
        if fphash::blake3(unsafe { page(cache, i as u64) }) != *h {
            fail!("fphash: page {} at {:#x} changed {}", i, cache + i as u64 * PAGE, when);
        }
    }
}

/// Writes "written by guest page <i>" over the start of page `i`, then checks that the page
/// reads back as the old content with the marker on top and that its neighbours are unchanged.
/// Updates the page's expected hash.
fn write_marker(cache: u64, hashes: &mut [[u8; HASH]], i: u64) {
    let mut marker = Marker { buf: [0; 64], len: 0 };
    let _ = writeln!(marker, "written by guest page {}", i);
    let m = &marker.buf[..marker.len];
    // SAFETY: a page-cache page; no other live reference.
    let p = unsafe { page(cache, i) };
    let mut expected = *p;
    expected[..m.len()].copy_from_slice(m);
    p[..m.len()].copy_from_slice(m);
    // Read it back from memory (volatile, a word at a time), not from what the compiler knows.
    let words = (cache + i * PAGE) as *const u64;
    let differs = expected.chunks_exact(8).enumerate().any(|(w, want)| {
        // SAFETY: inside the page; aligned.
        unsafe { words.add(w).read_volatile() }.to_le_bytes() != want
    });
    if differs {
        fail!("fphash: page {} does not read back as written", i);
    }
    hashes[i as usize] = fphash::blake3(&expected);
    for j in [i.wrapping_sub(1), i + 1] {
        if (j as usize) < hashes.len() {
            // SAFETY: as above.
            if fphash::blake3(unsafe { page(cache, j) }) != hashes[j as usize] {
                fail!("fphash: writing page {} changed its neighbour {}", i, j);
            }
        }
    }
}

/// A small formatting buffer for the marker text.
struct Marker {
    buf: [u8; 64],
    len: usize,
}

impl Write for Marker {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
