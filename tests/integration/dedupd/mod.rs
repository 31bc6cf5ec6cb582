//! The dedup broker through the real binary: `samepage dedupd` in a child process on a
//! temporary socket, clients speaking the protocol with libc (`common::broker_client`), some
//! of them hostile, some running as another user (uid 65534, via setpriv).
//!
//! Here: one broker per socket, the broker as an unprivileged user, its memory per page;
//! `floods`: hostile and flooding clients beside an honest one; `other_users`: domains and
//! what a non-root client can do with the store; `departures`: clients that die or hang up.

mod departures;
mod floods;
mod other_users;

use crate::common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::broker_client::{hash, page, Broker, Client, Page, View};
use common::tempdir;
use samepage::broker_wire::proto::status as st;
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
