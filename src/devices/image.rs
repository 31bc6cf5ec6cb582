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
    /// The domain's id of the image, once known.
    image: Option<ImageId>,
}

impl VmImageMapper {
    /// A mapper into VM `vm` of `domain`.
    pub fn new(domain: Arc<Mutex<Domain>>, vm: VmId) -> VmImageMapper {
        VmImageMapper { domain, vm, image: None }
    }
}

impl ImageMapper for VmImageMapper {
    fn map_image(&mut self, image: &File, gpa: u64, offset: u64, pages: usize) -> usize {
        let mut domain = lock(&self.domain);
        let id = match self.image {
            Some(id) => id,
            None => match domain.image_id(image) {
                Ok(id) => *self.image.insert(id),
                Err(e) => {
                    log::warn!("image sharing off for a disk: {}", crate::error_chain(&e));
                    return 0;
                }
            },
        };
        domain.map_image(self.vm, id, image.as_raw_fd(), gpa, offset, pages)
    }
}
