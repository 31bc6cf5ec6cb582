//! Where a domain's shared pages live: in this process ([`SharedPages`]), or in the broker
//! (`samepage dedupd`, through a [`BrokerClient`]). The merge engine asks for references in
//! batches, so that a broker costs one round trip per batch, not per page, and asks the
//! backend (not its kind) whatever differs between the two.

use std::os::fd::RawFd;

use super::broker_client::BrokerClient;
use super::error::DedupError;
use super::shared_pages::SharedPages;
use super::words::{HolderId, Offered, PageCounters, PageHash, PageOffer, Slot, Unavailable};
use crate::broker_wire::proto::{ClientStats, GuestStats};

/// A domain's shared pages, here or in the broker.
pub enum Backend {
    /// In this process: the VMs of this process share them.
    Local(SharedPages),
    /// In the broker: VMs of every VMM of the domain share them.
    Broker(BrokerClient),
}

/// Pages from which a batch looks its hashes up first through a broker too: below, every page
/// is offered (one round trip instead of two, for a few pages' bytes more); above, the bytes of
/// the pages the store holds cost more than the round trip (bench-dedup, full batches of 256,
/// mixed, N = 16 through a broker: 3.6 s of merge CPU before every page was offered, 6.0 s
/// after, the pauses and refresh counted besides; `docs/benchmarks.md`).
pub(crate) const LOOK_UP_FROM: usize = 64;

impl Backend {
    /// A holder for a VM of this process (VMs of one process need not pin: their references
    /// drop only on proof that the page was copied). With a broker, the connection is the
    /// holder.
    pub(crate) fn join(&mut self) -> HolderId {
        match self {
            Backend::Local(s) => s.join(0),
            Backend::Broker(_) => 0,
        }
    }

    /// A VM leaves: its references drop (with a broker, the VM's own releases do that).
    pub(crate) fn leave(&mut self, holder: HolderId) {
        if let Backend::Local(s) = self {
            s.leave(holder);
        }
    }

    /// Looks `hashes` up; `out` gets a slot (with a reference) or `None` per hash.
    pub(crate) fn lookup(
        &mut self,
        holder: HolderId,
        hashes: &[PageHash],
        out: &mut Vec<Option<Slot>>,
    ) -> Result<(), Unavailable> {
        out.clear();
        match self {
            Backend::Local(s) => {
                out.extend(hashes.iter().map(|h| s.lookup(holder, h)));
                Ok(())
            }
            Backend::Broker(b) => b.lookup(hashes, out),
        }
    }

    /// Offers pages (`docs/dedupd.md`): `out` gets one outcome per offer.
    pub(crate) fn offer(
        &mut self,
        holder: HolderId,
        offers: &[PageOffer<'_>],
        out: &mut Vec<Offered>,
    ) -> Result<(), Unavailable> {
        out.clear();
        match self {
            Backend::Local(s) => {
                let mut previous = None;
                for o in offers {
                    let outcome = s.offer(holder, o, previous);
                    previous = match outcome {
                        Offered::Slot { slot, .. } => Some(slot),
                        _ => None,
                    };
                    out.push(outcome);
                }
                Ok(())
            }
            Backend::Broker(b) => b.offer(offers, out),
        }
    }

    /// Whether a page this process hashed needs no second hashing when offered: true in this
    /// process; the broker hashes every page it is sent.
    pub(crate) fn trusts_our_hashes(&self) -> bool {
        matches!(self, Backend::Local(_))
    }

    /// Whether a lookup is worth asking before offering `pages` pages: in this process always,
    /// a map access that spares copying and hashing a page the store holds. The broker answers
    /// an offer of a page it holds with its slot (it compares the bytes), and each request is a
    /// round trip that costs both processes more CPU than a few pages it carries: fewer than
    /// [`LOOK_UP_FROM`] are all offered, one round trip.
    pub(crate) fn looks_up_first(&self, pages: usize) -> bool {
        matches!(self, Backend::Local(_)) || pages >= LOOK_UP_FROM
    }

    /// Drops one reference per slot; returns how many slots were freed (as far as known
    /// here: the broker frees its own).
    pub(crate) fn release(&mut self, holder: HolderId, slots: &[Slot]) -> usize {
        match self {
            Backend::Local(s) => {
                let before = s.live_pages();
                for &slot in slots {
                    if !s.release(holder, slot) {
                        log::error!("dedup: released store slot {slot} it did not hold");
                    }
                }
                before - s.live_pages()
            }
            Backend::Broker(b) => {
                b.release(slots);
                0
            }
        }
    }

    /// The bytes of a slot this process may compare with (a live one locally; with a broker,
    /// a slot this process holds).
    pub(crate) fn page(&self, slot: Slot) -> Option<&[u8]> {
        match self {
            Backend::Local(s) => s.page(slot),
            Backend::Broker(b) => b.page(slot),
        }
    }

    /// The hash a slot this process holds is indexed under.
    pub(crate) fn hash_of(&self, slot: Slot) -> Option<PageHash> {
        match self {
            Backend::Local(s) => s.hash_of(slot).copied(),
            Backend::Broker(b) => b.hash_of(slot),
        }
    }

    /// The store's descriptor, to map slots from (`None` when no broker is reachable).
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Backend::Local(s) => Some(s.fd()),
            Backend::Broker(b) => b.fd(),
        }
    }

    /// Changes when the store changes (a new broker): references into the old one are gone.
    /// Reconnects to a broker that is back, and reads an overdue answer that came (the only
    /// call that does).
    pub(crate) fn generation(&mut self) -> u32 {
        match self {
            Backend::Local(_) => 0,
            Backend::Broker(b) => b.generation(),
        }
    }

    /// The generation now, without reconnecting.
    pub(crate) fn current_generation(&self) -> u32 {
        match self {
            Backend::Local(_) => 0,
            Backend::Broker(b) => b.current_generation(),
        }
    }

    /// The broker's domain joined, when the pages are the broker's and it is connected.
    pub(crate) fn broker_domain(&self) -> Option<&str> {
        match self {
            Backend::Local(_) => None,
            Backend::Broker(b) => b.domain(),
        }
    }

    /// Tells the broker this process's figures (for `samepage dedupd status`); nothing to tell
    /// in this process.
    pub(crate) fn push_stats(&mut self, stats: ClientStats) {
        if let Backend::Broker(b) = self {
            b.push_stats(stats);
        }
    }

    /// Gives the broker the guest's latest balloon statistics (for `samepage dedupd status`);
    /// nothing to give in this process.
    pub(crate) fn push_guest_stats(&mut self, stats: GuestStats) {
        if let Backend::Broker(b) = self {
            b.push_guest_stats(stats);
        }
    }

    /// Live store pages (in this process); with a broker, the slots this process holds.
    pub(crate) fn live_pages(&self) -> u64 {
        match self {
            Backend::Local(s) => s.live_pages() as u64,
            Backend::Broker(b) => b.held_slots() as u64,
        }
    }

    /// Memory the store's memfd holds, for the whole domain.
    pub(crate) fn allocated_bytes(&self) -> Result<u64, DedupError> {
        match self {
            Backend::Local(s) => s.allocated_bytes(),
            Backend::Broker(b) => b.allocated_bytes(),
        }
    }

    /// Counters of the shared pages (with a broker: of what this process asked for).
    pub(crate) fn counters(&self) -> PageCounters {
        match self {
            Backend::Local(s) => s.counters(),
            Backend::Broker(b) => b.counters(),
        }
    }

    /// Checks every page against its hash and every reference count (in this process), or
    /// every slot this process holds against the hash it was given (with a broker); then that
    /// the references agree with `held`: per VM of this process, its holder and the pages it
    /// has merged. Returns how many pages were checked.
    pub(crate) fn verify(&self, held: &[(HolderId, u64)]) -> Result<usize, DedupError> {
        match self {
            Backend::Local(s) => {
                let checked = s.verify()?;
                if let Some(&(holder, _)) = held.iter().find(|(h, merged)| s.holder_refs(*h) != *merged) {
                    return Err(DedupError::Refs { slot: s.first_slot_of(holder).unwrap_or(0) });
                }
                Ok(checked)
            }
            Backend::Broker(b) => {
                let checked = b.verify()?;
                if b.held_refs() != held.iter().map(|(_, merged)| merged).sum::<u64>() {
                    return Err(DedupError::Refs { slot: 0 });
                }
                Ok(checked)
            }
        }
    }

    /// Reports that could not reach the broker.
    pub(crate) fn unavailable_count(&self) -> u64 {
        match self {
            Backend::Local(_) => 0,
            Backend::Broker(b) => b.unavailable_count(),
        }
    }

    /// Requests the broker answered late (or not yet).
    pub(crate) fn overdue_count(&self) -> u64 {
        match self {
            Backend::Local(_) => 0,
            Backend::Broker(b) => b.overdue_count(),
        }
    }

    /// Test hook: flips a byte of the stored page indexed under `hash` (in this process).
    #[cfg(test)]
    pub(crate) fn corrupt(&mut self, hash: &PageHash) -> bool {
        match self {
            Backend::Local(s) => s.corrupt(hash),
            Backend::Broker(_) => false,
        }
    }
}
