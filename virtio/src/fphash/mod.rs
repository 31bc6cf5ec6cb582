//! The fphash device (virtio device ID 60): file-page hash reports from the guest.
//!
//! The protocol is specified in `docs/fphash.md` (protocol version 2: version 1 plus the
//! [`F_HOST_HASH`] feature); the constants and wire types below follow it field by field. One
//! report queue: each descriptor chain carries a batch, `struct fphash_header` then
//! `nr_records` × `struct fphash_record` in device-readable descriptors (split any way the
//! driver likes), followed by device-writable descriptors that receive `struct
//! fphash_response` (`batch_status`, then one status byte per record).
//!
//! The device checks the batch's framing and every record's shape (alignment, guest RAM,
//! flags); records that pass go, in one call per batch, to a [`PageMerger`], the host's merge
//! engine, which verifies the pages themselves and decides each record's status. A driver that
//! accepted [`F_HOST_HASH`] reports pages without a hash: the device passes its records' hash
//! fields on as zeros, whatever they hold, and the merger hashes the pages itself.
//!
//! Guest input is hostile: nothing here panics on a descriptor or a record, buffers are
//! allocated once (a batch is bounded by [`MAX_RECORDS`]), and every rejection is counted in
//! [`FphashStats`] and logged sparsely.

use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{
    bump, collect_chain, counters, drain_queue, read_config_bytes, should_log, Error, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Virtio device ID of fphash: 60 (0x3c), in the non-standard range that counts down from 63
/// (crosvm uses 63, 62 and 61). `docs/fphash.md`, "Identification".
pub const DEVICE_ID: u32 = 60;
/// Size of the report queue offered to the driver (QueueNumMax).
pub const QUEUE_SIZE: u16 = 256;
/// Most records in one batch (config `max_records`).
pub const MAX_RECORDS: u32 = 256;
/// Size of a reported page (config `page_size`); GPAs must be aligned to it.
pub const PAGE_SIZE: u64 = 4096;
/// Config `hash_alg`: BLAKE3, 32-byte output, default key and mode.
pub const HASH_ALG_BLAKE3: u32 = 1;
/// Config `version` for a driver that accepted [`F_HOST_HASH`]: protocol version 2.
pub const PROTOCOL_VERSION: u32 = 2;
/// Config `version` for any other driver, before and after feature negotiation: version-1
/// drivers refuse any value but 1, and version 2 differs from 1 only with [`F_HOST_HASH`].
pub const PROTOCOL_VERSION_1: u32 = 1;
/// Device-specific feature bit 0, `VIRTIO_FPHASH_F_HOST_HASH` (protocol version 2): the driver
/// reports pages without a hash; the device ignores every record's `hash` field and the host
/// hashes the pages itself.
pub const F_HOST_HASH: u64 = 1 << 0;
/// Length of a record's hash.
pub const HASH_LEN: usize = 32;

/// The configuration space (read-only): `docs/fphash.md`, "Configuration space".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FphashConfig {
    /// `max_records` (0x00): most records in one batch, [`MAX_RECORDS`].
    pub max_records: u32,
    /// `page_size` (0x04): [`PAGE_SIZE`].
    pub page_size: u32,
    /// `hash_alg` (0x08): [`HASH_ALG_BLAKE3`].
    pub hash_alg: u32,
    /// `version` (0x0c): [`PROTOCOL_VERSION`] once the driver accepted [`F_HOST_HASH`], else
    /// [`PROTOCOL_VERSION_1`].
    pub version: u32,
}

/// Offset of `max_records` (le32) in the configuration space.
pub const CONFIG_MAX_RECORDS: usize = offset_of!(FphashConfig, max_records);
/// Offset of `page_size` (le32) in the configuration space.
pub const CONFIG_PAGE_SIZE: usize = offset_of!(FphashConfig, page_size);
/// Offset of `hash_alg` (le32) in the configuration space.
pub const CONFIG_HASH_ALG: usize = offset_of!(FphashConfig, hash_alg);
/// Offset of `version` (le32) in the configuration space.
pub const CONFIG_VERSION: usize = offset_of!(FphashConfig, version);
/// Length of the configuration space.
pub const CONFIG_LEN: usize = size_of::<FphashConfig>();

/// `fphash_header.type`: these pages now hold clean file content.
pub const TYPE_ADDED: u32 = 1;
/// `fphash_header.type`: these pages left the page cache (hash ignored).
pub const TYPE_REMOVED: u32 = 2;
/// `fphash_record.flags` bit 0: the page holds file content (required for ADDED).
pub const FLAG_FILE_PAGE: u32 = 1;

/// `fphash_response.batch_status`: per-record statuses follow.
pub const BATCH_OK: u32 = 0;
/// `fphash_response.batch_status`: the batch was rejected, no record was looked at.
pub const BATCH_BAD_REQUEST: u32 = 1;

/// Length of `struct fphash_header`.
pub const HEADER_LEN: usize = size_of::<FphashHeader>();
/// Length of `struct fphash_record`.
pub const RECORD_LEN: usize = size_of::<FphashRecord>();
/// Length of `fphash_response.batch_status`, before the status bytes.
pub const RESPONSE_HEADER_LEN: usize = offset_of!(FphashResponse, status);
/// Longest acceptable request: a header and [`MAX_RECORDS`] records.
pub const MAX_REQUEST_LEN: usize = HEADER_LEN + RECORD_LEN * MAX_RECORDS as usize;
/// Most descriptors in an acceptable chain: `max_records + 2`.
pub const MAX_CHAIN_LEN: usize = MAX_RECORDS as usize + 2;

/// `struct fphash_header`: the first 8 bytes of a request (`docs/fphash.md`, "Queue 0:
/// reports").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FphashHeader {
    /// `type` (le32 at 0): [`TYPE_ADDED`] or [`TYPE_REMOVED`].
    pub report_type: u32,
    /// `nr_records` (le32 at 4): 1 ..= `max_records`.
    pub nr_records: u32,
}

/// `struct fphash_record`: one reported page (48 bytes; `docs/fphash.md`, "Queue 0:
/// reports").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FphashRecord {
    /// `gpa` (le64 at 0): guest-physical address of the page, 4096-aligned.
    pub gpa: u64,
    /// `hash` (32 bytes at 8): BLAKE3 of the page when reported (ignored for REMOVED).
    pub hash: [u8; HASH_LEN],
    /// `flags` (le32 at 40): [`FLAG_FILE_PAGE`]; other bits 0.
    pub flags: u32,
    /// `reserved` (le32 at 44): 0.
    pub reserved: u32,
}

/// `struct fphash_response` of the largest batch (`docs/fphash.md`, "Queue 0: reports"): the
/// device writes its first `4 + nr_records` bytes, or only `batch_status` for a rejected
/// batch ([`FphashResponse::wire`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FphashResponse {
    /// `batch_status` (le32 at 0): [`BATCH_OK`] or [`BATCH_BAD_REQUEST`].
    pub batch_status: u32,
    /// `status[nr_records]` (at 4): one [`RecordStatus`] byte per record, in request order.
    pub status: [u8; MAX_RECORDS as usize],
}

impl Default for FphashResponse {
    fn default() -> Self {
        FphashResponse { batch_status: BATCH_OK, status: [0; MAX_RECORDS as usize] }
    }
}

// The integer fields hold the wire's little-endian values as they are.
const _: () = assert!(cfg!(target_endian = "little"), "fphash wire types need a little-endian host");
// The layouts of `docs/fphash.md`, field by field, without padding.
const _: () = {
    assert!(size_of::<FphashConfig>() == 0x10);
    assert!(offset_of!(FphashConfig, max_records) == 0x00);
    assert!(offset_of!(FphashConfig, page_size) == 0x04);
    assert!(offset_of!(FphashConfig, hash_alg) == 0x08);
    assert!(offset_of!(FphashConfig, version) == 0x0c);
    assert!(size_of::<FphashHeader>() == 8);
    assert!(offset_of!(FphashHeader, report_type) == 0);
    assert!(offset_of!(FphashHeader, nr_records) == 4);
    assert!(size_of::<FphashRecord>() == 48);
    assert!(offset_of!(FphashRecord, gpa) == 0);
    assert!(offset_of!(FphashRecord, hash) == 8);
    assert!(offset_of!(FphashRecord, flags) == 40);
    assert!(offset_of!(FphashRecord, reserved) == 44);
    assert!(offset_of!(FphashResponse, batch_status) == 0);
    assert!(offset_of!(FphashResponse, status) == 4);
    assert!(size_of::<FphashResponse>() == 4 + MAX_RECORDS as usize);
};

// SAFETY: `repr(C)` structs of integers and byte arrays whose size is the sum of their
// fields' (checked above): no padding, and every bit pattern is a valid value.
unsafe impl ByteValued for FphashConfig {}
// SAFETY: as for `FphashConfig`.
unsafe impl ByteValued for FphashHeader {}
// SAFETY: as for `FphashConfig`.
unsafe impl ByteValued for FphashRecord {}
// SAFETY: as for `FphashConfig`.
unsafe impl ByteValued for FphashResponse {}

/// A wire struct from exactly its bytes (unaligned: requests are copied as bytes).
fn from_wire<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let dst = value.as_mut_slice();
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    value
}

impl FphashHeader {
    /// Decodes the little-endian wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> FphashHeader {
        from_wire(b)
    }

    /// Encodes the little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(self.as_slice());
        b
    }
}

impl FphashRecord {
    /// Decodes the little-endian wire form.
    pub fn from_bytes(b: &[u8; RECORD_LEN]) -> FphashRecord {
        from_wire(b)
    }

    /// Encodes the little-endian wire form.
    pub fn to_bytes(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b.copy_from_slice(self.as_slice());
        b
    }
}

impl FphashResponse {
    /// The bytes the device writes: `batch_status` and the first `nr_statuses` status bytes
    /// (at most [`MAX_RECORDS`]).
    pub fn wire(&self, nr_statuses: usize) -> &[u8] {
        let len = RESPONSE_HEADER_LEN + nr_statuses.min(MAX_RECORDS as usize);
        &self.as_slice()[..len]
    }
}

/// Per-record status, the byte the device writes for each record (`docs/fphash.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordStatus {
    /// The page now maps a shared host page (first copy or a duplicate).
    Merged = 0,
    /// The page already maps the shared host page with this content.
    Already = 1,
    /// The host's BLAKE3 of the page differs from the reported hash, or the bytes differ from
    /// the shared copy.
    Mismatch = 2,
    /// Unaligned, outside guest RAM, or in the MMIO gap.
    BadGpa = 3,
    /// Unknown flag bits, nonzero `reserved`, or ADDED without FILE_PAGE.
    BadRecord = 4,
    /// Not merged: the VMA budget (`vm.max_map_count`) or the store limit was reached.
    NoRoom = 5,
    /// Not merged: merging is off for this VM.
    Off = 6,
    /// A REMOVED record was noted.
    Done = 7,
}

impl RecordStatus {
    /// Every status, in wire order.
    pub const ALL: [RecordStatus; 8] = [
        RecordStatus::Merged,
        RecordStatus::Already,
        RecordStatus::Mismatch,
        RecordStatus::BadGpa,
        RecordStatus::BadRecord,
        RecordStatus::NoRoom,
        RecordStatus::Off,
        RecordStatus::Done,
    ];

    /// The status byte on the wire.
    pub fn as_byte(self) -> u8 {
        self as u8
    }

    /// Decodes a status byte; `None` for values the protocol does not define.
    pub fn from_byte(b: u8) -> Option<RecordStatus> {
        RecordStatus::ALL.get(usize::from(b)).copied()
    }
}

/// What a batch reports, from `fphash_header.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportKind {
    /// [`TYPE_ADDED`]: the pages now hold clean file content with the reported hashes.
    Added,
    /// [`TYPE_REMOVED`]: the pages left the page cache.
    Removed,
}

impl ReportKind {
    /// Decodes `fphash_header.type`; `None` for unknown types.
    pub fn from_wire(report_type: u32) -> Option<ReportKind> {
        match report_type {
            TYPE_ADDED => Some(ReportKind::Added),
            TYPE_REMOVED => Some(ReportKind::Removed),
            _ => None,
        }
    }

    /// The `fphash_header.type` value.
    pub fn to_wire(self) -> u32 {
        match self {
            ReportKind::Added => TYPE_ADDED,
            ReportKind::Removed => TYPE_REMOVED,
        }
    }
}

/// One record that passed the device's checks: `gpa` is page-aligned and the whole page lies
/// in one guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageReport {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// The hash the guest reported (meaningless for [`ReportKind::Removed`]); never trusted.
    /// Zero when the driver accepted [`F_HOST_HASH`].
    pub hash: [u8; HASH_LEN],
}

/// Who hashed the pages of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hashing {
    /// The guest: each report's `hash` is what the guest claims (a lookup key, never trusted).
    Guest,
    /// The host: the driver accepted [`F_HOST_HASH`]; every report's `hash` is zero and the
    /// merger hashes each page it reads.
    Host,
}

/// The host's merge engine, as the device sees it.
pub trait PageMerger: Send {
    /// Handles one batch of records that passed the device's checks (aligned, in guest RAM,
    /// valid flags), in request order; writes one status per record into `statuses` (same
    /// length as `reports`). Called on the VMM's event-loop thread. `hashing` says whether the
    /// reports carry the guest's hashes or none ([`Hashing::Host`], ADDED batches only).
    ///
    /// `statuses` arrives filled with [`RecordStatus::Off`] for ADDED batches and
    /// [`RecordStatus::Done`] for REMOVED ones; entries the merger leaves alone keep that
    /// value. The device does not call the merger for a batch without valid records.
    fn merge_batch(
        &mut self,
        kind: ReportKind,
        hashing: Hashing,
        reports: &[PageReport],
        statuses: &mut [RecordStatus],
    );
}

counters! {
    /// Counters of an fphash device, shared with the VMM (see [`FphashDevice::stats`]).
    pub struct FphashStats, copied as FphashStatsSnapshot {
        /// Batches answered with `BATCH_OK`.
        batches,
        /// Records in those batches.
        records,
        /// Chains rejected as `BAD_REQUEST` (whether or not an answer could be written), and
        /// available rings whose index runs more than a queue ahead.
        rejected_batches,
        /// Chains returned with used length 0: no writable part of at least 4 bytes in guest RAM
        /// to write the response to.
        unanswered,
        /// Records answered [`RecordStatus::Merged`].
        merged,
        /// Records answered [`RecordStatus::Already`].
        already,
        /// Records answered [`RecordStatus::Mismatch`].
        mismatch,
        /// Records answered [`RecordStatus::BadGpa`].
        bad_gpa,
        /// Records answered [`RecordStatus::BadRecord`].
        bad_record,
        /// Records answered [`RecordStatus::NoRoom`].
        no_room,
        /// Records answered [`RecordStatus::Off`].
        off,
        /// Records answered [`RecordStatus::Done`].
        done,
        /// ADDED records handed to the merger without a hash ([`F_HOST_HASH`] negotiated).
        host_hashed,
    }
}

impl FphashStatsSnapshot {
    /// The count of records answered `status`.
    pub fn status(&self, status: RecordStatus) -> u64 {
        match status {
            RecordStatus::Merged => self.merged,
            RecordStatus::Already => self.already,
            RecordStatus::Mismatch => self.mismatch,
            RecordStatus::BadGpa => self.bad_gpa,
            RecordStatus::BadRecord => self.bad_record,
            RecordStatus::NoRoom => self.no_room,
            RecordStatus::Off => self.off,
            RecordStatus::Done => self.done,
        }
    }
}

impl FphashStats {
    /// The counter of records answered `status`.
    pub fn status_counter(&self, status: RecordStatus) -> &AtomicU64 {
        match status {
            RecordStatus::Merged => &self.merged,
            RecordStatus::Already => &self.already,
            RecordStatus::Mismatch => &self.mismatch,
            RecordStatus::BadGpa => &self.bad_gpa,
            RecordStatus::BadRecord => &self.bad_record,
            RecordStatus::NoRoom => &self.no_room,
            RecordStatus::Off => &self.off,
            RecordStatus::Done => &self.done,
        }
    }
}

/// Why a batch is `BAD_REQUEST`; for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reject {
    /// The head index names no readable descriptor.
    EmptyChain,
    /// A loop, a `next` outside the table, an unreadable descriptor, or over 4 GiB.
    BrokenChain,
    /// More than [`MAX_CHAIN_LEN`] descriptors.
    TooLong,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// A descriptor outside guest RAM.
    OutsideRam { addr: u64, len: u32 },
    /// The readable part cannot hold a header, or is longer than any valid request.
    RequestLength { readable: u64 },
    /// Unknown `type`.
    UnknownType(u32),
    /// `nr_records` is 0 or above `max_records`.
    RecordCount(u32),
    /// The readable part is not `8 + 48 * nr_records` bytes.
    RecordsLength { readable: u64, nr_records: u32 },
    /// The writable part is shorter than `4 + nr_records` bytes.
    ResponseTooShort { writable: u64, nr_records: u32 },
}

/// A request whose framing is valid.
struct Batch {
    kind: ReportKind,
    nr_records: usize,
}

/// The fphash device.
pub struct FphashDevice {
    merger: Box<dyn PageMerger>,
    config: FphashConfig,
    queue_max_sizes: [u16; 1],
    acked_features: u64,
    stats: Arc<FphashStats>,
    config_writes: u64,
    /// Buffers of the current chain, allocated once.
    descs: Vec<Descriptor>,
    request: Vec<u8>,
    statuses: Vec<RecordStatus>,
    reports: Vec<PageReport>,
    report_index: Vec<usize>,
    merged: Vec<RecordStatus>,
    response: FphashResponse,
}

impl FphashDevice {
    /// A device that hands valid records to `merger`.
    pub fn new(merger: Box<dyn PageMerger>) -> FphashDevice {
        let config = FphashConfig {
            max_records: MAX_RECORDS,
            page_size: PAGE_SIZE as u32,
            hash_alg: HASH_ALG_BLAKE3,
            version: PROTOCOL_VERSION_1,
        };
        let max = MAX_RECORDS as usize;
        FphashDevice {
            merger,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            acked_features: 0,
            stats: Arc::new(FphashStats::default()),
            config_writes: 0,
            descs: Vec::with_capacity(MAX_CHAIN_LEN),
            request: vec![0; MAX_REQUEST_LEN],
            statuses: Vec::with_capacity(max),
            reports: Vec::with_capacity(max),
            report_index: Vec::with_capacity(max),
            merged: Vec::with_capacity(max),
            response: FphashResponse::default(),
        }
    }

    /// The device's counters; keep the `Arc` to read them after the device moved into its
    /// transport.
    pub fn stats(&self) -> Arc<FphashStats> {
        Arc::clone(&self.stats)
    }

    /// Serves one chain; returns the used length.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let too_long = collect_chain(chain, MAX_CHAIN_LEN, &mut self.descs);

        // The response goes to the writable descriptors, in chain order.
        let mut writable = 0u64;
        let mut writable_in_ram = true;
        for d in self.descs.iter().filter(|d| d.is_write_only()) {
            writable += u64::from(d.len());
            writable_in_ram &= mem.check_range(d.addr(), d.len() as usize);
        }
        let answerable = writable_in_ram && writable >= RESPONSE_HEADER_LEN as u64;

        // On success, `parse` checked that every descriptor is in guest RAM and that the
        // writable part can hold the response.
        let batch = match self.parse(mem, too_long, writable) {
            Ok(batch) => batch,
            Err(why) => {
                let n = bump(&self.stats.rejected_batches);
                if should_log(n) {
                    warn!("fphash: rejected batch: {why:?} ({n} rejected batches)");
                }
                self.response.batch_status = BATCH_BAD_REQUEST;
                return self.respond(mem, answerable, self.response.wire(0));
            }
        };
        self.check_and_merge(mem, &batch);

        self.response.batch_status = BATCH_OK;
        for (byte, status) in self.response.status.iter_mut().zip(&self.statuses) {
            *byte = status.as_byte();
        }
        let used = self.respond(mem, true, self.response.wire(self.statuses.len()));
        if used > 0 {
            bump(&self.stats.batches);
            self.stats.records.fetch_add(batch.nr_records as u64, Ordering::Relaxed);
            for &s in &self.statuses {
                bump(self.stats.status_counter(s));
            }
        }
        used
    }

    /// Validates the framing of the chain in `self.descs` and copies its readable part into
    /// `self.request`.
    fn parse(&mut self, mem: &GuestMemoryMmap, too_long: bool, writable: u64) -> Result<Batch, Reject> {
        let Some(last) = self.descs.last() else {
            return Err(Reject::EmptyChain);
        };
        if last.has_next() {
            return Err(Reject::BrokenChain);
        }
        if too_long {
            return Err(Reject::TooLong);
        }
        let split = self.descs.iter().position(|d| d.is_write_only()).unwrap_or(self.descs.len());
        let (readable, response) = self.descs.split_at(split);
        if response.iter().any(|d| !d.is_write_only()) {
            return Err(Reject::ReadableAfterWritable);
        }
        if let Some(d) = self.descs.iter().find(|d| !mem.check_range(d.addr(), d.len() as usize)) {
            return Err(Reject::OutsideRam { addr: d.addr().0, len: d.len() });
        }
        let total: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
        if total < HEADER_LEN as u64 || total > MAX_REQUEST_LEN as u64 {
            return Err(Reject::RequestLength { readable: total });
        }
        let mut copied = 0usize;
        for d in readable {
            let len = d.len() as usize;
            let Some(dst) = self.request.get_mut(copied..copied + len) else {
                return Err(Reject::RequestLength { readable: total });
            };
            if mem.read_slice(dst, d.addr()).is_err() {
                return Err(Reject::OutsideRam { addr: d.addr().0, len: d.len() });
            }
            copied += len;
        }

        let header: FphashHeader = from_wire(self.request.get(..HEADER_LEN).unwrap_or_default());
        let Some(kind) = ReportKind::from_wire(header.report_type) else {
            return Err(Reject::UnknownType(header.report_type));
        };
        let n = header.nr_records;
        if n == 0 || n > MAX_RECORDS {
            return Err(Reject::RecordCount(n));
        }
        if total != (HEADER_LEN + RECORD_LEN * n as usize) as u64 {
            return Err(Reject::RecordsLength { readable: total, nr_records: n });
        }
        if writable < (RESPONSE_HEADER_LEN as u64 + u64::from(n)) {
            return Err(Reject::ResponseTooShort { writable, nr_records: n });
        }
        Ok(Batch { kind, nr_records: n as usize })
    }

    /// Checks each record of a valid batch, hands the good ones to the merger and fills
    /// `self.statuses`.
    fn check_and_merge(&mut self, mem: &GuestMemoryMmap, batch: &Batch) {
        self.statuses.clear();
        self.reports.clear();
        self.report_index.clear();
        let end = HEADER_LEN + RECORD_LEN * batch.nr_records;
        let body = self.request.get(HEADER_LEN..end).unwrap_or_default();
        for (i, bytes) in body.chunks_exact(RECORD_LEN).enumerate() {
            let record: FphashRecord = from_wire(bytes);
            let status = if !record_shape_ok(batch.kind, &record) {
                Some(RecordStatus::BadRecord)
            } else if !page_in_ram(mem, record.gpa) {
                Some(RecordStatus::BadGpa)
            } else {
                None
            };
            match status {
                Some(bad) => {
                    let n = self.stats.status_counter(bad).load(Ordering::Relaxed) + 1;
                    if should_log(n) {
                        warn!(
                            "fphash: {bad:?} record: gpa {:#x}, flags {:#x}, reserved {:#x} \
                             ({n} such records)",
                            record.gpa, record.flags, record.reserved
                        );
                    }
                    self.statuses.push(bad);
                }
                None => {
                    // Placeholder, replaced by the merger's answer below.
                    self.statuses.push(RecordStatus::Off);
                    self.report_index.push(i);
                    // With F_HOST_HASH the hash field means nothing: it goes no further.
                    let hash =
                        if self.acked_features & F_HOST_HASH != 0 { [0; HASH_LEN] } else { record.hash };
                    self.reports.push(PageReport { gpa: record.gpa, hash });
                }
            }
        }
        if self.reports.is_empty() {
            return;
        }
        let fill = match batch.kind {
            ReportKind::Added => RecordStatus::Off,
            ReportKind::Removed => RecordStatus::Done,
        };
        let hashing = match batch.kind {
            ReportKind::Added if self.acked_features & F_HOST_HASH != 0 => {
                self.stats.host_hashed.fetch_add(self.reports.len() as u64, Ordering::Relaxed);
                Hashing::Host
            }
            _ => Hashing::Guest,
        };
        self.merged.clear();
        self.merged.resize(self.reports.len(), fill);
        self.merger.merge_batch(batch.kind, hashing, &self.reports, &mut self.merged);
        for (&i, &s) in self.report_index.iter().zip(&self.merged) {
            if let Some(slot) = self.statuses.get_mut(i) {
                *slot = s;
            }
        }
    }

    /// Writes `bytes` across the chain's writable descriptors (if `answerable`); returns the
    /// used length, 0 if nothing was written.
    fn respond(&self, mem: &GuestMemoryMmap, answerable: bool, bytes: &[u8]) -> u32 {
        if answerable && !bytes.is_empty() && write_out(mem, &self.descs, bytes) {
            // At most 4 + MAX_RECORDS bytes.
            return u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        }
        let n = bump(&self.stats.unanswered);
        if should_log(n) {
            warn!("fphash: chain returned without a response ({n} such chains)");
        }
        0
    }
}

/// Whether a record's flags and reserved field are valid for a batch of `kind`.
fn record_shape_ok(kind: ReportKind, record: &FphashRecord) -> bool {
    let flags_ok = match kind {
        ReportKind::Added => record.flags == FLAG_FILE_PAGE,
        ReportKind::Removed => record.flags & !FLAG_FILE_PAGE == 0,
    };
    flags_ok && record.reserved == 0
}

/// Whether `gpa` is page-aligned and its whole page lies in one guest RAM region.
fn page_in_ram(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return false;
    }
    let addr = GuestAddress(gpa);
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    region.to_region_addr(addr).is_some_and(|offset| region.len() - offset.0 >= PAGE_SIZE)
}

/// Writes `bytes` to the writable descriptors of `descs`, in order; false if they are too
/// short or a write fails.
fn write_out(mem: &GuestMemoryMmap, descs: &[Descriptor], bytes: &[u8]) -> bool {
    let mut rest = bytes;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        let (now, later) = rest.split_at(n);
        if mem.write_slice(now, d.addr()).is_err() {
            return false;
        }
        rest = later;
    }
    rest.is_empty()
}

impl VirtioDevice for FphashDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_HOST_HASH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes += 1;
        if should_log(self.config_writes) {
            warn!(
                "fphash: ignored write of {} bytes to read-only config offset {offset:#x} \
                 ({} such writes)",
                data.len(),
                self.config_writes
            );
        }
    }

    fn features_accepted(&mut self, acked_features: u64) {
        let host_hash = acked_features & F_HOST_HASH != 0;
        self.config.version = if host_hash { PROTOCOL_VERSION } else { PROTOCOL_VERSION_1 };
    }

    fn activate(&mut self, acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        if !queues_ready.first().copied().unwrap_or(false) {
            return Err(Error::QueueNotReady(0));
        }
        self.acked_features = acked_features;
        let who = if acked_features & F_HOST_HASH != 0 { "the host" } else { "the guest" };
        log::info!("fphash: driver ready; {who} hashes the reported pages");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if index != 0 {
            return false;
        }
        let stats = self.stats.clone();
        drain_queue(
            queue,
            mem,
            |chain| self.handle_chain(chain, mem),
            || {
                if should_log(bump(&stats.rejected_batches)) {
                    warn!("fphash: available ring index is invalid");
                }
            },
        )
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.config.version = PROTOCOL_VERSION_1;
    }
}

#[cfg(test)]
mod tests;
