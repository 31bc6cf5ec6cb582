//! `samepage boot-test --shell` through the real binary on a pseudo-terminal, the way a
//! developer's terminal drives it: typed input reaches the guest shell, the terminal is in raw
//! mode while it runs (Ctrl-C goes to the guest) and restored after, `exit N` ends the run
//! with status N, and Ctrl-A x stops the VM.

use crate::common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{artifact, test_guest};

/// Boot to the prompt is ~20-25 s on hosts whose KVM emulates guest kernel code.
const PROMPT_LIMIT: Duration = Duration::from_secs(300);
const REPLY_LIMIT: Duration = Duration::from_secs(60);
const ROWS: u16 = 33;
const COLS: u16 = 101;

/// samepage running on the slave side of a pseudo-terminal; everything it and the guest
/// print is collected from the master side.
struct Session {
    child: Child,
    master: File,
    transcript: Arc<Mutex<Vec<u8>>>,
}

impl Session {
    fn start(kernel: &Path, extra: &[&str]) -> Session {
        let mut master_fd = -1;
        let mut slave_fd = -1;
        let size = libc::winsize { ws_row: ROWS, ws_col: COLS, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors into the ints we own; the rest is optional.
        let rc = unsafe {
            libc::openpty(&mut master_fd, &mut slave_fd, std::ptr::null_mut(), std::ptr::null(), &size)
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        let (master, slave) = unsafe { (File::from_raw_fd(master_fd), OwnedFd::from_raw_fd(slave_fd)) };
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
        let mut args = vec!["boot-test", "--kernel", kernel.to_str().expect("path")];
        args.extend_from_slice(extra);
        let child = common::samepage()
            .env("SAMEPAGE_CACHE_DIR", common::repo().join("target/boot-test-cache"))
            .env("TERM", "xterm")
            .args(&args)
            .stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave))
            .spawn()
            .expect("start samepage");
        drop(slave);
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, sink) = (master.try_clone().expect("dup master"), transcript.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once samepage exits and the slave side closes.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().expect("transcript").extend_from_slice(&buf[..n]);
            }
        });
        Session { child, master, transcript }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.transcript.lock().expect("transcript")).into_owned()
    }

    /// Waits until the transcript after `from` contains `needle`; returns where it ends.
    fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) -> usize {
        let start = Instant::now();
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            if start.elapsed() > limit || self.child.try_wait().expect("wait").is_some() {
                let _ = self.child.kill();
                panic!("no {needle:?} within {limit:?}; transcript:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("type into the terminal");
    }

    fn local_flags(&self) -> libc::tcflag_t {
        // SAFETY: termios is plain data that tcgetattr fills; the result is checked.
        let mut attrs: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a termios we own.
        assert_eq!(unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut attrs) }, 0);
        attrs.c_lflag
    }

    fn finish(&mut self, limit: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("samepage did not exit within {limit:?}; transcript:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the reader drain what is left.
        std::thread::sleep(Duration::from_millis(200));
        (code, self.text())
    }
}

#[test]
fn the_shell_takes_typed_commands_and_its_exit_status_is_the_exit_code() {
    let kernel = artifact("target/guest/vmlinux", "resources/guest/build.sh");
    let mut session = Session::start(&kernel, &["--shell"]);
    let prompt = session.wait_for("samepage:/# ", 0, PROMPT_LIMIT);
    assert_eq!(session.local_flags() & (libc::ICANON | libc::ECHO | libc::ISIG), 0, "not in raw mode");

    session.type_keys(b"echo hello-$((6*7)); stty size\r");
    let at = session.wait_for("hello-42", prompt, REPLY_LIMIT);
    let at = session.wait_for(&format!("{ROWS} {COLS}"), at, REPLY_LIMIT);
    // Ctrl-C reaches the guest's foreground job (the host terminal does not turn it into a
    // signal for samepage): without it, the sleep would outlast the reply limit.
    session.type_keys(b"sleep 600\r");
    std::thread::sleep(Duration::from_secs(3));
    session.type_keys(b"\x03");
    let at = session.wait_for("samepage:/# ", at, REPLY_LIMIT);
    session.type_keys(b"echo after-ctrl-c=$?\r");
    let at = session.wait_for("after-ctrl-c=130", at, REPLY_LIMIT);
    session.wait_for("samepage:/# ", at, REPLY_LIMIT);
    session.type_keys(b"exit 7\r");
    let (code, transcript) = session.finish(REPLY_LIMIT);
    let shown = transcript.find("samepage:/# ").map_or(&transcript[..], |start| &transcript[start..]);
    println!("--- shell transcript ---\n{shown}\n--- end ---");
    assert_eq!(code, Some(7), "transcript:\n{transcript}");
    assert!(transcript.contains("verdict: shell exited with status 7"), "{transcript}");
    let restored = session.local_flags();
    assert_eq!(
        restored & (libc::ICANON | libc::ECHO | libc::ISIG),
        libc::ICANON | libc::ECHO | libc::ISIG,
        "terminal not restored"
    );
}

#[test]
fn ctrl_a_x_stops_the_vm_and_restores_the_terminal() {
    // The test guest spins forever without reading input: only the escape can end the run.
    let mut session = Session::start(&test_guest(), &["--shell", "--cmdline", "testguest.mode=spin"]);
    let at = session.wait_for("spin: looping forever", 0, PROMPT_LIMIT);
    assert_eq!(session.local_flags() & libc::ICANON, 0, "the terminal is not in raw mode");
    session.type_keys(b"\x01x");
    let (code, transcript) = session.finish(REPLY_LIMIT);
    println!("{}", transcript.get(at..).unwrap_or_default());
    assert_eq!(code, Some(130), "transcript:\n{transcript}");
    assert!(transcript.contains("stopped by signal 2"), "{transcript}");
    assert_ne!(session.local_flags() & libc::ICANON, 0, "terminal not restored");
}
