//! The guest program of the vsock and network tests, `resources/guest/programs/socket_peer.c`
//! (built here with the host's gcc, added with `boot-test --include-binary`), the byte pattern
//! and hash both ends use, and a `boot-test` run of the networking guest whose console the test
//! reads line by line while it plays the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{artifact, repo, samepage};

/// The pattern both ends send (`socket_peer.c`'s): not periodic within the tests' sizes, so a
/// chunk delivered twice or out of order changes the hash.
pub fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| ((i * 7 + 13 + (i >> 8) * 3 + (i >> 16)) & 0xff) as u8).collect()
}

/// FNV-1a 64 of `bytes`, from `h`.
pub fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// FNV-1a's start.
pub const FNV_START: u64 = 0xcbf29ce484222325;

/// `got <bytes> <hash>` for `bytes` of the pattern: what a receiving end answers.
pub fn expected_answer(bytes: usize) -> String {
    format!("got {bytes} {:016x}", fnv(FNV_START, &pattern(0, bytes)))
}

/// Reads `stream` to its end, at most `chunk` bytes a read with `pause` after each (a slow
/// reader when not zero), and answers `got <bytes> <hash>` as the guest program's servers do;
/// (bytes, hash).
pub fn receive_and_answer(stream: &mut (impl Read + Write), chunk: usize, pause: Duration) -> (usize, u64) {
    let (mut total, mut h) = (0usize, FNV_START);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = stream.read(&mut buf).expect("read from the guest");
        if n == 0 {
            break;
        }
        h = fnv(h, &buf[..n]);
        total += n;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    stream.write_all(format!("got {total} {h:016x}\n").as_bytes()).expect("answer");
    (total, h)
}

/// The kernel with networking (sockets, IPv4, virtio-vsock, virtio-net).
pub fn net_kernel() -> PathBuf {
    artifact("target/guest-net/vmlinux", "resources/guest/build-test-kernels.sh")
}

/// Builds the guest program into `dir`.
pub fn build_peer(dir: &Path) -> PathBuf {
    let source = repo().join("resources/guest/programs/socket_peer.c");
    let binary = dir.join("socket_peer");
    let out =
        Command::new("gcc").args(["-O2", "-Wall", "-o"]).arg(&binary).arg(&source).output().expect("run gcc");
    assert!(out.status.success(), "gcc failed: {}", String::from_utf8_lossy(&out.stderr));
    binary
}

/// A `boot-test` of the networking guest running `script` with the program at
/// `/opt/socket_peer`; the VMM logs its devices' counters when it stops.
pub struct GuestRun {
    child: Child,
    lines: mpsc::Receiver<String>,
    console: JoinHandle<Vec<String>>,
    errors: JoinHandle<String>,
    start: Instant,
}

/// What a finished run left.
pub struct Finished {
    /// The exit status of `boot-test`.
    pub status: ExitStatus,
    /// The guest's console.
    pub console: String,
    /// samepage's log.
    pub stderr: String,
}

impl GuestRun {
    /// Starts it with the device options `devices` (`--vsock ...`, `--net ...`).
    pub fn start(peer: &Path, script: &str, devices: &[&str]) -> GuestRun {
        let include = format!("{}:/opt/socket_peer", peer.display());
        let mut child = samepage()
            .env("SAMEPAGE_CACHE_DIR", repo().join("target/boot-test-cache"))
            .env("RUST_LOG", "warn,samepage::vmm=info")
            .args(["boot-test", "--kernel", net_kernel().to_str().expect("path"), "--timeout", "540"])
            .args(devices)
            .args(["--include-binary", &include, "--exec", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage boot-test");
        let (lines_tx, lines) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let console = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line.clone());
                all.push(line);
            }
            all
        });
        let stderr = child.stderr.take().expect("stderr");
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        GuestRun { child, lines, console, errors, start: Instant::now() }
    }

    /// Waits until a console line holds `text`; the time since the start.
    pub fn wait_for(&self, text: &str, limit: Duration) -> Duration {
        loop {
            let left = limit.saturating_sub(self.start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return self.start.elapsed(),
                Ok(_) => {}
                Err(e) => panic!("the guest never printed {text:?} ({e})"),
            }
        }
    }

    /// Waits for the end.
    pub fn finish(mut self) -> Finished {
        let status = self.child.wait().expect("boot-test");
        Finished {
            status,
            console: self.console.join().expect("console").join("\n"),
            stderr: self.errors.join().expect("stderr"),
        }
    }
}

/// The number just before `after` in `line` (a counter in a log line).
pub fn figure(line: &str, after: &str) -> u64 {
    let at = line.find(after).unwrap_or_else(|| panic!("no {after:?} in {line}"));
    let token = line[..at].split_whitespace().last().unwrap_or_default();
    token.trim_start_matches('(').parse().unwrap_or_else(|_| panic!("{token:?} before {after:?}"))
}
