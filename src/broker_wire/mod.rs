//! The broker's wire (`docs/dedupd.md`): its protocol ([`proto`]: messages, their layouts and
//! limits; [`guest_stats`]: the check and conversions of the guest statistics entry) and the
//! one layer every side speaks it through ([`seqpacket`]: Unix `SOCK_SEQPACKET` sockets, one
//! message a packet, descriptors as `SCM_RIGHTS`). The broker (`dedupd`), the VMM's client
//! (`dedup::broker_client`), the `status`/`check` queries and the tests all use these; nothing
//! else opens a broker socket.

pub mod guest_stats;
pub mod proto;
pub mod seqpacket;
