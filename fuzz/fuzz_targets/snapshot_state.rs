//! A snapshot's `state.json` (docs/snapshot.md, "Format"), which a restore reads from a
//! directory anyone may have edited: any bytes go through the parser, a parsed state through the
//! checks a restore makes before KVM sees it, and each saved transport state through
//! `MmioTransport::restore_state` of the fphash device it would be put into. Nothing may
//! panic; a state the checks accept must describe memory of the file's length, and a transport
//! state that is refused must leave the transport reset.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use samepage::snapshot::{parse_state, SnapshotError};
use samepage_fuzz::guest_memory;
use samepage_virtio::fphash::{FphashDevice, Hashing, PageMerger, PageReport, RecordStatus, ReportKind};
use samepage_virtio::{EventFdInterrupt, MmioTransport};

/// Merges nothing: restore_state only activates the device.
struct Refuse;

impl PageMerger for Refuse {
    fn merge_batch(&mut self, _: ReportKind, _: Hashing, _: &[PageReport], _: &mut [RecordStatus]) {}
}

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes: the memory file's length; the rest: state.json.
    let Some((len, text)) = data.split_first_chunk::<8>() else { return };
    let memory_file_bytes = u64::from_le_bytes(*len);
    let Ok(state) = parse_state(text) else { return };
    match state.check(memory_file_bytes) {
        Ok(()) => {
            let described: u64 = state.ram.iter().map(|span| span.len).sum();
            assert_eq!(described, memory_file_bytes);
        }
        Err(
            SnapshotError::Invalid(_) | SnapshotError::Version { .. } | SnapshotError::MemoryFileSize { .. },
        ) => {}
        Err(other) => panic!("check gave an error it has no business giving: {other}"),
    }
    let mem = guest_memory(&[(0, 0x10_0000)]);
    for saved in &state.devices {
        let device = FphashDevice::new(Box::new(Refuse));
        let interrupt = Arc::new(EventFdInterrupt::new().expect("eventfd"));
        let mut transport = MmioTransport::new(Box::new(device), mem.clone(), interrupt).expect("transport");
        if transport.restore_state(saved).is_err() {
            assert_eq!(transport.status(), 0, "a refused state left the transport configured");
        }
    }
});
