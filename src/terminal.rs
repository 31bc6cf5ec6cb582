//! Interactive console input: a thread that feeds standard input to the guest's UART (with the
//! terminal in raw mode, [`crate::raw_mode`]). Ctrl-A x stops the VM (as in QEMU), since
//! Ctrl-C goes to the guest.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::lock;
use crate::devices::serial::SerialConsole;
use crate::seccomp::{SeccompError, ThreadKind};
use crate::stop::{VmExit, VmStop};

/// Ctrl-A, the escape byte; followed by `x` it stops the VM.
const ESCAPE: u8 = 0x01;

/// Copies `input` to `out`, interpreting Ctrl-A escapes as QEMU does: Ctrl-A x asks to stop
/// (returns true), Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A and another byte send both.
/// `escaped` carries a trailing Ctrl-A over to the next read.
fn filter_escapes(escaped: &mut bool, input: &[u8], out: &mut Vec<u8>) -> bool {
    for &byte in input {
        if std::mem::take(escaped) {
            match byte {
                b'x' => return true,
                ESCAPE => out.push(ESCAPE),
                other => out.extend_from_slice(&[ESCAPE, other]),
            }
        } else if byte == ESCAPE {
            *escaped = true;
        } else {
            out.push(byte);
        }
    }
    false
}

/// Starts the thread that copies standard input into the UART until input ends (under its
/// seccomp filter).
pub fn spawn_input_thread(
    serial: Arc<Mutex<SerialConsole>>,
    stop: Arc<VmStop>,
    escape: bool,
) -> Result<(), SeccompError> {
    crate::seccomp::spawn("stdin".into(), ThreadKind::Stdin, move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        let mut escaped = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut pending: Vec<u8> = Vec::with_capacity(n);
            if escape {
                if filter_escapes(&mut escaped, &buf[..n], &mut pending) {
                    stop.request(VmExit::Signal(libc::SIGINT));
                    return;
                }
            } else {
                pending.extend_from_slice(&buf[..n]);
            }
            let mut rest = &pending[..];
            while !rest.is_empty() && !stop.is_stopped() {
                let taken = lock(&serial).enqueue_input(rest);
                rest = &rest[taken..];
                if !rest.is_empty() {
                    // The guest has not drained its receive FIFO yet.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_escapes() {
        let mut escaped = false;
        let mut out = Vec::new();
        assert!(!filter_escapes(&mut escaped, b"ab\x01\x01c\x01", &mut out));
        assert_eq!(out, b"ab\x01c");
        assert!(escaped, "a trailing Ctrl-A waits for the next read");
        assert!(!filter_escapes(&mut escaped, b"z", &mut out));
        assert_eq!(out, b"ab\x01c\x01z");
        assert!(filter_escapes(&mut escaped, b"q\x01x", &mut out));
    }
}
