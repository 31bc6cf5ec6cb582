//! virtio-balloon end to end: inflate and deflate PFN arrays, free page reports, statistics
//! buffers and statistics requests as descriptor chains in split virtqueues on guest memory
//! (virtio 1.2 §5.5), with target changes and configuration accesses in between, served by
//! `Balloon` into a backend that checks the device's side of the `BalloonBackend` contract.
//!
//! Most chains are well framed and predicted exactly against a model of guest RAM: which
//! ranges reach the backend (coalesced, in one region each), which chains come back unused,
//! the statistics the VMM reads, and every counter. Chains with faults (loops, bad links,
//! buffers anywhere, flipped directions, over-long chains) are checked for what holds for any
//! chain: every chain returned once, one counter per chain, and a backend that only ever sees
//! aligned ranges of guest RAM.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{apply_faults, counted, guest_memory, linked, queue_size, ChainFault, Desc, Part, Ring};
use samepage_virtio::balloon::wire::{
    config_bytes, GuestMemoryStats, CONFIG_ACTUAL, CONFIG_LEN, F_DEFLATE_ON_OOM, F_PAGE_REPORTING,
    F_STATS_VQ, PFN_PAGE, STAT_LEN,
};
use samepage_virtio::balloon::{
    Balloon, BalloonBackend, BalloonConfig, BalloonCountersSnapshot, BalloonHandle, Discard, GuestRange,
    MAX_CHAIN_DESCS, MAX_PFNS, MAX_STATS_BYTES,
};
use samepage_virtio::interrupt::INTERRUPT_STATUS_CONFIG_CHANGE;
use samepage_virtio::{EventFdInterrupt, InterruptTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: region A `[0, A_END)`, a hole, region B `[B_START, B_MID)` and, right after it,
/// region C `[B_MID, B_END)`, whose last page is cut short. Ranges never span B and C: they
/// are two host mappings.
const A_END: u64 = 0x10_0000;
const B_START: u64 = 0x11_0000;
const B_MID: u64 = 0x11_8000;
const B_END: u64 = 0x12_0800;
/// Queue `i`'s rings at `i * RING_STRIDE` (at most 0x1a10 bytes for 256 entries), its
/// indirect tables at `INDIRECT + i * RING_STRIDE`.
const RING_STRIDE: u64 = 0x2000;
const INDIRECT: u64 = 0x8000;
/// Op `i`'s buffer (PFN array or statistics).
const BUFS: u64 = 0x1_0000;
const BUF_STRIDE: u64 = 0x1200;
const MAX_OPS: usize = 24;
/// Whole pages of RAM: region A's, then those of regions B and C.
const PAGES_A: u64 = A_END / PFN_PAGE;
const PAGES_B: u64 = (B_END - B_START) / PFN_PAGE;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bits 0-2: the device offers statistics, deflate-on-OOM, reporting.
    offer: u8,
    /// Which offered features the driver accepts (same bits).
    accept: u8,
    /// See `samepage_fuzz::queue_size`.
    queue_sizes: [u8; 4],
    #[arbitrary(with = counted::<_, 1, MAX_OPS>)]
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Pfns(PfnChain),
    Report(ReportChain),
    Stats(StatsChain),
    RequestStats,
    SetTarget(u32),
    ConfigWrite {
        offset: u8,
        data: Vec<u8>,
    },
    ConfigRead {
        offset: u8,
        width: u8,
    },
    /// Serve a queue index that has no role.
    Unused(u8),
}

#[derive(Arbitrary, Debug)]
struct PfnChain {
    deflate: bool,
    #[arbitrary(with = counted::<_, 0, 1100>)]
    pfns: Vec<PfnSpec>,
    /// Where the array is split (multiples of 4 bytes), and one cut anywhere when
    /// `odd_cut` is some.
    cuts: Vec<u16>,
    odd_cut: Option<u16>,
    common: Common,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PfnSpec {
    /// A page of RAM.
    Page(u16),
    /// Around the regions' ends and the hole.
    Near(u16),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct ReportChain {
    #[arbitrary(with = counted::<_, 1, 300>)]
    ranges: Vec<RangeSpec>,
    common: Common,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct RangeSpec {
    /// 0..=191 a valid range, ..=223 near the regions' ends, else `addr` and `len` as given.
    roll: u8,
    page: u16,
    pages: u8,
    addr: u64,
    len: u32,
}

#[derive(Arbitrary, Debug)]
struct StatsChain {
    #[arbitrary(with = counted::<_, 0, 110>)]
    entries: Vec<(u8, u16, u64)>,
    trailing: u8,
    cuts: Vec<u16>,
    common: Common,
}

#[derive(Arbitrary, Debug)]
struct Common {
    indirect: bool,
    /// Serve the queue once this chain is in it (statistics chains are served at once).
    notify: bool,
    /// Faults apply when this is 224 or more.
    fault_roll: u8,
    faults: Vec<ChainFault>,
}

impl Common {
    fn faults(&self) -> &[ChainFault] {
        if self.fault_roll >= 224 {
            &self.faults
        } else {
            &[]
        }
    }
}

/// Whether `[gpa, gpa + len)` is non-empty, 4 KiB-aligned and inside one region: the
/// device's rule, restated.
fn range_ok(gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else { return false };
    len > 0
        && gpa.is_multiple_of(PFN_PAGE)
        && len.is_multiple_of(PFN_PAGE)
        && (end <= A_END || (gpa >= B_START && end <= B_MID) || (gpa >= B_MID && end <= B_END))
}

/// The `i`th whole page of RAM.
fn page_gpa(i: u64) -> u64 {
    let i = i % (PAGES_A + PAGES_B);
    if i < PAGES_A {
        i * PFN_PAGE
    } else {
        B_START + (i - PAGES_A) * PFN_PAGE
    }
}

/// Coalesced ranges of a set of page addresses: runs of pages, split where a region ends.
fn runs(pages: &BTreeSet<u64>) -> Vec<GuestRange> {
    let mut out: Vec<GuestRange> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(last) if last.end() == p && p != B_MID => last.len += PFN_PAGE,
            _ => out.push(GuestRange { gpa: p, len: PFN_PAGE }),
        }
    }
    out
}

/// What a chain without faults must get.
#[derive(Debug)]
enum Expected {
    /// Returned unused; no backend call.
    Rejected,
    /// Served: the backend gets `ranges` if there are any.
    Served { ranges: Vec<GuestRange>, invalid: u64 },
}

/// One chain waiting in a queue.
struct Pending {
    expected: Option<Expected>,
}

/// A queue as the driver sees it.
struct Lane {
    index: usize,
    ring: Ring,
    queue: virtio_queue::Queue,
    group: Vec<Pending>,
    returned: u16,
}

type Calls = Arc<Mutex<Vec<(Vec<GuestRange>, Option<Discard>)>>>;

/// A backend that checks every call against the contract and records it.
struct CheckingBackend(Calls);

impl CheckingBackend {
    fn check(ranges: &[GuestRange]) {
        assert!(!ranges.is_empty(), "backend called without ranges");
        for r in ranges {
            assert!(range_ok(r.gpa, r.len), "{r:?} reached the backend");
        }
        for w in ranges.windows(2) {
            // Sorted, apart, or touching only where two regions meet (two host mappings).
            assert!(w[0].end() < w[1].gpa || (w[0].end() == w[1].gpa && w[1].gpa == B_MID), "{w:?}");
        }
    }
}

impl BalloonBackend for CheckingBackend {
    fn discard(&mut self, ranges: &[GuestRange], why: Discard) {
        Self::check(ranges);
        self.0.lock().expect("calls").push((ranges.to_vec(), Some(why)));
    }
    fn reclaim(&mut self, ranges: &[GuestRange]) {
        Self::check(ranges);
        self.0.lock().expect("calls").push((ranges.to_vec(), None));
    }
}

/// The device under test, the driver's queues and the model.
struct Run {
    mem: GuestMemoryMmap,
    dev: Balloon,
    handle: BalloonHandle,
    irq: Arc<EventFdInterrupt>,
    calls: Calls,
    /// The inflateq, deflateq, statsq and reporting_vq, as far as they were negotiated.
    lanes: [Option<Lane>; 4],
    roles: usize,
    /// Statistics chains the device holds (0 or 1) and the statistics the VMM should read,
    /// `None` inside when unknown (a faulty buffer came).
    held: bool,
    model_stats: Option<Option<GuestMemoryStats>>,
    target: u32,
    actual: [u8; 4],
}

fn pfn_of(spec: PfnSpec) -> u32 {
    match spec {
        PfnSpec::Page(p) => (page_gpa(u64::from(p)) / PFN_PAGE) as u32,
        PfnSpec::Near(n) => {
            let edges = [A_END, B_START, B_MID, B_END];
            let edge = (edges[usize::from(n) % edges.len()] / PFN_PAGE) as u32;
            (edge + u32::from(n / 4) % 8).wrapping_sub(4)
        }
        PfnSpec::Any(v) => v,
    }
}

fn build_pfns(mem: &GuestMemoryMmap, i: usize, spec: &PfnChain) -> (Vec<Desc>, Option<Expected>) {
    let pfns: Vec<u32> = spec.pfns.iter().map(|&p| pfn_of(p)).collect();
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let addr = BUFS + i as u64 * BUF_STRIDE;
    mem.write_slice(&bytes, GuestAddress(addr)).expect("PFN buffer");
    let len = bytes.len() as u32;
    let mut points: Vec<u32> =
        spec.cuts.iter().map(|&c| u32::from(c) % (pfns.len() as u32 + 1) * 4).collect();
    points.extend(spec.odd_cut.map(|c| u32::from(c) % (len + 1)));
    points.sort_unstable();
    let mut parts: Vec<Part> = Vec::new();
    let mut at = 0;
    for p in points.into_iter().chain([len]) {
        parts.push((addr + u64::from(at), p - at, false));
        at = p;
    }
    let mut chain = linked(&parts);
    apply_faults(&mut chain, spec.common.faults());
    let expected = spec.common.faults().is_empty().then(|| {
        if parts.len() > MAX_CHAIN_DESCS || parts.iter().any(|p| p.1 % 4 != 0) || pfns.len() > MAX_PFNS {
            return Expected::Rejected;
        }
        let good: BTreeSet<u64> =
            pfns.iter().map(|&p| u64::from(p) * PFN_PAGE).filter(|&g| range_ok(g, PFN_PAGE)).collect();
        let invalid = pfns.iter().filter(|&&p| !range_ok(u64::from(p) * PFN_PAGE, PFN_PAGE)).count();
        Expected::Served { ranges: runs(&good), invalid: invalid as u64 }
    });
    (chain, expected)
}

fn range_of(s: RangeSpec) -> (u64, u32) {
    let pages = u64::from(s.pages);
    match s.roll {
        0..=191 => {
            let gpa = page_gpa(u64::from(s.page));
            let region_end = match gpa {
                g if g < A_END => A_END,
                g if g < B_MID => B_MID,
                _ => B_END & !(PFN_PAGE - 1),
            };
            let room = region_end - gpa;
            (gpa, (PFN_PAGE * (1 + pages % 32)).min(room) as u32)
        }
        192..=223 => {
            let edges = [A_END, B_START, B_MID, B_END & !(PFN_PAGE - 1), B_END, A_END + PFN_PAGE];
            let edge = edges[usize::from(s.page) % edges.len()];
            (edge - PFN_PAGE * (pages % 3), (PFN_PAGE * (1 + pages % 4)) as u32)
        }
        _ => (s.addr, s.len),
    }
}

fn build_report(spec: &ReportChain) -> (Vec<Desc>, Option<Expected>) {
    let parts: Vec<Part> = spec.ranges.iter().map(|&s| range_of(s)).map(|(a, l)| (a, l, true)).collect();
    let mut chain = linked(&parts);
    apply_faults(&mut chain, spec.common.faults());
    let expected = spec.common.faults().is_empty().then(|| {
        // virtio-queue ends a chain past 4 GiB (virtio 1.2 §2.7.5.2), which leaves it broken.
        let total: u64 = parts.iter().map(|p| u64::from(p.1)).sum();
        if parts.len() > MAX_CHAIN_DESCS || total > u64::from(u32::MAX) {
            return Expected::Rejected;
        }
        let mut good = BTreeSet::new();
        let mut invalid = 0;
        for &(gpa, len, _) in &parts {
            if range_ok(gpa, u64::from(len)) {
                good.extend((0..u64::from(len) / PFN_PAGE).map(|k| gpa + k * PFN_PAGE));
            } else {
                invalid += 1;
            }
        }
        Expected::Served { ranges: runs(&good), invalid }
    });
    (chain, expected)
}

impl Run {
    /// Queues a chain on lane `which` (0 inflate, 1 deflate, 3 reporting), serving the lane
    /// first if it is full.
    fn submit(&mut self, which: usize, chain: &[Desc], expected: Option<Expected>, common: &Common) {
        let Some(lane) = self.lanes[which].as_mut() else { return };
        if !lane.ring.add_chain(&self.mem, chain, common.indirect) {
            self.serve(which);
            let Some(lane) = self.lanes[which].as_mut() else { return };
            if !lane.ring.add_chain(&self.mem, chain, common.indirect) {
                return;
            }
        }
        let Some(lane) = self.lanes[which].as_mut() else { return };
        lane.group.push(Pending { expected });
        if common.notify {
            self.serve(which);
        }
    }

    /// Serves lane `which` and checks what came back.
    fn serve(&mut self, which: usize) {
        let before = self.handle.counters();
        let calls_before = self.calls.lock().expect("calls").len();
        let mem = &self.mem;
        let Some(lane) = self.lanes[which].as_mut() else { return };
        let interrupt = self.dev.process_queue(lane.index, &mut lane.queue, mem);
        let n = lane.group.len();
        let used_idx = lane.ring.used_idx(mem);
        assert_eq!(used_idx, lane.returned.wrapping_add(n as u16), "every chain returned once");
        assert_eq!(interrupt, n > 0);
        for k in 0..n {
            let (_, len) = lane.ring.used_elem(mem, lane.returned.wrapping_add(k as u16));
            assert_eq!(len, 0, "the device writes nothing");
        }
        let after = self.handle.counters();
        let served = match which {
            0 => after.inflate_requests - before.inflate_requests,
            1 => after.deflate_requests - before.deflate_requests,
            _ => after.reports - before.reports,
        };
        assert_eq!(
            served + after.rejected_chains - before.rejected_chains,
            n as u64,
            "one verdict per chain"
        );
        let calls = self.calls.lock().expect("calls");
        let calls = &calls[calls_before..];
        let kind = match which {
            0 => Some(Discard::Inflated),
            1 => None,
            _ => Some(Discard::Reported),
        };
        assert!(calls.iter().all(|c| c.1 == kind), "{calls:?} on lane {which}");
        if lane.group.iter().all(|p| p.expected.is_some()) {
            let mut want = BalloonCountersSnapshot::default();
            let mut want_calls = Vec::new();
            for p in &lane.group {
                match p.expected.as_ref() {
                    Some(Expected::Served { ranges, invalid }) => {
                        let (requests, pages, invalids) = match which {
                            0 => {
                                (&mut want.inflate_requests, &mut want.inflated_pages, &mut want.invalid_pfns)
                            }
                            1 => {
                                (&mut want.deflate_requests, &mut want.deflated_pages, &mut want.invalid_pfns)
                            }
                            _ => (&mut want.reports, &mut want.reported_pages, &mut want.invalid_ranges),
                        };
                        *requests += 1;
                        *pages += ranges.iter().map(GuestRange::pages).sum::<u64>();
                        *invalids += invalid;
                        if !ranges.is_empty() {
                            want_calls.push(ranges.clone());
                        }
                    }
                    Some(Expected::Rejected) | None => want.rejected_chains += 1,
                }
            }
            let got: Vec<Vec<GuestRange>> = calls.iter().map(|c| c.0.clone()).collect();
            assert_eq!(got, want_calls, "backend calls on lane {which}");
            assert_eq!(delta(&before, &after), want, "counters on lane {which}");
        }
        lane.returned = used_idx;
        lane.group.clear();
        lane.ring.reclaim();
    }

    fn stats_chain(&mut self, i: usize, spec: &StatsChain) {
        let Some(lane) = self.lanes[2].as_mut() else { return };
        if self.held && lane.ring.size() == 1 {
            return;
        }
        let mut bytes = Vec::new();
        let mut model = GuestMemoryStats::default();
        let mut unknown = 0;
        for &(roll, tag, val) in &spec.entries {
            let tag = if roll < 200 { tag % 16 } else { tag };
            bytes.extend_from_slice(&tag.to_le_bytes());
            bytes.extend_from_slice(&val.to_le_bytes());
            unknown += u64::from(!model.set(tag, val));
        }
        let trailing = usize::from(spec.trailing) % STAT_LEN;
        bytes.resize(bytes.len() + trailing, 0xa5);
        let addr = BUFS + i as u64 * BUF_STRIDE;
        self.mem.write_slice(&bytes, GuestAddress(addr)).expect("stats buffer");
        let parts = samepage_fuzz::split(addr, bytes.len() as u32, &spec.cuts, false);
        let mut chain = linked(&parts);
        let faults = spec.common.faults();
        apply_faults(&mut chain, faults);
        if !lane.ring.add_chain(&self.mem, &chain, spec.common.indirect) {
            return;
        }
        let before = self.handle.counters();
        let interrupt = self.dev.process_queue(lane.index, &mut lane.queue, &self.mem);
        let after = self.handle.counters();
        let was_held = std::mem::replace(&mut self.held, true);
        assert_eq!(interrupt, was_held, "an older buffer comes back at once");
        assert_eq!(lane.ring.used_idx(&self.mem), lane.returned.wrapping_add(u16::from(was_held)));
        lane.returned = lane.ring.used_idx(&self.mem);
        let d = delta(&before, &after);
        assert_eq!((d.stats_buffers, d.stats_extra_buffers), (1, u64::from(was_held)));
        if !faults.is_empty() {
            // What a faulty buffer leaves in the statistics is anyone's guess.
            self.model_stats = None;
            return;
        }
        let extra = u64::from(was_held);
        let mut want =
            BalloonCountersSnapshot { stats_buffers: 1, stats_extra_buffers: extra, ..Default::default() };
        if parts.len() > MAX_CHAIN_DESCS || bytes.len() > MAX_STATS_BYTES {
            want.stats_rejected = 1;
        } else {
            want.stats_odd_lengths = u64::from(trailing > 0);
            want.stats_unknown_tags = unknown;
            self.model_stats = Some(Some(model));
        }
        assert_eq!(d, want, "statistics counters");
        if let Some(stats) = self.model_stats {
            assert_eq!(self.handle.guest_stats(), stats, "statistics the VMM reads");
        }
    }

    fn request_stats(&mut self) {
        let q = self.handle.request_stats();
        assert_eq!(q.map(|q| q as usize), self.lanes[2].as_ref().map(|l| l.index));
        let Some(lane) = self.lanes[2].as_mut() else { return };
        let before = self.handle.counters();
        let interrupt = self.dev.process_queue(lane.index, &mut lane.queue, &self.mem);
        let was_held = std::mem::replace(&mut self.held, false);
        assert_eq!(interrupt, was_held);
        assert_eq!(lane.ring.used_idx(&self.mem), lane.returned.wrapping_add(u16::from(was_held)));
        lane.returned = lane.ring.used_idx(&self.mem);
        assert_eq!(delta(&before, &self.handle.counters()).stats_requests, u64::from(was_held));
        if !was_held {
            // Nothing is in the device's hands: the driver may reuse every slot.
            lane.ring.reclaim();
        }
    }

    fn config(&mut self, op: &Op) {
        match *op {
            Op::SetTarget(v) => {
                let changed = v != self.target;
                self.handle.set_target_pages(v);
                self.target = v;
                let raised = self.irq.status() & INTERRUPT_STATUS_CONFIG_CHANGE != 0;
                assert_eq!(raised, changed, "a configuration change interrupt iff the target changed");
                self.irq.ack(INTERRUPT_STATUS_CONFIG_CHANGE);
                assert_eq!(self.handle.target_pages(), v);
            }
            Op::ConfigWrite { offset, ref data } => {
                let offset = u64::from(offset % 20);
                let data = &data[..data.len().min(8)];
                let before = self.handle.counters().config_writes_ignored;
                self.dev.write_config(offset, data);
                let start = CONFIG_ACTUAL;
                let ok = !data.is_empty() && offset >= start && offset + data.len() as u64 <= start + 4;
                if ok {
                    let at = (offset - start) as usize;
                    self.actual[at..at + data.len()].copy_from_slice(data);
                }
                assert_eq!(self.handle.counters().config_writes_ignored - before, u64::from(!ok));
                assert_eq!(self.handle.actual_pages(), u32::from_le_bytes(self.actual));
            }
            Op::ConfigRead { offset, width } => {
                let offset = u64::from(offset % 20);
                let width = [1, 2, 4, 8][usize::from(width % 4)];
                let mut got = [0xeeu8; 8];
                self.dev.read_config(offset, &mut got[..width]);
                let space = config_bytes(self.target, u32::from_le_bytes(self.actual));
                for (k, &b) in got[..width].iter().enumerate() {
                    let want = space.get(offset as usize + k).copied().unwrap_or(0);
                    assert_eq!(b, want, "config byte {}", offset as usize + k);
                }
                assert_eq!(space.len(), CONFIG_LEN);
            }
            _ => {}
        }
    }
}

/// `after - before`, counter by counter (each may only grow).
fn delta(before: &BalloonCountersSnapshot, after: &BalloonCountersSnapshot) -> BalloonCountersSnapshot {
    let d = |a: u64, b: u64| a.checked_sub(b).expect("a counter went down");
    let (a, b) = (after, before);
    BalloonCountersSnapshot {
        inflate_requests: d(a.inflate_requests, b.inflate_requests),
        inflated_pages: d(a.inflated_pages, b.inflated_pages),
        deflate_requests: d(a.deflate_requests, b.deflate_requests),
        deflated_pages: d(a.deflated_pages, b.deflated_pages),
        reports: d(a.reports, b.reports),
        reported_pages: d(a.reported_pages, b.reported_pages),
        rejected_chains: d(a.rejected_chains, b.rejected_chains),
        invalid_pfns: d(a.invalid_pfns, b.invalid_pfns),
        invalid_ranges: d(a.invalid_ranges, b.invalid_ranges),
        stats_buffers: d(a.stats_buffers, b.stats_buffers),
        stats_requests: d(a.stats_requests, b.stats_requests),
        stats_rejected: d(a.stats_rejected, b.stats_rejected),
        stats_odd_lengths: d(a.stats_odd_lengths, b.stats_odd_lengths),
        stats_unknown_tags: d(a.stats_unknown_tags, b.stats_unknown_tags),
        stats_extra_buffers: d(a.stats_extra_buffers, b.stats_extra_buffers),
        config_writes_ignored: d(a.config_writes_ignored, b.config_writes_ignored),
        unready_queue_uses: d(a.unready_queue_uses, b.unready_queue_uses),
        bad_avail_index: d(a.bad_avail_index, b.bad_avail_index),
        interrupt_errors: d(a.interrupt_errors, b.interrupt_errors),
    }
}

fn lane(mem: &GuestMemoryMmap, index: usize, size_byte: u8) -> Lane {
    let base = index as u64 * RING_STRIDE;
    let indirect = (INDIRECT + base, INDIRECT + base + RING_STRIDE);
    let ring = Ring::new(mem, base, queue_size(size_byte), indirect);
    let queue = ring.queue();
    Lane { index, ring, queue, group: Vec::new(), returned: 0 }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory(&[
        (0, A_END as usize),
        (B_START, (B_MID - B_START) as usize),
        (B_MID, (B_END - B_MID) as usize),
    ]);
    let config = BalloonConfig {
        stats: input.offer & 1 != 0,
        deflate_on_oom: input.offer & 2 != 0,
        free_page_reporting: input.offer & 4 != 0,
    };
    let calls = Calls::default();
    let irq = Arc::new(EventFdInterrupt::new().expect("eventfd"));
    let trigger: Arc<dyn InterruptTrigger> = irq.clone();
    let mut dev = Balloon::new(config, Box::new(CheckingBackend(calls.clone())), trigger);
    let offered = dev.device_features();
    let bits = [(1, F_STATS_VQ), (2, F_DEFLATE_ON_OOM), (4, F_PAGE_REPORTING)];
    let accepted =
        bits.iter().filter(|(b, _)| input.accept & b != 0).fold(VIRTIO_F_VERSION_1, |f, (_, x)| f | x);
    let acked = accepted & offered;
    dev.features_accepted(acked);
    let queues = dev.queue_max_sizes().len();
    dev.activate(acked, &vec![true; queues]).expect("activation with every queue ready");
    let handle = dev.handle();
    let mut index = 2;
    let mut next = |on: bool| {
        on.then(|| {
            index += 1;
            index - 1
        })
    };
    let stats_index = next(acked & F_STATS_VQ != 0);
    let reporting_index = next(acked & F_PAGE_REPORTING != 0);
    let roles = index;
    let sizes = input.queue_sizes;
    let mut run = Run {
        lanes: [
            Some(lane(&mem, 0, sizes[0])),
            Some(lane(&mem, 1, sizes[1])),
            stats_index.map(|i| lane(&mem, i, sizes[i])),
            reporting_index.map(|i| lane(&mem, i, sizes[i])),
        ],
        mem,
        dev,
        handle,
        irq,
        calls,
        roles,
        held: false,
        model_stats: Some(None),
        target: 0,
        actual: [0; 4],
    };
    for (i, op) in input.ops.iter().enumerate() {
        match op {
            Op::Pfns(spec) => {
                let (chain, expected) = build_pfns(&run.mem, i, spec);
                run.submit(usize::from(spec.deflate), &chain, expected, &spec.common);
            }
            Op::Report(spec) => {
                let (chain, expected) = build_report(spec);
                run.submit(3, &chain, expected, &spec.common);
            }
            Op::Stats(spec) => run.stats_chain(i, spec),
            Op::RequestStats => run.request_stats(),
            Op::Unused(k) => {
                let before = run.handle.counters().unready_queue_uses;
                let mut q = virtio_queue::Queue::new(16).expect("queue");
                let index = run.roles + usize::from(*k % 4);
                assert!(!run.dev.process_queue(index, &mut q, &run.mem));
                assert_eq!(run.handle.counters().unready_queue_uses, before + 1);
            }
            op => run.config(op),
        }
    }
    for which in [0, 1, 3] {
        run.serve(which);
    }
});
