//! The project's patched Linux 6.12 guest (resources/guest/) booted in samepage to its /init
//! marker, with 1 and 2 vCPUs, handing its exit status back through the exit-status port.

use crate::common;

use std::time::Duration;

use common::{artifact, run};

/// Boot to /init takes ~25 s on hosts whose KVM emulates guest kernel code; leave room for a
/// loaded machine.
const LIMIT: Duration = Duration::from_secs(400);

fn boot(vcpus: u8, exit_status: u8) {
    let kernel = artifact("target/guest/vmlinux", "resources/guest/build.sh");
    let initrd = artifact("target/guest/initramfs.cpio", "resources/guest/mkinitramfs.sh");
    let vcpus_arg = vcpus.to_string();
    let cmdline = format!("samepage.exit={exit_status}");
    let result = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("path"),
            "--initrd",
            initrd.to_str().expect("path"),
            "--vcpus",
            &vcpus_arg,
            "--cmdline",
            &cmdline,
            "--timeout",
            "360",
        ],
        LIMIT,
    );
    for line in result.stdout.lines().filter(|l| l.starts_with("samepage-init:") || l.contains("Brought up"))
    {
        println!("linux guest, {vcpus} vCPU: {line}");
    }
    result.assert_no_panic();
    result.assert_line("samepage-init: reached /init");
    result.assert_line(&format!("samepage-init: cpus={vcpus}"));
    assert!(!result.stdout.contains("Kernel panic"), "guest panicked:\n{}", result.stdout);
    assert_eq!(result.code, Some(i32::from(exit_status)), "stderr: {}", result.stderr);
}

#[test]
fn linux_reaches_init_with_one_vcpu() {
    boot(1, 5);
}

#[test]
fn linux_reaches_init_with_two_vcpus() {
    boot(2, 7);
}
