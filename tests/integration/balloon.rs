//! The balloon through the real binary, real KVM and the test guest (`testguest.mode=balloon`,
//! native speed): a guest that gives back pages merged with another VM's, or mapped from a
//! shared image, and uses them again reads zeros and then its own data, never another VM's,
//! the store's or the image's; the other VM keeps its pages; the store keeps what the other VM
//! still maps and drops the rest of the giver's references. And the control socket under the
//! VMM's seccomp filter: targets reach the guest, bad requests are refused, and the socket
//! goes when the VM does.

use crate::common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::linux::{metric, read_metrics, LiveVm};
use common::{density_result, make_image, run, samepage, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(240);
const MIB: u64 = 1 << 20;
/// The shared file: 16 MiB, 4096 pages.
const PAGES: u64 = 4096;
/// What the giving guest gives back: half through the reporting queue, 16 through the
/// inflateq (the test guest's defaults).
const REPORTED: u64 = PAGES / 2;
const INFLATED: u64 = 16;

/// `density` of two test guests reading one 16 MiB image copied into their RAM
/// (`,ro,share=off`, so the pages merge through fphash): vm0 gives pages back, vm1 only holds
/// the same pages for 3 s and checks them after vm0 is done. Returns the result and consoles.
fn two_guests_one_gives_back(extra: &[&str]) -> (HashMap<String, i64>, Vec<String>) {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, (PAGES * 4096) as usize, 71);
    let disk = format!("{},ro,share=off", image.display());
    let consoles = dir.as_path().join("consoles");
    let mut args = vec![
        "density",
        "--vms",
        "2",
        "--timeout",
        "200",
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--balloon",
        "--cmdline",
        "testguest.mode=balloon",
        "--vm-cmdline",
        "1:testguest.give_back=0 testguest.inflate=0 testguest.hold_ms=3000",
        "--console-dir",
        consoles.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    let result = run(&args, LIMIT);
    println!("{}", result.stdout);
    result.assert_no_panic();
    let outs: Vec<String> = (0..2)
        .map(|vm| std::fs::read_to_string(consoles.join(format!("vm{vm}.log"))).unwrap_or_default())
        .collect();
    assert_eq!(result.code, Some(0), "stderr: {}\nvm0:\n{}\nvm1:\n{}", result.stderr, outs[0], outs[1]);
    (density_result(&result.stdout), outs)
}

fn check_reuse_of_merged_pages(how: &str, extra: &[&str]) {
    let (r, outs) = two_guests_one_gives_back(extra);
    let (giver, holder) = (&outs[0], &outs[1]);
    for line in [
        format!("balloon: reported {PAGES} pages to fphash: merged {PAGES} already 0 mismatch 0 bad_gpa 0"),
        format!("balloon: {REPORTED} reported pages read zeros"),
        format!("balloon: the guest's own data over {REPORTED} reported pages reads back"),
        format!("balloon: {INFLATED} inflated pages read zeros"),
        format!("balloon: the guest's own data over {INFLATED} inflated pages reads back"),
        "balloon: kept pages intact, given-back pages hold the guest's own data".to_string(),
    ] {
        assert!(giver.lines().any(|l| l.starts_with(&line)), "vm0 lacks {line:?}:\n{giver}");
    }
    assert!(holder.contains("balloon: data intact after the hold"), "vm1:\n{holder}");
    let given = (REPORTED + INFLATED) as i64;
    let pages = PAGES as i64;
    // Every page given back mapped a store slot (both VMs merged all of theirs): each got fresh
    // memory and its reference dropped; vm1 still maps all the slots, so the store keeps them.
    assert_eq!((r["discarded"], r["discarded_remapped"]), (given, given), "{r:?}");
    assert_eq!(r["mapped_pages"], 2 * pages - given, "{r:?}");
    assert_eq!((r["store_pages"], r["store_verified"]), (pages, pages), "{r:?}");
    assert_eq!(r["vmas"], r["vmas_counted"], "the engine's VMA count after the discards: {r:?}");
    let took = giver.lines().find(|l| l.starts_with("balloon: gave back pages")).unwrap_or("");
    println!(
        "{how}: vm0 gave back {given} merged pages ({} KiB), every one fresh memory (discarded_remapped \
         {}), read zeros, then its own data; vm1 kept {pages} pages intact; store {} pages, {} guest \
         pages map it, VMAs counted {} = measured {}; {took}",
        given * 4,
        r["discarded_remapped"],
        r["store_pages"],
        r["mapped_pages"],
        r["vmas_counted"],
        r["vmas"],
    );
}

#[test]
fn a_guest_reusing_pages_it_gave_back_reads_zeros_then_its_own_data_never_another_vms() {
    check_reuse_of_merged_pages("processes and a broker", &[]);
}

#[test]
fn a_guest_reusing_pages_it_gave_back_reads_zeros_then_its_own_data_in_one_process() {
    check_reuse_of_merged_pages("threads of one process", &["--threads"]);
}

/// A guest whose pages map a shared read-only image (`,ro`, `--dedup off`: the pages stay the
/// image's) gives half of them back: they read zeros, then its own data; the image file is
/// unchanged and the pages it kept still map it.
#[test]
fn reported_image_pages_read_zeros_and_the_image_stays_as_it_was() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("base.img");
    make_image(&image, (PAGES * 4096) as usize, 72);
    std::fs::File::open(&image).and_then(|f| f.sync_all()).expect("sync the image");
    let before = common::b3sum(&image);
    let metrics = dir.as_path().join("vm.json");
    let disk = format!("{},ro", image.display());
    let result = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("path"),
            "--disk",
            &disk,
            "--dedup",
            "off",
            "--balloon",
            "--cmdline",
            "testguest.mode=balloon",
            "--metrics",
            metrics.to_str().expect("path"),
            "--timeout",
            "120",
        ],
        LIMIT,
    );
    result.assert_no_panic();
    assert_eq!(result.code, Some(0), "console:\n{}\nstderr:\n{}", result.stdout, result.stderr);
    result.assert_line(&format!("balloon: {REPORTED} reported pages read zeros"));
    result.assert_line(&format!("balloon: the guest's own data over {REPORTED} reported pages reads back"));
    result.assert_line("balloon: kept pages intact, given-back pages hold the guest's own data");
    assert_eq!(common::b3sum(&image), before, "the image changed");
    let m = read_metrics(&metrics).expect("metrics");
    let given = REPORTED + INFLATED;
    let (mapped, discarded, remapped) = (
        metric(&m, "/disks/0/shared_pages"),
        metric(&m, "/dedup/discarded"),
        metric(&m, "/dedup/discarded_remapped"),
    );
    assert_eq!(mapped, PAGES, "every read mapped the image: {m}");
    assert_eq!((discarded, remapped), (given, given), "{m}");
    assert_eq!(metric(&m, "/dedup/image_pages"), PAGES - given, "the pages kept still map the image: {m}");
    assert_eq!(metric(&m, "/balloon/device/reported_pages"), REPORTED, "{m}");
    assert_eq!(metric(&m, "/balloon/device/inflated_pages"), INFLATED, "{m}");
    assert_eq!(metric(&m, "/balloon/host/discarded_pages"), given, "{m}");
    println!(
        "{PAGES} pages mapped from the image; {given} given back, all remapped to fresh memory, read zeros \
         then the guest's own data; {} still map the image, which is unchanged (b3sum {before}); host \
         discard time {} us over {} calls",
        metric(&m, "/dedup/image_pages"),
        metric(&m, "/balloon/host/discard_us"),
        metric(&m, "/balloon/host/discards"),
    );
}

/// `samepage balloon` against `socket`; (exit code, stdout, stderr).
fn balloon_cli(socket: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = samepage()
        .arg("balloon")
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .output()
        .expect("run samepage balloon");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The control socket under the VMM's seccomp filter: the guest sees the target the socket
/// sets, bad targets and hostile packets are refused (and the VMM keeps answering), the socket
/// is its owner's alone and goes when the VM stops.
#[test]
fn a_target_set_through_the_control_socket_reaches_the_guest() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, (PAGES * 4096) as usize, 73);
    let socket = dir.as_path().join("vm.balloon");
    let disk = format!("{},ro,share=off", image.display());
    let target_pages = (24 * MIB / 4096).to_string();
    // The guest holds on after it saw the target, so the status query below finds the VM running.
    let cmdline =
        format!("testguest.mode=balloon testguest.wait_target={target_pages} testguest.hold_ms=5000");
    let mut vm = LiveVm::start(&[
        "--kernel",
        kernel.to_str().expect("path"),
        "--disk",
        &disk,
        "--mem",
        "64M",
        "--balloon",
        "--balloon-socket",
        socket.to_str().expect("path"),
        "--cmdline",
        &cmdline,
        "--timeout",
        "120",
    ]);
    vm.wait_for_line("balloon: waiting for a host target", Duration::from_secs(60));
    let mode = std::fs::metadata(&socket).expect("the socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Hostile packets straight to the socket: refused with a reason, the VMM goes on.
    let sock =
        samepage::broker_wire::seqpacket::connect(&socket, Some(Duration::from_secs(10))).expect("connect");
    let mut buf = vec![0u8; 1 << 16];
    for packet in [&b"{\"op\":\"set_target\",\"bytes\":1e9}"[..], &[0xff; 4096], b"[]", b"\0"] {
        assert!(samepage::broker_wire::seqpacket::send(sock.as_raw_fd(), packet, None, true).expect("send"));
        let got =
            samepage::broker_wire::seqpacket::recv(sock.as_raw_fd(), &mut buf, false, true).expect("recv");
        let samepage::broker_wire::seqpacket::Received::Packet(p) = got else {
            panic!("no reply to {packet:?}")
        };
        let reply: serde_json::Value = serde_json::from_slice(&buf[..p.len]).expect("JSON reply");
        assert!(reply["error"].is_string(), "{reply}");
    }
    drop(sock);

    let (code, _, stderr) = balloon_cli(&socket, &["--target", "65M"]);
    assert_eq!(code, Some(1), "a target above guest RAM: {stderr}");
    assert!(stderr.contains("more than the guest's"), "{stderr}");
    let (code, _, stderr) = balloon_cli(&socket, &["--target", "1.5M"]);
    assert_eq!(code, Some(2), "a malformed target is a usage error: {stderr}");

    let set_at = Instant::now();
    let (code, out, stderr) = balloon_cli(&socket, &["--target", "24M"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(out.contains("target 24.0 MiB of 64.0 MiB guest RAM"), "{out}");
    let seen =
        vm.wait_for_line(&format!("balloon: host target {target_pages} pages"), Duration::from_secs(60));
    let latency = set_at.elapsed();
    let (code, json, stderr) = balloon_cli(&socket, &["--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let reply: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(reply["balloon"]["target_bytes"], 24 * MIB);
    assert_eq!(reply["balloon"]["host"]["control_rejected"], 5, "{reply}");
    assert_eq!(reply["balloon"]["device"]["reported_pages"], REPORTED, "{reply}");
    let run = vm.finish(Duration::from_secs(60));
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert!(!socket.exists(), "the socket outlived its VM");
    println!(
        "target 24 MiB set through the socket; the guest saw it within {latency:?} ({seen}); 5 bad \
         requests refused and the VMM answered on; status:\n{}",
        balloon_status_text(&reply)
    );
}

fn balloon_status_text(reply: &serde_json::Value) -> String {
    let b = &reply["balloon"];
    format!(
        "  options {}, target {} bytes, actual {} bytes, reported pages {}, host discarded pages {}",
        b["options"],
        b["target_bytes"],
        b["actual_bytes"],
        b["device"]["reported_pages"],
        b["host"]["discarded_pages"]
    )
}

/// `samepage dedupd status` (`--json`, then text) of the broker at `socket`.
fn dedupd_status(socket: &Path, json: bool) -> String {
    let mut cmd = samepage();
    cmd.args(["dedupd", "status", "--socket"]).arg(socket);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run samepage dedupd status");
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The client labelled `label` in a `status --json`.
fn client_of<'a>(status: &'a serde_json::Value, label: &str) -> Option<&'a serde_json::Value> {
    status["clients"].as_array()?.iter().find(|c| c["label"] == label)
}

/// The figures the test guest's balloon reports (`resources/test-guest/src/balloon.rs`,
/// `STATS`), as `status --json` names them; the statistics it leaves out are null.
const GUEST_FIGURES: [(&str, Option<u64>); 16] = [
    ("swap_in", Some(11 * 4096)),
    ("swap_out", Some(13 * 4096)),
    ("major_faults", Some(17)),
    ("minor_faults", Some(1_234_567)),
    ("free_memory", Some((12 << 20) + 4096)),
    ("total_memory", Some(48 << 20)),
    ("available_memory", Some((20 << 20) + 2 * 4096)),
    ("disk_caches", Some((4 << 20) + 3 * 4096)),
    ("hugetlb_allocations", None),
    ("hugetlb_failures", None),
    ("oom_kills", Some(3)),
    ("alloc_stalls", None),
    ("async_scans", None),
    ("direct_scans", None),
    ("async_reclaims", None),
    ("direct_reclaims", None),
];

/// Two test guests of one broker domain, one with `--balloon stats=1` (its driver keeps a
/// statistics buffer of fixed figures), one with `--balloon` alone: `samepage dedupd status`
/// shows the first one's figures exactly, per client, in JSON and text, and none for the
/// other.
#[test]
fn dedupd_status_shows_each_clients_guest_balloon_statistics() {
    let kernel = test_guest();
    let dir = tempdir();
    let image = dir.as_path().join("files.img");
    make_image(&image, 256 * 4096, 74);
    let broker = common::broker_client::Broker::start(dir.as_path(), "dedupd.sock", &[]);
    let socket = broker.socket.to_str().expect("path").to_string();
    let disk = format!("{},ro,share=off", image.display());
    let cmdline = "testguest.mode=balloon testguest.give_back=0 testguest.inflate=0 testguest.hold_ms=8000";
    let start = |name: &str, balloon: &str| {
        let mut args = vec!["--kernel", kernel.to_str().expect("path"), "--name", name, "--disk", &disk];
        args.extend(["--mem", "64M", "--balloon", balloon, "--dedup-socket", &socket]);
        args.extend(["--cmdline", cmdline, "--timeout", "120"]);
        LiveVm::start(&args)
    };
    let mut with = start("with-stats", "stats=1");
    let mut without = start("without-stats", "free-page-reporting=on");
    with.wait_for_line("balloon: holding", Duration::from_secs(60));
    without.wait_for_line("balloon: holding", Duration::from_secs(60));
    for (vm, statsq) in [(&mut with, "on"), (&mut without, "off")] {
        let device_line = vm.wait_for_line("balloon: device at", Duration::from_secs(1));
        assert!(device_line.ends_with(&format!("statistics {statsq}")), "{device_line}");
    }

    // The figures reach the broker within a few stats periods.
    let waited = Instant::now();
    let (status, seen_after) = loop {
        let status: serde_json::Value =
            serde_json::from_str(&dedupd_status(&broker.socket, true)).expect("status JSON");
        let ready = client_of(&status, "with-stats").is_some_and(|c| !c["guest_stats"].is_null())
            && client_of(&status, "without-stats").is_some();
        if ready {
            break (status, waited.elapsed());
        }
        assert!(waited.elapsed() < Duration::from_secs(30), "no guest statistics in 30 s: {status:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let shown = client_of(&status, "with-stats").expect("client")["guest_stats"].clone();
    for (name, want) in GUEST_FIGURES {
        assert_eq!(shown[name].as_u64(), want, "{name} of {shown:#}");
        assert_eq!(shown[name].is_null(), want.is_none(), "{name} of {shown:#}");
    }
    let quiet = client_of(&status, "without-stats").expect("client");
    assert!(quiet["guest_stats"].is_null(), "a VM without the statsq shows none: {quiet:#}");
    let text = dedupd_status(&broker.socket, false);
    let line_of =
        |label: &str| text.lines().find(|l| l.contains(&format!("{label:?}"))).unwrap_or("").to_string();
    let figures = "; guest: 48.0 MiB total, 12.0 MiB free, 20.0 MiB available, 4.0 MiB disk caches, 44 KiB \
                   swapped in, 52 KiB swapped out, 17 major faults, 1234567 minor faults, 3 OOM kills";
    assert!(line_of("with-stats").contains(figures), "{text}");
    assert!(!line_of("without-stats").contains("guest:"), "{text}");

    let mut refills = String::new();
    for (vm, name) in [(with, "with-stats"), (without, "without-stats")] {
        let run = vm.finish(Duration::from_secs(60));
        run.assert_no_panic();
        assert_eq!(run.code, Some(0), "{name}: console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
        if name == "with-stats" {
            refills =
                run.stdout.lines().find(|l| l.contains("statistics buffer added again")).unwrap_or("").into();
        }
    }
    let times: u64 = refills.split_whitespace().rev().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(times >= 1, "the device never returned the statistics buffer: {refills:?}");
    println!(
        "dedupd status --json, client with-stats ({:?} after both guests held): guest_stats {shown}\nwithout-stats: guest_stats {}\n\
         text:\n{}\n{}\nguest: {refills}; broker protocol {}",
        seen_after,
        quiet["guest_stats"],
        line_of("with-stats"),
        line_of("without-stats"),
        status["protocol"]
    );
}
