//! Unit tests of the broker: every message of the protocol, valid and invalid, driven into
//! [`Broker::handle`] as bytes; and the socket layer on real `SOCK_SEQPACKET` socket pairs.

mod departures;
mod guest_stats;
mod messages;
mod requests;
mod sockets;

use std::os::fd::AsRawFd;

use vm_memory::ByteValued;

use super::broker::{Broker, Limits, Outcome};
use super::domains::{Peer, Policy};
use super::report::{CheckReport, ClientId, StatusReport};
use super::session::Reply;
use crate::broker_wire::proto::{self, kind, ErrorReply, Hello, SlotReply, StatusReply, StoreEntry, Welcome};
use crate::broker_wire::seqpacket::Packet;
use crate::dedup::PAGE_SIZE;

const DOMAINS: &str = "ci: uid:1000 gid:50\nteam: gid:4242\n";

fn peer(uid: u32) -> Peer {
    Peer { pid: 100 + uid as i32, uid, gid: uid, groups: Vec::new() }
}

fn broker() -> Broker {
    broker_with(Limits { slots: 1 << 16, ..Limits::default() })
}

fn broker_with(limits: Limits) -> Broker {
    Broker::new(Policy::parse(DOMAINS).unwrap(), limits)
}

fn msg<T: ByteValued>(k: u16, seq: u32, entries: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode(&mut out, k, seq, entries);
    out
}

fn deliver(b: &mut Broker, id: ClientId, bytes: &[u8]) -> Outcome {
    b.handle(id, bytes, &Packet { len: bytes.len(), ancillary: false, fd: None })
}

/// The one reply's header and body (checked against the entry size of its kind).
fn only_reply(outcome: &Outcome, entry_size: usize) -> (proto::Header, Vec<u8>) {
    assert_eq!(outcome.replies.len(), 1, "{outcome:?}");
    let (h, body) = proto::decode(&outcome.replies[0].bytes, entry_size).unwrap();
    (h, body.to_vec())
}

/// The ERROR's code and detail, and whether the broker closes.
fn error_of(outcome: &Outcome) -> (u32, u32, bool) {
    let (h, body) = only_reply(outcome, size_of::<ErrorReply>());
    assert_eq!(h.kind, kind::ERROR, "{outcome:?}");
    let e: ErrorReply = proto::entry(&body, 0).unwrap();
    (e.code, e.detail, outcome.close)
}

fn entries<T: ByteValued + Default>(outcome: &Outcome, reply_kind: u16) -> Vec<T> {
    let (h, body) = only_reply(outcome, size_of::<T>());
    assert_eq!(h.kind, reply_kind, "{outcome:?}");
    assert!(!outcome.close);
    (0..h.count as usize).map(|i| proto::entry(&body, i).unwrap()).collect()
}

fn hello_entry(domain: &str, label: &str, ram_pages: u64) -> Hello {
    Hello {
        ram_pages,
        domain: proto::name_bytes(domain).unwrap(),
        label: proto::name_bytes(label).unwrap(),
        ..Hello::default()
    }
}

/// Connects `peer` and joins `domain`; returns the client id, the WELCOME and its descriptor.
fn join(b: &mut Broker, peer: Peer, domain: &str, ram_pages: u64) -> (ClientId, Welcome, std::fs::File) {
    let id = b.connect(peer, None).unwrap();
    let mut out = deliver(b, id, &msg(kind::HELLO, 1, &[hello_entry(domain, "vm", ram_pages)]));
    let welcome = entries::<Welcome>(&out, kind::WELCOME)[0];
    let fd = out.replies[0].fd.take().expect("WELCOME carries the store");
    (id, welcome, fd)
}

fn page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

fn store_entry(p: &[u8; PAGE_SIZE]) -> StoreEntry {
    StoreEntry { hash: *blake3::hash(p).as_bytes(), page: *p, ..StoreEntry::default() }
}

fn store(b: &mut Broker, id: ClientId, pages: &[[u8; PAGE_SIZE]]) -> Vec<SlotReply> {
    let list: Vec<StoreEntry> = pages.iter().map(store_entry).collect();
    entries(&deliver(b, id, &msg(kind::STORE, 7, &list)), kind::SLOTS)
}

fn release(b: &mut Broker, id: ClientId, slots: &[u64]) -> Vec<u32> {
    let list: Vec<proto::ReleaseEntry> = slots.iter().map(|&slot| proto::ReleaseEntry { slot }).collect();
    entries::<StatusReply>(&deliver(b, id, &msg(kind::RELEASE, 9, &list)), kind::RELEASED)
        .iter()
        .map(|r| r.status)
        .collect()
}

/// The TEXT pieces of an answer, joined.
fn text_of(replies: &[Reply]) -> String {
    let mut text = Vec::new();
    for (i, reply) in replies.iter().enumerate() {
        let (h, body) = proto::decode(&reply.bytes, 1).unwrap();
        assert_eq!(h.kind, kind::TEXT);
        assert_eq!(body.is_empty(), i + 1 == replies.len(), "only the last piece is empty");
        text.extend_from_slice(body);
    }
    String::from_utf8(text).unwrap()
}

/// Sends a STATUS or CHECK and runs the broker's steps until its answer is whole; returns
/// the answer's text and the steps it took.
fn query(b: &mut Broker, id: ClientId, k: u16) -> (String, usize) {
    let started = deliver(b, id, &msg::<u8>(k, 4, &[]));
    assert!(started.replies.is_empty() && !started.close, "a query answers in steps");
    let mut replies: Vec<Reply> = Vec::new();
    for steps in 1..1_000_000 {
        b.serve_parked();
        for (done_id, outcome) in b.step_jobs() {
            assert_eq!(done_id, id);
            replies.extend(outcome.replies);
        }
        if replies.last().is_some_and(|r| r.bytes.len() == size_of::<proto::Header>()) {
            return (text_of(&replies), steps);
        }
    }
    panic!("the query never finished");
}

fn status(b: &mut Broker, id: ClientId) -> StatusReport {
    serde_json::from_str(&query(b, id, kind::STATUS).0).unwrap()
}

/// Runs a CHECK to its end; returns the report and the steps it took.
fn check(b: &mut Broker, id: ClientId) -> (CheckReport, usize) {
    let (text, steps) = query(b, id, kind::CHECK);
    (serde_json::from_str(&text).unwrap(), steps)
}

fn is_read_only(file: &std::fs::File) -> bool {
    // SAFETY: plain fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags & libc::O_ACCMODE == libc::O_RDONLY
}
