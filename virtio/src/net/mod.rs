//! The network device (virtio 1.2 §5.1, "virtio-net") on a packet backend: a tap device in
//! the VMM (`IFF_TAP | IFF_NO_PI`), a socket pair in tests. Each `read` of the backend is one
//! Ethernet frame, each `write` sends one.
//!
//! Queues: 0 receive, 1 transmit (no control queue, one queue pair). Feature bits offered:
//! VERSION_1 and MAC only, so no offloads: the guest computes its checksums and sends no
//! segment larger than its MTU (no CSUM, GSO/TSO or mergeable receive buffers). Every packet
//! in either queue starts with the 12-byte `virtio_net_hdr_v1`; the device ignores what the
//! guest writes there (without offloads it can say nothing the device acts on) and writes
//! zeros with `num_buffers` 1 before each received frame. Configuration: the MAC address.
//!
//! Whatever the guest writes: a transmit chain is gathered into one frame only from
//! device-readable buffers inside guest RAM, at most [`MAX_FRAME`] bytes after the header; a
//! receive chain is written only through device-writable buffers; anything else is counted and
//! returned with nothing done. A frame the backend cannot take now is dropped (counted), as a
//! full link drops it; a received frame larger than the guest's buffer is dropped (counted).
//!
//! The backend is served from the VMM's event loop: it is watched edge-triggered in an epoll
//! set of the device's own, whose descriptor is [`VirtioDevice::backend_fd`]; frames are read
//! only while receive buffers are there, so a guest that gives none leaves them in the
//! backend's queue (where the host drops what overflows).

mod counters;

pub use counters::{NetStats, NetStatsSnapshot};

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::{bump, collect_chain, read_config_bytes, should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The `virtio_net_hdr_v1` before every frame (virtio 1.2 §5.1.6).
pub const HEADER_LEN: usize = 12;
/// Largest frame either way, after the header: an Ethernet frame of a 64 KiB MTU (without
/// offloads the guest sends at most its MTU; a tap's default is 1500).
pub const MAX_FRAME: usize = 65535 + 14;
/// Most descriptors looked at in one chain.
pub const MAX_DESCRIPTORS: usize = 64;
/// VIRTIO_NET_F_MAC: the configuration holds the MAC address.
const F_MAC: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

/// A virtio-net device.
pub struct Net {
    backend: OwnedFd,
    epoll: Epoll,
    mac: [u8; 6],
    stats: Arc<NetStats>,
    /// The backend may have frames (an edge was seen and no read has found it empty).
    readable: bool,
    /// One frame, with room for the header before it.
    frame: Vec<u8>,
    descs: Vec<Descriptor>,
}

impl Net {
    /// A device with MAC address `mac` on `backend` (non-blocking; one frame per read and
    /// write).
    pub fn new(backend: OwnedFd, mac: [u8; 6]) -> io::Result<Net> {
        let epoll = Epoll::new()?;
        let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        epoll.ctl(ControlOperation::Add, backend.as_raw_fd(), EpollEvent::new(events, 0))?;
        Ok(Net {
            backend,
            epoll,
            mac,
            stats: Arc::default(),
            // A frame may have arrived before the epoll set watched the backend.
            readable: true,
            frame: vec![0; HEADER_LEN + MAX_FRAME],
            descs: Vec::with_capacity(MAX_DESCRIPTORS),
        })
    }

    /// Its counters (shared: the VMM reads them while the device runs).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// Serves every transmit chain: each becomes one frame written to the backend.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut served = 0;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                served += 1;
                let head = chain.head_index();
                self.transmit(chain, mem);
                used |= queue.add_used(mem, head, 0).is_ok();
            }
            match queue.enable_notification(mem) {
                Ok(true) if served > 0 => continue,
                _ => break,
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Gathers one transmit chain and writes its frame to the backend.
    fn transmit(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        let too_long = collect_chain(chain, MAX_DESCRIPTORS, &mut self.descs);
        let broken = self.descs.last().is_none_or(|d| d.has_next());
        let mut len = 0usize;
        let mut ok = !too_long && !broken;
        for d in &self.descs {
            if !ok {
                break;
            }
            let n = d.len() as usize;
            if d.is_write_only() || len + n > self.frame.len() {
                ok = false;
                break;
            }
            ok = mem.read_slice(&mut self.frame[len..len + n], d.addr()).is_ok();
            len += n;
        }
        if !ok || len < HEADER_LEN {
            if should_log(bump(&self.stats.bad_tx_chains)) {
                warn!("virtio-net: transmit chain refused ({len} bytes, {} descriptors)", self.descs.len());
            }
            return;
        }
        let frame = &self.frame[HEADER_LEN..len];
        // SAFETY: writes `frame.len()` bytes from `frame`, which we own, to our descriptor.
        let n = unsafe { libc::write(self.backend.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                bump(&self.stats.tx_dropped);
            } else if should_log(bump(&self.stats.backend_errors)) {
                warn!("virtio-net: the backend refused a {}-byte frame: {e}", frame.len());
            }
            return;
        }
        bump(&self.stats.tx_frames);
        self.stats.tx_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
    }

    /// Fills receive buffers with frames from the backend while both are there.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.readable {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let too_long = collect_chain(chain, MAX_DESCRIPTORS, &mut self.descs);
            let room: usize = self.descs.iter().map(|d| d.len() as usize).sum();
            // Checked before a frame is read, so that no frame is lost to a bad buffer.
            let valid = !too_long
                && self.descs.last().is_some_and(|d| !d.has_next())
                && self.descs.iter().all(|d| {
                    d.is_write_only()
                        && mem.check_range(d.addr(), d.len() as usize, vm_memory::Permissions::Write)
                })
                && room >= HEADER_LEN;
            if !valid {
                if should_log(bump(&self.stats.bad_rx_chains)) {
                    warn!(
                        "virtio-net: receive chain refused ({room} bytes, {} descriptors)",
                        self.descs.len()
                    );
                }
                used |= queue.add_used(mem, head, 0).is_ok();
                continue;
            }
            // SAFETY: reads at most the frame buffer's length past the header into it.
            let n = unsafe {
                libc::read(
                    self.backend.as_raw_fd(),
                    self.frame[HEADER_LEN..].as_mut_ptr().cast(),
                    self.frame.len() - HEADER_LEN,
                )
            };
            if n <= 0 {
                let e = io::Error::last_os_error();
                let failed =
                    n < 0 && e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted;
                if failed && should_log(bump(&self.stats.backend_errors)) {
                    warn!("virtio-net: reading the backend failed: {e}");
                }
                // Nothing now (or the backend is gone): the buffer stays the guest's.
                if n == 0 || e.kind() != io::ErrorKind::Interrupted {
                    self.readable = false;
                }
                queue.go_to_previous_position();
                continue;
            }
            let total = HEADER_LEN + n as usize;
            if total > room {
                bump(&self.stats.rx_dropped);
                // The buffer stays the guest's for the next frame.
                queue.go_to_previous_position();
                continue;
            }
            // virtio_net_hdr_v1: no flags, no GSO, num_buffers 1 (bytes 10-11).
            self.frame[..HEADER_LEN].fill(0);
            self.frame[10] = 1;
            let mut written = 0usize;
            let mut ok = true;
            for d in &self.descs {
                if written == total {
                    break;
                }
                let n = (d.len() as usize).min(total - written);
                if mem.write_slice(&self.frame[written..written + n], d.addr()).is_err() {
                    ok = false;
                    break;
                }
                written += n;
            }
            if !ok {
                if should_log(bump(&self.stats.bad_rx_chains)) {
                    warn!("virtio-net: a receive buffer is not in guest RAM");
                }
                used |= queue.add_used(mem, head, 0).is_ok();
                continue;
            }
            bump(&self.stats.rx_frames);
            self.stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            used |= queue.add_used(mem, head, total as u32).is_ok();
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status and the rest, which the features offered leave out.
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        for (index, ready) in queues_ready.iter().enumerate() {
            if !ready {
                return Err(Error::QueueNotReady(index));
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            TX_QUEUE => self.process_tx(queue, mem),
            RX_QUEUE => self.process_rx(queue, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {}

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn backend_ready(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        while let Ok(n) = self.epoll.wait(0, &mut events) {
            if n == 0 {
                break;
            }
            self.readable = true;
        }
    }

    fn pending_queues(&self) -> u64 {
        if self.readable {
            1 << RX_QUEUE
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests;
