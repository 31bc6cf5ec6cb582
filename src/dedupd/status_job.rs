//! The STATUS job: the JSON of `status` (`report::StatusReport`) written a few clients at a
//! time, one step per turn of the broker's loop, and sent in TEXT pieces as they fill. A
//! broker of thousands of clients answers STATUS with megabytes; written at once, it would
//! hold up every other client for as long.
//!
//! The list of clients to show is taken when the job starts; each one's figures when its turn
//! comes (a client gone meanwhile is left out), so the answer is not one instant's but each
//! line is true of its moment.

use std::collections::{BTreeMap, VecDeque};

use super::broker_domain::BrokerDomain;
use super::departed::Departed;
use super::domains::{Peer, Policy};
use super::report::{ClientId, ClientStatus, DepartedStatus, DomainStatus};
use super::session::{Reply, Session};
use crate::broker_wire::guest_stats;
use crate::broker_wire::proto::{self, kind};
use crate::dedup::PAGE_SIZE;

/// Clients (or departed clients) written per step.
pub const STATUS_ITEMS_PER_STEP: usize = 64;

const MIB: f64 = (1 << 20) as f64;

/// What a STATUS job reads of the broker.
pub struct BrokerView<'a> {
    /// The domains' stores.
    pub stores: &'a BTreeMap<String, BrokerDomain>,
    /// The connections.
    pub sessions: &'a BTreeMap<ClientId, Session>,
    /// Departed clients.
    pub departed: &'a BTreeMap<ClientId, Departed>,
    /// Who may join what.
    pub policy: &'a Policy,
    /// Seconds since the broker started.
    pub uptime_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Client(ClientId),
    /// The departed clients follow the clients.
    DepartedStart,
    Departed(ClientId),
}

/// A STATUS under way.
#[derive(Debug)]
pub struct StatusJob {
    /// The request's seq.
    pub seq: u32,
    caller: Peer,
    items: VecDeque<Item>,
    /// Whether the next item of the current list is its first (no comma before it).
    first: bool,
    /// Written, not yet sent.
    text: Vec<u8>,
}

impl StatusJob {
    /// Starts the answer for `caller`: the head (broker, domains) now, the clients it may see
    /// in later steps.
    pub fn new(seq: u32, caller: &Peer, view: &BrokerView<'_>) -> StatusJob {
        let may_see = |d: &str| view.policy.may_join(caller, d);
        let domains: Vec<DomainStatus> = view
            .stores
            .iter()
            .filter(|(name, _)| may_see(name))
            .map(|(name, s)| {
                domain_status(name, s, view.departed.values().filter(|d| &d.domain == name).count())
            })
            .collect();
        let visible = |s: &Session| {
            caller.is_root()
                || s.peer.uid == caller.uid
                || s.joined.as_ref().is_some_and(|j| may_see(&j.domain))
        };
        let connections = view.sessions.values().filter(|s| visible(s)).count();
        let mut items: VecDeque<Item> = view
            .sessions
            .iter()
            .filter(|(_, s)| s.joined.as_ref().is_some_and(|j| may_see(&j.domain)))
            .map(|(id, _)| Item::Client(*id))
            .collect();
        items.push_back(Item::DepartedStart);
        items.extend(
            view.departed.iter().filter(|(_, d)| may_see(&d.domain)).map(|(id, _)| Item::Departed(*id)),
        );
        // The same fields, in the same order, as `StatusReport` serializes.
        let head = format!(
            "{{\"protocol\":{},\"pid\":{},\"uptime_secs\":{},\"connections\":{connections},\"domains\":{},\"clients\":[",
            proto::VERSION,
            std::process::id(),
            view.uptime_secs,
            serde_json::to_string(&domains).unwrap_or_else(|_| "[]".to_string()),
        );
        StatusJob { seq, caller: caller.clone(), items, first: true, text: head.into_bytes() }
    }

    /// Writes at most [`STATUS_ITEMS_PER_STEP`] more clients; returns the TEXT pieces that are
    /// full (and, when done, the rest and the empty piece that ends the text) and whether the
    /// answer is complete.
    pub fn step(&mut self, view: &BrokerView<'_>) -> (Vec<Reply>, bool) {
        for _ in 0..STATUS_ITEMS_PER_STEP {
            let Some(item) = self.items.pop_front() else { break };
            let json = match item {
                Item::Client(id) => {
                    view.sessions.get(&id).map(|s| serde_json::to_string(&client_status(s, view.stores)))
                }
                Item::DepartedStart => {
                    self.text.extend_from_slice(b"],\"departed\":[");
                    self.first = true;
                    continue;
                }
                Item::Departed(id) => view
                    .departed
                    .get(&id)
                    .map(|d| serde_json::to_string(&departed_status(id, d, view.stores))),
            };
            let Some(Ok(json)) = json else { continue };
            if !self.first {
                self.text.push(b',');
            }
            self.first = false;
            self.text.extend_from_slice(json.as_bytes());
        }
        let done = self.items.is_empty();
        if done {
            self.text.extend_from_slice(b"]}");
        }
        let mut pieces = Vec::new();
        while self.text.len() >= proto::MAX_TEXT_CHUNK || (done && !self.text.is_empty()) {
            let n = self.text.len().min(proto::MAX_TEXT_CHUNK);
            pieces.push(Reply::new(kind::TEXT, self.seq, &self.text[..n]));
            self.text.drain(..n);
        }
        if done {
            pieces.push(Reply::new::<u8>(kind::TEXT, self.seq, &[]));
        }
        (pieces, done)
    }

    /// Who asked.
    pub fn caller(&self) -> &Peer {
        &self.caller
    }
}

fn domain_status(name: &str, store: &BrokerDomain, departed_clients: usize) -> DomainStatus {
    let shared = &store.shared;
    let store_pages = shared.live_pages() as u64;
    let references = shared.total_refs();
    let store_bytes = shared.allocated_bytes().unwrap_or(0);
    let page_mib = PAGE_SIZE as f64 / MIB;
    DomainStatus {
        name: name.to_string(),
        clients: shared.holders(),
        max_slots: shared.max_pages() as u64,
        store_pages,
        slots_used: shared.slots_used() as u64,
        store_bytes,
        references,
        pinned: shared.total_pins() as u64,
        departed_clients,
        leaving_clients: shared.leaving_holders(),
        mib_held: store_bytes as f64 / MIB,
        mib_saved: references.saturating_sub(store_pages) as f64 * page_mib,
        repunches: store.repunches,
        counters: shared.counters(),
    }
}

fn client_status(session: &Session, stores: &BTreeMap<String, BrokerDomain>) -> ClientStatus {
    let joined = session.joined.as_ref();
    let store = joined.and_then(|j| stores.get(&j.domain).map(|s| (s, j.holder)));
    ClientStatus {
        id: session.id,
        label: joined.map(|j| j.label.clone()).unwrap_or_default(),
        pid: session.peer.pid,
        uid: session.peer.uid,
        gid: session.peer.gid,
        domain: joined.map(|j| j.domain.clone()).unwrap_or_default(),
        ref_limit: joined.map_or(0, |j| j.ref_limit),
        references: store.map_or(0, |(s, h)| s.shared.holder_refs(h)),
        pinned: store.map_or(0, |(s, h)| s.shared.holder_pins(h) as u64),
        requests: session.requests,
        rejections: session.rejections,
        stats: session.stats,
        guest_stats: session.guest_stats.as_ref().map(guest_stats::to_memory_stats),
    }
}

fn departed_status(id: ClientId, d: &Departed, stores: &BTreeMap<String, BrokerDomain>) -> DepartedStatus {
    let store = stores.get(&d.domain);
    DepartedStatus {
        id,
        label: d.label.clone(),
        pid: d.peer.pid,
        uid: d.peer.uid,
        domain: d.domain.clone(),
        references: store.map_or(0, |s| s.shared.holder_refs(d.holder)),
        pinned: store.map_or(0, |s| s.shared.holder_pins(d.holder) as u64),
        secs: d.since.elapsed().as_secs_f64(),
    }
}
