//! What density's VM processes print on standard error (warnings such as the merge engine's
//! "raise vm.max_map_count", error lines), relayed to density's own standard error line by
//! line, each after the VM's name: `vm3: [... WARN ...] ...`. A line that several VMs print
//! alike (the same log message, timestamps aside) is shown once, from the first VM that
//! printed it; how many were left out is said at the end.
//!
//! The front-end reads the pipes without blocking, between its looks at the VMs, under its
//! seccomp filter (`read`, `write` to standard error, `close`).

use std::collections::HashSet;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::process::ChildStderr;

/// Longest line relayed; a longer one is cut there (the rest follows as lines of its own).
const MAX_LINE: usize = 4096;
/// Most distinct lines remembered for leaving out repeats; past that, lines are relayed
/// without being remembered, so a chatty VM cannot grow density's memory.
const MAX_REMEMBERED: usize = 4096;
/// Most reads of one pipe per look, so that a VM that never stops printing cannot hold the
/// front-end.
const MAX_READS_PER_LOOK: usize = 64;

/// The lines relayed so far, over all VMs.
#[derive(Default)]
pub(super) struct Relay {
    seen: HashSet<String>,
    /// Lines left out as repeats.
    pub(super) repeats: u64,
}

impl Relay {
    /// The line to print for `line` of VM `vm`, or `None` when another VM printed it already.
    pub(super) fn line(&mut self, vm: &str, line: &str) -> Option<String> {
        let key = without_log_header(line);
        if self.seen.contains(key) {
            self.repeats += 1;
            return None;
        }
        if self.seen.len() < MAX_REMEMBERED {
            self.seen.insert(key.to_string());
        }
        Some(format!("{vm}: {}", crate::escape_controls(line)))
    }
}

/// A log line's message: env_logger's `[TIME LEVEL TARGET] ` left out, so that the same
/// message from two VMs is the same text.
fn without_log_header(line: &str) -> &str {
    match (line.strip_prefix('['), line.find("] ")) {
        (Some(_), Some(end)) => &line[end + 2..],
        _ => line,
    }
}

/// One VM process's standard error, read without blocking.
pub(super) struct VmStderr {
    name: String,
    /// `None` once it ended (or failed).
    pipe: Option<ChildStderr>,
    /// The start of a line whose end has not arrived.
    partial: Vec<u8>,
    /// The last whole line, for the VM's line in the report when its process fails.
    last_line: String,
}

impl VmStderr {
    /// Relays VM `name`'s standard error from `pipe` (made non-blocking here).
    pub(super) fn new(name: String, pipe: ChildStderr) -> std::io::Result<VmStderr> {
        let fd = pipe.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor `pipe` owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: F_SETFL on a descriptor `pipe` owns, adding O_NONBLOCK to its flags.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(VmStderr { name, pipe: Some(pipe), partial: Vec::new(), last_line: String::new() })
    }

    /// The last whole line the VM printed.
    pub(super) fn last_line(&self) -> &str {
        &self.last_line
    }

    /// Whether the pipe is still open (the process, or its write end, lives on).
    pub(super) fn open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Relays what has arrived, and at the pipe's end the last partial line.
    pub(super) fn pump(&mut self, relay: &mut Relay) {
        let mut buf = [0u8; 4096];
        for _ in 0..MAX_READS_PER_LOOK {
            let Some(pipe) = self.pipe.as_mut() else { return };
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.end(relay);
                    return;
                }
                Ok(n) => self.take(&buf[..n], relay),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("cannot read the standard error of {}: {e}", self.name);
                    self.end(relay);
                    return;
                }
            }
        }
    }

    fn end(&mut self, relay: &mut Relay) {
        self.pipe = None;
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.emit(&rest, relay);
        }
    }

    /// Splits `data` into lines after what came before.
    fn take(&mut self, data: &[u8], relay: &mut Relay) {
        for &byte in data {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.emit(&line, relay);
            } else {
                self.partial.push(byte);
                if self.partial.len() >= MAX_LINE {
                    let line = std::mem::take(&mut self.partial);
                    self.emit(&line, relay);
                }
            }
        }
    }

    fn emit(&mut self, line: &[u8], relay: &mut Relay) {
        let line = String::from_utf8_lossy(line);
        self.last_line = line.to_string();
        if let Some(text) = relay.line(&self.name, &line) {
            eprintln!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_relayed_after_the_vms_name_and_repeats_once() {
        let mut relay = Relay::default();
        let warn =
            |time: &str| format!("[2026-12-06T21:{time}Z WARN  samepage::dedup] raise vm.max_map_count");
        assert_eq!(
            relay.line("vm0", &warn("00:01")),
            Some(format!("vm0: {}", warn("00:01"))),
            "the first time, whole"
        );
        assert_eq!(relay.line("vm1", &warn("00:02")), None, "the same message, another time");
        assert_eq!(
            relay.line("vm1", "samepage: error: x\u{1b}[2J"),
            Some("vm1: samepage: error: x\\u{1b}[2J".into())
        );
        assert_eq!(relay.repeats, 1);
    }

    #[test]
    fn log_headers_are_left_out_of_the_comparison_only() {
        assert_eq!(without_log_header("[t WARN  m] message"), "message");
        assert_eq!(without_log_header("samepage: error: [x] y"), "samepage: error: [x] y");
        assert_eq!(without_log_header("[no end"), "[no end");
    }

    #[test]
    fn lines_are_split_and_bounded() {
        // Fed directly, without a pipe.
        let mut vm =
            VmStderr { name: "vm0".into(), pipe: None, partial: Vec::new(), last_line: String::new() };
        let mut relay = Relay::default();
        vm.take(b"one\ntw", &mut relay);
        assert_eq!(vm.last_line(), "one");
        vm.take(b"o\n", &mut relay);
        assert_eq!(vm.last_line(), "two");
        vm.take(&vec![b'x'; MAX_LINE + 10], &mut relay);
        assert_eq!(vm.last_line().len(), MAX_LINE, "cut at the limit");
        assert_eq!(vm.partial.len(), 10);
        vm.end(&mut relay);
        assert_eq!(vm.last_line(), "x".repeat(10), "the rest at the end");
    }

    #[test]
    fn a_process_stderr_is_read_to_its_end_without_blocking() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "printf 'first\\nlast without a newline' >&2"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut vm = VmStderr::new("vm7".into(), child.stderr.take().expect("stderr")).expect("non-blocking");
        let mut relay = Relay::default();
        let status = child.wait().expect("wait");
        assert!(status.success());
        let started = std::time::Instant::now();
        while vm.open() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "the pipe never ended");
            vm.pump(&mut relay);
        }
        assert_eq!(vm.last_line(), "last without a newline");
        assert_eq!(relay.seen.len(), 2);
    }
}
