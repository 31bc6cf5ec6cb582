//! The command line from `hvm_start_info`: `virtio_mmio.device=<size>@<base>:<irq>` tokens
//! (drivers/virtio/virtio_mmio.c syntax, sizes as Linux `memparse`), `testguest.mode=` and the
//! modes' numeric `testguest.<name>=<n>` options.

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of `cmdline_paddr` (u64) in `struct hvm_start_info`.
const CMDLINE_PADDR_OFFSET: u64 = 24;
/// Longest command line read (Linux x86 COMMAND_LINE_SIZE).
const CMDLINE_MAX: usize = 2048;
/// Most virtio-mmio devices handled.
pub const MAX_DEVICES: usize = 32;

/// One announced virtio-mmio window.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// What the command line asked for.
pub struct Cmdline {
    pub text: &'static [u8],
    pub devices: [Option<MmioDevice>; MAX_DEVICES],
    pub device_count: usize,
    /// Devices announced beyond `MAX_DEVICES`.
    pub dropped: usize,
    pub mode: &'static [u8],
    /// Physical address of `hvm_start_info` (for the memory map).
    pub start_info: u64,
}

impl Cmdline {
    /// The value of the last `<name>=<value>` token, if any.
    pub fn option(&self, name: &str) -> Option<&'static [u8]> {
        let mut found = None;
        for token in self.text.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
            if let Some(rest) = token.strip_prefix(name.as_bytes()) {
                if let Some(value) = rest.strip_prefix(b"=") {
                    found = Some(value);
                }
            }
        }
        found
    }

    /// A numeric option (decimal or 0x hex), `default` when absent; Err(name) when malformed.
    pub fn number(&self, name: &'static str, default: u64) -> Result<u64, &'static str> {
        match self.option(name) {
            None => Ok(default),
            Some(v) => parse_number(v).ok_or(name),
        }
    }
}

/// Reads and parses the command line that `start_info` points at.
pub fn parse(start_info: u64) -> Result<Cmdline, &'static str> {
    if start_info == 0 {
        return Err("no hvm_start_info (%ebx was 0)");
    }
    // SAFETY: the PVH loader put hvm_start_info at this identity-mapped guest address.
    let (magic, paddr) = unsafe {
        (
            (start_info as *const u32).read_volatile(),
            ((start_info + CMDLINE_PADDR_OFFSET) as *const u64).read_volatile(),
        )
    };
    if magic != HVM_START_MAGIC {
        return Err("bad hvm_start_info magic");
    }
    let text: &'static [u8] = if paddr == 0 {
        &[]
    } else {
        let p = paddr as *const u8;
        let mut len = 0;
        // SAFETY: a NUL-terminated string in identity-mapped RAM; at most CMDLINE_MAX bytes.
        while len < CMDLINE_MAX && unsafe { p.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: the bytes just scanned; nothing writes them afterwards.
        unsafe { core::slice::from_raw_parts(p, len) }
    };
    let mut out = Cmdline {
        text,
        devices: [None; MAX_DEVICES],
        device_count: 0,
        dropped: 0,
        mode: b"disks",
        start_info,
    };
    for token in text.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if let Some(spec) = token.strip_prefix(b"virtio_mmio.device=") {
            let dev = parse_device(spec).ok_or("bad virtio_mmio.device= token")?;
            if out.device_count < MAX_DEVICES {
                out.devices[out.device_count] = Some(dev);
                out.device_count += 1;
            } else {
                out.dropped += 1;
            }
        } else if let Some(mode) = token.strip_prefix(b"testguest.mode=") {
            out.mode = mode;
        }
    }
    Ok(out)
}

/// `<size>@<base>:<irq>`, e.g. `4K@0xd0000000:5` or `512@0xfeb00e00:12`.
fn parse_device(spec: &[u8]) -> Option<MmioDevice> {
    let at = spec.iter().position(|&b| b == b'@')?;
    let colon = spec.iter().position(|&b| b == b':')?;
    if colon < at {
        return None;
    }
    let size = parse_size(&spec[..at])?;
    let base = parse_number(&spec[at + 1..colon])?;
    // Linux also accepts a trailing ":<id>"; ignore it.
    let irq_part = &spec[colon + 1..];
    let irq_end = irq_part.iter().position(|&b| b == b':').unwrap_or(irq_part.len());
    let irq = parse_number(&irq_part[..irq_end])?;
    Some(MmioDevice { base, size, irq: u32::try_from(irq).ok()? })
}

/// A number with an optional K/M/G suffix (Linux `memparse`).
fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// Decimal, or hexadecimal with a `0x` prefix (Linux `simple_strtoull` with base 0; octal
/// is not used by anyone here).
pub fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}
