//! A polling virtio-blk driver over the modern virtio-mmio transport, with one split virtqueue.
//! Virtio 1.2: §4.2.2 (MMIO registers), §3.1.1 (driver initialization), §2.7 (split
//! virtqueues), §5.2 (block device).

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
/// Device ID of a block device, virtio 1.2 §5.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Device status bits, virtio 1.2 §2.1.
mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// Feature bits: virtio 1.2 §6 (reserved) and §5.2.3 (block).
pub mod feature {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Block config space offsets (struct virtio_blk_config, virtio 1.2 §5.2.4).
const BLK_CFG_CAPACITY: u64 = 0x00;
const BLK_CFG_SIZE_MAX: u64 = 0x08;

/// Request types and status values, virtio 1.2 §5.2.6.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
}

/// Bytes in a virtio-blk sector.
pub const SECTOR: u64 = 512;
/// Largest data buffer of one request.
pub const MAX_REQUEST: usize = 64 * 1024;
/// GET_ID returns up to 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// Queue size we ask for (one request of three descriptors in flight at a time).
const QUEUE_SIZE: u16 = 16;
/// Descriptor flags, virtio 1.2 §2.7.5.
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Polls of the used ring before giving up on a request.
const POLL_LIMIT: u64 = 1 << 30;

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

/// A virtio-blk request header, virtio 1.2 §5.2.6.
#[repr(C)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Request header, data buffer and status byte, shared by all devices (one request at a time).
#[repr(C, align(4096))]
pub struct DmaMem {
    data: [u8; MAX_REQUEST],
    header: ReqHeader,
    status: u8,
}

/// Why a device could not be used.
pub type Error = &'static str;

/// A driven virtio-blk device.
pub struct Blk {
    base: u64,
    queue: *mut QueueMem,
    dma: *mut DmaMem,
    size: u16,
    next_avail: u16,
    last_used: u16,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest data size of one request.
    pub max_request: usize,
}

fn read32(base: u64, off: u64) -> u32 {
    // SAFETY: an identity-mapped virtio-mmio register the command line announced.
    unsafe { ((base + off) as *const u32).read_volatile() }
}

fn write32(base: u64, off: u64, v: u32) {
    // SAFETY: as for `read32`.
    unsafe { ((base + off) as *mut u32).write_volatile(v) }
}

/// Identification registers of a window: (magic, version, device id).
pub fn probe(base: u64) -> (u32, u32, u32) {
    (read32(base, reg::MAGIC_VALUE), read32(base, reg::VERSION), read32(base, reg::DEVICE_ID))
}

impl Blk {
    /// Initializes the device at `base` (virtio 1.2 §3.1.1) with its queue rings in `queue`
    /// and requests built in `dma`.
    ///
    /// # Safety
    /// `queue` and `dma` are identity-mapped, exclusively owned by this device (`dma` shared
    /// only with devices used one after another) for as long as the device runs.
    pub unsafe fn init(base: u64, queue: *mut QueueMem, dma: *mut DmaMem) -> Result<Blk, Error> {
        let (magic, version, id) = probe(base);
        if magic != MAGIC {
            return Err("bad magic value");
        }
        if version != VERSION_MODERN {
            return Err("not a modern (version 2) virtio-mmio device");
        }
        if id != DEVICE_ID_BLOCK {
            return Err("not a block device");
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
        if offered & feature::VERSION_1 == 0 {
            write32(base, reg::STATUS, status::FAILED);
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let wanted = feature::VERSION_1 | feature::BLK_RO | feature::BLK_FLUSH | feature::BLK_SIZE_MAX;
        let features = offered & wanted;
        write32(base, reg::DRIVER_FEATURES_SEL, 0);
        write32(base, reg::DRIVER_FEATURES, features as u32);
        write32(base, reg::DRIVER_FEATURES_SEL, 1);
        write32(base, reg::DRIVER_FEATURES, (features >> 32) as u32);
        // 5. FEATURES_OK. 6. Check it stuck.
        let st = status::ACKNOWLEDGE | status::DRIVER;
        write32(base, reg::STATUS, st | status::FEATURES_OK);
        if read32(base, reg::STATUS) & status::FEATURES_OK == 0 {
            write32(base, reg::STATUS, status::FAILED);
            return Err("device did not accept FEATURES_OK");
        }
        // 7. Device-specific setup: queue 0 (§4.2.3.2).
        write32(base, reg::QUEUE_SEL, 0);
        if read32(base, reg::QUEUE_READY) != 0 {
            write32(base, reg::STATUS, status::FAILED);
            return Err("queue 0 already ready after reset");
        }
        let max = read32(base, reg::QUEUE_NUM_MAX);
        if max == 0 {
            write32(base, reg::STATUS, status::FAILED);
            return Err("queue 0 not available (QueueNumMax 0)");
        }
        let size = (max as u16).min(QUEUE_SIZE);
        if size < 3 {
            write32(base, reg::STATUS, status::FAILED);
            return Err("queue too small for a 3-descriptor request");
        }
        // SAFETY: the caller owns `queue`; zero it so indices start at 0.
        unsafe { core::ptr::write_bytes(queue, 0, 1) };
        write32(base, reg::QUEUE_NUM, size as u32);
        // SAFETY: field addresses only.
        let (d, a, u) = unsafe {
            (addr_of!((*queue).desc) as u64, addr_of!((*queue).avail) as u64, addr_of!((*queue).used) as u64)
        };
        write32(base, reg::QUEUE_DESC_LOW, d as u32);
        write32(base, reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
        write32(base, reg::QUEUE_DRIVER_LOW, a as u32);
        write32(base, reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        write32(base, reg::QUEUE_DEVICE_LOW, u as u32);
        write32(base, reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        fence(Ordering::SeqCst);
        write32(base, reg::QUEUE_READY, 1);
        // 8. DRIVER_OK.
        write32(base, reg::STATUS, st | status::FEATURES_OK | status::DRIVER_OK);

        let mut blk = Blk {
            base,
            queue,
            dma,
            size,
            next_avail: 0,
            last_used: 0,
            offered,
            features,
            capacity: 0,
            max_request: MAX_REQUEST,
        };
        blk.capacity = blk.config64(BLK_CFG_CAPACITY);
        if features & feature::BLK_SIZE_MAX != 0 {
            let size_max = read32(base, reg::CONFIG + BLK_CFG_SIZE_MAX) as usize;
            let limited = size_max.min(MAX_REQUEST) / SECTOR as usize * SECTOR as usize;
            if limited == 0 {
                return Err("size_max below one sector");
            }
            blk.max_request = limited;
        }
        Ok(blk)
    }

    /// A 64-bit config field read consistently (virtio 1.2 §4.2.2.2, ConfigGeneration).
    fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = read32(self.base, reg::CONFIG_GENERATION);
            let lo = read32(self.base, reg::CONFIG + off) as u64;
            let hi = read32(self.base, reg::CONFIG + off + 4) as u64;
            if gen == read32(self.base, reg::CONFIG_GENERATION) {
                return lo | hi << 32;
            }
        }
    }

    /// The shared data buffer.
    pub fn data(&mut self) -> &mut [u8; MAX_REQUEST] {
        // SAFETY: `dma` is ours (see `init`) and no request is in flight between calls.
        unsafe { &mut *addr_of_mut!((*self.dma).data) }
    }

    /// Runs one request: header, then `len` bytes of the data buffer (device-writable when
    /// `device_writes`; none when `len` is 0), then the status byte. Returns the status.
    pub fn request(&mut self, kind: u32, sector: u64, len: usize, device_writes: bool) -> Result<u8, Error> {
        assert!(len <= MAX_REQUEST);
        let dma = self.dma;
        let q = self.queue;
        // SAFETY: `dma` and `queue` are ours (see `init`); the device reads them only after the
        // avail index is published below, and writes only the used ring, data (when asked) and
        // status, which we read after it has published the used index.
        unsafe {
            addr_of_mut!((*dma).header).write_volatile(ReqHeader { kind, reserved: 0, sector });
            addr_of_mut!((*dma).status).write_volatile(0xff);
            let mut descs = [Desc { addr: 0, len: 0, flags: 0, next: 0 }; 3];
            let mut n = 0;
            descs[n] = Desc { addr: addr_of!((*dma).header) as u64, len: 16, flags: 0, next: 0 };
            n += 1;
            if len > 0 {
                let flags = if device_writes { VIRTQ_DESC_F_WRITE } else { 0 };
                descs[n] = Desc { addr: addr_of!((*dma).data) as u64, len: len as u32, flags, next: 0 };
                n += 1;
            }
            descs[n] =
                Desc { addr: addr_of!((*dma).status) as u64, len: 1, flags: VIRTQ_DESC_F_WRITE, next: 0 };
            n += 1;
            for (i, d) in descs[..n].iter_mut().enumerate() {
                if i + 1 < n {
                    d.flags |= VIRTQ_DESC_F_NEXT;
                    d.next = (i + 1) as u16;
                }
                addr_of_mut!((*q).desc[i]).write_volatile(*d);
            }
            let slot = (self.next_avail % self.size) as usize;
            addr_of_mut!((*q).avail.ring[slot]).write_volatile(0);
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            addr_of_mut!((*q).avail.idx).write_volatile(self.next_avail);
            fence(Ordering::SeqCst);
        }
        write32(self.base, reg::QUEUE_NOTIFY, 0);
        let mut polls: u64 = 0;
        // SAFETY: reading the used ring the device publishes into (see above).
        while unsafe { addr_of!((*q).used.idx).read_volatile() } == self.last_used {
            polls += 1;
            if polls > POLL_LIMIT {
                return Err("timed out waiting for the used ring");
            }
            core::hint::spin_loop();
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
            return Err("used ring returned an unknown descriptor id");
        }
        // SAFETY: the device has completed the request.
        Ok(unsafe { addr_of!((*dma).status).read_volatile() })
    }
}
