//! The receive queue of the vsock device: what the device has for the guest (replies to its
//! packets, then data and ends of stream from the host sockets, a packet per connection in
//! turn), written into the guest's buffers within the credit it gave.

use std::io;
use std::sync::atomic::Ordering;

use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;

use super::connection::{Connection, Phase};
use super::wire::{op, shutdown, Reply, HOST_CID, TYPE_STREAM};
use super::{Vsock, BUF_ALLOC, MAX_PACKET_DATA};
use crate::{bump, should_log};

impl Vsock {
    /// Whether there is something for the receive queue.
    pub(super) fn has_for_guest(&self) -> bool {
        !self.replies.is_empty() || self.connections.values().any(Connection::has_for_guest)
    }

    /// Fills the receive queue's buffers: replies first, then data from the host sockets, a
    /// packet per connection in turn.
    pub(super) fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.has_for_guest() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let mut packet = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
                Ok(packet) => packet,
                Err(e) => {
                    if should_log(bump(&self.stats.bad_packets)) {
                        warn!("vsock: malformed receive chain: {e}");
                    }
                    used |= queue.add_used(mem, head, 0).is_ok();
                    continue;
                }
            };
            match self.next_for_guest(&mut packet) {
                Some(len) => used |= queue.add_used(mem, head, PKT_HEADER_SIZE as u32 + len).is_ok(),
                None => {
                    // A socket that looked readable was not: the buffer stays the guest's.
                    queue.go_to_previous_position();
                    break;
                }
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Writes the next packet for the guest into `packet`; its data length, or None if there
    /// was nothing after all.
    fn next_for_guest(&mut self, packet: &mut VsockPacket<'_, ()>) -> Option<u32> {
        while let Some(reply) = self.replies.pop_front() {
            let Some(&id) = self.by_ports.get(&(reply.host_port, reply.guest_port)) else {
                // A reset for a connection that is gone, or for one that never was.
                if reply.op == op::RST {
                    self.write_header(packet, reply, None, 0);
                    return Some(0);
                }
                continue;
            };
            match reply.op {
                op::CREDIT_UPDATE => {
                    if let Some(c) = self.connections.get_mut(&id) {
                        c.credit_update_queued = false;
                    }
                }
                op::CREDIT_REQUEST => {}
                _ => {}
            }
            self.write_header(packet, reply, Some(id), 0);
            return Some(0);
        }
        let data_room = packet.data_slice().map_or(0, |s| s.len()) as u32;
        // Connections with data, in turn from where the last search stopped.
        let mut ids: Vec<u64> =
            self.connections.iter().filter(|(_, c)| c.has_for_guest()).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        let start = ids.iter().position(|&id| id > self.rx_cursor).unwrap_or(0);
        ids.rotate_left(start);
        for id in ids {
            let Some((host_port, guest_port)) = self.ports_of(id) else { continue };
            let Some(conn) = self.connections.get_mut(&id) else { continue };
            let want = data_room.min(conn.guest_room()).min(MAX_PACKET_DATA) as usize;
            if conn.readable && want > 0 {
                match conn.read_host(&mut self.buf[..want]) {
                    Ok(0) => {
                        conn.readable = false;
                        conn.host_eof = true;
                    }
                    Ok(n) => {
                        conn.sent += std::num::Wrapping(n as u32);
                        if let Some(slice) = packet.data_slice() {
                            slice.copy_from(&self.buf[..n]);
                        }
                        self.rx_cursor = id;
                        self.stats.bytes_to_guest.fetch_add(n as u64, Ordering::Relaxed);
                        let reply = Reply { host_port, guest_port, op: op::RW, flags: 0 };
                        self.write_header(packet, reply, Some(id), n as u32);
                        return Some(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.readable = false;
                        continue;
                    }
                    Err(_) => {
                        self.close(id, false);
                        let reply = Reply { host_port, guest_port, op: op::RST, flags: 0 };
                        self.write_header(packet, reply, None, 0);
                        return Some(0);
                    }
                }
            }
            let Some(conn) = self.connections.get_mut(&id) else { continue };
            if conn.host_eof && !conn.eof_told {
                conn.eof_told = true;
                self.rx_cursor = id;
                let reply = Reply { host_port, guest_port, op: op::SHUTDOWN, flags: shutdown::SEND };
                self.write_header(packet, reply, Some(id), 0);
                return Some(0);
            }
        }
        None
    }

    /// Writes a packet header for `reply` (with connection `id`'s credit when it has one).
    fn write_header(&mut self, packet: &mut VsockPacket<'_, ()>, reply: Reply, id: Option<u64>, len: u32) {
        let (buf_alloc, fwd_cnt) = match id.and_then(|id| self.connections.get_mut(&id)) {
            Some(conn) => {
                conn.announced_fwd_cnt = conn.fwd_cnt;
                (BUF_ALLOC, conn.fwd_cnt.0)
            }
            None => (0, 0),
        };
        let _ = packet.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]);
        packet
            .set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(reply.host_port)
            .set_dst_port(reply.guest_port)
            .set_type(TYPE_STREAM)
            .set_op(reply.op)
            .set_flags(reply.flags)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt)
            .set_len(len);
    }

    /// Queues a CREDIT_REQUEST for connections that have data the guest has no room for.
    pub(super) fn ask_for_credit(&mut self) {
        let mut asks = Vec::new();
        for (&id, conn) in &mut self.connections {
            if conn.phase == Phase::Established
                && conn.readable
                && conn.guest_room() == 0
                && !conn.credit_request_queued
                && !conn.guest_done_receiving
            {
                conn.credit_request_queued = true;
                asks.push(id);
            }
        }
        for id in asks {
            if let Some((h, g)) = self.ports_of(id) {
                self.reply(h, g, op::CREDIT_REQUEST, 0);
            }
        }
    }
}
