//! The virtio socket device (virtio 1.2 §5.10, "virtio-vsock") with Firecracker's host side
//! ([`host_side`]): stream connections between guest ports and host Unix sockets.
//!
//! Queues: 0 receive (device to driver), 1 transmit (driver to device), 2 event (never used:
//! a VM with a vsock device is not snapshotted). Configuration: the guest's CID (u64). Feature
//! bits: VERSION_1 only (streams; no SEQPACKET, no datagrams).
//!
//! What the device guarantees, whatever the guest writes:
//! - every transmit chain is parsed by `virtio-vsock`'s `VsockPacket` (header in the first
//!   descriptor, data in the same or the next, at most [`MAX_PACKET_DATA`] bytes); a malformed
//!   packet, a packet of another type than stream, from a CID that is not the guest's or to one
//!   that is not the host's is counted and dropped; a packet for a connection that does not
//!   exist gets a reset;
//! - the device gives each connection [`BUF_ALLOC`] bytes of credit and buffers at most that
//!   much for a host socket that does not read; data beyond it resets the connection (credit
//!   violation, counted);
//! - replies waiting for receive buffers are bounded ([`MAX_REPLIES`]): beyond that the
//!   transmit queue is left alone until the guest gives receive buffers;
//! - at most [`MAX_CONNECTIONS`] connections, [`host_side::MAX_HANDSHAKES`] host clients
//!   before their `CONNECT` line;
//! - host data goes to the guest only within the credit the guest gave (its `buf_alloc` and
//!   `fwd_cnt`): a guest that reads slowly slows its host peer, which the host socket's own
//!   buffer then holds.
//!
//! Host sockets are served from the VMM's event loop: [`VirtioDevice::backend_fd`] is watched,
//! [`VirtioDevice::backend_ready`] takes the events, and [`VirtioDevice::pending_queues`] says
//! which queues then have work.

mod connection;
mod counters;
pub mod host_side;
mod receive;
pub mod wire;

pub use counters::{VsockStats, VsockStatsSnapshot};

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

use crate::{bump, read_config_bytes, should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1};
use connection::{Connection, Flushed, Phase};
use host_side::{HostEvent, HostSide};
use wire::{op, shutdown, Reply, HOST_CID, TYPE_STREAM};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Most data bytes in one packet, each way.
pub const MAX_PACKET_DATA: u32 = 64 << 10;
/// The credit the device gives each connection: bytes the guest may send that its host socket
/// has not taken yet.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most replies waiting for receive buffers.
pub const MAX_REPLIES: usize = 4 * MAX_CONNECTIONS;
/// First host port given to host-initiated connections (below are the ports guests connect to).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    host: HostSide,
    /// By id (the host socket's epoll data).
    connections: HashMap<u64, Connection>,
    /// (host port, guest port) to id.
    by_ports: HashMap<(u32, u32), u64>,
    next_id: u64,
    next_host_port: u32,
    replies: VecDeque<Reply>,
    /// The transmit queue was left with chains in it (too many replies waiting).
    tx_stalled: bool,
    stats: Arc<VsockStats>,
    events: Vec<HostEvent>,
    /// One packet's data, allocated once.
    buf: Vec<u8>,
    /// Where the next search for a connection with data for the guest starts (fairness).
    rx_cursor: u64,
}

/// The guest side of a packet, as the header says it.
#[derive(Clone, Copy)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    guest_port: u32,
    host_port: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Vsock {
    /// A device for guest CID `guest_cid` (3 to 2^32 - 2, checked by the VMM) serving host
    /// clients on `listener`, bound at `uds_path`.
    pub fn new(guest_cid: u64, listener: UnixListener, uds_path: PathBuf) -> io::Result<Vsock> {
        Ok(Vsock {
            guest_cid,
            host: HostSide::new(listener, uds_path)?,
            connections: HashMap::new(),
            by_ports: HashMap::new(),
            next_id: 1,
            next_host_port: FIRST_HOST_PORT,
            replies: VecDeque::new(),
            tx_stalled: false,
            stats: Arc::default(),
            events: Vec::new(),
            buf: vec![0; MAX_PACKET_DATA as usize],
            rx_cursor: 0,
        })
    }

    /// Its counters (shared: the VMM reads them while the device runs).
    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn reply(&mut self, host_port: u32, guest_port: u32, op: u16, flags: u32) {
        self.replies.push_back(Reply { host_port, guest_port, op, flags });
    }

    /// Ends connection `id`: its host socket is closed, and the guest gets a reset when `rst`.
    fn close(&mut self, id: u64, rst: bool) {
        if let Some(conn) = self.connections.remove(&id) {
            self.host.unwatch(&conn.stream);
            self.by_ports.remove(&(conn.host_port, conn.guest_port));
            if rst {
                self.reply(conn.host_port, conn.guest_port, op::RST, 0);
            }
            bump(&self.stats.closed_connections);
        }
    }

    /// Connection `id`'s (host port, guest port).
    fn ports_of(&self, id: u64) -> Option<(u32, u32)> {
        self.connections.get(&id).map(|c| (c.host_port, c.guest_port))
    }

    /// A new connection; its id, or None when there are too many or its socket cannot be
    /// watched.
    fn open(&mut self, stream: UnixStream, phase: Phase, host_port: u32, guest_port: u32) -> Option<u64> {
        if self.connections.len() >= MAX_CONNECTIONS {
            bump(&self.stats.connections_over_limit);
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self.host.watch(id, &stream) {
            warn!("vsock: cannot watch a host socket: {e}");
            return None;
        }
        self.connections.insert(id, Connection::new(stream, phase, host_port, guest_port));
        self.by_ports.insert((host_port, guest_port), id);
        Some(id)
    }

    /// A host port for a host-initiated connection to `guest_port` that no connection uses.
    fn free_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.by_ports.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    /// Takes what happened on the host sockets.
    fn take_host_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        self.host.events(&mut events);
        for event in events.drain(..) {
            match event {
                HostEvent::BadHandshake => {
                    bump(&self.stats.bad_handshakes);
                }
                HostEvent::Connect { stream, port } => {
                    let host_port = self.free_host_port(port);
                    if self.open(stream, Phase::AwaitingGuest, host_port, port).is_some() {
                        self.reply(host_port, port, op::REQUEST, 0);
                    }
                }
                HostEvent::Ready { id, readable, writable } => self.host_ready(id, readable, writable),
            }
        }
        self.events = events;
    }

    fn host_ready(&mut self, id: u64, readable: bool, writable: bool) {
        let Some(conn) = self.connections.get_mut(&id) else { return };
        if readable {
            conn.readable = true;
        }
        if writable && conn.buffered() > 0 {
            let before = conn.fwd_cnt;
            let flushed = conn.flush();
            self.stats.bytes_to_host.fetch_add(u64::from((conn.fwd_cnt - before).0), Ordering::Relaxed);
            match flushed {
                Ok(_) => {
                    conn.shut_host_write_if_done();
                    self.maybe_credit_update(id);
                    self.finish_if_done(id);
                }
                Err(_) => self.close(id, true),
            }
        }
        // A client that leaves before the guest accepted: nothing will read the OK.
        if let Some(conn) = self.connections.get_mut(&id) {
            if conn.phase == Phase::AwaitingGuest && readable {
                let mut probe = [0u8; 1];
                // SAFETY: a non-blocking peek of one byte into `probe`.
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&conn.stream),
                        probe.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n == 0 {
                    bump(&self.stats.bad_handshakes);
                    self.close(id, true);
                }
            }
        }
    }

    /// Queues a CREDIT_UPDATE when the guest may be short of credit and we forwarded some.
    fn maybe_credit_update(&mut self, id: u64) {
        let Some(conn) = self.connections.get_mut(&id) else { return };
        if conn.fwd_cnt != conn.announced_fwd_cnt
            && conn.guest_thinks_free() < BUF_ALLOC / 2
            && !conn.credit_update_queued
        {
            conn.credit_update_queued = true;
            if let Some((h, g)) = self.ports_of(id) {
                self.reply(h, g, op::CREDIT_UPDATE, 0);
            }
        }
    }

    /// Closes a connection both sides are done with.
    fn finish_if_done(&mut self, id: u64) {
        let Some(conn) = self.connections.get(&id) else { return };
        if conn.guest_done_sending && conn.guest_done_receiving && conn.buffered() == 0 {
            self.close(id, true);
        }
    }

    /// One packet from the guest.
    fn guest_packet(&mut self, h: Header, data: Option<&[u8]>) {
        if h.type_ != TYPE_STREAM || h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            if should_log(bump(&self.stats.bad_packets)) {
                warn!(
                    "vsock: packet of type {} from CID {} to CID {} dropped (the guest is CID {})",
                    h.type_, h.src_cid, h.dst_cid, self.guest_cid
                );
            }
            if h.type_ != TYPE_STREAM && h.src_cid == self.guest_cid && h.op != op::RST {
                self.reply(h.host_port, h.guest_port, op::RST, 0);
            }
            return;
        }
        let id = self.by_ports.get(&(h.host_port, h.guest_port)).copied();
        let Some(id) = id else {
            match h.op {
                op::REQUEST => self.guest_connects(h),
                op::RST => {}
                _ => {
                    bump(&self.stats.unknown_connections);
                    self.reply(h.host_port, h.guest_port, op::RST, 0);
                }
            }
            return;
        };
        if let Some(conn) = self.connections.get_mut(&id) {
            conn.peer_credit(h.buf_alloc, h.fwd_cnt);
            if conn.guest_room() > 0 {
                conn.credit_request_queued = false;
            }
        }
        match (h.op, self.connections.get(&id).map(|c| c.phase)) {
            (op::RESPONSE, Some(Phase::AwaitingGuest)) => self.guest_accepted(id, h.host_port),
            (op::RST, _) => self.close(id, false),
            (_, Some(Phase::AwaitingGuest)) | (op::REQUEST | op::RESPONSE, _) => {
                // A second REQUEST on an open connection, or anything before the guest
                // accepted: the guest's side is confused, so the connection goes.
                bump(&self.stats.bad_packets);
                self.close(id, true);
            }
            (op::RW, _) => self.guest_data(id, data.unwrap_or(&[])),
            (op::SHUTDOWN, _) => {
                if let Some(conn) = self.connections.get_mut(&id) {
                    conn.guest_done_sending |= h.flags & shutdown::SEND != 0;
                    conn.guest_done_receiving |= h.flags & shutdown::RCV != 0;
                    conn.shut_host_write_if_done();
                }
                self.finish_if_done(id);
            }
            // The new credit was taken above.
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => {
                if let Some(conn) = self.connections.get_mut(&id) {
                    if !conn.credit_update_queued {
                        conn.credit_update_queued = true;
                        self.reply(h.host_port, h.guest_port, op::CREDIT_UPDATE, 0);
                    }
                }
            }
            _ => {
                bump(&self.stats.bad_packets);
                self.close(id, true);
            }
        }
    }

    /// The guest connects to host port `h.host_port`: its listener's socket is connected, or
    /// the guest gets a reset.
    fn guest_connects(&mut self, h: Header) {
        match self.host.connect_to_host_port(h.host_port) {
            Ok(stream) => {
                if let Some(id) = self.open(stream, Phase::Established, h.host_port, h.guest_port) {
                    if let Some(conn) = self.connections.get_mut(&id) {
                        conn.peer_credit(h.buf_alloc, h.fwd_cnt);
                    }
                    bump(&self.stats.guest_connections);
                    self.reply(h.host_port, h.guest_port, op::RESPONSE, 0);
                    return;
                }
            }
            Err(e) => {
                if should_log(bump(&self.stats.refused_connections)) {
                    warn!("vsock: the guest's connection to host port {} refused: {e}", h.host_port);
                }
            }
        }
        self.reply(h.host_port, h.guest_port, op::RST, 0);
    }

    /// The guest accepted a host client's connection: the client gets `OK <host port>`.
    fn guest_accepted(&mut self, id: u64, host_port: u32) {
        let Some(conn) = self.connections.get_mut(&id) else { return };
        conn.phase = Phase::Established;
        let line = format!("OK {host_port}\n");
        // The client's socket is new and empty: a short line fits its buffer.
        match conn.write_line(line.as_bytes()) {
            Ok(()) => {
                bump(&self.stats.host_connections);
            }
            Err(_) => self.close(id, true),
        }
    }

    fn guest_data(&mut self, id: u64, data: &[u8]) {
        let Some(conn) = self.connections.get_mut(&id) else { return };
        if conn.guest_done_sending {
            bump(&self.stats.bad_packets);
            self.close(id, true);
            return;
        }
        let before = conn.fwd_cnt;
        let result = conn.take_guest_data(data);
        self.stats.bytes_to_host.fetch_add(u64::from((conn.fwd_cnt - before).0), Ordering::Relaxed);
        match result {
            Err(()) => {
                if should_log(bump(&self.stats.credit_violations)) {
                    warn!("vsock: the guest sent beyond its credit of {BUF_ALLOC} bytes: connection reset");
                }
                self.close(id, true);
            }
            Ok(Err(_)) => self.close(id, true),
            Ok(Ok(flushed)) => {
                self.stats.max_buffered_to_host.fetch_max(conn.buffered() as u64, Ordering::Relaxed);
                if flushed == Flushed::All {
                    self.maybe_credit_update(id);
                }
            }
        }
    }

    /// Serves the transmit queue, until it is empty or too many replies wait.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut served = 0;
            loop {
                if self.replies.len() >= MAX_REPLIES {
                    self.tx_stalled = true;
                    bump(&self.stats.tx_stalls);
                    break;
                }
                let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
                served += 1;
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
                    Ok(packet) => {
                        let h = header_of(&packet);
                        let len = packet.len() as usize;
                        let data = match (len, packet.data_slice()) {
                            (0, _) | (_, None) => None,
                            (len, Some(slice)) => {
                                let n = slice.len().min(len).min(self.buf.len());
                                slice.copy_to(&mut self.buf[..n]);
                                Some(n)
                            }
                        };
                        let buf = std::mem::take(&mut self.buf);
                        self.guest_packet(h, data.map(|n| &buf[..n]));
                        self.buf = buf;
                    }
                    Err(e) => {
                        if should_log(bump(&self.stats.bad_packets)) {
                            warn!("vsock: malformed transmit chain: {e}");
                        }
                    }
                }
                used |= queue.add_used(mem, head, 0).is_ok();
            }
            if self.tx_stalled {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) if served > 0 => continue,
                _ => break,
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

/// The fields of a guest packet's header.
fn header_of(packet: &VsockPacket<'_, ()>) -> Header {
    Header {
        src_cid: packet.src_cid(),
        dst_cid: packet.dst_cid(),
        guest_port: packet.src_port(),
        host_port: packet.dst_port(),
        type_: packet.type_(),
        op: packet.op(),
        flags: packet.flags(),
        buf_alloc: packet.buf_alloc(),
        fwd_cnt: packet.fwd_cnt(),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        for (index, ready) in queues_ready.iter().take(2).enumerate() {
            if !ready {
                return Err(Error::QueueNotReady(index));
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            TX_QUEUE => {
                let used = self.process_tx(queue, mem);
                self.ask_for_credit();
                used
            }
            RX_QUEUE => {
                self.ask_for_credit();
                self.process_rx(queue, mem)
            }
            // The event queue's buffers stay with the device: it has no event to give.
            _ => false,
        }
    }

    fn reset(&mut self) {
        let ids: Vec<u64> = self.connections.keys().copied().collect();
        for id in ids {
            self.close(id, false);
        }
        self.replies.clear();
        self.tx_stalled = false;
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.host.fd())
    }

    fn backend_ready(&mut self) {
        self.take_host_events();
        self.ask_for_credit();
    }

    fn pending_queues(&self) -> u64 {
        let mut queues = 0;
        if self.has_for_guest() {
            queues |= 1 << RX_QUEUE;
        }
        if self.tx_stalled && self.replies.len() < MAX_REPLIES {
            queues |= 1 << TX_QUEUE;
        }
        queues
    }
}

#[cfg(test)]
mod tests;
