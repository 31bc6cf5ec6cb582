//! Raw mode on a terminal on standard input, and putting it back: a leaf, so that the seccomp
//! violation handler and the panic hook, which end the process without unwinding, can restore
//! the terminal without depending on anything above them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The terminal's settings before raw mode, for [`restore_after_fault`].
static SAVED: OnceLock<libc::termios> = OnceLock::new();
/// Whether raw mode is on now.
static RAW: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back as it was if raw mode is on: for the seccomp violation handler and
/// the panic hook, which end the process without unwinding. Async-signal-safe (atomic loads, `tcsetattr`).
pub fn restore_after_fault() {
    if RAW.load(Ordering::SeqCst) {
        if let Some(saved) = SAVED.get() {
            // SAFETY: settings saved from the same descriptor; tcsetattr is async-signal-safe.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Puts a terminal in raw mode for as long as it lives.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on standard input if it is a terminal; `None` otherwise.
    pub fn enable() -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer to a termios we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Output processing stays on, so that host-side log lines stay readable.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid descriptor and termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        let _ = SAVED.set(saved);
        RAW.store(true, Ordering::SeqCst);
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        RAW.store(false, Ordering::SeqCst);
        // SAFETY: restores the settings saved from the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
