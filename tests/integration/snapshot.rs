//! Snapshots through the real binary (docs/snapshot.md): the test guest snapshotted while it
//! waits inside an I/O instruction and restored (its work goes on to the same checksums),
//! snapshotted again after a restore, 8 clones of one snapshot whose writes stay their own,
//! clones while the host compacts memory, a clone whose snapshot memory file is truncated under
//! it, and snapshot directories that are truncated, corrupt,
//! from another version or whose disk changed, refused with a clear error.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::compaction::{pages_migrated, Compactor};
use common::{b3sum, finish, make_image, tempdir, test_guest, Run};

const LIMIT: Duration = Duration::from_secs(90);
const MARKER: &str = "snapshot-here";
/// The guest's work: 512 pages, 24 rounds, the marker after round 8, disk 0 read each round.
const CMDLINE: &str = "testguest.mode=snapshot testguest.disk=1";

/// samepage with `args`, standard input piped (the guest waits for a name on its console),
/// info logs on (the snapshot's figures).
fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .env("RUST_LOG", "info")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage")
}

/// Types `name` on the VM's console.
fn type_name(child: &mut Child, name: u8) {
    child.stdin.as_mut().expect("stdin").write_all(&[name]).expect("write stdin");
}

/// Waits until `dir` holds a complete snapshot (its state file is renamed into place last).
fn wait_for_snapshot(dir: &Path, child: &mut Child) {
    let start = Instant::now();
    while !dir.join("state.json").exists() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("samepage ended ({status}) before the snapshot was written");
        }
        assert!(start.elapsed() < LIMIT, "no snapshot in {} after {LIMIT:?}", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the test guest with `disk`, snapshots it into `dir` at the marker, then names it
/// `name` and lets it finish.
fn snapshot_original(dir: &Path, disk: &Path, name: u8) -> Run {
    snapshot_original_with(dir, disk, name, &[])
}

/// As [`snapshot_original`], with `extra` options.
fn snapshot_original_with(dir: &Path, disk: &Path, name: u8, extra: &[&str]) -> Run {
    snapshot_original_cmdline(dir, disk, name, CMDLINE, extra)
}

/// As [`snapshot_original_with`], the guest given `cmdline`.
fn snapshot_original_cmdline(dir: &Path, disk: &Path, name: u8, cmdline: &str, extra: &[&str]) -> Run {
    let kernel = test_guest();
    let disk_arg = format!("{},ro", disk.display());
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("path"),
        "--mem",
        "64M",
        "--disk",
        &disk_arg,
        "--cmdline",
        cmdline,
        "--snapshot-to",
        dir.to_str().expect("path"),
        "--snapshot-at",
        MARKER,
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    let mut child = start(&args);
    wait_for_snapshot(dir, &mut child);
    type_name(&mut child, name);
    let run = finish(child, LIMIT);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "original VM failed:\n{}\n{}", run.stdout, run.stderr);
    run
}

/// Restores `dir` with `extra` options, names the guest `name` (if any) and waits for it.
fn restore(dir: &Path, name: Option<u8>, extra: &[&str]) -> Run {
    let mut args = vec!["run", "--restore", dir.to_str().expect("path"), "--timeout", "60"];
    args.extend_from_slice(extra);
    let mut child = start(&args);
    if let Some(name) = name {
        type_name(&mut child, name);
    }
    finish(child, LIMIT)
}

/// The console lines from the first one starting with `from` on.
fn lines_from<'a>(stdout: &'a str, from: &str) -> Vec<&'a str> {
    stdout.lines().map(str::trim_end).skip_while(|l| !l.starts_with(from)).collect()
}

/// The guest's last line: `snapshot: done <name> checksum <sum>`.
fn done_line(run: &Run) -> String {
    run.stdout
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with("snapshot: done "))
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", run.stdout, run.stderr))
        .to_string()
}

fn snapshot_log_line(run: &Run) -> &str {
    run.stderr.lines().find(|l| l.contains("snapshot written to")).unwrap_or("(no snapshot line)")
}

#[test]
fn the_test_guest_snapshotted_mid_work_resumes_where_it_was_and_can_be_snapshotted_again() {
    let dir = tempdir();
    let (snap, again, disk) =
        (dir.as_path().join("snap"), dir.as_path().join("again"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 7);
    let original = snapshot_original(&snap, &disk, b'a');
    println!("original: {}", snapshot_log_line(&original));
    println!("original: {}", done_line(&original));
    let memory = std::fs::metadata(snap.join("memory")).expect("memory file");
    // SAFETY-free figure: blocks actually allocated (zero pages are holes).
    let allocated = std::os::unix::fs::MetadataExt::blocks(&memory) * 512;
    println!("snapshot: memory file {} bytes long, {} bytes allocated", memory.len(), allocated);
    assert_eq!(memory.len(), 64 << 20);
    // The guest's memory and registers are for the snapshot's owner only.
    use std::os::unix::fs::PermissionsExt;
    for file in ["memory", "state.json"] {
        let mode = std::fs::metadata(snap.join(file)).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} is mode {mode:o}");
    }

    // The restored VM resumes inside the guest's wait for a name: no boot, the same lines from
    // there on, the same checksums (its RAM, registers, UART, disk queue all as they were).
    let restored = restore(
        &snap,
        Some(b'a'),
        &["--snapshot-to", again.to_str().expect("path"), "--snapshot-at", "snapshot: round 12 "],
    );
    restored.assert_no_panic();
    assert_eq!(restored.code, Some(0), "restored VM failed:\n{}\n{}", restored.stdout, restored.stderr);
    assert!(
        !restored.stdout.contains("samepage test guest: hello"),
        "the restored VM booted again:\n{}",
        restored.stdout
    );
    assert!(
        !restored.stdout.contains("snapshot: round 8 "),
        "the restored VM redid work:\n{}",
        restored.stdout
    );
    let expected = lines_from(&original.stdout, "snapshot: named");
    assert!(expected.len() > 10, "original output:\n{}", original.stdout);
    assert_eq!(
        lines_from(&restored.stdout, "snapshot: named"),
        expected,
        "restored output:\n{}",
        restored.stdout
    );
    println!(
        "restored: {} lines as the original's after the snapshot, {}",
        expected.len(),
        done_line(&restored)
    );
    println!("restored: {}", snapshot_log_line(&restored));

    // A restored VM snapshotted again, mid-work, and that snapshot restored: same end.
    let twice = restore(&again, None, &[]);
    twice.assert_no_panic();
    assert_eq!(twice.code, Some(0), "second restore failed:\n{}\n{}", twice.stdout, twice.stderr);
    assert_eq!(done_line(&twice), done_line(&original));
    let first = twice.stdout.lines().find(|l| l.starts_with("snapshot: round")).unwrap_or("(none)");
    println!("restored twice: resumed before {first:?}, {}", done_line(&twice));
}

#[test]
fn eight_clones_of_one_snapshot_keep_their_writes_apart_and_leave_the_snapshot_unchanged() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 8);
    snapshot_original(&snap, &disk, b'a');
    let memory_hash = b3sum(&snap.join("memory"));
    // All at once: each names itself, writes its name into every page, and checks at the end
    // that every page still holds its own name.
    let names = b"bcdefghi";
    let mut children: Vec<(u8, Child)> = names
        .iter()
        .map(|&name| (name, start(&["run", "--restore", snap.to_str().expect("path"), "--timeout", "60"])))
        .collect();
    for (name, child) in &mut children {
        type_name(child, *name);
    }
    let mut sums = std::collections::BTreeMap::new();
    for (name, child) in children {
        let run = finish(child, LIMIT);
        run.assert_no_panic();
        assert_eq!(run.code, Some(0), "clone {} failed:\n{}\n{}", name as char, run.stdout, run.stderr);
        let done = done_line(&run);
        assert!(done.starts_with(&format!("snapshot: done {} ", name as char)), "{done}");
        println!("clone {}: {done}", name as char);
        sums.insert(name, done.rsplit(' ').next().unwrap_or_default().to_string());
    }
    let distinct: std::collections::BTreeSet<_> = sums.values().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "clones with different names ended with equal checksums: {sums:?}"
    );
    // The same name again, alone: the same checksum (nothing of the others leaked in).
    let again = restore(&snap, Some(b'b'), &[]);
    assert_eq!(done_line(&again), format!("snapshot: done b checksum {}", sums[&b'b']));
    assert_eq!(
        b3sum(&snap.join("memory")),
        memory_hash,
        "a clone's writes reached the snapshot's memory file"
    );
    println!("snapshot memory file unchanged after 9 clones: blake3 {memory_hash}");
}

#[test]
fn clones_run_right_while_the_host_compacts_memory() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 9);
    let original = snapshot_original(&snap, &disk, b'z');
    let migrated_before = pages_migrated();
    let compactor = Compactor::start(Duration::from_millis(5));
    let runs: Vec<Run> = (0..4)
        .map(|_| {
            let mut child = start(&["run", "--restore", snap.to_str().expect("path"), "--timeout", "60"]);
            std::thread::sleep(Duration::from_millis(50));
            type_name(&mut child, b'z');
            child
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|child| finish(child, LIMIT))
        .collect();
    let rounds = compactor.finish();
    for run in &runs {
        run.assert_no_panic();
        assert_eq!(run.code, Some(0), "clone failed:\n{}\n{}", run.stdout, run.stderr);
        assert_eq!(done_line(run), done_line(&original));
    }
    println!(
        "4 clones under {rounds} compaction rounds ({} pages migrated host-wide): each {}",
        pages_migrated().saturating_sub(migrated_before),
        done_line(&original)
    );
}

/// Runs a restore of `dir` that must be refused with `expected` in its error.
fn assert_refused(dir: &Path, expected: &str) {
    let run = restore(dir, None, &[]);
    run.assert_no_panic();
    assert_eq!(
        run.code,
        Some(1),
        "restore of a bad snapshot did not fail as a start failure:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains(expected), "expected {expected:?} in:\n{}", run.stderr);
    assert!(!run.stdout.contains("snapshot:"), "the guest ran:\n{}", run.stdout);
    println!("refused: {}", run.stderr.lines().find(|l| l.contains("error")).unwrap_or_default());
}

#[test]
fn truncated_corrupt_foreign_or_stale_snapshots_are_refused_clearly() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 10);
    snapshot_original(&snap, &disk, b'a');
    let state = std::fs::read_to_string(snap.join("state.json")).expect("state");
    let copy = |name: &str, state_text: &str| {
        let to = dir.as_path().join(name);
        std::fs::create_dir_all(&to).expect("dir");
        std::fs::write(to.join("state.json"), state_text).expect("state");
        std::fs::copy(snap.join("memory"), to.join("memory")).expect("memory");
        to
    };

    let truncated = copy("truncated", &state);
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .expect("open")
        .set_len(32 << 20)
        .expect("truncate");
    assert_refused(&truncated, "the memory file holds 33554432 bytes, the state describes 67108864");

    assert_refused(&copy("cut-state", &state[..state.len() / 2]), "is not a samepage snapshot state");
    assert_refused(&copy("garbage", "\u{0}\u{1}not json"), "is not a samepage snapshot state");
    assert_refused(
        &copy("other-version", &state.replacen("\"version\":1", "\"version\":2", 1)),
        "which restores only its own snapshots",
    );
    assert_refused(&copy("no-vcpus", &state.replacen("\"vcpus\":1", "\"vcpus\":0", 1)), "invalid state");
    assert_refused(
        &copy("other-host", &state.replacen("\"kvm_api\":12", "\"kvm_api\":11", 1)),
        "taken on another host",
    );
    assert_refused(
        &copy("huge-ram", &state.replacen("\"mem_bytes\":67108864", "\"mem_bytes\":18446744073709547520", 1)),
        "invalid state",
    );
    assert_refused(&dir.as_path().join("missing"), "cannot open");

    // The read-only disk changed after the snapshot: the guest's view of it would be stale.
    std::thread::sleep(Duration::from_millis(20));
    make_image(&disk, 1 << 20, 11);
    assert_refused(&snap, "changed since the snapshot");
}

#[test]
fn density_restores_clones_of_one_snapshot_and_counts_its_page_cache_once() {
    let dir = tempdir();
    let (snap, running, disk, consoles) = (
        dir.as_path().join("snap"),
        dir.as_path().join("running"),
        dir.as_path().join("disk.img"),
        dir.as_path().join("consoles"),
    );
    make_image(&disk, 1 << 20, 12);
    let original = snapshot_original(&snap, &disk, b'a');
    // A snapshot of a guest at work (not waiting for input), from a restored VM.
    let second = restore(
        &snap,
        Some(b'a'),
        &["--snapshot-to", running.to_str().expect("path"), "--snapshot-at", "snapshot: round 12 "],
    );
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    let run = common::run(
        &[
            "density",
            "--restore",
            running.to_str().expect("path"),
            "--vms",
            "4",
            "--console-dir",
            consoles.to_str().expect("path"),
            "--timeout",
            "60",
        ],
        LIMIT,
    );
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "density failed:\n{}\n{}", run.stdout, run.stderr);
    for vm in 0..4 {
        let console = std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).expect("console");
        assert!(console.lines().any(|l| l.trim_end() == done_line(&original)), "vm{vm}:\n{console}");
    }
    let result = common::density_result(&run.stdout);
    let cache = result["snapshot_cache_bytes"];
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(running.join("memory")).expect("memory"))
            * 512;
    assert!(
        cache > 0 && cache as u64 <= allocated,
        "snapshot page cache {cache}, file allocated {allocated}"
    );
    let line =
        run.stdout.lines().find(|l| l.contains("guest RAM on the host at the end")).unwrap_or_default();
    assert!(line.contains("snapshot page cache"), "{}", run.stdout);
    println!("density --restore, 4 clones:{line}");
}

/// Whether process `pid` holds a lease on the file with inode `ino` (`/proc/locks`).
fn holds_lease(pid: u32, ino: u64) -> bool {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        l.contains("LEASE")
            && f.iter().any(|x| *x == pid.to_string())
            && f.iter().any(|x| x.rsplit(':').next() == Some(&ino.to_string()))
    })
}

#[test]
fn a_clone_runs_on_right_when_its_snapshot_memory_file_is_truncated_under_it() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 9);
    let original = snapshot_original(&snap, &disk, b't');
    let memory = snap.join("memory");
    let ino = std::fs::metadata(&memory).expect("memory file").ino();
    let mut clone = start(&["run", "--restore", snap.to_str().expect("path"), "--timeout", "60"]);
    let waiting = Instant::now();

    while !holds_lease(clone.id(), ino) {
        assert!(clone.try_wait().expect("wait").is_none(), "the clone ended before it took its lease");
        assert!(waiting.elapsed() < LIMIT, "no lease on the snapshot's memory file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The clone waits for its name, its RAM mapping the file. Opening the file for writing
    // waits until the clone has made those pages its own; then the file is cut to nothing.
    let opened = Instant::now();
    let writer = std::fs::OpenOptions::new().write(true).open(&memory).expect("open the memory file");
    let waited = opened.elapsed();
    writer.set_len(0).expect("truncate");
    type_name(&mut clone, b't');
    let run = finish(clone, LIMIT);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "clone failed:\n{}\n{}", run.stdout, run.stderr);
    assert_eq!(done_line(&run), done_line(&original), "the clone's work went on as the original's");
    let copied = run
        .stderr
        .lines()
        .find(|l| l.contains("were copied into the VM's own memory"))
        .unwrap_or_else(|| panic!("no copy logged:\n{}", run.stderr));
    println!(
        "snapshot memory truncated under a clone: the writer waited {:.1} ms; clone: {}; {}",
        waited.as_secs_f64() * 1e3,
        done_line(&run),
        copied.split_once("snapshot memory ").map_or(copied, |(_, rest)| rest)
    );
}

#[test]
fn a_snapshot_of_two_vcpus_keeps_the_waiting_one_waiting_and_resumes_the_running_one() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 9);
    let original = snapshot_original_with(&snap, &disk, b'v', &["--vcpus", "2"]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("state.json")).expect("state"))
            .expect("json");
    let mp_states: Vec<u64> = state["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| v["mp_state"][0].as_u64().expect("mp_state"))
        .collect();
    // vCPU 0 runs the guest (KVM_MP_STATE_RUNNABLE, 0); the test guest never starts vCPU 1,
    // which waits for its INIT and start-up IPIs (KVM_MP_STATE_UNINITIALIZED, 1).
    assert_eq!(mp_states, [0, 1], "the vCPUs' MP states");
    let clone = restore(&snap, Some(b'v'), &[]);
    clone.assert_no_panic();
    assert_eq!(clone.code, Some(0), "clone failed:\n{}\n{}", clone.stdout, clone.stderr);
    assert_eq!(done_line(&clone), done_line(&original));
    println!("2 vCPUs snapshotted (MP states {mp_states:?}) and restored: {}", done_line(&clone));
}

/// The `snapshot: reported N pages: ...` line.
fn reported_line(run: &Run) -> String {
    run.stdout
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with("snapshot: reported "))
        .unwrap_or_else(|| panic!("no reported line:\n{}\n{}", run.stdout, run.stderr))
        .to_string()
}

fn dedup_figures(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("metrics");
    serde_json::from_str::<serde_json::Value>(&text).expect("metrics json")["dedup"].clone()
}

#[test]
fn a_clones_reports_of_pages_its_snapshot_holds_are_answered_already_without_a_hash_or_a_store_copy() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    let (original_metrics, clone_metrics) =
        (dir.as_path().join("original.json"), dir.as_path().join("clone.json"));
    make_image(&disk, 1 << 20, 17);
    // 64 pages every VM fills alike, reported once named, the host hashing them.
    let cmdline = format!("{CMDLINE} testguest.report=64 testguest.hash=host");
    let original = snapshot_original_cmdline(
        &snap,
        &disk,
        b'a',
        &cmdline,
        &["--metrics", original_metrics.to_str().expect("path")],
    );
    // The original's pages are its own anonymous memory: merged into the store, hashed.
    let original_line = reported_line(&original);
    assert!(
        original_line.starts_with("snapshot: reported 64 pages: merged 64 already 0 "),
        "{original_line}"
    );
    let before = dedup_figures(&original_metrics);
    assert!(before["host_hashes_for_guests"].as_u64() >= Some(64), "{before}");

    // The clone maps them from the snapshot's memory file: shared with every clone already.
    let clone = restore(&snap, Some(b'b'), &["--metrics", clone_metrics.to_str().expect("path")]);
    clone.assert_no_panic();
    assert_eq!(clone.code, Some(0), "{}\n{}", clone.stdout, clone.stderr);
    let clone_line = reported_line(&clone);
    assert!(clone_line.starts_with("snapshot: reported 64 pages: merged 0 already 64 "), "{clone_line}");
    let after = dedup_figures(&clone_metrics);
    assert_eq!(after["snapshot_pages"], 64, "{after}");
    assert_eq!(after["host_hashes_for_guests"], 0, "a snapshot page was hashed: {after}");
    assert_eq!(after["store_pages"], 0, "a snapshot page was copied into the store: {after}");
    println!("original: {original_line}; clone: {clone_line}");
    println!(
        "clone's dedup: snapshot_pages {}, host hashes for guests {}, store pages {}",
        after["snapshot_pages"], after["host_hashes_for_guests"], after["store_pages"]
    );
}

#[test]
fn a_snapshot_memory_file_written_while_a_clone_starts_stops_the_restore() {
    let dir = tempdir();
    let (snap, disk) = (dir.as_path().join("snap"), dir.as_path().join("disk.img"));
    make_image(&disk, 1 << 20, 19);
    snapshot_original(&snap, &disk, b'a');
    // Between opening the memory file and taking its lease, another process writes it.
    let child = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .env(samepage::fault::FAULT_ENV, "snapshot-written-before-lease")
        .args(["run", "--restore", snap.to_str().expect("path"), "--timeout", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samepage");
    let run = finish(child, LIMIT);
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "the clone ran on a changed file:\n{}", run.stdout);
    assert!(run.stderr.contains("changed while the VM was being restored from it"), "{}", run.stderr);
    assert!(!run.stdout.contains("snapshot: named"), "the clone ran:\n{}", run.stdout);
    println!("{}", run.stderr.lines().last().unwrap_or(""));
}

#[test]
fn a_vm_with_a_balloon_is_snapshotted_and_its_clone_gives_pages_of_the_snapshot_back_as_zeros() {
    let dir = tempdir();
    let (snap, disk, sock) =
        (dir.as_path().join("snap"), dir.as_path().join("disk.img"), dir.as_path().join("balloon.sock"));
    make_image(&disk, 1 << 20, 29);
    // The balloon's driver runs before the snapshot; once named, each VM inflates 32 of the
    // 64 pages every VM fills alike, deflates them and checks they read zeros.
    let cmdline = format!("{CMDLINE} testguest.report=64 testguest.balloon_pages=32");
    let original = snapshot_original_cmdline(&snap, &disk, b'a', &cmdline, &["--balloon"]);
    original.assert_line("snapshot: balloon gave back 32 pages, they read zeros");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("state.json")).expect("state"))
            .expect("json");
    let options = state["machine"]["balloon"].as_str().expect("the machine's balloon").to_string();
    let devices = state["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 3, "disk, fphash device, balloon");
    let balloon = &devices[2]["device"]["balloon"];
    assert!(balloon["target"].is_u64() && balloon["actual"].is_u64(), "{}", devices[2]);

    // The clone: the snapshot's balloon, its control socket served, the pages it gives back
    // (which map the snapshot's memory file) reading zeros, and the original's checksum.
    let clone = restore(&snap, Some(b'a'), &["--balloon-socket", sock.to_str().expect("path")]);
    clone.assert_no_panic();
    assert_eq!(clone.code, Some(0), "{}\n{}", clone.stdout, clone.stderr);
    assert!(
        !clone.stdout.contains("samepage test guest: hello"),
        "the clone booted again:\n{}",
        clone.stdout
    );
    clone.assert_line("snapshot: balloon gave back 32 pages, they read zeros");
    assert_eq!(done_line(&clone), done_line(&original));
    println!(
        "balloon {options:?} snapshotted (state {balloon}); clone: 32 pages of the snapshot given back read zeros, {}",
        done_line(&clone)
    );
}
