//! Cross-VM merging through the real binary and real KVM with test guests (`samepage
//! density`): merge coverage and host memory, copy-on-write isolation, no lost writes while
//! merges run, and a lying guest next to an honest one.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{density_result, make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(240);
const PAGE: u64 = 4096;

/// What a density run of test guests on one shared file image left behind.
struct DensityRun {
    /// The `density-result:` numbers.
    numbers: HashMap<String, i64>,
    /// Holds the image and the consoles until the test ends.
    dir: vmm_sys_util::tempdir::TempDir,
}

impl DensityRun {
    /// Runs `vms` test guests in `testguest.mode=fphash` on one read-only image of `mib` MiB
    /// (content from `seed`), with `extra` options.
    fn start(vms: u32, mib: usize, seed: u64, extra: &[&str]) -> DensityRun {
        DensityRun::start_with(vms, mib, seed, "", extra)
    }

    /// As [`DensityRun::start`], with `guest_options` on every guest's command line.
    fn start_with(vms: u32, mib: usize, seed: u64, guest_options: &str, extra: &[&str]) -> DensityRun {
        let kernel = test_guest();
        let dir = tempdir();
        let image = dir.as_path().join("files.img");
        make_image(&image, mib << 20, seed);
        let disk = format!("{},ro,share=off", image.display());
        let vms = vms.to_string();
        let consoles = dir.as_path().join("consoles");
        let cmdline = format!("testguest.mode=fphash {guest_options}");
        let mut args = vec![
            "density",
            "--progress-every",
            "0.2",
            "--timeout",
            "200",
            "--vms",
            &vms,
            "--kernel",
            kernel.to_str().expect("path"),
            "--disk",
            &disk,
            "--cmdline",
            &cmdline,
            "--console-dir",
            consoles.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        let result = run(&args, LIMIT);
        println!("{}", result.stdout);
        result.assert_no_panic();
        assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
        DensityRun { numbers: density_result(&result.stdout), dir }
    }

    /// VM `vm`'s console.
    fn console(&self, vm: usize) -> String {
        let path = self.dir.as_path().join("consoles").join(format!("vm{vm}.log"));
        std::fs::read_to_string(path).expect("console log")
    }
}

/// Four guests reading the same 64 MiB: one copy in the store, as processes or threads.
fn four_guests_share_one_copy(mode: &str, extra: &[&str]) {
    let mut args = vec!["--mem", "256M"];
    args.extend_from_slice(extra);
    let density = DensityRun::start(4, 64, 7, &args);
    let r = &density.numbers;
    let pages = (64 << 20) / PAGE as i64;
    for vm in 0..4 {
        let out = density.console(vm);
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
    // Only first copies were hashed: duplicates were proven by a byte compare.
    assert_eq!(r["host_hashes"], pages, "{r:?}");
    println!(
        "4 VMs x 64 MiB ({mode}): {} of {} guest pages merged, store {:.1} MiB, saved {:.1} MiB, {} pages hashed",
        r["mapped_pages"],
        4 * pages,
        r["store_bytes"] as f64 / 1048576.0,
        r["saved_bytes"] as f64 / 1048576.0,
        r["host_hashes"]
    );
}

#[test]
fn four_vmm_processes_reading_the_same_64_mib_share_one_copy() {
    four_guests_share_one_copy("processes and a broker", &[]);
}

#[test]
fn four_guests_of_one_process_reading_the_same_64_mib_share_one_copy() {
    four_guests_share_one_copy("threads of one process", &["--threads"]);
}

/// Whether the test guest's console says that `who` hashes its reports (exactly: not "guest
/// (the device does not offer host hashing)").
fn hashed_by(console: &str, who: &str) -> bool {
    let want = format!(", hash {who}");
    console.lines().any(|l| l.starts_with("fphash: device at ") && l.ends_with(&want))
}

/// Three guests reading the same 16 MiB report their pages twice, all without hashes
/// (`testguest.hash=host`: zeros, or another page's hash, in the hash fields): the host hashes
/// each page once, merges all of it, and a page reported again costs no hash.
fn host_hashing_guests_share_one_copy(extra: &[&str]) -> HashMap<String, i64> {
    let guest_options = "testguest.hash=host testguest.rounds=2 testguest.round_ms=200";
    let density = DensityRun::start_with(3, 16, 11, guest_options, extra);
    let r = density.numbers.clone();
    let pages = (16 << 20) / PAGE as i64;
    for vm in 0..3 {
        let out = density.console(vm);
        assert!(hashed_by(&out, "host"), "vm{vm} did not get host hashing:\n{out}");
        assert!(out.contains("fphash: records carry no hash: zeros on even pages"), "vm{vm}:\n{out}");
        // Zeros and other pages' hashes would all be MISMATCH if the host read them.
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "vm{vm}:\n{out}");
        let again = format!("fphash: round 2: reported {pages} pages: merged 0 already {pages} mismatch 0");
        assert!(out.contains(&again), "vm{vm}:\n{out}");
        assert!(out.contains("fphash: round 2: data intact"), "vm{vm}:\n{out}");
    }
    assert_eq!(r["device_host_hashed"], 2 * 3 * pages, "{r:?}");
    assert_eq!((r["mismatch"], r["bad_gpa"], r["no_room"]), (0, 0, 0), "{r:?}");
    assert_eq!((r["store_pages"], r["mapped_pages"]), (pages, 3 * pages), "one copy: {r:?}");
    assert_eq!(r["store_verified"], r["store_pages"], "{r:?}");
    // Each guest page was hashed once, by its VMM, in the first round; none in the second.
    assert_eq!(r["host_hashes_for_guests"], 3 * pages, "{r:?}");
    r
}

#[test]
fn guests_that_leave_hashing_to_the_host_merge_through_the_broker() {
    let r = host_hashing_guests_share_one_copy(&[]);
    // The broker trusts no VMM's hash: it hashed each new page once itself, hits none.
    let pages = (16 << 20) / PAGE as i64;
    assert_eq!(r["host_hashes"], pages, "{r:?}");
}

#[test]
fn guests_that_leave_hashing_to_the_host_merge_in_one_process() {
    let r = host_hashing_guests_share_one_copy(&["--threads"]);
    // In one process the store trusts the hash the engine computed: no second hash.
    assert_eq!(r["host_hashes"], 0, "{r:?}");
}

/// Two guests reading the same 16 MiB, run once with each hashing mode: the host's hashes
/// merge exactly the pages the guests' hashes merge, and each guest's data stays intact.
#[test]
fn host_hashing_merges_the_same_pages_as_guest_hashing() {
    let pages = (16 << 20) / PAGE as i64;
    let mut runs = Vec::new();
    for who in ["guest", "host"] {
        let density = DensityRun::start_with(2, 16, 13, &format!("testguest.hash={who}"), &[]);
        for vm in 0..2 {
            let out = density.console(vm);
            assert!(hashed_by(&out, who), "vm{vm} ({who}):\n{out}");
            assert!(out.contains("fphash: data intact"), "vm{vm} ({who}):\n{out}");
        }
        let r = density.numbers.clone();
        let host_hashed = if who == "host" { 2 * pages } else { 0 };
        assert_eq!(r["device_host_hashed"], host_hashed, "{who}: {r:?}");
        assert_eq!((r["mismatch"], r["bad_gpa"], r["no_room"]), (0, 0, 0), "{who}: {r:?}");
        runs.push(r);
    }
    let (guest, host) = (&runs[0], &runs[1]);
    println!("merged: hash=guest {}, hash=host {}", guest["merged"], host["merged"]);
    assert!(guest["merged"] > 0, "{guest:?}");
    for key in ["merged", "already", "mapped_pages", "store_pages", "saved_bytes"] {
        assert_eq!(guest[key], host[key], "{key}: hash=guest {guest:?}, hash=host {host:?}");
    }
    assert_eq!(host["merged"], 2 * pages, "{host:?}");
}

/// A version-1 driver (`testguest.hash=guest` accepts no feature bit and checks `version` for
/// 1) next to a driver that leaves hashing to the host: both merge, into one copy.
fn a_version_1_driver_merges_beside_a_host_hashing_one(extra: &[&str]) {
    let mut args = vec!["--vm-cmdline", "0:testguest.hash=guest", "--vm-cmdline", "1:testguest.hash=host"];
    args.extend_from_slice(extra);
    let density = DensityRun::start(2, 16, 12, &args);
    let r = &density.numbers;
    let pages = (16 << 20) / PAGE as i64;
    let (v1, v2) = (density.console(0), density.console(1));
    assert!(hashed_by(&v1, "guest") && !v1.contains("records carry no hash"), "{v1}");
    assert!(hashed_by(&v2, "host"), "{v2}");
    for out in [&v1, &v2] {
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{out}");
        assert!(out.contains("fphash: data intact"), "{out}");
    }
    // Only the host-hashing guest's records came without a hash, and only those the VMM hashed.
    assert_eq!((r["device_host_hashed"], r["host_hashes_for_guests"]), (pages, pages), "{r:?}");
    assert_eq!((r["store_pages"], r["mapped_pages"], r["mismatch"]), (pages, 2 * pages, 0), "{r:?}");
    assert_eq!(r["store_verified"], r["store_pages"], "{r:?}");
}

#[test]
fn a_version_1_driver_merges_beside_a_host_hashing_one_through_the_broker() {
    a_version_1_driver_merges_beside_a_host_hashing_one(&[]);
}

#[test]
fn a_version_1_driver_merges_beside_a_host_hashing_one_in_one_process() {
    a_version_1_driver_merges_beside_a_host_hashing_one(&["--threads"]);
}

#[test]
fn a_write_after_merge_changes_only_the_writers_page() {
    // vm1 writes into every page it merged; vm0 waits, then checks its copy is untouched.
    let density = DensityRun::start(
        2,
        8,
        8,
        &["--vm-cmdline", "0:testguest.hold_ms=3000", "--vm-cmdline", "1:testguest.write_every=1"],
    );
    let r = &density.numbers;
    let pages = (8 << 20) / PAGE as i64;
    let writer = density.console(1);
    assert!(writer.contains(&format!("fphash: wrote {pages} pages, own copies changed ok")), "{writer}");
    let reader = density.console(0);
    assert!(reader.contains("fphash: holding 3000 ms"), "{reader}");
    assert!(
        reader.contains("fphash: data intact after the hold"),
        "the reader saw the writer's bytes:\n{reader}"
    );
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
    let density = DensityRun::start(2, 8, 9, &["--vm-cmdline", "0:testguest.mode=fphash-liar"]);
    let r = &density.numbers;
    let liar = density.console(0);
    assert!(liar.contains("fphash-liar: all checks ok"), "{liar}");
    let honest = density.console(1);
    let pages = (8 << 20) / PAGE as i64;
    assert!(honest.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{honest}");
    assert!(honest.contains("fphash: data intact"), "{honest}");
    // The flood's wrong hashes and bad addresses were counted, and the store is sound.
    assert!(r["mismatch"] >= 500_000, "{r:?}");
    assert!(r["device_bad_gpa"] >= 4 && r["device_bad_record"] >= 4, "{r:?}");
    assert!(r["device_rejected_batches"] >= 3, "{r:?}");
    assert_eq!(r["store_verified"], r["store_pages"], "{r:?}");
}

#[test]
fn dedup_ksm_says_once_when_ksm_is_not_running() {
    // KSM is off on this host unless something turned it on: make sure, and put it back.
    const RUN: &str = "/sys/kernel/mm/ksm/run";
    let before = std::fs::read_to_string(RUN).expect("read ksm/run (needs KSM in the host kernel)");
    std::fs::write(RUN, "0").expect("stop KSM (the test command runs as root)");
    let kernel = test_guest();
    let result = run(
        &[
            "density",
            "--vms",
            "3",
            "--dedup",
            "ksm",
            "--kernel",
            kernel.to_str().expect("path"),
            "--cmdline",
            "testguest.mode=exit=0",
        ],
        LIMIT,
    );
    let _ = std::fs::write(RUN, before.trim());
    println!("{}", result.stderr);
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    let warnings = result.stderr.lines().filter(|l| l.contains("KSM is not running")).count();
    assert_eq!(warnings, 1, "want one clear line:\n{}", result.stderr);
}
