//! The broker's Unix `SOCK_SEQPACKET` socket: the exclusive lock on `PATH.lock` that makes one
//! broker per path, taking over a socket left by a broker that died, accepting clients with
//! their kernel-reported identity, and one-packet receive and send (with the store's
//! descriptor as `SCM_RIGHTS`).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::domains::Peer;
use super::error::DedupdError;

/// Most supplementary groups read for a peer (the kernel's NGROUPS_MAX).
const MAX_GROUPS: usize = 65_536;
/// Pending connections the kernel queues for `accept`.
const BACKLOG: i32 = 256;

/// The lock file of a socket path: `PATH.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The lock file, locked; dropping it removes the file (before the lock goes with the
/// descriptor, so a broker that opens the file meanwhile sees it was replaced).
struct Lock {
    _file: File,
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The listening socket, with the lock that makes it this broker's. Dropping it removes the
/// socket and the lock file.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// Held (flock) for as long as the broker runs; dropped after the socket is removed.
    _lock: Lock,
}

impl Listener {
    /// Takes the lock of `path` (refusing if a live broker holds it), removes a stale socket
    /// and binds and listens at `path` with mode 0666.
    pub fn bind(path: &Path) -> Result<Listener, DedupdError> {
        let addr = sockaddr(path)?;
        let lock_path = lock_path(path);
        let lock = Lock { _file: take_lock(path, &lock_path)?, path: lock_path };
        let fail = |what| {
            let path = path.to_path_buf();
            move |source| DedupdError::Socket { what, path, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // A broker that died left it: we hold the lock, so nobody serves it.
                std::fs::remove_file(path).map_err(fail("remove the stale socket"))?;
                log::info!("took over the stale socket {}", path.display());
            }
            Ok(_) => return Err(DedupdError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("stat")(e)),
        }
        let fd = new_socket().map_err(fail("create a socket for"))?;
        // SAFETY: `addr` is a valid sockaddr_un of the given length; `fd` is our socket.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(fail("bind")(io::Error::last_os_error()));
        }
        let listener = Listener { fd, path: path.to_path_buf(), _lock: lock };
        // Anyone may connect: what a client may do is decided per domain.
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| path_too_long(path))?;
        // SAFETY: `cpath` is a valid NUL-terminated path.
        if unsafe { libc::chmod(cpath.as_ptr(), 0o666) } != 0 {
            return Err(fail("chmod 0666")(io::Error::last_os_error()));
        }
        // SAFETY: plain syscall on our socket.
        if unsafe { libc::listen(listener.fd.as_raw_fd(), BACKLOG) } != 0 {
            return Err(fail("listen on")(io::Error::last_os_error()));
        }
        Ok(listener)
    }

    /// The listening descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A pending connection (non-blocking, close-on-exec) and its peer, or `Ok(None)` when
    /// none is pending.
    pub fn accept(&self) -> io::Result<Option<(OwnedFd, Peer)>> {
        loop {
            // SAFETY: plain syscall; no peer address is asked for.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(None),
                    // The peer went away before we got to it, or a signal: try the next.
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => continue,
                    _ => return Err(e),
                }
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            match peer_of(fd.as_raw_fd()) {
                Ok(peer) => return Ok(Some((fd, peer))),
                // A connection whose identity cannot be read is not served.
                Err(e) => log::warn!("dropping a connection without credentials: {e}"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The socket first: once the lock file is gone a new broker may bind at once.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn path_too_long(path: &Path) -> DedupdError {
    let max = size_of::<libc::sockaddr_un>() - size_of::<libc::sa_family_t>() - 1;
    DedupdError::PathTooLong { path: path.to_path_buf(), max }
}

/// The `sockaddr_un` of a path (NUL-terminated; no NUL inside).
fn sockaddr(path: &Path) -> Result<libc::sockaddr_un, DedupdError> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(path_too_long(path));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall creating a new descriptor.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes `flock(LOCK_EX)` on the lock file, refusing at once if another broker holds it. A
/// lock file removed by a broker stopping between our open and our lock is opened again, so
/// two brokers never hold locks on different files of one path.
fn take_lock(socket: &Path, lock_path: &Path) -> Result<File, DedupdError> {
    let fail = |what| {
        let path = lock_path.to_path_buf();
        move |source| DedupdError::Socket { what, path, source }
    };
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(lock_path)
            .map_err(fail("open the lock file"))?;
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DedupdError::AlreadyServed {
                    socket: socket.to_path_buf(),
                    lock: lock_path.to_path_buf(),
                });
            }
            return Err(fail("lock the lock file")(e));
        }
        let held = file.metadata().map_err(fail("stat"))?;
        match std::fs::symlink_metadata(lock_path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(file),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail("stat")(e)),
        }
    }
}

/// The kernel's identity of the process at the other end of a Unix socket.
pub fn peer_of(fd: RawFd) -> io::Result<Peer> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are ours and sized for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer { pid: cred.pid, uid: cred.uid, gid: cred.gid, groups: peer_groups(fd)? })
}

fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` now says how much room the list needs.
        if e.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() || count > MAX_GROUPS {
            return Err(e);
        }
        groups.resize(count, 0);
    }
}

/// Connects to a broker (blocking, close-on-exec).
pub fn connect(path: &Path) -> Result<OwnedFd, DedupdError> {
    let addr = sockaddr(path)?;
    let fail = |what| {
        let path = path.to_path_buf();
        move |source| DedupdError::Query { what, path, source }
    };
    // SAFETY: plain syscall creating a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket")(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail("connect")(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// One received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its length on the wire (more than the buffer holds when it was too long).
    pub len: usize,
    /// It carried descriptors or other ancillary data (discarded by the kernel: we pass no
    /// room for them).
    pub ancillary: bool,
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A packet, its first `min(len, buffer)` bytes in the buffer.
    Packet(Received),
    /// The peer closed the connection (or sent an empty packet, which no message is).
    Closed,
    /// Nothing to read now.
    WouldBlock,
}

/// Receives one packet into `buf` without blocking. `MSG_TRUNC` makes the kernel report a
/// packet's full length, so an over-long packet is seen as one, not as a cut message.
pub fn recv_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is "no address, no ancillary room".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    loop {
        // SAFETY: `msg` points to `iov`, which points to `buf`; both outlive the call. With no
        // ancillary room the kernel installs no descriptor a client attaches.
        let n = unsafe {
            libc::recvmsg(fd, &mut msg, libc::MSG_TRUNC | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(Recv::WouldBlock),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(Recv::Closed);
        }
        let ancillary = msg.msg_flags & libc::MSG_CTRUNC != 0;
        return Ok(Recv::Packet(Received { len: n as usize, ancillary }));
    }
}

/// Sends one packet without blocking, with `fd` as `SCM_RIGHTS` if given. `Ok(false)` when
/// the socket's buffer is full (send again once it is writable).
pub fn send_packet(sock: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<bool> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    // Room for one cmsghdr and one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is "no address, no ancillary data".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` has `space` bytes of control room, enough for one header and one fd;
        // CMSG_FIRSTHDR returns a pointer inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    loop {
        // SAFETY: `msg` points to `iov` (which points to `bytes`) and to `control`, all alive
        // for the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
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

/// Raises the soft limit of open descriptors to the hard limit (each client is one), up to
/// `want`; returns the soft limit in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is ours to write.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let target = want.min(lim.rlim_max);
    if lim.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a valid rlimit within the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return target;
        }
    }
    lim.rlim_cur
}
