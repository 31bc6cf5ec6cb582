//! `samepage boot-test` and hostile or odd host input: a FIFO as --log, a device as --busybox,
//! a symbolic link planted where a predictable temporary file used to be, a log that cannot
//! be written. The test guest (work at CPL3) keeps these fast.

use crate::common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{tempdir, test_guest};

/// These runs take a second or two; a hang must fail the test, not the suite's timeout.
const LIMIT: Duration = Duration::from_secs(60);
/// The test guest's mode that exits at once with status 0.
const EXIT_0: &str = "testguest.mode=exit=0";

fn boot_test(args: &[&str], tmpdir: Option<&Path>) -> common::Run {
    let mut cmd = common::samepage();
    cmd.env("SAMEPAGE_CACHE_DIR", common::repo().join("target/boot-test-cache"));
    if let Some(dir) = tmpdir {
        cmd.env("TMPDIR", dir);
    }
    let guest = test_guest();
    let mut all = vec!["boot-test", "--kernel", guest.to_str().expect("path"), "--timeout", "30"];
    all.extend_from_slice(args);
    let child = cmd
        .args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    let run = common::finish(child, LIMIT);
    run.assert_no_panic();
    println!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    run
}

#[test]
fn a_fifo_nobody_reads_as_log_fails_at_once() {
    let dir = tempdir();
    let fifo = dir.as_path().join("console.fifo");
    let path = CString::new(fifo.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let run = boot_test(&["--log", fifo.to_str().expect("path"), "--cmdline", EXIT_0], None);
    assert_eq!(run.code, Some(125));
    assert!(run.stderr.contains("is a FIFO that no process has open for reading"), "{}", run.stderr);

    // With a reader, the FIFO gets the console.
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).expect("read fifo"))
    };
    std::thread::sleep(Duration::from_millis(200));
    let run = boot_test(&["--log", fifo.to_str().expect("path"), "--cmdline", EXIT_0], None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let logged = reader.join().expect("reader");
    assert!(logged.contains("mode: exit=0"), "the FIFO's reader got: {logged}");
}

#[test]
fn a_device_or_huge_file_as_busybox_is_refused() {
    let run = boot_test(&["--busybox", "/dev/zero", "--exec", "true"], None);
    assert_eq!(run.code, Some(125));
    assert!(
        run.stderr.contains("samepage: error: busybox /dev/zero is not a regular file"),
        "{}",
        run.stderr
    );
    let dir = tempdir();
    let huge = dir.as_path().join("busybox");
    std::fs::File::create(&huge).expect("create").set_len(1 << 30).expect("sparse 1 GiB");
    let run = boot_test(&["--busybox", huge.to_str().expect("path"), "--exec", "true"], None);
    assert_eq!(run.code, Some(125));
    assert!(run.stderr.contains("has 1073741824 bytes, more than the 33554432 accepted"), "{}", run.stderr);
}

/// Runs boot-test with a symbolic link planted, in the child before it execs (so with its
/// PID), at `$TMPDIR/samepage-boot-test-<pid>.cpio`, the name boot-test once used for its
/// initramfs, pointing at `victim`.
fn boot_test_with_planted_link(tmpdir: &Path, victim: &Path, args: &[&str]) -> common::Run {
    let prefix = format!("{}/samepage-boot-test-", tmpdir.display()).into_bytes();
    let target = CString::new(victim.as_os_str().as_bytes()).expect("path");
    let guest = test_guest();
    let mut all = vec!["boot-test", "--kernel", guest.to_str().expect("path")];
    if !args.contains(&"--timeout") {
        all.extend(["--timeout", "30"]);
    }
    all.extend_from_slice(args);
    let mut cmd = common::samepage();
    cmd.env("SAMEPAGE_CACHE_DIR", common::repo().join("target/boot-test-cache")).env("TMPDIR", tmpdir);
    cmd.args(&all).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child and only formats into a stack buffer and
    // calls getpid and symlink (async-signal-safe); nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            let mut path = [0u8; 512];
            let mut len = prefix.len().min(400);
            path[..len].copy_from_slice(&prefix[..len]);
            let mut digits = [0u8; 12];
            let mut pid = libc::getpid() as u32;
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in (0..n).rev() {
                path[len] = digits[i];
                len += 1;
            }
            path[len..len + 5].copy_from_slice(b".cpio");
            libc::symlink(target.as_ptr(), path.as_ptr().cast());
            Ok(())
        });
    }
    let run = common::finish(cmd.spawn().expect("start samepage"), LIMIT);
    run.assert_no_panic();
    println!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    run
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read tmpdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_planted_link_is_not_followed_and_nothing_is_left_in_tmpdir() {
    let dir = tempdir();
    let tmpdir = dir.as_path().join("tmp");
    std::fs::create_dir(&tmpdir).expect("mkdir");
    let victim = dir.as_path().join("victim.txt");
    std::fs::write(&victim, "precious\n").expect("write victim");

    // A run that boots, one that cannot start, one that times out.
    let run = boot_test_with_planted_link(&tmpdir, &victim, &["--exec", "true", "--cmdline", EXIT_0]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run =
        boot_test_with_planted_link(&tmpdir, &victim, &["--exec", "true", "--disk", "/nonexistent/disk.img"]);
    assert_eq!(run.code, Some(125), "{}", run.stderr);
    let run = boot_test_with_planted_link(
        &tmpdir,
        &victim,
        &["--exec", "true", "--cmdline", "testguest.mode=spin", "--timeout", "2"],
    );
    assert_eq!(run.code, Some(124), "{}", run.stderr);

    assert_eq!(
        std::fs::read_to_string(&victim).expect("read victim"),
        "precious\n",
        "the victim was overwritten"
    );
    let left: Vec<String> = names_in(&tmpdir).into_iter().filter(|n| !n.ends_with(".cpio")).collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
    assert_eq!(names_in(&tmpdir).len(), 3, "the three planted links, nothing else");
}

#[test]
fn a_log_that_cannot_be_written_is_reported() {
    let run = boot_test(&["--log", "/dev/full", "--cmdline", EXIT_0], None);
    assert_eq!(run.code, Some(0), "the verdict is the guest's: {}", run.stderr);
    assert!(
        run.stderr.contains("samepage boot-test: warning: console log /dev/full is incomplete: write failed: No space left on device"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.matches("warning: console log").count(), 1, "one line: {}", run.stderr);
}
