//! `testguest.mode=balloon`: a guest that gives merged pages back and uses them again. It reads
//! disk 0 whole into pages and reports them to the page-hash device (so the host merges them
//! with other VMs' copies), then gives the first `testguest.give_back` pages back through the
//! balloon's reporting queue and the next `testguest.inflate` through its inflate queue (taking
//! them back through the deflate queue), and checks that each page given back reads zeros,
//! never the disk's (another VM's, the store's, the image's) bytes, and then holds what the
//! guest writes there; the pages it kept still hold the disk's bytes, also after
//! `testguest.hold_ms`. With `testguest.wait_target=N` it then waits for the host to set the
//! balloon's target to N pages. While it waits or holds, it keeps the balloon's statistics
//! buffer in the device's hands (`Balloon::serve_stats`).

use crate::balloon::{Balloon, MAX_PFNS, MAX_RANGES};
use crate::blk::SECTOR;
use crate::cmdline::Cmdline;
use crate::fphash;
use crate::pagecache::{check_honest, report_all, tsc_per_ms, verify};
use crate::ram::{page, Arena, PAGE};
use crate::{arena, check_status, clock, io, open_balloon, open_disk0, open_fphash, option};

/// Pages per reported range: 2 MiB, the size Linux reports on x86 (`pageblock_order` 9).
const RANGE_PAGES: u64 = 512;

pub fn run(cmdline: &Cmdline) -> ! {
    let hold_ms = option(cmdline, "testguest.hold_ms", 0);
    let inflate = option(cmdline, "testguest.inflate", 16);
    let mut dev = open_fphash(cmdline, false);
    let mut disk = open_disk0(cmdline);
    let (_, mut arena) = arena(cmdline);
    let mut balloon = open_balloon(cmdline, &mut arena);

    let (cache, hashes) = load_disk(&mut disk, &mut arena, "balloon");
    let pages = hashes.len() as u64;
    let give_back = option(cmdline, "testguest.give_back", pages / 2);
    if give_back.saturating_add(inflate) > pages {
        fail!("balloon: give_back {} + inflate {} is more than the {} pages read", give_back, inflate, pages);
    }
    let tally = report_all(&mut dev, cache, hashes, &mut || {});
    println!("balloon: reported {} pages to fphash: {}", pages, tally);
    check_honest(&tally, pages);
    verify(cache, hashes, "after reporting");
    println!("balloon: data intact");
    let seed = clock::rdtsc();

    if give_back > 0 {
        let Some(b) = balloon.as_mut() else { fail!("balloon: no balloon device") };
        if !b.reports() {
            fail!("balloon: the device does not offer free page reporting");
        }
        let per_ms = tsc_per_ms();
        let start = clock::rdtsc();
        let chains = report_free(b, cache, give_back);
        let us = (clock::rdtsc() - start) * 1000 / per_ms;
        println!(
            "balloon: gave back pages 0..{} ({} KiB) in {} reports of up to {} ranges, {} us",
            give_back,
            give_back * 4,
            chains,
            MAX_RANGES,
            us
        );
        reuse(cache, hashes, 0..give_back, seed, "reported");
    }
    if inflate > 0 {
        let Some(b) = balloon.as_mut() else { fail!("balloon: no balloon device") };
        let first = give_back;
        move_pages(b, true, cache, first, inflate);
        b.set_actual(inflate as u32);
        println!(
            "balloon: inflated pages {}..{}; host target {} pages",
            first,
            first + inflate,
            b.target_pages()
        );
        move_pages(b, false, cache, first, inflate);
        b.set_actual(0);
        reuse(cache, hashes, first..first + inflate, seed, "inflated");
    }

    verify(cache, hashes, "after giving pages back");
    println!("balloon: kept pages intact, given-back pages hold the guest's own data");
    let wait_target = option(cmdline, "testguest.wait_target", 0);
    if wait_target > 0 {
        wait_for_target(balloon.as_mut(), wait_target);
    }
    if hold_ms > 0 {
        println!("balloon: holding {} ms", hold_ms);
        let per_ms = tsc_per_ms();
        let start = clock::rdtsc();
        while clock::rdtsc() - start < hold_ms * per_ms {
            serve_stats(balloon.as_mut());
            clock::spin_ms(1, per_ms);
        }
        verify(cache, hashes, "during the hold");
        println!("balloon: data intact after the hold");
    }
    if let Some(b) = balloon.as_mut().filter(|b| b.has_stats()) {
        println!("balloon: statistics buffer added again {} times", serve_stats(Some(b)));
    }
    io::exit(io::EXIT_OK)
}

/// Polls the host's target until it is `pages` (at most a minute): the host sets it while
/// the guest runs (`samepage balloon --target`).
fn wait_for_target(balloon: Option<&mut Balloon>, pages: u64) {
    let Some(b) = balloon else { fail!("balloon: no balloon device") };
    let per_ms = tsc_per_ms();
    println!("balloon: waiting for a host target of {} pages", pages);
    let start = clock::rdtsc();
    while u64::from(b.target_pages()) != pages {
        if clock::rdtsc() - start > 60_000 * per_ms {
            fail!("balloon: the host target is still {} pages after a minute", b.target_pages());
        }
        serve_stats(Some(&mut *b));
        clock::spin_ms(10, per_ms);
    }
    println!("balloon: host target {} pages after {} ms", pages, (clock::rdtsc() - start) / per_ms);
}

/// Adds the statistics buffer again if the device returned it; the refills so far (0
/// without a balloon or statsq). FAIL if the statsq breaks.
fn serve_stats(balloon: Option<&mut Balloon>) -> u64 {
    match balloon.map_or(Ok(0), Balloon::serve_stats) {
        Ok(n) => n,
        Err(e) => fail!("balloon: statistics queue: {}", e),
    }
}

/// Reads disk 0 whole into pages of `arena` (a partial last page zero-filled) and hashes
/// them; (the first page's address, each page's BLAKE3). FAIL if it does not fit.
pub fn load_disk(disk: &mut crate::blk::Blk, arena: &mut Arena, who: &str) -> (u64, &'static mut [[u8; 32]]) {
    let bytes = disk.capacity * SECTOR;
    let pages = bytes.div_ceil(PAGE);
    let hash_bytes = pages * 32;
    let (Some(cache), Some(hashes_at)) = (arena.alloc_pages(pages), arena.alloc(hash_bytes)) else {
        fail!(
            "{}: disk 0 ({} bytes) does not fit in free guest RAM ({} bytes free)",
            who,
            bytes,
            arena.free()
        )
    };
    println!("{}: page cache at {:#x}..{:#x}: disk 0, {} pages", who, cache, cache + pages * PAGE, pages);
    // SAFETY: freshly allocated from the arena, used only through this slice.
    let hashes = unsafe { core::slice::from_raw_parts_mut(hashes_at as *mut [u8; 32], pages as usize) };
    if pages > 0 {
        // SAFETY: allocated above; no other reference.
        unsafe { page(cache, pages - 1) }.fill(0);
    }
    let chunk = disk.max_request as u64 / SECTOR;
    let mut sector = 0;
    while sector < disk.capacity {
        let count = chunk.min(disk.capacity - sector);
        // SAFETY: inside the pages allocated above, which nothing else uses meanwhile.
        let r = unsafe { disk.read_into(sector, cache + sector * SECTOR, (count * SECTOR) as usize) };
        check_status(0, "read", sector, r);
        sector += count;
    }
    for (i, h) in hashes.iter_mut().enumerate() {
        // SAFETY: allocated above; no other live reference.
        *h = fphash::blake3(unsafe { page(cache, i as u64) });
    }
    (cache, hashes)
}

/// Reports pages `0..n` of `cache` free, in ranges of [`RANGE_PAGES`], up to [`MAX_RANGES`]
/// a report; returns how many reports it took. FAIL if the device refuses one.
pub fn report_free(b: &mut Balloon, cache: u64, n: u64) -> u64 {
    let mut ranges = [(0u64, 0u64); MAX_RANGES];
    let (mut next, mut reports) = (0, 0);
    while next < n {
        let mut count = 0;
        while count < MAX_RANGES && next < n {
            let len = RANGE_PAGES.min(n - next);
            ranges[count] = (cache + next * PAGE, len * PAGE);
            next += len;
            count += 1;
        }
        // SAFETY: pages of the arena this guest does not touch until the report returns.
        if let Err(e) = unsafe { b.report(&ranges[..count]) } {
            fail!("balloon: report of free pages: {}", e);
        }
        reports += 1;
    }
    reports
}

/// Inflates (or deflates) pages `first..first + n` of `cache`, [`MAX_PFNS`] a request.
pub fn move_pages(b: &mut Balloon, inflate: bool, cache: u64, first: u64, n: u64) {
    let mut pfns = [0u32; MAX_PFNS];
    let mut i = first;
    while i < first + n {
        let count = (MAX_PFNS as u64).min(first + n - i) as usize;
        for (k, pfn) in pfns[..count].iter_mut().enumerate() {
            *pfn = ((cache + (i + k as u64) * PAGE) / PAGE) as u32;
        }
        // SAFETY: inflated pages are not touched until they are deflated below.
        if let Err(e) = unsafe { b.move_pages(inflate, &pfns[..count]) } {
            fail!("balloon: {}: {}", if inflate { "inflate" } else { "deflate" }, e);
        }
        i += count as u64;
    }
}

/// Word `w` of the guest's own data for page `i`: its page number, the word's index and a
/// seed of this boot, so no other VM, store or image page holds it.
fn own_word(seed: u64, i: u64, w: u64) -> u64 {
    (seed ^ (i << 32) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Pages `range` were given back (`how`): each must read zeros (read word by word, volatile:
/// the host changed them behind the compiler's back); then the guest writes its own data
/// there, which must read back, and their expected hashes become that data's.
fn reuse(cache: u64, hashes: &mut [[u8; 32]], range: core::ops::Range<u64>, seed: u64, how: &str) {
    let words = PAGE / 8;
    let (mut not_zero, mut first_bad) = (0u64, None);
    for i in range.clone() {
        let p = (cache + i * PAGE) as *const u64;
        // SAFETY: a page of the arena; no live reference to it.
        if (0..words).any(|w| unsafe { p.add(w as usize).read_volatile() } != 0) {
            not_zero += 1;
            first_bad.get_or_insert(i);
        }
    }
    if let Some(i) = first_bad {
        // SAFETY: as above.
        let head = unsafe { ((cache + i * PAGE) as *const u64).read_volatile() };
        let was_disk = fphash::blake3(unsafe { page(cache, i) }) == hashes[i as usize];
        fail!(
            "balloon: {} of {} {} pages do not read zeros: page {} starts {:#018x}{}",
            not_zero,
            range.end - range.start,
            how,
            i,
            head,
            if was_disk { " (the disk's bytes, as another VM or the store holds them)" } else { "" }
        );
    }
    println!("balloon: {} {} pages read zeros", range.end - range.start, how);
    for i in range.clone() {
        let p = (cache + i * PAGE) as *mut u64;
        for w in 0..words {
            // SAFETY: as above.
            unsafe { p.add(w as usize).write_volatile(own_word(seed, i, w)) };
        }
    }
    for i in range.clone() {
        let p = (cache + i * PAGE) as *const u64;
        // SAFETY: as above.
        if (0..words).any(|w| unsafe { p.add(w as usize).read_volatile() } != own_word(seed, i, w)) {
            fail!("balloon: {} page {} does not read back what the guest wrote", how, i);
        }
        // SAFETY: as above.
        hashes[i as usize] = fphash::blake3(unsafe { page(cache, i) });
    }
    println!("balloon: the guest's own data over {} {} pages reads back", range.end - range.start, how);
}
