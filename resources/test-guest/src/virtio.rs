//! The modern virtio-mmio transport and one polled split virtqueue, shared by the block driver
//! (`blk.rs`), the page-hash driver (`fphash.rs`) and the balloon driver (`balloon.rs`).
//! Virtio 1.2: §4.2.2 (MMIO registers), §3.1.1 (driver initialization), §2.7 (split
//! virtqueues).

use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{fence, Ordering};

/// MMIO register offsets, virtio 1.2 §4.2.2.
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" little-endian, virtio 1.2 §4.2.2.
pub const MAGIC: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
pub const VERSION_MODERN: u32 = 2;

/// Device status bits, virtio 1.2 §2.1.
mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1, virtio 1.2 §6.
pub const F_VERSION_1: u64 = 1 << 32;

/// Queue size we ask for (one request in flight at a time, at most this many descriptors).
pub const QUEUE_SIZE: u16 = 16;
/// Descriptor flags, virtio 1.2 §2.7.5.
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Polls of the used ring before giving up on a request.
const POLL_LIMIT: u64 = 1 << 32;

/// Why a device could not be used.
pub type Error = &'static str;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE as usize],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE as usize],
    avail_event: u16,
}

/// One split virtqueue's rings, in one page (descriptor table at 0, then the driver and device
/// areas, each suitably aligned, virtio 1.2 §2.7).
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QUEUE_SIZE as usize],
    avail: Avail,
    _pad: [u8; 6],
    used: Used,
}

fn read32(base: u64, off: u64) -> u32 {
    // SAFETY: an identity-mapped virtio-mmio register the command line announced.
    unsafe { ((base + off) as *const u32).read_volatile() }
}

fn write32(base: u64, off: u64, v: u32) {
    // SAFETY: as for `read32`.
    unsafe { ((base + off) as *mut u32).write_volatile(v) }
}

/// Reads the registers a driver's interrupt handler or status poll reads (InterruptStatus,
/// Status, ConfigGeneration), for modes that touch them while the device works.
pub fn read_status_registers(base: u64) -> u32 {
    read32(base, reg::INTERRUPT_STATUS) ^ read32(base, reg::STATUS) ^ read32(base, reg::CONFIG_GENERATION)
}

/// Identification registers of a window: (magic, version, device id).
pub fn probe(base: u64) -> (u32, u32, u32) {
    (read32(base, reg::MAGIC_VALUE), read32(base, reg::VERSION), read32(base, reg::DEVICE_ID))
}

/// A device on the modern virtio-mmio transport, between feature negotiation and DRIVER_OK.
pub struct Transport {
    base: u64,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
}

impl Transport {
    /// Driver initialization steps 1-6 (virtio 1.2 §3.1.1) for a device of type `device_id`
    /// at `base`: reset, ACKNOWLEDGE, DRIVER, accept `offered & wanted` (VERSION_1 required),
    /// FEATURES_OK. The caller sets up its queues (step 7), then calls [`Transport::driver_ok`].
    pub fn negotiate(base: u64, device_id: u32, wanted: u64) -> Result<Transport, Error> {
        let (magic, version, id) = probe(base);
        if magic != MAGIC {
            return Err("bad magic value");
        }
        if version != VERSION_MODERN {
            return Err("not a modern (version 2) virtio-mmio device");
        }
        if id != device_id {
            return Err("unexpected device id");
        }
        // 1. Reset. 2. ACKNOWLEDGE. 3. DRIVER.
        write32(base, reg::STATUS, 0);
        let mut n = 0u32;
        while read32(base, reg::STATUS) != 0 {
            n += 1;
            if n > 1_000_000 {
                return Err("device did not reset");
            }
            core::hint::spin_loop();
        }
        write32(base, reg::STATUS, status::ACKNOWLEDGE);
        write32(base, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // 4. Features.
        write32(base, reg::DEVICE_FEATURES_SEL, 0);
        let lo = read32(base, reg::DEVICE_FEATURES) as u64;
        write32(base, reg::DEVICE_FEATURES_SEL, 1);
        let hi = read32(base, reg::DEVICE_FEATURES) as u64;
        let offered = lo | hi << 32;
        let t = Transport { base, offered, features: offered & (wanted | F_VERSION_1) };
        if offered & F_VERSION_1 == 0 {
            return Err(t.fail("device does not offer VIRTIO_F_VERSION_1"));
        }
        write32(base, reg::DRIVER_FEATURES_SEL, 0);
        write32(base, reg::DRIVER_FEATURES, t.features as u32);
        write32(base, reg::DRIVER_FEATURES_SEL, 1);
        write32(base, reg::DRIVER_FEATURES, (t.features >> 32) as u32);
        // 5. FEATURES_OK. 6. Check it stuck.
        write32(base, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if read32(base, reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(t.fail("device did not accept FEATURES_OK"));
        }
        Ok(t)
    }

    /// Sets FAILED (virtio 1.2 §3.1.1) and returns `why`.
    pub fn fail(&self, why: Error) -> Error {
        write32(self.base, reg::STATUS, status::FAILED);
        why
    }

    /// Step 8: DRIVER_OK.
    pub fn driver_ok(&self) {
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write32(self.base, reg::STATUS, st);
    }

    /// A 32-bit config field.
    pub fn config32(&self, off: u64) -> u32 {
        read32(self.base, reg::CONFIG + off)
    }

    /// Writes a 32-bit config field.
    pub fn write_config32(&self, off: u64, v: u32) {
        write32(self.base, reg::CONFIG + off, v);
    }

    /// A 64-bit config field read consistently (virtio 1.2 §4.2.2.2, ConfigGeneration).
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = read32(self.base, reg::CONFIG_GENERATION);
            let lo = self.config32(off) as u64;
            let hi = self.config32(off + 4) as u64;
            if gen == read32(self.base, reg::CONFIG_GENERATION) {
                return lo | hi << 32;
            }
        }
    }

    /// Sets up queue `index` with its rings in `mem` (virtio 1.2 §4.2.3.2), at most
    /// [`QUEUE_SIZE`] entries and at least `min_size`.
    ///
    /// # Safety
    /// `mem` is identity-mapped and exclusively owned by this queue while the device runs.
    pub unsafe fn setup_queue(&self, index: u32, mem: *mut QueueMem, min_size: u16) -> Result<Queue, Error> {
        let base = self.base;
        write32(base, reg::QUEUE_SEL, index);
        if read32(base, reg::QUEUE_READY) != 0 {
            return Err(self.fail("queue already ready after reset"));
        }
        let max = read32(base, reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err(self.fail("queue not available (QueueNumMax 0)"));
        }
        let size = max.min(QUEUE_SIZE as u32) as u16;
        if size < min_size {
            return Err(self.fail("queue too small for one request"));
        }
        // SAFETY: the caller owns `mem`; zero it so indices start at 0.
        unsafe { core::ptr::write_bytes(mem, 0, 1) };
        write32(base, reg::QUEUE_NUM, size as u32);
        // SAFETY: field addresses only.
        let (d, a, u) = unsafe {
            (addr_of!((*mem).desc) as u64, addr_of!((*mem).avail) as u64, addr_of!((*mem).used) as u64)
        };
        write32(base, reg::QUEUE_DESC_LOW, d as u32);
        write32(base, reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
        write32(base, reg::QUEUE_DRIVER_LOW, a as u32);
        write32(base, reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        write32(base, reg::QUEUE_DEVICE_LOW, u as u32);
        write32(base, reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        fence(Ordering::SeqCst);
        write32(base, reg::QUEUE_READY, 1);
        Ok(Queue { base, index, mem, size, next_avail: 0, last_used: 0 })
    }
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Seg {
    /// Guest-physical (= identity-mapped virtual) address.
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub device_writes: bool,
}

/// A split virtqueue driven by polling, one chain in flight at a time.
pub struct Queue {
    base: u64,
    index: u32,
    mem: *mut QueueMem,
    size: u16,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    /// Places `segs` as one descriptor chain (head 0), notifies the device and polls the used
    /// ring, calling `poll` on every unsuccessful poll. Returns the used length.
    ///
    /// # Safety
    /// Every segment is identity-mapped RAM that stays valid, and that nothing but the device
    /// writes (device-writable ones) or that the device may read (the others), until this
    /// returns. `poll` may write other memory, including device-readable segments, to race
    /// the device on purpose.
    pub unsafe fn run(&mut self, segs: &[Seg], poll: &mut dyn FnMut()) -> Result<u32, Error> {
        // SAFETY: the caller's contract, until the chain comes back below.
        unsafe { self.post(segs)? };
        let mut polls: u64 = 0;
        loop {
            if let Some(used) = self.take_used() {
                return used;
            }
            polls += 1;
            if polls > POLL_LIMIT {
                return Err("timed out waiting for the used ring");
            }
            poll();
            core::hint::spin_loop();
        }
    }

    /// Places `segs` as one descriptor chain (head 0) and notifies the device, without waiting
    /// for it: [`Queue::take_used`] sees it come back. The chain must have come back before
    /// the next one is posted (head 0 is reused).
    ///
    /// # Safety
    /// As for [`Queue::run`], until [`Queue::take_used`] returns the chain.
    pub unsafe fn post(&mut self, segs: &[Seg]) -> Result<(), Error> {
        let n = segs.len();
        if n == 0 || n > self.size as usize {
            return Err("descriptor chain does not fit the queue");
        }
        let q = self.mem;
        // SAFETY: `mem` is ours (see `Transport::setup_queue`); the device reads the descriptors
        // and avail ring only after the avail index is published below.
        unsafe {
            for (i, s) in segs.iter().enumerate() {
                let mut flags = if s.device_writes { VIRTQ_DESC_F_WRITE } else { 0 };
                let mut next = 0;
                if i + 1 < n {
                    flags |= VIRTQ_DESC_F_NEXT;
                    next = (i + 1) as u16;
                }
                addr_of_mut!((*q).desc[i]).write_volatile(Desc { addr: s.addr, len: s.len, flags, next });
            }
            let slot = (self.next_avail % self.size) as usize;
            addr_of_mut!((*q).avail.ring[slot]).write_volatile(0);
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            addr_of_mut!((*q).avail.idx).write_volatile(self.next_avail);
            fence(Ordering::SeqCst);
        }
        write32(self.base, reg::QUEUE_NOTIFY, self.index);
        Ok(())
    }

    /// The used length of the chain the device returned since the last look, if it returned
    /// one (`Err` for an element that names no chain of ours).
    pub fn take_used(&mut self) -> Option<Result<u32, Error>> {
        let q = self.mem;
        // SAFETY: reading the used ring the device publishes into.
        if unsafe { addr_of!((*q).used.idx).read_volatile() } == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: as above.
        let elem = unsafe { addr_of!((*q).used.ring[slot]).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        // Interrupts stay masked; acknowledge so that the line drops.
        let isr = read32(self.base, reg::INTERRUPT_STATUS);
        if isr != 0 {
            write32(self.base, reg::INTERRUPT_ACK, isr);
        }
        if elem.id != 0 {
            return Some(Err("used ring returned an unknown descriptor id"));
        }
        Some(Ok(elem.len))
    }
}
