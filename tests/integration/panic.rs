//! A panic in a samepage thread, under its seccomp filter, reports itself as a panic through
//! the real binary: one `samepage: error: panic in thread NAME: MESSAGE at FILE:LINE` line and
//! exit code 101, not a seccomp violation (std's own panic message asks the kernel for the
//! thread's id, a system call no filter allows). The panics come from fault injection
//! (`SAMEPAGE_TEST_FAULT`, `src/fault.rs`): in the virtio event loop, and in `run`'s main
//! thread once the VM has stopped.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::{finish, make_image, samepage, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(60);
/// `Exit::Panic`.
const PANIC_EXIT: i32 = 101;

/// `samepage ARGS` on the test guest reading a small read-only disk (so that the device
/// thread gets a queue notification), with fault `fault` on and no backtraces asked for.
fn run_with_fault(sub: &str, fault: &str, extra: &[&str]) -> common::Run {
    run_with_fault_and_env(sub, fault, extra, &[])
}

fn run_with_fault_and_env(sub: &str, fault: &str, extra: &[&str], env: &[(&str, &str)]) -> common::Run {
    let dir = tempdir();
    let image = dir.as_path().join("disk.img");
    make_image(&image, 64 * 1024, 71);
    let kernel = test_guest();
    let child = samepage()
        .args([sub, "--kernel", kernel.to_str().expect("path"), "--timeout", "30"])
        .arg("--disk")
        .arg(format!("{},ro", image.display()))
        .args(extra)
        .env(samepage::fault::FAULT_ENV, fault)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    let result = finish(child, LIMIT);
    println!("samepage {sub} with {fault}: exit {:?}\nstderr:\n{}", result.code, result.stderr);
    result
}

/// Asserts `stderr` is the one panic line of thread `thread` for fault `fault`.
fn assert_panic_line(stderr: &str, thread: &str, fault: &str, file: &str) {
    // Log lines before it (the test guest's write to its read-only disk) aside.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line:\n{stderr}");
    let prefix = format!("samepage: error: panic in thread {thread}: fault injection: {fault}: ");
    assert!(lines[0].starts_with(&prefix), "{:?} does not start with {prefix:?}", lines[0]);
    assert!(lines[0].contains(&format!(" at {file}:")), "{:?} names no {file} line", lines[0]);
    assert!(!stderr.contains("error: seccomp:"), "reported as a seccomp violation:\n{stderr}");
}

#[test]
fn a_panic_in_the_filtered_device_thread_is_reported_as_a_panic() {
    let result = run_with_fault("run", "panic-virtio", &["--serial", "none"]);
    assert_eq!(result.code, Some(PANIC_EXIT), "{}", result.stderr);
    assert_panic_line(&result.stderr, "virtio", "panic-virtio", "src/devices/virtio_mmio.rs");
}

#[test]
fn a_panic_in_runs_filtered_main_thread_is_reported_as_a_panic() {
    let result = run_with_fault("run", "panic-vmm", &["--serial", "none"]);
    assert_eq!(result.code, Some(PANIC_EXIT), "{}", result.stderr);
    assert_panic_line(&result.stderr, "main", "panic-vmm", "src/vmm.rs");
}

#[test]
fn without_filters_a_panic_is_reported_the_same_way() {
    let result = run_with_fault("run", "panic-virtio", &["--serial", "none", "--seccomp", "off"]);
    assert_eq!(result.code, Some(PANIC_EXIT), "{}", result.stderr);
    assert_panic_line(&result.stderr, "virtio", "panic-virtio", "src/devices/virtio_mmio.rs");
    // Where nothing is filtered a backtrace can be read, and RUST_BACKTRACE asks for one.
    let result = run_with_fault_and_env(
        "run",
        "panic-virtio",
        &["--serial", "none", "--seccomp", "off"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_eq!(result.code, Some(PANIC_EXIT), "{}", result.stderr);
    assert!(result.stderr.contains("samepage::fault::panic"), "no backtrace:\n{}", result.stderr);
}

#[test]
fn density_names_a_vm_process_that_panicked() {
    let result = run_with_fault("density", "panic-virtio", &["--vms", "1"]);
    println!("{}", result.stdout);
    assert_eq!(result.code, Some(1), "{}", result.stderr);
    let vm0 = result.stdout.lines().find(|l| l.trim_start().starts_with("vm0:")).unwrap_or_default();
    assert!(
        vm0.contains(&format!("exited with {PANIC_EXIT}"))
            && vm0.contains("samepage: error: panic in thread virtio: fault injection: panic-virtio"),
        "{vm0}"
    );
}

#[test]
fn boot_test_reports_a_panic_as_a_panic() {
    let dir = tempdir();
    let initrd = dir.as_path().join("initrd.img");
    make_image(&initrd, 4096, 72);
    let result = run_with_fault("boot-test", "panic-virtio", &["--initrd", initrd.to_str().expect("path")]);
    assert_eq!(result.code, Some(PANIC_EXIT), "{}", result.stderr);
    assert_panic_line(&result.stderr, "virtio", "panic-virtio", "src/devices/virtio_mmio.rs");
}
