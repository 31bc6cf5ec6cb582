//! The VMM's side of the broker (`docs/dedupd.md`): a connection to `samepage dedupd`, the
//! store's memfd it sends (read-only, mapped here to compare pages), and the references this
//! process holds. A broker that goes away (killed, restarted) is reconnected every
//! [`RECONNECT_EVERY`]; each connection is a new *generation* of the store.
//!
//! A broker that is slow to answer (stopped, overloaded) is not given up: the connection is
//! what keeps this process's references, and so the store pages its guests map, alive. A
//! request not answered within [`ANSWER_WITHIN`] becomes *overdue*: the batch it served is not
//! merged, no further request is sent, and the answer is read whenever it comes; references it
//! carries and references released meanwhile are handed back then.
//!
//! The guest's balloon statistics go to the broker (GUEST_STATS) when they change, at most
//! once per [`GUEST_STATS_EVERY`] counted from the broker's last answer to them, so that the
//! broker, which refuses them sooner than half that, never sees them too soon.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

use super::broker_connection::{connect, receive, send, Connection, Overdue};
pub use super::broker_connection::{BrokerConfig, ANSWER_WITHIN};
use super::error::{BrokerClientError, DedupError};
use super::words::{Offered, PageCounters, PageHash, PageOffer, Slot, Unavailable, PAGE_SIZE};
use crate::broker_wire::guest_stats;
use crate::broker_wire::proto::{self, kind, status, GuestStats};

/// How often a VMM without a broker tries to connect.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(2);
/// Least time between the broker's answer to a GUEST_STATS and the next one sent.
pub const GUEST_STATS_EVERY: Duration = Duration::from_secs(1);

/// The guest's statistics on their way to the broker.
#[derive(Debug, Default)]
struct GuestStatsOut {
    /// The latest the VMM has.
    latest: Option<GuestStats>,
    /// The last the broker took on this connection.
    sent: Option<GuestStats>,
    /// When the broker last answered a GUEST_STATS (late answers included).
    answered: Option<Instant>,
}

/// The broker, as one VMM process sees it.
pub struct BrokerClient {
    config: BrokerConfig,
    conn: Option<Connection>,
    generation: u32,
    last_attempt: Option<Instant>,
    /// Slots held: the hash they were asked for by, and how many references.
    held: HashMap<Slot, (PageHash, u32)>,
    counters: PageCounters,
    unavailable: u64,
    /// References the broker counts for this process that it gave up while an answer was
    /// overdue (or that an overdue answer carried): released once the broker answers again.
    deferred: Vec<Slot>,
    /// Requests whose answer came late.
    overdue_count: u64,
    seq: u32,
    out: Vec<u8>,
    input: Vec<u8>,
    warned: bool,
    /// Boxed: two entries would make this the largest of `Backend`'s variants by far.
    guest: Box<GuestStatsOut>,
}

impl BrokerClient {
    /// A client that connects now and whenever the broker is back.
    pub fn new(config: BrokerConfig) -> Result<BrokerClient, BrokerClientError> {
        for name in config.domain.iter().chain(std::iter::once(&config.label)) {
            proto::name_bytes(name).ok_or_else(|| BrokerClientError::Name(name.clone()))?;
        }
        let mut remote = BrokerClient {
            config,
            conn: None,
            generation: 0,
            last_attempt: None,
            held: HashMap::new(),
            counters: PageCounters::default(),
            unavailable: 0,
            deferred: Vec::new(),
            overdue_count: 0,
            seq: 0,
            out: Vec::with_capacity(proto::MAX_MESSAGE),
            input: vec![0; proto::MAX_MESSAGE + 1],
            warned: false,
            guest: Box::default(),
        };
        remote.ensure_connected();
        Ok(remote)
    }

    /// The domain joined, if connected.
    pub fn domain(&self) -> Option<&str> {
        self.conn.as_ref().map(|c| c.domain.as_str())
    }

    /// Connects if not connected and the last attempt is old enough; whether connected.
    fn ensure_connected(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if self.last_attempt.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            return false;
        }
        self.last_attempt = Some(Instant::now());
        match connect(&self.config, &mut self.out, &mut self.input) {
            Ok(conn) => {
                log::info!("dedup: joined domain {} at broker {}", conn.domain, self.config.socket.display());
                self.conn = Some(conn);
                self.generation = self.generation.wrapping_add(1);
                self.held.clear();
                self.warned = false;
                // A new connection knows nothing of the guest: its figures go again.
                self.guest.sent = None;
                self.guest.answered = None;
                true
            }
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    log::warn!(
                        "dedup: no broker at {} ({}); pages are not merged until one answers",
                        self.config.socket.display(),
                        crate::error_chain(&e)
                    );
                }
                false
            }
        }
    }

    /// The connection broke (the broker closed it or died, or broke the protocol): the
    /// broker's bookkeeping of us is gone with it. (A broker that lives on keeps our
    /// references until this process exits, since our guests may still map those slots.)
    fn lose(&mut self, why: &dyn std::error::Error) {
        log::warn!("dedup: lost the broker at {}: {}", self.config.socket.display(), crate::error_chain(why));
        self.conn = None;
        self.held.clear();
        self.deferred.clear();
        self.generation = self.generation.wrapping_add(1);
        self.warned = true;
    }

    /// Whether the connection may carry a request now: reads an overdue answer if it came
    /// (handing back the references it carries) and releases what waited for it. False while
    /// the answer is still overdue, or when there is no connection.
    fn catch_up(&mut self) -> bool {
        let Some(conn) = &self.conn else { return false };
        let Some(overdue) = conn.overdue else { return true };
        let (sock, max_slots) = (conn.sock.as_raw_fd(), conn.max_slots);
        let len = match receive(sock, &mut self.input, None, false) {
            Ok(Some(len)) => len,
            Ok(None) => return false,
            Err(e) => {
                self.lose(&e);
                return false;
            }
        };
        let late = proto::decode(&self.input[..len], size_of::<proto::SlotReply>())
            .or_else(|_| proto::decode(&self.input[..len], size_of::<proto::StatusReply>()))
            .or_else(|_| proto::decode(&self.input[..len], 0));
        let Ok((header, body)) = late.map_err(|_| BrokerClientError::Protocol("undecodable late reply"))
        else {
            self.lose(&BrokerClientError::Protocol("undecodable late reply"));
            return false;
        };
        if header.seq != overdue.seq {
            self.lose(&BrokerClientError::Protocol("a late reply that answers no request"));
            return false;
        }
        // References a late SLOTS reply gave were never booked: hand them back.
        let mut handed_back = 0;
        if matches!(overdue.kind, kind::LOOKUP | kind::STORE) && header.kind == kind::SLOTS {
            for i in 0..header.count as usize {
                let r: proto::SlotReply = proto::entry(body, i).unwrap_or_default();
                if matches!(r.status, status::OK | status::NEW) && r.slot < max_slots {
                    self.deferred.push(r.slot as Slot);
                    handed_back += 1;
                }
            }
        }
        log::info!(
            "dedup: the broker at {} answered after {:.1} s; merging again ({handed_back} references of that \
             answer and {} released meanwhile go back to it)",
            self.config.socket.display(),
            overdue.since.elapsed().as_secs_f64(),
            self.deferred.len() - handed_back
        );
        if let Some(conn) = &mut self.conn {
            conn.overdue = None;
        }
        if overdue.kind == kind::GUEST_STATS {
            self.guest.answered = Some(Instant::now());
        }
        self.release_deferred()
    }

    /// Releases the references given up while an answer was overdue; false if the broker is
    /// slow again (the rest wait).
    fn release_deferred(&mut self) -> bool {
        while !self.deferred.is_empty() {
            let n = self.deferred.len().min(proto::MAX_LOOKUP);
            let chunk: Vec<proto::ReleaseEntry> = self.deferred[..n]
                .iter()
                .map(|&slot| proto::ReleaseEntry { slot: u64::from(slot) })
                .collect();
            match self.exchange_one(kind::RELEASE, &chunk, size_of::<proto::StatusReply>()) {
                Ok(_) => {
                    self.deferred.drain(..n);
                }
                // Overdue: the broker applies it when it answers. (Lost: nothing is held.)
                Err(Unreachable::Overdue) => {
                    self.deferred.drain(..n);
                    return false;
                }
                Err(Unreachable::NotSent | Unreachable::Lost) => return false,
            }
        }
        true
    }

    /// Sends `entries` as one request and returns the reply's entries (copied into
    /// `self.input`, length returned), once any overdue answer is in.
    fn request<T: ByteValued>(
        &mut self,
        kind: u16,
        entries: &[T],
        entry_size: usize,
    ) -> Result<usize, Unreachable> {
        if !self.catch_up() {
            return Err(if self.conn.is_some() { Unreachable::NotSent } else { Unreachable::Lost });
        }
        self.exchange_one(kind, entries, entry_size)
    }

    /// One request and its answer. An answer that does not come within [`ANSWER_WITHIN`]
    /// leaves the request overdue (the connection stays); any other failure loses the broker.
    fn exchange_one<T: ByteValued>(
        &mut self,
        kind: u16,
        entries: &[T],
        entry_size: usize,
    ) -> Result<usize, Unreachable> {
        let Some(conn) = &self.conn else { return Err(Unreachable::Lost) };
        self.seq = self.seq.wrapping_add(1);
        proto::encode(&mut self.out, kind, self.seq, entries);
        let sock = conn.sock.as_raw_fd();
        match send(sock, &self.out) {
            Ok(true) => {}
            // The socket's buffer is full (the broker reads nothing): not sent, nothing owed.
            Ok(false) => return Err(Unreachable::NotSent),
            Err(e) => {
                self.lose(&e);
                return Err(Unreachable::Lost);
            }
        }
        let reply = match receive(sock, &mut self.input, None, true) {
            Ok(Some(len)) => Ok(len),
            Ok(None) => {
                self.overdue_count += 1;
                log::warn!(
                    "dedup: the broker at {} did not answer within {} s; its answer is awaited and \
                     nothing is merged until it comes (merged pages stay as they are)",
                    self.config.socket.display(),
                    ANSWER_WITHIN.as_secs()
                );
                if let Some(conn) = &mut self.conn {
                    conn.overdue = Some(Overdue { seq: self.seq, kind, since: Instant::now() });
                }
                return Err(Unreachable::Overdue);
            }
            Err(e) => Err(e),
        };
        let reply = reply.and_then(|len| {
            let (header, body) = proto::decode(&self.input[..len], entry_size)
                .or_else(|_| proto::decode(&self.input[..len], size_of::<proto::ErrorReply>()))
                .map_err(|_| BrokerClientError::Protocol("undecodable reply"))?;
            if header.kind == kind::ERROR {
                let e: proto::ErrorReply = proto::entry(body, 0).unwrap_or_default();
                return Err(BrokerClientError::Refused { code: e.code, detail: e.detail });
            }
            let acked = matches!(kind, kind::STATS | kind::GUEST_STATS);
            if header.seq != self.seq || header.count as usize != entries.len() && !acked {
                return Err(BrokerClientError::Protocol("reply does not match the request"));
            }
            Ok(body.len())
        });
        match reply {
            Ok(len) => {
                // Move the entries to the front: callers read them from `self.input`.
                self.input.copy_within(size_of::<proto::Header>()..size_of::<proto::Header>() + len, 0);
                Ok(len)
            }
            Err(e) => {
                self.lose(&e);
                Err(Unreachable::Lost)
            }
        }
    }

    /// Looks hashes up (see `Backend::lookup`).
    pub(crate) fn lookup(
        &mut self,
        hashes: &[PageHash],
        out: &mut Vec<Option<Slot>>,
    ) -> Result<(), Unavailable> {
        if self.conn.is_none() {
            self.unavailable += hashes.len() as u64;
            return Err(Unavailable);
        }
        for chunk in hashes.chunks(proto::MAX_LOOKUP) {
            let entries: Vec<proto::LookupEntry> =
                chunk.iter().map(|h| proto::LookupEntry { hash: *h }).collect();
            let Ok(len) = self.request(kind::LOOKUP, &entries, size_of::<proto::SlotReply>()) else {
                self.unavailable += hashes.len() as u64;
                out.clear();
                return Err(Unavailable);
            };
            for (i, hash) in chunk.iter().enumerate() {
                self.counters.lookups += 1;
                let reply: proto::SlotReply = proto::entry(&self.input[..len], i).unwrap_or_default();
                out.push(match reply.status {
                    status::OK => self.hold(reply.slot, hash),
                    _ => None,
                });
            }
        }
        self.counters.hits += out.iter().flatten().count() as u64;
        Ok(())
    }

    /// Offers pages (see `Backend::offer`).
    pub(crate) fn offer(
        &mut self,
        requests: &[PageOffer<'_>],
        out: &mut Vec<Offered>,
    ) -> Result<(), Unavailable> {
        if self.conn.is_none() {
            self.unavailable += requests.len() as u64;
            return Err(Unavailable);
        }
        let mut previous: Option<Slot> = None;
        for chunk in requests.chunks(proto::MAX_STORE_PAGES) {
            let mut entries: Vec<proto::StoreEntry> = Vec::with_capacity(chunk.len());
            for (i, r) in chunk.iter().enumerate() {
                let hint = |h: Option<Slot>| h.map_or(proto::NO_HINT, u64::from);
                let mut e = proto::StoreEntry {
                    hash: r.hash,
                    hint0: hint(r.hints[0]),
                    hint1: hint(r.hints[1]),
                    flags: if r.follows_previous { proto::FOLLOWS_PREVIOUS } else { 0 },
                    reserved: 0,
                    page: *r.page,
                };
                // The first entry of a later chunk cannot name the previous chunk's: hint it.
                if i == 0 && r.follows_previous {
                    if let Some(p) = previous.and_then(|p| p.checked_add(1)) {
                        e.hint1 = e.hint0;
                        e.hint0 = u64::from(p);
                    }
                }
                entries.push(e);
            }
            let Ok(len) = self.request(kind::STORE, &entries, size_of::<proto::SlotReply>()) else {
                self.unavailable += requests.len() as u64;
                out.clear();
                return Err(Unavailable);
            };
            for (i, r) in chunk.iter().enumerate() {
                let reply: proto::SlotReply = proto::entry(&self.input[..len], i).unwrap_or_default();
                let stored = match reply.status {
                    status::OK | status::NEW => match self.hold(reply.slot, &r.hash) {
                        Some(slot) => {
                            let fresh = reply.status == status::NEW;
                            if fresh {
                                self.counters.stored += 1;
                                self.counters.hashes += 1;
                            } else {
                                self.counters.compares += 1;
                            }
                            Offered::Slot { slot, fresh }
                        }
                        None => Offered::Mismatch,
                    },
                    status::FULL => {
                        self.counters.full += 1;
                        Offered::Full
                    }
                    _ => {
                        self.counters.mismatches += 1;
                        Offered::Mismatch
                    }
                };
                previous = match stored {
                    Offered::Slot { slot, .. } => Some(slot),
                    _ => None,
                };
                out.push(stored);
            }
        }
        Ok(())
    }

    /// Books a reference the broker gave; `None` for a slot outside the store (the reference
    /// is handed back).
    fn hold(&mut self, slot: u64, hash: &PageHash) -> Option<Slot> {
        let max = self.conn.as_ref().map_or(0, |c| c.max_slots);
        let Some(slot) = Slot::try_from(slot).ok().filter(|s| u64::from(*s) < max) else {
            log::error!("dedup: the broker gave slot {slot}, beyond its store of {max} slots");
            return None;
        };
        let entry = self.held.entry(slot).or_insert((*hash, 0));
        entry.1 += 1;
        Some(slot)
    }

    /// Drops one reference per slot. While an answer is overdue the broker is told later.
    pub(crate) fn release(&mut self, slots: &[Slot]) {
        let mut held = Vec::with_capacity(slots.len());
        for &slot in slots {
            let Some(entry) = self.held.get_mut(&slot) else { continue };
            entry.1 -= 1;
            if entry.1 == 0 {
                self.held.remove(&slot);
            }
            held.push(proto::ReleaseEntry { slot: u64::from(slot) });
        }
        self.counters.releases += held.len() as u64;
        for (n, chunk) in held.chunks(proto::MAX_LOOKUP).enumerate() {
            let len = match self.request(kind::RELEASE, chunk, size_of::<proto::StatusReply>()) {
                Ok(len) => len,
                Err(why) => {
                    // What was not sent waits for the broker; an overdue RELEASE is applied
                    // when it answers; a lost connection holds nothing.
                    let from = match why {
                        Unreachable::NotSent => n * proto::MAX_LOOKUP,
                        Unreachable::Overdue => (n + 1) * proto::MAX_LOOKUP,
                        Unreachable::Lost => held.len(),
                    };
                    self.deferred.extend(held[from.min(held.len())..].iter().map(|e| e.slot as Slot));
                    return;
                }
            };
            let refused = (0..chunk.len())
                .filter(|&i| {
                    proto::entry::<proto::StatusReply>(&self.input[..len], i)
                        .is_none_or(|r| r.status != status::RELEASED)
                })
                .count();
            if refused > 0 {
                self.counters.bad_releases += refused as u64;
                log::error!("dedup: the broker says {refused} released slots were not held");
            }
        }
    }

    /// Tells the broker this VMM's figures (for `samepage dedupd status`), and its guest's
    /// statistics if they wait.
    pub(crate) fn push_stats(&mut self, stats: proto::ClientStats) {
        if self.conn.is_some() {
            let _ = self.request(kind::STATS, &[stats], 0);
        }
        self.send_guest_stats();
    }

    /// Takes the guest's latest statistics for the broker (sent now, or later when it is too
    /// soon). Figures that fail the broker's check are dropped here (the balloon checked them
    /// already: this guards the connection, which the broker's refusal would cost).
    pub(crate) fn push_guest_stats(&mut self, stats: GuestStats) {
        let ram_bytes = self.config.ram_pages.saturating_mul(PAGE_SIZE as u64);
        if let Err(e) = guest_stats::check(&stats, ram_bytes) {
            log::error!("dedup: not sending the guest's statistics to the broker: {e}");
            return;
        }
        self.guest.latest = Some(stats);
        self.send_guest_stats();
    }

    /// Sends the latest guest statistics if the broker has not got them and it is time.
    fn send_guest_stats(&mut self) {
        let Some(latest) = self.guest.latest else { return };
        let soon = self.guest.answered.is_some_and(|t| t.elapsed() < GUEST_STATS_EVERY);
        if self.conn.is_none() || self.guest.sent == Some(latest) || soon {
            return;
        }
        if self.request(kind::GUEST_STATS, &[latest], 0).is_ok() {
            self.guest.sent = Some(latest);
            self.guest.answered = Some(Instant::now());
        }
    }

    /// The bytes of a slot of the mapped store.
    pub(crate) fn page(&self, slot: Slot) -> Option<&[u8]> {
        let conn = self.conn.as_ref()?;
        if !self.held.contains_key(&slot) {
            return None;
        }
        // A slot this process holds a reference on: the broker filled it before it gave it out.
        conn.page(slot)
    }

    /// The hash a held slot was asked for by.
    pub(crate) fn hash_of(&self, slot: Slot) -> Option<PageHash> {
        self.held.get(&slot).map(|(h, _)| *h)
    }

    /// The store's read-only descriptor, to map slots from.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(|c| c.store.as_raw_fd())
    }

    /// Changes with every connection and loss. Reconnects first if it is time: only here, so
    /// that a batch's requests all reach one store.
    pub(crate) fn generation(&mut self) -> u32 {
        if self.ensure_connected() {
            // Also the place where a late answer is picked up while the VM does nothing else.
            self.catch_up();
        }
        self.generation
    }

    /// The generation now, without reconnecting.
    pub(crate) fn current_generation(&self) -> u32 {
        self.generation
    }

    /// Distinct slots held.
    pub(crate) fn held_slots(&self) -> usize {
        self.held.len()
    }

    /// References held.
    pub(crate) fn held_refs(&self) -> u64 {
        self.held.values().map(|(_, n)| u64::from(*n)).sum()
    }

    /// Memory the domain's store holds (`st_blocks` of the descriptor).
    pub(crate) fn allocated_bytes(&self) -> Result<u64, DedupError> {
        match &self.conn {
            Some(c) => Ok(c.store.metadata().map_err(DedupError::Stat)?.blocks() * 512),
            None => Ok(0),
        }
    }

    /// What this process asked of the broker.
    pub(crate) fn counters(&self) -> PageCounters {
        self.counters
    }

    /// Records that could not reach the broker.
    pub(crate) fn unavailable_count(&self) -> u64 {
        self.unavailable
    }

    /// Requests the broker answered later than [`ANSWER_WITHIN`] (or not yet).
    pub(crate) fn overdue_count(&self) -> u64 {
        self.overdue_count
    }

    /// Checks every held slot's bytes against the hash it was asked for by.
    pub(crate) fn verify(&self) -> Result<usize, DedupError> {
        for (&slot, (hash, _)) in &self.held {
            let ok = self.page(slot).is_some_and(|p| blake3::hash(p).as_bytes() == hash);
            if !ok {
                return Err(DedupError::Corrupt { slot });
            }
        }
        Ok(self.held.len())
    }
}

/// Why a request got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unreachable {
    /// Not sent: no connection, an earlier answer is overdue, or the socket is full.
    NotSent,
    /// Sent, not answered in time: the connection stays and the answer is awaited.
    Overdue,
    /// The connection broke (and is dropped).
    Lost,
}
