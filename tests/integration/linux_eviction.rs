//! Eviction end to end with the project's Linux guest: the guest reads a file, its fphash
//! driver reports the pages and samepage merges them into its store; then the guest drops its
//! page cache (`echo 3 > /proc/sys/vm/drop_caches`), which sends REMOVED reports, and fills
//! memory with data of its own. Its writes land on the freed pages, which get private copies;
//! the store frees the pages no guest maps any more, and what the guest wrote reads back
//! intact.
//!
//! One VM: its domain's store holds a page for every page it reported (the first copy is
//! merged too), so the store shrinks once this guest's pages leave it. The test talks to the
//! guest through its console (standard input) to measure the store at each step.

use crate::common;

use std::time::{Duration, Instant};

use common::linux::{
    guest_sha256, kernel_and_initrd, make_ext4, metric, numbers, read_metrics, sha256, LiveVm,
};
use common::{make_image, tempdir};

/// The file the guest reads: 1 MiB (the guest kernel hashes ~15 pages/s on hosts that emulate
/// it, so this costs ~20 s there).
const DATA_BYTES: usize = 1 << 20;
const DATA_PAGES: u64 = (DATA_BYTES / 4096) as u64;
/// After dropping its caches the guest writes `seq 1 FILL_LINES` (6.6 MiB, every page
/// different) to tmpfs: most of its free memory, so its allocations reuse the freed pages.
const FILL_LINES: u64 = 1_000_000;

/// Guest-side script, run by the guest's /init as `sh /mnt/evict.sh` (`samepage.script=`).
/// Each `read` waits for the test's go-ahead on the console.
const GUEST_SCRIPT: &str = r#"# Run by the guest's /init (samepage.script=evict.sh), in /mnt (the disk, read-only).
for d in /sys/bus/virtio/devices/*/fphash; do :; done
[ -d "$d" ] || { echo "evict: no fphash device"; exit 3; }
# Until the driver has sent every queued report and had an answer.
settle() {
	n=0
	while :; do
		read -r pending <"$d/pending"
		[ "$pending" = 0 ] && return
		n=$((n + 1))
		[ $n -gt 300 ] && { echo "evict: $pending reports still pending"; exit 4; }
		sleep 1
	done
}
counters() {
	line="evict: $1"
	for c in hashed merged already mismatch dropped removed_done; do
		read -r v <"$d/$c"
		line="$line $c=$v"
	done
	echo "$line"
}
cat data >/dev/null || exit 2
settle
counters read
read -r _
echo 3 >/proc/sys/vm/drop_caches
settle
counters dropped
busybox seq 1 FILL_LINES >/tmp/fill || exit 5
echo "evict: filled"
read -r _
sha256sum /tmp/fill
rm -f /tmp/fill
"#;

const GUEST_TIMEOUT_S: u64 = 540;
/// From start to the guest's first report line (boot ~25 s, reading and hashing ~20 s, on a
/// busy emulating host several times that: ~170 s beside two other Linux guests).
const READ_LIMIT: Duration = Duration::from_secs(480);
/// For each later step.
const STEP_LIMIT: Duration = Duration::from_secs(240);
/// How long the store must stay the same size to count as settled: the host frees a store
/// page after two looks at least 1 s apart (`--dedup-scan-every`), and the metrics file is
/// rewritten every second.
const STEADY: Duration = Duration::from_secs(4);

/// Store figures from the metrics file.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Store {
    pages: u64,
    bytes: u64,
    removed_hints: u64,
    cow_breaks: u64,
}

fn store(metrics: &serde_json::Value) -> Store {
    Store {
        pages: metric(metrics, "/dedup/store_pages"),
        bytes: metric(metrics, "/dedup/store_bytes_allocated"),
        removed_hints: metric(metrics, "/dedup/removed_hints"),
        cow_breaks: metric(metrics, "/dedup/cow_breaks"),
    }
}

/// The store once it has held still for [`STEADY`] and `accept` holds for it (at most
/// `limit`); the last figures either way.
fn settled_store(path: &std::path::Path, limit: Duration, accept: impl Fn(&Store) -> bool) -> Store {
    let start = Instant::now();
    let mut last: Option<(Store, Instant)> = None;
    loop {
        if let Some(now) = read_metrics(path).as_ref().map(store) {
            match last {
                Some((seen, since)) if seen == now => {
                    if accept(&now) && since.elapsed() >= STEADY {
                        return now;
                    }
                }
                _ => last = Some((now, Instant::now())),
            }
        }
        if start.elapsed() > limit {
            return last.map(|(s, _)| s).unwrap_or_else(|| panic!("no metrics in {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn linux_guest_dropping_its_caches_frees_the_store_pages_it_held() {
    let started = Instant::now();
    let (kernel, initrd) = kernel_and_initrd();
    let tmp = tempdir();
    let root = tmp.as_path();
    let content = root.join("content");
    std::fs::create_dir_all(&content).expect("mkdir");
    make_image(&content.join("data"), DATA_BYTES, 0x0e71_c700);
    let script = GUEST_SCRIPT.replace("FILL_LINES", &FILL_LINES.to_string());
    std::fs::write(content.join("evict.sh"), script).expect("write evict.sh");
    let image = root.join("img");
    make_ext4(&content, &image, "8M");
    let metrics = root.join("metrics.json");
    // `share=off`: the guest's reads copy the image, so its reports are merged into the store
    // (a shared image's pages would be answered ALREADY and never enter it).
    let disk = format!("{},ro,share=off", image.display());
    let timeout = GUEST_TIMEOUT_S.to_string();
    let mut vm = LiveVm::start(&[
        "--kernel",
        kernel.to_str().expect("path"),
        "--initrd",
        initrd.to_str().expect("path"),
        "--mem",
        "64M",
        "--disk",
        &disk,
        "--cmdline",
        "samepage.script=evict.sh",
        "--metrics",
        metrics.to_str().expect("path"),
        "--timeout",
        &timeout,
    ]);

    // 1. Read and merged: every data page is in the store.
    let read = numbers(&vm.wait_for_line("evict: read", READ_LIMIT));
    let read_at = started.elapsed();
    assert_eq!(read["mismatch"] + read["dropped"], 0, "guest counters after reading: {read:?}");
    assert!(read["merged"] >= DATA_PAGES, "fewer than {DATA_PAGES} pages merged: {read:?}");
    let before = settled_store(&metrics, STEP_LIMIT, |s| s.pages >= DATA_PAGES);
    println!(
        "after reading {} KiB: guest hashed {} pages, {} merged; store {} pages, {} KiB held",
        DATA_BYTES / 1024,
        read["hashed"],
        read["merged"],
        before.pages,
        before.bytes / 1024
    );
    assert!(before.pages >= DATA_PAGES, "the store holds fewer pages than the guest read: {before:?}");
    assert!(before.bytes >= DATA_PAGES * 4096, "the store's memfd holds less than the data: {before:?}");

    // 2. Caches dropped: REMOVED reports for every page; the pages still map the store (the
    // guest has not written them), then the guest's fill writes over freed pages.
    vm.send("drop");
    let dropped = numbers(&vm.wait_for_line("evict: dropped", STEP_LIMIT));
    vm.wait_for_line("evict: filled", STEP_LIMIT);
    let after = settled_store(&metrics, STEP_LIMIT, |s| s.pages < before.pages);
    println!(
        "after drop_caches and a {:.1} MiB fill: guest sent {} REMOVED records (all answered), host noted \
         {} removed hints; {} merged pages copied on write; store {} -> {} pages, {} -> {} KiB held",
        fill_bytes().len() as f64 / f64::from(1 << 20),
        dropped["removed_done"],
        after.removed_hints,
        after.cow_breaks,
        before.pages,
        after.pages,
        before.bytes / 1024,
        after.bytes / 1024
    );
    assert!(dropped["removed_done"] >= DATA_PAGES, "guest counters after drop_caches: {dropped:?}");
    assert!(after.removed_hints >= DATA_PAGES, "the host noted too few REMOVED reports: {after:?}");
    assert!(after.pages < before.pages, "the store did not shrink: {before:?} -> {after:?}");
    assert!(after.bytes < before.bytes, "the store's memfd holds as much as before: {before:?} -> {after:?}");
    assert!(after.cow_breaks >= before.pages - after.pages, "freed more than was copied: {after:?}");

    // 3. What the guest wrote over the freed pages is its own, read back after the store let
    // them go.
    vm.send("check");
    let result = vm.finish(STEP_LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "guest failed:\n{}\nstderr:\n{}", result.stdout, result.stderr);
    let expected = sha256(&fill_bytes());
    let got = guest_sha256(&result.stdout, "/tmp/fill");
    println!("fill sha256: guest {} host {expected}", got.as_deref().unwrap_or("(none)"));
    assert_eq!(
        got.as_deref(),
        Some(expected.as_str()),
        "the guest's memory lost its data:\n{}",
        result.stdout
    );
    assert!(!result.stdout.contains("BUG:") && !result.stdout.contains("Kernel panic"), "{}", result.stdout);
    println!("eviction test: read and merged at {read_at:.0?}, done at {:.0?}", started.elapsed());
}

/// What `seq 1 FILL_LINES` prints.
fn fill_bytes() -> Vec<u8> {
    (1..=FILL_LINES).flat_map(|n| format!("{n}\n").into_bytes()).collect()
}
