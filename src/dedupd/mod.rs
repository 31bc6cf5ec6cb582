//! `samepage dedupd`: the dedup broker that lets VMs of different processes share pages
//! (`docs/dedupd.md` is its contract). One thread runs one epoll loop over the listening
//! socket, the clients' sockets and a signalfd (SIGINT, SIGTERM). Each turn of the loop
//! serves at most one request per ready client, so a flooding client waits its turn like any
//! other; a client whose replies are not read is not read either until they are sent.
//!
//! [`broker`] holds the state and answers requests, [`session`] is one client, `departed`
//! a client whose connection closed before its process exited, `broker_domain` a domain's
//! store, [`socket`] the socket and its lock, [`domains`] who may join what, `admission` each
//! user's share of the queries, `status_job` and `check_job` the answers to STATUS and CHECK
//! (written in steps), [`report`] what they show, and [`query`] the two commands.

mod admission;
pub mod broker;
mod broker_domain;
mod check_job;
mod departed;
pub mod domains;
mod error;
pub mod query;
pub mod report;
pub mod session;
pub mod socket;
mod status_job;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use error::DedupdError;

use crate::broker_wire::seqpacket::{self, Received};
use broker::{Broker, Limits, MAX_CLIENTS};
use domains::Policy;
use report::ClientId;
use session::Reply;
use socket::Listener;

/// epoll token of the listening socket (client tokens are their ids, from 1).
const LISTENER: u64 = u64::MAX;
/// epoll token of the signalfd.
const SIGNALS: u64 = u64::MAX - 1;
/// epoll tokens of departed clients' pidfds: this bit and the client's id.
const DEPARTED: u64 = 1 << 62;
/// How often stores are checked for memory beyond their live pages.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// How long accepting pauses when the process is out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Connections accepted per turn (the rest wait for the next turn).
const ACCEPTS_PER_TURN: usize = 64;
/// Events taken per turn.
const EVENTS_PER_TURN: usize = 512;

/// Runs the broker on `socket` until SIGINT or SIGTERM, then removes the socket and its lock.
/// The calling thread serves under the broker's seccomp filter (when filters are on), for good.
pub fn serve(socket: &Path, domains: Option<&Path>) -> Result<(), DedupdError> {
    let policy = match domains {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    };
    // Every client is a descriptor: make room for as many as the broker serves.
    let fds = socket::raise_fd_limit(2 * MAX_CLIENTS as u64 + 64);
    if fds < MAX_CLIENTS as u64 {
        log::warn!("only {fds} open files allowed (RLIMIT_NOFILE): fewer than {MAX_CLIENTS} clients fit");
    }
    let signals = SignalFd::new(&[libc::SIGINT, libc::SIGTERM])?;
    let listener = Listener::bind(socket)?;
    log::info!(
        "listening on {} (pid {}, {} domains in the domains file)",
        listener.path().display(),
        std::process::id(),
        policy.len()
    );
    let mut server = Server::new(listener, signals, Broker::new(policy, Limits::default()))?;
    // Everything from here is the loop, which clients' messages drive: under its filter.
    crate::seccomp::install(crate::seccomp::ThreadKind::Dedupd)?;
    let signal = server.run()?;
    log::info!(
        "signal {signal}: stopping ({} connections, {} domains)",
        server.broker.connections(),
        server.broker.domains()
    );
    Ok(())
}

/// SIGINT and SIGTERM, blocked and read from a descriptor in the loop.
struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    fn new(signals: &[libc::c_int]) -> Result<SignalFd, DedupdError> {
        let fail = |what| move |source| DedupdError::Setup { what, source };
        // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is ours; the numbers are valid signals.
        unsafe {
            libc::sigemptyset(&mut set);
            for &num in signals {
                libc::sigaddset(&mut set, num);
            }
        }
        // SAFETY: `set` is initialized; the broker runs on this one thread.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(fail("pthread_sigmask")(io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: `set` is initialized; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(fail("signalfd")(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(SignalFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The next pending signal's number.
    fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` has room for `size` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), std::ptr::from_mut(&mut info).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo)
    }
}

/// A client's socket and the replies not yet sent.
struct Conn {
    fd: OwnedFd,
    /// Its user, whose share of answer bytes its TEXT replies count against.
    uid: u32,
    out: VecDeque<Reply>,
    /// Close once `out` is sent.
    closing: bool,
    /// The events asked of epoll now.
    interest: EventSet,
}

struct Server {
    epoll: Epoll,
    listener: Listener,
    signals: SignalFd,
    broker: Broker,
    conns: HashMap<ClientId, Conn>,
    buf: Vec<u8>,
    accept_paused_until: Option<Instant>,
    accept_failures: u64,
    next_housekeeping: Instant,
}

impl Server {
    fn new(listener: Listener, signals: SignalFd, broker: Broker) -> Result<Server, DedupdError> {
        let setup = |what| move |source| DedupdError::Setup { what, source };
        let epoll = Epoll::new().map_err(setup("epoll_create"))?;
        let add =
            |fd: RawFd, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(listener.fd(), LISTENER).map_err(setup("epoll_ctl"))?;
        add(signals.fd.as_raw_fd(), SIGNALS).map_err(setup("epoll_ctl"))?;
        Ok(Server {
            epoll,
            listener,
            signals,
            broker,
            conns: HashMap::new(),
            // One byte more than the longest message would not tell more: MSG_TRUNC gives
            // the real length.
            buf: vec![0; crate::broker_wire::proto::MAX_MESSAGE],
            accept_paused_until: None,
            accept_failures: 0,
            next_housekeeping: Instant::now() + HOUSEKEEPING_EVERY,
        })
    }

    /// Serves until a stop signal; returns its number.
    fn run(&mut self) -> Result<u32, DedupdError> {
        let mut events = vec![EpollEvent::default(); EVENTS_PER_TURN];
        loop {
            let n = match self.epoll.wait(self.timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(e) => return Err(DedupdError::Wait(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    SIGNALS => {
                        if let Some(signal) = self.signals.read() {
                            return Ok(signal);
                        }
                    }
                    LISTENER => self.accept(),
                    token if token & DEPARTED != 0 => self.broker.process_exited(token & !DEPARTED),
                    id => self.serve_client(id, event.event_set()),
                }
            }
            self.broker.serve_parked();
            for (id, outcome) in self.broker.step_jobs() {
                self.queue(id, outcome);
            }
            self.broker.step_leaving();
            self.housekeeping();
        }
    }

    fn timeout_ms(&self) -> i32 {
        if self.broker.work_pending() {
            return 0;
        }
        let mut deadline = self.next_housekeeping;
        if self.broker.queries_parked() {
            deadline = deadline.min(Instant::now() + self.broker.parked_retry());
        }
        if let Some(t) = self.accept_paused_until {
            deadline = deadline.min(t);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.resume_accepting();
        }
        if now >= self.next_housekeeping {
            self.broker.reap_departed();
            self.broker.forget_idle_users();
            self.broker.repunch();
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                Ok(Some((fd, peer))) => {
                    let process = departed::peer_process(fd.as_raw_fd(), peer.pid);
                    let uid = peer.uid;
                    match self.broker.connect(peer, process) {
                        Some(id) => self.register(id, fd, uid),
                        None => {
                            // Best effort: the connection is closed either way.
                            let _ = seqpacket::send(fd.as_raw_fd(), &self.broker.busy().bytes, None, false);
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.accept_failures += 1;
                    if self.accept_failures.is_power_of_two() {
                        log::warn!("accept failed ({} times so far): {e}", self.accept_failures);
                    }
                    // Out of descriptors or memory: the connection stays pending, and a
                    // level-triggered listener would wake the loop at once, again and again.
                    self.pause_accepting();
                    return;
                }
            }
        }
    }

    fn pause_accepting(&mut self) {
        let event = EpollEvent::new(EventSet::empty(), LISTENER);
        let _ = self.epoll.ctl(ControlOperation::Modify, self.listener.fd(), event);
        self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
    }

    fn resume_accepting(&mut self) {
        let event = EpollEvent::new(EventSet::IN, LISTENER);
        let _ = self.epoll.ctl(ControlOperation::Modify, self.listener.fd(), event);
        self.accept_paused_until = None;
    }

    fn register(&mut self, id: ClientId, fd: OwnedFd, uid: u32) {
        let event = EpollEvent::new(EventSet::IN, id);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event) {
            log::warn!("cannot watch connection {id}: {e}");
            self.broker.disconnect(id);
            return;
        }
        self.conns.insert(id, Conn { fd, uid, out: VecDeque::new(), closing: false, interest: EventSet::IN });
    }

    /// Serves one ready client: sends what waits, or reads and answers one request.
    fn serve_client(&mut self, id: ClientId, events: EventSet) {
        if !self.conns.contains_key(&id) {
            return;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.close(id);
            return;
        }
        if events.contains(EventSet::OUT) {
            self.flush(id);
        }
        let Some(conn) = self.conns.get(&id) else { return };
        if !events.contains(EventSet::IN) || !conn.out.is_empty() || conn.closing || self.broker.waiting(id) {
            return;
        }
        match seqpacket::recv(conn.fd.as_raw_fd(), &mut self.buf, false, false) {
            Ok(Received::Packet(packet)) => {
                let len = packet.len.min(self.buf.len());
                let outcome = self.broker.handle(id, &self.buf[..len], &packet);
                self.queue(id, outcome);
            }
            Ok(Received::Nothing) => {}
            Ok(Received::Closed) => self.close(id),
            Err(e) => {
                log::debug!("connection {id}: receive failed: {e}");
                self.close(id);
            }
        }
    }

    fn queue(&mut self, id: ClientId, outcome: broker::Outcome) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.out.extend(outcome.replies);
        conn.closing |= outcome.close;
        self.flush(id);
    }

    /// Sends queued replies until the socket is full; closes a closing connection once they
    /// are out; asks epoll for what the connection waits for next.
    fn flush(&mut self, id: ClientId) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        while let Some(reply) = conn.out.front() {
            let fd = reply.fd.as_ref().map(|f| f.as_raw_fd());
            match seqpacket::send(conn.fd.as_raw_fd(), &reply.bytes, fd, false) {
                Ok(true) => {
                    if is_answer(&reply.bytes) {
                        self.broker.answer_sent(conn.uid, reply.bytes.len());
                    }
                    conn.out.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    log::debug!("connection {id}: send failed: {e}");
                    self.close(id);
                    return;
                }
            }
        }
        if conn.out.is_empty() && conn.closing {
            self.close(id);
            return;
        }
        let wanted = if !conn.out.is_empty() {
            EventSet::OUT
        } else if self.broker.waiting(id) {
            // Waiting for its CHECK or its query's turn: only a hang-up (always reported)
            // matters.
            EventSet::empty()
        } else {
            EventSet::IN
        };
        if wanted != conn.interest {
            let event = EpollEvent::new(wanted, id);
            if self.epoll.ctl(ControlOperation::Modify, conn.fd.as_raw_fd(), event).is_ok() {
                conn.interest = wanted;
            }
        }
    }

    fn close(&mut self, id: ClientId) {
        // Closing the descriptor takes it out of the epoll set.
        if let Some(conn) = self.conns.remove(&id) {
            let unsent: usize = conn.out.iter().filter(|r| is_answer(&r.bytes)).map(|r| r.bytes.len()).sum();
            self.broker.answer_sent(conn.uid, unsent);
        }
        if let Some(process) = self.broker.disconnect(id) {
            // Its references stay until its process exits: its pidfd polls readable then.
            let event = EpollEvent::new(EventSet::IN, DEPARTED | id);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, process, event) {
                log::warn!(
                    "cannot watch the process of departed client {id} ({e}); looking every few seconds"
                );
            }
        }
        if self.accept_paused_until.is_some() {
            self.resume_accepting();
        }
    }
}

/// Whether a reply is (a piece of) an answer to STATUS or CHECK, which count against their
/// user's share of answer bytes waiting to be sent.
fn is_answer(bytes: &[u8]) -> bool {
    crate::broker_wire::proto::peek(bytes).is_some_and(|h| h.kind == crate::broker_wire::proto::kind::TEXT)
}
