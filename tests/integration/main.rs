//! The integration tests: the real `samepage` binary on real KVM, with the test guest and the
//! patched Linux guest. One test binary, so the crate is linked once, with a module per
//! subject and the shared helpers in `common`. A test's name is `module::test`:
//! `cargo nextest run -E 'binary(integration) & test(/^dedupd::/)'` runs one subject.
//!
//! A test that re-runs itself in a child process (another user's client of the broker) names
//! itself with `common::test_path(module_path!(), NAME)`.

mod common;

mod balloon;
mod boot_test;
mod boot_test_host_input;
mod boot_test_shell;
mod broker;
mod cli_errors;
mod cli_fuzz;
mod compaction;
mod dedup;
mod dedupd;
mod engine;
mod entropy;
mod ext4_images;
mod firecracker;
mod firecracker_api;
mod firepilot_client;
mod image_content;
mod image_leases;
mod image_vmas;
mod kernel_image;
mod linux_balloon;
mod linux_boot;
mod linux_dedup;
mod linux_eviction;
mod linux_image_sharing;
mod linux_net;
mod linux_snapshot;
mod linux_vsock;
mod panic;
mod seccomp;
mod sharing;
mod snapshot;
mod stopping;
mod test_guest;
mod unprivileged;
mod zero_pages;
