//! The host side of the device, as Firecracker's vsock has it ("hybrid vsock"): one Unix
//! socket, `uds_path`, where a host process connects and writes `CONNECT <port>\n` to reach
//! guest port `<port>` (it gets `OK <host port>\n` once the guest accepts); and a guest
//! connection to host port P goes to a listener on `<uds_path>_<P>`.
//!
//! Every socket is non-blocking and watched by one epoll set (edge-triggered for connections)
//! whose descriptor the VMM's event loop watches in turn; [`HostSide::events`] reads what
//! happened without waiting.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Longest first line of a host client, `CONNECT 4294967295\n` and some room.
pub const MAX_HANDSHAKE: usize = 64;
/// Most host clients connected that have not said where to yet (the oldest is dropped for a
/// new one beyond this).
pub const MAX_HANDSHAKES: usize = 64;

/// epoll data of the listener.
const LISTENER_TOKEN: u64 = 1 << 63;
/// epoll data of handshake `i`: `HANDSHAKE_TOKEN | i`. Connections use their id, below 2^62.
const HANDSHAKE_TOKEN: u64 = 1 << 62;

/// What happened on the host side.
#[derive(Debug)]
pub enum HostEvent {
    /// A host client asked for guest port `port`.
    Connect {
        /// Its socket.
        stream: UnixStream,
        /// The guest port.
        port: u32,
    },
    /// A host client's first line was not a `CONNECT`, was too long, or it left first.
    BadHandshake,
    /// Connection `id`'s socket has data or an end (`readable`) or room (`writable`).
    Ready {
        /// The connection.
        id: u64,
        /// EPOLLIN, EPOLLRDHUP, EPOLLHUP or EPOLLERR.
        readable: bool,
        /// EPOLLOUT.
        writable: bool,
    },
}

/// A host client that has not finished its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    /// Arrival order, to drop the oldest.
    serial: u64,
}

/// The Unix sockets of one vsock device.
pub struct HostSide {
    epoll: Epoll,
    listener: UnixListener,
    uds_path: PathBuf,
    handshakes: HashMap<u64, Handshake>,
    next_handshake: u64,
    events: Vec<EpollEvent>,
}

impl HostSide {
    /// Serves `listener` (bound at `uds_path`, which also names the guest's host listeners).
    pub fn new(listener: UnixListener, uds_path: PathBuf) -> io::Result<HostSide> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(HostSide {
            epoll,
            listener,
            uds_path,
            handshakes: HashMap::new(),
            next_handshake: 0,
            events: vec![EpollEvent::default(); 64],
        })
    }

    /// The epoll set's descriptor: readable when something happened.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Watches connection `id`'s socket (edge-triggered: the device reads and writes until
    /// `WouldBlock`).
    pub fn watch(&self, id: u64, stream: &UnixStream) -> io::Result<()> {
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(events, id))
    }

    /// Stops watching a socket (before it is dropped, so that a duplicate of it elsewhere
    /// cannot keep it in the set).
    pub fn unwatch(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(ControlOperation::Delete, stream.as_raw_fd(), EpollEvent::default());
    }

    /// What happened since the last call, without waiting.
    pub fn events(&mut self, out: &mut Vec<HostEvent>) {
        loop {
            let n = match self.epoll.wait(0, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: epoll_wait on the host sockets failed: {e}");
                    return;
                }
            };
            for i in 0..n {
                let (token, set) = (self.events[i].data(), self.events[i].event_set());
                match token {
                    LISTENER_TOKEN => self.accept_all(),
                    t if t & HANDSHAKE_TOKEN != 0 => self.read_handshake(t & !HANDSHAKE_TOKEN, out),
                    id => out.push(HostEvent::Ready {
                        id,
                        readable: set.intersects(
                            EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                        ),
                        writable: set.contains(EventSet::OUT),
                    }),
                }
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    /// Takes every waiting host client.
    fn accept_all(&mut self) {
        loop {
            // Non-blocking from the start (no FIONBIO ioctl after: the device thread's seccomp
            // filter has no need for it).
            // SAFETY: accept4 with null address arguments; the descriptor is owned below.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    // The client left before it was taken.
                    _ if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                    _ => {
                        log::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                        return;
                    }
                }
            }
            // SAFETY: a new descriptor nothing else owns.
            let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.handshakes.len() >= MAX_HANDSHAKES {
                // The oldest silent client makes room: a flood of silent ones cannot lock
                // out the rest for long.
                if let Some(&oldest) = self.handshakes.iter().min_by_key(|(_, h)| h.serial).map(|(k, _)| k) {
                    self.handshakes.remove(&oldest);
                }
            }
            let key = self.next_handshake;
            self.next_handshake += 1;
            let token = HANDSHAKE_TOKEN | (key & (HANDSHAKE_TOKEN - 1));
            if self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
                .is_ok()
            {
                self.handshakes
                    .insert(key & (HANDSHAKE_TOKEN - 1), Handshake { stream, line: Vec::new(), serial: key });
            }
        }
    }

    /// Reads a host client's first line (a byte at a time: what follows the line is the
    /// connection's data, which stays in the socket until the guest accepts).
    fn read_handshake(&mut self, key: u64, out: &mut Vec<HostEvent>) {
        let Some(hs) = self.handshakes.get_mut(&key) else { return };
        let mut byte = [0u8; 1];
        let verdict = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&hs.line)),
                Ok(_) if hs.line.len() >= MAX_HANDSHAKE => break Some(None),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
        };
        let Some(port) = verdict else { return };
        let Some(hs) = self.handshakes.remove(&key) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, hs.stream.as_raw_fd(), EpollEvent::default());
        match port {
            Some(port) => out.push(HostEvent::Connect { stream: hs.stream, port }),
            None => out.push(HostEvent::BadHandshake),
        }
    }

    /// Connects to the host listener of port `port`, `<uds_path>_<port>`, without waiting (a
    /// listener whose backlog is full refuses as one that is not there).
    pub fn connect_to_host_port(&self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&listener_path(&self.uds_path, port))
    }
}

/// Where a guest connection to host port `port` goes: `<uds_path>_<port>`.
pub fn listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// `CONNECT <port>` (Firecracker's wording; surrounding spaces and a `\r` are tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let port = text.strip_prefix("CONNECT ")?.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// A non-blocking stream connected to `path`.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation; the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe { libc::connect(owned.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_firecrackers_and_nothing_else() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT ",
            b"connect 52",
            b"CONNECT 5 2",
            b"CONNECT\t52",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn host_listeners_are_named_after_the_socket_and_the_port() {
        assert_eq!(listener_path(Path::new("/run/v.sock"), 1024), PathBuf::from("/run/v.sock_1024"));
    }
}
