//! The entropy device against hostile chains, with a counting source (the host's generator
//! where only its working matters).

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, GuestAddress};

use super::*;
use crate::test_chains::{linked, D};

const MEM_SIZE: usize = 0x20_0000;

/// Bytes 1, 2, 3, ... (never 0), failing after `fail_after` calls.
struct Counting {
    next: u8,
    calls: usize,
    fail_after: usize,
}

impl EntropySource for Counting {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.calls += 1;
        if self.calls > self.fail_after {
            return Err(std::io::Error::other("no entropy"));
        }
        for b in buf {
            self.next = self.next.wrapping_add(1).max(1);
            *b = self.next;
        }
        Ok(())
    }
}

fn device(fail_after: usize) -> Entropy {
    Entropy::new(Box::new(Counting { next: 0, calls: 0, fail_after }))
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Submits one chain; returns (used length, interrupt) or None if nothing was used.
fn submit_raw(dev: &mut Entropy, mem: &GuestMemoryMmap, raw: &[RawDescriptor]) -> Option<(u32, bool)> {
    let mq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
    mq.add_desc_chains(raw, 0).unwrap();
    let mut queue: Queue = mq.create_queue().unwrap();
    let interrupt = dev.process_queue(0, &mut queue, mem);
    let used = mq.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    (idx > 0).then(|| (mem.read_obj::<u32>(used.unchecked_add(8)).unwrap(), interrupt))
}

fn submit(dev: &mut Entropy, mem: &GuestMemoryMmap, chain: &[D]) -> Option<(u32, bool)> {
    submit_raw(dev, mem, &linked(chain))
}

const BUF: u64 = 0x10_0000;

#[test]
fn writable_buffers_are_filled_and_the_used_length_says_how_much() {
    let (mut dev, mem) = (device(usize::MAX), mem());
    assert_eq!(dev.device_type(), 4);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    assert_eq!(submit(&mut dev, &mem, &[(BUF, 16, true), (BUF + 0x100, 48, true)]), Some((64, true)));
    let mut got = [0u8; 16];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert!(got.iter().all(|&b| b != 0));
    let s = dev.stats().snapshot();
    assert_eq!((s.requests, s.bytes), (1, 64));
}

#[test]
fn readable_descriptors_are_skipped_and_counted() {
    let (mut dev, mem) = (device(usize::MAX), mem());
    assert_eq!(submit(&mut dev, &mem, &[(BUF, 32, false), (BUF + 0x100, 8, true)]), Some((8, true)));
    let mut untouched = [0u8; 32];
    mem.read_slice(&mut untouched, GuestAddress(BUF)).unwrap();
    assert_eq!(untouched, [0; 32], "the device wrote a readable buffer");
    assert_eq!(dev.stats().snapshot().readable_descriptors, 1);
}

#[test]
fn a_huge_request_gets_at_most_the_cap_and_a_buffer_outside_ram_ends_the_writing() {
    let (mut dev, mem) = (device(usize::MAX), mem());
    assert_eq!(submit(&mut dev, &mem, &[(BUF, 0x8_0000, true)]), Some((MAX_BYTES_PER_CHAIN as u32, true)));
    let outside = MEM_SIZE as u64 - 8;
    assert_eq!(
        submit(&mut dev, &mem, &[(BUF, 8, true), (outside, 64, true), (BUF + 0x100, 8, true)]),
        Some((8, true))
    );
    let s = dev.stats().snapshot();
    assert_eq!(s.bad_descriptors, 1);
    // Length u32::MAX: capped, never allocated or written past the cap.
    assert_eq!(submit(&mut dev, &mem, &[(0x1000, u32::MAX, true)]), Some((MAX_BYTES_PER_CHAIN as u32, true)));
}

#[test]
fn a_failing_source_returns_what_was_written_before() {
    let (mut dev, mem) = (device(1), mem());
    assert_eq!(submit(&mut dev, &mem, &[(BUF, 8, true), (BUF + 0x100, 8, true)]), Some((8, true)));
    assert_eq!(dev.stats().snapshot().source_errors, 1);
}

#[test]
fn too_many_descriptors_are_served_up_to_the_limit() {
    let (mut dev, mem) = (device(usize::MAX), mem());
    let chain: Vec<D> = (0..100).map(|i| (BUF + i * 0x10, 1, true)).collect();
    assert_eq!(submit(&mut dev, &mem, &chain), Some((MAX_DESCRIPTORS as u32, true)));
    assert_eq!(dev.stats().snapshot().truncated_chains, 1);
}

#[test]
fn the_host_source_fills_a_buffer() {
    let mut buf = [0u8; 64];
    HostRandom.fill(&mut buf).expect("getrandom");
    assert!(buf.iter().any(|&b| b != 0));
}
