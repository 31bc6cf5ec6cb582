//! A polling virtio-balloon driver (virtio 1.2 §5.5): device ID 5, accepts VERSION_1,
//! VIRTIO_BALLOON_F_STATS_VQ and VIRTIO_BALLOON_F_PAGE_REPORTING (never DEFLATE_ON_OOM), so
//! the queues are inflateq 0, deflateq 1, then the statsq and the reporting_vq, each if
//! negotiated, numbered on. It gives pages to the balloon (inflateq: arrays of le32 PFNs of
//! 4 KiB pages), takes them back (deflateq), writes `actual`, and reports free page ranges
//! (reporting_vq: one device-writable descriptor per range, as Linux's `page_reporting`
//! does). Every such request is one chain, waited for by polling.
//!
//! With the statsq it keeps one statistics buffer there, as Linux does (§5.5.6.3), holding
//! the fixed figures of [`STATS`] so that a test can recognise them on the host: added at
//! start, and refilled and added again by [`Balloon::serve_stats`] each time the device
//! returns it (which it does when the host wants fresh figures).

use core::ptr::{addr_of, addr_of_mut};

use crate::virtio::{Error, Queue, QueueMem, Seg, Transport, QUEUE_SIZE};

/// Virtio device ID of the traditional memory balloon (virtio 1.2 §5.5.1).
pub const DEVICE_ID_BALLOON: u32 = 5;
/// VIRTIO_BALLOON_F_STATS_VQ (bit 1, §5.5.3).
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_PAGE_REPORTING (bit 5, §5.5.3).
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// Config space: `num_pages` (the host's target) and `actual` (le32 each, §5.5.4).
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;
/// Most PFNs in one inflate or deflate request (Linux: 256).
pub const MAX_PFNS: usize = 256;
/// Most ranges in one report: one descriptor each, and the queue holds [`QUEUE_SIZE`].
pub const MAX_RANGES: usize = QUEUE_SIZE as usize;
/// The statistics this guest reports (tag, value; §5.5.6.4), always the same, none of them a
/// default (so a host that shows them shows this guest's word): sizes are whole MiB plus a
/// few pages, the memory sizes fit a 64 MiB guest, and tags 8, 9 and 11 to 15 are left out.
pub const STATS: [(u16, u64); 9] = [
    (0, 11 * 4096),             // swapped in
    (1, 13 * 4096),             // swapped out
    (2, 17),                    // major faults
    (3, 1_234_567),             // minor faults
    (4, (12 << 20) + 4096),     // free
    (5, 48 << 20),              // total
    (6, (20 << 20) + 2 * 4096), // available
    (7, (4 << 20) + 3 * 4096),  // disk caches
    (10, 3),                    // OOM kills
];
/// Bytes of one statistic: `le16 tag; le64 val`, packed (§5.5.6.3).
const STAT_LEN: usize = 10;
/// The PFN array of inflate and deflate requests, in a page of its own.
#[repr(C, align(4096))]
pub struct PfnMem {
    pfns: [u32; MAX_PFNS],
}

/// The statistics buffer, in a page of its own (the device may read it whenever it holds it).
#[repr(C, align(4096))]
pub struct StatsMem {
    bytes: [u8; STATS.len() * STAT_LEN],
}

/// The statsq and its buffer.
struct StatsQueue {
    queue: Queue,
    mem: *mut StatsMem,
    /// Times the device returned the buffer and it was added again.
    refills: u64,
}

/// A driven balloon.
pub struct Balloon {
    transport: Transport,
    inflate: Queue,
    deflate: Queue,
    stats: Option<StatsQueue>,
    reporting: Option<Queue>,
    pfns: *mut PfnMem,
}

impl Balloon {
    /// Initializes the balloon at `base` with its four queues' rings in `queues` (one page
    /// each; the third and fourth serve only if their features are negotiated), its PFN array
    /// in `pfns` and its statistics buffer in `stats`; adds the statistics buffer.
    ///
    /// # Safety
    /// Every pointer is identity-mapped RAM owned by this device for as long as it runs.
    pub unsafe fn init(
        base: u64,
        queues: [*mut QueueMem; 4],
        pfns: *mut PfnMem,
        stats: *mut StatsMem,
    ) -> Result<Balloon, Error> {
        let t = Transport::negotiate(base, DEVICE_ID_BALLOON, F_STATS_VQ | F_PAGE_REPORTING)?;
        // SAFETY: the caller's contract; one PFN array a request, and at least one range.
        let (inflate, deflate) =
            unsafe { (t.setup_queue(0, queues[0], 1)?, t.setup_queue(1, queues[1], 1)?) };
        // A queue whose feature was not negotiated takes no index (§5.5.2).
        let mut next = 2;
        let stats = if t.features & F_STATS_VQ != 0 {
            // SAFETY: as above; one buffer.
            let queue = unsafe { t.setup_queue(next, queues[2], 1)? };
            next += 1;
            Some(StatsQueue { queue, mem: stats, refills: 0 })
        } else {
            None
        };
        let reporting = if t.features & F_PAGE_REPORTING != 0 {
            // SAFETY: as above.
            Some(unsafe { t.setup_queue(next, queues[3], 1)? })
        } else {
            None
        };
        t.driver_ok();
        let mut b = Balloon { transport: t, inflate, deflate, stats, reporting, pfns };
        if let Some(s) = b.stats.as_mut() {
            // SAFETY: the buffer is ours (see above); the device reads it while it holds it.
            unsafe { s.add()? };
        }
        Ok(b)
    }

    /// Whether the statsq was negotiated.
    pub fn has_stats(&self) -> bool {
        self.stats.is_some()
    }

    /// Adds the statistics buffer again if the device returned it (it does when the host asks
    /// for fresh figures); call it often while the guest waits. Returns the refills so far.
    pub fn serve_stats(&mut self) -> Result<u64, Error> {
        let Some(s) = self.stats.as_mut() else { return Ok(0) };
        match s.queue.take_used() {
            None => {}
            Some(Ok(_)) => {
                s.refills += 1;
                // SAFETY: the device returned the buffer: it is ours until added again.
                unsafe { s.add()? };
            }
            Some(Err(e)) => return Err(e),
        }
        Ok(s.refills)
    }

    /// Whether free page reporting was negotiated.
    pub fn reports(&self) -> bool {
        self.reporting.is_some()
    }

    /// The host's target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.transport.config32(CFG_NUM_PAGES)
    }

    /// Tells the host how many pages the balloon holds.
    pub fn set_actual(&self, pages: u32) {
        self.transport.write_config32(CFG_ACTUAL, pages);
    }

    /// Reports `ranges` (guest-physical start, bytes; at most [`MAX_RANGES`]) free, in one
    /// chain; returns once the host answered: from then on the pages are the guest's again,
    /// holding whatever the host left there.
    ///
    /// # Safety
    /// The ranges are identity-mapped RAM this guest does not use until this returns.
    pub unsafe fn report(&mut self, ranges: &[(u64, u64)]) -> Result<(), Error> {
        let Some(queue) = self.reporting.as_mut() else { return Err("free page reporting not negotiated") };
        if ranges.is_empty() || ranges.len() > MAX_RANGES {
            return Err("report of 0 or too many ranges");
        }
        let mut segs = [Seg { addr: 0, len: 0, device_writes: true }; MAX_RANGES];
        for (seg, &(addr, len)) in segs.iter_mut().zip(ranges) {
            if len == 0 || len > u32::MAX as u64 {
                return Err("reported range of 0 bytes or 4 GiB or more");
            }
            *seg = Seg { addr, len: len as u32, device_writes: true };
        }
        // SAFETY: the caller's contract; the device may change the ranges until it answers.
        let used = unsafe { queue.run(&segs[..ranges.len()], &mut || {})? };
        if used != 0 {
            return Err("reporting chain came back with a used length other than 0");
        }
        Ok(())
    }

    /// Gives the pages of `pfns` (at most [`MAX_PFNS`]) to the balloon (`inflate`) or takes
    /// them back (`!inflate`).
    ///
    /// # Safety
    /// Inflated pages are not touched until deflated.
    pub unsafe fn move_pages(&mut self, inflate: bool, pfns: &[u32]) -> Result<(), Error> {
        if pfns.is_empty() || pfns.len() > MAX_PFNS {
            return Err("inflate or deflate of 0 or too many pages");
        }
        let m = self.pfns;
        // SAFETY: the PFN page is ours (see `init`); the device reads it only while the
        // queue waits.
        unsafe {
            for (i, &pfn) in pfns.iter().enumerate() {
                addr_of_mut!((*m).pfns[i]).write_volatile(pfn.to_le());
            }
            let seg =
                Seg { addr: addr_of!((*m).pfns) as u64, len: (pfns.len() * 4) as u32, device_writes: false };
            let queue = if inflate { &mut self.inflate } else { &mut self.deflate };
            queue.run(&[seg], &mut || {})?;
        }
        Ok(())
    }
}

impl StatsQueue {
    /// Writes [`STATS`] into the buffer and adds it (device-readable) to the statsq.
    ///
    /// # Safety
    /// The buffer is not in the device's hands.
    unsafe fn add(&mut self) -> Result<(), Error> {
        let m = self.mem;
        // SAFETY: the caller's contract; the buffer is identity-mapped RAM of this device.
        unsafe {
            for (i, (tag, val)) in STATS.iter().enumerate() {
                let at = i * STAT_LEN;
                for (j, byte) in tag.to_le_bytes().into_iter().chain(val.to_le_bytes()).enumerate() {
                    addr_of_mut!((*m).bytes[at + j]).write_volatile(byte);
                }
            }
            let seg = Seg {
                addr: addr_of!((*m).bytes) as u64,
                len: (STATS.len() * STAT_LEN) as u32,
                device_writes: false,
            };
            self.queue.post(&[seg])
        }
    }
}
