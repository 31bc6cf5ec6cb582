//! HELLO, and messages that are malformed whatever their kind.

use std::os::unix::fs::MetadataExt;

use super::*;
use crate::broker_wire::proto::{
    error, Header, LookupEntry, ReleaseEntry, MAGIC, MAX_LOOKUP, MAX_MESSAGE, MAX_STORE_PAGES,
};
use crate::dedupd::broker::{MAX_MALFORMED, MAX_SLOTS};

#[test]
fn hello_joins_the_users_own_domain_with_a_read_only_store() {
    let mut b = broker();
    let (id, welcome, fd) = join(&mut b, peer(1000), "", 300);
    assert_eq!(welcome.client, id);
    assert_eq!((welcome.max_slots, welcome.page_size), (1 << 16, PAGE_SIZE as u32));
    assert_eq!(proto::name_str(&welcome.domain), Some("uid-1000"));
    assert!(is_read_only(&fd), "the store descriptor is read-only");
    // The same domain named explicitly, and a domain of the file the user is a member of.
    let (_, w2, fd2) = join(&mut b, peer(1000), "uid-1000", 1);
    assert_eq!(proto::name_str(&w2.domain), Some("uid-1000"));
    let (_, w3, _) = join(&mut b, peer(1000), "ci", 1);
    assert_eq!(proto::name_str(&w3.domain), Some("ci"));
    let (a, b_ino) = (fd.metadata().unwrap(), fd2.metadata().unwrap());
    assert_eq!(a.ino(), b_ino.ino(), "one store per domain");
    assert_eq!(b.domains(), 2);
    // A supplementary group admits too; root joins any valid name.
    let member = Peer { groups: vec![7, 4242], ..peer(3000) };
    join(&mut b, member, "team", 1);
    join(&mut b, peer(0), "anything.at-all_0", 1);
    let s = status(&mut b, id);
    let me = s.clients.iter().find(|c| c.id == id).unwrap();
    assert_eq!((me.ref_limit, me.label.as_str(), me.domain.as_str()), (300, "vm", "uid-1000"));
}

#[test]
fn hello_for_a_domain_not_open_to_the_user_or_with_a_bad_name_is_refused_and_closed() {
    let mut b = broker();
    let cases: Vec<(&str, Hello)> = vec![
        ("another user's domain", hello_entry("uid-1001", "vm", 1)),
        ("a domain of the file it is no member of", hello_entry("team", "vm", 1)),
        ("an unknown domain", hello_entry("nowhere", "vm", 1)),
        ("a name with a slash", hello_entry("a/b", "vm", 1)),
        ("a name with a space", hello_entry("a b", "vm", 1)),
        ("a label with a newline", hello_entry("", "vm\nFAKE LOG LINE", 1)),
        ("bytes after the NUL", {
            let mut h = hello_entry("ci", "vm", 1);
            h.domain[10] = b'x';
            h
        }),
        ("a label that is not UTF-8", {
            let mut h = hello_entry("ci", "vm", 1);
            h.label[0] = 0xff;
            h
        }),
    ];
    for (what, hello) in cases {
        let id = b.connect(peer(1000), None).unwrap();
        let out = deliver(&mut b, id, &msg(kind::HELLO, 5, &[hello]));
        assert_eq!(error_of(&out), (error::NOT_ALLOWED, 0, true), "{what}");
        assert_eq!(b.session(id).unwrap().rejections.not_allowed, 1, "{what}");
        assert!(b.session(id).unwrap().joined.is_none(), "{what}");
    }
    assert_eq!(b.domains(), 0, "no store was made for a refused client");
}

#[test]
fn hello_versions_flags_page_counts_and_a_second_hello() {
    let mut b = broker();
    let id = b.connect(peer(1000), None).unwrap();
    // The header's version, then HELLO's own: version 1 (before GUEST_STATS) and a later one.
    for version in [1u16, 3] {
        let mut bytes = msg(kind::HELLO, 1, &[hello_entry("", "vm", 1)]);
        bytes[4..6].copy_from_slice(&version.to_le_bytes());
        assert_eq!(error_of(&deliver(&mut b, id, &bytes)), (error::BAD_VERSION, 2, true), "header {version}");
    }
    let h = Hello { protocol: 1, ..hello_entry("", "vm", 1) };
    assert_eq!(error_of(&deliver(&mut b, id, &msg(kind::HELLO, 1, &[h]))), (error::BAD_VERSION, 2, true));
    let h = Hello { flags: 1, ..hello_entry("", "vm", 1) };
    assert_eq!(error_of(&deliver(&mut b, id, &msg(kind::HELLO, 1, &[h]))), (error::BAD_MESSAGE, 0, false));
    let h = hello_entry("", "vm", 0);
    assert_eq!(error_of(&deliver(&mut b, id, &msg(kind::HELLO, 1, &[h]))).0, error::BAD_MESSAGE);
    // No entry, two entries.
    assert_eq!(error_of(&deliver(&mut b, id, &msg::<Hello>(kind::HELLO, 1, &[]))).0, error::BAD_MESSAGE);
    let two = [hello_entry("", "a", 1), hello_entry("", "b", 1)];
    assert_eq!(error_of(&deliver(&mut b, id, &msg(kind::HELLO, 1, &two))), (error::TOO_MANY, 2, false));
    assert_eq!(b.session(id).unwrap().rejections.bad_version, 3);
    // A guest page count beyond 2^28 is capped; a second HELLO is refused, the first stands.
    let (id, _, _) = join(&mut b, peer(1000), "", u64::MAX);
    let again = deliver(&mut b, id, &msg(kind::HELLO, 2, &[hello_entry("ci", "vm", 1)]));
    assert_eq!(error_of(&again), (error::NO_SESSION, 0, false));
    let joined = b.session(id).unwrap().joined.as_ref().unwrap();
    assert_eq!((joined.domain.as_str(), joined.ref_limit), ("uid-1000", MAX_SLOTS as u64));
}

#[test]
fn requests_before_hello_are_refused_but_status_and_check_are_open_to_anyone() {
    let mut b = broker();
    let id = b.connect(peer(1000), None).unwrap();
    let requests = [
        msg(kind::LOOKUP, 1, &[LookupEntry::default()]),
        msg(kind::STORE, 2, &[store_entry(&page(1))]),
        msg(kind::RELEASE, 3, &[ReleaseEntry { slot: 0 }]),
        msg(kind::STATS, 4, &[proto::ClientStats::default()]),
    ];
    for (i, bytes) in requests.iter().enumerate() {
        let out = deliver(&mut b, id, bytes);
        assert_eq!(error_of(&out), (error::NO_SESSION, 0, false), "request {i}");
        assert_eq!(
            proto::peek(&out.replies[0].bytes).unwrap().seq,
            i as u32 + 1,
            "the reply carries the seq"
        );
    }
    assert_eq!(b.session(id).unwrap().rejections.no_session, 4);
    assert_eq!(status(&mut b, id).connections, 1);
    let (report, _) = check(&mut b, id);
    assert!(report.consistent && report.domains.is_empty());
}

#[test]
fn malformed_messages_are_refused_counted_and_close_the_connection_at_64() {
    let mut b = broker();
    let (id, _, _) = join(&mut b, peer(1000), "", 10);
    let good = msg(kind::LOOKUP, 11, &[LookupEntry::default(); 2]);
    let mut cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("empty", Vec::new(), error::BAD_MESSAGE),
        ("shorter than a header", good[..15].to_vec(), error::BAD_MESSAGE),
        ("truncated entry", good[..good.len() - 1].to_vec(), error::BAD_MESSAGE),
        ("a byte too many", [good.as_slice(), &[0]].concat(), error::BAD_MESSAGE),
        ("count says 3, 2 sent", with_header(&good, |h| h.count = 3), error::BAD_MESSAGE),
        ("bad magic", with_header(&good, |h| h.magic = MAGIC ^ 1), error::BAD_MESSAGE),
        ("unknown kind", with_header(&good, |h| h.kind = 0x77), error::BAD_MESSAGE),
        ("a reply kind sent to the broker", with_header(&good, |h| h.kind = kind::SLOTS), error::BAD_MESSAGE),
        ("LOOKUP without entries", msg::<LookupEntry>(kind::LOOKUP, 11, &[]), error::BAD_MESSAGE),
        ("RELEASE without entries", msg::<ReleaseEntry>(kind::RELEASE, 11, &[]), error::BAD_MESSAGE),
        ("STATUS with an entry", msg(kind::STATUS, 11, &[0u8]), error::TOO_MANY),
        (
            "257 LOOKUPs",
            msg(kind::LOOKUP, 11, &vec![LookupEntry::default(); MAX_LOOKUP + 1]),
            error::TOO_MANY,
        ),
        (
            "257 RELEASEs",
            msg(kind::RELEASE, 11, &vec![ReleaseEntry::default(); MAX_LOOKUP + 1]),
            error::TOO_MANY,
        ),
        (
            "33 STOREs",
            msg(kind::STORE, 11, &vec![StoreEntry::default(); MAX_STORE_PAGES + 1]),
            error::TOO_MANY,
        ),
        ("2 STATS", msg(kind::STATS, 11, &[proto::ClientStats::default(); 2]), error::TOO_MANY),
    ];
    let mut flags = store_entry(&page(1));
    flags.flags = 2;
    cases.push(("STORE with an unknown flag", msg(kind::STORE, 11, &[flags]), error::BAD_MESSAGE));
    let mut reserved = store_entry(&page(1));
    reserved.reserved = 1;
    cases.push(("STORE with a reserved field set", msg(kind::STORE, 11, &[reserved]), error::BAD_MESSAGE));
    for (what, bytes, code) in &cases {
        let out = deliver(&mut b, id, bytes);
        let (got, _, close) = error_of(&out);
        assert_eq!((got, close), (*code, false), "{what}");
        let seq = proto::peek(&out.replies[0].bytes).unwrap().seq;
        assert_eq!(seq, if bytes.len() >= 16 { 11 } else { 0 }, "{what}: seq");
    }
    // Longer than the longest message (the kernel says so with MSG_TRUNC), and one that
    // carried descriptors.
    let head = &good[..16];
    let out = b.handle(id, head, &Packet { len: MAX_MESSAGE + 1, ancillary: false, fd: None });
    assert_eq!(error_of(&out), (error::BAD_MESSAGE, MAX_MESSAGE as u32 + 1, false));
    let out = b.handle(id, &good, &Packet { len: good.len(), ancillary: true, fd: None });
    assert_eq!(error_of(&out).0, error::BAD_MESSAGE);
    let r = b.session(id).unwrap().rejections;
    assert_eq!((r.bad_message, r.too_many, r.oversized), (13, 5, 1));
    // Nothing changed meanwhile, and good requests are still answered.
    let slots = entries::<SlotReply>(&deliver(&mut b, id, &good), kind::SLOTS);
    assert_eq!(slots.len(), 2);
    // Up to 64 malformed messages in all: the 64th closes the connection.
    let so_far = cases.len() + 2;
    for n in so_far + 1..=MAX_MALFORMED as usize {
        let out = deliver(&mut b, id, &good[..3]);
        assert_eq!(out.close, n == MAX_MALFORMED as usize, "message {n}");
    }
}

#[test]
fn one_user_may_not_take_every_connection() {
    let mut b = broker_with(Limits { clients: 4, clients_per_user: 2, ..Limits::default() });
    let first = b.connect(peer(1000), None).unwrap();
    b.connect(peer(1000), None).unwrap();
    assert!(b.connect(peer(1000), None).is_none(), "a third of that user");
    b.connect(peer(2000), None).unwrap();
    b.connect(peer(0), None).unwrap();
    assert!(b.connect(peer(0), None).is_none(), "the limit of all connections holds for root too");
    b.disconnect(first);
    b.connect(peer(1000), None).unwrap();
}

fn with_header(message: &[u8], change: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = proto::peek(message).unwrap();
    change(&mut h);
    [h.as_slice(), &message[16..]].concat()
}

#[test]
fn a_connection_beyond_the_limit_is_busy_and_a_domain_beyond_the_limit_too() {
    let mut b =
        broker_with(Limits { clients: 3, clients_per_user: 3, domains: 1, slots: 16, ..Limits::default() });
    let (first, _, _) = join(&mut b, peer(1000), "", 1);
    let second = b.connect(peer(0), None).unwrap();
    let out = deliver(&mut b, second, &msg(kind::HELLO, 1, &[hello_entry("other", "vm", 1)]));
    assert_eq!(error_of(&out), (error::BUSY, 0, true));
    assert_eq!(b.session(second).unwrap().rejections.busy, 1);
    b.connect(peer(0), None).unwrap();
    assert!(b.connect(peer(0), None).is_none(), "a fourth connection");
    let busy = Outcome { replies: vec![b.busy()], close: true };
    assert_eq!(error_of(&busy), (error::BUSY, 3, true));
    // A client leaves: its domain's store goes, and another domain may have one.
    b.disconnect(first);
    b.disconnect(second);
    assert_eq!(b.domains(), 0);
    join(&mut b, peer(0), "other", 1);
    assert!(b.store("other").is_some());
}
