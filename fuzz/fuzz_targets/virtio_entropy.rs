//! virtio-rng end to end: request chains (device-writable buffers, with readable ones, buffers
//! outside guest RAM and over-long chains mixed in) in a split virtqueue on guest memory
//! (virtio 1.2 §5.4), served by `Entropy` from a source that hands out a known byte stream and
//! fails when told to.
//!
//! Well-framed chains are predicted exactly: which bytes of the stream land in which buffer, the
//! used length, and every counter. Chains with faults (loops, bad links, flipped directions,
//! repeated descriptors) are checked for what holds for any chain: returned once, a used length
//! within what the chain could take and [`MAX_BYTES_PER_CHAIN`], one request counted per chain,
//! and bytes counted as written.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{
    apply_faults, counted, guest_memory, linked, queue_size, read_bytes, ChainFault, Part, Ring,
};
use samepage_virtio::entropy::{
    Entropy, EntropySource, EntropyStatsSnapshot, MAX_BYTES_PER_CHAIN, MAX_DESCRIPTORS,
};
use samepage_virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;

/// Guest RAM: `[0, RAM_END)`, then a hole.
const RAM_END: u64 = 0x8_0000;
/// The queue's rings, its indirect tables, and the buffers' area.
const RING: u64 = 0;
const INDIRECT: (u64, u64) = (0x4000, 0x8000);
const BUFS: u64 = 0x1_0000;

#[derive(Arbitrary, Debug)]
struct Input {
    queue_size: u8,
    #[arbitrary(with = counted::<_, 1, 24>)]
    chains: Vec<ChainSpec>,
}

#[derive(Arbitrary, Debug)]
struct ChainSpec {
    #[arbitrary(with = counted::<_, 0, 80>)]
    parts: Vec<PartSpec>,
    indirect: bool,
    /// Serve the queue once this chain is in it.
    notify: bool,
    /// The source fails after this many more bytes (255: never).
    fail_after: u8,
    /// Faults apply when this is 224 or more.
    fault_roll: u8,
    faults: Vec<ChainFault>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct PartSpec {
    /// 0..=191 a writable buffer in RAM, ..=223 a readable one, else `addr` as given.
    roll: u8,
    offset: u16,
    len: u16,
    addr: u64,
    big: bool,
}

/// The stream the source hands out: byte `i` is `i * 7 + 3` (mod 256), and the byte count at
/// which it fails next.
#[derive(Default)]
struct Stream {
    next: u64,
    fail_at: Option<u64>,
}

struct TestSource(Arc<Mutex<Stream>>);

impl EntropySource for TestSource {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut s = self.0.lock().expect("stream");
        if s.fail_at.is_some_and(|at| s.next + buf.len() as u64 > at) {
            return Err(std::io::Error::other("the test source fails"));
        }
        for b in buf.iter_mut() {
            *b = stream_byte(s.next);
            s.next += 1;
        }
        Ok(())
    }
}

fn stream_byte(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3)) as u8
}

fn part_of(i: usize, p: PartSpec) -> Part {
    let len = if p.big { u32::from(p.len) * 16 } else { u32::from(p.len) % 600 };
    match p.roll {
        0..=223 => {
            let addr = BUFS + (i as u64 * 0x700 + u64::from(p.offset)) % (RAM_END - BUFS - 0x1_0000);
            (addr, len.min((RAM_END - addr) as u32), p.roll <= 191)
        }
        _ => (p.addr, len, true),
    }
}

/// What a well-framed chain must get: the used length, the buffers written (address, stream
/// offset, length), and the counters.
struct Expected {
    used: u32,
    writes: Vec<(u64, u64, usize)>,
    counters: EntropyStatsSnapshot,
}

/// Whether vm-memory writes `len` bytes at `addr` (an empty write succeeds anywhere).
fn in_ram(addr: u64, len: usize) -> bool {
    len == 0 || addr.checked_add(len as u64).is_some_and(|end| end <= RAM_END)
}

/// The device's rule, restated, for chain `parts` with the stream at `next` failing at `fail_at`;
/// `None` for a chain that writes over the queue's own rings and tables, which the device then
/// reads as the driver left them after the write (anything may follow).
fn expect(parts: &[Part], next: u64, fail_at: Option<u64>) -> Option<Expected> {
    if parts.iter().any(|&(addr, len, write)| write && len > 0 && addr < BUFS) {
        return None;
    }
    let mut c = EntropyStatsSnapshot { requests: 1, ..Default::default() };
    let (mut written, mut writes) = (0usize, Vec::new());
    if parts.is_empty() {
        c.malformed_chains = 1;
    }
    for (seen, &(addr, len, write)) in parts.iter().enumerate() {
        if seen >= MAX_DESCRIPTORS || written == MAX_BYTES_PER_CHAIN {
            c.truncated_chains = 1;
            break;
        }
        if !write {
            c.readable_descriptors += 1;
            continue;
        }
        let n = (len as usize).min(MAX_BYTES_PER_CHAIN - written);
        let at = next + written as u64;
        if fail_at.is_some_and(|f| at + n as u64 > f) {
            c.source_errors = 1;
            break;
        }
        if !in_ram(addr, n) {
            c.bad_descriptors = 1;
            break;
        }
        writes.push((addr, at, n));
        written += n;
    }
    c.bytes = written as u64;
    Some(Expected { used: written as u32, writes, counters: c })
}

fn delta(a: &EntropyStatsSnapshot, b: &EntropyStatsSnapshot) -> EntropyStatsSnapshot {
    let d = |x: u64, y: u64| x.checked_sub(y).expect("a counter went down");
    EntropyStatsSnapshot {
        requests: d(a.requests, b.requests),
        bytes: d(a.bytes, b.bytes),
        readable_descriptors: d(a.readable_descriptors, b.readable_descriptors),
        bad_descriptors: d(a.bad_descriptors, b.bad_descriptors),
        malformed_chains: d(a.malformed_chains, b.malformed_chains),
        truncated_chains: d(a.truncated_chains, b.truncated_chains),
        source_errors: d(a.source_errors, b.source_errors),
    }
}

/// A chain in the queue, waiting to be served.
struct Pending {
    parts: Vec<Part>,
    faulty: bool,
    fail_after: Option<u64>,
}

struct Run {
    mem: GuestMemoryMmap,
    dev: Entropy,
    stream: Arc<Mutex<Stream>>,
    ring: Ring,
    queue: virtio_queue::Queue,
    pending: Vec<Pending>,
    returned: u16,
}

impl Run {
    /// Serves the queue, one chain at a time as the device does, checking each against the
    /// model (the stream position and counters before it are known exactly).
    fn serve(&mut self) {
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        // The device serves every available chain in one call; predict them in order, each
        // from where the stream will be.
        let stats = self.dev.stats();
        let before = stats.snapshot();
        let mut next = self.stream.lock().expect("stream").next;
        let mut model = Vec::with_capacity(n);
        let mut known = true;
        for p in &self.pending {
            // After a faulty chain the stream's position is unknown: no more predictions.
            known &= !p.faulty;
            let fail_at = p.fail_after.map(|f| next + f);
            let e = if known { expect(&p.parts, next, fail_at) } else { None };
            known &= e.is_some();
            if let Some(e) = &e {
                next += e.counters.bytes;
            }
            model.push(e);
        }
        // What the buffer area must hold afterwards, when every chain is predicted (buffers may
        // overlap: later writes win).
        let mut image = read_bytes(&self.mem, BUFS, (RAM_END - BUFS) as usize);
        for e in model.iter().flatten() {
            for &(addr, at, len) in &e.writes {
                for i in 0..len {
                    if let Some(b) =
                        (addr + i as u64).checked_sub(BUFS).and_then(|o| image.get_mut(o as usize))
                    {
                        *b = stream_byte(at + i as u64);
                    }
                }
            }
        }
        // Only the first chain's failure point is known to the source at once; set it, serve
        // one chain at a time by hand: the device takes all available chains, so chains with
        // a failure point are served alone (see `submit`).
        let fail_at = self.pending[0].fail_after.map(|f| self.stream.lock().expect("stream").next + f);
        self.stream.lock().expect("stream").fail_at = fail_at;
        let interrupt = self.dev.process_queue(0, &mut self.queue, &self.mem);
        self.stream.lock().expect("stream").fail_at = None;
        assert!(interrupt, "chains were returned");
        let used_idx = self.ring.used_idx(&self.mem);
        assert_eq!(used_idx, self.returned.wrapping_add(n as u16), "every chain returned once");
        let after = stats.snapshot();
        let d = delta(&after, &before);
        assert_eq!(d.requests, n as u64, "one request per chain");
        let mut total = 0u64;
        for (k, (p, e)) in self.pending.iter().zip(&model).enumerate() {
            let (_, used) = self.ring.used_elem(&self.mem, self.returned.wrapping_add(k as u16));
            total += u64::from(used);
            assert!(used as usize <= MAX_BYTES_PER_CHAIN, "used {used}");
            if !p.faulty {
                let writable: u64 = p.parts.iter().filter(|x| x.2).map(|x| u64::from(x.1)).sum();
                assert!(u64::from(used) <= writable, "used {used} of {writable} writable bytes");
            }
            if let Some(e) = e {
                assert_eq!(
                    used, e.used,
                    "used length of chain {k}: {:?}, the source failing after {:?}",
                    p.parts, p.fail_after
                );
            }
        }
        if model.iter().all(Option::is_some) {
            let got = read_bytes(&self.mem, BUFS, (RAM_END - BUFS) as usize);
            assert!(got == image, "the buffers hold other bytes than the stream's");
        }
        assert_eq!(d.bytes, total, "bytes counted as written");
        if model.iter().all(Option::is_some) {
            let mut want = EntropyStatsSnapshot::default();
            for e in model.iter().flatten() {
                let c = &e.counters;
                want.requests += c.requests;
                want.bytes += c.bytes;
                want.readable_descriptors += c.readable_descriptors;
                want.bad_descriptors += c.bad_descriptors;
                want.malformed_chains += c.malformed_chains;
                want.truncated_chains += c.truncated_chains;
                want.source_errors += c.source_errors;
            }
            assert_eq!(
                d,
                want,
                "counters of {:?}",
                self.pending.iter().map(|p| &p.parts).collect::<Vec<_>>()
            );
        }
        self.returned = used_idx;
        self.pending.clear();
        self.ring.reclaim();
    }

    fn submit(&mut self, i: usize, spec: &ChainSpec) {
        let parts: Vec<Part> = spec.parts.iter().enumerate().map(|(k, &p)| part_of(i * 80 + k, p)).collect();
        let faults: &[ChainFault] = if spec.fault_roll >= 224 { &spec.faults } else { &[] };
        let mut chain = linked(&parts);
        apply_faults(&mut chain, faults);
        let fail_after = (spec.fail_after != 255).then(|| u64::from(spec.fail_after) * 97);
        // A failing source is modelled for the first chain served: serve what waits first.
        if fail_after.is_some() {
            self.serve();
        }
        if chain.is_empty() || !self.ring.add_chain(&self.mem, &chain, spec.indirect) {
            self.serve();
            if chain.is_empty() || !self.ring.add_chain(&self.mem, &chain, spec.indirect) {
                return;
            }
        }
        self.pending.push(Pending { parts, faulty: !faults.is_empty(), fail_after });
        if spec.notify || fail_after.is_some() {
            self.serve();
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory(&[(0, RAM_END as usize)]);
    let stream = Arc::new(Mutex::new(Stream::default()));
    let mut dev = Entropy::new(Box::new(TestSource(stream.clone())));
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    dev.features_accepted(VIRTIO_F_VERSION_1);
    dev.activate(VIRTIO_F_VERSION_1, &[true]).expect("activation with the queue ready");
    let ring = Ring::new(&mem, RING, queue_size(input.queue_size), INDIRECT);
    let queue = ring.queue();
    let mut run = Run { mem, dev, stream, ring, queue, pending: Vec::new(), returned: 0 };
    for (i, spec) in input.chains.iter().enumerate() {
        run.submit(i, spec);
    }
    run.serve();
    // Configuration: none, reads zeros, writes ignored.
    let mut b = [0xeeu8; 8];
    run.dev.read_config(0, &mut b);
    assert_eq!(b, [0; 8]);
});
