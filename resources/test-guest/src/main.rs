//! samepage's freestanding test guest: a PVH ELF whose CPL0 start-up (boot.rs) drops to CPL3,
//! where everything else runs (see README.md for why). It reads its mode from the command line
//! (`testguest.mode=`, default `disks`) and reports on COM1 and through the exit-status port.

#![no_std]
#![no_main]

// First, so that its macros (print!, println!, fail!) are in scope in every other module.
#[macro_use]
mod io;

mod alternate;
mod balloon;
mod blk;
mod boot;
mod churn;
mod clock;
mod cmdline;
mod counter;
mod entropy;
mod fphash;
mod keyboard;
mod liar;
mod mem;
mod pagecache;
mod ram;
mod reuse;
mod snapshot;
mod virtio;
mod vma;
mod zeros;

use blk::{feature, req, Blk, DmaMem, ID_BYTES, SECTOR};
use cmdline::{Cmdline, MAX_DEVICES};
use fphash::{Fphash, FphashMem, Hashing};
use io::{EXIT_FAIL, EXIT_OK};
use virtio::QueueMem;

/// Queue rings, one page per device; block DMA buffers shared by the disks, used one at a
/// time; the page-hash device's request and response buffers. Only touched through raw
/// pointers handed to the drivers.
pub static mut QUEUES: [QueueMem; MAX_DEVICES] = unsafe { core::mem::zeroed() };
static mut DMA: DmaMem = unsafe { core::mem::zeroed() };
static mut FPHASH_MEM: FphashMem = unsafe { core::mem::zeroed() };

/// Called at CPL3 by the start-up code with the physical address of `hvm_start_info`.
#[no_mangle]
pub extern "sysv64" fn rust_main(start_info: u64) -> ! {
    io::serial_init();
    println!("samepage test guest: hello");
    let cmdline = match cmdline::parse(start_info) {
        Ok(c) => c,
        Err(e) => fail!("command line: {}", e),
    };
    println!("cmdline: {}", Bytes(cmdline.text));
    let mode = cmdline.mode;
    println!("mode: {}", Bytes(mode));
    match mode {
        b"disks" => disks(&cmdline),
        b"spin" => spin(),
        b"triplefault" => triple_fault(),
        b"echo" => echo(),
        b"reboot" => reboot(),
        b"fphash" => pagecache::run(&cmdline),
        b"fphash-counter" => counter::run(&cmdline),
        b"fphash-liar" => liar::run(&cmdline),
        b"fphash-vma" => vma::run(&cmdline),
        b"alternate" => alternate::run(&cmdline),
        b"balloon" => reuse::run(&cmdline),
        b"balloon-churn" => churn::run(&cmdline),
        b"snapshot" => snapshot::run(&cmdline),
        b"entropy" => entropy::run(&cmdline),
        b"ctrlaltdel" => keyboard::run(),
        b"zeros" => zeros::run(&cmdline),
        _ => match mode.strip_prefix(b"exit=").and_then(cmdline::parse_number) {
            Some(n) if n <= 255 => {
                println!("exit: {}", n);
                io::exit(n as u8)
            }
            _ => fail!("unknown mode {}", Bytes(mode)),
        },
    }
}

/// `spin`: loop forever at CPL3 (for the VMM's --timeout tests).
fn spin() -> ! {
    println!("spin: looping forever");
    loop {
        core::hint::spin_loop();
    }
}

/// `triplefault`: the IDT has no #UD, #NP or #DF gate, so #UD cannot be delivered: #NP, then
/// #DF, then shutdown (Intel SDM Vol. 3A §6.15, interrupt 8).
fn triple_fault() -> ! {
    println!("triplefault: executing ud2 with no #UD handler");
    // SAFETY: deliberately raises #UD; nothing runs after it.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// `echo`: copy COM1 input back until a `q`, then exit 0.
fn echo() -> ! {
    println!("echo: ready, type q to quit");
    loop {
        let b = io::serial_getc();
        io::serial_putc(b);
        if b == b'q' {
            println!();
            println!("echo: done");
            io::exit(EXIT_OK);
        }
    }
}

/// `reboot`: i8042 reset. If the machine is still running shortly after, fail.
fn reboot() -> ! {
    println!("reboot: writing 0xfe to port 0x64");
    io::i8042_reset();
    for _ in 0..100_000_000u64 {
        core::hint::spin_loop();
    }
    fail!("reboot: still running after the i8042 reset")
}

/// `disks`: hash every virtio-blk disk, GET_ID, and the write test.
fn disks(cmdline: &Cmdline) -> ! {
    if cmdline.dropped > 0 {
        fail!("more than {} virtio-mmio devices on the command line", MAX_DEVICES);
    }
    let mut disk = 0;
    for (i, dev) in cmdline.devices[..cmdline.device_count].iter().flatten().enumerate() {
        let (magic, version, id) = virtio::probe(dev.base);
        if magic == virtio::MAGIC && id == 0 {
            // Id 0: a transport with no device behind it (QEMU microvm has 24 of them).
            continue;
        }
        println!(
            "virtio-mmio {}: base {:#x} size {:#x} irq {} magic {:#x} version {} device id {}",
            i, dev.base, dev.size, dev.irq, magic, version, id
        );
        if magic != virtio::MAGIC {
            fail!("virtio-mmio {} at {:#x}: bad magic {:#x}", i, dev.base, magic);
        }
        if id != blk::DEVICE_ID_BLOCK {
            // Other devices (e.g. samepage's page-hash device) are not tested here.
            continue;
        }
        // SAFETY: each device gets its own queue page; DMA is shared but devices are driven
        // one after another and each finishes its requests before the next starts.
        let mut blk = match unsafe { Blk::init(dev.base, &raw mut QUEUES[i], &raw mut DMA) } {
            Ok(b) => b,
            Err(e) => fail!("disk {}: {}", disk, e),
        };
        test_disk(disk, &mut blk);
        disk += 1;
    }
    if disk == 0 {
        println!("no virtio-blk devices");
    }
    println!("samepage test guest: all {} disks ok", disk);
    io::exit(EXIT_OK)
}

/// The first announced device with virtio device ID `id`: (its command-line index, base).
pub fn find_device(cmdline: &Cmdline, id: u32) -> Option<(usize, u64)> {
    cmdline.devices[..cmdline.device_count].iter().flatten().enumerate().find_map(|(i, dev)| {
        let (magic, _, dev_id) = virtio::probe(dev.base);
        (magic == virtio::MAGIC && dev_id == id).then_some((i, dev.base))
    })
}

/// The page-hash device, initialized; FAIL if there is none or it does not initialize.
/// `testguest.hash=host|guest` (default guest) chooses who hashes the reported pages; modes
/// that check the guest's own hashes pass `host_hash_ok` false and refuse `host`.
pub fn open_fphash(cmdline: &Cmdline, host_hash_ok: bool) -> Fphash {
    let hashing = match cmdline.option("testguest.hash") {
        None | Some(b"guest") => Hashing::Guest,
        Some(b"host") if host_hash_ok => Hashing::Host,
        Some(b"host") => {
            fail!("testguest.hash=host: mode {} checks the guest's own hashes", Bytes(cmdline.mode))
        }
        Some(other) => fail!("bad value in testguest.hash={} (host or guest)", Bytes(other)),
    };
    let Some((i, base)) = find_device(cmdline, fphash::DEVICE_ID_FPHASH) else { fail!("no fphash device") };
    // SAFETY: the device's own queue page; FPHASH_MEM is used by this one device only.
    match unsafe { Fphash::init(base, &raw mut QUEUES[i], &raw mut FPHASH_MEM, hashing) } {
        Ok(f) => {
            let by = match (f.host_hash, hashing) {
                (true, _) => "host",
                (false, Hashing::Host) => "guest (the device does not offer host hashing)",
                (false, Hashing::Guest) => "guest",
            };
            println!(
                "fphash: device at {:#x}, max_records {}, batches of {}, hash {}",
                base, f.device_max, f.batch, by
            );
            f
        }
        Err(e) => fail!("fphash device at {:#x}: {}", base, e),
    }
}

/// The virtio-balloon device, initialized, with its queues and PFN array in pages of `arena`;
/// `None` when the VM has none. FAIL if it does not initialize.
pub fn open_balloon(cmdline: &Cmdline, arena: &mut ram::Arena) -> Option<balloon::Balloon> {
    let (_, base) = find_device(cmdline, balloon::DEVICE_ID_BALLOON)?;
    let Some(at) = arena.alloc_pages(6) else { fail!("balloon: no free RAM for its queues") };
    let page = |i: u64| (at + i * ram::PAGE) as *mut QueueMem;
    let queues = [page(0), page(1), page(2), page(3)];
    // SAFETY: six fresh pages of the arena, owned by this device from now on.
    match unsafe { balloon::Balloon::init(base, queues, page(4).cast(), page(5).cast()) } {
        Ok(b) => {
            let on = |yes: bool| if yes { "on" } else { "off" };
            println!(
                "balloon: device at {:#x}, free page reporting {}, statistics {}",
                base,
                on(b.reports()),
                on(b.has_stats())
            );
            Some(b)
        }
        Err(e) => fail!("balloon device at {:#x}: {}", base, e),
    }
}

/// The first virtio-blk disk, initialized; FAIL if there is none.
pub fn open_disk0(cmdline: &Cmdline) -> Blk {
    open_disk(cmdline, 0)
}

/// Virtio-blk disk `n` (counting block devices in command-line order), initialized; FAIL if
/// there is none.
pub fn open_disk(cmdline: &Cmdline, n: usize) -> Blk {
    let mut disks =
        cmdline.devices[..cmdline.device_count].iter().flatten().enumerate().filter(|(_, dev)| {
            let (magic, _, id) = virtio::probe(dev.base);
            magic == virtio::MAGIC && id == blk::DEVICE_ID_BLOCK
        });
    let Some((i, dev)) = disks.nth(n) else { fail!("no virtio-blk disk {}", n) };
    // SAFETY: the device's own queue page; DMA holds one request's header and status at a time,
    // and the modes that open disks wait for each request before the next, on any disk.
    match unsafe { Blk::init(dev.base, &raw mut QUEUES[i], &raw mut DMA) } {
        Ok(b) => b,
        Err(e) => fail!("disk {}: {}", n, e),
    }
}

/// A numeric `testguest.<name>=` option; FAIL if malformed.
pub fn option(cmdline: &Cmdline, name: &'static str, default: u64) -> u64 {
    match cmdline.number(name, default) {
        Ok(v) => v,
        Err(name) => fail!("bad number in {}=", name),
    }
}

/// The free RAM after the guest image; FAIL without a PVH memory map.
pub fn arena(cmdline: &Cmdline) -> (ram::RamMap, ram::Arena) {
    let map = match ram::RamMap::read(cmdline.start_info) {
        Ok(m) => m,
        Err(e) => fail!("{}", e),
    };
    match map.arena() {
        Ok(a) => (map, a),
        Err(e) => fail!("{}", e),
    }
}

fn test_disk(n: usize, blk: &mut Blk) {
    let bytes = blk.capacity * SECTOR;
    println!(
        "disk {}: capacity {} sectors, features offered {:#x} negotiated {:#x}, request size {}",
        n, blk.capacity, blk.offered, blk.features, blk.max_request
    );

    // Whole-disk BLAKE3.
    let mut hasher = blake3::Hasher::new();
    let chunk = (blk.max_request as u64) / SECTOR;
    let mut sector = 0;
    while sector < blk.capacity {
        let count = chunk.min(blk.capacity - sector);
        let len = (count * SECTOR) as usize;
        check_status(n, "read", sector, blk.request(req::IN, sector, len, true));
        hasher.update(&blk.data()[..len]);
        sector += count;
    }
    println!("disk {}: size {} blake3 {}", n, bytes, hasher.finalize().to_hex());

    // GET_ID.
    blk.data()[..ID_BYTES].fill(0);
    match blk.request(req::GET_ID, 0, ID_BYTES, true) {
        Ok(req::S_OK) => {
            let id = &blk.data()[..ID_BYTES];
            let end = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
            println!("disk {}: id \"{}\"", n, Bytes(&id[..end]));
        }
        Ok(req::S_UNSUPP) => println!("disk {}: id unsupported", n),
        Ok(s) => fail!("disk {}: GET_ID status {}", n, s),
        Err(e) => fail!("disk {}: GET_ID: {}", n, e),
    }

    // Write test on the last 4 KiB (or the whole disk if smaller).
    let count = blk.capacity.min(8);
    if count == 0 {
        println!("disk {}: empty, write test skipped", n);
        return;
    }
    let first = blk.capacity - count;
    let len = (count * SECTOR) as usize;
    if blk.features & feature::BLK_RO != 0 {
        // Write back what is there, so that a device that wrongly accepts it changes nothing.
        check_status(n, "read", first, blk.request(req::IN, first, len, true));
        match blk.request(req::OUT, first, len, false) {
            Ok(req::S_IOERR) => println!("disk {}: read-only, write rejected ok", n),
            Ok(s) => fail!(
                "disk {}: read-only device answered a write with status {} (want {})",
                n,
                s,
                req::S_IOERR
            ),
            Err(e) => fail!("disk {}: write: {}", n, e),
        }
        return;
    }
    fill_pattern(&mut blk.data()[..len], first);
    check_status(n, "write", first, blk.request(req::OUT, first, len, false));
    if blk.features & feature::BLK_FLUSH != 0 {
        check_status(n, "flush", 0, blk.request(req::FLUSH, 0, 0, false));
    }
    blk.data()[..len].fill(0);
    check_status(n, "read back", first, blk.request(req::IN, first, len, true));
    let mut expected = [0u8; 4096];
    fill_pattern(&mut expected[..len], first);
    if blk.data()[..len] != expected[..len] {
        fail!("disk {}: read back of sectors {}..{} differs from what was written", n, first, first + count);
    }
    println!("disk {}: write-readback ok", n);
}

/// The write-test pattern: byte `i` of sector `s` is `"samepage"[i % 8] ^ (s as u8) ^ (i / 8) as u8`.
fn fill_pattern(buf: &mut [u8], first_sector: u64) {
    for (j, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let s = (first_sector + j as u64) as u8;
        for (i, b) in sector.iter_mut().enumerate() {
            *b = b"samepage"[i % 8] ^ s ^ (i / 8) as u8;
        }
    }
}

pub fn check_status(n: usize, what: &str, sector: u64, r: Result<u8, virtio::Error>) {
    match r {
        Ok(req::S_OK) => {}
        Ok(s) => fail!("disk {}: {} at sector {}: status {}", n, what, sector, s),
        Err(e) => fail!("disk {}: {} at sector {}: {}", n, what, sector, e),
    }
}

/// Prints bytes as text, escaping anything that is not printable ASCII.
pub struct Bytes<'a>(&'a [u8]);

impl core::fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) {
                core::fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{:02x}", b)?;
            }
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("FAIL: panic: {}", info);
    io::exit(EXIT_FAIL)
}
