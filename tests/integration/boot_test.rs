//! `samepage boot-test` through the real binary: the command's exit status, kernel failures on
//! the console, KTAP results, timeouts and bad kernels.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// `kunit.py parse` (tools/testing/kunit in the guest kernel's source tree) on a console log:
/// its "Testing complete." summary and the suites it reports as failed or crashed.
fn kunit_py_parse(log: &Path) -> (String, Vec<String>) {
    let kunit_py =
        artifact("target/guest/linux-src/tools/testing/kunit/kunit.py", "resources/guest/build.sh");
    let out =
        Command::new("python3").arg(&kunit_py).arg("parse").arg(log).output().expect("run python3 kunit.py");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .find_map(|l| l.split_once("Testing complete. ").map(|(_, s)| s.trim().to_string()))
        .unwrap_or_else(|| panic!("no summary from kunit.py parse:\n{text}"));
    // Suite footers: "====== [FAILED] name ======".
    let failed = text
        .lines()
        .filter(|l| l.contains("====="))
        .filter_map(|l| l.split_once("[FAILED] ").or_else(|| l.split_once("[CRASHED] ")))
        .map(|(_, rest)| rest.trim_end_matches(['=', ' ']).to_string())
        .collect();
    (summary, failed)
}

/// boot-test's KTAP summary line and the suites it names as not ok.
fn boot_test_ktap(stderr: &str) -> (String, Vec<String>) {
    let summary = stderr
        .lines()
        .find_map(|l| l.strip_prefix("samepage boot-test: KTAP: Ran "))
        .map(|rest| format!("Ran {rest}"))
        .unwrap_or_else(|| panic!("no KTAP summary in:\n{stderr}"));
    let failed = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("samepage boot-test: KTAP: not ok: "))
        .filter_map(|rest| rest.split_once(": ").map(|(name, _)| name.to_string()))
        .collect();
    (summary, failed)
}

#[test]
fn ktap_failures_fail_the_run_and_agree_with_kunit_py() {
    let script =
        "printf '%s\\n' 'KTAP version 1' '1..2' '    KTAP version 1' '    # Subtest: alpha' '    1..3' \
        '    ok 1 first' '    not ok 2 second' '    ok 3 third # SKIP not here' 'not ok 1 alpha' 'ok 2 beta'";
    let dir = tempdir();
    let log = dir.as_path().join("console.log");
    // The guest kernel runs its own KUnit suites at boot; keep them out of this count.
    let result = boot_test(
        &vmlinux(),
        &["--exec", script, "--cmdline", "kunit.enable=0", "--log", log.to_str().expect("path")],
    );
    let (ours, our_failed) = boot_test_ktap(&result.stderr);
    let (reference, reference_failed) = kunit_py_parse(&log);
    println!("boot-test:      {ours}; not ok: {our_failed:?}");
    println!("kunit.py parse: {reference}; failed: {reference_failed:?}");
    assert_eq!(ours, reference);
    assert_eq!(our_failed, reference_failed);
    assert_eq!(ours, "Ran 4 tests: passed: 2, failed: 1, skipped: 1", "the script's own results");
    assert!(
        result
            .stderr
            .contains("KTAP: not ok: alpha: Ran 3 tests: passed: 1, failed: 1, skipped: 1 (alpha.second)"),
        "{}",
        result.stderr
    );
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

/// One boot of the guest kernel with `--exec true` (a Linux boot is minutes beside the other
/// tests here): the exit status, the log file, and the kernel's own KUnit suites at boot.
#[test]
fn exec_true_exits_zero_writes_the_log_and_the_guest_kernels_own_kunit_tests_pass() {
    let dir = tempdir();
    let log = dir.as_path().join("console.log");
    let result = boot_test(&vmlinux(), &["--exec", "true", "--log", log.to_str().expect("path")]);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("Linux version 6.12"), "log lacks the kernel banner");
    assert!(logged.contains("samepage-boot-test: command exited with status 0"));
    assert!(
        result.stdout.contains("# Subtest: blake3_page"),
        "no KUnit suite on the console:\n{}",
        result.stdout
    );
    assert!(result.stderr.contains("KTAP: Ran 4 tests: passed: 4"), "{}", result.stderr);
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

/// The guest kernel plus resources/guest/test-configs/kunit.config: KUnit's own self-tests and
/// examples run at boot, kunit_fault among them (a NULL dereference KUnit catches on purpose).
fn kunit_vmlinux() -> PathBuf {
    artifact("target/guest-kunit/vmlinux", "resources/guest/build-test-kernels.sh")
}

#[test]
fn kunit_self_tests_pass_and_the_counts_agree_with_kunit_py() {
    let dir = tempdir();
    let log = dir.as_path().join("console.log");
    let started = Instant::now();
    let result = boot_test(&kunit_vmlinux(), &["--exec", "true", "--log", log.to_str().expect("path")]);
    println!("boot + KUnit run: {:.1} s", started.elapsed().as_secs_f64());
    let (ours, our_failed) = boot_test_ktap(&result.stderr);
    let (reference, reference_failed) = kunit_py_parse(&log);
    println!("boot-test:      {ours}");
    println!("kunit.py parse: {reference}");
    assert_eq!(ours, reference);
    assert_eq!(our_failed, reference_failed);
    // KUnit's fault test oopsed in its own thread, and boot-test said so...
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("# Subtest: kunit_fault") && logged.contains("Comm: kunit_try_catch"),
        "no KUnit fault test on the console"
    );
    assert!(
        result.stderr.contains("oops caught by KUnit (1 in its test thread, kunit_try_catch)"),
        "{}",
        result.stderr
    );
    assert!(result.stderr.contains("BUG: kernel NULL pointer dereference"), "{}", result.stderr);
    // ...but the KTAP results decide, as for kunit.py.
    assert!(!reference.contains("failed") && !reference.contains("crashed"), "kunit.py: {reference}");
    assert!(result.stderr.contains("verdict: command exited with status 0"), "{}", result.stderr);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
}

#[test]
fn a_host_built_program_runs_in_the_guest_with_its_files() {
    let dir = tempdir();
    let source = dir.as_path().join("probe.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <sys/utsname.h>
int main(int argc, char **argv) {
    struct utsname u;
    char line[128] = "";
    FILE *f = fopen(argv[1], "r");
    if (!f || !fgets(line, sizeof line, f)) { perror(argv[1]); return 2; }
    uname(&u);
    printf("probe: %s on %s %s: %s", argv[0], u.sysname, u.release, line);
    return 42;
}
"#,
    )
    .expect("write probe.c");
    let binary = dir.as_path().join("probe");
    let gcc = Command::new("gcc").arg("-O2").arg("-o").arg(&binary).arg(&source).status().expect("run gcc");
    assert!(gcc.success(), "gcc failed");
    let ldd = Command::new("ldd").arg(&binary).output().expect("run ldd");
    assert!(
        String::from_utf8_lossy(&ldd.stdout).contains("libc.so"),
        "the probe should be dynamically linked"
    );
    let data = dir.as_path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("greeting.txt"), "hello from the host\n").expect("write data");
    let include_binary = format!("{}:/opt/t/probe", binary.display());
    // The data directory lands at its host path (the default).
    let exec = format!("/opt/t/probe {}/greeting.txt", data.display());
    let result = boot_test(
        &vmlinux(),
        &["--include-binary", &include_binary, "--include", data.to_str().expect("path"), "--exec", &exec],
    );
    let output = result
        .stdout
        .lines()
        .find(|l| l.starts_with("probe: "))
        .unwrap_or_else(|| panic!("no probe output in:\n{}", result.stdout));
    println!("guest: {output}");
    assert!(output.starts_with("probe: /opt/t/probe on Linux 6.12"), "{output}");
    assert!(output.ends_with(": hello from the host"), "{output}");
    assert_eq!(result.code, Some(42), "stderr: {}", result.stderr);
}
