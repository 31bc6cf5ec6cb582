//! The ids of a domain's shared images and the VMA model's keys of their pages (a leaf:
//! the domain keeps the registry, image sharing and giving images up read it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;

use super::error::DedupError;
use super::vma::MapKey;
use super::words::{PageHash, VmId, PAGE_SIZE};

/// Most file pages whose hash a domain remembers (about 56 MiB of entries).
const MAX_FILE_HASHES: usize = 1 << 20;
/// The largest folio the page cache keeps a file page in (a PMD: 2 MiB on x86_64).
const FOLIO_SPAN: u64 = 2 << 20;
/// How many refreshes in a row ask for a block of given-back pages to go.
const GIVE_BACK_TRIES: u32 = 5;
/// Most blocks waiting to be asked for (beyond, a block given back is not asked for: its
/// pages stay cached until the host needs the memory, as any clean page cache does).
const MAX_GIVE_BACK_BLOCKS: usize = 1 << 16;

/// A shared image of the domain: one open file of it (one `struct file` in the kernel).
///
/// The kernel joins neighbouring mappings into one VMA only when they map the same open file
/// at continuing offsets, so two descriptors of one image file (the same image attached twice,
/// or by two VMs) are two images here: their pages never continue each other in the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(u32);

/// The aligned block of [`FOLIO_SPAN`] bytes that page `page` of a file lies in: the most the
/// page cache may keep together with it in one folio.
pub(crate) fn folio_block(page: u64) -> u64 {
    page * PAGE_SIZE as u64 / FOLIO_SPAN
}

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

/// The image and file page of an image page's key, if `key` is one.
pub(crate) fn image_page_of_key(key: MapKey) -> Option<(ImageId, u64)> {
    (key & IMAGE_KEY != 0)
        .then_some((ImageId(((key & !IMAGE_KEY) >> IMAGE_SHIFT) as u32), key & (MAX_IMAGE_PAGES - 1)))
}

/// Whether the VMA model's `key` is a page of `image`.
pub(crate) fn is_image_key(key: MapKey, image: ImageId) -> bool {
    key & IMAGE_KEY != 0 && (key & !IMAGE_KEY) >> IMAGE_SHIFT == MapKey::from(image.0)
}

/// An open image file: the VM whose disk opened it, its descriptor (the disk's, open as long
/// as the VM is registered) and which file it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ImageFile {
    pub(crate) vm: VmId,
    pub(crate) fd: RawFd,
    /// Device and inode: the same file opened twice (or by two VMs) has one content.
    pub(crate) file: (u64, u64),
}

/// The images a domain shares.
#[derive(Default)]
pub(crate) struct Images {
    /// Ids handed out so far: ids are never reused, so a key never names two files.
    opened: u32,
    /// The open files, by id (while their VM is registered).
    pub(crate) files: HashMap<ImageId, ImageFile>,
    /// Images no longer shared (`Domain::stop_sharing`): their reads are copied.
    pub(crate) unshared: HashSet<ImageId>,
    /// Images that are a VM's kernel file (`Domain::open_kernel_image`), not a disk's.
    pub(crate) kernels: HashSet<ImageId>,
    /// Hashes of file pages this process computed, by (device, inode, page): a page of the
    /// same file reported again (by another VM, or the same one) needs no second hash. A
    /// file's entries go when any of its images is given up (its content may change then).
    hashes: HashMap<(u64, u64, u64), PageHash>,
    /// Page-cache blocks ([`folio_block`]) of images in which pages were given back lately, and
    /// how many more refreshes ask for them to go: a page still mapped, dirty or held in a
    /// CPU's LRU cache stays until a later ask.
    given_back: BTreeMap<(ImageId, u64), GiveBack>,
    /// The blocks of `given_back` not asked for since a page of theirs was given back: what
    /// the end of a merge batch asks for, without walking every block given back lately.
    fresh: Vec<(ImageId, u64)>,
}

/// A block of given-back pages waiting for its page cache to go.
struct GiveBack {
    /// Refreshes that will still ask for it.
    tries_left: u32,
    /// Whether it was asked for since its last page was given back.
    asked: bool,
}

impl Images {
    /// A new id for `file`, which `vm`'s disk opened and keeps open while `vm` is registered.
    pub(crate) fn open(&mut self, vm: VmId, file: &File) -> Result<ImageId, DedupError> {
        if self.opened >= MAX_IMAGES {
            return Err(DedupError::TooManyImages(MAX_IMAGES));
        }
        let meta = file.metadata().map_err(DedupError::Stat)?;
        let id = ImageId(self.opened);
        self.opened += 1;
        self.files.insert(id, ImageFile { vm, fd: file.as_raw_fd(), file: (meta.dev(), meta.ino()) });
        Ok(id)
    }

    /// Forgets the files of a VM that leaves.
    pub(crate) fn close_vm(&mut self, vm: VmId) {
        self.files.retain(|_, f| f.vm != vm);
        let files = &self.files;
        self.kernels.retain(|id| files.contains_key(id));
    }

    /// Whether the VMA model's `key` is a page of a kernel file.
    pub(crate) fn is_kernel_key(&self, key: MapKey) -> bool {
        image_page_of_key(key).is_some_and(|(image, _)| self.kernels.contains(&image))
    }

    /// The hash of page `page` of `image`, if this process computed it.
    pub(crate) fn hash_of(&self, image: ImageId, page: u64) -> Option<PageHash> {
        let (dev, ino) = self.files.get(&image)?.file;
        self.hashes.get(&(dev, ino, page)).copied()
    }

    /// Remembers the hash of page `page` of `image` (computed from its bytes here).
    pub(crate) fn remember(&mut self, image: ImageId, page: u64, hash: PageHash) {
        if self.hashes.len() >= MAX_FILE_HASHES {
            return;
        }
        if let Some(f) = self.files.get(&image) {
            self.hashes.insert((f.file.0, f.file.1, page), hash);
        }
    }

    /// Page `page` of `image` is mapped by no guest page of this VM any more: its page cache
    /// page is to be given back ([`Images::drop_fresh_given_back`], [`Images::drop_given_back`]).
    pub(crate) fn give_back(&mut self, image: ImageId, page: u64) {
        let block = (image, folio_block(page));
        if self.given_back.len() < MAX_GIVE_BACK_BLOCKS || self.given_back.contains_key(&block) {
            let old = self.given_back.insert(block, GiveBack { tries_left: GIVE_BACK_TRIES, asked: false });
            if old.is_none_or(|g| g.asked) {
                self.fresh.push(block);
            }
        }
    }

    /// Asks the kernel to drop the page cache of the blocks with pages given back since the
    /// last ask (at the end of a merge batch): each block once, however many of its pages the
    /// batch gave back, since an ask that finds a folio still mapped costs about 90 µs of CPU
    /// here (the kernel drains every CPU's LRU cache) and a guest's pages lie scattered.
    pub(crate) fn drop_fresh_given_back(&mut self) {
        for (image, block) in std::mem::take(&mut self.fresh) {
            self.drop_cached(image, block);
            if let Some(g) = self.given_back.get_mut(&(image, block)) {
                g.asked = true;
            }
        }
    }

    /// Asks again for every block given back lately, once a refresh, [`GIVE_BACK_TRIES`]
    /// refreshes in a row. The kernel drops a folio that no process maps; one that another
    /// process's guest still maps, or that is dirty, stays until a later ask (or until that
    /// process gives it back in turn).
    pub(crate) fn drop_given_back(&mut self) {
        let blocks: Vec<(ImageId, u64)> = self.given_back.keys().copied().collect();
        for (image, block) in blocks {
            self.drop_cached(image, block);
        }
        self.given_back.retain(|_, g| {
            g.tries_left -= 1;
            g.asked = true;
            g.tries_left > 0
        });
        self.fresh.clear();
    }

    fn drop_cached(&self, image: ImageId, block: u64) {
        let Some(f) = self.files.get(&image) else { return };
        // The page cache keeps a file in folios of up to 2 MiB, each aligned to its size, and
        // drops a folio only whole: ask for the aligned block. Pages there that a guest still
        // maps stay; others are read again if a guest asks for them.
        let (Ok(offset), Ok(len)) =
            (libc::off_t::try_from(block.saturating_mul(FOLIO_SPAN)), libc::off_t::try_from(FOLIO_SPAN))
        else {
            return;
        };
        // SAFETY: plain syscall on the image's descriptor, open while its VM is registered; it
        // changes no data, only what the page cache keeps.
        unsafe { libc::posix_fadvise(f.fd, offset, len, libc::POSIX_FADV_DONTNEED) };
    }

    /// `image` is given up: its reads are copied from now on, and what was remembered of its
    /// file's pages may no longer hold.
    pub(crate) fn unshare(&mut self, image: ImageId) {
        self.unshared.insert(image);
        if let Some((dev, ino)) = self.files.get(&image).map(|f| f.file) {
            self.hashes.retain(|(d, i, _), _| (*d, *i) != (dev, ino));
        }
    }
}
