//! The virtio-blk request format (virtio 1.2 §5.2.4 and §5.2.6): the request header, the
//! status byte, the configuration layout and the limits the device advertises; and the parsing
//! of one request's descriptor chain, framed the way Linux frames it (the header alone in the
//! first descriptor, the data in the middle ones, the status byte alone in the last), into what
//! the device executes or the reason it refuses it.
//!
//! Guest input is hostile: nothing here panics on a descriptor; each refusal names its
//! [`Rejection`], which the device counts.

use std::mem::offset_of;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Sector size of virtio-blk addressing: capacity and request sectors count 512-byte units
/// whatever the block size (virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Most data descriptors in one request (config `seg_max`, VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = 128;
/// Largest data descriptor (config `size_max`, VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Largest request: [`SEG_MAX`] × [`SIZE_MAX`] = 8 MiB.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Length of the request header, [`RequestHeader`].
pub const HEADER_LEN: u32 = size_of::<RequestHeader>() as u32;
/// Length of the id GET_ID returns (virtio 1.2 §5.2.6: 20 bytes, NUL-padded).
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Most descriptors in an acceptable chain: header, data, status.
pub(super) const MAX_CHAIN_LEN: usize = SEG_MAX as usize + 2;

/// The request header: `struct virtio_blk_req` up to its data (virtio 1.2 §5.2.6; Linux's
/// `struct virtio_blk_outhdr`), alone in a request's first descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// `type` (le32 at 0): `VIRTIO_BLK_T_IN`, `_OUT`, `_FLUSH`, `_GET_ID`, ...
    pub request_type: u32,
    /// `reserved` (le32 at 4).
    pub reserved: u32,
    /// `sector` (le64 at 8): where an IN or OUT starts, in 512-byte units.
    pub sector: u64,
}

/// The request's last field, `u8 status` of `struct virtio_blk_req` (virtio 1.2 §5.2.6),
/// alone in a request's last descriptor, which is device-writable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestStatus {
    /// `VIRTIO_BLK_S_OK`, `_IOERR` or `_UNSUPP`.
    pub status: u8,
}

/// `struct virtio_blk_geometry` (virtio 1.2 §5.2.4); VIRTIO_BLK_F_GEOMETRY is not offered,
/// so it reads as zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    /// `cylinders` (le16).
    pub cylinders: u16,
    /// `heads`.
    pub heads: u8,
    /// `sectors`.
    pub sectors: u8,
}

/// The configuration we expose: `struct virtio_blk_config` (virtio 1.2 §5.2.4) up to and
/// including `blk_size`, which stays 0 as VIRTIO_BLK_F_BLK_SIZE is not offered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `capacity` (le64 at 0): the disk's size in 512-byte sectors.
    pub capacity: u64,
    /// `size_max` (le32 at 8): [`SIZE_MAX`] (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// `seg_max` (le32 at 12): [`SEG_MAX`] (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// `geometry` (at 16).
    pub geometry: Geometry,
    /// `blk_size` (le32 at 20).
    pub blk_size: u32,
}

// The integer fields hold the wire's little-endian values as they are.
const _: () = assert!(cfg!(target_endian = "little"), "virtio-blk wire types need a little-endian host");
// The layouts of virtio 1.2 §5.2.4 and §5.2.6, field by field, without padding.
const _: () = {
    assert!(size_of::<RequestHeader>() == 16);
    assert!(offset_of!(RequestHeader, request_type) == 0);
    assert!(offset_of!(RequestHeader, reserved) == 4);
    assert!(offset_of!(RequestHeader, sector) == 8);
    assert!(size_of::<RequestStatus>() == 1);
    assert!(size_of::<Geometry>() == 4);
    assert!(offset_of!(Geometry, heads) == 2);
    assert!(offset_of!(Geometry, sectors) == 3);
    assert!(size_of::<Config>() == 24);
    assert!(offset_of!(Config, capacity) == 0);
    assert!(offset_of!(Config, size_max) == 8);
    assert!(offset_of!(Config, seg_max) == 12);
    assert!(offset_of!(Config, geometry) == 16);
    assert!(offset_of!(Config, blk_size) == 20);
};

// SAFETY: `repr(C)` structs of integers (and of `Geometry`) whose size is the sum of their
// fields' (checked above): no padding, and every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}
// SAFETY: as for `RequestHeader`.
unsafe impl ByteValued for RequestStatus {}
// SAFETY: as for `RequestHeader`.
unsafe impl ByteValued for Geometry {}
// SAFETY: as for `RequestHeader`.
unsafe impl ByteValued for Config {}

/// Request status values (virtio 1.2 §5.2.6), as the byte the device writes.
pub(super) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a request failed; each reason has its counter in
/// [`BlockStats`](super::counters::BlockStats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rejection {
    MalformedChain,
    BadHeader,
    BadDataDescriptor,
    OutOfRange,
    ReadOnly,
    Io,
}

/// How a request fails.
pub(super) enum Failure {
    /// Unknown request type: `VIRTIO_BLK_S_UNSUPP`.
    Unsupported,
    /// Invalid request or I/O error: `VIRTIO_BLK_S_IOERR`, counted under the reason.
    Rejected(Rejection, String),
}

/// A refused request, for `?` and `return`.
pub(super) fn fail<T>(why: Rejection, detail: String) -> Result<T, Failure> {
    Err(Failure::Rejected(why, detail))
}

/// A validated IN or OUT request.
pub(super) struct Transfer {
    /// Where it starts in the image, in bytes.
    pub(super) offset: u64,
    /// How many bytes it moves.
    pub(super) len: u64,
}

/// The chain's status descriptor (`descs` in chain order): the last of at least two, ending the
/// chain, device-writable, one byte, in guest RAM. `None`: the request cannot be answered.
pub(super) fn status_descriptor(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Option<Descriptor> {
    descs.last().copied().filter(|d| {
        !d.has_next() && d.is_write_only() && d.len() == 1 && descs.len() >= 2 && mem.check_range(d.addr(), 1)
    })
}

/// The request header, from the chain's first descriptor: alone in it (exactly [`HEADER_LEN`]
/// bytes), device-readable, in guest RAM.
pub(super) fn read_header(mem: &GuestMemoryMmap, header: Descriptor) -> Result<RequestHeader, Failure> {
    if header.is_write_only() || header.len() != HEADER_LEN {
        return fail(
            Rejection::BadHeader,
            format!("header descriptor of {} bytes, writable {}", header.len(), header.is_write_only()),
        );
    }
    let Ok(request_header) = mem.read_obj(header.addr()) else {
        return fail(Rejection::BadHeader, format!("header at {:#x} outside guest RAM", header.addr().0));
    };
    Ok(request_header)
}

/// Checks an IN/OUT request's data descriptors and range on a disk of `capacity` bytes.
pub(super) fn validate_transfer(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    is_read: bool,
    sector: u64,
    capacity: u64,
) -> Result<Transfer, (Rejection, String)> {
    let mut len = 0u64;
    for d in data {
        // An IN request's buffers are written by the device, an OUT request's read.
        if d.is_write_only() != is_read || d.len() > SIZE_MAX || !mem.check_range(d.addr(), d.len() as usize)
        {
            return Err((
                Rejection::BadDataDescriptor,
                format!(
                    "data descriptor at {:#x}, {} bytes, writable {} for a {}",
                    d.addr().0,
                    d.len(),
                    d.is_write_only(),
                    if is_read { "read" } else { "write" }
                ),
            ));
        }
        len += u64::from(d.len());
    }
    // `data` has at most SEG_MAX descriptors of at most SIZE_MAX bytes: `len` cannot
    // exceed MAX_REQUEST_BYTES, and the sum above cannot overflow.
    let range = sector.checked_mul(SECTOR_SIZE).and_then(|offset| Some((offset, offset.checked_add(len)?)));
    match range {
        Some((offset, end)) if end <= capacity && len.is_multiple_of(SECTOR_SIZE) => {
            Ok(Transfer { offset, len })
        }
        _ => Err((
            Rejection::OutOfRange,
            format!("{len} bytes at sector {sector} on a disk of {} sectors", capacity / SECTOR_SIZE),
        )),
    }
}
