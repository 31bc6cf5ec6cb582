//! fphash tests: batches driven through a mock split queue (virtio-queue's `test-utils`) into
//! a fake merger, including hostile chains and records.

use std::sync::Mutex;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;

use super::*;
use crate::test_chains::{linked, D};

/// Guest RAM: region A `[0, A_END)`, a hole `[A_END, B_START)` (like the MMIO gap), region B
/// `[B_START, B_END)`, whose end is not page-aligned.
const A_END: u64 = 0x4_0000;
const B_START: u64 = 0x5_0000;
const B_END: u64 = 0x6_0800;
/// Where requests and responses live (above the mock queue's rings).
const REQ: u64 = 0x8000;
const RESP: u64 = 0xc000;
/// Valid pages, one per region.
const PAGE_A: u64 = 0x2_0000;
const PAGE_B: u64 = 0x5_f000;
/// The page that starts in region B and runs past its end.
const STRADDLE: u64 = 0x6_0000;
/// A guest-physical address past the end of guest RAM.
const OUTSIDE: u64 = 0x1000_0000;
const UNTOUCHED: u8 = 0xee;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), A_END as usize),
        (GuestAddress(B_START), (B_END - B_START) as usize),
    ])
    .unwrap()
}

type Calls = Arc<Mutex<Vec<(ReportKind, Vec<PageReport>, Hashing)>>>;

/// Records every call; answers `answers[i]` for the i-th report of a batch, or `Merged` for
/// ADDED records past the list (REMOVED records keep the device's `Done`).
struct FakeMerger {
    calls: Calls,
    answers: Vec<RecordStatus>,
}

impl PageMerger for FakeMerger {
    fn merge_batch(
        &mut self,
        kind: ReportKind,
        hashing: Hashing,
        reports: &[PageReport],
        statuses: &mut [RecordStatus],
    ) {
        assert_eq!(reports.len(), statuses.len());
        self.calls.lock().unwrap().push((kind, reports.to_vec(), hashing));
        for (i, s) in statuses.iter_mut().enumerate() {
            match self.answers.get(i) {
                Some(&a) => *s = a,
                None if kind == ReportKind::Added => *s = RecordStatus::Merged,
                None => {}
            }
        }
    }
}

fn device(answers: &[RecordStatus]) -> (FphashDevice, Calls) {
    let calls = Calls::default();
    let merger = FakeMerger { calls: Arc::clone(&calls), answers: answers.to_vec() };
    (FphashDevice::new(Box::new(merger)), calls)
}

/// A well-formed ADDED record for `gpa`.
fn rec(gpa: u64) -> FphashRecord {
    FphashRecord { gpa, hash: [gpa as u8 ^ 0x5a; 32], flags: FLAG_FILE_PAGE, reserved: 0 }
}

fn report(gpa: u64) -> PageReport {
    let r = rec(gpa);
    PageReport { gpa: r.gpa, hash: r.hash }
}

/// A request: header with `report_type` and `nr_records`, then `records`.
fn request(report_type: u32, nr_records: u32, records: &[FphashRecord]) -> Vec<u8> {
    let mut b = FphashHeader { report_type, nr_records }.to_bytes().to_vec();
    for r in records {
        b.extend_from_slice(&r.to_bytes());
    }
    b
}

fn added(records: &[FphashRecord]) -> Vec<u8> {
    request(TYPE_ADDED, records.len() as u32, records)
}

fn req(len: usize) -> D {
    (REQ, len as u32, false)
}
fn resp(len: usize) -> D {
    (RESP, len as u32, true)
}
/// The usual chain: the whole request, then a response of exactly `4 + n` bytes.
fn simple(request: &[u8], n: usize) -> Vec<D> {
    vec![req(request.len()), resp(4 + n)]
}

/// What the device did with one submitted chain.
#[derive(Debug)]
struct Done {
    /// The used ring's first entry (head index, length), if any.
    used: Option<(u32, u32)>,
    /// The used ring's index: how many chains were returned.
    used_idx: u16,
    /// The first 300 bytes at RESP (UNTOUCHED where not written).
    resp: Vec<u8>,
    interrupt: bool,
}

impl Done {
    fn batch_status(&self) -> u32 {
        u32::from_le_bytes([self.resp[0], self.resp[1], self.resp[2], self.resp[3]])
    }
}

fn submit_raw(dev: &mut FphashDevice, mem: &GuestMemoryMmap, raw: &[RawDescriptor], qsize: u16) -> Done {
    mem.write_slice(&[UNTOUCHED; 300], GuestAddress(RESP)).unwrap();
    let mq = MockSplitQueue::create(mem, GuestAddress(0), qsize);
    mq.add_desc_chains(raw, 0).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    let interrupt = dev.process_queue(0, &mut queue, mem);
    used_entry(mem, &mq, interrupt)
}

fn used_entry(mem: &GuestMemoryMmap, mq: &MockSplitQueue<GuestMemoryMmap>, interrupt: bool) -> Done {
    let used = mq.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    let entry = (idx > 0).then(|| {
        let id: u32 = mem.read_obj(used.unchecked_add(4)).unwrap();
        let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
        (id, len)
    });
    let mut resp = vec![0u8; 300];
    mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
    Done { used: entry, used_idx: idx, resp, interrupt }
}

/// Writes `request` at REQ and submits `chain`.
fn submit(dev: &mut FphashDevice, mem: &GuestMemoryMmap, request: &[u8], chain: &[D]) -> Done {
    mem.write_slice(request, GuestAddress(REQ)).unwrap();
    submit_raw(dev, mem, &linked(chain), QUEUE_SIZE)
}

/// Submits a batch the device must reject with BAD_REQUEST, answered (used length 4).
fn expect_rejected(what: &str, request: &[u8], chain: &[D]) {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let done = submit(&mut dev, &mem, request, chain);
    assert_eq!(done.used, Some((0, 4)), "{what}");
    assert_eq!(done.batch_status(), BATCH_BAD_REQUEST, "{what}");
    assert_eq!(done.resp[4], UNTOUCHED, "{what}: wrote past batch_status");
    assert!(done.interrupt, "{what}");
    assert!(calls.lock().unwrap().is_empty(), "{what}: merger called");
    let s = dev.stats().snapshot();
    assert_eq!(s, FphashStatsSnapshot { rejected_batches: 1, ..Default::default() }, "{what}");
}

/// Submits a chain the device cannot answer at all (used length 0, nothing written).
fn expect_unanswered(what: &str, request: &[u8], chain: &[D]) {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let done = submit(&mut dev, &mem, request, chain);
    assert_eq!(done.used, Some((0, 0)), "{what}");
    assert!(done.resp.iter().all(|&b| b == UNTOUCHED), "{what}: response written");
    assert!(calls.lock().unwrap().is_empty(), "{what}: merger called");
    let s = dev.stats().snapshot();
    let want = FphashStatsSnapshot { rejected_batches: 1, unanswered: 1, ..Default::default() };
    assert_eq!(s, want, "{what}");
}

#[test]
fn identity_features_and_config() {
    let (mut dev, _) = device(&[]);
    assert_eq!(dev.device_type(), 60);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1 | F_HOST_HASH | F_VM_GENERATION);
    assert_eq!((F_HOST_HASH, F_VM_GENERATION), (1, 2), "feature bits 0 and 1");
    let field = |dev: &FphashDevice, offset: u64| {
        let mut b = [0u8; 4];
        dev.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    };
    // `version` reads 2 only for a driver that accepted F_HOST_HASH: version-1 drivers check
    // for exactly 1, before and after negotiating.
    let fields = [0, 4, 8, 12].map(|o| field(&dev, o));
    assert_eq!(fields, [256, 4096, 1, 1]);
    dev.features_accepted(VIRTIO_F_VERSION_1);
    assert_eq!([0, 4, 8, 12].map(|o| field(&dev, o)), [256, 4096, 1, 1]);
    dev.features_accepted(VIRTIO_F_VERSION_1 | F_HOST_HASH);
    assert_eq!([0, 4, 8, 12].map(|o| field(&dev, o)), [256, 4096, 1, 2]);
    dev.reset();
    assert_eq!(field(&dev, 12), 1);
    // The VM generation ID: zeros unless the VMM gave one.
    assert_eq!([16, 20, 24, 28].map(|o| field(&dev, o)), [0; 4]);
    // Past the configuration and at absurd offsets: zeros, no panic.
    assert_eq!([30, 32, u64::MAX - 1].map(|o| field(&dev, o)), [0, 0, 0]);

    // Read-only: writes are ignored.
    dev.write_config(0, &[1, 0, 0, 0]);
    assert_eq!(field(&dev, 0), 256);
}

#[test]
fn the_vm_generation_id_is_the_one_the_vmm_gave_at_offset_16() {
    let (dev, _) = device(&[]);
    let id: [u8; VM_GENERATION_LEN] = std::array::from_fn(|i| i as u8 + 1);
    let dev = dev.with_vm_generation(id);
    assert_eq!(CONFIG_VM_GENERATION, 16);
    assert_eq!(CONFIG_LEN, 32);
    let mut read = [0u8; VM_GENERATION_LEN];
    dev.read_config(16, &mut read);
    assert_eq!(read, id);
    // A driver reads it a byte or a word at a time.
    let mut byte = [0u8; 1];
    dev.read_config(31, &mut byte);
    assert_eq!(byte, [16]);
}

#[test]
fn wire_types_round_trip() {
    let r = FphashRecord { gpa: 0x1234_5000, hash: [7; 32], flags: 1, reserved: 0xdead_beef };
    let b = r.to_bytes();
    assert_eq!(b.len(), 48);
    assert_eq!(&b[..8], &0x1234_5000u64.to_le_bytes());
    assert_eq!(&b[40..44], &[1, 0, 0, 0]);
    assert_eq!(FphashRecord::from_bytes(&b), r);
    let h = FphashHeader { report_type: 2, nr_records: 9 };
    assert_eq!(h.to_bytes(), [2, 0, 0, 0, 9, 0, 0, 0]);
    assert_eq!(FphashHeader::from_bytes(&h.to_bytes()), h);
    for (i, s) in RecordStatus::ALL.iter().enumerate() {
        assert_eq!(s.as_byte(), i as u8);
        assert_eq!(RecordStatus::from_byte(i as u8), Some(*s));
    }
    assert_eq!(RecordStatus::from_byte(8), None);
    assert_eq!(ReportKind::from_wire(1), Some(ReportKind::Added));
    assert_eq!(ReportKind::from_wire(2), Some(ReportKind::Removed));
    assert_eq!(ReportKind::from_wire(0), None);
}

#[test]
fn good_added_batch() {
    let mem = mem();
    let answers = [RecordStatus::Merged, RecordStatus::Already, RecordStatus::Mismatch];
    let (mut dev, calls) = device(&answers);
    let gpas = [PAGE_A, PAGE_B, 0];
    let records: Vec<_> = gpas.iter().map(|&g| rec(g)).collect();
    let request = added(&records);
    let done = submit(&mut dev, &mem, &request, &simple(&request, 3));

    assert_eq!(done.used, Some((0, 7)));
    assert!(done.interrupt);
    assert_eq!(&done.resp[..8], &[0, 0, 0, 0, 0, 1, 2, UNTOUCHED]);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, ReportKind::Added);
    assert_eq!(calls[0].1, gpas.iter().map(|&g| report(g)).collect::<Vec<_>>());
    let s = dev.stats().snapshot();
    let want = FphashStatsSnapshot {
        batches: 1,
        records: 3,
        merged: 1,
        already: 1,
        mismatch: 1,
        ..Default::default()
    };
    assert_eq!(s, want);
}

#[test]
fn records_and_response_split_across_descriptors() {
    let mem = mem();
    let (mut dev, calls) = device(&[RecordStatus::NoRoom, RecordStatus::Off]);
    let request = added(&[rec(PAGE_A), rec(PAGE_A + 0x1000)]);
    assert_eq!(request.len(), 104);
    // Header split 3 + 5, records split at odd places, a zero-length descriptor; the
    // response split 1 + 5 across two buffers.
    let chain = [
        (REQ, 3, false),
        (REQ + 3, 5, false),
        (REQ + 8, 20, false),
        (REQ + 28, 0, false),
        (REQ + 28, 75, false),
        (REQ + 103, 1, false),
        (RESP, 1, true),
        (RESP + 100, 5, true),
    ];
    let done = submit(&mut dev, &mem, &request, &chain);
    assert_eq!(done.used, Some((0, 6)));
    assert_eq!(done.resp[..2], [0, UNTOUCHED]);
    assert_eq!(done.resp[100..106], [0, 0, 0, 5, 6, UNTOUCHED]);
    assert_eq!(calls.lock().unwrap()[0].1, vec![report(PAGE_A), report(PAGE_A + 0x1000)]);
    let s = dev.stats().snapshot();
    assert_eq!((s.batches, s.records, s.no_room, s.off), (1, 2, 1, 1));
}

#[test]
fn removed_batch() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let mut plain = rec(PAGE_B);
    plain.flags = 0;
    plain.hash = [0; 32];
    // FILE_PAGE may be set or not; bit 1 may not.
    let mut bad = rec(PAGE_A);
    bad.flags = 2;
    let request = request(TYPE_REMOVED, 3, &[rec(PAGE_A), plain, bad]);
    let done = submit(&mut dev, &mem, &request, &simple(&request, 3));
    assert_eq!(done.used, Some((0, 7)));
    let (done_b, bad_b) = (RecordStatus::Done.as_byte(), RecordStatus::BadRecord.as_byte());
    assert_eq!(&done.resp[..8], &[0, 0, 0, 0, done_b, done_b, bad_b, UNTOUCHED]);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, ReportKind::Removed);
    assert_eq!(calls[0].1, vec![report(PAGE_A), PageReport { gpa: PAGE_B, hash: [0; 32] }]);
    let s = dev.stats().snapshot();
    assert_eq!((s.batches, s.records, s.done, s.bad_record), (1, 3, 2, 1));
}

#[test]
fn hostile_records_get_their_status_and_skip_the_merger() {
    let mem = mem();
    let (mut dev, calls) = device(&[RecordStatus::Already, RecordStatus::NoRoom]);
    let with = |gpa: u64, flags: u32, reserved: u32| FphashRecord { flags, reserved, ..rec(gpa) };
    let records = [
        rec(PAGE_A),                         // good
        rec(PAGE_A + 8),                     // unaligned
        rec(OUTSIDE),                        // past the end of RAM
        rec(STRADDLE),                       // starts in RAM, ends past its region
        rec(A_END),                          // in the hole between the regions
        rec(B_START - 0x1000),               // the last page of the hole
        rec(!0xfff),                         // at the top of the address space
        rec(A_END - 0x1000),                 // the last page of region A
        with(PAGE_A, 0, 0),                  // ADDED without FILE_PAGE
        with(PAGE_A, FLAG_FILE_PAGE | 2, 0), // unknown flag bit
        with(PAGE_A, FLAG_FILE_PAGE, 1),     // nonzero reserved
        with(PAGE_A + 1, 0, 0),              // both bad: BAD_RECORD wins
    ];
    let request = added(&records);
    let n = records.len();
    let done = submit(&mut dev, &mem, &request, &simple(&request, n));
    assert_eq!(done.used, Some((0, 4 + n as u32)));
    let (gpa, rec_) = (RecordStatus::BadGpa.as_byte(), RecordStatus::BadRecord.as_byte());
    let want = [1, gpa, gpa, gpa, gpa, gpa, gpa, 5, rec_, rec_, rec_, rec_];
    assert_eq!(&done.resp[..4], &[0; 4]);
    assert_eq!(&done.resp[4..4 + n], &want);
    assert_eq!(done.resp[4 + n], UNTOUCHED);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, vec![report(PAGE_A), report(A_END - 0x1000)]);
    let s = dev.stats().snapshot();
    let want = FphashStatsSnapshot {
        batches: 1,
        records: n as u64,
        already: 1,
        no_room: 1,
        bad_gpa: 6,
        bad_record: 4,
        ..Default::default()
    };
    assert_eq!(s, want);
}

#[test]
fn batch_without_valid_records_skips_the_merger() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let request = added(&[rec(STRADDLE), rec(A_END)]);
    let done = submit(&mut dev, &mem, &request, &simple(&request, 2));
    assert_eq!(done.used, Some((0, 6)));
    assert_eq!(&done.resp[..6], &[0, 0, 0, 0, 3, 3]);
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(dev.stats().snapshot().bad_gpa, 2);
}

#[test]
fn bad_requests_are_answered_bad_request() {
    let one = added(&[rec(PAGE_A)]);
    let two = added(&[rec(PAGE_A), rec(PAGE_B)]);
    let full = added(&vec![rec(PAGE_A); 256]);

    let zero = request(TYPE_ADDED, 0, &[]);
    expect_rejected("nr_records 0", &zero, &[req(8), resp(4)]);
    let mut over = request(TYPE_ADDED, 257, &vec![rec(PAGE_A); 257]);
    expect_rejected("nr_records 257, 257 records", &over, &[req(over.len()), resp(261)]);
    over.truncate(full.len());
    expect_rejected("nr_records 257, 256 records", &over, &[req(over.len()), resp(261)]);
    let huge = request(TYPE_ADDED, u32::MAX, &[rec(PAGE_A)]);
    expect_rejected("nr_records u32::MAX", &huge, &[req(huge.len()), resp(260)]);

    expect_rejected("truncated record", &two, &[req(two.len() - 1), resp(6)]);
    expect_rejected("one record short", &two, &[req(two.len() - 48), resp(6)]);
    expect_rejected("trailing byte", &two, &[req(two.len() + 1), resp(6)]);
    expect_rejected("extra record", &one, &[req(two.len()), resp(6)]);
    expect_rejected("header only", &one, &[req(8), resp(5)]);
    expect_rejected("short header", &one, &[req(7), resp(5)]);
    expect_rejected("no readable part", &one, &[resp(5)]);

    for t in [0, 3, u32::MAX] {
        let r = request(t, 1, &[rec(PAGE_A)]);
        expect_rejected(&format!("type {t}"), &r, &simple(&r, 1));
    }

    expect_rejected("response 4 + n - 1", &two, &[req(two.len()), resp(5)]);
    expect_rejected("response 4 bytes", &full, &[req(full.len()), resp(4)]);
    expect_rejected("response split short", &two, &[req(two.len()), (RESP, 4, true), (RESP + 100, 1, true)]);

    let chain = [req(8), (OUTSIDE, 48, false), resp(5)];
    expect_rejected("readable descriptor outside RAM", &one, &chain);
    let chain = [req(8), (A_END, 48, false), resp(5)];
    expect_rejected("readable descriptor in the hole", &one, &chain);
    let chain = [req(8), (B_END - 24, 48, false), resp(5)];
    expect_rejected("readable descriptor straddling the end of RAM", &one, &chain);
    let chain = [req(8), (u64::MAX - 10, 48, false), resp(5)];
    expect_rejected("readable descriptor wrapping around", &one, &chain);
    let chain = [req(8), resp(5), (REQ + 8, 48, false)];
    expect_rejected("readable after writable", &one, &chain);
}

#[test]
fn unanswerable_chains_are_returned_empty() {
    let one = added(&[rec(PAGE_A)]);
    expect_unanswered("no writable part", &one, &[req(one.len())]);
    expect_unanswered("writable part of 3 bytes", &one, &[req(one.len()), resp(3)]);
    expect_unanswered("writable part outside RAM", &one, &[req(one.len()), (OUTSIDE, 5, true)]);
    expect_unanswered("writable part in the hole", &one, &[req(one.len()), (A_END + 16, 5, true)]);
    expect_unanswered("writable part straddling RAM's end", &one, &[req(one.len()), (B_END - 2, 5, true)]);
    // A bad request whose one good writable buffer sits beside one outside RAM.
    let chain = [req(one.len()), resp(5), (OUTSIDE, 5, true)];
    expect_unanswered("one writable descriptor outside RAM", &one, &chain);
}

#[test]
fn descriptor_loops_and_broken_links() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let one = added(&[rec(PAGE_A)]);
    mem.write_slice(&one, GuestAddress(REQ)).unwrap();
    // 0 -> 1 -> 2 -> 1 -> 2 -> …: the iterator stops after QUEUE_SIZE descriptors.
    let mut raw = linked(&[req(8), (REQ + 8, 48, false), resp(5)]);
    raw[2] = RawDescriptor::from(SplitDescriptor::new(
        RESP,
        5,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        1,
    ));
    let done = submit_raw(&mut dev, &mem, &raw, QUEUE_SIZE);
    assert_eq!(done.used, Some((0, 4)));
    assert_eq!(done.batch_status(), BATCH_BAD_REQUEST);
    assert_eq!(dev.stats().snapshot().rejected_batches, 1);

    // A `next` outside the descriptor table: the chain ends after its first descriptor.
    let mut raw = linked(&[req(one.len()), resp(5)]);
    raw[0] = RawDescriptor::from(SplitDescriptor::new(REQ, 56, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 7));
    let done = submit_raw(&mut dev, &mem, &raw, QUEUE_SIZE);
    assert_eq!(done.used, Some((0, 0)));
    assert_eq!(done.resp[0], UNTOUCHED);
    let s = dev.stats().snapshot();
    assert_eq!((s.rejected_batches, s.unanswered, s.batches), (2, 1, 0));
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn chain_length_limit() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let full = added(&vec![rec(PAGE_A); 256]);
    mem.write_slice(&full, GuestAddress(REQ)).unwrap();
    // Header, one descriptor per record, the response: max_records + 2 = 258 descriptors,
    // in a queue large enough to hold them.
    let mut chain = vec![req(8)];
    chain.extend((0..256u64).map(|i| (REQ + 8 + 48 * i, 48, false)));
    chain.push(resp(260));
    assert_eq!(chain.len(), MAX_CHAIN_LEN);
    let done = submit_raw(&mut dev, &mem, &linked(&chain), 512);
    assert_eq!(done.used, Some((0, 260)));
    assert_eq!(&done.resp[..4], &[0; 4]);
    assert!(done.resp[4..260].iter().all(|&b| b == 0));
    assert_eq!(done.resp[260], UNTOUCHED);
    assert_eq!(calls.lock().unwrap()[0].1.len(), 256);

    // One more (empty) descriptor: rejected, answered in the tail descriptor.
    chain.insert(1, (REQ, 0, false));
    let done = submit_raw(&mut dev, &mem, &linked(&chain), 512);
    assert_eq!(done.used, Some((0, 4)));
    assert_eq!(done.batch_status(), BATCH_BAD_REQUEST);
    assert_eq!(done.resp[4], UNTOUCHED);
    let s = dev.stats().snapshot();
    assert_eq!((s.batches, s.records, s.merged, s.rejected_batches), (1, 256, 256, 1));
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[test]
fn head_index_outside_queue_and_bogus_avail_index() {
    let mem = mem();
    let (mut dev, _) = device(&[]);
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let avail = mq.avail_addr();
    // One available entry naming descriptor 1000 of a 256-entry table.
    mem.write_obj(1000u16, avail.unchecked_add(4)).unwrap();
    mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    assert!(!dev.process_queue(0, &mut queue, &mem));
    assert_eq!(used_entry(&mem, &mq, false).used, None);
    assert_eq!(dev.stats().snapshot().rejected_batches, 1);

    // An available index far ahead of the device: refused without looping forever.
    mem.write_obj(0x8000u16, avail.unchecked_add(2)).unwrap();
    assert!(!dev.process_queue(0, &mut queue, &mem));
    assert_eq!(dev.stats().snapshot().rejected_batches, 2);
}

#[test]
fn several_batches_in_one_notification() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let one = added(&[rec(PAGE_A)]);
    mem.write_slice(&one, GuestAddress(REQ)).unwrap();
    // Three chains sharing one request and one response buffer.
    let mut raw = Vec::new();
    for _ in 0..3 {
        raw.extend(linked(&[req(one.len()), resp(5)]));
    }
    for (i, d) in raw.iter_mut().enumerate() {
        let s = SplitDescriptor::from(*d);
        let next = if s.has_next() { i as u16 + 1 } else { 0 };
        *d = RawDescriptor::from(SplitDescriptor::new(s.addr().0, s.len(), s.flags(), next));
    }
    let done = submit_raw(&mut dev, &mem, &raw, QUEUE_SIZE);
    assert!(done.interrupt);
    assert_eq!(done.used_idx, 3);
    assert_eq!(calls.lock().unwrap().len(), 3);
    let s = dev.stats().snapshot();
    assert_eq!((s.batches, s.records, s.merged), (3, 3, 3));
}

#[test]
fn activation_needs_the_queue() {
    let (mut dev, _) = device(&[]);
    assert!(matches!(dev.activate(VIRTIO_F_VERSION_1, &[false]), Err(Error::QueueNotReady(0))));
    assert!(matches!(dev.activate(VIRTIO_F_VERSION_1, &[]), Err(Error::QueueNotReady(0))));
    assert!(dev.activate(VIRTIO_F_VERSION_1, &[true]).is_ok());
    dev.reset();
}

#[test]
fn over_long_indirect_chain() {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    // An indirect table (VIRTIO_F_INDIRECT_DESC is not offered, but virtio-queue follows
    // them) is the way to pass more descriptors than the 256-entry queue holds: header, 256
    // records, 41 empty descriptors, the response.
    const TABLE: u64 = 0x1_0000;
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    let full = added(&vec![rec(PAGE_A); 256]);
    mem.write_slice(&full, GuestAddress(REQ)).unwrap();
    let mut chain = vec![req(8)];
    chain.extend((0..256u64).map(|i| (REQ + 8 + 48 * i, 48, false)));
    chain.extend((0..41).map(|_| (REQ, 0, false)));
    chain.push(resp(260));
    for (i, raw) in linked(&chain).into_iter().enumerate() {
        mem.write_obj(SplitDescriptor::from(raw), GuestAddress(TABLE + 16 * i as u64)).unwrap();
    }
    let head = SplitDescriptor::new(TABLE, 16 * chain.len() as u32, VRING_DESC_F_INDIRECT as u16, 0);
    let done = submit_raw(&mut dev, &mem, &[RawDescriptor::from(head)], QUEUE_SIZE);
    assert_eq!(done.used, Some((0, 4)));
    assert_eq!(done.batch_status(), BATCH_BAD_REQUEST);
    assert!(calls.lock().unwrap().is_empty());
    let s = dev.stats().snapshot();
    assert_eq!(s, FphashStatsSnapshot { rejected_batches: 1, ..Default::default() });
}

#[test]
fn works_behind_the_mmio_transport() {
    use crate::mmio::*;
    use crate::{EventFdInterrupt, MmioTransport};

    let mem = mem();
    let (dev, calls) = device(&[]);
    let stats = dev.stats();
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone()).unwrap();
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut t, DEVICE_ID), 60);
    w(&mut t, STATUS, 1);
    w(&mut t, STATUS, 3);
    w(&mut t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 only");
    w(&mut t, DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, DEVICE_FEATURES), 3, "F_HOST_HASH and F_VM_GENERATION");
    w(&mut t, DRIVER_FEATURES_SEL, 1);
    w(&mut t, DRIVER_FEATURES, 1);
    w(&mut t, STATUS, 11);
    assert_eq!(r(&mut t, STATUS), 11);
    assert_eq!(r(&mut t, CONFIG_SPACE + 12), 1, "a version-1 driver reads version 1");

    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
    w(&mut t, QUEUE_SEL, 0);
    assert_eq!(r(&mut t, QUEUE_NUM_MAX), 256);
    w(&mut t, QUEUE_NUM, 64);
    w(&mut t, QUEUE_DESC_LOW, mq.desc_table_addr().0 as u32);
    w(&mut t, QUEUE_DRIVER_LOW, mq.avail_addr().0 as u32);
    w(&mut t, QUEUE_DEVICE_LOW, mq.used_addr().0 as u32);
    w(&mut t, QUEUE_READY, 1);
    w(&mut t, STATUS, 15);
    assert_eq!(r(&mut t, STATUS), 15);
    assert_eq!(r(&mut t, CONFIG_SPACE), 256);
    assert_eq!(r(&mut t, CONFIG_SPACE + 4), 4096);

    let one = added(&[rec(PAGE_B)]);
    mem.write_slice(&one, GuestAddress(REQ)).unwrap();
    mq.add_desc_chains(&linked(&simple(&one, 1)), 0).unwrap();
    w(&mut t, QUEUE_NOTIFY, 0);
    let mut got = [0u8; 5];
    mem.read_slice(&mut got, GuestAddress(RESP)).unwrap();
    assert_eq!(got, [0, 0, 0, 0, 0]);
    assert_eq!(r(&mut t, INTERRUPT_STATUS), 1);
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    assert_eq!(calls.lock().unwrap()[0].1, vec![report(PAGE_B)]);
    assert_eq!(stats.snapshot().merged, 1);
    assert_eq!(t.stats(), MmioStats::default());
}

#[test]
fn a_driver_that_did_not_accept_host_hash_gets_its_hashes_passed_on() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    dev.activate(VIRTIO_F_VERSION_1, &[true]).unwrap();
    let request = added(&[rec(PAGE_A), rec(PAGE_B)]);
    let done = submit(&mut dev, &mem, &request, &simple(&request, 2));
    assert_eq!(done.used, Some((0, 6)));
    let calls = calls.lock().unwrap();
    assert_eq!(calls[0], (ReportKind::Added, vec![report(PAGE_A), report(PAGE_B)], Hashing::Guest));
    assert_eq!(dev.stats().snapshot().host_hashed, 0);
}

#[test]
fn with_host_hash_the_hash_field_is_ignored_and_everything_else_is_checked() {
    let mem = mem();
    let (mut dev, calls) = device(&[]);
    dev.activate(VIRTIO_F_VERSION_1 | F_HOST_HASH, &[true]).unwrap();
    let with =
        |gpa: u64, hash: [u8; 32], flags: u32, reserved: u32| FphashRecord { gpa, hash, flags, reserved };
    let records = [
        with(PAGE_A, [0; 32], FLAG_FILE_PAGE, 0), // zero hash, as drivers send
        with(PAGE_B, [0xa5; 32], FLAG_FILE_PAGE, 0), // garbage: ignored
        with(PAGE_A + 8, [0; 32], FLAG_FILE_PAGE, 0), // unaligned
        with(OUTSIDE, [0; 32], FLAG_FILE_PAGE, 0), // outside RAM
        with(PAGE_A, [0; 32], 0, 0),              // ADDED without FILE_PAGE
        with(PAGE_A, [0; 32], FLAG_FILE_PAGE | 2, 0), // unknown flag bit
        with(PAGE_B, [0xff; 32], FLAG_FILE_PAGE, 7), // nonzero reserved
        with(A_END - 0x1000, [0x11; 32], FLAG_FILE_PAGE, 0), // good
    ];
    let batch = added(&records);
    let n = records.len();
    let done = submit(&mut dev, &mem, &batch, &simple(&batch, n));
    assert_eq!(done.used, Some((0, 4 + n as u32)));
    let (gpa, bad) = (RecordStatus::BadGpa.as_byte(), RecordStatus::BadRecord.as_byte());
    assert_eq!(&done.resp[4..4 + n], &[0, 0, gpa, gpa, bad, bad, bad, 0]);
    let zero = |gpa| PageReport { gpa, hash: [0; 32] };
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        let want = vec![zero(PAGE_A), zero(PAGE_B), zero(A_END - 0x1000)];
        assert_eq!(calls[0], (ReportKind::Added, want, Hashing::Host));
    }
    let s = dev.stats().snapshot();
    let want = FphashStatsSnapshot {
        batches: 1,
        records: n as u64,
        merged: 3,
        bad_gpa: 2,
        bad_record: 3,
        host_hashed: 3,
        ..Default::default()
    };
    assert_eq!(s, want);

    // REMOVED records carry no hash in either version; a malformed batch is still refused.
    let removed = request(TYPE_REMOVED, 1, &[with(PAGE_A, [0x33; 32], 0, 0)]);
    submit(&mut dev, &mem, &removed, &simple(&removed, 1));
    assert_eq!(calls.lock().unwrap()[1].0, ReportKind::Removed);
    let short = added(&[rec(PAGE_A), rec(PAGE_B)]);
    let done = submit(&mut dev, &mem, &short, &[req(short.len() - 1), resp(6)]);
    assert_eq!(done.batch_status(), BATCH_BAD_REQUEST);
    assert_eq!(calls.lock().unwrap().len(), 2);

    // A reset forgets the feature: the next driver may be a version-1 one.
    dev.reset();
    let one = added(&[rec(PAGE_A)]);
    submit(&mut dev, &mem, &one, &simple(&one, 1));
    assert_eq!(calls.lock().unwrap()[2], (ReportKind::Added, vec![report(PAGE_A)], Hashing::Guest));
}

#[test]
fn a_driver_that_accepts_host_hash_reads_version_2_behind_the_mmio_transport() {
    use crate::mmio::*;
    use crate::{EventFdInterrupt, MmioTransport};

    let mem = mem();
    let (dev, calls) = device(&[]);
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq).unwrap();
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let negotiate = |t: &mut MmioTransport, word0: u32| {
        w(t, STATUS, 0);
        w(t, STATUS, 3);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, word0);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, 1);
        assert_eq!(r(t, CONFIG_SPACE + 12), 1, "version before FEATURES_OK");
        w(t, STATUS, 11);
        assert_eq!(r(t, STATUS), 11);
    };
    negotiate(&mut t, F_HOST_HASH as u32);
    assert_eq!(r(&mut t, CONFIG_SPACE + 12), 2);
    // Unknown device-specific bits are refused, and the version stays 1.
    w(&mut t, STATUS, 0);
    w(&mut t, STATUS, 3);
    w(&mut t, DRIVER_FEATURES, 4 | F_HOST_HASH as u32);
    w(&mut t, DRIVER_FEATURES_SEL, 1);
    w(&mut t, DRIVER_FEATURES, 1);
    w(&mut t, STATUS, 11);
    assert_eq!((r(&mut t, STATUS), r(&mut t, CONFIG_SPACE + 12)), (3, 1));

    negotiate(&mut t, F_HOST_HASH as u32);
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
    w(&mut t, QUEUE_SEL, 0);
    w(&mut t, QUEUE_NUM, 64);
    w(&mut t, QUEUE_DESC_LOW, mq.desc_table_addr().0 as u32);
    w(&mut t, QUEUE_DRIVER_LOW, mq.avail_addr().0 as u32);
    w(&mut t, QUEUE_DEVICE_LOW, mq.used_addr().0 as u32);
    w(&mut t, QUEUE_READY, 1);
    w(&mut t, STATUS, 15);
    assert_eq!(r(&mut t, STATUS), 15);
    let one = added(&[FphashRecord { gpa: PAGE_B, hash: [0x5a; 32], flags: FLAG_FILE_PAGE, reserved: 0 }]);
    mem.write_slice(&one, GuestAddress(REQ)).unwrap();
    mq.add_desc_chains(&linked(&simple(&one, 1)), 0).unwrap();
    w(&mut t, QUEUE_NOTIFY, 0);
    let want = (ReportKind::Added, vec![PageReport { gpa: PAGE_B, hash: [0; 32] }], Hashing::Host);
    assert_eq!(calls.lock().unwrap()[0], want);
    // A reset forgets it: the next driver reads version 1 again.
    w(&mut t, STATUS, 0);
    assert_eq!(r(&mut t, CONFIG_SPACE + 12), 1);
}
