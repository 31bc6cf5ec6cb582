//! The VMM's side of image sharing (`docs/fphash.md`, "Read-only images"): virtio-blk asks to
//! map a read-only image's pages over guest pages it reads into; the VM's dedup domain maps and
//! books them (VMA count and budget, copy-on-write breaks).
//!
//! An image is shared only under a read lease ([`crate::lease`]). When the lease breaks (another
//! process opens the file for writing or truncates it), the VM's event loop pauses its vCPUs,
//! copies every guest page that maps the image into the guest's own memory, stops sharing the
//! image and releases the lease, so the writer goes on and the guest keeps the bytes it read.
//!
//! A restored VM's RAM maps its snapshot's memory file (`docs/snapshot.md`) and is guarded
//! alike: when that lease breaks, every guest page still mapping the file becomes the guest's
//! own memory with the same bytes before the writer goes on.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use samepage_virtio::block::{Block, ImageMapper};
use vm_memory::GuestMemoryMmap;

use crate::bus::lock;
use crate::dedup::{Domain, ImageId, VmId};
use crate::devices::virtio_mmio::OnEvent;
use crate::lease::{self, LeaseError, LeaseInbox};
use crate::pause::PauseControl;
use crate::stop::{CrashReason, VmExit, VmStop};

/// Maps one disk's image pages into one VM's RAM.
pub struct VmImageMapper {
    domain: Arc<Mutex<Domain>>,
    vm: VmId,
    /// The domain's id of the disk's open image file.
    image: ImageId,
}

impl VmImageMapper {
    /// A mapper of the open image file `image` (from [`Domain::open_image`]) into VM `vm` of
    /// `domain`.
    pub fn new(domain: Arc<Mutex<Domain>>, vm: VmId, image: ImageId) -> VmImageMapper {
        VmImageMapper { domain, vm, image }
    }
}

impl ImageMapper for VmImageMapper {
    fn map_image(&mut self, image: &File, gpa: u64, offset: u64, pages: usize) -> usize {
        lock(&self.domain).map_image(self.vm, self.image, image.as_raw_fd(), gpa, offset, pages)
    }
}

/// What a shared file is to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shared {
    /// A read-only disk's image.
    Disk,
    /// The kernel file its read-only segments map (`super::kernel_image`).
    Kernel,
}

impl Shared {
    /// What happens to the VM's pages of a file that is not (or no longer) shared.
    fn copied(self) -> &'static str {
        match self {
            Shared::Disk => "its reads are copied, not shared (as with share=off)",
            Shared::Kernel => "its read-only segments are copied, not shared",
        }
    }
}

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shared::Disk => "disk",
            Shared::Kernel => "kernel",
        })
    }
}

/// A file whose pages the VM shares under a read lease.
struct LeasedImage {
    /// The file's descriptor, which holds the lease (the disk's device, or `_open`, keeps it
    /// open).
    fd: RawFd,
    image: ImageId,
    path: PathBuf,
    what: Shared,
    /// The file, when nothing else keeps it open (the kernel's): held for the descriptor.
    _open: Option<File>,
    /// The lease broke and was released: the image is no longer shared.
    released: bool,
}

/// The snapshot memory file a restored VM's RAM maps, under a read lease.
struct LeasedSnapshot {
    /// Holds the lease.
    file: File,
    path: PathBuf,
    /// The RAM that maps it.
    mem: GuestMemoryMmap,
    /// The lease broke and was released: no guest page maps the file any more.
    released: bool,
}

/// One VM's shared images and their leases.
pub struct ImageLeases {
    inbox: Arc<LeaseInbox>,
    images: Vec<LeasedImage>,
    snapshot: Option<LeasedSnapshot>,
    domain: Arc<Mutex<Domain>>,
    vm: VmId,
    label: String,
    pause: Arc<PauseControl>,
    stop: Arc<VmStop>,
}

/// What a failed lease means, for the warning.
fn hint(e: &LeaseError) -> &'static str {
    match e {
        LeaseError::SetLease(io) if io.raw_os_error() == Some(libc::EAGAIN) => {
            "; the image is open for writing somewhere"
        }
        LeaseError::SetLease(io) if io.raw_os_error() == Some(libc::EACCES) => {
            "; samepage is not the image's owner and lacks CAP_LEASE"
        }
        _ => "",
    }
}

impl ImageLeases {
    /// No shared images yet, for VM `vm` (named `label`) of `domain`, whose vCPUs `pause`
    /// holds and `stop` stops.
    pub fn new(
        domain: Arc<Mutex<Domain>>,
        vm: VmId,
        label: &str,
        pause: Arc<PauseControl>,
        stop: Arc<VmStop>,
    ) -> std::io::Result<ImageLeases> {
        Ok(ImageLeases {
            inbox: LeaseInbox::new()?,
            images: Vec::new(),
            snapshot: None,
            domain,
            vm,
            label: label.to_string(),
            pause,
            stop,
        })
    }

    /// Shares `block`'s image with the VM under a read lease; where there can be no lease, says
    /// so in one warning and leaves the disk's reads copied (as `share=off`). Returns whether
    /// the image is shared.
    pub fn share(&mut self, block: &mut Block) -> bool {
        let path = block.path().to_path_buf();
        if !block.shareable() {
            log::info!("disk {}: not a regular file; its reads are copied", path.display());
            return false;
        }
        let what = Shared::Disk;
        let Some(image) = self.lease(block.file(), &path, what) else { return false };
        block.share_image(Box::new(VmImageMapper::new(self.domain.clone(), self.vm, image)));
        let fd = block.file().as_raw_fd();
        self.images.push(LeasedImage { fd, image, path, what, _open: None, released: false });
        true
    }

    /// Takes a read lease on `file` (at `path`) and gives it an image id in the VM's domain;
    /// where either fails, says so in one message and returns `None` (the caller copies).
    pub(super) fn lease(&mut self, file: &File, path: &Path, what: Shared) -> Option<ImageId> {
        let fd = file.as_raw_fd();
        // Routed here before the lease exists: it may break at once.
        self.inbox.register(fd);
        if let Err(e) = lease::take(file) {
            let level = if what == Shared::Disk { log::Level::Warn } else { log::Level::Info };
            log::log!(
                level,
                "{}: {what} {}: {}: {}{}",
                self.label,
                path.display(),
                what.copied(),
                crate::error_chain(&e),
                hint(&e)
            );
            return None;
        }
        let mut domain = lock(&self.domain);
        let opened = match what {
            Shared::Disk => domain.open_image(self.vm, file),
            Shared::Kernel => domain.open_kernel_image(self.vm, file),
        };
        drop(domain);
        match opened {
            Ok(image) => Some(image),
            Err(e) => {
                log::warn!(
                    "{}: {what} {}: {}: {}",
                    self.label,
                    path.display(),
                    what.copied(),
                    crate::error_chain(&e)
                );
                let _ = lease::release(fd);
                None
            }
        }
    }

    /// Keeps `file`, leased as `image` by [`ImageLeases::lease`], open for as long as the VM
    /// runs, and gives it up like a disk's image when its lease breaks.
    pub(super) fn keep(&mut self, file: File, image: ImageId, path: &Path, what: Shared) {
        let fd = file.as_raw_fd();
        self.images.push(LeasedImage {
            fd,
            image,
            path: path.to_path_buf(),
            what,
            _open: Some(file),
            released: false,
        });
    }

    /// The VM's dedup domain.
    pub(super) fn domain(&self) -> Arc<Mutex<Domain>> {
        self.domain.clone()
    }

    /// The VM's id in its domain.
    pub(super) fn vm(&self) -> VmId {
        self.vm
    }

    /// Guards `mem`, which maps the snapshot memory file `memory` (at `path`), with a read
    /// lease: another process that opens the file for writing or truncates it waits until the
    /// guest pages that map it were copied into the VM's own memory. Where there can be no
    /// lease, says so in one warning (the clone then depends on nobody changing the file).
    pub fn guard_snapshot_memory(
        &mut self,
        memory: &File,
        path: &Path,
        opened: (u64, i128),
        mem: &GuestMemoryMmap,
    ) -> std::io::Result<()> {
        let file = memory.try_clone()?;
        self.inbox.register(file.as_raw_fd());
        if crate::fault::injected("snapshot-written-before-lease") {
            rewrite_first_byte(path)?;
        }
        let leased = lease::take(&file);
        // Between its opening (checked then) and the lease, the file was not guarded: a
        // writer there changed the RAM this VM maps. With the lease held, no later one can
        // without the copy above; the VM has not run yet, so it simply does not start.
        let now = crate::snapshot::file_identity(&file.metadata()?);
        if now != opened {
            return Err(std::io::Error::other(format!(
                "{} changed while the VM was being restored from it (size or modification time): its RAM would not be the snapshot's",
                path.display()
            )));
        }
        if let Err(e) = leased {
            log::warn!(
                "{}: snapshot memory {}: no lease, so a process that writes or truncates it changes \
                 this VM's RAM under it: {}{}",
                self.label,
                path.display(),
                crate::error_chain(&e),
                hint(&e)
            );
            return Ok(());
        }
        self.snapshot =
            Some(LeasedSnapshot { file, path: path.to_path_buf(), mem: mem.clone(), released: false });
        Ok(())
    }

    /// What the VM's event loop does when a lease breaks; `None` without shared images.
    pub fn into_event(mut self) -> std::io::Result<Option<OnEvent>> {
        if self.images.is_empty() && self.snapshot.is_none() {
            return Ok(None);
        }
        let event = self.inbox.event().try_clone()?;
        Ok(Some(OnEvent { event, action: Box::new(move || self.on_broken()) }))
    }

    /// Gives up every image whose lease broke: with the vCPUs paused, its guest pages are
    /// copied into the VM's own memory; then the lease is released.
    fn on_broken(&mut self) {
        for fd in self.inbox.take() {
            if self.snapshot.as_ref().is_some_and(|s| s.file.as_raw_fd() == fd) {
                self.snapshot_broken();
                continue;
            }
            let Some(file) = self.images.iter_mut().find(|d| d.fd == fd && !d.released) else { continue };
            let started = Instant::now();
            let (domain, vm, image) = (&self.domain, self.vm, file.image);
            let moved = copy_paused(&self.pause, &self.stop, CrashReason::ImageUnshare, || {
                lock(domain).unshare_image(vm, image)
            });
            if let Ok(None) = moved {
                lock(&self.domain).stop_sharing(file.image);
            }
            let took = started.elapsed().as_secs_f64() * 1e3;
            match moved {
                Ok(Some(pages)) => log::warn!(
                    "{}: {} {}: the file is being written or truncated by another process: the {pages} \
                     guest pages that mapped it were copied into the VM's own memory ({took:.1} ms){}",
                    self.label,
                    file.what,
                    file.path.display(),
                    if file.what == Shared::Disk { ", and its reads are copied from now on" } else { "" }
                ),
                Ok(None) => log::warn!(
                    "{}: {} {}: the file is being written or truncated by another process while the \
                     VM stops; no longer shared",
                    self.label,
                    file.what,
                    file.path.display()
                ),
                Err(e) => log::error!(
                    "{}: {} {}: the file is being written or truncated by another process, and {}; \
                     stopping the VM",
                    self.label,
                    file.what,
                    file.path.display(),
                    crate::error_chain(&e)
                ),
            }
            // The writer goes on.
            if let Err(e) = lease::release(fd) {
                log::warn!(
                    "{}: {} {}: releasing its lease failed: {e}",
                    self.label,
                    file.what,
                    file.path.display()
                );
            }
            file.released = true;
        }
    }

    /// The snapshot memory file's lease broke: with the vCPUs paused, every guest page still
    /// mapping it becomes the VM's own; then the writer goes on.
    fn snapshot_broken(&mut self) {
        let Some(snapshot) = self.snapshot.as_mut().filter(|s| !s.released) else { return };
        let started = Instant::now();
        let copied = copy_paused(&self.pause, &self.stop, CrashReason::SnapshotUnshare, || {
            crate::memory::copy_file_pages_to_anonymous(&snapshot.mem, &snapshot.file)
        });
        let took = started.elapsed().as_secs_f64() * 1e3;
        let path = snapshot.path.display();
        match copied {
            Ok(Some(bytes)) => log::warn!(
                "{}: snapshot memory {path}: the file is being written or truncated by another process: \
                 the {:.1} MiB of guest RAM that mapped it were copied into the VM's own memory ({took:.1} ms)",
                self.label,
                bytes as f64 / f64::from(1u32 << 20)
            ),
            Ok(None) => log::warn!(
                "{}: snapshot memory {path}: the file is being written or truncated by another process \
                 while the VM stops",
                self.label
            ),
            Err(e) => log::error!(
                "{}: snapshot memory {path}: the file is being written or truncated by another process, \
                 and its pages could not be copied ({e}); stopping the VM",
                self.label
            ),
        }
        if let Err(e) = lease::release(snapshot.file.as_raw_fd()) {
            log::warn!("{}: snapshot memory {path}: releasing its lease failed: {e}", self.label);
        }
        snapshot.released = true;
    }
}

/// Runs `copy` (guest pages that map a file whose lease broke, copied into the VM's own memory)
/// with the VM's vCPUs paused. A failed copy stops the VM before they resume: running on, the
/// guest would see the file change under it, or fault. `None`: the VM is stopping, no vCPU
/// enters the guest again, and nothing was copied.
fn copy_paused<T, E>(
    pause: &PauseControl,
    stop: &VmStop,
    reason: CrashReason,
    copy: impl FnOnce() -> Result<T, E>,
) -> Result<Option<T>, E> {
    let Some(_paused) = pause.pause_all() else { return Ok(None) };
    let copied = copy();
    if copied.is_err() {
        stop.request(VmExit::Crashed { vcpu: 0, reason, rip: 0 });
    }
    copied.map(Some)
}

/// Fault injection (`snapshot-written-before-lease`): writes the first byte of `path` back
/// unchanged, which moves its modification time.
fn rewrite_first_byte(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 0)?;
    std::thread::sleep(std::time::Duration::from_millis(10));
    file.write_all_at(&byte, 0)
}
