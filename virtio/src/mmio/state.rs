//! A transport's guest-visible state, saved for a snapshot and put back into a fresh transport
//! of the same device on restore (docs/snapshot.md, "Devices").
//!
//! Restoring treats the saved state as hostile (a snapshot directory is a file anyone may have
//! edited): every value is checked as the register writes that would have produced it are,
//! and a state that no driver could have reached is refused whole, leaving the transport reset.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioTransport, QueueSlot, STATUS_STEPS, S_DRIVER_OK, S_FAILED, S_FEATURES_OK, S_NEEDS_RESET};
use crate::device_state::{DeviceState, DeviceStateError};
use crate::interrupt::{InterruptKind, INTERRUPT_STATUS_CONFIG_CHANGE, INTERRUPT_STATUS_MASK};

/// One queue as the driver configured it, and where the device is in its rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNum as written (0 while never written).
    pub size: u16,
    /// The driver wrote a QueueNum that was refused.
    pub size_invalid: bool,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table, driver area and device area addresses as written.
    pub desc: u64,
    /// See `desc`.
    pub driver: u64,
    /// See `desc`.
    pub device: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// Everything a driver can observe of a transport, but the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device type the state belongs to (virtio 1.2 §5).
    pub device_type: u32,
    /// The Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The feature bits the driver wrote.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state, for devices that keep one (the balloon).
    #[serde(default)]
    pub device: Option<DeviceState>,
}

/// Why a saved state does not fit this transport.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The state is of another device type.
    #[error("the state is of a device of type {saved}, this device is of type {actual}")]
    DeviceType {
        /// In the state.
        saved: u32,
        /// This transport's.
        actual: u32,
    },
    /// The state has another number of queues.
    #[error("the state has {saved} queues, the device {actual}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// The device's.
        actual: usize,
    },
    /// No sequence of Status writes reaches the saved Status.
    #[error("Status {0:#x} cannot be reached by a driver")]
    Status(u32),
    /// The driver's features include bits the device does not offer, or lack VERSION_1.
    #[error("driver features {acked:#x} were not offered ({offered:#x})")]
    Features {
        /// In the state.
        acked: u64,
        /// The device's.
        offered: u64,
    },
    /// A queue's size, addresses or ring positions are not ones the device accepts.
    #[error("queue {index}: {what}")]
    Queue {
        /// Which queue.
        index: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The device refused its own saved state.
    #[error("the device's own state")]
    Device(#[source] DeviceStateError),
}

impl MmioTransport {
    /// The transport's state now (call with the driver unable to write registers, the vCPUs
    /// paused, and no request of the device in progress).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status() & INTERRUPT_STATUS_MASK,
            queues: self
                .queues
                .iter()
                .map(|slot| {
                    let q = slot.queue.state();
                    QueueSnapshot {
                        size: q.size,
                        size_invalid: slot.size_invalid,
                        ready: q.ready,
                        desc: slot.desc,
                        driver: slot.driver,
                        device: slot.device,
                        next_avail: q.next_avail,
                        next_used: q.next_used,
                        event_idx: q.event_idx_enabled,
                    }
                })
                .collect(),
            device: self.device.save_device_state(),
        }
    }

    /// Puts `state` into this freshly made transport: the queues as the driver configured
    /// them, the device told of the features and activated as the driver's Status writes did,
    /// and a pending interrupt raised again. On error the transport stays reset.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), StateError> {
        let queues = self.checked_queues(state)?;
        self.reset();
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if self.status & S_FEATURES_OK != 0 {
            self.device.features_accepted(self.acked_features);
        }
        if self.status & S_DRIVER_OK != 0 {
            self.activate();
        }
        if let Some(device) = &state.device {
            if let Err(e) = self.device.restore_device_state(device) {
                self.reset();
                return Err(StateError::Device(e));
            }
        }
        if state.interrupt_status & INTERRUPT_STATUS_CONFIG_CHANGE != 0 {
            self.raise(InterruptKind::ConfigChange);
        }
        if state.interrupt_status & InterruptKind::UsedRing.status_bit() != 0 {
            self.raise(InterruptKind::UsedRing);
        }
        Ok(())
    }

    /// The queues `state` describes, each checked as QueueNum and QueueReady would check it.
    fn checked_queues(&self, state: &TransportState) -> Result<Vec<QueueSlot>, StateError> {
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(StateError::DeviceType { saved: state.device_type, actual });
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::QueueCount { saved: state.queues.len(), actual: self.queues.len() });
        }
        let step = state.status & !(S_FAILED | S_NEEDS_RESET);
        if !STATUS_STEPS.contains(&step) {
            return Err(StateError::Status(state.status));
        }
        if step & S_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            if state.acked_features & !offered != 0 || state.acked_features & crate::VIRTIO_F_VERSION_1 == 0 {
                return Err(StateError::Features { acked: state.acked_features, offered });
            }
        }
        let mut slots = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            let bad = |what| StateError::Queue { index, what };
            let max_size = current.queue.max_size();
            let mut queue = Queue::new(max_size).map_err(|_| bad("its maximum size is invalid"))?;
            if saved.size != 0 && !saved.size_invalid {
                queue.try_set_size(saved.size).map_err(|_| bad("its size is invalid"))?;
            }
            if saved.ready {
                if saved.size_invalid || step & S_FEATURES_OK == 0 {
                    return Err(bad("it is ready without a valid size or before FEATURES_OK"));
                }
                let restored = QueueState {
                    max_size,
                    next_avail: saved.next_avail,
                    next_used: saved.next_used,
                    event_idx_enabled: saved.event_idx,
                    size: queue.size(),
                    ready: true,
                    desc_table: saved.desc,
                    avail_ring: saved.driver,
                    used_ring: saved.device,
                };
                queue = Queue::try_from(restored).map_err(|_| bad("a ring is misaligned"))?;
                if !queue.is_valid(&self.mem) {
                    return Err(bad("a ring is outside guest RAM"));
                }
            }
            slots.push(QueueSlot {
                queue,
                size_invalid: saved.size_invalid,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
            });
        }
        Ok(slots)
    }
}
