//! Pages of zeros given back (`docs/fphash.md`, "Pages of zeros") through the real binary, real
//! KVM and the test guest (`testguest.mode=zeros`): a guest writes 1024 pages, zeros half of
//! them and holds 20 s; with the defaults the host's sweep gives those back while the guest runs
//! (its anonymous memory falls by as much), a page the guest writes during the hold keeps its
//! bytes, and the guest finds every page as it left it; with `--dedup off` (a baseline) nothing
//! is given back.

use crate::common;

use std::time::{Duration, Instant};

use common::linux::{metric, read_metrics, LiveVm};
use common::{tempdir, test_guest};

const PAGES: u64 = 1024;
const PAGE: u64 = 4096;
const HOLD_MS: u64 = 20_000;
const LIMIT: Duration = Duration::from_secs(60);

/// The anonymous memory a process holds (`RssAnon`), in bytes.
fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the guest with `extra`; returns the most and least anonymous memory of the VMM (its
/// guest RAM, mostly) seen while the guest holds its pages of zeros, and the last metrics.
fn hold_pages_of_zeros(extra: &[&str]) -> (u64, u64, serde_json::Value) {
    let kernel = test_guest();
    let dir = tempdir();
    let metrics = dir.as_path().join("metrics.json");
    let cmdline = format!("testguest.mode=zeros testguest.pages={PAGES} testguest.hold_ms={HOLD_MS}");
    let mut args = vec![
        "--kernel",
        kernel.to_str().expect("path"),
        "--mem",
        "64",
        "--metrics",
        metrics.to_str().expect("path"),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let mut vm = LiveVm::start(&args);
    vm.wait_for_line("zeros: wrote", LIMIT);
    let (mut most, mut least) = (0, u64::MAX);
    let started = Instant::now();
    // Until the guest is done (the first sweep starts 5 s after the VM joins; the guest holds
    // 20 s by its own clock, which a loaded host can make half as long).
    while !vm.console().contains("zeros: data intact") && started.elapsed() < LIMIT {
        let Some(anonymous) = rss_anon(vm.pid()) else { break };
        most = most.max(anonymous);
        least = least.min(anonymous);
        std::thread::sleep(Duration::from_millis(250));
    }
    let run = vm.finish(LIMIT);
    println!("{}", run.stdout);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    run.assert_line("zeros: data intact");
    let last = read_metrics(&metrics).expect("metrics at the end");
    (most, least, last)
}

#[test]
fn pages_of_zeros_a_guest_holds_are_given_back_while_it_runs_and_it_loses_nothing() {
    let (most, least, m) = hold_pages_of_zeros(&[]);
    let given_back = metric(&m, "/dedup/zero_pages_given_back");
    let checked = metric(&m, "/dedup/zero_pages_checked");
    println!(
        "the VMM's anonymous memory {:.2} MiB at most, {:.2} MiB at least; {given_back} pages of zeros given back \
         of {checked} read; {} sweeps; merge CPU {} us",
        most as f64 / (1 << 20) as f64,
        least as f64 / (1 << 20) as f64,
        metric(&m, "/dedup/zero_sweeps"),
        metric(&m, "/merge_cpu_us"),
    );
    assert!(
        given_back >= PAGES / 2,
        "the guest's {} pages of zeros were not all given back: {given_back}",
        PAGES / 2
    );
    assert!(checked >= PAGES, "every page the guest wrote is read: {checked}");
    assert!(most >= PAGES * PAGE, "the guest's pages were in its RAM: {most}");
    assert!(
        most - least >= PAGES / 2 * PAGE,
        "the VMM's anonymous memory fell by {} bytes, less than the {} pages of zeros",
        most - least,
        PAGES / 2
    );
}

#[test]
fn with_dedup_off_no_page_of_zeros_is_given_back() {
    let (most, least, m) = hold_pages_of_zeros(&["--dedup", "off"]);
    assert_eq!(metric(&m, "/dedup/zero_pages_given_back"), 0);
    assert_eq!(metric(&m, "/dedup/zero_pages_checked"), 0);
    assert!(
        least >= PAGES * PAGE && most - least < PAGES / 4 * PAGE,
        "the VMM's anonymous memory went from {most} to {least} bytes while nothing was given back"
    );
}
