//! virtio-vsock end to end with a Linux guest (the project's kernel with networking,
//! `target/guest-net/vmlinux`) and Firecracker's host side (docs/vsock.md): `boot-test --vsock`
//! runs the guest program `resources/guest/programs/socket_peer.c` (built here with the host's
//! gcc, added with `--include-binary`) while the test is the host:
//!
//! - host to guest: eight host clients at once write `CONNECT 5000`, get `OK <port>`, send
//!   16 KiB each and read the guest's count and hash of what it got; one more sends 512 KiB to
//!   a guest that reads slowly (1 ms after every 4 KiB), which only the guest's credit lets
//!   through without loss; one vanishes after 8 KiB, and the guest serves the next;
//! - guest to host: the guest sends 1 MiB to a host listener on `<uds>_6000` that reads
//!   slowly (its socket fills, the device holds at most its credit, the guest waits for
//!   credit updates) and answers the count and hash; a connection to port 6001, where nobody
//!   listens, is refused.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::peer::{build_peer, expected_answer, figure, pattern, receive_and_answer, Finished, GuestRun};
use common::tempdir;

/// How long the whole guest run may take (the guest kernel is emulated on some hosts).
const LIMIT: Duration = Duration::from_secs(600);
/// Host clients sending 16 KiB each, at once.
const CLIENTS: usize = 8;
const CLIENT_BYTES: usize = 16 << 10;
/// The client whose guest reader is slow.
const BIG_BYTES: usize = 512 << 10;
/// What the vanishing client sends before it goes.
const VANISHING_BYTES: usize = 8 << 10;
/// What the guest sends the slow host reader.
const GUEST_BYTES: usize = 1 << 20;

/// A host client of the device: `CONNECT 5000`, then `bytes` of the pattern, then (unless it
/// vanishes) the guest's answer. Returns (the `OK` line, the answer).
fn host_client(uds: &Path, bytes: usize, vanish: bool) -> (String, String) {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    s.write_all(b"CONNECT 5000\n").expect("CONNECT");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("OK line");
    for chunk in pattern(0, bytes).chunks(4096) {
        s.write_all(chunk).expect("send to the guest");
    }
    if vanish {
        return (ok.trim_end().to_string(), String::new());
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    reader.read_to_string(&mut answer).expect("the guest's answer");
    (ok.trim_end().to_string(), answer.trim_end().to_string())
}

/// The host listener on port 6000: reads one connection slowly to its end (4 KiB, then
/// 10 ms: slower than even an emulated guest kernel sends), answers the count and hash.
/// Returns (bytes, hash, seconds it took).
fn slow_host_reader(listener: UnixListener) -> (usize, u64, f64) {
    let (mut s, _) = listener.accept().expect("the guest's connection");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    let start = Instant::now();
    let (total, h) = receive_and_answer(&mut s, 4 << 10, Duration::from_millis(10));
    (total, h, start.elapsed().as_secs_f64())
}

#[test]
fn a_linux_guest_and_host_processes_talk_over_vsock_both_ways() {
    let dir = tempdir();
    let dir = dir.as_path();
    let peer = build_peer(dir);
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_6000")).expect("host listener");
    let reader = std::thread::spawn(move || slow_host_reader(listener));

    let count = CLIENTS + 2;
    let script = format!(
        "/opt/socket_peer connect 6001 16; echo \"refused: exit $?\"; \
         /opt/socket_peer serve 5000 {count} 1000 & \
         /opt/socket_peer connect 6000 {GUEST_BYTES}; wait; echo vsock-test-done"
    );
    let vsock = format!("cid=3,uds={}", uds.display());
    let guest = GuestRun::start(&peer, &script, &["--vsock", &vsock]);
    let booted = guest.wait_for("serve: listening on 5000", LIMIT);
    println!("guest listening after {:.1} s", booted.as_secs_f64());

    // Eight at once, then the big one to the slow guest reader, then one that vanishes.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let uds = uds.clone();
            std::thread::spawn(move || host_client(&uds, CLIENT_BYTES, false))
        })
        .collect();
    let mut oks = Vec::new();
    for client in clients {
        let (ok, answer) = client.join().expect("client");
        assert_eq!(answer, expected_answer(CLIENT_BYTES), "a host client's bytes reached the guest changed");
        oks.push(ok);
    }
    let (ok, answer) = host_client(&uds, BIG_BYTES, false);
    assert_eq!(answer, expected_answer(BIG_BYTES), "512 KiB to a slow guest reader");
    oks.push(ok);
    let (ok, _) = host_client(&uds, VANISHING_BYTES, true);
    oks.push(ok);
    for ok in &oks {
        assert!(ok.starts_with("OK ") && ok[3..].parse::<u32>().is_ok(), "not Firecracker's OK line: {ok:?}");
    }
    let mut ports: Vec<&String> = oks.iter().collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), oks.len(), "two host connections got one host port: {oks:?}");

    let (got, hash, secs) = reader.join().expect("host reader");
    let Finished { status, console, stderr } = guest.finish();
    let vsock_lines: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("serve:") || l.starts_with("connect:") || l.starts_with("refused"))
        .collect();
    println!("{}", vsock_lines.join("\n"));
    println!(
        "host: {CLIENTS} clients x {CLIENT_BYTES} bytes and {BIG_BYTES} to the slow guest reader answered \
         intact; the guest's {got} bytes read slowly in {secs:.2} s (hash {hash:016x}); OK lines {oks:?}"
    );
    assert!(status.success(), "boot-test: {status}\nconsole:\n{console}\nstderr:\n{stderr}");
    assert_eq!(got, GUEST_BYTES);
    assert_eq!(format!("got {got} {hash:016x}"), expected_answer(GUEST_BYTES), "the guest's bytes changed");
    assert!(
        console.contains(&format!("connect: sent {GUEST_BYTES} "))
            && console.contains(&expected_answer(GUEST_BYTES)),
        "the guest never heard the host's answer:\n{console}"
    );
    assert!(console.contains("connect: port 6001 refused"), "{console}");
    assert!(console.contains("refused: exit 3"), "{console}");
    let served = console.lines().filter(|l| l.starts_with("serve: connection ")).count();
    assert_eq!(served, count, "the guest served {served} of {count} connections:\n{console}");
    assert!(
        console.contains(&format!("got {VANISHING_BYTES} ")),
        "the vanishing client's bytes did not reach the guest:\n{console}"
    );
    assert!(console.contains("vsock-test-done"), "{console}");
    // The device's side: the connections, every byte, and the slow host reader held to the
    // credit (the guest had to wait for credit updates: 1 MiB is more than the credit and
    // the host socket's buffer together).
    let counters = stderr
        .lines()
        .find(|l| l.contains(" connections from host clients"))
        .unwrap_or_else(|| panic!("no counters:\n{stderr}"));
    println!("device: {}", &counters[counters.find("vsock: ").unwrap_or(0)..]);
    let figure = |after: &str| figure(counters, after);
    assert_eq!(figure(" connections from host clients"), count as u64);
    assert_eq!(figure(" from the guest"), 1);
    assert_eq!(figure(" refused"), 1);
    assert_eq!(figure(" credit violations"), 0);
    assert_eq!(figure(" bad packets"), 0);
    // The host clients' bytes, and the slow reader's answer line.
    let to_guest =
        CLIENTS * CLIENT_BYTES + BIG_BYTES + VANISHING_BYTES + expected_answer(GUEST_BYTES).len() + 1;
    assert_eq!(figure(" to the guest"), to_guest as u64, "every host byte reached the guest once");
    assert!(figure(" bytes to the host") >= GUEST_BYTES as u64);
    let held = figure(" bytes held");
    assert!(held > 0 && held <= 256 << 10, "held {held} bytes for the slow host reader");
}
