//! Why a VM stops, and the switch that stops it. A leaf module: the devices, the vCPU loop,
//! the console, the signal thread and the VMM all pull the same switch.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::lock;
use crate::exit_code::Exit;

/// Why a guest cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrashReason {
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    #[error("triple fault (KVM_EXIT_SHUTDOWN)")]
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR: e.g. an instruction an emulating KVM cannot run.
    #[error("KVM internal error (KVM_EXIT_INTERNAL_ERROR)")]
    KvmInternalError,
    /// KVM_EXIT_FAIL_ENTRY.
    #[error("VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, cpu {cpu})")]
    FailEntry {
        /// The hardware's reason.
        reason: u64,
        /// The physical CPU.
        cpu: u32,
    },
    /// An exit reason kvm-ioctls does not know.
    #[error("unsupported exit reason {0}")]
    UnsupportedExit(u32),
    /// A system event other than shutdown or reset.
    #[error("unhandled system event {0}")]
    SystemEvent(u32),
    /// An exit samepage does not handle (named as kvm-ioctls prints it).
    #[error("unhandled exit {0}")]
    UnhandledExit(String),
    /// KVM_RUN failed with this errno.
    #[error("KVM_RUN failed with errno {0}")]
    KvmRun(i32),
    /// The vCPU's thread could not be started.
    #[error("cannot start its thread: errno {0}")]
    ThreadStart(i32),
    /// The guest pages of an image that is about to change could not all be copied into the
    /// guest's own memory: running on, the guest would see the change (or fault).
    #[error("the pages of a shared image that another process changes could not be copied")]
    ImageUnshare,
    /// Another process began writing or truncating the snapshot's memory file that the
    /// restored VM's RAM maps, and its pages could not be copied into the guest's own memory.
    #[error("the guest RAM that maps a snapshot's memory file another process changes could not be copied")]
    SnapshotUnshare,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the exit-status port.
    GuestStatus(u8),
    /// The guest rebooted or powered off.
    Reset,
    /// The guest cannot go on.
    Crashed {
        /// Which vCPU saw it.
        vcpu: u8,
        /// Why.
        reason: CrashReason,
        /// The vCPU's RIP then.
        rip: u64,
    },
    /// `--timeout` expired.
    Timeout(Duration),
    /// A stop signal (SIGINT, SIGTERM, SIGHUP, ...) or Ctrl-A x.
    Signal(i32),
}

impl VmExit {
    /// How `samepage run` ends for it.
    pub fn exit(&self) -> Exit {
        match self {
            VmExit::GuestStatus(status) => Exit::Status(*status),
            VmExit::Reset => Exit::Success,
            VmExit::Crashed { .. } => Exit::Crashed,
            VmExit::Timeout(_) => Exit::Timeout,
            VmExit::Signal(num) => Exit::Signal(*num),
        }
    }

    /// The process exit code (docs/guest-interface.md).
    pub fn exit_code(&self) -> u8 {
        self.exit().code()
    }

    /// One line for the user, or `None` when the exit is ordinary.
    pub fn message(&self) -> Option<String> {
        match self {
            VmExit::GuestStatus(_) | VmExit::Reset => None,
            VmExit::Crashed { vcpu, reason, rip } => {
                Some(format!("guest crashed on vCPU {vcpu}: {reason} at RIP {rip:#x}"))
            }
            VmExit::Timeout(after) => {
                Some(format!("timeout: guest still running after {} s", after.as_secs()))
            }
            VmExit::Signal(num) => Some(format!("stopped by signal {num}")),
        }
    }
}

/// The first stop request wins; everyone can wait for it.
#[derive(Default)]
pub struct VmStop {
    state: Mutex<StopState>,
    changed: Condvar,
}

#[derive(Default)]
struct StopState {
    exit: Option<VmExit>,
    /// Something for the VMM thread to do (an API request): its wait returns early once.
    nudged: bool,
}

impl VmStop {
    /// A VM that has not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the VM to stop for `exit`, unless it already is stopping for another reason.
    pub fn request(&self, exit: VmExit) {
        let mut state = lock(&self.state);
        if state.exit.is_none() {
            state.exit = Some(exit);
            self.changed.notify_all();
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopped(&self) -> bool {
        lock(&self.state).exit.is_some()
    }

    /// Wakes a [`VmStop::wait_until`] without a stop (it returns `None` once): the VMM thread
    /// has a request to answer.
    pub fn nudge(&self) {
        lock(&self.state).nudged = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for a stop request.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// Waits for a stop request until `deadline` (forever without one) or a
    /// [`VmStop::nudge`], whichever comes first.
    pub fn wait_until(&self, deadline: Option<Instant>) -> Option<VmExit> {
        let mut guard = lock(&self.state);
        loop {
            if guard.exit.is_some() {
                return guard.exit.clone();
            }
            if std::mem::take(&mut guard.nudged) {
                return None;
            }
            guard = match deadline {
                None => self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed.wait_timeout(guard, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_stop_request_wins() {
        let stop = VmStop::new();
        assert_eq!(stop.wait(Duration::from_millis(1)), None);
        stop.request(VmExit::GuestStatus(3));
        stop.request(VmExit::Reset);
        assert_eq!(stop.wait(Duration::from_millis(1)), Some(VmExit::GuestStatus(3)));
    }

    #[test]
    fn a_waiter_wakes_on_the_request_not_on_a_poll() {
        let stop = Arc::new(VmStop::new());
        let other = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.request(VmExit::Reset);
        });
        let start = Instant::now();
        assert_eq!(stop.wait_until(None), Some(VmExit::Reset));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().expect("join");
    }

    #[test]
    fn a_nudge_wakes_one_wait_without_stopping() {
        let stop = Arc::new(VmStop::new());
        let other = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.nudge();
        });
        assert_eq!(stop.wait_until(None), None);
        assert!(!stop.is_stopped());
        assert_eq!(stop.wait(Duration::from_millis(1)), None);
        t.join().expect("join");
    }

    #[test]
    fn exit_codes_are_as_documented() {
        assert_eq!(VmExit::GuestStatus(7).exit_code(), 7);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Timeout(Duration::from_secs(1)).exit_code(), 124);
        assert_eq!(VmExit::Crashed { vcpu: 0, reason: CrashReason::TripleFault, rip: 0 }.exit_code(), 125);
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(VmExit::Signal(libc::SIGHUP).exit_code(), 129);
    }
}
