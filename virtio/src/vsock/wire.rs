//! The words of virtio-vsock's stream protocol (virtio 1.2 §5.10.6) that the device speaks:
//! operations, the stream type, shutdown flags and the host's CID. The header itself is parsed
//! and written through the `virtio-vsock` crate's `VsockPacket`.

/// The only socket type served: a connected stream (no SEQPACKET, no datagrams).
pub const TYPE_STREAM: u16 = 1;
/// The host's context ID: where guest connections to the host go (virtio 1.2 §5.10.4).
pub const HOST_CID: u64 = 2;
/// Smallest guest CID: 0-2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest guest CID: the field is 64 bits, but Linux guests take only 32 (`u32 svm_cid`), and
/// `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Operations (virtio 1.2 §5.10.6.6).
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Connected.
    pub const RESPONSE: u16 = 2;
    /// The connection is gone (or never was).
    pub const RST: u16 = 3;
    /// No more data in one or both directions (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space and what it has consumed, unasked.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more.
    pub const RCV: u32 = 1;
    /// The sender will send no more.
    pub const SEND: u32 = 2;
}

/// One packet the device puts in the guest's receive queue without data (or before its data
/// is read from the host): which connection, which operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The host side's port (the packet's source).
    pub host_port: u32,
    /// The guest side's port (its destination).
    pub guest_port: u32,
    /// The operation.
    pub op: u16,
    /// SHUTDOWN flags; 0 otherwise.
    pub flags: u32,
}
