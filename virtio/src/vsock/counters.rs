//! The counters of a vsock device ([`VsockStats`]): connections and bytes each way, and what
//! the driver or a host client got wrong; bumped by the device, read by the VMM while it runs.

use crate::counters;

counters! {
    /// Counters of a vsock device, shared with the VMM (see
    /// [`Vsock::stats`](super::Vsock::stats)).
    pub struct VsockStats, copied as VsockStatsSnapshot {
        /// Connections a host process asked for (`CONNECT <port>`) that the guest accepted.
        host_connections,
        /// Connections the guest opened to a host listener (`<uds_path>_<port>`).
        guest_connections,
        /// Connections ended (either side, reset included).
        closed_connections,
        /// Bytes the guest sent that reached a host socket.
        bytes_to_host,
        /// Bytes read from host sockets and put in the guest's buffers.
        bytes_to_guest,
        /// Guest connections to a host port nobody listens on (or that could not be reached):
        /// answered with a reset.
        refused_connections,
        /// Connections refused because [`MAX_CONNECTIONS`](super::MAX_CONNECTIONS) were open.
        connections_over_limit,
        /// Host clients whose first line was not `CONNECT <port>` within 64 bytes, or that
        /// left before the guest answered.
        bad_handshakes,
        /// Packets from the guest that were malformed (header or buffers), of another type
        /// than stream, from another CID than the guest's or to another than the host's.
        bad_packets,
        /// Packets for a connection that does not exist (answered with a reset).
        unknown_connections,
        /// Data beyond the credit the device gave: the connection is reset.
        credit_violations,
        /// Most bytes one connection held for a host socket that was not reading (at most
        /// the credit the device gives, [`BUF_ALLOC`](super::BUF_ALLOC)).
        max_buffered_to_host,
        /// Times the transmit queue was left for later because replies to the guest piled up
        /// (the guest gave no receive buffers).
        tx_stalls,
    }
}
