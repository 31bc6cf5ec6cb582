//! Clients that go: killed in a STORE flood, or hanging up while their process still maps
//! its slots.

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::broker_client::{self as bc, page, store_entry, Broker, Client, Page, View};
use common::tempdir;
use samepage::broker_wire::proto::{self, kind, status as st};
use samepage::dedup::PAGE_SIZE;

use super::{client_labelled, VIEW_PAGES};

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
    // Gone from the clients, and done leaving: a departing client's references are released
    // in steps between other requests (docs/dedupd.md), which a STATUS may see half done.
    let after = loop {
        let s = broker.status();
        let d = &s.domains[0];
        if s.clients.iter().all(|c| c.label != "flooder") && d.leaving_clients == 0 && d.departed_clients == 0
        {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the broker still holds the killed client's references"
        );
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
