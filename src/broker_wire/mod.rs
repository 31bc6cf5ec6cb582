//! The broker's wire (`docs/dedupd.md`): its protocol ([`proto`]: messages, their layouts and
//! limits) and the one layer every side speaks it through ([`seqpacket`]: Unix
//! `SOCK_SEQPACKET` sockets, one message a packet, descriptors as `SCM_RIGHTS`). The broker
//! (`dedupd`), the VMM's client (`dedup::broker_client`), the `status`/`check` queries and the
//! tests all use these two; nothing else opens a broker socket.

pub mod proto;
pub mod seqpacket;
