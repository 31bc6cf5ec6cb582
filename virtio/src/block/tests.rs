//! virtio-blk tests: requests against a temporary image, driven through a mock split queue
//! (virtio-queue's `test-utils`), including hostile descriptor chains.

use std::io::Write;
use std::os::unix::fs::FileExt;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::test_chains::{linked, D};

const MEM_SIZE: usize = 0x10_0000;
/// A guest-physical address past the end of guest RAM.
const OUTSIDE: u64 = 0x1000_0000;
const HDR: u64 = 0x2000;
const STATUS: u64 = 0x2100;
const DATA: u64 = 0x4000;
/// 128 sectors.
const DISK_SIZE: u64 = 64 * 1024;
const STATUS_UNTOUCHED: u8 = 0xee;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A temporary image whose byte `i` is `i % 251`.
fn image() -> TempFile {
    let tf = TempFile::new().unwrap();
    let data: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
    tf.as_file().write_all(&data).unwrap();
    tf
}

fn open(tf: &TempFile, read_only: bool) -> Block {
    Block::open(tf.as_path(), read_only, "samepage-disk-0").unwrap()
}

fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS)).unwrap();
}

fn hdr() -> D {
    (HDR, 16, false)
}
fn status() -> D {
    (STATUS, 1, true)
}

/// What the device did with one submitted chain.
#[derive(Debug)]
struct Done {
    /// The used ring's entry (head index, length), if any.
    used: Option<(u32, u32)>,
    /// The status byte (STATUS_UNTOUCHED if not written).
    status: u8,
    /// Whether the device asked for an interrupt.
    interrupt: bool,
}

fn submit_raw(block: &mut Block, mem: &GuestMemoryMmap, raw: &[RawDescriptor]) -> Done {
    let mq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
    mq.add_desc_chains(raw, 0).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    let interrupt = block.process_queue(0, &mut queue, mem);
    used_entry(mem, &mq, interrupt)
}

fn used_entry(mem: &GuestMemoryMmap, mq: &MockSplitQueue<GuestMemoryMmap>, irq: bool) -> Done {
    let used = mq.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    let entry = (idx > 0).then(|| {
        let id: u32 = mem.read_obj(used.unchecked_add(4)).unwrap();
        let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
        (id, len)
    });
    Done { used: entry, status: mem.read_obj(GuestAddress(STATUS)).unwrap(), interrupt: irq }
}

fn submit(block: &mut Block, mem: &GuestMemoryMmap, chain: &[D]) -> Done {
    submit_raw(block, mem, &linked(chain))
}

use vm_memory::Address;

#[test]
fn identity_features_and_config() {
    let tf = image();
    let block = open(&tf, false);
    assert_eq!(block.device_type(), 2);
    assert_eq!(block.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(block.capacity_sectors(), DISK_SIZE / 512);
    let f = block.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut w = [0u8; 4];
    block.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    block.read_config(8, &mut w);
    assert_eq!(u32::from_le_bytes(w), SIZE_MAX);
    // Past the configuration and at absurd offsets: zeros, no panic.
    let mut far = [0xffu8; 4];
    block.read_config(22, &mut far);
    assert_eq!(far, [0; 4]);
    block.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn read_write_roundtrip() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    let stats = block.stats();

    // Write 1024 bytes at sector 2 from two descriptors.
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xbb; 512], GuestAddress(DATA + 0x1000)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 2);
    let chain = [hdr(), (DATA, 512, false), (DATA + 0x1000, 512, false), status()];
    let done = submit(&mut block, &mem, &chain);
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used, Some((0, 1)));
    assert!(done.interrupt);
    let mut back = [0u8; 1024];
    tf.as_file().read_exact_at(&mut back, 1024).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0xaa));
    assert!(back[512..].iter().all(|&b| b == 0xbb));

    // Read sectors 1..4 back into one descriptor.
    write_header(&mem, VIRTIO_BLK_T_IN, 1);
    let done = submit(&mut block, &mem, &[hdr(), (DATA + 0x8000, 1536, true), status()]);
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used, Some((0, 1537)));
    let mut got = [0u8; 1536];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x8000)).unwrap();
    assert!((0..512).all(|i| got[i] == ((512 + i) % 251) as u8));
    assert!(got[512..1024].iter().all(|&b| b == 0xaa));
    assert!(got[1024..].iter().all(|&b| b == 0xbb));

    let s = stats.snapshot();
    assert_eq!((s.reads, s.writes, s.bytes_read, s.bytes_written), (1, 1, 1536, 1024));
    assert_eq!(s.io_errors + s.out_of_range + s.bad_data_descriptors, 0);
}

#[test]
fn last_sector_is_reachable() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, VIRTIO_BLK_T_IN, DISK_SIZE / 512 - 1);
    let done = submit(&mut block, &mem, &[hdr(), (DATA, 512, true), status()]);
    assert_eq!(done.status, S_OK);
}

#[test]
fn flush_and_get_id() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    let stats = block.stats();

    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let done = submit(&mut block, &mem, &[hdr(), status()]);
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used, Some((0, 1)));

    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
    let done = submit(&mut block, &mem, &[hdr(), (DATA, 20, true), status()]);
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used, Some((0, 21)));
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"samepage-disk-0");
    assert_eq!(&id[15..20], &[0; 5]);
    assert_eq!(id[20], 0xff, "wrote past the 20-byte id");

    let s = stats.snapshot();
    assert_eq!((s.flushes, s.get_ids), (1, 1));
}

#[test]
fn read_only_disk_refuses_writes() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, true);
    let stats = block.stats();
    assert_ne!(block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);

    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    let done = submit(&mut block, &mem, &[hdr(), (DATA, 512, false), status()]);
    assert_eq!(done.status, S_IOERR);
    assert_eq!(done.used, Some((0, 1)));
    let mut first = [0u8; 4];
    tf.as_file().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0, 1, 2, 3], "read-only image was modified");

    // Reads and flushes still work.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(submit(&mut block, &mem, &[hdr(), (DATA, 512, true), status()]).status, S_OK);
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(submit(&mut block, &mem, &[hdr(), status()]).status, S_OK);

    let s = stats.snapshot();
    assert_eq!((s.read_only_writes, s.writes, s.reads, s.flushes), (1, 0, 1, 1));
}

#[test]
fn flock_sharing_rules() {
    let tf = image();
    let ro1 = open(&tf, true);
    let ro2 = open(&tf, true);
    let err = Block::open(tf.as_path(), false, "x").err().unwrap();
    assert!(matches!(err, BlockError::InUse { .. }), "{err}");
    assert!(err.to_string().contains(&tf.as_path().display().to_string()));
    drop((ro1, ro2));

    let rw = open(&tf, false);
    let err = Block::open(tf.as_path(), false, "x").err().unwrap();
    assert!(matches!(err, BlockError::InUse { .. }), "{err}");
    let err = Block::open(tf.as_path(), true, "x").err().unwrap();
    assert!(matches!(err, BlockError::BeingWritten { .. }), "{err}");
    drop(rw);
    open(&tf, false);

    let err = Block::open("/nonexistent/samepage.img", true, "x").err().unwrap();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
}

#[test]
fn only_files_and_block_devices_with_a_whole_sector_are_images() {
    let err = Block::open("/dev/zero", true, "x").err().unwrap();
    assert!(matches!(err, BlockError::NotAnImage { found: "a character device", .. }), "{err}");
    let err = Block::open("/", true, "x").err().unwrap();
    assert!(matches!(err, BlockError::NotAnImage { found: "a directory", .. }), "{err}");
    let tf = TempFile::new().unwrap();
    let err = Block::open(tf.as_path(), true, "x").err().unwrap();
    assert!(matches!(err, BlockError::TooSmall { size: 0, .. }), "{err}");
    tf.as_file().write_all(&[1; 511]).unwrap();
    let err = Block::open(tf.as_path(), true, "x").err().unwrap();
    assert!(matches!(err, BlockError::TooSmall { size: 511, .. }), "{err}");
    tf.as_file().write_all(&[1]).unwrap();
    assert_eq!(Block::open(tf.as_path(), true, "x").unwrap().capacity_sectors(), 1);
}

#[test]
fn unsupported_type() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, 0x1234_5678, 0);
    let done = submit(&mut block, &mem, &[hdr(), (DATA, 512, true), status()]);
    assert_eq!(done.status, S_UNSUPP);
    assert_eq!(done.used, Some((0, 1)));
    assert_eq!(block.stats().snapshot().unsupported, 1);
}

/// Submits `chain` with an IN or OUT header and checks it fails with IOERR, counted by `pick`.
fn expect_ioerr(request_type: u32, sector: u64, chain: &[D], pick: fn(&BlockStatsSnapshot) -> u64) {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, request_type, sector);
    let done = submit(&mut block, &mem, chain);
    assert_eq!(done.status, S_IOERR, "{chain:?}");
    assert_eq!(done.used, Some((0, 1)));
    let s = block.stats().snapshot();
    assert_eq!(pick(&s), 1, "{s:?}");
    assert_eq!(s.reads + s.writes, 0);
}

#[test]
fn data_outside_guest_ram() {
    let pick = |s: &BlockStatsSnapshot| s.bad_data_descriptors;
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (OUTSIDE, 512, true), status()], pick);
    expect_ioerr(VIRTIO_BLK_T_OUT, 0, &[hdr(), (OUTSIDE, 512, false), status()], pick);
    // Straddling the end of RAM.
    let end = MEM_SIZE as u64 - 256;
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (end, 512, true), status()], pick);
    // Address overflow.
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (u64::MAX - 100, 512, true), status()], pick);
}

#[test]
fn wrong_descriptor_directions() {
    let pick = |s: &BlockStatsSnapshot| s.bad_data_descriptors;
    // A read whose buffer the device may not write, a write whose buffer it may not read.
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (DATA, 512, false), status()], pick);
    expect_ioerr(VIRTIO_BLK_T_OUT, 0, &[hdr(), (DATA, 512, true), status()], pick);
    // GET_ID into a read-only buffer.
    expect_ioerr(VIRTIO_BLK_T_GET_ID, 0, &[hdr(), (DATA, 20, false), status()], pick);
    // A descriptor above SIZE_MAX.
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (DATA, SIZE_MAX + 512, true), status()], pick);
}

#[test]
fn bad_headers() {
    let pick = |s: &BlockStatsSnapshot| s.bad_headers;
    let data = (DATA, 512, true);
    // Truncated, too long, device-writable, outside RAM.
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[(HDR, 8, false), data, status()], pick);
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[(HDR, 24, false), data, status()], pick);
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[(HDR, 16, true), data, status()], pick);
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[(OUTSIDE, 16, false), data, status()], pick);
}

#[test]
fn out_of_range_requests() {
    let pick = |s: &BlockStatsSnapshot| s.out_of_range;
    let last = DISK_SIZE / 512 - 1;
    // Starts past the end; ends past the end; sector * 512 overflows; sector + len overflows.
    expect_ioerr(VIRTIO_BLK_T_IN, last + 1, &[hdr(), (DATA, 512, true), status()], pick);
    expect_ioerr(VIRTIO_BLK_T_IN, last, &[hdr(), (DATA, 1024, true), status()], pick);
    expect_ioerr(VIRTIO_BLK_T_OUT, u64::MAX, &[hdr(), (DATA, 512, false), status()], pick);
    expect_ioerr(VIRTIO_BLK_T_IN, u64::MAX / 512, &[hdr(), (DATA, 512, true), status()], pick);
    // Not a whole number of sectors.
    expect_ioerr(VIRTIO_BLK_T_IN, 0, &[hdr(), (DATA, 100, true), status()], pick);
}

#[test]
fn bad_status_descriptor_is_returned_unanswered() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let data = (DATA, 512, true);
    let cases: [&[D]; 5] = [
        &[hdr(), data, (STATUS, 1, false)], // read-only status
        &[hdr(), data, (STATUS, 2, true)],  // not one byte
        &[hdr(), data, (OUTSIDE, 1, true)], // outside RAM
        &[(STATUS, 1, true)],               // status alone, no header
        &[hdr()],                           // header alone
    ];
    for (i, chain) in cases.iter().enumerate() {
        let done = submit(&mut block, &mem, chain);
        assert_eq!(done.used, Some((0, 0)), "case {i}");
        assert_eq!(done.status, STATUS_UNTOUCHED, "case {i}");
        assert_eq!(block.stats().snapshot().unanswerable, i as u64 + 1);
    }
    assert_eq!(block.stats().snapshot().reads, 0);
}

#[test]
fn looping_chain() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> 2 -> …: the iterator stops after QUEUE_SIZE descriptors.
    let mut raw = linked(&[hdr(), (DATA, 512, true), status()]);
    raw[2] = RawDescriptor::from(SplitDescriptor::new(
        STATUS,
        1,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        1,
    ));
    let done = submit_raw(&mut block, &mem, &raw);
    assert_eq!(done.used, Some((0, 0)));
    assert_eq!(done.status, STATUS_UNTOUCHED);
    let s = block.stats().snapshot();
    assert_eq!((s.malformed_chains, s.unanswerable, s.reads), (1, 1, 0));

    // A `next` outside the descriptor table.
    let mut raw = linked(&[hdr(), (DATA, 512, true), status()]);
    raw[1] = RawDescriptor::from(SplitDescriptor::new(
        DATA,
        512,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        QUEUE_SIZE + 7,
    ));
    let done = submit_raw(&mut block, &mem, &raw);
    assert_eq!(done.used, Some((0, 0)));
    assert_eq!(block.stats().snapshot().malformed_chains, 2);
}

#[test]
fn over_long_chain() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![hdr()];
    chain.extend((0..SEG_MAX as u64 + 1).map(|i| (DATA + i * 512, 512, true)));
    chain.push(status());
    let done = submit(&mut block, &mem, &chain);
    assert_eq!(done.status, S_IOERR);
    assert_eq!(done.used, Some((0, 1)));
    let s = block.stats().snapshot();
    assert_eq!((s.malformed_chains, s.reads), (1, 0));

    // SEG_MAX data descriptors are fine.
    chain.remove(1);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let done = submit(&mut block, &mem, &chain);
    assert_eq!(done.status, S_OK);
    assert_eq!(done.used, Some((0, SEG_MAX * 512 + 1)));
}

#[test]
fn head_index_outside_queue_and_bogus_avail_index() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let avail = mq.avail_addr();
    // One available entry naming descriptor 1000 of a 256-entry table.
    mem.write_obj(1000u16, avail.unchecked_add(4)).unwrap();
    mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    assert!(!block.process_queue(0, &mut queue, &mem));
    assert_eq!(used_entry(&mem, &mq, false).used, None);
    assert_eq!(block.stats().snapshot().malformed_chains, 1);

    // An available index far ahead of the device: refused without looping forever.
    mem.write_obj(0x8000u16, avail.unchecked_add(2)).unwrap();
    assert!(!block.process_queue(0, &mut queue, &mem));
    assert_eq!(block.stats().snapshot().malformed_chains, 2);
}

#[test]
fn many_requests_in_one_notification() {
    let tf = image();
    let mem = mem();
    let mut block = open(&tf, false);
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    write_header(&mem, VIRTIO_BLK_T_IN, 3);
    // Three chains sharing header and status, each reading into its own buffer.
    let mut raw = Vec::new();
    for i in 0..3u64 {
        raw.extend(linked(&[hdr(), (DATA + i * 0x1000, 512, true), status()]));
    }
    for (i, d) in raw.iter_mut().enumerate() {
        let s = SplitDescriptor::from(*d);
        let next = if s.has_next() { i as u16 + 1 } else { 0 };
        *d = RawDescriptor::from(SplitDescriptor::new(s.addr().0, s.len(), s.flags(), next));
    }
    mq.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    assert!(block.process_queue(0, &mut queue, &mem));
    let used_idx: u16 = mem.read_obj(mq.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 3);
    assert_eq!(block.stats().snapshot().reads, 3);
}

#[test]
fn works_behind_the_mmio_transport() {
    use crate::mmio::*;
    use crate::{EventFdInterrupt, MmioTransport};

    let tf = image();
    let mem = mem();
    let block = open(&tf, false);
    let stats = block.stats();
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq.clone()).unwrap();
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut t, DEVICE_ID), 2);
    w(&mut t, STATUS, 1);
    w(&mut t, STATUS, 3);
    w(&mut t, DEVICE_FEATURES_SEL, 1);
    let high = r(&mut t, DEVICE_FEATURES);
    w(&mut t, DEVICE_FEATURES_SEL, 0);
    let low = r(&mut t, DEVICE_FEATURES);
    w(&mut t, DRIVER_FEATURES_SEL, 1);
    w(&mut t, DRIVER_FEATURES, high);
    w(&mut t, DRIVER_FEATURES_SEL, 0);
    w(&mut t, DRIVER_FEATURES, low);
    w(&mut t, STATUS, 11);
    assert_eq!(r(&mut t, STATUS), 11);

    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
    w(&mut t, QUEUE_SEL, 0);
    assert_eq!(r(&mut t, QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    w(&mut t, QUEUE_NUM, 64);
    w(&mut t, QUEUE_DESC_LOW, mq.desc_table_addr().0 as u32);
    w(&mut t, QUEUE_DRIVER_LOW, mq.avail_addr().0 as u32);
    w(&mut t, QUEUE_DEVICE_LOW, mq.used_addr().0 as u32);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&mut t, QUEUE_READY), 1);
    w(&mut t, STATUS, 15);
    assert_eq!(r(&mut t, STATUS), 15);

    let mut cap = [0u8; 8];
    t.read(CONFIG_SPACE, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);

    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    mq.add_desc_chains(&linked(&[hdr(), (DATA, 512, true), status()]), 0).unwrap();
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(r(&mut t, INTERRUPT_STATUS), 1);
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    w(&mut t, INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
    assert_eq!(stats.snapshot().reads, 1);
    assert_eq!(t.stats(), MmioStats::default());
}

#[test]
fn image_size_not_a_multiple_of_a_sector() {
    let tf = TempFile::new().unwrap();
    tf.as_file().set_len(1000).unwrap();
    let block = open(&tf, true);
    assert_eq!(block.capacity_sectors(), 1);
    tf.as_file().flush().unwrap();
}

/// An image mapper as the VMM's: maps the image's pages over the guest pages for real (so the
/// guest reads them), records each call, and maps at most `budget` pages in all.
struct RecordingMapper {
    mem: GuestMemoryMmap,
    calls: MapCalls,
    budget: usize,
}

impl ImageMapper for RecordingMapper {
    fn map_image(&mut self, image: &File, gpa: u64, offset: u64, pages: usize) -> usize {
        use std::os::fd::AsRawFd;
        self.calls.lock().unwrap().push((gpa, offset, pages));
        let n = pages.min(self.budget);
        if n == 0 {
            return 0;
        }
        let host = self.mem.get_host_address(GuestAddress(gpa)).unwrap();
        // SAFETY: whole pages of this test's own guest memory, replaced by the image's bytes
        // the read asked for; nothing holds references into them.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                n * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                image.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        self.budget -= n;
        n
    }
}

/// The mapper's calls: (guest address, image offset, pages asked).
type MapCalls = Arc<std::sync::Mutex<Vec<(u64, u64, usize)>>>;

/// A read-only disk whose reads go through a recording mapper of `budget` pages.
fn shared(tf: &TempFile, mem: &GuestMemoryMmap, budget: usize) -> (Block, MapCalls) {
    let mut block = open(tf, true);
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    assert!(block.share_image(Box::new(RecordingMapper { mem: mem.clone(), calls: calls.clone(), budget })));
    (block, calls)
}

/// Reads `len` bytes at `sector` into `gpa`; checks the guest then holds the image's bytes.
fn read_and_check(block: &mut Block, mem: &GuestMemoryMmap, gpa: u64, sector: u64, len: u32) {
    write_header(mem, VIRTIO_BLK_T_IN, sector);
    let done = submit(block, mem, &[hdr(), (gpa, len, true), status()]);
    assert_eq!(done.status, S_OK);
    let mut got = vec![0u8; len as usize];
    mem.read_slice(&mut got, GuestAddress(gpa)).unwrap();
    let base = sector * 512;
    assert!(got.iter().enumerate().all(|(i, &b)| b == ((base + i as u64) % 251) as u8), "wrong bytes read");
}

#[test]
fn whole_aligned_pages_of_a_read_only_image_are_mapped_not_copied() {
    let tf = image();
    let mem = mem();
    let (mut block, calls) = shared(&tf, &mem, usize::MAX);
    // Sector 8 is image offset 4096; 0x4000 is a page: two whole pages map.
    read_and_check(&mut block, &mem, DATA, 8, 8192);
    assert_eq!(*calls.lock().unwrap(), vec![(DATA, 4096, 2)]);
    assert_eq!(block.stats().snapshot().shared_pages, 2);
}

#[test]
fn unaligned_and_partial_buffers_are_copied() {
    let tf = image();
    let mem = mem();
    let (mut block, calls) = shared(&tf, &mem, usize::MAX);
    // The guest buffer and the image offset never fall in step: copied whole.
    read_and_check(&mut block, &mem, DATA + 0x100, 8, 8192);
    // A partial page, aligned: copied.
    read_and_check(&mut block, &mem, DATA + 0x8000, 8, 2048);
    assert!(calls.lock().unwrap().is_empty());
    // In step but starting mid-page: the head is copied, the whole page in the middle mapped,
    // the tail copied.
    read_and_check(&mut block, &mem, DATA + 0x10200, 9, 8192);
    assert_eq!(*calls.lock().unwrap(), vec![(DATA + 0x11000, 8192, 1)]);
    assert_eq!(block.stats().snapshot().shared_pages, 1);
}

#[test]
fn copied_bytes_are_counted_apart_from_mapped_pages() {
    let tf = image();
    let mem = mem();
    let (mut block, _) = shared(&tf, &mem, usize::MAX);
    // Two pages map; a buffer out of step with the image, and a partial page, are copied.
    read_and_check(&mut block, &mem, DATA, 8, 8192);
    read_and_check(&mut block, &mem, DATA + 0x100, 8, 8192);
    read_and_check(&mut block, &mem, DATA + 0x8000, 8, 2048);
    let s = block.stats().snapshot();
    assert_eq!((s.shared_pages, s.copied_bytes, s.bytes_read), (2, 8192 + 2048, 8192 * 2 + 2048));
    // Without sharing, every read is copied.
    let mut plain = open(&tf, true);
    read_and_check(&mut plain, &mem, DATA, 8, 8192);
    let s = plain.stats().snapshot();
    assert_eq!((s.shared_pages, s.copied_bytes), (0, 8192));
}

#[test]
fn a_shared_image_read_mostly_by_copying_is_judged_once_enough_was_read() {
    let tf = image();
    let mem = mem();
    let (mut copying, _) = shared(&tf, &mem, usize::MAX);
    let (mut mapping, _) = shared(&tf, &mem, usize::MAX);
    let reads = COPIED_VERDICT_BYTES / 8192;
    for i in 0..reads {
        assert!(!copying.warned_copies, "judged after {i} reads of 8 KiB");
        read_and_check(&mut copying, &mem, DATA + 0x100, 8, 8192);
        read_and_check(&mut mapping, &mem, DATA, 8, 8192);
    }
    assert!(copying.warned_copies, "every byte copied");
    assert!(!mapping.warned_copies, "every page mapped");
    // A disk without sharing copies by design: nothing to judge.
    let mut plain = open(&tf, true);
    for _ in 0..reads {
        read_and_check(&mut plain, &mem, DATA + 0x100, 8, 8192);
    }
    assert!(!plain.warned_copies);
}

#[test]
fn pages_the_mapper_declines_are_copied() {
    let tf = image();
    let mem = mem();
    // Room for one page: the second of the request is copied.
    let (mut block, calls) = shared(&tf, &mem, 1);
    read_and_check(&mut block, &mem, DATA, 16, 12288);
    assert_eq!(*calls.lock().unwrap(), vec![(DATA, 8192, 3), (DATA + 0x1000, 12288, 2)]);
    assert_eq!(block.stats().snapshot().shared_pages, 1);
}

#[test]
fn only_read_only_images_are_shared() {
    let tf = image();
    let mem = mem();
    let mut writable = open(&tf, false);
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    assert!(!writable.share_image(Box::new(RecordingMapper {
        mem: mem.clone(),
        calls: calls.clone(),
        budget: 9
    })));
    read_and_check(&mut writable, &mem, DATA, 8, 8192);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn a_replaced_image_serves_the_next_request_with_its_own_capacity_and_a_shared_one_stays() {
    let (first, mem) = (image(), mem());
    let second = TempFile::new().unwrap();
    second.as_file().write_all(&[0x5a; 4096]).unwrap();
    let mut block = open(&first, false);
    let stats = block.stats();
    assert_eq!(block.replace_image(second.as_path()).expect("replaced"), 8);
    assert_eq!(block.capacity_sectors(), 8);
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8, "the configuration's capacity");
    write_header(&mem, VIRTIO_BLK_T_IN, 7);
    let done = submit(&mut block, &mem, &[hdr(), (DATA, 512, true), status()]);
    assert_eq!(done.status, S_OK);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a), "the read came from the old image");
    write_header(&mem, VIRTIO_BLK_T_IN, 8);
    assert_ne!(submit(&mut block, &mem, &[hdr(), (DATA, 512, true), status()]).status, S_OK);
    assert_eq!(stats.snapshot().reads, 1, "the counters stay");
    // The first image is no longer held: another writer may lock it.
    drop(open(&first, false));
    // A missing image leaves the disk as it was.
    assert!(block.replace_image(Path::new("/nonexistent/disk.img")).is_err());
    assert_eq!(block.capacity_sectors(), 8);
    // A shared read-only image stays under its guest.
    struct NoMap;
    impl ImageMapper for NoMap {
        fn map_image(&mut self, _: &std::fs::File, _: u64, _: u64, _: usize) -> usize {
            0
        }
    }
    let mut shared = open(&first, true);
    assert!(shared.share_image(Box::new(NoMap)));
    assert!(matches!(shared.replace_image(second.as_path()), Err(BlockError::Shared { .. })));
}
