//! Device interrupts: the InterruptStatus register of virtio-mmio (virtio 1.2 §4.2.2) and the
//! signal that raises the guest's interrupt line.
//!
//! The VMM registers [`EventFdInterrupt::eventfd`] as a KVM irqfd on the device's IRQ
//! (`KVM_IRQFD`, GSI = the IRQ of the `virtio_mmio.device=` token), so that
//! [`InterruptTrigger::trigger`] reaches the guest without a VM exit.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a device interrupts; each kind is one bit of InterruptStatus (virtio 1.2 §4.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// "Used Buffer Notification": the device used buffers of at least one queue.
    UsedRing,
    /// "Configuration Change Notification": the configuration space changed, or the device
    /// set DEVICE_NEEDS_RESET.
    ConfigChange,
}

impl InterruptKind {
    /// The InterruptStatus bit of this kind.
    pub fn status_bit(self) -> u32 {
        match self {
            InterruptKind::UsedRing => INTERRUPT_STATUS_USED_RING,
            InterruptKind::ConfigChange => INTERRUPT_STATUS_CONFIG_CHANGE,
        }
    }
}

/// InterruptStatus bit 0: used buffer notification (virtio 1.2 §4.2.2, "InterruptStatus").
pub const INTERRUPT_STATUS_USED_RING: u32 = 1 << 0;
/// InterruptStatus bit 1: configuration change notification (virtio 1.2 §4.2.2).
pub const INTERRUPT_STATUS_CONFIG_CHANGE: u32 = 1 << 1;
/// Every defined InterruptStatus bit.
pub const INTERRUPT_STATUS_MASK: u32 = INTERRUPT_STATUS_USED_RING | INTERRUPT_STATUS_CONFIG_CHANGE;

/// Raises a device's interrupt and holds its InterruptStatus register.
///
/// Shared between the transport (which reads and acknowledges the status on behalf of the
/// driver) and whoever signals the device's work, so it must be `Send + Sync`.
pub trait InterruptTrigger: Send + Sync {
    /// Sets the status bit of `kind`, then signals the guest.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
    /// The InterruptStatus register.
    fn status(&self) -> u32;
    /// Clears the given bits of InterruptStatus (the driver wrote InterruptACK).
    fn ack(&self, bits: u32);
}

/// An [`InterruptTrigger`] over an eventfd that the VMM registers as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdInterrupt {
    status: AtomicU32,
    eventfd: EventFd,
}

impl EventFdInterrupt {
    /// Creates the trigger with a new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self::with_eventfd(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Creates the trigger over an existing eventfd.
    pub fn with_eventfd(eventfd: EventFd) -> Self {
        EventFdInterrupt { status: AtomicU32::new(0), eventfd }
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

impl InterruptTrigger for EventFdInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        // The bit must be visible before the guest's handler can run and read it.
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.eventfd.write(1)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_bits_and_signals() {
        let irq = EventFdInterrupt::new().unwrap();
        assert_eq!(irq.status(), 0);
        irq.trigger(InterruptKind::UsedRing).unwrap();
        irq.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.status(), INTERRUPT_STATUS_MASK);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        irq.ack(INTERRUPT_STATUS_USED_RING);
        assert_eq!(irq.status(), INTERRUPT_STATUS_CONFIG_CHANGE);
        irq.ack(u32::MAX);
        assert_eq!(irq.status(), 0);
    }
}
