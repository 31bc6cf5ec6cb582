//! `samepage boot-test`: boot a kernel, run one command (or an interactive shell) in it, and
//! turn what happened into an exit code a kernel developer's loop can act on
//! (docs/boot-test.md).
//!
//! Everything only boot-test uses lives under this module: here the run itself; `console`
//! watches the guest console, `ktap` counts KTAP results as `kunit.py parse` does, `verdict`
//! turns both into the exit code, `initramfs` builds the guest's archives and `host_files`
//! the host files it includes. The children share nothing through this module: they use one
//! another, never it.

pub mod console;
pub mod host_files;
pub mod initramfs;
pub mod ktap;
pub mod verdict;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::lock;
use crate::config::{DedupConfig, DiskConfig, EmulatedCpl0, SerialConfig, VmConfig};
use crate::error::VmmError;
use crate::exit_code::Exit;
use crate::stop::VmStop;
use crate::vmm::{Vm, VmContext};
use console::{ConsoleRecord, ConsoleTap};
use host_files::{GuestFiles, IncludeError, IncludeSpec};
use initramfs::InitramfsError;

/// Parameters boot-test adds: reboot at once on a panic (the console already has it, and a
/// panicked kernel would otherwise sit until the timeout).
const BOOT_TEST_CMDLINE: &str = "panic=-1";
/// `--timeout` when none is given with `--exec` (a shell waits for its user instead).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// One boot test.
#[derive(Debug, Clone)]
pub struct BootTest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Command to run (ignored with `initrd`); default `true`.
    pub exec: Option<String>,
    /// An interactive shell on the terminal instead of a command.
    pub shell: bool,
    /// The user's own initramfs instead of the built one.
    pub initrd: Option<PathBuf>,
    /// Host files and directories for the built initramfs.
    pub includes: Vec<IncludeSpec>,
    /// Host binaries for the built initramfs, with their shared libraries.
    pub binaries: Vec<IncludeSpec>,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Give up after this long (`None`: never).
    pub timeout: Option<Duration>,
    /// Whole console log.
    pub log: Option<PathBuf>,
    /// Stop with success when a console line matches.
    pub expect: Option<regex::Regex>,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Emulating-KVM workarounds.
    pub emulated_cpl0: EmulatedCpl0,
    /// busybox for the built initramfs.
    pub busybox: PathBuf,
    /// Also keep the built initramfs here (to rerun the same test elsewhere, e.g. in QEMU).
    pub save_initramfs: Option<PathBuf>,
    /// A virtio-vsock device (`--vsock`).
    pub vsock: Option<crate::config::VsockConfig>,
    /// virtio-net devices (`--net`).
    pub nets: Vec<crate::config::NetConfig>,
}

/// Why a boot test could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootTestError {
    /// The built initramfs.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// `--include`, `--include-binary`.
    #[error(transparent)]
    Include(#[from] IncludeError),
    /// The in-memory file holding the initramfs.
    #[error("cannot hold the initramfs in a memfd")]
    Memfd(#[source] std::io::Error),
    /// `--save-initramfs`.
    #[error("cannot save the initramfs to {path}")]
    SaveInitramfs {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::checked_open::HostFileError,
    },
    /// `--log` could not be opened.
    #[error("cannot open log {path}")]
    Log {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--log` names a FIFO no process reads (opening it would block forever).
    #[error("log {0} is a FIFO that no process has open for reading")]
    LogNoReader(PathBuf),
    /// `--log` names a directory or socket.
    #[error("log {0} is not a regular file, FIFO or character device")]
    LogNotWritable(PathBuf),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmmError),
}

fn start_failed(error: &BootTestError) -> Exit {
    eprintln!("samepage: error: {}", crate::escape_controls(&crate::error_chain(error)));
    Exit::BootTestStartFailed
}

/// Opens `--log` without blocking: a FIFO nobody reads fails at once instead of hanging;
/// regular files, FIFOs with a reader and character devices are accepted.
fn open_log(path: &Path) -> Result<File, BootTestError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENXIO) => BootTestError::LogNoReader(path.into()),
            _ => BootTestError::Log { path: path.into(), source },
        })?;
    let kind =
        file.metadata().map_err(|source| BootTestError::Log { path: path.into(), source })?.file_type();
    if !(kind.is_file() || kind.is_fifo() || kind.is_char_device()) {
        return Err(BootTestError::LogNotWritable(path.into()));
    }
    // Writes block as usual from here: a slow reader must not lose console output.
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory is passed.
    let cleared = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(BootTestError::Log { path: path.into(), source: std::io::Error::last_os_error() });
    }
    Ok(file)
}

/// The host terminal's size, to give the guest shell the same.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data that TIOCGWINSZ fills; the result is checked.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a winsize we own.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// The guest command of `--shell`: an interactive busybox shell with the console as its
/// controlling terminal (job control, Ctrl-C), the host's terminal size and type.
fn shell_command() -> String {
    let mut script = String::new();
    if let Some((rows, cols)) = terminal_size() {
        script.push_str(&format!("stty rows {rows} cols {cols} 2>/dev/null\n"));
    }
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    script.push_str(&format!("export TERM={}\n", term.as_deref().unwrap_or("vt100")));
    script.push_str("export PS1='samepage:\\w\\$ '\n");
    // setsid and cttyhack: a session of its own with the console's real tty (ttyS0) as
    // controlling terminal, so Ctrl-C reaches the foreground job.
    script.push_str("exec setsid cttyhack sh\n");
    script
}

/// The built initramfs (busybox, /init, host files, the command) in a memfd: no file on disk
/// that could be raced, planted or left behind. Returns the memfd and a path that opens it.
fn built_initramfs(test: &BootTest) -> Result<(File, PathBuf), BootTestError> {
    let mut files = GuestFiles::new(test.mem_bytes / 4);
    for spec in &test.includes {
        files.add_spec(spec)?;
    }
    for spec in &test.binaries {
        files.add_binary(spec)?;
    }
    let command =
        if test.shell { shell_command() } else { test.exec.clone().unwrap_or_else(|| "true".into()) };
    let bytes = initramfs::boot_test_initramfs(&test.busybox, &command, &files.into_entries())?;
    if let Some(keep) = &test.save_initramfs {
        // As every output file: never blocking in open(2) on a FIFO.
        crate::checked_open::create_output(keep)
            .and_then(|mut file| Ok(file.write_all(&bytes)?))
            .map_err(|source| BootTestError::SaveInitramfs { path: keep.clone(), source })?;
    }
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"samepage-boot-test-initramfs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BootTestError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let mut memfd = unsafe { File::from_raw_fd(fd) };
    memfd.write_all(&bytes).map_err(BootTestError::Memfd)?;
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    Ok((memfd, path))
}

/// Runs the boot test; returns how the process exits.
pub fn run(test: &BootTest) -> Exit {
    let mut initramfs_memfd = None;
    let initrd = match &test.initrd {
        Some(path) => path.clone(),
        None => match built_initramfs(test) {
            Ok((memfd, path)) => {
                initramfs_memfd = Some(memfd);
                path
            }
            Err(e) => return start_failed(&e),
        },
    };
    let log = match test.log.as_deref().map(open_log).transpose() {
        Ok(log) => log,
        Err(e) => return start_failed(&e),
    };
    let stop = Arc::new(VmStop::new());
    let record = Arc::new(Mutex::new(ConsoleRecord::new(true, log, test.expect.clone(), stop.clone())));
    let config = VmConfig {
        kernel: test.kernel.clone(),
        initrd: Some(initrd),
        cmdline: format!("{BOOT_TEST_CMDLINE} {}", test.cmdline),
        mem_bytes: test.mem_bytes,
        vcpus: test.vcpus,
        disks: test.disks.clone(),
        serial: SerialConfig::None,
        timeout: test.timeout,
        emulated_cpl0: test.emulated_cpl0,
        dedup: DedupConfig::default(),
        balloon: None,
        balloon_socket: None,
        snapshot: None,
        entropy: false,
        vsock: test.vsock.clone(),
        nets: test.nets.clone(),
    };
    let context = VmContext {
        console: Some(Box::new(ConsoleTap(record.clone()))),
        input: test.shell,
        stop,
        ..VmContext::default()
    };
    let vm = match Vm::build_in(&config, context) {
        Ok(vm) => vm,
        Err(e) => return start_failed(&e.into()),
    };
    // The guest has its copy; nothing of the initramfs outlives the build.
    drop(initramfs_memfd);
    if test.shell {
        eprintln!("samepage boot-test: interactive shell; `exit N` ends the run with status N, Ctrl-A x stops the VM");
    }
    let exit = match vm.run() {
        Ok(exit) => exit,
        Err(e) => return start_failed(&e.into()),
    };
    let mut record = lock(&record);
    record.finish();
    let asked = verdict::Asked { log: test.log.as_deref(), expect: test.expect.is_some(), shell: test.shell };
    verdict::decide(&exit, &record, &asked)
}
