//! The VMM's error type: one variant per step that can fail, naming the value involved.

use std::path::PathBuf;

/// Everything that can stop samepage from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Bad configuration value.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The user may not open /dev/kvm.
    #[error(
        "no access to /dev/kvm for uid {uid}: add the user to the device's group, or give it an \
         ACL entry (as root: setfacl -m u:{uid}:rw /dev/kvm)"
    )]
    KvmAccess {
        /// The real user id.
        uid: u32,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM API version or a needed capability is missing.
    #[error("KVM lacks {0}, which samepage needs")]
    KvmCapability(&'static str),
    /// A KVM ioctl on the VM failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The console file could not be created or opened.
    #[error("cannot create or open console file {path}")]
    ConsoleOpen {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console file is of a type samepage does not write to.
    #[error("console file {path} is {found}, not a regular file or character device")]
    ConsoleType {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        found: &'static str,
    },
    /// Kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] crate::x86_64::boot::BootError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] crate::x86_64::regs::RegsError),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] samepage_virtio::block::BlockError),
    /// The dedup domain could not be set up.
    #[error(transparent)]
    Dedup(#[from] crate::dedup::DedupError),
    /// More devices than free IRQs or MMIO windows.
    #[error("too many virtio devices: {0} (at most {max})", max = crate::x86_64::layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    /// A device could not be placed on a bus.
    #[error("cannot place {what} on the bus")]
    Bus {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: crate::bus::BusError,
    },
    /// A virtio-mmio transport could not be made for a device.
    #[error("cannot make the virtio-mmio transport of device {index}")]
    Transport {
        /// The device's index.
        index: usize,
        /// Why.
        #[source]
        source: samepage_virtio::Error,
    },
    /// The balloon's control socket could not be set up.
    #[error(transparent)]
    BalloonSocket(#[from] crate::balloon::control::ControlError),
    /// A network device's tap.
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    /// The vsock device's host socket (`--vsock uds=PATH`) cannot be taken.
    #[error("cannot serve the vsock socket")]
    VsockSocket(#[source] crate::socket_file::SocketFileError),
    /// A thread's seccomp filter could not be put in place.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The stop signals cannot be taken.
    #[error(transparent)]
    Signals(&'static crate::signals::SignalsError),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A vCPU's saved state could not be put back.
    #[error(transparent)]
    VcpuState(#[from] crate::x86_64::vcpu_state::VcpuStateError),
    /// A host resource (eventfd, thread, epoll) could not be made.
    #[error("cannot create {what}")]
    Host {
        /// Which resource.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// Wraps a KVM ioctl error with the ioctl's name.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }

    /// Wraps a host I/O error with the resource's name.
    pub fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
        move |source| VmmError::Host { what, source }
    }
}
