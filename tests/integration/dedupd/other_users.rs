//! Clients of other users (uid 65534, via setpriv): the domains open to them, and what they
//! can do with the store's descriptor.

use crate::common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::broker_client::{self as bc, hash, page, Broker, Client, View};
use common::tempdir;
use samepage::broker_wire::proto::{self, error, status as st};
use samepage::dedup::PAGE_SIZE;

use super::{open_dir, AS_NOBODY, VIEW_PAGES};

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
