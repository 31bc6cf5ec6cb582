//! Building descriptor chains for the devices' unit tests.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

/// One descriptor of a test chain: (address, length, device-writable).
pub(crate) type D = (u64, u32, bool);

/// Raw descriptors at table indices `0..`, each linked to the next, the last without NEXT.
pub(crate) fn linked(chain: &[D]) -> Vec<RawDescriptor> {
    chain
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i as u16 + 1))
        })
        .collect()
}
