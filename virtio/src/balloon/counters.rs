//! The balloon's counters: what the guest asked for and every rejection, shared with the VMM
//! (`--metrics`) through [`super::BalloonHandle::counters`].
//!
//! Contract: the device is the only writer (on the thread that serves its queues, or the
//! vCPU thread for configuration writes); readers take a [`BalloonCountersSnapshot`]. Every
//! rejection of guest input bumps exactly one counter here, so a hostile guest shows up in
//! numbers even when the log (which is rate-limited) stays quiet.

use crate::counters;

counters! {
    /// Counters of a balloon device.
    pub struct BalloonCounters, copied as BalloonCountersSnapshot {
        /// inflateq chains served (PFNs read; each valid page went to the backend).
        inflate_requests,
        /// Distinct 4 KiB pages handed to `BalloonBackend::discard` from inflateq.
        inflated_pages,
        /// deflateq chains served.
        deflate_requests,
        /// Distinct 4 KiB pages handed to `BalloonBackend::reclaim`.
        deflated_pages,
        /// reporting_vq chains served.
        reports,
        /// Distinct 4 KiB pages handed to `BalloonBackend::discard` from reporting_vq.
        reported_pages,
        /// Chains returned unused because of their shape (empty, broken, too many
        /// descriptors, wrong direction, a PFN array not a multiple of 4 bytes, too long,
        /// outside guest RAM), on any queue but the statsq.
        rejected_chains,
        /// PFNs skipped: not a page of guest RAM.
        invalid_pfns,
        /// Reported ranges skipped: empty, not 4 KiB-aligned, or not inside one RAM region.
        invalid_ranges,
        /// Buffers received on the statsq.
        stats_buffers,
        /// Buffers returned on the statsq to ask for fresh statistics.
        stats_requests,
        /// Statistics buffers whose content was ignored because of their shape (the buffer
        /// is still held and returned on the next request).
        stats_rejected,
        /// Statistics buffers whose length is not a multiple of 10 bytes (the tail ignored).
        stats_odd_lengths,
        /// Statistics entries with a tag the device does not know (ignored, §5.5.6.3).
        stats_unknown_tags,
        /// Statistics buffers that came while one was held (the driver may make only one
        /// available, §5.5.6.3): the older was returned at once.
        stats_extra_buffers,
        /// Configuration writes ignored: to a field other than `actual`, or reaching past it.
        config_writes_ignored,
        /// Queue service requests for a queue with no role, or before the driver set
        /// DRIVER_OK: nothing was read from the queue.
        unready_queue_uses,
        /// Available rings whose index runs more than a queue ahead (virtio-queue refuses
        /// to read such a ring).
        bad_avail_index,
        /// Failures to signal the configuration-change interrupt.
        interrupt_errors,
    }
}

impl BalloonCounters {
    /// Adds `n` to `counter`; returns the new count.
    pub(crate) fn add(counter: &std::sync::atomic::AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed).wrapping_add(n)
    }
}
