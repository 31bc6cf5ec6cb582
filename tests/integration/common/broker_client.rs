//! A test-side client of the dedup broker (`samepage dedupd`), written with libc on the
//! protocol's own types: it speaks the protocol as a VMM does, and can break it as a hostile
//! VMM would (raw bytes, over-long packets, attached descriptors).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use samepage::broker_wire::proto::{
    self, kind, ErrorReply, Header, Hello, LookupEntry, ReleaseEntry, SlotReply, StatusReply, StoreEntry,
    Welcome,
};
use samepage::broker_wire::seqpacket;
use samepage::dedup::PAGE_SIZE;
use samepage::dedupd::report::StatusReport;
use vm_memory::ByteValued;

/// How long a test client waits for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A page of reproducible bytes.
pub type Page = [u8; PAGE_SIZE];

/// A page whose bytes follow from `seed`.
pub fn page(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in p.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    p
}

/// BLAKE3 of a page.
pub fn hash(p: &Page) -> [u8; 32] {
    *blake3::hash(p).as_bytes()
}

/// A STORE entry with the page's true hash.
pub fn store_entry(p: &Page) -> StoreEntry {
    StoreEntry { hash: hash(p), page: *p, ..StoreEntry::default() }
}

/// A message of `entries`.
pub fn message<T: ByteValued>(k: u16, seq: u32, entries: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode(&mut out, k, seq, entries);
    out
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Its header (zeroes if it had none).
    pub header: Header,
    /// The bytes after the header.
    pub body: Vec<u8>,
    /// Its length on the wire; 0: the broker closed the connection.
    pub len: usize,
    /// A descriptor it carried.
    pub fd: Option<OwnedFd>,
}

impl Received {
    /// The entries of a reply of kind `k` (panics on another kind).
    pub fn entries<T: ByteValued + Default>(&self, k: u16) -> Vec<T> {
        assert_eq!(self.header.kind, k, "reply {:?} (error {:?})", self.header, self.error());
        (0..self.header.count as usize).map(|i| proto::entry(&self.body, i).expect("entry")).collect()
    }

    /// The ERROR it is, if it is one.
    pub fn error(&self) -> Option<ErrorReply> {
        (self.header.kind == kind::ERROR).then(|| proto::entry(&self.body, 0).unwrap_or_default())
    }
}

/// A connection to the broker.
pub struct Client {
    fd: Arc<OwnedFd>,
    seq: u32,
}

impl Client {
    /// Connects (blocking, with a timeout on each send and receive).
    pub fn connect(path: &Path) -> io::Result<Client> {
        let fd = seqpacket::connect(path, Some(REPLY_TIMEOUT))?;
        Ok(Client { fd: Arc::new(fd), seq: 0 })
    }

    /// Another handle on the same connection (one thread sends while another receives).
    pub fn share(&self) -> Client {
        Client { fd: self.fd.clone(), seq: 0 }
    }

    /// The socket.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends raw bytes as one packet, with `attach` as SCM_RIGHTS if given.
    pub fn send_raw(&self, bytes: &[u8], attach: Option<RawFd>) -> io::Result<()> {
        match seqpacket::send(self.fd.as_raw_fd(), bytes, attach, true)? {
            true => Ok(()),
            false => Err(io::Error::from(io::ErrorKind::TimedOut)),
        }
    }

    /// Receives one message (and a descriptor it carries); `len` 0: the broker closed the
    /// connection.
    pub fn recv(&self) -> io::Result<Received> {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        let (len, fd) = match seqpacket::recv(self.fd.as_raw_fd(), &mut buf, true, true)? {
            seqpacket::Received::Packet(p) => (p.len, p.fd),
            seqpacket::Received::Closed => (0, None),
            seqpacket::Received::Nothing => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
        };
        buf.truncate(len.min(buf.len()));
        let header = proto::peek(&buf).unwrap_or_default();
        let body = buf.get(size_of::<Header>()..).unwrap_or_default().to_vec();
        Ok(Received { header, body, len, fd })
    }

    /// Sends a request and returns its reply (checking it carries the request's seq).
    pub fn request<T: ByteValued>(&mut self, k: u16, entries: &[T]) -> Received {
        self.seq = self.seq.wrapping_add(1);
        self.send_raw(&message(k, self.seq, entries), None).expect("send a request");
        let reply = self.recv().expect("receive a reply");
        assert!(reply.len > 0, "the broker closed the connection");
        assert_eq!(reply.header.seq, self.seq, "a reply carries its request's seq");
        reply
    }

    /// HELLO: the WELCOME and the store's descriptor, or the ERROR.
    pub fn hello(
        &mut self,
        domain: &str,
        label: &str,
        ram_pages: u64,
    ) -> Result<(Welcome, OwnedFd), ErrorReply> {
        let hello = Hello {
            ram_pages,
            domain: proto::name_bytes(domain).expect("domain"),
            label: proto::name_bytes(label).expect("label"),
            ..Hello::default()
        };
        let mut reply = self.request(kind::HELLO, &[hello]);
        if let Some(e) = reply.error() {
            return Err(e);
        }
        let welcome = reply.entries::<Welcome>(kind::WELCOME)[0];
        Ok((welcome, reply.fd.take().expect("WELCOME carries the store")))
    }

    /// LOOKUP of hashes.
    pub fn lookup(&mut self, hashes: &[[u8; 32]]) -> Vec<SlotReply> {
        let list: Vec<LookupEntry> = hashes.iter().map(|&hash| LookupEntry { hash }).collect();
        self.request(kind::LOOKUP, &list).entries(kind::SLOTS)
    }

    /// STORE of pages with their true hashes.
    pub fn store(&mut self, pages: &[Page]) -> Vec<SlotReply> {
        let list: Vec<StoreEntry> = pages.iter().map(store_entry).collect();
        self.request(kind::STORE, &list).entries(kind::SLOTS)
    }

    /// RELEASE of slots; the statuses.
    pub fn release(&mut self, slots: &[u64]) -> Vec<u32> {
        let list: Vec<ReleaseEntry> = slots.iter().map(|&slot| ReleaseEntry { slot }).collect();
        self.request(kind::RELEASE, &list)
            .entries::<StatusReply>(kind::RELEASED)
            .iter()
            .map(|r| r.status)
            .collect()
    }

    /// Whether the broker closed the connection (the next receive sees its end).
    pub fn closed_by_broker(&self) -> bool {
        match self.recv() {
            Ok(r) => r.len == 0,
            Err(e) => e.raw_os_error() == Some(libc::ECONNRESET),
        }
    }
}

/// A private (copy-on-write) view of a store descriptor, as a VMM maps it.
pub struct View {
    base: *mut u8,
    len: usize,
}

impl View {
    /// Maps `pages` pages of `fd` privately, readable and writable.
    pub fn new(fd: RawFd, pages: usize) -> io::Result<View> {
        let len = pages * PAGE_SIZE;
        // SAFETY: a new private mapping of a descriptor the caller holds.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(View { base: base.cast(), len })
    }

    /// A slot's bytes (the slot must lie below the store file's size).
    pub fn page(&self, slot: u64) -> Page {
        assert!((slot as usize + 1) * PAGE_SIZE <= self.len, "slot {slot} beyond the view");
        let mut p = [0u8; PAGE_SIZE];
        // SAFETY: inside our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(slot as usize * PAGE_SIZE), p.as_mut_ptr(), PAGE_SIZE)
        };
        p
    }

    /// Writes a slot's bytes in this view only (copy-on-write).
    pub fn write(&self, slot: u64, bytes: &Page) {
        assert!((slot as usize + 1) * PAGE_SIZE <= self.len, "slot {slot} beyond the view");
        // SAFETY: inside our private writable mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(slot as usize * PAGE_SIZE), PAGE_SIZE)
        };
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

// SAFETY: the mapping is only read and written through `&self` methods that copy whole
// pages; a test may hand a view to another thread.
unsafe impl Send for View {}

/// A broker started as `samepage dedupd` in a child process, killed on drop if still there.
pub struct Broker {
    /// The process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its stderr (log) file.
    pub log: PathBuf,
}

impl Broker {
    /// Starts a broker on `dir/name` (with `extra` arguments) and waits until it answers.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Broker {
        Broker::start_under(dir, name, extra, &[])
    }

    /// As [`Broker::start`], under `wrapper` (e.g. setpriv to run it as another user).
    pub fn start_under(dir: &Path, name: &str, extra: &[&str], wrapper: &[&str]) -> Broker {
        let socket = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let child = spawn_broker(&socket, &log, extra, wrapper);
        let broker = Broker { child, socket, log };
        broker.wait_ready();
        broker
    }

    /// Waits until a STATUS is answered.
    pub fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if Client::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the broker did not come up:\n{}", self.log_text());
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `samepage dedupd status --json`, parsed.
    pub fn status(&self) -> StatusReport {
        let out = super::samepage()
            .args(["dedupd", "status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("run status");
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status prints JSON")
    }

    /// `samepage dedupd check`: exit code, stdout, stderr.
    pub fn check(&self) -> (Option<i32>, String, String) {
        let out = super::samepage()
            .args(["dedupd", "check", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("run check");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }

    /// The broker's anonymous memory (RssAnon, bytes): its heap, not the store's memfd.
    pub fn rss_anon(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("RssAnon in kB");
        kib * 1024
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `samepage dedupd --socket SOCKET` (under `wrapper` if given) with its log (default
/// filter) in `log`.
pub fn spawn_broker(socket: &Path, log: &Path, extra: &[&str], wrapper: &[&str]) -> Child {
    let log = std::fs::File::create(log).expect("broker log");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_samepage"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_samepage")),
    };
    cmd.env_remove("RUST_LOG")
        .args(["dedupd", "--socket"])
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start samepage dedupd")
}

/// The command that re-runs test `name` (its full name, [`super::test_path`]) of this test
/// binary in a child process with `SAMEPAGE_DEDUPD_ROLE=role`, under `wrapper` (e.g. setpriv)
/// if given.
pub fn role_command(name: &str, role: &str, socket: &Path, wrapper: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(SOCKET_ENV, socket);
    cmd
}

/// Re-runs the calling test (`name`, its full name: [`super::test_path`]) in a child process
/// with `SAMEPAGE_DEDUPD_ROLE=role`, under `wrapper` (e.g. setpriv) if given; returns its exit
/// success and output.
pub fn run_role(name: &str, role: &str, socket: &Path, wrapper: &[&str]) -> (bool, String) {
    let out = role_command(name, role, socket, wrapper)
        .stdin(Stdio::null())
        .output()
        .expect("run the test's child role");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // A name that matches no test would run nothing and succeed.
    assert!(text.contains("running 1 test"), "the child did not run exactly the test {name}:\n{text}");
    (out.status.success(), text)
}

/// Names the role a re-run test plays.
pub const ROLE_ENV: &str = "SAMEPAGE_DEDUPD_ROLE";
/// The broker's socket, for a re-run test.
pub const SOCKET_ENV: &str = "SAMEPAGE_DEDUPD_SOCKET";

/// The role and socket of a re-run test, if this is one.
pub fn role() -> Option<(String, PathBuf)> {
    let role = std::env::var(ROLE_ENV).ok()?;
    let socket = std::env::var_os(SOCKET_ENV)?;
    Some((role, PathBuf::from(socket)))
}
