//! The broker's listening socket: the exclusive lock on `PATH.lock` that makes one broker per
//! path, taking over a socket left by a broker that died, and accepting clients with their
//! kernel-reported identity. Messages go through `broker_wire::seqpacket`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::domains::Peer;
use super::error::DedupdError;
use crate::broker_wire::seqpacket;

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
        let (addr, addr_len) = seqpacket::unix_addr(path).ok_or_else(|| path_too_long(path))?;
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
        let fd = seqpacket::new_socket(true).map_err(fail("create a socket for"))?;
        // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes; `fd` is our socket.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), addr_len) };
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
    DedupdError::PathTooLong { path: path.to_path_buf(), max: seqpacket::max_path_len() }
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
