//! The vsock device against a scripted guest (mock queues in test memory) and real Unix
//! sockets in a temporary directory: both connection directions, credit both ways, and
//! hostile packets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use virtio_vsock::packet::PKT_HEADER_SIZE;

const MEM_SIZE: usize = 0x200_0000;
const GUEST_CID: u64 = 3;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x80_0000;
const RX_BUF_LEN: u32 = PKT_HEADER_SIZE as u32 + 4096;

/// A fresh directory under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("samepage-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A packet header's fields, as the tests write and read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// A packet of the guest's, guest port `src` to host port `dst`, with a credit of 64 KiB.
    fn guest(src: u32, dst: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 << 10,
            ..Hdr::default()
        }
    }

    fn bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Hdr {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// The guest's side: its two queues in test memory (leaked: the mock rings borrow it for the
/// test's length), and the device's packets it received.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rx_ring: MockSplitQueue<'static, GuestMemoryMmap>,
    tx_ring: MockSplitQueue<'static, GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    /// Receive chains given so far (descriptor `i % QUEUE_SIZE` has buffer `i`).
    rx_given: u16,
    /// Receive used-ring entries read so far.
    rx_seen: u16,
    tx_given: u16,
    /// Bytes the guest consumed, for its `fwd_cnt` (one connection at a time in these tests).
    fwd_cnt: u32,
}

impl Guest {
    fn new() -> Guest {
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()));
        let rx_ring = MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_SIZE);
        let tx_ring = MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_SIZE);
        let rx = rx_ring.create_queue().unwrap();
        let tx = tx_ring.create_queue().unwrap();
        Guest { mem, rx_ring, tx_ring, rx, tx, rx_given: 0, rx_seen: 0, tx_given: 0, fwd_cnt: 0 }
    }

    /// Gives the device `n` receive buffers of one descriptor each.
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx_given % QUEUE_SIZE;
            let addr = RX_BUFS + u64::from(i) * 0x2000;
            let desc =
                RawDescriptor::from(SplitDescriptor::new(addr, RX_BUF_LEN, VRING_DESC_F_WRITE as u16, 0));
            add_chain(self.mem, &self.rx_ring, &[desc], i);
            self.rx_given = self.rx_given.wrapping_add(1);
        }
    }

    /// Sends one packet (header and data in two descriptors) with the guest's credit.
    fn send(&mut self, dev: &mut Vsock, mut hdr: Hdr, data: &[u8]) -> bool {
        hdr.len = data.len() as u32;
        hdr.fwd_cnt = self.fwd_cnt;
        self.send_raw(dev, &hdr.bytes(), data)
    }

    /// Sends header bytes and data as they are; whether the device asked for an interrupt.
    fn send_raw(&mut self, dev: &mut Vsock, header: &[u8], data: &[u8]) -> bool {
        let i = (self.tx_given * 2) % QUEUE_SIZE;
        let (haddr, daddr) = (TX_BUFS + u64::from(i) * 0x1_0000, TX_BUFS + u64::from(i + 1) * 0x1_0000);
        self.mem.write_slice(header, GuestAddress(haddr)).unwrap();
        self.mem.write_slice(data, GuestAddress(daddr)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(haddr, header.len() as u32, 0, 0))];
        if !data.is_empty() {
            descs[0] = RawDescriptor::from(SplitDescriptor::new(haddr, header.len() as u32, 1, i + 1));
            descs.push(RawDescriptor::from(SplitDescriptor::new(daddr, data.len() as u32, 0, 0)));
        }
        add_chain(self.mem, &self.tx_ring, &descs, i);
        self.tx_given = self.tx_given.wrapping_add(1);
        let interrupt = dev.process_queue(TX_QUEUE, &mut self.tx, self.mem);
        self.serve_pending(dev);
        interrupt
    }

    /// As the transport does after a notification or a backend event.
    fn serve_pending(&mut self, dev: &mut Vsock) {
        for _ in 0..4 {
            let pending = dev.pending_queues();
            if pending & (1 << RX_QUEUE) != 0 {
                dev.process_queue(RX_QUEUE, &mut self.rx, self.mem);
            }
            if pending & (1 << TX_QUEUE) != 0 {
                dev.process_queue(TX_QUEUE, &mut self.tx, self.mem);
            }
        }
    }

    /// Host events, as the event loop delivers them (a few times: a socket's data may take
    /// a moment to show).
    fn host_events(&mut self, dev: &mut Vsock) {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(10));
            dev.backend_ready();
            self.serve_pending(dev);
        }
    }

    /// Packets the device put in the receive queue since the last call, with their data.
    fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let used = self.rx_ring.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let elem = used.unchecked_add(4 + u64::from(self.rx_seen % QUEUE_SIZE) * 8);
            let id: u32 = self.mem.read_obj(elem).unwrap();
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
            let addr = GuestAddress(RX_BUFS + u64::from(id) * 0x2000);
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, addr).unwrap();
            let hdr = Hdr::parse(&bytes[..PKT_HEADER_SIZE]);
            assert_eq!(hdr.len as usize, bytes.len() - PKT_HEADER_SIZE, "used length and header disagree");
            out.push((hdr, bytes[PKT_HEADER_SIZE..].to_vec()));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }
}

/// Writes `descs` at table index `first` on (linked as they say) and puts the chain's head
/// in the available ring, which wraps (the mock's own helper does not).
fn add_chain(
    memory: &GuestMemoryMmap,
    ring: &MockSplitQueue<'static, GuestMemoryMmap>,
    descs: &[RawDescriptor],
    first: u16,
) {
    for (k, desc) in descs.iter().enumerate() {
        ring.desc_table().store(first + k as u16, *desc).unwrap();
    }
    let avail = ring.avail_addr();
    let idx: u16 = memory.read_obj(avail.unchecked_add(2)).unwrap();
    memory.write_obj(first, avail.unchecked_add(4 + u64::from(idx % QUEUE_SIZE) * 2)).unwrap();
    memory.write_obj(idx.wrapping_add(1), avail.unchecked_add(2)).unwrap();
}

fn device(dir: &Path) -> (Vsock, PathBuf) {
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    (Vsock::new(GUEST_CID, listener, uds.clone()).unwrap(), uds)
}

/// A host client that asked for guest port `port`.
fn host_client(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn ops(packets: &[(Hdr, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

/// A host client connected to guest port 52 through the device: (client, host port).
fn connected_host_client(dev: &mut Vsock, guest: &mut Guest, uds: &Path) -> (UnixStream, u32) {
    let mut client = host_client(uds, 52);
    guest.give_rx(8);
    guest.host_events(dev);
    let got = guest.received();
    assert_eq!(ops(&got), [op::REQUEST], "{got:?}");
    let request = got[0].0;
    assert_eq!(
        (request.src_cid, request.dst_cid, request.dst_port, request.type_),
        (HOST_CID, GUEST_CID, 52, TYPE_STREAM)
    );
    assert_eq!(request.buf_alloc, BUF_ALLOC);
    let host_port = request.src_port;
    guest.send(dev, Hdr::guest(52, host_port, op::RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {host_port}"));
    (client, host_port)
}

#[test]
fn the_device_is_a_vsock_device_with_the_guests_cid_in_its_configuration() {
    let dir = TempDir::new("config");
    let (dev, _) = device(&dir.0);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn a_host_client_connects_to_a_guest_port_and_bytes_flow_both_ways() {
    let dir = TempDir::new("host-connects");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let (mut client, host_port) = connected_host_client(&mut dev, &mut guest, &uds);
    client.write_all(b"hello guest").unwrap();
    guest.host_events(&mut dev);
    let got = guest.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port), (op::RW, host_port, 52));
    assert_eq!(got[0].1, b"hello guest");
    guest.send(&mut dev, Hdr::guest(52, host_port, op::RW), b"hello host");
    let mut reply = [0u8; 10];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello host");
    // The client leaves: the guest hears it will get no more, and its close ends it.
    drop(client);
    guest.host_events(&mut dev);
    let got = guest.received();
    assert_eq!(ops(&got), [op::SHUTDOWN], "{got:?}");
    assert_eq!(got[0].0.flags, shutdown::SEND);
    guest.send(
        &mut dev,
        Hdr { flags: shutdown::SEND | shutdown::RCV, ..Hdr::guest(52, host_port, op::SHUTDOWN) },
        &[],
    );
    assert_eq!(ops(&guest.received()), [op::RST]);
    assert_eq!(dev.connection_count(), 0);
    let s = dev.stats().snapshot();
    assert_eq!((s.host_connections, s.closed_connections, s.bytes_to_guest, s.bytes_to_host), (1, 1, 11, 10));
}

#[test]
fn a_guest_port_that_refuses_closes_the_host_client() {
    let dir = TempDir::new("guest-refuses");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let mut client = host_client(&uds, 99);
    guest.give_rx(4);
    guest.host_events(&mut dev);
    let request = guest.received()[0].0;
    guest.send(&mut dev, Hdr::guest(99, request.src_port, op::RST), &[]);
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0, "the client got {rest:?}");
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn a_guest_connects_to_a_host_listener_and_a_missing_one_is_refused() {
    let dir = TempDir::new("guest-connects");
    let (mut dev, uds) = device(&dir.0);
    let listener = UnixListener::bind(host_side::listener_path(&uds, 6000)).unwrap();
    let mut guest = Guest::new();
    guest.give_rx(8);
    guest.send(&mut dev, Hdr::guest(1234, 6000, op::REQUEST), &[]);
    let got = guest.received();
    assert_eq!(ops(&got), [op::RESPONSE], "{got:?}");
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6000, 1234));
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    guest.send(&mut dev, Hdr::guest(1234, 6000, op::RW), b"from the guest");
    let mut got_bytes = [0u8; 14];
    server.read_exact(&mut got_bytes).unwrap();
    assert_eq!(&got_bytes, b"from the guest");
    server.write_all(b"from the host").unwrap();
    guest.host_events(&mut dev);
    let got = guest.received();
    assert_eq!(got.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(), [b"from the host".to_vec()]);

    guest.send(&mut dev, Hdr::guest(1235, 6001, op::REQUEST), &[]);
    let got = guest.received();
    assert_eq!(ops(&got), [op::RST], "nobody listens on port 6001");
    let s = dev.stats().snapshot();
    assert_eq!((s.guest_connections, s.refused_connections), (1, 1));
}

#[test]
fn host_data_goes_to_the_guest_only_within_its_credit() {
    let dir = TempDir::new("guest-credit");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let (mut client, host_port) = connected_host_client(&mut dev, &mut guest, &uds);
    // The guest has room for 1000 bytes; the host sends 5000.
    guest.send(&mut dev, Hdr { buf_alloc: 1000, ..Hdr::guest(52, host_port, op::CREDIT_UPDATE) }, &[]);
    client.write_all(&[7u8; 5000]).unwrap();
    guest.give_rx(16);
    guest.host_events(&mut dev);
    let got = guest.received();
    let data: usize = got.iter().filter(|(h, _)| h.op == op::RW).map(|(_, d)| d.len()).sum();
    assert_eq!(data, 1000, "{:?}", ops(&got));
    assert_eq!(ops(&got).last(), Some(&op::CREDIT_REQUEST), "the device asks for credit once stuck");
    // The guest reads it all and says so: the rest comes.
    guest.fwd_cnt = 1000;
    guest.send(&mut dev, Hdr { buf_alloc: 1 << 20, ..Hdr::guest(52, host_port, op::CREDIT_UPDATE) }, &[]);
    guest.host_events(&mut dev);
    let data: usize = guest.received().iter().filter(|(h, _)| h.op == op::RW).map(|(_, d)| d.len()).sum();
    assert_eq!(data, 4000);
}

#[test]
fn a_host_reader_that_stalls_holds_the_guest_to_its_credit_and_a_guest_past_it_is_reset() {
    let dir = TempDir::new("host-stalls");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let (mut client, host_port) = connected_host_client(&mut dev, &mut guest, &uds);
    // The client reads nothing: its socket fills, then the device's buffer, up to the credit.
    let chunk = vec![0x5au8; 60 << 10];
    let mut sent = 0usize;
    let mut updates = 0;
    loop {
        guest.send(&mut dev, Hdr::guest(52, host_port, op::RW), &chunk);
        sent += chunk.len();
        updates += guest.received().iter().filter(|(h, _)| h.op == op::CREDIT_UPDATE).count();
        if dev.stats().snapshot().max_buffered_to_host > 0 {
            break;
        }
        assert!(sent < 16 << 20, "the host socket never filled");
    }
    // From here an honest guest sends only what its credit allows.
    let fwd = dev.connections.values().next().unwrap().fwd_cnt.0;
    let mut room = BUF_ALLOC - (sent as u32 - fwd);
    while room >= chunk.len() as u32 {
        guest.send(&mut dev, Hdr::guest(52, host_port, op::RW), &chunk);
        sent += chunk.len();
        room -= chunk.len() as u32;
    }
    let s = dev.stats().snapshot();
    assert!(s.max_buffered_to_host <= u64::from(BUF_ALLOC), "{s:?}");
    assert_eq!(s.credit_violations, 0);
    // The reader catches up: every byte arrives, and the guest hears of the room.
    let reader = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while total < sent {
            let n = client.read(&mut buf).unwrap();
            assert!(buf[..n].iter().all(|&b| b == 0x5a));
            total += n;
        }
        (client, total)
    });
    for _ in 0..200 {
        guest.host_events(&mut dev);
        if dev.connections.values().next().unwrap().buffered() == 0 {
            break;
        }
    }
    let (_client, total) = reader.join().unwrap();
    assert_eq!(total, sent);
    let got = guest.received();
    assert!(
        ops(&got).contains(&op::CREDIT_UPDATE),
        "no credit update after the reader caught up: {:?}",
        ops(&got)
    );
    let update = got.iter().rev().find(|(h, _)| h.op == op::CREDIT_UPDATE).unwrap().0;
    println!(
        "sent {sent} bytes, {updates} credit updates while filling, the last update's fwd_cnt {}",
        update.fwd_cnt
    );
    // A guest that ignores its credit: the client stops reading again, the guest floods.
    for _ in 0..64 {
        guest.send(&mut dev, Hdr::guest(52, host_port, op::RW), &chunk);
        if dev.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(dev.stats().snapshot().credit_violations, 1);
    assert_eq!(dev.connection_count(), 0);
    assert!(ops(&guest.received()).contains(&op::RST));
}

#[test]
fn hostile_packets_are_counted_and_dropped_and_others_run_on() {
    let dir = TempDir::new("hostile");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let (mut client, host_port) = connected_host_client(&mut dev, &mut guest, &uds);
    let before = dev.stats().snapshot().bad_packets;
    // A header too short, one from another CID, one to another CID, a datagram.
    guest.send_raw(&mut dev, &[0u8; 20], &[]);
    guest.send(&mut dev, Hdr { src_cid: 7, ..Hdr::guest(52, host_port, op::RW) }, b"spoofed");
    guest.send(&mut dev, Hdr { dst_cid: 9, ..Hdr::guest(52, host_port, op::RW) }, b"elsewhere");
    guest.send(&mut dev, Hdr { type_: 3, ..Hdr::guest(52, host_port, op::RW) }, b"dgram");
    // A length the data does not have, and one beyond the largest packet.
    let mut lying = Hdr::guest(52, host_port, op::RW);
    lying.len = 100;
    guest.send_raw(&mut dev, &lying.bytes(), b"short");
    lying.len = MAX_PACKET_DATA + 1;
    guest.send_raw(&mut dev, &lying.bytes(), &[1u8; 16]);
    // A descriptor outside guest memory.
    let i = 250;
    let bad = RawDescriptor::from(SplitDescriptor::new(MEM_SIZE as u64 + 0x1000, 44, 0, 0));
    add_chain(guest.mem, &guest.tx_ring, &[bad], i);
    dev.process_queue(TX_QUEUE, &mut guest.tx, guest.mem);
    assert_eq!(dev.stats().snapshot().bad_packets - before, 7);
    // Data for a connection that does not exist gets a reset.
    guest.send(&mut dev, Hdr::guest(53, host_port, op::RW), b"nobody");
    // (The datagram got one too: a type the device does not serve is reset.)
    assert_eq!(ops(&guest.received()), [op::RST, op::RST]);
    assert_eq!(dev.stats().snapshot().unknown_connections, 1);
    // The real connection still works, and got none of the above.
    guest.send(&mut dev, Hdr::guest(52, host_port, op::RW), b"still here");
    let mut got = [0u8; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
}

#[test]
fn replies_the_guest_has_no_buffers_for_are_bounded() {
    let dir = TempDir::new("replies");
    let (mut dev, _uds) = device(&dir.0);
    let mut guest = Guest::new();
    // No receive buffers; the guest sends packets for connections that do not exist, each
    // earning a reset.
    let mut sent = 0u64;
    let mut send = |guest: &mut Guest, dev: &mut Vsock, port: u32| {
        let hdr = Hdr { len: 0, fwd_cnt: 0, ..Hdr::guest(port, 1, op::RW) };
        let i = guest.tx_given % QUEUE_SIZE;
        let addr = TX_BUFS + u64::from(i) * 0x100;
        guest.mem.write_slice(&hdr.bytes(), GuestAddress(addr)).unwrap();
        add_chain(guest.mem, &guest.tx_ring, &[RawDescriptor::from(SplitDescriptor::new(addr, 44, 0, 0))], i);
        guest.tx_given = guest.tx_given.wrapping_add(1);
        dev.process_queue(TX_QUEUE, &mut guest.tx, guest.mem);
        sent += 1;
    };
    let mut port = 0;
    while dev.stats().snapshot().tx_stalls == 0 {
        send(&mut guest, &mut dev, port);
        port += 1;
        assert!(port < 2 * MAX_REPLIES as u32, "the transmit queue never stalled");
    }
    // The stalled queue keeps what comes next (less than a ring's worth).
    for _ in 0..100 {
        send(&mut guest, &mut dev, port);
        port += 1;
    }
    assert!(dev.replies.len() <= MAX_REPLIES);
    assert!(dev.stats().snapshot().tx_stalls > 0);
    assert_ne!(dev.pending_queues() & (1 << RX_QUEUE), 0);
    // Buffers come: replies drain and the transmit queue is served again.
    for _ in 0..100 {
        // Never more than the ring holds: each round's buffers are all used before the next.
        guest.give_rx(100);
        guest.serve_pending(&mut dev);
        let _ = guest.received();
        if dev.replies.is_empty() && dev.pending_queues() == 0 {
            break;
        }
    }
    assert!(dev.replies.is_empty(), "{} replies left", dev.replies.len());
    assert_eq!(dev.stats().snapshot().unknown_connections, sent);
}

#[test]
fn silent_and_bad_host_clients_are_dropped() {
    let dir = TempDir::new("handshakes");
    let (mut dev, uds) = device(&dir.0);
    let mut guest = Guest::new();
    let mut bad = UnixStream::connect(&uds).unwrap();
    bad.write_all(b"HELLO 52\n").unwrap();
    let mut long = UnixStream::connect(&uds).unwrap();
    long.write_all(&[b'9'; 100]).unwrap();
    let mut early = UnixStream::connect(&uds).unwrap();
    early.write_all(b"CONNECT 5").unwrap();
    guest.host_events(&mut dev);
    assert_eq!(dev.stats().snapshot().bad_handshakes, 2);
    let mut rest = Vec::new();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0, "a bad client is closed");
    // More silent clients than are kept: the oldest (the one that never finished its line)
    // goes.
    let silent: Vec<UnixStream> =
        (0..host_side::MAX_HANDSHAKES).map(|_| UnixStream::connect(&uds).unwrap()).collect();
    guest.host_events(&mut dev);

    early.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(early.read_to_end(&mut rest).unwrap(), 0, "the oldest silent client is closed");
    assert_eq!(dev.connection_count(), 0);
    // A good client after all that is served.
    guest.give_rx(4);
    let _client = host_client(&uds, 52);
    guest.host_events(&mut dev);
    assert_eq!(ops(&guest.received()), [op::REQUEST]);
    drop(silent);
}
