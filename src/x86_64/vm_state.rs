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
    /// The KVM clock the guest reads through its paravirtual clock; `realtime` is the host's
    /// wall clock when it was read (nanoseconds since the epoch; 0 in older snapshots).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock", &self.clock.clock).finish()
    }
}

/// The chips of [`VmState::irqchips`], in order.
const CHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

/// The host's wall clock, nanoseconds since the epoch (0 if it reads before the epoch).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

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
        // The host's wall clock beside it, for the restore to move the clock on by the time
        // the snapshot lay (KVM reports it only on some hosts, and flags SET would refuse).
        clock.flags = 0;
        clock.realtime = realtime_ns();
        Ok(VmState { irqchips, pit, clock })
    }

    /// The clock to give KVM: the saved one, moved on by the host's wall-clock time since it
    /// was read (`KVM_CLOCK_REALTIME`: KVM adds its own now minus `realtime`, never going
    /// back), so a clone restored an hour later reads the time of day, as a VM that was paused
    /// for that hour would. A snapshot without `realtime`, or with one in the future (the host
    /// clock was set back), gets the saved value as it is.
    fn clock_to_restore(&self) -> kvm_clock_data {
        let mut clock = self.clock;
        clock.flags = 0;
        if clock.realtime != 0 && clock.realtime <= realtime_ns() {
            clock.flags = kvm_bindings::KVM_CLOCK_REALTIME;
        }
        clock
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
        vm.set_clock(&self.clock_to_restore()).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_clock(clock: u64, realtime: u64) -> VmState {
        VmState {
            irqchips: Vec::new(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data { clock, realtime, flags: 0xff, ..Default::default() },
        }
    }

    #[test]
    fn the_clock_moves_on_by_the_wall_time_since_the_snapshot_only_when_that_is_known() {
        let past = realtime_ns() - 3_600_000_000_000;
        let restored = state_with_clock(5, past).clock_to_restore();
        assert_eq!(
            (restored.clock, restored.realtime, restored.flags),
            (5, past, kvm_bindings::KVM_CLOCK_REALTIME)
        );
        // An older snapshot (no wall time) and a wall time ahead of the host's: as saved.
        assert_eq!(state_with_clock(5, 0).clock_to_restore().flags, 0);
        assert_eq!(state_with_clock(5, u64::MAX).clock_to_restore().flags, 0);
    }
}
