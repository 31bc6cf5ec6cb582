//! One vCPU's whole state as KVM holds it, read for a snapshot and written back on restore
//! (docs/snapshot.md, "vCPUs"): general, special, FPU and XSAVE registers, XCRs, every MSR of
//! the host's `KVM_GET_MSR_INDEX_LIST` this KVM lets us read (its paravirtual clock and
//! interrupt MSRs among them), the local APIC, the MP state, pending events and debug
//! registers.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Errors reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} on vCPU {vcpu} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than saved: the named one was refused.
    #[error("vCPU {vcpu}: KVM refused MSR {index:#x} ({set} of {wanted} set)")]
    Msr {
        /// vCPU index.
        vcpu: u8,
        /// The first MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were saved.
        wanted: usize,
    },
    /// More MSRs than KVM takes in one call.
    #[error("vCPU {vcpu}: {count} MSRs saved, more than one KVM call takes")]
    TooManyMsrs {
        /// vCPU index.
        vcpu: u8,
        /// How many.
        count: usize,
    },
}

/// A vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Its CPUID as set at creation.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state (XSAVE layout).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Model-specific registers, (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("msrs", &self.msrs.len()).finish()
    }
}

/// Most MSRs in one `KVM_GET_MSRS`/`KVM_SET_MSRS` (kvm-bindings' `KVM_MAX_MSR_ENTRIES`).
const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

impl VcpuState {
    /// Reads vCPU `index`'s state (on its own thread, outside `KVM_RUN`, after a `KVM_RUN`
    /// with `immediate_exit` has completed any I/O it was in). `msr_indices`: the host's
    /// `KVM_GET_MSR_INDEX_LIST`; those this KVM refuses to read are left out.
    pub fn save(vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
        let kvm = |what| move |source| VcpuStateError::Kvm { what, vcpu: index, source };
        let cpuid = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: readable_msrs(vcpu, msr_indices),
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Writes the state into a freshly created vCPU `index`, in the order KVM needs: CPUID
    /// first (it decides which registers and MSRs exist), the MP state, registers, the local
    /// APIC, MSRs (the TSC deadline timer after the APIC), pending events last.
    pub fn restore(&self, vcpu: &VcpuFd, index: u8) -> Result<(), VcpuStateError> {
        let kvm = |what| move |source| VcpuStateError::Kvm { what, vcpu: index, source };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::Kvm {
            what: "KVM_SET_CPUID2",
            vcpu: index,
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: a whole `kvm_xsave` read by KVM_GET_XSAVE, same size as KVM expects here.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        self.restore_msrs(vcpu, index)?;
        vcpu.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))
    }

    fn restore_msrs(&self, vcpu: &VcpuFd, index: u8) -> Result<(), VcpuStateError> {
        let wanted = self.msrs.len();
        if wanted > MAX_MSRS {
            return Err(VcpuStateError::TooManyMsrs { vcpu: index, count: wanted });
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(msr, data)| kvm_msr_entry { index: msr, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| VcpuStateError::TooManyMsrs { vcpu: index, count: wanted })?;
        let set = vcpu.set_msrs(&msrs).map_err(|source| VcpuStateError::Kvm {
            what: "KVM_SET_MSRS",
            vcpu: index,
            source,
        })?;
        if set < wanted {
            return Err(VcpuStateError::Msr { vcpu: index, index: self.msrs[set].0, set, wanted });
        }
        Ok(())
    }
}

/// The MSRs of `indices` that KVM lets this vCPU read, one at a time: KVM_GET_MSRS stops at
/// the first it refuses, and which ones a KVM refuses depends on the host (an emulating KVM
/// refuses some the index list names).
fn readable_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut values = Vec::with_capacity(indices.len());
    for &index in indices.iter().take(MAX_MSRS) {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]) else {
            continue;
        };
        if let Ok(1) = vcpu.get_msrs(&mut one) {
            values.push((index, one.as_slice()[0].data));
        }
    }
    values
}
