//! `samepage balloon --socket PATH [--target SIZE]`: one request to a running VM's balloon
//! control socket, and its reply as text.
//!
//! Contract: a request gets one reply within [`REPLY_WITHIN`] or an error; the reply is the
//! VMM's, decoded strictly (an unknown field is an error, so a client never misreads a newer
//! VMM's reply silently).

use std::fmt::Write;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::wire::{self, Reply, Request, MAX_REPLY};
use super::BalloonMetrics;
use crate::broker_wire::seqpacket::{self, Received};

/// How long a request may wait for its reply (the VMM answers one client at a time, and
/// drops an idle one after `control::CLIENT_IDLE`).
pub const REPLY_WITHIN: Duration = Duration::from_secs(10);

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to balloon socket {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("balloon socket {}: {what} failed", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Sending or receiving.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No reply came in time, or the VMM closed the connection.
    #[error("balloon socket {}: no reply", .0.display())]
    NoReply(PathBuf),
    /// The reply was not one.
    #[error("balloon socket {}: malformed reply", .path.display())]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Sends `request` to the VM at `socket` and returns its reply.
pub fn request(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io_error = |what| {
        let path = socket.to_path_buf();
        move |source| ClientError::Io { path, what, source }
    };
    let sock = seqpacket::connect(socket, Some(REPLY_WITHIN))
        .map_err(|source| ClientError::Connect { path: socket.into(), source })?;
    if !seqpacket::send(sock.as_raw_fd(), &wire::encode_request(request), None, true)
        .map_err(io_error("send"))?
    {
        return Err(ClientError::NoReply(socket.into()));
    }
    let mut buf = vec![0u8; MAX_REPLY + 1];
    match seqpacket::recv(sock.as_raw_fd(), &mut buf, false, true).map_err(io_error("receive"))? {
        Received::Packet(p) => {
            let bytes = buf.get(..p.len.min(MAX_REPLY)).unwrap_or_default();
            wire::decode_reply(bytes).map_err(|source| ClientError::Malformed { path: socket.into(), source })
        }
        Received::Closed | Received::Nothing => Err(ClientError::NoReply(socket.into())),
    }
}

/// A size for people: MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The figures as `samepage balloon` prints them.
pub fn render(m: &BalloonMetrics) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "balloon: {}", m.options);
    let _ = writeln!(
        out,
        "  target {} of {} guest RAM; the guest says its balloon holds {}",
        mib(m.target_bytes),
        mib(m.guest_ram_bytes),
        mib(m.actual_bytes)
    );
    let d = &m.device;
    let h = &m.host;
    let page = samepage_virtio::PAGE_SIZE as u64;
    let _ = writeln!(
        out,
        "  given back: {} reported free in {} reports, {} inflated, {} deflated; host freed {} in {} ms ({} failures)",
        mib(d.reported_pages * page),
        d.reports,
        mib(d.inflated_pages * page),
        mib(d.deflated_pages * page),
        mib(h.discarded_pages * page),
        h.discard_us / 1000,
        h.discard_failures
    );
    let rejected =
        d.rejected_chains + d.invalid_pfns + d.invalid_ranges + d.stats_rejected + d.config_writes_ignored;
    let _ = writeln!(
        out,
        "  guest input refused: {rejected} (chains {}, PFNs {}, ranges {})",
        d.rejected_chains, d.invalid_pfns, d.invalid_ranges
    );
    match &m.guest_stats {
        None => {
            let _ = writeln!(out, "  guest statistics: none (stats=SECS asks for them)");
        }
        Some(s) => {
            let show = |v: Option<u64>| v.map_or("-".to_string(), mib);
            let count = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(
                out,
                "  guest statistics: total {}, free {}, available {}, caches {}; faults {} major, {} minor; OOM kills {}",
                show(s.total_memory),
                show(s.free_memory),
                show(s.available_memory),
                show(s.disk_caches),
                count(s.major_faults),
                count(s.minor_faults),
                count(s.oom_kills)
            );
        }
    }
    out
}
