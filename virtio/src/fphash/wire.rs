//! The fphash wire format (`docs/fphash.md`, protocol version 2: version 1 plus the
//! [`F_HOST_HASH`] feature), field by field: identification and features, the configuration
//! layout, `struct fphash_header`, `struct fphash_record`, `struct fphash_response`, the
//! statuses; and the parsing of one batch from guest memory, which checks the chain's framing
//! before any record is read.
//!
//! Guest input is hostile: nothing here panics on a descriptor or a record; a rejected batch
//! says why ([`Reject`]) for the device to count and log.

use std::mem::offset_of;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Virtio device ID of fphash: 60 (0x3c), in the non-standard range that counts down from 63
/// (crosvm uses 63, 62 and 61). `docs/fphash.md`, "Identification".
pub const DEVICE_ID: u32 = 60;
/// Most records in one batch (config `max_records`).
pub const MAX_RECORDS: u32 = 256;
/// Size of a reported page (config `page_size`); GPAs must be aligned to it.
pub use crate::PAGE_SIZE;
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
/// Device-specific feature bit 1, `VIRTIO_FPHASH_F_VM_GENERATION`: the configuration's
/// `vm_generation` is an ID the host makes anew for every start of the VM and changes, with a
/// configuration change notification, when the VM is restored from a snapshot (the guest
/// reseeds its RNG then: `docs/fphash.md`, "VM generation").
pub const F_VM_GENERATION: u64 = 1 << 1;
/// Length of the configuration's `vm_generation`.
pub const VM_GENERATION_LEN: usize = 16;
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
    /// `vm_generation` (0x10): the VM generation ID ([`F_VM_GENERATION`]).
    pub vm_generation: [u8; VM_GENERATION_LEN],
}

/// Offset of `max_records` (le32) in the configuration space.
pub const CONFIG_MAX_RECORDS: usize = offset_of!(FphashConfig, max_records);
/// Offset of `page_size` (le32) in the configuration space.
pub const CONFIG_PAGE_SIZE: usize = offset_of!(FphashConfig, page_size);
/// Offset of `hash_alg` (le32) in the configuration space.
pub const CONFIG_HASH_ALG: usize = offset_of!(FphashConfig, hash_alg);
/// Offset of `version` (le32) in the configuration space.
pub const CONFIG_VERSION: usize = offset_of!(FphashConfig, version);
/// Offset of `vm_generation` (16 bytes) in the configuration space.
pub const CONFIG_VM_GENERATION: usize = offset_of!(FphashConfig, vm_generation);
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
    assert!(size_of::<FphashConfig>() == 0x20);
    assert!(offset_of!(FphashConfig, max_records) == 0x00);
    assert!(offset_of!(FphashConfig, page_size) == 0x04);
    assert!(offset_of!(FphashConfig, hash_alg) == 0x08);
    assert!(offset_of!(FphashConfig, version) == 0x0c);
    assert!(offset_of!(FphashConfig, vm_generation) == 0x10);
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

/// Why a batch is `BAD_REQUEST`; for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reject {
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
pub(super) struct Batch {
    /// What the batch reports.
    pub(super) kind: ReportKind,
    /// How many records follow the header (1 ..= [`MAX_RECORDS`]).
    pub(super) nr_records: usize,
}

impl Batch {
    /// The batch's records, decoded from the `request` that [`parse_batch`] filled.
    pub(super) fn records<'a>(&self, request: &'a [u8]) -> impl Iterator<Item = FphashRecord> + 'a {
        let end = HEADER_LEN + RECORD_LEN * self.nr_records;
        request.get(HEADER_LEN..end).unwrap_or_default().chunks_exact(RECORD_LEN).map(from_wire)
    }
}

/// Validates the framing of a chain (`descs`, collected with [`MAX_CHAIN_LEN`]; `too_long` if
/// it had more; `writable` bytes in its device-writable part) and copies its readable part into
/// `request` ([`MAX_REQUEST_LEN`] bytes).
pub(super) fn parse_batch(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    too_long: bool,
    writable: u64,
    request: &mut [u8],
) -> Result<Batch, Reject> {
    let Some(last) = descs.last() else {
        return Err(Reject::EmptyChain);
    };
    if last.has_next() {
        return Err(Reject::BrokenChain);
    }
    if too_long {
        return Err(Reject::TooLong);
    }
    let split = descs.iter().position(|d| d.is_write_only()).unwrap_or(descs.len());
    let (readable, response) = descs.split_at(split);
    if response.iter().any(|d| !d.is_write_only()) {
        return Err(Reject::ReadableAfterWritable);
    }
    if let Some(d) = descs.iter().find(|d| !mem.check_range(d.addr(), d.len() as usize)) {
        return Err(Reject::OutsideRam { addr: d.addr().0, len: d.len() });
    }
    let total: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
    if total < HEADER_LEN as u64 || total > MAX_REQUEST_LEN as u64 {
        return Err(Reject::RequestLength { readable: total });
    }
    let mut copied = 0usize;
    for d in readable {
        let len = d.len() as usize;
        let Some(dst) = request.get_mut(copied..copied + len) else {
            return Err(Reject::RequestLength { readable: total });
        };
        if mem.read_slice(dst, d.addr()).is_err() {
            return Err(Reject::OutsideRam { addr: d.addr().0, len: d.len() });
        }
        copied += len;
    }

    let header: FphashHeader = from_wire(request.get(..HEADER_LEN).unwrap_or_default());
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

/// Whether a record's flags and reserved field are valid for a batch of `kind`.
pub(super) fn record_shape_ok(kind: ReportKind, record: &FphashRecord) -> bool {
    let flags_ok = match kind {
        ReportKind::Added => record.flags == FLAG_FILE_PAGE,
        ReportKind::Removed => record.flags & !FLAG_FILE_PAGE == 0,
    };
    flags_ok && record.reserved == 0
}
