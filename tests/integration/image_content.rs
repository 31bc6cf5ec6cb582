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
    let kernel = test_guest();
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
        "testguest.mode=fphash testguest.hash=host",
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
