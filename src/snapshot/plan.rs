//! `--snapshot-to DIR --snapshot-at TEXT` once the VM is built: what the VMM thread needs to
//! take the snapshot when the console shows TEXT (`take.rs` takes it).

use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use samepage_virtio::MmioTransport;
use vm_memory::GuestMemoryMmap;

use super::state::{HostIdentity, Machine};
use super::take::{self, Sources, Taken};
use super::vcpu_saves::VcpuSaves;
use super::{saved_disks, SnapshotError};
use crate::config::{SnapshotRequest, VmConfig};
use crate::devices::serial::SerialConsole;
use crate::pause::PauseControl;

/// A snapshot waiting for its marker.
pub struct SnapshotPlan {
    /// Where it goes.
    pub request: SnapshotRequest,
    /// Raised by the console's [`super::marker::MarkerWatch`].
    seen: Arc<AtomicBool>,
    /// Where the vCPU threads save their vCPUs (give each a clone).
    pub saves: Arc<VcpuSaves>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    machine: Machine,
    host: HostIdentity,
}

impl SnapshotPlan {
    /// The plan for `request`, in a VM built from `config` with the virtio `transports` (in
    /// the layout's order); makes
    /// the snapshot directory now, while the process may still create directories.
    pub fn new(
        request: &SnapshotRequest,
        seen: Arc<AtomicBool>,
        kvm: &Kvm,
        config: &VmConfig,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        cmdline: &str,
        host: HostIdentity,
    ) -> Result<SnapshotPlan, SnapshotError> {
        // Made for its owner only, as its files are (they hold the guest's memory).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&request.dir).map_err(|source| {
            SnapshotError::Io { what: "create the snapshot directory", path: request.dir.clone(), source }
        })?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(|e| SnapshotError::Vcpu(format!("KVM_GET_MSR_INDEX_LIST failed: {e}")))?;
        let machine = Machine {
            mem_bytes: config.mem_bytes,
            vcpus: config.vcpus,
            disks: saved_disks(&config.disks)?,
            kernel: config.kernel.clone(),
            cmdline: cmdline.to_string(),
            entropy: config.entropy,
        };
        Ok(SnapshotPlan {
            request: request.clone(),
            seen,
            saves: Arc::new(VcpuSaves::new(usize::from(config.vcpus), msr_indices)),
            transports,
            machine,
            host,
        })
    }

    /// Whether the console has shown the marker.
    pub fn due(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }

    /// Takes the snapshot of the running VM.
    pub fn take(
        &self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        pause: &PauseControl,
        serial: &Mutex<SerialConsole>,
    ) -> Result<Taken, SnapshotError> {
        let sources = Sources {
            vm,
            mem,
            pause,
            saves: &self.saves,
            serial,
            transports: &self.transports,
            machine: &self.machine,
            host: &self.host,
        };
        take::take(&sources, &self.request.dir)
    }
}
