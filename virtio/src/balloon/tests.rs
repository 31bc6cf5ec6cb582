//! Balloon tests: chains driven through a mock split queue (virtio-queue's `test-utils`) into
//! a recording backend, hostile chains, PFNs, ranges and statistics included.

use std::sync::Mutex;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::wire::*;
use super::*;
use crate::interrupt::{EventFdInterrupt, INTERRUPT_STATUS_CONFIG_CHANGE};
use crate::test_chains::{linked, D};

/// Guest RAM: region A `[0, A_END)`, a hole `[A_END, B_START)` (like the MMIO gap), region B
/// `[B_START, B_END)`.
const A_END: u64 = 0x8_0000;
const B_START: u64 = 0x10_0000;
const B_END: u64 = 0x12_0000;
/// Where PFN arrays and statistics live (above the mock queue's rings).
const BUF: u64 = 0x8000;
/// A guest-physical address past the end of guest RAM.
const OUTSIDE: u64 = 0x1000_0000;

const ALL: BalloonConfig = BalloonConfig { stats: true, deflate_on_oom: true, free_page_reporting: true };
const ALL_FEATURES: u64 = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), A_END as usize),
        (GuestAddress(B_START), (B_END - B_START) as usize),
    ])
    .unwrap()
}

#[derive(Debug, PartialEq, Eq)]
enum Call {
    Discard(Vec<GuestRange>, Discard),
    Reclaim(Vec<GuestRange>),
}

type Calls = Arc<Mutex<Vec<Call>>>;

struct Recorder(Calls);

impl BalloonBackend for Recorder {
    fn discard(&mut self, ranges: &[GuestRange], why: Discard) {
        self.0.lock().unwrap().push(Call::Discard(ranges.to_vec(), why));
    }
    fn reclaim(&mut self, ranges: &[GuestRange]) {
        self.0.lock().unwrap().push(Call::Reclaim(ranges.to_vec()));
    }
}

struct Rig {
    dev: Balloon,
    handle: BalloonHandle,
    calls: Calls,
    irq: Arc<EventFdInterrupt>,
    mem: GuestMemoryMmap,
}

/// A device offering `config`, not yet activated.
fn rig(config: BalloonConfig) -> Rig {
    let calls = Calls::default();
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let dev = Balloon::new(config, Box::new(Recorder(calls.clone())), irq.clone());
    let handle = dev.handle();
    Rig { dev, handle, calls, irq, mem: mem() }
}

/// A device offering and running with everything.
fn running() -> Rig {
    let mut r = rig(ALL);
    r.start(ALL_FEATURES);
    r
}

/// What the device did with the chains of one service.
#[derive(Debug)]
struct Done {
    /// The used ring's index: how many chains came back.
    used_idx: u16,
    /// The used ring's first entry (head index, length), if any.
    used: Option<(u32, u32)>,
    interrupt: bool,
}

impl Rig {
    fn start(&mut self, features: u64) {
        self.dev.features_accepted(features);
        let ready = vec![true; self.dev.queue_max_sizes().len()];
        self.dev.activate(features, &ready).unwrap();
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn counters(&self) -> BalloonCountersSnapshot {
        self.handle.counters()
    }

    /// Puts `raw` in a fresh queue and serves it as queue `index`.
    fn serve_raw(&mut self, index: usize, raw: &[RawDescriptor]) -> Done {
        let mq = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        if !raw.is_empty() {
            mq.add_desc_chains(raw, 0).unwrap();
        }
        let mut queue: Queue = mq.create_queue().unwrap();
        let interrupt = self.dev.process_queue(index, &mut queue, &self.mem);
        used(&self.mem, &mq, interrupt)
    }

    fn serve(&mut self, index: usize, chain: &[D]) -> Done {
        self.serve_raw(index, &linked(chain))
    }

    /// Writes `pfns` at BUF and sends them in one readable descriptor on queue `index`.
    fn pfns(&mut self, index: usize, pfns: &[u32]) -> Done {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        self.serve(index, &[(BUF, bytes.len() as u32, false)])
    }
}

fn used(mem: &GuestMemoryMmap, mq: &MockSplitQueue<GuestMemoryMmap>, interrupt: bool) -> Done {
    let ring = mq.used_addr();
    let used_idx: u16 = mem.read_obj(ring.unchecked_add(2)).unwrap();
    let used = (used_idx > 0).then(|| {
        let id: u32 = mem.read_obj(ring.unchecked_add(4)).unwrap();
        let len: u32 = mem.read_obj(ring.unchecked_add(8)).unwrap();
        (id, len)
    });
    Done { used_idx, used, interrupt }
}

fn pages(gpa: u64, n: u64) -> GuestRange {
    GuestRange { gpa, len: n * PFN_PAGE }
}

fn pfn(gpa: u64) -> u32 {
    (gpa >> PFN_SHIFT) as u32
}

#[test]
fn identity_features_and_queue_counts() {
    for bits in 0..8u8 {
        let config = BalloonConfig {
            stats: bits & 1 != 0,
            deflate_on_oom: bits & 2 != 0,
            free_page_reporting: bits & 4 != 0,
        };
        let r = rig(config);
        assert_eq!(r.dev.device_type(), 5);
        let f = r.dev.device_features();
        assert_eq!(f & F_STATS_VQ != 0, config.stats);
        assert_eq!(f & F_DEFLATE_ON_OOM != 0, config.deflate_on_oom);
        assert_eq!(f & F_PAGE_REPORTING != 0, config.free_page_reporting);
        assert_eq!(f & (F_MUST_TELL_HOST | F_FREE_PAGE_HINT | F_PAGE_POISON), 0, "never offered");
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        let queues = 2 + usize::from(config.stats) + usize::from(config.free_page_reporting);
        assert_eq!(r.dev.queue_max_sizes(), vec![QUEUE_SIZE; queues]);
    }
    assert_eq!((F_STATS_VQ, F_DEFLATE_ON_OOM, F_PAGE_REPORTING), (1 << 1, 1 << 2, 1 << 5));
}

#[test]
fn queue_numbering_follows_negotiation() {
    let report = (A_END - 0x2000, 0x1000, true);
    // Stats and reporting offered, only reporting accepted: the reporting_vq is queue 2,
    // and queue 3 has no role.
    let mut r = rig(ALL);
    r.start(VIRTIO_F_VERSION_1 | F_PAGE_REPORTING);
    assert_eq!(r.handle.request_stats(), None);
    assert_eq!(r.serve(2, &[report]).used_idx, 1);
    assert_eq!(r.calls(), [Call::Discard(vec![pages(A_END - 0x2000, 1)], Discard::Reported)]);
    assert_eq!(r.serve(3, &[report]).used_idx, 0, "no queue 3");
    assert_eq!(r.counters().unready_queue_uses, 1);

    // Both accepted: statsq 2, reporting_vq 3.
    let mut r = running();
    assert_eq!(r.handle.request_stats(), Some(2));
    assert_eq!(r.serve(3, &[report]).used_idx, 1);
    assert_eq!(r.calls(), [Call::Discard(vec![pages(A_END - 0x2000, 1)], Discard::Reported)]);

    // A driver accepting bits the device did not offer gets no queue for them.
    let mut r = rig(BalloonConfig::default());
    r.start(ALL_FEATURES);
    assert_eq!(r.handle.request_stats(), None);
    assert_eq!(r.serve(2, &[report]).used_idx, 0);
}

#[test]
fn activation_needs_every_negotiated_queue() {
    let mut r = rig(ALL);
    let e = r.dev.activate(ALL_FEATURES, &[true, true, true, false]);
    assert!(matches!(e, Err(Error::QueueNotReady(3))), "{e:?}");
    assert_eq!(r.handle.request_stats(), None, "not running");
    let e = r.dev.activate(VIRTIO_F_VERSION_1, &[true, false]);
    assert!(matches!(e, Err(Error::QueueNotReady(1))), "{e:?}");
    // Queues the driver did not negotiate need not be ready.
    r.dev.activate(VIRTIO_F_VERSION_1 | F_STATS_VQ, &[true, true, true, false]).unwrap();
}

#[test]
fn inflate_coalesces_and_discards() {
    let mut r = running();
    let a = 0x2_0000;
    // Out of order, with a duplicate; the last page of A and the first of B are not adjacent.
    let list = [
        pfn(a + 0x2000),
        pfn(a),
        pfn(a + 0x1000),
        pfn(a),
        pfn(A_END - 0x1000),
        pfn(B_START),
        pfn(a + 0x5000),
    ];
    let done = r.pfns(0, &list);
    assert_eq!((done.used_idx, done.used, done.interrupt), (1, Some((0, 0)), true));
    let want = vec![pages(a, 3), pages(a + 0x5000, 1), pages(A_END - 0x1000, 1), pages(B_START, 1)];
    assert_eq!(r.calls(), [Call::Discard(want, Discard::Inflated)]);
    let c = r.counters();
    assert_eq!((c.inflate_requests, c.inflated_pages, c.rejected_chains, c.invalid_pfns), (1, 6, 0, 0));
}

#[test]
fn deflate_reclaims() {
    let mut r = running();
    let done = r.pfns(1, &[pfn(B_START + 0x3000), pfn(B_START + 0x4000)]);
    assert_eq!(done.used, Some((0, 0)));
    assert_eq!(r.calls(), [Call::Reclaim(vec![pages(B_START + 0x3000, 2)])]);
    let c = r.counters();
    assert_eq!((c.deflate_requests, c.deflated_pages, c.inflate_requests), (1, 2, 0));
}

#[test]
fn pfn_array_may_span_descriptors() {
    let mut r = running();
    let bytes: Vec<u8> =
        [pfn(0x3000), pfn(0x4000), pfn(0x5000)].iter().flat_map(|p| p.to_le_bytes()).collect();
    r.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let done = r.serve(0, &[(BUF, 8, false), (BUF + 8, 0, false), (BUF + 8, 4, false)]);
    assert_eq!(done.used, Some((0, 0)));
    assert_eq!(r.calls(), [Call::Discard(vec![pages(0x3000, 3)], Discard::Inflated)]);
}

#[test]
fn invalid_pfns_are_skipped_and_counted() {
    let mut r = running();
    let hole = [pfn(A_END), pfn(B_START - 0x1000), pfn(B_END), pfn(OUTSIDE), u32::MAX, 0x8000_0000];
    let mut list = vec![pfn(0x1000)];
    list.extend(hole);
    list.push(pfn(0x2000));
    let done = r.pfns(0, &list);
    assert_eq!(done.used, Some((0, 0)), "returned despite the bad PFNs");
    assert_eq!(r.calls(), [Call::Discard(vec![pages(0x1000, 2)], Discard::Inflated)]);
    let c = r.counters();
    assert_eq!((c.inflate_requests, c.inflated_pages, c.invalid_pfns), (1, 2, hole.len() as u64));

    // Nothing valid: no backend call, still returned and counted as served.
    let done = r.pfns(1, &hole);
    assert_eq!(done.used, Some((0, 0)));
    assert!(r.calls().is_empty());
    let c = r.counters();
    assert_eq!((c.deflate_requests, c.deflated_pages, c.invalid_pfns), (1, 0, 2 * hole.len() as u64));

    // An empty array is a request for nothing.
    assert_eq!(r.pfns(0, &[]).used, Some((0, 0)));
    assert!(r.calls().is_empty());
    assert_eq!(r.counters().rejected_chains, 0);
}

/// Serves `chain` on queue `index` of a running device and expects it back unused, with no
/// backend call and one rejected chain.
fn expect_rejected(what: &str, index: usize, raw: &[RawDescriptor]) {
    let mut r = running();
    let pfns: Vec<u8> = (0..MAX_PFNS as u32 + 1).flat_map(|i| (0x10 + i).to_le_bytes()).collect();
    r.mem.write_slice(&pfns, GuestAddress(BUF)).unwrap();
    let done = r.serve_raw(index, raw);
    assert_eq!((done.used_idx, done.used.map(|u| u.1)), (1, Some(0)), "{what}");
    assert!(done.interrupt, "{what}");
    assert!(r.calls().is_empty(), "{what}: backend called");
    let want = BalloonCountersSnapshot { rejected_chains: 1, ..Default::default() };
    assert_eq!(r.counters(), want, "{what}");
}

#[test]
fn malformed_pfn_chains_are_returned_unused() {
    let max = (MAX_PFNS * PFN_LEN) as u32;
    for index in [0, 1] {
        expect_rejected("6 bytes", index, &linked(&[(BUF, 6, false)]));
        expect_rejected("4 + 3 bytes", index, &linked(&[(BUF, 4, false), (BUF + 4, 3, false)]));
        expect_rejected("device-writable", index, &linked(&[(BUF, 8, true)]));
        expect_rejected("writable tail", index, &linked(&[(BUF, 8, false), (BUF + 8, 4, true)]));
        expect_rejected("too many PFNs", index, &linked(&[(BUF, max + 4, false)]));
        expect_rejected("too many, split", index, &linked(&[(BUF, max, false), (BUF, 4, false)]));
        expect_rejected("outside RAM", index, &linked(&[(OUTSIDE, 8, false)]));
        expect_rejected("into the hole", index, &linked(&[(A_END - 4, 8, false)]));
        expect_rejected("huge", index, &linked(&[(BUF, !3u32, false)]));
        // `next` points outside the table: the chain ends early with NEXT still set.
        let broken = SplitDescriptor::new(BUF, 8, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 3);
        expect_rejected("broken", index, &[RawDescriptor::from(broken)]);
    }
    // The limit itself is fine.
    let mut r = running();
    r.mem.write_slice(&vec![0u8; max as usize], GuestAddress(BUF)).unwrap();
    assert_eq!(r.serve(0, &[(BUF, max, false)]).used, Some((0, 0)));
    assert_eq!(r.calls(), [Call::Discard(vec![pages(0, 1)], Discard::Inflated)]);
}

#[test]
fn reporting_discards_valid_ranges_and_skips_the_rest() {
    let mut r = running();
    let chain = [
        (0x4_0000, 0x2_0000, true), // 128 KiB
        (0x6_0000, 0x1000, true),   // adjacent: merged with the first
        (B_START, 0x1_0000, true),
        (0x1000, 0, true),              // empty
        (0x2_0800, 0x1000, true),       // unaligned address
        (0x3_0000, 0x1800, true),       // unaligned length
        (A_END - 0x1000, 0x2000, true), // runs into the hole
        (B_END - 0x1000, 0x2000, true), // runs past the end
        (OUTSIDE, 0x1000, true),        // outside RAM
        (!0xfff, 0x1000, true),         // at the top of the address space
        (0x5_0000, 0x1000, true),       // inside the first: a duplicate, merged
    ];
    let done = r.serve(3, &chain);
    assert_eq!(done.used, Some((0, 0)), "used length 0: nothing written");
    let want = vec![pages(0x4_0000, 0x21), pages(B_START, 0x10)];
    assert_eq!(r.calls(), [Call::Discard(want, Discard::Reported)]);
    let c = r.counters();
    assert_eq!((c.reports, c.reported_pages, c.invalid_ranges, c.rejected_chains), (1, 0x31, 7, 0));

    // Nothing valid: returned, no backend call.
    assert_eq!(r.serve(3, &[(OUTSIDE, 0x1000, true)]).used, Some((0, 0)));
    assert!(r.calls().is_empty());
    assert_eq!(r.counters().reports, 2);
}

#[test]
fn malformed_reporting_chains_are_returned_unused() {
    expect_rejected("device-readable", 3, &linked(&[(0x4_0000, 0x1000, false)]));
    expect_rejected(
        "readable among writable",
        3,
        &linked(&[(0x4_0000, 0x1000, true), (0x5_0000, 0x1000, false)]),
    );
    let broken = SplitDescriptor::new(0x4_0000, 0x1000, (VRING_DESC_F_NEXT | 2) as u16, QUEUE_SIZE);
    expect_rejected("broken", 3, &[RawDescriptor::from(broken)]);
}

/// Writes statistics entries at `at`; returns their length.
fn write_stats(mem: &GuestMemoryMmap, at: u64, entries: &[(u16, u64)], extra: &[u8]) -> u32 {
    let mut b: Vec<u8> =
        entries.iter().flat_map(|&(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect();
    b.extend_from_slice(extra);
    mem.write_slice(&b, GuestAddress(at)).unwrap();
    b.len() as u32
}

#[test]
fn stats_buffer_is_held_until_requested() {
    let mut r = running();
    assert_eq!(r.handle.guest_stats(), None);
    let len = write_stats(&r.mem, BUF, &[(S_MEMFREE, 1 << 30), (S_MEMTOT, 4 << 30), (S_MAJFLT, 7)], &[]);
    let mq = MockSplitQueue::create(&r.mem, GuestAddress(0), QUEUE_SIZE);
    mq.add_desc_chains(&linked(&[(BUF, len, false)]), 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();

    // The driver's first buffer: read, held, not returned.
    assert!(!r.dev.process_queue(2, &mut q, &r.mem));
    assert_eq!(used(&r.mem, &mq, false).used_idx, 0);
    let s = r.handle.guest_stats().unwrap();
    assert_eq!(
        (s.free_memory, s.total_memory, s.major_faults, s.swap_in),
        (Some(1 << 30), Some(4 << 30), Some(7), None)
    );

    // The VMM's timer: the buffer goes back so that the driver refills it.
    assert_eq!(r.handle.request_stats(), Some(2));
    assert!(r.dev.process_queue(2, &mut q, &r.mem));
    assert_eq!(used(&r.mem, &mq, true).used, Some((0, 0)));
    // Nothing held now: a second request is dropped, nothing returned twice.
    assert_eq!(r.handle.request_stats(), Some(2));
    assert!(!r.dev.process_queue(2, &mut q, &r.mem));
    assert_eq!(used(&r.mem, &mq, false).used_idx, 1);
    let c = r.counters();
    assert_eq!((c.stats_buffers, c.stats_requests, c.stats_rejected), (1, 1, 0));
}

#[test]
fn stats_odd_lengths_unknown_tags_and_extra_buffers() {
    let mut r = running();
    let odd = write_stats(&r.mem, BUF, &[(S_AVAIL, 5), (0x7777, 9), (S_CACHES, 6)], &[1, 2, 3]);
    let second = write_stats(&r.mem, BUF + 0x100, &[(S_OOM_KILL, 2)], &[]);
    let mq = MockSplitQueue::create(&r.mem, GuestAddress(0), QUEUE_SIZE);
    let chains = [(BUF, odd, false), (BUF + 0x100, second, false)];
    // Two single-descriptor chains, heads 0 and 1.
    let raw: Vec<RawDescriptor> =
        chains.iter().map(|&(a, l, _)| RawDescriptor::from(SplitDescriptor::new(a, l, 0, 0))).collect();
    mq.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    assert!(r.dev.process_queue(2, &mut q, &r.mem), "the older buffer came back");
    assert_eq!(used(&r.mem, &mq, true).used, Some((0, 0)));
    // The newer buffer replaced the statistics whole.
    let s = r.handle.guest_stats().unwrap();
    assert_eq!((s.oom_kills, s.available_memory), (Some(2), None));
    let c = r.counters();
    let got = (c.stats_buffers, c.stats_odd_lengths, c.stats_unknown_tags, c.stats_extra_buffers);
    assert_eq!(got, (2, 1, 1, 1));
    r.handle.request_stats();
    r.dev.process_queue(2, &mut q, &r.mem);
    let ring = mq.used_addr();
    let second_id: u32 = r.mem.read_obj(ring.unchecked_add(12)).unwrap();
    assert_eq!(second_id, 1, "the newer buffer went back on request");
}

#[test]
fn malformed_stats_buffers_are_held_but_ignored() {
    for (what, chain) in [
        ("device-writable", vec![(BUF, 20, true)]),
        ("outside RAM", vec![(OUTSIDE, 20, false)]),
        ("too long", vec![(BUF, MAX_STATS_BYTES as u32 + 10, false)]),
        ("readable after writable", vec![(BUF, 10, true), (BUF + 10, 10, false)]),
    ] {
        let mut r = running();
        write_stats(&r.mem, BUF, &[(S_MEMFREE, 3), (S_MEMFREE, 3)], &[]);
        let done = r.serve(2, &chain);
        assert_eq!(done.used_idx, 0, "{what}: held");
        assert_eq!(r.handle.guest_stats(), None, "{what}");
        let c = r.counters();
        assert_eq!((c.stats_buffers, c.stats_rejected), (1, 1), "{what}");
    }
}

#[test]
fn queues_are_not_served_before_driver_ok() {
    // Features not even accepted (no FEATURES_OK), then accepted but not activated: the
    // device reads nothing, not even the available index.
    let mut r = rig(ALL);
    for step in 0..2 {
        for index in 0..4 {
            let done = r.pfns(index, &[pfn(0x1000)]);
            assert_eq!((done.used_idx, done.interrupt), (0, false), "step {step} queue {index}");
        }
        r.dev.features_accepted(ALL_FEATURES);
    }
    assert!(r.calls().is_empty());
    assert_eq!(r.handle.request_stats(), None);
    let want = BalloonCountersSnapshot { unready_queue_uses: 8, ..Default::default() };
    assert_eq!(r.counters(), want);
}

#[test]
fn reset_stops_the_queues_and_forgets_the_driver() {
    let mut r = running();
    r.handle.set_target_pages(300);
    r.dev.write_config(CONFIG_ACTUAL, &200u32.to_le_bytes());
    let len = write_stats(&r.mem, BUF, &[(S_MEMFREE, 3)], &[]);
    assert_eq!(r.serve(2, &[(BUF, len, false)]).used_idx, 0);
    r.dev.reset();
    assert_eq!((r.handle.target_pages(), r.handle.actual_pages()), (300, 0), "the target is the VMM's");
    assert_eq!(r.handle.guest_stats(), None);
    assert_eq!(r.handle.request_stats(), None);
    assert_eq!(r.pfns(0, &[pfn(0x1000)]).used_idx, 0);
    assert!(r.calls().is_empty());
    // A new driver starts from scratch.
    r.start(ALL_FEATURES);
    assert_eq!(r.pfns(0, &[pfn(0x1000)]).used_idx, 1);
}

fn field(dev: &Balloon, offset: u64) -> u32 {
    let mut b = [0xa5u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn config_space_reads_and_driver_writes() {
    let mut r = running();
    r.handle.set_target_pages(0x1234);
    let read = |dev: &Balloon| [0, 4, 8, 12].map(|o| field(dev, o));
    assert_eq!(read(&r.dev), [0x1234, 0, 0, 0]);
    // `actual` whole, then byte by byte.
    r.dev.write_config(CONFIG_ACTUAL, &0x0102_0304u32.to_le_bytes());
    assert_eq!(r.handle.actual_pages(), 0x0102_0304);
    r.dev.write_config(CONFIG_ACTUAL + 3, &[0xff]);
    r.dev.write_config(CONFIG_ACTUAL, &[0x00, 0x00]);
    assert_eq!(r.handle.actual_pages(), 0xff02_0000);
    assert_eq!(read(&r.dev), [0x1234, 0xff02_0000, 0, 0]);
    // Narrow and odd reads, and reads past the end or at absurd offsets.
    let mut two = [0u8; 2];
    r.dev.read_config(1, &mut two);
    assert_eq!(two, [0x12, 0]);
    assert_eq!([16, 14, u64::MAX - 1].map(|o| field(&r.dev, o)), [0, 0, 0]);

    // The driver may write nothing else.
    let ignored: [(u64, &[u8]); 8] = [
        (CONFIG_NUM_PAGES, &[9, 9, 9, 9]),
        (CONFIG_NUM_PAGES + 2, &[9, 9, 9, 9]), // reaches into `actual`
        (CONFIG_ACTUAL + 2, &[9, 9, 9, 9]),    // runs past `actual`
        (CONFIG_FREE_PAGE_HINT_CMD_ID, &[9, 9, 9, 9]),
        (CONFIG_POISON_VAL, &[0xaa, 0xaa, 0xaa, 0xaa]),
        (CONFIG_ACTUAL, &[]),
        (0x100, &[1]),
        (u64::MAX, &[1, 2]),
    ];
    for (offset, data) in ignored {
        r.dev.write_config(offset, data);
    }
    assert_eq!(read(&r.dev), [0x1234, 0xff02_0000, 0, 0]);
    assert_eq!(r.counters().config_writes_ignored, ignored.len() as u64);
}

#[test]
fn target_change_raises_the_config_interrupt() {
    let mut r = rig(ALL);
    // Before DRIVER_OK: no interrupt; the driver reads the target when it starts.
    r.handle.set_target_pages(64);
    assert_eq!(r.irq.status(), 0);
    assert!(r.irq.eventfd().read().is_err(), "nothing signalled");
    assert_eq!(field(&r.dev, 0), 64);

    r.start(ALL_FEATURES);
    r.handle.set_target_pages(128);
    assert_eq!(r.irq.status(), INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
    assert_eq!((field(&r.dev, 0), r.handle.target_pages()), (128, 128));
    r.irq.ack(INTERRUPT_STATUS_CONFIG_CHANGE);

    // The same target again changes nothing the driver must re-read.
    r.handle.set_target_pages(128);
    assert_eq!(r.irq.status(), 0);
    assert!(r.irq.eventfd().read().is_err());
    // From another thread, as the VMM's API thread would.
    let handle = r.handle.clone();
    std::thread::spawn(move || handle.set_target_pages(0)).join().unwrap();
    assert_eq!(r.irq.status(), INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(r.counters().interrupt_errors, 0);
}

#[test]
fn bad_available_index_is_counted_not_fatal() {
    let mut r = running();
    for index in [0, 2] {
        let mq = MockSplitQueue::create(&r.mem, GuestAddress(0), QUEUE_SIZE);
        // An available index far more than a queue ahead of the device's.
        r.mem.write_obj(0x8000u16, mq.avail_addr().unchecked_add(2)).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(!r.dev.process_queue(index, &mut q, &r.mem));
    }
    assert_eq!(r.counters().bad_avail_index, 2);
    assert!(r.calls().is_empty());
}
