//! virtio-net end to end: the networking Linux guest (`target/guest-net/vmlinux`) on a tap in
//! a network namespace this test makes (only its loopback and the tap: no traffic leaves it),
//! configures its interface with busybox `ip` and exchanges data over TCP both ways with the
//! test, which listens on the tap's address: the guest sends 1 MiB to the host and the host
//! 256 KiB to the guest, each end checking count and hash (`socket_peer.c`).
//!
//! A second test gives the tap through Firecracker's configuration file (`network-interfaces`)
//! to the test guest, which only boots and exits.
//!
//! Needs root (a network namespace, a tap); as another user it says why it is skipped.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::peer::{build_peer, expected_answer, figure, pattern, receive_and_answer, Finished, GuestRun};
use common::{finish, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(600);
const TAP: &str = "sp-tap0";
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
const GUEST_MAC: &str = "06:00:0a:00:02:02";
/// What the guest sends the host, and the host the guest.
const UP_BYTES: usize = 1 << 20;
const DOWN_BYTES: usize = 256 << 10;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Reads the guest's connection to its end at full speed, answers the count and hash.
fn receive_and_answer_tcp(mut s: TcpStream) -> (usize, u64) {
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    receive_and_answer(&mut s, 64 << 10, Duration::ZERO)
}

/// Puts this thread in a network namespace of its own (threads it starts and processes it
/// runs are in it too; the rest of the host's network is not) with its loopback and tap `tap`
/// at `HOST_IP`; false (and why, on its own line) when not root.
fn namespace_with_tap(tap: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: a network namespace and a tap need root, and this test runs as another user");
        return false;
    }
    // SAFETY: unshare with CLONE_NEWNET changes only this thread's network namespace.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "unshare: {}", std::io::Error::last_os_error());
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
    ip(&["link", "set", tap, "up"]);
    true
}

#[test]
fn a_linux_guest_on_a_tap_exchanges_data_with_a_server_in_a_network_namespace() {
    let dir = tempdir();
    let peer = build_peer(dir.as_path());
    if !namespace_with_tap(TAP) {
        return;
    }
    let listener = TcpListener::bind((HOST_IP, 7000)).expect("listen on the tap's address");
    let server = std::thread::spawn(move || {
        receive_and_answer_tcp(listener.accept().expect("the guest's connection").0)
    });

    let script = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || exit 5; \
         cat /sys/class/net/eth0/address; \
         /opt/socket_peer tcp-serve 7001 1 0 & \
         /opt/socket_peer tcp-connect {HOST_IP} 7000 {UP_BYTES}; wait; echo net-test-done"
    );
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let guest = GuestRun::start(&peer, &script, &["--net", &net]);
    let listening = guest.wait_for("serve: listening on 7001", LIMIT);
    println!("guest listening after {:.1} s", listening.as_secs_f64());

    // Down: the host sends to the guest's server.
    let mut s = TcpStream::connect((GUEST_IP, 7001)).expect("connect to the guest");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    for chunk in pattern(0, DOWN_BYTES).chunks(16 << 10) {
        s.write_all(chunk).expect("send to the guest");
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("the guest's answer");
    assert_eq!(answer.trim_end(), expected_answer(DOWN_BYTES), "the host's bytes reached the guest changed");

    let (got, hash) = server.join().expect("server");
    let Finished { status, console, stderr } = guest.finish();
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("serve:") || l.starts_with("connect:") || l.contains(':') && l.len() == 17)
        .collect();
    println!("{}", lines.join("\n"));
    println!("host: received {got} bytes (hash {hash:016x}) from the guest; the guest answered {answer:?}");
    assert!(status.success(), "boot-test: {status}\nconsole:\n{console}\nstderr:\n{stderr}");
    assert!(
        console.lines().any(|l| l.trim() == GUEST_MAC),
        "the guest's MAC is not the one given:\n{console}"
    );
    assert_eq!(format!("got {got} {hash:016x}"), expected_answer(UP_BYTES), "the guest's bytes changed");
    assert!(
        console.contains(&format!("connect: sent {UP_BYTES} "))
            && console.contains(&expected_answer(UP_BYTES)),
        "the guest never heard the host's answer:\n{console}"
    );
    assert!(console.contains("net-test-done"), "{console}");
    let counters =
        stderr.lines().find(|l| l.contains(": net 0: ")).unwrap_or_else(|| panic!("no counters:\n{stderr}"));
    println!("device: {}", &counters[counters.find("net 0: ").unwrap_or(0)..]);
    let sent_bytes = figure(counters, " bytes) sent");
    let received_bytes = figure(counters, " bytes) received");
    assert!(sent_bytes >= UP_BYTES as u64, "{counters}");
    assert!(received_bytes >= DOWN_BYTES as u64, "{counters}");
    for refusal in [" bad transmit chains", " bad receive chains", " backend errors"] {
        assert_eq!(figure(counters, refusal), 0, "{counters}");
    }
}

#[test]
fn a_firecracker_configuration_gives_its_network_interface_to_the_guest() {
    if !namespace_with_tap(TAP) {
        return;
    }
    let dir = tempdir();
    let config = dir.as_path().join("vm.json");
    let file = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": "testguest.mode=exit=7"},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}]
    });
    std::fs::write(&config, serde_json::to_vec(&file).expect("json")).expect("config");
    let link = dir.as_path().join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_samepage"), &link).expect("link");
    let child = Command::new(&link)
        .env("RUST_LOG", "warn,samepage::vm_build=info")
        .args(["--no-api", "--config-file", config.to_str().expect("path")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start firecracker");
    let run = finish(child, LIMIT);
    run.assert_no_panic();
    let attached = run.stderr.lines().find(|l| l.contains("net: tap ")).unwrap_or_default();
    println!("firecracker --config-file with network-interfaces: exit {:?}; {attached}", run.code);
    assert_eq!(run.code, Some(7), "{}", run.stderr);
    assert!(attached.ends_with(&format!("net: tap {TAP}, guest MAC {GUEST_MAC}")), "{}", run.stderr);
}
