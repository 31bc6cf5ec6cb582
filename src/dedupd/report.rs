//! The broker's words that leave it: the id of a connection, what was refused of it, and the
//! JSON reports of `status` and `check` (`docs/dedupd.md`, "`status` and `check`"), with the
//! text they print. A leaf: the broker, its query commands and `density` all read these.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use samepage_virtio::balloon::GuestMemoryStats;

use crate::broker_wire::proto::ClientStats;
use crate::dedup::words::PageCounters;

/// The broker's id of a connection (never reused while the broker runs).
pub type ClientId = u64;

/// What was refused, per kind (each is counted and logged sparsely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Malformed: length, magic, unknown kind, entry count, reserved fields, descriptors.
    BadMessage,
    /// Longer than the longest message.
    Oversized,
    /// Another protocol version.
    BadVersion,
    /// More entries than the kind allows.
    TooMany,
    /// A request before HELLO, or a second HELLO.
    NoSession,
    /// A domain the client may not join, or an invalid name.
    NotAllowed,
    /// No store for the domain (too many domains, or the store cannot be made).
    Busy,
    /// A release of a reference the client does not hold.
    NotHeld,
    /// STORE bytes and hash disagree.
    Mismatch,
    /// LOOKUP or STORE at the client's reference limit.
    RefLimit,
    /// STORE into a full store.
    StoreFull,
    /// GUEST_STATS with impossible figures (a memory size beyond the guest's RAM, more free
    /// than total).
    GuestStats,
    /// GUEST_STATS sooner after the last one than the broker takes them.
    TooSoon,
}

/// Counters of refused requests and entries, by [`Rejection`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejections {
    /// [`Rejection::BadMessage`].
    pub bad_message: u64,
    /// [`Rejection::Oversized`].
    pub oversized: u64,
    /// [`Rejection::BadVersion`].
    pub bad_version: u64,
    /// [`Rejection::TooMany`].
    pub too_many: u64,
    /// [`Rejection::NoSession`].
    pub no_session: u64,
    /// [`Rejection::NotAllowed`].
    pub not_allowed: u64,
    /// [`Rejection::Busy`].
    pub busy: u64,
    /// [`Rejection::NotHeld`].
    pub not_held: u64,
    /// [`Rejection::Mismatch`].
    pub mismatch: u64,
    /// [`Rejection::RefLimit`].
    pub ref_limit: u64,
    /// [`Rejection::StoreFull`].
    pub store_full: u64,
    /// [`Rejection::GuestStats`].
    #[serde(default)]
    pub guest_stats: u64,
    /// [`Rejection::TooSoon`].
    #[serde(default)]
    pub too_soon: u64,
}

impl Rejections {
    /// The counter of `r`.
    pub fn counter(&mut self, r: Rejection) -> &mut u64 {
        match r {
            Rejection::BadMessage => &mut self.bad_message,
            Rejection::Oversized => &mut self.oversized,
            Rejection::BadVersion => &mut self.bad_version,
            Rejection::TooMany => &mut self.too_many,
            Rejection::NoSession => &mut self.no_session,
            Rejection::NotAllowed => &mut self.not_allowed,
            Rejection::Busy => &mut self.busy,
            Rejection::NotHeld => &mut self.not_held,
            Rejection::Mismatch => &mut self.mismatch,
            Rejection::RefLimit => &mut self.ref_limit,
            Rejection::StoreFull => &mut self.store_full,
            Rejection::GuestStats => &mut self.guest_stats,
            Rejection::TooSoon => &mut self.too_soon,
        }
    }

    /// All rejections.
    pub fn total(&self) -> u64 {
        let Rejections {
            bad_message,
            oversized,
            bad_version,
            too_many,
            no_session,
            not_allowed,
            busy,
            not_held,
            mismatch,
            ref_limit,
            store_full,
            guest_stats,
            too_soon,
        } = *self;
        bad_message
            + oversized
            + bad_version
            + too_many
            + no_session
            + not_allowed
            + busy
            + not_held
            + mismatch
            + ref_limit
            + store_full
            + guest_stats
            + too_soon
    }
}

/// The broker's figures (`samepage dedupd status --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The protocol version the broker speaks.
    pub protocol: u16,
    /// The broker's process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Open connections the caller may see (its own, and those of the domains it may join;
    /// root: all).
    pub connections: usize,
    /// Domains the caller may join, with a store now.
    pub domains: Vec<DomainStatus>,
    /// The clients of those domains.
    pub clients: Vec<ClientStatus>,
    /// Clients of those domains whose connection closed while their process runs on: their
    /// references stay until it exits.
    #[serde(default)]
    pub departed: Vec<DepartedStatus>,
}

/// A departed client (`departed.rs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DepartedStatus {
    /// The broker's id for its connection.
    pub id: ClientId,
    /// The VM's name.
    pub label: String,
    /// Its process id.
    pub pid: i32,
    /// Its uid.
    pub uid: u32,
    /// The domain it joined.
    pub domain: String,
    /// References it still holds.
    pub references: u64,
    /// Released slots it still pins.
    pub pinned: u64,
    /// Seconds since its connection closed.
    pub secs: f64,
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
    /// Slots ever used (the store's high-water mark; freed slots are used again first).
    #[serde(default)]
    pub slots_used: u64,
    /// Memory the store's memfd holds.
    pub store_bytes: u64,
    /// References held by all clients.
    pub references: u64,
    /// Released slots the clients pin (kept from reuse; at most each one's declared pages, up
    /// to 65,536).
    #[serde(default)]
    pub pinned: u64,
    /// Departed clients whose process runs on (their references stay).
    #[serde(default)]
    pub departed_clients: usize,
    /// Holders whose references are being dropped, a step at a time.
    #[serde(default)]
    pub leaving_clients: usize,
    /// `store_bytes` in MiB.
    pub mib_held: f64,
    /// What sharing saves: references beyond one per stored page, in MiB.
    pub mib_saved: f64,
    /// Times free slots were punched again because the store held more than its live pages.
    pub repunches: u64,
    /// The store's counters.
    pub counters: PageCounters,
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
    /// Released slots it pins.
    #[serde(default)]
    pub pinned: u64,
    /// Requests received.
    pub requests: u64,
    /// What was refused.
    pub rejections: Rejections,
    /// The figures of its last STATS.
    pub stats: Option<ClientStats>,
    /// Its guest's balloon statistics of its last GUEST_STATS (the guest's word); `None`
    /// when it sent none: no balloon, no `stats=SECS`, or none yet.
    #[serde(default)]
    pub guest_stats: Option<GuestMemoryStats>,
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

/// `check` as text: one line per domain.
pub fn render_check(report: &CheckReport) -> String {
    let mut out = String::new();
    for d in &report.domains {
        let state = match (&d.error, d.dropped) {
            (Some(e), _) => format!("DISAGREES: {e}"),
            (None, true) => "dropped while checked (its last client left)".to_string(),
            (None, false) => "consistent".to_string(),
        };
        let _ = writeln!(
            out,
            "domain {}: {} pages checked, {} references of {} clients: {state}",
            d.name, d.pages_checked, d.references, d.clients
        );
    }
    if report.domains.is_empty() {
        out.push_str("no domains to check\n");
    }
    out
}

impl CheckReport {
    /// The disagreement that fails the check, if any.
    pub fn failure(&self) -> Option<&str> {
        match &self.first_disagreement {
            None if self.consistent => None,
            first => Some(first.as_deref().unwrap_or("the broker found a disagreement")),
        }
    }
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
    if let Some(g) = &c.guest_stats {
        let _ = write!(line, "; guest: {}", guest_figures(g));
    }
    let rejected = c.rejections.total();
    if rejected > 0 {
        let _ = write!(line, "; {rejected} refused ({})", nonzero_counters(&c.rejections));
    }
    line.push('\n');
    line
}

/// The guest statistics present, the memory sizes first ("48.0 MiB total, 12.0 MiB free,
/// ..., 44 KiB swapped in, 17 major faults"; "none" if the guest sent none it knows).
fn guest_figures(g: &GuestMemoryStats) -> String {
    const BYTES: bool = true;
    const COUNT: bool = false;
    let figures = [
        (g.total_memory, BYTES, "total"),
        (g.free_memory, BYTES, "free"),
        (g.available_memory, BYTES, "available"),
        (g.disk_caches, BYTES, "disk caches"),
        (g.swap_in, BYTES, "swapped in"),
        (g.swap_out, BYTES, "swapped out"),
        (g.major_faults, COUNT, "major faults"),
        (g.minor_faults, COUNT, "minor faults"),
        (g.hugetlb_allocations, COUNT, "hugetlb allocations"),
        (g.hugetlb_failures, COUNT, "hugetlb failures"),
        (g.oom_kills, COUNT, "OOM kills"),
        (g.alloc_stalls, COUNT, "allocation stalls"),
        (g.async_scans, BYTES, "scanned by kswapd"),
        (g.direct_scans, BYTES, "scanned directly"),
        (g.async_reclaims, BYTES, "reclaimed by kswapd"),
        (g.direct_reclaims, BYTES, "reclaimed directly"),
    ];
    let show = |v: u64, bytes: bool| match bytes {
        BYTES if v >= 1 << 20 => format!("{:.1} MiB", v as f64 / (1u64 << 20) as f64),
        BYTES => format!("{:.0} KiB", v as f64 / 1024.0),
        COUNT => v.to_string(),
    };
    let shown: Vec<String> = figures
        .iter()
        .filter_map(|&(v, bytes, name)| v.map(|v| format!("{} {name}", show(v, bytes))))
        .collect();
    if shown.is_empty() {
        return "none".to_string();
    }
    shown.join(", ")
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
