//! The host side of the virtio-balloon device: the device attached where the VM's layout puts
//! it, with the transport's own interrupt (the device raises configuration changes itself),
//! its backend giving pages back through the VM's dedup domain (`balloon/backend.rs`), its
//! statistics timer (handing the guest's statistics to that domain for the broker) and the
//! VMM's [`VmBalloon`] view of it.

use std::sync::Arc;

use samepage_virtio::balloon::Balloon;
use samepage_virtio::EventFdInterrupt;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::balloon::backend::DomainBackend;
use crate::balloon::{BalloonOptions, HostCounters, VmBalloon};
use crate::bus::{lock, Buses};
use crate::devices::virtio_mmio::{self, Periodic, VirtioSlot};
use crate::domain_membership::DomainMembership;
use crate::error::VmmError;
use crate::x86_64::vm_layout::VirtioWindow;

/// An attached balloon.
pub struct AttachedBalloon {
    /// Its transport and queue eventfds, for the event loop.
    pub slot: VirtioSlot,
    /// The VMM's view of it.
    pub balloon: VmBalloon,
    /// Its statistics timer, with `stats=SECS`.
    pub stats: Option<Periodic>,
}

/// Attaches a balloon offering what `options` say in `window`, giving pages back through
/// `membership`'s domain. `ksm`: the VM's RAM is open to KSM (`--dedup ksm`), and pages given
/// fresh memory must be opened again.
pub fn attach(
    vm: &kvm_ioctls::VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    window: &VirtioWindow,
    options: BalloonOptions,
    membership: &DomainMembership,
    ksm: bool,
) -> Result<AttachedBalloon, VmmError> {
    let host = Arc::new(HostCounters::default());
    let backend =
        DomainBackend::new(membership.domain.clone(), membership.vm, ksm.then(|| mem.clone()), host.clone());
    let interrupt = Arc::new(EventFdInterrupt::new().map_err(VmmError::host("virtio irqfd"))?);
    let device = Balloon::new(options.device_config(), Box::new(backend), interrupt.clone());
    let ram_bytes = mem.iter().map(GuestMemoryRegion::len).sum();
    let balloon = VmBalloon::new(device.handle(), options, ram_bytes, host);
    let slot = virtio_mmio::attach_with_interrupt(vm, buses, mem, window, Box::new(device), interrupt)?;
    // The guest's statistics go to the broker through the domain, whose connection is the
    // VM's (a domain with a broker serves this one VM).
    let domain = membership.domain.clone();
    let stats =
        balloon.stats_job(slot.transport.clone(), move |figures| lock(&domain).push_guest_stats(figures));
    Ok(AttachedBalloon { slot, balloon, stats })
}
