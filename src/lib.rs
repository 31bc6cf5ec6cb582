//! samepage: a small KVM virtual machine monitor whose guests report hashes of their file pages
//! so that the host can merge identical pages across VMs.
//!
//! One module per concern; [`vmm::Vm::build`] builds a VM in one place, in the boot order
//! documented in `docs/boot.md`.
#![deny(missing_docs)]

pub mod api;
pub mod balloon;
pub mod balloon_options;
pub mod boot_test;
pub mod broker_wire;
pub mod bus;
pub mod checked_open;
pub mod config;
pub mod dedup;
pub mod dedupd;
pub mod density;
pub mod devices;
pub mod domain_membership;
pub mod error;
pub mod exit_code;
pub mod ext4;
pub mod fault;
pub mod firecracker;
pub mod lease;
pub mod memory;
pub mod merge_cpu;
pub mod metrics;
pub mod pagemap_entry;
pub mod pause;
pub mod raw_mode;
pub mod residency;
pub mod run;
pub mod run_args;
pub mod seccomp;
pub mod signal_numbers;
pub mod signals;
pub mod snapshot;
pub mod socket_file;
pub mod stop;
pub mod tap;
pub mod terminal;
pub mod vcpu;
pub mod vm_build;
pub mod vmm;
pub mod x86_64;

/// When the process started, as close as `main` can tell: the reference for start-up timings
/// (the benchmark reads them from the log).
pub fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// An error and its sources on one line: "what failed: why: why". A source whose text the
/// line already ends with is left out: some library errors print their source themselves.
/// Control characters (from paths and arguments) are escaped, so the line stays one line and
/// cannot drive the terminal.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    escape_controls(&line)
}

/// `text` with control characters written as Rust escapes (`\n`, `\u{1b}`).
pub fn escape_controls(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

/// The kernel config fragment a kernel needs to boot under samepage (`samepage kconfig`).
pub const KCONFIG_FRAGMENT: &str = include_str!("../resources/kconfig/required.config");
