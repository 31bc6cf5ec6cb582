//! The guest kernel held once (`docs/boot.md`, "The kernel held once"), through the real
//! binary, real KVM and the test guest (an ELF whose text and read-only data are one
//! read-only segment): every VM booting one kernel file maps those pages from the file's page
//! cache, copy-on-write, instead of holding its own copy; and a kernel file rewritten on the
//! host while a VM runs is copied into the guest's memory first (a read lease), so the guest
//! runs on, from its own copy of its code.

use crate::common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::linux::{file_mappings, metric, read_metrics, LiveVm};
use common::{density_result, kernel_read_only_pages, make_image, run, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(120);
const PAGE: u64 = 4096;

fn vms_hold_one_copy_of_the_kernel(threads: bool) {
    let kernel = test_guest();
    let per_vm = kernel_read_only_pages(&kernel);
    assert!(per_vm >= 16, "the test guest's text and read-only data: {per_vm} pages");
    let vms = 4u64;
    let mut args =
        vec!["density", "--vms", "4", "--kernel", kernel.to_str().expect("path"), "--timeout", "60"];
    if threads {
        args.push("--threads");
    }
    let result = run(&args, LIMIT);
    println!("{}", result.stdout);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "stderr:\n{}", result.stderr);
    let r = density_result(&result.stdout);
    let pages = (vms * per_vm) as i64;
    // Every VM's read-only kernel pages map the file; none was written; one copy is held.
    assert_eq!((r["kernel_pages"], r["kernel_mapped"], r["kernel_cow_breaks"]), (pages, pages, 0), "{r:?}");
    assert_eq!(r["kernel_saved_bytes"], ((vms - 1) * per_vm * PAGE) as i64, "{r:?}");
    assert_eq!(r["vmas"], r["vmas_counted"], "the engine's VMA count with the kernel mapped: {r:?}");
    assert_eq!(r["image_pages"], 0, "kernel pages are not counted as a disk's: {r:?}");
    println!(
        "{}: {vms} VMs map {pages} pages of the kernel's text and read-only data from one {per_vm}-page \
         copy: {} KiB saved; VMAs counted {} = measured {}",
        if threads { "threads" } else { "processes" },
        r["kernel_saved_bytes"] / 1024,
        r["vmas_counted"],
        r["vmas"]
    );
}

#[test]
fn vms_of_one_process_booting_one_kernel_file_hold_its_text_once() {
    vms_hold_one_copy_of_the_kernel(true);
}

#[test]
fn vm_processes_booting_one_kernel_file_hold_its_text_once() {
    vms_hold_one_copy_of_the_kernel(false);
}

/// The kernel file is overwritten with other bytes while its guest runs from it: the guest's
/// code must stay what was loaded (its pages copied before the writer goes on), or the guest
/// crashes the moment it runs the new bytes.
#[test]
fn a_kernel_file_rewritten_while_its_guest_runs_leaves_the_guest_running() {
    let dir = tempdir();
    let kernel = dir.as_path().join("kernel.elf");
    std::fs::copy(test_guest(), &kernel).expect("copy the test guest");
    let per_vm = kernel_read_only_pages(&kernel);
    let image = dir.as_path().join("files.img");
    make_image(&image, 256 * PAGE as usize, 91);
    let metrics = dir.as_path().join("vm.json");
    let disk = format!("{},ro", image.display());
    let mut vm = LiveVm::start(&[
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--cmdline",
        "testguest.mode=fphash testguest.hold_ms=5000",
        "--metrics",
        metrics.to_str().expect("path"),
        "--timeout",
        "100",
    ]);
    vm.wait_for_line("fphash: holding", Duration::from_secs(60));
    let mapped = file_mappings(vm.pid(), &kernel);
    assert!(mapped.vmas >= 1, "the VMM maps the kernel file: {mapped:?}");

    // Other bytes over the whole file, in place (an open for writing breaks the lease).
    let len = std::fs::metadata(&kernel).expect("stat").len() as usize;
    let started = Instant::now();
    let mut file =
        std::fs::OpenOptions::new().write(true).open(&kernel).expect("open the kernel for writing");
    let opened = started.elapsed();
    file.write_all(&vec![0xcc; len]).expect("overwrite the kernel");
    file.sync_all().expect("sync");
    drop(file);

    let run = vm.finish(LIMIT);
    println!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "the guest ran the new bytes");
    run.assert_line("fphash: data intact after the hold");
    let warned: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("is being written or truncated by another process"))
        .collect();
    assert!(
        warned.len() == 1 && warned[0].contains(&format!("kernel {}", kernel.display())),
        "one warning naming the kernel:\n{}",
        run.stderr
    );
    assert!(opened < Duration::from_secs(10), "the writer waited {opened:?} (the lease was not released)");
    let m = read_metrics(&metrics).expect("metrics");
    assert_eq!(metric(&m, "/dedup/kernel_mapped"), per_vm, "{m}");
    assert_eq!(metric(&m, "/dedup/kernel_pages"), 0, "no page maps the file any more: {m}");
    assert_eq!(metric(&m, "/dedup/image_unshared_pages"), per_vm, "the kernel's pages were copied: {m}");
    assert_eq!(metric(&m, "/dedup/images_unshared"), 1, "only the kernel file was given up: {m}");
    println!(
        "the guest ran from {per_vm} pages mapped from its kernel file ({} VMA(s)); the file was \
         overwritten in place: the writer's open waited {:.1} ms, the pages were copied first and \
         the guest finished its hold intact",
        mapped.vmas,
        opened.as_secs_f64() * 1e3
    );
}
