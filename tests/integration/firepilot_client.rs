//! A maintained client of Firecracker's API, the Rust crate `firepilot`, drives samepage as its
//! Firecracker binary (a link named `firecracker`): it lays out its workspace, starts the binary
//! with `--api-sock`, configures a drive and the boot source over the socket and sends
//! `InstanceStart`; the test guest reads its disk, reports its pages to the fphash device (merging
//! on, samepage's default) and exits 0. firepilot has no metrics call, so the test asks for
//! a metrics file over the same socket (`PUT /metrics`) before the start, and reads the exit
//! status and the merge figures from it once the VM is gone.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{make_image, tempdir, test_guest};
use firepilot::builder::drive::DriveBuilder;
use firepilot::builder::executor::FirecrackerExecutorBuilder;
use firepilot::builder::kernel::KernelBuilder;
use firepilot::builder::{Builder, Configuration};
use firepilot::machine::Machine;

const LIMIT: Duration = Duration::from_secs(90);

/// One request on the API socket with a plain Unix stream: the status line.
fn put(sock: &Path, path: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    let mut stream = UnixStream::connect(sock).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.lines().next().unwrap_or("").to_string()
}

#[test]
fn firepilot_runs_samepage_as_its_firecracker_and_the_test_guest_exits_0_with_its_pages_merged() {
    let dir = tempdir();
    let link = dir.as_path().join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_samepage"), &link).expect("link");
    let (disk, chroot, metrics) =
        (dir.as_path().join("disk.img"), dir.as_path().join("srv"), dir.as_path().join("metrics.json"));
    make_image(&disk, 2 << 20, 23);
    std::fs::create_dir_all(&chroot).expect("chroot");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    runtime.block_on(async {
        let executor = FirecrackerExecutorBuilder::new()
            .with_chroot(chroot.to_str().expect("path").to_string())
            .with_exec_binary(link.clone())
            .try_build()
            .expect("executor");
        let kernel = KernelBuilder::new()
            .with_kernel_image_path(test_guest().to_str().expect("path").to_string())
            .with_boot_args("testguest.mode=fphash".to_string())
            .try_build()
            .expect("kernel");
        let drive = DriveBuilder::new()
            .with_drive_id("data".to_string())
            .with_path_on_host(disk.clone())
            .as_read_only()
            .try_build()
            .expect("drive");
        let config = Configuration::new("firepilot_vm".to_string())
            .with_executor(executor)
            .with_kernel(kernel)
            .with_drive(drive);
        let mut machine = Machine::new();
        machine
            .create(config)
            .await
            .expect("firepilot: create (samepage started, drive and kernel configured)");
        let sock = chroot.join("firepilot_vm").join("firecracker.socket");
        assert!(sock.exists(), "no API socket at {}", sock.display());
        let status = put(&sock, "/metrics", &serde_json::json!({ "metrics_path": metrics }));
        assert!(status.starts_with("HTTP/1.1 204"), "PUT /metrics: {status}");
        machine.start().await.expect("firepilot: start");
        // The guest exits by itself; samepage ends with it and its socket goes.
        let start = Instant::now();
        while sock.exists() {
            assert!(start.elapsed() < LIMIT, "the VM did not end within {LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = machine.kill().await;
    });
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics")).expect("metrics json");
    assert_eq!(figures["exit_code"], 0, "{figures}");
    let merged = figures["dedup"]["merged"].as_u64().unwrap_or(0);
    let reported =
        figures["fphash"]["reported"].as_u64().or(figures["dedup"]["reported"].as_u64()).unwrap_or(0);
    assert!(merged > 0, "nothing merged: {figures}");
    println!(
        "firepilot 1.2 drove samepage: exit code {}, {reported} pages reported, {merged} merged, disk {}",
        figures["exit_code"], figures["disks"][0]["path"]
    );
}
