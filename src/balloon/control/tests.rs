//! The control socket against hostile clients: malformed, cut, over-long and ancillary
//! requests, targets out of range, clients that never read or never speak, and socket files
//! that are stale, live or not sockets.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use samepage_virtio::balloon::{Balloon, BalloonBackend, Discard, GuestRange};
use samepage_virtio::EventFdInterrupt;

use super::*;
use crate::balloon::wire::{decode_reply, encode_request, MAX_REPLY};
use crate::balloon::{client, BalloonOptions};

struct NoBackend;

impl BalloonBackend for NoBackend {
    fn discard(&mut self, _: &[GuestRange], _: Discard) {}
    fn reclaim(&mut self, _: &[GuestRange]) {}
}

const RAM: u64 = 64 << 20;

fn balloon() -> (VmBalloon, Balloon) {
    let interrupt = Arc::new(EventFdInterrupt::new().unwrap());
    let options = BalloonOptions::default();
    let device = Balloon::new(options.device_config(), Box::new(NoBackend), interrupt);
    let host = Arc::new(HostCounters::default());
    (VmBalloon::new(device.handle(), options, RAM, host), device)
}

fn ask(balloon: &VmBalloon, text: &[u8]) -> Reply {
    answer(balloon, text, text.len(), false)
}

#[test]
fn targets_within_guest_ram_are_set_and_others_refused() {
    let (b, _device) = balloon();
    let reply = ask(&b, br#"{"op":"status"}"#);
    assert_eq!(reply.error, None);
    let figures = reply.balloon.unwrap();
    assert_eq!((figures.target_bytes, figures.guest_ram_bytes), (0, RAM));
    assert_eq!(figures.options, "free-page-reporting=on,stats=0,deflate-on-oom=off");

    let reply = ask(&b, br#"{"op":"set_target","bytes":16777216}"#);
    assert_eq!(reply.error, None);
    assert_eq!(reply.balloon.unwrap().target_bytes, 16 << 20);
    for (bad, why) in [
        (format!(r#"{{"op":"set_target","bytes":{}}}"#, RAM + 4096), "more than the guest's"),
        (r#"{"op":"set_target","bytes":4097}"#.to_string(), "not a whole number of 4 KiB pages"),
        (r#"{"op":"set_target","bytes":18446744073709547520}"#.to_string(), "more than the guest's"),
        (r#"{"op":"set_target","bytes":-4096}"#.to_string(), "malformed request"),
        (r#"{"op":"deflate_everything"}"#.to_string(), "malformed request"),
    ] {
        let reply = ask(&b, bad.as_bytes());
        let error = reply.error.unwrap_or_default();
        assert!(error.contains(why), "{bad}: {error}");
        assert_eq!(reply.balloon.unwrap().target_bytes, 16 << 20, "{bad} changed the target");
    }
    assert!(ask(&b, format!(r#"{{"op":"set_target","bytes":{RAM}}}"#).as_bytes()).error.is_none());
    assert!(ask(&b, br#"{"op":"set_target","bytes":0}"#).error.is_none());
    let host = b.metrics().host;
    assert_eq!((host.control_requests, host.control_rejected, host.target_changes), (9, 5, 3), "{host:?}");
}

#[test]
fn cut_long_empty_and_ancillary_requests_are_refused() {
    let (b, _device) = balloon();
    let status = br#"{"op":"status"}"#;
    assert!(answer(&b, status, 4096, false).error.unwrap().contains("longer than"));
    assert!(answer(&b, status, status.len(), true).error.unwrap().contains("ancillary"));
    assert!(answer(&b, b"", 0, false).error.unwrap().contains("empty"));
    assert!(answer(&b, &status[..7], 7, false).error.unwrap().contains("malformed"));
    assert_eq!(b.metrics().host.control_rejected, 4);
}

fn socket_path(dir: &vmm_sys_util::tempdir::TempDir, name: &str) -> PathBuf {
    dir.as_path().join(name)
}

/// Serves `socket` on a plain thread (the VMM's runs under its seccomp filter, which the
/// integration tests exercise).
fn serve_in_thread(socket: ControlSocket, balloon: VmBalloon) -> (EventFd, JoinHandle<()>) {
    let stop = EventFd::new(EFD_NONBLOCK).unwrap();
    let stop_fd = stop.try_clone().unwrap();
    let thread = std::thread::spawn(move || serve(&socket, &balloon, &stop_fd));
    (stop, thread)
}

#[test]
fn the_socket_answers_clients_one_after_another_and_survives_bad_ones() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/samepage-balloon-").unwrap();
    let path = socket_path(&dir, "b.sock");
    let socket = ControlSocket::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the owner may set the target");
    let (b, _device) = balloon();
    let (stop, thread) = serve_in_thread(socket, b.clone());

    // A client that sends an over-long packet, then a good one, on one connection.
    let c = seqpacket::connect(&path, Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; MAX_REPLY];
    assert!(seqpacket::send(c.as_raw_fd(), &[b'{'; 4000], None, true).unwrap());
    let Received::Packet(p) = seqpacket::recv(c.as_raw_fd(), &mut buf, false, true).unwrap() else {
        panic!()
    };
    assert!(decode_reply(&buf[..p.len]).unwrap().error.unwrap().contains("longer than"));
    let req = encode_request(&Request::SetTarget { bytes: 8 << 20 });
    assert!(seqpacket::send(c.as_raw_fd(), &req, None, true).unwrap());
    let Received::Packet(p) = seqpacket::recv(c.as_raw_fd(), &mut buf, false, true).unwrap() else {
        panic!()
    };
    assert_eq!(decode_reply(&buf[..p.len]).unwrap().balloon.unwrap().target_bytes, 8 << 20);
    // A descriptor is refused, not taken.
    let file = std::fs::File::open("/dev/null").unwrap();
    assert!(seqpacket::send(c.as_raw_fd(), &req, Some(file.as_raw_fd()), true).unwrap());
    let Received::Packet(p) = seqpacket::recv(c.as_raw_fd(), &mut buf, false, true).unwrap() else {
        panic!()
    };
    assert!(decode_reply(&buf[..p.len]).unwrap().error.unwrap().contains("ancillary"));
    drop(c);

    // A client that sends requests but never reads: it is dropped once its buffer fills,
    // and the next client is served.
    let greedy = seqpacket::connect(&path, Some(Duration::from_secs(5))).unwrap();
    let status = encode_request(&Request::Status {});
    let mut sent = 0;
    while sent < 100_000 && matches!(seqpacket::send(greedy.as_raw_fd(), &status, None, false), Ok(true)) {
        sent += 1;
    }
    let reply = client::request(&path, &Request::Status {}).unwrap();
    assert_eq!(reply.balloon.unwrap().target_bytes, 8 << 20);
    drop(greedy);

    // A client that connects and says nothing holds the socket for CLIENT_IDLE at most.
    let silent = seqpacket::connect(&path, Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let reply = client::request(&path, &Request::SetTarget { bytes: 0 }).unwrap();
    assert!(reply.error.is_none());
    assert!(t.elapsed() < CLIENT_IDLE + Duration::from_secs(3), "{:?}", t.elapsed());
    drop(silent);
    println!("answered after a silent client in {:?}; {:?}", t.elapsed(), b.metrics().host);

    stop.write(1).unwrap();
    thread.join().unwrap();
}

#[test]
fn stale_sockets_are_taken_over_and_live_ones_and_other_files_are_not() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/samepage-balloon-").unwrap();
    let path = socket_path(&dir, "b.sock");
    let live = ControlSocket::bind(&path).unwrap();
    assert!(matches!(ControlSocket::bind(&path), Err(ControlError::InUse(_))));
    drop(live);
    assert!(!path.exists(), "a socket nobody serves is removed");
    // Closed without removing its file, as a VMM that died leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let again = ControlSocket::bind(&path).unwrap();
    drop(again);

    let file = socket_path(&dir, "file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(ControlSocket::bind(&file), Err(ControlError::NotASocket(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let long = dir.as_path().join("x".repeat(200));
    assert!(matches!(ControlSocket::bind(&long), Err(ControlError::Path(_))));
    assert!(matches!(ControlSocket::bind(Path::new("")), Err(ControlError::Path(_))));
}
