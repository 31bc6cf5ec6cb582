//! One connection to the broker (`docs/dedupd.md`): connecting and saying HELLO, the store's
//! descriptor WELCOME sends and its read-only view, and one request's send and receive with
//! the answer's deadline. `broker_client.rs` keeps what is held through it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::error::BrokerClientError;
use super::words::{Slot, PAGE_SIZE};
use crate::broker_wire::proto::{self, kind};
use crate::broker_wire::seqpacket::{self, Received};

/// How long a request may wait for the broker's answer (the guest's vCPUs wait as long).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Most slots a broker may announce (2^28: 1 TiB of address space in the view mapping).
pub(crate) const MAX_SLOTS: u64 = 1 << 28;

/// Where and as what to join the broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// The broker's socket.
    pub socket: PathBuf,
    /// The domain to join (`None`: the user's own).
    pub domain: Option<String>,
    /// The VM's name, for `samepage dedupd status`.
    pub label: String,
    /// Pages of guest RAM (the most references this VMM may hold).
    pub ram_pages: u64,
}

/// An open connection and the store it gave.
pub(crate) struct Connection {
    pub(crate) sock: OwnedFd,
    /// The store, read-only.
    pub(crate) store: File,
    view: *const u8,
    /// Slots the store may hold (the view maps them all).
    pub(crate) max_slots: u64,
    /// The domain joined.
    pub(crate) domain: String,
    /// A request whose answer did not come in time: nothing else is sent until it does.
    pub(crate) overdue: Option<Overdue>,
}

/// A request sent and not answered in time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Overdue {
    /// Its seq.
    pub(crate) seq: u32,
    /// Its kind.
    pub(crate) kind: u16,
    /// When it was sent.
    pub(crate) since: Instant,
}

// SAFETY: `view` is a read-only mapping owned by this connection alone; moving the connection
// to another thread moves that ownership with it.
unsafe impl Send for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the view mapping made in `connect`, used by nothing else.
        unsafe { libc::munmap(self.view as *mut libc::c_void, self.max_slots as usize * PAGE_SIZE) };
    }
}

impl Connection {
    /// The bytes of `slot` as the store holds them (a slot below `max_slots`; the caller reads
    /// only slots it holds a reference on, which the broker filled before it gave them out).
    pub(crate) fn page(&self, slot: Slot) -> Option<&[u8]> {
        if u64::from(slot) >= self.max_slots {
            return None;
        }
        // SAFETY: inside the view mapping of `max_slots` pages; the broker does not write a
        // slot while someone holds a reference on it.
        Some(unsafe { std::slice::from_raw_parts(self.view.add(slot as usize * PAGE_SIZE), PAGE_SIZE) })
    }
}

/// Connects, says HELLO and maps the store WELCOME sends.
pub(crate) fn connect(
    config: &BrokerConfig,
    out: &mut Vec<u8>,
    input: &mut [u8],
) -> Result<Connection, BrokerClientError> {
    let sock = seqpacket::connect(&config.socket, Some(ANSWER_WITHIN))
        .map_err(|source| BrokerClientError::Io { what: "connect", path: config.socket.clone(), source })?;
    let hello = proto::Hello {
        ram_pages: config.ram_pages,
        domain: proto::name_bytes(config.domain.as_deref().unwrap_or(""))
            .ok_or_else(|| BrokerClientError::Name(config.domain.clone().unwrap_or_default()))?,
        label: proto::name_bytes(&config.label)
            .ok_or_else(|| BrokerClientError::Name(config.label.clone()))?,
        ..proto::Hello::default()
    };
    proto::encode(out, kind::HELLO, 0, &[hello]);
    let mut fd: Option<OwnedFd> = None;
    let len = exchange(sock.as_raw_fd(), out, input, Some(&mut fd)).map_err(|e| match e {
        BrokerClientError::Io { what, source, .. } => {
            BrokerClientError::Io { what, path: config.socket.clone(), source }
        }
        other => other,
    })?;
    let header = proto::peek(&input[..len]).ok_or(BrokerClientError::Protocol("short reply"))?;
    if header.kind == kind::ERROR {
        let (_, body) = proto::decode(&input[..len], size_of::<proto::ErrorReply>())
            .map_err(|_| BrokerClientError::Protocol("undecodable error"))?;
        let e: proto::ErrorReply = proto::entry(body, 0).unwrap_or_default();
        return Err(BrokerClientError::Refused { code: e.code, detail: e.detail });
    }
    let (header, body) = proto::decode(&input[..len], size_of::<proto::Welcome>())
        .map_err(|_| BrokerClientError::Protocol("undecodable WELCOME"))?;
    let welcome: proto::Welcome =
        proto::entry(body, 0).ok_or(BrokerClientError::Protocol("empty WELCOME"))?;
    if header.kind != kind::WELCOME || welcome.page_size as usize != PAGE_SIZE {
        return Err(BrokerClientError::Protocol("not a WELCOME for 4 KiB pages"));
    }
    if welcome.max_slots == 0 || welcome.max_slots > MAX_SLOTS {
        return Err(BrokerClientError::Protocol("store size out of range"));
    }
    let store = File::from(fd.ok_or(BrokerClientError::Protocol("WELCOME without the store"))?);
    let bytes = welcome.max_slots as usize * PAGE_SIZE;
    // SAFETY: a new read-only shared mapping of the store at an address the kernel chooses;
    // pages are read only for slots the broker gave out (inside the file).
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            store.as_raw_fd(),
            0,
        )
    };
    if view == libc::MAP_FAILED {
        return Err(BrokerClientError::Io {
            what: "mmap of the store",
            path: config.socket.clone(),
            source: io::Error::last_os_error(),
        });
    }
    let domain = proto::name_str(&welcome.domain).unwrap_or("?").to_string();
    Ok(Connection {
        sock,
        store,
        view: view as *const u8,
        max_slots: welcome.max_slots,
        domain,
        overdue: None,
    })
}

/// Sends one request, waiting up to [`ANSWER_WITHIN`] for room; `Ok(false)`: not sent.
pub(crate) fn send(sock: RawFd, message: &[u8]) -> Result<bool, BrokerClientError> {
    seqpacket::send(sock, message, None, true).map_err(|source| BrokerClientError::Io {
        what: "send",
        path: PathBuf::new(),
        source,
    })
}

/// Receives one reply into `input` (waiting up to [`ANSWER_WITHIN`] with `wait`, else not
/// at all); with `fd`, takes the descriptor it carries. `Ok(None)`: nothing came.
pub(crate) fn receive(
    sock: RawFd,
    input: &mut [u8],
    fd: Option<&mut Option<OwnedFd>>,
    wait: bool,
) -> Result<Option<usize>, BrokerClientError> {
    let received = seqpacket::recv(sock, input, fd.is_some(), wait)
        .map_err(|source| BrokerClientError::Io { what: "recv", path: PathBuf::new(), source })?;
    match received {
        Received::Packet(packet) if packet.len > input.len() => {
            Err(BrokerClientError::Protocol("reply longer than any the protocol allows"))
        }
        Received::Packet(packet) => {
            if let Some(slot) = fd {
                *slot = packet.fd;
            }
            Ok(Some(packet.len))
        }
        Received::Nothing => Ok(None),
        Received::Closed => Err(BrokerClientError::Protocol("the broker closed the connection")),
    }
}

/// Sends `message` and receives one reply into `input`; with `fd`, takes the descriptor it
/// carries. No reply within [`ANSWER_WITHIN`] is an error.
fn exchange(
    sock: RawFd,
    message: &[u8],
    input: &mut [u8],
    fd: Option<&mut Option<OwnedFd>>,
) -> Result<usize, BrokerClientError> {
    let timed_out = |what| BrokerClientError::Io {
        what,
        path: PathBuf::new(),
        source: io::Error::from_raw_os_error(libc::ETIMEDOUT),
    };
    if !send(sock, message)? {
        return Err(timed_out("send"));
    }
    receive(sock, input, fd, true)?.ok_or_else(|| timed_out("recv"))
}
