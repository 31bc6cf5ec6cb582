//! The broker's wire protocol (`src/broker_wire/proto.rs`, `docs/dedupd.md`): `decode`, `peek`,
//! `entry`, `name_bytes` and `name_str` on messages a client or the broker could send, most of
//! them well-formed (`encode`d from typed entries), some with a field or the length changed;
//! and the GUEST_STATS entry's check (`src/broker_wire/guest_stats.rs`) on what decodes.
//!
//! Checked: a well-formed message within the limits decodes to its header and entries, and
//! each entry reads back as sent; `decode` accepts exactly a header plus `count` whole entries
//! within the kind's limit and `MAX_MESSAGE`; `peek` agrees with `decode`; names round-trip
//! and a decoded name is clean; a GUEST_STATS entry passes its check exactly when its layout
//! is clean and its sizes are possible, and one that passes converts to the balloon's
//! statistics and back unchanged.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage::broker_wire::guest_stats::{check, from_memory_stats, to_memory_stats};
use samepage::broker_wire::proto::{
    decode, encode, entry, kind, max_entries, name_bytes, name_str, ClientStats, DecodeError, ErrorReply,
    GuestStats, Header, Hello, LookupEntry, ReleaseEntry, SlotReply, StatusReply, StoreEntry, Welcome,
    GUEST_STAT_TAGS, MAGIC, MAX_MESSAGE, NAME_LEN, VERSION,
};
use samepage_fuzz::counted;
use vm_memory::ByteValued;

const HEADER_LEN: usize = size_of::<Header>();

#[derive(Arbitrary, Debug)]
struct Input {
    seq: u32,
    body: Body,
    /// Changes apply when this is 192 or more.
    fault_roll: u8,
    faults: Vec<Fault>,
    /// Decode as this kind's entry size instead of the right one, when 224 or more.
    size_roll: u8,
    size_kind: u16,
    names: Vec<String>,
    raw_name: [u8; 16],
    /// The guest RAM a GUEST_STATS is checked against, in pages.
    ram_pages: u32,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Hello {
        ram_pages: u64,
        domain: String,
        label: String,
    },
    Welcome {
        client: u64,
        max_slots: u64,
    },
    Lookup(#[arbitrary(with = counted::<_, 0, 300>)] Vec<[u8; 32]>),
    Store(#[arbitrary(with = counted::<_, 0, 40>)] Vec<(u8, u64, u64, u32)>),
    Release(#[arbitrary(with = counted::<_, 0, 300>)] Vec<u64>),
    Stats([u64; 8]),
    /// `present`, `reserved` and the values; built clean (absent values 0, no reserved bit)
    /// unless `raw`.
    GuestStats {
        present: u16,
        raw: Option<(u32, u32)>,
        values: [u64; GUEST_STAT_TAGS],
    },
    Status,
    Check,
    Slots(#[arbitrary(with = counted::<_, 0, 300>)] Vec<(u32, u64)>),
    Released(#[arbitrary(with = counted::<_, 0, 300>)] Vec<u32>),
    Ack,
    /// Past the 64 KiB a TEXT message may carry.
    Text(#[arbitrary(with = counted::<_, 0, 70_000>)] Vec<u8>),
    Error(u32, u32),
    /// An unknown kind.
    Other(u16, Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fault {
    Magic(u32),
    Version(u16),
    Kind(u16),
    Count(u32),
    Truncate(u32),
    Extend(u16),
    Flip(u32, u8),
}

fn name(s: &str) -> [u8; NAME_LEN] {
    name_bytes(s).unwrap_or([0; NAME_LEN])
}

/// The message, and the size of its kind's entries.
fn message(seq: u32, body: &Body) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let size = match body {
        Body::Hello { ram_pages, domain, label } => {
            let hello =
                Hello { ram_pages: *ram_pages, domain: name(domain), label: name(label), ..Hello::default() };
            encode(&mut out, kind::HELLO, seq, &[hello]);
            size_of::<Hello>()
        }
        Body::Welcome { client, max_slots } => {
            let w = Welcome { client: *client, max_slots: *max_slots, ..Welcome::default() };
            encode(&mut out, kind::WELCOME, seq, &[w]);
            size_of::<Welcome>()
        }
        Body::Lookup(hashes) => {
            let e: Vec<_> = hashes.iter().map(|&hash| LookupEntry { hash }).collect();
            encode(&mut out, kind::LOOKUP, seq, &e);
            size_of::<LookupEntry>()
        }
        Body::Store(pages) => {
            let e: Vec<_> = pages
                .iter()
                .map(|&(fill, hint0, hint1, flags)| StoreEntry {
                    hash: [fill; 32],
                    hint0,
                    hint1,
                    flags,
                    page: [fill; 4096],
                    ..StoreEntry::default()
                })
                .collect();
            encode(&mut out, kind::STORE, seq, &e);
            size_of::<StoreEntry>()
        }
        Body::Release(slots) => {
            let e: Vec<_> = slots.iter().map(|&slot| ReleaseEntry { slot }).collect();
            encode(&mut out, kind::RELEASE, seq, &e);
            size_of::<ReleaseEntry>()
        }
        Body::Stats(v) => {
            let s = ClientStats {
                reported: v[0],
                merged: v[1],
                already: v[2],
                mismatch: v[3],
                no_room: v[4],
                cow_breaks: v[5],
                mapped_pages: v[6],
                vmas: v[7],
            };
            encode(&mut out, kind::STATS, seq, &[s]);
            size_of::<ClientStats>()
        }
        Body::GuestStats { present, raw, values } => {
            let mut e = GuestStats { present: u32::from(*present), reserved: 0, values: *values };
            for (tag, v) in e.values.iter_mut().enumerate() {
                if present & (1 << tag) == 0 {
                    *v = 0;
                }
            }
            if let Some((present, reserved)) = *raw {
                (e.present, e.reserved) = (present, reserved);
            }
            encode(&mut out, kind::GUEST_STATS, seq, &[e]);
            size_of::<GuestStats>()
        }
        Body::Status => {
            encode::<u8>(&mut out, kind::STATUS, seq, &[]);
            1
        }
        Body::Check => {
            encode::<u8>(&mut out, kind::CHECK, seq, &[]);
            1
        }
        Body::Slots(s) => {
            let e: Vec<_> = s.iter().map(|&(status, slot)| SlotReply { status, slot, reserved: 0 }).collect();
            encode(&mut out, kind::SLOTS, seq, &e);
            size_of::<SlotReply>()
        }
        Body::Released(s) => {
            let e: Vec<_> = s.iter().map(|&status| StatusReply { status }).collect();
            encode(&mut out, kind::RELEASED, seq, &e);
            size_of::<StatusReply>()
        }
        Body::Ack => {
            encode::<u8>(&mut out, kind::ACK, seq, &[]);
            1
        }
        Body::Text(t) => {
            encode(&mut out, kind::TEXT, seq, t.as_slice());
            1
        }
        Body::Error(code, detail) => {
            encode(&mut out, kind::ERROR, seq, &[ErrorReply { code: *code, detail: *detail }]);
            size_of::<ErrorReply>()
        }
        Body::Other(k, bytes) => {
            encode(&mut out, *k, seq, bytes.as_slice());
            1
        }
    };
    (out, size)
}

fn entry_size(k: u16) -> usize {
    match k {
        kind::HELLO => size_of::<Hello>(),
        kind::WELCOME => size_of::<Welcome>(),
        kind::LOOKUP => size_of::<LookupEntry>(),
        kind::STORE => size_of::<StoreEntry>(),
        kind::RELEASE => size_of::<ReleaseEntry>(),
        kind::STATS => size_of::<ClientStats>(),
        kind::GUEST_STATS => size_of::<GuestStats>(),
        kind::SLOTS => size_of::<SlotReply>(),
        kind::RELEASED => size_of::<StatusReply>(),
        kind::ERROR => size_of::<ErrorReply>(),
        _ => 1,
    }
}

/// The GUEST_STATS check against its own rules: refused exactly for reserved bits, values
/// without their bit, sizes beyond the RAM or more free than total; what passes converts to
/// the balloon's statistics and back unchanged.
fn check_guest_stats(e: &GuestStats, ram_pages: u32) {
    let ram = u64::from(ram_pages) * 4096;
    let present = |tag: usize| e.present & (1 << tag) != 0;
    let value = |tag: usize| present(tag).then_some(e.values[tag]);
    let clean = e.reserved == 0
        && e.present >> GUEST_STAT_TAGS == 0
        && (0..GUEST_STAT_TAGS).all(|t| present(t) || e.values[t] == 0);
    // Free, total, available, disk caches (tags 4 to 7).
    let sizes_fit = (4..=7).all(|t| value(t).is_none_or(|v| v <= ram));
    let free_fits = match (value(4), value(5)) {
        (Some(free), Some(total)) => free <= total,
        _ => true,
    };
    let verdict = check(e, ram);
    assert_eq!(verdict.is_ok(), clean && sizes_fit && free_fits, "{e:?}: {verdict:?}");
    if let Err(why) = verdict {
        assert_eq!(why.is_malformed(), !clean, "{why}");
        let _ = why.to_string();
    } else {
        assert_eq!(from_memory_stats(&to_memory_stats(e)), *e, "a checked entry round-trips");
    }
}

/// Every typed entry of a decoded body reads back, and nothing past it.
fn read_entries<T: ByteValued + Default>(body: &[u8], count: u32) {
    for i in 0..count as usize {
        let e: T = entry(body, i).expect("each counted entry");
        assert_eq!(e.as_slice(), &body[i * size_of::<T>()..(i + 1) * size_of::<T>()]);
    }
    assert!(entry::<T>(body, count as usize).is_none());
    assert!(entry::<T>(body, usize::MAX).is_none());
}

fuzz_target!(|input: Input| {
    let (mut msg, right_size) = message(input.seq, &input.body);
    let faults: &[Fault] = if input.fault_roll >= 192 { &input.faults } else { &[] };
    let put = |msg: &mut Vec<u8>, at: usize, v: &[u8]| {
        if let Some(dst) = msg.get_mut(at..at + v.len()) {
            dst.copy_from_slice(v);
        }
    };
    for f in faults.iter().take(4) {
        match *f {
            Fault::Magic(v) => put(&mut msg, 0, &v.to_le_bytes()),
            Fault::Version(v) => put(&mut msg, 4, &v.to_le_bytes()),
            Fault::Kind(v) => put(&mut msg, 6, &v.to_le_bytes()),
            Fault::Count(v) => put(&mut msg, 12, &v.to_le_bytes()),
            Fault::Truncate(n) => msg.truncate(n as usize % (msg.len() + 1)),
            Fault::Extend(n) => msg.resize(msg.len() + usize::from(n), 0),
            Fault::Flip(at, bits) => {
                let len = msg.len();
                if let Some(b) = msg.get_mut(at as usize % len.max(1)) {
                    *b ^= bits;
                }
            }
        }
    }
    let size = if input.size_roll >= 224 { entry_size(input.size_kind) } else { right_size };

    let peeked = samepage::broker_wire::proto::peek(&msg);
    assert_eq!(peeked.is_some(), msg.len() >= HEADER_LEN);
    match decode(&msg, size) {
        Ok((header, body)) => {
            assert_eq!(Some(header), peeked, "peek and decode agree");
            assert_eq!((header.magic, header.version), (MAGIC, VERSION));
            assert!(header.count as usize <= max_entries(header.kind));
            assert!(msg.len() <= MAX_MESSAGE);
            assert_eq!(body.len(), header.count as usize * size);
            assert_eq!(body, &msg[HEADER_LEN..]);
            match (header.kind, size) {
                (kind::HELLO, s) if s == size_of::<Hello>() => {
                    read_entries::<Hello>(body, header.count);
                    let names = entry::<Hello>(body, 0).map(|h| [h.domain, h.label]);
                    for n in names.into_iter().flatten() {
                        if let Some(s) = name_str(&n) {
                            assert!(!s.chars().any(char::is_control) && !s.contains('\0'));
                            assert_eq!(name_bytes(s), Some(n), "a decoded name encodes back");
                        }
                    }
                }
                (kind::STORE, s) if s == size_of::<StoreEntry>() => {
                    read_entries::<StoreEntry>(body, header.count)
                }
                (kind::LOOKUP, s) if s == size_of::<LookupEntry>() => {
                    read_entries::<LookupEntry>(body, header.count)
                }
                (kind::SLOTS, s) if s == size_of::<SlotReply>() => {
                    read_entries::<SlotReply>(body, header.count)
                }
                (kind::GUEST_STATS, s) if s == size_of::<GuestStats>() => {
                    read_entries::<GuestStats>(body, header.count);
                    if let Some(e) = entry::<GuestStats>(body, 0) {
                        check_guest_stats(&e, input.ram_pages);
                    }
                }
                _ => read_entries::<u8>(body, body.len() as u32),
            }
        }
        Err(e) => {
            let _ = e.to_string();
            if faults.is_empty() && size == right_size {
                // Only the limits refuse a message built right.
                let count = ((msg.len() - HEADER_LEN) / size) as u32;
                let kind = u16::from_le_bytes([msg[6], msg[7]]);
                let over = count as usize > max_entries(kind) || msg.len() > MAX_MESSAGE;
                assert!(over, "a well-formed message refused: {e:?}");
                assert!(matches!(e, DecodeError::TooMany { .. } | DecodeError::Length { .. }));
            }
        }
    }

    for s in &input.names {
        match name_bytes(s) {
            Some(bytes) => {
                let clean = !s.chars().any(char::is_control);
                assert_eq!(name_str(&bytes), clean.then_some(s.as_str()), "name {s:?}");
            }
            None => assert!(s.len() > NAME_LEN || s.contains('\0')),
        }
    }
    let mut raw = [0u8; NAME_LEN];
    raw[..16].copy_from_slice(&input.raw_name);
    if let Some(s) = name_str(&raw) {
        assert!(!s.chars().any(char::is_control) && s.len() <= 16);
    }
});
