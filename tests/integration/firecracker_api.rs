//! Firecracker's API socket (docs/firecracker-compat.md, "The API"), driven by `curl
//! --unix-socket` against a link named `firecracker` to the samepage binary: the test guest
//! configured, started, refused what only a stopped or a paused VM takes, paused, snapshotted,
//! resumed to its exit status; the snapshot loaded into a second process, which ends with the
//! same checksum; and hostile clients (oversized, malformed, slow, a flood of connections)
//! answered with a status while others are served.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{finish, make_image, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(90);

/// A link named `firecracker` to the samepage binary, in `dir`.
fn firecracker_link(dir: &Path) -> PathBuf {
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_samepage"), &link).expect("link");
    link
}

/// `firecracker --api-sock SOCK` with `extra` options, its console's input piped, once its
/// socket is there.
fn start_api(link: &Path, sock: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(link)
        .env("RUST_LOG", "info")
        .args(["--api-sock", sock.to_str().expect("path")])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start firecracker");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("firecracker ended ({status}) before its API socket was there: {err}");
        }
        assert!(start.elapsed() < LIMIT, "no API socket at {}", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// One request with curl: its status and body.
fn curl(sock: &Path, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "60", "--unix-socket"]).arg(sock).args([
        "-X",
        method,
        &format!("http://localhost{path}"),
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(body) = &body {
        cmd.args(["-H", "Content-Type: application/json", "-d", &body.to_string()]);
    }
    let out = cmd.output().expect("curl (the Debian package curl; scripts/setup-host.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (reply, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| panic!("{method} {path}: no status: {text:?} {out:?}"));
    println!("curl {method} {path}: {code} {reply}");
    (code, reply.to_string())
}

/// A request that must get `status`; returns its body.
fn expect(sock: &Path, method: &str, path: &str, body: Option<serde_json::Value>, status: u16) -> String {
    let (code, reply) = curl(sock, method, path, body);
    assert_eq!(code, status, "{method} {path}: {reply}");
    reply
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// The guest's last line: `snapshot: done <name> checksum <sum>`.
fn done_line(stdout: &str) -> String {
    stdout
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with("snapshot: done "))
        .unwrap_or_else(|| panic!("no done line:\n{stdout}"))
        .to_string()
}

#[test]
fn the_api_configures_starts_pauses_snapshots_and_resumes_the_test_guest_and_loads_its_snapshot() {
    let dir = tempdir();
    let (sock, disk) = (dir.as_path().join("api.sock"), dir.as_path().join("disk.img"));
    let (state, memory) = (dir.as_path().join("vm.state"), dir.as_path().join("vm.mem"));
    make_image(&disk, 1 << 20, 11);
    let link = firecracker_link(dir.as_path());
    let mut vm = start_api(&link, &sock, &["--id", "api-test"]);

    let info = json(&expect(&sock, "GET", "/", None, 200));
    assert_eq!((info["id"].as_str(), info["state"].as_str()), (Some("api-test"), Some("Not started")));
    // Refused before the start: a bad value, an unknown path, what only a running VM does.
    let bad = expect(
        &sock,
        "PUT",
        "/machine-config",
        Some(serde_json::json!({"vcpu_count": 0, "mem_size_mib": 64})),
        400,
    );
    assert!(json(&bad)["fault_message"].as_str().is_some_and(|m| m.contains("vCPU")), "{bad}");
    expect(&sock, "GET", "/no-such-endpoint", None, 400);
    let early = expect(&sock, "PATCH", "/vm", Some(serde_json::json!({"state": "Paused"})), 400);
    assert!(early.contains("before starting"), "{early}");
    let no_kernel =
        expect(&sock, "PUT", "/actions", Some(serde_json::json!({"action_type": "InstanceStart"})), 400);
    assert!(no_kernel.contains("without kernel configuration"), "{no_kernel}");

    expect(
        &sock,
        "PUT",
        "/machine-config",
        Some(serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64})),
        204,
    );
    expect(
        &sock,
        "PUT",
        "/boot-source",
        Some(
            serde_json::json!({"kernel_image_path": test_guest(), "boot_args": "testguest.mode=snapshot testguest.disk=1"}),
        ),
        204,
    );
    expect(
        &sock,
        "PUT",
        "/drives/data",
        Some(
            serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": true}),
        ),
        204,
    );
    expect(&sock, "PUT", "/samepage", Some(serde_json::json!({"dedup": "hinted"})), 204);
    expect(&sock, "PUT", "/actions", Some(serde_json::json!({"action_type": "InstanceStart"})), 204);
    assert_eq!(json(&expect(&sock, "GET", "/", None, 200))["state"], "Running");
    let late = expect(
        &sock,
        "PUT",
        "/boot-source",
        Some(serde_json::json!({"kernel_image_path": test_guest()})),
        400,
    );
    assert!(late.contains("after starting"), "{late}");
    let snapshot =
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory});
    let running = expect(&sock, "PUT", "/snapshot/create", Some(snapshot.clone()), 400);
    assert!(running.contains("pause it first"), "{running}");

    expect(&sock, "PATCH", "/vm", Some(serde_json::json!({"state": "Paused"})), 204);
    assert_eq!(json(&expect(&sock, "GET", "/", None, 200))["state"], "Paused");
    expect(&sock, "PUT", "/snapshot/create", Some(snapshot), 204);
    let config = json(&expect(&sock, "GET", "/vm/config", None, 200));
    assert_eq!(config["drives"][0]["drive_id"], "data", "{config}");
    assert_eq!(config["machine-config"]["mem_size_mib"], 64, "{config}");
    expect(&sock, "PATCH", "/vm", Some(serde_json::json!({"state": "Resumed"})), 204);
    assert_eq!(json(&expect(&sock, "GET", "/", None, 200))["state"], "Running");
    assert_eq!(std::fs::metadata(&memory).expect("memory file").len(), 64 << 20);
    assert!(state.exists(), "no state file");

    // The guest waits for a name on its console (after its 8th round), then finishes.
    vm.stdin.as_mut().expect("stdin").write_all(b"a").expect("name");
    let original = finish(vm, LIMIT);
    original.assert_no_panic();
    assert_eq!(original.code, Some(0), "{}\n{}", original.stdout, original.stderr);
    assert!(!sock.exists(), "the API socket outlived its VM");
    let snapshot_line =
        original.stderr.lines().find(|l| l.contains("snapshot written to")).unwrap_or("(none)");
    println!("original: {snapshot_line}");
    println!("original: {}", done_line(&original.stdout));

    // A second process loads the snapshot and runs on from where the first was paused.
    let sock2 = dir.as_path().join("api2.sock");
    let mut clone = start_api(&link, &sock2, &["--id", "api-clone"]);
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": memory},
        "resume_vm": false
    });
    // Loaded paused (resume_vm false): nothing runs until the client resumes it.
    expect(&sock2, "PUT", "/snapshot/load", Some(load), 204);
    assert_eq!(json(&expect(&sock2, "GET", "/", None, 200))["state"], "Paused");
    expect(&sock2, "PATCH", "/vm", Some(serde_json::json!({"state": "Resumed"})), 204);
    assert_eq!(json(&expect(&sock2, "GET", "/", None, 200))["state"], "Running");
    clone.stdin.as_mut().expect("stdin").write_all(b"a").expect("name");
    let restored = finish(clone, LIMIT);
    restored.assert_no_panic();
    assert_eq!(restored.code, Some(0), "{}\n{}", restored.stdout, restored.stderr);
    assert!(
        !restored.stdout.contains("samepage test guest: hello"),
        "the clone booted again:\n{}",
        restored.stdout
    );
    assert_eq!(done_line(&restored.stdout), done_line(&original.stdout));
    println!("loaded through the API: {}", done_line(&restored.stdout));
}

/// Sends `bytes` on a new connection and reads the status line of the reply.
fn raw_status(sock: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(sock).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    // The server may answer and close before it has read all of a request it refuses (a head
    // over the limit, a 503): the rest of the write then fails, and the reply is still there.
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).lines().next().unwrap_or("").to_string()
}

#[test]
fn hostile_api_clients_get_a_status_and_others_are_served_meanwhile() {
    let dir = tempdir();
    let sock = dir.as_path().join("api.sock");
    let link = firecracker_link(dir.as_path());
    let mut vm = start_api(&link, &sock, &["--id", "api-hostile"]);

    let oversized = raw_status(&sock, b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100000\r\n\r\n");
    assert!(oversized.starts_with("HTTP/1.1 413"), "{oversized}");
    let garbage = raw_status(&sock, b"\x01\x02 not http\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let chunked = raw_status(&sock, b"PUT /logger HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(chunked.starts_with("HTTP/1.1 501"), "{chunked}");
    let huge_head = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; 16 * 1024]].concat();
    assert!(raw_status(&sock, &huge_head).starts_with("HTTP/1.1 431"));

    // A slow client holds its connection mid-request; others are answered meanwhile, and it
    // gets a 408 after the request deadline.
    let mut slow = UnixStream::connect(&sock).expect("connect");
    slow.write_all(b"GET / HTT").expect("send");
    let started = Instant::now();
    expect(&sock, "GET", "/", None, 200);
    // Idle connections beyond the limit: the oldest idle ones make room, nobody is refused.
    let idle: Vec<UnixStream> = (0..40).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    expect(&sock, "GET", "/machine-config", None, 200);
    slow.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut reply = String::new();
    let _ = slow.read_to_string(&mut reply);
    let waited = started.elapsed();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(15), "{waited:?}");
    drop(idle);

    // Sixteen clients mid-request fill every slot: the seventeenth is turned away with a 503,
    // and once their deadline passed the API answers again.
    let stuck: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            s.write_all(b"GET /").expect("send");
            s
        })
        .collect();
    // Time for the server to take all sixteen and read their first bytes (well within the
    // 5 s deadline), so that none of them counts as idle.
    std::thread::sleep(Duration::from_secs(1));
    let busy = raw_status(&sock, b"GET / HTTP/1.1\r\n\r\n");
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    std::thread::sleep(Duration::from_secs(6));
    expect(&sock, "GET", "/", None, 200);
    drop(stuck);
    println!(
        "hostile clients: 413 {oversized:?}, 400 {garbage:?}, 501 {chunked:?}, 431, a slow client's 408 after {:.1} s, \
         40 idle connections and 16 stuck ones, 503 {busy:?}",
        waited.as_secs_f64()
    );

    // A stop signal before any VM started ends the process, and the socket goes with it.
    common::signal(&vm, libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = vm.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < LIMIT, "SIGTERM did not end the unstarted VMM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = vm.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert!(!err.contains("panic") && !err.contains("seccomp"), "{err}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(!sock.exists(), "the API socket outlived the process");
}

#[test]
fn with_a_config_file_the_vm_starts_at_once_and_the_api_serves_it_as_kata_polls_it() {
    let dir = tempdir();
    let (sock, disk, config) =
        (dir.as_path().join("api.sock"), dir.as_path().join("rootfs.img"), dir.as_path().join("vm.json"));
    make_image(&disk, 1 << 20, 13);
    // Kata's placeholder drive, swapped for a container image once the VM runs.
    let (placeholder, container) = (dir.as_path().join("drive_0.img"), dir.as_path().join("container.img"));
    std::fs::write(&placeholder, [0u8; 512]).expect("placeholder");
    make_image(&container, 2 << 20, 14);
    let file = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": "testguest.mode=snapshot testguest.disk=1"},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": disk, "is_root_device": false, "is_read_only": true},
            {"drive_id": "drive_0", "path_on_host": placeholder, "is_root_device": false, "is_read_only": false}
        ],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "logger": {"log_path": "/dev/null"},
        "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": dir.as_path().join("kata.hvsock")}
    });
    std::fs::write(&config, serde_json::to_vec(&file).expect("json")).expect("config");
    let link = firecracker_link(dir.as_path());
    let mut vm =
        start_api(&link, &sock, &["--config-file", config.to_str().expect("path"), "--id", "kata-like"]);
    let start = Instant::now();
    // What Kata does: poll GET / until the VM runs.
    let state = loop {
        let (code, body) = curl(&sock, "GET", "/", None);
        if code == 200 && json_state(&body) == "Running" {
            break json_state(&body);
        }
        assert!(vm.try_wait().expect("wait").is_none(), "firecracker ended early");
        assert!(start.elapsed() < LIMIT, "never Running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let shown = json(&expect(&sock, "GET", "/vm/config", None, 200));
    assert_eq!(shown["drives"][0]["drive_id"], "rootfs", "{shown}");
    assert_eq!(shown["vsock"]["guest_cid"], 3, "{shown}");
    // The hybrid vsock socket Kata's agent client connects to: there, its owner's only. The
    // test guest has no vsock driver, so a CONNECT waits (the device holds it for a guest
    // that never answers) and is neither refused nor answered.
    let hvsock = dir.as_path().join("kata.hvsock");
    let mode = std::fs::metadata(&hvsock).expect("the vsock socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "vsock socket mode {mode:o}");
    let mut agent = UnixStream::connect(&hvsock).expect("connect to the vsock socket");
    agent.write_all(b"CONNECT 1024\n").expect("CONNECT");
    agent.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut byte = [0u8; 1];
    let waited = agent.read(&mut byte);
    assert!(
        matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a CONNECT to a guest without a driver: {waited:?}"
    );
    // The shared read-only drive keeps its image (its pages are mapped into the guest); the
    // placeholder becomes the container image: samepage now holds that file's lock, and not
    // the placeholder's.
    let swap = serde_json::json!({"drive_id": "rootfs", "path_on_host": container});
    let refused = expect(&sock, "PATCH", "/drives/rootfs", Some(swap), 400);
    assert!(refused.contains("shared page by page"), "{refused}");
    let swap = serde_json::json!({"drive_id": "drive_0", "path_on_host": container});
    expect(&sock, "PATCH", "/drives/drive_0", Some(swap), 204);
    let shown = json(&expect(&sock, "GET", "/vm/config", None, 200));
    assert_eq!(shown["drives"][1]["path_on_host"], container.to_str().expect("path"), "{shown}");
    let locked_by_samepage = |path: &Path| {
        let file = std::fs::File::open(path).expect("image");
        // SAFETY: flock on a descriptor this test owns; a lock it gets goes with the file.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    };
    assert!(locked_by_samepage(&container), "samepage does not hold the new image");
    assert!(!locked_by_samepage(&placeholder), "samepage still holds the placeholder");
    let missing = serde_json::json!({"drive_id": "drive_0", "path_on_host": dir.as_path().join("nope.img")});
    let refused = expect(&sock, "PATCH", "/drives/drive_0", Some(missing), 400);
    assert!(refused.contains("nope.img"), "{refused}");
    let unknown = serde_json::json!({"drive_id": "drive_9", "path_on_host": container});
    expect(&sock, "PATCH", "/drives/drive_9", Some(unknown), 400);
    expect(&sock, "PATCH", "/vm", Some(serde_json::json!({"state": "Paused"})), 204);
    let snapshot = serde_json::json!({"snapshot_path": dir.as_path().join("s.json"), "mem_file_path": dir.as_path().join("s.mem")});
    let refused = expect(&sock, "PUT", "/snapshot/create", Some(snapshot), 400);
    assert!(refused.contains("vsock"), "a snapshot of a VM with a vsock device: {refused}");
    expect(&sock, "PATCH", "/vm", Some(serde_json::json!({"state": "Resumed"})), 204);
    vm.stdin.as_mut().expect("stdin").write_all(b"k").expect("name");
    let run = finish(vm, LIMIT);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    println!(
        "--api-sock with --config-file: state {state} polled, drive_0 swapped for a container image, \
         paused and resumed, {}",
        done_line(&run.stdout)
    );
}

fn json_state(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn the_balloon_target_set_over_the_api_reaches_the_guest_and_its_figures_come_back() {
    let dir = tempdir();
    let (sock, disk, config) =
        (dir.as_path().join("api.sock"), dir.as_path().join("files.img"), dir.as_path().join("vm.json"));
    make_image(&disk, 1 << 20, 31);
    // The test guest's balloon mode: reads and reports its disk, gives pages back, then waits
    // for a host target of 6144 pages (24 MiB) and holds on a little.
    let file = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(),
                        "boot_args": "testguest.mode=balloon testguest.wait_target=6144 testguest.hold_ms=2000"},
        "drives": [{"drive_id": "files", "path_on_host": disk, "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 0},
        "samepage": {"share_images": false}
    });
    std::fs::write(&config, serde_json::to_vec(&file).expect("json")).expect("config");
    let link = firecracker_link(dir.as_path());
    let vm = start_api(&link, &sock, &["--config-file", config.to_str().expect("path")]);
    let shown = json(&expect(&sock, "GET", "/balloon", None, 200));
    assert_eq!(
        (shown["amount_mib"].as_u64(), shown["deflate_on_oom"].as_bool()),
        (Some(0), Some(false)),
        "{shown}"
    );
    let too_much = expect(&sock, "PATCH", "/balloon", Some(serde_json::json!({"amount_mib": 4096})), 400);
    assert!(too_much.contains("more than the guest"), "{too_much}");
    expect(&sock, "PATCH", "/balloon", Some(serde_json::json!({"amount_mib": 24})), 204);
    assert_eq!(json(&expect(&sock, "GET", "/balloon", None, 200))["amount_mib"], 24);
    let stats = json(&expect(&sock, "GET", "/balloon/statistics", None, 200));
    assert_eq!(
        (stats["target_pages"].as_u64(), stats["target_mib"].as_u64()),
        (Some(6144), Some(24)),
        "{stats}"
    );
    expect(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(serde_json::json!({"stats_polling_interval_s": 1})),
        400,
    );
    let run = finish(vm, LIMIT);
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let seen = run.stdout.lines().find(|l| l.contains("balloon: host target 6144 pages")).map(str::trim_end);
    assert!(seen.is_some(), "the guest never saw the target:\n{}", run.stdout);
    println!("PATCH /balloon 24 MiB: guest: {}; statistics {stats}", seen.unwrap_or_default());
}

#[test]
fn send_ctrl_alt_del_presses_the_keys_on_the_guests_i8042() {
    let dir = tempdir();
    let (sock, config) = (dir.as_path().join("api.sock"), dir.as_path().join("vm.json"));
    // The test guest polls the i8042 for Ctrl+Alt+Del and exits 0x42 when it comes.
    let file = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": "testguest.mode=ctrlaltdel"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}
    });
    std::fs::write(&config, serde_json::to_vec(&file).expect("json")).expect("config");
    let link = firecracker_link(dir.as_path());
    let vm = start_api(&link, &sock, &["--config-file", config.to_str().expect("path")]);
    let start = Instant::now();
    while json_state(&curl(&sock, "GET", "/", None).1) != "Running" {
        assert!(start.elapsed() < LIMIT, "never Running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let action = serde_json::json!({"action_type": "SendCtrlAltDel"});
    expect(&sock, "PUT", "/actions", Some(action), 204);
    let run = finish(vm, LIMIT);
    run.assert_no_panic();
    let line = run.stdout.lines().find(|l| l.starts_with("keyboard: ")).unwrap_or("");
    println!(
        "SendCtrlAltDel: 204; the guest: {:?}; exit {:?}",
        run.stdout.lines().filter(|l| l.starts_with("keyboard:")).collect::<Vec<_>>(),
        run.code
    );
    assert!(
        run.stdout.contains("keyboard: Ctrl+Alt+Del pressed and released"),
        "{line}\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.code, Some(0x42), "{}", run.stderr);
}
