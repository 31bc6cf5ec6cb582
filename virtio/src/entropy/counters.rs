//! The counters of an entropy device ([`EntropyStats`]): requests served, bytes given, and
//! what the driver got wrong; bumped by the device, read by the VMM while it runs.

use crate::counters;

counters! {
    /// Counters of an entropy device, shared with the VMM (see
    /// [`Entropy::stats`](super::Entropy::stats)).
    pub struct EntropyStats, copied as EntropyStatsSnapshot {
        /// Chains returned to the driver.
        requests,
        /// Random bytes written into guest buffers.
        bytes,
        /// Device-readable descriptors in a request (skipped: the device only writes).
        readable_descriptors,
        /// Buffers outside guest RAM (the chain's writing ends there).
        bad_descriptors,
        /// Chains with no descriptor the device could read (loops, outside the table), and
        /// available rings whose index runs more than a queue ahead.
        malformed_chains,
        /// Chains longer than 64 descriptors or asking for more than
        /// [`MAX_BYTES_PER_CHAIN`](super::MAX_BYTES_PER_CHAIN): served up to there.
        truncated_chains,
        /// Failures of the host's random source (the chain gets what was written before).
        source_errors,
    }
}
