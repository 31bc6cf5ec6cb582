//! A Linux guest snapshotted and restored through the real binary (docs/snapshot.md): booted
//! to a shell script that waits for a line on its console, snapshotted there, and the snapshot
//! restored: the restored kernel takes the line it is given, runs the script's commands and hands
//! back its exit status, without booting again.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::linux::{kernel_and_initrd, make_ext4};
use common::{finish, tempdir};

/// Boot to /init takes ~25 s here (guest kernel code is emulated); leave room for a loaded
/// machine.
const LIMIT: Duration = Duration::from_secs(400);

/// Run by the guest's /init (`samepage.script=snap.sh`): waits for a name, then runs commands
/// that need the kernel (a pipe, /proc, a file in tmpfs) and exits with status 3.
const GUEST_SCRIPT: &str = r#"echo "snap: ready"
read -r name
echo "hello $name" > /tmp/greeting
read -r greeting < /tmp/greeting
read -r up idle < /proc/uptime
echo "snap: $greeting, up ${up%.*} s"
exit 3
"#;

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
    let booted_in = started.elapsed();
    original.stdin.as_mut().expect("stdin").write_all(b"amy\n").expect("type");
    let original = finish(original, LIMIT);
    original.assert_no_panic();
    assert_eq!(original.code, Some(3), "original:\n{}\n{}", original.stdout, original.stderr);
    assert!(original.stdout.contains("snap: hello amy, up "), "original:\n{}", original.stdout);

    let restore_started = Instant::now();
    let mut restored = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .env("RUST_LOG", "warn")
        .args(["run", "--restore", snap.to_str().expect("path"), "--timeout", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    restored.stdin.as_mut().expect("stdin").write_all(b"bob\n").expect("type");
    let restored = finish(restored, LIMIT);
    restored.assert_no_panic();
    assert!(
        !restored.stdout.contains("samepage-init: reached /init"),
        "it booted again:\n{}",
        restored.stdout
    );
    assert!(
        restored.stdout.contains("snap: hello bob, up "),
        "restored:\n{}\n{}",
        restored.stdout,
        restored.stderr
    );
    assert_eq!(restored.code, Some(3), "restored:\n{}\n{}", restored.stdout, restored.stderr);
    let line = |run: &common::Run| {
        run.stdout.lines().find(|l| l.starts_with("snap: hello")).unwrap_or_default().to_string()
    };
    println!(
        "linux snapshot: booted to the marker in {:.1} s; original: {:?}; restored: {:?}, done {:.1} s after its start",
        booted_in.as_secs_f64(),
        line(&original),
        line(&restored),
        restore_started.elapsed().as_secs_f64()
    );
    println!("{}", original.stderr.lines().find(|l| l.contains("snapshot written")).unwrap_or_default());
}
