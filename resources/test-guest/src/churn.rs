//! `testguest.mode=balloon-churn`: the balloon benchmark's guest. It reads disk 0 (the files
//! every guest shares) and reports the pages to the page-hash device, then, for
//! `testguest.cycles` cycles, writes `testguest.private_mib` MiB of data of its own (different
//! in every guest and cycle, so nothing merges it), keeps it `testguest.busy_ms`, frees it
//! (reports it through the balloon's reporting queue when the VM has a balloon that offers
//! reporting, as Linux's free page reporting does) and stays idle `testguest.idle_ms`. Each
//! step prints the guest's clock (ms since the mode started) and what it cost the guest.

use crate::clock;
use crate::cmdline::Cmdline;
use crate::pagecache::{check_honest, report_all, tsc_per_ms, verify};
use crate::ram::PAGE;
use crate::reuse::{load_disk, report_free};
use crate::{arena, io, open_balloon, open_disk0, open_fphash, option};

pub fn run(cmdline: &Cmdline) -> ! {
    let start = clock::rdtsc();
    let private_mib = option(cmdline, "testguest.private_mib", 16);
    let cycles = option(cmdline, "testguest.cycles", 4);
    let busy_ms = option(cmdline, "testguest.busy_ms", 1000);
    let idle_ms = option(cmdline, "testguest.idle_ms", 2000);
    let mut dev = open_fphash(cmdline, false);
    let mut disk = open_disk0(cmdline);
    let (_, mut arena) = arena(cmdline);
    let mut balloon = open_balloon(cmdline, &mut arena).filter(|b| b.reports());
    let per_ms = tsc_per_ms();
    let ms = |at: u64| (at - start) / per_ms;
    let us = |ticks: u64| ticks * 1000 / per_ms;

    let (cache, hashes) = load_disk(&mut disk, &mut arena, "churn");
    let pages = hashes.len() as u64;
    let tally = report_all(&mut dev, cache, hashes, &mut || {});
    check_honest(&tally, pages);
    println!("churn: t={} ms: read and reported {} shared pages: {}", ms(clock::rdtsc()), pages, tally);

    let private_pages = private_mib * 256;
    let Some(private) = arena.alloc_pages(private_pages) else {
        fail!("churn: {} MiB of private memory do not fit ({} bytes free)", private_mib, arena.free())
    };
    let seed = start;
    for cycle in 1..=cycles {
        let t = clock::rdtsc();
        for i in 0..private_pages {
            let p = (private + i * PAGE) as *mut u64;
            for w in 0..PAGE / 8 {
                let value = (seed ^ (cycle << 48) ^ (i << 12) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                // SAFETY: a page of the private area, which only this loop touches.
                unsafe { p.add(w as usize).write_volatile(value) };
            }
        }
        let wrote = clock::rdtsc();
        println!(
            "churn: cycle {}: t={} ms: wrote {} MiB in {} us",
            cycle,
            ms(wrote),
            private_mib,
            us(wrote - t)
        );
        clock::spin_ms(busy_ms, per_ms);
        let t = clock::rdtsc();
        match balloon.as_mut() {
            Some(b) => {
                let reports = report_free(b, private, private_pages);
                let done = clock::rdtsc();
                println!(
                    "churn: cycle {}: t={} ms: freed {} MiB, reported in {} reports, {} us",
                    cycle,
                    ms(done),
                    private_mib,
                    reports,
                    us(done - t)
                );
            }
            None => {
                println!("churn: cycle {}: t={} ms: freed {} MiB, not reported", cycle, ms(t), private_mib)
            }
        }
        clock::spin_ms(idle_ms, per_ms);
    }
    verify(cache, hashes, "after the cycles");
    println!("churn: t={} ms: shared pages intact", ms(clock::rdtsc()));
    io::exit(io::EXIT_OK)
}
