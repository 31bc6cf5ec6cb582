//! virtio-blk end to end: requests (virtio 1.2 §5.2.6) as descriptor chains in a split
//! virtqueue on guest memory, served by `Block` on a temporary image, read-only or writable.
//!
//! Most requests are well framed (header, data split into segments, status byte) and are
//! predicted exactly against a model of the disk: status, used length, the bytes read into
//! guest memory, the image's content after writes, GET_ID's bytes and every counter. Groups
//! of requests with chain faults are checked for what holds for any chain: a status byte the
//! spec defines, a bounded used length, every chain returned, and a read-only image that never
//! changes.
#![no_main]

use std::io::Write;
use std::os::unix::fs::FileExt;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{
    apply_faults, counted, guest_memory, linked, queue_size, read_bytes, ChainFault, Desc, Part, Ring,
};
use samepage_virtio::block::{
    Block, BlockStatsSnapshot, RequestHeader, ID_LEN, MAX_REQUEST_BYTES, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use samepage_virtio::VirtioDevice;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 0x40_0000;
/// The rings, then indirect tables; no fault may point a buffer here.
const RING: u64 = 0;
const INDIRECT: (u64, u64) = (0x2000, 0x2_0000);
/// Each request's header, status byte and data area.
const HEADERS: u64 = 0x2_0000;
const STATUSES: u64 = 0x2_1000;
const DATA: u64 = 0x10_0000;
const DATA_STRIDE: u64 = 0x4_0000;
const MAX_REQUESTS: usize = 8;
const UNTOUCHED: u8 = 0xee;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    /// 1 + this % 128 sectors, plus `tail % 512` bytes the guest must not see.
    disk_sectors: u8,
    tail: u16,
    disk_seed: u8,
    id: String,
    /// See `samepage_fuzz::queue_size`.
    queue_size: u8,
    #[arbitrary(with = counted::<_, 1, MAX_REQUESTS>)]
    requests: Vec<RequestSpec>,
}

#[derive(Debug)]
enum Op {
    In,
    Out,
    Flush,
    GetId,
    Other(u32),
}

#[derive(Arbitrary, Debug)]
enum SectorSpec {
    /// Where the request's data fits on the disk, if it can.
    Fits(u16),
    /// Within the disk or just past its end.
    Near(u16),
    Any(u64),
}

/// A data segment's length: 0 to 8 sectors, or (when `roll` is 240 or more) any number of
/// bytes up to 64 KiB, SIZE_MAX or SIZE_MAX + 1.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct SegLen {
    roll: u8,
    value: u16,
}

#[derive(Arbitrary, Debug)]
struct RequestSpec {
    /// 0..=99 IN, ..=179 OUT, ..=209 FLUSH, ..=239 GET_ID, else `other_type`.
    op: u8,
    other_type: u32,
    sector: SectorSpec,
    reserved: u32,
    #[arbitrary(with = counted::<_, 0, 16>)]
    segments: Vec<SegLen>,
    /// When 224 or more, the segments repeat to 112 + (this - 224) of them, around SEG_MAX.
    many: u8,
    fill: u8,
    indirect: bool,
    /// Serve the queue once this request is in it.
    notify: bool,
    /// Faults apply when this is 216 or more.
    fault_roll: u8,
    faults: Vec<ChainFault>,
}

/// What a request without faults must get.
struct Expected {
    status: u8,
    used: u32,
    effect: Effect,
    /// The counters it moves, as a snapshot of increments.
    counts: BlockStatsSnapshot,
}

enum Effect {
    None,
    /// Guest memory `(addr, len)` segments now hold the disk's bytes from `offset`.
    Read {
        offset: u64,
    },
    /// The disk holds the segments' bytes from `offset`.
    Write {
        offset: u64,
    },
    /// The segments hold the id, NUL-padded, as far as they reach.
    Id,
}

/// One request as built.
struct Built {
    status_addr: u64,
    segments: Vec<(u64, u32)>,
    /// `None` when the chain has faults.
    expected: Option<Expected>,
}

struct Disk {
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    /// What the image holds (all of it, the partial sector too).
    model: Vec<u8>,
}

fn request_type(op: &Op) -> u32 {
    match *op {
        Op::In => VIRTIO_BLK_T_IN,
        Op::Out => VIRTIO_BLK_T_OUT,
        Op::Flush => VIRTIO_BLK_T_FLUSH,
        Op::GetId => VIRTIO_BLK_T_GET_ID,
        Op::Other(t) => t,
    }
}

/// The operation a request type means (an `Other` may name a known one).
fn op_of(request_type: u32) -> Op {
    match request_type {
        VIRTIO_BLK_T_IN => Op::In,
        VIRTIO_BLK_T_OUT => Op::Out,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => Op::GetId,
        t => Op::Other(t),
    }
}

fn seg_len(s: SegLen) -> u32 {
    match s.roll {
        0..=239 => u32::from(s.value % 9) * SECTOR_SIZE as u32,
        240..=249 => u32::from(s.value),
        250..=252 => SIZE_MAX,
        _ => SIZE_MAX + 1,
    }
}

/// Bytes to fill data areas with: `PATTERN[fill..]` differs for each `fill`.
fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| (0..DATA_STRIDE as usize + 256).map(|i| (i % 253) as u8).collect())
}

/// The device's verdict on a framed request, restated from virtio 1.2 §5.2.6 and the limits
/// it advertises.
fn expect(disk: &Disk, op: &Op, sector: u64, lens: &[u32]) -> Expected {
    let mut counts = BlockStatsSnapshot::default();
    let ioerr = |counts| Expected { status: S_IOERR, used: 1, effect: Effect::None, counts };
    if lens.len() + 2 > SEG_MAX as usize + 2 {
        counts.malformed_chains = 1;
        return ioerr(counts);
    }
    match op {
        Op::In | Op::Out => {
            if lens.iter().any(|&l| l > SIZE_MAX) {
                counts.bad_data_descriptors = 1;
                return ioerr(counts);
            }
            let len: u64 = lens.iter().map(|&l| u64::from(l)).sum();
            let range = sector.checked_mul(SECTOR_SIZE).and_then(|o| Some((o, o.checked_add(len)?)));
            let Some((offset, end)) =
                range.filter(|&(_, end)| end <= disk.capacity && len.is_multiple_of(SECTOR_SIZE))
            else {
                counts.out_of_range = 1;
                return ioerr(counts);
            };
            let _ = end;
            if matches!(op, Op::Out) {
                if disk.read_only {
                    counts.read_only_writes = 1;
                    return ioerr(counts);
                }
                counts.writes = 1;
                counts.bytes_written = len;
                return Expected { status: S_OK, used: 1, effect: Effect::Write { offset }, counts };
            }
            counts.reads = 1;
            counts.bytes_read = len;
            // No image sharing here: every byte read is copied.
            counts.copied_bytes = len;
            Expected { status: S_OK, used: len as u32 + 1, effect: Effect::Read { offset }, counts }
        }
        Op::Flush => {
            counts.flushes = 1;
            Expected { status: S_OK, used: 1, effect: Effect::None, counts }
        }
        Op::GetId => {
            counts.get_ids = 1;
            let written = lens.iter().fold(0usize, |w, &l| w + (l as usize).min(ID_LEN - w));
            Expected { status: S_OK, used: written as u32 + 1, effect: Effect::Id, counts }
        }
        Op::Other(_) => {
            counts.unsupported = 1;
            Expected { status: S_UNSUPP, used: 1, effect: Effect::None, counts }
        }
    }
}

fn build(mem: &GuestMemoryMmap, disk: &Disk, i: usize, spec: &RequestSpec) -> (Vec<Desc>, Built) {
    let op = match spec.op {
        0..=99 => Op::In,
        100..=179 => Op::Out,
        180..=209 => Op::Flush,
        210..=239 => Op::GetId,
        _ => op_of(spec.other_type),
    };
    // Data segments back to back in this request's area, as far as it holds them.
    let data_writable = matches!(op, Op::In | Op::GetId);
    let area = DATA + i as u64 * DATA_STRIDE;
    let mut at = area;
    let mut segments = Vec::new();
    let count = if spec.many >= 224 { 112 + usize::from(spec.many - 224) } else { spec.segments.len() };
    for &s in spec.segments.iter().cycle().take(count) {
        let len = seg_len(s);
        if at + u64::from(len) > area + DATA_STRIDE {
            break;
        }
        segments.push((at, len));
        at += u64::from(len);
    }
    let sectors = disk.capacity / SECTOR_SIZE;
    let sector = match spec.sector {
        SectorSpec::Fits(s) => {
            let needed = (at - area).div_ceil(SECTOR_SIZE);
            u64::from(s) % (sectors.saturating_sub(needed) + 1)
        }
        SectorSpec::Near(s) => u64::from(s) % (sectors + 2),
        SectorSpec::Any(s) => s,
    };
    let header = RequestHeader { request_type: request_type(&op), reserved: spec.reserved, sector };
    let header_addr = HEADERS + 16 * i as u64;
    mem.write_obj(header, GuestAddress(header_addr)).expect("header");
    let status_addr = STATUSES + i as u64;
    mem.write_obj(UNTOUCHED, GuestAddress(status_addr)).expect("status");
    let fill = usize::from(spec.fill);
    mem.write_slice(&pattern()[fill..fill + (at - area) as usize], GuestAddress(area)).expect("data area");

    let mut parts: Vec<Part> = vec![(header_addr, 16, false)];
    parts.extend(segments.iter().map(|&(a, l)| (a, l, data_writable)));
    parts.push((status_addr, 1, true));
    let mut chain = linked(&parts);
    let faults: Vec<ChainFault> = if spec.fault_roll >= 216 {
        // A buffer in the rings would let the device rewrite them: the driver's own doing.
        spec.faults
            .iter()
            .map(|&f| match f {
                ChainFault::Addr(i, a) if a < HEADERS => ChainFault::Addr(i, a + HEADERS),
                f => f,
            })
            .collect()
    } else {
        Vec::new()
    };
    apply_faults(&mut chain, &faults);
    let expected = faults.is_empty().then(|| {
        let lens: Vec<u32> = segments.iter().map(|&(_, l)| l).collect();
        expect(disk, &op, sector, &lens)
    });
    (chain, Built { status_addr, segments, expected })
}

fn image(input: &Input) -> (TempFile, Disk) {
    let capacity = (1 + u64::from(input.disk_sectors) % 128) * SECTOR_SIZE;
    let size = capacity + u64::from(input.tail) % SECTOR_SIZE;
    let model: Vec<u8> = (0..size).map(|i| ((i * 7) % 251) as u8 ^ input.disk_seed).collect();
    let file = TempFile::new().expect("temporary image");
    file.as_file().write_all(&model).expect("image content");
    let mut id = [0u8; ID_LEN];
    let n = input.id.len().min(ID_LEN);
    id[..n].copy_from_slice(&input.id.as_bytes()[..n]);
    (file, Disk { capacity, read_only: input.read_only, id, model })
}

fn file_bytes(file: &TempFile, len: usize) -> Vec<u8> {
    let mut now = vec![0u8; len + 1];
    let n = file.as_file().read_at(&mut now, 0).expect("image readable");
    now.truncate(n);
    now
}

/// The device under test and the driver's view of it.
struct Run {
    block: Block,
    stats: std::sync::Arc<samepage_virtio::block::BlockStats>,
    mem: GuestMemoryMmap,
    ring: Ring,
    queue: virtio_queue::Queue,
    file: TempFile,
    disk: Disk,
    /// Requests in the queue, not served yet.
    group: Vec<Built>,
    /// Requests served so far: where the group's used entries start.
    returned: u16,
}

impl Run {
    /// Notifies the device, checks what it did with the group, and reuses the descriptors.
    fn serve(&mut self) {
        let before = self.stats.snapshot();
        let interrupt = self.block.process_queue(0, &mut self.queue, &self.mem);
        assert_eq!(interrupt, !self.group.is_empty());
        let after = self.stats.snapshot();
        check_group(
            &self.mem,
            &self.ring,
            &self.file,
            &mut self.disk,
            &self.group,
            self.returned,
            before,
            after,
        );
        self.returned = self.returned.wrapping_add(self.group.len() as u16);
        self.group.clear();
        self.ring.reclaim();
    }

    /// Builds request `i` and queues it; when the queue is full, serves the requests in it
    /// first and reuses their descriptors, as a driver does.
    fn submit(&mut self, i: usize, spec: &RequestSpec) {
        let (chain, built) = build(&self.mem, &self.disk, i, spec);
        if self.ring.add_chain(&self.mem, &chain, spec.indirect) {
            self.group.push(built);
            return;
        }
        if self.group.is_empty() {
            return;
        }
        self.serve();
        // Serving may have let faulty chains write over this request's buffers.
        let (chain, built) = build(&self.mem, &self.disk, i, spec);
        if self.ring.add_chain(&self.mem, &chain, spec.indirect) {
            self.group.push(built);
        }
    }
}

fuzz_target!(|input: Input| {
    let (file, disk) = image(&input);
    let block = Block::open(file.as_path(), disk.read_only, &input.id).expect("opening the image");
    assert_eq!(block.capacity_sectors() * SECTOR_SIZE, disk.capacity);
    let stats = block.stats();
    let mem = guest_memory(&[(0, MEM_SIZE as usize)]);
    let ring = Ring::new(&mem, RING, queue_size(input.queue_size), INDIRECT);
    let queue = ring.queue();
    let original = disk.model.clone();
    let mut run = Run { block, stats, mem, ring, queue, file, disk, group: Vec::new(), returned: 0 };
    for (i, spec) in input.requests.iter().enumerate() {
        run.submit(i, spec);
        if spec.notify || i + 1 == input.requests.len() {
            run.serve();
        }
    }
    if run.disk.read_only {
        assert!(file_bytes(&run.file, original.len()) == original, "a read-only image changed");
    }
});

#[allow(clippy::too_many_arguments)]
fn check_group(
    mem: &GuestMemoryMmap,
    ring: &Ring,
    file: &TempFile,
    disk: &mut Disk,
    group: &[Built],
    first: u16,
    before: BlockStatsSnapshot,
    after: BlockStatsSnapshot,
) {
    assert_eq!(ring.used_idx(mem), first.wrapping_add(group.len() as u16), "every chain returned");
    let mut counts = BlockStatsSnapshot::default();
    let exact = group.iter().all(|b| b.expected.is_some());
    for (k, b) in group.iter().enumerate() {
        let (_, used) = ring.used_elem(mem, first.wrapping_add(k as u16));
        assert!(u64::from(used) <= MAX_REQUEST_BYTES + 1, "used length {used}");
        let status: u8 = mem.read_obj(GuestAddress(b.status_addr)).expect("status byte");
        assert!([S_OK, S_IOERR, S_UNSUPP, UNTOUCHED].contains(&status), "status {status}");
        let Some(want) = b.expected.as_ref().filter(|_| exact) else { continue };
        assert_eq!((status, used), (want.status, want.used), "request {k}");
        add(&mut counts, &want.counts);
        check_effect(mem, disk, b, want);
    }
    if !exact {
        // Faulty chains may have written anywhere on the image: learn what it holds now.
        disk.model = file_bytes(file, disk.model.len());
        return;
    }
    assert_eq!(file_bytes(file, disk.model.len()), disk.model, "image content");
    let mut want = before;
    add(&mut want, &counts);
    assert_eq!(after, want, "counters");
}

fn check_effect(mem: &GuestMemoryMmap, disk: &mut Disk, b: &Built, want: &Expected) {
    match want.effect {
        Effect::None => {}
        Effect::Read { offset } => {
            let mut at = offset as usize;
            for &(addr, len) in &b.segments {
                let got = read_bytes(mem, addr, len as usize);
                assert!(got == disk.model[at..at + len as usize], "read data at byte {at}");
                at += len as usize;
            }
        }
        Effect::Write { offset } => {
            let mut at = offset as usize;
            for &(addr, len) in &b.segments {
                let data = read_bytes(mem, addr, len as usize);
                disk.model[at..at + len as usize].copy_from_slice(&data);
                at += len as usize;
            }
        }
        Effect::Id => {
            let mut written = 0;
            for &(addr, len) in &b.segments {
                let n = (len as usize).min(ID_LEN - written);
                let got = read_bytes(mem, addr, n);
                assert_eq!(got, disk.id[written..written + n], "GET_ID bytes");
                written += n;
            }
        }
    }
}

fn add(total: &mut BlockStatsSnapshot, d: &BlockStatsSnapshot) {
    let pairs = [
        (&mut total.reads, d.reads),
        (&mut total.writes, d.writes),
        (&mut total.flushes, d.flushes),
        (&mut total.get_ids, d.get_ids),
        (&mut total.bytes_read, d.bytes_read),
        (&mut total.copied_bytes, d.copied_bytes),
        (&mut total.bytes_written, d.bytes_written),
        (&mut total.unsupported, d.unsupported),
        (&mut total.malformed_chains, d.malformed_chains),
        (&mut total.bad_headers, d.bad_headers),
        (&mut total.bad_data_descriptors, d.bad_data_descriptors),
        (&mut total.out_of_range, d.out_of_range),
        (&mut total.read_only_writes, d.read_only_writes),
        (&mut total.io_errors, d.io_errors),
        (&mut total.unanswerable, d.unanswerable),
    ];
    for (t, v) in pairs {
        *t += v;
    }
}
