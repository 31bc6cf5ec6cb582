//! LOOKUP, STORE, RELEASE, STATS, STATUS and CHECK of joined clients, and what leaving does.

use std::os::fd::AsRawFd;

use super::*;
use crate::broker_wire::proto::{status as st, ClientStats, LookupEntry, FOLLOWS_PREVIOUS, NO_HINT};

fn lookup(b: &mut Broker, id: ClientId, pages: &[[u8; PAGE_SIZE]]) -> Vec<SlotReply> {
    let list: Vec<LookupEntry> =
        pages.iter().map(|p| LookupEntry { hash: *blake3::hash(p).as_bytes() }).collect();
    entries(&deliver(b, id, &msg(kind::LOOKUP, 5, &list)), kind::SLOTS)
}

fn statuses(replies: &[SlotReply]) -> Vec<u32> {
    replies.iter().map(|r| r.status).collect()
}

/// A private (copy-on-write) view of a client's store descriptor, as a VMM maps it.
struct View {
    base: *mut u8,
    len: usize,
}

impl View {
    fn new(fd: &std::fs::File, pages: usize) -> View {
        let len = pages * PAGE_SIZE;
        // SAFETY: a new private read-only mapping of a descriptor we own.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, fd.as_raw_fd(), 0)
        };
        assert_ne!(base, libc::MAP_FAILED);
        View { base: base.cast(), len }
    }

    fn page(&self, slot: u64) -> Vec<u8> {
        assert!((slot as usize + 1) * PAGE_SIZE <= self.len);
        // SAFETY: inside our mapping, below the store file's size (checked by the caller).
        unsafe { std::slice::from_raw_parts(self.base.add(slot as usize * PAGE_SIZE), PAGE_SIZE) }.to_vec()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[test]
fn store_hashes_new_pages_compares_known_ones_and_refuses_liars() {
    let mut b = broker();
    let (a, _, fd) = join(&mut b, peer(1000), "ci", 100);
    let (c, _, _) = join(&mut b, peer(0), "ci", 100);
    let pages = [page(1), page(2)];
    let first = store(&mut b, a, &pages);
    assert_eq!(statuses(&first), [st::NEW, st::NEW]);
    // The store holds the bytes the client sent, as its private view shows.
    let view = View::new(&fd, 16);
    assert_eq!(view.page(first[1].slot), pages[1]);
    // Another client of the domain: proven by a compare, the same slots.
    let second = store(&mut b, c, &pages);
    assert_eq!(statuses(&second), [st::OK, st::OK]);
    assert_eq!(
        second.iter().map(|r| r.slot).collect::<Vec<_>>(),
        first.iter().map(|r| r.slot).collect::<Vec<_>>()
    );
    // Bytes that do not hash to the claim; other bytes under a stored hash.
    let mut lie = store_entry(&page(3));
    lie.hash[0] ^= 1;
    let mut steal = store_entry(&page(4));
    steal.hash = *blake3::hash(&pages[0]).as_bytes();
    let out: Vec<SlotReply> = entries(&deliver(&mut b, c, &msg(kind::STORE, 8, &[lie, steal])), kind::SLOTS);
    assert_eq!(statuses(&out), [st::MISMATCH, st::MISMATCH]);
    assert_eq!(view.page(first[0].slot), pages[0], "a liar changes nothing");
    assert_eq!(b.session(c).unwrap().rejections.mismatch, 2);
    let counters = b.store("ci").unwrap().shared.counters();
    assert_eq!((counters.hashes, counters.compares, counters.stored), (3, 3, 2));
    // LOOKUP: hits take a reference, misses do not.
    let found = lookup(&mut b, c, &[pages[0], page(9)]);
    assert_eq!(statuses(&found), [st::OK, st::MISS]);
    assert_eq!(found[0].slot, first[0].slot);
    assert_eq!(b.store("ci").unwrap().shared.holder_refs(1), 2);
    assert_eq!(b.store("ci").unwrap().shared.holder_refs(2), 3);
}

#[test]
fn consecutive_new_pages_follow_each_other_and_hints_are_only_hints() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "", 100);
    let mut list: Vec<StoreEntry> = (10..14).map(|s| store_entry(&page(s))).collect();
    for e in &mut list[1..] {
        e.flags = FOLLOWS_PREVIOUS;
    }
    // Hints beyond any slot, or on a slot in use, are no harm.
    list[0].hint0 = u64::MAX - 1;
    list[0].hint1 = 1 << 40;
    let out: Vec<SlotReply> = entries(&deliver(&mut b, a, &msg(kind::STORE, 1, &list)), kind::SLOTS);
    assert_eq!(out.iter().map(|r| r.slot).collect::<Vec<_>>(), [0, 1, 2, 3]);
    let mut e = store_entry(&page(20));
    (e.hint0, e.hint1) = (0, NO_HINT);
    let out: Vec<SlotReply> = entries(&deliver(&mut b, a, &msg(kind::STORE, 2, &[e])), kind::SLOTS);
    assert_eq!((out[0].status, out[0].slot), (st::NEW, 4));
}

#[test]
fn a_client_releases_only_what_it_holds_whatever_slot_it_names() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", 100);
    let (c, _, _) = join(&mut b, peer(0), "ci", 100);
    let slots: Vec<u64> = store(&mut b, a, &[page(1), page(2)]).iter().map(|r| r.slot).collect();
    // Forged: another client's slot, a slot never given out, slot numbers that do not fit a
    // slot (2^32 would be slot 0 if cut to 32 bits), u64::MAX.
    let forged = [slots[0], 12_345, 1 << 32, (1 << 32) + slots[1], u64::MAX];
    assert_eq!(release(&mut b, c, &forged), [st::NOT_HELD; 5]);
    assert_eq!(b.session(c).unwrap().rejections.not_held, 5);
    b.store("ci").unwrap().shared.verify().unwrap();
    assert_eq!(b.store("ci").unwrap().shared.live_pages(), 2, "nothing was freed");
    // Its own: once; the second is refused.
    assert_eq!(release(&mut b, a, &[slots[0], slots[0]]), [st::RELEASED, st::NOT_HELD]);
    assert_eq!(b.store("ci").unwrap().shared.live_pages(), 1);
    b.store("ci").unwrap().shared.verify().unwrap();
}

#[test]
fn references_stop_at_the_guests_page_count() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "", 3);
    let pages: Vec<[u8; PAGE_SIZE]> = (30..35).map(page).collect();
    let out = store(&mut b, a, &pages);
    assert_eq!(statuses(&out), [st::NEW, st::NEW, st::NEW, st::FULL, st::FULL]);
    assert_eq!(statuses(&lookup(&mut b, a, &pages[..1])), [st::FULL], "a hit would take a fourth");
    let shared = &b.store("uid-1000").unwrap().shared;
    assert_eq!((shared.holder_refs(1), shared.live_pages(), shared.counters().hashes), (3, 3, 3));
    assert_eq!(b.session(a).unwrap().rejections.ref_limit, 3);
    // Below the limit again after a release.
    assert_eq!(release(&mut b, a, &[out[0].slot]), [st::RELEASED]);
    assert_eq!(statuses(&lookup(&mut b, a, &pages[1..2])), [st::OK]);
}

#[test]
fn a_full_store_answers_full() {
    let mut b = broker_with(Limits { slots: 2, ..Limits::default() });
    let (a, _, _) = join(&mut b, peer(1000), "", 100);
    let out = store(&mut b, a, &[page(1), page(2), page(3)]);
    assert_eq!(statuses(&out), [st::NEW, st::NEW, st::FULL]);
    assert_eq!(b.session(a).unwrap().rejections.store_full, 1);
}

#[test]
fn stats_are_acknowledged_and_shown_by_status_to_those_who_may_see_the_domain() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", 100);
    let (other, _, _) = join(&mut b, peer(2000), "", 100);
    let figures = ClientStats { reported: 10, merged: 7, mapped_pages: 7, vmas: 3, ..Default::default() };
    let out = deliver(&mut b, a, &msg(kind::STATS, 6, &[figures]));
    let (h, _) = only_reply(&out, 0);
    assert_eq!((h.kind, h.seq, h.count), (kind::ACK, 6, 0));
    store(&mut b, a, &[page(1)]);
    let s = status(&mut b, a);
    assert_eq!(s.domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["ci"], "not uid-2000's");
    let me = &s.clients[0];
    assert_eq!((me.id, me.references, me.stats.unwrap().merged, me.stats.unwrap().vmas), (a, 1, 7, 3));
    assert_eq!(s.domains[0].store_pages, 1);
    assert_eq!(s.domains[0].store_bytes, PAGE_SIZE as u64);
    // The other user sees only its own domain; root sees both.
    let theirs = status(&mut b, other);
    assert_eq!(theirs.domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["uid-2000"]);
    assert_eq!(theirs.clients.len(), 1);
    let root = b.connect(peer(0), None).unwrap();
    assert_eq!(status(&mut b, root).domains.len(), 2);
}

#[test]
fn check_runs_in_steps_and_finds_a_corrupted_page() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", 1000);
    let pages: Vec<[u8; PAGE_SIZE]> = (0..100).map(page).collect();
    for chunk in pages.chunks(32) {
        store(&mut b, a, chunk);
    }
    let (report, steps) = check(&mut b, a);
    assert!(report.consistent, "{report:?}");
    assert_eq!((report.domains[0].pages_checked, report.domains[0].references), (100, 100));
    assert!(steps >= 4, "100 pages at 32 a step took {steps} steps");
    // Someone who can write the store (root, or its owner) changes a page behind its back.
    let fd = b.store("ci").unwrap().shared.fd();
    // SAFETY: pwrite of one byte into the store's memfd, which this test owns.
    assert_eq!(unsafe { libc::pwrite(fd, b"X".as_ptr().cast(), 1, 5 * PAGE_SIZE as i64 + 9) }, 1);
    let (report, _) = check(&mut b, a);
    assert!(!report.consistent);
    assert!(report.first_disagreement.unwrap().contains("slot 5"), "names the slot");
    // A client that does not see the domain does not check it.
    let stranger = b.connect(peer(3000), None).unwrap();
    let (report, _) = check(&mut b, stranger);
    assert!(report.consistent && report.domains.is_empty());
}

#[test]
fn a_store_dropped_during_a_check_is_reported_dropped() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "", 1000);
    let pages: Vec<[u8; PAGE_SIZE]> = (0..64).map(page).collect();
    store(&mut b, a, &pages[..32]);
    store(&mut b, a, &pages[32..]);
    let root = b.connect(peer(0), None).unwrap();
    assert!(deliver(&mut b, root, &msg::<u8>(kind::CHECK, 4, &[])).replies.is_empty());
    assert!(b.step_jobs().is_empty());
    b.disconnect(a);
    let done = (0..3).find_map(|_| b.step_jobs().pop()).expect("the check ends");
    let report: CheckReport = serde_json::from_str(&text_of(&done.1.replies)).unwrap();
    assert!(report.consistent && report.domains[0].dropped, "{report:?}");
}

#[test]
fn leaving_drops_every_reference_and_the_last_client_drops_the_store() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", 100);
    let (c, _, _) = join(&mut b, peer(0), "ci", 100);
    store(&mut b, a, &[page(1), page(2)]);
    store(&mut b, c, &[page(2), page(3)]);
    b.disconnect(a);
    let shared = &b.store("ci").unwrap().shared;
    assert_eq!((shared.live_pages(), shared.total_refs(), shared.holders()), (2, 2, 1));
    assert_eq!(shared.allocated_bytes().unwrap(), 2 * PAGE_SIZE as u64, "page 1 was punched");
    shared.verify().unwrap();
    b.disconnect(c);
    assert!(b.store("ci").is_none());
}

#[test]
fn pages_faulted_back_through_a_stale_view_are_punched_again() {
    let mut b = broker();
    let (a, _, fd) = join(&mut b, peer(1000), "", 100);
    let out = store(&mut b, a, &[page(1), page(2), page(3)]);
    assert_eq!(release(&mut b, a, &[out[0].slot, out[2].slot]), [st::RELEASED; 2]);
    let held = |b: &Broker| b.store("uid-1000").unwrap().shared.allocated_bytes().unwrap();
    assert_eq!(held(&b), PAGE_SIZE as u64);
    // The client reads freed and never used slots through its view: zero pages fill them.
    let view = View::new(&fd, 64);
    for slot in [0, 2, 40] {
        assert_eq!(view.page(slot), vec![0u8; PAGE_SIZE]);
    }
    assert!(held(&b) > PAGE_SIZE as u64, "the faults took memory: {}", held(&b));
    b.repunch();
    assert_eq!(held(&b), PAGE_SIZE as u64);
    assert_eq!(b.store("uid-1000").unwrap().repunches, 1);
    assert_eq!(view.page(1), page(2), "the live page stays");
    b.repunch();
    assert_eq!(b.store("uid-1000").unwrap().repunches, 1, "nothing to punch: not counted");
}
