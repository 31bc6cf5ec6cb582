//! A polling virtio-balloon driver (virtio 1.2 §5.5): device ID 5, accepts VERSION_1 and
//! VIRTIO_BALLOON_F_PAGE_REPORTING (never STATS_VQ or DEFLATE_ON_OOM, so the queues are
//! inflateq 0, deflateq 1 and, with reporting, reporting_vq 2). It gives pages to the balloon
//! (inflateq: arrays of le32 PFNs of 4 KiB pages), takes them back (deflateq), writes `actual`,
//! and reports free page ranges (reporting_vq: one device-writable descriptor per range, as
//! Linux's `page_reporting` does). Every request is one chain, waited for by polling.

use core::ptr::{addr_of, addr_of_mut};

use crate::virtio::{Error, Queue, QueueMem, Seg, Transport, QUEUE_SIZE};

/// Virtio device ID of the traditional memory balloon (virtio 1.2 §5.5.1).
pub const DEVICE_ID_BALLOON: u32 = 5;
/// VIRTIO_BALLOON_F_PAGE_REPORTING (bit 5, §5.5.3).
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// Config space: `num_pages` (the host's target) and `actual` (le32 each, §5.5.4).
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;
/// Most PFNs in one inflate or deflate request (Linux: 256).
pub const MAX_PFNS: usize = 256;
/// Most ranges in one report: one descriptor each, and the queue holds [`QUEUE_SIZE`].
pub const MAX_RANGES: usize = QUEUE_SIZE as usize;

/// The PFN array of inflate and deflate requests, in a page of its own.
#[repr(C, align(4096))]
pub struct PfnMem {
    pfns: [u32; MAX_PFNS],
}

/// A driven balloon.
pub struct Balloon {
    transport: Transport,
    inflate: Queue,
    deflate: Queue,
    reporting: Option<Queue>,
    pfns: *mut PfnMem,
}

impl Balloon {
    /// Initializes the balloon at `base` with its three queues' rings in `queues` (one page
    /// each) and its PFN array in `pfns`.
    ///
    /// # Safety
    /// Every pointer is identity-mapped RAM owned by this device for as long as it runs.
    pub unsafe fn init(base: u64, queues: [*mut QueueMem; 3], pfns: *mut PfnMem) -> Result<Balloon, Error> {
        let t = Transport::negotiate(base, DEVICE_ID_BALLOON, F_PAGE_REPORTING)?;
        // SAFETY: the caller's contract; one PFN array a request, and at least one range.
        let (inflate, deflate) =
            unsafe { (t.setup_queue(0, queues[0], 1)?, t.setup_queue(1, queues[1], 1)?) };
        let reporting = if t.features & F_PAGE_REPORTING != 0 {
            // SAFETY: as above.
            Some(unsafe { t.setup_queue(2, queues[2], 1)? })
        } else {
            None
        };
        t.driver_ok();
        Ok(Balloon { transport: t, inflate, deflate, reporting, pfns })
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
