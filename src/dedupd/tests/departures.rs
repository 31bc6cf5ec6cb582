//! What a client leaves behind: references kept while its process runs on after its
//! connection closed, dropped in steps once it exits; pins bounded by what it declared,
//! however it churns; and queries held to their user's share.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command};

use super::*;
use crate::broker_wire::proto::status as st;
use crate::dedupd::broker::LEAVE_ENTRIES_PER_TURN;

/// A process of our own and a pidfd of it.
fn process() -> (Child, OwnedFd) {
    let child = Command::new("sleep").arg("60").spawn().expect("spawn sleep");
    // SAFETY: plain syscall returning a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor we own.
    (child, unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn join_as_process(b: &mut Broker, uid: u32, domain: &str, ram_pages: u64, pidfd: OwnedFd) -> ClientId {
    let id = b.connect(peer(uid), Some(pidfd)).unwrap();
    let out = deliver(b, id, &msg(kind::HELLO, 1, &[hello_entry(domain, "vm", ram_pages)]));
    entries::<Welcome>(&out, kind::WELCOME);
    id
}

#[test]
fn a_client_that_closes_its_connection_keeps_its_references_until_its_process_exits() {
    let mut b = broker();
    let (mut child, pidfd) = process();
    let a = join_as_process(&mut b, 1000, "ci", 100, pidfd);
    let stored = store(&mut b, a, &[page(1), page(2)]);
    assert_eq!(release(&mut b, a, &[stored[1].slot]), [st::RELEASED]);
    // The connection closes; the process may still map slot 0 (and slot 1, just released).
    assert!(b.disconnect(a).is_some(), "a pidfd to watch");
    assert_eq!(b.departed(), 1);
    let (c, _, _) = join(&mut b, peer(1000), "ci", 100);
    let mut e = store_entry(&page(3));
    e.hint0 = stored[0].slot;
    e.hint1 = stored[1].slot;
    let got: Vec<SlotReply> = entries(&deliver(&mut b, c, &msg(kind::STORE, 2, &[e])), kind::SLOTS);
    assert_eq!(got[0].status, st::NEW);
    assert!(got[0].slot > 1, "a departed client's slots went to another: {got:?}");
    let s = status(&mut b, c);
    assert_eq!((s.departed.len(), s.departed[0].references, s.departed[0].pinned), (1, 1, 1));
    assert_eq!(s.domains[0].departed_clients, 1);
    b.reap_departed();
    assert_eq!(b.departed(), 1, "its process runs on");
    child.kill().unwrap();
    child.wait().unwrap();
    b.reap_departed();
    assert_eq!(b.departed(), 0);
    let shared = &b.store("ci").unwrap().shared;
    assert_eq!((shared.live_pages(), shared.total_refs(), shared.holders()), (1, 1, 1));
    shared.verify().unwrap();
}

#[test]
fn a_client_whose_process_is_gone_leaves_at_once_and_one_with_nothing_held_too() {
    let mut b = broker();
    let (mut child, pidfd) = process();
    let a = join_as_process(&mut b, 1000, "ci", 100, pidfd);
    store(&mut b, a, &[page(1)]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(b.disconnect(a).is_none());
    assert!(b.store("ci").is_none(), "the last holder left: the store is dropped");
    let (_child, pidfd) = process();
    let idle = join_as_process(&mut b, 1000, "ci", 100, pidfd);
    assert!(b.disconnect(idle).is_none(), "nothing held: nothing to keep");
}

#[test]
fn departed_clients_count_against_their_users_connections() {
    let mut b = broker_with(Limits { slots: 1 << 16, clients_per_user: 2, ..Limits::default() });
    let mut children = Vec::new();
    for _ in 0..2 {
        let (child, pidfd) = process();
        children.push(child);
        let a = join_as_process(&mut b, 1000, "ci", 100, pidfd);
        store(&mut b, a, &[page(children.len() as u64)]);
        b.disconnect(a);
    }
    assert!(b.connect(peer(1000), None).is_none(), "two departed clients of that user hold references");
    for mut child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    b.reap_departed();
    assert!(b.connect(peer(1000), None).is_some());
}

#[test]
fn a_client_with_many_references_leaves_in_steps() {
    let mut b = broker();
    let pages = 3 * LEAVE_ENTRIES_PER_TURN as u64 + 5;
    let (a, _, _) = join(&mut b, peer(1000), "ci", pages);
    let all: Vec<[u8; PAGE_SIZE]> = (0..pages).map(page).collect();
    for chunk in all.chunks(32) {
        store(&mut b, a, chunk);
    }
    b.disconnect(a);
    let mut turns = 1;
    while b.store("ci").is_some() {
        let shared = &b.store("ci").unwrap().shared;
        assert_eq!(shared.leaving_holders(), 1);
        assert!(shared.live_pages() > 0);
        assert!(b.work_pending(), "the loop must not sleep");
        b.step_leaving();
        turns += 1;
    }
    assert_eq!(turns, 4, "{pages} entries at {LEAVE_ENTRIES_PER_TURN} a turn");
    assert!(!b.work_pending());
}

#[test]
fn a_churning_client_pins_no_more_than_it_declared_and_freed_slots_are_used_again() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "", 32);
    for round in 0..200u64 {
        let batch: Vec<[u8; PAGE_SIZE]> = (0..32).map(|i| page(round * 32 + i)).collect();
        let slots: Vec<u64> = store(&mut b, a, &batch).iter().map(|r| r.slot).collect();
        assert_eq!(release(&mut b, a, &slots), [st::RELEASED; 32]);
    }
    let shared = &b.store("uid-1000").unwrap().shared;
    println!(
        "after 6400 pages stored and released: {} pins, {} entries, {} slots ever used",
        shared.total_pins(),
        shared.holder_entries(1),
        shared.slots_used()
    );
    assert!(shared.total_pins() <= 32, "pins: {}", shared.total_pins());
    assert!(shared.slots_used() <= 64, "the store grew to {} slots", shared.slots_used());
    shared.verify().unwrap();
}

#[test]
fn queries_beyond_a_users_share_wait_and_do_not_hold_back_others() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", 100);
    for _ in 0..crate::dedupd::admission::QUERY_BURST as usize {
        status(&mut b, a);
    }
    // The next one waits, and its connection is not read meanwhile.
    assert!(deliver(&mut b, a, &msg::<u8>(kind::STATUS, 3, &[])).replies.is_empty());
    b.serve_parked();
    assert!(b.step_jobs().is_empty());
    assert!(b.waiting(a) && b.queries_parked());
    // Another user's query is served meanwhile.
    let other = b.connect(peer(2000), None).unwrap();
    assert_eq!(status(&mut b, other).connections, 1);
    std::thread::sleep(b.parked_retry() * 2);
    b.serve_parked();
    let answered: Vec<_> = (0..10).flat_map(|_| b.step_jobs()).collect();
    assert!(answered.iter().all(|(id, _)| *id == a) && !answered.is_empty());
    assert!(!b.waiting(a));
}

#[test]
fn a_status_of_many_clients_is_written_in_steps_and_reads_as_one_report() {
    let mut b = broker();
    let n = 3 * crate::dedupd::status_job::STATUS_ITEMS_PER_STEP + 7;
    for _ in 0..n {
        join(&mut b, peer(1000), "ci", 100);
    }
    let root = b.connect(peer(0), None).unwrap();
    let (text, steps) = query(&mut b, root, kind::STATUS);
    let report: StatusReport = serde_json::from_str(&text).unwrap();
    assert_eq!((report.clients.len(), report.connections, report.domains[0].clients), (n, n + 1, n));
    assert_eq!(steps, 4, "{n} clients at {} a step", crate::dedupd::status_job::STATUS_ITEMS_PER_STEP);
}

#[test]
fn status_counts_only_the_connections_the_caller_may_see() {
    let mut b = broker();
    join(&mut b, peer(1000), "ci", 100);
    for _ in 0..3 {
        join(&mut b, peer(2000), "", 100);
    }
    let stranger = b.connect(peer(3000), None).unwrap();
    assert_eq!(status(&mut b, stranger).connections, 1, "its own only");
    let member = b.connect(peer(1000), None).unwrap();
    assert_eq!(status(&mut b, member).connections, 2, "its own and its domain's");
    let root = b.connect(peer(0), None).unwrap();
    assert_eq!(status(&mut b, root).connections, 7);
}
