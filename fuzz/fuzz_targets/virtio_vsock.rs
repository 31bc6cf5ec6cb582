//! virtio-vsock end to end: a hostile driver's transmit packets (any header, any data layout,
//! faulty chains), receive buffers of any shape, and host clients of the device's Unix socket
//! that connect, send, leave or never finish their `CONNECT` line, in any order, served by
//! `Vsock` with real sockets in a temporary directory (one listener on host port 6000).
//!
//! What must hold whatever comes: no panic; at most `MAX_CONNECTIONS` connections; no more
//! than the credit buffered for a host socket; every receive chain returned at most once, with
//! a used length that fits it and a header the device wrote: from the host's CID to the
//! guest's, a stream packet, a known operation, and a length field equal to the data the used
//! length says.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{apply_faults, counted, guest_memory, linked, read_bytes, ChainFault, Part, Ring};
use samepage_virtio::vsock::wire::{HOST_CID, TYPE_STREAM};
use samepage_virtio::vsock::{host_side, Vsock, BUF_ALLOC, MAX_CONNECTIONS, RX_QUEUE, TX_QUEUE};
use samepage_virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;

const RAM_END: u64 = 0x40_0000;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const RX_INDIRECT: (u64, u64) = (0x1_0000, 0x1_8000);
const TX_INDIRECT: (u64, u64) = (0x1_8000, 0x2_0000);
const RX_BUFS: u64 = 0x2_0000;
const TX_BUFS: u64 = 0x20_0000;
const GUEST_CID: u64 = 3;
const HEADER: usize = 44;

#[derive(Arbitrary, Debug)]
struct Input {
    #[arbitrary(with = counted::<_, 1, 64>)]
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The guest sends a packet.
    Tx(Packet),
    /// The guest gives receive buffers.
    Rx { count: u8, len: u16, split: bool, readable: bool },
    /// A host client connects and says `CONNECT <port>` (or something else).
    HostConnect { port: u8, garbage: bool, finish_line: bool },
    /// A host client sends bytes.
    HostWrite { client: u8, len: u16 },
    /// A host client leaves.
    HostClose { client: u8 },
    /// The host listener of port 6000 takes its next connection and sends to it.
    ListenerAccept { len: u16 },
}

#[derive(Arbitrary, Debug)]
struct Packet {
    /// 0..=223 the guest's CID, else `src_cid` as given.
    cid_roll: u8,
    src_cid: u64,
    /// 0..=223 the host's CID, else `dst_cid`.
    dst_roll: u8,
    dst_cid: u64,
    guest_port: u8,
    /// Ports the device hands out to host clients, 6000, 6001, or any.
    host_port_roll: u8,
    host_port: u32,
    type_roll: u8,
    op: u8,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    data_len: u16,
    /// The header field `len`: the data's length, or this.
    len_lies: Option<u32>,
    one_descriptor: bool,
    indirect: bool,
    fault_roll: u8,
    faults: Vec<ChainFault>,
}

/// A receive chain the guest gave: head index, header address, capacity.
struct RxChain {
    head: u16,
    header: u64,
    capacity: u32,
    returned: bool,
}

static RUN: AtomicU64 = AtomicU64::new(0);

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("samepage-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Vsock,
    uds: PathBuf,
    rx_ring: Ring,
    tx_ring: Ring,
    rx: virtio_queue::Queue,
    tx: virtio_queue::Queue,
    rx_chains: Vec<RxChain>,
    rx_slot: u16,
    rx_seen: u16,
    tx_added: u16,
    tx_slot: u16,
    clients: Vec<UnixStream>,
    listener: UnixListener,
    accepted: Vec<UnixStream>,
}

impl Harness {
    fn serve_pending(&mut self) {
        for _ in 0..4 {
            let pending = self.dev.pending_queues();
            if pending & (1 << RX_QUEUE) != 0 {
                self.dev.process_queue(RX_QUEUE, &mut self.rx, &self.mem);
            }
            if pending & (1 << TX_QUEUE) != 0 {
                self.dev.process_queue(TX_QUEUE, &mut self.tx, &self.mem);
            }
        }
        self.check();
    }

    fn backend(&mut self) {
        self.dev.backend_ready();
        self.serve_pending();
    }

    /// The invariants, and the receive chains the device returned since the last check.
    fn check(&mut self) {
        assert!(self.dev.connection_count() <= MAX_CONNECTIONS);
        let stats = self.dev.stats().snapshot();
        assert!(stats.max_buffered_to_host <= u64::from(BUF_ALLOC), "{stats:?}");
        let used = self.rx_ring.used_idx(&self.mem);
        while self.rx_seen != used {
            let (id, len) = self.rx_ring.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let chain = self
                .rx_chains
                .iter_mut()
                .find(|c| u32::from(c.head) == id && !c.returned)
                .unwrap_or_else(|| panic!("receive chain {id} returned twice or never given"));
            chain.returned = true;
            assert!(len <= chain.capacity, "used {len} of a {}-byte chain", chain.capacity);
            if len == 0 {
                continue;
            }
            assert!(len as usize >= HEADER, "a used length {len} shorter than a header");
            let h = read_bytes(&self.mem, chain.header, HEADER);
            let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
            let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
            let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().expect("2 bytes"));
            assert_eq!((u64_at(0), u64_at(8)), (HOST_CID, GUEST_CID), "header {h:?}");
            assert_eq!(u16_at(28), TYPE_STREAM);
            assert!((1..=7).contains(&u16_at(30)), "op {}", u16_at(30));
            assert_eq!(u32_at(24) as usize, len as usize - HEADER, "the length field and the used length");
        }
        if self.rx_chains.iter().all(|c| c.returned) && !self.rx_chains.is_empty() {
            self.rx_chains.clear();
            self.rx_ring.reclaim();
            self.rx_slot = 0;
        }
    }

    fn rx(&mut self, count: u8, len: u16, split: bool, readable: bool) {
        for k in 0..u16::from(count % 8) {
            let slot = self.rx_slot;
            let header = RX_BUFS + u64::from(slot) * 0x2000;
            let capacity = (u32::from(len) % 0x2000).max(1);
            let parts: Vec<Part> = if split && capacity > HEADER as u32 {
                vec![(header, HEADER as u32, true), (header + HEADER as u64, capacity - HEADER as u32, true)]
            } else {
                vec![(header, capacity, !(readable && k == 0))]
            };
            let chain = linked(&parts);
            if slot as usize + chain.len() > usize::from(self.rx_ring.size()) || !self.rx_ring.add_chain(&self.mem, &chain, false) {
                return;
            }
            self.rx_slot += chain.len() as u16;
            self.rx_chains.push(RxChain { head: slot, header, capacity, returned: false });
        }
        self.dev.process_queue(RX_QUEUE, &mut self.rx, &self.mem);
        self.serve_pending();
    }

    fn tx(&mut self, p: &Packet) {
        let host_port = match p.host_port_roll {
            0..=127 => (1u32 << 30) + u32::from(p.host_port_roll % 8),
            128..=191 => 6000,
            192..=223 => 6001,
            _ => p.host_port,
        };
        let data_len = usize::from(p.data_len) % 0x5000;
        let mut h = [0u8; HEADER];
        let src = if p.cid_roll <= 223 { GUEST_CID } else { p.src_cid };
        let dst = if p.dst_roll <= 223 { HOST_CID } else { p.dst_cid };
        h[0..8].copy_from_slice(&src.to_le_bytes());
        h[8..16].copy_from_slice(&dst.to_le_bytes());
        h[16..20].copy_from_slice(&(u32::from(p.guest_port % 4) + 1000).to_le_bytes());
        h[20..24].copy_from_slice(&host_port.to_le_bytes());
        h[24..28].copy_from_slice(&p.len_lies.unwrap_or(data_len as u32).to_le_bytes());
        h[28..30].copy_from_slice(&(if p.type_roll <= 223 { TYPE_STREAM } else { u16::from(p.type_roll) }).to_le_bytes());
        h[30..32].copy_from_slice(&u16::from(p.op % 9).to_le_bytes());
        h[32..36].copy_from_slice(&u32::from(p.flags % 4).to_le_bytes());
        h[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
        h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
        if usize::from(self.tx_slot) + 2 > usize::from(self.tx_ring.size()) {
            // Every transmit chain is served at once: the ring is free again.
            assert_eq!(self.tx_ring.used_idx(&self.mem), self.tx_added, "transmit chains left behind");
            self.tx_ring.reclaim();
            self.tx_slot = 0;
        }
        let at = TX_BUFS + u64::from(self.tx_slot) * 0x6000;
        vm_memory::Bytes::write_slice(&self.mem, &h, vm_memory::GuestAddress(at)).expect("tx header");
        let data: Vec<u8> = (0..data_len).map(|i| i as u8).collect();
        vm_memory::Bytes::write_slice(&self.mem, &data, vm_memory::GuestAddress(at + HEADER as u64)).expect("tx data");
        let parts: Vec<Part> = if p.one_descriptor || data_len == 0 {
            vec![(at, (HEADER + data_len) as u32, false)]
        } else {
            vec![(at, HEADER as u32, false), (at + HEADER as u64, data_len as u32, false)]
        };
        let mut chain = linked(&parts);
        if p.fault_roll >= 224 {
            apply_faults(&mut chain, &p.faults);
        }
        if chain.is_empty() || !self.tx_ring.add_chain(&self.mem, &chain, p.indirect) {
            return;
        }
        self.tx_slot += if p.indirect { 1 } else { chain.len() as u16 };
        self.tx_added = self.tx_added.wrapping_add(1);
        self.dev.process_queue(TX_QUEUE, &mut self.tx, &self.mem);
        self.serve_pending();
    }
}

fuzz_target!(|input: Input| {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let uds = dir().join(format!("v{n}.sock"));
    let listener_path = host_side::listener_path(&uds, 6000);
    let (Ok(device_listener), Ok(listener)) = (UnixListener::bind(&uds), UnixListener::bind(&listener_path)) else {
        return;
    };
    listener.set_nonblocking(true).expect("non-blocking listener");
    let mut dev = Vsock::new(GUEST_CID, device_listener, uds.clone()).expect("device");
    dev.features_accepted(VIRTIO_F_VERSION_1);
    dev.activate(VIRTIO_F_VERSION_1, &[true, true, true]).expect("activation");
    let mem = guest_memory(&[(0, RAM_END as usize)]);
    let rx_ring = Ring::new(&mem, RX_RING, 64, RX_INDIRECT);
    let tx_ring = Ring::new(&mem, TX_RING, 64, TX_INDIRECT);
    let (rx, tx) = (rx_ring.queue(), tx_ring.queue());
    let mut h = Harness {
        mem,
        dev,
        uds: uds.clone(),
        rx_ring,
        tx_ring,
        rx,
        tx,
        rx_chains: Vec::new(),
        rx_slot: 0,
        rx_seen: 0,
        tx_added: 0,
        tx_slot: 0,
        clients: Vec::new(),
        listener,
        accepted: Vec::new(),
    };
    for step in &input.steps {
        match step {
            Step::Tx(p) => h.tx(p),
            Step::Rx { count, len, split, readable } => h.rx(*count, *len, *split, *readable),
            Step::HostConnect { port, garbage, finish_line } => {
                if h.clients.len() < 16 {
                    if let Ok(mut c) = UnixStream::connect(&h.uds) {
                        let line = if *garbage { format!("CONNEKT {port}") } else { format!("CONNECT {}", 1000 + u32::from(port % 4)) };
                        let _ = c.write_all(line.as_bytes());
                        if *finish_line {
                            let _ = c.write_all(b"\n");
                        }
                        let _ = c.set_nonblocking(true);
                        h.clients.push(c);
                    }
                }
                h.backend();
            }
            Step::HostWrite { client, len } => {
                if !h.clients.is_empty() {
                    let i = usize::from(*client) % h.clients.len();
                    let _ = h.clients[i].write(&vec![0x5a; usize::from(*len) % 0x4000]);
                }
                h.backend();
            }
            Step::HostClose { client } => {
                if !h.clients.is_empty() {
                    let i = usize::from(*client) % h.clients.len();
                    h.clients.remove(i);
                }
                h.backend();
            }
            Step::ListenerAccept { len } => {
                if let Ok((mut s, _)) = h.listener.accept() {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write(&vec![0xa5; usize::from(*len) % 0x4000]);
                    h.accepted.push(s);
                }
                h.backend();
            }
        }
    }
    h.backend();
    drop(h);
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&listener_path);
});
