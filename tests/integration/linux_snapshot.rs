//! A Linux guest snapshotted and restored through the real binary (docs/snapshot.md): booted
//! to a shell script that waits for a line on its console, snapshotted there, and the snapshot
//! restored twice: each restored kernel takes the line it is given, runs the script's commands
//! and hands back its exit status, without booting again; each clone's fphash driver saw a new
//! VM generation ID and its RNG reseeded on it, the clones and the original drew different random
//! numbers, and the clones' clocks moved on by the time the snapshot lay.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::linux::{kernel_and_initrd, make_ext4};
use common::{finish, tempdir};

/// Boot to /init takes ~25 s here (guest kernel code is emulated); leave room for a loaded
/// machine.
const LIMIT: Duration = Duration::from_secs(400);

/// Run by the guest's /init (`samepage.script=snap.sh`): says its uptime, waits for a name,
/// then runs commands that need the kernel (a pipe, /proc, a file in tmpfs, the RNG, sysfs, the
/// kernel log) and exits with status 3.
const GUEST_SCRIPT: &str = r#"read -r up idle < /proc/uptime
echo "snap: up at the snapshot ${up%.*} s"
echo "snap: ready"
read -r name
echo "hello $name" > /tmp/greeting
read -r greeting < /tmp/greeting
echo "snap: random $(dd if=/dev/urandom bs=16 count=1 2>/dev/null | sha256sum)"
echo "snap: vm generations $(cat /sys/bus/virtio/devices/*/fphash/vm_generations)"
echo "snap: reseeds $(dmesg | grep -c 'virtual machine fork')"
echo "snap: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
read -r up idle < /proc/uptime
echo "snap: $greeting, up ${up%.*} s"
exit 3
"#;

/// How long the snapshot lies before it is restored: the clones' clocks must move on by it.
const LIES: Duration = Duration::from_secs(30);

/// The value after `prefix` on the line of `out` that starts with it.
fn field<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
        .trim()
}

/// Seconds of uptime in a `snap: ... up N s` line's `N`.
fn uptime(out: &str, prefix: &str) -> u64 {
    let text = field(out, prefix);
    let n = text.split(" up ").last().unwrap_or(text).trim_end_matches(" s");
    n.parse().unwrap_or_else(|_| panic!("uptime {text:?}"))
}

#[test]
fn a_linux_guest_restored_from_its_snapshot_runs_the_commands_it_is_given() {
    let (kernel, initrd) = kernel_and_initrd();
    let dir = tempdir();
    let (files, image, snap) =
        (dir.as_path().join("files"), dir.as_path().join("disk.img"), dir.as_path().join("snap"));
    std::fs::create_dir_all(&files).expect("files dir");
    std::fs::write(files.join("snap.sh"), GUEST_SCRIPT).expect("script");
    make_ext4(&files, &image, "4M");
    let disk = format!("{},ro", image.display());
    let started = Instant::now();
    let mut original = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .env("RUST_LOG", "info")
        .args(["run", "--kernel", kernel.to_str().expect("path"), "--initrd", initrd.to_str().expect("path")])
        .args(["--disk", &disk, "--cmdline", "quiet samepage.script=snap.sh", "--timeout", "380"])
        .args(["--snapshot-to", snap.to_str().expect("path"), "--snapshot-at", "snap: ready"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    while !snap.join("state.json").exists() {
        if let Some(status) = original.try_wait().expect("wait") {
            panic!("the Linux guest ended ({status}) before its snapshot");
        }
        assert!(started.elapsed() < LIMIT, "no snapshot after {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (booted_in, snapshot_at) = (started.elapsed(), Instant::now());
    original.stdin.as_mut().expect("stdin").write_all(b"amy\n").expect("type");
    let original = finish(original, LIMIT);
    original.assert_no_panic();
    assert_eq!(original.code, Some(3), "original:\n{}\n{}", original.stdout, original.stderr);
    assert!(original.stdout.contains("snap: hello amy, up "), "original:\n{}", original.stdout);

    let at_snapshot = uptime(&original.stdout, "snap: up at the snapshot");
    assert_eq!(field(&original.stdout, "snap: vm generations"), "0", "the original was not restored");

    std::thread::sleep(LIES.saturating_sub(snapshot_at.elapsed()));
    let restore_started = Instant::now();
    let restore = |name: &str| {
        let mut clone = Command::new(env!("CARGO_BIN_EXE_samepage"))
            .env("RUST_LOG", "warn")
            .args(["run", "--restore", snap.to_str().expect("path"), "--timeout", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage");
        clone.stdin.as_mut().expect("stdin").write_all(format!("{name}\n").as_bytes()).expect("type");
        clone
    };
    let (bob, eve) = (restore("bob"), restore("eve"));
    let (bob, eve) = (finish(bob, LIMIT), finish(eve, LIMIT));
    let lain = snapshot_at.elapsed().as_secs() - restore_started.elapsed().as_secs();
    for (name, clone) in [("bob", &bob), ("eve", &eve)] {
        clone.assert_no_panic();
        assert!(
            !clone.stdout.contains("samepage-init: reached /init"),
            "{name} booted again:\n{}",
            clone.stdout
        );
        assert!(
            clone.stdout.contains(&format!("snap: hello {name}, up ")),
            "{name}:\n{}\n{}",
            clone.stdout,
            clone.stderr
        );
        assert_eq!(clone.code, Some(3), "{name}:\n{}\n{}", clone.stdout, clone.stderr);
        // The fphash driver saw one new VM generation ID and the RNG reseeded on it (without
        // the ID both read 0; the random bytes below differ even then, once the clock moved
        // on past the RNG's reseed interval, so they alone prove nothing about the ID).
        assert_eq!(field(&clone.stdout, "snap: vm generations"), "1", "{name}");
        assert_eq!(field(&clone.stdout, "snap: reseeds"), "1", "{name}");
        // Its clock moved on by the time the snapshot lay (uptimes are whole seconds).
        let up = uptime(&clone.stdout, &format!("snap: hello {name}"));
        assert!(
            up + 1 >= at_snapshot + lain,
            "{name}: up {up} s after a snapshot at {at_snapshot} s that lay {lain} s"
        );
    }
    let randoms = [&original, &bob, &eve].map(|run| field(&run.stdout, "snap: random").to_string());
    assert!(
        randoms[0] != randoms[1] && randoms[0] != randoms[2] && randoms[1] != randoms[2],
        "the original and its clones drew the same random bytes: {randoms:?}"
    );
    let line = |run: &common::Run, name: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(&format!("snap: hello {name}")))
            .unwrap_or_default()
            .to_string()
    };
    println!(
        "linux snapshot: booted to the marker in {:.1} s (up {at_snapshot} s); original: {:?}; \
         clones restored after {lain} s: {:?}, {:?}, both done {:.1} s after their start, \
         VM generations seen 1 and 1, RNG reseeded 1 and 1, clock source {}; \
         random bytes' SHA-256 original/bob/eve: {}/{}/{}",
        booted_in.as_secs_f64(),
        line(&original, "amy"),
        line(&bob, "bob"),
        line(&eve, "eve"),
        restore_started.elapsed().as_secs_f64(),
        field(&bob.stdout, "snap: clocksource"),
        &randoms[0][..16],
        &randoms[1][..16],
        &randoms[2][..16],
    );
    println!("{}", original.stderr.lines().find(|l| l.contains("snapshot written")).unwrap_or_default());
}
