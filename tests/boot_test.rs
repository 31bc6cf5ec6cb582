//! `samepage boot-test` through the real binary: the command's exit status, kernel failures on
//! the console, KTAP results, timeouts and bad kernels.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{artifact, tempdir, test_guest};

/// A Linux boot-test round trip is ~25 s on hosts whose KVM emulates guest kernel code.
const LIMIT: Duration = Duration::from_secs(400);

fn vmlinux() -> PathBuf {
    artifact("target/guest/vmlinux", "resources/guest/build.sh")
}

fn boot_test(kernel: &std::path::Path, extra: &[&str]) -> common::Run {
    let cache = common::repo().join("target/boot-test-cache");
    let mut cmd = common::samepage();
    cmd.env("SAMEPAGE_CACHE_DIR", &cache);
    let mut args = vec!["boot-test", "--kernel", kernel.to_str().expect("path")];
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout", "360"]);
    }
    args.extend_from_slice(extra);
    let child = cmd
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start samepage");
    let result = common::finish(child, LIMIT);
    result.assert_no_panic();
    for line in result.stderr.lines().filter(|l| l.contains("boot-test") || l.starts_with("    ")) {
        println!("{line}");
    }
    result
}

#[test]
fn exec_prints_output_and_returns_the_command_status() {
    let result = boot_test(&vmlinux(), &["--exec", "uname -r; exit 3"]);
    assert_eq!(result.code, Some(3), "stderr: {}", result.stderr);
    assert!(result.stdout.lines().any(|l| l.starts_with("6.12")), "no kernel release in:\n{}", result.stdout);
    assert!(result.stderr.contains("verdict: command exited with status 3"), "{}", result.stderr);
}

#[test]
fn exec_true_exits_zero_and_writes_the_log() {
    let dir = tempdir();
    let log = dir.as_path().join("console.log");
    let result = boot_test(&vmlinux(), &["--exec", "true", "--log", log.to_str().expect("path")]);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("Linux version 6.12"), "log lacks the kernel banner");
    assert!(logged.contains("samepage-boot-test: command exited with status 0"));
}

#[test]
fn ktap_failures_fail_the_run_and_are_summarised() {
    let script = "echo 'KTAP version 1'; echo '1..3'; echo 'ok 1 first'; echo 'not ok 2 second'; echo 'ok 3 third # SKIP not here'";
    // The guest kernel runs its own KUnit suites at boot; keep them out of this count.
    let result = boot_test(&vmlinux(), &["--exec", script, "--cmdline", "kunit.enable=0"]);
    assert!(result.stderr.contains("KTAP: 1 passed, 1 failed, 1 skipped"), "{}", result.stderr);
    assert_eq!(result.code, Some(1), "stderr: {}", result.stderr);
}

#[test]
fn a_guest_that_never_finishes_times_out_with_its_last_lines() {
    let result = boot_test(&test_guest(), &["--cmdline", "testguest.mode=spin", "--timeout", "3"]);
    assert_eq!(result.code, Some(124), "stderr: {}", result.stderr);
    assert!(result.stderr.contains("no verdict within 3 s"), "{}", result.stderr);
    assert!(result.stderr.contains("spin: looping forever"), "last lines missing: {}", result.stderr);
}

#[test]
fn expect_stops_the_run_with_success() {
    let result = boot_test(
        &test_guest(),
        &["--cmdline", "testguest.mode=spin", "--timeout", "30", "--expect", "^spin: looping"],
    );
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
}

#[test]
fn missing_or_corrupt_kernels_fail_clearly() {
    let result = boot_test(std::path::Path::new("/nonexistent/vmlinux"), &["--exec", "true"]);
    assert_eq!(result.code, Some(125));
    assert!(result.stderr.contains("cannot open kernel /nonexistent/vmlinux"), "{}", result.stderr);
    let dir = tempdir();
    let corrupt = dir.as_path().join("vmlinux");
    let mut bytes = std::fs::read(vmlinux()).expect("read vmlinux");
    bytes.truncate(4096);
    bytes[..4].copy_from_slice(b"\x7fELG");
    std::fs::write(&corrupt, bytes).expect("write");
    let result = boot_test(&corrupt, &["--exec", "true"]);
    assert_eq!(result.code, Some(125));
    assert!(result.stderr.contains("is not a kernel samepage can boot"), "{}", result.stderr);
}

#[test]
fn the_guest_kernels_own_kunit_tests_pass_through_boot_test() {
    let result = boot_test(&vmlinux(), &["--exec", "true"]);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    assert!(
        result.stdout.contains("# Subtest: blake3_page"),
        "no KUnit suite on the console:\n{}",
        result.stdout
    );
    assert!(result.stderr.contains("KTAP: 4 passed, 0 failed, 0 skipped"), "{}", result.stderr);
}

#[test]
fn kconfig_prints_a_fragment_the_project_guest_is_built_with() {
    let out = common::samepage().arg("kconfig").output().expect("run samepage kconfig");
    assert!(out.status.success());
    let fragment = String::from_utf8_lossy(&out.stdout);
    let built = std::fs::read_to_string(artifact("target/guest/vmlinux.config", "resources/guest/build.sh"))
        .expect("read built config");
    let wanted: Vec<&str> = fragment.lines().filter(|l| l.starts_with("CONFIG_")).collect();
    assert!(
        wanted.contains(&"CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y")
            && wanted.contains(&"CONFIG_SERIAL_8250_CONSOLE=y")
    );
    for line in wanted {
        assert!(built.lines().any(|b| b == line), "{line} is not in the guest's built config");
    }
}

/// The guest kernel plus resources/guest/test-patches/0001-samepage-selftest-deliberate-failure.patch:
/// `samepage_selftest=warn|panic|oops` makes it fail on purpose.
fn broken_vmlinux() -> PathBuf {
    artifact("target/guest-broken/vmlinux", "resources/guest/build-test-kernels.sh")
}

#[test]
fn a_kernel_warning_fails_the_run_with_the_warning() {
    let result = boot_test(&broken_vmlinux(), &["--cmdline", "samepage_selftest=warn", "--exec", "true"]);
    assert_eq!(result.code, Some(255), "stderr: {}", result.stderr);
    assert!(result.stderr.contains("samepage selftest: deliberate warning"), "{}", result.stderr);
    assert!(
        result.stderr.lines().any(|l| l.contains("WARNING: CPU: 0 PID: 1 at lib/samepage_selftest.c:")),
        "no WARNING line in: {}",
        result.stderr
    );
    assert!(result.stderr.contains("verdict: WARNING (exit 255)"), "{}", result.stderr);
}

#[test]
fn a_kernel_panic_fails_the_run_with_the_panic_message() {
    let result = boot_test(&broken_vmlinux(), &["--cmdline", "samepage_selftest=panic", "--exec", "true"]);
    assert_eq!(result.code, Some(255), "stderr: {}", result.stderr);
    assert!(
        result.stderr.contains("Kernel panic - not syncing: samepage selftest: deliberate panic"),
        "{}",
        result.stderr
    );
    assert!(result.stderr.contains("verdict: kernel panic (exit 255)"), "{}", result.stderr);
}

#[test]
fn an_oops_fails_the_run_with_the_oops() {
    let result = boot_test(&broken_vmlinux(), &["--cmdline", "samepage_selftest=oops", "--exec", "true"]);
    assert_eq!(result.code, Some(255), "stderr: {}", result.stderr);
    assert!(result.stderr.contains("BUG: kernel NULL pointer dereference"), "{}", result.stderr);
    assert!(result.stderr.contains("Oops: 0000 [#1]"), "{}", result.stderr);
    assert!(
        result.stderr.contains("Kernel panic - not syncing: Attempted to kill init!"),
        "{}",
        result.stderr
    );
}

#[test]
fn the_selftest_patch_alone_is_harmless() {
    let result = boot_test(&broken_vmlinux(), &["--exec", "true"]);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    assert!(result.stderr.contains("verdict: command exited with status 0"), "{}", result.stderr);
}
