//! What the VMM thread needs to take snapshots of a built VM ([`Snapshotter`]: `take.rs`
//! takes them), and `--snapshot-to DIR --snapshot-at TEXT`'s trigger ([`MarkerTrigger`]: the
//! console showed TEXT).

use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use samepage_virtio::MmioTransport;
use vm_memory::GuestMemoryMmap;

use super::state::{HostIdentity, Machine};
use super::take::{self, Sources, Taken};
use super::vcpu_saves::VcpuSaves;
use super::{saved_disks, SnapshotError, SnapshotFiles};
use crate::config::{SnapshotRequest, VmConfig};
use crate::devices::serial::SerialConsole;
use crate::pause::PauseControl;

/// A VM's means to snapshot itself, made when it is built.
pub struct Snapshotter {
    /// Where the vCPU threads save their vCPUs (give each a clone).
    pub saves: Arc<VcpuSaves>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    machine: Machine,
    host: HostIdentity,
    /// The VM has a vsock device: every snapshot is refused.
    vsock: bool,
    /// The VM has a network device: every snapshot is refused.
    net: bool,
}

impl Snapshotter {
    /// For a VM built from `config` with the virtio `transports` (in the layout's order) and
    /// the kernel command line `cmdline`, on the host `host`.
    pub fn new(
        kvm: &Kvm,
        config: &VmConfig,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        cmdline: &str,
        host: HostIdentity,
    ) -> Result<Snapshotter, SnapshotError> {
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
            balloon: config.balloon.map(|b| b.to_arg()),
        };
        Ok(Snapshotter {
            saves: Arc::new(VcpuSaves::new(usize::from(config.vcpus), msr_indices)),
            transports,
            machine,
            host,
            vsock: config.vsock.is_some(),
            net: !config.nets.is_empty(),
        })
    }

    /// Takes a snapshot of the running VM into `files`.
    pub fn take(
        &self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        pause: &PauseControl,
        serial: &Mutex<SerialConsole>,
        files: &SnapshotFiles,
    ) -> Result<Taken, SnapshotError> {
        if self.vsock {
            return Err(SnapshotError::Vsock);
        }
        if self.net {
            return Err(SnapshotError::Net);
        }
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
        take::take(&sources, files)
    }
}

/// A `--snapshot-to` snapshot waiting for its marker.
pub struct MarkerTrigger {
    /// Where it goes.
    pub request: SnapshotRequest,
    /// Raised by the console's [`super::marker::MarkerWatch`].
    seen: Arc<AtomicBool>,
}

impl MarkerTrigger {
    /// The trigger of `request`, raised through `seen`; makes the snapshot directory now,
    /// while the process may still create directories.
    pub fn new(request: &SnapshotRequest, seen: Arc<AtomicBool>) -> Result<MarkerTrigger, SnapshotError> {
        // Made for its owner only, as its files are (they hold the guest's memory).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&request.dir).map_err(|source| {
            SnapshotError::Io { what: "create the snapshot directory", path: request.dir.clone(), source }
        })?;
        Ok(MarkerTrigger { request: request.clone(), seen })
    }

    /// Whether the console has shown the marker.
    pub fn due(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }

    /// The files the snapshot goes to.
    pub fn files(&self) -> SnapshotFiles {
        SnapshotFiles::in_dir(&self.request.dir)
    }
}
