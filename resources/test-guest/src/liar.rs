//! `testguest.mode=fphash-liar`: hostile input to the page-hash device, checking every answer
//! against docs/fphash.md: per-record MISMATCH, BAD_GPA, BAD_RECORD, DONE; whole-batch
//! BAD_REQUEST with a used length of 4; then a flood of wrong-hash batches, after which an
//! honest report must still be served.

use crate::cmdline::Cmdline;
use crate::fphash;
use crate::fphash::{batch, kind, status, Fphash, Header, Record, Tally, CAP_RECORDS, FLAG_FILE_PAGE};
use crate::fphash::{HEADER_BYTES, RECORD_BYTES};
use crate::ram::{page, MMIO_GAP_START, PAGE};
use crate::{arena, io, open_fphash, option};

/// Target pages with stable content.
const TARGETS: usize = 4;

struct Liar {
    dev: Fphash,
    tally: Tally,
    failed: u32,
    /// Target pages and their true hashes.
    gpa: [u64; TARGETS],
    hash: [[u8; 32]; TARGETS],
}

pub fn run(cmdline: &Cmdline) -> ! {
    let flood = option(cmdline, "testguest.flood", 2000);
    let dev = open_fphash(cmdline, false);
    let (map, mut arena) = arena(cmdline);
    let Some(base) = arena.alloc_pages(TARGETS as u64) else { fail!("fphash-liar: no free RAM") };
    let mut l = Liar { dev, tally: Tally::default(), failed: 0, gpa: [0; TARGETS], hash: [[0; 32]; TARGETS] };
    for t in 0..TARGETS {
        // SAFETY: allocated above; no other live reference.
        let p = unsafe { page(base, t as u64) };
        for (j, b) in p.iter_mut().enumerate() {
            *b = b"fphash-liar target page "[j % 24] ^ (t as u8 * 3);
        }
        l.gpa[t] = base + t as u64 * PAGE;
        l.hash[t] = fphash::blake3(p);
    }
    let good = |t: usize, l: &Liar| Record::added(l.gpa[t], l.hash[t]);
    let wrong = |t: usize, l: &Liar| {
        let mut r = good(t, l);
        r.hash[t] ^= 0x5a;
        r
    };

    // Per-record statuses.
    let recs = [wrong(0, &l), wrong(1, &l), Record { hash: [0; 32], ..good(2, &l) }, wrong(3, &l)];
    l.records("wrong-hash", kind::ADDED, &recs, &[status::MISMATCH; 4]);
    let unaligned = [1, 8, 0x800, 0xfff].map(|off| Record { gpa: l.gpa[0] + off, ..good(0, &l) });
    l.records("unaligned-gpa", kind::ADDED, &unaligned, &[status::BAD_GPA; 4]);
    let end = map.end().next_multiple_of(PAGE);
    let outside =
        [end, end + (1 << 30), 1 << 52, 0xffff_ffff_ffff_f000].map(|gpa| Record { gpa, ..good(0, &l) });
    l.records("gpa-outside-ram", kind::ADDED, &outside, &[status::BAD_GPA; 4]);
    let gap =
        [MMIO_GAP_START, 0xd000_0000, 0xfec0_0000, 0xffff_f000].map(|gpa| Record { gpa, ..good(0, &l) });
    l.records("gpa-mmio-gap", kind::ADDED, &gap, &[status::BAD_GPA; 4]);
    let bad = [(0, 0), (FLAG_FILE_PAGE | 2, 0), (FLAG_FILE_PAGE | 1 << 31, 0), (FLAG_FILE_PAGE, 1)]
        .map(|(flags, reserved)| Record { flags, reserved, ..good(1, &l) });
    l.records("bad-flags", kind::ADDED, &bad, &[status::BAD_RECORD; 4]);
    let mixed = [good(0, &l), wrong(1, &l), Record { gpa: l.gpa[2] + 4, ..good(2, &l) }, bad[1]];
    let want = [status::MERGED, status::MISMATCH, status::BAD_GPA, status::BAD_RECORD];
    l.records("mixed-batch", kind::ADDED, &mixed, &want);
    let removed = [0, 1, 2, 3].map(|t| Record { hash: [0; 32], flags: 0, ..good(t, &l) });
    l.records("removed", kind::REMOVED, &removed, &[status::DONE; 4]);

    // Whole-batch rejections.
    let two = HEADER_BYTES + 2 * RECORD_BYTES;
    let pair = [good(0, &l), good(1, &l)];
    l.dev.records()[..2].copy_from_slice(&pair);
    l.bad_request("empty-batch", 0, kind::ADDED, HEADER_BYTES, 4 + CAP_RECORDS);
    let over = l.dev.device_max as usize + 1;
    let over_len = HEADER_BYTES + RECORD_BYTES * over.min(CAP_RECORDS + 1);
    l.bad_request("oversized-batch", over as u32, kind::ADDED, over_len, 4 + over.min(CAP_RECORDS + 1));
    l.bad_request("truncated-batch", 2, kind::ADDED, two - 1, 6);
    l.bad_request("overlong-batch", 2, kind::ADDED, two + RECORD_BYTES, 6);
    l.bad_request("short-response", 2, kind::ADDED, two, 5);
    l.bad_request("unknown-type", 2, 3, two, 6);
    l.honest("still-works");

    // Flood of wrong-hash batches.
    let n = l.dev.batch;
    for (j, r) in l.dev.records()[..n].iter_mut().enumerate() {
        *r = Record::added(base + (j % TARGETS) as u64 * PAGE, [j as u8; 32]);
    }
    let mut flood_tally = Tally::default();
    for b in 0..flood {
        if let Err(e) = l.dev.report(kind::ADDED, n, &mut || {}) {
            fail!("fphash-liar: flood batch {}: {}", b, e);
        }
        flood_tally.add(&l.dev.statuses()[..n]);
    }
    l.tally.0.iter_mut().zip(flood_tally.0).for_each(|(t, f)| *t += f);
    let records = flood * n as u64;
    if flood_tally.0[status::MISMATCH as usize] == records {
        println!("fphash-liar: flood of {} batches ({} records) ok", flood, records);
    } else {
        l.failed += 1;
        println!("FAIL: fphash-liar: flood: want {} mismatch, got {}", records, flood_tally);
    }
    l.honest("after-flood");

    println!("fphash-liar: sent {} records: {}", l.tally.total(), l.tally);
    if l.failed > 0 {
        fail!("fphash-liar: {} checks failed", l.failed);
    }
    println!("fphash-liar: all checks ok");
    io::exit(io::EXIT_OK)
}

impl Liar {
    /// Sends `recs` as one batch and expects status `want[i]` for record `i` (MERGED stands
    /// for any honest outcome: MERGED, ALREADY, NO_ROOM or OFF).
    fn records(&mut self, check: &str, kind: u32, recs: &[Record], want: &[u8]) {
        self.dev.records()[..recs.len()].copy_from_slice(recs);
        if let Err(e) = self.dev.report(kind, recs.len(), &mut || {}) {
            fail!("fphash-liar: {}: {}", check, e);
        }
        let got = &self.dev.statuses()[..recs.len()];
        self.tally.add(got);
        let mut ok = true;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let matched = if w == status::MERGED { status::honest_added(g) } else { g == w };
            if !matched {
                ok = false;
                let r = &recs[i];
                println!(
                    "FAIL: fphash-liar: {}: record {} (gpa {:#x} flags {:#x} reserved {:#x}) got status {}, want {}",
                    check, i, r.gpa, r.flags, r.reserved, g, w
                );
            }
        }
        self.verdict(check, ok);
    }

    /// Sends a header claiming `nr` records with `readable` request bytes (header + the
    /// records already in the buffer) and `writable` response bytes; expects BAD_REQUEST with
    /// a used length of 4.
    fn bad_request(&mut self, check: &str, nr: u32, kind: u32, readable: usize, writable: usize) {
        let a = match self.dev.send_raw(Header { kind, nr_records: nr }, readable, writable, &mut || {}) {
            Ok(a) => a,
            Err(e) => fail!("fphash-liar: {}: {}", check, e),
        };
        let ok = a.batch_status == batch::BAD_REQUEST && a.used_len == 4;
        if !ok {
            println!(
                "FAIL: fphash-liar: {}: batch_status {} used length {}, want {} and 4",
                check,
                a.batch_status,
                a.used_len,
                batch::BAD_REQUEST
            );
        }
        self.verdict(check, ok);
    }

    /// An honest report of the target pages must get an honest status.
    fn honest(&mut self, check: &str) {
        let recs = [0, 1, 2, 3].map(|t| Record::added(self.gpa[t], self.hash[t]));
        self.records(check, kind::ADDED, &recs, &[status::MERGED; 4]);
    }

    fn verdict(&mut self, check: &str, ok: bool) {
        if ok {
            println!("fphash-liar: {} ok", check);
        } else {
            self.failed += 1;
        }
    }
}
