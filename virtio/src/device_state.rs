//! A device's own state beyond its transport's, saved for a snapshot and put back on restore
//! (docs/snapshot.md, "Devices"): only the devices that keep state a driver can observe have
//! one. A leaf: the transport saves it, the devices fill and check it.
//!
//! Restoring treats it as hostile, as the transport's state is: a device refuses a value it
//! could not have had.

use serde::{Deserialize, Serialize};

/// The device-specific part of a saved transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// virtio-balloon.
    Balloon(BalloonState),
}

/// What a virtio-balloon's driver can observe besides its queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `num_pages`: the host's target.
    pub target: u32,
    /// `actual`: the pages the driver says it has given.
    pub actual: u32,
    /// The statsq buffer the device held (its descriptor head), to return when it next asks
    /// for statistics.
    pub held_stats: Option<u16>,
}

/// Why a device refuses a saved state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    /// The state is another kind of device's, or this device keeps none.
    #[error("the saved state is not one this device keeps")]
    WrongDevice,
    /// A value the device could not have had.
    #[error("{0}")]
    Impossible(&'static str),
}
