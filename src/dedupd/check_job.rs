//! The CHECK job (`docs/dedupd.md`, "`status` and `check`"): every stored page against its
//! hash, then every slot's reference count against the holders', in steps of at most
//! [`CHECK_PAGES_PER_STEP`] hashed pages or [`CHECK_SLOTS_PER_STEP`] slots, one step per turn
//! of the broker's loop, so that checking a large store costs other clients no more than a
//! STORE does.

use std::collections::BTreeMap;

use super::broker_domain::BrokerDomain;
use super::domains::Peer;
use super::report::{CheckReport, DomainCheck};
use crate::dedup::Slot;

/// Pages a CHECK hashes per turn of the loop (as many as one STORE may).
pub const CHECK_PAGES_PER_STEP: usize = crate::broker_wire::proto::MAX_STORE_PAGES;
/// Slots whose reference counts a CHECK compares per turn of the loop.
pub const CHECK_SLOTS_PER_STEP: usize = 4096;

/// A CHECK under way: the domains to check, where it is, and what it found so far.
#[derive(Debug)]
pub struct CheckJob {
    /// The request's seq.
    pub seq: u32,
    /// (domain, the store's generation when the check started).
    pending: Vec<(String, u64)>,
    caller: Peer,
    next_slot: Slot,
    /// Pages are checked; now the reference counts.
    refs_phase: bool,
    current: Option<DomainCheck>,
    report: CheckReport,
}

impl CheckJob {
    /// A check of `domains` (name and store generation) for `caller`.
    pub fn new(seq: u32, domains: Vec<(String, u64)>, caller: Peer) -> CheckJob {
        let mut pending = domains;
        pending.reverse();
        CheckJob {
            seq,
            pending,
            caller,
            next_slot: 0,
            refs_phase: false,
            current: None,
            report: CheckReport::default(),
        }
    }

    /// Who asked.
    pub fn caller(&self) -> &Peer {
        &self.caller
    }

    /// One step: hashes at most [`CHECK_PAGES_PER_STEP`] pages. Returns the report when the
    /// check is done.
    pub fn step(&mut self, stores: &BTreeMap<String, BrokerDomain>) -> Option<CheckReport> {
        let Some((name, generation)) = self.pending.last().cloned() else {
            return Some(self.finish());
        };
        let current =
            self.current.get_or_insert_with(|| DomainCheck { name: name.clone(), ..Default::default() });
        let store = stores.get(&name).filter(|s| s.generation == generation);
        let done = match store {
            // A store dropped since (and maybe created anew) has nothing left to disagree.
            None => {
                current.dropped = true;
                true
            }
            Some(store) if !self.refs_phase => {
                match store.shared.verify_pages(self.next_slot, CHECK_PAGES_PER_STEP) {
                    Ok((checked, next)) => {
                        current.pages_checked += checked as u64;
                        match next {
                            Some(slot) => self.next_slot = slot,
                            None => (self.refs_phase, self.next_slot) = (true, 0),
                        }
                        false
                    }
                    Err(e) => {
                        current.error = Some(crate::error_chain(&e));
                        true
                    }
                }
            }
            // Then the reference counts, a range of slots a step.
            Some(store) => match store.shared.verify_refs(self.next_slot, CHECK_SLOTS_PER_STEP) {
                Ok(Some(slot)) => {
                    self.next_slot = slot;
                    false
                }
                Ok(None) => {
                    current.references = store.shared.total_refs();
                    current.clients = store.shared.holders();
                    true
                }
                Err(e) => {
                    current.error = Some(crate::error_chain(&e));
                    true
                }
            },
        };
        if done {
            self.pending.pop();
            (self.next_slot, self.refs_phase) = (0, false);
            if let Some(check) = self.current.take() {
                if let (None, Some(e)) = (&self.report.first_disagreement, &check.error) {
                    self.report.first_disagreement = Some(format!("domain {}: {e}", check.name));
                }
                self.report.domains.push(check);
            }
        }
        None
    }

    fn finish(&mut self) -> CheckReport {
        let mut report = std::mem::take(&mut self.report);
        report.consistent = report.first_disagreement.is_none();
        report
    }
}
