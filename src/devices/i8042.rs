//! The i8042 keyboard controller, only as far as its CPU-reset command (what Linux's `reboot`
//! uses on a machine without ACPI): vm-superio's device with a trigger that stops the VM.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::stop::{VmExit, VmStop};

/// Stops the VM as a reset when triggered.
pub struct ResetTrigger(Arc<VmStop>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60-0x64 (offset 4 is the command port).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset stops the VM through `stop`.
    pub fn new(stop: Arc<VmStop>) -> Self {
        I8042(I8042Device::new(ResetTrigger(stop)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.0.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            // The trigger cannot fail (Infallible).
            let _ = self.0.write(offset as u8, *value);
        }
    }
}
