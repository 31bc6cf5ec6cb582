//! The dedup broker through the real binary: `samepage dedupd` in a child process on a
//! temporary socket, clients speaking the protocol with libc (`common::broker_client`), some
//! of them hostile, some running as another user (uid 65534, via setpriv).

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker_client::{self as bc, hash, message, page, store_entry, Broker, Client, Page, View};
use common::tempdir;
use samepage::dedup::proto::{self, error, kind, status as st, LookupEntry, ReleaseEntry, StoreEntry};
use samepage::dedup::PAGE_SIZE;
use samepage::dedupd::report::ClientStatus;

/// Slots a test client maps of the store (address space only).
const VIEW_PAGES: usize = 1 << 16;
/// What the spec gives a client to wait for an answer before it counts the broker as gone.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

fn client_labelled<'a>(clients: &'a [ClientStatus], label: &str) -> &'a ClientStatus {
    clients.iter().find(|c| c.label == label).unwrap_or_else(|| panic!("no client {label:?} in {clients:#?}"))
}

/// A directory other users can reach (the socket itself is mode 0666).
fn open_dir(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod the test dir");
}

const AS_NOBODY: [&str; 6] = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"];

// ---------------------------------------------------------------------------------------
// (a) hostile clients and an honest one
// ---------------------------------------------------------------------------------------

/// Honest pages: stored once, then looked up, compared and released again and again.
const HONEST_PAGES: u64 = 200;
const FLOOD_REQUESTS: usize = 10_000;

struct Honest {
    latencies: Vec<Duration>,
    rounds: usize,
    /// Rounds done before the flood was over.
    rounds_during_flood: usize,
    /// Kept open for `status`.
    _client: Client,
}

fn honest_client(socket: &Path, flood_done: &AtomicBool) -> Honest {
    let mut c = Client::connect(socket).expect("connect");
    let (_, fd) = c.hello("", "honest", 1 << 20).expect("HELLO");
    let view = View::new(fd.as_raw_fd(), VIEW_PAGES).expect("map the store");
    let pages: Vec<Page> = (0..HONEST_PAGES).map(|i| page(1_000_000 + i)).collect();
    let mut latencies = Vec::new();
    let mut timed = |c: &mut Client, f: &mut dyn FnMut(&mut Client)| {
        let t = Instant::now();
        f(c);
        latencies.push(t.elapsed());
    };
    let mut slots = Vec::new();
    for chunk in pages.chunks(32) {
        timed(&mut c, &mut |c| {
            let replies = c.store(chunk);
            assert!(replies.iter().all(|r| r.status == st::NEW || r.status == st::OK), "{replies:?}");
            slots.extend(replies.iter().map(|r| r.slot));
        });
    }
    let (mut rounds, mut rounds_during_flood) = (0, 0);
    loop {
        if flood_done.load(Ordering::SeqCst) {
            if rounds >= rounds_during_flood + 100 {
                break;
            }
        } else {
            rounds_during_flood = rounds;
        }
        let i = rounds % pages.len();
        let (p, slot) = (pages[i], slots[i]);
        timed(&mut c, &mut |c| {
            let r = c.lookup(&[hash(&p)]);
            assert_eq!((r[0].status, r[0].slot), (st::OK, slot), "round {rounds}: LOOKUP");
        });
        assert_eq!(view.page(slot), p, "round {rounds}: the slot holds the page");
        timed(&mut c, &mut |c| {
            let r = c.store(&[p]);
            assert_eq!((r[0].status, r[0].slot), (st::OK, slot), "round {rounds}: STORE");
        });
        timed(&mut c, &mut |c| assert_eq!(c.release(&[slot, slot]), [st::RELEASED; 2], "round {rounds}"));
        rounds += 1;
    }
    Honest { latencies, rounds, rounds_during_flood, _client: c }
}

/// Lies within the protocol: forged releases, stolen hashes, wrong hashes, a reference
/// limit of 64 pages. Returns its rounds and its connection (open, for `status`).
fn liar_client(socket: &Path, flood_done: &AtomicBool) -> (usize, Client) {
    let mut c = Client::connect(socket).expect("connect");
    c.hello("", "liar", 64).expect("HELLO");
    let mut own_slots = std::collections::HashSet::new();
    let mut rounds = 0;
    while !flood_done.load(Ordering::SeqCst) {
        let others = (0..4096u64).cycle().skip(rounds * 255 % 4096).filter(|s| !own_slots.contains(s));
        let forged: Vec<u64> = others.take(255).chain([u64::MAX]).collect();
        assert!(c.release(&forged).iter().all(|s| *s == st::NOT_HELD), "a forged release was taken");
        let victim = page(1_000_000 + (rounds as u64 % HONEST_PAGES));
        let mut steal = store_entry(&page(5_000_000 + rounds as u64));
        steal.hash = hash(&victim);
        let mut wrong = store_entry(&page(6_000_000 + rounds as u64));
        wrong.hash[7] ^= 0x40;
        let own = store_entry(&page(7_000_000 + rounds as u64));
        let r = c.request(kind::STORE, &[steal, wrong, own]).entries::<proto::SlotReply>(kind::SLOTS);
        // MISMATCH, or FULL once it holds its 64 references (then nothing is even looked at).
        for (what, reply) in [("a stolen hash", r[0]), ("a wrong hash", r[1])] {
            assert!(matches!(reply.status, st::MISMATCH | st::FULL), "{what} was taken: {reply:?}");
        }
        assert!(r[2].status == st::NEW || r[2].status == st::FULL, "{r:?}");
        if r[2].status == st::NEW {
            own_slots.insert(r[2].slot);
        }
        rounds += 1;
    }
    (rounds, c)
}

/// Garbage: malformed, truncated, over-long messages and attached descriptors; 60 on one
/// connection (that stays open, its counters in `status`: it is returned), then 64 on
/// another (closed).
fn garbage_client(socket: &Path) -> (usize, Client) {
    let good = message(kind::LOOKUP, 1, &[LookupEntry::default(); 4]);
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        good[..20].to_vec(),
        [good.as_slice(), &[1, 2, 3]].concat(),
        vec![0xff; 100],
        message(0x1234, 1, &[0u8; 16]),
        message(kind::WELCOME, 1, &[0u8; 88]),
        message(kind::LOOKUP, 1, &vec![LookupEntry::default(); 300]),
        message(kind::STORE, 1, &vec![StoreEntry::default(); 33]),
        vec![0u8; proto::MAX_MESSAGE + 4096],
    ];
    let mut sent = 0;
    let mut c = Client::connect(socket).expect("connect");
    c.hello("", "garbage", 16).expect("HELLO");
    for i in 0..60 {
        let attach = (i % 10 == 9).then(|| c.raw_fd());
        c.send_raw(&garbage[i % garbage.len()], attach).expect("send garbage");
        let reply = c.recv().expect("an answer");
        assert_eq!(reply.header.kind, kind::ERROR, "message {i}");
        sent += 1;
    }
    let d = Client::connect(socket).expect("connect");
    for i in 0..64 {
        d.send_raw(&garbage[i % garbage.len()], None).expect("send garbage");
        let code = d.recv().expect("an answer").error().map(|e| e.code);
        assert!(matches!(code, Some(error::BAD_MESSAGE | error::TOO_MANY)), "message {i}: {code:?}");
        sent += 1;
    }
    assert!(d.closed_by_broker(), "closed after 64 malformed messages");
    (sent, c)
}

/// Requests the flooder has queued in the broker's socket when the probe asks its one.
const QUEUED_BEFORE_PROBE: usize = 1000;

/// A flooder: 10,000 requests sent back to back without waiting for answers (a second thread
/// reads them and counts them in `answered`): lookups of unknown hashes, forged releases,
/// stores whose hashes lie (32 pages for the broker to hash each).
struct Flooder {
    client: Client,
    /// When the answer to the last request queued before the probe came.
    queue_answered: Arc<Mutex<Option<Instant>>>,
    reader: std::thread::JoinHandle<()>,
    sent: usize,
}

impl Flooder {
    fn start(socket: &Path) -> Flooder {
        let mut client = Client::connect(socket).expect("connect");
        client.hello("", "flood", 64).expect("HELLO");
        // A deep queue (root may go past wmem_max): hundreds of requests wait in the
        // broker's socket at once.
        let deep: libc::c_int = 256 << 20;
        // SAFETY: setsockopt with a valid int on our socket.
        let rc = unsafe {
            libc::setsockopt(
                client.raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                std::ptr::from_ref(&deep).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_SNDBUFFORCE: {}", std::io::Error::last_os_error());
        let queue_answered = Arc::new(Mutex::new(None));
        let reader = {
            let (r, queue_answered) = (client.share(), queue_answered.clone());
            std::thread::spawn(move || {
                for i in 0..FLOOD_REQUESTS {
                    let reply = r.recv().expect("flood answer");
                    assert!(reply.len > 0, "closed at answer {i}");
                    assert!(
                        matches!(reply.header.kind, kind::SLOTS | kind::RELEASED),
                        "answer {i}: {reply:?}"
                    );
                    if i + 1 == QUEUED_BEFORE_PROBE {
                        *queue_answered.lock().expect("lock") = Some(Instant::now());
                    }
                }
            })
        };
        Flooder { client, queue_answered, reader, sent: 0 }
    }

    /// Sends the next `n` requests.
    fn send(&mut self, n: usize) {
        let lookups: Vec<LookupEntry> = (0..256u32).map(|i| LookupEntry { hash: [i as u8; 32] }).collect();
        let releases: Vec<ReleaseEntry> = (0..256u64).map(|i| ReleaseEntry { slot: i * 7919 }).collect();
        let mut stores: Vec<StoreEntry> = (0..32).map(|i| store_entry(&page(9_000_000 + i))).collect();
        for s in &mut stores {
            s.hash[0] ^= 1;
        }
        for i in self.sent..self.sent + n {
            let bytes = match i % 3 {
                _ if i < QUEUED_BEFORE_PROBE => message(kind::STORE, i as u32, &stores),
                0 => message(kind::LOOKUP, i as u32, &lookups),
                1 => message(kind::RELEASE, i as u32, &releases),
                _ => message(kind::STORE, i as u32, &stores),
            };
            self.client.send_raw(&bytes, None).expect("flood send");
        }
        self.sent += n;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[test]
fn hostile_clients_harm_only_themselves_while_an_honest_client_is_served_throughout() {
    let dir = tempdir();
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let socket = broker.socket.clone();

    // Fairness, step by step: with the broker stopped, the flooder queues 1,000 STOREs (32
    // pages to hash each) and a probe queues one LOOKUP after them. Once the broker runs
    // again, the probe is answered within a turn or two, long before the flooder's queue is
    // done (a loop that served each client all it has queued answers it after the queue).
    let flood = Flooder::start(&socket);
    let mut probe = Client::connect(&socket).expect("connect");
    probe.hello("", "probe", 8).expect("HELLO");
    common::signal(&broker.child, libc::SIGSTOP);
    let mut flood = flood;
    flood.send(QUEUED_BEFORE_PROBE);
    probe.send_raw(&message(kind::LOOKUP, 1, &[LookupEntry::default()]), None).expect("probe");
    let resumed = Instant::now();
    common::signal(&broker.child, libc::SIGCONT);
    let answer = probe.recv().expect("the probe's answer");
    let probe_wait = resumed.elapsed();
    assert_eq!(answer.entries::<proto::SlotReply>(kind::SLOTS)[0].status, st::MISS);
    let queue_time = loop {
        if let Some(t) = *flood.queue_answered.lock().unwrap() {
            break t - resumed;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    println!(
        "probe: answered {probe_wait:?} after the broker resumed; the {QUEUED_BEFORE_PROBE} STOREs the flooder \
         had queued before it took {queue_time:?}"
    );
    assert!(probe_wait * 2 < queue_time, "the broker served the flooder's queue before the probe's request");

    // The rest of the flood, with a liar, garbage and an honest client at the same time.
    let done = Arc::new(AtomicBool::new(false));
    let honest = {
        let (socket, done) = (socket.clone(), done.clone());
        std::thread::spawn(move || honest_client(&socket, &done))
    };
    let liar = {
        let (socket, done) = (socket.clone(), done.clone());
        std::thread::spawn(move || liar_client(&socket, &done))
    };
    let garbage = {
        let socket = socket.clone();
        std::thread::spawn(move || garbage_client(&socket))
    };
    let start = Instant::now();
    flood.send(FLOOD_REQUESTS - QUEUED_BEFORE_PROBE);
    flood.reader.join().expect("every flood request answered");
    let flood_time = start.elapsed();
    let (garbage_sent, _garbage) = garbage.join().expect("garbage client");
    done.store(true, Ordering::SeqCst);
    let (liar_rounds, _liar) = liar.join().expect("liar client");
    let honest = honest.join().expect("honest client: every answer was right");

    let mut sorted = honest.latencies.clone();
    sorted.sort();
    let (p50, p99, max) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99), sorted[sorted.len() - 1]);
    println!(
        "flood: the last {} pipelined requests answered in {flood_time:?}; liar: {liar_rounds} rounds; \
         garbage: {garbage_sent} messages",
        FLOOD_REQUESTS - QUEUED_BEFORE_PROBE
    );
    println!(
        "honest client: {} rounds ({} during the flood), {} requests, latency p50 {p50:?}, p99 {p99:?}, max {max:?}",
        honest.rounds,
        honest.rounds_during_flood,
        honest.latencies.len()
    );
    // A VMM counts a broker that does not answer within 2 s as gone.
    assert!(max < CLIENT_TIMEOUT, "an honest request waited {max:?}");

    let status = broker.status();
    let h = client_labelled(&status.clients, "honest");
    let flooder = client_labelled(&status.clients, "flood");
    let liar = client_labelled(&status.clients, "liar");
    let garbage = client_labelled(&status.clients, "garbage");
    println!(
        "honest: {:?}\nflood: {:?}\nliar: {:?}\ngarbage: {:?}",
        h.rejections, flooder.rejections, liar.rejections, garbage.rejections
    );
    assert_eq!((h.rejections.total(), h.references), (0, HONEST_PAGES));
    assert_eq!(flooder.requests, FLOOD_REQUESTS as u64 + 1);
    let third = ((FLOOD_REQUESTS - QUEUED_BEFORE_PROBE) / 3) as u64;
    assert!(flooder.rejections.not_held >= third * 256 && flooder.rejections.mismatch >= third * 32);
    assert!(liar.rejections.not_held > 0 && liar.rejections.mismatch > 0 && liar.rejections.ref_limit > 0);
    assert!(liar.references <= 64);
    let g = garbage.rejections;
    assert!(g.bad_message > 0 && g.too_many > 0 && g.oversized > 0, "{g:?}");
    assert_eq!(g.bad_message + g.too_many + g.oversized, 60);
    // Hundreds of thousands of rejections, a few lines of log.
    let log = broker.log_text();
    let refused_lines = log.lines().filter(|l| l.contains("refused")).count();
    let rejected: u64 = status.clients.iter().map(|c| c.rejections.total()).sum();
    println!("{rejected} rejections counted, {refused_lines} log lines about them");
    assert!(refused_lines < 200, "logging is sparse:\n{log}");
    let (code, out, err) = broker.check();
    println!("check: {out}{err}");
    assert_eq!(code, Some(0), "check after the flood: {out}{err}");
}

// ---------------------------------------------------------------------------------------
// (b) domains
// ---------------------------------------------------------------------------------------

const DOMAINS_FILE: &str = "# test domains\nshared: uid:65534\nprivate: uid:1000\nteam: gid:4242\n";

fn domains_child(socket: &Path) {
    let refused = |domain: &str| {
        let mut c = Client::connect(socket).expect("connect");
        let e = c.hello(domain, "nobody", 8).expect_err("refused");
        assert_eq!(e.code, error::NOT_ALLOWED, "{domain}");
        assert!(c.closed_by_broker(), "{domain}: the broker closes after NOT_ALLOWED");
        println!("refused: {domain}");
    };
    refused("private");
    refused("uid-0");
    refused("not/a-name");
    let mut joined = Vec::new();
    for (domain, expect) in [("shared", "shared"), ("team", "team"), ("", "uid-65534")] {
        let mut c = Client::connect(socket).expect("connect");
        let (w, _) = c.hello(domain, "nobody", 8).unwrap_or_else(|e| panic!("{domain}: {e:?}"));
        assert_eq!(proto::name_str(&w.domain), Some(expect));
        println!("joined: {expect}");
        joined.push(c);
    }
    println!("domains child: ok");
}

#[test]
fn a_user_joins_only_the_domains_open_to_it_and_domains_share_nothing() {
    const NAME: &str = "a_user_joins_only_the_domains_open_to_it_and_domains_share_nothing";
    if let Some((role, socket)) = bc::role() {
        assert_eq!(role, "domains");
        return domains_child(&socket);
    }
    let dir = tempdir();
    open_dir(dir.as_path());
    let domains = dir.as_path().join("domains");
    std::fs::write(&domains, DOMAINS_FILE).expect("domains file");
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &["--domains", domains.to_str().expect("path")]);
    let wrapper = ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "4242"];
    let name = common::test_path(module_path!(), NAME);
    let (ok, out) = bc::run_role(&name, "domains", &broker.socket, &wrapper);
    println!("{out}");
    assert!(ok && out.contains("domains child: ok"), "the uid 65534 client failed");
    let log = broker.log_text();
    assert!(log.contains("uid 65534"), "the broker saw uid 65534:\n{log}");

    // Root in two domains, the same page in each: two stores, two copies.
    let (mut a, mut b) = (Client::connect(&broker.socket).unwrap(), Client::connect(&broker.socket).unwrap());
    let (_, fd_a) = a.hello("alpha", "a", 64).unwrap();
    let (_, fd_b) = b.hello("beta", "b", 64).unwrap();
    let (ino_a, ino_b) = (std::fs::File::from(fd_a), std::fs::File::from(fd_b));
    let (ino_a_n, ino_b_n) = (ino_a.metadata().unwrap().ino(), ino_b.metadata().unwrap().ino());
    println!("store inodes: alpha {ino_a_n}, beta {ino_b_n}");
    assert_ne!(ino_a_n, ino_b_n, "one store per domain");
    let (p, only_alpha) = (page(42), page(43));
    let ra = a.store(&[p, only_alpha]);
    let rb = b.store(&[p]);
    assert_eq!([ra[0].status, rb[0].status], [st::NEW, st::NEW], "nothing indexed across domains");
    let (va, vb) = (
        View::new(ino_a.as_raw_fd(), VIEW_PAGES).unwrap(),
        View::new(ino_b.as_raw_fd(), VIEW_PAGES).unwrap(),
    );
    assert_eq!((va.page(ra[0].slot), vb.page(rb[0].slot)), (p, p));
    assert_eq!(b.lookup(&[hash(&only_alpha)])[0].status, st::MISS, "beta does not see alpha's pages");
    let status = broker.status();
    let pages: Vec<(String, u64)> = status.domains.iter().map(|d| (d.name.clone(), d.store_pages)).collect();
    println!("domains: {pages:?}");
    assert_eq!(pages, [("alpha".to_string(), 2), ("beta".to_string(), 1)]);
}

// ---------------------------------------------------------------------------------------
// (c) what a non-root client can do with the store's descriptor
// ---------------------------------------------------------------------------------------

fn refused(what: &str, rc: i64) {
    let e = std::io::Error::last_os_error();
    assert!(rc < 0, "{what} worked on the store descriptor");
    println!("refused: {what} ({e})");
}

fn attack_child(socket: &Path) {
    // SAFETY: plain getters.
    assert_eq!(unsafe { (libc::getuid(), libc::geteuid()) }, (65534, 65534), "runs as nobody");
    let mut c = Client::connect(socket).expect("connect");
    let (_, fd) = c.hello("", "attacker", 16).expect("HELLO");
    let fd = fd.as_raw_fd();
    let victim = page(77);
    let slot = c.store(&[victim])[0].slot;
    let off = (slot * PAGE_SIZE as u64) as libc::off_t;
    let zeros = [0u8; PAGE_SIZE];
    // SAFETY: syscalls on our own descriptor and buffers (each is expected to fail).
    unsafe {
        refused("pwrite", libc::pwrite(fd, zeros.as_ptr().cast(), PAGE_SIZE, off) as i64);
        refused("write", libc::write(fd, zeros.as_ptr().cast(), PAGE_SIZE) as i64);
        refused("ftruncate to 0", libc::ftruncate(fd, 0).into());
        refused("ftruncate to grow", libc::ftruncate(fd, 1 << 40).into());
        refused("fallocate", libc::fallocate(fd, 0, 0, 1 << 30).into());
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        refused("fallocate(PUNCH_HOLE)", libc::fallocate(fd, punch, off, PAGE_SIZE as i64).into());
        refused("F_ADD_SEALS F_SEAL_WRITE", libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE).into());
        refused("F_ADD_SEALS F_SEAL_SHRINK", libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK).into());
        refused("fchmod 0666", libc::fchmod(fd, 0o666).into());
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let shared_rw = libc::mmap(std::ptr::null_mut(), PAGE_SIZE, rw, libc::MAP_SHARED, fd, 0);
        refused("mmap MAP_SHARED|PROT_WRITE", if shared_rw == libc::MAP_FAILED { -1 } else { 0 });
        let shared_ro = libc::mmap(std::ptr::null_mut(), PAGE_SIZE, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
        assert_ne!(shared_ro, libc::MAP_FAILED, "a shared read-only map is fine");
        refused("mprotect of a shared map to PROT_WRITE", libc::mprotect(shared_ro, PAGE_SIZE, rw).into());
        for (what, flags) in [("reopen O_RDWR", libc::O_RDWR), ("reopen O_WRONLY", libc::O_WRONLY)] {
            let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("path");
            refused(what, libc::open(path.as_ptr(), flags).into());
        }
    }
    // What it may do: map it privately, read it, write its own copy.
    let view = View::new(fd, VIEW_PAGES).expect("MAP_PRIVATE works");
    assert_eq!(view.page(slot), victim);
    view.write(slot, &zeros);
    assert_eq!(view.page(slot), zeros, "its own copy changed");
    let fresh = View::new(fd, VIEW_PAGES).expect("map again");
    assert_eq!(fresh.page(slot), victim, "the store did not");
    println!("copy-on-write: ok");
    println!("attack child: ok");
}

#[test]
fn a_non_root_client_can_only_map_the_store_copy_on_write() {
    const NAME: &str = "a_non_root_client_can_only_map_the_store_copy_on_write";
    if let Some((role, socket)) = bc::role() {
        assert_eq!(role, "attack");
        return attack_child(&socket);
    }
    let dir = tempdir();
    open_dir(dir.as_path());
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    // Root holds the page in nobody's domain too, so the store outlives the attacker.
    let mut keeper = Client::connect(&broker.socket).unwrap();
    let (_, fd) = keeper.hello("uid-65534", "keeper", 16).unwrap();
    let slot = keeper.store(&[page(77)])[0].slot;
    let name = common::test_path(module_path!(), NAME);
    let (ok, out) = bc::run_role(&name, "attack", &broker.socket, &AS_NOBODY);
    println!("{out}");
    assert!(ok && out.contains("attack child: ok"), "the attacker's run failed");
    assert_eq!(out.lines().filter(|l| l.contains("refused: ")).count(), 13, "every attempt was made");
    let view = View::new(fd.as_raw_fd(), VIEW_PAGES).unwrap();
    assert_eq!(view.page(slot), page(77), "the stored page is intact");
    let (code, out, err) = broker.check();
    assert_eq!(code, Some(0), "{out}{err}");
}

// ---------------------------------------------------------------------------------------
// (d) kill -9 of a client in the middle of a STORE flood
// ---------------------------------------------------------------------------------------

const KEEPER_PAGES: u64 = 64;

fn store_flood_child(socket: &Path) {
    let mut c = Client::connect(socket).expect("connect");
    c.hello("", "flooder", 1 << 24).expect("HELLO");
    for round in 0u64.. {
        let pages: Vec<Page> = (0..32).map(|i| page(round * 32 + i)).collect();
        let replies = c.store(&pages);
        assert!(replies.iter().all(|r| r.status == st::NEW || r.status == st::OK));
        if round == 2 {
            println!("\nflood under way");
        }
    }
}

#[test]
fn a_client_killed_in_a_store_flood_leaves_no_reference_behind() {
    const NAME: &str = "a_client_killed_in_a_store_flood_leaves_no_reference_behind";
    if let Some((role, socket)) = bc::role() {
        assert_eq!(role, "store-flood");
        return store_flood_child(&socket);
    }
    let dir = tempdir();
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let mut keeper = Client::connect(&broker.socket).unwrap();
    keeper.hello("", "keeper", 1 << 20).unwrap();
    // The flooder's first pages are the keeper's: those slots stay, with the keeper's refs.
    let keep: Vec<Page> = (0..KEEPER_PAGES).map(page).collect();
    keeper.store(&keep[..32]);
    keeper.store(&keep[32..]);
    let name = common::test_path(module_path!(), NAME);
    let mut child = bc::role_command(&name, "store-flood", &broker.socket, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l == "flood under way")), "the flooder did not start");
    std::thread::sleep(Duration::from_millis(300));
    let before = broker.status();
    let flooder_refs = client_labelled(&before.clients, "flooder").references;
    println!(
        "before kill -9: flooder holds {flooder_refs} references, store {} pages",
        before.domains[0].store_pages
    );
    assert!(flooder_refs > KEEPER_PAGES);
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let after = loop {
        let s = broker.status();
        if s.clients.iter().all(|c| c.label != "flooder") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the broker still lists the killed client");
        std::thread::sleep(Duration::from_millis(20));
    };
    let d = &after.domains[0];
    println!(
        "after: {} store pages, {} bytes held, {} references (the keeper's), noticed in {:?}",
        d.store_pages,
        d.store_bytes,
        d.references,
        start.elapsed()
    );
    assert_eq!((d.store_pages, d.references, d.clients), (KEEPER_PAGES, KEEPER_PAGES, 1));
    assert_eq!(d.store_bytes, KEEPER_PAGES * PAGE_SIZE as u64, "the flooder's pages were punched");
    let (code, out, err) = broker.check();
    println!("check: {out}{err}");
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!(
        "{KEEPER_PAGES} pages checked, {KEEPER_PAGES} references of 1 clients: consistent"
    )));
    let text =
        common::samepage().args(["dedupd", "status", "--socket"]).arg(&broker.socket).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(text.contains("domain uid-0: 64 store pages"), "status as text");
}

// ---------------------------------------------------------------------------------------
// (e) one broker per socket, takeover, clean stop
// ---------------------------------------------------------------------------------------

#[test]
fn one_broker_per_socket_a_dead_ones_socket_is_taken_over_and_sigterm_cleans_up() {
    let dir = tempdir();
    let mut first = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let socket = first.socket.clone();
    let lock = dir.as_path().join("dedupd.sock.lock");
    // A second broker on the same socket refuses, in one line.
    let out =
        common::samepage().env_remove("RUST_LOG").args(["dedupd", "--socket"]).arg(&socket).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("second broker: exit {:?}: {err}", out.status.code());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("samepage: error: another broker serves"), "{err}");
    // The first one dies without cleaning up: its socket stays, and is taken over.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(socket.exists() && lock.exists(), "SIGKILL left the socket and the lock file");
    let mut second = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    assert!(second.log_text().contains("took over the stale socket"), "{}", second.log_text());
    let mut c = Client::connect(&socket).unwrap();
    c.hello("", "after-takeover", 8).expect("the new broker serves");
    assert_eq!(c.store(&[page(1)])[0].status, st::NEW);
    // SIGTERM: exit 0, socket and lock removed, even with a client connected.
    let start = Instant::now();
    common::signal(&second.child, libc::SIGTERM);
    let status = second.child.wait().unwrap();
    println!("SIGTERM: {status} after {:?}\n{}", start.elapsed(), second.log_text());
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists() && !lock.exists(), "the socket and lock file are removed");
    assert!(second.log_text().contains("signal 15: stopping"));
    // Something that is not a socket at the path is left alone.
    std::fs::write(&socket, "not a socket").unwrap();
    let out = common::samepage().args(["dedupd", "--socket"]).arg(&socket).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

/// The broker as the service runs it: an unprivileged user of its own (here uid 4000, which
/// need not exist), serving a root client; the store belongs to that user.
#[test]
fn the_broker_runs_as_an_unprivileged_user_of_its_own() {
    let dir = tempdir();
    let run_dir = dir.as_path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(4000), Some(4000)).unwrap();
    open_dir(dir.as_path());
    let as_broker_user = ["setpriv", "--reuid", "4000", "--regid", "4000", "--clear-groups"];
    let broker = Broker::start_under(&run_dir, "dedupd.sock", &[], &as_broker_user);
    let meta = std::fs::metadata(&broker.socket).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (4000, 0o666),
        "the socket is the broker user's, mode 0666"
    );
    let mut c = Client::connect(&broker.socket).unwrap();
    let (_, fd) = c.hello("", "root-vm", 16).unwrap();
    let store = std::fs::File::from(fd);
    let store_meta = store.metadata().unwrap();
    println!("store: uid {}, mode {:o}", store_meta.uid(), store_meta.mode() & 0o777);
    assert_eq!((store_meta.uid(), store_meta.mode() & 0o777), (4000, 0o444));
    let slot = c.store(&[page(5)])[0].slot;
    assert_eq!(View::new(store.as_raw_fd(), VIEW_PAGES).unwrap().page(slot), page(5));
    let (code, out, err) = broker.check();
    assert_eq!(code, Some(0), "{out}{err}");
    let mut broker = broker;
    common::signal(&broker.child, libc::SIGTERM);
    assert_eq!(broker.child.wait().unwrap().code(), Some(0));
    assert!(!broker.socket.exists() && !run_dir.join("dedupd.sock.lock").exists(), "socket and lock removed");
}

// ---------------------------------------------------------------------------------------
// Memory per stored page
// ---------------------------------------------------------------------------------------

#[test]
fn the_brokers_memory_per_stored_page_and_per_reference() {
    const PAGES: u64 = 30_000;
    let dir = tempdir();
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let mut a = Client::connect(&broker.socket).unwrap();
    a.hello("", "a", 1 << 20).unwrap();
    let mut b = Client::connect(&broker.socket).unwrap();
    b.hello("", "b", 1 << 20).unwrap();
    a.store(&[page(u64::MAX)]);
    b.lookup(&[hash(&page(u64::MAX))]);
    let base = broker.rss_anon();
    let pages: Vec<Page> = (0..PAGES).map(page).collect();
    for chunk in pages.chunks(32) {
        assert!(a.store(chunk).iter().all(|r| r.status == st::NEW));
    }
    let stored = broker.rss_anon();
    let hashes: Vec<[u8; 32]> = pages.iter().map(hash).collect();
    for chunk in hashes.chunks(256) {
        assert!(b.lookup(chunk).iter().all(|r| r.status == st::OK));
    }
    let referenced = broker.rss_anon();
    let per_page = (stored.saturating_sub(base)) as f64 / PAGES as f64;
    let per_ref = (referenced.saturating_sub(stored)) as f64 / PAGES as f64;
    println!(
        "broker anonymous memory: {base} bytes, {stored} after {PAGES} stored pages ({per_page:.0} bytes \
         a page, with the storing client's reference), {referenced} after as many references of a second \
         client ({per_ref:.0} bytes a reference)"
    );
    assert!(per_page < 512.0 && per_ref < 128.0, "memory per page {per_page:.0}, per reference {per_ref:.0}");
}

// ---------------------------------------------------------------------------------------
// (f) a client that closes its connection but still maps its slots
// ---------------------------------------------------------------------------------------

/// The departing client: stores a page, maps it from the store as a VMM does, closes its
/// connection, and then, once told (its stdin ends), checks that the page it maps is intact.
fn departing_child(socket: &Path) {
    let mut c = Client::connect(socket).expect("connect");
    let (_, fd) = c.hello("", "departing", 16).expect("HELLO");
    let view = View::new(fd.as_raw_fd(), VIEW_PAGES).expect("map the store");
    let slot = c.store(&[page(4242)])[0].slot;
    assert_eq!(view.page(slot), page(4242));
    drop(c);
    println!("closed; maps slot {slot}");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    let intact = view.page(slot) == page(4242);
    println!("slot {slot} intact after the others' stores: {intact}");
    assert!(intact);
}

#[test]
fn a_client_that_closes_its_connection_keeps_its_slots_until_its_process_exits() {
    const NAME: &str = "a_client_that_closes_its_connection_keeps_its_slots_until_its_process_exits";
    if let Some((role, socket)) = bc::role() {
        assert_eq!(role, "departing");
        return departing_child(&socket);
    }
    let dir = tempdir();
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let name = common::test_path(module_path!(), NAME);
    let mut child = bc::role_command(&name, "departing", &broker.socket, &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // (The test harness prints "test NAME ... " before the child's first line.)
    let closed = lines.by_ref().map_while(Result::ok).find(|l| l.contains("closed; maps slot "));
    let slot: u64 =
        closed.expect("the child closed its connection").rsplit(' ').next().unwrap().parse().unwrap();
    // The broker sees the connection close while the child lives on.
    let start = Instant::now();
    let departed = loop {
        let s = broker.status();
        if !s.departed.is_empty() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the broker never saw the connection close");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Another client of the domain stores pages, asking for the departed client's slot first.
    let mut other = Client::connect(&broker.socket).unwrap();
    other.hello("", "other", 1 << 10).unwrap();
    let mut entry = store_entry(&page(777));
    entry.hint0 = slot;
    let got: Vec<proto::SlotReply> = other.request(kind::STORE, &[entry]).entries(kind::SLOTS);
    let more: Vec<Page> = (0..64).map(|i| page(9000 + i)).collect();
    let others: Vec<u64> =
        other.store(&more[..32]).iter().chain(other.store(&more[32..]).iter()).map(|r| r.slot).collect();
    drop(child.stdin.take());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let ok = child.wait().unwrap().success();
    let start = Instant::now();
    let after = loop {
        let s = broker.status();
        if s.departed.is_empty() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the child's references outlived it");
        std::thread::sleep(Duration::from_millis(20));
    };
    let d = &departed.departed[0];
    println!(
        "while the child ran on: departed {:?} holding {} references; the other client's page got slot {} \
         (asked for {slot}), its 64 more slots {:?}..; child: {}\nafter the child exited: {} store pages, {} \
         references",
        d.label,
        d.references,
        got[0].slot,
        &others[..4],
        rest.join(" / "),
        after.domains[0].store_pages,
        after.domains[0].references,
    );
    assert_eq!(d.references, 1);
    assert_ne!(got[0].slot, slot, "a slot the departed client maps went to another client");
    assert!(!others.contains(&slot));
    assert!(ok, "the child's page changed: {rest:?}");
    assert_eq!((after.domains[0].store_pages, after.domains[0].references), (65, 65));
    let (code, out, err) = broker.check();
    assert_eq!(code, Some(0), "{out}{err}");
}

// ---------------------------------------------------------------------------------------
// (g) STATUS asked again and again by many connections of one user
// ---------------------------------------------------------------------------------------

/// An honest client's LOOKUP-and-RELEASE round trips for `how_long` (in another domain).
fn honest_round_trips(socket: &Path, how_long: Duration) -> Vec<Duration> {
    let mut honest = Client::connect(socket).expect("connect");
    honest.hello("honest", "honest", 16).expect("HELLO");
    let p = page(5);
    honest.store(&[p]);
    let mut trips = Vec::new();
    let start = Instant::now();
    while start.elapsed() < how_long {
        let t = Instant::now();
        let slot = honest.lookup(&[hash(&p)])[0].slot;
        honest.release(&[slot]);
        trips.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    trips.sort();
    trips
}

#[test]
fn status_floods_of_one_user_leave_other_clients_their_round_trips() {
    const MEMBERS: usize = 1000;
    const ASKERS: usize = 256;
    const SILENT: usize = 1024;
    let flood_for = Duration::from_secs(8);
    // Each connection is a descriptor of this process too.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on our own process with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let dir = tempdir();
    let broker = Broker::start(dir.as_path(), "dedupd.sock", &[]);
    // A domain of many clients with long names, so that each STATUS is large.
    let label = "x".repeat(60);
    let members: Vec<Client> = (0..MEMBERS)
        .map(|_| {
            let mut c = Client::connect(&broker.socket).unwrap();
            c.hello("flood", &label, 16).unwrap();
            c
        })
        .collect();
    let quiet = honest_round_trips(&broker.socket, Duration::from_secs(1));
    // (1) Connections that ask, read the whole answer and ask again, 32 to a thread.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(Mutex::new((0usize, 0usize)));
    let askers: Vec<_> = (0..ASKERS / 32)
        .map(|_| {
            let (socket, stop, served) = (broker.socket.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let conns: Vec<Client> = (0..32).map(|_| Client::connect(&socket).unwrap()).collect();
                while !stop.load(Ordering::Relaxed) {
                    for c in &conns {
                        c.send_raw(&message::<u8>(kind::STATUS, 1, &[]), None).unwrap();
                    }
                    for c in &conns {
                        loop {
                            let Ok(r) = c.recv() else { return };
                            let mut s = served.lock().unwrap();
                            s.1 += r.len;
                            if r.body.is_empty() {
                                s.0 += 1;
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let flooded = honest_round_trips(&broker.socket, flood_for);
    stop.store(true, Ordering::Relaxed);
    let (answers, bytes) = *served.lock().unwrap();
    // (2) Connections that ask once and never read.
    let base = broker.rss_anon();
    let silent: Vec<Client> = (0..SILENT)
        .map(|_| {
            let c = Client::connect(&broker.socket).unwrap();
            c.send_raw(&message::<u8>(kind::STATUS, 1, &[]), None).unwrap();
            c
        })
        .collect();
    let unread = honest_round_trips(&broker.socket, Duration::from_secs(4));
    let grown = broker.rss_anon().saturating_sub(base);
    drop(silent);
    for a in askers {
        let _ = a.join();
    }
    let stats = |t: &[Duration]| (percentile(t, 0.5), percentile(t, 0.99), *t.last().unwrap());
    println!(
        "honest client, quiet broker: median {:?}, p99 {:?}, worst {:?}",
        stats(&quiet).0,
        stats(&quiet).1,
        stats(&quiet).2
    );
    println!(
        "{ASKERS} connections of one user asking STATUS for {flood_for:?} (a domain of {MEMBERS} clients): {answers} \
         answers, {:.1} MB sent; honest client: {} round trips, median {:?}, p99 {:?}, worst {:?}",
        bytes as f64 / 1e6,
        flooded.len(),
        stats(&flooded).0,
        stats(&flooded).1,
        stats(&flooded).2
    );
    println!(
        "{SILENT} connections that ask and never read: broker anonymous memory +{grown} bytes; honest client: \
         median {:?}, worst {:?}",
        stats(&unread).0,
        stats(&unread).2
    );
    drop(members);
    for (what, t) in [("under the STATUS flood", &flooded), ("with unread answers", &unread)] {
        let (median, _, worst) = stats(t);
        assert!(median < Duration::from_millis(50), "median round trip {what}: {median:?}");
        assert!(worst < CLIENT_TIMEOUT / 2, "worst round trip {what}: {worst:?}");
    }
    assert!(answers > 0, "the askers got no answer");
    assert!(grown < 24 << 20, "unread answers grew the broker by {grown} bytes");
}
