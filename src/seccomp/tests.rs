//! The filters compile, and a filtered thread is stopped by what its filter forbids: each in a
//! child process (a filter cannot be taken back, and a violation ends the process).

use super::*;

#[test]
fn every_kind_compiles() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Virtio,
        ThreadKind::Signals,
        ThreadKind::Stdin,
        ThreadKind::Vmm,
        ThreadKind::Density,
        ThreadKind::Dedupd,
    ] {
        let program = filters::compile(kind).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        assert!(
            !program.is_empty() && program.len() < 4096,
            "{}: {} instructions",
            kind.name(),
            program.len()
        );
    }
}
