//! Clients whose connection closed while their process lives on (`docs/dedupd.md`, "Faults").
//!
//! Closing a connection does not unmap anything: a VMM that gave up on a slow broker, or a
//! client that closes its socket on purpose, may still map every slot it held. If the broker
//! dropped those references, it would punch the pages (the guest reads zeros) and give the
//! slots to other clients (the guest reads their bytes). So a departed client's references
//! and pins stay until its process has exited, which a pidfd of it tells: the kernel's
//! `SO_PEERPIDFD` for the connection (no pid-reuse race), else `pidfd_open` of its pid. Only
//! then do its references drop, a step at a time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::domains::Peer;
use crate::dedup::words::HolderId;

/// `SO_PEERPIDFD` (Linux 6.5+; x86_64 and most architectures): a pidfd of the peer that
/// connected. The libc crate does not name it.
const SO_PEERPIDFD: libc::c_int = 77;

/// A departed client's holder, kept until its process exits.
#[derive(Debug)]
pub struct Departed {
    /// Its domain.
    pub domain: String,
    /// Its holder in the domain's store.
    pub holder: HolderId,
    /// Its VM's name.
    pub label: String,
    /// Who it was.
    pub peer: Peer,
    /// A pidfd of its process: readable once the process has exited.
    pub process: OwnedFd,
    /// When its connection closed.
    pub since: Instant,
}

/// A pidfd of the process at the other end of a connected Unix socket: `SO_PEERPIDFD`, else
/// `pidfd_open(pid)` (which another process could have taken over if the peer exited before
/// this call: then the holder is kept until that one exits too, which errs on the safe side).
/// `None` when neither works (the process is gone).
pub fn peer_process(sock: RawFd, pid: i32) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are ours and sized for an int option.
    let rc = unsafe {
        libc::getsockopt(sock, libc::SOL_SOCKET, SO_PEERPIDFD, std::ptr::from_mut(&mut fd).cast(), &mut len)
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel installed a new descriptor for us.
        return Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: plain syscall; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        log::debug!("no pidfd of pid {pid}: {}", io::Error::last_os_error());
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process of a pidfd has exited (its pidfd polls readable).
pub fn has_exited(process: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd { fd: process.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd of ours; a zero timeout does not block.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}
