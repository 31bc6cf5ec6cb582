//! `samepage dedupd status` and `samepage dedupd check`: one STATUS or CHECK request on a new
//! connection, its TEXT pieces read until the empty one, and the JSON returned with the report
//! it holds (`main.rs` prints them; [`super::report`] renders them as text).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::error::DedupdError;
use super::report::{CheckReport, StatusReport};
use crate::dedup::proto::{self, kind, ErrorReply, Header};

/// How long a query waits for each piece of the answer (a CHECK of a large store takes a
/// while: it hashes every stored page, a few at a time between other clients' requests).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest answer taken (a status of thousands of clients is a few MiB).
const MAX_ANSWER: usize = 64 << 20;

/// A query's answer: the report, and the broker's JSON it was read from.
#[derive(Debug, Clone)]
pub struct Answer<R> {
    /// What the broker said.
    pub report: R,
    /// How it said it (`--json` prints this).
    pub json: String,
}

/// Asks the broker for its figures (STATUS).
pub fn status(socket: &Path) -> Result<Answer<StatusReport>, DedupdError> {
    let json = query(socket, kind::STATUS)?;
    Ok(Answer { report: serde_json::from_str(&json).map_err(DedupdError::Json)?, json })
}

/// Asks the broker to check its stores (CHECK): every stored page against its hash, every
/// reference count against its holders.
pub fn check(socket: &Path) -> Result<Answer<CheckReport>, DedupdError> {
    let json = query(socket, kind::CHECK)?;
    Ok(Answer { report: serde_json::from_str(&json).map_err(DedupdError::Json)?, json })
}

/// Sends a STATUS or CHECK and returns the text of the answer.
pub fn query(socket: &Path, request: u16) -> Result<String, DedupdError> {
    let fail = |what| move |source| DedupdError::Query { path: socket.to_path_buf(), what, source };
    let out_of_protocol = |reason: String| DedupdError::Answer { path: socket.to_path_buf(), reason };
    let fd = super::socket::connect(socket)?;
    set_timeout(&fd, ANSWER_TIMEOUT).map_err(fail("set a timeout on"))?;
    let mut message = Vec::new();
    const SEQ: u32 = 1;
    proto::encode::<u8>(&mut message, request, SEQ, &[]);
    send_blocking(&fd, &message).map_err(fail("send to"))?;
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    let mut text = Vec::new();
    loop {
        let n = recv_blocking(&fd, &mut buf).map_err(fail("receive from"))?;
        if n == 0 {
            return Err(out_of_protocol("it closed the connection before the end of its answer".to_string()));
        }
        let piece = &buf[..n.min(buf.len())];
        let header = proto::peek(piece).unwrap_or_default();
        if header.kind == kind::ERROR {
            let (_, body) =
                proto::decode(piece, size_of::<ErrorReply>()).map_err(|e| out_of_protocol(e.to_string()))?;
            let error = proto::entry::<ErrorReply>(body, 0).unwrap_or_default();
            return Err(out_of_protocol(format!("ERROR {} (detail {})", error.code, error.detail)));
        }
        let (h, body): (Header, &[u8]) =
            proto::decode(piece, 1).map_err(|e| out_of_protocol(e.to_string()))?;
        if h.kind != kind::TEXT || h.seq != SEQ {
            return Err(out_of_protocol(format!("message of kind {:#x}, seq {}", h.kind, h.seq)));
        }
        if body.is_empty() {
            break;
        }
        if text.len() + body.len() > MAX_ANSWER {
            return Err(out_of_protocol(format!("an answer longer than {MAX_ANSWER} bytes")));
        }
        text.extend_from_slice(body);
    }
    String::from_utf8(text).map_err(|_| out_of_protocol("text that is not UTF-8".to_string()))
}

fn set_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
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

/// Sends one packet, waiting at most the socket's timeout.
fn send_blocking(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `bytes` is valid for `bytes.len()` bytes.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Receives one packet, waiting at most the socket's timeout; its length on the wire.
fn recv_blocking(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` has room for `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}
