//! Shared helpers for the integration tests: run the real `samepage` binary on real KVM and
//! collect what it printed.

pub mod broker_client;
pub mod compaction;
pub mod linux;
pub mod peer;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished samepage run left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// The guest console (serial on stdout).
    pub stdout: String,
    /// samepage's own messages.
    pub stderr: String,
}

impl Run {
    /// Asserts the console has `line` as a whole line.
    pub fn assert_line(&self, line: &str) {
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "expected line {line:?} in console:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }

    /// Asserts samepage did not panic (std's message, or samepage's own panic line).
    pub fn assert_no_panic(&self) {
        let panicked =
            self.stderr.contains("panicked") || self.stderr.contains("samepage: error: panic in thread");
        assert!(!panicked, "samepage panicked:\n{}", self.stderr);
    }
}

/// The name the test harness knows test `name` by, in the module whose `module_path!()` is
/// `module`: its path in the test binary without the binary's crate name (`dedupd::name`), as
/// `--exact` wants it when a test re-runs itself in a child process.
pub fn test_path(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{name}"),
        None => name.to_string(),
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A build artifact the README's test command builds; a missing one fails the test (with the
/// command that builds it) rather than skipping it.
pub fn artifact(relative: &str, built_by: &str) -> PathBuf {
    let path = repo().join(relative);
    assert!(
        path.exists(),
        "{} is missing: build it with {built_by} (the README's test command does)",
        path.display()
    );
    path
}

/// The freestanding test guest.
pub fn test_guest() -> PathBuf {
    artifact("target/test-guest/test-guest.elf", "resources/test-guest/build.sh")
}

/// The samepage binary.
pub fn samepage() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_samepage"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Starts samepage with `args`, stdin from `input` (or nothing).
pub fn spawn(args: &[&str], input: Option<&[u8]>) -> Child {
    let mut child = samepage()
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(bytes).expect("write stdin");
    }
    child
}

/// Waits for a child at most `limit`, killing it if it overstays (a hung VMM fails the test).
/// `stdout` is empty when the caller took the child's standard output.
pub fn finish(mut child: Child, limit: Duration) -> Run {
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let mut out = String::new();
            let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
            panic!("samepage did not finish within {limit:?}; console so far:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    // A caller that reads the console as it comes took standard output already.
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("read stdout");
    }
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    Run { code, stdout, stderr }
}

/// Runs samepage to completion.
pub fn run(args: &[&str], limit: Duration) -> Run {
    finish(spawn(args, None), limit)
}

/// Writes `len` bytes of reproducible pseudo-random data to `path`.
pub fn make_image(path: &Path, len: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data).expect("write image");
}

/// BLAKE3 of a file as the `b3sum` tool prints it (the host's view of a disk).
pub fn b3sum(path: &Path) -> String {
    let out = Command::new("b3sum")
        .arg("--no-names")
        .arg(path)
        .output()
        .expect("run b3sum (Debian package b3sum; scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "b3sum failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/samepage-test-").expect("tempdir")
}

/// Sends signal `num` to a child we started and have not reaped.
pub fn signal(child: &Child, num: i32) {
    // SAFETY: kill on the pid of a child this test started and has not yet waited for.
    let rc = unsafe { libc::kill(child.id() as i32, num) };
    assert_eq!(rc, 0, "kill({}, {num})", child.id());
}

/// The `density-result:` line of a density run (one JSON object), as numbers.
pub fn density_result(stdout: &str) -> std::collections::HashMap<String, i64> {
    let line = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("density-result:"))
        .unwrap_or_else(|| panic!("no density-result line in:\n{stdout}"));
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("density-result is not a JSON object ({e}): {line}"));
    object.into_iter().filter_map(|(k, v)| v.as_i64().map(|v| (k, v))).collect()
}

/// Makes a FIFO (named pipe) at `path`.
pub fn mkfifo(path: &Path) {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Offsets of ELF-64 header and program header fields (System V gABI, "ELF Header" and
/// "Program Header").
pub mod elf {
    /// `e_ident[EI_CLASS]`: 1 for 32-bit, 2 for 64-bit objects.
    pub const EI_CLASS: usize = 4;
    /// `e_machine` (u16).
    pub const E_MACHINE: usize = 18;
    /// `e_phoff` (u64): where the program headers start.
    pub const E_PHOFF: usize = 32;
    /// Size of one ELF-64 program header.
    pub const PHDR_SIZE: usize = 56;
    /// `p_paddr` (u64) within a program header.
    pub const P_PADDR: usize = 24;
    /// `p_memsz` (u64) within a program header.
    pub const P_MEMSZ: usize = 40;

    /// File offset of `field` in program header `index` of the ELF-64 image `bytes`.
    pub fn phdr_field(bytes: &[u8], index: usize, field: usize) -> usize {
        let phoff = u64::from_le_bytes(bytes[E_PHOFF..E_PHOFF + 8].try_into().expect("8 bytes"));
        phoff as usize + index * PHDR_SIZE + field
    }
}

/// Writes a copy of the test guest, changed by `edit`, to `path` (foreign or broken kernels).
pub fn test_guest_variant(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(test_guest()).expect("read test guest");
    edit(&mut bytes);
    std::fs::write(path, bytes).expect("write test guest variant");
}

/// Whole pages of `kernel`'s read-only ELF segments: what each VM booting it maps from the
/// file (`docs/boot.md`, "The kernel held once").
pub fn kernel_read_only_pages(kernel: &Path) -> u64 {
    let mut file = std::fs::File::open(kernel).expect("open the kernel");
    samepage::x86_64::kernel_file::read_only_segments(&mut file)
        .iter()
        .filter_map(|s| s.whole_pages())
        .map(|(_, _, pages)| pages as u64)
        .sum()
}

/// How much longer stress tests run: `SAMEPAGE_STRESS=<factor>` (scripts/stress.sh sets it;
/// 1, the README's test command, when unset).
pub fn stress_factor() -> u64 {
    std::env::var("SAMEPAGE_STRESS").ok().and_then(|v| v.parse().ok()).filter(|&f| f >= 1).unwrap_or(1)
}
