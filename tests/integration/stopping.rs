//! Stopping always works, within a bounded time and with the documented exit code: a device
//! thread wedged for good (fault injection) while a vCPU waits on the device's lock, every
//! stop signal under `run` (with the terminal restored), and signals under `density`.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{finish, make_image, samepage, signal, spawn, tempdir, test_guest};

/// What stopping may take: the VMM's grace for its threads (3 s) and then some.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Starts `run` with a guest whose fphash device thread wedges on the first batch while the
/// guest reads the device's registers (so a vCPU blocks on the device's lock too).
fn wedged(extra: &[&str], image: &std::path::Path) -> std::process::Child {
    let kernel = test_guest();
    let disk = format!("{},ro,share=off", image.display());
    let mut cmd = samepage();
    cmd.args(["run", "--kernel", kernel.to_str().expect("path"), "--disk", &disk])
        .args(["--cmdline", "testguest.mode=fphash testguest.poll_regs=1"])
        .args(extra)
        .env(samepage::fault::FAULT_ENV, "wedge-fphash")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start samepage")
}

#[test]
fn a_wedged_device_thread_does_not_keep_the_vmm_from_stopping() {
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, 1 << 20, 41);
    // --timeout: 124.
    let start = Instant::now();
    let result = finish(wedged(&["--timeout", "2"], &image), Duration::from_secs(2) + STOP_BOUND);
    println!(
        "--timeout 2 with a wedged device: exit {:?} after {:.1} s\n{}",
        result.code,
        start.elapsed().as_secs_f64(),
        result.stderr
    );
    result.assert_no_panic();
    assert_eq!(result.code, Some(124), "{}", result.stderr);
    assert!(result.stderr.contains("did not stop within"), "the wedge was not reported:\n{}", result.stderr);
    // SIGTERM and SIGINT: 128 + N.
    for (num, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let child = wedged(&[], &image);
        std::thread::sleep(Duration::from_millis(1500));
        let start = Instant::now();
        signal(&child, num);
        let result = finish(child, STOP_BOUND);
        println!(
            "signal {num} with a wedged device: exit {:?} after {:.1} s",
            result.code,
            start.elapsed().as_secs_f64()
        );
        result.assert_no_panic();
        assert_eq!(result.code, Some(code), "{}", result.stderr);
        result
            .stdout
            .lines()
            .find(|l| l.starts_with("fphash: device at"))
            .expect("the guest reached the device");
    }
}

/// Terminal settings of a pseudo-terminal, as the raw-mode code changes them.
fn termios(fd: i32) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr on a descriptor we own.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0, "tcgetattr");
    t
}

#[test]
fn every_stop_signal_ends_run_with_128_plus_its_number_and_restores_the_terminal() {
    let kernel = test_guest();
    for num in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM, libc::SIGTERM] {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors we then own; no name or settings passed.
        let rc = unsafe {
            libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
        };
        assert_eq!(rc, 0, "openpty");
        let before = termios(slave);
        // SAFETY: `slave` is ours; the child gets its own duplicate as standard input.
        let stdin = unsafe { <Stdio as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(slave)) };
        let mut cmd = samepage();
        cmd.args(["run", "--kernel", kernel.to_str().expect("path"), "--cmdline", "testguest.mode=spin"])
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start samepage");
        // Wait until the VMM has put the terminal in raw mode.
        let start = Instant::now();
        while termios(slave).c_lflag == before.c_lflag && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(termios(slave).c_lflag, before.c_lflag, "the VMM never set raw mode");
        signal(&child, num);
        let result = finish(child, STOP_BOUND);
        let after = termios(slave);
        println!("signal {num}: exit {:?}: {}", result.code, result.stderr.trim());
        result.assert_no_panic();
        assert_eq!(result.code, Some(128 + num), "{}", result.stderr);
        assert!(result.stderr.contains(&format!("stopped by signal {num}")), "{}", result.stderr);
        assert_eq!(
            (after.c_lflag, after.c_iflag, after.c_oflag),
            (before.c_lflag, before.c_iflag, before.c_oflag),
            "signal {num} left the terminal in raw mode"
        );
        // SAFETY: our descriptors, closed once.
        unsafe { (libc::close(master), libc::close(slave)) };
    }
}

#[test]
fn density_ends_with_the_signal_code() {
    let kernel = test_guest();
    for (num, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let child = spawn(
            &[
                "density",
                "--vms",
                "2",
                "--kernel",
                kernel.to_str().expect("path"),
                "--cmdline",
                "testguest.mode=spin",
            ],
            None,
        );
        std::thread::sleep(Duration::from_millis(800));
        signal(&child, num);
        let result = finish(child, STOP_BOUND);
        println!("density, signal {num}: exit {:?}", result.code);
        result.assert_no_panic();
        assert_eq!(result.code, Some(code), "{}", result.stderr);
    }
}
