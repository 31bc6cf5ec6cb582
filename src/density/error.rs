//! What can stop a density run: its own steps (its directory and consoles, the broker and the
//! VM processes it starts, its VM threads), apart from the VMM's errors, which it wraps.

use std::io;
use std::path::PathBuf;

use crate::checked_open::HostFileError;
use crate::config::ConfigError;
use crate::dedup::DedupError;
use crate::dedupd::DedupdError;
use crate::error::VmmError;
use crate::seccomp::SeccompError;

/// Why a density run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    /// A bad option (a `--vm-cmdline` for a VM that does not exist).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The console directory, or the broker's log, could not be created.
    #[error("cannot create {path}")]
    File {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A VM's console file could not be created, or is a FIFO or socket.
    #[error("cannot create {path}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: HostFileError,
    },
    /// A host resource (the run's private directory, a process, a pipe, a thread) could not be
    /// made or read.
    #[error("cannot create {what}")]
    Host {
        /// Which resource.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The dedup broker did not start.
    #[error("the dedup broker did not start: {said}")]
    BrokerStart {
        /// The last lines it logged.
        said: String,
    },
    /// The broker's check could not be had.
    #[error("cannot query the dedup broker")]
    BrokerQuery(#[source] DedupdError),
    /// A VM thread of `density --threads` panicked.
    #[error("VM thread {0} panicked")]
    VmThreadPanicked(usize),
    /// A VM could not be built or run (`--threads`).
    #[error(transparent)]
    Vm(#[from] VmmError),
    /// `--restore`'s snapshot cannot be used.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The shared dedup domain failed (`--threads`).
    #[error(transparent)]
    Dedup(#[from] DedupError),
    /// The front-end's seccomp filter could not be put in place.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl DensityError {
    /// Wraps a host I/O error with the resource's name.
    pub fn host(what: &'static str) -> impl FnOnce(io::Error) -> DensityError {
        move |source| DensityError::Host { what, source }
    }
}
