//! Taking a snapshot of a running VM (docs/snapshot.md, "Taking a snapshot"), on the VMM
//! thread: vCPUs paused and each saved by its own thread, every transport locked so no device
//! is inside a request, then the state and RAM written, and the VM let go on.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use samepage_virtio::MmioTransport;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::state::{HostIdentity, Machine, RamSpan, SnapshotState, FORMAT, VERSION};
use super::vcpu_saves::VcpuSaves;
use super::{io, SnapshotError, SnapshotFiles};
use crate::bus::lock;
use crate::devices::serial::SerialConsole;
use crate::pause::PauseControl;
use crate::x86_64::vm_state::VmState;

/// How long the vCPU threads may take to save their vCPUs.
const SAVE_WAIT: Duration = Duration::from_secs(5);
/// Guest RAM is written in runs of non-zero pages; zero pages stay holes in the file.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// What a snapshot reads from the running VM.
pub struct Sources<'a> {
    /// The VM.
    pub vm: &'a VmFd,
    /// Its RAM.
    pub mem: &'a GuestMemoryMmap,
    /// Its pause switch.
    pub pause: &'a PauseControl,
    /// Where its vCPU threads save their vCPUs.
    pub saves: &'a VcpuSaves,
    /// COM1.
    pub serial: &'a Mutex<SerialConsole>,
    /// Its virtio transports, in the layout's order.
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    /// Its hardware.
    pub machine: &'a Machine,
    /// This host.
    pub host: &'a HostIdentity,
}

/// A snapshot written.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    /// How long the guest stood still.
    pub paused: Duration,
    /// Bytes of guest RAM written (zero pages are holes).
    pub ram_written: u64,
}

/// Pauses the VM, writes its snapshot to `files` (in existing directories; an older snapshot
/// there is replaced) and lets it go on.
pub fn take(sources: &Sources<'_>, files: &SnapshotFiles) -> Result<Taken, SnapshotError> {
    let started = Instant::now();
    let guard = sources.pause.pause_all().ok_or(SnapshotError::Stopping)?;
    sources.saves.clear();
    guard.run_errand();
    let vcpus = sources.saves.wait_all(Instant::now() + SAVE_WAIT).map_err(SnapshotError::Vcpu)?;
    // Held until RAM is written: a device finishing a request now would change the rings.
    let transports: Vec<_> = sources.transports.iter().map(|t| lock(t)).collect();
    let devices = transports.iter().map(|t| t.save_state()).collect();
    let serial = lock(sources.serial).save_state();
    let vm = VmState::save(sources.vm).map_err(SnapshotError::VmState)?;
    let (ram, ram_written) = write_memory(sources.mem, files)?;
    let state = SnapshotState {
        format: FORMAT.into(),
        version: VERSION,
        samepage: env!("CARGO_PKG_VERSION").into(),
        host: sources.host.clone(),
        machine: sources.machine.clone(),
        ram,
        vcpus,
        vm,
        serial,
        devices,
    };
    write_state(&state, &files.state)?;
    drop(transports);
    drop(guard);
    Ok(Taken { paused: started.elapsed(), ram_written })
}

/// Writes guest RAM region after region into `files.memory` (the old state is moved aside
/// first, so a state file never pairs with RAM it does not describe), as a new file.
fn write_memory(mem: &GuestMemoryMmap, files: &SnapshotFiles) -> Result<(Vec<RamSpan>, u64), SnapshotError> {
    let state_path = &files.state;
    if state_path.exists() {
        let aside = with_suffix(state_path, ".previous");
        std::fs::rename(state_path, &aside).map_err(io("move aside", state_path))?;
    }
    // A new file renamed over the old: VMs restored from the old one keep mapping its inode,
    // which must not change under them.
    let path = with_suffix(&files.memory, ".partial");
    let file = create(&path)?;
    let (mut spans, mut offset, mut written) = (Vec::new(), 0u64, 0u64);
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes that `mem` owns. The vCPUs are
        // parked and every device is locked, so nothing writes guest RAM while it is read; the
        // merge engine may map another copy of a page's same content over it meanwhile, which
        // changes no byte read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        written += write_nonzero_runs(&file, bytes, offset).map_err(io("write", &path))?;
        spans.push(RamSpan { gpa: region.start_addr().0, len: len as u64, offset });
        offset += len as u64;
    }
    file.set_len(offset).map_err(io("size", &path))?;
    file.sync_data().map_err(io("flush", &path))?;
    std::fs::rename(&path, &files.memory).map_err(io("rename", &path))?;
    Ok((spans, written))
}

/// `path` with `suffix` added to its file name (a file beside it).
fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    name.into()
}

/// Writes the non-zero pages of `bytes` at `offset` in `file`, in runs; returns bytes written.
fn write_nonzero_runs(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<u64> {
    let (mut written, mut run_start) = (0u64, None);
    let pages = bytes.len().div_ceil(PAGE);
    for page in 0..=pages {
        let nonzero = page < pages && {
            let chunk = &bytes[page * PAGE..((page + 1) * PAGE).min(bytes.len())];
            // A slice comparison is one memcmp, fast in any build.
            chunk != &ZERO_PAGE[..chunk.len()]
        };
        match (nonzero, run_start) {
            (true, None) => run_start = Some(page),
            (false, Some(start)) => {
                let run = &bytes[start * PAGE..(page * PAGE).min(bytes.len())];
                file.write_all_at(run, offset + (start * PAGE) as u64)?;
                written += run.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

fn write_state(state: &SnapshotState, path: &Path) -> Result<(), SnapshotError> {
    let temporary = with_suffix(path, ".partial");
    let text = serde_json::to_vec(state).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let mut file = create(&temporary)?;
    file.write_all(&text).map_err(io("write", &temporary))?;
    file.sync_data().map_err(io("flush", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("rename", &temporary))
}

/// A snapshot file, readable by its owner only: it holds the guest's memory and registers.
/// Opened without blocking and refused unless it is a regular file: a client names these paths
/// (`PUT /snapshot/create`), and a FIFO there would hang the VMM thread in `open`, a device
/// would take the guest's memory.
fn create(path: &Path) -> Result<File, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io("create", path))?;
    let regular = file.metadata().map_err(io("look at", path))?.is_file();
    if !regular {
        return Err(SnapshotError::Invalid(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_device_named_as_a_snapshot_file_is_refused_without_waiting() {
        let dir = std::env::temp_dir().join(format!("samepage-snapshot-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let fifo = dir.join("state.fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("path")).expect("path");
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No reader: a plain open for writing would wait forever.
        assert!(create(&fifo).is_err());
        assert!(create(Path::new("/dev/null")).unwrap_err().to_string().contains("not a regular file"));
        assert!(create(&dir.join("ok")).is_ok());
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn zero_pages_stay_holes_and_the_rest_lands_where_it_was() {
        let dir = std::env::temp_dir().join(format!("samepage-snapshot-runs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("memory");
        let file = create(&path).expect("create");
        let mut bytes = vec![0u8; 6 * PAGE];
        bytes[PAGE + 5] = 1;
        bytes[2 * PAGE] = 2;
        bytes[5 * PAGE + PAGE - 1] = 3;
        let written = write_nonzero_runs(&file, &bytes, PAGE as u64).expect("write");
        file.set_len(7 * PAGE as u64).expect("size");
        assert_eq!(written, 3 * PAGE as u64);
        let back = std::fs::read(&path).expect("read");
        assert_eq!(&back[PAGE..], &bytes[..]);
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
