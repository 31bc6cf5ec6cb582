//! The fphash device end to end: batches of page reports (`docs/fphash.md`) as descriptor
//! chains in a split virtqueue on guest memory, served by `FphashDevice` into a merger that
//! checks the device's side of the `PageMerger` contract.
//!
//! Most inputs are well-formed batches (valid type and count, aligned in-RAM pages, the
//! request and response split at arbitrary bytes), some with bad records; for an input
//! without chain faults every answer is predicted exactly: used lengths, batch status, each
//! record's status, bytes past the response left alone, and the counters. Inputs with faults
//! (loops, bad links, buffers anywhere, over-long chains, lying headers) are checked for the
//! invariants that hold for any chain.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{
    apply_faults, counted, guest_memory, linked, queue_size, read_bytes, split, ChainFault, Part, Ring,
};
use samepage_virtio::fphash::{
    FphashDevice, FphashHeader, FphashRecord, FphashStats, Hashing, PageMerger, PageReport, RecordStatus,
    ReportKind, BATCH_BAD_REQUEST, BATCH_OK, FLAG_FILE_PAGE, F_HOST_HASH, MAX_CHAIN_LEN, MAX_RECORDS,
    PAGE_SIZE, TYPE_ADDED, TYPE_REMOVED,
};
use samepage_virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: region A `[0, A_END)`, a hole, region B `[B_START, B_END)` whose end is not
/// page-aligned.
const A_END: u64 = 0x10_0000;
const B_START: u64 = 0x11_0000;
const B_END: u64 = 0x12_0800;
/// The rings (at most 0x1a10 bytes for 256 entries), then indirect tables.
const RING: u64 = 0;
const INDIRECT: (u64, u64) = (0x2000, 0x1_0000);
/// Each chain's request and response buffers.
const REQUESTS: u64 = 0x1_0000;
const REQUEST_STRIDE: u64 = 0x3100;
const RESPONSES: u64 = 0x3_0000;
const RESPONSE_STRIDE: u64 = 0x400;
const MAX_CHAINS: usize = 8;
/// What response buffers hold before the device writes.
const UNTOUCHED: u8 = 0xee;
/// Whole pages a record may name: region A's, then region B's.
/// The guest page, as a guest address's type.
const PAGE: u64 = PAGE_SIZE as u64;
const PAGES_A: u64 = A_END / PAGE;
const PAGES_B: u64 = (B_END - B_START) / PAGE;

#[derive(Arbitrary, Debug)]
struct Input {
    /// See `samepage_fuzz::queue_size`.
    queue_size: u8,
    /// The driver accepted `F_HOST_HASH`: hash fields must not reach the merger.
    host_hash: bool,
    #[arbitrary(with = counted::<_, 1, MAX_CHAINS>)]
    chains: Vec<ChainSpec>,
    /// The merger's answers, used in turn (`% 9`: a status, or 8 to leave the default).
    answers: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct ChainSpec {
    /// 0..=127 ADDED, 128..=251 REMOVED, others an unknown type.
    kind: u8,
    #[arbitrary(with = counted::<_, 1, 256>)]
    records: Vec<RecordSpec>,
    /// Where the request and the response are split into descriptors.
    request_cuts: Vec<u16>,
    response_cuts: Vec<u8>,
    /// Writable bytes beyond the `4 + nr_records` the response needs.
    response_spare: u8,
    indirect: bool,
    /// Serve the queue once this chain is in it.
    notify: bool,
    /// Faults apply when this is 216 or more.
    fault_roll: u8,
    faults: Vec<Fault>,
}

#[derive(Arbitrary, Debug)]
struct RecordSpec {
    page: u16,
    hash: [u8; 4],
    /// For REMOVED: whether FILE_PAGE is set.
    file_page: bool,
    /// The record is bad when this is 208 or more.
    bad_roll: u8,
    bad: BadRecord,
}

#[derive(Arbitrary, Debug)]
enum BadRecord {
    Unaligned(u16),
    Gpa(u64),
    /// The page starting in region B that runs past its end.
    Straddle,
    /// A page in the hole between the regions.
    Hole(u8),
    Flags(u32),
    Reserved(u32),
}

#[derive(Arbitrary, Debug)]
enum Fault {
    Chain(ChainFault),
    /// `nr_records` other than the records sent.
    Count(u32),
    Type(u32),
    /// Drop or add bytes at the end of the request.
    RequestLen(i16),
    /// A writable part of this length instead.
    ResponseLen(u16),
}

/// One call of the merger.
struct Call {
    kind: ReportKind,
    hashing: Hashing,
    reports: Vec<PageReport>,
    answered: Vec<RecordStatus>,
}

/// A merger that checks what the device hands it and answers from the input.
struct CheckingMerger {
    answers: Vec<u8>,
    next_answer: usize,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl PageMerger for CheckingMerger {
    fn merge_batch(
        &mut self,
        kind: ReportKind,
        hashing: Hashing,
        reports: &[PageReport],
        statuses: &mut [RecordStatus],
    ) {
        assert!(!reports.is_empty(), "merger called without reports");
        assert!(reports.len() <= MAX_RECORDS as usize);
        assert_eq!(reports.len(), statuses.len(), "one status per report");
        let fill = match kind {
            ReportKind::Added => RecordStatus::Off,
            ReportKind::Removed => RecordStatus::Done,
        };
        for (r, s) in reports.iter().zip(statuses.iter_mut()) {
            assert!(page_in_ram(r.gpa), "gpa {:#x} reached the merger", r.gpa);
            assert_eq!(*s, fill, "statuses arrive filled with {fill:?}");
            let answer = match self.answers.get(self.next_answer % self.answers.len().max(1)) {
                Some(&b) => RecordStatus::ALL.get(usize::from(b % 9)).copied(),
                None if kind == ReportKind::Added => Some(RecordStatus::Merged),
                None => None,
            };
            self.next_answer += 1;
            if let Some(a) = answer {
                *s = a;
            }
        }
        let call = Call { kind, hashing, reports: reports.to_vec(), answered: statuses.to_vec() };
        self.calls.lock().expect("calls").push(call);
    }
}

/// Whether `gpa` names a whole page of guest RAM (the device's rule, restated).
fn page_in_ram(gpa: u64) -> bool {
    let Some(end) = gpa.checked_add(PAGE) else { return false };
    gpa.is_multiple_of(PAGE) && (end <= A_END || (gpa >= B_START && end <= B_END))
}

fn shape_ok(kind: ReportKind, r: &FphashRecord) -> bool {
    let flags_ok = match kind {
        ReportKind::Added => r.flags == FLAG_FILE_PAGE,
        ReportKind::Removed => r.flags & !FLAG_FILE_PAGE == 0,
    };
    flags_ok && r.reserved == 0
}

fn record(spec: &RecordSpec, kind: Option<ReportKind>) -> FphashRecord {
    let page = u64::from(spec.page) % (PAGES_A + PAGES_B);
    let gpa = if page < PAGES_A { page * PAGE } else { B_START + (page - PAGES_A) * PAGE };
    let mut hash = [0u8; 32];
    hash[..4].copy_from_slice(&spec.hash);
    let flags = if kind == Some(ReportKind::Removed) && !spec.file_page { 0 } else { FLAG_FILE_PAGE };
    let mut r = FphashRecord { gpa, hash, flags, reserved: 0 };
    if spec.bad_roll >= 208 {
        match spec.bad {
            BadRecord::Unaligned(o) => r.gpa += u64::from(o % 4095) + 1,
            BadRecord::Gpa(g) => r.gpa = g,
            BadRecord::Straddle => r.gpa = B_END & !(PAGE - 1),
            BadRecord::Hole(p) => r.gpa = A_END + u64::from(p) % ((B_START - A_END) / PAGE) * PAGE,
            BadRecord::Flags(f) => r.flags = f,
            BadRecord::Reserved(v) => r.reserved = v,
        }
    }
    r
}

fn wire_type(kind: u8) -> u32 {
    match kind {
        0..=127 => TYPE_ADDED,
        128..=251 => TYPE_REMOVED,
        252 => 0,
        253 => 3,
        254 => u32::MAX,
        255 => 0x100 | TYPE_ADDED,
    }
}

/// What a chain without faults must get.
enum Expected {
    Rejected,
    /// Rejected for its length: answered in the descriptors the device kept (the first ones
    /// and the last), or not at all if they hold fewer than 4 writable bytes.
    OverLong,
    Answered {
        nr_records: usize,
        kind: ReportKind,
        records: Vec<FphashRecord>,
    },
}

/// One chain as built.
struct Built {
    response: u64,
    response_len: u64,
    expected: Expected,
    faulty: bool,
}

fn build(mem: &GuestMemoryMmap, i: usize, spec: &ChainSpec) -> (Vec<samepage_fuzz::Desc>, Built) {
    let mut report_type = wire_type(spec.kind);
    let kind = ReportKind::from_wire(report_type);
    let records: Vec<FphashRecord> =
        spec.records.iter().take(MAX_RECORDS as usize).map(|r| record(r, kind)).collect();
    let faults: &[Fault] = if spec.fault_roll >= 216 { &spec.faults } else { &[] };
    let mut nr_records = records.len() as u32;
    let mut request_delta = 0i64;
    let mut response_len = 4 + u64::from(nr_records) + u64::from(spec.response_spare);
    let mut chain_faults = Vec::new();
    for f in faults {
        match *f {
            // A buffer in the rings would let the device rewrite them: the driver's own
            // doing, which proves nothing about the device.
            Fault::Chain(ChainFault::Addr(i, a)) if a < INDIRECT.1 => {
                chain_faults.push(ChainFault::Addr(i, a + INDIRECT.1))
            }
            Fault::Chain(c) => chain_faults.push(c),
            Fault::Count(n) => nr_records = n,
            Fault::Type(t) => report_type = t,
            Fault::RequestLen(d) => request_delta = i64::from(d),
            Fault::ResponseLen(l) => response_len = u64::from(l).min(RESPONSE_STRIDE),
        }
    }
    let mut request = FphashHeader { report_type, nr_records }.to_bytes().to_vec();
    for r in &records {
        request.extend_from_slice(&r.to_bytes());
    }
    let request_len = (request.len() as i64 + request_delta).clamp(0, REQUEST_STRIDE as i64) as usize;
    request.resize(request_len, 0);
    let request_addr = REQUESTS + i as u64 * REQUEST_STRIDE;
    mem.write_slice(&request, GuestAddress(request_addr)).expect("request buffer");
    let response = RESPONSES + i as u64 * RESPONSE_STRIDE;
    mem.write_slice(&[UNTOUCHED; RESPONSE_STRIDE as usize], GuestAddress(response)).expect("response buffer");

    let mut parts: Vec<Part> = split(request_addr, request.len() as u32, &spec.request_cuts, false);
    let response_cuts: Vec<u16> = spec.response_cuts.iter().map(|&c| u16::from(c)).collect();
    parts.extend(split(response, response_len as u32, &response_cuts, true));
    let mut chain = linked(&parts);
    apply_faults(&mut chain, &chain_faults);

    let expected = match kind {
        _ if parts.len() > MAX_CHAIN_LEN => Expected::OverLong,
        Some(kind) if !records.is_empty() => Expected::Answered { nr_records: records.len(), kind, records },
        _ => Expected::Rejected,
    };
    (chain, Built { response, response_len, expected, faulty: !faults.is_empty() })
}

/// The device under test and the driver's view of it.
struct Run {
    mem: GuestMemoryMmap,
    ring: Ring,
    queue: virtio_queue::Queue,
    dev: FphashDevice,
    host_hash: bool,
    stats: Arc<FphashStats>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Chains in the queue, not served yet.
    group: Vec<Built>,
    /// Chains served so far: where the group's used entries start.
    returned: u16,
    /// Merger calls before the group's.
    calls_before: usize,
}

impl Run {
    /// Builds chain `i` and queues it; when the queue is full, serves the chains in it first
    /// and reuses their descriptors, as a driver does.
    fn submit(&mut self, i: usize, spec: &ChainSpec) {
        let (chain, built) = build(&self.mem, i, spec);
        if self.ring.add_chain(&self.mem, &chain, spec.indirect) {
            self.group.push(built);
            return;
        }
        if self.group.is_empty() {
            return;
        }
        self.serve();
        // Serving may have let faulty chains write over this chain's buffers.
        let (chain, built) = build(&self.mem, i, spec);
        if self.ring.add_chain(&self.mem, &chain, spec.indirect) {
            self.group.push(built);
        }
    }

    /// Notifies the device, checks what it did with the group, and reuses the descriptors.
    fn serve(&mut self) {
        let before = self.stats.snapshot();
        let interrupt = self.dev.process_queue(0, &mut self.queue, &self.mem);

        // Every chain comes back, once, and the driver hears of it.
        let used_idx = self.ring.used_idx(&self.mem);
        let n = self.group.len();
        assert_eq!(used_idx, self.returned.wrapping_add(n as u16), "chains returned");
        assert_eq!(interrupt, n > 0);
        assert!(!self.dev.process_queue(0, &mut self.queue, &self.mem), "nothing new, no interrupt");
        assert_eq!(self.ring.used_idx(&self.mem), used_idx);

        let s = self.stats.snapshot();
        let by_status: u64 = RecordStatus::ALL.iter().map(|&st| s.status(st) - before.status(st)).sum();
        assert_eq!(by_status, s.records - before.records, "every answered record has one status: {s:?}");
        let (batches, rejected) = (s.batches - before.batches, s.rejected_batches - before.rejected_batches);
        let unanswered = s.unanswered - before.unanswered;
        assert!(batches + rejected <= n as u64 && unanswered <= n as u64, "{before:?} -> {s:?}");
        let calls = self.calls.lock().expect("calls");
        let calls = &calls[self.calls_before..];
        assert!(calls.len() as u64 <= batches + unanswered);
        for k in 0..n {
            let (_, len) = self.ring.used_elem(&self.mem, self.returned.wrapping_add(k as u16));
            assert!(len == 0 || (4..=4 + MAX_RECORDS).contains(&len), "used length {len}");
        }
        if !self.group.iter().any(|b| b.faulty) {
            let want_unanswered =
                check_exact(&self.mem, &self.ring, &self.group, self.returned, calls, self.host_hash);
            let answered =
                self.group.iter().filter(|b| matches!(b.expected, Expected::Answered { .. })).count() as u64;
            let want = (answered, n as u64 - answered, want_unanswered);
            assert_eq!((batches, rejected, unanswered), want, "{before:?} -> {s:?}");
        }
        self.calls_before += calls.len();
        self.returned = used_idx;
        self.group.clear();
        self.ring.reclaim();
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory(&[(0, A_END as usize), (B_START, (B_END - B_START) as usize)]);
    let ring = Ring::new(&mem, RING, queue_size(input.queue_size), INDIRECT);
    let queue = ring.queue();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let merger = CheckingMerger { answers: input.answers.clone(), next_answer: 0, calls: calls.clone() };
    let mut dev = FphashDevice::new(Box::new(merger));
    if input.host_hash {
        let features = VIRTIO_F_VERSION_1 | F_HOST_HASH;
        dev.features_accepted(features);
        dev.activate(features, &[true]).expect("activation with the queue ready");
    }
    let (stats, host_hash, group) = (dev.stats(), input.host_hash, Vec::new());
    let mut run = Run { mem, ring, queue, dev, host_hash, stats, calls, group, returned: 0, calls_before: 0 };
    for (i, spec) in input.chains.iter().enumerate() {
        run.submit(i, spec);
        if spec.notify || i + 1 == input.chains.len() {
            run.serve();
        }
    }
});

/// Chains without faults: every answer as `docs/fphash.md` says. Returns how many went
/// unanswered.
fn check_exact(
    mem: &GuestMemoryMmap,
    ring: &Ring,
    built: &[Built],
    first: u16,
    calls: &[Call],
    host_hash: bool,
) -> u64 {
    let mut calls = calls.iter();
    let mut unanswered = 0;
    for (i, b) in built.iter().enumerate() {
        let (_, used) = ring.used_elem(mem, first.wrapping_add(i as u16));
        let response = read_bytes(mem, b.response, RESPONSE_STRIDE as usize);
        let (written, want_status) = match &b.expected {
            Expected::Rejected => (4, BATCH_BAD_REQUEST),
            Expected::OverLong => {
                assert!(used == 0 || used == 4, "chain {i}: over-long chain used {used}");
                unanswered += u64::from(used == 0);
                continue;
            }
            Expected::Answered { nr_records, kind, records } => {
                let good: Vec<&FphashRecord> =
                    records.iter().filter(|r| shape_ok(*kind, r) && page_in_ram(r.gpa)).collect();
                let mut answers = None;
                if !good.is_empty() {
                    let call = calls.next().expect("a merger call for a batch with good records");
                    assert_eq!(call.kind, *kind);
                    let sent: Vec<u64> = call.reports.iter().map(|r| r.gpa).collect();
                    assert_eq!(sent, good.iter().map(|r| r.gpa).collect::<Vec<_>>(), "reports in order");
                    let hashing = match kind {
                        ReportKind::Added if host_hash => Hashing::Host,
                        _ => Hashing::Guest,
                    };
                    assert_eq!(call.hashing, hashing);
                    // With F_HOST_HASH no hash field goes further than the device.
                    let hash = |r: &FphashRecord| if host_hash { [0; 32] } else { r.hash };
                    assert!(call.reports.iter().zip(&good).all(|(p, r)| p.hash == hash(r)));
                    answers = Some(call.answered.iter());
                }
                for (j, r) in records.iter().enumerate() {
                    let want = if !shape_ok(*kind, r) {
                        RecordStatus::BadRecord
                    } else if !page_in_ram(r.gpa) {
                        RecordStatus::BadGpa
                    } else {
                        *answers.as_mut().and_then(|a| a.next()).expect("an answer per good record")
                    };
                    assert_eq!(response[4 + j], want.as_byte(), "chain {i} record {j}: {r:?}");
                }
                (4 + nr_records, BATCH_OK)
            }
        };
        assert_eq!(used as usize, written, "chain {i} used length");
        assert_eq!(response[..4], want_status.to_le_bytes(), "chain {i} batch status");
        let spare = &response[written..b.response_len as usize];
        assert!(spare.iter().all(|&x| x == UNTOUCHED), "chain {i}: wrote past the response");
    }
    assert!(calls.next().is_none(), "merger calls for no batch");
    unanswered
}
