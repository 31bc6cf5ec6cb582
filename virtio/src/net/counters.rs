//! The counters of a network device ([`NetStats`]): frames and bytes each way, and what the
//! driver got wrong or the backend could not take; bumped by the device, read by the VMM.

use crate::counters;

counters! {
    /// Counters of a network device, shared with the VMM (see [`Net::stats`](super::Net::stats)).
    pub struct NetStats, copied as NetStatsSnapshot {
        /// Frames the guest sent that the backend (the tap) took.
        tx_frames,
        /// Their bytes (without the virtio-net header).
        tx_bytes,
        /// Frames from the backend put in the guest's receive buffers.
        rx_frames,
        /// Their bytes.
        rx_bytes,
        /// Transmit chains refused: shorter than the virtio-net header, longer than
        /// [`MAX_FRAME`](super::MAX_FRAME), with device-writable or unreadable buffers, or
        /// malformed (loops, outside the table).
        bad_tx_chains,
        /// Receive chains refused: too small for the header, or with device-readable or
        /// unwritable buffers.
        bad_rx_chains,
        /// Frames the guest sent that the backend could not take now (its queue was full):
        /// dropped, as a network drops them.
        tx_dropped,
        /// Frames from the backend that did not fit the guest's receive buffer: dropped.
        rx_dropped,
        /// Errors of the backend other than "try again" (logged).
        backend_errors,
    }
}
