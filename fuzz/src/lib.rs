//! What samepage's fuzz targets share: guest memory, split virtqueues laid out in it the way a
//! driver lays them out, descriptor chains, and the faults a hostile driver puts in them.

use arbitrary::Arbitrary;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of `(start, length)` regions, zero-filled.
pub fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = ranges.iter().map(|&(start, len)| (GuestAddress(start), len)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory for the fuzz target")
}

/// Where a descriptor's `next` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// An index relative to the chain's first descriptor (turned into a table index when the
    /// chain is placed).
    Relative(u16),
    /// A raw table index, as a hostile driver may write it.
    Absolute(u16),
}

/// One descriptor of a chain, before it is placed in a descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// VRING_DESC_F_* flags.
    pub flags: u16,
    /// Where NEXT leads (ignored without VRING_DESC_F_NEXT).
    pub next: Next,
}

impl Desc {
    /// Whether the device may write the buffer.
    pub fn writable(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }
}

/// A buffer of a chain: (address, length, device-writable).
pub type Part = (u64, u32, bool);

/// The parts as one chain: each descriptor but the last has NEXT to the following one.
pub fn linked(parts: &[Part]) -> Vec<Desc> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            Desc { addr, len, flags, next: Next::Relative(i as u16 + 1) }
        })
        .collect()
}

/// Splits `[addr, addr + len)` at `cuts` (taken modulo `len + 1`, sorted; a repeated cut
/// makes a zero-length buffer) into parts of direction `write`.
pub fn split(addr: u64, len: u32, cuts: &[u16], write: bool) -> Vec<Part> {
    let mut points: Vec<u32> = cuts.iter().map(|&c| u32::from(c) % (len + 1)).collect();
    points.sort_unstable();
    let mut parts = Vec::with_capacity(points.len() + 1);
    let mut at = 0;
    for p in points.into_iter().chain([len]) {
        parts.push((addr + u64::from(at), p - at, write));
        at = p;
    }
    parts
}

/// A hostile driver's change to a chain; indices are taken modulo the chain's length.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum ChainFault {
    /// Toggle VRING_DESC_F_WRITE.
    FlipWrite(u16),
    /// Point a buffer anywhere.
    Addr(u16, u64),
    /// Give a buffer any length.
    Len(u16, u32),
    /// Link a descriptor back to an earlier one (a loop).
    LoopBack(u16, u16),
    /// Link a descriptor to any table index.
    Next(u16, u16),
    /// End the chain early (clear NEXT).
    End(u16),
    /// Set VRING_DESC_F_INDIRECT on a descriptor.
    Indirect(u16),
    /// Repeat a descriptor (up to 255 more times), which can make the chain over-long.
    Repeat(u16, u8),
}

/// Applies `faults` to a linked chain: repeats first (the chain is relinked after them),
/// then the others in order.
pub fn apply_faults(chain: &mut Vec<Desc>, faults: &[ChainFault]) {
    let mut repeated = false;
    for fault in faults {
        if let (&ChainFault::Repeat(i, n), false) = (fault, chain.is_empty()) {
            let at = usize::from(i) % chain.len();
            let d = chain[at];
            chain.splice(at..at, std::iter::repeat_n(d, n.into()));
            repeated = true;
        }
    }
    if repeated {
        let parts: Vec<Part> = chain.iter().map(|d| (d.addr, d.len, d.writable())).collect();
        *chain = linked(&parts);
    }
    let len = chain.len();
    if len == 0 {
        return;
    }
    let at = |i: u16| usize::from(i) % len;
    for fault in faults {
        match *fault {
            ChainFault::FlipWrite(i) => chain[at(i)].flags ^= VRING_DESC_F_WRITE as u16,
            ChainFault::Addr(i, addr) => chain[at(i)].addr = addr,
            ChainFault::Len(i, l) => chain[at(i)].len = l,
            ChainFault::LoopBack(i, j) => {
                let (i, j) = (at(i), at(j));
                let d = &mut chain[i.max(j)];
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = Next::Relative(i.min(j) as u16);
            }
            ChainFault::Next(i, n) => {
                let d = &mut chain[at(i)];
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = Next::Absolute(n);
            }
            ChainFault::End(i) => chain[at(i)].flags &= !(VRING_DESC_F_NEXT as u16),
            ChainFault::Indirect(i) => chain[at(i)].flags |= VRING_DESC_F_INDIRECT as u16,
            ChainFault::Repeat(..) => {}
        }
    }
}

/// A split virtqueue (virtio 1.2 §2.7) in guest memory: descriptor table, available ring and
/// used ring back to back from `base`, and an area for indirect descriptor tables.
pub struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_slot: u32,
    avail_idx: u16,
    indirect_start: u64,
    indirect_next: u64,
    indirect_end: u64,
}

impl Ring {
    /// Lays out a queue of `size` entries (a power of two, at most 32768) at `base`, zeroed;
    /// indirect tables go to `[indirect.0, indirect.1)`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16, indirect: (u64, u64)) -> Ring {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        // The used ring is 4-byte aligned (virtio 1.2 §2.7).
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (end - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base)).expect("ring inside guest memory");
        Ring {
            size,
            desc,
            avail,
            used,
            next_slot: 0,
            avail_idx: 0,
            indirect_start: indirect.0,
            indirect_next: indirect.0,
            indirect_end: indirect.1,
        }
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// (descriptor table, available ring, used ring) addresses.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// A ready virtio-queue `Queue` over this ring, as the device sees it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc)).expect("aligned table");
        q.try_set_avail_ring_address(GuestAddress(self.avail)).expect("aligned avail ring");
        q.try_set_used_ring_address(GuestAddress(self.used)).expect("aligned used ring");
        q.set_ready(true);
        q
    }

    /// Writes `chain` into the descriptor table (or, if `indirect` or the table is full, into
    /// an indirect table named by one table entry) and makes it available. Returns false if
    /// there is no room left for it.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, chain: &[Desc], indirect: bool) -> bool {
        let free = u32::from(self.size) - self.next_slot;
        let head = if !indirect && chain.len() as u32 <= free && !chain.is_empty() {
            let first = self.next_slot;
            self.write_table(mem, self.desc + 16 * u64::from(first), chain, first as u16);
            self.next_slot += chain.len() as u32;
            first as u16
        } else {
            let bytes = 16 * chain.len() as u64;
            if free == 0 || self.indirect_next + bytes > self.indirect_end {
                return false;
            }
            let table = self.indirect_next;
            self.write_table(mem, table, chain, 0);
            self.indirect_next += bytes;
            let head = self.next_slot as u16;
            let entry = Descriptor::new(table, bytes as u32, VRING_DESC_F_INDIRECT as u16, 0);
            write(mem, self.desc + 16 * u64::from(head), entry);
            self.next_slot += 1;
            head
        };
        self.make_available(mem, head);
        true
    }

    /// Makes every descriptor slot and the indirect area free again, once the device has
    /// returned every chain in them.
    pub fn reclaim(&mut self) {
        self.next_slot = 0;
        self.indirect_next = self.indirect_start;
    }

    /// Puts `head` in the available ring and publishes the new index.
    pub fn make_available(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        write(mem, self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        write(mem, self.avail + 2, self.avail_idx);
    }

    /// The used ring's index: how many chains the device returned.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).expect("used ring inside guest memory")
    }

    /// The `i`th used element: (head index, used length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used ring inside guest memory");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used ring inside guest memory");
        (id, len)
    }

    fn write_table(&self, mem: &GuestMemoryMmap, table: u64, chain: &[Desc], first: u16) {
        for (i, d) in chain.iter().enumerate() {
            let next = match d.next {
                Next::Relative(r) => first.wrapping_add(r),
                Next::Absolute(n) => n,
            };
            write(mem, table + 16 * i as u64, Descriptor::new(d.addr, d.len, d.flags, next));
        }
    }
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64, value: T) {
    mem.write_obj(value, GuestAddress(addr)).expect("ring inside guest memory");
}

/// Reads `len` bytes at `addr` (zeros where guest memory has none).
pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let _ = mem.read_slice(&mut out, GuestAddress(addr));
    out
}

/// A list of `MIN..=MAX` elements whose length comes first in the input, for
/// `#[arbitrary(with = counted::<_, MIN, MAX>)]`. `arbitrary`'s own lists spend a continuation
/// bit per element, so random bytes make lists of one or two; with the length first, any bytes
/// make lists of any length, and elements past the end of the input are all zeros, which the
/// targets decode as well-formed.
pub fn counted<'a, T: Arbitrary<'a>, const MIN: usize, const MAX: usize>(
    u: &mut arbitrary::Unstructured<'a>,
) -> arbitrary::Result<Vec<T>> {
    let n = u.int_in_range(MIN..=MAX)?;
    (0..n).map(|_| T::arbitrary(u)).collect()
}

/// A queue size from a byte: 256 (the devices' QueueNumMax) for half the values, then 128
/// down to 1, so that most inputs have room for all their chains and some have to wait or go
/// indirect.
pub fn queue_size(byte: u8) -> u16 {
    256 >> (byte.saturating_sub(112) / 16)
}
