//! A shared read-only image changed on the host while VMs map it (`docs/fphash.md`,
//! "Read-only images"), through the real binary, real KVM and the test guest: samepage holds a
//! read lease on each shared image, so a writer's `open` or a `truncate` waits until the VMM has
//! copied the guest pages that map the image into the guest's own memory; the guests keep the
//! bytes they read, the writer goes on within a moment (not after the kernel's 45 s lease-break
//! time), and an image samepage cannot lease is copied from the start.
//!
//! The guests run with `--dedup off`: with merging on, their reports would move the pages they
//! read from the image into the store (merged by content), and nothing would map the image
//! when it changes; off, every page they read still maps the image, which is what a lease
//! break must copy.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{density_result, finish, make_image, samepage, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(120);
/// How long the guests hold their pages: the host changes the image meanwhile.
const HOLD_MS: u64 = 6000;
/// A writer that waited this long was not let through by samepage (the kernel's lease-break
/// time is 45 s).
const WRITER_WITHIN: Duration = Duration::from_secs(10);
/// The warning a VMM logs when a shared image's lease breaks.
const WARNING: &str = "is being written or truncated by another process";

/// A `samepage run` of the test guest in fphash mode on `image` (read-only), its console read
/// line by line as it comes.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    console: JoinHandle<String>,
}

impl Vm {
    /// A VM whose reads map the image and stay mapped (`--dedup off`: nothing merges them).
    fn start(image: &Path, cmdline: &str, metrics: &Path) -> Vm {
        Vm::start_with(image, cmdline, metrics, "off")
    }

    fn start_with(image: &Path, cmdline: &str, metrics: &Path, dedup: &str) -> Vm {
        let kernel = test_guest();
        let mut child = samepage()
            .args(["run", "--kernel", kernel.to_str().expect("path"), "--timeout", "100", "--dedup", dedup])
            .arg("--disk")
            .arg(format!("{},ro", image.display()))
            .args(["--cmdline", &format!("testguest.mode=fphash {cmdline}")])
            .args(["--metrics", metrics.to_str().expect("path")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let console = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        Vm { child, lines, console }
    }

    /// Waits for a console line starting with `prefix`; returns when it was seen.
    fn wait_for(&self, prefix: &str) -> Instant {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.starts_with(prefix) => return Instant::now(),
                Ok(_) => {}
                Err(e) => panic!("no console line {prefix:?}: {e}"),
            }
        }
    }

    fn finish(self) -> common::Run {
        let mut run = finish(self.child, LIMIT);
        run.stdout = self.console.join().expect("console reader");
        run
    }
}

/// A number from a `--metrics` file, by JSON pointer (`None` if it has none).
fn metric(path: &Path, pointer: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).expect("read metrics");
    let json: serde_json::Value = serde_json::from_str(&text).expect("metrics JSON");
    json.pointer(pointer).and_then(serde_json::Value::as_u64)
}

/// Opens `image` for writing (without truncating it) and writes other bytes over all of it;
/// returns how long the open waited and the whole write took.
fn rewrite_in_place(image: &Path, seed: u64) -> (Duration, Duration) {
    let len = std::fs::metadata(image).expect("stat").len() as usize;
    let other = image.with_extension("new");
    make_image(&other, len, seed);
    let bytes = std::fs::read(&other).expect("read new image");
    let start = Instant::now();
    let mut file = std::fs::OpenOptions::new().write(true).open(image).expect("open the image for writing");
    let opened = start.elapsed();
    file.write_all(&bytes).expect("rewrite the image");
    file.sync_all().expect("sync");
    (opened, start.elapsed())
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(WARNING)).collect()
}

#[test]
fn rewriting_an_image_in_place_leaves_the_guests_data_intact() {
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    let pages = 2048;
    make_image(&image, pages * 4096, 81);
    let hold = format!("testguest.hold_ms={HOLD_MS}");
    let metrics: Vec<_> = (0..2).map(|i| dir.as_path().join(format!("vm{i}.json"))).collect();
    let vms: Vec<Vm> = metrics.iter().map(|m| Vm::start(&image, &hold, m)).collect();
    let holding = vms.iter().map(|vm| vm.wait_for("fphash: holding")).max().expect("two VMs");
    let (opened, written) = rewrite_in_place(&image, 82);
    let landed = holding.elapsed();
    let runs: Vec<common::Run> = vms.into_iter().map(Vm::finish).collect();
    let figures: Vec<_> = metrics
        .iter()
        .map(|m| {
            (
                metric(m, "/dedup/image_mapped"),
                metric(m, "/dedup/image_unshared_pages"),
                metric(m, "/dedup/image_pages"),
                metric(m, "/dedup/vma_undercount_max"),
            )
        })
        .collect();
    println!(
        "2 VMs hold {pages} pages of a shared image; a writer's open waited {:.0} ms, its rewrite of \
         the whole image ended {:.0} ms after the open began ({:.0} ms into the guests' {HOLD_MS} ms \
         hold); per VM (pages mapped, copied at the lease break, still mapping the image at the end, \
         VMA undercount): \
         {figures:?}",
        opened.as_secs_f64() * 1e3,
        written.as_secs_f64() * 1e3,
        landed.as_secs_f64() * 1e3,
    );
    for (i, run) in runs.iter().enumerate() {
        println!("vm{i}: exit {:?}\nconsole:\n{}\nstderr:\n{}", run.code, run.stdout, run.stderr);
    }
    // The new bytes were on the host before the guests checked theirs at the end of the hold.
    assert!(landed < Duration::from_millis(HOLD_MS - 1000), "the rewrite ended after the hold: {landed:?}");
    assert!(opened < WRITER_WITHIN, "the writer waited {opened:?} (the lease was not released)");
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.code, Some(0), "vm{i}: the guest saw the rewritten image:\n{}", run.stdout);
        run.assert_line("fphash: data intact after the hold");
        let warned = warnings(&run.stderr);
        assert!(
            warned.len() == 1 && warned[0].contains(image.to_str().expect("path")),
            "vm{i}: one warning naming the image:\n{}",
            run.stderr
        );
        let pages = Some(pages as u64);
        assert_eq!(figures[i], (pages, pages, Some(0), Some(0)), "vm{i}");
    }
}

#[test]
fn truncating_an_image_while_a_guest_holds_it_leaves_the_guest_running() {
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    let pages = 2048;
    make_image(&image, pages * 4096, 83);
    let metrics = dir.as_path().join("vm.json");
    let vm = Vm::start(&image, &format!("testguest.hold_ms={HOLD_MS}"), &metrics);
    let holding = vm.wait_for("fphash: holding");
    let path = std::ffi::CString::new(image.to_str().expect("path")).expect("no NUL");
    let start = Instant::now();
    // SAFETY: a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::truncate(path.as_ptr(), 0) };
    let truncated = start.elapsed();
    assert_eq!(rc, 0, "truncate: {}", std::io::Error::last_os_error());
    let landed = holding.elapsed();
    let run = vm.finish();
    let unshared = metric(&metrics, "/dedup/image_unshared_pages");
    println!(
        "truncate of a shared {pages}-page image waited {:.0} ms ({:.0} ms into the guest's {HOLD_MS} ms \
         hold); {unshared:?} guest pages copied; exit {:?}\nconsole:\n{}\nstderr:\n{}",
        truncated.as_secs_f64() * 1e3,
        landed.as_secs_f64() * 1e3,
        run.code,
        run.stdout,
        run.stderr
    );
    assert!(landed < Duration::from_millis(HOLD_MS - 1000), "the truncate ended after the hold: {landed:?}");
    assert!(truncated < WRITER_WITHIN, "truncate waited {truncated:?}");
    assert_eq!(run.code, Some(0), "the guest did not survive the truncation: {}", run.stderr);
    run.assert_line("fphash: data intact after the hold");
    assert_eq!(warnings(&run.stderr).len(), 1, "{}", run.stderr);
    assert_eq!(unshared, Some(pages as u64));
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), 0);
}

#[test]
fn an_image_open_for_writing_elsewhere_is_copied_not_shared() {
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    let pages = 1024;
    make_image(&image, pages * 4096, 84);
    // Another program has the image open for writing when the VM starts: no read lease.
    let writer = std::fs::OpenOptions::new().write(true).open(&image).expect("open for writing");
    let metrics = dir.as_path().join("vm.json");
    let vm = Vm::start_with(&image, "", &metrics, "hinted");
    let run = vm.finish();
    drop(writer);
    let (mapped, shared, merged) = (
        metric(&metrics, "/dedup/image_mapped"),
        metric(&metrics, "/fphash/records"),
        metric(&metrics, "/dedup/merged"),
    );
    println!(
        "image open for writing elsewhere: {mapped:?} pages mapped from it, {shared:?} reported, \
         {merged:?} merged; exit {:?}\nstderr:\n{}",
        run.code, run.stderr
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    run.assert_line("fphash: data intact");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines.len() == 1
            && lines[0].contains(image.to_str().expect("path"))
            && lines[0].contains("copied, not shared"),
        "one warning line naming the image:\n{}",
        run.stderr
    );
    // The reads were copied: nothing maps the image; the copies merge as any page does.
    assert_eq!((mapped, merged), (Some(0), Some(pages as u64)));
}

#[test]
fn density_with_threads_gives_up_a_rewritten_image_in_every_vm() {
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    let pages = 2048;
    make_image(&image, pages * 4096, 85);
    let consoles = dir.as_path().join("consoles");
    let kernel = test_guest();
    let child = samepage()
        .args(["density", "--threads", "--vms", "2", "--timeout", "100", "--dedup", "off"])
        .args(["--kernel", kernel.to_str().expect("path")])
        .arg("--disk")
        .arg(format!("{},ro", image.display()))
        .args(["--cmdline", &format!("testguest.mode=fphash testguest.hold_ms={HOLD_MS}")])
        .args(["--console-dir", consoles.to_str().expect("path")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage density");
    let console =
        |vm: usize| std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).unwrap_or_default();
    let start = Instant::now();
    while !(0..2).all(|vm| console(vm).contains("fphash: holding")) {
        assert!(start.elapsed() < Duration::from_secs(60), "the guests never held their pages");
        std::thread::sleep(Duration::from_millis(50));
    }
    let holding = Instant::now();
    let (opened, _) = rewrite_in_place(&image, 86);
    let landed = holding.elapsed();
    let run = finish(child, LIMIT);
    let all = density_result(&run.stdout);
    // -1: a figure this binary does not report.
    let result = |name: &str| all.get(name).copied().unwrap_or(-1);
    println!(
        "density --threads, 2 VMs: the writer's open waited {:.0} ms, the rewrite landed {:.0} ms into \
         the hold; image pages mapped {}, copied at the lease breaks {}, still mapping at the end {}, \
         VMA undercount {}\nstderr:\n{}",
        opened.as_secs_f64() * 1e3,
        landed.as_secs_f64() * 1e3,
        result("image_mapped"),
        result("image_unshared_pages"),
        result("image_pages"),
        result("vma_undercount_max"),
        run.stderr
    );
    assert!(landed < Duration::from_millis(HOLD_MS - 1000), "the rewrite ended after the hold: {landed:?}");
    assert!(opened < WRITER_WITHIN, "the writer waited {opened:?}");
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    for vm in 0..2 {
        assert!(console(vm).contains("fphash: data intact after the hold"), "vm{vm}:\n{}", console(vm));
    }
    assert_eq!(warnings(&run.stderr).len(), 2, "one warning per VM:\n{}", run.stderr);
    let p = pages as i64;
    assert_eq!(
        (
            result("image_mapped"),
            result("image_unshared_pages"),
            result("image_pages"),
            result("vma_undercount_max")
        ),
        (2 * p, 2 * p, 0, 0),
        "{all:?}"
    );
}

#[test]
fn a_writable_samepage_disk_on_a_shared_image_is_refused_and_the_readers_give_it_up() {
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    make_image(&image, 1024 * 4096, 87);
    let metrics = dir.as_path().join("vm.json");
    let reader = Vm::start(&image, &format!("testguest.hold_ms={HOLD_MS}"), &metrics);
    reader.wait_for("fphash: holding");
    // Another VMM wants the image as its writable disk: its open is non-blocking.
    let kernel = test_guest();
    let start = Instant::now();
    let writer = samepage()
        .args(["run", "--serial", "none", "--timeout", "30", "--kernel", kernel.to_str().expect("path")])
        .arg("--disk")
        .arg(&image)
        .stdin(Stdio::null())
        .output()
        .expect("run samepage");
    let refused_after = start.elapsed();
    let writer_stderr = String::from_utf8_lossy(&writer.stderr).into_owned();
    let run = reader.finish();
    println!(
        "writable disk: exit {:?} after {:.0} ms: {writer_stderr}reader: exit {:?}, stderr:\n{}",
        writer.status.code(),
        refused_after.as_secs_f64() * 1e3,
        run.code,
        run.stderr
    );
    assert_eq!(writer.status.code(), Some(1), "{writer_stderr}");
    assert!(writer_stderr.contains("is in use by another process"), "{writer_stderr}");
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    run.assert_line("fphash: data intact after the hold");
    assert_eq!(warnings(&run.stderr).len(), 1, "{}", run.stderr);
}
