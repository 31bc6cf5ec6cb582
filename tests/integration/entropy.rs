//! The virtio entropy device (`--entropy`) through the real binary: the test guest's driver
//! asks for random bytes and checks what comes back; without the flag the guest finds no
//! device.

use crate::common;

use std::time::Duration;

use common::{run, test_guest};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn the_guest_draws_random_bytes_from_the_entropy_device_and_the_counters_say_so() {
    let kernel = test_guest();
    let dir = common::tempdir();
    let metrics = dir.as_path().join("metrics.json");
    let args = [
        "run",
        "--kernel",
        kernel.to_str().expect("path"),
        "--mem",
        "64M",
        "--entropy",
        "--cmdline",
        "testguest.mode=entropy",
        "--metrics",
        metrics.to_str().expect("path"),
        "--timeout",
        "30",
    ];
    let result = run(&args, LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}\n{}", result.stdout, result.stderr);
    result.assert_line("entropy: a 128 KiB request gave 65536 bytes");
    result.assert_line("entropy: ok");
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics")).expect("json");
    let entropy = &figures["entropy"];
    assert_eq!(entropy["requests"], 9, "{entropy}");
    assert_eq!(entropy["bytes"], 8 * 64 + 65536, "{entropy}");
    for line in result.stdout.lines().filter(|l| l.starts_with("entropy: request")).take(3) {
        println!("{line}");
    }
    println!("entropy device counters: {entropy}");
}

#[test]
fn without_the_flag_the_guest_finds_no_entropy_device() {
    let kernel = test_guest();
    let args = [
        "run",
        "--kernel",
        kernel.to_str().expect("path"),
        "--mem",
        "64M",
        "--cmdline",
        "testguest.mode=entropy",
        "--timeout",
        "30",
    ];
    let result = run(&args, LIMIT);
    result.assert_no_panic();
    assert_ne!(result.code, Some(0));
    assert!(result.stdout.contains("entropy: no entropy device"), "{}", result.stdout);
}
