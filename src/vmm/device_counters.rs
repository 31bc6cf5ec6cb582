//! The counters of the devices that talk to the host (vsock, network cards), logged at `info`
//! when the VM stops: what a user (and the tests) read without a metrics file.

impl super::Vm {
    /// Logs each vsock and network device's counters.
    pub(super) fn log_device_counters(&self) {
        if let Some(vsock) = &self.vsock {
            let v = vsock.snapshot();
            log::info!(
                "{}: vsock: {} connections from host clients, {} from the guest ({} refused, {} over \
                     the limit), {} closed; {} bytes to the host, {} to the guest; at most {} bytes held \
                     for a host socket; {} credit violations, {} bad packets, {} bad handshakes",
                self.label,
                v.host_connections,
                v.guest_connections,
                v.refused_connections,
                v.connections_over_limit,
                v.closed_connections,
                v.bytes_to_host,
                v.bytes_to_guest,
                v.max_buffered_to_host,
                v.credit_violations,
                v.bad_packets,
                v.bad_handshakes
            );
        }
        for (i, net) in self.nets.iter().enumerate() {
            let n = net.snapshot();
            log::info!(
                "{}: net {i}: {} frames ({} bytes) sent, {} frames ({} bytes) received; {} dropped \
                     sending, {} dropped receiving; {} bad transmit chains, {} bad receive chains, {} \
                     backend errors",
                self.label,
                n.tx_frames,
                n.tx_bytes,
                n.rx_frames,
                n.rx_bytes,
                n.tx_dropped,
                n.rx_dropped,
                n.bad_tx_chains,
                n.bad_rx_chains,
                n.backend_errors
            );
        }
    }
}
