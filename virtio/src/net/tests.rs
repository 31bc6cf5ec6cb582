//! The network device against hostile chains, on a `SOCK_SEQPACKET` socket pair as its
//! backend (one frame per read and write, as a tap).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, GuestAddress};

use super::*;
use crate::test_chains::{linked, D};

const MEM_SIZE: usize = 0x40_0000;
const BUF: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

/// The device on one end of a socket pair; the other end plays the host's network.
fn device() -> (Net, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which are owned right below.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both are new descriptors nothing else owns.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Net::new(a, MAC).unwrap(), b)
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Queues `chains` (each linked) on queue `index` and serves it once; returns the used
/// (length) of each chain returned.
fn serve(dev: &mut Net, mem: &GuestMemoryMmap, index: usize, chains: &[&[D]]) -> Vec<u32> {
    let mq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
    let mut at = 0u16;
    for chain in chains {
        let mut raw: Vec<RawDescriptor> = linked(chain);
        // Relink at this chain's place in the table.
        for (k, d) in raw.iter_mut().enumerate() {
            let s = virtio_queue::desc::split::Descriptor::from(*d);
            *d = RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                s.addr().0,
                s.len(),
                s.flags(),
                at + k as u16 + 1,
            ));
        }
        mq.add_desc_chains(&raw, at).unwrap();
        at += chain.len() as u16;
    }
    let mut queue: Queue = mq.create_queue().unwrap();
    dev.process_queue(index, &mut queue, mem);
    used_lengths(mem, &mq)
}

fn used_lengths(mem: &GuestMemoryMmap, mq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<u32> {
    let used = mq.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    (0..idx).map(|i| mem.read_obj(used.unchecked_add(8 + 8 * u64::from(i))).unwrap()).collect()
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn send(peer: &OwnedFd, bytes: &[u8]) {
    // SAFETY: writes `bytes` to our socket.
    let n = unsafe { libc::write(peer.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, bytes.len() as isize);
}

fn recv(peer: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[test]
fn the_device_is_a_network_card_with_its_mac_and_no_offloads() {
    let (dev, _peer) = device();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1 | (1 << 5));
    let mut mac = [0u8; 8];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, [0x06, 0, 0xac, 0x10, 0, 2, 0, 0]);
}

#[test]
fn a_frame_the_guest_sends_reaches_the_backend_without_its_header_whatever_the_split() {
    let (mut dev, peer) = device();
    let mem = mem();
    let f = frame(1514, 7);
    let mut packet = vec![0xffu8; HEADER_LEN];
    packet.extend_from_slice(&f);
    mem.write_slice(&packet, GuestAddress(BUF)).unwrap();
    // Header and frame apart, then cut in three anywhere.
    let len = packet.len() as u32;
    let used = serve(&mut dev, &mem, TX_QUEUE, &[&[(BUF, 12, false), (BUF + 12, len - 12, false)]]);
    assert_eq!(used, [0]);
    assert_eq!(recv(&peer).as_deref(), Some(&f[..]));
    serve(
        &mut dev,
        &mem,
        TX_QUEUE,
        &[&[(BUF, 5, false), (BUF + 5, 700, false), (BUF + 705, len - 705, false)]],
    );
    assert_eq!(recv(&peer).as_deref(), Some(&f[..]));
    let s = dev.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.bad_tx_chains), (2, 2 * 1514, 0));
}

#[test]
fn hostile_transmit_chains_send_nothing_and_are_counted() {
    let (mut dev, peer) = device();
    let mem = mem();
    mem.write_slice(&frame(4096, 1), GuestAddress(BUF)).unwrap();
    for chain in [
        &[(BUF, 11, false)][..],                                 // shorter than the header
        &[(BUF, 12, false), (BUF + 12, 100, true)],              // a device-writable buffer
        &[(BUF, 12, false), (MEM_SIZE as u64 - 10, 100, false)], // past guest RAM
        &[(BUF, 12, false), (BUF, MAX_FRAME as u32 + 1, false)], // longer than a frame
    ] {
        let used = serve(&mut dev, &mem, TX_QUEUE, &[chain]);
        assert_eq!(used, [0], "{chain:?}");
    }
    assert_eq!(recv(&peer).map(|f| f.len()), None, "a refused chain reached the backend");
    assert_eq!(dev.stats().snapshot().bad_tx_chains, 4);
    // An empty frame (a header alone) is a frame the backend gets.
    serve(&mut dev, &mem, TX_QUEUE, &[&[(BUF, 12, false)]]);
    assert_eq!(recv(&peer), Some(Vec::new()));
}

#[test]
fn a_frame_from_the_backend_fills_a_receive_buffer_after_a_header_of_one_buffer() {
    let (mut dev, peer) = device();
    let mem = mem();
    let f = frame(1000, 9);
    send(&peer, &f);
    dev.backend_ready();
    assert_ne!(dev.pending_queues() & (1 << RX_QUEUE), 0);
    let used = serve(&mut dev, &mem, RX_QUEUE, &[&[(BUF, 12, true), (BUF + 0x1000, 1526, true)]]);
    assert_eq!(used, [12 + 1000]);
    let mut header = [0xaau8; HEADER_LEN];
    mem.read_slice(&mut header, GuestAddress(BUF)).unwrap();
    assert_eq!(header, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers 1, nothing else");
    let mut got = vec![0u8; 1000];
    mem.read_slice(&mut got, GuestAddress(BUF + 0x1000)).unwrap();
    assert_eq!(got, f);
    // The next buffer finds the backend empty and stays the guest's.
    assert!(serve(&mut dev, &mem, RX_QUEUE, &[&[(BUF, 2048, true)]]).is_empty());
    assert_eq!(dev.pending_queues(), 0, "nothing left to read");
}

#[test]
fn frames_wait_in_the_backend_until_the_guest_gives_buffers_and_come_in_order() {
    let (mut dev, peer) = device();
    let mem = mem();
    for seed in 0..5 {
        send(&peer, &frame(200 + usize::from(seed), seed));
    }
    dev.backend_ready();
    assert!(serve(&mut dev, &mem, RX_QUEUE, &[]).is_empty());
    let chains: Vec<Vec<D>> = (0..5).map(|i| vec![(BUF + i * 0x1000, 2048, true)]).collect();
    let refs: Vec<&[D]> = chains.iter().map(Vec::as_slice).collect();
    let used = serve(&mut dev, &mem, RX_QUEUE, &refs);
    assert_eq!(used, [212, 213, 214, 215, 216]);
    for seed in 0..5u8 {
        let mut got = vec![0u8; 200 + usize::from(seed)];
        mem.read_slice(&mut got, GuestAddress(BUF + u64::from(seed) * 0x1000 + 12)).unwrap();
        assert_eq!(got, frame(200 + usize::from(seed), seed));
    }
}

#[test]
fn hostile_receive_chains_and_frames_too_large_for_them_are_counted_and_the_rest_delivered() {
    let (mut dev, peer) = device();
    let mem = mem();
    send(&peer, &frame(3000, 1)); // larger than the buffer that waits for it: dropped
    send(&peer, &frame(100, 2));
    dev.backend_ready();
    let used = serve(
        &mut dev,
        &mem,
        RX_QUEUE,
        &[
            &[(BUF, 2048, false)],                 // device-readable
            &[(BUF, 8, true)],                     // smaller than the header
            &[(MEM_SIZE as u64 - 16, 2048, true)], // past guest RAM
            &[(BUF, 2048, true)],                  // takes the second frame
        ],
    );
    // The buffers refused before a frame was read; the frame too large for the last buffer
    // dropped, the next one delivered into it.
    assert_eq!(used, [0, 0, 0, 112]);
    let s = dev.stats().snapshot();
    assert_eq!((s.bad_rx_chains, s.rx_dropped, s.rx_frames), (3, 1, 1), "{s:?}");
}

#[test]
fn a_backend_that_takes_nothing_drops_frames_and_counts_them() {
    let (mut dev, peer) = device();
    let mem = mem();
    let f = frame(60_000, 3);
    let mut packet = vec![0u8; HEADER_LEN];
    packet.extend_from_slice(&f);
    mem.write_slice(&packet, GuestAddress(BUF)).unwrap();
    // Nobody reads the peer: its queue fills, then frames are dropped, none half sent.
    for _ in 0..64 {
        serve(&mut dev, &mem, TX_QUEUE, &[&[(BUF, packet.len() as u32, false)]]);
    }
    let s = dev.stats().snapshot();
    assert!(s.tx_dropped > 0, "{s:?}");
    assert_eq!(s.tx_frames + s.tx_dropped, 64);
    let mut delivered = 0;
    while let Some(got) = recv(&peer) {
        assert_eq!(got, f);
        delivered += 1;
    }
    assert_eq!(delivered, s.tx_frames);
}
