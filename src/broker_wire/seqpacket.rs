//! Unix `SOCK_SEQPACKET` sockets as the broker's protocol uses them: one message a packet,
//! at most one descriptor with it (`SCM_RIGHTS`). Connecting (with timeouts), sending and
//! receiving, waiting or not, for clients and the broker alike.
//!
//! A received packet reports its length on the wire (`MSG_TRUNC`), so an over-long packet is
//! seen as one rather than as a cut message, and whether it carried ancillary data the
//! receiver did not ask for (the kernel discards it: no descriptor is installed).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Room for one control message carrying one descriptor (8-byte aligned, as `cmsghdr` is).
type Control = [u64; 4];

/// A `sockaddr_un` for `path` and its length, or `None` when the path is empty, holds a NUL
/// or does not fit.
pub fn unix_addr(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    Some((addr, len))
}

/// The longest socket path a `sockaddr_un` holds.
pub fn max_path_len() -> usize {
    size_of::<libc::sockaddr_un>() - size_of::<libc::sa_family_t>() - 1
}

/// A new `SOCK_SEQPACKET` socket (close-on-exec; non-blocking if asked).
pub fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain syscall creating a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the socket at `path` (blocking); with `timeout`, each later send and receive
/// that waits gives up after it (`EAGAIN`).
pub fn connect(path: &Path, timeout: Option<Duration>) -> io::Result<OwnedFd> {
    let (addr, len) = unix_addr(path).ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    let sock = new_socket(false)?;
    if let Some(timeout) = timeout {
        set_timeout(&sock, timeout)?;
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::connect(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Sets the send and receive timeouts of a socket.
pub fn set_timeout(sock: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends one packet, with `attach` as `SCM_RIGHTS` if given. With `wait`, a full socket
/// buffer is waited on (up to the socket's timeout); without, not at all. `Ok(false)`: not
/// sent, the buffer is full (or the timeout passed).
pub fn send(sock: RawFd, bytes: &[u8], attach: Option<RawFd>, wait: bool) -> io::Result<bool> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    let mut control: Control = [0; 4];
    // SAFETY: msghdr is plain data; zeroed is "no address, no ancillary data".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = attach {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` has `space` bytes of control room, enough for one header and one
        // descriptor; CMSG_FIRSTHDR returns a pointer inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
    loop {
        // SAFETY: `msg` points to `iov` (which points to `bytes`) and to `control`, all alive
        // for the call.
        let n = unsafe { libc::sendmsg(sock, &msg, flags) };
        if n >= 0 {
            // A SOCK_SEQPACKET send is all or nothing.
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    /// Its length on the wire (more than the buffer holds when it was too long).
    pub len: usize,
    /// It carried descriptors or other ancillary data that were not asked for (the kernel
    /// discarded them).
    pub ancillary: bool,
    /// The descriptor it carried, when one was asked for.
    pub fd: Option<OwnedFd>,
}

/// What a receive found.
#[derive(Debug)]
pub enum Received {
    /// A packet; its first `min(len, buffer)` bytes are in the buffer.
    Packet(Packet),
    /// The peer closed the connection (or sent an empty packet, which no message is).
    Closed,
    /// Nothing came: nothing waiting (without `wait`), or the socket's timeout passed.
    Nothing,
}

/// Receives one packet into `buf`. With `take_fd`, a descriptor it carries is taken (any
/// more are closed); without, none is installed. With `wait`, waits up to the socket's
/// timeout; without, not at all.
pub fn recv(sock: RawFd, buf: &mut [u8], take_fd: bool, wait: bool) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control: Control = [0; 4];
    // SAFETY: msghdr is plain data; zeroed is "no address, no ancillary room".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if take_fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
    }
    let flags = libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC | if wait { 0 } else { libc::MSG_DONTWAIT };
    let n = loop {
        // SAFETY: `msg` points to `iov` (which points to `buf`) and to `control`, both alive
        // for the call and of the sizes given. Without control room the kernel installs no
        // descriptor the peer attached.
        let n = unsafe { libc::recvmsg(sock, &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(Received::Nothing),
            _ => return Err(e),
        }
    };
    let fd = if take_fd { take_descriptors(&msg) } else { None };
    if n == 0 {
        return Ok(Received::Closed);
    }
    let ancillary = !take_fd && msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok(Received::Packet(Packet { len: n, ancillary, fd }))
}

/// Takes every descriptor a received message carried (so that none leaks); returns the first.
fn take_descriptors(msg: &libc::msghdr) -> Option<OwnedFd> {
    let mut first = None;
    // SAFETY: walks the control buffer recvmsg filled, with the libc macros.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` points into the control buffer, as CMSG_FIRSTHDR/NXTHDR return.
        let (level, ty, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: as above; the data is an array of ints of the length given.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const libc::c_int;
            // SAFETY: CMSG_LEN(0) is the header's size.
            let count = (len - unsafe { libc::CMSG_LEN(0) } as usize) / size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: inside the control message; each is a descriptor we now own.
                let owned = unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) };
                if first.is_none() {
                    first = Some(owned);
                }
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: plain syscall writing two descriptors into our array.
        let rc = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        assert_eq!(rc, 0);
        // SAFETY: two new descriptors that nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn packets_keep_their_bounds_their_real_length_and_one_descriptor() {
        let (a, b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(send(a.as_raw_fd(), b"hello", Some(file.as_raw_fd()), true).unwrap());
        assert!(send(a.as_raw_fd(), &[7u8; 100], None, true).unwrap());
        let mut buf = [0u8; 16];
        let Received::Packet(p) = recv(b.as_raw_fd(), &mut buf, true, true).unwrap() else { panic!() };
        assert_eq!((p.len, &buf[..5], p.fd.is_some()), (5, &b"hello"[..], true));
        let Received::Packet(p) = recv(b.as_raw_fd(), &mut buf, false, true).unwrap() else { panic!() };
        assert_eq!(p.len, 100, "an over-long packet reports its length on the wire");
        assert!(matches!(recv(b.as_raw_fd(), &mut buf, false, false).unwrap(), Received::Nothing));
        // A descriptor not asked for is not installed, but seen.
        assert!(send(a.as_raw_fd(), b"x", Some(file.as_raw_fd()), true).unwrap());
        let Received::Packet(p) = recv(b.as_raw_fd(), &mut buf, false, true).unwrap() else { panic!() };
        assert!(p.ancillary && p.fd.is_none());
        drop(a);
        assert!(matches!(recv(b.as_raw_fd(), &mut buf, false, true).unwrap(), Received::Closed));
    }

    #[test]
    fn a_receive_with_a_timeout_gives_up() {
        let (a, b) = pair();
        set_timeout(&b, Duration::from_millis(50)).unwrap();
        let t = std::time::Instant::now();
        assert!(matches!(recv(b.as_raw_fd(), &mut [0u8; 4], false, true).unwrap(), Received::Nothing));
        assert!(t.elapsed() >= Duration::from_millis(40));
        drop(a);
    }
}
