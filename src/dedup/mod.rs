//! The host-side merge engine: verifies guests' page reports and maps one shared copy of
//! identical pages into every VM of a dedup domain, copy-on-write (`docs/glossary.md` names
//! its words).
//!
//! A [`Domain`] ([`domain`]) keeps its shared pages in a *backend*: in this process
//! ([`shared_pages`]: a *store*, one memfd of canonical pages in slots, [`store`]; an *index*,
//! hash → slot, [`index`]; and who holds references) or in the broker ([`broker_client`]).
//! Merging a batch of guest page reports (`docs/fphash.md`, "What the host does"; [`merge`]):
//! 1. read the page; the reported hash is only a lookup key;
//! 2. if the index has the hash, compare the page byte for byte with that store page (whose
//!    hash the host computed itself): equal is a hit, and costs no hash; else hash the page
//!    on the host (BLAKE3) and, if it matches the report, copy it into a new store slot;
//! 3. check that the new mapping fits the VMA budget (`vm.max_map_count`, [`budget`]);
//! 4. `mmap(MAP_PRIVATE | MAP_FIXED)` the store slot over the guest page ([`remap`]). The
//!    anonymous page is freed; a later guest write copies the page and leaves the store alone.
//!
//! [`Domain::refresh_vm`] ([`refresh`]) finds pages copied on write through
//! `/proc/self/pagemap` ([`pagemap`]), on two looks, and frees (punches) store slots that
//! nobody maps any more; its sweeps give back guest pages that hold only zeros ([`zero_pages`]).
//! Read-only images are shared page by page ([`image`]) and given up
//! when their file is about to change ([`unshare`]). Every type more than one of these files
//! uses is in the leaf [`words`].

mod backend;
pub mod broker_client;
mod broker_connection;
mod budget;
mod discard;
mod domain;
mod error;
mod image;
mod image_ids;
mod index;
mod merge;
mod pagemap;
mod refresh;
mod remap;
pub mod shared_pages;
mod stats;
mod store;
mod unshare;
mod vma;
pub mod words;
mod zero_pages;
mod zero_sweep;

#[cfg(test)]
mod tests;

pub use broker_client::{BrokerConfig, RECONNECT_EVERY};
pub use domain::{max_map_count, process_vmas, Domain, Limits, VMA_RESERVE};
pub use error::{BrokerClientError, DedupError};
pub use image_ids::ImageId;
pub use refresh::SECOND_LOOK_AFTER;
pub use stats::{DedupStats, RefreshReport};
pub use words::{MergeStatus, PageHash, RamRegion, Report, Slot, VmId, PAGE_SIZE};
