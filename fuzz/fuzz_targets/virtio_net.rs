//! virtio-net end to end: a hostile driver's transmit chains (split anywhere, readable or not,
//! outside guest RAM, faulty), receive chains of any shape, and frames arriving from the
//! backend (a `SOCK_SEQPACKET` socket pair, one frame per read and write, as a tap), in any
//! order, served by `Net`.
//!
//! Predicted exactly: a well-framed transmit chain of readable buffers in RAM, of 12 to
//! 12 + `MAX_FRAME` bytes, reaches the backend as its bytes after the header, and nothing else
//! does; frames from the backend reach receive buffers in order, each after the header
//! `virtio_net_hdr_v1` with `num_buffers` 1, with a used length of the header plus the frame,
//! or are dropped when larger than the buffer. For any chain: returned at most once, a used
//! length within what it can hold.
#![no_main]

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{apply_faults, counted, guest_memory, linked, read_bytes, split, ChainFault, Part, Ring};
use samepage_virtio::net::{Net, HEADER_LEN, MAX_FRAME, RX_QUEUE, TX_QUEUE};
use samepage_virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM_END: u64 = 0x40_0000;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const RX_INDIRECT: (u64, u64) = (0x1_0000, 0x1_8000);
const TX_INDIRECT: (u64, u64) = (0x1_8000, 0x2_0000);
const RX_BUFS: u64 = 0x2_0000;
const TX_BUFS: u64 = 0x20_0000;

#[derive(Arbitrary, Debug)]
struct Input {
    #[arbitrary(with = counted::<_, 1, 48>)]
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The guest sends a chain.
    Tx { len: u16, big: bool, cuts: Vec<u16>, roll: u8, addr: u64, indirect: bool, fault_roll: u8, faults: Vec<ChainFault> },
    /// The guest gives receive chains.
    Rx { count: u8, len: u16, cuts: Vec<u16>, roll: u8 },
    /// The host's network sends a frame.
    Frame { len: u16, seed: u8 },
}

struct RxChain {
    head: u16,
    /// (address, length) of each buffer, when all are writable and in RAM.
    parts: Option<Vec<(u64, u32)>>,
    capacity: u64,
    returned: bool,
}

fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, owned right below.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: new descriptors nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_FRAME + 16];
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Net,
    peer: OwnedFd,
    rx_ring: Ring,
    tx_ring: Ring,
    rx: virtio_queue::Queue,
    tx: virtio_queue::Queue,
    rx_chains: Vec<RxChain>,
    rx_slot: u16,
    rx_seen: u16,
    tx_slot: u16,
    tx_added: u16,
    /// Frames sent by the host's network that the guest has not received (or seen dropped).
    in_flight: VecDeque<Vec<u8>>,
}

impl Harness {
    fn serve_pending(&mut self) {
        for _ in 0..4 {
            if self.dev.pending_queues() & (1 << RX_QUEUE) != 0 {
                self.dev.process_queue(RX_QUEUE, &mut self.rx, &self.mem);
            }
        }
        self.check_rx();
    }

    /// Every receive chain returned since the last check: once, fitting, holding the next
    /// frame that fits it (frames that do not are dropped on the way).
    fn check_rx(&mut self) {
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
            assert!(u64::from(len) <= chain.capacity, "used {len} of {}", chain.capacity);
            let Some(parts) = &chain.parts else {
                assert_eq!(len, 0, "a refused chain with a used length");
                continue;
            };
            if len == 0 {
                continue;
            }
            let mut got = Vec::new();
            for &(addr, l) in parts {
                got.extend(read_bytes(&self.mem, addr, l as usize));
            }
            got.truncate(len as usize);
            assert_eq!(&got[..HEADER_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "header");
            // Frames larger than a buffer they met were dropped: the next one that fits it.
            let capacity = chain.capacity as usize;
            loop {
                let frame = self.in_flight.pop_front().expect("a frame the host never sent");
                if frame.len() + HEADER_LEN <= capacity {
                    assert_eq!(&got[HEADER_LEN..], &frame[..], "frame contents");
                    break;
                }
            }
        }
        if !self.rx_chains.is_empty() && self.rx_chains.iter().all(|c| c.returned) {
            self.rx_chains.clear();
            self.rx_ring.reclaim();
            self.rx_slot = 0;
        }
    }

    fn tx(&mut self, len: u16, big: bool, cuts: &[u16], roll: u8, addr: u64, indirect: bool, faults: &[ChainFault]) {
        let len = if big { u32::from(len) * 2 } else { u32::from(len) % 2048 };
        let base = TX_BUFS + u64::from(self.tx_slot) * 0x100;
        let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(roll)).collect();
        let _ = self.mem.write_slice(&bytes, GuestAddress(base));
        let mut parts: Vec<Part> = split(base, len, &cuts[..cuts.len().min(6)], false);
        match roll {
            0..=191 => {}
            192..=223 => {
                let i = usize::from(roll) % parts.len();
                parts[i].2 = true;
            }
            _ => {
                let i = usize::from(roll) % parts.len();
                parts[i].0 = addr;
            }
        }
        let mut chain = linked(&parts);
        apply_faults(&mut chain, faults);
        let slots = if indirect { 1 } else { chain.len() as u16 };
        if usize::from(self.tx_slot + slots) > usize::from(self.tx_ring.size()) {
            assert_eq!(self.tx_ring.used_idx(&self.mem), self.tx_added, "transmit chains left behind");
            self.tx_ring.reclaim();
            self.tx_slot = 0;
            return;
        }
        if chain.is_empty() || !self.tx_ring.add_chain(&self.mem, &chain, indirect) {
            return;
        }
        self.tx_slot += slots;
        self.tx_added = self.tx_added.wrapping_add(1);
        // What the chain holds before the device runs (a buffer may lie over the rings,
        // which the device writes as it returns the chain).
        let mut want = Vec::new();
        for p in &parts {
            want.extend(read_bytes(&self.mem, p.0, p.1 as usize));
        }
        let dropped_before = self.dev.stats().snapshot().tx_dropped;
        self.dev.process_queue(TX_QUEUE, &mut self.tx, &self.mem);
        assert_eq!(self.tx_ring.used_idx(&self.mem), self.tx_added, "a transmit chain was not returned");
        let got = recv(&self.peer);
        let well_formed = faults.is_empty()
            // (an empty buffer carries nothing, wherever it points)
            && parts.iter().all(|p| !p.2 && (p.1 == 0 || p.0.checked_add(u64::from(p.1)).is_some_and(|e| e <= RAM_END)));
        let total = parts.iter().map(|p| u64::from(p.1)).sum::<u64>();
        if well_formed && total >= HEADER_LEN as u64 && total <= (HEADER_LEN + MAX_FRAME) as u64 {
            let dropped = self.dev.stats().snapshot().tx_dropped > dropped_before;
            // A buffer over the rings reads what the device wrote there meanwhile (the used
            // ring's flags): its bytes are not predicted.
            let over_rings = parts.iter().any(|p| p.1 > 0 && p.0 < RX_BUFS);
            if !dropped && !over_rings {
                assert_eq!(got.as_deref(), Some(&want[HEADER_LEN..]), "the frame the backend got");
            }
        } else if faults.is_empty() {
            assert_eq!(got.map(|g| g.len()), None, "a refused chain reached the backend");
        }
        // Whatever a faulty chain sent, nothing more may wait.
        assert_eq!(recv(&self.peer).map(|g| g.len()), None, "one chain sent two frames");
        self.serve_pending();
    }

    fn rx(&mut self, count: u8, len: u16, cuts: &[u16], roll: u8) {
        for k in 0..u16::from(count % 6) {
            let base = RX_BUFS + u64::from(self.rx_slot) * 0x1_0000;
            let capacity = if roll & 1 == 0 { u32::from(len) % 0x1_0000 } else { 1526 };
            let mut parts = split(base, capacity, &cuts[..cuts.len().min(4)], true);
            if roll >= 240 && k == 0 {
                parts[0].2 = false;
            }
            if (224..240).contains(&roll) && k == 0 {
                parts[0].0 = RAM_END - 8;
            }
            let chain = linked(&parts);
            if usize::from(self.rx_slot) + chain.len() > usize::from(self.rx_ring.size())
                || !self.rx_ring.add_chain(&self.mem, &chain, false)
            {
                break;
            }
            let valid = parts.iter().all(|p| p.2 && p.0 + u64::from(p.1) <= RAM_END)
                && u64::from(capacity) >= HEADER_LEN as u64;
            self.rx_chains.push(RxChain {
                head: self.rx_slot,
                parts: valid.then(|| parts.iter().map(|p| (p.0, p.1)).collect()),
                capacity: u64::from(capacity),
                returned: false,
            });
            self.rx_slot += chain.len() as u16;
        }
        self.dev.process_queue(RX_QUEUE, &mut self.rx, &self.mem);
        self.serve_pending();
    }

    fn frame(&mut self, len: u16, seed: u8) {
        // At least an Ethernet header, as every frame a tap gives (an empty record of the
        // socket pair would read as its end).
        let frame: Vec<u8> = (0..(usize::from(len) % 9000).max(14)).map(|i| (i as u8) ^ seed).collect();
        // SAFETY: writes `frame` to our socket.
        let n = unsafe { libc::write(self.peer.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n == frame.len() as isize {
            self.in_flight.push_back(frame);
        }
        self.dev.backend_ready();
        self.serve_pending();
    }
}

fuzz_target!(|input: Input| {
    let (device_end, peer) = socket_pair();
    let mut dev = Net::new(device_end, [6, 0, 0, 0, 0, 1]).expect("device");
    dev.features_accepted(VIRTIO_F_VERSION_1);
    dev.activate(VIRTIO_F_VERSION_1, &[true, true]).expect("activation");
    let mem = guest_memory(&[(0, RAM_END as usize)]);
    let rx_ring = Ring::new(&mem, RX_RING, 32, RX_INDIRECT);
    let tx_ring = Ring::new(&mem, TX_RING, 64, TX_INDIRECT);
    let (rx, tx) = (rx_ring.queue(), tx_ring.queue());
    let mut h = Harness {
        mem,
        dev,
        peer,
        rx_ring,
        tx_ring,
        rx,
        tx,
        rx_chains: Vec::new(),
        rx_slot: 0,
        rx_seen: 0,
        tx_slot: 0,
        tx_added: 0,
        in_flight: VecDeque::new(),
    };
    for step in &input.steps {
        match step {
            Step::Tx { len, big, cuts, roll, addr, indirect, fault_roll, faults } => {
                let faults: &[ChainFault] = if *fault_roll >= 224 { faults } else { &[] };
                h.tx(*len, *big, cuts, *roll, *addr, *indirect, faults)
            }
            Step::Rx { count, len, cuts, roll } => h.rx(*count, *len, cuts, *roll),
            Step::Frame { len, seed } => h.frame(*len, *seed),
        }
    }
});
