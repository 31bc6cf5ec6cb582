//! The virtio entropy device (virtio 1.2 §5.4, "virtio-rng"): one request queue whose
//! device-writable buffers the device fills with random bytes from the host's `getrandom`.
//!
//! A chain is any number of descriptors; the device writes into the device-writable ones, in
//! order, at most [`MAX_BYTES_PER_CHAIN`] bytes in all (a driver asking for more gets that
//! many, which §5.4.6.1 allows: "the device MAY place fewer bytes than requested"), and puts the
//! chain in the used ring with the number of bytes written. Device-readable descriptors are
//! skipped and counted; a descriptor outside guest RAM ends the chain's writing there; a chain
//! that is malformed (loops, points outside the table) is returned with 0 bytes. No
//! configuration space, no feature bits beyond VERSION_1.

mod counters;

pub use counters::{EntropyStats, EntropyStatsSnapshot};

use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::{bump, drain_queue, should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most random bytes given for one chain.
pub const MAX_BYTES_PER_CHAIN: usize = 64 << 10;
/// Most descriptors looked at in one chain (a longer chain is served up to there).
pub const MAX_DESCRIPTORS: usize = 64;

/// Where the random bytes come from: the host's `getrandom` in the VMM, a fixed stream in tests.
pub trait EntropySource: Send {
    /// Fills `buf` whole, or fails.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The host's random number generator (`getrandom(2)`, which blocks only until the host's
/// pool was first seeded, long before a VM runs).
pub struct HostRandom;

impl EntropySource for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: writes at most `rest.len()` bytes into `rest`, which we own.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += got as usize;
        }
        Ok(())
    }
}

/// The entropy device.
pub struct Entropy {
    source: Box<dyn EntropySource>,
    stats: Arc<EntropyStats>,
    /// Random bytes for one chain, allocated once.
    buf: Vec<u8>,
}

impl Entropy {
    /// A device drawing from `source`.
    pub fn new(source: Box<dyn EntropySource>) -> Entropy {
        Entropy { source, stats: Arc::default(), buf: vec![0; MAX_BYTES_PER_CHAIN] }
    }

    /// Its counters (shared: the VMM reads them while the device runs).
    pub fn stats(&self) -> Arc<EntropyStats> {
        self.stats.clone()
    }

    /// Serves one chain; returns the bytes written.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut written = 0usize;
        let mut seen = 0usize;
        for desc in chain {
            seen += 1;
            if seen > MAX_DESCRIPTORS || written == MAX_BYTES_PER_CHAIN {
                bump(&self.stats.truncated_chains);
                break;
            }
            if !desc.is_write_only() {
                bump(&self.stats.readable_descriptors);
                continue;
            }
            let len = (desc.len() as usize).min(MAX_BYTES_PER_CHAIN - written);
            let bytes = &mut self.buf[..len];
            if let Err(e) = self.source.fill(bytes) {
                if should_log(bump(&self.stats.source_errors)) {
                    warn!("virtio-entropy: the host's random source failed: {e}");
                }
                break;
            }
            if mem.write_slice(bytes, desc.addr()).is_err() {
                if should_log(bump(&self.stats.bad_descriptors)) {
                    warn!(
                        "virtio-entropy: a buffer at {:#x} ({len} bytes) is not in guest RAM",
                        desc.addr().0
                    );
                }
                break;
            }
            written += len;
        }
        if seen == 0 {
            bump(&self.stats.malformed_chains);
        }
        self.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.bytes.fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
        written as u32
    }
}

impl VirtioDevice for Entropy {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        if queues_ready.first() != Some(&true) {
            return Err(Error::QueueNotReady(0));
        }
        Ok(())
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let stats = self.stats.clone();
        drain_queue(
            queue,
            mem,
            |chain| self.handle_chain(chain, mem),
            || {
                if should_log(bump(&stats.malformed_chains)) {
                    warn!("virtio-entropy: available ring index is invalid");
                }
            },
        )
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests;
