//! The VMA count of shared read-only images (`docs/fphash.md`, "Read-only images"), through
//! the real binary, real KVM and the test guest: one image attached twice is two open files,
//! whose pages the kernel never joins into one VMA, so a guest that reads the two disks page
//! by page, alternating, costs a VMA per page, and samepage's count must say so (it must never
//! be below the kernel's).

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{b3sum, finish, make_image, samepage, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(120);

/// Lines of `/proc/PID/maps`, and those that map `path`.
fn maps(pid: u32, path: &str) -> (usize, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    (maps.lines().count(), maps.lines().filter(|l| l.ends_with(path)).count())
}

/// The VMM's `--metrics` JSON.
fn metrics(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read metrics");
    serde_json::from_str(&text).expect("metrics JSON")
}

#[test]
fn one_image_on_two_disks_read_alternately_is_counted_a_vma_per_page() {
    let dir = tempdir();
    let image = dir.as_path().join("twice.img");
    let pages = 2048;
    make_image(&image, pages * 4096, 71);
    let image_path = image.to_str().expect("path").to_string();
    let metrics_path = dir.as_path().join("metrics.json");
    let disk = format!("{image_path},ro");
    let kernel = test_guest();
    let mut child = samepage()
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--timeout", "100"])
        .args(["--disk", &disk, "--disk", &disk])
        .args(["--cmdline", "testguest.mode=alternate testguest.hold_ms=4000"])
        .args(["--metrics", metrics_path.to_str().expect("path")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    let pid = child.id();
    // The console, line by line, until the guest holds its pages.
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut console = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            console.push_str(&line);
            console.push('\n');
        }
        console
    });
    let start = Instant::now();
    loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("the guest never held its pages");
        if line.starts_with("alternate: holding") {
            break;
        }
    }
    // While the guest holds: the kernel's VMAs, and samepage's count once the metrics file
    // was rewritten (every second), then the kernel's again.
    let (total_before, image_vmas_before) = maps(pid, &image_path);
    std::thread::sleep(Duration::from_millis(1500));
    let during = metrics(&metrics_path);
    let (total_after, image_vmas) = maps(pid, &image_path);
    let counted = during["dedup"]["vmas"].as_u64().expect("dedup.vmas");
    let held_for = start.elapsed();

    let mut result = finish(child, LIMIT);
    result.stdout = reader.join().expect("console reader");
    let last = metrics(&metrics_path);
    let (counted_at_end, kernel_at_end, undercount) = (
        last["vmas_counted"].as_u64().expect("vmas_counted"),
        last["dedup"]["vmas"].as_u64().expect("dedup.vmas"),
        last["dedup"]["vma_undercount_max"].as_u64().expect("vma_undercount_max"),
    );
    println!(
        "{pages} pages read alternately from 2 disks of one image: while the guest held them, the \
         kernel had {image_vmas_before}/{image_vmas} VMAs mapping the image ({total_before}/{total_after} \
         in the process), samepage counted {counted} for guest RAM; at the end samepage counted \
         {counted_at_end}, the kernel had {kernel_at_end} (undercount {undercount}); {:.1} s\n\
         console:\n{}\nstderr:\n{}",
        held_for.as_secs_f64(),
        result.stdout,
        result.stderr
    );
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    result.assert_line("alternate: data intact after the hold");
    assert!(
        result.stdout.contains(&format!("alternating disks 0 and 1: blake3 {}", b3sum(&image))),
        "the guest did not read the image in order"
    );
    // Every page maps the image, and no two neighbours the same open file.
    assert_eq!(image_vmas, pages, "kernel VMAs mapping the image");
    assert!(
        counted as usize >= image_vmas,
        "samepage counted {counted} VMAs of guest RAM where the kernel has {image_vmas} mapping the image alone"
    );
    assert!(
        counted_at_end >= kernel_at_end && undercount == 0,
        "at the end samepage counted {counted_at_end} VMAs, the kernel had {kernel_at_end} (undercount {undercount})"
    );
}
