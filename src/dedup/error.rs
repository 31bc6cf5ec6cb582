//! The merge engine's error types: one variant per host operation that can fail, naming the
//! value; and why the broker could not be used.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in a dedup domain's host-side bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The domain name cannot be part of a memfd name.
    #[error("invalid dedup domain name {0:?}")]
    InvalidName(String),
    /// `memfd_create` of the store failed.
    #[error("memfd_create({name}) failed")]
    MemfdCreate {
        /// The memfd name.
        name: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Making the store read-only to clients failed.
    #[error("cannot lock down store {name}: {what} failed")]
    LockDown {
        /// The memfd name.
        name: String,
        /// What failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A read-only descriptor of the store for a client could not be opened.
    #[error("cannot open a read-only descriptor of the store")]
    ClientFd(#[source] io::Error),
    /// Reserving the shared mapping of the store failed.
    #[error("mmap of {bytes} bytes of store failed")]
    MapStore {
        /// Size of the mapping.
        bytes: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Growing the store with `ftruncate` failed.
    #[error("ftruncate of the store to {bytes} bytes failed")]
    Grow {
        /// The new size.
        bytes: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Freeing a store slot with `fallocate(PUNCH_HOLE)` failed.
    #[error("fallocate(PUNCH_HOLE) of store slot {slot} failed")]
    PunchHole {
        /// The slot.
        slot: u32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// `fstat` of the store failed.
    #[error("fstat of the store failed")]
    Stat(#[source] io::Error),
    /// `/proc/self/pagemap` or `/proc/self/maps` could not be read.
    #[error("cannot read {path}")]
    Proc {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A store slot's reference count disagrees with the guest pages that map it.
    #[error("store slot {slot}: reference count disagrees with the merged guest pages")]
    Refs {
        /// The slot.
        slot: u32,
    },
    /// The broker could not be used.
    #[error("dedup broker")]
    Broker(#[source] Box<BrokerClientError>),
    /// A live store page no longer hashes to its index key.
    #[error("store slot {slot} no longer matches its hash")]
    Corrupt {
        /// The slot.
        slot: u32,
    },
    /// The domain has handed out every image id its VMA keys can hold.
    #[error("the dedup domain has shared {0} image files; no more can be told apart")]
    TooManyImages(u32),
    /// Guest pages of zeros found by a sweep could not be dropped.
    #[error("cannot give back {pages} guest pages of zeros at {gpa:#x}")]
    GiveBackZeros {
        /// The first page's guest-physical address.
        gpa: u64,
        /// How many pages.
        pages: usize,
        /// The errno of `madvise`.
        #[source]
        source: io::Error,
    },
    /// Guest pages given back could not be dropped or given fresh memory.
    #[error("cannot give back {pages} guest pages at {gpa:#x}")]
    Discard {
        /// The first page's guest-physical address.
        gpa: u64,
        /// How many pages.
        pages: usize,
        /// The errno of `madvise` or `mmap`.
        #[source]
        source: io::Error,
    },
    /// Guest pages that map an image could not be given anonymous memory of their own.
    #[error("cannot copy {pages} guest pages at {gpa:#x} out of their image into anonymous memory")]
    Unshare {
        /// The first page's guest-physical address.
        gpa: u64,
        /// How many pages.
        pages: usize,
        /// The errno of `mmap`.
        #[source]
        source: io::Error,
    },
}

/// Why a connection could not be made or broke.
#[derive(Debug, thiserror::Error)]
pub enum BrokerClientError {
    /// A socket call failed.
    #[error("{what} on {path} failed")]
    Io {
        /// The call.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The broker refused (ERROR reply).
    #[error("the broker refused: error {code} (detail {detail})")]
    Refused {
        /// `ErrorReply::code`.
        code: u32,
        /// `ErrorReply::detail`.
        detail: u32,
    },
    /// The broker's answer does not follow the protocol.
    #[error("the broker's answer does not follow the protocol: {0}")]
    Protocol(&'static str),
    /// A domain or label that cannot go on the wire.
    #[error("invalid name {0:?}: at most 64 bytes, no NUL")]
    Name(String),
}
