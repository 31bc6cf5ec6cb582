//! The VM-wide state KVM holds, read for a snapshot and written back on restore
//! (docs/snapshot.md, "The VM"): the in-kernel PICs and IOAPIC, the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// A KVM VM ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM {what} failed")]
pub struct VmStateError {
    /// Which ioctl.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// The in-kernel interrupt controllers, timer and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC, the slave PIC and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock the guest reads through its paravirtual clock.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock", &self.clock.clock).finish()
    }
}

/// The chips of [`VmState::irqchips`], in order.
const CHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

impl VmState {
    /// Reads the state (vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // Only the value goes back: KVM_SET_CLOCK refuses the flags GET reports.
        clock.flags = 0;
        Ok(VmState { irqchips, pit, clock })
    }

    /// Writes the state into a VM made by `vm_build::create_vm` (its irqchip and PIT exist),
    /// before its vCPUs run. The chips must be the three saved, in order.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        let ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        if ids != CHIPS {
            return Err(VmStateError {
                what: "KVM_SET_IRQCHIP",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
