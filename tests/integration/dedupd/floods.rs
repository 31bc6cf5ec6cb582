//! Hostile clients (liars, garbage, a pipelining flooder) and STATUS floods beside an honest
//! client, who is served throughout.

use crate::common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker_client::{hash, message, page, store_entry, Broker, Client, Page, View};
use common::tempdir;
use samepage::broker_wire::proto::{self, error, kind, status as st, LookupEntry, ReleaseEntry, StoreEntry};

use super::{client_labelled, CLIENT_TIMEOUT, VIEW_PAGES};

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
        // Without shares, the honest client got no answer within 10 s; with them its median stays
        // in milliseconds (a few on a quiet machine; the bound leaves room for a loaded one).
        assert!(median < Duration::from_millis(200), "median round trip {what}: {median:?}");
        assert!(worst < CLIENT_TIMEOUT / 2, "worst round trip {what}: {worst:?}");
    }
    assert!(answers > 0, "the askers got no answer");
    assert!(grown < 24 << 20, "unread answers grew the broker by {grown} bytes");
}
