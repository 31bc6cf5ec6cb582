//! Unit tests of `shared_pages.rs`.

use super::*;

fn page(seed: u8) -> [u8; PAGE_SIZE] {
    let mut p = [seed; PAGE_SIZE];
    p[0] = seed.wrapping_mul(7);
    p
}

fn req(p: &[u8; PAGE_SIZE]) -> PageOffer<'_> {
    PageOffer {
        hash: *blake3::hash(p).as_bytes(),
        page: p,
        hints: [None, None],
        follows_previous: false,
        hashed_here: false,
    }
}

#[test]
fn first_copies_are_hashed_duplicates_compared_liars_refused() {
    let mut s = SharedPages::new("shared-unit", 64).unwrap();
    let (a, b) = (s.join(0), s.join(64));
    let p = page(1);
    assert_eq!(s.offer(a, &req(&p), None), Offered::Slot { slot: 0, fresh: true });
    assert_eq!(s.lookup(b, &req(&p).hash), Some(0));
    assert_eq!(s.offer(b, &req(&p), None), Offered::Slot { slot: 0, fresh: false });
    // Other bytes under a stored hash, and bytes that do not hash to the claim.
    let other = page(2);
    let mut lie = req(&other);
    lie.hash = req(&p).hash;
    assert_eq!(s.offer(a, &lie, None), Offered::Mismatch);
    let mut lie = req(&other);
    lie.hash[0] ^= 1;
    assert_eq!(s.offer(a, &lie, None), Offered::Mismatch);
    let c = s.counters();
    assert_eq!((c.hashes, c.compares, c.stored, c.mismatches, c.hits), (2, 2, 1, 2, 1));
    assert_eq!((s.holder_refs(a), s.holder_refs(b), s.live_pages()), (1, 2, 1));
    assert_eq!(s.verify().unwrap(), 1);
}

#[test]
fn a_holders_claims_change_only_its_own_references() {
    let mut s = SharedPages::new("shared-claims", 64).unwrap();
    let (a, b) = (s.join(64), s.join(64));
    let p = page(3);
    let Offered::Slot { slot, .. } = s.offer(a, &req(&p), None) else { panic!() };
    // b releases what it never held, and a slot that does not exist: refused.
    assert!(!s.release(b, slot));
    assert!(!s.release(b, 999));
    assert_eq!(s.counters().bad_releases, 2);
    assert_eq!(s.page(slot), Some(p.as_slice()));
    // a releases twice: the second is refused; the slot is punched once nobody holds it.
    assert!(s.release(a, slot));
    assert!(!s.release(a, slot));
    assert_eq!((s.live_pages(), s.allocated_bytes().unwrap()), (0, 0));
    s.verify().unwrap();
}

#[test]
fn a_punched_slot_waits_for_every_pinning_holder_that_held_it() {
    let mut s = SharedPages::new("shared-pins", 64).unwrap();
    let (pinning, other) = (s.join(64), s.join(0));
    let first = page(4);
    let Offered::Slot { slot, .. } = s.offer(pinning, &req(&first), None) else { panic!() };
    assert!(s.release(pinning, slot));
    // Freed, but the pinning holder may still map it: a new page does not get it back,
    // even when asked.
    let second = page(5);
    let mut r = req(&second);
    r.hints = [Some(slot), None];
    let Offered::Slot { slot: got, .. } = s.offer(other, &r, None) else { panic!() };
    assert_ne!(got, slot);
    s.leave(pinning);
    let third = page(6);
    let mut r = req(&third);
    r.hints = [Some(slot), None];
    assert_eq!(s.offer(other, &r, None), Offered::Slot { slot, fresh: true });
    // A holder that leaves drops all its references at once.
    s.leave(other);
    assert_eq!((s.live_pages(), s.allocated_bytes().unwrap(), s.total_refs()), (0, 0, 0));
    s.verify().unwrap();
}

#[test]
fn consecutive_new_pages_get_consecutive_slots() {
    let mut s = SharedPages::new("shared-runs", 64).unwrap();
    let h = s.join(0);
    let pages: Vec<[u8; PAGE_SIZE]> = (10..14).map(page).collect();
    let mut previous = None;
    let mut slots = Vec::new();
    for p in &pages {
        let mut r = req(p);
        r.follows_previous = true;
        let Offered::Slot { slot, .. } = s.offer(h, &r, previous) else { panic!() };
        previous = Some(slot);
        slots.push(slot);
    }
    assert_eq!(slots, vec![0, 1, 2, 3]);
}
