//! samepage as a user other than root, with access to /dev/kvm and nothing else: `density`
//! with its VM processes and broker, and `run` with `dedupd`, all as uid 65534 (nobody),
//! merging test guests' pages under their seccomp filters. The test grants that uid access to
//! /dev/kvm (a POSIX ACL entry) and revokes it afterwards, so it runs as root, as the README's
//! test command does; the tests that grant it take turns (a lock file).

use crate::common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{density_result, make_image, tempdir, test_guest};

/// The user the VMMs and the broker run as.
const NOBODY: u32 = 65534;
const KVM: &str = "/dev/kvm";
const LIMIT: Duration = Duration::from_secs(180);
const PAGE: i64 = 4096;

/// Access to /dev/kvm for [`NOBODY`] while alive: an ACL entry, removed on drop; one holder at
/// a time across test processes.
struct KvmAccess {
    _turn: File,
}

impl KvmAccess {
    fn grant() -> KvmAccess {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test runs samepage as uid {NOBODY} and needs root to grant it /dev/kvm (setfacl); \
             the README's test command runs as root"
        );
        let turn = File::create("/tmp/samepage-test-kvm-acl.lock").expect("lock file");
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(turn.as_raw_fd(), libc::LOCK_EX) }, 0, "flock");
        // An entry left by a run that was killed before it could revoke it.
        setfacl(&["-x", &format!("u:{NOBODY}"), KVM]);
        assert!(!has_access(), "{}", kvm_acl());
        setfacl(&["-m", &format!("u:{NOBODY}:rw"), KVM]);
        assert!(has_access(), "{}", kvm_acl());
        KvmAccess { _turn: turn }
    }

    /// Takes the access back, checks it is gone, and lets the next test have its turn.
    fn revoke(self) {
        setfacl(&["-x", &format!("u:{NOBODY}"), KVM]);
        assert!(!has_access(), "{}", kvm_acl());
    }
}

impl Drop for KvmAccess {
    fn drop(&mut self) {
        // After a failed test too (a second removal is harmless).
        let _ = Command::new("setfacl").args(["-x", &format!("u:{NOBODY}"), KVM]).status();
    }
}

/// Whether /dev/kvm's ACL has an entry for [`NOBODY`].
fn has_access() -> bool {
    kvm_acl().contains(&format!("user:{NOBODY}:rw-"))
}

fn setfacl(args: &[&str]) {
    let out = Command::new("setfacl")
        .args(args)
        .output()
        .expect("run setfacl (Debian package acl; scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "setfacl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn kvm_acl() -> String {
    let out = Command::new("getfacl").args(["-n", "-p", KVM]).output().expect("run getfacl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory [`NOBODY`] can read (binary, guest, image) with a subdirectory it can write.
struct Place {
    _dir: vmm_sys_util::tempdir::TempDir,
    root: PathBuf,
    samepage: PathBuf,
    guest: PathBuf,
    image: PathBuf,
    /// Owned by [`NOBODY`]: consoles, metrics, the broker's socket.
    out: PathBuf,
}

impl Place {
    fn new(image_mib: usize, seed: u64) -> Place {
        let dir = tempdir();
        let root = dir.as_path().to_path_buf();
        let readable = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        readable(&root, 0o755);
        // Copies: the build tree may sit where that user cannot go.
        let samepage = root.join("samepage");
        std::fs::copy(env!("CARGO_BIN_EXE_samepage"), &samepage).expect("copy samepage");
        readable(&samepage, 0o755);
        let guest = root.join("test-guest.elf");
        std::fs::copy(test_guest(), &guest).expect("copy the test guest");
        readable(&guest, 0o644);
        let image = root.join("files.img");
        make_image(&image, image_mib << 20, seed);
        readable(&image, 0o644);
        let out = root.join("out");
        std::fs::create_dir(&out).expect("mkdir");
        std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).expect("chown");
        Place { _dir: dir, root, samepage, guest, image, out }
    }

    /// `samepage ARGS` as [`NOBODY`], no supplementary groups (std drops them with the uid).
    fn samepage(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.samepage);
        cmd.args(args).uid(NOBODY).gid(NOBODY).current_dir(&self.root).env("RUST_LOG", "info");
        cmd
    }

    /// The image, read-only and copied into guest RAM, so that the guests' pages merge.
    fn disk(&self) -> String {
        format!("{},ro,share=off", self.image.display())
    }
}

/// Waits for `child` at most [`LIMIT`]; returns (exit code, stdout, stderr).
fn finish(child: Child) -> (Option<i32>, String, String) {
    let start = Instant::now();
    let pid = child.id();
    let out = std::thread::spawn(move || child.wait_with_output());
    while !out.is_finished() {
        if start.elapsed() > LIMIT {
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = out.join().expect("waiter").expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn density_runs_and_merges_as_an_unprivileged_user() {
    let place = Place::new(32, 71);
    let pages = (32 << 20) / PAGE;
    let consoles = place.out.join("consoles");
    let kvm = KvmAccess::grant();
    let child = place
        .samepage(&["density", "--vms", "2", "--timeout", "120", "--progress-every", "0.5"])
        .args(["--kernel", place.guest.to_str().expect("path"), "--disk", &place.disk()])
        .args(["--cmdline", "testguest.mode=fphash", "--console-dir", consoles.to_str().expect("path")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage density");
    let (code, stdout, stderr) = finish(child);
    kvm.revoke();
    println!("{stdout}\n{stderr}");
    assert_eq!(code, Some(0), "density as uid {NOBODY} failed:\n{stderr}");
    assert!(!stderr.contains("seccomp off"), "filters must be on:\n{stderr}");
    for vm in 0..2 {
        let log = consoles.join(format!("vm{vm}.log"));
        let owner = std::fs::metadata(&log).expect("console log").uid();
        assert_eq!(owner, NOBODY, "{} was written by uid {owner}", log.display());
        let out = std::fs::read_to_string(&log).expect("console");
        assert!(out.contains("fphash: data intact"), "vm{vm}:\n{out}");
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "vm{vm}:\n{out}");
    }
    let r = density_result(&stdout);
    // Both guests' pages map one copy in the broker's store, which checks out.
    assert_eq!(r["mapped_pages"], 2 * pages, "{r:?}");
    assert_eq!(r["store_pages"], pages, "{r:?}");
    assert_eq!(r["saved_bytes"], pages * PAGE, "{r:?}");
    assert_eq!(r["store_verified"], pages, "{r:?}");
}

/// A child killed if a failed assertion leaves it running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `samepage dedupd status --json` as [`NOBODY`].
fn status(place: &Place, socket: &Path) -> Option<serde_json::Value> {
    let out = place.samepage(&["dedupd", "status", "--json", "--socket"]).arg(socket).output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// Waits until `path` (a console) has `line`.
fn wait_for_line(path: &Path, line: &str) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(line) {
            return;
        }
        assert!(start.elapsed() < LIMIT, "{} never printed {line:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_and_dedupd_merge_as_an_unprivileged_user() {
    let place = Place::new(16, 72);
    let pages = (16 << 20) / PAGE;
    let socket = place.out.join("dedupd.sock");
    let broker_log = place.out.join("dedupd.log");
    let kvm = KvmAccess::grant();
    let mut broker = Reaped(
        place
            .samepage(&["dedupd", "--socket", socket.to_str().expect("path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&broker_log).expect("broker log"))
            .spawn()
            .expect("start samepage dedupd"),
    );
    let start = Instant::now();
    while status(&place, &socket).is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the broker never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vms: Vec<(&str, Child)> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let console = place.out.join(format!("{name}.log"));
            let child = place
                .samepage(&["run", "--name", name, "--timeout", "100", "--dedup-scan-every", "0.2"])
                .args(["--kernel", place.guest.to_str().expect("path"), "--disk", &place.disk()])
                .args(["--cmdline", "testguest.mode=fphash testguest.hold_ms=2000"])
                .arg(format!("--serial=file:{}", console.display()))
                .arg("--dedup-socket")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start samepage run");
            (name, child)
        })
        .collect();
    for name in ["a", "b"] {
        wait_for_line(&place.out.join(format!("{name}.log")), "fphash: holding");
    }
    let held = status(&place, &socket).expect("status while both hold");
    for (name, child) in vms {
        let (code, _, stderr) = finish(child);
        assert_eq!(code, Some(0), "run {name} as uid {NOBODY} failed:\n{stderr}");
        let out = std::fs::read_to_string(place.out.join(format!("{name}.log"))).expect("console");
        assert!(out.contains("fphash: data intact after the hold"), "{name}:\n{out}");
        assert!(out.contains(&format!("fphash: reported {pages} pages: merged {pages} ")), "{name}:\n{out}");
    }
    // SAFETY: kill on the pid of our own child, not yet reaped.
    unsafe { libc::kill(broker.0.id() as i32, libc::SIGTERM) };
    let stopped = broker.0.wait().expect("wait for the broker");
    kvm.revoke();
    let log = std::fs::read_to_string(&broker_log).unwrap_or_default();
    println!("status while both held: {held}\nbroker log:\n{log}");
    assert!(stopped.success(), "the broker exited with {stopped}:\n{log}");
    // The user's own domain held one copy that both guests' pages mapped.
    let domain = held["domains"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == format!("uid-{NOBODY}")))
        .unwrap_or_else(|| panic!("no domain uid-{NOBODY}: {held}"));
    assert_eq!(domain["store_pages"].as_i64(), Some(pages), "{domain}");
    assert_eq!(domain["references"].as_i64(), Some(2 * pages), "{domain}");
    for name in ["a", "b"] {
        assert!(log.contains(&format!("uid {NOBODY}, \"{name}\" in domain uid-{NOBODY}")), "{log}");
    }
    assert!(!socket.exists(), "the broker left its socket behind");
}

#[test]
fn without_access_to_kvm_run_says_what_is_missing() {
    // A uid no test grants anything: /dev/kvm stays closed to it.
    const STRANGER: u32 = 65533;
    let place = Place::new(1, 73);
    let out = Command::new(&place.samepage)
        .args(["run", "--serial", "none", "--kernel", place.guest.to_str().expect("path")])
        .uid(STRANGER)
        .gid(STRANGER)
        .output()
        .expect("run samepage");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("samepage: error: no access to /dev/kvm for uid {STRANGER}: "))
            && stderr.contains(&format!("setfacl -m u:{STRANGER}:rw /dev/kvm")),
        "{stderr}"
    );
}

/// `run` as [`NOBODY`] of the test guest reading `place`'s image with sharing on; returns its
/// exit code, stderr, console and the image pages it mapped (from `--metrics`).
fn run_shared(place: &Place, tag: &str) -> (Option<i32>, String, String, u64) {
    let console = place.out.join(format!("{tag}.log"));
    let metrics = place.out.join(format!("{tag}.json"));
    let child = place
        .samepage(&["run", "--timeout", "100", "--kernel", place.guest.to_str().expect("path")])
        .arg("--disk")
        .arg(format!("{},ro", place.image.display()))
        .args(["--cmdline", "testguest.mode=fphash"])
        .arg(format!("--serial=file:{}", console.display()))
        .arg("--metrics")
        .arg(&metrics)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage run");
    let (code, _, stderr) = finish(child);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap_or_default()).unwrap_or_default();
    (code, stderr, console, json["dedup"]["image_mapped"].as_u64().unwrap_or(u64::MAX))
}

/// Sharing an image takes a read lease on it, which needs its owner's uid or CAP_LEASE: a user
/// who may read root's image but not lease it gets its pages copied, with one warning; the
/// same user's own image is shared.
#[test]
fn an_image_the_user_cannot_lease_is_copied_and_its_own_is_shared() {
    let place = Place::new(4, 74);
    let pages = (4 << 20) / PAGE;
    let kvm = KvmAccess::grant();
    let (code, stderr, console, mapped) = run_shared(&place, "roots");
    std::os::unix::fs::chown(&place.image, Some(NOBODY), Some(NOBODY)).expect("chown");
    let (own_code, own_stderr, own_console, own_mapped) = run_shared(&place, "own");
    kvm.revoke();
    println!(
        "root's image: exit {code:?}, {mapped} pages mapped; stderr:\n{stderr}\nthe user's own image: exit \
         {own_code:?}, {own_mapped} pages mapped; stderr:\n{own_stderr}"
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(console.contains("fphash: data intact"), "{console}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].contains("copied, not shared") && lines[0].contains("CAP_LEASE"),
        "one warning line:\n{stderr}"
    );
    assert_eq!(mapped, 0);
    assert_eq!(own_code, Some(0), "{own_stderr}");
    assert!(own_console.contains("fphash: data intact"), "{own_console}");
    assert!(own_stderr.is_empty(), "{own_stderr}");
    assert_eq!(own_mapped as i64, pages);
}
