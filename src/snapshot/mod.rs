//! Snapshots (docs/snapshot.md): a running VM paused and written to a directory — its state in
//! `state.json` ([`state::SnapshotState`]), its RAM in `memory` — and VMs restored from one,
//! whose RAM maps `memory` copy-on-write (`MAP_PRIVATE`), so that every clone of a snapshot
//! shares its page cache until it writes a page.
//!
//! Taking one ([`take::take`]) runs on the VMM thread with the vCPUs paused: each vCPU thread
//! saves its own vCPU ([`vcpu_saves::VcpuSaves`]), the transports are locked so that no device
//! is in the middle of a request, then the VM's state, the devices' and RAM are written, and
//! the VM goes on. Restoring ([`open`], then [`crate::vmm::Vm::restore`]) checks the directory
//! against this binary and host before any of it reaches KVM.

pub mod marker;
pub mod plan;
pub mod state;
pub mod take;
pub mod vcpu_saves;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use samepage_virtio::mmio::StateError;

use crate::x86_64::vm_state::VmStateError;
pub use state::SnapshotState;
use state::{HostIdentity, SavedDisk, MAX_STATE_BYTES};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The guest RAM file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a file of the snapshot failed.
    #[error("snapshot: cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `state.json` is not JSON of the right shape.
    #[error("snapshot: {} is not a samepage snapshot state", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value in the state is impossible.
    #[error("snapshot: invalid state: {0}")]
    Invalid(String),
    /// Written by another format version or samepage version.
    #[error(
        "snapshot: written by samepage {samepage} (format {version}); this is samepage {our_samepage} \
         (format {ours}), which restores only its own snapshots"
    )]
    Version {
        /// The snapshot's format version.
        version: u32,
        /// The samepage that wrote it.
        samepage: String,
        /// This binary's format version.
        ours: u32,
        /// This binary's version.
        our_samepage: &'static str,
    },
    /// The memory file does not hold the RAM the state describes.
    #[error("snapshot: the memory file holds {found} bytes, the state describes {expected}")]
    MemoryFileSize {
        /// Its length.
        found: u64,
        /// The RAM's.
        expected: u64,
    },
    /// Taken on a host whose KVM differs.
    #[error("snapshot: taken on another host: its {what} differs ({saved} then, {here} here)")]
    Host {
        /// What differs.
        what: &'static str,
        /// The snapshot's.
        saved: String,
        /// This host's.
        here: String,
    },
    /// A read-only disk's image changed since the snapshot.
    #[error("snapshot: disk image {} changed since the snapshot (size or modification time): the guest's cache of it would be stale", .0.display())]
    DiskChanged(PathBuf),
    /// The VM stopped before the snapshot was taken.
    #[error("snapshot: the VM is stopping")]
    Stopping,
    /// The VM has a vsock device, whose connections live in host sockets a snapshot cannot
    /// hold.
    #[error(
        "snapshot: a VM with a vsock device cannot be snapshotted (its connections live in host sockets)"
    )]
    Vsock,
    /// The VM has a network device, whose link lives in a host tap.
    #[error("snapshot: a VM with a network device cannot be snapshotted (its link lives in a host tap)")]
    Net,
    /// A vCPU's state could not be read.
    #[error("snapshot: {0}")]
    Vcpu(String),
    /// The VM's in-kernel devices could not be read or written.
    #[error("snapshot: the VM's interrupt controllers, timer or clock")]
    VmState(#[source] VmStateError),
    /// A device's saved state does not fit it.
    #[error("snapshot: virtio device {index}")]
    Device {
        /// Its index (disks first, then the fphash device).
        index: usize,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The UART's saved state does not fit it.
    #[error("snapshot: the console UART's state: {0}")]
    Serial(String),
}

/// Where a snapshot's two files are: `DIR/state.json` and `DIR/memory` for `--snapshot-to` and
/// `--restore`, any two paths through the API (`snapshot_path`, `mem_file_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state (`state.json`).
    pub state: PathBuf,
    /// Guest RAM.
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// The files of the snapshot directory `dir`.
    pub fn in_dir(dir: &Path) -> SnapshotFiles {
        SnapshotFiles { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE) }
    }

    /// Whether `other` names one of these files (when they can be looked at).
    pub fn overlaps(&self, other: &SnapshotFiles) -> bool {
        let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        [&self.state, &self.memory].iter().any(|mine| same(mine, &other.state) || same(mine, &other.memory))
    }
}

/// A snapshot, checked, ready to restore from.
pub struct Snapshot {
    /// Its files.
    pub files: SnapshotFiles,
    /// `state.json`.
    pub state: SnapshotState,
    /// `memory`, open read-only.
    pub memory: File,
    /// The memory file's size and modification time (ns) when it was opened and checked: a
    /// restore compares them again once its lease on the file holds.
    pub memory_identity: (u64, i128),
}

/// Wraps an I/O error on `path` as what was being done.
pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { what, path: path.to_path_buf(), source }
}

/// Opens the snapshot `files` name and checks it against this binary and the disks' images;
/// the host's KVM is checked when the VM is built ([`check_host`]).
pub fn open(files: &SnapshotFiles) -> Result<Snapshot, SnapshotError> {
    let state_path = &files.state;
    let file = open_regular(state_path)?;
    let mut text = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut text).map_err(io("read", state_path))?;
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::Invalid(format!("{STATE_FILE} is larger than {MAX_STATE_BYTES} bytes")));
    }
    let state =
        parse_state(&text).map_err(|source| SnapshotError::Json { path: state_path.clone(), source })?;
    let memory_path = &files.memory;
    let memory = open_regular(memory_path)?;
    let meta = memory.metadata().map_err(io("look at", memory_path))?;
    if !meta.is_file() {
        return Err(SnapshotError::Invalid(format!("{} is not a regular file", memory_path.display())));
    }
    state.check(meta.len())?;
    let memory_identity = file_identity(&meta);
    for disk in state.machine.disks.iter().filter(|d| d.read_only) {
        if disk_identity(&disk.path).ok() != Some((disk.bytes, disk.modified_ns)) {
            return Err(SnapshotError::DiskChanged(disk.path.clone()));
        }
    }
    Ok(Snapshot { files: files.clone(), state, memory, memory_identity })
}

/// Opens a snapshot file read-only: a regular file, opened without blocking (a FIFO named as
/// a snapshot file would hang the restore).
fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    use crate::checked_open::HostFileError;
    crate::checked_open::open_regular(path).map_err(|e| {
        let source = match e {
            HostFileError::Io(e) => e,
            wrong => std::io::Error::new(std::io::ErrorKind::InvalidInput, wrong.to_string()),
        };
        SnapshotError::Io { what: "open", path: path.to_path_buf(), source }
    })
}

/// Parses `state.json` (the fuzz target's entry).
pub fn parse_state(text: &[u8]) -> Result<SnapshotState, serde_json::Error> {
    serde_json::from_slice(text)
}

/// Refuses a snapshot taken on a host whose KVM differs from `here`.
pub fn check_host(state: &SnapshotState, here: &HostIdentity) -> Result<(), SnapshotError> {
    let saved = &state.host;
    let differs = |what, saved: String, here: String| Err(SnapshotError::Host { what, saved, here });
    if saved.kvm_api != here.kvm_api {
        return differs("KVM API version", saved.kvm_api.to_string(), here.kvm_api.to_string());
    }
    if saved.supported_cpuid != here.supported_cpuid {
        return differs("supported CPUID", saved.supported_cpuid.clone(), here.supported_cpuid.clone());
    }
    if saved.emulating_kvm != here.emulating_kvm {
        return differs(
            "emulation of guest kernel code",
            saved.emulating_kvm.to_string(),
            here.emulating_kvm.to_string(),
        );
    }
    Ok(())
}

/// This host's identity as snapshots record it; `emulating_kvm`: whether its KVM emulates
/// guest kernel code.
pub fn host_identity(
    kvm: &kvm_ioctls::Kvm,
    supported: &kvm_bindings::CpuId,
    emulating_kvm: bool,
) -> HostIdentity {
    // The entries' fields, not their padding (which KVM need not clear), and not the APIC ID
    // of the host CPU that asked (leaf 1 EBX[31:24], leaves 0xB and 0x1F EDX, leaf
    // 0x8000_001E EAX), which changes with the CPU the thread ran on.
    let mut entries = Vec::new();
    for e in supported.as_slice() {
        let ebx = if e.function == 1 { e.ebx & 0x00ff_ffff } else { e.ebx };
        let edx = if matches!(e.function, 0xb | 0x1f) { 0 } else { e.edx };
        let eax = if e.function == 0x8000_001e { 0 } else { e.eax };
        for word in [e.function, e.index, e.flags, eax, ebx, e.ecx, edx] {
            entries.extend_from_slice(&word.to_le_bytes());
        }
    }
    HostIdentity {
        kvm_api: kvm.get_api_version(),
        supported_cpuid: blake3::hash(&entries).to_hex().to_string(),
        emulating_kvm,
    }
}

/// A disk's image as a snapshot records it: size and modification time (ns).
pub fn disk_identity(path: &Path) -> std::io::Result<(u64, i128)> {
    Ok(file_identity(&std::fs::metadata(path)?))
}

/// A file's size and modification time (ns).
pub fn file_identity(meta: &std::fs::Metadata) -> (u64, i128) {
    (meta.len(), i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()))
}

/// The disks of `config` as a snapshot records them.
pub fn saved_disks(disks: &[crate::config::DiskConfig]) -> Result<Vec<SavedDisk>, SnapshotError> {
    disks
        .iter()
        .map(|disk| {
            let (bytes, modified_ns) = disk_identity(&disk.path).map_err(io("look at", &disk.path))?;
            Ok(SavedDisk {
                path: disk.path.clone(),
                read_only: disk.read_only,
                share: disk.share,
                bytes,
                modified_ns,
            })
        })
        .collect()
}
