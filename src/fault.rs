//! Fault injection for tests of the VMM's own robustness (never for guests):
//! `SAMEPAGE_TEST_FAULT=<name>` in the environment turns one fault on. Known faults:
//! - `wedge-fphash`: the device thread wedges for good, holding the fphash transport's lock,
//!   on the first queue notification (the stop path must still end the process).
//! - `forbidden-syscall`: the device thread calls `ptrace`, which no seccomp filter allows, on
//!   the first queue notification (its filter must end the process with one clear line).
//! - `panic-virtio`: the device thread panics on the first queue notification, under its
//!   seccomp filter (the panic must be reported as a panic, not as a forbidden syscall).
//! - `panic-vmm`: the thread that runs the VM (`run`'s main thread) panics once the VM has
//!   stopped, under its seccomp filter.
//! - `snapshot-written-before-lease`: a restore rewrites the first byte of the snapshot's
//!   memory file (the same byte: only its modification time changes) after opening it and
//!   before taking its lease, as another process could (the restore must refuse to start).

use std::sync::OnceLock;

/// The environment variable that names the fault.
pub const FAULT_ENV: &str = "SAMEPAGE_TEST_FAULT";

/// Whether fault `name` is on.
pub fn injected(name: &str) -> bool {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT.get_or_init(|| std::env::var(FAULT_ENV).ok()).as_deref() == Some(name)
}

/// Makes the calling thread call `ptrace` (a harmless request: reading a word of process 0,
/// which does not exist), once per process. Under a seccomp filter this never returns.
pub fn forbidden_syscall() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: PTRACE_PEEKDATA of pid 0 reads nothing and fails with ESRCH where allowed.
        let rc = unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 0, 0usize, 0usize) };
        log::error!(
            "fault injection: this thread called ptrace, which returned {rc} ({}): no seccomp filter stopped it",
            std::io::Error::last_os_error()
        );
    });
}

/// Panics as a bug would, naming the fault; the panic's location is the caller's.
#[track_caller]
pub fn panic(name: &str) -> ! {
    panic!("fault injection: {name}: this thread panics on purpose")
}
