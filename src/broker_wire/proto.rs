//! The wire protocol between a VMM and the broker (`samepage dedupd`), version 2, as
//! `docs/dedupd.md` specifies it: messages on a Unix `SOCK_SEQPACKET` socket, each a
//! [`Header`] and `count` entries of one fixed-size type, all little-endian. Both sides decode
//! with [`decode`], which checks every length and limit before anything is read.

use vm_memory::ByteValued;

use crate::dedup::words::PAGE_SIZE;

/// `Header::magic`: "SPDD".
pub const MAGIC: u32 = u32::from_le_bytes(*b"SPDD");
/// `Header::version`: the protocol version (2: GUEST_STATS; a version-1 peer is refused
/// BAD_VERSION).
pub const VERSION: u16 = 2;
/// Longest message either side sends or accepts (a STORE of [`MAX_STORE_PAGES`] pages).
pub const MAX_MESSAGE: usize = 160 * 1024;
/// Most hashes in a LOOKUP, and most slots in a RELEASE.
pub const MAX_LOOKUP: usize = 256;
/// Most pages in a STORE.
pub const MAX_STORE_PAGES: usize = 32;
/// Most bytes of text in one STATUS or CHECK reply message (the text spans several).
pub const MAX_TEXT_CHUNK: usize = 64 * 1024;
/// Longest domain name and VM label (bytes, NUL-padded on the wire).
pub const NAME_LEN: usize = 64;
/// `StoreEntry::hint*` value for "no hint".
pub const NO_HINT: u64 = u64::MAX;
/// `StoreEntry::flags` bit 0: try the slot after the previous entry's first.
pub const FOLLOWS_PREVIOUS: u32 = 1;
/// Statistics a [`GuestStats`] entry has room for: the virtio-balloon tags 0 to 15.
pub const GUEST_STAT_TAGS: usize = 16;

/// Message kinds (`Header::kind`).
pub mod kind {
    /// Client → broker: join a domain ([`super::Hello`]).
    pub const HELLO: u16 = 1;
    /// Client → broker: look hashes up, taking a reference on each hit ([`super::LookupEntry`]).
    pub const LOOKUP: u16 = 2;
    /// Client → broker: offer pages ([`super::StoreEntry`]).
    pub const STORE: u16 = 3;
    /// Client → broker: drop references ([`super::ReleaseEntry`]).
    pub const RELEASE: u16 = 4;
    /// Client → broker: the VMM's own figures, for `status` ([`super::ClientStats`]).
    pub const STATS: u16 = 5;
    /// Anyone → broker: the broker's figures as JSON text.
    pub const STATUS: u16 = 6;
    /// Anyone → broker: verify every stored page and every reference count, as JSON text.
    pub const CHECK: u16 = 7;
    /// Client → broker: its guest's latest balloon statistics, for `status`
    /// ([`super::GuestStats`]).
    pub const GUEST_STATS: u16 = 8;
    /// Broker → client: reply to HELLO ([`super::Welcome`] and the store's descriptor).
    pub const WELCOME: u16 = 0x81;
    /// Broker → client: reply to LOOKUP and STORE ([`super::SlotReply`] per entry).
    pub const SLOTS: u16 = 0x82;
    /// Broker → client: reply to RELEASE ([`super::StatusReply`] per entry).
    pub const RELEASED: u16 = 0x84;
    /// Broker → client: reply to STATS and GUEST_STATS (no entries).
    pub const ACK: u16 = 0x85;
    /// Broker → client: a piece of the reply to STATUS or CHECK (bytes of text; an empty
    /// piece ends it).
    pub const TEXT: u16 = 0x86;
    /// Broker → client: the request was refused ([`super::ErrorReply`]).
    pub const ERROR: u16 = 0xff;
}

/// `SlotReply::status` and `StatusReply::status` values.
pub mod status {
    /// A reference was taken on a slot that already held the page (LOOKUP hit; STORE proven
    /// by a byte compare).
    pub const OK: u32 = 0;
    /// LOOKUP: the hash is not indexed.
    pub const MISS: u32 = 1;
    /// STORE: the bytes do not hash to the claimed hash, or differ from the page indexed
    /// under it.
    pub const MISMATCH: u32 = 2;
    /// STORE: the store has no room (or the client reached its reference limit).
    pub const FULL: u32 = 3;
    /// STORE: the page was copied into a new slot, with a reference for the client.
    pub const NEW: u32 = 4;
    /// RELEASE: the slot was released.
    pub const RELEASED: u32 = 0;
    /// RELEASE: the client holds no reference on that slot.
    pub const NOT_HELD: u32 = 5;
}

/// `ErrorReply::code` values.
pub mod error {
    /// Malformed: length, magic, unknown kind, or entries that do not fit the kind.
    pub const BAD_MESSAGE: u32 = 1;
    /// A protocol version the broker does not speak (`detail`: the version it speaks).
    pub const BAD_VERSION: u32 = 2;
    /// The client's user may not join that domain (or the name is invalid).
    pub const NOT_ALLOWED: u32 = 3;
    /// LOOKUP, STORE, RELEASE or STATS before HELLO, or a second HELLO.
    pub const NO_SESSION: u32 = 4;
    /// More entries than the kind allows.
    pub const TOO_MANY: u32 = 5;
    /// The broker serves as many clients as it may.
    pub const BUSY: u32 = 6;
    /// GUEST_STATS sooner after the previous one than the broker takes them (`detail`: the
    /// least interval, in ms).
    pub const TOO_SOON: u32 = 7;
}

/// Every message starts with this (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`VERSION`].
    pub version: u16,
    /// One of [`kind`].
    pub kind: u16,
    /// Chosen by the client; the broker's reply carries the request's.
    pub seq: u32,
    /// Entries that follow.
    pub count: u32,
}

/// HELLO's entry (144 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`VERSION`] (the version the client speaks).
    pub protocol: u32,
    /// 0.
    pub flags: u32,
    /// Pages of guest RAM the client may map: the most references it may hold.
    pub ram_pages: u64,
    /// Domain to join, NUL-padded; empty for the user's own domain.
    pub domain: [u8; NAME_LEN],
    /// The VM's name, for `status`, NUL-padded.
    pub label: [u8; NAME_LEN],
}

/// WELCOME's entry (88 bytes); the message carries the store's memfd (read-only) as
/// `SCM_RIGHTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's id for this client.
    pub client: u64,
    /// The store's most slots: map this many pages of the descriptor.
    pub max_slots: u64,
    /// 4096.
    pub page_size: u32,
    /// 0.
    pub reserved: u32,
    /// The domain joined, NUL-padded.
    pub domain: [u8; NAME_LEN],
}

/// LOOKUP's entry: a BLAKE3 hash (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupEntry {
    /// The hash.
    pub hash: [u8; 32],
}

/// STORE's entry (4152 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreEntry {
    /// The BLAKE3 the client claims for `page` (only a lookup key).
    pub hash: [u8; 32],
    /// Slots to try first for a new page, or [`NO_HINT`].
    pub hint0: u64,
    /// See `hint0`.
    pub hint1: u64,
    /// [`FOLLOWS_PREVIOUS`] or 0.
    pub flags: u32,
    /// 0.
    pub reserved: u32,
    /// The page.
    pub page: [u8; PAGE_SIZE],
}

/// A slot, or why there is none (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotReply {
    /// One of [`status`].
    pub status: u32,
    /// 0.
    pub reserved: u32,
    /// The slot (OK, NEW).
    pub slot: u64,
}

/// RELEASE's entry (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseEntry {
    /// The slot.
    pub slot: u64,
}

/// RELEASED's entry (4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusReply {
    /// [`status::RELEASED`] or [`status::NOT_HELD`].
    pub status: u32,
}

/// STATS's entry (64 bytes): what the VMM counts of its own VM (also its JSON in `status`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientStats {
    /// Page reports received from the guest.
    pub reported: u64,
    /// Reports merged.
    pub merged: u64,
    /// Reports of pages merged already.
    pub already: u64,
    /// Reports refused: hash or bytes differ.
    pub mismatch: u64,
    /// Reports not merged: no room, or no broker.
    pub no_room: u64,
    /// Merged pages copied on write since.
    pub cow_breaks: u64,
    /// Guest pages mapping the store now.
    pub mapped_pages: u64,
    /// VMAs the guest RAM costs.
    pub vmas: u64,
}

/// GUEST_STATS's entry (136 bytes): the guest's latest virtio-balloon memory statistics, as
/// its driver reported them (virtio 1.2 §5.5.6.4; tags 10 to 15 are Linux's). The guest's
/// word, not a measure.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Bit `t` set: `values[t]` holds the statistic of tag `t`; bits 16 to 31 are 0.
    pub present: u32,
    /// 0.
    pub reserved: u32,
    /// By tag; 0 where `present` has no bit.
    pub values: [u64; GUEST_STAT_TAGS],
}

/// ERROR's entry (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorReply {
    /// One of [`error`].
    pub code: u32,
    /// Code-specific (the broker's version for BAD_VERSION, the offending count, ...).
    pub detail: u32,
}

impl Default for Hello {
    fn default() -> Self {
        Hello {
            protocol: VERSION as u32,
            flags: 0,
            ram_pages: 0,
            domain: [0; NAME_LEN],
            label: [0; NAME_LEN],
        }
    }
}

impl Default for Welcome {
    fn default() -> Self {
        Welcome { client: 0, max_slots: 0, page_size: PAGE_SIZE as u32, reserved: 0, domain: [0; NAME_LEN] }
    }
}

impl Default for StoreEntry {
    fn default() -> Self {
        StoreEntry {
            hash: [0; 32],
            hint0: NO_HINT,
            hint1: NO_HINT,
            flags: 0,
            reserved: 0,
            page: [0; PAGE_SIZE],
        }
    }
}

// SAFETY: this and the impls below are for plain-old-data `repr(C)` structs of integers and
// byte arrays without padding (sizes checked below), valid for any bit pattern.
unsafe impl ByteValued for Header {}
// SAFETY: as above.
unsafe impl ByteValued for Hello {}
// SAFETY: as above.
unsafe impl ByteValued for Welcome {}
// SAFETY: as above.
unsafe impl ByteValued for LookupEntry {}
// SAFETY: as above.
unsafe impl ByteValued for StoreEntry {}
// SAFETY: as above.
unsafe impl ByteValued for SlotReply {}
// SAFETY: as above.
unsafe impl ByteValued for ReleaseEntry {}
// SAFETY: as above.
unsafe impl ByteValued for StatusReply {}
// SAFETY: as above.
unsafe impl ByteValued for ClientStats {}
// SAFETY: as above.
unsafe impl ByteValued for GuestStats {}
// SAFETY: as above.
unsafe impl ByteValued for ErrorReply {}

const _: () = {
    assert!(size_of::<Header>() == 16);
    assert!(size_of::<Hello>() == 16 + 2 * NAME_LEN);
    assert!(size_of::<Welcome>() == 24 + NAME_LEN);
    assert!(size_of::<LookupEntry>() == 32);
    assert!(size_of::<StoreEntry>() == 56 + PAGE_SIZE);
    assert!(size_of::<SlotReply>() == 16);
    assert!(size_of::<ReleaseEntry>() == 8);
    assert!(size_of::<StatusReply>() == 4);
    assert!(size_of::<ClientStats>() == 64);
    assert!(size_of::<GuestStats>() == 8 + 8 * GUEST_STAT_TAGS);
    assert!(size_of::<ErrorReply>() == 8);
    assert!(size_of::<Header>() + MAX_STORE_PAGES * size_of::<StoreEntry>() <= MAX_MESSAGE);
    assert!(size_of::<Header>() + MAX_TEXT_CHUNK <= MAX_MESSAGE);
};

/// Why a message does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header, longer than [`MAX_MESSAGE`], or not a header plus `count`
    /// whole entries.
    #[error("message of {len} bytes does not fit its header")]
    Length {
        /// The message's length.
        len: usize,
    },
    /// The magic is not "SPDD".
    #[error("bad magic {0:#x}")]
    Magic(u32),
    /// Another protocol version.
    #[error("protocol version {0}, not {VERSION}")]
    Version(u16),
    /// More entries than the kind allows.
    #[error("{count} entries, at most {max}")]
    TooMany {
        /// The entries sent.
        count: u32,
        /// The limit.
        max: usize,
    },
}

/// Most entries a kind may carry.
pub fn max_entries(kind: u16) -> usize {
    match kind {
        kind::HELLO | kind::WELCOME | kind::STATS | kind::GUEST_STATS | kind::ERROR => 1,
        kind::LOOKUP | kind::RELEASE | kind::SLOTS | kind::RELEASED => MAX_LOOKUP,
        kind::STORE => MAX_STORE_PAGES,
        kind::TEXT => MAX_TEXT_CHUNK,
        _ => 0,
    }
}

/// Checks a received message: its header, and that it holds exactly `count` entries of
/// `entry_size` bytes (at most [`max_entries`] of its kind). Returns the header and the
/// entries' bytes.
pub fn decode(message: &[u8], entry_size: usize) -> Result<(Header, &[u8]), DecodeError> {
    let len = message.len();
    if len < size_of::<Header>() || len > MAX_MESSAGE {
        return Err(DecodeError::Length { len });
    }
    let mut header = Header::default();
    header.as_mut_slice().copy_from_slice(&message[..size_of::<Header>()]);
    if header.magic != MAGIC {
        return Err(DecodeError::Magic(header.magic));
    }
    if header.version != VERSION {
        return Err(DecodeError::Version(header.version));
    }
    let max = max_entries(header.kind);
    if header.count as usize > max {
        return Err(DecodeError::TooMany { count: header.count, max });
    }
    let body = &message[size_of::<Header>()..];
    if (header.count as usize).checked_mul(entry_size) != Some(body.len()) {
        return Err(DecodeError::Length { len });
    }
    Ok((header, body))
}

/// The header of a received message, without its entries checked (to pick the entry type).
pub fn peek(message: &[u8]) -> Option<Header> {
    let mut header = Header::default();
    header.as_mut_slice().copy_from_slice(message.get(..size_of::<Header>())?);
    Some(header)
}

/// The `i`th entry of a decoded body (copied out: entries are not aligned on the wire).
pub fn entry<T: ByteValued + Default>(body: &[u8], i: usize) -> Option<T> {
    let size = size_of::<T>();
    let bytes = body.get(i.checked_mul(size)?..i.checked_add(1)?.checked_mul(size)?)?;
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(bytes);
    Some(value)
}

/// Appends a message of `entries` to `out` (cleared first).
pub fn encode<T: ByteValued>(out: &mut Vec<u8>, kind: u16, seq: u32, entries: &[T]) {
    out.clear();
    let header = Header { magic: MAGIC, version: VERSION, kind, seq, count: entries.len() as u32 };
    out.extend_from_slice(header.as_slice());
    for e in entries {
        out.extend_from_slice(e.as_slice());
    }
}

/// A name as the wire carries it: at most [`NAME_LEN`] bytes, NUL-padded.
pub fn name_bytes(name: &str) -> Option<[u8; NAME_LEN]> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_LEN || bytes.contains(&0) {
        return None;
    }
    let mut out = [0u8; NAME_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    Some(out)
}

/// A NUL-padded name from the wire, if it is UTF-8 without control characters.
pub fn name_str(bytes: &[u8; NAME_LEN]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if bytes[end..].iter().any(|&b| b != 0) {
        return None;
    }
    let name = std::str::from_utf8(&bytes[..end]).ok()?;
    (!name.chars().any(char::is_control)).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_every_length_is_checked() {
        let mut buf = Vec::new();
        let entries = [LookupEntry { hash: [7; 32] }, LookupEntry { hash: [9; 32] }];
        encode(&mut buf, kind::LOOKUP, 42, &entries);
        assert_eq!(buf.len(), 16 + 64);
        let (h, body) = decode(&buf, size_of::<LookupEntry>()).unwrap();
        assert_eq!((h.kind, h.seq, h.count), (kind::LOOKUP, 42, 2));
        assert_eq!(entry::<LookupEntry>(body, 1), Some(entries[1]));
        assert_eq!(entry::<LookupEntry>(body, 2), None);
        // Truncated, over-long, wrong entry size, wrong magic, wrong version, too many.
        assert!(matches!(decode(&buf[..buf.len() - 1], 32), Err(DecodeError::Length { .. })));
        assert!(matches!(decode(&buf[..10], 32), Err(DecodeError::Length { .. })));
        assert!(matches!(decode(&buf, 48), Err(DecodeError::Length { .. })));
        assert!(matches!(decode(&vec![0u8; MAX_MESSAGE + 1], 1), Err(DecodeError::Length { .. })));
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(matches!(decode(&bad, 32), Err(DecodeError::Magic(_))));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, 32), Err(DecodeError::Version(9)));
        bad[4] = 1;
        assert_eq!(decode(&bad, 32), Err(DecodeError::Version(1)), "version 1 is not spoken");
        let many = vec![LookupEntry::default(); MAX_LOOKUP + 1];
        encode(&mut bad, kind::LOOKUP, 1, &many);
        assert!(matches!(decode(&bad, 32), Err(DecodeError::TooMany { .. })));
        encode(&mut bad, 0x77, 1, &entries);
        assert!(matches!(decode(&bad, 32), Err(DecodeError::TooMany { max: 0, .. })));
    }

    #[test]
    fn entry_past_any_body_is_none() {
        assert_eq!(entry::<u8>(&[1, 2], usize::MAX), None);
        assert_eq!(entry::<ReleaseEntry>(&[0; 8], usize::MAX), None);
    }

    #[test]
    fn names_are_bounded_and_clean() {
        assert_eq!(name_str(&name_bytes("ci-shared").unwrap()), Some("ci-shared"));
        assert!(name_bytes(&"x".repeat(NAME_LEN + 1)).is_none());
        assert!(name_bytes("a\0b").is_none());
        let mut raw = name_bytes("ab").unwrap();
        raw[5] = b'x';
        assert_eq!(name_str(&raw), None, "bytes after the NUL");
        assert_eq!(name_str(&name_bytes("a\nb").unwrap()), None);
    }
}
