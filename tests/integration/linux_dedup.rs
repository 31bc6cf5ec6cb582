//! Page merging end to end with the project's Linux guest: two VMs read the same files from
//! their own copies of one ext4 image; the patched page cache (patch 0002) hands each page to
//! the fphash driver (0004), which reports it, hashed with BLAKE3 (0003) by the guest
//! (`fphash.hash=guest`) or by the host (`VIRTIO_FPHASH_F_HOST_HASH`, the driver's default);
//! samepage verifies the reports and backs both VMs' copies of each page with one store page.
//!
//! On hosts whose KVM emulates guest kernel code the guest kernel hashes ~6 pages/s, so the
//! data sets are small: 2 MiB when the host hashes, 512 KiB when the guest does (its hashing
//! is the same for every page, and 512 pages of it took ~6 minutes there beside the other
//! tests).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::linux::{kernel_and_initrd, make_ext4};
use common::{make_image, run, tempdir};

/// Data files in the image.
const FILES: usize = 8;
const VMS: u64 = 2;

/// Guest-side script, run by the guest's /init as `sh /mnt/run.sh` (`samepage.script=`).
const GUEST_SCRIPT: &str = r#"# Run by the guest's /init (samepage.script=run.sh), in /mnt (the disk, read-only).
# Reads every data file once (the page cache reports each page to the fphash
# driver), waits until the driver has sent every queued report and had an
# answer, prints the driver's counters and the files' SHA-256.
cat data/* >/dev/null || exit 2
for d in /sys/bus/virtio/devices/*/fphash; do :; done
[ -d "$d" ] || { echo "run.sh: no fphash device"; exit 3; }
n=0
while :; do
	read -r pending <"$d/pending"
	[ "$pending" = 0 ] && break
	n=$((n + 1))
	[ $n -gt 600 ] && { echo "run.sh: $pending reports still pending"; exit 4; }
	sleep 1
done
line=fphash:
for c in queued dropped stale hashed hash_us records batches bad_batches merged already mismatch bad_gpa bad_record no_room off; do
	read -r v <"$d/$c"
	line="$line $c=$v"
done
echo "$line"
read -r hash <"$d/hash"
echo "fphash-hash: $hash"
sha256sum data/*
"#;

/// samepage's own limit, and the test's (a bit more).
const GUEST_TIMEOUT_S: u64 = 600;
const LIMIT: Duration = Duration::from_secs(GUEST_TIMEOUT_S + 60);

/// `key=value` pairs of the first line starting with `prefix`.
fn fields(text: &str, prefix: &str) -> BTreeMap<String, u64> {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// `sha256sum` lines (`<hex>  data/fileN`) of a text, by file name.
fn sha256_lines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (hash, name) = l.trim().split_once("  ")?;
            (hash.len() == 64 && name.starts_with("data/")).then(|| (name.to_string(), hash.to_string()))
        })
        .collect()
}

/// The host's `sha256sum` of the data files, run in `dir` so the names match the guest's.
fn host_sha256(dir: &Path) -> BTreeMap<String, String> {
    let names: Vec<String> = (0..FILES).map(|i| format!("data/file{i}")).collect();
    let out = Command::new("sha256sum").args(&names).current_dir(dir).output().expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed: {}", String::from_utf8_lossy(&out.stderr));
    sha256_lines(&String::from_utf8_lossy(&out.stdout))
}

/// An ext4 image holding the data files and the guest script.
fn make_disk(dir: &Path, image: &Path, file_bytes: usize) {
    std::fs::create_dir_all(dir.join("data")).expect("mkdir data");
    for i in 0..FILES {
        make_image(&dir.join(format!("data/file{i}")), file_bytes, 0x5a3e_0000 + i as u64);
    }
    std::fs::write(dir.join("run.sh"), GUEST_SCRIPT).expect("write run.sh");
    make_ext4(dir, image, "16M");
}

#[test]
fn two_linux_guests_share_the_file_pages_they_read() {
    two_linux_guests_share_their_file_pages("guest", 64 * 1024);
}

#[test]
fn two_linux_guests_share_the_file_pages_they_read_hashed_by_the_host() {
    two_linux_guests_share_their_file_pages("host", 256 * 1024);
}

/// The scenario, with the guests' drivers leaving the hashing to `hashing` (`fphash.hash=`;
/// "host" is the driver's default and is not passed) and data files of `file_bytes` each.
fn two_linux_guests_share_their_file_pages(hashing: &str, file_bytes: usize) {
    let pages_per_vm = (FILES * file_bytes / 4096) as u64;
    let (kernel, initrd) = kernel_and_initrd();
    let tmp = tempdir();
    let root = tmp.as_path();
    let content = root.join("content");
    let image = root.join("img");
    make_disk(&content, &image, file_bytes);
    for vm in 0..VMS {
        std::fs::copy(&image, root.join(format!("img-{vm}"))).expect("copy image");
    }
    let disk = root.join("img-{vm}");
    let consoles = root.join("consoles");
    let timeout = GUEST_TIMEOUT_S.to_string();
    let vms = VMS.to_string();
    let cmdline = match hashing {
        "host" => "samepage.script=run.sh".to_string(),
        other => format!("samepage.script=run.sh fphash.hash={other}"),
    };

    let result = run(
        &[
            "density",
            "--vms",
            &vms,
            "--kernel",
            kernel.to_str().expect("path"),
            "--initrd",
            initrd.to_str().expect("path"),
            "--disk",
            disk.to_str().expect("path"),
            "--console-dir",
            consoles.to_str().expect("path"),
            "--cmdline",
            &cmdline,
            "--progress-every",
            "10",
            "--timeout",
            &timeout,
        ],
        LIMIT,
    );
    println!("{}", result.stdout);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "density failed:\n{}\nstderr:\n{}", result.stdout, result.stderr);

    // Each guest read the files correctly (merging never changes what a guest reads) and its
    // driver reported every page without loss; the host accepted every report.
    let expected = host_sha256(&content);
    assert_eq!(expected.len(), FILES);
    for vm in 0..VMS {
        let log = std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).expect("console log");
        assert!(
            log.lines().any(|l| l.trim_end() == "samepage-init: exit status 0"),
            "vm{vm} did not finish its script:\n{log}"
        );
        assert!(!log.contains("Kernel panic") && !log.contains("BUG:"), "vm{vm} kernel trouble:\n{log}");
        assert_eq!(sha256_lines(&log), expected, "vm{vm} read different file contents:\n{log}");
        let driver = fields(&log, "fphash:");
        println!(
            "vm{vm} driver ({hashing} hashing): {} pages hashed in {:.1} s of guest kernel time, {} merged, \
             {} already",
            driver["hashed"],
            driver["hash_us"] as f64 / 1e6,
            driver["merged"],
            driver["already"]
        );
        let mode = log.lines().find_map(|l| l.trim_end().strip_prefix("fphash-hash: "));
        assert_eq!(mode, Some(hashing), "vm{vm}: the driver's hashing mode:\n{log}");
        // Host hashing costs the guest no hash; guest hashing hashes every page it reports.
        if hashing == "host" {
            assert_eq!(driver["hashed"], 0, "vm{vm}: {driver:?}");
        } else {
            assert!(driver["hashed"] >= pages_per_vm, "vm{vm}: {driver:?}");
        }
        assert_eq!(driver["dropped"], 0, "vm{vm}: reports dropped");
        assert_eq!(driver["bad_batches"], 0, "vm{vm}: batches rejected");
        assert_eq!(driver["mismatch"] + driver["bad_gpa"] + driver["bad_record"], 0, "vm{vm}: {driver:?}");
        assert!(
            driver["merged"] + driver["already"] >= pages_per_vm,
            "vm{vm}: fewer pages merged than the {pages_per_vm} data pages it read: {driver:?}"
        );
    }

    // The host side: both VMs' copies of the data pages now map one store page each.
    let host: BTreeMap<String, u64> =
        common::density_result(&result.stdout).into_iter().map(|(k, v)| (k, v.max(0) as u64)).collect();
    let data_pages = VMS * pages_per_vm;
    // The host hashed the pages that came without a hash: at least each VM's data pages.
    if hashing == "host" {
        assert!(host["device_host_hashed"] >= data_pages, "{host:?}");
    } else {
        assert_eq!(host["device_host_hashed"], 0, "{host:?}");
    }
    assert_eq!(host["mismatch"] + host["bad_gpa"], 0, "{host:?}");
    assert!(
        host["mapped_pages"] * 10 >= data_pages * 9,
        "only {} of {data_pages} data pages map the store: {host:?}",
        host["mapped_pages"]
    );
    // One copy of each page is saved: (VMS - 1) * the data, less 10 %.
    let data_bytes = pages_per_vm * 4096;
    assert!(
        host["saved_bytes"] * 10 >= (VMS - 1) * data_bytes * 9,
        "saved {} bytes, expected about {}: {host:?}",
        host["saved_bytes"],
        (VMS - 1) * data_bytes
    );
    // No duplicates: a store page per data page, and at most one per kernel page that boot
    // wrote and that was merged since (below).
    assert!(
        host["store_pages"] <= pages_per_vm + 16 + host["kernel_copies_merged"],
        "store holds duplicates: {host:?}"
    );

    // The guest kernel held once (docs/boot.md): each VM mapped the vmlinux's read-only
    // segment from the file; boot-time patching copied some of it, most stays one host copy.
    let per_vm = common::kernel_read_only_pages(&kernel);
    assert_eq!(host["kernel_mapped"], VMS * per_vm, "{host:?}");
    assert!(host["kernel_pages"] * 2 >= VMS * per_vm, "patching copied most of the kernel: {host:?}");
    assert!(host["kernel_saved_bytes"] > 0, "{host:?}");
    // The pages boot wrote are written alike in both VMs: merged once written.
    assert!(host["kernel_copies_merged"] > 0, "{host:?}");
    println!(
        "kernel held once: {VMS} VMs mapped {per_vm} pages each of the vmlinux's text and read-only data; \
         {} still map the file at the end, {} were copied (written by boot-time patching) and {} of those \
         merged since; the file saves {:.1} MiB",
        host["kernel_pages"],
        host["kernel_cow_breaks"],
        host["kernel_copies_merged"],
        host["kernel_saved_bytes"] as f64 / 1048576.0
    );
}
