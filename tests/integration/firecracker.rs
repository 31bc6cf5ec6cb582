//! samepage started as Firecracker (docs/firecracker-compat.md): through a link named
//! `firecracker`, Firecracker's command line with `--no-api --config-file FILE` boots the VM the
//! file describes (the test guest with a drive, the entropy device and metrics, merging on) to
//! its exit status; what samepage does not implement, and configuration files that are no
//! regular file or too large, are refused by name before anything runs.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{finish, make_image, tempdir, test_guest};

const LIMIT: Duration = Duration::from_secs(60);

/// A link named `firecracker` to the samepage binary, in `dir`.
fn firecracker_link(dir: &std::path::Path) -> std::path::PathBuf {
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_samepage"), &link).expect("link");
    link
}

fn run_firecracker(link: &std::path::Path, args: &[&str]) -> common::Run {
    let child = Command::new(link)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start firecracker");
    finish(child, LIMIT)
}

#[test]
fn a_firecracker_config_file_boots_the_test_guest_to_its_exit_status() {
    let dir = tempdir();
    let (disk, config, metrics) =
        (dir.as_path().join("rootfs.img"), dir.as_path().join("vm.json"), dir.as_path().join("metrics.json"));
    make_image(&disk, 1 << 20, 5);
    let link = firecracker_link(dir.as_path());
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": "testguest.mode=entropy"},
        "drives": [{"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": false},
        "entropy": {},
        "metrics": {"metrics_path": metrics},
        "logger": {"log_path": "/dev/null", "level": "Info"},
        "network-interfaces": [],
        "samepage": {"dedup": "hinted"}
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&json).expect("json")).expect("config");
    let run = run_firecracker(
        &link,
        &["--no-api", "--config-file", config.to_str().expect("path"), "--id", "fc-test", "--boot-timer"],
    );
    run.assert_no_panic();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    run.assert_line("entropy: ok");
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics")).expect("metrics json");
    assert_eq!(figures["entropy"]["requests"], 9, "{figures}");
    let disks = figures["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1, "{figures}");
    assert_eq!(disks[0]["read_only"], true, "{figures}");
    println!(
        "firecracker --no-api --config-file: exit {:?}, entropy requests {}, disk {} read-only",
        run.code, figures["entropy"]["requests"], disks[0]["path"]
    );
}

#[test]
fn firecracker_options_and_sections_samepage_does_not_implement_are_refused_by_name() {
    let dir = tempdir();
    let link = firecracker_link(dir.as_path());
    let mut files = 0;
    let mut write = |extra: serde_json::Value| {
        let mut json = serde_json::json!({"boot-source": {"kernel_image_path": test_guest()}});
        json.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        files += 1;
        let config = dir.as_path().join(format!("vm{files}.json"));
        std::fs::write(&config, serde_json::to_vec(&json).expect("json")).expect("config");
        config.to_str().expect("path").to_string()
    };
    // A FIFO nobody writes (waited on forever if opened plainly), and a file over 1 MiB.
    let (fifo, big) = (dir.as_path().join("vm.fifo"), dir.as_path().join("big.json"));
    let c_fifo = std::ffi::CString::new(fifo.to_str().expect("path")).expect("path");
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::write(&big, vec![b' '; (1 << 20) + 1]).expect("big file");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--no-api".into(),
                "--config-file".into(),
                write(serde_json::json!({"mmds-config": {"network_interfaces": ["eth0"]}})),
            ],
            "mmds-config is not implemented",
        ),
        (
            vec![
                "--no-api".into(),
                "--config-file".into(),
                write(serde_json::json!({"network-interfaces": [
                    {"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": {"bandwidth": {}}}
                ]})),
            ],
            "rate limiters is not implemented",
        ),
        (
            vec!["--no-api".into(), "--config-file".into(), write(serde_json::json!({"bogus": 1}))],
            "unknown field `bogus`",
        ),
        (
            vec![
                "--no-api".into(),
                "--config-file".into(),
                dir.as_path().join("missing.json").display().to_string(),
            ],
            "cannot read the configuration file",
        ),
        (
            vec!["--no-api".into(), "--config-file".into(), fifo.display().to_string()],
            "a FIFO, not a regular file",
        ),
        (
            vec!["--no-api".into(), "--config-file".into(), "/dev/zero".into()],
            "a character device, not a regular file",
        ),
        (vec!["--no-api".into(), "--config-file".into(), big.display().to_string()], "over the 1 MiB"),
        (
            vec![
                "--no-api".into(),
                "--config-file".into(),
                write(serde_json::json!({})),
                "--seccomp-filter".into(),
                "f.bpf".into(),
            ],
            "--seccomp-filter is not implemented",
        ),
    ];
    let refused = cases.len();
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = run_firecracker(&link, &args);
        run.assert_no_panic();
        assert_ne!(run.code, Some(0), "{args:?} ran");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: a VM ran: {}", run.stdout);
    }
    println!("firecracker: {refused} command lines and configuration files refused, each by name");
}
