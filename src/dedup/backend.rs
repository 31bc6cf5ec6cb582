//! Where a domain's shared pages live: in this process ([`SharedStore`]), or in the broker
//! (`samepage dedupd`, through [`RemoteStore`]). The merge engine asks for references in
//! batches, so that a broker costs one round trip per batch, not per page.

use std::os::fd::RawFd;

use super::error::DedupError;
use super::index::PageHash;
use super::remote::RemoteStore;
use super::shared::{HolderId, SharedCounters, SharedStore, StoreRequest, Stored};
use super::store::Slot;

/// The broker cannot be reached: nothing was merged, nothing is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

/// A domain's shared pages, here or in the broker.
pub enum Backend {
    /// In this process: the VMs of this process share them.
    Local(SharedStore),
    /// In the broker: VMs of every VMM of the domain share them.
    Remote(RemoteStore),
}

impl Backend {
    /// A holder for a VM of this process (VMs of one process need not pin: their references
    /// drop only on proof that the page was copied). Remotely, the connection is the holder.
    pub(crate) fn join(&mut self) -> HolderId {
        match self {
            Backend::Local(s) => s.join(0),
            Backend::Remote(_) => 0,
        }
    }

    /// A VM leaves: its references drop (remotely, the VM's own releases do that).
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
            Backend::Remote(r) => r.lookup(hashes, out),
        }
    }

    /// Offers pages (`docs/dedupd.md`): `out` gets one outcome per request.
    pub(crate) fn store(
        &mut self,
        holder: HolderId,
        requests: &[StoreRequest<'_>],
        out: &mut Vec<Stored>,
    ) -> Result<(), Unavailable> {
        out.clear();
        match self {
            Backend::Local(s) => {
                let mut previous = None;
                for r in requests {
                    let stored = s.store(holder, r, previous);
                    previous = match stored {
                        Stored::Slot { slot, .. } => Some(slot),
                        _ => None,
                    };
                    out.push(stored);
                }
                Ok(())
            }
            Backend::Remote(r) => r.store(requests, out),
        }
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
            Backend::Remote(r) => {
                r.release(slots);
                0
            }
        }
    }

    /// The bytes of a slot this process may compare with (a live one locally; any slot of
    /// the mapped store remotely).
    pub(crate) fn page(&self, slot: Slot) -> Option<&[u8]> {
        match self {
            Backend::Local(s) => s.page(slot),
            Backend::Remote(r) => r.page(slot),
        }
    }

    /// The hash a slot this process holds is indexed under.
    pub(crate) fn hash_of(&self, slot: Slot) -> Option<PageHash> {
        match self {
            Backend::Local(s) => s.hash_of(slot).copied(),
            Backend::Remote(r) => r.hash_of(slot),
        }
    }

    /// The store's descriptor, to map slots from (`None` when no broker is reachable).
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Backend::Local(s) => Some(s.fd()),
            Backend::Remote(r) => r.fd(),
        }
    }

    /// Changes when the store changes (a new broker): references into the old one are gone.
    /// Reconnects to a broker that is back (the only call that does).
    pub(crate) fn generation(&mut self) -> u32 {
        match self {
            Backend::Local(_) => 0,
            Backend::Remote(r) => r.generation(),
        }
    }

    /// The generation now, without reconnecting.
    pub(crate) fn current_generation(&self) -> u32 {
        match self {
            Backend::Local(_) => 0,
            Backend::Remote(r) => r.current_generation(),
        }
    }

    /// Live store pages (locally); remotely, the slots this process holds.
    pub(crate) fn live_pages(&self) -> u64 {
        match self {
            Backend::Local(s) => s.live_pages() as u64,
            Backend::Remote(r) => r.held_slots() as u64,
        }
    }

    /// Memory the store's memfd holds, for the whole domain.
    pub(crate) fn allocated_bytes(&self) -> Result<u64, DedupError> {
        match self {
            Backend::Local(s) => s.allocated_bytes(),
            Backend::Remote(r) => r.allocated_bytes(),
        }
    }

    /// Counters of the store (remotely: of what this process asked for).
    pub(crate) fn counters(&self) -> SharedCounters {
        match self {
            Backend::Local(s) => s.counters(),
            Backend::Remote(r) => r.counters(),
        }
    }

    /// References `holder` holds as the store counts them (remotely: as this process does).
    pub(crate) fn holder_refs(&self, holder: HolderId) -> u64 {
        match self {
            Backend::Local(s) => s.holder_refs(holder),
            Backend::Remote(r) => r.held_refs(),
        }
    }

    /// Checks the store: every page against its hash and every reference count, locally;
    /// remotely, every slot this process holds against the hash it was given.
    pub(crate) fn verify(&self) -> Result<usize, DedupError> {
        match self {
            Backend::Local(s) => s.verify(),
            Backend::Remote(r) => r.verify(),
        }
    }

    /// Reports that could not reach the broker.
    pub(crate) fn unavailable_count(&self) -> u64 {
        match self {
            Backend::Local(_) => 0,
            Backend::Remote(r) => r.unavailable_count(),
        }
    }

    /// Requests the broker answered late (or not yet).
    pub(crate) fn overdue_count(&self) -> u64 {
        match self {
            Backend::Local(_) => 0,
            Backend::Remote(r) => r.overdue_count(),
        }
    }
}
