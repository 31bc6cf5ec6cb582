//! The filters compile, and a filtered thread is stopped by what its filter forbids: each in a
//! child process (a filter cannot be taken back, and a violation ends the process).

use super::*;

const KINDS: [ThreadKind; 10] = [
    ThreadKind::Vcpu,
    ThreadKind::Virtio,
    ThreadKind::VirtioVsock,
    ThreadKind::Signals,
    ThreadKind::Stdin,
    ThreadKind::Vmm,
    ThreadKind::Density,
    ThreadKind::Dedupd,
    ThreadKind::BalloonControl,
    ThreadKind::Api,
];

#[test]
fn every_kind_compiles() {
    for kind in KINDS {
        let program = filters::compile(kind).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        assert!(
            !program.is_empty() && program.len() < 4096,
            "{}: {} instructions",
            kind.name(),
            program.len()
        );
    }
}

/// The threads that run next to guest code or read guest input are allowed the least: a vCPU
/// and the stop-signal and standard-input threads less than the device thread, which is
/// allowed less than the VMM's main thread; only a VM with a vsock device gets the device
/// thread that also handles host sockets. Prints each filter's size.
#[test]
fn guest_facing_threads_are_allowed_the_least() {
    for kind in KINDS {
        eprintln!("seccomp filter {}: {} syscalls allowed", kind.name(), filters::allowed_count(kind));
    }
    let count = filters::allowed_count;
    for small in [
        ThreadKind::Vcpu,
        ThreadKind::Signals,
        ThreadKind::Stdin,
        ThreadKind::BalloonControl,
        ThreadKind::Api,
    ] {
        assert!(count(small) < count(ThreadKind::Virtio), "{} allows as much as virtio", small.name());
    }
    assert!(count(ThreadKind::Virtio) < count(ThreadKind::Vmm));
    assert!(count(ThreadKind::Virtio) < count(ThreadKind::VirtioVsock));
}
