//! Every signal number samepage uses, in one leaf: the stop signals, the vCPU kick and the
//! lease signal. The seccomp filters allow sending exactly these, the signal thread blocks and
//! takes them, vCPUs and leases are signalled with them: all read them here, and none of those
//! modules depends on another for a number.

use vmm_sys_util::signal::SIGRTMIN;

/// The signals that stop a VM (`signals.rs` takes them).
pub const STOP_SIGNALS: [libc::c_int; 7] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM];

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// The signal the kernel sends when a read lease of samepage's breaks (`lease.rs`): the one
/// after the vCPU kick.
pub fn lease_signal() -> libc::c_int {
    kick_signal() + 1
}
