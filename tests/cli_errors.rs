//! Bad input on the command line: one clear error line, a non-zero exit, no panic.

mod common;

use std::time::Duration;

use common::{elf, mkfifo, run, tempdir, test_guest, test_guest_variant};

const LIMIT: Duration = Duration::from_secs(30);
/// A start-up step that blocks forever would outlast this; a clean failure takes milliseconds.
const HANG_LIMIT: Duration = Duration::from_secs(10);

fn assert_clean_failure(args: &[&str], expected: &str) {
    let result = run(args, HANG_LIMIT);
    println!("samepage {}\n  -> exit {:?}: {}", args.join(" "), result.code, result.stderr.trim());
    assert!(matches!(result.code, Some(c) if c != 0), "expected failure, got {:?}", result.code);
    result.assert_no_panic();
    assert!(result.stderr.contains(expected), "expected {expected:?} in stderr:\n{}", result.stderr);
    let error_lines = result.stderr.lines().filter(|l| l.contains("error")).count();
    assert_eq!(error_lines, 1, "expected one error line:\n{}", result.stderr);
}

#[test]
fn missing_kernel_file() {
    assert_clean_failure(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux",
    );
}

#[test]
fn file_that_is_no_kernel() {
    let dir = tempdir();
    let junk = dir.as_path().join("junk");
    common::make_image(&junk, 64 * 1024, 1);
    let junk = junk.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", junk], "is not a kernel samepage can boot");
}

#[test]
fn memory_too_small_or_malformed() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "1M"], "out of range");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "lots"], "invalid memory size 'lots'");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "16385K"], "not a multiple of 4 KiB");
}

#[test]
fn unreadable_disks() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", "/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    let dir = tempdir();
    let dir_path = dir.as_path().to_str().expect("path").to_string();
    assert_clean_failure(&["run", "--kernel", kernel, "--disk", &dir_path], &dir_path);
    assert_clean_failure(&["run", "--kernel", kernel, "--disk", "x.img,sideways"], "invalid disk");
}

#[test]
fn bad_vcpu_counts_and_initrd() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", kernel, "--vcpus", "0"], "vCPU count 0 out of range");
    assert_clean_failure(&["run", "--kernel", kernel, "--vcpus", "33"], "vCPU count 33 out of range");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd /nonexistent/initrd",
    );
}

/// clap's own usage errors: exit code 2 and one `error:` line.
fn assert_usage_error(args: &[&str], expected: &str) {
    let result = run(args, HANG_LIMIT);
    assert_eq!(result.code, Some(2), "expected clap's usage error code:\n{}", result.stderr);
    assert_clean_failure(args, expected);
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn progress_interval_out_of_range() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    for value in ["inf", "1e300", "-1", "NaN", "0", "86401"] {
        assert_usage_error(
            &[
                "density",
                "--vms",
                "1",
                "--kernel",
                kernel,
                "--timeout",
                "5",
                &format!("--progress-every={value}"),
            ],
            "invalid interval",
        );
    }
}
