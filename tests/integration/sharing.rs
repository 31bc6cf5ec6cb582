//! Read-only images shared page by page (`docs/fphash.md`, "Read-only images"), through the
//! real binary, real KVM and the test guest: VMs reading one image map its page cache instead
//! of copying it, their fphash reports then merge the pages by content (one host copy, the
//! store's, and the image's page cache given back), a guest's writes get it its own copies,
//! and reads that cannot map (unaligned) are copied and merged as before.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{density_result, make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(240);
const PAGE: i64 = 4096;
const MIB: f64 = 1048576.0;

/// Runs `density` of 2 test guests in fphash mode on one read-only `mib` MiB image, with the
/// disk suffix `disk_opts` and `extra` options; returns the result and the consoles.
fn density(mib: usize, seed: u64, disk_opts: &str, extra: &[&str]) -> (HashMap<String, i64>, Vec<String>) {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    make_image(&image, mib << 20, seed);
    // On disk, as base images are: a page the image's writer has not flushed yet cannot leave
    // the page cache when the guests' pages move to the store.
    std::fs::File::open(&image).and_then(|f| f.sync_all()).expect("sync the image");
    let disk = format!("{}{disk_opts}", image.display());
    let consoles = dir.as_path().join("consoles");
    let mut args = vec![
        "density",
        "--vms",
        "2",
        "--timeout",
        "200",
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--cmdline",
        "testguest.mode=fphash",
        "--console-dir",
        consoles.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    let result = run(&args, LIMIT);
    println!("{}", result.stdout);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    let outs = (0..2)
        .map(|vm| std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).expect("console"))
        .collect();
    (density_result(&result.stdout), outs)
}

#[test]
fn vms_reading_one_read_only_image_map_its_page_cache_instead_of_copying_it() {
    let pages = (16 << 20) / PAGE;
    // Sharing alone (nothing merges the reported pages): the guests map the image's page cache.
    let (shared, outs) = density(16, 61, ",ro", &["--dedup", "off"]);
    for (vm, out) in outs.iter().enumerate() {
        assert!(out.contains("fphash: data intact"), "vm{vm}:\n{out}");
    }
    // The defaults: the same reads, and the reports merge the pages by content into the store,
    // which then backs them; the image's page cache is given back.
    let (merged, outs) = density(16, 61, ",ro", &[]);
    for (vm, out) in outs.iter().enumerate() {
        assert!(out.contains("fphash: data intact"), "vm{vm}:\n{out}");
        assert!(
            out.contains(&format!("fphash: reported {pages} pages: merged {pages} already 0 ")),
            "vm{vm}:\n{out}"
        );
    }
    let (copied, _) = density(16, 61, ",ro,share=off", &[]);
    let line = |what: &str, r: &HashMap<String, i64>| {
        format!(
            "{what}: {} guest pages map the image, {} merged from it, page cache {:.1} MiB, private {:.1} MiB, \
             pages hashed {}, store {:.1} MiB, host {:.1} MiB",
            r["image_pages"],
            r["image_merged"],
            r["image_cache_bytes"] as f64 / MIB,
            r["private_bytes"] as f64 / MIB,
            r["host_hashes"],
            r["store_bytes"] as f64 / MIB,
            r["host_bytes"] as f64 / MIB,
        )
    };
    println!(
        "2 VMs x 16 MiB\n{}\n{}\n{}",
        line("shared, not merged", &shared),
        line("shared, then merged (defaults)", &merged),
        line("copied, then merged", &copied)
    );
    // Sharing alone: one copy on the host, the image's page cache; no hash.
    assert_eq!((shared["image_pages"], shared["host_hashes"], shared["store_pages"]), (2 * pages, 0, 0));
    assert!(shared["image_cache_bytes"] >= 16 << 20, "{shared:?}");
    assert!(shared["private_bytes"] < 8 << 20, "the guests hold copies: {shared:?}");
    assert!(shared["image_saved_bytes"] >= 15 << 20, "{shared:?}");
    // The defaults: one copy on the host, the store's; each page hashed once (by the store, the
    // first time it is offered), the image's page cache given back.
    assert_eq!(
        (merged["image_pages"], merged["image_merged"], merged["store_pages"], merged["host_hashes"]),
        (0, 2 * pages, pages, pages),
        "{merged:?}"
    );
    assert!(merged["image_cache_bytes"] < 1 << 20, "the image's page cache stayed: {merged:?}");
    assert!(merged["private_bytes"] < 8 << 20, "the guests hold copies: {merged:?}");
    assert!(merged["host_bytes"] < 26 << 20, "more than one copy on the host: {merged:?}");
    // Without sharing the same pages are copied, then hashed and merged.
    assert_eq!((copied["image_pages"], copied["host_hashes"]), (0, pages), "{copied:?}");
}

#[test]
fn a_guest_writing_shared_image_pages_gets_its_own_copies() {
    let pages = (8 << 20) / PAGE;
    // `--dedup off`: the pages stay image pages (merging would move them into the store first).
    let (r, outs) = density(
        8,
        62,
        ",ro",
        &[
            "--dedup",
            "off",
            "--vm-cmdline",
            "0:testguest.hold_ms=3000",
            "--vm-cmdline",
            "1:testguest.write_every=1",
        ],
    );
    assert!(outs[1].contains(&format!("fphash: wrote {pages} pages, own copies changed ok")), "{}", outs[1]);
    assert!(
        outs[0].contains("fphash: data intact after the hold"),
        "the reader saw the writer's bytes:\n{}",
        outs[0]
    );
    println!(
        "writer copied {} image pages on write; {} still map the image",
        r["image_cow_breaks"], r["image_pages"]
    );
    assert_eq!(r["image_cow_breaks"], pages, "{r:?}");
    assert_eq!(r["image_pages"], pages, "only the reader's pages still map the image: {r:?}");
}

#[test]
fn reads_that_cannot_map_are_copied_and_merged_as_before() {
    let pages = (8 << 20) / PAGE;
    // One sector into the disk: no read's image offset falls on a page boundary.
    let (r, outs) = density(
        8,
        63,
        ",ro",
        &["--vm-cmdline", "0:testguest.skew_sectors=1", "--vm-cmdline", "1:testguest.skew_sectors=1"],
    );
    for out in &outs {
        assert!(out.contains("fphash: data intact"), "{out}");
    }
    println!(
        "skewed reads: {} image pages mapped, {} pages merged, {} hashed",
        r["image_mapped"], r["merged"], r["host_hashes"]
    );
    assert_eq!(r["image_mapped"], 0, "{r:?}");
    assert_eq!(r["merged"], 2 * pages, "{r:?}");
}
