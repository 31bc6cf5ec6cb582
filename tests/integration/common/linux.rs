//! The project's Linux guest in tests that talk to it while it runs: its kernel and
//! initramfs, ext4 images of test files, a `samepage run` whose console the test reads line by
//! line and answers through standard input, and the host-side views (SHA-256, the VMM
//! process's smaps and pagemap) the tests compare with what the guest says.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{artifact, samepage, Run};

/// The patched guest kernel and its initramfs, as the README's test command builds them.
pub fn kernel_and_initrd() -> (PathBuf, PathBuf) {
    (
        artifact("target/guest/vmlinux", "resources/guest/build.sh"),
        artifact("target/guest/initramfs.cpio", "resources/guest/mkinitramfs.sh"),
    )
}

/// An ext4 image of `size` (mkfs.ext4 notation, e.g. "16M") holding the files of `dir`, with
/// 4 KiB blocks so that file pages lie at 4 KiB-aligned image offsets (mkfs picks 1 KiB
/// blocks for small images, and a read of such a file could not map the image's pages).
pub fn make_ext4(dir: &Path, image: &Path, size: &str) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-b", "4096", "-d"])
        .arg(dir)
        .arg(image)
        .arg(size)
        .output()
        .expect("run mkfs.ext4 (Debian package e2fsprogs; scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The host's SHA-256 of `bytes`, as `sha256sum` prints it.
pub fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().expect("stdin").write_all(bytes).expect("feed sha256sum");
    let out = child.wait_with_output().expect("wait for sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().expect("a hash").to_string()
}

/// The hash of the first `sha256sum` line (`<hex>  <name>`) of `console` for `name`.
pub fn guest_sha256(console: &str, name: &str) -> Option<String> {
    console.lines().find_map(|l| {
        let (hash, file) = l.trim().split_once("  ")?;
        (hash.len() == 64 && file == name).then(|| hash.to_string())
    })
}

/// `key=value` pairs (numbers) of a line, e.g. the guest's counter lines.
pub fn numbers(line: &str) -> std::collections::BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// A `samepage run` whose console the test reads while it runs and whose standard input it
/// writes (the guest's console input; with `--hold-until-eof`, also what keeps the stopped
/// VM's memory until the test is done). Killed on drop if the test did not finish it.
pub struct LiveVm {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    finished: bool,
}

/// Appends everything `from` yields to `into`, until it ends.
fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().expect("console lock").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

impl LiveVm {
    /// Starts `samepage run` with `args`.
    pub fn start(args: &[&str]) -> LiveVm {
        let mut child = samepage()
            .arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage run");
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), console.clone()),
            collect(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        let stdin = child.stdin.take();
        LiveVm { child, stdin, console, stderr, readers, finished: false }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    /// The first console line that starts with `prefix`, waiting for it at most `limit`; fails
    /// the test when it does not come or the VMM ends first.
    pub fn wait_for_line(&mut self, prefix: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let console = self.console();
            // Whole lines only: the guest writes its console a byte at a time, and a line still
            // being written would lack its last figures.
            let whole = console.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(line) = whole.map(str::trim).find(|l| l.starts_with(prefix)) {
                return line.to_string();
            }
            let ended = self.child.try_wait().expect("wait").is_some();
            assert!(
                !ended && start.elapsed() < limit,
                "no console line {prefix:?} {}; console:\n{console}\nstderr:\n{}",
                if ended { "before samepage ended" } else { "in time" },
                self.stderr.lock().expect("stderr lock")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes `line` and a newline to the guest's console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(format!("{line}\n").as_bytes()).expect("write to the console");
        stdin.flush().expect("flush the console");
    }

    /// Closes standard input (ending `--hold-until-eof`) and waits at most `limit` for the
    /// VMM to end.
    pub fn finish(mut self, limit: Duration) -> Run {
        drop(self.stdin.take());
        let start = Instant::now();
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status.code();
            }
            assert!(start.elapsed() < limit, "samepage did not end within {limit:?}:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(50));
        };
        self.finished = true;
        for reader in self.readers.drain(..) {
            reader.join().expect("console reader");
        }
        let stderr = self.stderr.lock().expect("stderr lock").clone();
        Run { code, stdout: self.console(), stderr }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `--metrics` file's JSON object, once one has been written.
pub fn read_metrics(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// A number in a metrics object (`pointer` as in `/dedup/store_pages`); fails the test when
/// it is missing.
pub fn metric(metrics: &serde_json::Value, pointer: &str) -> u64 {
    metrics
        .pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in the metrics: {metrics}"))
}

/// Memory of a process's mappings of one file, from `/proc/PID/smaps` and `/proc/PID/pagemap`.
#[derive(Debug, Default)]
pub struct FileMappings {
    /// Mappings (VMAs) of the file.
    pub vmas: usize,
    /// Their `Rss`, `Shared_Clean` and `Anonymous` (copied-on-write pages), in bytes.
    pub rss: u64,
    pub shared_clean: u64,
    pub anonymous: u64,
    /// Host page frames of their present pages that still are the file's (not copies).
    pub pfns: BTreeSet<u64>,
}

/// pagemap entry bits (`Documentation/admin-guide/mm/pagemap.rst`).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_PFN: u64 = (1 << 55) - 1;

/// The page frames of the present file pages of `[start, end)` in process `pid`.
pub fn file_pfns(pid: u32, start: u64, end: u64) -> BTreeSet<u64> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("open pagemap");
    let pages = ((end - start) / 4096) as usize;
    let mut buf = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut buf, start / 4096 * 8).expect("read pagemap");
    buf.chunks_exact(8)
        .map(|e| u64::from_ne_bytes(e.try_into().expect("8 bytes")))
        .filter(|e| e & PM_PRESENT != 0 && e & PM_FILE != 0)
        .map(|e| e & PM_PFN)
        .collect()
}

/// What process `pid` maps of `file` (a canonical path).
pub fn file_mappings(pid: u32, file: &Path) -> FileMappings {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let file = file.to_str().expect("path");
    let mut found = FileMappings::default();
    let mut inside = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // A VMA's header: range, perms, offset, device, inode, path.
            inside = line.ends_with(file) && words.nth(4) == Some(file);
            if inside {
                let start = u64::from_str_radix(start, 16).expect("VMA start");
                let end = u64::from_str_radix(end, 16).expect("VMA end");
                found.vmas += 1;
                found.pfns.extend(file_pfns(pid, start, end));
            }
            continue;
        }
        let kib = words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match first {
            "Rss:" if inside => found.rss += kib,
            "Shared_Clean:" if inside => found.shared_clean += kib,
            "Anonymous:" if inside => found.anonymous += kib,
            _ => {}
        }
    }
    found
}
