//! The broker's state, apart from its sockets: the domains' stores, the connections, and what
//! each request does to them. [`Broker::handle`] takes one received packet and returns the
//! replies, so the protocol is exercised here without any socket.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::admission::Admission;
use super::broker_domain::BrokerDomain;
use super::check_job::CheckJob;
use super::departed::{self, Departed};
use super::domains::{self, Peer, Policy};
use super::report::{ClientId, Rejection};
use super::session::{parse, Joined, Refusal, Reply, Request, Session};
use super::status_job::{BrokerView, StatusJob};
use crate::broker_wire::proto::{self, error, kind, Hello, Welcome, VERSION};
use crate::broker_wire::seqpacket::Packet;
use crate::dedup::shared_pages::SharedPages;
use crate::dedup::words::HolderId;
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
/// Most released slots a client keeps from being used again (its most recent releases; at
/// most its declared guest pages): a defence against a client that releases a slot it still
/// maps, bounded so that churning costs the broker nothing that grows.
pub const MAX_PINS: u64 = 1 << 16;
/// Least time between two GUEST_STATS of a client that the broker takes: a VMM sends its
/// guest's figures at most once a second (`dedup::broker_client`), so only a flood comes
/// sooner.
pub const GUEST_STATS_EVERY: Duration = Duration::from_millis(500);
/// Entries (slots) of departed clients dropped per turn of the loop: a client that held
/// millions of references leaves over many turns, between other clients' requests.
pub const LEAVE_ENTRIES_PER_TURN: usize = 4096;

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
    /// Least time between two GUEST_STATS of a client.
    pub guest_stats_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            clients: MAX_CLIENTS,
            clients_per_user: MAX_CLIENTS_PER_USER,
            domains: MAX_DOMAINS,
            slots: MAX_SLOTS,
            guest_stats_every: GUEST_STATS_EVERY,
        }
    }
}

/// A STATUS or CHECK under way for a connection (it is not read meanwhile).
enum QueryJob {
    Status(StatusJob),
    Check(CheckJob),
}

/// A query that waits for its user's share of the broker (`admission.rs`).
#[derive(Clone, Copy, Debug)]
struct ParkedQuery {
    id: ClientId,
    kind: u16,
    seq: u32,
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
    stores: BTreeMap<String, BrokerDomain>,
    sessions: BTreeMap<ClientId, Session>,
    /// Clients whose connection closed while their process runs on: their references stay.
    departed: BTreeMap<ClientId, Departed>,
    admission: Admission,
    /// Queries under way, by connection.
    jobs: BTreeMap<ClientId, QueryJob>,
    /// Queries waiting for their user's share, oldest first.
    parked: VecDeque<ParkedQuery>,
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
            departed: BTreeMap::new(),
            admission: Admission::default(),
            jobs: BTreeMap::new(),
            parked: VecDeque::new(),
            next_client: 1,
            next_generation: 1,
            started: Instant::now(),
        }
    }

    /// A new connection of `peer`, whose process `process` (a pidfd) tells when it exits, or
    /// `None` when the broker serves as many as it may (answer it [`Broker::busy`] and close
    /// it). Departed clients that still hold references count as connections of their user.
    pub fn connect(&mut self, peer: Peer, process: Option<OwnedFd>) -> Option<ClientId> {
        if self.sessions.len() + self.departed.len() >= self.limits.clients {
            let max = self.limits.clients;
            log::warn!("refusing a connection of pid {} uid {}: {max} connections", peer.pid, peer.uid);
            return None;
        }
        let per_user = self.limits.clients_per_user;
        let of_user = self.sessions.values().filter(|s| s.peer.uid == peer.uid).count()
            + self.departed.values().filter(|d| d.peer.uid == peer.uid).count();
        if !peer.is_root() && of_user >= per_user {
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
        let mut session = Session::new(id, peer);
        session.process = process;
        self.sessions.insert(id, session);
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
    pub fn store(&self, domain: &str) -> Option<&BrokerDomain> {
        self.stores.get(domain)
    }

    /// Domains with a store.
    pub fn domains(&self) -> usize {
        self.stores.len()
    }

    /// Handles one received packet of connection `id` (`message`: what the buffer got of it).
    pub fn handle(&mut self, id: ClientId, message: &[u8], packet: &Packet) -> Outcome {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        session.requests += 1;
        let request = match parse(message, packet) {
            Ok(request) => request,
            Err(refusal) => return self.refuse(id, refusal),
        };
        let seq = request.header.seq;
        let result = match request.header.kind {
            kind::HELLO => self.hello(id, &request),
            kind::STATUS | kind::CHECK => Ok(self.query(id, request.header.kind, seq)),
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
        let every = self.limits.guest_stats_every;
        match domain.and_then(|d| self.stores.get_mut(d)) {
            Some(store) => session.handle_joined(&mut store.shared, request, every).map(Outcome::reply),
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
        let ram_bytes = hello.ram_pages.saturating_mul(PAGE_SIZE as u64);
        self.join(id, seq, Joined { domain, label, holder: 0, ref_limit, ram_bytes })
    }

    /// Joins a checked HELLO's client to its domain (creating the store) and answers WELCOME
    /// with the store's read-only descriptor. `joined`'s holder is set here.
    fn join(&mut self, id: ClientId, seq: u32, mut joined: Joined) -> Result<Outcome, Refusal> {
        let (domain, ref_limit) = (joined.domain.clone(), joined.ref_limit);
        let busy = |what: String| Refusal {
            code: error::BUSY,
            rejection: Rejection::Busy,
            ..Refusal::bad(seq, what)
        };
        if !self.stores.contains_key(&domain) {
            if self.stores.len() >= self.limits.domains {
                return Err(busy(format!("domain {domain} would be store {}", self.limits.domains + 1)));
            }
            let shared = SharedPages::new(&domain, self.limits.slots).map_err(|e| {
                log::error!("cannot create the store of domain {domain}: {}", crate::error_chain(&e));
                busy(format!("no store for domain {domain}"))
            })?;
            let generation = self.next_generation;
            self.next_generation += 1;
            log::info!("domain {domain}: store created");
            self.stores.insert(domain.clone(), BrokerDomain { shared, generation, repunches: 0 });
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
        // Every client pins (its most recent releases): the broker cannot see its mappings.
        let holder = store.shared.join(ref_limit.min(MAX_PINS) as usize);
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
        joined.holder = holder;
        session.joined = Some(joined);
        log::info!("{session} joined: {ref_limit} guest pages");
        let mut reply = Reply::new(kind::WELCOME, seq, &[welcome]);
        reply.fd = Some(fd);
        Ok(Outcome::reply(reply))
    }

    /// A STATUS or CHECK: started now if its user's share allows (its answer comes in steps,
    /// [`Broker::step_jobs`]), else parked until it does ([`Broker::serve_parked`]); the
    /// connection is not read meanwhile.
    fn query(&mut self, id: ClientId, kind: u16, seq: u32) -> Outcome {
        let Some(caller) = self.sessions.get(&id).map(|s| s.peer.clone()) else {
            return Outcome { replies: Vec::new(), close: true };
        };
        if !self.admit(caller.uid) {
            self.parked.push_back(ParkedQuery { id, kind, seq });
            return Outcome::default();
        }
        let job = if kind == kind::CHECK {
            let domains = self
                .stores
                .iter()
                .filter(|(name, _)| self.policy.may_join(&caller, name))
                .map(|(name, store)| (name.clone(), store.generation))
                .collect();
            QueryJob::Check(CheckJob::new(seq, domains, caller))
        } else {
            QueryJob::Status(StatusJob::new(seq, &caller, &self.view()))
        };
        self.jobs.insert(id, job);
        Outcome::default()
    }

    /// Whether `uid`'s share allows one more query now (spending it).
    fn admit(&mut self, uid: u32) -> bool {
        let under_way =
            self.jobs.keys().filter(|id| self.sessions.get(id).is_some_and(|s| s.peer.uid == uid)).count();
        self.admission.admit(uid, under_way, Instant::now())
    }

    fn view(&self) -> BrokerView<'_> {
        BrokerView {
            stores: &self.stores,
            sessions: &self.sessions,
            departed: &self.departed,
            policy: &self.policy,
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// Starts parked queries whose users' shares allow it now, oldest first (a user refused
    /// once is not asked again in the same turn).
    pub fn serve_parked(&mut self) {
        let mut refused: Vec<u32> = Vec::new();
        let mut still = VecDeque::with_capacity(self.parked.len());
        while let Some(p) = self.parked.pop_front() {
            let Some(uid) = self.sessions.get(&p.id).map(|s| s.peer.uid) else { continue };
            if refused.contains(&uid) {
                still.push_back(p);
                continue;
            }
            let before = self.jobs.len();
            self.query(p.id, p.kind, p.seq);
            if self.jobs.len() == before {
                // Parked again, at the back: put it back in its place.
                self.parked.pop_back();
                still.push_back(p);
                refused.push(uid);
            }
        }
        self.parked = still;
    }

    /// Whether a query waits for its user's share.
    pub fn queries_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// How long a parked query waits at most before it is looked at again.
    pub fn parked_retry(&self) -> Duration {
        self.admission.retry_after()
    }

    /// Forgets the query budgets of users that have not asked for a while.
    pub fn forget_idle_users(&mut self) {
        self.admission.forget_idle(Instant::now());
    }

    /// `bytes` of an answer to a query of `uid` left (sent, or dropped with its connection).
    pub fn answer_sent(&mut self, uid: u32, bytes: usize) {
        self.admission.sent(uid, bytes);
    }

    /// Whether work is under way that the loop must not sleep on: a query, or departed
    /// clients' references being dropped.
    pub fn work_pending(&self) -> bool {
        !self.jobs.is_empty() || self.stores.values().any(|s| s.shared.has_leaving())
    }

    /// Whether connection `id` waits for its query's answer or turn (it is not read
    /// meanwhile: one request at a time).
    pub fn waiting(&self, id: ClientId) -> bool {
        self.jobs.contains_key(&id) || self.parked.iter().any(|p| p.id == id)
    }

    /// Takes one step of every query under way; returns the answers' pieces ready so far.
    pub fn step_jobs(&mut self) -> Vec<(ClientId, Outcome)> {
        let mut out = Vec::new();
        let ids: Vec<ClientId> = self.jobs.keys().copied().collect();
        for id in ids {
            let Some(mut job) = self.jobs.remove(&id) else { continue };
            let (replies, done) = match &mut job {
                QueryJob::Status(j) => j.step(&self.view()),
                QueryJob::Check(j) => match j.step(&self.stores) {
                    Some(report) => {
                        (Reply::text(j.seq, &serde_json::to_string(&report).unwrap_or_default()), true)
                    }
                    None => (Vec::new(), false),
                },
            };
            let uid = match &job {
                QueryJob::Status(j) => j.caller().uid,
                QueryJob::Check(j) => j.caller().uid,
            };
            self.admission.queued(uid, replies.iter().map(|r| r.bytes.len()).sum());
            if !replies.is_empty() {
                out.push((id, Outcome { replies, close: false }));
            }
            if !done {
                self.jobs.insert(id, job);
            }
        }
        out
    }

    /// A connection closed (EOF, error, hang-up, or the broker closed it). If its process
    /// still runs and it held references or pins, they stay until the process exits (it may
    /// still map those slots): the pidfd to watch is returned, and [`Broker::process_exited`]
    /// is to be called when it polls readable. Otherwise its references start to drop
    /// ([`Broker::step_leaving`]), and its domain's store goes with the last holder.
    pub fn disconnect(&mut self, id: ClientId) -> Option<RawFd> {
        self.jobs.remove(&id);
        self.parked.retain(|p| p.id != id);
        let mut session = self.sessions.remove(&id)?;
        let Some(joined) = session.joined.take() else {
            log::debug!("connection {id} closed");
            return None;
        };
        let store = self.stores.get(&joined.domain)?;
        let (refs, entries) =
            (store.shared.holder_refs(joined.holder), store.shared.holder_entries(joined.holder));
        match session.process.take() {
            Some(process) if entries > 0 && !departed::has_exited(&process) => {
                log::info!(
                    "client {id} (pid {}, uid {}, {:?} in domain {}) closed its connection holding {refs} \
                     references and {} pins: kept until its process exits",
                    session.peer.pid,
                    session.peer.uid,
                    joined.label,
                    joined.domain,
                    store.shared.holder_pins(joined.holder),
                );
                let fd = process.as_raw_fd();
                let departed = Departed {
                    domain: joined.domain,
                    holder: joined.holder,
                    label: joined.label,
                    peer: session.peer.clone(),
                    process,
                    since: Instant::now(),
                };
                self.departed.insert(id, departed);
                Some(fd)
            }
            _ => {
                log::info!("{session} left: {refs} references dropped");
                self.begin_leave(&joined.domain, joined.holder);
                None
            }
        }
    }

    /// The process of departed client `id` exited: its references start to drop.
    pub fn process_exited(&mut self, id: ClientId) {
        let Some(d) = self.departed.remove(&id) else { return };
        let refs = self.stores.get(&d.domain).map_or(0, |s| s.shared.holder_refs(d.holder));
        log::info!(
            "client {id} (pid {}, {:?} in domain {}) exited {:.1} s after its connection closed: {refs} \
             references dropped",
            d.peer.pid,
            d.label,
            d.domain,
            d.since.elapsed().as_secs_f64()
        );
        self.begin_leave(&d.domain, d.holder);
    }

    /// Looks at every departed client's process (in case a wakeup was missed).
    pub fn reap_departed(&mut self) {
        let exited: Vec<ClientId> = self
            .departed
            .iter()
            .filter(|(_, d)| departed::has_exited(&d.process))
            .map(|(id, _)| *id)
            .collect();
        for id in exited {
            self.process_exited(id);
        }
    }

    /// Departed clients whose process runs on.
    pub fn departed(&self) -> usize {
        self.departed.len()
    }

    fn begin_leave(&mut self, domain: &str, holder: HolderId) {
        if let Some(store) = self.stores.get_mut(domain) {
            store.shared.begin_leave(holder);
        }
        // Most holders are small: gone at once.
        self.step_leaving();
    }

    /// Drops at most [`LEAVE_ENTRIES_PER_TURN`] entries of leaving holders; drops stores
    /// whose last holder is gone (and gives their memory back to the system).
    pub fn step_leaving(&mut self) {
        let mut budget = LEAVE_ENTRIES_PER_TURN;
        let mut dropped = false;
        for store in self.stores.values_mut().filter(|s| s.shared.has_leaving()) {
            budget -= store.shared.step_leaving(budget);
            if budget == 0 {
                break;
            }
        }
        self.stores.retain(|name, store| {
            let keep = store.shared.holders() > 0;
            if !keep {
                log::info!("domain {name}: last client left, store dropped");
                dropped = true;
            }
            keep
        });
        if dropped {
            // The index and reference maps of a big store are many small allocations that
            // the allocator would keep: hand them back to the system.
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Punches the free slots of every store that holds more memory than its live pages
    /// (stale private mappings that faulted punched pages refill them).
    pub fn repunch(&mut self) {
        for (name, store) in &mut self.stores {
            store.repunch(name);
        }
    }
}
