//! A polling virtio-blk driver (virtio 1.2 §5.2) on the shared transport and queue
//! (`virtio.rs`).

use core::ptr::{addr_of, addr_of_mut};

use crate::virtio::{Error, Queue, QueueMem, Seg, Transport};

/// Device ID of a block device, virtio 1.2 §5.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Feature bits, virtio 1.2 §5.2.3.
pub mod feature {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_FLUSH: u64 = 1 << 9;
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

/// A virtio-blk request header, virtio 1.2 §5.2.6.
#[repr(C)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Request header, data buffer and status byte, shared by all disks (one request at a time).
#[repr(C, align(4096))]
pub struct DmaMem {
    data: [u8; MAX_REQUEST],
    header: ReqHeader,
    status: u8,
}

/// A driven virtio-blk device.
pub struct Blk {
    queue: Queue,
    dma: *mut DmaMem,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest data size of one request (a multiple of [`SECTOR`]).
    pub max_request: usize,
}

impl Blk {
    /// Initializes the block device at `base` with its queue rings in `queue` and requests
    /// built in `dma`.
    ///
    /// # Safety
    /// `queue` and `dma` are identity-mapped, exclusively owned by this device (`dma` shared
    /// only with devices used one after another) for as long as the device runs.
    pub unsafe fn init(base: u64, queue: *mut QueueMem, dma: *mut DmaMem) -> Result<Blk, Error> {
        let wanted = feature::BLK_RO | feature::BLK_FLUSH | feature::BLK_SIZE_MAX;
        let t = Transport::negotiate(base, DEVICE_ID_BLOCK, wanted)?;
        // SAFETY: the caller's contract. A request is header + data + status: 3 descriptors.
        let queue = unsafe { t.setup_queue(0, queue, 3)? };
        t.driver_ok();
        let mut max_request = MAX_REQUEST;
        if t.features & feature::BLK_SIZE_MAX != 0 {
            let size_max = t.config32(BLK_CFG_SIZE_MAX) as usize;
            max_request = size_max.min(MAX_REQUEST) / SECTOR as usize * SECTOR as usize;
            if max_request == 0 {
                return Err("size_max below one sector");
            }
        }
        let capacity = t.config64(BLK_CFG_CAPACITY);
        Ok(Blk { queue, dma, offered: t.offered, features: t.features, capacity, max_request })
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
        // SAFETY: field address only.
        let addr = unsafe { addr_of!((*self.dma).data) } as u64;
        // SAFETY: the data buffer is ours (see `init`).
        unsafe { self.run(kind, sector, Seg { addr, len: len as u32, device_writes }) }
    }

    /// Reads `len` bytes (a multiple of [`SECTOR`], at most `max_request`) from `sector` on
    /// straight into memory at `dst`. Returns the status.
    ///
    /// # Safety
    /// `dst` is identity-mapped RAM, valid for `len` bytes, that nothing else uses meanwhile.
    pub unsafe fn read_into(&mut self, sector: u64, dst: u64, len: usize) -> Result<u8, Error> {
        assert!(len <= self.max_request && (len as u64).is_multiple_of(SECTOR));
        // SAFETY: the caller's contract.
        unsafe { self.run(req::IN, sector, Seg { addr: dst, len: len as u32, device_writes: true }) }
    }

    /// # Safety
    /// `data` (if its length is not 0) as for [`Blk::read_into`].
    unsafe fn run(&mut self, kind: u32, sector: u64, data: Seg) -> Result<u8, Error> {
        let dma = self.dma;
        // SAFETY: `dma` is ours (see `init`); the device reads the header and writes the status
        // only while `Queue::run` waits for it.
        unsafe {
            addr_of_mut!((*dma).header).write_volatile(ReqHeader { kind, reserved: 0, sector });
            addr_of_mut!((*dma).status).write_volatile(0xff);
            let header = Seg { addr: addr_of!((*dma).header) as u64, len: 16, device_writes: false };
            let status = Seg { addr: addr_of!((*dma).status) as u64, len: 1, device_writes: true };
            if data.len > 0 {
                self.queue.run(&[header, data, status], &mut || {})?;
            } else {
                self.queue.run(&[header, status], &mut || {})?;
            }
            Ok(addr_of!((*dma).status).read_volatile())
        }
    }
}
