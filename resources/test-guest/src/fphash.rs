//! A polling driver for samepage's page-hash device ("fphash"), protocol version 2 as
//! specified in `docs/fphash.md`: device ID 60, one report queue; each request is one
//! device-readable buffer (header + records) and one device-writable buffer (response). It
//! accepts `VIRTIO_FPHASH_F_HOST_HASH` only when asked to ([`Hashing::Host`]); otherwise it
//! accepts VERSION_1 only and is exactly a version-1 driver.

use core::fmt;
use core::mem::{offset_of, size_of};
use core::ptr::{addr_of, addr_of_mut};

use crate::virtio::{Error, Queue, QueueMem, Seg, Transport};

/// Virtio device ID of the page-hash device (docs/fphash.md, "Identification").
pub const DEVICE_ID_FPHASH: u32 = 60;

/// Configuration space offsets (docs/fphash.md, "Configuration space").
mod cfg {
    pub const MAX_RECORDS: u64 = 0x00;
    pub const PAGE_SIZE: u64 = 0x04;
    pub const HASH_ALG: u64 = 0x08;
    pub const VERSION: u64 = 0x0c;
}
/// `page_size` this driver understands.
pub const PAGE_SIZE: u64 = 4096;
/// `hash_alg` 1: BLAKE3, 32-byte output, default key and mode.
const HASH_ALG_BLAKE3: u32 = 1;
/// Config `version` for a driver without `F_HOST_HASH` (what version-1 drivers check for).
const PROTOCOL_VERSION_1: u32 = 1;
/// Config `version` once the driver accepted `F_HOST_HASH` (protocol version 2).
const PROTOCOL_VERSION_2: u32 = 2;
/// Feature bit 0, `VIRTIO_FPHASH_F_HOST_HASH`: records carry no hash; the host hashes the pages.
pub const F_HOST_HASH: u64 = 1 << 0;

/// Who hashes the reported pages (`testguest.hash=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    /// The guest: every record carries the page's BLAKE3 (version 1).
    Guest,
    /// The host, if the device offers `F_HOST_HASH` (else the guest).
    Host,
}

/// Request types (`fphash_header.type`).
pub mod kind {
    pub const ADDED: u32 = 1;
    pub const REMOVED: u32 = 2;
}
/// `fphash_record.flags` bit 0: the page holds clean file content.
pub const FLAG_FILE_PAGE: u32 = 1;

/// `fphash_response.batch_status`.
pub mod batch {
    pub const OK: u32 = 0;
    pub const BAD_REQUEST: u32 = 1;
}

/// Per-record status values.
pub mod status {
    pub const MERGED: u8 = 0;
    pub const ALREADY: u8 = 1;
    pub const MISMATCH: u8 = 2;
    pub const BAD_GPA: u8 = 3;
    pub const BAD_RECORD: u8 = 4;
    pub const NO_ROOM: u8 = 5;
    pub const OFF: u8 = 6;
    pub const DONE: u8 = 7;
    /// Number of defined statuses.
    pub const COUNT: usize = 8;
    /// Statuses an honest ADDED report of an unchanged page may get.
    pub fn honest_added(s: u8) -> bool {
        matches!(s, MERGED | ALREADY | NO_ROOM | OFF)
    }
}

/// BLAKE3 of `data` (`hash_alg` 1). One out-of-line copy keeps the image small.
#[inline(never)]
pub fn blake3(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// `struct fphash_header`, 8 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    pub kind: u32,
    pub nr_records: u32,
}

/// `struct fphash_record`, 48 bytes. Fields are stored little-endian (x86_64 is).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Record {
    pub gpa: u64,
    pub hash: [u8; 32],
    pub flags: u32,
    pub reserved: u32,
}

impl Record {
    /// An ADDED record for the page at `gpa` whose BLAKE3 is `hash`.
    pub fn added(gpa: u64, hash: [u8; 32]) -> Record {
        Record { gpa, hash, flags: FLAG_FILE_PAGE, reserved: 0 }
    }

    /// An ADDED record for the page at `gpa` with contents `page`.
    pub fn file_page(gpa: u64, page: &[u8]) -> Record {
        Record::added(gpa, blake3(page))
    }
}

/// Most records per batch this driver has room for; batches use `min(max_records, this)`.
pub const CAP_RECORDS: usize = 1024;
/// Header size on the wire.
pub const HEADER_BYTES: usize = 8;
/// Record size on the wire.
pub const RECORD_BYTES: usize = 48;

/// The device-readable request: header, then records (one more than [`CAP_RECORDS`] so that
/// an oversized batch can be sent on purpose).
#[repr(C)]
struct Request {
    header: Header,
    records: [Record; CAP_RECORDS + 1],
}

/// The device-writable response.
#[repr(C)]
struct Response {
    batch_status: u32,
    status: [u8; CAP_RECORDS + 1],
}

// The wire layout of docs/fphash.md, checked at compile time.
const _: () = {
    assert!(size_of::<Header>() == HEADER_BYTES);
    assert!(size_of::<Record>() == RECORD_BYTES);
    assert!(offset_of!(Record, gpa) == 0);
    assert!(offset_of!(Record, hash) == 8);
    assert!(offset_of!(Record, flags) == 40);
    assert!(offset_of!(Record, reserved) == 44);
    assert!(offset_of!(Request, records) == HEADER_BYTES);
    assert!(offset_of!(Response, status) == 4);
};

/// Request and response buffers of one device.
#[repr(C, align(4096))]
pub struct FphashMem {
    request: Request,
    response: Response,
}

/// What the device answered to a raw request.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub batch_status: u32,
    pub used_len: u32,
}

/// A driven page-hash device.
pub struct Fphash {
    /// The device's register window.
    pub base: u64,
    queue: Queue,
    mem: *mut FphashMem,
    /// `max_records` from the config space.
    pub device_max: u32,
    /// Records per batch this driver sends: `min(device_max, CAP_RECORDS)`.
    pub batch: usize,
    /// Whether `F_HOST_HASH` was negotiated: the device ignores the records' hash fields.
    pub host_hash: bool,
}

impl Fphash {
    /// Initializes the page-hash device at `base`, queue rings in `queue`, requests in `mem`;
    /// `hashing` says whether to accept `F_HOST_HASH` when the device offers it.
    ///
    /// # Safety
    /// `queue` and `mem` are identity-mapped and exclusively owned by this device.
    pub unsafe fn init(
        base: u64,
        queue: *mut QueueMem,
        mem: *mut FphashMem,
        hashing: Hashing,
    ) -> Result<Fphash, Error> {
        self_check()?;
        // Hashing::Guest accepts VERSION_1 only, as a version-1 driver does.
        let wanted = if hashing == Hashing::Host { F_HOST_HASH } else { 0 };
        let t = Transport::negotiate(base, DEVICE_ID_FPHASH, wanted)?;
        let host_hash = t.features & F_HOST_HASH != 0;
        match (host_hash, t.config32(cfg::VERSION)) {
            (false, PROTOCOL_VERSION_1) | (true, PROTOCOL_VERSION_2) => {}
            (false, _) => return Err(t.fail("config version is not 1")),
            (true, _) => return Err(t.fail("config version is not 2 with HOST_HASH accepted")),
        }
        if t.config32(cfg::PAGE_SIZE) as u64 != PAGE_SIZE {
            return Err(t.fail("config page_size is not 4096"));
        }
        if t.config32(cfg::HASH_ALG) != HASH_ALG_BLAKE3 {
            return Err(t.fail("config hash_alg is not 1 (BLAKE3)"));
        }
        let device_max = t.config32(cfg::MAX_RECORDS);
        if device_max == 0 {
            return Err(t.fail("config max_records is 0"));
        }
        // SAFETY: the caller's contract. A request is two descriptors.
        let queue = unsafe { t.setup_queue(0, queue, 2)? };
        t.driver_ok();
        let batch = (device_max as usize).min(CAP_RECORDS);
        Ok(Fphash { base, queue, mem, device_max, batch, host_hash })
    }

    /// The record slots of the next request.
    pub fn records(&mut self) -> &mut [Record; CAP_RECORDS + 1] {
        // SAFETY: `mem` is ours and no request is in flight between calls.
        unsafe { &mut *addr_of_mut!((*self.mem).request.records) }
    }

    /// The per-record statuses of the last response.
    pub fn statuses(&self) -> &[u8; CAP_RECORDS + 1] {
        // SAFETY: as for `records`.
        unsafe { &*addr_of!((*self.mem).response.status) }
    }

    /// Sends `nr` records (at most `batch`) of type `kind` and checks the response is a
    /// complete OK batch with one valid status per record (see [`Fphash::statuses`]).
    /// `poll` runs while waiting (see `Queue::run`).
    pub fn report(&mut self, kind: u32, nr: usize, poll: &mut dyn FnMut()) -> Result<(), Error> {
        if nr == 0 || nr > self.batch {
            return Err("batch size out of range");
        }
        let readable = HEADER_BYTES + RECORD_BYTES * nr;
        let a = self.send_raw(Header { kind, nr_records: nr as u32 }, readable, 4 + nr, poll)?;
        if a.batch_status != batch::OK {
            return Err("device rejected a well-formed batch");
        }
        if a.used_len as usize != 4 + nr {
            return Err("used length of an OK batch is not 4 + nr_records");
        }
        if self.statuses()[..nr].iter().any(|&s| s as usize >= status::COUNT) {
            return Err("device wrote an unknown record status");
        }
        Ok(())
    }

    /// Sends any header with `readable` bytes of request (header + records, at most the
    /// buffer) and `writable` bytes of response buffer. The response is pre-filled with 0xff.
    pub fn send_raw(
        &mut self,
        header: Header,
        readable: usize,
        writable: usize,
        poll: &mut dyn FnMut(),
    ) -> Result<Answer, Error> {
        if readable > size_of::<Request>()
            || writable > size_of::<Response>()
            || readable == 0
            || writable == 0
        {
            return Err("request or response larger than the driver's buffers");
        }
        let m = self.mem;
        // SAFETY: `mem` is ours (see `init`); the device reads the request and writes the
        // response only while `Queue::run` waits.
        unsafe {
            addr_of_mut!((*m).request.header).write_volatile(header);
            core::ptr::write_bytes(addr_of_mut!((*m).response) as *mut u8, 0xff, size_of::<Response>());
            let req = Seg { addr: addr_of!((*m).request) as u64, len: readable as u32, device_writes: false };
            let resp =
                Seg { addr: addr_of!((*m).response) as u64, len: writable as u32, device_writes: true };
            let used_len = self.queue.run(&[req, resp], poll)?;
            Ok(Answer { batch_status: addr_of!((*m).response.batch_status).read_volatile(), used_len })
        }
    }
}

/// Checks at run time that a record is encoded as docs/fphash.md lays it out, byte by byte.
pub fn self_check() -> Result<(), Error> {
    let mut hash = [0u8; 32];
    for (i, h) in hash.iter_mut().enumerate() {
        *h = 0xa0 ^ i as u8;
    }
    let r = Record { gpa: 0x0123_4567_89ab_c000, hash, flags: 0x0403_0201, reserved: 0x0807_0605 };
    // SAFETY: a plain-old-data struct without padding (size checked at compile time).
    let bytes: &[u8; RECORD_BYTES] = unsafe { &*(&r as *const Record as *const [u8; RECORD_BYTES]) };
    let mut want = [0u8; RECORD_BYTES];
    want[0..8].copy_from_slice(&0x0123_4567_89ab_c000u64.to_le_bytes());
    want[8..40].copy_from_slice(&hash);
    want[40..44].copy_from_slice(&0x0403_0201u32.to_le_bytes());
    want[44..48].copy_from_slice(&0x0807_0605u32.to_le_bytes());
    if *bytes != want {
        return Err("record encoding differs from docs/fphash.md");
    }
    Ok(())
}

/// Counts of per-record statuses.
#[derive(Default, Clone, Copy)]
pub struct Tally(pub [u64; status::COUNT]);

impl Tally {
    pub fn add(&mut self, statuses: &[u8]) {
        for &s in statuses {
            self.0[(s as usize).min(status::COUNT - 1)] += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// `merged <a> already <b> mismatch <c> bad_gpa <d> bad_record <e> no_room <f> off <g>`
/// (and ` done <h>` when REMOVED records were sent).
impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.0;
        write!(
            f,
            "merged {} already {} mismatch {} bad_gpa {} bad_record {} no_room {} off {}",
            t[0], t[1], t[2], t[3], t[4], t[5], t[6]
        )?;
        if t[7] > 0 {
            write!(f, " done {}", t[7])?;
        }
        Ok(())
    }
}
