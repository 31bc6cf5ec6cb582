//! `samepage boot-test`: boot a kernel, run one command in it, and turn what happened into an
//! exit code a kernel developer's loop can act on (README, "Boot-testing kernels"; the
//! verdict is in [`crate::verdict`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::lock;
use crate::config::{DedupMode, DiskConfig, EmulatedCpl0, SerialConfig, VmConfig};
use crate::console::{ConsoleRecord, ConsoleTap};
use crate::initramfs;
use crate::verdict;
use crate::vmm::{Vm, VmContext, VmStop};

/// Exit code: a kernel panic, oops, `BUG:` or `WARNING:` on the console, or a guest crash.
pub const EXIT_KERNEL_FAILURE: u8 = 255;
/// Exit code: no verdict before `--timeout` (the same as `samepage run`'s).
pub const EXIT_TIMEOUT: u8 = crate::vmm::EXIT_TIMEOUT;
/// Exit code: samepage could not start the VM (bad input).
pub const EXIT_START_FAILED: u8 = 125;
/// Exit code: the command succeeded but KTAP results include failures, or `--expect` never
/// matched.
pub const EXIT_TEST_FAILED: u8 = 1;
/// Parameters boot-test adds: reboot at once on a panic (the console already has it, and a
/// panicked kernel would otherwise sit until the timeout).
const BOOT_TEST_CMDLINE: &str = "panic=-1";

/// One boot test.
#[derive(Debug, Clone)]
pub struct BootTest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Command to run (ignored with `initrd`); default `true`.
    pub exec: Option<String>,
    /// The user's own initramfs instead of the built one.
    pub initrd: Option<PathBuf>,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Give up after this long.
    pub timeout: Duration,
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
}

/// Removes the per-run initramfs when the run ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_failed(message: String) -> u8 {
    eprintln!("samepage: error: {message}");
    EXIT_START_FAILED
}

/// Runs the boot test; returns the process exit code.
pub fn run(test: &BootTest) -> u8 {
    let mut _initramfs_file = None;
    let initrd = match &test.initrd {
        Some(path) => path.clone(),
        None => {
            let path = std::env::temp_dir().join(format!("samepage-boot-test-{}.cpio", std::process::id()));
            let command = test.exec.as_deref().unwrap_or("true");
            if let Err(e) = initramfs::boot_test_initramfs(&test.busybox, command, &path) {
                return start_failed(crate::error_chain(&e));
            }
            _initramfs_file = Some(TempFile(path.clone()));
            if let Some(keep) = &test.save_initramfs {
                if let Err(e) = std::fs::copy(&path, keep) {
                    return start_failed(format!("cannot save the initramfs to {}: {e}", keep.display()));
                }
            }
            path
        }
    };
    let log = match &test.log {
        Some(path) => match File::create(path) {
            Ok(file) => Some(file),
            Err(e) => return start_failed(format!("cannot create log {}: {e}", path.display())),
        },
        None => None,
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
        timeout: Some(test.timeout),
        emulated_cpl0: test.emulated_cpl0,
        dedup: DedupMode::Hinted,
    };
    let context =
        VmContext { console: Some(Box::new(ConsoleTap(record.clone()))), stop, ..VmContext::default() };
    let exit = match Vm::build_in(&config, context).and_then(Vm::run) {
        Ok(exit) => exit,
        Err(e) => return start_failed(crate::error_chain(&e)),
    };
    let mut record = lock(&record);
    record.finish();
    verdict::decide(&exit, &record, test)
}
