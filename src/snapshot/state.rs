//! The snapshot's `state.json` (docs/snapshot.md, "Format"): what the VM was built from and
//! everything KVM and the devices held, with the checks a restore makes before it trusts any of
//! it. A snapshot directory is input like any other: it may be truncated, edited or from
//! another host or binary.

use std::path::PathBuf;

use samepage_virtio::TransportState;
use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::config::DiskConfig;
use crate::devices::serial::SerialRegisters;
use crate::x86_64::layout::MAX_VCPUS;
use crate::x86_64::vcpu_state::VcpuState;
use crate::x86_64::vm_layout::VmLayout;
use crate::x86_64::vm_state::VmState;

/// `format` of every samepage snapshot.
pub const FORMAT: &str = "samepage-snapshot";
/// The version of the format this binary writes and reads; anything else is refused.
pub const VERSION: u32 = 1;
/// Largest `state.json` read: vCPU state is ~20 KiB of JSON per vCPU.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// What the snapshot was taken on: a restore on a host whose KVM offers other CPU features
/// would let the guest use instructions that fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// `KVM_GET_API_VERSION`.
    pub kvm_api: i32,
    /// BLAKE3 of the host's `KVM_GET_SUPPORTED_CPUID`, hex.
    pub supported_cpuid: String,
    /// Whether KVM emulated guest kernel code (docs/guest-interface.md).
    pub emulating_kvm: bool,
}

/// One disk as the VM had it, with what identified its image then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The image's path.
    pub path: PathBuf,
    /// `,ro`.
    pub read_only: bool,
    /// `share=` as given.
    pub share: Option<bool>,
    /// The image's size then.
    pub bytes: u64,
    /// Its modification time then (ns since the epoch): a read-only image changed since is
    /// refused, as the guest's page cache of it would be stale.
    pub modified_ns: i128,
}

impl SavedDisk {
    /// The disk as `--disk` would give it.
    pub fn config(&self) -> DiskConfig {
        DiskConfig { path: self.path.clone(), read_only: self.read_only, share: self.share }
    }
}

/// The VM's hardware: what a restore builds again before it puts the state back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disks, in `--disk` order.
    pub disks: Vec<SavedDisk>,
    /// The kernel it booted (for people; a restore does not read it).
    pub kernel: PathBuf,
    /// The command line the guest saw.
    pub cmdline: String,
    /// A virtio entropy device, after the fphash device.
    #[serde(default)]
    pub entropy: bool,
    /// A virtio-balloon, after the entropy device: its `--balloon` options.
    #[serde(default)]
    pub balloon: Option<String>,
}

/// Where one RAM region lies in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamSpan {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub offset: u64,
}

/// Everything in `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The samepage version that wrote it.
    pub samepage: String,
    /// The host it was taken on.
    pub host: HostIdentity,
    /// The VM's hardware.
    pub machine: Machine,
    /// Guest RAM in the memory file.
    pub ram: Vec<RamSpan>,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialRegisters,
    /// Each virtio transport, in the layout's order: disks, then the fphash device.
    pub devices: Vec<TransportState>,
}

impl SnapshotState {
    /// Checks what can be checked without KVM: format and version, the machine against the
    /// limits a `run` would enforce, the RAM spans against the layout that machine gets and the
    /// memory file's length, and the counts of vCPUs and devices.
    pub fn check(&self, memory_file_bytes: u64) -> Result<(), SnapshotError> {
        let bad = |what: String| Err(SnapshotError::Invalid(what));
        if self.format != FORMAT {
            return bad(format!("format {:?}, not {FORMAT:?}", self.format));
        }
        if self.version != VERSION || self.samepage != env!("CARGO_PKG_VERSION") {
            return Err(SnapshotError::Version {
                version: self.version,
                samepage: self.samepage.clone(),
                ours: VERSION,
                our_samepage: env!("CARGO_PKG_VERSION"),
            });
        }
        let machine = &self.machine;
        if machine.vcpus == 0 || machine.vcpus > MAX_VCPUS || self.vcpus.len() != usize::from(machine.vcpus) {
            return bad(format!("{} vCPUs saved for a machine of {}", self.vcpus.len(), machine.vcpus));
        }
        if !(crate::config::MIN_MEM_BYTES..=crate::config::MAX_MEM_BYTES).contains(&machine.mem_bytes)
            || !machine.mem_bytes.is_multiple_of(4096)
        {
            return bad(format!("guest RAM of {} bytes", machine.mem_bytes));
        }
        if machine.disks.len() > crate::config::MAX_DISKS {
            return bad(format!("{} disks", machine.disks.len()));
        }
        let layout = VmLayout::new(machine.mem_bytes, machine.disks.len());
        let mut offset = 0u64;
        let expected: Vec<RamSpan> = layout
            .ram_ranges()
            .iter()
            .map(|&(gpa, len)| {
                let span = RamSpan { gpa: gpa.0, len: len as u64, offset };
                offset += len as u64;
                span
            })
            .collect();
        if self.ram != expected {
            return bad("RAM regions that are not this machine's layout".into());
        }
        if memory_file_bytes != offset {
            return Err(SnapshotError::MemoryFileSize { found: memory_file_bytes, expected: offset });
        }
        if let Some(options) = &machine.balloon {
            if options.parse::<crate::balloon_options::BalloonOptions>().is_err() {
                return bad(format!("balloon options {options:?}"));
            }
        }
        let devices =
            machine.disks.len() + 1 + usize::from(machine.entropy) + usize::from(machine.balloon.is_some());
        if self.devices.len() != devices {
            return bad(format!("{} devices where the machine has {devices}", self.devices.len()));
        }
        if self.serial.in_buffer.len() > 64 {
            return bad(format!("{} bytes in the UART's FIFO of 64", self.serial.in_buffer.len()));
        }
        Ok(())
    }
}
