//! The guest exit-status channel (docs/guest-interface.md): a one-byte write to
//! [`EXIT_STATUS_PORT`](crate::x86_64::layout::EXIT_STATUS_PORT) stops the VM with that status.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{VmExit, VmStop};

/// The exit-status port.
pub struct ExitPort {
    stop: Arc<VmStop>,
}

impl ExitPort {
    /// A port that reports to `stop`.
    pub fn new(stop: Arc<VmStop>) -> Self {
        ExitPort { stop }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Any width is accepted; the status is the low byte.
        if let Some(&status) = data.first() {
            self.stop.request(VmExit::GuestStatus(status));
        }
    }
}
