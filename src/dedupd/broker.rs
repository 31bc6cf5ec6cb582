//! The broker's state, apart from its sockets: the domains' stores, the connections, and what
//! each request does to them. [`Broker::handle`] takes one received packet and returns the
//! replies, so the protocol is exercised here without any socket.

use std::collections::BTreeMap;
use std::time::Instant;

use super::domains::{self, Peer, Policy};
use super::session::{parse, ClientId, Joined, Refusal, Rejection, Reply, Request, Session};
use super::socket::Received;
use super::status::{self, CheckJob};
use crate::dedup::proto::{self, error, kind, Hello, Welcome, VERSION};
use crate::dedup::shared::SharedStore;
use crate::dedup::PAGE_SIZE;

/// Most connections served at once; more are answered BUSY.
pub const MAX_CLIENTS: usize = 4096;
/// Most connections of one user other than root, so that no user takes them all.
pub const MAX_CLIENTS_PER_USER: usize = 1024;
/// Most domains with a store at once; a HELLO that would create another is answered BUSY.
/// Each store reserves `MAX_SLOTS` pages (1 TiB) of the broker's address space, of which a
/// process has 128 TiB.
pub const MAX_DOMAINS: usize = 64;
/// Slots of every store: 2^28 pages (1 TiB). Slots are address space in the broker's and in
/// every client's view mapping (`MAP_NORESERVE`, growing with the file only as pages are
/// stored), not memory; the limit bounds the slot numbers and any one guest (a client holds
/// at most its guest's pages), and it stays far below the 128 TiB a process may map.
pub const MAX_SLOTS: usize = 1 << 28;
/// Malformed messages after which a connection is closed.
pub const MAX_MALFORMED: u32 = 64;

/// The broker's limits (tests use small ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub clients: usize,
    /// Connections of one user other than root.
    pub clients_per_user: usize,
    /// Domains with a store at once.
    pub domains: usize,
    /// Slots of each store.
    pub slots: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            clients: MAX_CLIENTS,
            clients_per_user: MAX_CLIENTS_PER_USER,
            domains: MAX_DOMAINS,
            slots: MAX_SLOTS,
        }
    }
}

/// A domain's store while it has clients.
pub struct DomainStore {
    /// The store, index and references.
    pub shared: SharedStore,
    /// Which store of this name this is (a CHECK under way notices a store made anew).
    pub generation: u64,
    /// Times its free slots were punched again.
    pub repunches: u64,
}

/// What to do after a request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Replies to send, in order.
    pub replies: Vec<Reply>,
    /// Close the connection once they are sent.
    pub close: bool,
}

impl Outcome {
    fn reply(reply: Reply) -> Outcome {
        Outcome { replies: vec![reply], close: false }
    }
}

/// Stores, connections and the domains policy.
pub struct Broker {
    policy: Policy,
    limits: Limits,
    stores: BTreeMap<String, DomainStore>,
    sessions: BTreeMap<ClientId, Session>,
    next_client: ClientId,
    next_generation: u64,
    started: Instant,
}

impl Broker {
    /// A broker with no connections.
    pub fn new(policy: Policy, limits: Limits) -> Broker {
        Broker {
            policy,
            limits,
            stores: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_client: 1,
            next_generation: 1,
            started: Instant::now(),
        }
    }

    /// A new connection, or `None` when the broker serves as many as it may (answer it
    /// [`Broker::busy`] and close it).
    pub fn connect(&mut self, peer: Peer) -> Option<ClientId> {
        if self.sessions.len() >= self.limits.clients {
            let max = self.limits.clients;
            log::warn!("refusing a connection of pid {} uid {}: {max} connections", peer.pid, peer.uid);
            return None;
        }
        let per_user = self.limits.clients_per_user;
        if !peer.is_root() && self.sessions.values().filter(|s| s.peer.uid == peer.uid).count() >= per_user {
            log::warn!(
                "refusing a connection of pid {} uid {}: {per_user} connections of that user",
                peer.pid,
                peer.uid
            );
            return None;
        }
        let id = self.next_client;
        self.next_client += 1;
        log::debug!("connection {id}: pid {} uid {} gid {}", peer.pid, peer.uid, peer.gid);
        self.sessions.insert(id, Session::new(id, peer));
        Some(id)
    }

    /// The answer to a connection beyond the limit.
    pub fn busy(&self) -> Reply {
        Reply::error(0, error::BUSY, u32::try_from(self.limits.clients).unwrap_or(u32::MAX))
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.sessions.len()
    }

    /// A connection.
    pub fn session(&self, id: ClientId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// A domain's store.
    pub fn store(&self, domain: &str) -> Option<&DomainStore> {
        self.stores.get(domain)
    }

    /// Domains with a store.
    pub fn domains(&self) -> usize {
        self.stores.len()
    }

    /// Handles one received packet of connection `id` (`message`: what the buffer got of it).
    pub fn handle(&mut self, id: ClientId, message: &[u8], received: Received) -> Outcome {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        session.requests += 1;
        let request = match parse(message, received) {
            Ok(request) => request,
            Err(refusal) => return self.refuse(id, refusal),
        };
        let seq = request.header.seq;
        let result = match request.header.kind {
            kind::HELLO => self.hello(id, &request),
            kind::STATUS => Ok(self.status(id, seq)),
            kind::CHECK => Ok(self.start_check(id, seq)),
            _ => self.joined_request(id, &request),
        };
        match result {
            Ok(outcome) => outcome,
            Err(refusal) => self.refuse(id, refusal),
        }
    }

    fn joined_request(&mut self, id: ClientId, request: &Request<'_>) -> Result<Outcome, Refusal> {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Ok(Outcome { replies: Vec::new(), close: true });
        };
        let domain = session.joined.as_ref().map(|j| j.domain.as_str());
        match domain.and_then(|d| self.stores.get_mut(d)) {
            Some(store) => session.handle_joined(&mut store.shared, request).map(Outcome::reply),
            None => Err(Refusal {
                code: error::NO_SESSION,
                rejection: Rejection::NoSession,
                ..Refusal::bad(request.header.seq, format!("kind {:#x} before HELLO", request.header.kind))
            }),
        }
    }

    /// Answers a refused request with ERROR; closes after NOT_ALLOWED, BAD_VERSION or BUSY,
    /// and after [`MAX_MALFORMED`] malformed messages.
    fn refuse(&mut self, id: ClientId, refusal: Refusal) -> Outcome {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        session.reject(refusal.rejection, format_args!("{}", refusal.what));
        let mut close = refusal.closes();
        if refusal.is_malformed() {
            session.malformed += 1;
            if session.malformed >= MAX_MALFORMED {
                log::warn!("{session}: closing the connection after {MAX_MALFORMED} malformed messages");
                close = true;
            }
        }
        Outcome { replies: vec![Reply::error(refusal.seq, refusal.code, refusal.detail)], close }
    }

    fn hello(&mut self, id: ClientId, request: &Request<'_>) -> Result<Outcome, Refusal> {
        let seq = request.header.seq;
        let Some(session) = self.sessions.get(&id) else {
            return Ok(Outcome { replies: Vec::new(), close: true });
        };
        if session.joined.is_some() {
            let what = "a second HELLO";
            return Err(Refusal {
                code: error::NO_SESSION,
                rejection: Rejection::NoSession,
                ..Refusal::bad(seq, what)
            });
        }
        let hello = proto::entry::<Hello>(request.body, 0).unwrap_or_default();
        if hello.protocol != u32::from(VERSION) {
            let what = format!("HELLO for protocol version {}", hello.protocol);
            let (code, detail, rejection) = (error::BAD_VERSION, VERSION.into(), Rejection::BadVersion);
            return Err(Refusal { code, detail, rejection, ..Refusal::bad(seq, what) });
        }
        if hello.flags != 0 || hello.ram_pages == 0 {
            return Err(Refusal::bad(
                seq,
                format!("HELLO with flags {:#x}, {} pages", hello.flags, hello.ram_pages),
            ));
        }
        let not_allowed = |what: String| Refusal {
            code: error::NOT_ALLOWED,
            rejection: Rejection::NotAllowed,
            ..Refusal::bad(seq, what)
        };
        let (Some(asked), Some(label)) = (proto::name_str(&hello.domain), proto::name_str(&hello.label))
        else {
            return Err(not_allowed("HELLO with a domain or label that is no clean name".to_string()));
        };
        let domain = if asked.is_empty() { domains::own_domain(session.peer.uid) } else { asked.to_string() };
        if !domains::valid_name(&domain) {
            return Err(not_allowed(format!("invalid domain name {domain:?}")));
        }
        if !self.policy.may_join(&session.peer, &domain) {
            return Err(not_allowed(format!("domain {domain} is not open to it")));
        }
        let label = label.to_string();
        let ref_limit = hello.ram_pages.min(MAX_SLOTS as u64);
        self.join(id, seq, domain, label, ref_limit)
    }

    /// Joins a checked HELLO's client to its domain (creating the store) and answers WELCOME
    /// with the store's read-only descriptor.
    fn join(
        &mut self,
        id: ClientId,
        seq: u32,
        domain: String,
        label: String,
        ref_limit: u64,
    ) -> Result<Outcome, Refusal> {
        let busy = |what: String| Refusal {
            code: error::BUSY,
            rejection: Rejection::Busy,
            ..Refusal::bad(seq, what)
        };
        if !self.stores.contains_key(&domain) {
            if self.stores.len() >= self.limits.domains {
                return Err(busy(format!("domain {domain} would be store {}", self.limits.domains + 1)));
            }
            let shared = SharedStore::new(&domain, self.limits.slots).map_err(|e| {
                log::error!("cannot create the store of domain {domain}: {}", crate::error_chain(&e));
                busy(format!("no store for domain {domain}"))
            })?;
            let generation = self.next_generation;
            self.next_generation += 1;
            log::info!("domain {domain}: store created");
            self.stores.insert(domain.clone(), DomainStore { shared, generation, repunches: 0 });
        }
        let Some(store) = self.stores.get_mut(&domain) else {
            return Err(busy(format!("no store for domain {domain}")));
        };
        let fd = match store.shared.client_fd() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("domain {domain}: {}", crate::error_chain(&e));
                if store.shared.holders() == 0 {
                    self.stores.remove(&domain);
                }
                return Err(busy(format!("no descriptor of domain {domain}'s store")));
            }
        };
        // Every client pins: the broker cannot see its mappings.
        let holder = store.shared.join(true);
        let welcome = Welcome {
            client: id,
            max_slots: store.shared.max_pages() as u64,
            page_size: PAGE_SIZE as u32,
            reserved: 0,
            domain: proto::name_bytes(&domain).unwrap_or([0; proto::NAME_LEN]),
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            store.shared.leave(holder);
            return Ok(Outcome { replies: Vec::new(), close: true });
        };
        session.joined = Some(Joined { domain, label, holder, ref_limit });
        log::info!("{session} joined: {ref_limit} guest pages");
        let mut reply = Reply::new(kind::WELCOME, seq, &[welcome]);
        reply.fd = Some(fd);
        Ok(Outcome::reply(reply))
    }

    fn status(&mut self, id: ClientId, seq: u32) -> Outcome {
        let Some(session) = self.sessions.get(&id) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        let (policy, peer) = (&self.policy, &session.peer);
        let report = status::status_report(
            &self.stores,
            &self.sessions,
            |d| policy.may_join(peer, d),
            self.started.elapsed().as_secs(),
        );
        let text = serde_json::to_string(&report).unwrap_or_default();
        Outcome { replies: Reply::text(seq, &text), close: false }
    }

    fn start_check(&mut self, id: ClientId, seq: u32) -> Outcome {
        let Some(session) = self.sessions.get(&id) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        let domains = self
            .stores
            .iter()
            .filter(|(name, _)| self.policy.may_join(&session.peer, name))
            .map(|(name, store)| (name.clone(), store.generation))
            .collect();
        if let Some(session) = self.sessions.get_mut(&id) {
            session.check = Some(CheckJob::new(seq, domains));
        }
        Outcome::default()
    }

    /// Whether a CHECK is under way (the loop must not sleep).
    pub fn checks_pending(&self) -> bool {
        self.sessions.values().any(|s| s.check.is_some())
    }

    /// Whether connection `id` waits for its CHECK (it is not read meanwhile: one request
    /// at a time).
    pub fn checking(&self, id: ClientId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.check.is_some())
    }

    /// Takes one step of every CHECK under way; returns the replies of those that finished.
    pub fn step_checks(&mut self) -> Vec<(ClientId, Outcome)> {
        let mut done = Vec::new();
        for (id, session) in &mut self.sessions {
            let Some(job) = &mut session.check else { continue };
            if let Some(report) = job.step(&self.stores) {
                let text = serde_json::to_string(&report).unwrap_or_default();
                done.push((*id, Outcome { replies: Reply::text(job.seq, &text), close: false }));
                session.check = None;
            }
        }
        done
    }

    /// A connection closed (EOF, error, hang-up, or the broker closed it): its references
    /// drop, and its domain's store with the last client.
    pub fn disconnect(&mut self, id: ClientId) {
        let Some(session) = self.sessions.remove(&id) else { return };
        let Some(joined) = &session.joined else {
            log::debug!("connection {id} closed");
            return;
        };
        let Some(store) = self.stores.get_mut(&joined.domain) else { return };
        let refs = store.shared.holder_refs(joined.holder);
        store.shared.leave(joined.holder);
        log::info!("{session} left: {refs} references dropped");
        if store.shared.holders() == 0 {
            self.stores.remove(&joined.domain);
            log::info!("domain {}: last client left, store dropped", joined.domain);
        }
    }

    /// Punches the free slots of every store that holds more memory than its live pages
    /// (stale private mappings that faulted punched pages refill them).
    pub fn repunch(&mut self) {
        for (name, store) in &mut self.stores {
            let live = store.shared.live_pages() as u64 * PAGE_SIZE as u64;
            let held = match store.shared.allocated_bytes() {
                Ok(bytes) => bytes,
                Err(e) => {
                    log::warn!("domain {name}: {}", crate::error_chain(&e));
                    continue;
                }
            };
            if held <= live {
                continue;
            }
            store.repunches += 1;
            match store.shared.punch_free() {
                Ok(pages) if store.repunches.is_power_of_two() => log::info!(
                    "domain {name}: the store held {held} bytes for {live} bytes of live pages; \
                     punched {pages} free slots again ({} times so far)",
                    store.repunches
                ),
                Ok(_) => {}
                Err(e) => log::warn!("domain {name}: {}", crate::error_chain(&e)),
            }
        }
    }
}
