//! The ids of a domain's shared images and the VMA model's keys of their pages (a leaf:
//! the domain keeps the registry, image sharing and giving images up read it).

use std::collections::HashSet;

use super::error::DedupError;
use super::vma::MapKey;

/// A shared image of the domain: one open file of it (one `struct file` in the kernel).
///
/// The kernel joins neighbouring mappings into one VMA only when they map the same open file
/// at continuing offsets, so two descriptors of one image file (the same image attached twice,
/// or by two VMs) are two images here: their pages never continue each other in the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageId(u32);

/// The VMA model's keys of image pages: bit 63 set (store keys never have it), the image in
/// bits 40..63, the page of the file below: keys continue each other only along one open file.
const IMAGE_KEY: MapKey = 1 << 63;
const IMAGE_SHIFT: u32 = 40;
/// Most pages of an image that can be shared (4 PiB).
pub(crate) const MAX_IMAGE_PAGES: u64 = 1 << IMAGE_SHIFT;
/// Most images a domain can tell apart in its keys (bits 40..63).
const MAX_IMAGES: u32 = 1 << (63 - IMAGE_SHIFT);

pub(crate) fn image_key(image: ImageId, file_page: u64) -> MapKey {
    IMAGE_KEY | (MapKey::from(image.0) << IMAGE_SHIFT) | file_page
}

/// Whether the VMA model's `key` is a page of `image`.
pub(crate) fn is_image_key(key: MapKey, image: ImageId) -> bool {
    key & IMAGE_KEY != 0 && (key & !IMAGE_KEY) >> IMAGE_SHIFT == MapKey::from(image.0)
}

/// The images a domain shares.
#[derive(Default)]
pub(crate) struct Images {
    /// Ids handed out so far: ids are never reused, so a key never names two files.
    opened: u32,
    /// Images no longer shared (`Domain::stop_sharing`): their reads are copied.
    pub(crate) unshared: HashSet<ImageId>,
}

impl Images {
    /// A new id for an open image file.
    pub(crate) fn open(&mut self) -> Result<ImageId, DedupError> {
        if self.opened >= MAX_IMAGES {
            return Err(DedupError::TooManyImages(MAX_IMAGES));
        }
        self.opened += 1;
        Ok(ImageId(self.opened - 1))
    }
}
