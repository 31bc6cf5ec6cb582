//! The counters of a virtio-blk device ([`BlockStats`]): requests by type and by reason of
//! refusal, bytes moved, pages shared; bumped by the device, read by the VMM while it runs.

use crate::counters;

counters! {
    /// Counters of a block device, shared with the VMM (see
    /// [`Block::stats`](super::Block::stats)).
    pub struct BlockStats, copied as BlockStatsSnapshot {
        /// Completed IN requests.
        reads,
        /// Completed OUT requests.
        writes,
        /// Completed FLUSH requests.
        flushes,
        /// Completed GET_ID requests.
        get_ids,
        /// Bytes read from the image into guest memory.
        bytes_read,
        /// Bytes written from guest memory to the image.
        bytes_written,
        /// Requests of an unsupported type (answered `VIRTIO_BLK_S_UNSUPP`).
        unsupported,
        /// Chains that are empty, loop, point outside the descriptor table or are longer than
        /// [`SEG_MAX`](super::SEG_MAX) + 2 descriptors, and available rings whose index runs
        /// more than a queue ahead.
        malformed_chains,
        /// Headers not alone in a 16-byte device-readable descriptor in guest RAM.
        bad_headers,
        /// Data descriptors outside guest RAM, of the wrong direction or longer than
        /// [`SIZE_MAX`](super::SIZE_MAX).
        bad_data_descriptors,
        /// Requests past the end of the disk, with overflowing sectors, not a multiple of 512
        /// bytes, or larger than
        /// [`MAX_REQUEST_BYTES`](super::MAX_REQUEST_BYTES).
        out_of_range,
        /// Writes to a read-only disk.
        read_only_writes,
        /// Host I/O errors (answered `VIRTIO_BLK_S_IOERR`).
        io_errors,
        /// Chains returned with no status written (no usable status descriptor).
        unanswerable,
        /// Pages read by mapping the image's page over the guest page (read-only disks with
        /// sharing on) instead of copying them.
        shared_pages,
        /// Bytes read by copying them from the image into guest memory: every read of a disk
        /// without sharing, and the reads of a shared one that could not map.
        copied_bytes,
    }
}
