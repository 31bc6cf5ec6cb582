//! `samepage dedupd status` and `samepage dedupd check`: one STATUS or CHECK request on a new
//! connection, its TEXT pieces read until the empty one, and the JSON returned with the report
//! it holds (`main.rs` prints them; [`super::report`] renders them as text).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use super::error::DedupdError;
use super::report::{CheckReport, StatusReport};
use crate::broker_wire::proto::{self, kind, ErrorReply, Header};
use crate::broker_wire::seqpacket::{self, Received};

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
    let fd = seqpacket::connect(socket, Some(ANSWER_TIMEOUT)).map_err(fail("connect to"))?;
    let mut message = Vec::new();
    const SEQ: u32 = 1;
    proto::encode::<u8>(&mut message, request, SEQ, &[]);
    if !seqpacket::send(fd.as_raw_fd(), &message, None, true).map_err(fail("send to"))? {
        return Err(fail("send to")(io::Error::from_raw_os_error(libc::ETIMEDOUT)));
    }
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    let mut text = Vec::new();
    loop {
        let n = match seqpacket::recv(fd.as_raw_fd(), &mut buf, false, true).map_err(fail("receive from"))? {
            Received::Packet(packet) => packet.len,
            Received::Nothing => {
                return Err(fail("receive from")(io::Error::from_raw_os_error(libc::ETIMEDOUT)))
            }
            Received::Closed => {
                return Err(out_of_protocol(
                    "it closed the connection before the end of its answer".to_string(),
                ))
            }
        };
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
