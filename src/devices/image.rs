//! The VMM's side of image sharing (`docs/fphash.md`, "Read-only images"): virtio-blk asks to
//! map a read-only image's pages over guest pages it reads into; the VM's dedup domain maps and
//! books them (VMA count and budget, copy-on-write breaks).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use samepage_virtio::block::ImageMapper;

use crate::bus::lock;
use crate::dedup::{Domain, ImageId, VmId};

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
