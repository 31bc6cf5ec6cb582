//! Legacy devices on the port-I/O bus, and the adapter that puts virtio-mmio transports on the
//! MMIO bus.

pub mod balloon;
pub mod exit_port;
pub mod fphash;
pub mod i8042;
pub mod image;
pub mod kernel_image;
pub mod serial;
pub mod virtio_mmio;
