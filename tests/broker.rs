//! VMs of different `samepage run` processes merging through the broker (`samepage dedupd`,
//! docs/dedupd.md), all through the real binaries, real KVM and the test guest: one domain
//! shares, two domains share nothing, a VMM killed mid-merge harms nobody, and VMs outlive a
//! killed broker and merge into the next one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{make_image, samepage, signal, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(120);
const PAGE: u64 = 4096;

/// A broker on a socket in a test directory; killed (SIGTERM) on drop.
struct Broker {
    child: Child,
    socket: PathBuf,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let socket = dir.join("dedupd.sock");
        let child = samepage()
            .args(["dedupd", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start samepage dedupd");
        let broker = Broker { child, socket };
        let start = Instant::now();
        while broker.status().is_none() {
            assert!(start.elapsed() < Duration::from_secs(10), "the broker never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    /// `samepage dedupd status --json`.
    fn status(&self) -> Option<serde_json::Value> {
        let out =
            samepage().args(["dedupd", "status", "--json", "--socket"]).arg(&self.socket).output().ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// `samepage dedupd check`: (exit status success, its output).
    fn check(&self) -> (bool, String) {
        let out = samepage().args(["dedupd", "check", "--socket"]).arg(&self.socket).output().expect("check");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A `samepage run` of the test guest in fphash mode on `image`, console and metrics in `dir`.
fn start_vm(
    dir: &Path,
    name: &str,
    image: &Path,
    cmdline: &str,
    broker: &Path,
    domain: Option<&str>,
) -> Child {
    let kernel = test_guest();
    let mut cmd = samepage();
    cmd.args(["run", "--kernel", kernel.to_str().expect("path"), "--name", name, "--timeout", "100"])
        .arg("--disk")
        .arg(format!("{},ro,share=off", image.display()))
        .args(["--cmdline", &format!("testguest.mode=fphash {cmdline}")])
        .arg("--serial")
        .arg(format!("file:{}", dir.join(format!("{name}.log")).display()))
        .arg("--metrics")
        .arg(dir.join(format!("{name}.json")))
        .arg("--dedup-socket")
        .arg(broker)
        .args(["--dedup-scan-every", "0.2"]);
    if let Some(d) = domain {
        cmd.args(["--dedup-domain", d]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start samepage run")
}

fn wait_ok(mut child: Child, name: &str) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err);
            assert!(status.success(), "{name} exited with {status}:\n{err}");
            return;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("{name} did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

fn metrics(dir: &Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("metrics");
    serde_json::from_str(&text).expect("metrics JSON")
}

/// Waits until `name`'s console has `line`.
fn wait_for_line(dir: &Path, name: &str, line: &str) {
    let start = Instant::now();
    while !console(dir, name).contains(line) {
        assert!(start.elapsed() < LIMIT, "{name} never printed {line:?}:\n{}", console(dir, name));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The domains of a status, by name.
fn domain<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["domains"].as_array()?.iter().find(|d| d["name"] == name)
}

/// Inodes of the store memfds a process maps (from /proc/<pid>/maps).
fn store_inodes(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut inodes: Vec<String> = maps
        .lines()
        .filter(|l| l.contains("samepage-store"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect();
    inodes.sort();
    inodes.dedup();
    inodes
}

#[test]
fn two_vmm_processes_in_one_domain_share_one_copy() {
    let dir = tempdir();
    let dir = dir.as_path();
    let image = dir.join("files.img");
    make_image(&image, 16 << 20, 51);
    let broker = Broker::start(dir);
    let pages = (16 << 20) / PAGE;
    let vms: Vec<Child> = ["a", "b"]
        .iter()
        .map(|n| start_vm(dir, n, &image, "testguest.hold_ms=2000", &broker.socket, None))
        .collect();
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: holding");
    }
    let status = broker.status().expect("status");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let d = domain(&status, &format!("uid-{uid}")).expect("the user's domain").clone();
    let (check_ok, check) = broker.check();
    for (vm, n) in vms.into_iter().zip(["a", "b"]) {
        wait_ok(vm, n);
    }
    println!("broker domain while both held: {d}\ncheck: {check}");
    for n in ["a", "b"] {
        let out = console(dir, n);
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{n}:\n{out}");
        assert!(out.contains("fphash: data intact after the hold"), "{n}:\n{out}");
        let m = metrics(dir, n);
        println!(
            "{n}: merged {} of {} reported; broker domain {}",
            m["dedup"]["merged"], m["dedup"]["reported"], m["broker_domain"]
        );
    }
    // One copy of the 16 MiB for both processes; every guest page references it.
    assert_eq!(d["store_pages"].as_u64(), Some(pages), "{d}");
    assert_eq!(d["references"].as_u64(), Some(2 * pages), "{d}");
    assert!(d["store_bytes"].as_u64().is_some_and(|b| b <= (pages + pages / 100) * PAGE), "{d}");
    assert!(check_ok, "{check}");
}

#[test]
fn two_domains_with_identical_content_share_nothing() {
    let dir = tempdir();
    let dir = dir.as_path();
    let image = dir.join("files.img");
    make_image(&image, 8 << 20, 52);
    let broker = Broker::start(dir);
    let pages = (8 << 20) / PAGE;
    let a = start_vm(dir, "a", &image, "testguest.hold_ms=2000", &broker.socket, Some("alpha"));
    let b = start_vm(dir, "b", &image, "testguest.hold_ms=2000", &broker.socket, Some("beta"));
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: holding");
    }
    let status = broker.status().expect("status");
    let (ia, ib) = (store_inodes(a.id()), store_inodes(b.id()));
    wait_ok(a, "a");
    wait_ok(b, "b");
    let (alpha, beta) = (domain(&status, "alpha").expect("alpha"), domain(&status, "beta").expect("beta"));
    println!("alpha: {alpha}\nbeta: {beta}\nstore inodes mapped: a {ia:?}, b {ib:?}");
    // Each domain holds its own copy; neither VMM maps the other's store.
    for d in [alpha, beta] {
        assert_eq!((d["store_pages"].as_u64(), d["references"].as_u64()), (Some(pages), Some(pages)), "{d}");
    }
    assert!(!ia.is_empty() && !ib.is_empty(), "the VMMs map no store");
    assert!(ia.iter().all(|i| !ib.contains(i)), "the domains' VMMs map one store: {ia:?} {ib:?}");
}

#[test]
fn a_vmm_killed_mid_merge_harms_nobody() {
    let dir = tempdir();
    let dir = dir.as_path();
    let image = dir.join("files.img");
    make_image(&image, 32 << 20, 53);
    let broker = Broker::start(dir);
    let keep: Vec<Child> = ["a", "b"]
        .iter()
        .map(|n| start_vm(dir, n, &image, "testguest.hold_ms=4000", &broker.socket, None))
        .collect();
    let victim = start_vm(dir, "victim", &image, "testguest.hold_ms=4000", &broker.socket, None);
    // Kill it while it reports (its console shows the page cache, not yet the tally).
    wait_for_line(dir, "victim", "fphash: page cache at");
    std::thread::sleep(Duration::from_millis(100));
    signal(&victim, libc::SIGKILL);
    let mut victim = victim;
    let _ = victim.wait();
    let killed_at = console(dir, "victim");
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: holding");
    }
    let (check_ok, check) = broker.check();
    let status = broker.status().expect("status");
    for (vm, n) in keep.into_iter().zip(["a", "b"]) {
        wait_ok(vm, n);
    }
    println!("victim's console when killed:\n{killed_at}\ncheck after the kill: {check}");
    let clients: Vec<&str> =
        status["clients"].as_array().expect("clients").iter().filter_map(|c| c["label"].as_str()).collect();
    println!("clients after the kill: {clients:?}");
    assert!(check_ok, "the broker's references or store disagree after the kill: {check}");
    assert!(!clients.contains(&"victim"), "the killed VMM still holds references: {clients:?}");
    for n in ["a", "b"] {
        assert!(console(dir, n).contains("fphash: data intact after the hold"), "{n}:\n{}", console(dir, n));
    }
}

#[test]
fn vms_outlive_a_killed_broker_and_merge_into_the_next_one() {
    let dir = tempdir();
    let dir = dir.as_path();
    let image = dir.join("files.img");
    make_image(&image, 8 << 20, 54);
    let pages = (8 << 20) / PAGE;
    let mut broker = Broker::start(dir);
    let socket = broker.socket.clone();
    // Round 1 merges; the broker dies during the hold; round 2 finds none; a new broker starts;
    // round 3 merges into its store.
    let cmdline =
        "testguest.hold_ms=1500 testguest.rounds=3 testguest.round_ms=3000 testguest.hold_after_ms=3000";
    let vms: Vec<Child> =
        ["a", "b"].iter().map(|n| start_vm(dir, n, &image, cmdline, &socket, None)).collect();
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: holding");
    }
    signal(&broker.child, libc::SIGKILL);
    let _ = broker.child.wait();
    std::mem::forget(broker);
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: round 2:");
    }
    let second = Broker::start(dir);
    for n in ["a", "b"] {
        wait_for_line(dir, n, "fphash: holding 3000 ms after the writes");
    }
    let status = second.status().expect("status");
    for (vm, n) in vms.into_iter().zip(["a", "b"]) {
        wait_ok(vm, n);
    }
    for n in ["a", "b"] {
        let out = console(dir, n);
        let m = metrics(dir, n);
        println!(
            "{n}:\n{}\nbroker_unavailable {}",
            out.lines()
                .filter(|l| l.contains("round") || l.contains("reported"))
                .collect::<Vec<_>>()
                .join("\n"),
            m["dedup"]["broker_unavailable"]
        );
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged ")), "{out}");
        assert!(
            out.contains(&format!("fphash: round 2: reported {pages} pages: merged 0 ")),
            "round 2 merged without a broker:\n{out}"
        );
        assert!(m["dedup"]["broker_unavailable"].as_u64().is_some_and(|n| n >= pages), "{m}");
        assert!(out.contains("fphash: round 3: data intact"), "{out}");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let d = domain(&status, &format!("uid-{uid}")).expect("the new broker's domain");
    println!("new broker's domain after round 3: {d}");
    assert_eq!(d["store_pages"].as_u64(), Some(pages), "{d}");
    assert_eq!(d["references"].as_u64(), Some(2 * pages), "the VMs did not merge into the new store: {d}");
}
