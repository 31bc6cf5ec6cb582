//! The VMA count of shared read-only images (`docs/fphash.md`, "Read-only images"), through
//! the real binary, real KVM and the test guest: one image attached twice is two open files,
//! whose pages the kernel never joins into one VMA, so a guest that reads the two disks page
//! by page, alternating, costs a VMA per page, and samepage's count must say so (it must never
//! be below the kernel's). Under `scripts/stress.sh` the guest reads past the VMA budget
//! below `vm.max_map_count`, which must then stop the mapping, with the budget's warning,
//! before the kernel refuses an `mmap`.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{b3sum, finish, make_image, samepage, stress_factor, tempdir, test_guest};

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
    let max_map_count: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65_530);
    // 2048 pages here; under scripts/stress.sh, more than the process may map.
    let past_budget = stress_factor() > 1;
    let pages = if past_budget { max_map_count + 2048 } else { 2048 };
    // The pages and their hashes must fit in the test guest's RAM below 3 GiB.
    assert!(pages < 600_000, "vm.max_map_count {max_map_count} is too large for this test's guest");
    // The pages, 32 bytes of hash each, and room for the guest itself.
    let mem = format!("{}M", ((pages * 4096 * 33 / 32) >> 20) + 64);
    let dir = tempdir();
    let image = dir.as_path().join("twice.img");
    make_image(&image, pages * 4096, 71);
    let image_path = image.to_str().expect("path").to_string();
    let metrics_path = dir.as_path().join("metrics.json");
    let disk = format!("{image_path},ro");
    let kernel = test_guest();
    let mut child = samepage()
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--timeout", "300", "--mem", &mem])
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
        let line = lines.recv_timeout(Duration::from_secs(240)).expect("the guest never held its pages");
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
    let figure = |pointer: &str| last.pointer(pointer).and_then(serde_json::Value::as_u64).expect(pointer);
    let (counted_at_end, kernel_at_end, undercount) =
        (figure("/vmas_counted"), figure("/dedup/vmas"), figure("/dedup/vma_undercount_max"));
    let (mapped, no_room, process_vmas) =
        (figure("/dedup/image_mapped"), figure("/dedup/image_no_room"), figure("/process_vmas"));
    println!(
        "{pages} pages read alternately from 2 disks of one image (vm.max_map_count {max_map_count}): while \
         the guest held them, the kernel had {image_vmas_before}/{image_vmas} VMAs mapping the image \
         ({total_before}/{total_after} in the process), samepage counted {counted} for guest RAM; at the \
         end samepage counted {counted_at_end}, the kernel had {kernel_at_end} (undercount {undercount}); \
         {mapped} pages mapped, {no_room} reads copied for want of VMAs, {process_vmas} VMAs in the process; \
         {:.1} s\nconsole:\n{}\nstderr:\n{}",
        held_for.as_secs_f64(),
        if past_budget { "(long)" } else { &result.stdout },
        result.stderr
    );
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    result.assert_line("alternate: data intact after the hold");
    assert!(
        result.stdout.contains(&format!("alternating disks 0 and 1: blake3 {}", b3sum(&image))),
        "the guest did not read the image in order"
    );
    assert!(!result.stderr.contains("failed"), "an mmap failed:\n{}", result.stderr);
    if past_budget {
        // The budget stopped the mapping, said so once, and the process stayed a reserve
        // below the kernel's limit.
        assert!(no_room > 0 && (mapped as usize) < pages, "the budget never stopped the mapping");
        assert_eq!(result.stderr.matches("VMA budget reached").count(), 1, "{}", result.stderr);
        assert!(process_vmas as usize + samepage::dedup::VMA_RESERVE <= max_map_count, "{process_vmas}");
    } else {
        assert_eq!(mapped as usize, pages, "every page maps the image");
    }
    // No two neighbours map the same open file: a VMA per mapped page.
    assert_eq!(image_vmas as u64, mapped, "kernel VMAs mapping the image");
    assert!(
        counted as usize >= image_vmas,
        "samepage counted {counted} VMAs of guest RAM where the kernel has {image_vmas} mapping the image alone"
    );
    assert!(
        counted_at_end >= kernel_at_end && undercount == 0,
        "at the end samepage counted {counted_at_end} VMAs, the kernel had {kernel_at_end} (undercount {undercount})"
    );
}
