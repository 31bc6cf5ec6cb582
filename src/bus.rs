//! Port-I/O and MMIO buses: address ranges mapped to devices, looked up on every vCPU exit.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors when inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    Invalid {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// The buses every vCPU dispatches I/O exits to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A sorted set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Invalid { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let entry = &self.entries[at];
        let offset = addr - entry.base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((&entry.device, offset))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one device access must not take
/// every later access down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).expect("insert");
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder::default()))).expect("insert");
        assert_eq!(bus.insert(0x3fc, 8, a.clone()), Err(BusError::Overlap { base: 0x3fc, len: 8 }));
        assert_eq!(bus.insert(u64::MAX, 2, a.clone()), Err(BusError::Invalid { base: u64::MAX, len: 2 }));
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[9]));
        assert!(!bus.write(0x400, &[9]));
        assert!(!bus.read(0x3ff, &mut [0u8; 2]), "access straddling the end");
        assert_eq!(lock(&a).writes, vec![(0, vec![9])]);
    }
}
