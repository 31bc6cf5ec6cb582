//! The VMM through the real binary and real KVM with the freestanding test guest: disks,
//! exit paths, console input and output.

use crate::common;

use std::time::Duration;

use common::{b3sum, finish, make_image, run, spawn, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(60);

fn guest_args<'a>(kernel: &'a str, mode: &'a str) -> Vec<&'a str> {
    vec!["run", "--kernel", kernel, "--cmdline", mode, "--timeout", "30"]
}

/// The test guest's write pattern (resources/test-guest/src/main.rs): byte `i` of sector `s`
/// is `"samepage"[i % 8] ^ s ^ (i / 8)`, all as u8.
fn expected_pattern(first_sector: u64, sectors: u64) -> Vec<u8> {
    (first_sector..first_sector + sectors)
        .flat_map(|s| (0..512usize).map(move |i| b"samepage"[i % 8] ^ (s as u8) ^ (i / 8) as u8))
        .collect()
}

#[test]
fn guest_hashes_of_disks_match_b3sum_and_writes_land() {
    let kernel = test_guest();
    let dir = tempdir();
    let ro = dir.as_path().join("base.img");
    let rw = dir.as_path().join("scratch.img");
    make_image(&ro, 4 << 20, 1);
    make_image(&rw, 2 << 20, 2);
    let (ro_hash, rw_hash) = (b3sum(&ro), b3sum(&rw));
    let ro_arg = format!("{},ro", ro.display());
    let rw_arg = rw.display().to_string();
    let mut args = guest_args(kernel.to_str().expect("path"), "testguest.mode=disks");
    args.extend(["--disk", &ro_arg, "--disk", &rw_arg]);
    let result = run(&args, LIMIT);
    println!("{}", result.stdout);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    println!("host b3sum: disk 0 {ro_hash}, disk 1 {rw_hash}");
    result.assert_line(&format!("disk 0: size {} blake3 {ro_hash}", 4 << 20));
    result.assert_line(&format!("disk 1: size {} blake3 {rw_hash}", 2 << 20));
    result.assert_line("disk 0: read-only, write rejected ok");
    result.assert_line("disk 1: write-readback ok");
    result.assert_line("disk 0: id \"samepage-disk0\"");
    assert_eq!(b3sum(&ro), ro_hash, "a read-only disk changed");
    let written = std::fs::read(&rw).expect("read scratch image");
    let sectors = (written.len() / 512) as u64;
    assert_eq!(
        &written[written.len() - 4096..],
        &expected_pattern(sectors - 8, 8)[..],
        "pattern missing from the image file"
    );
}

#[test]
fn one_read_only_image_backs_several_vms_at_once() {
    let kernel = test_guest();
    let dir = tempdir();
    let base = dir.as_path().join("base.img");
    make_image(&base, 1 << 20, 3);
    let hash = b3sum(&base);
    let disk = format!("{},ro", base.display());
    let kernel = kernel.to_str().expect("path");
    let children: Vec<_> = (0..3)
        .map(|_| {
            let mut args = guest_args(kernel, "testguest.mode=disks");
            args.extend(["--disk", &disk]);
            spawn(&args, None)
        })
        .collect();
    for child in children {
        let result = finish(child, LIMIT);
        assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
        result.assert_line(&format!("disk 0: size {} blake3 {hash}", 1 << 20));
    }
}

#[test]
fn a_writable_image_is_not_opened_by_two_vms() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("rw.img");
    make_image(&image, 1 << 20, 4);
    let disk = image.display().to_string();
    let kernel = kernel.to_str().expect("path");
    let first_args =
        ["run", "--kernel", kernel, "--cmdline", "testguest.mode=spin", "--disk", &disk, "--timeout", "5"];
    let first = spawn(&first_args, None);
    std::thread::sleep(Duration::from_millis(500));
    let mut second_args = guest_args(kernel, "testguest.mode=disks");
    second_args.extend(["--disk", &disk]);
    let second = run(&second_args, LIMIT);
    second.assert_no_panic();
    assert_eq!(second.code, Some(1), "second VM should refuse the locked image: {}", second.stderr);
    assert!(second.stderr.contains(&disk), "{}", second.stderr);
    let first = finish(first, LIMIT);
    assert_eq!(first.code, Some(124));
}

#[test]
fn guest_exit_status_reaches_the_shell() {
    let kernel = test_guest();
    let result = run(&guest_args(kernel.to_str().expect("path"), "testguest.mode=exit=42"), LIMIT);
    result.assert_line("exit: 42");
    assert_eq!(result.code, Some(42));
}

#[test]
fn reboot_through_the_i8042_exits_zero() {
    let kernel = test_guest();
    let result = run(&guest_args(kernel.to_str().expect("path"), "testguest.mode=reboot"), LIMIT);
    result.assert_line("reboot: writing 0xfe to port 0x64");
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
}

#[test]
fn timeout_has_its_own_exit_code() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    let result =
        run(&["run", "--kernel", kernel, "--cmdline", "testguest.mode=spin", "--timeout", "2"], LIMIT);
    result.assert_line("spin: looping forever");
    assert_eq!(result.code, Some(124));
    assert!(result.stderr.contains("timeout"), "{}", result.stderr);
}

#[test]
fn triple_fault_names_the_exit_and_rip() {
    let kernel = test_guest();
    let result = run(&guest_args(kernel.to_str().expect("path"), "testguest.mode=triplefault"), LIMIT);
    println!("{}", result.stderr);
    result.assert_no_panic();
    assert_eq!(result.code, Some(125));
    let line = result.stderr.lines().find(|l| l.contains("guest crashed")).expect("crash line");
    assert!(line.contains("triple fault") && line.contains("RIP 0x"), "{line}");
}

#[test]
fn console_input_reaches_the_guest() {
    let kernel = test_guest();
    let child =
        spawn(&guest_args(kernel.to_str().expect("path"), "testguest.mode=echo"), Some(b"hello samepage\rq"));
    let result = finish(child, LIMIT);
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    assert!(result.stdout.contains("hello samepage"), "{}", result.stdout);
    result.assert_line("echo: done");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let kernel = test_guest();
    let child = spawn(&guest_args(kernel.to_str().expect("path"), "testguest.mode=spin"), None);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill on the pid of a child we started and have not yet reaped.
    unsafe { libc_kill(child.id() as i32, 15) };
    let result = finish(child, LIMIT);
    assert_eq!(result.code, Some(143));
    assert!(result.stderr.contains("stopped by signal 15"), "{}", result.stderr);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn serial_to_a_file_and_memory_above_4g_and_more_vcpus() {
    let kernel = test_guest();
    let dir = tempdir();
    let log = dir.as_path().join("console.log");
    let serial = format!("file:{}", log.display());
    let kernel = kernel.to_str().expect("path");
    let result = run(
        &[
            "run",
            "--kernel",
            kernel,
            "--cmdline",
            "testguest.mode=exit=0",
            "--serial",
            &serial,
            "--mem",
            "4G",
            "--vcpus",
            "4",
            "--timeout",
            "30",
        ],
        LIMIT,
    );
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    assert!(result.stdout.is_empty(), "console went to stdout: {}", result.stdout);
    let console = std::fs::read_to_string(&log).expect("console log");
    assert!(console.contains("samepage test guest: hello"), "{console}");
}
