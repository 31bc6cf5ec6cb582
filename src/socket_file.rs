//! The file of a Unix socket a samepage process serves: its path claimed (a socket file a dead
//! process left is removed, a live one (something answers on it) or a file that is not a
//! socket is left alone and refused), and the socket bound there with mode 0600 before it
//! listens, so that no connection is ever taken at a wider mode. The balloon's control socket
//! and the API socket use it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::broker_wire::seqpacket;

/// Why a socket path cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    /// Something that is not a socket is at the path: it is not removed.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Another process answers on the socket.
    #[error("{} is in use: another process serves it", .0.display())]
    InUse(PathBuf),
    /// The path does not fit a `sockaddr_un` (or holds a NUL).
    #[error("socket path {} is empty, holds a NUL or is longer than {} bytes", .0.display(), seqpacket::max_path_len())]
    Path(PathBuf),
    /// Looking at, probing, removing or binding the path failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Makes `path` free to bind: nothing there, or a socket nobody answers on (`connect`, a
/// probe of the socket's own type, is refused), which is removed. Returns whether one was.
pub fn claim(path: &Path, connect: impl FnOnce(&Path) -> io::Result<()>) -> Result<bool, SocketFileError> {
    let fail = |what| {
        let path = path.to_path_buf();
        move |source| SocketFileError::Io { what, path, source }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match connect(path) {
            Ok(()) => Err(SocketFileError::InUse(path.into())),
            // A process that died left it: nobody listens.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path).map_err(fail("remove the stale socket"))?;
                Ok(true)
            }
            Err(e) => Err(fail("probe the existing socket")(e)),
        },
        Ok(_) => Err(SocketFileError::NotASocket(path.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fail("look at")(e)),
    }
}

/// A new socket of `kind` (`SOCK_STREAM` or `SOCK_SEQPACKET`; close-on-exec, non-blocking)
/// bound at `path` (claim it first), mode 0600, listening with `backlog`. On failure the file
/// is removed again.
pub fn bind_private(path: &Path, kind: libc::c_int, backlog: i32) -> Result<OwnedFd, SocketFileError> {
    let (addr, addr_len) = seqpacket::unix_addr(path).ok_or_else(|| SocketFileError::Path(path.into()))?;
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| SocketFileError::Path(path.into()))?;
    let fail = |what| {
        let path = path.to_path_buf();
        move |source| SocketFileError::Io { what, path, source }
    };
    // SAFETY: plain syscall creating a new descriptor.
    let raw = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if raw < 0 {
        return Err(fail("create a socket for")(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes; `fd` is our socket.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), addr_len) } != 0 {
        return Err(fail("bind")(io::Error::last_os_error()));
    }
    let listening = (|| {
        // SAFETY: `cpath` is a valid NUL-terminated path.
        if unsafe { libc::chmod(cpath.as_ptr(), 0o600) } != 0 {
            return Err(fail("chmod 0600")(io::Error::last_os_error()));
        }
        // SAFETY: plain syscall on our socket.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(fail("listen on")(io::Error::last_os_error()));
        }
        Ok(())
    })();
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn stale_sockets_go_live_ones_and_other_files_stay() {
        let dir = std::env::temp_dir().join(format!("samepage-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s");
        let probe = |p: &Path| UnixStream::connect(p).map(drop);
        assert!(!claim(&path, probe).expect("free"));
        let live = UnixListener::bind(&path).expect("bind");
        assert!(matches!(claim(&path, probe), Err(SocketFileError::InUse(_))));
        drop(live);
        assert!(claim(&path, probe).expect("stale"), "a socket nobody listens on is taken over");
        assert!(!path.exists());
        std::fs::write(&path, b"x").expect("file");
        assert!(matches!(claim(&path, probe), Err(SocketFileError::NotASocket(_))));
        assert!(path.exists(), "a file that is not a socket is left alone");
        std::fs::remove_file(&path).expect("remove");
        let fd = bind_private(&path, libc::SOCK_STREAM, 1).expect("bind");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777, 0o600);
        let listener = UnixListener::from(fd);
        let _client = UnixStream::connect(&path).expect("connect");
        assert!(listener.accept().is_ok());
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
