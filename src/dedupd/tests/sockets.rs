//! The socket layer on real `SOCK_SEQPACKET` socket pairs: over-long packets are seen as
//! such, descriptors a client attaches are not installed, WELCOME carries the store.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::broker_wire::proto::{error, LookupEntry, MAX_MESSAGE};
use crate::broker_wire::seqpacket::{self, Received};
use crate::dedupd::socket::peer_of;

fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    assert_eq!(rc, 0);
    // SAFETY: two new descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Receives one packet with room for one descriptor; returns its bytes and the descriptor.
fn recv_with_fd(sock: RawFd) -> (Vec<u8>, Option<OwnedFd>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let Received::Packet(p) = seqpacket::recv(sock, &mut buf, true, true).unwrap() else { panic!() };
    buf.truncate(p.len);
    (buf, p.fd)
}

/// Sends one packet (waiting for room), with `fd` attached if given.
fn send_packet(sock: RawFd, bytes: &[u8], fd: Option<RawFd>) -> std::io::Result<bool> {
    seqpacket::send(sock, bytes, fd, true)
}

/// Receives one packet without waiting, asking for no descriptor (as the broker does).
fn recv_packet(sock: RawFd, buf: &mut [u8]) -> std::io::Result<Received> {
    seqpacket::recv(sock, buf, false, false)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn an_over_long_packet_is_reported_with_its_real_length() {
    let (client, broker_end) = pair();
    let mut buf = vec![0u8; MAX_MESSAGE];
    for len in [MAX_MESSAGE, MAX_MESSAGE + 1, 200_000] {
        let bytes = vec![7u8; len];
        assert!(send_packet(client.as_raw_fd(), &bytes, None).unwrap());
        let Received::Packet(got) = recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap() else { panic!() };
        assert_eq!((got.len, got.ancillary), (len, false));
    }
    // The next packet is whole: the over-long one did not spill into it.
    let good = msg(kind::LOOKUP, 3, &[LookupEntry::default()]);
    assert!(send_packet(client.as_raw_fd(), &good, None).unwrap());
    let Received::Packet(got) = recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap() else { panic!() };
    assert_eq!(&buf[..got.len], good.as_slice());
    assert!(matches!(recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap(), Received::Nothing));
    drop(client);
    assert!(matches!(recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap(), Received::Closed));
}

#[test]
fn descriptors_a_client_attaches_are_refused_and_never_installed() {
    let (client, broker_end) = pair();
    let mut b = broker();
    let id = b.connect(peer_of(broker_end.as_raw_fd()).unwrap(), None).unwrap();
    let good = msg::<u8>(kind::STATUS, 3, &[]);
    let before = open_fds();
    // Many descriptors attached, one packet after the other.
    for _ in 0..50 {
        assert!(send_packet(client.as_raw_fd(), &good, Some(client.as_raw_fd())).unwrap());
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    for _ in 0..50 {
        let Received::Packet(got) = recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap() else { panic!() };
        assert!(got.ancillary);
        let out = b.handle(id, &buf[..got.len], &got);
        assert_eq!(error_of(&out).0, error::BAD_MESSAGE);
    }
    // Other tests of this process open descriptors too: a leak would be 50 of them.
    assert!(open_fds() < before + 25, "{before} then {}", open_fds());
}

#[test]
fn welcome_carries_a_read_only_descriptor_of_the_domains_store() {
    let (client, broker_end) = pair();
    let mut b = broker();
    let me = peer_of(broker_end.as_raw_fd()).unwrap();
    // SAFETY: plain getters.
    assert_eq!((me.uid, me.pid), (unsafe { libc::geteuid() }, std::process::id() as i32));
    let id = b.connect(me, None).unwrap();
    let hello = msg(kind::HELLO, 42, &[hello_entry("sockets", "vm", 8)]);
    assert!(send_packet(client.as_raw_fd(), &hello, None).unwrap());
    let mut buf = vec![0u8; MAX_MESSAGE];
    let Received::Packet(got) = recv_packet(broker_end.as_raw_fd(), &mut buf).unwrap() else { panic!() };
    let out = b.handle(id, &buf[..got.len], &got);
    let reply = &out.replies[0];
    let store_fd = reply.fd.as_ref().map(|f| f.as_raw_fd());
    assert!(send_packet(broker_end.as_raw_fd(), &reply.bytes, store_fd).unwrap());
    let (bytes, fd) = recv_with_fd(client.as_raw_fd());
    let (h, body) = proto::decode(&bytes, size_of::<Welcome>()).unwrap();
    assert_eq!((h.kind, h.seq), (kind::WELCOME, 42));
    let welcome: Welcome = proto::entry(body, 0).unwrap();
    assert_eq!(proto::name_str(&welcome.domain), Some("sockets"));
    let fd = std::fs::File::from(fd.expect("a descriptor"));
    assert!(is_read_only(&fd));
    let store_ino =
        std::fs::metadata(format!("/proc/self/fd/{}", b.store("sockets").unwrap().shared.fd())).unwrap();
    assert_eq!(fd.metadata().unwrap().ino(), store_ino.ino());
    assert_eq!(fd.metadata().unwrap().mode() & 0o777, 0o444);
}
