//! Virtio devices of samepage: the virtio-mmio transport, its interrupt, virtio-blk and fphash.
//!
//! The layering follows the virtio 1.2 specification
//! (<https://docs.oasis-open.org/virtio/virtio/v1.2/virtio-v1.2.html>):
//! - [`mmio::MmioTransport`] implements the register interface of §4.2.2 (modern, version 2
//!   only) on top of any [`VirtioDevice`];
//! - [`interrupt`] raises the device's interrupt (an irqfd in the VMM) and keeps the
//!   InterruptStatus register;
//! - [`block::Block`] is virtio-blk (§5.2) on a raw image file;
//! - [`fphash::FphashDevice`] is samepage's page-hash report device (device ID 60,
//!   `docs/fphash.md`), which hands verified-shape reports to a [`fphash::PageMerger`].
//!
//! Guest input is hostile: nothing here panics on a register value or a descriptor; every
//! rejection is logged and counted in statistics the VMM can read.

#![deny(missing_docs)]

pub mod balloon;
pub mod block;
pub mod device_state;
pub mod entropy;
pub mod fphash;
pub mod interrupt;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_chains;
pub mod vsock;

pub use fphash::{FphashDevice, FphashStats, Hashing, PageMerger, PageReport, RecordStatus, ReportKind};
pub use interrupt::{EventFdInterrupt, InterruptKind, InterruptTrigger};
pub use mmio::{MmioStats, MmioTransport, TransportState};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// The guest page: 4 KiB on x86_64, the unit of fphash reports, image sharing and merging.
/// The one definition in samepage (the VMM's crate uses this one too).
pub const PAGE_SIZE: usize = 4096;

/// Feature bit VIRTIO_F_VERSION_1 (virtio 1.2 §6): the device is modern. Every device of this
/// crate offers it and the transport refuses drivers that do not accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Errors of a device's activation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver acknowledged feature bits the device never offered.
    #[error("feature bits {0:#x} were not offered")]
    UnofferedFeatures(u64),
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A device advertised a queue size virtio-queue cannot build (0, not a power of two, or
    /// above 32768; virtio 1.2 §2.7).
    #[error("invalid maximum queue size {0}")]
    InvalidQueueMaxSize(u16),
}

/// A virtio device, as seen by its transport.
///
/// The transport ([`mmio::MmioTransport`]) owns the queues and the feature negotiation; the
/// device only describes itself and serves its queues. Methods are called with the
/// transport's lock held, from a vCPU thread (register accesses) or from the VMM's event loop
/// (queue notifications).
pub trait VirtioDevice: Send {
    /// Device ID (virtio 1.2 §5, e.g. 2 for a block device).
    fn device_type(&self) -> u32;

    /// Largest size of each queue; the length of the slice is the number of queues. Each size
    /// must be a power of two between 1 and 32768 (virtio 1.2 §2.7).
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;

    /// Read device-specific configuration space (virtio 1.2 §4.2.2, offset 0x100 on). Bytes
    /// past the end of the device's configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write device-specific configuration space. Writes to read-only or absent fields are
    /// ignored (and may be logged).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Called when the transport accepts the driver's FEATURES_OK, with the feature bits the
    /// driver accepted: configuration fields that depend on them change here, before the
    /// driver reads them (virtio 1.2 §3.1.1 steps 5-7).
    fn features_accepted(&mut self, _acked_features: u64) {}

    /// Called once the driver sets DRIVER_OK, with the negotiated feature bits (a subset of
    /// [`VirtioDevice::device_features`]) and the readiness of each queue.
    fn activate(&mut self, acked_features: u64, queues_ready: &[bool]) -> Result<(), Error>;

    /// Serves the available buffers of queue `index`. Returns whether the driver must be
    /// interrupted (the used ring changed and the queue asked for a notification).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;

    /// Returns the device to its initial state (the driver wrote 0 to Status, virtio 1.2
    /// §2.1.1). The transport resets the queues itself.
    fn reset(&mut self);

    /// A descriptor the VMM's event loop watches for the device: readable when something
    /// happened on the host side of its backend (a vsock device's Unix sockets). `None`: the
    /// device has no host side that wakes it.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The backend's descriptor was readable: the device takes in what happened (without
    /// waiting). Called in every status, DRIVER_OK or not, so that events never pile up.
    fn backend_ready(&mut self) {}

    /// Queues the device has work for without a notification from the driver (bit `i`: queue
    /// `i`), e.g. host data for the receive queue. The transport serves them after every
    /// notification and backend event.
    fn pending_queues(&self) -> u64 {
        0
    }

    /// The device as `Any`, for a VMM that changes one kind of device while it runs (a disk's
    /// image swapped); `None` for devices nothing changes.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }

    /// The device's own state for a snapshot, beyond its transport's (`None`: it keeps
    /// none). Called as the transport's `save_state` is: no request of the device in progress.
    fn save_device_state(&self) -> Option<device_state::DeviceState> {
        None
    }

    /// Puts back a state [`VirtioDevice::save_device_state`] gave, into a device whose
    /// transport has just been restored (features accepted and activated as saved). The state
    /// is hostile: a value the device could not have had is refused.
    fn restore_device_state(
        &mut self,
        _state: &device_state::DeviceState,
    ) -> Result<(), device_state::DeviceStateError> {
        Err(device_state::DeviceStateError::WrongDevice)
    }
}

/// Serves every available chain of `queue`: `handle` answers one chain and returns the used
/// length; notifications are re-enabled and the ring re-checked until it stays empty, so no
/// buffer the driver adds meanwhile is missed. `on_bad_avail_index` runs when the available
/// index is more than a queue ahead (virtio-queue refuses to read such a ring). Returns
/// whether the driver must be interrupted.
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
    mut on_bad_avail_index: impl FnMut(),
) -> bool {
    use virtio_queue::QueueT;
    let mut used = false;
    loop {
        // Without VIRTIO_F_EVENT_IDX these only flip VRING_USED_F_NO_NOTIFY.
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut served = 0u32;
        // Each chain is answered (response, then used entry) before the next is read.
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            served += 1;
            let head = chain.head_index();
            let len = handle(chain);
            // Only a head index outside the queue fails here, and such a chain yields no
            // descriptor, so the device has already counted it as malformed.
            used |= queue.add_used(mem, head, len).is_ok();
        }
        match queue.enable_notification(mem) {
            Ok(true) if served > 0 => continue,
            Ok(true) => {
                on_bad_avail_index();
                break;
            }
            Ok(false) | Err(_) => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

/// Collects the descriptors of one chain into `descs` (cleared first), at most `max_len`;
/// returns whether the chain had more. Past the limit the last slot takes each further
/// descriptor, so it always holds the chain's last one: a device can still answer an
/// over-long chain in its tail, and no hostile chain makes `descs` grow.
///
/// virtio-queue ends the iteration after queue-size descriptors (a loop), at a `next` index
/// outside the table or at an unreadable descriptor; the last descriptor then still has
/// VIRTQ_DESC_F_NEXT set, which is how devices tell a broken chain.
pub(crate) fn collect_chain(
    chain: impl IntoIterator<Item = Descriptor>,
    max_len: usize,
    descs: &mut Vec<Descriptor>,
) -> bool {
    descs.clear();
    let mut too_long = false;
    for desc in chain {
        if descs.len() < max_len {
            descs.push(desc);
        } else {
            too_long = true;
            if let Some(last) = descs.last_mut() {
                *last = desc;
            }
        }
    }
    too_long
}

/// Copies configuration-space bytes at `offset` into `data`; bytes past the end of `config`
/// (or at offsets that overflow) read as zero, as [`VirtioDevice::read_config`] requires.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Defines a device's counters once: the struct of `AtomicU64`s the device bumps and the VMM
/// reads while it runs, its plain copy (for logs and the `--metrics` JSON), and `snapshot()`
/// that makes the copy. Field docs are written once, here, for both.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $atomic:ident, copied as $plain:ident {
            $( $(#[$fmeta:meta])* $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $atomic {
            $( $(#[$fmeta])* pub $field: std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("A plain copy of [`", stringify!($atomic), "`] (see its fields).")]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $plain {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $atomic {
            /// Reads every counter.
            pub fn snapshot(&self) -> $plain {
                $plain { $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )* }
            }
        }
    };
}
pub(crate) use counters;

/// Logs rarely: true for the 1st, 2nd, 4th, 8th, … occurrence of an event whose running count
/// is `count`. A hostile guest can trigger a warning per request; this keeps the log bounded
/// (logarithmic) while the counters stay exact.
pub(crate) fn should_log(count: u64) -> bool {
    count.is_power_of_two()
}

/// Increments a device counter; returns the new count (for [`should_log`]).
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use super::*;

    fn desc(addr: u64, flags: u32) -> Descriptor {
        Descriptor::new(addr, 1, flags as u16, 0)
    }

    fn addrs(descs: &[Descriptor]) -> Vec<u64> {
        descs.iter().map(|d| d.addr().0).collect()
    }

    #[test]
    fn collect_chain_is_bounded_and_keeps_the_last_descriptor() {
        let mut descs = vec![desc(99, 0)];
        let tail = desc(3, VRING_DESC_F_WRITE);
        let chain: Vec<_> = (0..3).map(|i| desc(i, VRING_DESC_F_NEXT)).chain([tail]).collect();
        assert!(!collect_chain(chain.clone(), 4, &mut descs), "exactly the limit");
        assert_eq!(addrs(&descs), [0, 1, 2, 3]);

        assert!(collect_chain(chain.clone(), 2, &mut descs), "over the limit");
        assert_eq!(addrs(&descs), [0, 3], "the first, then the chain's last");
        assert!(descs[1].is_write_only() && !descs[1].has_next());

        assert!(!collect_chain([], 4, &mut descs));
        assert!(descs.is_empty(), "cleared first");
        assert!(collect_chain(chain, 0, &mut descs));
        assert!(descs.is_empty());
    }
}
