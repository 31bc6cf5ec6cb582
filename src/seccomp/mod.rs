//! Seccomp filters: every samepage thread that guest input or a client can reach runs under a
//! filter made for its kind ([`ThreadKind`]), built with rust-vmm's `seccompiler`. A thread
//! installs its own filter before it does its work, and a VM's vCPUs enter the guest only
//! once every thread of the VM has its filter. A syscall a filter does not allow raises
//! SIGSYS; the handler writes one line naming the thread and the syscall number and ends the
//! process with [`Exit::SeccompViolation`] (126).
//!
//! `--seccomp off` (run, density, boot-test, dedupd) installs nothing, for debugging only.
//!
//! Filters are per thread and inherited by the threads and processes a thread starts, so a
//! thread that starts others (the main thread, density's front-end) installs its filter only
//! after it started them.

mod filters;
mod trap;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

/// Whether samepage's threads install seccomp filters (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Seccomp {
    /// Every thread runs under its filter.
    On,
    /// No filters: for debugging only.
    Off,
}

/// The kinds of samepage threads, each with its own filter (`filters.rs` lists what each may
/// call and why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the port and MMIO devices it emulates on its way.
    Vcpu,
    /// A VM's virtio event loop: block I/O and merging guest pages (locally or through the
    /// broker).
    Virtio,
    /// The virtio event loop of a VM with a vsock device: also its host sockets (accepted,
    /// connected, watched, shut).
    VirtioVsock,
    /// The thread that takes the stop signals (`signals.rs`).
    Signals,
    /// The thread that copies standard input to the guest's console (`terminal.rs`).
    Stdin,
    /// A thread that runs VMs once they are built: `run`'s and `boot-test`'s main thread, and
    /// `density --threads`' main and VM threads (they wait, write metrics, settle the merged
    /// pages and release the VM).
    Vmm,
    /// `density`'s front-end once its VM processes and broker are started: it watches them,
    /// queries the broker and writes the report.
    Density,
    /// The dedup broker's loop (`samepage dedupd`).
    Dedupd,
    /// A VM's balloon control socket (`run --balloon-socket`): one client at a time sets the
    /// target or reads the figures.
    BalloonControl,
    /// The API socket's thread (`run --api-sock`): HTTP requests read and answered; the VM's
    /// owner does what they ask.
    Api,
}

impl ThreadKind {
    /// The kind's name, in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Virtio => "virtio",
            ThreadKind::VirtioVsock => "virtio with vsock",
            ThreadKind::Signals => "signals",
            ThreadKind::Stdin => "stdin",
            ThreadKind::Vmm => "VMM",
            ThreadKind::Density => "density",
            ThreadKind::Dedupd => "dedupd",
            ThreadKind::BalloonControl => "balloon control",
            ThreadKind::Api => "API",
        }
    }
}

/// Why a filter could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter's rules do not compile to BPF.
    #[error("cannot build the seccomp filter of {kind} threads")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (or `PR_SET_NO_NEW_PRIVS`).
    #[error("cannot install the seccomp filter of thread {thread}")]
    Install {
        /// The thread's name.
        thread: String,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler that reports violations could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start thread {thread}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread ended before it said whether its filter is in place.
    #[error("thread {0} ended before installing its seccomp filter")]
    Vanished(String),
}

impl SeccompError {
    /// The errno behind the failure, if there is one (0 otherwise).
    pub fn errno(&self) -> i32 {
        match self {
            SeccompError::Install { source, .. } => match source {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e.raw_os_error(),
                _ => None,
            },
            SeccompError::Handler(e) | SeccompError::Spawn { source: e, .. } => e.raw_os_error(),
            SeccompError::Build { .. } | SeccompError::Vanished(_) => None,
        }
        .unwrap_or(0)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Sets whether threads install filters; call it once, before any thread starts.
pub fn configure(setting: Seccomp) {
    ENABLED.store(setting == Seccomp::On, Ordering::SeqCst);
}

/// Whether threads install filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The setting [`configure`] was given (what `--seccomp` passes on to child processes).
pub fn setting() -> Seccomp {
    if enabled() {
        Seccomp::On
    } else {
        Seccomp::Off
    }
}

/// The filter of `kind`, compiled; `None` when filters are off.
fn program(kind: ThreadKind) -> Result<Option<BpfProgram>, SeccompError> {
    if !enabled() {
        return Ok(None);
    }
    filters::compile(kind).map(Some).map_err(|source| SeccompError::Build { kind: kind.name(), source })
}

/// Installs `program` in the calling thread, named `thread` in violation messages.
fn apply(thread: &str, program: &BpfProgram) -> Result<(), SeccompError> {
    trap::install_handler().map_err(SeccompError::Handler)?;
    trap::set_thread_name(thread);
    seccompiler::apply_filter(program)
        .map_err(|source| SeccompError::Install { thread: thread.to_string(), source })
}

/// Installs the filter of `kind` in the calling thread (nothing when filters are off). Every
/// thread it starts from now on inherits the filter, on top of its own.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    match program(kind)? {
        Some(program) => {
            let current = std::thread::current();
            apply(current.name().unwrap_or(kind.name()), &program)
        }
        None => Ok(()),
    }
}

/// Starts thread `name`, which installs the filter of `kind` before it runs `body`; returns
/// once the filter is in place (or failed, and then `body` never runs).
pub fn spawn(
    name: String,
    kind: ThreadKind,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, SeccompError> {
    let program = program(kind)?;
    let (installed_tx, installed) = std::sync::mpsc::sync_channel(1);
    let thread_name = name.clone();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let result = program.as_ref().map_or(Ok(()), |p| apply(&thread_name, p));
            let ok = result.is_ok();
            let _ = installed_tx.send(result);
            if ok {
                body();
            }
        })
        .map_err(|source| SeccompError::Spawn { thread: name.clone(), source })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(SeccompError::Vanished(name)),
    }
}

#[cfg(test)]
mod tests;
