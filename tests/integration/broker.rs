//! VMs of different `samepage run` processes merging through the broker (`samepage dedupd`,
//! docs/dedupd.md), all through the real binaries, real KVM and the test guest: one domain
//! shares, two domains share nothing, a VMM killed mid-merge harms nobody, and VMs outlive a
//! killed broker and merge into the next one.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::broker_client::{page, store_entry, Client};
use common::{make_image, samepage, signal, stress_factor, tempdir, test_guest};
use samepage::broker_wire::proto::{kind, status, SlotReply};

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

/// Waits for a VM to exit 0; returns what it logged.
fn wait_ok(child: Child, name: &str) -> String {
    let (status, err) = wait_exit(child, name);
    assert!(status.success(), "{name} exited with {status}:\n{err}");
    err
}

/// Waits for a VM to exit; returns its status and what it logged.
fn wait_exit(mut child: Child, name: &str) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err);
            return (status, err);
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
    // a later round merges into its store. Rounds 3 to 5 come 3 s apart, so the new broker has
    // 9 s after round 2 to start and be found: a VMM without a broker tries again at most every
    // RECONNECT_EVERY (2 s), and a loaded host may take seconds to start a process.
    let cmdline =
        "testguest.hold_ms=3000 testguest.rounds=5 testguest.round_ms=3000 testguest.hold_after_ms=3000";
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
        assert!(
            (3..=5).any(|r| out.contains(&format!("fphash: round {r}: reported {pages} pages: merged {pages} "))),
            "no round merged into the new broker's store:\n{out}"
        );
        assert!(out.contains("fphash: round 5: data intact"), "{out}");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let d = domain(&status, &format!("uid-{uid}")).expect("the new broker's domain");
    println!("new broker's domain after round 5: {d}");
    assert_eq!(d["store_pages"].as_u64(), Some(pages), "{d}");
    assert_eq!(d["references"].as_u64(), Some(2 * pages), "the VMs did not merge into the new store: {d}");
}

/// A page another client of the domain stores: if a guest ever reads it, the broker gave a
/// slot that guest maps to someone else.
fn attacker_page() -> [u8; PAGE as usize] {
    let mut p = page(0xa77a_c4e5);
    p[..17].copy_from_slice(b"ATTACKER CONTENT ");
    p
}

#[test]
fn a_stalled_broker_never_changes_a_page_its_guests_merged() {
    let dir = tempdir();
    let dir = dir.as_path();
    let image = dir.join("files.img");
    make_image(&image, 4 << 20, 55);
    let pages = (4 << 20) / PAGE;
    let broker = Broker::start(dir);
    let vm = start_vm(dir, "victim", &image, "testguest.hold_ms=15000", &broker.socket, None);
    wait_for_line(dir, "victim", "fphash: holding");
    // Stop the broker longer than a VMM waits for an answer: the VMM's next requests (its
    // figures, sent on every refresh) go unanswered for 5 s.
    signal(&broker.child, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(5));
    signal(&broker.child, libc::SIGCONT);
    // Another client of the domain stores a page of its own, asking for slot 0 first: a slot
    // the victim's guest maps must not be given to it.
    let mut attacker = Client::connect(&broker.socket).expect("connect");
    attacker.hello("", "attacker", 64).expect("HELLO");
    let mut entry = store_entry(&attacker_page());
    entry.hint0 = 0;
    let got: SlotReply = attacker.request(kind::STORE, &[entry]).entries(kind::SLOTS)[0];
    // Every stored page against its hash, every reference count against the clients, while
    // the victim still holds its pages.
    let (check_ok, check) = broker.check();
    let (exit, err) = wait_exit(vm, "victim");
    let out = console(dir, "victim");
    let broker_lines: Vec<&str> = err.lines().filter(|l| l.contains("broker")).collect();
    println!(
        "after a 5 s broker stop: the attacker's page got slot {} (status {}); victim's console:\n{}\n\
         victim's log about the broker: {broker_lines:?}\ncheck: {check}",
        got.slot,
        got.status,
        out.lines()
            .filter(|l| l.starts_with("fphash:") || l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(exit.success(), "the victim exited with {exit}");
    assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{out}");
    assert!(out.contains("fphash: data intact after the hold"), "a merged page changed:\n{out}");
    assert_ne!(got.slot, 0, "slot 0, which the victim maps, went to another client");
    assert!(check_ok, "{check}");
}

const CHURN_TEST: &str = "a_churning_client_of_another_domain_costs_the_broker_only_what_it_declared";
/// Pages the churning client declares (and stores and releases, round after round).
const CHURN_PAGES: u64 = 32;

/// The attacker: as its own user, in its own domain, it stores `CHURN_PAGES` new pages and
/// releases them, as fast as the broker answers, for `secs` seconds, then disconnects.
fn churn_child(socket: &Path, secs: u64) {
    // SAFETY: plain getters.
    assert_eq!(unsafe { (libc::getuid(), libc::geteuid()) }, (65534, 65534), "runs as nobody");
    let mut c = Client::connect(socket).expect("connect");
    c.hello("", "churner", CHURN_PAGES).expect("HELLO");
    let until = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    while Instant::now() < until {
        let batch: Vec<_> = (0..CHURN_PAGES).map(|i| page((round << 8) | i)).collect();
        let stored = c.store(&batch);
        let slots: Vec<u64> =
            stored.iter().filter(|r| matches!(r.status, status::OK | status::NEW)).map(|r| r.slot).collect();
        c.release(&slots);
        round += 1;
    }
    println!("churn: {round} rounds, {} pages stored and released", round * CHURN_PAGES);
}

#[test]
fn a_churning_client_of_another_domain_costs_the_broker_only_what_it_declared() {
    let churn_secs = 10 * stress_factor();
    if let Some((role, socket)) = common::broker_client::role() {
        assert_eq!(role, "churn");
        return churn_child(&socket, churn_secs);
    }
    let dir = tempdir();
    let dir = dir.as_path();
    // The churner runs as another user: it must reach the socket.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let image = dir.join("files.img");
    make_image(&image, 4 << 20, 56);
    let broker = Broker::start(dir);
    let hold_ms = (churn_secs + 12) * 1000;
    let vm = start_vm(dir, "victim", &image, &format!("testguest.hold_ms={hold_ms}"), &broker.socket, None);
    wait_for_line(dir, "victim", "fphash: holding");
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id())).expect("status");
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon").to_string();
        line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).expect("kB") * 1024
    };
    let before = rss();
    // An honest client of a third domain measures each round trip throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let honest = {
        let (socket, stop) = (broker.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("connect");
            c.hello("honest", "honest", 16).expect("HELLO");
            let p = page(7);
            c.store(&[p]);
            let h = common::broker_client::hash(&p);
            let mut worst = Duration::ZERO;
            let mut trips = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let slot = c.lookup(&[h])[0].slot;
                c.release(&[slot]);
                let d = t.elapsed();
                worst = worst.max(d);
                trips.push(d);
                std::thread::sleep(Duration::from_millis(2));
            }
            trips.sort();
            (trips[trips.len() / 2], worst, trips.len())
        })
    };
    let wrapper = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"];
    let name = common::test_path(module_path!(), CHURN_TEST);
    let (ok, out) = common::broker_client::run_role(&name, "churn", &broker.socket, &wrapper);
    let after_churn = rss();
    // Let the broker take in the attacker's departure while the honest client measures.
    std::thread::sleep(Duration::from_secs(3));
    let after_leave = rss();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (median, worst, trips) = honest.join().expect("honest client");
    let err = wait_ok(vm, "victim");
    let console_out = console(dir, "victim");
    let (check_ok, check) = broker.check();
    let churn_line =
        out.lines().find(|l| l.starts_with("churn:")).map_or_else(|| out.clone(), str::to_string);
    println!(
        "{churn_line} in {churn_secs} s\nbroker anonymous memory: {before} bytes before, {after_churn} after the \
         churn (+{} for a client that declared {CHURN_PAGES} pages), {after_leave} after it left\nhonest \
         client: {trips} round trips, median {median:?}, worst {worst:?}\nvictim: {}\ncheck: {check}",
        after_churn as i64 - before as i64,
        console_out.lines().filter(|l| l.contains("intact") || l.starts_with("FAIL")).collect::<Vec<_>>().join("; "),
    );
    assert!(ok, "the churning client failed:\n{out}");
    assert!(console_out.contains("fphash: data intact after the hold"), "{console_out}\n{err}");
    assert!(
        after_churn.saturating_sub(before) < 4 << 20,
        "the broker grew by {} bytes for a client that declared {CHURN_PAGES} pages",
        after_churn - before
    );
    assert!(worst < Duration::from_secs(1), "an honest client waited {worst:?} for an answer");
    assert!(check_ok, "{check}");
}
