//! `testguest.mode=entropy`: asks the virtio entropy device (`--entropy`) for random bytes:
//! `testguest.requests` (default 8) requests of 64 bytes, then one of 128 KiB (more than the
//! device gives for one request). Each answer must be the length asked (capped), not all
//! zeros, and differ from the one before; prints each request's length and first bytes.

use crate::cmdline::Cmdline;
use crate::io::{self, EXIT_OK};
use crate::ram::PAGE;
use crate::virtio::{QueueMem, Seg, Transport};
use crate::{arena, find_device, option, QUEUES};

/// virtio 1.2 §5: the entropy device's ID.
const DEVICE_ID_RNG: u32 = 4;
/// What the device gives for one request at most (samepage's `MAX_BYTES_PER_CHAIN`).
const DEVICE_CAP: u32 = 64 << 10;

pub fn run(cmdline: &Cmdline) -> ! {
    let requests = option(cmdline, "testguest.requests", 8);
    let Some((i, base)) = find_device(cmdline, DEVICE_ID_RNG) else { fail!("entropy: no entropy device") };
    let t = match Transport::negotiate(base, DEVICE_ID_RNG, 0) {
        Ok(t) => t,
        Err(e) => fail!("entropy: {}", e),
    };
    // SAFETY: the device's own queue page, used by nothing else.
    let mut queue = match unsafe { t.setup_queue(0, &raw mut QUEUES[i] as *mut QueueMem, 1) } {
        Ok(q) => q,
        Err(e) => fail!("entropy: queue: {}", e),
    };
    t.driver_ok();
    let (_, mut arena) = arena(cmdline);
    let Some(buf) = arena.alloc_pages(128 * 1024 / PAGE) else { fail!("entropy: no room for buffers") };
    let mut last = [0u8; 64];
    for n in 0..requests {
        // SAFETY: a fresh arena buffer, identity-mapped, used only by this request.
        let got = match unsafe { queue.run(&[Seg { addr: buf, len: 64, device_writes: true }], &mut || {}) } {
            Ok(len) => len,
            Err(e) => fail!("entropy: request {}: {}", n, e),
        };
        // SAFETY: the buffer the device just filled.
        let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, 64) };
        if got != 64 || bytes.iter().all(|&b| b == 0) || bytes == &last[..] {
            fail!("entropy: request {} gave {} bytes, all zero or as the last", n, got);
        }
        println!(
            "entropy: request {} gave {} bytes: {:02x} {:02x} {:02x} {:02x} ...",
            n, got, bytes[0], bytes[1], bytes[2], bytes[3]
        );
        last.copy_from_slice(bytes);
    }
    // SAFETY: as above, 128 KiB.
    let got =
        match unsafe { queue.run(&[Seg { addr: buf, len: 128 * 1024, device_writes: true }], &mut || {}) } {
            Ok(len) => len,
            Err(e) => fail!("entropy: large request: {}", e),
        };
    if got != DEVICE_CAP {
        fail!("entropy: a 128 KiB request gave {} bytes, not the device's cap {}", got, DEVICE_CAP);
    }
    println!("entropy: a 128 KiB request gave {} bytes", got);
    println!("entropy: ok");
    io::exit(EXIT_OK)
}
