//! One client connection: who it is, what it joined, what it asked for and what was refused,
//! and the handling of its requests on its domain's store (`docs/dedupd.md`, "Messages").
//!
//! Every request is checked whole before anything changes; a client's claims change only its
//! own references, and it holds at most as many as its HELLO declared guest pages.

use std::fmt;
use std::fs::File;
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

use super::domains::Peer;
use super::report::{ClientId, Rejection, Rejections};
use crate::broker_wire::guest_stats;
use crate::broker_wire::proto::{
    self, error, kind, status, ClientStats, ErrorReply, GuestStats, Header, LookupEntry, ReleaseEntry,
    SlotReply, StatusReply, StoreEntry, FOLLOWS_PREVIOUS, MAGIC, MAX_MESSAGE, NO_HINT, VERSION,
};
use crate::broker_wire::seqpacket::Packet;
use crate::dedup::shared_pages::SharedPages;
use crate::dedup::words::{HolderId, Offered, PageOffer};
use crate::dedup::Slot;

/// A reply to send: one packet, with a descriptor for WELCOME.
#[derive(Debug)]
pub struct Reply {
    /// The message.
    pub bytes: Vec<u8>,
    /// The store's read-only descriptor (WELCOME only).
    pub fd: Option<File>,
}

impl Reply {
    /// A message of `entries`.
    pub fn new<T: ByteValued>(kind: u16, seq: u32, entries: &[T]) -> Reply {
        let mut bytes = Vec::new();
        proto::encode(&mut bytes, kind, seq, entries);
        Reply { bytes, fd: None }
    }

    /// An ERROR message.
    pub fn error(seq: u32, code: u32, detail: u32) -> Reply {
        Reply::new(kind::ERROR, seq, &[ErrorReply { code, detail }])
    }

    /// A text (STATUS, CHECK) as TEXT pieces of at most `MAX_TEXT_CHUNK` bytes and the empty
    /// piece that ends it.
    pub fn text(seq: u32, text: &str) -> Vec<Reply> {
        let mut replies: Vec<Reply> = text
            .as_bytes()
            .chunks(proto::MAX_TEXT_CHUNK)
            .map(|piece| Reply::new(kind::TEXT, seq, piece))
            .collect();
        replies.push(Reply::new::<u8>(kind::TEXT, seq, &[]));
        replies
    }
}

/// A request refused whole, with the ERROR to answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The request's seq (0 if it had no header).
    pub seq: u32,
    /// One of [`proto::error`].
    pub code: u32,
    /// The ERROR's detail.
    pub detail: u32,
    /// What to count.
    pub rejection: Rejection,
    /// What was wrong, for the log.
    pub what: String,
}

impl Refusal {
    /// A malformed request.
    pub fn bad(seq: u32, what: impl Into<String>) -> Refusal {
        Refusal {
            seq,
            code: error::BAD_MESSAGE,
            detail: 0,
            rejection: Rejection::BadMessage,
            what: what.into(),
        }
    }

    /// Whether the broker closes the connection after answering.
    pub fn closes(&self) -> bool {
        matches!(self.code, error::NOT_ALLOWED | error::BAD_VERSION | error::BUSY)
    }

    /// Whether it counts towards the malformed messages that close a connection (a client
    /// that sends GUEST_STATS too often is flooding: it counts too).
    pub fn is_malformed(&self) -> bool {
        matches!(self.code, error::BAD_MESSAGE | error::TOO_MANY | error::NO_SESSION | error::TOO_SOON)
    }
}

/// A checked request: its header and its entries' bytes.
#[derive(Debug)]
pub struct Request<'a> {
    /// The header.
    pub header: Header,
    /// `header.count` entries of the kind's type.
    pub body: &'a [u8],
}

/// Entry size of a kind a client may send.
fn request_entry_size(k: u16) -> Option<usize> {
    Some(match k {
        kind::HELLO => size_of::<proto::Hello>(),
        kind::LOOKUP => size_of::<LookupEntry>(),
        kind::STORE => size_of::<StoreEntry>(),
        kind::RELEASE => size_of::<ReleaseEntry>(),
        kind::STATS => size_of::<ClientStats>(),
        kind::GUEST_STATS => size_of::<GuestStats>(),
        kind::STATUS | kind::CHECK => 0,
        _ => return None,
    })
}

/// Checks a received packet: its length on the wire, that it carried no descriptors, its
/// header and that it holds as many entries as its kind takes. `message` is what the buffer
/// got of it.
pub fn parse<'a>(message: &'a [u8], received: &Packet) -> Result<Request<'a>, Refusal> {
    let seq = proto::peek(message).map_or(0, |h| h.seq);
    if received.len > MAX_MESSAGE {
        let what = format!("message of {} bytes, longer than {MAX_MESSAGE}", received.len);
        let detail = u32::try_from(received.len).unwrap_or(u32::MAX);
        return Err(Refusal { detail, rejection: Rejection::Oversized, ..Refusal::bad(seq, what) });
    }
    if received.ancillary {
        return Err(Refusal::bad(seq, "message with descriptors or other ancillary data"));
    }
    let Some(header) = proto::peek(message) else {
        return Err(Refusal::bad(seq, format!("message of {} bytes, shorter than a header", message.len())));
    };
    if header.magic != MAGIC {
        return Err(Refusal::bad(seq, format!("bad magic {:#x}", header.magic)));
    }
    if header.version != VERSION {
        let what = format!("protocol version {}", header.version);
        let rejection = Rejection::BadVersion;
        return Err(Refusal {
            code: error::BAD_VERSION,
            detail: VERSION.into(),
            rejection,
            ..Refusal::bad(seq, what)
        });
    }
    let Some(size) = request_entry_size(header.kind) else {
        return Err(Refusal::bad(seq, format!("unknown kind {:#x}", header.kind)));
    };
    let body = match proto::decode(message, size) {
        Ok((_, body)) => body,
        Err(proto::DecodeError::TooMany { count, max }) => {
            let (code, rejection) = (error::TOO_MANY, Rejection::TooMany);
            let what = format!("{count} entries of kind {:#x}, at most {max}", header.kind);
            return Err(Refusal { code, detail: count, rejection, ..Refusal::bad(seq, what) });
        }
        Err(e) => return Err(Refusal::bad(seq, e.to_string())),
    };
    let needs_one = !matches!(header.kind, kind::STATUS | kind::CHECK);
    if needs_one && header.count == 0 {
        return Err(Refusal::bad(seq, format!("no entries in a message of kind {:#x}", header.kind)));
    }
    Ok(Request { header, body })
}

/// A client's membership of a domain, from its HELLO.
#[derive(Debug)]
pub struct Joined {
    /// The domain.
    pub domain: String,
    /// The VM's name.
    pub label: String,
    /// Its holder id in the domain's store.
    pub holder: HolderId,
    /// The most references it may hold (its guest pages, at most 2^28).
    pub ref_limit: u64,
    /// Its guest's RAM as HELLO declared it (bytes): no memory size the guest reports exceeds
    /// it.
    pub ram_bytes: u64,
}

/// One connection.
pub struct Session {
    /// The broker's id for it.
    pub id: ClientId,
    /// Who it is.
    pub peer: Peer,
    /// What it joined (after HELLO).
    pub joined: Option<Joined>,
    /// Requests received.
    pub requests: u64,
    /// What was refused.
    pub rejections: Rejections,
    /// Malformed messages so far (the connection is closed at 64).
    pub malformed: u32,
    /// The figures of its last STATS.
    pub stats: Option<ClientStats>,
    /// Its guest's statistics of its last GUEST_STATS accepted (checked).
    pub guest_stats: Option<GuestStats>,
    /// When that GUEST_STATS came.
    pub guest_stats_at: Option<Instant>,
    /// A pidfd of its process, which tells when it exits (`departed.rs`).
    pub process: Option<std::os::fd::OwnedFd>,
    /// When it connected.
    pub since: Instant,
}

impl Session {
    /// A new connection of `peer`.
    pub fn new(id: ClientId, peer: Peer) -> Session {
        Session {
            id,
            peer,
            joined: None,
            requests: 0,
            rejections: Rejections::default(),
            malformed: 0,
            stats: None,
            guest_stats: None,
            guest_stats_at: None,
            process: None,
            since: Instant::now(),
        }
    }

    /// Counts a rejection and logs it on its 1st, 2nd, 4th, 8th... occurrence.
    pub fn reject(&mut self, r: Rejection, what: fmt::Arguments<'_>) {
        let counter = self.rejections.counter(r);
        *counter += 1;
        let n = *counter;
        if n.is_power_of_two() {
            log::warn!("{self}: refused: {} ({r:?}, {n} so far)", crate::escape_controls(&what.to_string()));
        }
    }

    /// Handles LOOKUP, STORE, RELEASE, STATS or GUEST_STATS of a joined client on its domain's
    /// store; GUEST_STATS at most once per `guest_stats_every`.
    pub fn handle_joined(
        &mut self,
        store: &mut SharedPages,
        request: &Request<'_>,
        guest_stats_every: Duration,
    ) -> Result<Reply, Refusal> {
        let seq = request.header.seq;
        let Some(joined) = &self.joined else {
            return Err(Refusal {
                code: error::NO_SESSION,
                rejection: Rejection::NoSession,
                ..Refusal::bad(seq, "request before HELLO")
            });
        };
        let (holder, limit, ram_bytes) = (joined.holder, joined.ref_limit, joined.ram_bytes);
        match request.header.kind {
            kind::LOOKUP => Ok(self.lookup(store, holder, limit, request)),
            kind::STORE => self.store_pages(store, holder, limit, request),
            kind::RELEASE => Ok(self.release(store, holder, request)),
            kind::GUEST_STATS => self.take_guest_stats(request, ram_bytes, guest_stats_every),
            _ => {
                self.stats = proto::entry::<ClientStats>(request.body, 0);
                Ok(Reply::new::<u8>(kind::ACK, seq, &[]))
            }
        }
    }

    /// GUEST_STATS: checked whole (layout, then sizes against the guest's declared RAM) and
    /// kept, unless it comes sooner than `every` after the last one kept.
    fn take_guest_stats(
        &mut self,
        request: &Request<'_>,
        ram_bytes: u64,
        every: Duration,
    ) -> Result<Reply, Refusal> {
        let seq = request.header.seq;
        let now = Instant::now();
        if let Some(at) = self.guest_stats_at.filter(|at| now.duration_since(*at) < every) {
            let ms = u32::try_from(every.as_millis()).unwrap_or(u32::MAX);
            let what =
                format!("GUEST_STATS {:?} after the last, sooner than every {ms} ms", now.duration_since(at));
            return Err(Refusal {
                code: error::TOO_SOON,
                detail: ms,
                rejection: Rejection::TooSoon,
                ..Refusal::bad(seq, what)
            });
        }
        let entry = proto::entry::<GuestStats>(request.body, 0).unwrap_or_default();
        if let Err(e) = guest_stats::check(&entry, ram_bytes) {
            let rejection = if e.is_malformed() { Rejection::BadMessage } else { Rejection::GuestStats };
            return Err(Refusal { rejection, ..Refusal::bad(seq, format!("GUEST_STATS: {e}")) });
        }
        self.guest_stats = Some(entry);
        self.guest_stats_at = Some(now);
        Ok(Reply::new::<u8>(kind::ACK, seq, &[]))
    }

    fn lookup(
        &mut self,
        store: &mut SharedPages,
        holder: HolderId,
        limit: u64,
        request: &Request<'_>,
    ) -> Reply {
        let count = request.header.count as usize;
        let mut replies = Vec::with_capacity(count);
        for i in 0..count {
            let entry = proto::entry::<LookupEntry>(request.body, i).unwrap_or_default();
            let reply = if store.holder_refs(holder) >= limit {
                self.reject(Rejection::RefLimit, format_args!("LOOKUP at its limit of {limit} references"));
                SlotReply { status: status::FULL, ..Default::default() }
            } else {
                match store.lookup(holder, &entry.hash) {
                    Some(slot) => SlotReply { status: status::OK, reserved: 0, slot: slot.into() },
                    None => SlotReply { status: status::MISS, ..Default::default() },
                }
            };
            replies.push(reply);
        }
        Reply::new(kind::SLOTS, request.header.seq, &replies)
    }

    fn store_pages(
        &mut self,
        store: &mut SharedPages,
        holder: HolderId,
        limit: u64,
        request: &Request<'_>,
    ) -> Result<Reply, Refusal> {
        let seq = request.header.seq;
        let count = request.header.count as usize;
        let entries: Vec<StoreEntry> =
            (0..count).map(|i| proto::entry::<StoreEntry>(request.body, i).unwrap_or_default()).collect();
        if let Some(i) = entries.iter().position(|e| e.flags & !FOLLOWS_PREVIOUS != 0 || e.reserved != 0) {
            return Err(Refusal::bad(seq, format!("STORE entry {i}: unknown flags or reserved field set")));
        }
        let mut replies = Vec::with_capacity(count);
        let mut previous: Option<Slot> = None;
        for entry in &entries {
            let reply = if store.holder_refs(holder) >= limit {
                self.reject(Rejection::RefLimit, format_args!("STORE at its limit of {limit} references"));
                SlotReply { status: status::FULL, ..Default::default() }
            } else {
                let req = PageOffer {
                    hash: entry.hash,
                    page: &entry.page,
                    hints: [hint(entry.hint0), hint(entry.hint1)],
                    follows_previous: entry.flags & FOLLOWS_PREVIOUS != 0,
                    // A client's hash is only a lookup key: the broker hashes the page itself.
                    hashed_here: false,
                };
                self.store_one(store, holder, &req, previous)
            };
            previous = matches!(reply.status, status::OK | status::NEW).then_some(reply.slot as Slot);
            replies.push(reply);
        }
        Ok(Reply::new(kind::SLOTS, seq, &replies))
    }

    fn store_one(
        &mut self,
        store: &mut SharedPages,
        holder: HolderId,
        req: &PageOffer<'_>,
        previous: Option<Slot>,
    ) -> SlotReply {
        match store.offer(holder, req, previous) {
            Offered::Slot { slot, fresh } => {
                let status = if fresh { status::NEW } else { status::OK };
                SlotReply { status, reserved: 0, slot: slot.into() }
            }
            Offered::Mismatch => {
                self.reject(Rejection::Mismatch, format_args!("STORE whose bytes and hash disagree"));
                SlotReply { status: status::MISMATCH, ..Default::default() }
            }
            Offered::Full => {
                self.reject(Rejection::StoreFull, format_args!("STORE into a full store"));
                SlotReply { status: status::FULL, ..Default::default() }
            }
        }
    }

    fn release(&mut self, store: &mut SharedPages, holder: HolderId, request: &Request<'_>) -> Reply {
        let count = request.header.count as usize;
        let mut replies = Vec::with_capacity(count);
        for i in 0..count {
            let entry = proto::entry::<ReleaseEntry>(request.body, i).unwrap_or_default();
            // A slot number beyond any slot is held by nobody.
            let released = Slot::try_from(entry.slot).is_ok_and(|slot| store.release(holder, slot));
            if !released {
                self.reject(
                    Rejection::NotHeld,
                    format_args!("RELEASE of slot {} it does not hold", entry.slot),
                );
            }
            let status = if released { status::RELEASED } else { status::NOT_HELD };
            replies.push(StatusReply { status });
        }
        Reply::new(kind::RELEASED, request.header.seq, &replies)
    }
}

/// A STORE hint as a slot (a value beyond any slot is no hint; the store checks the rest).
fn hint(value: u64) -> Option<Slot> {
    (value != NO_HINT).then(|| Slot::try_from(value).ok()).flatten()
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} (pid {}, uid {}", self.id, self.peer.pid, self.peer.uid)?;
        if let Some(j) = &self.joined {
            write!(f, ", {:?} in domain {}", j.label, j.domain)?;
        }
        write!(f, ")")
    }
}
