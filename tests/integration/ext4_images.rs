//! Shared read-only images that cannot be shared page by page, through the real binary and
//! the test guest: an ext4 image with 1 KiB blocks (what `mkfs.ext4` makes for small images)
//! is named in one warning, one with 4 KiB blocks is not; reads that mostly had to be copied
//! are named too; and the pages each disk mapped from its image and copied are in `--metrics`
//! and in `density`'s summary.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{density_result, make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(120);
const PAGE: u64 = 4096;
/// The images' size: 8 MiB.
const IMAGE_BYTES: u64 = 8 << 20;
/// What the small-block warning says.
const SMALL_BLOCKS: &str = "1024-byte blocks";
/// What the copied-reads warning says.
const MOSTLY_COPIED: &str = "were copied, not mapped";

/// An 8 MiB ext4 image with `block`-byte blocks holding a few files of random bytes.
fn ext4_image(dir: &Path, name: &str, block: u32) -> PathBuf {
    let files = dir.join(format!("{name}.files"));
    std::fs::create_dir_all(&files).expect("mkdir");
    for (i, size) in [70_000, 300_000, 4096, 1_000_000].into_iter().enumerate() {
        make_image(&files.join(format!("file{i}")), size, 80 + i as u64);
    }
    let image = dir.join(name);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", &block.to_string(), "-d"])
        .arg(&files)
        .arg(&image)
        .arg("8M")
        .output()
        .expect("run mkfs.ext4 (Debian package e2fsprogs; scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
    image
}

/// `samepage run` of the test guest on `disks` with `cmdline`; returns the run and its last
/// metrics.
fn run_on(dir: &Path, disks: &[String], cmdline: &str) -> (common::Run, serde_json::Value) {
    let kernel = test_guest();
    let metrics = dir.join("metrics.json");
    let mut args =
        vec!["run", "--kernel", kernel.to_str().expect("path"), "--serial", "none", "--timeout", "60"];
    for disk in disks {
        args.extend(["--disk", disk.as_str()]);
    }
    args.extend(["--cmdline", cmdline, "--metrics", metrics.to_str().expect("path")]);
    let result = run(&args, LIMIT);
    println!("exit {:?}\nstderr:\n{}", result.code, result.stderr);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    (result, serde_json::from_str(&text).expect("metrics JSON"))
}

/// Disk `index`'s figure `name` in a metrics object.
fn disk_figure(metrics: &serde_json::Value, index: usize, name: &str) -> u64 {
    metrics["disks"][index][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no disks[{index}].{name} in {metrics:#}"))
}

/// The stderr lines that contain `what` and name `image`.
fn lines_about<'a>(stderr: &'a str, what: &str, image: &Path) -> Vec<&'a str> {
    let image = image.display().to_string();
    stderr.lines().filter(|l| l.contains(what) && l.contains(&image)).collect()
}

#[test]
fn a_shared_ext4_image_with_1k_blocks_is_named_once_and_one_with_4k_blocks_is_not() {
    let dir = tempdir();
    let small = ext4_image(dir.as_path(), "blocks-1k.ext4", 1024);
    let large = ext4_image(dir.as_path(), "blocks-4k.ext4", 4096);
    let (result, metrics) =
        run_on(dir.as_path(), &[format!("{},ro", small.display()), format!("{},ro", large.display())], "");
    let warnings: Vec<&str> = result.stderr.lines().filter(|l| l.contains(SMALL_BLOCKS)).collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{}", result.stderr);
    assert!(warnings[0].contains(&small.display().to_string()), "{}", warnings[0]);
    assert!(lines_about(&result.stderr, "-byte blocks", &large).is_empty(), "{}", result.stderr);
    // The test guest reads each disk whole in page-aligned requests: every page maps, whatever
    // the filesystem inside.
    for (index, image) in [&small, &large].into_iter().enumerate() {
        assert_eq!(metrics["disks"][index]["path"], image.display().to_string(), "{metrics:#}");
        assert_eq!(metrics["disks"][index]["shared"], true, "{metrics:#}");
        assert!(disk_figure(&metrics, index, "shared_pages") >= IMAGE_BYTES / PAGE, "{metrics:#}");
        assert_eq!(disk_figure(&metrics, index, "copied_pages"), 0, "{metrics:#}");
    }
    assert!(!result.stderr.contains(MOSTLY_COPIED), "{}", result.stderr);

    // Not shared: nothing to warn about, every page copied.
    let (result, metrics) = run_on(dir.as_path(), &[format!("{},ro,share=off", small.display())], "");
    assert!(
        !result.stderr.contains(SMALL_BLOCKS) && !result.stderr.contains(MOSTLY_COPIED),
        "{}",
        result.stderr
    );
    assert_eq!(metrics["disks"][0]["shared"], false, "{metrics:#}");
    assert_eq!(disk_figure(&metrics, 0, "shared_pages"), 0, "{metrics:#}");
    assert!(disk_figure(&metrics, 0, "copied_pages") >= IMAGE_BYTES / PAGE, "{metrics:#}");
    assert!(disk_figure(&metrics, 0, "copied_bytes") >= IMAGE_BYTES, "{metrics:#}");
}

#[test]
fn a_shared_image_whose_reads_are_mostly_copied_is_named_once() {
    let dir = tempdir();
    let image = dir.as_path().join("raw.img");
    make_image(&image, IMAGE_BYTES as usize, 81);
    // One sector into the disk: no read's image offset falls on a page boundary, as in a
    // filesystem whose blocks are smaller than a page.
    let (result, metrics) = run_on(
        dir.as_path(),
        &[format!("{},ro", image.display())],
        "testguest.mode=fphash testguest.skew_sectors=1",
    );
    assert_eq!(lines_about(&result.stderr, MOSTLY_COPIED, &image).len(), 1, "{}", result.stderr);
    assert!(!result.stderr.contains(SMALL_BLOCKS), "not ext4: {}", result.stderr);
    assert_eq!(disk_figure(&metrics, 0, "shared_pages"), 0, "{metrics:#}");
    assert!(disk_figure(&metrics, 0, "copied_bytes") >= IMAGE_BYTES - 512, "{metrics:#}");
    assert!(disk_figure(&metrics, 0, "copied_pages") >= IMAGE_BYTES / PAGE - 1, "{metrics:#}");
}

#[test]
fn density_shows_each_disks_mapped_and_copied_pages_and_warns_once() {
    let dir = tempdir();
    let small = ext4_image(dir.as_path(), "blocks-1k.ext4", 1024);
    let kernel = test_guest();
    let disk = format!("{},ro", small.display());
    // Each VM its own process (its warning relayed, once), and all VMs in one process.
    for mode in [&[][..], &["--threads"]] {
        let mut args = vec![
            "density",
            "--vms",
            "2",
            "--kernel",
            kernel.to_str().expect("path"),
            "--timeout",
            "60",
            "--disk",
            &disk,
        ];
        args.extend_from_slice(mode);
        let result = run(&args, LIMIT);
        println!("{mode:?}: exit {:?}\n{}\nstderr:\n{}", result.code, result.stdout, result.stderr);
        result.assert_no_panic();
        assert_eq!(result.code, Some(0), "{}", result.stderr);
        assert_eq!(lines_about(&result.stderr, SMALL_BLOCKS, &small).len(), 1, "{}", result.stderr);
        let line = result.stdout.lines().find(|l| l.trim_start().starts_with("disk0 ")).unwrap_or_default();
        assert!(line.contains(&small.display().to_string()) && line.contains("(shared)"), "{line:?}");
        assert!(line.contains(" pages mapped from the image, 0 pages copied"), "{line:?}");
        let r = density_result(&result.stdout);
        assert!(r["disk_mapped_pages"] as u64 >= 2 * IMAGE_BYTES / PAGE, "{r:?}");
        assert_eq!((r["disk_copied_pages"], r["disk_copied_bytes"]), (0, 0), "{r:?}");
    }
}
