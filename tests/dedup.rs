//! Cross-VM merging through the real binary and real KVM with test guests (`samepage
//! density`): merge coverage and host memory, copy-on-write isolation, no lost writes while
//! merges run, and a lying guest next to an honest one.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(240);
const PAGE: u64 = 4096;

/// The `density-result:` line as numbers.
fn result_line(stdout: &str) -> HashMap<String, i64> {
    let line = stdout.lines().find(|l| l.starts_with("density-result:")).expect("density-result line");
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().expect("number")))
        .collect()
}

fn console(dir: &Path, vm: usize) -> String {
    std::fs::read_to_string(dir.join(format!("vm{vm}.log"))).expect("console log")
}

fn density(args: &[&str]) -> (common::Run, HashMap<String, i64>) {
    let mut all = vec!["density", "--progress-every", "0.2", "--timeout", "200"];
    all.extend_from_slice(args);
    let result = run(&all, LIMIT);
    println!("{}", result.stdout);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let numbers = result_line(&result.stdout);
    (result, numbers)
}

#[test]
fn four_guests_reading_the_same_64_mib_share_one_copy() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    let consoles = dir.as_path().join("consoles");
    make_image(&image, 64 << 20, 7);
    let disk = format!("{},ro", image.display());
    let (_, r) = density(&[
        "--vms",
        "4",
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--mem",
        "256M",
        "--cmdline",
        "testguest.mode=fphash",
        "--console-dir",
        consoles.to_str().expect("path"),
    ]);
    let pages = (64 << 20) / PAGE as i64;
    for vm in 0..4 {
        let out = console(&consoles, vm);
        assert!(out.contains("fphash: data intact"), "vm{vm}:\n{out}");
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "vm{vm}:\n{out}");
    }
    // Every guest page of the file maps the store; the store holds one copy.
    assert!(r["mapped_pages"] * 100 >= 99 * 4 * pages, "{r:?}");
    assert!(r["store_pages"] <= pages + pages / 100, "{r:?}");
    let one_copy = pages * PAGE as i64;
    assert!(r["store_bytes"] <= one_copy + one_copy / 20, "store holds more than one copy: {r:?}");
    assert!(r["saved_bytes"] * 100 >= 99 * 3 * one_copy, "{r:?}");
    assert_eq!(r["store_verified"], r["store_pages"]);
    println!(
        "4 VMs x 64 MiB: {} of {} guest pages merged, store {:.1} MiB, saved {:.1} MiB",
        r["mapped_pages"],
        4 * pages,
        r["store_bytes"] as f64 / 1048576.0,
        r["saved_bytes"] as f64 / 1048576.0
    );
}

#[test]
fn a_write_after_merge_changes_only_the_writers_page() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    let consoles = dir.as_path().join("consoles");
    make_image(&image, 8 << 20, 8);
    let disk = format!("{},ro", image.display());
    // vm1 writes into every page it merged; vm0 waits, then checks its copy is untouched.
    let (_, r) = density(&[
        "--vms",
        "2",
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--cmdline",
        "testguest.mode=fphash",
        "--vm-cmdline",
        "0:testguest.hold_ms=3000",
        "--vm-cmdline",
        "1:testguest.write_every=1",
        "--console-dir",
        consoles.to_str().expect("path"),
    ]);
    let pages = (8 << 20) / PAGE as i64;
    let writer = console(&consoles, 1);
    assert!(writer.contains(&format!("fphash: wrote {pages} pages, own copies changed ok")), "{writer}");
    let reader = console(&consoles, 0);
    assert!(reader.contains("fphash: holding 3000 ms"), "{reader}");
    assert!(reader.contains("fphash: data intact"), "the reader saw the writer's bytes:\n{reader}");
    // The writer's pages were copied on write; the store still holds the old bytes.
    assert_eq!(r["cow_breaks"], pages, "{r:?}");
    assert_eq!(r["store_verified"], r["store_pages"], "{r:?}");
    assert!(r["store_pages"] >= pages, "the reader's pages must still map the store: {r:?}");
}

#[test]
fn no_write_is_lost_while_merges_run() {
    let kernel = test_guest();
    let result = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("path"),
            "--cmdline",
            "testguest.mode=fphash-counter testguest.rounds=8",
            "--timeout",
            "200",
        ],
        LIMIT,
    );
    println!("{}", result.stdout);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let tally = result.stdout.lines().find(|l| l.starts_with("fphash-counter: reported")).expect("tally");
    let merged: u64 = tally
        .split_whitespace()
        .skip_while(|w| *w != "merged")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("merged");
    assert!(merged > 1000, "too few merges to race with: {tally}");
    assert!(result
        .stdout
        .lines()
        .any(|l| l.starts_with("fphash-counter: 1024 pages,") && l.ends_with("none lost")));
}

#[test]
fn a_lying_guest_gets_nothing_merged_and_its_neighbour_is_unaffected() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    let consoles = dir.as_path().join("consoles");
    make_image(&image, 8 << 20, 9);
    let disk = format!("{},ro", image.display());
    let (_, r) = density(&[
        "--vms",
        "2",
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--cmdline",
        "testguest.mode=fphash",
        "--vm-cmdline",
        "0:testguest.mode=fphash-liar",
        "--console-dir",
        consoles.to_str().expect("path"),
    ]);
    let liar = console(&consoles, 0);
    assert!(liar.contains("fphash-liar: all checks ok"), "{liar}");
    let honest = console(&consoles, 1);
    let pages = (8 << 20) / PAGE as i64;
    assert!(honest.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{honest}");
    assert!(honest.contains("fphash: data intact"), "{honest}");
    // The flood's wrong hashes and bad addresses were counted, and the store is sound.
    assert!(r["mismatch"] >= 500_000, "{r:?}");
    assert!(r["device_bad_gpa"] >= 4 && r["device_bad_record"] >= 4, "{r:?}");
    assert!(r["device_rejected_batches"] >= 3, "{r:?}");
    assert_eq!(r["store_verified"], r["store_pages"], "{r:?}");
}
