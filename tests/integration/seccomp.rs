//! Seccomp filters through the real binary: a device thread that makes a forbidden syscall
//! (fault injection: `ptrace` from the virtio event loop) ends the VMM at once with one clear
//! line and exit code 126, under `run` and under `density` (each VM its own process);
//! `--seccomp off` lets the same call through and says so; every thread of a running VMM and
//! of the broker is filtered.

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{density_result, finish, make_image, samepage, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(60);
/// `ptrace` on x86_64.
const SYS_PTRACE: i64 = 101;

fn violation_line() -> String {
    format!("samepage: error: seccomp: thread virtio made forbidden syscall {SYS_PTRACE}")
}

/// `run` of the test guest reading `image` through fphash, its device thread calling `ptrace`
/// on the first queue notification.
fn run_with_forbidden_syscall(image: &std::path::Path, extra: &[&str]) -> common::Run {
    let kernel = test_guest();
    let child = samepage()
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--timeout", "30"])
        .arg("--disk")
        .arg(format!("{},ro", image.display()))
        .args(["--cmdline", "testguest.mode=fphash"])
        .args(extra)
        .env(samepage::fault::FAULT_ENV, "forbidden-syscall")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    finish(child, LIMIT)
}

#[test]
fn a_forbidden_syscall_from_a_device_thread_stops_the_vm_with_one_clear_line() {
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, 1 << 20, 61);
    let start = Instant::now();
    let result = run_with_forbidden_syscall(&image, &[]);
    println!(
        "exit {:?} after {:.2} s\nstderr:\n{}\nconsole:\n{}",
        result.code,
        start.elapsed().as_secs_f64(),
        result.stderr,
        result.stdout
    );
    assert_eq!(result.code, Some(126), "{}", result.stderr);
    let lines: Vec<&str> = result.stderr.lines().collect();
    assert_eq!(lines, [violation_line().as_str()], "one line, nothing else");
    // The guest did not get to finish its reads.
    assert!(!result.stdout.contains("fphash: data intact"), "{}", result.stdout);
}

#[test]
fn with_seccomp_off_the_call_goes_through_and_a_warning_says_so() {
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, 1 << 20, 62);
    let result = run_with_forbidden_syscall(&image, &["--seccomp", "off"]);
    println!("exit {:?}\nstderr:\n{}", result.code, result.stderr);
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    let first = result.stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("samepage: warning: --seccomp off:") && first.contains("debugging"), "{first}");
    assert!(result.stderr.contains("this thread called ptrace"), "{}", result.stderr);
    result.assert_line("fphash: data intact");
}

/// `density` of one VM process on `image` with the fault, and `extra` options.
fn density_with_forbidden_syscall(dir: &std::path::Path, extra: &[&str]) -> common::Run {
    let image = dir.join("files.img");
    make_image(&image, 1 << 20, 63);
    let kernel = test_guest();
    let consoles = dir.join("consoles");
    let child = samepage()
        .args(["density", "--vms", "1", "--timeout", "30", "--kernel", kernel.to_str().expect("path")])
        .arg("--disk")
        .arg(format!("{},ro", image.display()))
        .args(["--cmdline", "testguest.mode=fphash", "--console-dir", consoles.to_str().expect("path")])
        .args(extra)
        .env(samepage::fault::FAULT_ENV, "forbidden-syscall")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage density");
    finish(child, LIMIT)
}

#[test]
fn density_reports_a_vm_process_its_filter_stopped_and_passes_seccomp_off_on() {
    let dir = tempdir();
    let result = density_with_forbidden_syscall(dir.as_path(), &[]);
    println!("exit {:?}\n{}\n{}", result.code, result.stdout, result.stderr);
    result.assert_no_panic();
    assert_eq!(result.code, Some(1), "{}", result.stderr);
    let vm0 = result.stdout.lines().find(|l| l.trim_start().starts_with("vm0:")).unwrap_or_default();
    assert!(vm0.contains("exited with 126") && vm0.contains(&violation_line()), "{vm0}");

    let dir = tempdir();
    let result = density_with_forbidden_syscall(dir.as_path(), &["--seccomp", "off"]);
    println!("exit {:?}\n{}\n{}", result.code, result.stdout, result.stderr);
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    assert!(result.stderr.starts_with("samepage: warning: --seccomp off:"), "{}", result.stderr);
    let console = std::fs::read_to_string(dir.as_path().join("consoles/vm0.log")).expect("console");
    assert!(console.contains("fphash: data intact"), "{console}");
    assert_eq!(density_result(&result.stdout)["vms"], 1);
}

/// Each thread's name and its `Seccomp:` mode (0 none, 2 filter), from /proc.
fn thread_filters(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    threads.sort();
    threads
}

fn stop(mut child: Child) {
    // SAFETY: kill on the pid of our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn every_thread_of_a_running_vmm_and_of_the_broker_is_filtered() {
    let kernel = test_guest();
    let vm = samepage()
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--vcpus", "2", "--serial", "none"])
        .args(["--cmdline", "testguest.mode=spin", "--timeout", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start samepage run");
    let dir = tempdir();
    let socket = dir.as_path().join("dedupd.sock");
    let broker = samepage()
        .args(["dedupd", "--socket", socket.to_str().expect("path")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start samepage dedupd");
    // Until both vCPU threads run, and the broker listens.
    let start = Instant::now();
    let mut threads = thread_filters(vm.id());
    while threads.iter().filter(|(name, _)| name.starts_with("vcpu")).count() < 2 || !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "not started: {threads:?}");
        std::thread::sleep(Duration::from_millis(50));
        threads = thread_filters(vm.id());
    }
    std::thread::sleep(Duration::from_millis(300));
    let threads = thread_filters(vm.id());
    let broker_threads = thread_filters(broker.id());
    stop(vm);
    stop(broker);
    println!("run: {threads:?}\ndedupd: {broker_threads:?}");
    let names: Vec<&str> = threads.iter().map(|(name, _)| name.as_str()).collect();
    for expected in ["samepage", "signals", "vcpu0", "vcpu1", "virtio"] {
        assert!(names.contains(&expected), "no thread {expected}: {threads:?}");
    }
    // Every user thread (KVM's own kernel workers in the process aside) is filtered.
    for (name, mode) in threads.iter().chain(&broker_threads).filter(|(name, _)| !name.starts_with("kvm")) {
        assert_eq!(mode, "2", "thread {name} runs without a seccomp filter");
    }
    assert_eq!(broker_threads.len(), 1, "{broker_threads:?}");
}

/// `run --hold-until-eof` whose standard input ends after the guest stopped: the input thread
/// then drops the console's last reference and closes its descriptors, which its filter must
/// allow. The exit code is the guest's, not a violation's.
#[test]
fn input_ending_after_the_guest_stopped_ends_the_run_with_the_guests_status() {
    let kernel = test_guest();
    let mut child = samepage()
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--timeout", "30", "--hold-until-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    let input = child.stdin.take().expect("stdin");
    let mut console = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("all 0 disks ok") {
        line.clear();
        let n = console.read_line(&mut line).expect("read console");
        assert!(n > 0, "the console ended before the guest's last line");
    }
    // The guest has stopped; the VMM holds its memory until input ends.
    std::thread::sleep(Duration::from_millis(300));
    drop(input);
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(start.elapsed() < LIMIT, "no exit after standard input ended");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    println!("exit {code:?} {:.2} s after input ended\nstderr:\n{stderr}", start.elapsed().as_secs_f64());
    assert!(!stderr.contains("forbidden syscall"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
}
