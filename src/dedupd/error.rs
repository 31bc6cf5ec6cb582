//! The broker's and its query commands' error type.

use std::io;
use std::path::PathBuf;

use crate::checked_open::HostFileError;

/// What can stop the broker from starting or serving, or a `status`/`check` query.
#[derive(Debug, thiserror::Error)]
pub enum DedupdError {
    /// The domains file cannot be read.
    #[error("cannot read domains file {path}")]
    DomainsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: HostFileError,
    },
    /// The domains file has an error.
    #[error("domains file {path}, line {line}: {reason}")]
    DomainsSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The socket path does not fit a `sockaddr_un`.
    #[error("socket path {path} is longer than {max} bytes")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// The longest path that fits.
        max: usize,
    },
    /// Another broker holds the lock of this socket.
    #[error("another broker serves {socket} (it holds {lock})")]
    AlreadyServed {
        /// The socket path.
        socket: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Something other than a socket is at the socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A system call on the socket or its lock failed.
    #[error("cannot {what} {path}")]
    Socket {
        /// What failed, e.g. "bind".
        what: &'static str,
        /// The socket or lock path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Setting up the event loop failed.
    #[error("cannot set up the broker's event loop: {what} failed")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The loop's seccomp filter could not be put in place.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Waiting for events failed.
    #[error("epoll_wait failed")]
    Wait(#[source] io::Error),
    /// A query to the broker failed.
    #[error("query to the broker at {path} failed: {what}")]
    Query {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The broker's answer does not follow the protocol.
    #[error("the broker at {path} answered out of protocol: {reason}")]
    Answer {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The broker's text is not the JSON it should be.
    #[error("the broker's answer is not the expected JSON")]
    Json(#[source] serde_json::Error),
}
