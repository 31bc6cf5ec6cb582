//! The virtio-mmio transport, modern interface only (version 2; virtio 1.2 §4.2.2).
//!
//! [`MmioTransport`] serves one device's 4 KiB register window. The VMM routes the window's
//! MMIO exits to [`MmioTransport::read`] and [`MmioTransport::write`] with the offset inside
//! the window.
//!
//! Queue notifications: the expected wiring is one ioeventfd per queue on the window's
//! [`QUEUE_NOTIFY`] register (4 bytes, `datamatch` = the queue index), whose event makes the
//! VMM call [`MmioTransport::notify`] with that index. A VMM that registers one ioeventfd
//! without `datamatch` calls [`MmioTransport::process_notifications`] instead, which serves
//! every ready queue. Without an ioeventfd, a QueueNotify write reaches
//! [`MmioTransport::write`] and the queue is served at once on the vCPU thread.
//!
//! Interrupts go through an [`InterruptTrigger`] (an irqfd in the VMM,
//! [`crate::EventFdInterrupt`]), which also holds the InterruptStatus register.

use std::sync::Arc;

use log::{error, warn};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::interrupt::{InterruptKind, InterruptTrigger, INTERRUPT_STATUS_MASK};
use crate::{should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1};

/// MagicValue, R: 0x74726976 ("virt" in little-endian). Virtio 1.2 §4.2.2.
pub const MAGIC_VALUE: u64 = 0x000;
/// Version, R: 2 for the modern interface. Virtio 1.2 §4.2.2.
pub const VERSION: u64 = 0x004;
/// DeviceID, R: the virtio device type (§5). Virtio 1.2 §4.2.2.
pub const DEVICE_ID: u64 = 0x008;
/// VendorID, R. Virtio 1.2 §4.2.2.
pub const VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures, R: 32 feature bits of the page chosen by DeviceFeaturesSel. Virtio 1.2 §4.2.2.
pub const DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel, W: page (0 = bits 0-31, 1 = bits 32-63). Virtio 1.2 §4.2.2.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures, W: 32 accepted feature bits of the page chosen by DriverFeaturesSel.
/// Virtio 1.2 §4.2.2.
pub const DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel, W. Virtio 1.2 §4.2.2.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// GuestPageSize, W: legacy interface only (virtio 1.2 §4.2.4); rejected here.
pub const LEGACY_GUEST_PAGE_SIZE: u64 = 0x028;
/// QueueSel, W: the queue the Queue* registers refer to. Virtio 1.2 §4.2.2.
pub const QUEUE_SEL: u64 = 0x030;
/// QueueNumMax, R: largest size of the selected queue, 0 if it does not exist. Virtio 1.2 §4.2.2.
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum, W: size the driver chose for the selected queue. Virtio 1.2 §4.2.2.
pub const QUEUE_NUM: u64 = 0x038;
/// QueueAlign, W: legacy interface only (virtio 1.2 §4.2.4); rejected here.
pub const LEGACY_QUEUE_ALIGN: u64 = 0x03c;
/// QueuePFN, RW: legacy interface only (virtio 1.2 §4.2.4); rejected here.
pub const LEGACY_QUEUE_PFN: u64 = 0x040;
/// QueueReady, RW: the selected queue may be used. Virtio 1.2 §4.2.2.
pub const QUEUE_READY: u64 = 0x044;
/// QueueNotify, W: the value is the index of the queue with new buffers. Virtio 1.2 §4.2.2.
/// The VMM places its ioeventfds here.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus, R: [`crate::interrupt::INTERRUPT_STATUS_USED_RING`] and
/// [`crate::interrupt::INTERRUPT_STATUS_CONFIG_CHANGE`]. Virtio 1.2 §4.2.2.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK, W: clears the given InterruptStatus bits. Virtio 1.2 §4.2.2.
pub const INTERRUPT_ACK: u64 = 0x064;
/// Status, RW: device status (§2.1); writing 0 resets the device. Virtio 1.2 §4.2.2.
pub const STATUS: u64 = 0x070;
/// QueueDescLow, W: low 32 bits of the descriptor table address. Virtio 1.2 §4.2.2.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh, W. Virtio 1.2 §4.2.2.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow, W: low 32 bits of the driver area (available ring). Virtio 1.2 §4.2.2.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh, W. Virtio 1.2 §4.2.2.
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow, W: low 32 bits of the device area (used ring). Virtio 1.2 §4.2.2.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh, W. Virtio 1.2 §4.2.2.
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMSel, W: shared memory region selector. Virtio 1.2 §4.2.2. No device has regions.
pub const SHM_SEL: u64 = 0x0ac;
/// SHMLenLow, R: all ones when the selected region does not exist. Virtio 1.2 §4.2.2.
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh, R. Virtio 1.2 §4.2.2.
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// SHMBaseLow, R. Virtio 1.2 §4.2.2.
pub const SHM_BASE_LOW: u64 = 0x0b8;
/// SHMBaseHigh, R. Virtio 1.2 §4.2.2.
pub const SHM_BASE_HIGH: u64 = 0x0bc;
/// QueueReset, RW: only with VIRTIO_F_RING_RESET, which no device here offers. Virtio 1.2 §4.2.2.
pub const QUEUE_RESET: u64 = 0x0c0;
/// ConfigGeneration, R: changes when the configuration space may have changed. Virtio 1.2 §4.2.2.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Config, RW: start of the device-specific configuration space. Virtio 1.2 §4.2.2.
pub const CONFIG_SPACE: u64 = 0x100;

/// Size of the register window (samepage's `VIRTIO_MMIO_SIZE` in `src/x86_64/layout.rs`).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// The MagicValue register's value, "virt". Virtio 1.2 §4.2.2.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The Version register's value: 2, the modern interface. Virtio 1.2 §4.2.2.
pub const MMIO_VERSION: u32 = 2;
/// The VendorID register's value: "SMPG" in little-endian.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"SMPG");

/// Status bits (virtio 1.2 §2.1), as the u32 the Status register holds.
const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The driver's initialization sequence (virtio 1.2 §3.1.1): the Status register may only grow
/// along these steps (FAILED aside), one or several at a time.
const STATUS_STEPS: [u32; 5] = [
    0,
    S_ACKNOWLEDGE,
    S_ACKNOWLEDGE | S_DRIVER,
    S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
    S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
];

/// Counters of the guest's mistakes (or attacks) on the register interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioStats {
    /// Accesses of the wrong width or alignment, past the window, to legacy or write-only
    /// registers, or writes to read-only registers.
    pub invalid_accesses: u64,
    /// Status writes out of the order of virtio 1.2 §3.1.1, and FEATURES_OK refused.
    pub rejected_status_writes: u64,
    /// DriverFeatures writes outside feature negotiation or to pages beyond bit 63.
    pub rejected_feature_writes: u64,
    /// Queue configuration writes refused: wrong phase, queue not present or already ready,
    /// invalid size, misaligned rings or rings outside guest RAM.
    pub rejected_queue_configs: u64,
    /// Notifications for a queue that does not exist or is not ready, or before DRIVER_OK.
    pub spurious_notifications: u64,
    /// Failures to signal the interrupt.
    pub interrupt_errors: u64,
}

/// Per-queue state: the queue and the raw addresses the driver wrote, checked at QueueReady.
struct QueueSlot {
    queue: Queue,
    /// The driver wrote a QueueNum that is 0, not a power of two or above QueueNumMax.
    size_invalid: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn InterruptTrigger>,
    queues: Vec<QueueSlot>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    stats: MmioStats,
}

impl MmioTransport {
    /// Puts `device` behind a register window. `mem` is the guest's RAM, `interrupt` raises
    /// the device's IRQ.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptTrigger>,
    ) -> Result<Self, Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Ok(QueueSlot {
                    queue: Queue::new(max).map_err(|_| Error::InvalidQueueMaxSize(max))?,
                    size_invalid: false,
                    desc: 0,
                    driver: 0,
                    device: 0,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            stats: MmioStats::default(),
        })
    }

    /// The device type (virtio 1.2 §5).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Number of queues; valid QueueNotify values (and ioeventfd datamatches) are
    /// `0..queue_count()`.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The Status register (virtio 1.2 §2.1).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device's configuration changed behind the driver (a restored VM's device has a new
    /// VM generation ID): ConfigGeneration moves on, so a driver reading the configuration
    /// reads it again, and a running driver (DRIVER_OK) gets a configuration change
    /// notification (virtio 1.2 §2.5.1, §4.2.2). A driver that starts later reads the new
    /// configuration anyway.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & S_DRIVER_OK != 0 && self.status & S_NEEDS_RESET == 0 {
            self.raise(InterruptKind::ConfigChange);
        }
    }

    /// Counters of rejected guest accesses.
    pub fn stats(&self) -> MmioStats {
        self.stats
    }

    /// The guest read `data.len()` bytes at `offset` in the window. Invalid accesses read as
    /// zeros and are counted.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            if self.config_access_ok(offset, data.len()) {
                self.device.read_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if !self.register_access_ok(offset, data.len(), "read") {
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.queue.max_size())),
            QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.queue.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length and base read as all ones (§4.2.2).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            QUEUE_RESET => 0,
            _ => {
                self.invalid_access(offset, data.len(), "read of a write-only or absent register");
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// The guest wrote `data` at `offset` in the window. Invalid writes are ignored and
    /// counted.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.config_access_ok(offset, data.len()) {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if !self.register_access_ok(offset, data.len(), "write") {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => self.write_queue_num(value),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_DESC_LOW => self.write_queue_addr(value, |q| &mut q.desc, false),
            QUEUE_DESC_HIGH => self.write_queue_addr(value, |q| &mut q.desc, true),
            QUEUE_DRIVER_LOW => self.write_queue_addr(value, |q| &mut q.driver, false),
            QUEUE_DRIVER_HIGH => self.write_queue_addr(value, |q| &mut q.driver, true),
            QUEUE_DEVICE_LOW => self.write_queue_addr(value, |q| &mut q.device, false),
            QUEUE_DEVICE_HIGH => self.write_queue_addr(value, |q| &mut q.device, true),
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value & INTERRUPT_STATUS_MASK),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => self.invalid_access(offset, data.len(), "write to a read-only or absent register"),
        }
    }

    /// Serves queue `index` after the driver notified it (QueueNotify, or the ioeventfd with
    /// datamatch `index`), and interrupts the guest if the device used buffers.
    pub fn notify(&mut self, index: u32) {
        let driver_ok = self.status & (S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == S_DRIVER_OK;
        let ready = self.queues.get(index as usize).is_some_and(|q| q.queue.ready());
        if !driver_ok || !ready {
            self.stats.spurious_notifications += 1;
            if should_log(self.stats.spurious_notifications) {
                warn!(
                    "virtio-mmio (type {}): notification for queue {index} that is not in use \
                     (status {:#x}; seen {} times)",
                    self.device.device_type(),
                    self.status,
                    self.stats.spurious_notifications
                );
            }
            return;
        }
        self.process_queue(index as usize);
        self.process_pending();
    }

    /// The device's backend descriptor ([`VirtioDevice::backend_fd`]) was readable: the device
    /// takes the events in, and once the driver is running, the queues it then has work for
    /// are served.
    pub fn backend_ready(&mut self) {
        self.device.backend_ready();
        if self.status & (S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == S_DRIVER_OK {
            self.process_pending();
        }
    }

    /// The device behind the transport (to change it while it runs: take the transport's lock
    /// first, as every request does, so no request is in the middle).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device's backend descriptor, for the VMM's event loop.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Serves the ready queues the device has work for without a notification. A few rounds
    /// at most: serving one queue may give work to another (a vsock reply to a transmitted
    /// packet), and what is left waits for the next event.
    fn process_pending(&mut self) {
        for _ in 0..4 {
            let pending = self.device.pending_queues();
            if pending == 0 {
                return;
            }
            for index in 0..self.queues.len().min(64) {
                if pending & (1 << index) != 0 && self.queues[index].queue.ready() {
                    self.process_queue(index);
                }
            }
        }
    }

    /// Serves every ready queue: for a VMM whose ioeventfd has no datamatch.
    pub fn process_notifications(&mut self) {
        if self.status & (S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) != S_DRIVER_OK {
            return;
        }
        for index in 0..self.queues.len() {
            if self.queues[index].queue.ready() {
                self.process_queue(index);
            }
        }
    }

    fn process_queue(&mut self, index: usize) {
        let Some(slot) = self.queues.get_mut(index) else {
            return;
        };
        if self.device.process_queue(index, &mut slot.queue, &self.mem) {
            self.raise(InterruptKind::UsedRing);
        }
    }

    fn raise(&mut self, kind: InterruptKind) {
        if let Err(e) = self.interrupt.trigger(kind) {
            self.stats.interrupt_errors += 1;
            if should_log(self.stats.interrupt_errors) {
                error!("virtio-mmio (type {}): cannot signal interrupt: {e}", self.device.device_type());
            }
        }
    }

    fn selected(&self) -> Option<&QueueSlot> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Registers are 32 bits wide and accessed whole (virtio 1.2 §4.2.2.2: "The driver MUST
    /// only use 32 bit wide and aligned reads and writes").
    fn register_access_ok(&mut self, offset: u64, len: usize, what: &str) -> bool {
        if len == 4 && offset.is_multiple_of(4) {
            return true;
        }
        self.invalid_access(offset, len, what);
        false
    }

    /// Configuration space takes 1, 2, 4 (and 8) byte accesses inside the window.
    fn config_access_ok(&mut self, offset: u64, len: usize) -> bool {
        let in_window = offset.checked_add(len as u64).is_some_and(|end| end <= MMIO_WINDOW_SIZE);
        if in_window && matches!(len, 1 | 2 | 4 | 8) {
            return true;
        }
        self.invalid_access(offset, len, "configuration access");
        false
    }

    fn invalid_access(&mut self, offset: u64, len: usize, what: &str) {
        self.stats.invalid_accesses += 1;
        if should_log(self.stats.invalid_accesses) {
            warn!(
                "virtio-mmio (type {}): ignored {what}: offset {offset:#x}, {len} bytes \
                 (seen {} times)",
                self.device.device_type(),
                self.stats.invalid_accesses
            );
        }
    }

    fn reject(counter: &mut u64, device_type: u32, msg: std::fmt::Arguments) {
        *counter += 1;
        if should_log(*counter) {
            warn!("virtio-mmio (type {device_type}): {msg} (seen {counter} times)");
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) == S_DRIVER;
        let device_type = self.device.device_type();
        let sel = self.driver_features_sel;
        if !negotiating || (sel > 1 && value != 0) {
            Self::reject(
                &mut self.stats.rejected_feature_writes,
                device_type,
                format_args!("DriverFeatures {value:#x} (page {sel}) refused in status {:#x}", self.status),
            );
            return;
        }
        match sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    /// Queue registers may be written between FEATURES_OK and DRIVER_OK, while the selected
    /// queue is not ready (virtio 1.2 §3.1.1 step 7, §4.2.3.2).
    fn configurable_queue(&mut self, what: &str, value: u32) -> Option<usize> {
        let phase_ok =
            self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == S_FEATURES_OK;
        let sel = self.queue_sel;
        let device_type = self.device.device_type();
        let usable = phase_ok && self.queues.get(sel as usize).is_some_and(|q| !q.queue.ready());
        if !usable {
            Self::reject(
                &mut self.stats.rejected_queue_configs,
                device_type,
                format_args!("{what} {value:#x} for queue {sel} refused in status {:#x}", self.status),
            );
            return None;
        }
        Some(sel as usize)
    }

    fn write_queue_num(&mut self, value: u32) {
        let device_type = self.device.device_type();
        let Some(index) = self.configurable_queue("QueueNum", value) else {
            return;
        };
        let slot = &mut self.queues[index];
        let max = slot.queue.max_size();
        let valid =
            u16::try_from(value).ok().filter(|&size| size != 0 && size <= max && size.is_power_of_two());
        match valid {
            Some(size) => {
                slot.queue.set_size(size);
                slot.size_invalid = false;
            }
            None => {
                slot.size_invalid = true;
                let sel = self.queue_sel;
                Self::reject(
                    &mut self.stats.rejected_queue_configs,
                    device_type,
                    format_args!("QueueNum {value} for queue {sel} is invalid (max {max})"),
                );
            }
        }
    }

    fn write_queue_addr(&mut self, value: u32, field: fn(&mut QueueSlot) -> &mut u64, high: bool) {
        let Some(index) = self.configurable_queue("queue address", value) else {
            return;
        };
        let addr = field(&mut self.queues[index]);
        *addr = if high {
            (*addr & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*addr & !0xffff_ffff) | u64::from(value)
        };
    }

    fn write_queue_ready(&mut self, value: u32) {
        if value == 0 {
            // Taking a queue out of service is always harmless.
            if let Some(slot) = self.queues.get_mut(self.queue_sel as usize) {
                slot.queue.set_ready(false);
            }
            return;
        }
        let device_type = self.device.device_type();
        let sel = self.queue_sel;
        let Some(index) = self.configurable_queue("QueueReady", value) else {
            return;
        };
        let mem = &self.mem;
        let slot = &mut self.queues[index];
        let problem = if slot.size_invalid {
            Some("its size is invalid")
        } else if slot.queue.try_set_desc_table_address(GuestAddress(slot.desc)).is_err()
            || slot.queue.try_set_avail_ring_address(GuestAddress(slot.driver)).is_err()
            || slot.queue.try_set_used_ring_address(GuestAddress(slot.device)).is_err()
        {
            Some("a ring is misaligned")
        } else {
            slot.queue.set_ready(true);
            if slot.queue.is_valid(mem) {
                None
            } else {
                slot.queue.set_ready(false);
                Some("a ring is outside guest RAM")
            }
        };
        if let Some(problem) = problem {
            let (desc, driver, device) = (slot.desc, slot.driver, slot.device);
            Self::reject(
                &mut self.stats.rejected_queue_configs,
                device_type,
                format_args!(
                    "queue {sel} not made ready: {problem} (desc {desc:#x}, driver {driver:#x}, \
                     device {device:#x})"
                ),
            );
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let device_type = self.device.device_type();
        let old = self.status;
        let old_step = old & !(S_FAILED | S_NEEDS_RESET);
        let new_step = value & !S_FAILED;
        let in_order = STATUS_STEPS.contains(&new_step) && new_step & old_step == old_step;
        // Once FAILED, only a reset brings the device back.
        if old & S_FAILED != 0 || !in_order {
            Self::reject(
                &mut self.stats.rejected_status_writes,
                device_type,
                format_args!("Status {value:#x} refused in status {old:#x}"),
            );
            return;
        }
        let added = new_step & !old_step;
        let mut status = old | new_step | (value & S_FAILED);
        if added & S_FEATURES_OK != 0 && !self.features_acceptable() {
            // §3.1.1 step 6: the driver re-reads Status and finds FEATURES_OK clear.
            status &= !(S_FEATURES_OK | S_DRIVER_OK);
            let acked = self.acked_features;
            Self::reject(
                &mut self.stats.rejected_status_writes,
                device_type,
                format_args!("FEATURES_OK refused: driver features {acked:#x}"),
            );
        }
        self.status = status;
        if added & S_FEATURES_OK != 0 && status & S_FEATURES_OK != 0 {
            self.device.features_accepted(self.acked_features);
        }
        if added & S_DRIVER_OK != 0 && status & S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// The driver accepted only offered bits, and VIRTIO_F_VERSION_1 (modern only).
    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let ready: Vec<bool> = self.queues.iter().map(|q| q.queue.ready()).collect();
        if let Err(e) = self.device.activate(self.acked_features, &ready) {
            // §2.1.2: the device signals an unrecoverable error with DEVICE_NEEDS_RESET and a
            // configuration change notification.
            error!("virtio-mmio (type {}): activation failed: {e}", self.device.device_type());
            self.status |= S_NEEDS_RESET;
            self.raise(InterruptKind::ConfigChange);
        }
    }

    /// Device reset (virtio 1.2 §2.1.1, §4.2.3.1): the driver wrote 0 to Status.
    fn reset(&mut self) {
        self.device.reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.size_invalid = false;
            slot.desc = 0;
            slot.driver = 0;
            slot.device = 0;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(INTERRUPT_STATUS_MASK);
    }
}

mod state;
pub use state::{QueueSnapshot, StateError, TransportState};

#[cfg(test)]
mod tests;
