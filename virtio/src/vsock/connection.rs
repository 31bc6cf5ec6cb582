//! One stream between a guest port and a host Unix socket: its state, the bytes the guest sent
//! that the host socket has not taken yet, and the credit each side gives the other (virtio
//! 1.2 §5.10.6.3). All counters are wrapping `u32`s, as on the wire.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::BUF_ALLOC;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A host client asked for it (`CONNECT <port>`): the device sent REQUEST and waits for the
    /// guest's RESPONSE before it writes `OK <port>` to the client.
    AwaitingGuest,
    /// Data flows.
    Established,
}

/// What writing to the host socket came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything buffered reached the socket.
    All,
    /// The socket is full: the rest waits for it to be writable.
    Partly,
}

/// One connection.
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The host side's port (the guest's destination port).
    pub host_port: u32,
    /// The guest side's port.
    pub guest_port: u32,
    /// See [`Phase`].
    pub phase: Phase,
    /// Bytes from the guest not yet written to `stream` (at most [`BUF_ALLOC`]).
    to_host: Vec<u8>,
    /// Of `to_host`, the bytes already written.
    to_host_start: usize,
    /// Bytes of the guest's written to the host socket (our `fwd_cnt`).
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    pub announced_fwd_cnt: Wrapping<u32>,
    /// Bytes the guest sent us in all (written or buffered).
    received: Wrapping<u32>,
    /// Bytes we sent the guest (our `tx_cnt`, its `rx`).
    pub sent: Wrapping<u32>,
    /// The guest's buffer space and what it consumed, from its latest packet.
    pub peer_buf_alloc: u32,
    /// See `peer_buf_alloc`.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have data (an edge was seen and no read has found it empty).
    pub readable: bool,
    /// The host socket said end of file; whether the guest was told (SHUTDOWN SEND).
    pub host_eof: bool,
    /// See `host_eof`.
    pub eof_told: bool,
    /// The guest will send no more: the host socket's write side is shut once `to_host` is
    /// written.
    pub guest_done_sending: bool,
    /// The guest will receive no more: nothing more is read from the host socket.
    pub guest_done_receiving: bool,
    /// A CREDIT_UPDATE or CREDIT_REQUEST for this connection waits in the reply queue.
    pub credit_update_queued: bool,
    /// See `credit_update_queued`.
    pub credit_request_queued: bool,
    /// The write side of the host socket was shut.
    host_write_shut: bool,
}

impl Connection {
    /// A connection on `stream` in `phase`; the guest's credit comes with its first packet.
    pub fn new(stream: UnixStream, phase: Phase, host_port: u32, guest_port: u32) -> Connection {
        Connection {
            stream,
            host_port,
            guest_port,
            phase,
            to_host: Vec::new(),
            to_host_start: 0,
            fwd_cnt: Wrapping(0),
            announced_fwd_cnt: Wrapping(0),
            received: Wrapping(0),
            sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            eof_told: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            credit_update_queued: false,
            credit_request_queued: false,
            host_write_shut: false,
        }
    }

    /// Takes the guest's credit from one of its packets.
    pub fn peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many more bytes the guest has room for.
    pub fn guest_room(&self) -> u32 {
        let in_flight = (self.sent - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.to_host.len() - self.to_host_start
    }

    /// How much room the guest thinks it has for sending to us, from what we announced.
    pub fn guest_thinks_free(&self) -> u32 {
        BUF_ALLOC.saturating_sub((self.received - self.announced_fwd_cnt).0)
    }

    /// Data from the guest: written to the host socket as far as it takes it, the rest kept.
    /// Err(()) when the guest sent beyond its credit (the caller resets the connection).
    pub fn take_guest_data(&mut self, data: &[u8]) -> Result<io::Result<Flushed>, ()> {
        if self.buffered() + data.len() > BUF_ALLOC as usize {
            return Err(());
        }
        self.received += Wrapping(data.len() as u32);
        if self.buffered() == 0 {
            match write_some(&mut self.stream, data) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    if n == data.len() {
                        return Ok(Ok(Flushed::All));
                    }
                    self.to_host.clear();
                    self.to_host_start = 0;
                    self.to_host.extend_from_slice(&data[n..]);
                    return Ok(Ok(Flushed::Partly));
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        self.to_host.extend_from_slice(data);
        Ok(Ok(Flushed::Partly))
    }

    /// Writes a line of the device's own to the host socket (`OK <port>`), outside the
    /// stream's byte counts. The socket is new and empty, so the line fits its buffer; a
    /// socket that takes less is an error.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match write_some(&mut self.stream, line)? {
            n if n == line.len() => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
        }
    }

    /// Writes what is buffered to the host socket (it became writable).
    pub fn flush(&mut self) -> io::Result<Flushed> {
        while self.buffered() > 0 {
            let n = write_some(&mut self.stream, &self.to_host[self.to_host_start..])?;
            if n == 0 {
                return Ok(Flushed::Partly);
            }
            self.to_host_start += n;
            self.fwd_cnt += Wrapping(n as u32);
        }
        self.to_host.clear();
        self.to_host_start = 0;
        // Keep no large buffer once a slow reader caught up.
        self.to_host.shrink_to(4096);
        Ok(Flushed::All)
    }

    /// Shuts the host socket's write side once the guest is done sending and all its bytes
    /// are written; whether it is (now or before).
    pub fn shut_host_write_if_done(&mut self) -> bool {
        if self.guest_done_sending && self.buffered() == 0 && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        self.host_write_shut
    }

    /// Reads at most `buf.len()` bytes from the host socket. `Ok(0)`: end of file; an error
    /// of kind `WouldBlock`: nothing now.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Whether the device has data (or an end of file) to give the guest on this connection now.
    pub fn has_for_guest(&self) -> bool {
        self.phase == Phase::Established
            && !self.guest_done_receiving
            && ((self.readable && self.guest_room() > 0) || (self.host_eof && !self.eof_told))
    }
}

/// Writes as much of `data` as the non-blocking socket takes now; 0 when it takes nothing.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}
