//! Running samepage as Firecracker (docs/firecracker-compat.md): Firecracker's command line,
//! for tools that start a binary named `firecracker` ([`cli`]), and its JSON configuration
//! file ([`config_file`]). The API socket is not implemented yet.

pub mod cli;
pub mod config_file;
