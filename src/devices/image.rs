//! The VMM's side of image sharing (`docs/fphash.md`, "Read-only images"): virtio-blk asks to
//! map a read-only image's pages over guest pages it reads into; the VM's dedup domain maps and
//! books them (VMA count and budget, copy-on-write breaks).
//!
//! An image is shared only under a read lease ([`crate::lease`]). When the lease breaks (another
//! process opens the file for writing or truncates it), the VM's event loop pauses its vCPUs,
//! copies every guest page that maps the image into the guest's own memory, stops sharing the
//! image and releases the lease, so the writer goes on and the guest keeps the bytes it read.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use samepage_virtio::block::{Block, ImageMapper};

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

/// A disk whose image the VM shares under a read lease.
struct LeasedImage {
    /// The disk's descriptor, which holds the lease (the device keeps it open).
    fd: RawFd,
    image: ImageId,
    path: PathBuf,
    /// The lease broke and was released: the image is no longer shared.
    released: bool,
}

/// One VM's shared images and their leases.
pub struct ImageLeases {
    inbox: Arc<LeaseInbox>,
    images: Vec<LeasedImage>,
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
        let fd = block.file().as_raw_fd();
        // Routed here before the lease exists: it may break at once.
        self.inbox.register(fd);
        if let Err(e) = lease::take(block.file()) {
            log::warn!(
                "{}: disk {}: its reads are copied, not shared (as with share=off): {}{}",
                self.label,
                path.display(),
                crate::error_chain(&e),
                hint(&e)
            );
            return false;
        }
        let image = match lock(&self.domain).open_image(self.vm, block.file()) {
            Ok(image) => image,
            Err(e) => {
                log::warn!(
                    "{}: disk {}: its reads are copied, not shared: {}",
                    self.label,
                    path.display(),
                    crate::error_chain(&e)
                );
                let _ = lease::release(fd);
                return false;
            }
        };
        block.share_image(Box::new(VmImageMapper::new(self.domain.clone(), self.vm, image)));
        self.images.push(LeasedImage { fd, image, path, released: false });
        true
    }

    /// What the VM's event loop does when a lease breaks; `None` without shared images.
    pub fn into_event(mut self) -> std::io::Result<Option<OnEvent>> {
        if self.images.is_empty() {
            return Ok(None);
        }
        let event = self.inbox.event().try_clone()?;
        Ok(Some(OnEvent { event, action: Box::new(move || self.on_broken()) }))
    }

    /// Gives up every image whose lease broke: with the vCPUs paused, its guest pages are
    /// copied into the VM's own memory; then the lease is released.
    fn on_broken(&mut self) {
        for fd in self.inbox.take() {
            let Some(disk) = self.images.iter_mut().find(|d| d.fd == fd && !d.released) else { continue };
            let started = Instant::now();
            let moved = match self.pause.pause_all() {
                Some(paused) => {
                    let moved = lock(&self.domain).unshare_image(self.vm, disk.image);
                    if moved.is_err() {
                        // Before the vCPUs resume: none may enter the guest again.
                        self.stop.request(VmExit::Crashed {
                            vcpu: 0,
                            reason: CrashReason::ImageUnshare,
                            rip: 0,
                        });
                    }
                    drop(paused);
                    moved.map(Some)
                }
                // The VM is stopping: no vCPU enters the guest again; nothing to copy.
                None => {
                    lock(&self.domain).stop_sharing(disk.image);
                    Ok(None)
                }
            };
            let took = started.elapsed().as_secs_f64() * 1e3;
            match moved {
                Ok(Some(pages)) => log::warn!(
                    "{}: disk {}: the image is being written or truncated by another process: the {pages} \
                     guest pages that mapped it were copied into the VM's own memory ({took:.1} ms), and \
                     its reads are copied from now on",
                    self.label,
                    disk.path.display()
                ),
                Ok(None) => log::warn!(
                    "{}: disk {}: the image is being written or truncated by another process while the \
                     VM stops; no longer shared",
                    self.label,
                    disk.path.display()
                ),
                Err(e) => log::error!(
                    "{}: disk {}: the image is being written or truncated by another process, and {}; \
                     stopping the VM",
                    self.label,
                    disk.path.display(),
                    crate::error_chain(&e)
                ),
            }
            // The writer goes on.
            if let Err(e) = lease::release(fd) {
                log::warn!("{}: disk {}: releasing its lease failed: {e}", self.label, disk.path.display());
            }
            disk.released = true;
        }
    }
}
