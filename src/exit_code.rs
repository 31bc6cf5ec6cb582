//! Every exit code samepage's commands document, in one place (docs/guest-interface.md,
//! docs/boot-test.md, docs/running.md). A leaf module: the CLI, the VMM's stop reasons and boot-test's
//! verdicts all use it.

/// How a samepage command ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done (run: the guest rebooted or powered off; boot-test: the command succeeded).
    Success,
    /// 0-255: `run`: the byte the guest wrote to the exit-status port; `boot-test`: the
    /// command's own status.
    Status(u8),
    /// 1: `run`, `density`, `dedupd`: nothing ran (bad input, no KVM, ...): one
    /// `samepage: error:` line says why.
    StartFailed,
    /// 1: `boot-test`: KTAP results include failures, or `--expect` never matched.
    TestFailed,
    /// 1: `density`: a VM did not exit 0 (each VM's own code is on its line); `dedupd check`:
    /// the broker found a disagreement; `dedupd status`: no broker answered.
    Failed,
    /// 2: the command line does not parse.
    Usage,
    /// 124: `--timeout` expired (as coreutils' `timeout`).
    Timeout,
    /// 125: `run`: the guest crashed (one line names the reason and RIP).
    Crashed,
    /// 125: `boot-test`: the VM could not start.
    BootTestStartFailed,
    /// 126: every command: a thread made a syscall its seccomp filter forbids (one
    /// `samepage: error: seccomp:` line names the thread and the syscall number).
    SeccompViolation,
    /// 101 (as Rust's own panics): every command: a samepage thread panicked, a bug (one
    /// `samepage: error: panic in thread` line names the thread, the message and where); the
    /// process ends at once.
    Panic,
    /// 128 + N: stopped by signal N.
    Signal(i32),
    /// 255: `boot-test`: a kernel panic, oops, `BUG:` or `WARNING:`.
    KernelFailure,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Status(status) => status,
            Exit::StartFailed | Exit::TestFailed | Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Panic => 101,
            Exit::Timeout => 124,
            Exit::Crashed | Exit::BootTestStartFailed => 125,
            Exit::SeccompViolation => 126,
            Exit::Signal(num) => 128u8.saturating_add(u8::try_from(num).unwrap_or(u8::MAX)),
            Exit::KernelFailure => 255,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_as_documented() {
        let table = [
            (Exit::Success, 0),
            (Exit::Status(7), 7),
            (Exit::StartFailed, 1),
            (Exit::TestFailed, 1),
            (Exit::Failed, 1),
            (Exit::Usage, 2),
            (Exit::Panic, 101),
            (Exit::Timeout, 124),
            (Exit::Crashed, 125),
            (Exit::BootTestStartFailed, 125),
            (Exit::SeccompViolation, 126),
            (Exit::Signal(libc::SIGTERM), 143),
            (Exit::Signal(libc::SIGINT), 130),
            (Exit::KernelFailure, 255),
        ];
        for (exit, code) in table {
            assert_eq!(exit.code(), code, "{exit:?}");
        }
    }
}
