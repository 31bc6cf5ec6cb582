//! GUEST_STATS: a client's guest statistics in `status` (JSON and text), and every way a
//! hostile client can send them wrong: lengths, counts, reserved bits, impossible sizes, and
//! too often.

use std::time::Duration;

use samepage_virtio::balloon::GuestMemoryStats;

use super::*;
use crate::broker_wire::guest_stats::from_memory_stats;
use crate::broker_wire::proto::{error, GuestStats, GUEST_STAT_TAGS};
use crate::dedupd::broker::{GUEST_STATS_EVERY, MAX_MALFORMED};
use crate::dedupd::report;

/// 64 MiB of guest RAM, in pages.
const RAM_PAGES: u64 = 16_384;
const RAM: u64 = RAM_PAGES * PAGE_SIZE as u64;
const TOTAL: usize = 5;
const FREE: usize = 4;

fn figures(free_mib: u64) -> GuestMemoryStats {
    GuestMemoryStats {
        major_faults: Some(17),
        free_memory: Some(free_mib << 20),
        total_memory: Some(48 << 20),
        available_memory: Some(20 << 20),
        oom_kills: Some(3),
        ..GuestMemoryStats::default()
    }
}

fn send(b: &mut Broker, id: ClientId, entry: &GuestStats) -> Outcome {
    deliver(b, id, &msg(kind::GUEST_STATS, 21, &[*entry]))
}

fn acked(outcome: &Outcome) -> bool {
    let (h, _) = only_reply(outcome, 0);
    !outcome.close && (h.kind, h.seq, h.count) == (kind::ACK, 21, 0)
}

/// The client's guest statistics as `status` shows them.
fn shown(b: &mut Broker, id: ClientId) -> Option<GuestMemoryStats> {
    status(b, id).clients.iter().find(|c| c.id == id).and_then(|c| c.guest_stats)
}

#[test]
fn guest_statistics_show_in_status_per_client_and_only_for_clients_that_sent_them() {
    let mut b = broker();
    let (a, _, _) = join(&mut b, peer(1000), "ci", RAM_PAGES);
    let (quiet, _, _) = join(&mut b, peer(1000), "ci", RAM_PAGES);
    assert!(acked(&send(&mut b, a, &from_memory_stats(&figures(12)))));
    let s = status(&mut b, a);
    let of = |id| s.clients.iter().find(|c| c.id == id).unwrap();
    assert_eq!(of(a).guest_stats, Some(figures(12)), "exactly what was sent, absent ones absent");
    assert_eq!(of(quiet).guest_stats, None, "a client without a balloon shows none");
    let text = report::render(&s);
    let line_of = |id: ClientId| text.lines().find(|l| l.contains(&format!("client {id} "))).unwrap();
    assert!(
        line_of(a).ends_with(
            "; guest: 48.0 MiB total, 12.0 MiB free, 20.0 MiB available, 17 major faults, 3 OOM kills"
        ),
        "{text}"
    );
    assert!(!line_of(quiet).contains("guest"), "{text}");
    // The JSON names every statistic, null where the guest gave none.
    let json = query(&mut b, a, kind::STATUS).0;
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let clients = value["clients"].as_array().unwrap();
    let mine = clients.iter().find(|c| c["id"] == a).unwrap();
    assert_eq!(mine["guest_stats"]["total_memory"], 48u64 << 20);
    assert!(mine["guest_stats"]["swap_in"].is_null());
    assert!(clients.iter().find(|c| c["id"] == quiet).unwrap()["guest_stats"].is_null());
}

#[test]
fn guest_statistics_before_hello_or_of_the_wrong_length_or_count_are_refused() {
    let mut b = broker();
    let loner = b.connect(peer(1000), None).unwrap();
    let entry = from_memory_stats(&figures(12));
    assert_eq!(error_of(&send(&mut b, loner, &entry)), (error::NO_SESSION, 0, false));
    let (id, _, _) = join(&mut b, peer(1000), "", RAM_PAGES);
    let good = msg(kind::GUEST_STATS, 3, &[entry]);
    let cases = [
        ("a byte short", good[..good.len() - 1].to_vec(), (error::BAD_MESSAGE, 0, false)),
        ("a byte over", [good.as_slice(), &[0]].concat(), (error::BAD_MESSAGE, 0, false)),
        ("no entry", msg::<GuestStats>(kind::GUEST_STATS, 3, &[]), (error::BAD_MESSAGE, 0, false)),
        ("two entries", msg(kind::GUEST_STATS, 3, &[entry, entry]), (error::TOO_MANY, 2, false)),
    ];
    for (what, bytes, expected) in cases {
        assert_eq!(error_of(&deliver(&mut b, id, &bytes)), expected, "{what}");
    }
    let r = b.session(id).unwrap().rejections;
    assert_eq!((r.bad_message, r.too_many, r.guest_stats), (3, 1, 0));
    assert_eq!(shown(&mut b, id), None, "nothing refused was kept");
}

#[test]
fn reserved_bits_and_impossible_sizes_are_refused_and_counted_and_the_last_good_figures_stay() {
    let mut b =
        broker_with(Limits { slots: 1 << 16, guest_stats_every: Duration::ZERO, ..Limits::default() });
    let (id, _, _) = join(&mut b, peer(1000), "", RAM_PAGES);
    let good = from_memory_stats(&figures(12));
    assert!(acked(&send(&mut b, id, &good)));
    let with = |i: usize, v: u64| {
        let mut e = good;
        e.values[i] = v;
        e
    };
    let malformed = [
        GuestStats { reserved: 1, ..good },
        GuestStats { present: good.present | 1 << GUEST_STAT_TAGS, ..good },
        with(0, 1), // swap_in: not present, yet a value.
    ];
    for entry in malformed {
        assert_eq!(error_of(&send(&mut b, id, &entry)), (error::BAD_MESSAGE, 0, false), "{entry:?}");
    }
    let impossible = [with(TOTAL, RAM + PAGE_SIZE as u64), with(FREE, u64::MAX), with(FREE, (48 << 20) + 1)];
    for entry in impossible {
        assert_eq!(error_of(&send(&mut b, id, &entry)), (error::BAD_MESSAGE, 0, false), "{entry:?}");
    }
    let r = b.session(id).unwrap().rejections;
    assert_eq!((r.bad_message, r.guest_stats), (3, 3));
    assert_eq!(shown(&mut b, id), Some(figures(12)), "the last accepted figures stay");
    // A total equal to the declared RAM is possible; newer figures replace older ones.
    let full = GuestMemoryStats { total_memory: Some(RAM), free_memory: Some(RAM), ..Default::default() };
    assert!(acked(&send(&mut b, id, &from_memory_stats(&full))));
    assert_eq!(shown(&mut b, id), Some(full));
}

#[test]
fn guest_statistics_sooner_than_the_broker_takes_them_are_refused_and_a_flood_is_closed() {
    let mut b = broker();
    let (id, _, _) = join(&mut b, peer(1000), "", RAM_PAGES);
    assert!(acked(&send(&mut b, id, &from_memory_stats(&figures(12)))));
    let ms = GUEST_STATS_EVERY.as_millis() as u32;
    for n in 1..MAX_MALFORMED {
        let out = send(&mut b, id, &from_memory_stats(&figures(11)));
        assert_eq!(error_of(&out), (error::TOO_SOON, ms, false), "flood message {n}");
    }
    let last = send(&mut b, id, &from_memory_stats(&figures(11)));
    assert_eq!(error_of(&last), (error::TOO_SOON, ms, true), "closed at {MAX_MALFORMED}");
    let r = b.session(id).unwrap().rejections;
    assert_eq!(r.too_soon, u64::from(MAX_MALFORMED));
    assert_eq!(b.session(id).unwrap().guest_stats, Some(from_memory_stats(&figures(12))));
    // Another client is not held back by the first one's clock.
    let (other, _, _) = join(&mut b, peer(1000), "", RAM_PAGES);
    assert!(acked(&send(&mut b, other, &from_memory_stats(&figures(10)))));
    // Once the interval is over, figures are taken again.
    let (late, _, _) = join(&mut b, peer(1000), "", RAM_PAGES);
    assert!(acked(&send(&mut b, late, &from_memory_stats(&figures(12)))));
    std::thread::sleep(GUEST_STATS_EVERY);
    assert!(acked(&send(&mut b, late, &from_memory_stats(&figures(9)))));
    assert_eq!(shown(&mut b, late), Some(figures(9)));
}
