//! The vCPU threads' side of a snapshot: each saves its own vCPU's state when the snapshot
//! asks (KVM's vCPU state is read on the thread that runs the vCPU, after a `KVM_RUN` with
//! `immediate_exit` has completed the I/O the vCPU was in), and hands it over here.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use kvm_ioctls::VcpuFd;

use crate::bus::lock;
use crate::x86_64::vcpu_state::VcpuState;

/// Where the vCPU threads put their states for the snapshot waiting for them.
pub struct VcpuSaves {
    /// The host's `KVM_GET_MSR_INDEX_LIST`.
    msr_indices: Vec<u32>,
    /// One slot per vCPU: its state, or why it could not be read.
    slots: Mutex<Vec<Option<Result<VcpuState, String>>>>,
    filled: Condvar,
}

impl VcpuSaves {
    /// Slots for `vcpus` vCPUs, saving the MSRs of `msr_indices`.
    pub fn new(vcpus: usize, msr_indices: Vec<u32>) -> VcpuSaves {
        VcpuSaves {
            msr_indices,
            slots: Mutex::new((0..vcpus).map(|_| None).collect()),
            filled: Condvar::new(),
        }
    }

    /// Empties every slot before the vCPUs are asked.
    pub fn clear(&self) {
        lock(&self.slots).iter_mut().for_each(|slot| *slot = None);
    }

    /// Called on vCPU `index`'s thread, outside `KVM_RUN`: completes pending I/O, reads the
    /// state, puts it in its slot.
    pub fn save(&self, vcpu: &mut VcpuFd, index: u8, complete_io: impl FnOnce(&mut VcpuFd)) {
        complete_io(vcpu);
        let state = VcpuState::save(vcpu, index, &self.msr_indices).map_err(|e| crate::error_chain(&e));
        if let Some(slot) = lock(&self.slots).get_mut(usize::from(index)) {
            *slot = Some(state);
        }
        self.filled.notify_all();
    }

    /// Waits until every slot is filled or `deadline`; the states in index order, or the first
    /// error (a vCPU that did not answer is one).
    pub fn wait_all(&self, deadline: Instant) -> Result<Vec<VcpuState>, String> {
        let mut slots = lock(&self.slots);
        while slots.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = slots.iter().position(Option::is_none).unwrap_or(0);
                return Err(format!("vCPU {missing} did not save its state in time"));
            }
            slots = self.filled.wait_timeout(slots, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        slots.iter_mut().map(|slot| slot.take().unwrap_or_else(|| Err("no state".into()))).collect()
    }
}
