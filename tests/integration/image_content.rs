//! Sharing and merging as one (`docs/fphash.md`, "Read-only images"), through the real binary,
//! real KVM and the test guest, with the defaults a user gets (`--disk PATH,ro`): VMs that each
//! read their own copy of one image, or their own images whose contents overlap, end up with
//! one host copy of each distinct page, in one process and as processes with a broker.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::common::{density_result, make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
const VMS: usize = 4;

/// Writes `vms` images `img{k}.img` in `dir`: `common` MiB of one content, then `own` MiB of
/// each image's own (none when `own` is 0).
fn images(dir: &Path, vms: usize, common: usize, own: usize) {
    let shared = dir.join("common.part");
    make_image(&shared, common << 20, 70);
    let common_bytes = std::fs::read(&shared).expect("read the common part");
    for k in 0..vms {
        let mut bytes = common_bytes.clone();
        if own > 0 {
            let part = dir.join(format!("own{k}.part"));
            make_image(&part, own << 20, 71 + k as u64);
            bytes.extend(std::fs::read(&part).expect("read the own part"));
        }
        let path = dir.join(format!("img{k}.img"));
        std::fs::write(&path, bytes).expect("write an image");
        // On disk, as base images are: a page not yet written back cannot leave the page cache
        // when the guests' pages move to the store.
        std::fs::File::open(&path).and_then(|f| f.sync_all()).expect("sync an image");
    }
}

/// Runs `density` of `VMS` test guests in fphash mode, each on its own image `img{vm}.img`
/// with the disk options `disk_opts` (`,ro`: the defaults) and `extra` options; returns the
/// result and the consoles.
fn density(dir: &Path, disk_opts: &str, extra: &[&str]) -> (HashMap<String, i64>, Vec<String>) {
    density_with(dir, disk_opts, extra, "")
}

/// [`density`] with `cmdline_extra` added to every guest's command line.
fn density_with(
    dir: &Path,
    disk_opts: &str,
    extra: &[&str],
    cmdline_extra: &str,
) -> (HashMap<String, i64>, Vec<String>) {
    let kernel = test_guest();
    let cmdline = format!("testguest.mode=fphash testguest.hash=host {cmdline_extra}");
    let disk = format!("{}/img{{vm}}.img{disk_opts}", dir.display());
    let consoles = dir.join(format!("consoles{}{}", disk_opts.len(), extra.len()));
    let vms = VMS.to_string();
    let mut args = vec![
        "density",
        "--vms",
        &vms,
        "--timeout",
        "250",
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
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let outs = (0..VMS)
        .map(|vm| std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).expect("console"))
        .collect();
    (density_result(&result.stdout), outs)
}

/// What the guests hold on the host: their RAM, the store and the images' page cache.
fn held(r: &HashMap<String, i64>) -> u64 {
    (r["private_bytes"] + r["store_bytes"] + r["image_cache_bytes"]) as u64
}

/// Checks every guest's data and that the run saved at least 99 % of the ideal against
/// `baseline` (the same VMs copying their images, merging nothing), the ideal being the images'
/// bytes less their distinct pages'.
fn check(
    what: &str,
    r: &HashMap<String, i64>,
    outs: &[String],
    baseline: &HashMap<String, i64>,
    image_bytes: u64,
    distinct_bytes: u64,
) {
    for (vm, out) in outs.iter().enumerate() {
        assert!(out.contains("fphash: data intact"), "{what}: vm{vm}:\n{out}");
    }
    let saved = held(baseline).saturating_sub(held(r));
    let ideal = VMS as u64 * image_bytes - distinct_bytes;
    let percent = 100.0 * saved as f64 / ideal as f64;
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "{what}: {VMS} VMs x {} MiB: host holds {:.1} MiB (private {:.1}, store {:.1}, image page cache {:.1}) \
         against {:.1} MiB copied and unmerged; saved {:.1} of an ideal {:.1} MiB ({percent:.1} %); {} image \
         pages merged by content, {} hashed by the VMMs, {} hashes remembered",
        image_bytes / MIB,
        mib(held(r)),
        mib(r["private_bytes"] as u64),
        mib(r["store_bytes"] as u64),
        mib(r["image_cache_bytes"] as u64),
        mib(held(baseline)),
        mib(saved),
        mib(ideal),
        r["image_merged"],
        r["host_hashes_for_guests"],
        r["image_hashes_remembered"],
    );
    assert!(percent >= 99.0, "{what}: saved {percent:.1} % of the ideal: {r:?}");
}

#[test]
fn separate_copies_of_one_image_are_held_once_with_the_defaults() {
    let dir = tempdir();
    images(dir.as_path(), VMS, 16, 0);
    let (bytes, distinct) = (16 * MIB, 16 * MIB);
    let (baseline, _) = density(dir.as_path(), ",ro,share=off", &["--dedup", "off"]);
    let (threads, outs) = density(dir.as_path(), ",ro", &["--threads"]);
    check("one process", &threads, &outs, &baseline, bytes, distinct);
    let (processes, outs) = density(dir.as_path(), ",ro", &[]);
    check("processes with a broker", &processes, &outs, &baseline, bytes, distinct);
}

#[test]
fn images_whose_contents_overlap_are_held_once_per_distinct_page_with_the_defaults() {
    let dir = tempdir();
    images(dir.as_path(), VMS, 8, 8);
    // Each image: 8 MiB in common with the others, 8 MiB of its own.
    let (bytes, distinct) = (16 * MIB, (8 + 8 * VMS as u64) * MIB);
    let (baseline, _) = density(dir.as_path(), ",ro,share=off", &["--dedup", "off"]);
    let (processes, outs) = density(dir.as_path(), ",ro", &[]);
    check("mixed images, processes with a broker", &processes, &outs, &baseline, bytes, distinct);
}

/// Pages a guest leaves unreported (a file system's metadata is not file data) keep the image's
/// page cache only where they lie: one of them left mapping the image in a block whose other
/// pages merged by content would keep the whole folio around it (here up to 2 MiB), so it is
/// merged too (`docs/fphash.md`, "Read-only images").
#[test]
fn pages_left_unreported_do_not_keep_the_image_page_cache_of_pages_merged_by_content() {
    const EVERY: u64 = 64;
    let dir = tempdir();
    images(dir.as_path(), VMS, 16, 0);
    // Dropped from the host's page cache first: the guests' reads bring it in as they would
    // a cold base image's (written, the cache holds the writer's folios instead).
    for k in 0..VMS {
        drop_file_cache(&dir.as_path().join(format!("img{k}.img")));
    }
    let (bytes, distinct) = (16 * MIB, 16 * MIB);
    let unreported = (bytes / 4096).div_ceil(EVERY);
    let cmdline_extra = format!("testguest.unreported_every={EVERY} testguest.hold_ms=4000");
    let (baseline, _) = density(dir.as_path(), ",ro,share=off", &["--dedup", "off"]);
    let (processes, outs) = density_with(dir.as_path(), ",ro", &[], &cmdline_extra);
    for (vm, out) in outs.iter().enumerate() {
        assert!(out.contains(&format!("fphash: left {unreported} pages unreported")), "vm{vm}:\n{out}");
    }
    check(
        "every 64th page unreported, processes with a broker",
        &processes,
        &outs,
        &baseline,
        bytes,
        distinct,
    );
    println!(
        "pages left unreported: {} per VM; merged without a report: {}; image page cache left {:.2} MiB",
        unreported,
        processes["image_stragglers_merged"],
        processes["image_cache_bytes"] as f64 / MIB as f64
    );
    // At least the pages left: one the guest reports late (after a quiet scan interval) may be
    // merged before its report, which then finds it merged.
    assert!(processes["image_stragglers_merged"] >= (VMS as u64 * unreported) as i64, "{processes:?}");
    assert!(processes["image_cache_bytes"] < MIB as i64, "{processes:?}");
}

/// Asks the kernel to drop `path`'s clean pages from the page cache.
fn drop_file_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open an image");
    // SAFETY: plain syscall on an open descriptor; it changes only what the page cache keeps.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "fadvise {}", path.display());
}
