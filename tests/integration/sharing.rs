//! Read-only images shared page by page (`docs/fphash.md`, "Read-only images"), through the
//! real binary, real KVM and the test guest: VMs reading one image map its page cache instead
//! of copying it, their fphash reports cost no hash, a guest's writes get it its own copies,
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
    let (shared, outs) = density(16, 61, ",ro", &[]);
    for (vm, out) in outs.iter().enumerate() {
        assert!(out.contains("fphash: data intact"), "vm{vm}:\n{out}");
        // Every page the guest reports maps the image already: answered without a hash.
        assert!(
            out.contains(&format!("fphash: reported {pages} pages: merged 0 already {pages} ")),
            "vm{vm}:\n{out}"
        );
    }
    let (copied, _) = density(16, 61, ",ro,share=off", &[]);
    println!(
        "2 VMs x 16 MiB, shared: {} guest pages map the image, page cache {:.1} MiB, private {:.1} MiB, \
         pages hashed {}, store {:.1} MiB, host {:.1} MiB | copied and merged: private {:.1} MiB, pages \
         hashed {}, store {:.1} MiB, host {:.1} MiB",
        shared["image_pages"],
        shared["image_cache_bytes"] as f64 / MIB,
        shared["private_bytes"] as f64 / MIB,
        shared["host_hashes"],
        shared["store_bytes"] as f64 / MIB,
        shared["host_bytes"] as f64 / MIB,
        copied["private_bytes"] as f64 / MIB,
        copied["host_hashes"],
        copied["store_bytes"] as f64 / MIB,
        copied["host_bytes"] as f64 / MIB,
    );
    assert_eq!(shared["image_pages"], 2 * pages, "{shared:?}");
    assert_eq!(
        (shared["image_already"], shared["host_hashes"], shared["store_pages"]),
        (2 * pages, 0, 0),
        "{shared:?}"
    );
    // One copy on the host: the image's page cache; the guests' own memory holds none of it.
    assert!(shared["image_cache_bytes"] >= 16 << 20, "{shared:?}");
    assert!(shared["private_bytes"] < 8 << 20, "the guests hold copies: {shared:?}");
    assert!(shared["image_saved_bytes"] >= 15 << 20, "{shared:?}");
    // Without sharing the same pages are copied, then hashed and merged.
    assert_eq!((copied["image_pages"], copied["host_hashes"]), (0, pages), "{copied:?}");
}

#[test]
fn a_guest_writing_shared_image_pages_gets_its_own_copies() {
    let pages = (8 << 20) / PAGE;
    let (r, outs) = density(
        8,
        62,
        ",ro",
        &["--vm-cmdline", "0:testguest.hold_ms=3000", "--vm-cmdline", "1:testguest.write_every=1"],
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
