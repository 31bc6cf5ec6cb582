//! What `status` and `check` show (`docs/dedupd.md`, "`status` and `check`"): the JSON the
//! broker sends, built from its state, and the text `status` prints. A CHECK runs in steps
//! of at most [`CHECK_PAGES_PER_STEP`] hashed pages, one step per turn of the broker's loop,
//! so that checking a large store costs other clients no more than a STORE does.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::broker::DomainStore;
use super::session::{ClientId, Rejections, Session};
use crate::dedup::proto::ClientStats;
use crate::dedup::shared::SharedCounters;
use crate::dedup::{Slot, PAGE_SIZE};

/// Pages a CHECK hashes per turn of the loop (as many as one STORE may).
pub const CHECK_PAGES_PER_STEP: usize = crate::dedup::proto::MAX_STORE_PAGES;

const MIB: f64 = (1 << 20) as f64;

/// The broker's figures (`samepage dedupd status --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The protocol version the broker speaks.
    pub protocol: u16,
    /// The broker's process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Open connections (clients and queries).
    pub connections: usize,
    /// Domains the caller may join, with a store now.
    pub domains: Vec<DomainStatus>,
    /// The clients of those domains.
    pub clients: Vec<ClientStatus>,
}

/// One domain's store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// The domain.
    pub name: String,
    /// Clients joined.
    pub clients: usize,
    /// Slots a client maps.
    pub max_slots: u64,
    /// Slots holding a page (with references).
    pub store_pages: u64,
    /// Memory the store's memfd holds.
    pub store_bytes: u64,
    /// References held by all clients.
    pub references: u64,
    /// `store_bytes` in MiB.
    pub mib_held: f64,
    /// What sharing saves: references beyond one per stored page, in MiB.
    pub mib_saved: f64,
    /// Times free slots were punched again because the store held more than its live pages.
    pub repunches: u64,
    /// The store's counters.
    pub counters: SharedCounters,
}

/// One connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// The broker's id for it.
    pub id: ClientId,
    /// The VM's name (empty before HELLO).
    pub label: String,
    /// Its process id.
    pub pid: i32,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// The domain joined (empty before HELLO).
    pub domain: String,
    /// The most references it may hold.
    pub ref_limit: u64,
    /// References it holds.
    pub references: u64,
    /// Requests received.
    pub requests: u64,
    /// What was refused.
    pub rejections: Rejections,
    /// The figures of its last STATS.
    pub stats: Option<ClientStats>,
}

/// What a CHECK found (`samepage dedupd check`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Every checked domain agrees.
    pub consistent: bool,
    /// Per domain the caller may join.
    pub domains: Vec<DomainCheck>,
    /// The first disagreement found.
    pub first_disagreement: Option<String>,
}

/// One domain's check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCheck {
    /// The domain.
    pub name: String,
    /// Stored pages hashed and compared with their index keys.
    pub pages_checked: u64,
    /// References held (all agree with the slots' counts when `error` is none).
    pub references: u64,
    /// Clients joined.
    pub clients: usize,
    /// The store was dropped (its last client left) while it was checked.
    pub dropped: bool,
    /// The disagreement found.
    pub error: Option<String>,
}

/// Builds `status` for a caller that may see the domains `may_see` admits.
pub fn status_report(
    stores: &BTreeMap<String, DomainStore>,
    sessions: &BTreeMap<ClientId, Session>,
    may_see: impl Fn(&str) -> bool,
    uptime_secs: u64,
) -> StatusReport {
    let domains =
        stores.iter().filter(|(name, _)| may_see(name)).map(|(name, s)| domain_status(name, s)).collect();
    let clients = sessions
        .values()
        .filter(|s| s.joined.as_ref().is_some_and(|j| may_see(&j.domain)))
        .map(|s| client_status(s, stores))
        .collect();
    StatusReport {
        protocol: crate::dedup::proto::VERSION,
        pid: std::process::id(),
        uptime_secs,
        connections: sessions.len(),
        domains,
        clients,
    }
}

fn domain_status(name: &str, store: &DomainStore) -> DomainStatus {
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
        store_bytes,
        references,
        mib_held: store_bytes as f64 / MIB,
        mib_saved: references.saturating_sub(store_pages) as f64 * page_mib,
        repunches: store.repunches,
        counters: shared.counters(),
    }
}

fn client_status(session: &Session, stores: &BTreeMap<String, DomainStore>) -> ClientStatus {
    let joined = session.joined.as_ref();
    let references =
        joined.and_then(|j| stores.get(&j.domain).map(|s| s.shared.holder_refs(j.holder))).unwrap_or(0);
    ClientStatus {
        id: session.id,
        label: joined.map(|j| j.label.clone()).unwrap_or_default(),
        pid: session.peer.pid,
        uid: session.peer.uid,
        gid: session.peer.gid,
        domain: joined.map(|j| j.domain.clone()).unwrap_or_default(),
        ref_limit: joined.map_or(0, |j| j.ref_limit),
        references,
        requests: session.requests,
        rejections: session.rejections,
        stats: session.stats,
    }
}

/// A CHECK under way: the domains to check, where it is, and what it found so far.
#[derive(Debug)]
pub struct CheckJob {
    /// The request's seq.
    pub seq: u32,
    /// (domain, the store's generation when the check started).
    pending: Vec<(String, u64)>,
    next_slot: Slot,
    current: Option<DomainCheck>,
    report: CheckReport,
}

impl CheckJob {
    /// A check of `domains` (name and store generation).
    pub fn new(seq: u32, domains: Vec<(String, u64)>) -> CheckJob {
        let mut pending = domains;
        pending.reverse();
        CheckJob { seq, pending, next_slot: 0, current: None, report: CheckReport::default() }
    }

    /// One step: hashes at most [`CHECK_PAGES_PER_STEP`] pages. Returns the report when the
    /// check is done.
    pub fn step(&mut self, stores: &BTreeMap<String, DomainStore>) -> Option<CheckReport> {
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
            Some(store) => match store.shared.verify_pages(self.next_slot, CHECK_PAGES_PER_STEP) {
                Ok((checked, next)) => {
                    current.pages_checked += checked as u64;
                    match next {
                        Some(slot) => {
                            self.next_slot = slot;
                            false
                        }
                        None => {
                            // References are checked at once, at the end.
                            if let Err(e) = store.shared.verify_refs() {
                                current.error = Some(crate::error_chain(&e));
                            }
                            current.references = store.shared.total_refs();
                            current.clients = store.shared.holders();
                            true
                        }
                    }
                }
                Err(e) => {
                    current.error = Some(crate::error_chain(&e));
                    true
                }
            },
        };
        if done {
            self.pending.pop();
            self.next_slot = 0;
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

/// `status` as text: one line per domain, then one per client.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "broker pid {}, up {} s, protocol {}, {} connections",
        report.pid, report.uptime_secs, report.protocol, report.connections
    );
    if report.domains.is_empty() {
        out.push_str("no domains\n");
    }
    for d in &report.domains {
        let _ = writeln!(
            out,
            "domain {}: {} store pages, {:.1} MiB held, {} references, {:.1} MiB saved, {} clients",
            d.name, d.store_pages, d.mib_held, d.references, d.mib_saved, d.clients
        );
        for c in report.clients.iter().filter(|c| c.domain == d.name) {
            out.push_str(&render_client(c));
        }
    }
    out
}

fn render_client(c: &ClientStatus) -> String {
    let mut line = format!(
        "  client {} {:?}: pid {}, uid {}, {} references (limit {}), {} requests",
        c.id,
        crate::escape_controls(&c.label),
        c.pid,
        c.uid,
        c.references,
        c.ref_limit,
        c.requests
    );
    if let Some(s) = &c.stats {
        let _ = write!(
            line,
            "; VM: {} reported, {} merged, {} already, {} mismatch, {} no room, {} copied on write, \
             {} mapped, {} VMAs",
            s.reported, s.merged, s.already, s.mismatch, s.no_room, s.cow_breaks, s.mapped_pages, s.vmas
        );
    }
    let rejected = c.rejections.total();
    if rejected > 0 {
        let _ = write!(line, "; {rejected} refused ({})", nonzero_counters(&c.rejections));
    }
    line.push('\n');
    line
}

/// "name n, name n" of the counters that are not 0.
fn nonzero_counters(rejections: &Rejections) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(rejections) else {
        return String::new();
    };
    let nonzero =
        fields.iter().filter_map(|(name, v)| v.as_u64().filter(|n| *n > 0).map(|n| format!("{name} {n}")));
    nonzero.collect::<Vec<_>>().join(", ")
}
