//! Bad input on the command line: one clear error line, a non-zero exit, no panic.

use crate::common;

use std::time::Duration;

use common::{elf, mkfifo, run, tempdir, test_guest, test_guest_variant};

/// A start-up step that blocks (on a FIFO, say) outlasts this; a clean failure takes
/// milliseconds and a test guest run well under a second.
const LIMIT: Duration = Duration::from_secs(30);

fn assert_clean_failure(args: &[&str], expected: &str) {
    let result = run(args, LIMIT);
    println!("samepage {}\n  -> exit {:?}: {}", args.join(" "), result.code, result.stderr.trim());
    assert!(matches!(result.code, Some(c) if c != 0), "expected failure, got {:?}", result.code);
    result.assert_no_panic();
    assert!(result.stderr.contains(expected), "expected {expected:?} in stderr:\n{}", result.stderr);
    let error_lines = result.stderr.lines().filter(|l| l.contains("error")).count();
    assert_eq!(error_lines, 1, "expected one error line:\n{}", result.stderr);
}

#[test]
fn missing_kernel_file() {
    assert_clean_failure(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux",
    );
}

#[test]
fn file_that_is_no_kernel() {
    let dir = tempdir();
    let junk = dir.as_path().join("junk");
    common::make_image(&junk, 64 * 1024, 1);
    let junk = junk.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", junk], "is not a kernel samepage can boot");
}

#[test]
fn memory_too_small_or_malformed() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "1M"], "out of range");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "lots"], "invalid memory size 'lots'");
    assert_clean_failure(&["run", "--kernel", kernel, "--mem", "16385K"], "not a multiple of 4 KiB");
}

#[test]
fn unreadable_disks() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", "/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    let dir = tempdir();
    let dir_path = dir.as_path().to_str().expect("path").to_string();
    assert_clean_failure(&["run", "--kernel", kernel, "--disk", &dir_path], &dir_path);
    assert_clean_failure(&["run", "--kernel", kernel, "--disk", "x.img,sideways"], "invalid disk");
}

#[test]
fn bad_vcpu_counts_and_initrd() {
    let kernel = test_guest();
    let kernel = kernel.to_str().expect("path");
    assert_clean_failure(&["run", "--kernel", kernel, "--vcpus", "0"], "vCPU count 0 out of range");
    assert_clean_failure(&["run", "--kernel", kernel, "--vcpus", "33"], "vCPU count 33 out of range");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "cannot open initrd /nonexistent/initrd",
    );
}

/// clap's own usage errors: exit code 2 and one `error:` line.
fn assert_usage_error(args: &[&str], expected: &str) {
    let result = run(args, LIMIT);
    assert_eq!(result.code, Some(2), "expected clap's usage error code:\n{}", result.stderr);
    assert_clean_failure(args, expected);
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn progress_interval_out_of_range() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    for value in ["inf", "1e300", "-1", "NaN", "0", "86401"] {
        assert_usage_error(
            &[
                "density",
                "--vms",
                "1",
                "--kernel",
                kernel,
                "--timeout",
                "5",
                &format!("--progress-every={value}"),
            ],
            "invalid interval",
        );
    }
}

#[test]
fn fifos_as_kernel_initrd_or_console_fail_at_once() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let dir = tempdir();
    let fifo = dir.as_path().join("fifo");
    mkfifo(&fifo);
    let fifo = path_str(&fifo);
    assert_clean_failure(
        &["run", "--kernel", fifo, "--timeout", "2"],
        &format!("kernel {fifo} is a FIFO, not a regular file"),
    );
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", fifo, "--timeout", "2"],
        &format!("initrd {fifo} is a FIFO, not a regular file"),
    );
    assert_clean_failure(
        &["run", "--kernel", kernel, "--serial", &format!("file:{fifo}"), "--timeout", "2"],
        &format!("console file {fifo} is a FIFO, not a regular file or character device"),
    );
}

#[test]
fn kernel_too_big_for_guest_ram() {
    let dir = tempdir();
    // The data segment moved to 32 MiB: linux-loader cannot write it into 16 MiB of RAM.
    let high = dir.as_path().join("high.elf");
    test_guest_variant(&high, |b| {
        let at = elf::phdr_field(b, 1, elf::P_PADDR);
        b[at..at + 8].copy_from_slice(&0x200_0000u64.to_le_bytes());
    });
    assert_clean_failure(
        &["run", "--kernel", path_str(&high), "--mem", "16M"],
        "does not fit in guest RAM of 16 MiB: Kernel Loader: failed to load ELF kernel image",
    );
    // A 64 MiB .bss: the file loads, but the kernel would run past the end of RAM.
    let big_bss = dir.as_path().join("big-bss.elf");
    test_guest_variant(&big_bss, |b| {
        let at = elf::phdr_field(b, 1, elf::P_MEMSZ);
        b[at..at + 8].copy_from_slice(&0x400_0000u64.to_le_bytes());
    });
    assert_clean_failure(
        &["run", "--kernel", path_str(&big_bss), "--mem", "16M", "--timeout", "5"],
        "does not fit in guest RAM of 16 MiB",
    );
}

#[test]
fn foreign_elf_files_are_refused() {
    let dir = tempdir();
    let aarch64 = dir.as_path().join("aarch64.elf");
    test_guest_variant(&aarch64, |b| {
        b[elf::E_MACHINE..elf::E_MACHINE + 2].copy_from_slice(&183u16.to_le_bytes())
    });
    assert_clean_failure(
        &["run", "--kernel", path_str(&aarch64), "--timeout", "5"],
        "is an ELF for machine 183 (AArch64), not x86_64",
    );
    let class32 = dir.as_path().join("class32.elf");
    test_guest_variant(&class32, |b| b[elf::EI_CLASS] = 1);
    assert_clean_failure(&["run", "--kernel", path_str(&class32), "--timeout", "5"], "is a 32-bit ELF");
    let truncated = dir.as_path().join("truncated.elf");
    test_guest_variant(&truncated, |b| b.truncate(100));
    assert_clean_failure(
        &["run", "--kernel", path_str(&truncated), "--timeout", "5"],
        "cannot load ELF kernel",
    );
}

#[test]
fn initrds_that_no_memory_size_helps() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let dir = tempdir();
    let empty = dir.as_path().join("empty.cpio");
    std::fs::write(&empty, b"").expect("write");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", path_str(&empty)],
        &format!("initrd {} is empty", empty.display()),
    );
    let huge = dir.as_path().join("huge.cpio");
    std::fs::File::create(&huge).expect("create").set_len(3 << 30).expect("sparse 3 GiB");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", path_str(&huge)],
        "cannot fit under any --mem",
    );
    let big = dir.as_path().join("big.cpio");
    std::fs::File::create(&big).expect("create").set_len(20 << 20).expect("sparse 20 MiB");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", path_str(&big), "--mem", "16M"],
        "raise --mem to at least 22 MiB",
    );
    assert_clean_failure(
        &["run", "--kernel", kernel, "--initrd", path_str(dir.as_path())],
        "is a directory, not a regular file",
    );
}

#[test]
fn console_file_that_cannot_be_created() {
    let kernel = test_guest();
    assert_clean_failure(
        &["run", "--kernel", path_str(&kernel), "--serial", "file:/nonexistent/console.log"],
        "cannot create or open console file /nonexistent/console.log",
    );
}

#[test]
fn writable_disk_given_twice() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let dir = tempdir();
    let image = dir.as_path().join("disk.img");
    common::make_image(&image, 64 * 1024, 4);
    let image = path_str(&image);
    let other_spelling = format!("{}/./disk.img", dir.as_path().display());
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", image, "--disk", &format!("{other_spelling},ro")],
        &format!("disk {other_spelling} given twice"),
    );
    assert_clean_failure(&["run", "--kernel", kernel, "--disk", image, "--disk", image], "given twice");
}

#[test]
fn at_most_eighteen_disks() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    common::make_image(&image, 64 * 1024, 5);
    let disk = format!("{},ro", image.display());
    let mut args = vec!["run", "--kernel", kernel, "--serial", "none", "--timeout", "20"];
    for _ in 0..18 {
        args.extend(["--disk", &disk]);
    }
    let result = run(&args, LIMIT);
    assert_eq!(result.code, Some(0), "18 disks should boot:\n{}", result.stderr);
    args.extend(["--disk", &disk]);
    assert_clean_failure(&args, "too many disks: 19 (at most 18)");
}

#[test]
fn disk_images_that_are_not_files_or_are_empty() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", "/dev/zero,ro", "--timeout", "5"],
        "disk image /dev/zero is a character device, not a regular file or block device",
    );
    let dir = tempdir();
    let fifo = dir.as_path().join("fifo");
    mkfifo(&fifo);
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", &format!("{},ro", fifo.display()), "--timeout", "5"],
        "is a FIFO, not a regular file or block device",
    );
    let empty = dir.as_path().join("empty.img");
    std::fs::write(&empty, b"").expect("write");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--disk", path_str(&empty), "--timeout", "5"],
        &format!("disk image {} is smaller than one 512-byte sector (0 bytes)", empty.display()),
    );
}

#[test]
fn disk_image_with_a_partial_sector_is_rounded_down_with_a_warning() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("odd.img");
    common::make_image(&image, 4096 + 100, 6);
    let disk = format!("{},ro", image.display());
    let result = run(&["run", "--kernel", path_str(&kernel), "--disk", &disk, "--timeout", "20"], LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "stderr: {}", result.stderr);
    assert!(result.stderr.contains("the last 100 bytes are not visible to the guest"), "{}", result.stderr);
    assert!(result.stdout.contains("disk 0: size 4096 "), "{}", result.stdout);
}

#[test]
fn memory_range_message_and_check_agree() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let result =
        run(&["run", "--kernel", kernel, "--mem", "1T", "--serial", "none", "--timeout", "20"], LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "1 TiB is in the stated range:\n{}", result.stderr);
    assert_usage_error(&["run", "--kernel", kernel, "--mem", "1025G"], "out of range: need 16 MiB to 1 TiB");
    assert_usage_error(&["run", "--kernel", kernel, "--mem", "2T"], "out of range: need 16 MiB to 1 TiB");
}

#[test]
fn full_console_device_warns_once() {
    let kernel = test_guest();
    let result =
        run(&["run", "--kernel", path_str(&kernel), "--serial", "file:/dev/full", "--timeout", "20"], LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "the guest runs on:\n{}", result.stderr);
    let warnings = result.stderr.lines().filter(|l| l.contains("console output")).count();
    assert_eq!(warnings, 2, "one warning at the first error, one count at the end:\n{}", result.stderr);
    assert!(result.stderr.contains("No space left on device"), "{}", result.stderr);
}

#[test]
fn control_characters_in_a_path_stay_on_the_error_line() {
    let dir = tempdir();
    let path = format!("{}/line\nsamepage: error: forged\x1b[2J", dir.as_path().display());
    let result = run(&["run", "--kernel", &path], LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(1), "{}", result.stderr);
    assert_eq!(result.stderr.lines().count(), 1, "one line:\n{}", result.stderr);
    assert!(result.stderr.contains("line\\nsamepage: error: forged\\u{1b}[2J"), "{}", result.stderr);
}

#[test]
fn fifos_as_output_files_fail_at_once() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let dir = tempdir();
    let fifo = dir.as_path().join("fifo");
    mkfifo(&fifo);
    let fifo = path_str(&fifo);
    let image = dir.as_path().join("initrd.img");
    common::make_image(&image, 4096, 7);
    let not_output = "it is a FIFO, not a regular file or character device";
    assert_clean_failure(
        &["density", "--vms", "1", "--kernel", kernel, "--timeout", "5", "--samples", fifo],
        &format!("cannot create samples file {fifo}: {not_output}"),
    );
    let consoles = dir.as_path().join("consoles");
    std::fs::create_dir(&consoles).expect("mkdir");
    mkfifo(&consoles.join("vm0.log"));
    assert_clean_failure(
        &[
            "density",
            "--vms",
            "1",
            "--kernel",
            kernel,
            "--timeout",
            "5",
            "--console-dir",
            path_str(&consoles),
        ],
        &format!("cannot create {}/vm0.log: {not_output}", consoles.display()),
    );
    let boot_test = ["boot-test", "--kernel", kernel, "--timeout", "5"];
    // boot-test's log takes a FIFO someone reads (`--log >(grep ...)`), not one nobody does.
    assert_clean_failure(
        &[&boot_test[..], &["--initrd", path_str(&image), "--log", fifo]].concat(),
        &format!("log {fifo} is a FIFO that no process has open for reading"),
    );
    assert_clean_failure(
        &[&boot_test[..], &["--save-initramfs", fifo]].concat(),
        &format!("cannot save the initramfs to {fifo}: {not_output}"),
    );
}

#[test]
fn density_ends_when_its_vms_do_whatever_the_progress_interval() {
    let kernel = test_guest();
    let started = std::time::Instant::now();
    let result = run(
        &[
            "density",
            "--vms",
            "1",
            "--kernel",
            path_str(&kernel),
            "--timeout",
            "5",
            "--progress-every",
            "3600",
        ],
        LIMIT,
    );
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?} after a 5 s timeout", started.elapsed());
}

/// A `--timeout` past what a deadline can hold once overflowed `Instant + Duration` in the VMM
/// (a panic, reported as a seccomp violation): every subcommand refuses it as a usage error.
#[test]
fn timeouts_out_of_range_are_usage_errors() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let subcommands: [&[&str]; 3] = [
        &["run", "--kernel", kernel, "--serial", "none"],
        &["boot-test", "--kernel", kernel],
        &["density", "--vms", "1", "--kernel", kernel],
    ];
    for sub in subcommands {
        for value in ["18446744073709551615", "18446744073709551616", "9223372036854775808", "31536001", "-1"]
        {
            assert_usage_error(&[sub, &[&format!("--timeout={value}")]].concat(), "invalid timeout");
        }
    }
    // The longest accepted timeout makes a deadline like any other: the guest's own exit ends
    // the run.
    let result = run(&["run", "--kernel", kernel, "--serial", "none", "--timeout", "31536000"], LIMIT);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}", result.stderr);
}

/// Every subcommand that takes `--disk` says in its help how to turn image sharing on or off.
#[test]
fn disk_help_mentions_sharing() {
    for sub in ["run", "boot-test", "density"] {
        let result = run(&[sub, "--help"], LIMIT);
        assert_eq!(result.code, Some(0), "{}", result.stderr);
        let disk_help: String = result
            .stdout
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("--disk"))
            .take_while(|l| l.trim_start().starts_with("--disk") || !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(disk_help.contains("PATH[,ro][,share=on|off]"), "{sub} --help:\n{disk_help}");
        assert!(disk_help.contains("share=off"), "{sub} --help:\n{disk_help}");
    }
}

/// `density` relays what its VMs' processes say on standard error to its own, each line after
/// the VM's name; a line that several VMs print alike is shown once.
#[test]
fn density_relays_its_vms_warnings() {
    let kernel = test_guest();
    let dir = tempdir();
    let shared = dir.as_path().join("shared.img");
    common::make_image(&shared, 4096 + 100, 8);
    for vm in 0..2 {
        common::make_image(&dir.as_path().join(format!("own-{vm}.img")), 4096 + 200, 9 + vm);
    }
    let result = run(
        &[
            "density",
            "--vms",
            "2",
            "--kernel",
            path_str(&kernel),
            "--timeout",
            "20",
            "--disk",
            &format!("{},ro", shared.display()),
            "--disk",
            &format!("{}/own-{{vm}}.img,ro", dir.as_path().display()),
        ],
        LIMIT,
    );
    println!("exit {:?}\nstderr:\n{}", result.code, result.stderr);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    let about = |image: &str, bytes: u64| -> Vec<&str> {
        let warning =
            format!("{image}: size {} is not a multiple of 512; the last {bytes} bytes", 4096 + bytes);
        result.stderr.lines().filter(|l| l.contains(&warning)).collect()
    };
    let alike = about("shared.img", 100);
    assert_eq!(alike.len(), 1, "both VMs' warning about the shared image, once:\n{}", result.stderr);
    assert!(alike[0].starts_with("vm0: ") || alike[0].starts_with("vm1: "), "{}", alike[0]);
    for vm in 0..2 {
        let own = about(&format!("own-{vm}.img"), 200);
        assert_eq!(own.len(), 1, "vm{vm}'s warning:\n{}", result.stderr);
        assert!(own[0].starts_with(&format!("vm{vm}: ")), "{}", own[0]);
    }
}

/// The other numeric options take the same huge values without overflowing anything: each is
/// a usage error naming the option's range or syntax. (`dedupd` has no numeric option.)
#[test]
fn huge_numbers_in_every_numeric_option_are_usage_errors() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let huge = "18446744073709551615";
    let cases: [(&[&str], String, &str); 9] = [
        (&["run", "--kernel", kernel], format!("--mem={huge}"), "invalid memory size"),
        (&["boot-test", "--kernel", kernel], format!("--mem={huge}"), "invalid memory size"),
        (&["run", "--kernel", kernel], format!("--vcpus={huge}"), "--vcpus"),
        (&["boot-test", "--kernel", kernel], format!("--vcpus={huge}"), "--vcpus"),
        (&["run", "--kernel", kernel], format!("--dedup-scan-every={huge}"), "invalid interval"),
        (&["density", "--kernel", kernel], format!("--vms={huge}"), "--vms"),
        (&["density", "--kernel", kernel], format!("--progress-every={huge}"), "invalid interval"),
        (&["density", "--kernel", kernel], format!("--dedup-scan-every={huge}"), "invalid interval"),
        (&["density", "--kernel", kernel], "--vm-cmdline=18446744073709551616:quiet".into(), "INDEX:TEXT"),
    ];
    for (sub, option, expected) in cases {
        assert_usage_error(&[sub, &[option.as_str()]].concat(), expected);
    }
}

#[test]
fn snapshot_options_that_cannot_work_are_refused_before_anything_runs() {
    let kernel = test_guest();
    let kernel = path_str(&kernel);
    let long = "a".repeat(257);
    assert_usage_error(
        &["run", "--kernel", kernel, "--snapshot-to", "/tmp/s", "--snapshot-at", &long],
        "at most 256",
    );
    assert_usage_error(
        &["run", "--kernel", kernel, "--snapshot-to", "/tmp/s", "--snapshot-at", ""],
        "may not be empty",
    );
    assert_usage_error(&["run", "--kernel", kernel, "--snapshot-to", "/tmp/s"], "--snapshot-at");
    assert_usage_error(&["run", "--kernel", kernel, "--restore", "/tmp/s"], "cannot be used with");
    assert_usage_error(&["run", "--restore", "/tmp/s", "--entropy"], "cannot be used with");
    // A clone's balloon is its snapshot's; a balloon socket needs a balloon to serve.
    assert_usage_error(&["run", "--restore", "/tmp/s", "--balloon"], "cannot be used with");
    assert_clean_failure(
        &["run", "--kernel", kernel, "--balloon-socket", "/tmp/no-balloon.sock"],
        "--balloon-socket needs a balloon",
    );
    assert_clean_failure(
        &["density", "--vms", "2", "--kernel", kernel, "--snapshot-to", "/tmp/s", "--snapshot-at", "x"],
        "density --snapshot-to takes one VM",
    );
    assert_clean_failure(
        &["density", "--vms", "2", "--restore", "/tmp/s", "--threads"],
        "not with --threads",
    );
}
