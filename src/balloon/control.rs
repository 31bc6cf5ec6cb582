//! The balloon control socket (`run --balloon-socket PATH`): a Unix `SOCK_SEQPACKET` socket,
//! mode 0600 (its owner and root may connect), served by a thread of its own under its own
//! seccomp filter, one client at a time. Each request (`wire.rs`) gets one reply; a client
//! idle for [`CLIENT_IDLE`] is dropped, so it cannot hold the socket.
//!
//! Contract: the socket is bound while the VM is built (before any filter), served while the
//! VM runs and removed when the thread ends (or the VM fails to start). A socket file left by a VMM that died is taken
//! over; a live one (something answers on it) or a file that is not a socket is an error.
//! Client input is hostile: see [`answer`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::wire::{self, Reply, Request, MAX_REQUEST};
use super::{HostCounters, VmBalloon};
use crate::broker_wire::seqpacket::{self, Received};
use crate::seccomp::ThreadKind;

/// How long a connected client may stay silent before it is dropped.
pub const CLIENT_IDLE: Duration = Duration::from_secs(5);
/// Pending connections the kernel queues.
const BACKLOG: i32 = 8;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path does not fit a `sockaddr_un` (or holds a NUL).
    #[error("balloon socket path {} is empty, holds a NUL or is longer than {} bytes", .0.display(), seqpacket::max_path_len())]
    Path(PathBuf),
    /// Something that is not a socket is at the path: it is not removed.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Another process answers on the socket.
    #[error("{} is in use: another VM serves it", .0.display())]
    InUse(PathBuf),
    /// A system call on the socket failed.
    #[error("cannot {what} balloon socket {}", .path.display())]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The thread could not start under its filter.
    #[error(transparent)]
    Thread(#[from] crate::seccomp::SeccompError),
    /// The path could not be looked at, a stale socket there removed, or the socket bound.
    #[error(transparent)]
    Claim(crate::socket_file::SocketFileError),
    /// Its stop eventfd could not be made.
    #[error("cannot create the balloon socket's stop eventfd")]
    StopEvent(#[source] io::Error),
}

/// The bound, listening control socket of a VM.
pub struct ControlSocket {
    fd: OwnedFd,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds and listens at `path` with mode 0600, taking over a socket nobody answers on.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        use crate::socket_file::{self as socket_file, SocketFileError};
        let probe = |p: &Path| seqpacket::connect(p, Some(Duration::from_secs(1))).map(drop);
        let bound = socket_file::claim(path, probe).and_then(|stale| {
            if stale {
                log::info!("took over the stale balloon socket {}", path.display());
            }
            // Mode 0600 before it listens: the balloon's target is the VM owner's to set.
            socket_file::bind_private(path, libc::SOCK_SEQPACKET, BACKLOG)
        });
        match bound {
            Ok(fd) => Ok(ControlSocket { fd, path: path.to_path_buf() }),
            Err(SocketFileError::InUse(path)) => Err(ControlError::InUse(path)),
            Err(SocketFileError::NotASocket(path)) => Err(ControlError::NotASocket(path)),
            Err(SocketFileError::Path(path)) => Err(ControlError::Path(path)),
            Err(e) => Err(ControlError::Claim(e)),
        }
    }

    /// Serves the socket on a thread of its own (under its seccomp filter) until stopped.
    pub fn spawn(self, balloon: VmBalloon) -> Result<ControlThread, ControlError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ControlError::StopEvent)?;
        let stop_fd = stop.try_clone().map_err(ControlError::StopEvent)?;
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let thread = crate::seccomp::spawn("balloon".into(), ThreadKind::BalloonControl, move || {
            let _done = done_tx;
            serve(&self, &balloon, &stop_fd);
            // The socket file goes with the thread (`Drop`): nothing answers on it any more.
            drop(self);
        })?;
        Ok(ControlThread { stop, thread, done })
    }
}

impl Drop for ControlSocket {
    /// Removes the socket file: nothing answers on it any more (a VM that failed to start, or
    /// the control thread at its end).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The running control thread.
pub struct ControlThread {
    stop: EventFd,
    thread: JoinHandle<()>,
    done: Receiver<()>,
}

impl ControlThread {
    /// Asks the thread to end and waits for it until `deadline`; false if it did not end.
    pub fn stop(self, deadline: Instant) -> bool {
        let _ = self.stop.write(1);
        match self.done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = self.thread.join();
                true
            }
        }
    }
}

/// Serves `socket` for `balloon` when the VM has both (`run --balloon-socket`): the running
/// thread, or `None` without a socket.
pub fn serve_if_bound(
    socket: Option<ControlSocket>,
    balloon: Option<&VmBalloon>,
) -> Result<Option<ControlThread>, ControlError> {
    match (socket, balloon) {
        (Some(socket), Some(balloon)) => socket.spawn(balloon.clone()).map(Some),
        _ => Ok(None),
    }
}

/// Stops `control`, if there is one, waiting until `deadline`; false if it did not end.
pub fn stop_if_running(control: Option<ControlThread>, deadline: Instant) -> bool {
    control.is_none_or(|thread| thread.stop(deadline))
}

/// What `poll` found.
enum Ready {
    /// The descriptor is readable (or hung up).
    Fd,
    /// The stop eventfd was written.
    Stop,
    /// The timeout passed.
    Timeout,
}

/// Waits until `fd` is readable, the VM stops or `timeout` passes (`None`: no timeout).
fn wait(fd: RawFd, stop: &EventFd, timeout: Option<Duration>) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if fds[1].revents != 0 {
            Ready::Stop
        } else if fds[0].revents != 0 {
            Ready::Fd
        } else {
            Ready::Timeout
        });
    }
}

/// Accepts and serves clients, one at a time, until stopped.
fn serve(socket: &ControlSocket, balloon: &VmBalloon, stop: &EventFd) {
    loop {
        match wait(socket.fd.as_raw_fd(), stop, None) {
            Ok(Ready::Fd) => {}
            Ok(Ready::Timeout) => continue,
            Ok(Ready::Stop) => return,
            Err(e) => {
                log::error!("balloon socket {}: poll failed, no longer served: {e}", socket.path.display());
                return;
            }
        }
        // SAFETY: plain syscall; no peer address is asked for.
        let fd = unsafe {
            libc::accept4(
                socket.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            // The client left before we took it, or nothing is pending after all.
            continue;
        }
        // SAFETY: a new descriptor that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(fd) };
        if !serve_client(&client, balloon, stop) {
            return;
        }
    }
}

/// Answers one client's requests until it leaves, stays idle too long or misbehaves; false
/// when the VM stops meanwhile.
fn serve_client(client: &OwnedFd, balloon: &VmBalloon, stop: &EventFd) -> bool {
    // One byte more than a request may have: a longer packet shows as one (MSG_TRUNC).
    let mut buf = [0u8; MAX_REQUEST + 1];
    loop {
        match wait(client.as_raw_fd(), stop, Some(CLIENT_IDLE)) {
            Ok(Ready::Fd) => {}
            Ok(Ready::Stop) => return false,
            Ok(Ready::Timeout) | Err(_) => return true,
        }
        let packet = match seqpacket::recv(client.as_raw_fd(), &mut buf, false, false) {
            Ok(Received::Packet(p)) => p,
            Ok(Received::Nothing) => continue,
            Ok(Received::Closed) | Err(_) => return true,
        };
        let reply = answer(balloon, &buf, packet.len, packet.ancillary);
        // Without waiting: a client that does not read its replies is dropped.
        if !matches!(seqpacket::send(client.as_raw_fd(), &wire::encode_reply(&reply), None, false), Ok(true))
        {
            return true;
        }
    }
}

/// The reply to one request of `len` bytes on the wire (the first of them in `buf`).
/// Malformed requests and refused targets are counted and logged sparsely; every reply but
/// one to an unreadable request carries the figures after it.
pub fn answer(balloon: &VmBalloon, buf: &[u8], len: usize, ancillary: bool) -> Reply {
    let host = balloon.host_counters();
    HostCounters::add(&host.control_requests, 1);
    let refuse = |why: String| {
        let n = HostCounters::add(&host.control_rejected, 1);
        if n.is_power_of_two() {
            log::warn!("balloon socket: request refused: {why} ({n} refused)");
        }
        Reply { error: Some(why), balloon: Some(balloon.metrics()) }
    };
    match wire::decode_request(buf, len, ancillary) {
        Err(e) => refuse(e.to_string()),
        Ok(Request::Status {}) => Reply { error: None, balloon: Some(balloon.metrics()) },
        Ok(Request::SetTarget { bytes }) => match balloon.set_target(bytes) {
            Ok(()) => {
                HostCounters::add(&host.target_changes, 1);
                log::info!("balloon: target set to {} KiB", bytes >> 10);
                Reply { error: None, balloon: Some(balloon.metrics()) }
            }
            Err(e) => refuse(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests;
