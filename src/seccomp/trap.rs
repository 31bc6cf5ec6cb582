//! The SIGSYS handler: a filter's violation ends the process with one line on stderr.
//!
//! The handler runs in the thread that made the forbidden call, under that thread's filter, so
//! it makes only calls every filter of a VMM allows (`tcsetattr` on standard input to restore a
//! raw terminal, `write` to stderr, `exit_group`), and only async-signal-safe ones: no
//! allocation, no locks.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::exit_code::Exit;

/// Longest thread name Linux keeps (15 bytes and the NUL).
const NAME_LEN: usize = 16;

thread_local! {
    /// This thread's name for the violation line. Const-initialized without destructor: a
    /// plain TLS read, which is async-signal-safe.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Remembers the calling thread's name for the violation line (cut to 16 bytes).
pub(super) fn set_thread_name(name: &str) {
    let mut bytes = [0u8; NAME_LEN];
    let len = name.len().min(NAME_LEN);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|cell| cell.set(bytes));
}

/// Installs the handler, once per process.
pub(super) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction is plain data; every field samepage relies on is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: the mask is part of `action`, which we own.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: a valid action for SIGSYS; the old one is not needed.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: after `si_signo`, `si_errno`,
/// `si_code`, padding to 16 bytes and `si_call_addr` (include/uapi/asm-generic/siginfo.h).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let syscall = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a SIGSYS siginfo (SA_SIGINFO), 128 bytes, whose
        // `si_syscall` is an int at this offset.
        unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<libc::c_int>().read_unaligned() }
    };
    let name = THREAD_NAME.with(Cell::get);
    let (line, len) = violation_line(&name, syscall);
    crate::raw_mode::restore_after_fault();
    // SAFETY: write and _exit are async-signal-safe; `line` outlives the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        libc::_exit(i32::from(Exit::SeccompViolation.code()));
    }
}

/// Room for the line: the fixed text, a 16-byte name and an int.
const LINE_LEN: usize = 128;

/// "samepage: error: seccomp: thread NAME made forbidden syscall NR\n", built without
/// allocating; `name` ends at its first NUL.
fn violation_line(name: &[u8; NAME_LEN], syscall: i32) -> ([u8; LINE_LEN], usize) {
    let mut line = [0u8; LINE_LEN];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if len < LINE_LEN {
                line[len] = b;
                len += 1;
            }
        }
    };
    push(b"samepage: error: seccomp: thread ");
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if name_len == 0 {
        push(b"?");
    }
    for &b in &name[..name_len] {
        // Thread names are samepage's own, but a line must stay one line.
        push(&[if b.is_ascii_graphic() { b } else { b'?' }]);
    }
    push(b" made forbidden syscall ");
    if syscall < 0 {
        push(b"-");
    }
    let mut digits = [0u8; 10];
    let mut n = syscall.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in (0..count).rev() {
        push(&[digits[i]]);
    }
    push(b"\n");
    (line, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> [u8; NAME_LEN] {
        let mut bytes = [0u8; NAME_LEN];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        bytes
    }

    #[test]
    fn the_line_names_thread_and_syscall() {
        let (line, len) = violation_line(&name("virtio"), 101);
        assert_eq!(&line[..len], b"samepage: error: seccomp: thread virtio made forbidden syscall 101\n");
        let (line, len) = violation_line(&name("vcpu12"), 0);
        assert_eq!(&line[..len], b"samepage: error: seccomp: thread vcpu12 made forbidden syscall 0\n");
        let (line, len) = violation_line(&[b'x'; NAME_LEN], i32::MAX);
        assert_eq!(
            &line[..len],
            b"samepage: error: seccomp: thread xxxxxxxxxxxxxxxx made forbidden syscall 2147483647\n"
        );
        let (line, len) = violation_line(&name("a\nb"), -5);
        assert_eq!(&line[..len], b"samepage: error: seccomp: thread a?b made forbidden syscall -5\n");
        let (line, len) = violation_line(&[0; NAME_LEN], 3);
        assert_eq!(&line[..len], b"samepage: error: seccomp: thread ? made forbidden syscall 3\n");
    }
}
