//! `samepage dedupd status` and `samepage dedupd check`: one STATUS or CHECK request on a new
//! connection, its TEXT pieces read until the empty one, and the JSON printed or summed up.

use crate::exit_code::Exit;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use super::error::DedupdError;
use super::report::{render, CheckReport, StatusReport};
use crate::broker_wire::proto::{self, kind, ErrorReply, Header};
use crate::broker_wire::seqpacket::{self, Received};

/// How long a query waits for each piece of the answer (a CHECK of a large store takes a
/// while: it hashes every stored page, a few at a time between other clients' requests).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest answer taken (a status of thousands of clients is a few MiB).
const MAX_ANSWER: usize = 64 << 20;

/// Prints the broker's figures (text, or its JSON with `json`).
pub fn status_command(socket: &Path, json: bool) -> Exit {
    let result = query(socket, kind::STATUS).and_then(|text| {
        let report: StatusReport = serde_json::from_str(&text).map_err(DedupdError::Json)?;
        Ok(if json { text } else { render(&report) })
    });
    match result {
        Ok(out) => {
            print!("{}", out.trim_end());
            println!();
            Exit::Success
        }
        Err(e) => {
            eprintln!("samepage: error: {}", crate::error_chain(&e));
            Exit::Failed
        }
    }
}

/// Asks the broker to check its stores; exits 0 if all agree, 1 with the first disagreement
/// (or the reason no check could be made) otherwise.
pub fn check_command(socket: &Path, json: bool) -> Exit {
    let result = query(socket, kind::CHECK)
        .and_then(|text| Ok((serde_json::from_str::<CheckReport>(&text).map_err(DedupdError::Json)?, text)));
    let (report, text) = match result {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("samepage: error: {}", crate::error_chain(&e));
            return Exit::Failed;
        }
    };
    if json {
        println!("{}", text.trim_end());
    } else {
        for d in &report.domains {
            let state = match (&d.error, d.dropped) {
                (Some(e), _) => format!("DISAGREES: {e}"),
                (None, true) => "dropped while checked (its last client left)".to_string(),
                (None, false) => "consistent".to_string(),
            };
            println!(
                "domain {}: {} pages checked, {} references of {} clients: {state}",
                d.name, d.pages_checked, d.references, d.clients
            );
        }
        if report.domains.is_empty() {
            println!("no domains to check");
        }
    }
    match &report.first_disagreement {
        None if report.consistent => Exit::Success,
        first => {
            let reason = first.as_deref().unwrap_or("the broker found a disagreement");
            eprintln!("samepage: check: {}", crate::escape_controls(reason));
            Exit::Failed
        }
    }
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
