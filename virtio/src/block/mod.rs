//! virtio-blk (device type 2; virtio 1.2 §5.2) on a raw image file.
//!
//! One request queue. Requests must be framed the way Linux frames them: the 16-byte header
//! alone in the first descriptor (device-readable), the data in the middle descriptors, the
//! status byte alone in the last descriptor (device-writable, length 1). Supported: IN, OUT,
//! FLUSH, GET_ID; other types complete with `VIRTIO_BLK_S_UNSUPP`.
//!
//! Here: the device (opening the image, serving requests, image sharing). `request.rs`: the
//! request and configuration layouts and the parsing of a request's chain; `counters.rs`:
//! [`BlockStats`]. Their public items are re-exported here.
//!
//! Limits, advertised to the driver (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX) and enforced:
//! at most [`SEG_MAX`] data descriptors of at most [`SIZE_MAX`] bytes each, so at most
//! [`MAX_REQUEST_BYTES`] per request. Data moves between the file and guest RAM directly
//! (`read(2)`/`write(2)` into guest memory through vm-memory), with no intermediate buffer.
//!
//! Disk sharing: a read-only disk takes a shared `flock` (many VMs may read one base image), a
//! writable disk an exclusive one (no two writers, no reader beside a writer).
//!
//! Image sharing (`docs/fphash.md`, "Read-only images"): with an [`ImageMapper`], a read of a
//! read-only disk whose buffer covers whole guest pages at 4 KiB-aligned image offsets maps
//! the image file's pages over those guest pages (`MAP_PRIVATE`, copy-on-write) instead of
//! copying them: every VM reading the image shares the host's page cache. Unaligned or partial
//! buffers, and pages the mapper declines, are copied as usual. The counters tell the two apart
//! (`shared_pages`, `copied_bytes`); when most of what a guest read from a shared image after
//! [`COPIED_VERDICT_BYTES`] had to be copied, one warning names the disk: its reads do not
//! line up with the image's pages (a filesystem with blocks smaller than a page, say), so
//! nothing of it is shared.

mod counters;
mod request;

pub use counters::{BlockStats, BlockStatsSnapshot};
pub use request::*;

use std::fs::{File, FileType, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{
    bump, collect_chain, drain_queue, read_config_bytes, should_log, Error, VirtioDevice, PAGE_SIZE,
    VIRTIO_F_VERSION_1,
};
use request::{
    fail, read_header, status_descriptor, validate_transfer, Failure, Rejection, Transfer, MAX_CHAIN_LEN,
    S_IOERR, S_OK, S_UNSUPP,
};

/// Size of the request queue offered to the driver (QueueNumMax).
pub const QUEUE_SIZE: u16 = 256;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {}", .path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A writable disk's image is open in another process.
    #[error("disk image {} is in use by another process (a writable disk needs it alone)", .path.display())]
    InUse {
        /// The image.
        path: PathBuf,
    },
    /// A read-only disk's image is open for writing in another process.
    #[error("disk image {} is open for writing by another process", .path.display())]
    BeingWritten {
        /// The image.
        path: PathBuf,
    },
    /// The image is a directory, FIFO, socket or character device (such as /dev/zero, which
    /// has no size and would be a 0-sector disk).
    #[error("disk image {} is {found}, not a regular file or block device", .path.display())]
    NotAnImage {
        /// The image.
        path: PathBuf,
        /// What it is instead.
        found: &'static str,
    },
    /// The image has no whole sector: the guest would see a disk of capacity 0.
    #[error("disk image {} is smaller than one {SECTOR_SIZE}-byte sector ({size} bytes)", .path.display())]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A disk whose image pages the guest maps (a shared read-only image) cannot change image.
    #[error("disk image {} is shared page by page with the guest: its image cannot be replaced while it runs", .path.display())]
    Shared {
        /// The image.
        path: PathBuf,
    },
    /// `flock` failed for another reason.
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be read.
    #[error("cannot get the size of disk image {}", .path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a file that is no disk image is, for messages.
fn describe(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

/// How much a guest reads from a shared image before the device judges whether its reads map
/// (4 MiB): a few unaligned metadata reads at first say nothing.
pub const COPIED_VERDICT_BYTES: u64 = 4 << 20;

/// Maps pages of a read-only image over guest pages (the VMM's side of image sharing).
pub trait ImageMapper: Send {
    /// Maps `pages` pages of `image` from byte `offset` (4 KiB-aligned) over the guest pages
    /// from `gpa` (4 KiB-aligned), copy-on-write, instead of copying them; returns how many
    /// leading pages it mapped (the device copies the rest). Called on the VMM's event-loop
    /// thread while the request is served.
    fn map_image(&mut self, image: &File, gpa: u64, offset: u64, pages: usize) -> usize;
}

/// A virtio-blk device on a raw image.
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Usable size in bytes: the image size rounded down to a sector.
    capacity: u64,
    id: [u8; ID_LEN],
    config: Config,
    queue_max_sizes: [u16; 1],
    acked_features: u64,
    stats: Arc<BlockStats>,
    /// The current chain's descriptors (kept to avoid an allocation per request).
    descs: Vec<Descriptor>,
    /// Image sharing, on a read-only disk.
    mapper: Option<Box<dyn ImageMapper>>,
    /// Whether the warning that a shared image's reads were mostly copied was given.
    warned_copies: bool,
}

impl Block {
    /// Opens the raw image at `path`, read-only (`O_RDONLY`, shared `flock`) or writable
    /// (`O_RDWR`, exclusive `flock`). The image is a regular file or a block device of at least
    /// one sector; a partial last sector is left out, with a warning. `id` is what GET_ID returns: its first 20 bytes,
    /// NUL-padded.
    pub fn open(path: impl AsRef<Path>, read_only: bool, id: impl AsRef<str>) -> Result<Block, BlockError> {
        let path = path.as_ref().to_path_buf();
        // O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever. It changes
        // nothing for the regular files and block devices that pass the check below.
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                // A writable open of a file another process holds a read lease on (VMs that
                // share the image): the kernel has asked them to give it up, and would have
                // made a blocking open wait until they did.
                Some(libc::EWOULDBLOCK) if !read_only => BlockError::InUse { path: path.clone() },
                _ => BlockError::Open { path: path.clone(), source },
            })?;
        let file_type =
            file.metadata().map_err(|source| BlockError::Open { path: path.clone(), source })?.file_type();
        if !(file_type.is_file() || file_type.is_block_device()) {
            return Err(BlockError::NotAnImage { path, found: describe(file_type) });
        }
        let locked = if read_only { file.try_lock_shared() } else { file.try_lock() };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) if read_only => return Err(BlockError::BeingWritten { path }),
            Err(TryLockError::WouldBlock) => return Err(BlockError::InUse { path }),
            Err(TryLockError::Error(source)) => return Err(BlockError::Lock { path, source }),
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size =
            file.seek(SeekFrom::End(0)).map_err(|source| BlockError::Size { path: path.clone(), source })?;
        let capacity = size - size % SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::TooSmall { path, size });
        }
        if capacity != size {
            warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} \
                 bytes are not visible to the guest",
                path.display(),
                size - capacity
            );
        }
        let mut id_bytes = [0u8; ID_LEN];
        let id = id.as_ref().as_bytes();
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id[..n]);

        let config = Config {
            capacity: capacity / SECTOR_SIZE,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            ..Config::default()
        };

        Ok(Block {
            file,
            path,
            read_only,
            capacity,
            id: id_bytes,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            acked_features: 0,
            stats: Arc::new(BlockStats::default()),
            descs: Vec::with_capacity(MAX_CHAIN_LEN),
            mapper: None,
            warned_copies: false,
        })
    }

    /// Puts the image at `path` under the disk (Firecracker's `PATCH /drives/{id}` on a running
    /// VM: orchestrators swap placeholder disks for container images): opened and locked as the
    /// disk's first image was (read-only or writable), the old one closed. The capacity in the
    /// configuration changes (the transport must then announce a configuration change); the
    /// disk's id and counters stay. Refused for a disk whose image pages the guest maps.
    /// Returns the new capacity in sectors.
    pub fn replace_image(&mut self, path: &Path) -> Result<u64, BlockError> {
        if self.mapper.is_some() {
            return Err(BlockError::Shared { path: self.path.clone() });
        }
        let new = Block::open(path, self.read_only, "")?;
        self.file = new.file;
        self.path = new.path;
        self.capacity = new.capacity;
        self.config.capacity = new.config.capacity;
        Ok(self.capacity_sectors())
    }

    /// Whether the image's pages can be shared: a read-only disk on a regular file.
    pub fn shareable(&self) -> bool {
        self.read_only && self.file.metadata().is_ok_and(|m| m.is_file())
    }

    /// Shares the image's pages with the guest instead of copying them, where a read allows
    /// it. Only for a [`Block::shareable`] disk (the mapper is dropped otherwise, and `false`
    /// returned).
    pub fn share_image(&mut self, mapper: Box<dyn ImageMapper>) -> bool {
        if !self.shareable() {
            return false;
        }
        self.mapper = Some(mapper);
        true
    }

    /// The open image (for a lease on it: the descriptor the device reads and maps from).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The device's counters; keep the `Arc` to read them after the device moved into its
    /// transport.
    pub fn stats(&self) -> Arc<BlockStats> {
        Arc::clone(&self.stats)
    }

    /// Reads `buf.len()` bytes of the image at byte `offset` (for the VMM's look at what the
    /// image holds, such as a filesystem's superblock).
    pub fn read_image_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves one request; returns the number of bytes written into the chain's
    /// device-writable buffers, for the used ring.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let too_long = collect_chain(chain, MAX_CHAIN_LEN, &mut self.descs);
        let Some(status) = status_descriptor(&self.descs, mem) else {
            if self.descs.last().is_none_or(|d| d.has_next()) {
                bump(&self.stats.malformed_chains);
            }
            let u = bump(&self.stats.unanswerable);
            if should_log(u) {
                warn!(
                    "virtio-blk {}: request without a usable status descriptor \
                     ({} descriptors read; {u} such requests)",
                    self.path.display(),
                    self.descs.len()
                );
            }
            return 0;
        };
        if too_long {
            self.reject(Rejection::MalformedChain, "chain longer than SEG_MAX + 2");
            return self.complete(mem, status, S_IOERR, 0);
        }
        let (code, written) = match self.execute(mem) {
            Ok(written) => (S_OK, written),
            Err(Failure::Unsupported) => (S_UNSUPP, 0),
            Err(Failure::Rejected(why, detail)) => {
                self.reject(why, &detail);
                (S_IOERR, 0)
            }
        };
        self.complete(mem, status, code, written)
    }

    /// Writes the status byte; returns the used length.
    fn complete(&self, mem: &GuestMemoryMmap, status: Descriptor, code: u8, written: u32) -> u32 {
        if mem.write_obj(RequestStatus { status: code }, status.addr()).is_err() {
            bump(&self.stats.unanswerable);
            return 0;
        }
        written.saturating_add(1)
    }

    fn reject(&self, why: Rejection, detail: &str) {
        let counter = match why {
            Rejection::MalformedChain => &self.stats.malformed_chains,
            Rejection::BadHeader => &self.stats.bad_headers,
            Rejection::BadDataDescriptor => &self.stats.bad_data_descriptors,
            Rejection::OutOfRange => &self.stats.out_of_range,
            Rejection::ReadOnly => &self.stats.read_only_writes,
            Rejection::Io => &self.stats.io_errors,
        };
        let n = bump(counter);
        if should_log(n) {
            warn!(
                "virtio-blk {}: request failed: {detail} ({why:?}; {n} such requests)",
                self.path.display()
            );
        }
    }

    /// Validates and performs the request in `self.descs` (header first, status last).
    /// Returns the bytes written to guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap) -> Result<u32, Failure> {
        let RequestHeader { request_type, sector, .. } = read_header(mem, self.descs[0])?;
        let data = &self.descs[1..self.descs.len() - 1];

        match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let is_read = request_type == VIRTIO_BLK_T_IN;
                let t = validate_transfer(mem, data, is_read, sector, self.capacity)
                    .map_err(|(why, d)| Failure::Rejected(why, d))?;
                if !is_read && self.read_only {
                    return fail(Rejection::ReadOnly, format!("write of {} bytes at sector {sector}", t.len));
                }
                self.transfer(mem, is_read, &t)
                    .map_err(|e| Failure::Rejected(Rejection::Io, format!("at byte {}: {e}", t.offset)))?;
                if is_read {
                    bump(&self.stats.reads);
                    self.stats.bytes_read.fetch_add(t.len, Ordering::Relaxed);
                    self.judge_copies();
                    // `len` <= MAX_REQUEST_BYTES, far below u32::MAX.
                    Ok(u32::try_from(t.len).unwrap_or(u32::MAX))
                } else {
                    bump(&self.stats.writes);
                    self.stats.bytes_written.fetch_add(t.len, Ordering::Relaxed);
                    Ok(0)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file
                        .sync_data()
                        .map_err(|e| Failure::Rejected(Rejection::Io, format!("flush: {e}")))?;
                }
                bump(&self.stats.flushes);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0usize;
                for d in data {
                    let n = (d.len() as usize).min(ID_LEN - written);
                    if !d.is_write_only() || !mem.check_range(d.addr(), n) {
                        return fail(
                            Rejection::BadDataDescriptor,
                            format!("GET_ID buffer at {:#x}, {} bytes", d.addr().0, d.len()),
                        );
                    }
                    mem.write_slice(&self.id[written..written + n], d.addr()).map_err(|e| {
                        Failure::Rejected(Rejection::BadDataDescriptor, format!("GET_ID: {e}"))
                    })?;
                    written += n;
                }
                bump(&self.stats.get_ids);
                Ok(written as u32)
            }
            other => {
                let n = bump(&self.stats.unsupported);
                if should_log(n) {
                    info!(
                        "virtio-blk {}: unsupported request type {other} ({n} such requests)",
                        self.path.display()
                    );
                }
                Err(Failure::Unsupported)
            }
        }
    }

    /// Once a guest has read [`COPIED_VERDICT_BYTES`] from a shared image, warns once if most
    /// of it was copied rather than mapped.
    fn judge_copies(&mut self) {
        if self.mapper.is_none() || self.warned_copies {
            return;
        }
        let read = self.stats.bytes_read.load(Ordering::Relaxed);
        let copied = self.stats.copied_bytes.load(Ordering::Relaxed);
        if read >= COPIED_VERDICT_BYTES && copied > read / 2 {
            self.warned_copies = true;
            warn!(
                "virtio-blk {}: {} of {} KiB the guest read from this shared image were copied, not \
                 mapped: its reads do not cover whole 4 KiB-aligned pages of the image (a filesystem \
                 with blocks smaller than 4 KiB, or not at a 4 KiB-aligned offset?), so other VMs \
                 reading the image do not share those pages with it",
                self.path.display(),
                copied >> 10,
                read >> 10
            );
        }
    }

    /// Moves the data of a validated request between the image and guest memory.
    fn transfer(&mut self, mem: &GuestMemoryMmap, is_read: bool, t: &Transfer) -> io::Result<()> {
        let data = 1..self.descs.len() - 1;
        let mut offset = t.offset;
        for i in data {
            let d = self.descs[i];
            let len = u64::from(d.len());
            if is_read {
                self.read_into(mem, d.addr().0, len, offset)?;
            } else {
                // The device owns its file description, so the file position is ours alone.
                let mut file = &self.file;
                file.seek(SeekFrom::Start(offset))?;
                mem.write_all_volatile_to(d.addr(), &mut file, len as usize).map_err(io::Error::other)?;
            }
            offset += len;
        }
        Ok(())
    }

    /// Fills `len` bytes of guest memory from `gpa` with the image's bytes from `offset`:
    /// whole pages at aligned addresses and offsets mapped where the mapper takes them, the
    /// rest copied.
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        mut gpa: u64,
        mut len: u64,
        mut offset: u64,
    ) -> io::Result<()> {
        let mut declined = false;
        while len > 0 {
            // Guest page and image page align here, or never do in this buffer.
            const PAGE: u64 = PAGE_SIZE as u64;
            let in_step = gpa % PAGE == offset % PAGE;
            let chunk = match &mut self.mapper {
                Some(mapper) if in_step && !declined && gpa.is_multiple_of(PAGE) && len >= PAGE => {
                    let pages = (len / PAGE) as usize;
                    let mapped = mapper.map_image(&self.file, gpa, offset, pages).min(pages) as u64;
                    if mapped > 0 {
                        self.stats.shared_pages.fetch_add(mapped, Ordering::Relaxed);
                        let bytes = mapped * PAGE;
                        (gpa, len, offset) = (gpa + bytes, len - bytes, offset + bytes);
                        continue;
                    }
                    // Declined (no room): copy the rest of this buffer.
                    declined = true;
                    len
                }
                // Copy up to the next page boundary, from where pages may map.
                Some(_) if in_step && !declined => len.min(PAGE - gpa % PAGE),
                _ => len,
            };
            let mut file = &self.file;
            file.seek(SeekFrom::Start(offset))?;
            mem.read_exact_volatile_from(GuestAddress(gpa), &mut file, chunk as usize)
                .map_err(io::Error::other)?;
            self.stats.copied_bytes.fetch_add(chunk, Ordering::Relaxed);
            (gpa, len, offset) = (gpa + chunk, len - chunk, offset + chunk);
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
        warn!(
            "virtio-blk {}: ignored write of {} bytes to read-only config offset {offset:#x}",
            self.path.display(),
            data.len()
        );
    }

    fn activate(&mut self, acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        if !queues_ready.first().copied().unwrap_or(false) {
            return Err(Error::QueueNotReady(0));
        }
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let stats = self.stats.clone();
        let path = self.path.clone();
        drain_queue(
            queue,
            mem,
            |chain| self.handle_chain(chain, mem),
            || {
                if should_log(bump(&stats.malformed_chains)) {
                    warn!("virtio-blk {}: available ring index is invalid", path.display());
                }
            },
        )
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests;
